//! Tracing and OpenTelemetry for tenantmesh services: JSON logs in which
//! every line inside a request carries `tenant_id` (and `trace_id`), server
//! and client spans with `tenant.id`, `tenant.tier` and the OTel RPC
//! attributes, W3C trace-context propagation over gRPC metadata, and OTLP
//! export of traces and metrics when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
#![forbid(unsafe_code)]

mod json;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing::Span;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use json::{CaptureContextFields, JsonFormat};
pub use opentelemetry::Context as OtelContext;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Telemetry settings; `Default` reads nothing from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `service.name` of the OTel resource and the `service` of log lines.
    pub service: String,
    /// An `EnvFilter` directive, e.g. `info` (from `RUST_LOG`).
    pub filter: String,
    /// OTLP/gRPC endpoint (from `OTEL_EXPORTER_OTLP_ENDPOINT`); no export if unset.
    pub otlp_endpoint: Option<String>,
    pub log_target: LogTarget,
}

/// Noisy transport crates are kept at `warn` unless `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,opentelemetry_sdk=warn";

impl Config {
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            filter: DEFAULT_FILTER.into(),
            otlp_endpoint: None,
            log_target: LogTarget::Stdout,
        }
    }

    /// Reads `RUST_LOG` and `OTEL_EXPORTER_OTLP_ENDPOINT` from `env`.
    pub fn from_env(service: impl Into<String>, env: &std::collections::HashMap<String, String>) -> Self {
        let mut c = Self::new(service);
        if let Some(f) = env.get("RUST_LOG").filter(|f| !f.is_empty()) {
            c.filter = f.clone();
        }
        c.otlp_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()).cloned();
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    #[error("otlp exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer (and meter) provider alive; flushes and shuts them
/// down on drop.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TelemetryGuard")
    }
}

impl TelemetryGuard {
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// The meter provider, when metrics are exported (OTLP endpoint set).
    pub fn meters(&self) -> Option<&opentelemetry_sdk::metrics::SdkMeterProvider> {
        self.meters.as_ref()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
        if let Some(m) = &self.meters {
            let _ = m.force_flush();
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber (JSON logs + OTel spans) and the W3C
/// propagator. OTLP export needs a running tokio runtime.
pub fn init(config: Config) -> Result<TelemetryGuard, TelemetryError> {
    init_with_exporter(config, None::<NoExporter>)
}

/// Like [`init`], with an extra exporter fed synchronously (tests use an
/// in-memory exporter to inspect spans).
pub fn init_with_exporter<E: SpanExporter + 'static>(
    config: Config,
    extra: Option<E>,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(&config.filter).map_err(|e| TelemetryError::Filter(config.filter.clone(), e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service.clone()).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut meters = None;
    if let Some(endpoint) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        // The tonic exporters need a tokio reactor: the SDK's thread-based
        // processors have none and panic, so both export on the tokio runtime.
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            spans,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        builder = builder.with_span_processor(processor);
        let reader = opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
            metrics,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let provider =
            opentelemetry_sdk::metrics::SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
        opentelemetry::global::set_meter_provider(provider.clone());
        meters = Some(provider);
    }
    if let Some(exporter) = extra {
        builder = builder.with_simple_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(config.service.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let fmt = tracing_subscriber::fmt::layer().event_format(JsonFormat::new(config.service.clone()));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(CaptureContextFields);
    let installed = match config.log_target {
        LogTarget::Stdout => registry.with(fmt.with_writer(std::io::stdout)).try_init(),
        LogTarget::Stderr => registry.with(fmt.with_writer(std::io::stderr)).try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider, meters })
}

/// A placeholder exporter type for [`init`]; never constructed.
#[derive(Debug)]
pub struct NoExporter;

impl SpanExporter for NoExporter {
    async fn export(&self, _batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// The span of one incoming RPC. `path` is the gRPC path
/// `/package.Service/Method`. `tenant.id`, `tenant.tier`, `trace_id` and
/// `rpc.grpc.status_code` are recorded once known.
pub fn server_span(path: &str) -> Span {
    let (service, method) = split_path(path);
    tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant.id = tracing::field::Empty,
        tenant.tier = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    )
}

/// The span of one outgoing RPC made on behalf of `tenant_id`.
pub fn client_span(path: &str, tenant_id: &str) -> Span {
    let (service, method) = split_path(path);
    tracing::info_span!(
        "grpc.client",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant.id = %tenant_id,
    )
}

/// Records the outcome of an RPC on its span from the response headers: a
/// `grpc-status` there is a trailers-only (immediate) answer; otherwise the
/// status follows in the trailers and the call is counted as OK (0).
pub fn record_response_status(span: &Span, headers: &http::HeaderMap) {
    let code: i32 = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/').split_once('/').unwrap_or((path, ""))
}

/// Makes `span` a child of the W3C trace context in `headers` (if any) and
/// records its trace id as the `trace_id` field for the logs.
pub fn adopt_remote_parent(span: &Span, headers: &http::HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Writes the W3C `traceparent` of `span` into `headers`.
pub fn inject_span_context(span: &Span, headers: &mut http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::header::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}
