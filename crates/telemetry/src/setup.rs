//! Installing telemetry: JSON logs, the OpenTelemetry layer and OTLP
//! export, from settings.

use std::sync::atomic::Ordering;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::export::{ByService, Tagger};
use crate::json::JsonLayer;
use crate::metrics;
use crate::request::OTEL;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Telemetry settings; `Default` reads nothing from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `service.name` of the OTel resource and the `service` of log lines,
    /// for work done outside any [`crate::Service`] scope.
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

    /// Exports what is buffered now: spans, and every service's metrics
    /// when metrics are exported. Blocks until done.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        let failed = |e: String| TelemetryError::Exporter(e);
        self.provider.force_flush().map_err(|e| failed(e.to_string()))?;
        if let Some(m) = &self.meters {
            m.force_flush().map_err(|e| failed(e.to_string()))?;
            metrics::flush_services().map_err(failed)?;
        }
        Ok(())
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
        if let Some(m) = &self.meters {
            metrics::shut_down_services();
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
    if let Some(invalid) = &config.invalid {
        return Err(TelemetryError::Setting(invalid.clone()));
    }
    let filter =
        EnvFilter::try_new(&config.filter).map_err(|e| TelemetryError::Filter(config.filter.clone(), e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service.clone()).build();
    // Spans started in a service's scope are marked with it, and exported
    // under its resource (see `crate::export`).
    let mut builder = SdkTracerProvider::builder().with_resource(resource.clone()).with_span_processor(Tagger);
    let mut meters = None;
    if let Some(endpoint) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        // The tonic exporters need a tokio reactor: the SDK's thread-based
        // processors have none and panic, so both export on the tokio runtime.
        let span_endpoint = endpoint.clone();
        let spans = ByService::new(move || {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(span_endpoint.clone())
                .build()
                .map_err(|e| e.to_string())
        })
        .map_err(TelemetryError::Exporter)?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            spans,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        builder = builder.with_span_processor(processor);
        let metric_provider = |endpoint: &str, resource: opentelemetry_sdk::Resource| {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| e.to_string())?;
            let reader = opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
            Ok::<_, String>(
                opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                    .with_resource(resource)
                    .with_reader(reader)
                    .build(),
            )
        };
        let provider = metric_provider(endpoint, resource).map_err(TelemetryError::Exporter)?;
        opentelemetry::global::set_meter_provider(provider.clone());
        let endpoint = endpoint.clone();
        metrics::per_service(Box::new(move |service| metric_provider(&endpoint, service.resource())));
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
