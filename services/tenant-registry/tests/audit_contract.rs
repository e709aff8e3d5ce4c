//! Contract tests of `tenantmesh.audit.v1.Audit` as the registry serves it:
//! every change to a tenant's record has exactly one event, with who did
//! it, before and after; refused and failed attempts have one too; the
//! chain holds; tenant admins read only their own tenant's.

use tenantmesh_proto::audit::v1::audit_client::AuditClient;
use tenantmesh_proto::audit::v1::*;
use tenantmesh_proto::registry::v1::*;
use tenantmesh_test_support::*;
use tonic::Code;

fn list(tenant: &str) -> ListAuditEventsRequest {
    ListAuditEventsRequest { tenant_id: tenant.into(), ..Default::default() }
}

/// Every RPC of the registry's audit service has a test here.
#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers(include_str!("audit_contract.rs"), &["tenantmesh.audit.v1.Audit"]);
}

#[tokio::test]
async fn every_change_has_one_event_and_the_chain_holds() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    let mut audit = AuditClient::new(TestMesh::channel(mesh.addrs.registry));
    let id = unique_tenant("audited");

    let create = CreateTenantRequest {
        tenant_id: id.clone(),
        name: "Audited".into(),
        tier: "basic".into(),
        ..Default::default()
    };
    reg.create_tenant(authed(create, &admin)).await.unwrap();
    let update = |name: &str, expected| UpdateTenantRequest {
        tenant_id: id.clone(),
        name: name.into(),
        tier: String::new(),
        expected_version: expected,
    };
    reg.update_tenant(authed(update("Renamed", Some(1)), &admin)).await.unwrap();
    // A version that moved on: refused, and recorded as failed.
    expect_code(reg.update_tenant(authed(update("Stale", Some(1)), &admin)).await, Code::Aborted);
    let status = SetTenantStatusRequest { tenant_id: id.clone(), status: TenantStatus::Active as i32 };
    reg.set_tenant_status(authed(status, &admin)).await.unwrap();
    let limits = TenantLimits { requests_per_second: 5, burst: 10, max_concurrency: 2, storage_quota_bytes: 1 << 20 };
    let set = SetTenantLimitsRequest { tenant_id: id.clone(), limits: Some(limits) };
    let mut set = authed(set, &admin);
    set.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    set.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    let t = reg.set_tenant_limits(set).await.unwrap().into_inner().tenant.unwrap();
    assert_eq!(t.version, 4, "four committed changes");

    let events = audit.list_audit_events(authed(list(&id), &admin)).await.unwrap().into_inner().events;
    let seen: Vec<(u64, &str, Outcome)> = events.iter().map(|e| (e.sequence, e.action.as_str(), e.outcome())).collect();
    assert_eq!(
        seen,
        [
            (1, "tenant.register", Outcome::Succeeded),
            (2, "tenant.update", Outcome::Succeeded),
            (3, "tenant.update", Outcome::Failed),
            (4, "tenant.status", Outcome::Succeeded),
            (5, "tenant.limits", Outcome::Succeeded),
        ]
    );
    let committed = events.iter().filter(|e| e.outcome() == Outcome::Succeeded).count() as u64;
    assert_eq!(committed, t.version, "exactly one event per committed change");
    for e in &events {
        let actor = e.actor.as_ref().unwrap();
        assert_eq!(
            (actor.tenant_id.as_str(), actor.roles.as_slice()),
            ("platform", &["platform_admin".to_owned()][..])
        );
        assert!(!actor.subject.is_empty() && !e.id.is_empty() && e.time_us > 0 && !e.source.is_empty(), "{e:?}");
        assert_eq!(e.target, format!("tenant/{id}"));
    }
    assert_eq!(
        (events[1].before.as_str(), events[1].after.as_str()),
        ("name \"Audited\", tier basic", "name \"Renamed\", tier basic")
    );
    assert!(events[2].error.starts_with("Aborted: version mismatch"), "{:?}", events[2].error);
    assert_eq!((events[3].before.as_str(), events[3].after.as_str()), ("status PROVISIONING", "status ACTIVE"));
    assert_eq!(events[4].after, "5 requests/s, burst 10, 2 in flight, 1048576 bytes stored");
    assert_eq!((events[4].request_id.as_str(), events[4].trace_id.as_str()), ("req-42", trace), "{:?}", events[4]);
    assert_eq!(events[1].prev_hash, events[0].hash);
    let verified = audit.verify_audit_chain(authed(VerifyAuditChainRequest { tenant_id: id.clone() }, &admin)).await;
    let verified = verified.unwrap().into_inner();
    assert!(verified.intact && verified.events == 5 && verified.first_broken == 0, "{verified:?}");

    // The export: one JSON line per event, as listed.
    let export = ExportAuditEventsRequest { tenant_id: id.clone(), from_us: 0, to_us: 0 };
    let mut chunks = audit.export_audit_events(authed(export, &admin)).await.unwrap().into_inner();
    let mut lines = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        let text = String::from_utf8(chunk.jsonl).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "whole lines: {text:?}");
        lines.extend(text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
    }
    let exported: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["action"].as_str().unwrap(), l["hash"].as_str().unwrap())).collect();
    let listed: Vec<(&str, &str)> = events.iter().map(|e| (e.action.as_str(), e.hash.as_str())).collect();
    assert_eq!(exported, listed);
    assert_eq!((lines[2]["outcome"].as_str(), lines[0]["service"].as_str()), (Some("failed"), Some("registry")));
    let backwards = ExportAuditEventsRequest { tenant_id: id.clone(), from_us: 10, to_us: 5 };
    expect_invalid(audit.export_audit_events(authed(backwards, &admin)).await, "to_us");

    // Filters and pages.
    let only = ListAuditEventsRequest { action: "tenant.update".into(), ..list(&id) };
    let updates = audit.list_audit_events(authed(only, &admin)).await.unwrap().into_inner().events;
    assert_eq!(updates.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2, 3]);
    let from = ListAuditEventsRequest { from_us: events[3].time_us, ..list(&id) };
    let late = audit.list_audit_events(authed(from, &admin)).await.unwrap().into_inner().events;
    assert_eq!(late.first().map(|e| e.sequence), Some(4));
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let req = ListAuditEventsRequest { page_size: 2, page_token: token.clone(), ..list(&id) };
        let page = audit.list_audit_events(authed(req, &admin)).await.unwrap().into_inner();
        pages.push(page.events.iter().map(|e| e.sequence).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.concat(), [1, 2, 3, 4, 5]);
    let tail = ListAuditEventsRequest { last: 2, page_token: "ignored".into(), ..list(&id) };
    let tail = audit.list_audit_events(authed(tail, &admin)).await;
    let tail: Vec<u64> = tail.unwrap().into_inner().events.iter().map(|e| e.sequence).collect();
    assert_eq!(tail, [4, 5], "the last two, oldest first");
    let too_many = ListAuditEventsRequest { last: 101, ..list(&id) };
    expect_invalid(audit.list_audit_events(authed(too_many, &admin)).await, "last");

    // Bad input names its field.
    expect_invalid(audit.list_audit_events(authed(list("Not A Tenant"), &admin)).await, "tenant_id");
    let big = ListAuditEventsRequest { page_size: 5000, ..list(&id) };
    expect_invalid(audit.list_audit_events(authed(big, &admin)).await, "page_size");
    let backwards = ListAuditEventsRequest { from_us: 10, to_us: 5, ..list(&id) };
    expect_invalid(audit.list_audit_events(authed(backwards, &admin)).await, "to_us");
    let garbage = ListAuditEventsRequest { page_token: "garbage".into(), ..list(&id) };
    expect_invalid(audit.list_audit_events(authed(garbage, &admin)).await, "page_token");
    expect_invalid(
        audit.verify_audit_chain(authed(VerifyAuditChainRequest { tenant_id: "x".into() }, &admin)).await,
        "tenant_id",
    );
}

/// A tenant admin reads their own tenant's events (the onboarding
/// workflow's changes, by its service identity) and never another's; a
/// refused attempt at a change is recorded on the caller's chain; no
/// event holds a password or token the test used.
#[tokio::test]
async fn tenant_admins_read_their_own_and_refusals_are_recorded() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let (a, b) = (mesh.onboard(&unique_tenant("audit-a")).await, mesh.onboard(&unique_tenant("audit-b")).await);
    let mut audit = AuditClient::new(TestMesh::channel(mesh.addrs.registry));

    let own = audit.list_audit_events(authed(list(&a.tenant_id), &a.token)).await.unwrap().into_inner().events;
    let actions: Vec<&str> = own.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.first(), Some(&"tenant.register"), "{actions:?}");
    assert!(actions.contains(&"tenant.status"), "onboarding activates it: {actions:?}");
    assert!(own.iter().all(|e| e.actor.as_ref().unwrap().subject == "service:onboarding"), "{own:?}");
    expect_code(audit.list_audit_events(authed(list(&b.tenant_id), &a.token)).await, Code::PermissionDenied);
    let theirs = ExportAuditEventsRequest { tenant_id: b.tenant_id.clone(), from_us: 0, to_us: 0 };
    expect_code(audit.export_audit_events(authed(theirs, &a.token)).await, Code::PermissionDenied);
    expect_code(
        audit.verify_audit_chain(authed(VerifyAuditChainRequest { tenant_id: b.tenant_id.clone() }, &a.token)).await,
        Code::PermissionDenied,
    );
    let user = mesh.user_token(&a, &[tenantmesh_proto::auth::v1::Role::TenantUser]).await;
    expect_code(audit.list_audit_events(authed(list(&a.tenant_id), &user)).await, Code::PermissionDenied);

    // A tenant admin may not suspend a tenant: refused by the policy, and
    // recorded as denied on their own tenant's chain.
    let suspend = SetTenantStatusRequest { tenant_id: b.tenant_id.clone(), status: TenantStatus::Suspended as i32 };
    expect_code(mesh.registry().set_tenant_status(authed(suspend, &a.token)).await, Code::PermissionDenied);
    let denied = eventually_some(std::time::Duration::from_secs(10), || {
        let mut audit = audit.clone();
        let req = authed(ListAuditEventsRequest { action: "tenant.status".into(), ..list(&a.tenant_id) }, &a.token);
        async move {
            let events = audit.list_audit_events(req).await.ok()?.into_inner().events;
            events.into_iter().find(|e| e.outcome() == Outcome::Denied)
        }
    })
    .await;
    assert!(denied.error.starts_with("PermissionDenied"), "{denied:?}");
    assert_eq!(denied.actor.as_ref().unwrap().tenant_id, a.tenant_id);
    let b_events = audit.list_audit_events(authed(list(&b.tenant_id), &admin)).await.unwrap().into_inner().events;
    assert!(b_events.iter().all(|e| e.outcome() == Outcome::Succeeded), "b's record was not touched: {b_events:?}");
    assert!(
        audit
            .verify_audit_chain(authed(VerifyAuditChainRequest { tenant_id: a.tenant_id.clone() }, &a.token))
            .await
            .unwrap()
            .into_inner()
            .intact
    );

    // No secret in any field of any event.
    let secrets =
        [a.token.as_str(), b.token.as_str(), admin.as_str(), &a.admin_password, &b.admin_password, ADMIN_PASSWORD];
    for tenant in [&a.tenant_id, &b.tenant_id, &"platform".to_owned()] {
        let events = audit.list_audit_events(authed(list(tenant), &admin)).await.unwrap().into_inner().events;
        for e in events {
            let text = format!("{e:?}");
            for secret in secrets {
                assert!(!text.contains(secret), "an audit event of {tenant} holds a secret: {text}");
            }
        }
    }
}
