//! Metering through the real mesh: every data call counted exactly for its
//! tenant (pool and silo alike, over one data-service process or, on
//! DynamoDB, two sharing the usage table), nothing lost on a graceful
//! stop, application events counted once by id, usage and cost readable
//! only by the tenant's own admin or the platform, exports a billing
//! pipeline can read, and the cost report.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::{DeleteItemRequest, GetItemRequest, PutItemRequest, QueryItemsRequest};
use tenantmesh_proto::metering::v1::*;
use tenantmesh_test_support::*;
use tonic::Code;
use tonic::transport::Channel;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// What a client expects to be counted, from the answers it got.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Expected {
    requests: BTreeMap<&'static str, i64>,
    read_units: i64,
    write_units: i64,
    bytes_returned: i64,
}

fn read_units(size: usize) -> i64 {
    size.div_ceil(4096).max(1) as i64
}

fn write_units(size: usize) -> i64 {
    size.div_ceil(1024).max(1) as i64
}

/// An item of about `bytes` bytes.
fn sized(id: &str, bytes: usize) -> PutItemRequest {
    PutItemRequest { collection: "m".into(), ..put_v(id, &"x".repeat(bytes)) }
}

/// A mix of calls of known sizes (writes of 1 B to 9 KB, reads, a query,
/// deletes, and a refused read), spread over `clients`.
async fn work(clients: &[DataClient<Channel>], token: &str, prefix: &str) -> Expected {
    let mut e = Expected::default();
    let sizes = [1usize, 900, 1500, 5000, 9000];
    for (i, size) in sizes.iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let id = format!("{prefix}-{i}");
        let r = c.put_item(authed(sized(&id, *size), token)).await.unwrap().into_inner();
        *e.requests.entry("PutItem").or_default() += 1;
        e.write_units += write_units(r.item.as_ref().unwrap().encoded_len());
        e.bytes_returned += r.encoded_len() as i64;
        let g = c
            .get_item(authed(GetItemRequest { collection: "m".into(), id: id.clone() }, token))
            .await
            .unwrap()
            .into_inner();
        *e.requests.entry("GetItem").or_default() += 1;
        e.read_units += read_units(g.item.as_ref().unwrap().encoded_len());
        e.bytes_returned += g.encoded_len() as i64;
    }
    let mut c = clients[clients.len() - 1].clone();
    let q = QueryItemsRequest { collection: "m".into(), id_prefix: prefix.into(), ..Default::default() };
    let q = c.query_items(authed(q, token)).await.unwrap().into_inner();
    assert_eq!(q.items.len(), sizes.len());
    *e.requests.entry("QueryItems").or_default() += 1;
    e.read_units += q.items.iter().map(|i| read_units(i.encoded_len())).sum::<i64>();
    e.bytes_returned += q.encoded_len() as i64;
    for i in 0..2 {
        let d = DeleteItemRequest { collection: "m".into(), id: format!("{prefix}-{i}"), expected_version: None };
        clients[i % clients.len()].clone().delete_item(authed(d, token)).await.unwrap();
        *e.requests.entry("DeleteItem").or_default() += 1;
        e.write_units += 1;
    }
    // A refused call is a request, with no units.
    let missing = GetItemRequest { collection: "m".into(), id: format!("{prefix}-0") };
    assert_eq!(c.get_item(authed(missing, token)).await.unwrap_err().code(), Code::NotFound);
    *e.requests.entry("GetItem").or_default() += 1;
    e
}

async fn usage(mesh: &TestMesh, token: &str, tenant: &str, meter: &str, group_by: &[&str]) -> Vec<UsageRow> {
    let req = GetUsageRequest {
        tenant_id: tenant.into(),
        meter: meter.into(),
        from: now() - 3600,
        to: now() + 120,
        window: Window::Hour as i32,
        group_by: group_by.iter().map(|g| (*g).to_owned()).collect(),
    };
    mesh.metering().get_usage(authed(req, token)).await.unwrap().into_inner().rows
}

async fn total(mesh: &TestMesh, token: &str, tenant: &str, meter: &str) -> i64 {
    usage(mesh, token, tenant, meter, &[]).await.iter().map(|r| r.value).sum()
}

/// What the mesh counted for `tenant`, in the shape of [`Expected`].
async fn counted(mesh: &TestMesh, token: &str, tenant: &str) -> Expected {
    let mut requests = BTreeMap::new();
    for row in usage(mesh, token, tenant, "requests", &["rpc"]).await {
        let rpc = ["PutItem", "GetItem", "DeleteItem", "QueryItems"]
            .into_iter()
            .find(|r| row.dimensions.get("rpc").is_some_and(|d| d == r))
            .expect("a data RPC");
        *requests.entry(rpc).or_default() += row.value;
    }
    Expected {
        requests,
        read_units: total(mesh, token, tenant, "read_units").await,
        write_units: total(mesh, token, tenant, "write_units").await,
        bytes_returned: total(mesh, token, tenant, "bytes_returned").await,
    }
}

/// Waits (up to 30 s) until the mesh counted what was expected.
async fn wait_counted(mesh: &TestMesh, token: &str, tenant: &str, expected: &Expected) -> Expected {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = counted(mesh, token, tenant).await;
        if got == *expected || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pool tenant and a silo tenant (its calls forwarded to its own
/// instance) work through the shared service and, on DynamoDB, through a
/// second data-service process too: each tenant's requests, units and
/// bytes are exactly what its client saw, and stay so over later flushes.
#[tokio::test]
async fn usage_is_exact_per_tenant() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("meter-a")).await;
    let b = mesh.onboard_on(&unique_tenant("meter-b"), "enterprise").await;
    let replica = match mesh.backend() {
        TestBackend::DynamoDb => Some(mesh.spawn_replica("data", &[]).await),
        TestBackend::Embedded => None,
    };
    let mut clients = vec![mesh.data()];
    clients.extend(replica.iter().map(|r| DataClient::new(r.channel())));

    let (ea, eb) = tokio::join!(work(&clients, &a.token, "a"), work(&clients, &b.token, "b"));
    let got_a = wait_counted(&mesh, &admin, &a.tenant_id, &ea).await;
    let got_b = wait_counted(&mesh, &admin, &b.tenant_id, &eb).await;
    assert_eq!(got_a, ea, "tenant a");
    assert_eq!(got_b, eb, "tenant b (silo)");
    assert!(total(&mesh, &admin, &a.tenant_id, "compute_us").await > 0, "handler time is attributed");

    // Two more flushes: nothing is counted again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(counted(&mesh, &admin, &a.tenant_id).await, ea);
    assert_eq!(counted(&mesh, &admin, &b.tenant_id).await, eb);
    // A tenant admin reads their own.
    assert_eq!(counted(&mesh, &a.token, &a.tenant_id).await, ea);
    drop(replica);
    mesh.shutdown().await;
}

/// With flushes far apart, a graceful stop writes what was counted: after
/// a restart the usage is all there, at once.
#[tokio::test]
async fn a_graceful_shutdown_loses_no_usage() {
    let mut mesh =
        TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_METERING_FLUSH_MS", "600000")]).await;
    let a = mesh.onboard(&unique_tenant("meter-stop")).await;
    let expected = work(&[mesh.data()], &a.token, "s").await;
    mesh.restart().await;
    let admin = mesh.admin_token().await;
    assert_eq!(counted(&mesh, &admin, &a.tenant_id).await, expected);
    mesh.shutdown().await;
}

fn event(id: &str, tenant: &str, value: i64, time: i64) -> UsageEvent {
    UsageEvent {
        id: id.into(),
        tenant_id: tenant.into(),
        meter: "emails.sent".into(),
        value,
        time,
        dimensions: [("campaign".to_owned(), "spring".to_owned())].into(),
        correction: false,
    }
}

fn field_of(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    status.get_details_bad_request().map(|b| b.field_violations[0].field.clone()).unwrap_or_default()
}

/// An application's events: a retried event counts once (sequentially and
/// concurrently), a different event under a known id is ALREADY_EXISTS, a
/// late event is refused naming its field, and a correction nets out.
#[tokio::test]
async fn application_events_count_once() {
    let mesh = TestMesh::start().await;
    let service = mesh.service_token().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("events")).await;
    let t = now();
    let record = |events: Vec<UsageEvent>, token: &str| {
        let mut m = mesh.metering();
        let req = authed(RecordUsageRequest { events }, token);
        async move { m.record_usage(req).await }
    };
    let e1 = event("order-1", &a.tenant_id, 5, t);
    let first = record(vec![e1.clone()], &service).await.unwrap().into_inner();
    assert_eq!((first.recorded, first.duplicates), (1, 0));
    for _ in 0..2 {
        let again = record(vec![e1.clone()], &service).await.unwrap().into_inner();
        assert_eq!((again.recorded, again.duplicates), (0, 1));
    }
    // Ten senders of one new event at once: one of them records it.
    let e2 = event("order-2", &a.tenant_id, 7, t);
    let sends: Vec<_> = (0..10).map(|_| record(vec![e2.clone()], &service)).collect();
    let outcomes = futures_join_all(sends).await;
    let recorded: u32 = outcomes.iter().map(|o| o.as_ref().unwrap().get_ref().recorded).sum();
    // The usage counts it once whatever the senders are told (the total
    // below). Exactly one is told "recorded" when the store's conditional
    // put is atomic, as the embedded store's and DynamoDB's are; the moto
    // emulator checks the condition and writes in two steps, and under this
    // race it now and then lets two through.
    if mesh.backend() == TestBackend::Embedded {
        assert_eq!(recorded, 1, "{outcomes:?}");
    } else {
        assert!(recorded >= 1, "{outcomes:?}");
    }
    // Another payload under a known id.
    let changed = record(vec![event("order-1", &a.tenant_id, 6, t)], &service).await.unwrap_err();
    assert_eq!(changed.code(), Code::AlreadyExists, "{changed:?}");
    // Too late, a reserved meter, a tenant that does not exist.
    let late = record(vec![event("late", &a.tenant_id, 1, t - 7200)], &service).await.unwrap_err();
    assert_eq!((late.code(), field_of(&late).as_str()), (Code::InvalidArgument, "events[0].time"), "{late:?}");
    let reserved = UsageEvent { meter: "read_units".into(), ..event("r", &a.tenant_id, 1, t) };
    let reserved = record(vec![reserved], &service).await.unwrap_err();
    assert_eq!(field_of(&reserved), "events[0].meter", "{reserved:?}");
    let ghost = record(vec![event("g", "no-such-tenant-x", 1, t)], &service).await.unwrap_err();
    assert_eq!(field_of(&ghost), "events[0].tenant_id", "{ghost:?}");
    // A negative value is a correction, and only the operator declares one.
    let negative = record(vec![event("order-1-fix", &a.tenant_id, -2, t)], &service).await.unwrap_err();
    assert_eq!((negative.code(), field_of(&negative).as_str()), (Code::InvalidArgument, "events[0].value"));
    let fix = UsageEvent { correction: true, ..event("order-1-fix", &a.tenant_id, -2, t) };
    let by_service = record(vec![fix.clone()], &service).await.unwrap_err();
    assert_eq!(by_service.code(), Code::PermissionDenied, "{by_service:?}");
    record(vec![fix], &admin).await.unwrap();
    assert_eq!(total(&mesh, &admin, &a.tenant_id, "emails.sent").await, 5 + 7 - 2);
    // 500 events in one call, as the proto says; 501 are refused naming the field.
    let bulk = |n: usize| -> Vec<UsageEvent> {
        (0..n)
            .map(|i| UsageEvent { meter: "bulk".into(), ..event(&format!("bulk-{n}-{i}"), &a.tenant_id, 1, t) })
            .collect()
    };
    assert_eq!(record(bulk(500), &service).await.unwrap().into_inner().recorded, 500);
    let e = record(bulk(501), &service).await.unwrap_err();
    assert_eq!((e.code(), field_of(&e).as_str()), (Code::InvalidArgument, "events"), "{e:?}");
    // Tenants cannot record usage, not even their own.
    let own = record(vec![event("own", &a.tenant_id, -100, t)], &a.token).await.unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    mesh.shutdown().await;
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A tenant admin reads their own tenant's usage, export and cost, and
/// nobody else's, through every metering RPC.
#[tokio::test]
async fn a_tenant_admin_reads_only_their_own_tenant() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("own-a")).await;
    let b = mesh.onboard(&unique_tenant("own-b")).await;
    let (from, to) = (now() - 3600, now() + 60);
    let mut m = mesh.metering();
    let get = |tenant: &str| GetUsageRequest {
        tenant_id: tenant.into(),
        meter: "requests".into(),
        from,
        to,
        window: Window::Hour as i32,
        group_by: vec![],
    };
    let export = |tenant: &str| ExportUsageRequest {
        tenant_id: tenant.into(),
        from,
        to,
        window: Window::Hour as i32,
        format: ExportFormat::Csv as i32,
    };
    let cost = |tenant: &str| GetTenantCostRequest { tenant_id: tenant.into(), from, to };
    assert!(m.get_usage(authed(get(&a.tenant_id), &a.token)).await.is_ok());
    assert!(m.export_usage(authed(export(&a.tenant_id), &a.token)).await.is_ok());
    assert!(m.get_tenant_cost(authed(cost(&a.tenant_id), &a.token)).await.is_ok());
    let denied = [
        m.get_usage(authed(get(&b.tenant_id), &a.token)).await.map(drop),
        m.export_usage(authed(export(&b.tenant_id), &a.token)).await.map(drop),
        m.get_tenant_cost(authed(cost(&b.tenant_id), &a.token)).await.map(drop),
        m.list_tenant_costs(authed(ListTenantCostsRequest { from, to }, &a.token)).await.map(drop),
    ];
    for d in denied {
        assert_eq!(d.unwrap_err().code(), Code::PermissionDenied);
    }
    // Bad input names its field.
    let bad = GetUsageRequest { to: from, ..get(&a.tenant_id) };
    let e = m.get_usage(authed(bad, &a.token)).await.unwrap_err();
    assert_eq!((e.code(), field_of(&e).as_str()), (Code::InvalidArgument, "to"));
    let bad =
        GetUsageRequest { from: now() - 8 * 86_400, to: now(), window: Window::Minute as i32, ..get(&a.tenant_id) };
    let e = m.get_usage(authed(bad, &a.token)).await.unwrap_err();
    assert_eq!(field_of(&e), "window", "{e:?}");
    mesh.shutdown().await;
}

/// The export holds the usage in each format, and the cost report puts
/// the tenant that costs most against what it pays first.
#[tokio::test]
async fn exports_and_the_cost_report() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let service = mesh.service_token().await;
    // basic pays nothing: with usage it has the lowest margin.
    let free = mesh.onboard_on(&unique_tenant("free"), "basic").await;
    let paying = mesh.onboard_on(&unique_tenant("paying"), "premium").await;
    let expected = work(&[mesh.data()], &free.token, "f").await;
    let t = now();
    let events = vec![event("x-1", &free.tenant_id, 3, t)];
    mesh.metering().record_usage(authed(RecordUsageRequest { events }, &service)).await.unwrap();
    let got = wait_counted(&mesh, &admin, &free.tenant_id, &expected).await;
    assert_eq!(got, expected);

    let (from, to) = (t - 3600, t + 3600);
    let export = |format: ExportFormat| {
        let mut m = mesh.metering();
        let req = ExportUsageRequest {
            tenant_id: free.tenant_id.clone(),
            from,
            to,
            window: Window::Day as i32,
            format: format as i32,
        };
        let admin = admin.clone();
        async move {
            let mut stream = m.export_usage(authed(req, &admin)).await.unwrap().into_inner();
            let mut text = Vec::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                text.extend(chunk.data);
            }
            String::from_utf8(text).unwrap()
        }
    };
    let csv = export(ExportFormat::Csv).await;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("tenant_id,meter,window_start,window_end,value,dimensions"));
    let puts = format!(
        ",requests,{},{},{},rpc=PutItem",
        t - t % 86_400,
        t - t % 86_400 + 86_400,
        expected.requests["PutItem"]
    );
    assert!(csv.lines().any(|l| l == format!("{}{puts}", free.tenant_id)), "{csv}");
    assert!(csv.contains(",emails.sent,"), "{csv}");
    let records: Vec<serde_json::Value> =
        export(ExportFormat::Marketplace).await.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let writes = records.iter().find(|r| r["Dimension"] == "write_units").expect("a write_units record");
    assert_eq!(writes["CustomerIdentifier"], free.tenant_id.as_str());
    assert_eq!(writes["Quantity"], expected.write_units);
    let jsonl = export(ExportFormat::Jsonl).await;
    assert!(
        jsonl
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tenant_id"] == free.tenant_id.as_str())
    );

    let report = mesh
        .metering()
        .list_tenant_costs(authed(ListTenantCostsRequest { from, to }, &admin))
        .await
        .unwrap()
        .into_inner()
        .tenants;
    let margins: Vec<f64> = report.iter().map(|c| c.margin).collect();
    assert!(margins.windows(2).all(|w| w[0] <= w[1]), "lowest margin first: {margins:?}");
    let find = |id: &str| report.iter().find(|c| c.tenant_id == id).unwrap_or_else(|| panic!("{id} in the report"));
    let (f, p) = (find(&free.tenant_id), find(&paying.tenant_id));
    assert_eq!((f.tier.as_str(), f.isolation.as_str(), f.revenue), ("basic", "pool", 0.0));
    assert!(f.cost > 0.0 && f.margin < 0.0, "{f:?}");
    let line = |c: &TenantCost, item: &str| c.lines.iter().find(|l| l.item == item).map(|l| l.quantity);
    assert_eq!(line(f, "requests"), Some(expected.requests.values().sum::<i64>() as f64));
    assert_eq!((p.isolation.as_str(), line(p, "silo_instance")), ("bridge", None));
    assert!(line(p, "dedicated_table").is_some_and(|hours| hours >= 0.0), "{p:?}");
    assert!(p.revenue > 0.0 && p.margin > f.margin);
    // The one tenant's cost is the same figure.
    let one = mesh
        .metering()
        .get_tenant_cost(authed(GetTenantCostRequest { tenant_id: free.tenant_id.clone(), from, to }, &free.token))
        .await
        .unwrap()
        .into_inner()
        .cost
        .unwrap();
    assert_eq!(one.lines, f.lines);
    mesh.shutdown().await;
}

/// What was created for a silo tenant alone is listed with its tenantId
/// and tier tags; a move to the pool removes it from the list (it stays on
/// record with its removal time), and the offboarding's export takes its
/// place. Only the tenant's own admin and the platform may look.
#[tokio::test]
async fn tenant_resources_carry_their_tags_until_removed() {
    use tenantmesh_proto::onboarding::v1::{
        ChangeTierRequest, ListTenantResourcesRequest, OffboardTenantRequest, WorkflowStatus,
    };
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let silo = mesh.onboard_on(&unique_tenant("res-silo"), "enterprise").await;
    let other = mesh.onboard_on(&unique_tenant("res-pool"), "basic").await;
    let list = |tenant: &str, token: &str| {
        let mut o = mesh.onboarding();
        let req = authed(ListTenantResourcesRequest { tenant_id: tenant.into(), include_removed: false }, token);
        async move { o.list_tenant_resources(req).await.map(|r| r.into_inner().resources) }
    };
    let mut kinds: Vec<String> = Vec::new();
    for r in list(&silo.tenant_id, &silo.token).await.unwrap() {
        assert_eq!(r.tags.get("tenantId"), Some(&silo.tenant_id), "{r:?}");
        assert_eq!(r.tags.get("tier").map(String::as_str), Some("enterprise"), "{r:?}");
        assert!(r.create_time > 0);
        kinds.push(r.kind);
    }
    kinds.sort();
    assert_eq!(kinds, ["silo_instance", "table"]);
    // Where the tenant's instance runs is the operator's to see, not the tenant's.
    let endpoint = |rs: Vec<tenantmesh_proto::onboarding::v1::TenantResource>| {
        rs.into_iter().find(|r| r.kind == "silo_instance").map(|r| r.name).unwrap_or_default()
    };
    assert_eq!(endpoint(list(&silo.tenant_id, &silo.token).await.unwrap()), "");
    assert!(endpoint(list(&silo.tenant_id, &admin).await.unwrap()).starts_with("http://"));
    assert!(list(&other.tenant_id, &admin).await.unwrap().is_empty(), "a pool tenant has nothing of its own");
    let denied = list(&silo.tenant_id, &other.token).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let change = ChangeTierRequest { tenant_id: silo.tenant_id.clone(), tier: "basic".into() };
    let id = mesh.onboarding().change_tier(authed(change, &admin)).await.unwrap().into_inner().workflow_id;
    assert_eq!(mesh.wait_workflow(&id).await.status, WorkflowStatus::Succeeded as i32);
    assert!(list(&silo.tenant_id, &admin).await.unwrap().is_empty(), "the table and instance are gone");
    // Still on record, with when they were removed (what their hours cost).
    let all = ListTenantResourcesRequest { tenant_id: silo.tenant_id.clone(), include_removed: true };
    let all = mesh.onboarding().list_tenant_resources(authed(all, &admin)).await.unwrap().into_inner().resources;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().all(|r| r.remove_time >= r.create_time && r.remove_time > 0), "{all:?}");

    let off = OffboardTenantRequest { tenant_id: silo.tenant_id.clone() };
    let id = mesh.onboarding().offboard_tenant(authed(off, &admin)).await.unwrap().into_inner().workflow_id;
    assert_eq!(mesh.wait_workflow(&id).await.status, WorkflowStatus::Succeeded as i32);
    let left = list(&silo.tenant_id, &admin).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].kind, "export");
    assert!(left[0].name.ends_with(&format!("{}.jsonl", silo.tenant_id)), "{left:?}");
    assert_eq!(left[0].tags.get("tier").map(String::as_str), Some("basic"));
    mesh.shutdown().await;
}

/// `storage_byte_hours` of the first one-second sample filed for an
/// interval starting at `start` or later (waits up to 20 s). A sampler
/// still busy at a boundary skips that interval, so not every interval
/// has a sample.
async fn sampled(mesh: &TestMesh, admin: &str, tenant: &str, start: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut at = start;
    loop {
        let req = GetUsageRequest {
            tenant_id: tenant.into(),
            meter: "storage_byte_hours".into(),
            from: at,
            to: at + 1,
            window: Window::Minute as i32,
            group_by: vec![],
        };
        let rows = mesh.metering().get_usage(authed(req, admin)).await.unwrap().into_inner().rows;
        if let Some(r) = rows.first() {
            return r.value;
        }
        if at + 1 < now() {
            // That interval is over and was skipped: look at the next.
            at += 1;
            continue;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sample of {tenant} from {start} on");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tenant whose store never answers (its silo instance hangs) holds up
/// nobody's sample: the others are sampled every interval all the same,
/// and later rounds leave the hung one alone while it is still busy. (On
/// the previous main the sampler went tenant by tenant, so a hung tenant
/// sorted first held up every other until its call timed out.)
#[tokio::test]
async fn a_hung_tenant_holds_up_no_other_sample() {
    use tenantmesh_proto::registry::v1::{IsolationModel, Placement, SetPlacementRequest};
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_STORAGE_SAMPLE_SECS", "1")]).await;
    let admin = mesh.admin_token().await;
    // Sorted before every other tenant: listed, and sampled, first.
    let hung = mesh.onboard_on(&format!("aaa-{}", unique_tenant("hung")), "enterprise").await;
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", black_hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = black_hole.accept().await {
            conns.push(conn); // accepted, never answered
        }
    });
    let placement = Placement {
        model: IsolationModel::Silo as i32,
        table: format!("tenantmesh-tenant-{}-silo", hung.tenant_id),
        endpoint,
    };
    let req =
        SetPlacementRequest { tenant_id: hung.tenant_id.clone(), placement: Some(placement), ..Default::default() };
    mesh.registry().set_placement(authed(req, &admin)).await.unwrap();
    let pool = mesh.onboard(&unique_tenant("busy-pool")).await;
    mesh.data().put_item(authed(sized("one", 36_000), &pool.token)).await.unwrap();
    // Two intervals in a row, well within the hung call's timeout.
    for _ in 0..2 {
        let after = now() + 1;
        assert!(sampled(&mesh, &admin, &pool.tenant_id, after).await > 0);
    }
    held.abort();
    mesh.shutdown().await;
}

/// Every tenant's stored bytes are sampled (here every second), pool and
/// silo alike: a sample is the bytes it stores, as the client can tell
/// from its writes, times the interval. The history kept for restores is
/// billed too: overwriting an item keeps its earlier bytes.
#[tokio::test]
async fn stored_bytes_are_sampled_for_every_tenant() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_STORAGE_SAMPLE_SECS", "1")]).await;
    let admin = mesh.admin_token().await;
    let pool = mesh.onboard(&unique_tenant("stored-pool")).await;
    let silo = mesh.onboard_on(&unique_tenant("stored-silo"), "enterprise").await;
    let mut stored = Vec::new();
    let mut first = 0;
    for (tenant, count) in [(&pool, 5), (&silo, 3)] {
        let mut bytes = 0u64;
        for i in 0..count {
            let r = mesh.data().put_item(authed(sized(&format!("big-{i}"), 300_000), &tenant.token)).await.unwrap();
            let item = r.into_inner().item.unwrap();
            // Stored as written, before the store numbered its version.
            let size = tenantmesh_proto::data::v1::Item { version: 0, ..item }.encoded_len() as u64;
            first = if i == 0 { size } else { first };
            bytes += size;
        }
        stored.push(bytes);
    }
    let after = now() + 1;
    for (tenant, bytes) in [(&pool, stored[0]), (&silo, stored[1])] {
        let expected = (bytes as i64 + 1800) / 3600;
        assert_eq!(sampled(&mesh, &admin, &tenant.tenant_id, after).await, expected, "{}", tenant.tenant_id);
    }
    let cost = GetTenantCostRequest { tenant_id: pool.tenant_id.clone(), from: after - 60, to: after + 60 };
    let cost = mesh.metering().get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let line = cost.lines.iter().find(|l| l.item == "storage_byte_hours").expect("storage is priced");
    assert!(line.quantity > 0.0 && line.cost > 0.0, "{line:?}");

    // The silo's big-0 overwritten with a small value: its history keeps
    // the first version's bytes (give or take the entries' few dozen bytes
    // each). Small, because moto sizes an overwrite as old plus new.
    let r = mesh.data().put_item(authed(sized("big-0", 10), &silo.token)).await.unwrap();
    let small = tenantmesh_proto::data::v1::Item { version: 0, ..r.into_inner().item.unwrap() }.encoded_len() as u64;
    let after = now() + 1;
    let items_now = stored[1] - first + small;
    let expected = (items_now + first) as i64 / 3600;
    let billed = sampled(&mesh, &admin, &silo.tenant_id, after).await;
    assert!((billed - expected).abs() <= 1, "billed {billed}, expected {expected} with the history");
    mesh.shutdown().await;
}

/// Reads are bounded by what they return, never by what they read: with a
/// year of per-minute usage in the store (six meters every minute,
/// written straight into it as flushes would), an all-time cost and a
/// year of daily usage each raise the process's peak memory by less than
/// 64 MiB (on the previous main, the cost held every minute: hundreds of
/// MiB); a range past 400 days is INVALID_ARGUMENT naming `to`. Sixty
/// exports a basic tenant's admin opens and never reads: past its 4
/// requests in flight they are refused, memory stays flat, and the stalled
/// ones end (DEADLINE_EXCEEDED), giving their places back.
#[tokio::test]
async fn reads_are_bounded_over_a_year_of_usage() {
    // What a read holds is the service's, whatever the backend; a year of
    // usage written to the emulator would take minutes (the DynamoDB pass
    // leaves this test out).
    let mesh = TestMesh::start_with_env(TestBackend::Embedded, &[("TENANTMESH_STREAM_STALL_MS", "1500")]).await;
    let admin = mesh.admin_token().await;
    let acme = mesh.onboard_on(&unique_tenant("year"), "basic").await;
    let limits = tenantmesh_proto::registry::v1::TenantLimits {
        requests_per_second: 100_000,
        burst: 100_000,
        max_concurrency: 4,
        storage_quota_bytes: 1 << 30,
    };
    let req = tenantmesh_proto::registry::v1::SetTenantLimitsRequest {
        tenant_id: acme.tenant_id.clone(),
        limits: Some(limits),
    };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    // A year of hours, each with every minute of six meters.
    let usage = mesh.running_table("usage").await;
    let pk = format!("usage#{}", acme.tenant_id);
    let end = now() - now() % 3600;
    let start = end - 365 * 24 * 3600;
    let mut writes = Vec::new();
    for hour in (start..end).step_by(3600) {
        let mut values = serde_json::Map::new();
        for minute in 0..60 {
            values.insert(format!("{minute:02}|requests|rpc=GetItem"), 2.into());
            for meter in ["read_units", "write_units", "bytes_returned", "compute_us"] {
                values.insert(format!("{minute:02}|{meter}"), 3.into());
            }
            values.insert(format!("{minute:02}|requests|rpc=PutItem"), 1.into());
        }
        let data = serde_json::to_vec(&serde_json::json!({"seq": 1, "values": values})).unwrap();
        writes.push(tenantmesh_storage::Write::Put {
            pk: pk.clone(),
            sk: format!("u#{hour:013}#year-replica"),
            data,
            condition: tenantmesh_storage::Condition::None,
        });
        if writes.len() == 25 {
            usage.transact_write(std::mem::take(&mut writes)).await.unwrap();
        }
    }
    usage.transact_write(writes).await.unwrap();
    let minutes = 365 * 24 * 60;

    let mut m = mesh.metering();
    reset_peak_rss();
    let before = peak_rss();
    let cost = GetTenantCostRequest { tenant_id: acme.tenant_id.clone(), from: start, to: end };
    let cost = m.get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let requests = cost.lines.iter().find(|l| l.item == "requests").map(|l| l.quantity);
    assert_eq!(requests, Some(f64::from(minutes * 3)), "{cost:?}");
    let daily = GetUsageRequest {
        tenant_id: acme.tenant_id.clone(),
        meter: "requests".into(),
        from: start,
        to: end,
        window: Window::Day as i32,
        group_by: vec!["rpc".into()],
    };
    let rows = m.get_usage(authed(daily, &acme.token)).await.unwrap().into_inner().rows;
    assert_eq!(rows.iter().map(|r| r.value).sum::<i64>(), i64::from(minutes * 3));
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "a year of usage raised the peak by {} MiB", grown >> 20);
    // Every metering call caps its range.
    let all_time = GetTenantCostRequest { tenant_id: acme.tenant_id.clone(), from: 0, to: end };
    let e = m.get_tenant_cost(authed(all_time, &admin)).await.unwrap_err();
    assert_eq!((e.code(), field_of(&e).as_str()), (Code::InvalidArgument, "to"), "{e:?}");

    // Sixty exports opened and never read: 60 days of minutes, about 30 MB
    // each, far more than the connection's buffers take.
    reset_peak_rss();
    let before = peak_rss();
    let export = ExportUsageRequest {
        tenant_id: acme.tenant_id.clone(),
        from: end - 60 * 86_400,
        to: end,
        window: Window::Minute as i32,
        format: ExportFormat::Csv as i32,
    };
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..60 {
        match m.export_usage(authed(export.clone(), &acme.token)).await {
            Ok(stream) => open.push(stream.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (4, 56), "an open export holds one of the tenant's 4 requests in flight");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "unread exports raised the peak by {} MiB", grown >> 20);
    // Stalled past 1.5 s, they end with what the client had not read, then
    // DEADLINE_EXCEEDED, and their places come back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut ended = 0;
    for mut stream in open {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a stalled export ended as if complete"),
                Err(s) => {
                    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
                    ended += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(ended, 4);
    // A whole export, read as it comes: every hour of 30 days, then the end.
    let export = ExportUsageRequest { from: end - 30 * 86_400, window: Window::Hour as i32, ..export };
    let mut stream = m.export_usage(authed(export, &acme.token)).await.unwrap().into_inner();
    let mut csv = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        csv.extend(chunk.data);
    }
    let csv = String::from_utf8(csv).unwrap();
    let requests: i64 = csv
        .lines()
        .skip(1)
        .filter(|l| l.contains(",requests,"))
        .map(|l| l.split(',').nth(4).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(requests, 30 * 24 * 60 * 3);
    mesh.shutdown().await;
}
