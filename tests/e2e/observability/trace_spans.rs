//! One trace follows a request across services, and every span of it
//! carries the tenant.

use std::collections::HashSet;

use tenantmesh_proto::onboarding::v1::RegisterTenantRequest;
use tenantmesh_test_support::spans::{self, attr};
use tenantmesh_test_support::*;

/// RegisterTenant on onboarding calls registry and auth: all their server
/// spans share the onboarding span's trace id, and every span in that trace
/// has `tenant.id` and the OTel RPC attributes on server spans.
#[tokio::test]
async fn one_trace_across_onboarding_registry_and_auth() {
    let (exporter, _guard) = spans::install();
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("traced");
    let req = RegisterTenantRequest {
        tenant_id: id.clone(),
        name: "Traced".into(),
        tier: "basic".into(),
        admin_email: "admin@traced.example".into(),
        admin_password: "traced-password".into(),
        idempotency_key: id.clone(),
    };
    mesh.onboarding().register_tenant(authed(req, &admin)).await.unwrap();
    // The workflow runs on after RegisterTenant returns, in the same trace.
    mesh.wait_workflow(&format!("{id}/onboard")).await;
    mesh.shutdown().await;

    let all = exporter.get_finished_spans().unwrap();
    let root = all
        .iter()
        .find(|s| {
            attr(s, "rpc.method").as_deref() == Some("RegisterTenant")
                && attr(s, "otel.kind").is_none_or(|k| k == "server")
                && s.name == "tenantmesh.onboarding.v1.Onboarding/RegisterTenant"
        })
        .expect("onboarding server span");
    let trace_id = root.span_context.trace_id();
    let trace: Vec<_> = all.iter().filter(|s| s.span_context.trace_id() == trace_id).collect();

    let server_rpcs: HashSet<String> = trace
        .iter()
        .filter(|s| s.span_kind == opentelemetry::trace::SpanKind::Server)
        .map(|s| s.name.to_string())
        .collect();
    for rpc in [
        "tenantmesh.onboarding.v1.Onboarding/RegisterTenant",
        "tenantmesh.registry.v1.TenantRegistry/CreateTenant",
        "tenantmesh.auth.v1.Auth/CreateUser",
        "tenantmesh.registry.v1.TenantRegistry/SetTenantStatus",
    ] {
        assert!(server_rpcs.contains(rpc), "{rpc} not in the trace: {server_rpcs:?}");
    }
    for span in &trace {
        let tenant = attr(span, "tenant.id");
        assert!(tenant.as_deref().is_some_and(|t| !t.is_empty()), "span {} has no tenant.id", span.name);
        if span.span_kind == opentelemetry::trace::SpanKind::Server {
            assert_eq!(attr(span, "rpc.system").as_deref(), Some("grpc"), "{}", span.name);
            assert!(attr(span, "rpc.service").is_some() && attr(span, "rpc.method").is_some(), "{}", span.name);
            assert_eq!(attr(span, "rpc.grpc.status_code").as_deref(), Some("0"), "{}", span.name);
        }
    }
    let steps: Vec<_> = trace.iter().filter(|s| s.name == "workflow.step").collect();
    assert_eq!(steps.len(), 5, "{:?}", steps.iter().map(|s| attr(s, "step")).collect::<Vec<_>>());
    assert!(steps.iter().all(|s| attr(s, "tenant.id").as_deref() == Some(id.as_str())));
    // One process hosts them all; each span names the service that made
    // it (exported as its resource's `service.name`), the workflow's
    // background steps included.
    let service = |rpc: &str| {
        let span = trace.iter().find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server && s.name == rpc);
        span.and_then(|s| attr(s, "service.name"))
    };
    assert_eq!(service("tenantmesh.onboarding.v1.Onboarding/RegisterTenant").as_deref(), Some("onboarding"));
    assert_eq!(service("tenantmesh.registry.v1.TenantRegistry/CreateTenant").as_deref(), Some("tenant-registry"));
    assert_eq!(service("tenantmesh.auth.v1.Auth/CreateUser").as_deref(), Some("auth"));
    assert!(steps.iter().all(|s| attr(s, "service.name").as_deref() == Some("onboarding")));
    let calls = trace.iter().filter(|s| s.span_kind == opentelemetry::trace::SpanKind::Client);
    assert!(calls.clone().count() > 0 && calls.clone().all(|s| attr(s, "service.name").is_some()), "client spans");
}

/// A silo tenant's call reaches the shared data service, which forwards it
/// to the tenant's own instance: both server spans are in one trace, both
/// tagged with the tenant and the data service, the instance's as its own
/// `service.instance.id`.
#[tokio::test]
async fn forwarding_to_a_silo_instance_keeps_the_trace_and_the_tenant() {
    use tenantmesh_proto::data::v1::PutItemRequest;
    let (exporter, _guard) = spans::install();
    let mesh = TestMesh::start().await;
    let silo = mesh.onboard_on(&unique_tenant("silo"), "enterprise").await;
    let put = PutItemRequest { collection: "c".into(), id: "1".into(), attributes: None, expected_version: None };
    mesh.data().put_item(authed(put, &silo.token)).await.unwrap();
    mesh.shutdown().await;

    let all = exporter.get_finished_spans().unwrap();
    let puts: Vec<_> = all
        .iter()
        .filter(|s| {
            s.span_kind == opentelemetry::trace::SpanKind::Server && s.name == "tenantmesh.data.v1.Data/PutItem"
        })
        .collect();
    assert_eq!(puts.len(), 2, "the shared service's span and the silo instance's");
    assert_eq!(puts[0].span_context.trace_id(), puts[1].span_context.trace_id());
    for span in &puts {
        assert_eq!(attr(span, "tenant.id").as_deref(), Some(silo.tenant_id.as_str()));
        assert_eq!(attr(span, "rpc.grpc.status_code").as_deref(), Some("0"));
        assert_eq!(attr(span, "service.name").as_deref(), Some("data"));
    }
    // The silo instance is an instance of the data service of its own.
    let mut instances: Vec<_> = puts.iter().map(|s| attr(s, "service.instance.id")).collect();
    instances.sort();
    assert_eq!(instances, [None, Some(format!("silo-{}", silo.tenant_id))]);
}

/// The tenant lookup the server layer makes for a tenant's first call is a
/// client span of that call's trace (and the registry's server span a
/// child of it), tagged with the tenant; and the call's NOT_FOUND leaves
/// the server span's status unset, as the RPC conventions say.
#[tokio::test]
async fn the_layers_tenant_lookup_is_a_client_span_of_the_callers_trace() {
    use tenantmesh_proto::data::v1::GetItemRequest;
    let (exporter, _guard) = spans::install();
    let mesh = TestMesh::start().await;
    let tenant = mesh.onboard(&unique_tenant("lookup")).await;
    let get = GetItemRequest { collection: "c".into(), id: "missing".into() };
    let missing = mesh.data().get_item(authed(get, &tenant.token)).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    mesh.shutdown().await;

    let all = exporter.get_finished_spans().unwrap();
    let get = all
        .iter()
        .find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server && s.name == "tenantmesh.data.v1.Data/GetItem")
        .expect("the GetItem server span");
    assert_eq!(attr(get, "rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!(get.status, opentelemetry::trace::Status::Unset, "NOT_FOUND is the caller's outcome");
    let trace: Vec<_> = all.iter().filter(|s| s.span_context.trace_id() == get.span_context.trace_id()).collect();
    let lookup = trace
        .iter()
        .find(|s| {
            s.span_kind == opentelemetry::trace::SpanKind::Client
                && s.name == "tenantmesh.registry.v1.TenantRegistry/GetTenant"
        })
        .expect("the lookup's client span in the caller's trace");
    assert_eq!(attr(lookup, "tenant.id").as_deref(), Some(tenant.tenant_id.as_str()));
    assert_eq!(lookup.parent_span_id, get.span_context.span_id(), "a child of the GetItem server span");
    let served = trace
        .iter()
        .find(|s| {
            s.span_kind == opentelemetry::trace::SpanKind::Server
                && s.name == "tenantmesh.registry.v1.TenantRegistry/GetTenant"
        })
        .expect("the registry's server span");
    assert_eq!(served.parent_span_id, lookup.span_context.span_id());
}
