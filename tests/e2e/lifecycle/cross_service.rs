//! Cross-service behaviour of the whole mesh: the walk-through a new user
//! makes, durability across restarts, and context propagation on outgoing
//! calls.

use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest, QueryItemsRequest};
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::client::{self, Identity};
use tenantmesh_test_support::*;
use tonic::Code;

/// The README story: two tenants onboarded by the operator; acme's item is
/// invisible to globex; no token and a spoofed tenant header are refused.
#[tokio::test]
async fn two_tenants_walkthrough() {
    let mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let globex = mesh.onboard(&unique_tenant("globex")).await;
    let mut data = mesh.data();
    let put = PutItemRequest {
        collection: "notes".into(),
        id: "n1".into(),
        attributes: Some(attrs(&[("title", "hello")])),
        expected_version: None,
    };
    data.put_item(authed(put, &acme.token)).await.unwrap();
    let get = || GetItemRequest { collection: "notes".into(), id: "n1".into() };
    assert_eq!(data.get_item(authed(get(), &acme.token)).await.unwrap().into_inner().item.unwrap().version, 1);
    expect_code(data.get_item(authed(get(), &globex.token)).await, Code::NotFound);
    let q = QueryItemsRequest { collection: "notes".into(), ..Default::default() };
    assert!(data.query_items(authed(q, &globex.token)).await.unwrap().into_inner().items.is_empty());
    expect_code(data.get_item(get()).await, Code::Unauthenticated);
    let mut spoof = authed(get(), &acme.token);
    spoof.metadata_mut().insert("x-tenant-id", globex.tenant_id.parse().unwrap());
    expect_code(data.get_item(spoof).await, Code::PermissionDenied);
    mesh.shutdown().await;
}

/// Tenants, users, signing keys and items survive a restart on the same
/// data dir; tokens issued before it stay valid; bootstrap runs once.
#[tokio::test]
async fn state_survives_restart() {
    let mut mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let put = PutItemRequest {
        collection: "notes".into(),
        id: "kept".into(),
        attributes: Some(attrs(&[("title", "durable")])),
        expected_version: Some(0),
    };
    mesh.data().put_item(authed(put, &acme.token)).await.unwrap();
    mesh.restart().await;

    let get = GetItemRequest { collection: "notes".into(), id: "kept".into() };
    let item = mesh.data().get_item(authed(get, &acme.token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!(item.version, 1);
    mesh.login(&acme.tenant_id, &acme.admin_email, &acme.admin_password).await.unwrap();
    mesh.admin_token().await;
    mesh.shutdown().await;
}

/// The client layer forwards the current request's identity, and fails
/// closed (UNAUTHENTICATED, before anything is sent) outside any context.
#[tokio::test]
async fn client_layer_propagates_or_fails_closed() {
    let mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let channel = client::channel(&format!("http://{}", mesh.addrs.data)).unwrap();
    let mut data = DataClient::new(client::wrap(channel, Identity::Caller));
    let get = || GetItemRequest { collection: "notes".into(), id: "none".into() };

    let s = expect_code(data.get_item(get()).await, Code::Unauthenticated);
    assert!(s.message().contains("no tenant context"), "{s:?}");

    let ctx = TenantContext {
        tenant_id: acme.tenant_id.as_str().into(),
        subject: "test".into(),
        roles: [tenantmesh_tenant_context::Role::TenantAdmin].into(),
        token: acme.token.as_str().into(),
        ..Default::default()
    };
    // Inside the context the call carries acme's token: NOT_FOUND, not UNAUTHENTICATED.
    expect_code(ctx.scope(data.get_item(get())).await, Code::NotFound);
    mesh.shutdown().await;
}

/// The mesh runs on the backend the suite asked for: the four redb stores
/// exist on the embedded backend and none on DynamoDB, where the tenant's
/// item is found in the pooled DynamoDB table instead.
#[tokio::test]
async fn mesh_runs_on_the_requested_backend() {
    let mesh = TestMesh::start().await;
    assert_eq!(mesh.backend(), TestBackend::from_env());
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let put = PutItemRequest { collection: "c".into(), id: "1".into(), attributes: None, expected_version: None };
    mesh.data().put_item(authed(put, &acme.token)).await.unwrap();
    let backend = mesh.backend();
    let state = mesh.stop().await;
    let redb = std::fs::read_dir(state.data_dir())
        .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "redb")).count())
        .unwrap_or(0);
    match backend {
        // registry, auth, onboarding, data, and the data service's usage.
        TestBackend::Embedded => assert_eq!(redb, 5),
        TestBackend::DynamoDb => {
            assert_eq!(redb, 0);
            let item = state.table("data").await.get(&acme.tenant_id, "c#1").await.unwrap();
            assert_eq!(item.expect("item in the DynamoDB table").version, 1);
        }
    }
}
