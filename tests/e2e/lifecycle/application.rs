//! An application service (the example `orders`, built only on
//! `tenantmesh-app`) goes through every workflow of its tenants' lives
//! with the mesh's own data, on the backend `TENANTMESH_TEST_STORAGE`
//! names: onboarding provisions the tenant in it, a restore to an instant
//! rewinds its orders, a tier change moves them to the tenant's own table,
//! offboarding exports and removes them; a neighbour never notices; a
//! service step that fails is shown with the service's name, and retried;
//! and a service registered after tenants exist catches them up.

use std::time::Duration;

use tenantmesh_orders::proto::{CancelOrderRequest, Order, OrderStatus};
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_test_support::*;

use crate::orders_contract::{Running, add_product, create, ids, list, start_registered, start_with};

async fn orders_of(orders: &Running, token: &str) -> Vec<Order> {
    orders.client.clone().list_orders(authed(list(100, ""), token)).await.unwrap().into_inner().orders
}

async fn order(orders: &Running, token: &str, id: &str) {
    orders.client.clone().create_order(authed(create(id, "p1", 1), token)).await.unwrap();
}

/// The step of `wf` that `service` ran as `name`.
fn service_step<'a>(wf: &'a Workflow, name: &str, service: &str) -> &'a Step {
    wf.steps
        .iter()
        .find(|s| s.name == name && s.service == service)
        .unwrap_or_else(|| panic!("no {name} ({service}) in {wf:?}"))
}

/// Starts onboarding `tenant` (standard tier, admin `admin@<tenant>.example`
/// with `password`) without waiting for it: its workflow's id.
async fn register(mesh: &TestMesh, admin: &str, tenant: &str, password: &str) -> String {
    let req = RegisterTenantRequest {
        tenant_id: tenant.into(),
        name: format!("Tenant {tenant}"),
        tier: "standard".into(),
        admin_email: format!("admin@{tenant}.example"),
        admin_password: password.into(),
        idempotency_key: format!("onboard-{tenant}"),
    };
    mesh.onboarding().register_tenant(authed(req, admin)).await.unwrap().into_inner().workflow_id
}

async fn resources(mesh: &TestMesh, tenant: &str) -> Vec<String> {
    let admin = mesh.admin_token().await;
    let req = ListTenantResourcesRequest { tenant_id: tenant.into(), include_removed: false };
    let listed = mesh.onboarding().list_tenant_resources(authed(req, &admin)).await.unwrap().into_inner();
    listed.resources.into_iter().map(|r| r.name).collect()
}

#[tokio::test]
async fn an_application_service_follows_its_tenants_through_every_workflow() {
    let mesh = TestMesh::start_with(TestBackend::from_env()).await;
    let orders = start_registered(&mesh).await;
    let admin = mesh.admin_token().await;
    let (a, b) = (mesh.onboard(&unique_tenant("app")).await, mesh.onboard(&unique_tenant("nbr")).await);
    let onboarded = mesh.wait_workflow(&format!("{}/onboard", a.tenant_id)).await;
    let provisioned = service_step(&onboarded, "provision_service", "orders");
    assert_eq!((provisioned.state(), provisioned.detail.as_str()), (StepState::Done, "in the pooled tables"));
    for t in [&a, &b] {
        add_product(&mesh, &t.token, "p1").await;
    }
    for id in ["o1", "o2"] {
        order(&orders, &a.token, id).await;
    }
    order(&orders, &b.token, "o1").await;
    let neighbour = orders_of(&orders, &b.token).await;

    // A restore to an instant rewinds the tenant's orders with its items.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let at = tenantmesh_app::history::now_us();
    tokio::time::sleep(Duration::from_millis(5)).await;
    order(&orders, &a.token, "o3").await;
    orders.client.clone().cancel_order(authed(CancelOrderRequest { order_id: "o1".into() }, &a.token)).await.unwrap();
    let point_in_time = prost_types::Timestamp { seconds: at / 1_000_000, nanos: (at % 1_000_000) as i32 * 1000 };
    let req = RestoreTenantRequest { tenant_id: a.tenant_id.clone(), point_in_time: Some(point_in_time), target: 0 };
    let id = mesh.onboarding().restore_tenant(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let restored = mesh.wait_workflow(&id).await;
    assert_eq!(restored.status(), WorkflowStatus::Succeeded, "{restored:?}");
    assert_eq!(service_step(&restored, "rewind_service", "orders").detail, "1 items put back, 1 deleted");
    let back = orders_of(&orders, &a.token).await;
    assert_eq!(ids(&back), ["o1", "o2"]);
    assert_eq!((back[0].status(), back[0].version), (OrderStatus::Placed, 1), "o1 as it was");
    assert_eq!(orders_of(&orders, &b.token).await, neighbour, "the neighbour is untouched");

    // A tier change to a bridge tier moves them to the tenant's own table.
    let req = ChangeTierRequest { tenant_id: a.tenant_id.clone(), tier: "premium".into() };
    let id = mesh.onboarding().change_tier(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let moved = mesh.wait_workflow(&id).await;
    assert_eq!(moved.status(), WorkflowStatus::Succeeded, "{moved:?}");
    assert_eq!(service_step(&moved, "provision_service", "orders").detail, "on its own tables");
    let own = format!("tenant-{}-bridge-orders-orders", a.tenant_id);
    assert!(resources(&mesh, &a.tenant_id).await.iter().any(|r| r.ends_with(&own)), "its table is listed");
    let login = mesh.login(&a.tenant_id, &a.admin_email, &a.admin_password).await.unwrap();
    eventually(Duration::from_secs(10), || async { ids(&orders_of(&orders, &login).await) == ["o1", "o2"] }).await;
    eventually(Duration::from_secs(10), || async {
        let mut client = orders.client.clone();
        client.create_order(authed(create("o4", "p1", 1), &login)).await.is_ok()
    })
    .await;
    assert_eq!(ids(&orders_of(&orders, &login).await), ["o1", "o2", "o4"]);
    assert_eq!(orders_of(&orders, &b.token).await, neighbour);

    // Offboarding exports them beside the items, then removes them.
    let req = OffboardTenantRequest { tenant_id: a.tenant_id.clone() };
    let id = mesh.onboarding().offboard_tenant(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let gone = mesh.wait_workflow(&id).await;
    assert_eq!(gone.status(), WorkflowStatus::Succeeded, "{gone:?}");
    let exported = &service_step(&gone, "export_service", "orders").detail;
    let path = exported.split(" to ").nth(1).expect("the export's path");
    assert!(path.ends_with(&format!("{}.orders.jsonl", a.tenant_id)), "{exported}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["o1", "o2", "o4"]);
    assert!(lines.iter().all(|l| l["table"] == "orders" && l["version"].as_u64() >= Some(1)), "{lines:?}");
    assert!(!resources(&mesh, &a.tenant_id).await.iter().any(|r| r.ends_with(&own)), "its table is removed");
    assert_eq!(orders_of(&orders, &b.token).await, neighbour);
}

/// A service that cannot be reached fails the tenant's onboarding at its
/// step, named with the service and its error; once it serves again (at
/// another address: the catalog says where), a retry finishes it.
#[tokio::test]
async fn a_failing_service_step_names_the_service_and_is_retried() {
    let mesh = TestMesh::start().await;
    drop(start_registered(&mesh).await);
    let admin = mesh.admin_token().await;
    let tenant = unique_tenant("hook");
    let id = register(&mesh, &admin, &tenant, "hook-password-1").await;
    let failed = mesh.wait_workflow(&id).await;
    assert_eq!(failed.status(), WorkflowStatus::Failed, "{failed:?}");
    assert!(failed.error.starts_with("provision_service (orders): Unavailable"), "{}", failed.error);
    let step = service_step(&failed, "provision_service", "orders");
    assert_eq!(step.state(), StepState::Failed);

    let orders = start_registered(&mesh).await;
    let retry = RetryOnboardingRequest { workflow_id: id.clone() };
    mesh.onboarding().retry_onboarding(authed(retry, &admin)).await.unwrap();
    let done = mesh.wait_workflow(&id).await;
    assert_eq!(done.status(), WorkflowStatus::Succeeded, "{done:?}");
    let token = mesh.login(&tenant, &format!("admin@{tenant}.example"), "hook-password-1").await.unwrap();
    add_product(&mesh, &token, "p1").await;
    order(&orders, &token, "o1").await;
    assert_eq!(ids(&orders_of(&orders, &token).await), ["o1"]);
}

/// Tenants onboarded before the service registered are provisioned in it
/// by a catch-up workflow each (a bridge tenant gets its own table, listed
/// as its resource); one onboarded after needs none.
#[tokio::test]
async fn a_service_registered_later_catches_up_existing_tenants() {
    let mesh = TestMesh::start_with(TestBackend::from_env()).await;
    let pooled = mesh.onboard(&unique_tenant("early")).await;
    let bridged = mesh.onboard_on(&unique_tenant("earlyb"), "premium").await;
    let orders = start_registered(&mesh).await;
    for t in [&pooled, &bridged] {
        let id = format!("{}/catch-up/orders", t.tenant_id);
        let admin = mesh.admin_token().await;
        eventually(Duration::from_secs(20), || {
            let (mut onboarding, admin, id) = (mesh.onboarding(), admin.clone(), id.clone());
            async move { onboarding.get_workflow(authed(GetWorkflowRequest { workflow_id: id }, &admin)).await.is_ok() }
        })
        .await;
        let wf = mesh.wait_workflow(&id).await;
        assert_eq!((wf.status(), wf.kind.as_str()), (WorkflowStatus::Succeeded, "catch_up"), "{wf:?}");
        add_product(&mesh, &t.token, "p1").await;
        order(&orders, &t.token, "o1").await;
        assert_eq!(ids(&orders_of(&orders, &t.token).await), ["o1"]);
    }
    let own = format!("tenant-{}-bridge-orders-orders", bridged.tenant_id);
    assert!(resources(&mesh, &bridged.tenant_id).await.iter().any(|r| r.ends_with(&own)));

    let late = mesh.onboard(&unique_tenant("late")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let admin = mesh.admin_token().await;
    let none = GetWorkflowRequest { workflow_id: format!("{}/catch-up/orders", late.tenant_id) };
    expect_code(mesh.onboarding().get_workflow(authed(none, &admin)).await, tonic::Code::NotFound);
}

/// The tenant's storage quota holds in the service's tables too (a write
/// past it is RESOURCE_EXHAUSTED with a QuotaFailure; a delete makes room),
/// and what it stores there is metered by the byte-hour for it alone
/// (`orders.storage_byte_hours`, here sampled every second) and priced.
#[tokio::test]
async fn its_tables_keep_the_storage_quota_and_are_metered_by_the_byte_hour() {
    use tenantmesh_proto::metering::v1::{GetUsageRequest, Window};
    use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};
    let mesh = TestMesh::start().await;
    let orders = start_with(&mesh, &[("TENANTMESH_STORAGE_SAMPLE_SECS", "1")]).await;
    let (a, b) = (mesh.onboard(&unique_tenant("quota")).await, mesh.onboard(&unique_tenant("free")).await);
    for t in [&a, &b] {
        add_product(&mesh, &t.token, "p1").await;
    }
    let admin = mesh.admin_token().await;
    let limits =
        TenantLimits { requests_per_second: 10_000, burst: 10_000, max_concurrency: 100, storage_quota_bytes: 300 };
    let req = SetTenantLimitsRequest { tenant_id: a.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    // Orders of ~70 bytes each until the quota refuses one (once every
    // service has seen the new limits).
    let mut client = orders.client.clone();
    let mut placed = 0;
    let refused = loop {
        match client.create_order(authed(create(&format!("q{placed}"), "p1", 1), &a.token)).await {
            Ok(_) => placed += 1,
            Err(s) => break s,
        }
        assert!(placed < 100, "never refused");
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("storage quota of 300 bytes"), "{refused:?}");
    use tonic_types::StatusExt as _;
    let quota = refused.get_details_quota_failure().expect("a QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", a.tenant_id));
    assert!((2..=5).contains(&placed), "{placed} orders of ~70 bytes under 300");
    // The neighbour, without a quota, is not held to it.
    for i in 0..placed + 2 {
        client.create_order(authed(create(&format!("q{i}"), "p1", 1), &b.token)).await.unwrap();
    }

    // Stored bytes, metered per tenant and priced.
    let now = tenantmesh_service::clock::now_secs();
    let usage = |t: &TestTenant| {
        let req = GetUsageRequest {
            tenant_id: t.tenant_id.clone(),
            meter: "orders.storage_byte_hours".into(),
            from: now - 3600,
            to: now + 3600,
            window: Window::Hour as i32,
            group_by: vec![],
        };
        authed(req, &t.token)
    };
    let metering = mesh.metering();
    let stored = |t: TestTenant| {
        let mut metering = metering.clone();
        async move { metering.get_usage(usage(&t)).await.unwrap().into_inner().rows.iter().map(|r| r.value).sum::<i64>() }
    };
    eventually(Duration::from_secs(20), || async { stored(a.clone()).await > 0 && stored(b.clone()).await > 0 }).await;
    let cost = tenantmesh_proto::metering::v1::GetTenantCostRequest {
        tenant_id: a.tenant_id.clone(),
        from: now - 3600,
        to: now + 3600,
    };
    let cost = mesh.metering().get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let line = cost.lines.iter().find(|l| l.item == "orders.storage_byte_hours").expect("a storage line");
    assert!(line.cost > 0.0, "{line:?}");
}

/// A tier change whose service step fails for good before the switch, and
/// a restore whose service step fails, are rolled back in the service too:
/// the tenant is ACTIVE where it was, its orders (and items) as before,
/// writable in both services, the new copy removed; the status names the
/// service's step.
#[tokio::test]
async fn a_failed_service_step_is_rolled_back_in_the_service_too() {
    let faults = "fail-permanent:copy_service:1;fail-permanent:rewind_service:1";
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_FAULTS", faults)]).await;
    let orders = start_registered(&mesh).await;
    let admin = mesh.admin_token().await;
    let (a, b) = (mesh.onboard(&unique_tenant("undo")).await, mesh.onboard(&unique_tenant("undor")).await);
    for t in [&a, &b] {
        add_product(&mesh, &t.token, "p1").await;
        order(&orders, &t.token, "o1").await;
    }

    // The tier change: rolled back at copy_service, before the switch.
    let req = ChangeTierRequest { tenant_id: a.tenant_id.clone(), tier: "premium".into() };
    let id = mesh.onboarding().change_tier(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let undone = mesh.wait_workflow(&id).await;
    assert_eq!(undone.status(), WorkflowStatus::RolledBack, "{undone:?}");
    assert!(undone.error.starts_with("copy_service (orders): "), "{}", undone.error);
    let own = format!("tenant-{}-bridge-orders-orders", a.tenant_id);
    assert!(!resources(&mesh, &a.tenant_id).await.iter().any(|r| r.ends_with(&own)), "the new copy is removed");
    eventually(Duration::from_secs(10), || async {
        let mut client = orders.client.clone();
        client.create_order(authed(create("o2", "p1", 1), &a.token)).await.is_ok()
    })
    .await;
    assert_eq!(ids(&orders_of(&orders, &a.token).await), ["o1", "o2"]);

    // The restore: rolled back at rewind_service, the data's rewind undone.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let at = tenantmesh_app::history::now_us();
    tokio::time::sleep(Duration::from_millis(5)).await;
    order(&orders, &b.token, "o2").await;
    let point_in_time = prost_types::Timestamp { seconds: at / 1_000_000, nanos: (at % 1_000_000) as i32 * 1000 };
    let req = RestoreTenantRequest { tenant_id: b.tenant_id.clone(), point_in_time: Some(point_in_time), target: 0 };
    let id = mesh.onboarding().restore_tenant(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let undone = mesh.wait_workflow(&id).await;
    assert_eq!(undone.status(), WorkflowStatus::RolledBack, "{undone:?}");
    assert!(undone.error.starts_with("rewind_service (orders): "), "{}", undone.error);
    eventually(Duration::from_secs(10), || async {
        let mut client = orders.client.clone();
        client.create_order(authed(create("o3", "p1", 1), &b.token)).await.is_ok()
    })
    .await;
    assert_eq!(ids(&orders_of(&orders, &b.token).await), ["o1", "o2", "o3"], "as before the restore, and writable");
    assert_eq!(ids(&orders_of(&orders, &a.token).await), ["o1", "o2"], "the other tenant is untouched");
}

/// The operator decommissions a service that is gone: DeregisterService
/// takes it out of the catalog, a workflow failed at its step is retried
/// past it (the step says it was skipped), and later workflows leave it out.
#[tokio::test]
async fn a_deregistered_service_is_left_out_of_the_workflows() {
    let mesh = TestMesh::start().await;
    drop(start_registered(&mesh).await);
    let admin = mesh.admin_token().await;
    let tenant = unique_tenant("gone");
    let id = register(&mesh, &admin, &tenant, "gone-password-1").await;
    assert_eq!(mesh.wait_workflow(&id).await.status(), WorkflowStatus::Failed);

    let req =
        tenantmesh_proto::registry::v1::DeregisterServiceRequest { name: "orders".into(), silo_tenant: String::new() };
    assert!(mesh.registry().deregister_service(authed(req, &admin)).await.unwrap().into_inner().removed);
    let retry = RetryOnboardingRequest { workflow_id: id.clone() };
    mesh.onboarding().retry_onboarding(authed(retry, &admin)).await.unwrap();
    let done = mesh.wait_workflow(&id).await;
    assert_eq!(done.status(), WorkflowStatus::Succeeded, "{done:?}");
    let skipped = service_step(&done, "provision_service", "orders");
    assert_eq!(skipped.detail, "skipped: orders is no longer in the service catalog");
    let later = mesh.onboard(&unique_tenant("later")).await;
    let onboarded = mesh.wait_workflow(&format!("{}/onboard", later.tenant_id)).await;
    assert!(onboarded.steps.iter().all(|s| s.service.is_empty()), "{onboarded:?}");
}

/// Under `tenantmesh up` a silo tenant gets an instance of its own of the
/// example service: its onboarding starts it (the catalog lists it for the
/// tenant), the shared instance forwards the tenant's calls there by
/// itself (counted once, there), the instance serves nobody else, and a
/// tier change out of the silo moves the orders back and removes it.
#[tokio::test]
async fn a_silo_tenant_is_served_by_its_own_instance() {
    use tenantmesh_orders::proto::orders_client::OrdersClient;
    use tenantmesh_proto::registry::v1::ListServicesRequest;
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_NO_EXAMPLE", "false")]).await;
    let shared_addr = mesh.addrs.orders.expect("the example runs");
    let admin = mesh.admin_token().await;
    until_listed(TestMesh::channel(mesh.addrs.registry), &admin, "orders", &format!("http://{shared_addr}")).await;
    let shared = OrdersClient::new(TestMesh::channel(shared_addr));
    let silo = mesh.onboard_on(&unique_tenant("silo"), "enterprise").await;
    let pool = mesh.onboard(&unique_tenant("pool")).await;
    let onboarded = mesh.wait_workflow(&format!("{}/onboard", silo.tenant_id)).await;
    let step = service_step(&onboarded, "provision_service", "orders");
    assert_eq!(step.detail, "a silo tenant: served by its own instance of orders");
    let listed = mesh.registry().list_services(authed(ListServicesRequest {}, &admin)).await.unwrap().into_inner();
    let own = listed.services.iter().find(|s| s.silo_tenant == silo.tenant_id).expect("its instance is listed");
    assert_ne!(own.endpoint, format!("http://{shared_addr}"));
    let instance =
        OrdersClient::new(tonic::transport::Endpoint::from_shared(own.endpoint.clone()).unwrap().connect_lazy());

    // Through the shared port: forwarded to its instance, which holds the order.
    for t in [&silo, &pool] {
        add_product(&mesh, &t.token, "p1").await;
    }
    eventually(Duration::from_secs(10), || {
        let mut client = shared.clone();
        let req = authed(create("o1", "p1", 2), &silo.token);
        async move { client.create_order(req).await.is_ok() }
    })
    .await;
    let listed = shared.clone().list_orders(authed(list(10, ""), &silo.token)).await.unwrap().into_inner().orders;
    assert_eq!(ids(&listed), ["o1"]);
    let direct = instance.clone().list_orders(authed(list(10, ""), &silo.token)).await.unwrap().into_inner().orders;
    assert_eq!(ids(&direct), ["o1"], "the instance holds it");
    // On the embedded store the instance's store is its own (on DynamoDB
    // both reach the tenant's one table).
    if mesh.backend() == TestBackend::Embedded {
        let lifecycle = mesh.service_token_as("tests-lifecycle").await;
        let silo_at = tenantmesh_proto::registry::v1::Placement {
            model: tenantmesh_proto::registry::v1::IsolationModel::Silo as i32,
            ..Default::default()
        };
        let export = |tenant: &str| tenantmesh_proto::lifecycle::v1::ExportTenantRequest {
            tenant_id: tenant.into(),
            placement: Some(silo_at.clone()),
            include_history: false,
            as_of_us: None,
        };
        let mut at_shared = tenantmesh_proto::lifecycle::v1::tenant_lifecycle_client::TenantLifecycleClient::new(
            TestMesh::channel(shared_addr),
        );
        let mut pages =
            at_shared.export_tenant(authed(export(&silo.tenant_id), &lifecycle)).await.unwrap().into_inner();
        assert!(
            pages.message().await.unwrap().is_none_or(|p| p.items.is_empty()),
            "nothing of it at the shared instance"
        );
    }
    // The instance serves its tenant alone; the pool tenant is served by the shared one.
    let refused = instance.clone().list_orders(authed(list(10, ""), &pool.token)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    shared.clone().create_order(authed(create("o1", "p1", 9), &pool.token)).await.unwrap();
    let theirs = shared
        .clone()
        .get_order(authed(tenantmesh_orders::proto::GetOrderRequest { order_id: "o1".into() }, &pool.token))
        .await
        .unwrap();
    assert_eq!(theirs.into_inner().order.unwrap().quantity, 9);

    // Out of the silo: the orders come back to the shared instance, the instance goes.
    let req = ChangeTierRequest { tenant_id: silo.tenant_id.clone(), tier: "premium".into() };
    let id = mesh.onboarding().change_tier(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    let moved = mesh.wait_workflow(&id).await;
    assert_eq!(moved.status(), WorkflowStatus::Succeeded, "{moved:?}");
    let purged = service_step(&moved, "purge_service", "orders");
    assert!(purged.detail.ends_with("its own instance removed"), "{}", purged.detail);
    let listed = mesh.registry().list_services(authed(ListServicesRequest {}, &admin)).await.unwrap().into_inner();
    assert!(listed.services.iter().all(|s| s.silo_tenant.is_empty()), "{listed:?}");
    let login = mesh.login(&silo.tenant_id, &silo.admin_email, &silo.admin_password).await.unwrap();
    eventually(Duration::from_secs(10), || {
        let mut client = shared.clone();
        let req = authed(list(10, ""), &login);
        async move { client.list_orders(req).await.is_ok_and(|r| ids(&r.into_inner().orders) == ["o1"]) }
    })
    .await;
}
