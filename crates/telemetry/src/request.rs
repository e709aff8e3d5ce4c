//! One request's telemetry: its server span or task-local scope, its
//! tenant, its outcome, and the trace context on downstream calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Instrument as _;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;

use crate::service::Service;
use crate::w3c;

/// Whether requests are recorded as OpenTelemetry spans (something exports
/// them); see the crate docs.
pub(crate) static OTEL: AtomicBool = AtomicBool::new(true);

/// Whether requests are recorded as spans (an exporter is configured).
pub fn spans_recorded() -> bool {
    OTEL.load(Ordering::Relaxed)
}

/// What a request carries besides its span: its trace when it is not a
/// span, its tenant once authenticated, and the tenant it names before a
/// token proves one.
pub(crate) struct RequestScope {
    pub(crate) trace: Option<w3c::Trace>,
    pub(crate) tenant: std::sync::OnceLock<(Arc<str>, Arc<str>)>,
    pub(crate) named: std::sync::Mutex<Option<Named>>,
}

/// A tenant a request names: claimed (a sign-in's tenant, a token's
/// unverified claim), or proven by the handler (a password checked).
pub(crate) struct Named {
    pub(crate) tenant: Arc<str>,
    pub(crate) proven: bool,
}

impl RequestScope {
    fn new(trace: Option<w3c::Trace>) -> Self {
        Self { trace, tenant: Default::default(), named: Default::default() }
    }
}

tokio::task_local! {
    pub(crate) static REQUEST: RequestScope;
}

/// A boxed request future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An incoming RPC, before it is handled (see [`incoming`]).
pub struct Incoming {
    kind: IncomingKind,
    service: Service,
}

enum IncomingKind {
    Span(Span),
    Scope(w3c::Trace),
}

/// The incoming RPC `path` of `service` with request `headers`: its server
/// span, made a child of the caller's trace, when spans are recorded; else
/// its trace.
pub fn incoming(path: &str, headers: &http::HeaderMap, service: &Service) -> Incoming {
    let kind = if spans_recorded() {
        let span = server_span(path, service);
        adopt_remote_parent(&span, headers);
        IncomingKind::Span(span)
    } else {
        IncomingKind::Scope(w3c::Trace::from_headers(headers).unwrap_or_else(w3c::Trace::new))
    };
    Incoming { kind, service: service.clone() }
}

impl Incoming {
    /// Runs `fut`, the handling of this RPC, as one request of its service
    /// (see the crate docs).
    pub fn run<F>(self, fut: F) -> BoxFuture<F::Output>
    where
        F: Future + Send + 'static,
    {
        match self.kind {
            IncomingKind::Span(span) => {
                Box::pin(self.service.run(REQUEST.scope(RequestScope::new(None), fut.instrument(span))))
            }
            IncomingKind::Scope(trace) => {
                Box::pin(self.service.run(REQUEST.scope(RequestScope::new(Some(trace)), fut)))
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
    }
    let _ = REQUEST.try_with(|r| r.tenant.set((tenant_id.clone(), tier.clone())));
}

/// Records the tenant the current request names without proof yet: a
/// sign-in's tenant, the tenant a token claims before it is verified (or
/// when it is refused). Until a token proves a tenant ([`record_tenant`])
/// or the handler does ([`record_proven_tenant`]), its log lines carry it
/// as `tenant_id` with `tenant_claimed: true`, and its span as `tenant.id`.
pub fn record_claimed_tenant(tenant_id: &str) {
    name_tenant(tenant_id, false);
}

/// Records the tenant the handler of the current request has proven
/// without a token (a password or a refresh token checked): its log lines
/// carry it as `tenant_id`, with no tier.
pub fn record_proven_tenant(tenant_id: &str) {
    name_tenant(tenant_id, true);
}

fn name_tenant(tenant_id: &str, proven: bool) {
    let named = REQUEST.try_with(|r| {
        let mut named = r.named.lock().expect("named tenant lock");
        // A claim never replaces a proof, nor a tenant a token proved.
        if r.tenant.get().is_some() || named.as_ref().is_some_and(|n| n.proven && !proven) {
            return false;
        }
        *named = Some(Named { tenant: tenant_id.into(), proven });
        true
    });
    if named == Ok(true) && spans_recorded() {
        Span::current().record("tenant.id", tenant_id);
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
    } else if let Ok(Some(value)) = REQUEST.try_with(|r| r.trace.as_ref().and_then(w3c::Trace::child_traceparent)) {
        headers.insert("traceparent", value);
    }
}

/// The span of one incoming RPC of `service`. `path` is the gRPC path
/// `/package.Service/Method`. `tenant.id`, `tenant.tier`, `trace_id` and
/// `rpc.grpc.status_code` are recorded once known; `service.name` (and
/// `service.instance.id`) go to the resource it is exported under.
pub fn server_span(path: &str, service: &Service) -> Span {
    let (rpc_service, method) = split_path(path);
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %rpc_service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant.id = tracing::field::Empty,
        tenant.tier = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        service.name = service.name(),
        service.instance.id = tracing::field::Empty,
    );
    if let Some(instance) = service.instance_id() {
        span.record("service.instance.id", instance);
    }
    span
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

/// Records the outcome of an outgoing RPC on its client span from the
/// response headers (see [`record_client_status`]).
pub fn record_response_status(span: &Span, headers: &http::HeaderMap) {
    record_client_status(span, status_code(headers));
}

/// Records an outgoing RPC's gRPC status `code` on its client span: any
/// code but OK is an error of the call.
pub fn record_client_status(span: &Span, code: i32) {
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

/// The trace id of the current span (32 hex digits), if it has one: what
/// an audit event or an error report names to find the request's trace.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
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
    use crate::json::{Buf, JsonLayer};
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// With nothing exporting spans, a request runs in a scope that keeps
    /// the trace context: it adopts the caller's trace id (or makes one
    /// up), its log lines carry it and its tenant once authenticated, and
    /// calls it makes downstream pass the trace on with its flags; each
    /// line names the request's service.
    #[tokio::test]
    async fn without_spans_trace_ids_and_tenants_still_follow_a_request() {
        OTEL.store(false, Ordering::Relaxed);
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new("process", move || writer.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let svc = Service::new("svc");
        let outgoing = super::incoming("/pkg.Svc/Call", &incoming, &svc)
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
        let fresh = super::incoming("/pkg.Svc/Call", &http::HeaderMap::new(), &Service::instance("other", "one"))
            .run(async {
                tracing::info!("fresh");
                let mut headers = http::HeaderMap::new();
                inject_trace_context(&mut headers);
                headers
            })
            .await;
        // A tenant named before a token proves one: claimed, then proven
        // by the handler; a later claim changes nothing, a token's tenant
        // wins.
        super::incoming("/pkg.Auth/Login", &http::HeaderMap::new(), &svc)
            .run(async {
                record_claimed_tenant("acme");
                tracing::info!("claimed");
                record_proven_tenant("acme");
                record_claimed_tenant("globex");
                tracing::info!("proven");
                record_tenant(&Arc::from("initech"), &Arc::from("basic"));
                record_claimed_tenant("globex");
                tracing::info!("authenticated");
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
        let named: Vec<_> = lines[3..6]
            .iter()
            .map(|l| (l["tenant_id"].as_str(), l.get("tenant_claimed"), l.get("tenant_tier")))
            .collect();
        let yes = serde_json::Value::from(true);
        assert_eq!(
            named,
            [
                (Some("acme"), Some(&yes), None),
                (Some("acme"), None, None),
                (Some("initech"), None, Some(&"basic".into()))
            ]
        );
        let lines = [&lines[..3], &lines[6..]].concat();
        assert!(lines[3].get("trace_id").is_none() && lines[3].get("tenant_id").is_none(), "{}", lines[3]);
        // Each line names the service at work; the process outside any.
        assert_eq!((&lines[0]["service"], lines[0].get("service_instance")), (&"svc".into(), None));
        assert_eq!((&lines[2]["service"], &lines[2]["service_instance"]), (&"other".into(), &"one".into()));
        assert_eq!((&lines[3]["service"], lines[3].get("service_instance")), (&"process".into(), None));
    }
}
