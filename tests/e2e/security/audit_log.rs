//! The audit logs of auth and onboarding (the registry's has its contract
//! suite): users created, disabled and deleted, sessions ended, signing
//! keys rotated, and who started each workflow, each with one event written with the change;
//! refused and failed attempts recorded; every chain holds; no event holds
//! a password or a token.

use std::time::Duration;

use tenantmesh_proto::audit::v1::audit_client::AuditClient;
use tenantmesh_proto::audit::v1::*;
use tenantmesh_proto::auth::v1::{
    CreateUserRequest, DeleteUserRequest, DisableUserRequest, LoginRequest, RevokeRequest, Role,
    RotateSigningKeyRequest,
};
use tenantmesh_proto::onboarding::v1::{ChangeTierRequest, RestoreTarget, RestoreTenantRequest, WorkflowStatus};
use tenantmesh_test_support::*;
use tonic::Code;

async fn events(addr: std::net::SocketAddr, tenant: &str, token: &str) -> Vec<AuditEvent> {
    let req = ListAuditEventsRequest { tenant_id: tenant.into(), page_size: 1000, ..Default::default() };
    AuditClient::new(TestMesh::channel(addr)).list_audit_events(authed(req, token)).await.unwrap().into_inner().events
}

fn of<'a>(events: &'a [AuditEvent], action: &str, outcome: Outcome) -> Vec<&'a AuditEvent> {
    events.iter().filter(|e| e.action == action && e.outcome() == outcome).collect()
}

#[tokio::test]
async fn users_keys_and_workflows_have_one_event_where_they_change() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("audit-log")).await;
    let (auth, onboarding) = (mesh.addrs.auth, mesh.addrs.onboarding);

    // Users: created by onboarding (its admin), then by the tenant's admin.
    let password = "audited-user-password-1";
    let email = format!("someone@{}.example", t.tenant_id);
    let create = || CreateUserRequest {
        tenant_id: t.tenant_id.clone(),
        email: email.clone(),
        password: password.into(),
        roles: vec![Role::TenantUser as i32],
        ..Default::default()
    };
    mesh.auth().create_user(authed(create(), &t.token)).await.unwrap();
    expect_code(mesh.auth().create_user(authed(create(), &t.token)).await, Code::AlreadyExists);
    // The user signs in and out: the session's end is recorded once.
    let login = LoginRequest { tenant_id: t.tenant_id.clone(), email: email.clone(), password: password.into() };
    let session = mesh.auth().login(login).await.unwrap().into_inner();
    for _ in 0..2 {
        let revoke = RevokeRequest { refresh_token: session.refresh_token.clone() };
        mesh.auth().revoke(revoke).await.unwrap();
    }
    let disable = DisableUserRequest { tenant_id: t.tenant_id.clone(), email: email.clone() };
    mesh.auth().disable_user(authed(disable, &t.token)).await.unwrap();
    let delete = DeleteUserRequest { tenant_id: t.tenant_id.clone(), email: email.clone() };
    mesh.auth().delete_user(authed(delete, &t.token)).await.unwrap();
    // A tenant admin may not rotate the platform's keys: refused by the policy.
    expect_code(
        mesh.auth().rotate_signing_key(authed(RotateSigningKeyRequest {}, &t.token)).await,
        Code::PermissionDenied,
    );
    let rotated =
        mesh.auth().rotate_signing_key(authed(RotateSigningKeyRequest {}, &admin)).await.unwrap().into_inner();

    let users = events(auth, &t.tenant_id, &t.token).await;
    let created = of(&users, "user.create", Outcome::Succeeded);
    assert_eq!(created.len(), 2, "its admin (by onboarding) and the user: {users:#?}");
    assert_eq!(created[0].actor.as_ref().unwrap().subject, "service:onboarding");
    assert_eq!(created[1].target, format!("user/{email}"));
    assert!(created[1].after.contains("roles tenant_user, enabled"), "{:?}", created[1]);
    assert_eq!(of(&users, "user.create", Outcome::Failed).len(), 1, "the duplicate, failed");
    let disabled = of(&users, "user.disable", Outcome::Succeeded);
    assert!(disabled.len() == 1 && disabled[0].before.ends_with("enabled") && disabled[0].after.ends_with("disabled"));
    assert_eq!(of(&users, "user.delete", Outcome::Succeeded).len(), 1);
    let ended = of(&users, "session.revoke", Outcome::Succeeded);
    assert_eq!(ended.len(), 1, "revoked twice, one change: {users:#?}");
    assert_eq!(
        (ended[0].after.as_str(), ended[0].target.as_str()),
        ("signed out: the session was revoked", created[1].target.as_str())
    );
    assert!(users.iter().all(|e| e.service == "auth"), "{users:#?}");
    let denied = eventually_some(Duration::from_secs(10), || async {
        let users = events(auth, &t.tenant_id, &t.token).await;
        of(&users, "key.rotate", Outcome::Denied).first().map(|e| (*e).clone())
    })
    .await;
    assert_eq!(denied.actor.unwrap().tenant_id, t.tenant_id);
    let keys = events(auth, "platform", &admin).await;
    let rotation = keys.iter().rev().find(|e| e.action == "key.rotate" && e.outcome() == Outcome::Succeeded).unwrap();
    assert!(rotation.after.starts_with(&format!("kid {}", rotated.kid)), "{rotation:?}");

    // A tenant's admin refused at another tenant: recorded on their own
    // tenant's chain, never on the other's (neither learns of the other).
    let other = mesh.onboard(&unique_tenant("audit-other")).await;
    let intrude = CreateUserRequest { tenant_id: other.tenant_id.clone(), ..create() };
    expect_code(mesh.auth().create_user(authed(intrude, &t.token)).await, Code::PermissionDenied);
    let own = events(auth, &t.tenant_id, &t.token).await;
    let refused = of(&own, "user.create", Outcome::Denied);
    assert_eq!(refused.len(), 1, "{own:#?}");
    let theirs = events(auth, &other.tenant_id, &other.token).await;
    assert!(theirs.iter().all(|e| e.actor.as_ref().unwrap().tenant_id != t.tenant_id), "{theirs:#?}");

    // Workflows: who started each, in onboarding's log, with the workflow.
    let req = ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "premium".into() };
    let id = mesh.onboarding().change_tier(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
    assert_eq!(mesh.wait_workflow(&id).await.status(), WorkflowStatus::Succeeded);
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let restore = RestoreTenantRequest {
        tenant_id: t.tenant_id.clone(),
        point_in_time: Some(prost_types::Timestamp { seconds: at.as_secs() as i64 - 1, nanos: 0 }),
        target: RestoreTarget::Export as i32,
    };
    let id = mesh.onboarding().restore_tenant(authed(restore, &admin)).await.unwrap().into_inner().workflow_id;
    mesh.wait_workflow(&id).await;
    // The same tier again: refused, and recorded as failed.
    let again = ChangeTierRequest { tenant_id: t.tenant_id.clone(), tier: "premium".into() };
    expect_code(mesh.onboarding().change_tier(authed(again, &admin)).await, Code::FailedPrecondition);
    let workflows = events(onboarding, &t.tenant_id, &t.token).await;
    let actions: Vec<(&str, Outcome)> = workflows.iter().map(|e| (e.action.as_str(), e.outcome())).collect();
    assert_eq!(
        actions,
        [
            ("tenant.onboard", Outcome::Succeeded),
            ("tenant.change_tier", Outcome::Succeeded),
            ("tenant.restore", Outcome::Succeeded),
            ("tenant.change_tier", Outcome::Failed),
        ]
    );
    assert_eq!((workflows[1].before.as_str(), workflows[1].after.as_str()), ("tier standard", "tier premium"));
    assert!(workflows[2].after.contains("into an export"), "{:?}", workflows[2]);
    assert!(workflows.iter().take(3).all(|e| e.target.starts_with(&format!("workflow/{}/", t.tenant_id))));
    assert!(workflows.iter().all(|e| e.actor.as_ref().unwrap().roles == ["platform_admin"]));

    // A backup of the registry's store: recorded on its platform chain, by
    // the operator (refused on DynamoDB, whose PITR backs it: recorded so).
    let mut backup =
        tenantmesh_proto::backup::v1::backup_client::BackupClient::new(TestMesh::channel(mesh.addrs.registry));
    let taken = match backup.take_backup(authed(tenantmesh_proto::backup::v1::TakeBackupRequest {}, &admin)).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            while stream.message().await.unwrap().is_some() {}
            Outcome::Succeeded
        }
        Err(s) => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            Outcome::Failed
        }
    };
    let platform = events(mesh.addrs.registry, "platform", &admin).await;
    let recorded = platform.iter().rev().find(|e| e.action == "backup.take").expect("the backup is recorded");
    assert_eq!(recorded.outcome(), taken, "{recorded:?}");
    assert_eq!(recorded.actor.as_ref().unwrap().roles, ["platform_admin"]);
    if taken == Outcome::Succeeded {
        assert!(recorded.after.contains(" files, ") && recorded.after.ends_with(" bytes"), "{recorded:?}");
    }

    // Every chain holds; no event holds a secret.
    for addr in [mesh.addrs.registry, auth, onboarding] {
        for (tenant, token) in [(&t.tenant_id, &t.token), (&"platform".to_owned(), &admin)] {
            let req = VerifyAuditChainRequest { tenant_id: tenant.clone() };
            let v = AuditClient::new(TestMesh::channel(addr)).verify_audit_chain(authed(req, token)).await.unwrap();
            assert!(v.get_ref().intact, "{addr} {tenant}: {:?}", v.get_ref());
            for e in events(addr, tenant, token).await {
                let text = format!("{e:?}");
                for secret in [
                    password,
                    t.admin_password.as_str(),
                    ADMIN_PASSWORD,
                    t.token.as_str(),
                    admin.as_str(),
                    session.refresh_token.as_str(),
                    session.access_token.as_str(),
                ] {
                    assert!(!text.contains(secret), "an event holds a secret: {text}");
                }
            }
        }
    }
}

/// A tier with `audit_retention_days = 0`: every log purges its tenants'
/// events (each purge an event of its own, by the service), the chains
/// still verify, and a tier that keeps them keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_the_tiers_retention_are_purged_and_the_purge_recorded() {
    let tiers = std::fs::read_to_string(test_tiers_file()).unwrap();
    let standard = tiers.find("name = \"standard\"").unwrap();
    let at = standard + tiers[standard..].find("history_days = 7").unwrap();
    let tiers = format!("{}audit_retention_days = 0\n{}", &tiers[..at], &tiers[at..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiers.toml");
    std::fs::write(&path, tiers).unwrap();
    let settings = [("TENANTMESH_TIERS_FILE", path.to_str().unwrap()), ("TENANTMESH_AUDIT_SWEEP_MS", "200")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let admin = mesh.admin_token().await;
    let gone = mesh.onboard_on(&unique_tenant("audit-gone"), "standard").await;
    let kept = mesh.onboard_on(&unique_tenant("audit-kept"), "basic").await;
    for addr in [mesh.addrs.registry, mesh.addrs.auth, mesh.addrs.onboarding] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let purged = loop {
            let events = events(addr, &gone.tenant_id, &admin).await;
            if events.iter().all(|e| e.action == "audit.purge") {
                break events;
            }
            let actions: Vec<(u64, &str)> = events.iter().map(|e| (e.sequence, e.action.as_str())).collect();
            assert!(tokio::time::Instant::now() < deadline, "{addr}: never purged: {actions:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let purge = &purged[0];
        assert!(purge.before.starts_with("events ") && purge.after == "removed: older than 0 days", "{purge:?}");
        assert!(purge.actor.as_ref().unwrap().subject.starts_with("service:"), "{purge:?}");
        let req = VerifyAuditChainRequest { tenant_id: gone.tenant_id.clone() };
        let v = AuditClient::new(TestMesh::channel(addr)).verify_audit_chain(authed(req, &admin)).await.unwrap();
        assert!(v.get_ref().intact, "{addr}: {:?}", v.get_ref());
        let theirs = events(addr, &kept.tenant_id, &admin).await;
        assert!(!theirs.is_empty() && theirs.iter().all(|e| e.action != "audit.purge"), "{addr}: {theirs:#?}");
        assert_eq!(theirs[0].sequence, 1, "{addr}: nothing of a basic tenant's purged");
    }
}
