//! Every step of every workflow failing, both ways, through the real mesh:
//! a retryable error is retried with backoff and the workflow goes on; one
//! that is not is a FAILED workflow at once (a tier change before its
//! switch: ROLLED_BACK, the tenant as it was), and a retry once the cause is
//! gone finishes it. Faults fire on the first attempts of each step in the
//! onboarding process (`TENANTMESH_FAULTS`), so an onboarding (silo), a
//! tier change silo -> pool and an offboarding meet all 17 steps.

use tenantmesh_onboarding::workflow::Step;
use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, Tenant, TenantStatus};
use tenantmesh_test_support::*;
use tonic::Code;

/// `<kind>:<step>:<n>` for every step there is.
fn every_step(kind: &str, n: u32) -> String {
    Step::ALL.iter().map(|s| format!("{kind}:{s}:{n}")).collect::<Vec<_>>().join(";")
}

async fn tenant(mesh: &TestMesh, id: &str) -> Tenant {
    let req = authed(GetTenantRequest { tenant_id: id.into() }, &mesh.admin_token().await);
    mesh.registry().get_tenant(req).await.unwrap().into_inner().tenant.unwrap()
}

fn register(id: &str) -> RegisterTenantRequest {
    RegisterTenantRequest {
        tenant_id: id.into(),
        name: "Faulty".into(),
        tier: "enterprise".into(),
        admin_email: "admin@faulty.example".into(),
        admin_password: "faulty-password".into(),
        idempotency_key: id.into(),
    }
}

/// The steps (by name) a workflow ran, with their attempts.
fn attempts(wf: &Workflow) -> Vec<(String, u32)> {
    wf.steps.iter().map(|s| (s.name.clone(), s.attempts)).collect()
}

/// Each step fails twice with a retryable error: every workflow still
/// succeeds, each step that met its fault with three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_of_every_step_are_retried() {
    let faults = every_step("fail", 2);
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_FAULTS", &faults)]).await;
    let admin = mesh.admin_token().await;
    let id = unique_tenant("flaky");
    mesh.onboarding().register_tenant(authed(register(&id), &admin)).await.unwrap();
    let wf = mesh.wait_workflow(&format!("{id}/onboard")).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert!(wf.steps.iter().all(|s| s.attempts == 3), "{:?}", attempts(&wf));
    let token = mesh.login(&id, "admin@faulty.example", "faulty-password").await.unwrap();
    mesh.data().put_item(authed(put_v("kept", "kept"), &token)).await.unwrap();

    let change = authed(ChangeTierRequest { tenant_id: id.clone(), tier: "standard".into() }, &admin);
    let started = mesh.onboarding().change_tier(change).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    for s in &wf.steps {
        // Steps met first here; the others already spent their faults.
        let fresh = !["provision_storage", "apply_limits"].contains(&s.name.as_str());
        assert_eq!(s.attempts, if fresh { 3 } else { 1 }, "{:?}", attempts(&wf));
    }
    let get = GetItemRequest { collection: "c".into(), id: "kept".into() };
    mesh.data().get_item(authed(get, &token)).await.unwrap();

    let offboard = authed(OffboardTenantRequest { tenant_id: id.clone() }, &admin);
    let started = mesh.onboarding().offboard_tenant(offboard).await.unwrap().into_inner();
    let wf = mesh.wait_workflow(&started.workflow_id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert!(wf.steps.iter().all(|s| s.attempts == 3), "{:?}", attempts(&wf));
    assert_eq!(std::fs::read_to_string(&wf.export_path).unwrap().lines().count(), 1);
    mesh.shutdown().await;
}

/// Waits for workflow `id` to stop, and checks it stopped at `step` at
/// once (one attempt) with `status`.
async fn stops_at(mesh: &TestMesh, id: &str, step: &str, status: WorkflowStatus) -> Workflow {
    let wf = mesh.wait_workflow(id).await;
    assert_eq!(wf.status, status as i32, "expected {status:?} at {step}: {wf:?}");
    assert!(wf.error.starts_with(&format!("{step}: injected permanent fault")), "{}", wf.error);
    let failed = wf.steps.iter().find(|s| s.name == step).unwrap();
    assert_eq!((failed.state, failed.attempts), (StepState::Failed as i32, 1), "not retried: {:?}", attempts(&wf));
    wf
}

/// Each step fails once with an error that is not retried: the workflow is
/// FAILED at once at that step, and RetryOnboarding takes it to the next;
/// a tier change that fails before its switch is ROLLED_BACK (the tenant
/// ACTIVE on its silo with its items) and a new change is asked for; an
/// offboarding that fails leaves the tenant SUSPENDED with its items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_of_every_step_stop_at_once_and_retries_finish() {
    let faults = every_step("fail-permanent", 1);
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_FAULTS", &faults)]).await;
    let admin = mesh.admin_token().await;
    let retry = |id: &str| authed(RetryOnboardingRequest { workflow_id: id.into() }, &admin);
    let id = unique_tenant("broken");

    mesh.onboarding().register_tenant(authed(register(&id), &admin)).await.unwrap();
    let onboard = format!("{id}/onboard");
    for step in [
        "create_tenant",
        "provision_compute",
        "provision_storage",
        "create_admin_user",
        "apply_limits",
        "activate_tenant",
    ] {
        stops_at(&mesh, &onboard, step, WorkflowStatus::Failed).await;
        mesh.onboarding().retry_onboarding(retry(&onboard)).await.unwrap();
    }
    assert_eq!(mesh.wait_workflow(&onboard).await.status, WorkflowStatus::Succeeded as i32);
    let token = mesh.login(&id, "admin@faulty.example", "faulty-password").await.unwrap();
    mesh.data().put_item(authed(put_v("kept", "kept"), &token)).await.unwrap();
    let silo = tenant(&mesh, &id).await;

    // Before the switch: rolled back, each time, to the silo as it was.
    let change = || authed(ChangeTierRequest { tenant_id: id.clone(), tier: "standard".into() }, &admin);
    for step in ["pause_writes", "copy_items", "switch_placement"] {
        let started = mesh.onboarding().change_tier(change()).await.unwrap().into_inner();
        stops_at(&mesh, &started.workflow_id, step, WorkflowStatus::RolledBack).await;
        let now = tenant(&mesh, &id).await;
        assert_eq!((now.status, &now.tier, &now.placement), (TenantStatus::Active as i32, &silo.tier, &silo.placement));
        let get = GetItemRequest { collection: "c".into(), id: "kept".into() };
        mesh.data().get_item(authed(get, &token)).await.unwrap();
    }
    // After it: FAILED on the new placement, retried to the end.
    let started = mesh.onboarding().change_tier(change()).await.unwrap().into_inner();
    for step in ["drain", "remove_old_copy"] {
        stops_at(&mesh, &started.workflow_id, step, WorkflowStatus::Failed).await;
        let now = tenant(&mesh, &id).await;
        assert_eq!(
            (now.status, now.placement.unwrap().model),
            (TenantStatus::Active as i32, IsolationModel::Pool as i32)
        );
        mesh.onboarding().retry_onboarding(retry(&started.workflow_id)).await.unwrap();
    }
    assert_eq!(mesh.wait_workflow(&started.workflow_id).await.status, WorkflowStatus::Succeeded as i32);

    let offboard = format!("{id}/offboard");
    mesh.onboarding().offboard_tenant(authed(OffboardTenantRequest { tenant_id: id.clone() }, &admin)).await.unwrap();
    for step in ["suspend_tenant", "export_items", "delete_items", "delete_resources", "delete_users", "mark_deleted"] {
        stops_at(&mesh, &offboard, step, WorkflowStatus::Failed).await;
        if step == "export_items" {
            // Suspended, nothing deleted yet.
            assert_eq!(tenant(&mesh, &id).await.status, TenantStatus::Suspended as i32);
            let table = tenant(&mesh, &id).await.placement.unwrap().table;
            let stored = exported_items(&mut mesh.data_admin(), &mesh.service_token().await, &id, &table).await;
            assert_eq!(stored.unwrap(), 1, "the tenant's items are intact");
        }
        mesh.onboarding().retry_onboarding(retry(&offboard)).await.unwrap();
    }
    let wf = mesh.wait_workflow(&offboard).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert_eq!(tenant(&mesh, &id).await.status, TenantStatus::Deleted as i32);
    expect_code(mesh.login(&id, "admin@faulty.example", "faulty-password").await, Code::Unauthenticated);
    mesh.shutdown().await;
}
