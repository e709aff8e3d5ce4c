//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans reach an OTLP/gRPC
//! collector, tagged with the tenant, each under the resource of the
//! service that made it (one process hosts the four), and so do the data
//! service's metrics.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tenantmesh_test_support::*;

/// A collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>, Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.1.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn string_attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

/// A login through the mesh is exported over OTLP under `service.name`
/// auth with `tenant.id` once the provider flushes; a tenant's first data request on
/// DynamoDB shows up in the exported STS call counter, and in its metered
/// usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let mut config = tenantmesh_telemetry::Config::new("otlp-test");
    config.otlp_endpoint = Some(format!("http://{addr}"));
    config.log_target = tenantmesh_telemetry::LogTarget::Stderr;
    let guard = tenantmesh_telemetry::init(config).unwrap();

    let mesh = TestMesh::start_with(TestBackend::DynamoDb).await;
    mesh.admin_token().await;
    let tenant = mesh.onboard(&unique_tenant("metered")).await;
    let get = tenantmesh_proto::data::v1::GetItemRequest { collection: "c".into(), id: "1".into() };
    let missing = mesh.data().get_item(authed(get, &tenant.token)).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    mesh.shutdown().await;
    let guard = tokio::task::spawn_blocking(move || guard.force_flush().map(|()| guard)).await.unwrap().unwrap();

    let received = collector.0.lock().unwrap().clone();
    let resources: Vec<_> = received.iter().flat_map(|r| r.resource_spans.iter()).collect();
    assert!(!resources.is_empty(), "nothing exported");
    // One process hosts the four services: each span is exported under
    // the resource of the service that made it, none under the process's.
    let service_of = |rs: &&opentelemetry_proto::tonic::trace::v1::ResourceSpans| {
        string_attr(&rs.resource.as_ref().unwrap().attributes, "service.name")
    };
    let spans_of = |service: &str| {
        resources
            .iter()
            .filter(|rs| service_of(rs).as_deref() == Some(service))
            .flat_map(|rs| rs.scope_spans.iter().flat_map(|s| s.spans.iter()))
            .collect::<Vec<_>>()
    };
    let names: std::collections::BTreeSet<_> = resources.iter().filter_map(service_of).collect();
    assert!(names.is_subset(&["auth", "data", "onboarding", "tenant-registry"].map(String::from).into()), "{names:?}");
    assert!(
        resources
            .iter()
            .flat_map(|rs| rs.scope_spans.iter().flat_map(|s| s.spans.iter()))
            .all(|s| s.attributes.iter().all(|kv| kv.key != "service.name")),
        "the service is on the resource, not on the span"
    );
    let login = spans_of("auth")
        .into_iter()
        .find(|s| s.name == "tenantmesh.auth.v1.Auth/Login")
        .expect("the login span was exported under the auth service");
    assert_eq!(string_attr(&login.attributes, "tenant.id").as_deref(), Some("platform"));
    assert_eq!(string_attr(&login.attributes, "rpc.method").as_deref(), Some("Login"));

    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value as Number};
    let metrics = collector.1.lock().unwrap().clone();
    // The data service's metrics are exported under its own name.
    let data_metrics: Vec<_> = metrics
        .iter()
        .flat_map(|r| r.resource_metrics.iter())
        .filter(|rm| string_attr(&rm.resource.as_ref().unwrap().attributes, "service.name").as_deref() == Some("data"))
        .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| s.metrics.iter()))
        .collect();
    let sts_calls: i64 = data_metrics
        .iter()
        .filter(|m| m.name == "tenantmesh.sts.assume_role.calls")
        .filter_map(|m| match &m.data {
            Some(Data::Sum(sum)) => sum
                .data_points
                .iter()
                .filter_map(|p| match p.value {
                    Some(Number::AsInt(v)) => Some(v),
                    _ => None,
                })
                .max(),
            _ => None,
        })
        .max()
        .expect("the STS call counter was exported");
    assert_eq!(sts_calls, 1, "one AssumeRole for the tenant's first data request");
    // The usage the data service flushed on its way down, per tenant.
    let requests: Vec<i64> = data_metrics
        .iter()
        .filter(|m| m.name == "tenantmesh.usage")
        .filter_map(|m| match &m.data {
            Some(Data::Sum(sum)) => Some(sum.data_points.clone()),
            _ => None,
        })
        .flatten()
        .filter(|p| {
            string_attr(&p.attributes, "tenant.id").as_deref() == Some(tenant.tenant_id.as_str())
                && string_attr(&p.attributes, "meter").as_deref() == Some("requests")
        })
        .filter_map(|p| match p.value {
            Some(Number::AsInt(v)) => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(requests.iter().max(), Some(&1), "the tenant's one data request, as metered usage");
    // The request counter names the RPC as the conventions do: the service
    // and the method apart, once for the tenant's one call.
    let counted: Vec<(Option<String>, Option<String>)> = data_metrics
        .iter()
        .filter(|m| m.name == "tenantmesh.requests")
        .filter_map(|m| match &m.data {
            Some(Data::Sum(sum)) => Some(sum.data_points.clone()),
            _ => None,
        })
        .flatten()
        .filter(|p| string_attr(&p.attributes, "tenant.id").as_deref() == Some(tenant.tenant_id.as_str()))
        .map(|p| (string_attr(&p.attributes, "rpc.service"), string_attr(&p.attributes, "rpc.method")))
        .collect();
    assert!(
        counted.contains(&(Some("tenantmesh.data.v1.Data".into()), Some("GetItem".into()))),
        "the GetItem request by service and method: {counted:?}"
    );
    // NOT_FOUND is the caller's outcome: the server span's status stays
    // unset (the RPC conventions), the client's would be an error.
    let get = spans_of("data")
        .into_iter()
        .find(|s| s.name == "tenantmesh.data.v1.Data/GetItem" && s.kind == 2)
        .expect("the GetItem server span was exported under the data service");
    assert!(
        spans_of("tenant-registry").iter().any(|s| s.name == "tenantmesh.registry.v1.TenantRegistry/GetTenant"),
        "the registry's spans under its own name"
    );
    assert_ne!(get.status.as_ref().map(|s| s.code), Some(2), "a NOT_FOUND server span is not an error");
    drop(guard);
}
