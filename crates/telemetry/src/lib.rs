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

mod export;
mod json;
pub mod layer;
pub mod metrics;
mod request;
mod service;
mod setup;
mod w3c;

pub use json::JsonLayer;
pub use opentelemetry::Context as OtelContext;
pub use request::{
    BoxFuture, Incoming, adopt_remote_parent, client_span, current_trace_id, incoming, inject_span_context,
    inject_trace_context, record_claimed_tenant, record_client_status, record_proven_tenant, record_response,
    record_response_status, record_tenant, server_failed, server_span, spans_recorded, start_client_call,
};
pub use service::{Service, carried, spawn};
pub use setup::{Config, LogTarget, NoExporter, TelemetryError, TelemetryGuard, init, init_with_exporter};
