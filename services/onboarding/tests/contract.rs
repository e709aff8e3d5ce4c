//! Contract tests of `tenantmesh.onboarding.v1.Onboarding`: onboarding,
//! idempotency, crash recovery, validation and access.

use tenantmesh_proto::auth::v1::Role;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::{
    CreateTenantRequest, GetTenantRequest, IsolationModel, ListTenantsRequest, TenantStatus,
};
use tenantmesh_test_support::*;
use tonic::Code;

fn register(id: &str, key: &str) -> RegisterTenantRequest {
    RegisterTenantRequest {
        tenant_id: id.into(),
        name: format!("Tenant {id}"),
        tier: "basic".into(),
        admin_email: format!("admin@{id}.example"),
        admin_password: "admin-password-123".into(),
        idempotency_key: key.into(),
    }
}

async fn count_tenants(mesh: &TestMesh, admin: &str, id: &str) -> usize {
    let req = authed(ListTenantsRequest { page_size: 1000, page_token: String::new() }, admin);
    let list = mesh.registry().list_tenants(req).await.unwrap().into_inner();
    list.tenants.iter().filter(|t| t.tenant_id == id).count()
}

/// RegisterTenant creates an active tenant and a working admin; repeating
/// it with the same key returns the same tenant and creates nothing twice.
#[tokio::test]
async fn register_is_idempotent() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("acme");
    let mut onb = mesh.onboarding();
    for _ in 0..3 {
        let r = onb.register_tenant(authed(register(&id, "key-1"), &admin)).await.unwrap().into_inner();
        assert_eq!((r.tenant_id.as_str(), r.workflow_id.as_str()), (id.as_str(), format!("{id}/onboard").as_str()));
        assert_ne!(r.status, WorkflowStatus::Failed as i32);
    }
    let wf = mesh.wait_workflow(&format!("{id}/onboard")).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let r = onb.register_tenant(authed(register(&id, "key-1"), &admin)).await.unwrap().into_inner();
    assert_eq!(r.status, WorkflowStatus::Succeeded as i32);
    assert_eq!(count_tenants(&mesh, &admin, &id).await, 1);
    let t = mesh.registry().get_tenant(authed(GetTenantRequest { tenant_id: id.clone() }, &admin)).await.unwrap();
    let t = t.into_inner().tenant.unwrap();
    assert_eq!(t.status, TenantStatus::Active as i32);
    // The tier's limits and the pooled placement are recorded.
    assert_eq!(t.limits.unwrap().requests_per_second, 10 * 10_000, "basic, as raised by the test tiers");
    let placement = t.placement.unwrap();
    assert_eq!((placement.model, placement.endpoint.as_str()), (IsolationModel::Pool as i32, ""));
    let token = mesh.login(&id, &format!("admin@{id}.example"), "admin-password-123").await.unwrap();

    let status = onb
        .get_onboarding_status(authed(GetOnboardingStatusRequest { tenant_id: id.clone() }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, WorkflowStatus::Succeeded as i32);
    let steps: Vec<(&str, i32, u32)> = status.steps.iter().map(|s| (s.name.as_str(), s.state, s.attempts)).collect();
    let done = StepState::Done as i32;
    assert_eq!(
        steps,
        vec![
            ("create_tenant", done, 1),
            ("provision_storage", done, 1),
            ("create_admin_user", done, 1),
            ("apply_limits", done, 1),
            ("activate_tenant", done, 1)
        ]
    );

    // Same key, different request: refused. Another key for the same tenant: taken.
    let mut changed = register(&id, "key-1");
    changed.name = "Other".into();
    expect_invalid(onb.register_tenant(authed(changed, &admin)).await, "idempotency_key");
    expect_code(onb.register_tenant(authed(register(&id, "key-2"), &admin)).await, Code::AlreadyExists);
    expect_code(onb.register_tenant(authed(register("platform", "key-3"), &admin)).await, Code::AlreadyExists);
    mesh.shutdown().await;
}

/// A crash after the tenant record was created (but before the step was
/// recorded) is repaired: the rerun adopts that record, creates one tenant
/// and one admin.
#[tokio::test]
async fn rerun_after_partial_progress_adopts_its_own_record() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("crash");
    let req = register(&id, "k");
    mesh.registry()
        .create_tenant(authed(
            CreateTenantRequest {
                tenant_id: id.clone(),
                name: req.name.clone(),
                tier: req.tier.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    mesh.onboarding().register_tenant(authed(req, &admin)).await.unwrap();
    assert_eq!(mesh.wait_workflow(&format!("{id}/onboard")).await.status, WorkflowStatus::Succeeded as i32);
    assert_eq!(count_tenants(&mesh, &admin, &id).await, 1);
    mesh.login(&id, &format!("admin@{id}.example"), "admin-password-123").await.unwrap();
    mesh.shutdown().await;
}

/// A tenant id taken outside onboarding fails the workflow with the reason
/// visible in GetOnboardingStatus, and nothing is hijacked.
#[tokio::test]
async fn foreign_tenant_fails_with_a_visible_reason() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("taken");
    mesh.registry()
        .create_tenant(authed(
            CreateTenantRequest {
                tenant_id: id.clone(),
                name: "Someone else".into(),
                tier: "basic".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let mut onb = mesh.onboarding();
    onb.register_tenant(authed(register(&id, "k"), &admin)).await.unwrap();
    let wf = mesh.wait_workflow(&format!("{id}/onboard")).await;
    assert!(wf.error.starts_with("create_tenant: ") && wf.error.contains("already exists"), "{wf:?}");
    let status = onb
        .get_onboarding_status(authed(GetOnboardingStatusRequest { tenant_id: id.clone() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, WorkflowStatus::Failed as i32);
    assert_eq!(status.steps[0].state, StepState::Failed as i32);
    assert!(status.steps[0].last_error.contains("already exists"), "{:?}", status.steps[0]);
    assert_eq!(status.steps[1].state, StepState::Pending as i32);
    expect_code(mesh.login(&id, &format!("admin@{id}.example"), "admin-password-123").await, Code::Unauthenticated);
    mesh.shutdown().await;
}

/// A workflow left RUNNING by a crash is resumed when the service starts.
#[tokio::test]
async fn unfinished_workflows_resume_on_start() {
    use tenantmesh_onboarding::workflow::{Kind, Params, Spot, Workflow, onboard_steps};
    use tenantmesh_storage::Condition;

    let mesh = TestMesh::start().await;
    let id = unique_tenant("resume");
    let state = mesh.stop().await;
    {
        // What a crash right after the idempotency record was written leaves.
        let store = state.table("onboarding").await;
        let params = Params {
            tenant_id: id.clone(),
            name: "Resumed".into(),
            tier: "standard".into(),
            admin_email: "admin@resumed.example".into(),
        };
        let hash =
            tenantmesh_credentials::password::hash("resumed-password", tenantmesh_credentials::HashParams::default())
                .unwrap();
        let to = Spot {
            model: tenantmesh_proto::registry::v1::IsolationModel::Pool,
            table: state.table_name("data"),
            endpoint: String::new(),
        };
        let mut wf = Workflow::new(format!("{id}/onboard"), Kind::Onboard, params, &onboard_steps(&to, &[]), 0);
        wf.admin_password_hash = hash;
        wf.to = to;
        let pk = tenantmesh_onboarding::engine::WORKFLOWS_PK;
        store.put(pk, &wf.id, serde_json::to_vec(&wf).unwrap(), Condition::NotExists).await.unwrap();
    }
    let mesh = TestMesh::start_on(state).await;
    let admin = mesh.admin_token().await;
    eventually(std::time::Duration::from_secs(10), || {
        let mut onb = mesh.onboarding();
        let req = authed(GetOnboardingStatusRequest { tenant_id: id.clone() }, &admin);
        async move { onb.get_onboarding_status(req).await.unwrap().into_inner().status == WorkflowStatus::Succeeded as i32 }
    })
    .await;
    mesh.login(&id, "admin@resumed.example", "resumed-password").await.unwrap();
    mesh.shutdown().await;
}

/// Bad requests name the field; only platform admins onboard, and tenant admins see only their own status.
#[tokio::test]
async fn validation_and_access() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let mut onb = mesh.onboarding();
    let id = unique_tenant("v");
    type Mutation = Box<dyn Fn(&mut RegisterTenantRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("tenant_id", Box::new(|r| r.tenant_id = "Bad_Id".into())),
        ("name", Box::new(|r| r.name.clear())),
        ("tier", Box::new(|r| r.tier = "gold".into())),
        ("admin_email", Box::new(|r| r.admin_email = "nope".into())),
        // Rejected up front, not by the auth step half-way through onboarding.
        ("admin_email", Box::new(|r| r.admin_email = "a b@example.com".into())),
        ("admin_password", Box::new(|r| r.admin_password = "short".into())),
        ("idempotency_key", Box::new(|r| r.idempotency_key.clear())),
        ("idempotency_key", Box::new(|r| r.idempotency_key = "k".repeat(129))),
    ];
    for (field, mutate) in cases {
        let mut req = register(&id, "k");
        mutate(&mut req);
        expect_invalid(onb.register_tenant(authed(req, &admin)).await, field);
    }

    expect_code(onb.register_tenant(authed(register(&id, "k"), &a.token)).await, Code::PermissionDenied);
    expect_code(onb.register_tenant(register(&id, "k")).await, Code::Unauthenticated);
    let status = |t: &str| GetOnboardingStatusRequest { tenant_id: t.into() };
    onb.get_onboarding_status(authed(status(&a.tenant_id), &a.token)).await.unwrap();
    expect_code(onb.get_onboarding_status(authed(status(&b.tenant_id), &a.token)).await, Code::PermissionDenied);
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    expect_code(onb.get_onboarding_status(authed(status(&a.tenant_id), &user)).await, Code::PermissionDenied);
    expect_code(onb.get_onboarding_status(authed(status(&unique_tenant("none")), &admin)).await, Code::NotFound);
    expect_invalid(onb.get_onboarding_status(authed(status("X"), &admin)).await, "tenant_id");
    mesh.shutdown().await;
}

/// ChangeTier, OffboardTenant, GetWorkflow, ListWorkflows and WatchEvents: bad input names
/// the field, the platform tenant is never moved or offboarded, unknown
/// tenants are NOT_FOUND, only platform admins start workflows, and a
/// tenant cannot start a second workflow while one runs.
#[tokio::test]
async fn lifecycle_rpcs_validate_and_guard() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let mut onb = mesh.onboarding();
    let change = |t: &str, tier: &str| ChangeTierRequest { tenant_id: t.into(), tier: tier.into() };
    let off = |t: &str| OffboardTenantRequest { tenant_id: t.into() };

    expect_invalid(onb.change_tier(authed(change("Bad!", "premium"), &admin)).await, "tenant_id");
    expect_invalid(onb.change_tier(authed(change(&a.tenant_id, "gold"), &admin)).await, "tier");
    expect_code(onb.change_tier(authed(change("platform", "basic"), &admin)).await, Code::FailedPrecondition);
    expect_code(onb.change_tier(authed(change(&unique_tenant("none"), "basic"), &admin)).await, Code::NotFound);
    expect_code(onb.change_tier(authed(change(&a.tenant_id, "premium"), &a.token)).await, Code::PermissionDenied);
    expect_invalid(onb.offboard_tenant(authed(off("Bad!"), &admin)).await, "tenant_id");
    expect_code(onb.offboard_tenant(authed(off("platform"), &admin)).await, Code::FailedPrecondition);
    expect_code(onb.offboard_tenant(authed(off(&unique_tenant("none")), &admin)).await, Code::NotFound);
    expect_code(onb.offboard_tenant(authed(off(&a.tenant_id), &a.token)).await, Code::PermissionDenied);

    for bad in ["", "acme", "acme/onboard/1", "acme/change-tier/x", "Bad!/onboard", "acme/delete"] {
        let r = onb.get_workflow(authed(GetWorkflowRequest { workflow_id: bad.into() }, &admin)).await;
        expect_invalid(r, "workflow_id");
    }
    let missing = GetWorkflowRequest { workflow_id: format!("{}/offboard", a.tenant_id) };
    expect_code(onb.get_workflow(authed(missing, &admin)).await, Code::NotFound);
    let own = GetWorkflowRequest { workflow_id: format!("{}/onboard", a.tenant_id) };
    let wf = onb.get_workflow(authed(own, &a.token)).await.unwrap().into_inner().workflow.unwrap();
    assert_eq!((wf.kind.as_str(), wf.status), ("onboard", WorkflowStatus::Succeeded as i32));
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let theirs = GetWorkflowRequest { workflow_id: format!("{}/onboard", b.tenant_id) };
    expect_code(onb.get_workflow(authed(theirs, &a.token)).await, Code::PermissionDenied);
    let list = |t: &str, limit: i32| ListWorkflowsRequest { tenant_id: t.into(), limit };
    expect_code(onb.list_workflows(authed(list(&b.tenant_id, 0), &a.token)).await, Code::PermissionDenied);
    expect_invalid(onb.list_workflows(authed(list("Bad!", 0), &admin)).await, "tenant_id");
    expect_invalid(onb.list_workflows(authed(list(&a.tenant_id, 1001), &admin)).await, "limit");
    let own = onb.list_workflows(authed(list(&a.tenant_id, 0), &a.token)).await.unwrap().into_inner();
    let ids: Vec<&str> = own.workflows.iter().map(|w| w.workflow_id.as_str()).collect();
    assert_eq!((ids, own.more), (vec![format!("{}/onboard", a.tenant_id).as_str()], false));
    let none = onb.list_workflows(authed(list(&unique_tenant("none"), 0), &admin)).await.unwrap().into_inner();
    assert!(none.workflows.is_empty());
    let watch = WatchEventsRequest { tenant_id: "Bad!".into(), after_sequence: None };
    expect_invalid(onb.watch_events(authed(watch, &admin)).await, "tenant_id");

    // One workflow per tenant: a second change while one runs is refused;
    // offboarding waits for it too.
    let first = onb.change_tier(authed(change(&a.tenant_id, "premium"), &admin)).await.unwrap().into_inner();
    let other = onb.change_tier(authed(change(&a.tenant_id, "enterprise"), &admin)).await;
    expect_code(other, Code::FailedPrecondition);
    let s = expect_code(onb.offboard_tenant(authed(off(&a.tenant_id), &admin)).await, Code::FailedPrecondition);
    assert!(s.message().contains(&first.workflow_id), "{s:?}");
    assert_eq!(mesh.wait_workflow(&first.workflow_id).await.status, WorkflowStatus::Succeeded as i32);
    let done = onb.offboard_tenant(authed(off(&a.tenant_id), &admin)).await.unwrap().into_inner();
    assert_eq!(mesh.wait_workflow(&done.workflow_id).await.status, WorkflowStatus::Succeeded as i32);
    // A deleted tenant changes tier no more.
    expect_code(onb.change_tier(authed(change(&a.tenant_id, "basic"), &admin)).await, Code::FailedPrecondition);
    // Its workflows, newest first, each with its steps; a limit says there are more.
    let all = onb.list_workflows(authed(list(&a.tenant_id, 0), &admin)).await.unwrap().into_inner().workflows;
    let kinds: Vec<&str> = all.iter().map(|w| w.kind.as_str()).collect();
    assert_eq!(kinds, ["offboard", "change_tier", "onboard"], "{all:?}");
    assert!(all.iter().all(|w| !w.steps.is_empty() && w.status == WorkflowStatus::Succeeded as i32));
    let newest = onb.list_workflows(authed(list(&a.tenant_id, 1), &admin)).await.unwrap().into_inner();
    assert_eq!((newest.workflows.len(), newest.workflows[0].kind.as_str(), newest.more), (1, "offboard", true));
    mesh.shutdown().await;
}

/// RestoreTenant puts a tenant's items back as they were at an instant, as
/// a workflow; its input names the field when wrong, and no tenant
/// restores another.
#[tokio::test]
async fn restore_puts_items_back_at_an_instant() {
    use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("restore"), "premium").await;
    let other = mesh.onboard(&unique_tenant("other")).await;
    let put = |title: &str| {
        let req = PutItemRequest {
            collection: "notes".into(),
            id: "n1".into(),
            attributes: Some(attrs(&[("title", title)])),
            expected_version: None,
        };
        let (mut data, token) = (mesh.data(), t.token.clone());
        async move { data.put_item(authed(req, &token)).await.unwrap() }
    };
    put("one").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let at = prost_types::Timestamp { seconds: us / 1_000_000, nanos: (us % 1_000_000) as i32 * 1000 };
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put("two").await;
    let restore = |tenant: &str, at: Option<prost_types::Timestamp>| RestoreTenantRequest {
        tenant_id: tenant.into(),
        point_in_time: at,
        target: RestoreTarget::InPlace as i32,
    };
    let mut o = mesh.onboarding();
    expect_invalid(o.restore_tenant(authed(restore(&t.tenant_id, None), &admin)).await, "point_in_time");
    expect_invalid(o.restore_tenant(authed(restore("Not A Tenant", Some(at)), &admin)).await, "tenant_id");
    let theirs = o.restore_tenant(authed(restore(&t.tenant_id, Some(at)), &other.token)).await;
    expect_code(theirs, Code::PermissionDenied);
    let started = o.restore_tenant(authed(restore(&t.tenant_id, Some(at)), &admin)).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let get = GetItemRequest { collection: "notes".into(), id: "n1".into() };
    let item = mesh.data().get_item(authed(get, &t.token)).await.unwrap().into_inner().item.unwrap();
    let title = item.attributes.unwrap().fields["title"].kind.clone();
    assert_eq!(title, Some(prost_types::value::Kind::StringValue("one".into())));
    mesh.shutdown().await;
}

/// RetryOnboarding takes only a failed workflow; ListTenantResources shows
/// what a tenant holds alone, tagged, to its admin and the operator.
#[tokio::test]
async fn retry_and_resources() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("res"), "premium").await;
    let other = mesh.onboard(&unique_tenant("other")).await;
    let mut o = mesh.onboarding();
    let retry = |id: &str| RetryOnboardingRequest { workflow_id: id.into() };
    let done = format!("{}/onboard", t.tenant_id);
    expect_code(o.retry_onboarding(authed(retry(&done), &admin)).await, Code::FailedPrecondition);
    expect_invalid(o.retry_onboarding(authed(retry("x"), &admin)).await, "workflow_id");
    expect_code(o.retry_onboarding(authed(retry(&done), &t.token)).await, Code::PermissionDenied);

    let list = |tenant: &str| ListTenantResourcesRequest { tenant_id: tenant.into(), include_removed: false };
    let resources = o.list_tenant_resources(authed(list(&t.tenant_id), &t.token)).await.unwrap().into_inner();
    assert!(!resources.resources.is_empty(), "a premium tenant's own table");
    for r in &resources.resources {
        assert_eq!(r.tags.get("tenantId"), Some(&t.tenant_id), "{r:?}");
        assert!(r.create_time > 0, "{r:?}");
    }
    expect_code(o.list_tenant_resources(authed(list(&t.tenant_id), &other.token)).await, Code::PermissionDenied);
    expect_invalid(o.list_tenant_resources(authed(list("Not A Tenant"), &admin)).await, "tenant_id");
    mesh.shutdown().await;
}

/// Every RPC of the onboarding service has a test here.
#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers(include_str!("contract.rs"), &["tenantmesh.onboarding.v1.Onboarding"]);
}

/// RecordUsageThreshold: the data plane's call (a tenant's admin and the
/// operator are refused), fields named when bad, and one event per alert,
/// set and period however often it is called; an alert set again is
/// another alert.
#[tokio::test]
async fn usage_thresholds_are_recorded_once() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("alerted")).await;
    let data_plane = mesh.service_token_as("tests-data-plane").await;
    let mut onb = mesh.onboarding();
    let (period, _) = tenantmesh_service::alerts::period(tenantmesh_service::clock::now_secs());
    let req = |alert_create_time: i64| RecordUsageThresholdRequest {
        tenant_id: a.tenant_id.clone(),
        alert_id: "half".into(),
        period_start: period,
        alert_create_time,
        detail: "write_units reached 20 of 40 (24 used) in this month".into(),
    };
    for token in [&a.token, &admin] {
        expect_code(onb.record_usage_threshold(authed(req(1), token)).await, Code::PermissionDenied);
    }
    type Mutation = Box<dyn Fn(&mut RecordUsageThresholdRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("tenant_id", Box::new(|r| r.tenant_id = "Bad!".into())),
        ("alert_id", Box::new(|r| r.alert_id.clear())),
        ("alert_id", Box::new(|r| r.alert_id = "a@b".into())),
        ("period_start", Box::new(|r| r.period_start += 1)),
        ("detail", Box::new(|r| r.detail.clear())),
    ];
    for (field, mutate) in cases {
        let mut r = req(1);
        mutate(&mut r);
        expect_invalid(onb.record_usage_threshold(authed(r, &data_plane)).await, field);
    }
    let first = onb.record_usage_threshold(authed(req(1), &data_plane)).await.unwrap().into_inner();
    assert!(first.recorded);
    let event = first.event.unwrap();
    assert_eq!(event.kind, EventKind::UsageThresholdReached as i32);
    let name = tenantmesh_service::alerts::period_name(period);
    assert_eq!(
        (event.tenant_id.as_str(), event.workflow_id.as_str()),
        (a.tenant_id.as_str(), format!("half@{name}").as_str())
    );
    for _ in 0..3 {
        let again = onb.record_usage_threshold(authed(req(1), &data_plane)).await.unwrap().into_inner();
        assert!(!again.recorded && again.event.is_none(), "{again:?}");
    }
    assert!(onb.record_usage_threshold(authed(req(2), &data_plane)).await.unwrap().into_inner().recorded);
    // Stored: a replay finds the two, once each.
    use tokio_stream::StreamExt;
    let watch = WatchEventsRequest { tenant_id: a.tenant_id.clone(), after_sequence: Some(0) };
    let mut stream = onb.watch_events(authed(watch, &a.token)).await.unwrap().into_inner();
    let mut found = 0;
    while let Ok(Some(Ok(e))) = tokio::time::timeout(std::time::Duration::from_millis(500), stream.next()).await {
        found += usize::from(e.event.unwrap().kind == EventKind::UsageThresholdReached as i32);
    }
    assert_eq!(found, 2);
    // An open stream would hold the shutdown for its grace period.
    drop(stream);
    mesh.shutdown().await;
}
