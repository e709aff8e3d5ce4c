//! Tenant changes are pushed: the registry's `WatchTenants` stream has
//! every service drop its cached copy of a tenant whose record changed, so
//! a suspension (and its undoing) takes effect everywhere at once instead
//! of when the tenant cache's TTL ends (a minute here).

use std::time::{Duration, Instant};

use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tenantmesh_proto::registry::v1::{SetTenantStatusRequest, TenantStatus};
use tenantmesh_test_support::*;
use tonic::Code;

/// How long the data service takes to answer `tenant`'s GetItem with `code`
/// (`Ok`: served), polling; panics after ten seconds.
async fn until(mesh: &TestMesh, token: &str, served: bool) -> Duration {
    let started = Instant::now();
    loop {
        let get = GetItemRequest { collection: "c".into(), id: "1".into() };
        match mesh.data().get_item(authed(get, token)).await {
            Ok(_) if served => return started.elapsed(),
            Err(s) if !served && s.code() == Code::PermissionDenied => return started.elapsed(),
            Ok(_) => {}
            Err(s) => assert!(served && s.code() == Code::PermissionDenied, "{s:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the change never showed (served: {served})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_suspension_reaches_the_services_at_once() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_TENANT_CACHE_TTL_MS", "60000")]).await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("watched")).await;
    let put = PutItemRequest { collection: "c".into(), id: "1".into(), attributes: None, expected_version: None };
    mesh.data().put_item(authed(put, &t.token)).await.unwrap();
    // Served, and now cached as ACTIVE for a minute.
    until(&mesh, &t.token, true).await;

    for (status, served) in [(TenantStatus::Suspended, false), (TenantStatus::Active, true)] {
        let req = SetTenantStatusRequest { tenant_id: t.tenant_id.clone(), status: status as i32 };
        mesh.registry().set_tenant_status(authed(req, &admin)).await.unwrap();
        let took = until(&mesh, &t.token, served).await;
        eprintln!("{status:?} took effect in the data service after {took:?}");
        assert!(took < Duration::from_secs(2), "{status:?} took {took:?} (the cache TTL is a minute)");
    }
    mesh.shutdown().await;
}
