//! Usage alerts and hard monthly entitlements, read from the month's
//! metered usage by every data-service replica.
//!
//! - Each alert fires **once per period**: one `USAGE_THRESHOLD_REACHED`
//!   event and one accepted webhook delivery, however many replicas watch
//!   (three on the emulator: the mesh's and two more) and across a restart
//!   of the mesh, for a percentage and an absolute threshold alike; an
//!   alert already passed when it is set fires at once. The receiver is a
//!   real HTTP server here that checks each delivery's signature and
//!   answers 500 to the first, so each lands on its retry.
//! - A hard monthly `write_units` limit refuses the tenant's writes (reads
//!   go on, other tenants untouched) until the operator raises it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantmesh_proto::auth::v1::GetEntitlementsRequest;
use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::onboarding::v1::{EventKind, WatchEventsRequest};
use tenantmesh_proto::registry::v1::usage_alert::Threshold;
use tenantmesh_proto::registry::v1::{
    EntitlementOverride, SetEntitlementOverrideRequest, SetUsageAlertRequest, UsageAlert,
};
use tenantmesh_tenant_context::webhook;
use tenantmesh_test_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_types::StatusExt;

const SECRET: &str = "usage-alert-webhook-secret-0123";

/// What the receiver saw of one idempotency key.
#[derive(Debug, Default, Clone)]
struct Deliveries {
    /// Every POST with a valid signature.
    attempts: u32,
    /// Those answered 2xx.
    accepted: u32,
    body: serde_json::Value,
}

/// A webhook receiver on loopback: checks each POST's signature (a bad
/// one is counted apart and answered 400), answers 500 to the first
/// delivery of each idempotency key and 200 to the next ones.
struct Receiver {
    url: String,
    seen: Arc<Mutex<HashMap<String, Deliveries>>>,
    forged: Arc<Mutex<u32>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/usage", listener.local_addr().unwrap());
        let seen: Arc<Mutex<HashMap<String, Deliveries>>> = Default::default();
        let forged: Arc<Mutex<u32>> = Default::default();
        let (s, f) = (seen.clone(), forged.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (seen, forged) = (s.clone(), f.clone());
                tokio::spawn(async move {
                    let Some((headers, body)) = read_request(&mut conn).await else { return };
                    let header = |name: &str| headers.get(name).cloned().unwrap_or_default();
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                    let signed = webhook::verify(
                        SECRET.as_bytes(),
                        &header(webhook::SIGNATURE_HEADER),
                        &body,
                        now as i64,
                        Duration::from_secs(300),
                    );
                    let status = if !signed {
                        *forged.lock().unwrap() += 1;
                        400
                    } else {
                        let mut seen = seen.lock().unwrap();
                        let d = seen.entry(header(webhook::IDEMPOTENCY_HEADER)).or_default();
                        d.attempts += 1;
                        d.body = serde_json::from_slice(&body).unwrap_or_default();
                        if d.attempts == 1 {
                            500
                        } else {
                            d.accepted += 1;
                            200
                        }
                    };
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        Receiver { url, seen, forged }
    }

    fn seen(&self) -> HashMap<String, Deliveries> {
        self.seen.lock().unwrap().clone()
    }
}

/// One HTTP/1.1 request's headers (lower-cased names) and body.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<(HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

/// The tiers file of the tests, with `plan` as the standard tier's
/// `[tier.entitlements]` (after its keys: before the next tier).
fn tiers_with(dir: &std::path::Path, plan: &str) -> String {
    let tiers = std::fs::read_to_string(test_tiers_file()).unwrap();
    let standard = tiers.find("[[tier]]\nname = \"standard\"").unwrap();
    let next = tiers[standard + 1..].find("[[tier]]").map_or(tiers.len(), |i| standard + 1 + i);
    let tiers = format!("{}\n[tier.entitlements]\n{plan}\n\n{}", &tiers[..next], &tiers[next..]);
    let path = dir.join("tiers.toml");
    std::fs::write(&path, tiers).unwrap();
    path.display().to_string()
}

/// The lifecycle events of `kind` recorded for `tenant`.
async fn events_of(mesh: &TestMesh, admin: &str, tenant: &str, kind: EventKind) -> Vec<String> {
    use tokio_stream::StreamExt;
    let req = WatchEventsRequest { tenant_id: tenant.into(), after_sequence: Some(0) };
    let mut stream = mesh.onboarding().watch_events(authed(req, admin)).await.unwrap().into_inner();
    let mut found = Vec::new();
    // The stored events come first; the stream then waits for live ones.
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        let e = e.event.unwrap();
        if e.kind == kind as i32 {
            found.push(format!("{} {}", e.workflow_id, e.detail));
        }
    }
    found
}

fn alert(id: &str, meter: &str, threshold: Threshold) -> UsageAlert {
    UsageAlert { alert_id: id.into(), meter: meter.into(), threshold: Some(threshold), create_time: 0 }
}

/// Percentage and absolute thresholds, watched by three replicas (on the
/// emulator; one process on the embedded store), fire once each — across
/// a restart of the whole mesh too — and one set after it was passed
/// fires at once.
#[tokio::test]
async fn each_alert_fires_once_per_period_across_replicas_and_a_restart() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tiers = tiers_with(dir.path(), "write_units = { per_month = 40, hard = false }");
    let settings = [
        ("TENANTMESH_TIERS_FILE", tiers.as_str()),
        ("TENANTMESH_USAGE_CHECK_MS", "200"),
        ("TENANTMESH_METERING_FLUSH_MS", "300"),
        ("TENANTMESH_ALERT_WEBHOOK_URL", receiver.url.as_str()),
        ("TENANTMESH_ALERT_WEBHOOK_SECRET", SECRET),
    ];
    let mut mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let admin = mesh.admin_token().await;
    let acme = mesh.onboard(&unique_tenant("alerted")).await;

    // Two more data-service replicas on the emulator, each watching.
    let identity =
        [("TENANTMESH_SERVICE_CLIENT_ID", TEST_CLIENT_ID), ("TENANTMESH_SERVICE_CLIENT_SECRET", TEST_CLIENT_SECRET)];
    let mut replicas = Vec::new();
    if mesh.backend() == TestBackend::DynamoDb {
        for _ in 0..2 {
            replicas.push(mesh.spawn_replica("data", &identity).await);
        }
    }
    let set = |a: UsageAlert, token: &str| {
        authed(SetUsageAlertRequest { tenant_id: acme.tenant_id.clone(), alert: Some(a), clear: false }, token)
    };
    // Half the plan's 40 write units (20), and 10 requests; set by the
    // tenant's own admin and by the operator.
    mesh.registry()
        .set_usage_alert(set(alert("half", "write_units", Threshold::Percent(50)), &acme.token))
        .await
        .unwrap();
    mesh.registry()
        .set_usage_alert(set(alert("ten-calls", "requests", Threshold::Absolute(10)), &admin))
        .await
        .unwrap();

    // 24 one-unit writes, spread over every replica.
    let mut clients = vec![mesh.data()];
    clients.extend(replicas.iter().map(|r| DataClient::new(r.channel())));
    for i in 0..24 {
        let mut data = clients[i % clients.len()].clone();
        data.put_item(authed(put_v(&format!("item-{i}"), "v"), &acme.token)).await.unwrap();
    }
    let keys = eventually_some(Duration::from_secs(30), || {
        let seen = receiver.seen();
        async move { (seen.values().filter(|d| d.accepted > 0).count() == 2).then_some(seen) }
    })
    .await;
    let mut events = events_of(&mesh, &admin, &acme.tenant_id, EventKind::UsageThresholdReached).await;
    events.sort();
    assert_eq!(events.len(), 2, "one event per alert: {events:?}");
    let period = tenantmesh_service::alerts::period_name(tenantmesh_service::clock::now_secs());
    assert!(events[0].starts_with(&format!("half@{period} write_units reached 20 of 40")), "{events:?}");
    assert!(events[1].starts_with(&format!("ten-calls@{period} requests reached 10")), "{events:?}");
    let half = keys.iter().find(|(k, _)| k.contains("/half@")).map(|(_, d)| d.clone()).unwrap();
    assert_eq!(half.body["type"], "usage.threshold_reached");
    assert_eq!(
        (half.body["tenant_id"].as_str(), half.body["threshold"].as_u64()),
        (Some(acme.tenant_id.as_str()), Some(20))
    );
    assert_eq!(half.body["limit"].as_u64(), Some(40));

    // A restart of the whole mesh (and more writes past both thresholds):
    // nothing fires again.
    drop(replicas);
    mesh.restart().await;
    let mut replicas = Vec::new();
    if mesh.backend() == TestBackend::DynamoDb {
        replicas.push(mesh.spawn_replica("data", &identity).await);
    }
    for i in 24..30 {
        mesh.data().put_item(authed(put_v(&format!("item-{i}"), "v"), &acme.token)).await.unwrap();
    }
    // An alert set after its threshold was passed fires at once, once.
    mesh.registry().set_usage_alert(set(alert("late", "write_units", Threshold::Absolute(5)), &admin)).await.unwrap();
    eventually(Duration::from_secs(30), || {
        let seen = receiver.seen();
        async move { seen.values().filter(|d| d.accepted > 0).count() == 3 }
    })
    .await;
    // Rounds enough for any replica to (wrongly) fire again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = receiver.seen();
    for (key, d) in &seen {
        assert_eq!((d.attempts, d.accepted), (2, 1), "{key}: one refused delivery, then one accepted: {seen:?}");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(*receiver.forged.lock().unwrap(), 0, "every delivery was signed");
    let events = events_of(&mesh, &admin, &acme.tenant_id, EventKind::UsageThresholdReached).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().any(|e| e.starts_with(&format!("late@{period}"))), "{events:?}");
    drop(replicas);
}

/// A tier whose plan caps write units hard: the tenant's writes are
/// refused once the month's are used (RESOURCE_EXHAUSTED naming the
/// feature), its reads go on, a tenant of another tier writes on, and the
/// operator's override lifts it without a restart.
#[tokio::test]
async fn a_hard_monthly_write_limit_refuses_writes_until_raised() {
    let dir = tempfile::tempdir().unwrap();
    let tiers =
        tiers_with(dir.path(), "write_units = { per_month = 8, hard = true }\nrequests = { per_month = 1000000 }");
    let settings = [
        ("TENANTMESH_TIERS_FILE", tiers.as_str()),
        ("TENANTMESH_USAGE_CHECK_MS", "200"),
        ("TENANTMESH_METERING_FLUSH_MS", "300"),
    ];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let admin = mesh.admin_token().await;
    let capped = mesh.onboard(&unique_tenant("capped")).await;
    let other = mesh.onboard_on(&unique_tenant("uncapped"), "basic").await;

    // Writes until refused: at most one flush and one check past the cap.
    let mut written = 0;
    let refused = eventually_some(Duration::from_secs(30), || {
        written += 1;
        let (mut data, req) = (mesh.data(), authed(put_v(&format!("w-{written}"), "v"), &capped.token));
        async move {
            match data.put_item(req).await {
                Ok(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    None
                }
                Err(s) => Some(s),
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let details = refused.get_error_details();
    let info = details.error_info().cloned().unwrap();
    assert_eq!((info.reason.as_str(), info.metadata["feature"].as_str()), ("ENTITLEMENT_EXHAUSTED", "write_units"));
    assert_eq!(details.quota_failure().unwrap().violations[0].subject, format!("tenant:{}", capped.tenant_id));
    assert!(written >= 8, "refused before the plan's 8 write units were used: {written}");
    // Deletes too; reads go on; another tier's tenant writes on.
    let delete = tenantmesh_proto::data::v1::DeleteItemRequest {
        collection: "c".into(),
        id: "w-1".into(),
        expected_version: None,
    };
    expect_code(mesh.data().delete_item(authed(delete, &capped.token)).await, Code::ResourceExhausted);
    mesh.data()
        .get_item(authed(GetItemRequest { collection: "c".into(), id: "w-1".into() }, &capped.token))
        .await
        .unwrap();
    mesh.data().put_item(authed(put_v("free", "v"), &other.token)).await.unwrap();

    // What the tenant's application is told.
    let listed = GetEntitlementsRequest { tenant_id: capped.tenant_id.clone() };
    let listed = mesh.auth().get_entitlements(authed(listed, &capped.token)).await.unwrap().into_inner().entitlements;
    let writes = listed.iter().find(|e| e.feature == "write_units").unwrap();
    assert_eq!((writes.limit, writes.hard, writes.reset_period.as_str()), (Some(8), true, "month"), "{writes:?}");
    assert!(!writes.granted && writes.used >= Some(8), "this month's use, read from Metering: {writes:?}");
    let requests = listed.iter().find(|e| e.feature == "requests").unwrap();
    assert_eq!((requests.limit, requests.hard), (Some(1_000_000), false), "{requests:?}");

    // The operator raises it: writes are served again within a round.
    let raise = SetEntitlementOverrideRequest {
        tenant_id: capped.tenant_id.clone(),
        r#override: Some(EntitlementOverride {
            feature: "write_units".into(),
            granted: None,
            limit: Some(1000),
            hard: None,
        }),
        clear: false,
    };
    mesh.registry().set_entitlement_override(authed(raise, &admin)).await.unwrap();
    eventually(Duration::from_secs(15), || {
        let (mut data, req) = (mesh.data(), authed(put_v("after", "v"), &capped.token));
        async move { data.put_item(req).await.is_ok() }
    })
    .await;
}
