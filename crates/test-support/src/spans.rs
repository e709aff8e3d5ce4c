//! In-memory span capture for telemetry tests.

pub use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};

/// Installs the global telemetry with an in-memory exporter; one per
/// test process.
pub fn install() -> (InMemorySpanExporter, tenantmesh_telemetry::TelemetryGuard) {
    let exporter = InMemorySpanExporter::default();
    let mut config = tenantmesh_telemetry::Config::new("tests");
    config.log_target = tenantmesh_telemetry::LogTarget::Stderr;
    let guard = tenantmesh_telemetry::init_with_exporter(config, Some(exporter.clone())).expect("telemetry");
    (exporter, guard)
}

/// The value of attribute `key` on `span`, as a string.
pub fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
}
