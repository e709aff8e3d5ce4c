//! Tracing and OpenTelemetry for tenantmesh services: JSON logs in which
//! every line inside a request carries `tenant_id` (and `trace_id`), server
//! and client spans with `tenant.id`, `tenant.tier` and the OTel RPC
//! attributes, W3C trace-context propagation over gRPC metadata, and OTLP
//! export of traces and metrics when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! A request is handled inside [`Incoming::run`]. When something exports spans
//! that is a server span, made a child of the caller's `traceparent`. When
//! nothing does, no OpenTelemetry layer is installed and no span is made:
//! the request runs in a task-local scope holding its trace id (the
//! caller's, or a new one) and, once authenticated, its tenant; log lines
//! and downstream calls read them from there. Trace ids still follow a
//! request across services, for a fraction of a span's cost.

mod json;
pub mod metrics;
mod w3c;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Instrument as _;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing::Span;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use json::JsonLayer;
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
    /// Tenants with metric series of their own (`TENANTMESH_METRICS_TENANT_CAP`);
    /// see [`metrics`].
    pub metrics_tenant_cap: usize,
    /// A setting `from_env` could not read; `init` refuses to start with it.
    pub invalid: Option<String>,
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
            metrics_tenant_cap: metrics::DEFAULT_TENANT_CAP,
            invalid: None,
        }
    }

    /// Reads `RUST_LOG` and `OTEL_EXPORTER_OTLP_ENDPOINT` from `env`.
    pub fn from_env(service: impl Into<String>, env: &std::collections::HashMap<String, String>) -> Self {
        let mut c = Self::new(service);
        if let Some(f) = env.get("RUST_LOG").filter(|f| !f.is_empty()) {
            c.filter = f.clone();
        }
        c.otlp_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()).cloned();
        if let Some(cap) = env.get("TENANTMESH_METRICS_TENANT_CAP").filter(|c| !c.is_empty()) {
            match cap.parse() {
                Ok(n) => c.metrics_tenant_cap = n,
                Err(e) => c.invalid = Some(format!("TENANTMESH_METRICS_TENANT_CAP={cap:?}: {e}")),
            }
        }
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
    #[error("invalid setting {0}")]
    Setting(String),
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

/// Whether requests are recorded as OpenTelemetry spans (something exports
/// them); see the crate docs.
static OTEL: AtomicBool = AtomicBool::new(true);

/// Whether requests are recorded as spans (an exporter is configured).
pub fn spans_recorded() -> bool {
    OTEL.load(Ordering::Relaxed)
}

/// What a request carries when it is not a span: its trace and, once
/// authenticated, its tenant.
pub(crate) struct RequestScope {
    trace: w3c::Trace,
    tenant: std::sync::OnceLock<(Arc<str>, Arc<str>)>,
}

tokio::task_local! {
    pub(crate) static REQUEST: RequestScope;
}

/// A boxed request future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An incoming RPC, before it is handled (see [`incoming`]).
pub struct Incoming(IncomingKind);

enum IncomingKind {
    Span(Span),
    Scope(w3c::Trace),
}

/// The incoming RPC `path` with request `headers`: its server span, made a
/// child of the caller's trace, when spans are recorded; else its trace.
pub fn incoming(path: &str, headers: &http::HeaderMap) -> Incoming {
    Incoming(if spans_recorded() {
        let span = server_span(path);
        adopt_remote_parent(&span, headers);
        IncomingKind::Span(span)
    } else {
        IncomingKind::Scope(w3c::Trace::from_headers(headers).unwrap_or_else(w3c::Trace::new))
    })
}

impl Incoming {
    /// Runs `fut`, the handling of this RPC, as one request (see the crate docs).
    pub fn run<F>(self, fut: F) -> BoxFuture<F::Output>
    where
        F: Future + Send + 'static,
    {
        match self.0 {
            IncomingKind::Span(span) => Box::pin(fut.instrument(span)),
            IncomingKind::Scope(trace) => {
                Box::pin(REQUEST.scope(RequestScope { trace, tenant: Default::default() }, fut))
            }
        }
    }
}

/// Records the authenticated tenant of the current request.
pub fn record_tenant(tenant_id: &Arc<str>, tier: &Arc<str>) {
    if spans_recorded() {
        let span = Span::current();
        span.record("tenant.id", &**tenant_id);
        span.record("tenant.tier", &**tier);
    } else {
        let _ = REQUEST.try_with(|r| r.tenant.set((tenant_id.clone(), tier.clone())));
    }
}

/// Records the outcome of the current request from its response headers.
pub fn record_response(headers: &http::HeaderMap) {
    if spans_recorded() {
        record_server_status(&Span::current(), headers);
    }
}

/// Starts an outgoing call to `path` made for `tenant_id`: writes the
/// W3C `traceparent` into its `headers`, and returns the client span to run
/// the call in when spans are recorded.
pub fn start_client_call(path: &str, tenant_id: &str, headers: &mut http::HeaderMap) -> Option<Span> {
    if spans_recorded() {
        let span = client_span(path, tenant_id);
        inject_span_context(&span, headers);
        Some(span)
    } else {
        inject_trace_context(headers);
        None
    }
}

/// Writes the current request's W3C `traceparent` into `headers`.
pub fn inject_trace_context(headers: &mut http::HeaderMap) {
    if spans_recorded() {
        inject_span_context(&Span::current(), headers);
    } else if let Ok(Some(value)) = REQUEST.try_with(|r| r.trace.child_traceparent()) {
        headers.insert("traceparent", value);
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
    if let Some(invalid) = &config.invalid {
        return Err(TelemetryError::Setting(invalid.clone()));
    }
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
        metrics::enable(config.metrics_tenant_cap);
        meters = Some(provider);
    }
    let exporting = extra.is_some() || config.otlp_endpoint.is_some();
    if let Some(exporter) = extra {
        builder = builder.with_simple_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let json = |service: String| match config.log_target {
        LogTarget::Stdout => JsonLayer::new(service, BoxMakeWriter::new(std::io::stdout)),
        LogTarget::Stderr => JsonLayer::new(service, BoxMakeWriter::new(std::io::stderr)),
    };
    let installed = if exporting {
        // Our code reads span contexts explicitly (propagation, log trace
        // ids): no context activation on every poll, no per-span timing,
        // thread, level, target or source-location attributes; spans carry
        // the attributes we give them.
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(config.service.clone()))
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_level(false)
            .with_target(false);
        OTEL.store(true, Ordering::Relaxed);
        tracing_subscriber::registry().with(filter).with(otel).with(json(config.service.clone())).try_init()
    } else {
        OTEL.store(false, Ordering::Relaxed);
        tracing_subscriber::registry().with(filter).with(json(config.service.clone())).try_init()
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
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant.id = %tenant_id,
    )
}

/// The gRPC status code of a response from its headers: a `grpc-status`
/// there is a trailers-only (immediate) answer; otherwise the status
/// follows in the trailers and the call is counted as OK (0).
fn status_code(headers: &http::HeaderMap) -> i32 {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Records the outcome of an outgoing RPC on its client span: any code but
/// OK is an error of the call.
pub fn record_response_status(span: &Span, headers: &http::HeaderMap) {
    let code = status_code(headers);
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

/// Whether a server answering `code` failed, as the OpenTelemetry RPC
/// conventions judge a server span: UNKNOWN, DEADLINE_EXCEEDED,
/// UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS. The others
/// (NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT, ...) are the caller's,
/// and leave the server span's status unset.
pub fn server_failed(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// Records the outcome of an incoming RPC on its server span.
fn record_server_status(span: &Span, headers: &http::HeaderMap) {
    let code = status_code(headers);
    span.record("rpc.grpc.status_code", code);
    if server_failed(code) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// With nothing exporting spans, a request runs in a scope that keeps
    /// the trace context: it adopts the caller's trace id (or makes one
    /// up), its log lines carry it and its tenant once authenticated, and
    /// calls it makes downstream pass the trace on with its flags.
    #[tokio::test]
    async fn without_spans_trace_ids_and_tenants_still_follow_a_request() {
        OTEL.store(false, Ordering::Relaxed);
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new("svc", move || writer.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let outgoing = super::incoming("/pkg.Svc/Call", &incoming)
            .run(async {
                tracing::info!("before authentication");
                record_tenant(&Arc::from("acme"), &Arc::from("premium"));
                tracing::info!("after authentication");
                let mut headers = http::HeaderMap::new();
                assert!(start_client_call("/pkg.Other/Call", "acme", &mut headers).is_none());
                headers
            })
            .await;
        // No traceparent: a fresh trace, the same id in logs and downstream.
        let fresh = super::incoming("/pkg.Svc/Call", &http::HeaderMap::new())
            .run(async {
                tracing::info!("fresh");
                let mut headers = http::HeaderMap::new();
                inject_trace_context(&mut headers);
                headers
            })
            .await;
        tracing::info!("outside");
        OTEL.store(true, Ordering::Relaxed);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(lines[0].get("tenant_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((&lines[1]["tenant_id"], &lines[1]["tenant_tier"]), (&"acme".into(), &"premium".into()));
        let tp = outgoing.get("traceparent").unwrap().to_str().unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
        assert!(tp.ends_with("-01") && !tp.contains("00f067aa0ba902b7"), "{tp}");
        let fresh_id = lines[2]["trace_id"].as_str().unwrap();
        assert_eq!(fresh_id.len(), 32);
        assert_ne!(fresh_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = fresh.get("traceparent").unwrap().to_str().unwrap();
        assert!(tp.starts_with(&format!("00-{fresh_id}-")) && tp.ends_with("-00"), "{tp}");
        assert!(lines[3].get("trace_id").is_none() && lines[3].get("tenant_id").is_none(), "{}", lines[3]);
    }
}
