//! Pool, bridge and silo side by side, tier changes that move items, and
//! offboarding, through the real mesh, on the backend
//! `TENANTMESH_TEST_STORAGE` names.

use std::collections::BTreeMap;
use std::time::Duration;

use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, Tenant, TenantStatus};
use tenantmesh_test_support::*;
use tonic::Code;

async fn tenant(mesh: &TestMesh, id: &str) -> Tenant {
    let admin = mesh.admin_token().await;
    let req = authed(GetTenantRequest { tenant_id: id.into() }, &admin);
    mesh.registry().get_tenant(req).await.unwrap().into_inner().tenant.unwrap()
}

fn put(collection: &str, id: &str, title: &str) -> PutItemRequest {
    PutItemRequest {
        collection: collection.into(),
        id: id.into(),
        attributes: Some(attrs(&[("title", title)])),
        expected_version: None,
    }
}

fn title(item: &Item) -> String {
    use prost_types::value::Kind;
    match item.attributes.as_ref().and_then(|a| a.fields.get("title")).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("no title: {other:?}"),
    }
}

/// Every item of the caller's collection `c`, by id -> (title, version).
async fn all_items(mesh: &TestMesh, token: &str) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let req = QueryItemsRequest { collection: "c".into(), id_prefix: String::new(), page_size: 1000, page_token };
        let page = mesh.data().query_items(authed(req, token)).await.unwrap().into_inner();
        for item in &page.items {
            assert!(out.insert(item.id.clone(), (title(item), item.version)).is_none(), "{} listed twice", item.id);
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

/// The tenant's items as the service role sees them in `table` (through DataAdmin).
async fn stored_in(mesh: &TestMesh, tenant_id: &str, table: &str) -> Result<usize, tonic::Status> {
    exported_items(&mut mesh.data_admin(), &mesh.service_token().await, tenant_id, table).await
}

/// Pool, bridge and silo tenants side by side: each gets its own placement,
/// and none can reach another's items through any RPC, the silo tenant's
/// instance included.
#[tokio::test]
async fn models_side_by_side_never_see_each_other() {
    let mesh = TestMesh::start().await;
    let pool = mesh.onboard_on(&unique_tenant("pool"), "standard").await;
    let bridge = mesh.onboard_on(&unique_tenant("bridge"), "premium").await;
    let silo = mesh.onboard_on(&unique_tenant("silo"), "enterprise").await;
    let all = [&pool, &bridge, &silo];

    let placements: Vec<_> = {
        let mut v = Vec::new();
        for t in all {
            v.push(tenant(&mesh, &t.tenant_id).await.placement.unwrap());
        }
        v
    };
    let models: Vec<i32> = placements.iter().map(|p| p.model).collect();
    assert_eq!(models, [IsolationModel::Pool, IsolationModel::Bridge, IsolationModel::Silo].map(|m| m as i32));
    assert!(placements[1].table.ends_with(&format!("tenant-{}-bridge", bridge.tenant_id)), "{placements:?}");
    assert!(placements[2].table.ends_with(&format!("tenant-{}-silo", silo.tenant_id)), "{placements:?}");
    assert!(placements[0].endpoint.is_empty() && placements[1].endpoint.is_empty());
    let silo_endpoint = placements[2].endpoint.clone();
    assert!(silo_endpoint.starts_with("http://127.0.0.1:"), "{silo_endpoint}");

    for t in all {
        let r = mesh.data().put_item(authed(put("c", "same-id", &t.tenant_id), &t.token)).await.unwrap();
        assert_eq!(r.into_inner().item.unwrap().version, 1);
    }
    for t in all {
        let get = GetItemRequest { collection: "c".into(), id: "same-id".into() };
        let item = mesh.data().get_item(authed(get, &t.token)).await.unwrap().into_inner().item.unwrap();
        assert_eq!(title(&item), t.tenant_id, "a tenant read another's item");
        let items = all_items(&mesh, &t.token).await;
        assert_eq!(items.len(), 1, "{items:?}");
        for other in all.iter().filter(|o| o.tenant_id != t.tenant_id) {
            let mut req = authed(GetItemRequest { collection: "c".into(), id: "same-id".into() }, &t.token);
            req.metadata_mut().insert("x-tenant-id", other.tenant_id.parse().unwrap());
            expect_code(mesh.data().get_item(req).await, Code::PermissionDenied);
            // Lifecycle calls are for the service role only.
            let export = ExportItemsRequest {
                store: Some(StoreRef { tenant_id: other.tenant_id.clone(), table: "x".into() }),
                ..Default::default()
            };
            expect_code(mesh.data_admin().export_items(authed(export, &t.token)).await, Code::PermissionDenied);
        }
    }
    // The silo tenant's own instance serves it and nobody else.
    let channel = tonic::transport::Endpoint::from_shared(silo_endpoint.clone()).unwrap().connect_lazy();
    let mut direct = data_client::DataClient::new(channel.clone());
    let get = || GetItemRequest { collection: "c".into(), id: "same-id".into() };
    let item = direct.get_item(authed(get(), &silo.token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!(title(&item), silo.tenant_id);
    for other in [&pool, &bridge] {
        expect_code(direct.get_item(authed(get(), &other.token)).await, Code::PermissionDenied);
        let export = ExportItemsRequest {
            store: Some(StoreRef { tenant_id: other.tenant_id.clone(), table: placements[0].table.clone() }),
            ..Default::default()
        };
        let mut admin = data_admin_client::DataAdminClient::new(channel.clone());
        expect_code(admin.export_items(authed(export, &mesh.service_token().await)).await, Code::PermissionDenied);
    }
    // A tenant's placement never reaches another tenant's dedicated table.
    let foreign = StoreRef { tenant_id: pool.tenant_id.clone(), table: placements[1].table.clone() };
    let req = authed(ExportItemsRequest { store: Some(foreign), ..Default::default() }, &mesh.service_token().await);
    expect_invalid(mesh.data_admin().export_items(req).await, "store.table");

    // The silo instance comes back after a restart, on the same endpoint.
    let mut mesh = mesh;
    mesh.restart().await;
    let silo_token = mesh.login(&silo.tenant_id, &silo.admin_email, &silo.admin_password).await.unwrap();
    let item = mesh.data().get_item(authed(get(), &silo_token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!(title(&item), silo.tenant_id);
    assert_eq!(tenant(&mesh, &silo.tenant_id).await.placement.unwrap().endpoint, silo_endpoint);
    mesh.shutdown().await;
}

/// A tenant moves pool -> bridge -> silo -> pool while a writer keeps
/// writing: every acknowledged write is there afterwards, once, with its
/// version; writes refused during the move are UNAVAILABLE with RetryInfo;
/// the old copy is removed each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tier_changes_move_every_item_and_lose_no_write() {
    use tonic_types::StatusExt;
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("mover"), "standard").await;
    let mut expected: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for i in 0..130 {
        let item = mesh.data().put_item(authed(put("c", &format!("i{i:03}"), "v1"), &t.token)).await.unwrap();
        expected.insert(format!("i{i:03}"), ("v1".into(), item.into_inner().item.unwrap().version));
    }
    let mut previous = tenant(&mesh, &t.tenant_id).await.placement.unwrap();
    for (n, tier) in ["premium", "enterprise", "basic"].into_iter().enumerate() {
        let req = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: tier.into() }, &admin);
        let started = mesh.onboarding().change_tier(req).await.unwrap().into_inner();
        // The same request again is the same workflow.
        let again = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: tier.into() }, &admin);
        assert_eq!(mesh.onboarding().change_tier(again).await.unwrap().into_inner().workflow_id, started.workflow_id);
        // Write throughout the move; keep what was acknowledged.
        let mut refused = 0;
        let mut k = 0;
        loop {
            let req = authed(GetWorkflowRequest { workflow_id: started.workflow_id.clone() }, &admin);
            let wf = mesh.onboarding().get_workflow(req).await.unwrap().into_inner().workflow.unwrap();
            if wf.status != WorkflowStatus::Running as i32 {
                assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
                break;
            }
            let id = format!("i{:03}", k % 130);
            let value = format!("move{n}-{k}");
            match mesh.data().put_item(authed(put("c", &id, &value), &t.token)).await {
                Ok(r) => {
                    expected.insert(id, (value, r.into_inner().item.unwrap().version));
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                    assert!(s.get_details_retry_info().is_some(), "no RetryInfo: {s:?}");
                    refused += 1;
                }
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused > 0, "no write landed in the read-only window of the move to {tier}");
        let now = tenant(&mesh, &t.tenant_id).await;
        assert_eq!((now.tier.as_str(), now.status), (tier, TenantStatus::Active as i32));
        let placement = now.placement.unwrap();
        assert_ne!(placement.model, previous.model);
        assert_eq!(all_items(&mesh, &t.token).await, expected, "items after the move to {tier}");
        // The old copy is gone: a dropped table, or no items left in the pool.
        match stored_in(&mesh, &t.tenant_id, &previous.table).await {
            Ok(n) => assert_eq!(n, 0, "{n} items left in {}", previous.table),
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        }
        previous = placement;
    }
    // A pool -> pool change just switches the tier.
    let req = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "standard".into() }, &admin);
    let started = mesh.onboarding().change_tier(req).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    let steps: Vec<&str> = wf.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["switch_placement", "apply_limits"]);
    assert_eq!(tenant(&mesh, &t.tenant_id).await.limits.unwrap().requests_per_second, 50 * 10_000, "standard, raised");
    let bad = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "gold".into() }, &admin);
    expect_invalid(mesh.onboarding().change_tier(bad).await, "tier");
    let same = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "standard".into() }, &admin);
    expect_code(mesh.onboarding().change_tier(same).await, Code::FailedPrecondition);
    mesh.shutdown().await;
}

/// Offboarding suspends the tenant, exports its items to JSONL, deletes
/// items, dedicated table and users, and marks it deleted; asking again
/// returns the same workflow. WatchEvents replays the tenant's lifecycle.
#[tokio::test]
async fn offboarding_exports_then_removes_everything() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("leaver"), "premium").await;
    let table = tenant(&mesh, &t.tenant_id).await.placement.unwrap().table;
    for i in 0..7 {
        mesh.data().put_item(authed(put("c", &format!("i{i}"), "kept"), &t.token)).await.unwrap();
    }
    let mut watch = mesh
        .onboarding()
        .watch_events(authed(WatchEventsRequest { tenant_id: t.tenant_id.clone(), after_sequence: Some(0) }, &admin))
        .await
        .unwrap()
        .into_inner();

    let req = || authed(OffboardTenantRequest { tenant_id: t.tenant_id.clone() }, &admin);
    let started = mesh.onboarding().offboard_tenant(req()).await.unwrap().into_inner();
    assert_eq!(started.workflow_id, format!("{}/offboard", t.tenant_id));
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert_eq!(mesh.onboarding().offboard_tenant(req()).await.unwrap().into_inner().workflow_id, started.workflow_id);

    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&wf.export_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7);
    assert!(lines.iter().all(|l| l["collection"] == "c" && l["attributes"]["title"] == "kept" && l["version"] == 1));
    assert_eq!(tenant(&mesh, &t.tenant_id).await.status, TenantStatus::Deleted as i32);
    let get = GetItemRequest { collection: "c".into(), id: "i1".into() };
    expect_code(mesh.data().get_item(authed(get, &t.token)).await, Code::PermissionDenied);
    expect_code(mesh.login(&t.tenant_id, &t.admin_email, &t.admin_password).await, Code::Unauthenticated);
    let users = tenantmesh_proto::auth::v1::ListUsersRequest { tenant_id: t.tenant_id.clone(), ..Default::default() };
    assert!(mesh.auth().list_users(authed(users, &admin)).await.unwrap().into_inner().users.is_empty());
    expect_code(stored_in(&mesh, &t.tenant_id, &table).await, Code::FailedPrecondition);

    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        let e = e.event.unwrap();
        assert_eq!(e.tenant_id, t.tenant_id);
        kinds.push(EventKind::try_from(e.kind).unwrap());
    }
    assert_eq!(kinds, [EventKind::TenantOnboarded, EventKind::TenantSuspended, EventKind::TenantOffboarded]);
    // A tenant admin watches only their own tenant.
    let other = mesh.onboard(&unique_tenant("watcher")).await;
    let spy = authed(WatchEventsRequest { tenant_id: t.tenant_id.clone(), after_sequence: Some(0) }, &other.token);
    expect_code(mesh.onboarding().watch_events(spy).await, Code::PermissionDenied);
    mesh.shutdown().await;
}

/// A provisioner that fails twice then succeeds: onboarding completes
/// (attempts 3). One that always fails: FAILED with the step and reason,
/// a STEP_FAILED event; once the fault is gone, RetryOnboarding completes it.
#[tokio::test]
async fn failing_provisioner_retries_then_fails_then_retry_completes() {
    let backend = TestBackend::from_env();
    let mesh = TestMesh::start_with_env(backend, &[("TENANTMESH_FAULTS", "fail:provision_storage:2")]).await;
    let t = mesh.onboard_on(&unique_tenant("flaky"), "premium").await;
    let wf = mesh.wait_workflow(&format!("{}/onboard", t.tenant_id)).await;
    let step = wf.steps.iter().find(|s| s.name == "provision_storage").unwrap();
    assert_eq!((step.attempts, step.last_error.as_str()), (3, ""));
    mesh.shutdown().await;

    let mesh = TestMesh::start_with_env(
        backend,
        &[("TENANTMESH_FAULTS", "fail:provision_storage:always"), ("TENANTMESH_STEP_MAX_ATTEMPTS", "3")],
    )
    .await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("broken");
    let req = RegisterTenantRequest {
        tenant_id: id.clone(),
        name: "Broken".into(),
        tier: "premium".into(),
        admin_email: "admin@broken.example".into(),
        admin_password: "broken-password".into(),
        idempotency_key: id.clone(),
    };
    mesh.onboarding().register_tenant(authed(req, &admin)).await.unwrap();
    let workflow_id = format!("{id}/onboard");
    let wf = mesh.wait_workflow(&workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Failed as i32);
    assert_eq!(wf.error, "provision_storage: injected fault in provision_storage");
    let step = wf.steps.iter().find(|s| s.name == "provision_storage").unwrap();
    assert_eq!((step.state, step.attempts), (StepState::Failed as i32, 3));
    assert_eq!(tenant(&mesh, &id).await.status, TenantStatus::Provisioning as i32);
    let retry = || authed(RetryOnboardingRequest { workflow_id: workflow_id.clone() }, &admin);
    let mut state = mesh.stop().await;

    // The fault is fixed (a new deployment): retry.
    state.set_env("TENANTMESH_FAULTS", None);
    let mesh = TestMesh::start_on(state).await;
    let admin2 = mesh.admin_token().await;
    let r = mesh.onboarding().retry_onboarding(authed(retry().into_inner(), &admin2)).await.unwrap().into_inner();
    assert_eq!(r.workflow.unwrap().status, WorkflowStatus::Running as i32);
    let wf = mesh.wait_workflow(&workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert!(wf.error.is_empty());
    expect_code(
        mesh.onboarding().retry_onboarding(authed(retry().into_inner(), &admin2)).await,
        Code::FailedPrecondition,
    );
    expect_invalid(
        mesh.onboarding().retry_onboarding(authed(RetryOnboardingRequest { workflow_id: "x".into() }, &admin2)).await,
        "workflow_id",
    );
    mesh.login(&id, "admin@broken.example", "broken-password").await.unwrap();
    let events = mesh
        .onboarding()
        .watch_events(authed(WatchEventsRequest { tenant_id: id.clone(), after_sequence: Some(0) }, &admin2))
        .await
        .unwrap()
        .into_inner();
    let mut events = events;
    let first = events.message().await.unwrap().unwrap().event.unwrap();
    assert_eq!(first.kind, EventKind::StepFailed as i32);
    assert!(first.detail.starts_with("provision_storage: injected fault"), "{first:?}");
    mesh.shutdown().await;
}

/// Items at the 400 KiB item limit and many small ones move and export
/// whole: a tier change copies a page at a time in batches bounded in
/// bytes (it used to fail with "decoded message length too large" and
/// leave the tenant MIGRATING for good), and offboarding streams the export
/// to its file (it used to fail at export_items, leaving the tenant
/// SUSPENDED with its data undeleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_at_the_size_limit_move_and_export_whole() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("bulky"), "standard").await;
    let big = "x".repeat(390 * 1024);
    let mut expected = BTreeMap::new();
    for i in 0..12 {
        let r = mesh.data().put_item(authed(put("c", &format!("big{i:02}"), &big), &t.token)).await.unwrap();
        expected.insert(format!("big{i:02}"), (big.clone(), r.into_inner().item.unwrap().version));
    }
    for i in 0..520 {
        let r = mesh.data().put_item(authed(put("c", &format!("s{i:03}"), "small"), &t.token)).await.unwrap();
        expected.insert(format!("s{i:03}"), ("small".into(), r.into_inner().item.unwrap().version));
    }

    let req = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "premium".into() }, &admin);
    let started = mesh.onboarding().change_tier(req).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let now = tenant(&mesh, &t.tenant_id).await;
    assert_eq!(
        (now.status, now.placement.unwrap().model),
        (TenantStatus::Active as i32, IsolationModel::Bridge as i32)
    );
    assert!(all_items(&mesh, &t.token).await == expected, "items differ after the move");

    let req = authed(OffboardTenantRequest { tenant_id: t.tenant_id.clone() }, &admin);
    let started = mesh.onboarding().offboard_tenant(req).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let export = std::fs::read_to_string(&wf.export_path).unwrap();
    let mut exported = BTreeMap::new();
    for line in export.lines() {
        let l: serde_json::Value = serde_json::from_str(line).unwrap();
        let value = (l["attributes"]["title"].as_str().unwrap().to_owned(), l["version"].as_u64().unwrap());
        exported.insert(l["id"].as_str().unwrap().to_owned(), value);
    }
    assert!(exported == expected, "the export differs from the items ({} lines)", export.lines().count());
    assert_eq!(tenant(&mesh, &t.tenant_id).await.status, TenantStatus::Deleted as i32);
    mesh.shutdown().await;
}

/// A tier change whose copy keeps failing is rolled back: ROLLED_BACK with
/// the reason, the tenant ACTIVE on its old tier and placement with every
/// item, writable again, the half-made dedicated table gone; the rolled-back
/// workflow is not retried, and a new change may start.
#[tokio::test]
async fn a_tier_change_that_cannot_copy_is_rolled_back() {
    let faults = [("TENANTMESH_FAULTS", "fail:copy_items:always"), ("TENANTMESH_STEP_MAX_ATTEMPTS", "2")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &faults).await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("stuck"), "standard").await;
    let before = tenant(&mesh, &t.tenant_id).await;
    let mut expected = BTreeMap::new();
    for i in 0..5 {
        let r = mesh.data().put_item(authed(put("c", &format!("i{i}"), "kept"), &t.token)).await.unwrap();
        expected.insert(format!("i{i}"), ("kept".to_owned(), r.into_inner().item.unwrap().version));
    }

    let change = || authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "premium".into() }, &admin);
    let started = mesh.onboarding().change_tier(change()).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "{wf:?}");
    assert!(wf.error.starts_with("copy_items: injected fault"), "{}", wf.error);
    let after = tenant(&mesh, &t.tenant_id).await;
    assert_eq!(
        (after.status, &after.tier, &after.placement),
        (TenantStatus::Active as i32, &before.tier, &before.placement)
    );
    assert_eq!(all_items(&mesh, &t.token).await, expected);
    // Writable again once the services' tenant cache has seen ACTIVE.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(s) = mesh.data().put_item(authed(put("c", "after", "written"), &t.token)).await {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(tokio::time::Instant::now() < deadline, "writes still refused after the rollback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target = tenantmesh_isolation::stores::dedicated_table(&mesh.state_table_name(""), &t.tenant_id, "bridge");
    expect_code(stored_in(&mesh, &t.tenant_id, &target).await, Code::FailedPrecondition);

    let retry = authed(RetryOnboardingRequest { workflow_id: started.workflow_id.clone() }, &admin);
    expect_code(mesh.onboarding().retry_onboarding(retry).await, Code::FailedPrecondition);
    let again = mesh.onboarding().change_tier(change()).await.unwrap().into_inner();
    assert_ne!(again.workflow_id, started.workflow_id, "a new change starts");
    mesh.shutdown().await;
}

/// The fence, against a write delayed in flight: a PutItem that passed its
/// checks while the tenant was ACTIVE is held (by `TENANTMESH_DATA_FAULTS`)
/// until the tier change has raised the old table's fence and copied the
/// items, then reaches the old table. It is refused there with UNAVAILABLE
/// and RetryInfo (without the fence it would land where no copy sees it,
/// acknowledged and lost); retried, it lands in the new placement. Writers
/// running throughout find every acknowledged write there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_stalled_across_the_copy_is_fenced_and_retried() {
    use tonic_types::StatusExt;
    const STALL_MS: u64 = 4000;
    let stall = format!("stall-writes:{STALL_MS}");
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_DATA_FAULTS", &stall)]).await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("fence"), "standard").await;
    let before = tenant(&mesh, &t.tenant_id).await.placement.unwrap();
    let mut expected: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for i in 0..20 {
        let item = mesh.data().put_item(authed(put("c", &format!("i{i:02}"), "v1"), &t.token)).await.unwrap();
        expected.insert(format!("i{i:02}"), ("v1".into(), item.into_inner().item.unwrap().version));
    }

    let mut data = mesh.data();
    let token = t.token.clone();
    let stalled = tokio::spawn(async move { data.put_item(authed(put("c", "stall-1", "late"), &token)).await });
    // Past its checks (the tenant ACTIVE) and held before the write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let req = authed(ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "premium".into() }, &admin);
    let wf_id = mesh.onboarding().change_tier(req).await.unwrap().into_inner().workflow_id;
    let mut k = 0;
    while !stalled.is_finished() {
        let (id, value) = (format!("i{:02}", k % 20), format!("w{k}"));
        match mesh.data().put_item(authed(put("c", &id, &value), &t.token)).await {
            Ok(r) => {
                expected.insert(id, (value, r.into_inner().item.unwrap().version));
            }
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = stalled.await.unwrap();
    let wf = mesh.wait_workflow(&wf_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let copy = wf.steps.iter().find(|s| s.name == "copy_items").expect("a copy step");
    assert_eq!(copy.state, StepState::Done as i32, "{wf:?}");
    assert!(started.elapsed() > Duration::from_millis(STALL_MS / 2), "the write was not held across the move");
    let refused = first.expect_err("the late write landed in the old table after the copy");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.get_details_retry_info().is_some(), "no RetryInfo: {refused:?}");

    // The client's retry reaches the new placement (held again, then written).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let version = loop {
        match mesh.data().put_item(authed(put("c", "stall-1", "late"), &t.token)).await {
            Ok(r) => break r.into_inner().item.unwrap().version,
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "the retried write never landed");
    };
    expected.insert("stall-1".into(), ("late".into(), version));
    assert_eq!(version, 1, "written once");
    assert_eq!(all_items(&mesh, &t.token).await, expected);
    let now = tenant(&mesh, &t.tenant_id).await.placement.unwrap();
    assert_ne!(now.table, before.table);
    assert_eq!(stored_in(&mesh, &t.tenant_id, &before.table).await.unwrap(), 0, "items left in the old table");
    mesh.shutdown().await;
}
