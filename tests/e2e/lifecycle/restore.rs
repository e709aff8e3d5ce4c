//! Restoring one tenant to an instant (`RestoreTenant`), on the backend
//! `TENANTMESH_TEST_STORAGE` names: in place and into an export, for a
//! pool, a bridge and a silo tenant, with a neighbour that never notices;
//! who may ask; what is refused; a restore that fails is rolled back. And
//! the property under it all, on the table itself: random writes and
//! deletes by several tenants, rewinds of one to random instants (some
//! interrupted half-way and run again), always equal to a model of that
//! tenant's items at that instant, the others untouched.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use tenantmesh_data::{FENCE_SK, history};
use tenantmesh_proto::data::v1::{DeleteItemRequest, GetItemRequest, Item, QueryItemsRequest};
use tenantmesh_proto::onboarding::v1::{RestoreTarget, RestoreTenantRequest, WorkflowStatus};
use tenantmesh_storage::{Condition, DynTable, Page, Query, StorageError, Table, Write};
use tenantmesh_test_support::*;
use tonic::Code;

fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: us / 1_000_000, nanos: (us % 1_000_000) as i32 * 1000 }
}

/// The instant between what was written before and what is written after.
async fn instant() -> prost_types::Timestamp {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let at = history::now_us();
    tokio::time::sleep(Duration::from_millis(5)).await;
    timestamp(at)
}

async fn items(mesh: &TestMesh, token: &str) -> Vec<Item> {
    let req =
        QueryItemsRequest { collection: "c".into(), id_prefix: String::new(), page_size: 1000, page_token: "".into() };
    mesh.data().query_items(authed(req, token)).await.unwrap().into_inner().items
}

async fn put(mesh: &TestMesh, token: &str, id: &str, value: &str) -> Item {
    mesh.data().put_item(authed(put_v(id, value), token)).await.unwrap().into_inner().item.unwrap()
}

async fn delete(mesh: &TestMesh, token: &str, id: &str) {
    let req = DeleteItemRequest { collection: "c".into(), id: id.into(), expected_version: None };
    mesh.data().delete_item(authed(req, token)).await.unwrap();
}

fn get_v(id: &str) -> GetItemRequest {
    GetItemRequest { collection: "c".into(), id: id.into() }
}

fn restore(tenant: &str, at: prost_types::Timestamp, target: RestoreTarget) -> RestoreTenantRequest {
    RestoreTenantRequest { tenant_id: tenant.into(), point_in_time: Some(at), target: target as i32 }
}

/// Starts a restore as `token` and waits for its workflow.
async fn restored(
    mesh: &TestMesh,
    token: &str,
    req: RestoreTenantRequest,
) -> tenantmesh_proto::onboarding::v1::Workflow {
    let id = mesh.onboarding().restore_tenant(authed(req, token)).await.unwrap().into_inner().workflow_id;
    mesh.wait_workflow(&id).await
}

/// Writes the history of the test: items created, changed and deleted
/// before the instant, and more of each after it. The items at the instant.
async fn history_around_an_instant(mesh: &TestMesh, token: &str) -> (Vec<Item>, prost_types::Timestamp) {
    for id in ["a1", "a2", "a3", "a4"] {
        put(mesh, token, id, "one").await;
    }
    put(mesh, token, "a1", "two").await;
    delete(mesh, token, "a4").await;
    let then = items(mesh, token).await;
    let at = instant().await;
    put(mesh, token, "a1", "three").await;
    put(mesh, token, "a2", "changed").await;
    delete(mesh, token, "a3").await;
    put(mesh, token, "a4", "back").await;
    put(mesh, token, "a5", "new").await;
    (then, at)
}

/// Pool, bridge and silo tenants, each restored in place to an instant
/// with items changed, deleted and created since: exactly the items of
/// that instant come back, versions and contents, and the neighbour in
/// the pool is untouched. An export at the instant holds the same items
/// and leaves the tenant as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_restored_in_place_or_into_an_export_in_every_model() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let neighbour = mesh.onboard_on(&unique_tenant("nbr"), "standard").await;
    put(&mesh, &neighbour.token, "n1", "mine").await;
    let mut tenants = Vec::new();
    for tier in ["standard", "premium", "enterprise"] {
        let t = mesh.onboard_on(&unique_tenant("rst"), tier).await;
        let (then, at) = history_around_an_instant(&mesh, &t.token).await;
        tenants.push((t, then, at));
    }
    put(&mesh, &neighbour.token, "n2", "after").await;
    let neighbour_items = items(&mesh, &neighbour.token).await;

    // Into an export first: the items at the instant, the tenant untouched.
    let (pool, then, at) = &tenants[0];
    let now = items(&mesh, &pool.token).await;
    let wf = restored(&mesh, &admin, restore(&pool.tenant_id, *at, RestoreTarget::Export)).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let exported: Vec<(String, u64)> = std::fs::read_to_string(&wf.export_path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_owned(), v["version"].as_u64().unwrap())
        })
        .collect();
    let expected: Vec<(String, u64)> = then.iter().map(|i| (i.id.clone(), i.version)).collect();
    assert_eq!(exported, expected);
    assert_eq!(items(&mesh, &pool.token).await, now, "an export changes nothing");

    // In place, each model; the premium tier lets its own admin ask.
    for (t, then, at) in &tenants {
        let caller = if t.tenant_id == tenants[1].0.tenant_id { &t.token } else { &admin };
        let wf = restored(&mesh, caller, restore(&t.tenant_id, *at, RestoreTarget::InPlace)).await;
        assert_eq!((wf.status, wf.kind.as_str()), (WorkflowStatus::Succeeded as i32, "restore"), "{wf:?}");
        assert_eq!(&items(&mesh, &t.token).await, then, "{}", t.tenant_id);
        // Versions as they were: a client's conditional write on what it read then succeeds.
        let mut write = put_v("a2", "after the restore");
        write.expected_version = Some(then.iter().find(|i| i.id == "a2").unwrap().version);
        mesh.data().put_item(authed(write, &t.token)).await.unwrap();
    }
    assert_eq!(items(&mesh, &neighbour.token).await, neighbour_items);

    // A restore is itself in the history: restoring to just before it undoes it.
    let (pool, _, _) = &tenants[0];
    let before = items(&mesh, &pool.token).await;
    let undo_at = instant().await;
    let (_, first_at) = (&tenants[0].1, tenants[0].2);
    let wf = restored(&mesh, &admin, restore(&pool.tenant_id, first_at, RestoreTarget::InPlace)).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert_ne!(items(&mesh, &pool.token).await, before);
    let wf = restored(&mesh, &admin, restore(&pool.tenant_id, undo_at, RestoreTarget::InPlace)).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert_eq!(items(&mesh, &pool.token).await, before);
}

/// Who may restore, and which instants are refused before anything runs;
/// an instant before the tenant's history is rolled back with the reason,
/// the tenant untouched and writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_are_refused_to_others_and_beyond_the_history() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let basic = mesh.onboard_on(&unique_tenant("rb"), "standard").await;
    let premium = mesh.onboard_on(&unique_tenant("rp"), "premium").await;
    put(&mesh, &basic.token, "x", "1").await;
    let now = history::now_us();
    let mut client = mesh.onboarding();

    // The standard tier does not let a tenant restore itself; no tenant restores another.
    let r = client
        .restore_tenant(authed(restore(&basic.tenant_id, timestamp(now), RestoreTarget::InPlace), &basic.token))
        .await;
    let s = expect_code(r, Code::PermissionDenied);
    assert!(s.message().contains("tenant_restore"), "{s:?}");
    let r = client
        .restore_tenant(authed(restore(&basic.tenant_id, timestamp(now), RestoreTarget::InPlace), &premium.token))
        .await;
    expect_code(r, Code::PermissionDenied);
    let member = mesh.user_token(&premium, &[tenantmesh_proto::auth::v1::Role::TenantUser]).await;
    let r = client
        .restore_tenant(authed(restore(&premium.tenant_id, timestamp(now), RestoreTarget::InPlace), &member))
        .await;
    expect_code(r, Code::PermissionDenied);

    // Bad instants and targets name their field.
    let future = restore(&basic.tenant_id, timestamp(now + 3_600_000_000), RestoreTarget::InPlace);
    expect_invalid(client.restore_tenant(authed(future, &admin)).await, "point_in_time");
    let missing = RestoreTenantRequest { tenant_id: basic.tenant_id.clone(), point_in_time: None, target: 0 };
    expect_invalid(client.restore_tenant(authed(missing, &admin)).await, "point_in_time");
    let month_ago = restore(&basic.tenant_id, timestamp(now - 30 * 86_400_000_000), RestoreTarget::InPlace);
    let s = expect_invalid(client.restore_tenant(authed(month_ago, &admin)).await, "point_in_time");
    assert!(s.message().contains("7 days"), "{s:?}");
    let mut bad_target = restore(&basic.tenant_id, timestamp(now), RestoreTarget::InPlace);
    bad_target.target = 9;
    expect_invalid(client.restore_tenant(authed(bad_target, &admin)).await, "target");
    let mut bad_id = restore(&basic.tenant_id, timestamp(now), RestoreTarget::InPlace);
    bad_id.tenant_id = "Not A Tenant".into();
    expect_invalid(client.restore_tenant(authed(bad_id, &admin)).await, "tenant_id");

    // Before the tenant existed: within the tier's days, but before its
    // history starts. The workflow says why and leaves everything as it was.
    let before_it_existed = restore(&basic.tenant_id, timestamp(now - 3_600_000_000), RestoreTarget::InPlace);
    let wf = restored(&mesh, &admin, before_it_existed).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "{wf:?}");
    assert!(wf.error.contains("history"), "{wf:?}");
    assert_eq!(items(&mesh, &basic.token).await.len(), 1);
    put(&mesh, &basic.token, "y", "writes go on").await;
    // An export from before any history is not an empty file: it ends,
    // saying why, and leaves the tenant free for the next workflow.
    let export = restore(&premium.tenant_id, timestamp(now - 3_600_000_000), RestoreTarget::Export);
    let wf = restored(&mesh, &admin, export).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "{wf:?}");
    assert!(wf.error.contains("history") && wf.export_path.is_empty(), "{wf:?}");
    let export = restore(&premium.tenant_id, timestamp(history::now_us()), RestoreTarget::Export);
    let wf = restored(&mesh, &admin, export).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "no history yet: {wf:?}");
    put(&mesh, &premium.token, "p", "1").await;
    let export = restore(&premium.tenant_id, instant().await, RestoreTarget::Export);
    let wf = restored(&mesh, &admin, export).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    // The exports that could not be made left nothing behind.
    let exports = mesh.data_dir().join("exports");
    let mut left: Vec<String> =
        std::fs::read_dir(&exports).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert!(left.iter().all(|f| f.ends_with(".jsonl")) && left.len() == 1, "{left:?}");
}

/// A restore a tenant asks for itself is charged to its limits: once its
/// in-place restore has run, the tenant owes the write units it wrote (its
/// next call waits for them), and another restore it asks for meanwhile
/// is rolled back saying so, while the operator's goes; one runs at a
/// time. Its export is counted (with its size), billed by the GB-hour, and
/// shown to it by file name only, never by host path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_a_tenant_asks_for_are_charged_to_it() {
    use tenantmesh_proto::onboarding::v1::ListTenantResourcesRequest;
    use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};
    // The first restore's rewind fails three times before it goes (retried
    // with backoff): long enough for a second restore to meet it running.
    let faults = [("TENANTMESH_FAULTS", "fail:rewind_items:3")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &faults).await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("charged"), "premium").await;
    let blob = "x".repeat(8 * 1024);
    for i in 0..20 {
        put(&mesh, &t.token, &format!("k{i}"), &blob).await;
    }
    let at = instant().await;
    for i in 0..20 {
        put(&mesh, &t.token, &format!("k{i}"), "small").await;
    }
    // 20 requests a second from now on; a burst of 20.
    let limits =
        TenantLimits { requests_per_second: 20, burst: 20, max_concurrency: 100, storage_quota_bytes: 1 << 30 };
    let req = SetTenantLimitsRequest { tenant_id: t.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One at a time: a second restore while the first runs is refused.
    let later = instant().await;
    let id = mesh
        .onboarding()
        .restore_tenant(authed(restore(&t.tenant_id, at, RestoreTarget::InPlace), &t.token))
        .await
        .unwrap()
        .into_inner()
        .workflow_id;
    let other = restore(&t.tenant_id, later, RestoreTarget::Export);
    let other = mesh.onboarding().restore_tenant(authed(other, &t.token)).await;
    let other = other.expect_err("a second restore while one runs");
    assert_eq!(other.code(), tonic::Code::FailedPrecondition, "{other:?}");
    assert!(other.message().contains(&id), "names the running restore: {other:?}");
    let wf = mesh.wait_workflow(&id).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    // 20 items of 8 KB and the history of what they replaced: about 170
    // write units at 20 a second.
    let owed = expect_code(mesh.data().get_item(authed(get_v("k0"), &t.token)).await, Code::ResourceExhausted);
    let retry = tonic_types::StatusExt::get_details_retry_info(&owed).and_then(|r| r.retry_delay).unwrap();
    assert!(retry > Duration::from_secs(4), "the restore was not charged: {retry:?}");
    // Owing, the tenant's next restore is rolled back, saying why...
    let wf = restored(&mesh, &t.token, restore(&t.tenant_id, at, RestoreTarget::InPlace)).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "{wf:?}");
    assert!(wf.error.contains("requests_per_second"), "{wf:?}");
    // ...while the operator's (not charged to the tenant) goes.
    let wf = restored(&mesh, &admin, restore(&t.tenant_id, at, RestoreTarget::Export)).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    let export_path = wf.export_path.clone();
    assert!(export_path.contains("/exports/"), "the operator sees where it is: {wf:?}");
    // The tenant sees its export by file name, with its size; never the host path.
    let get = tenantmesh_proto::onboarding::v1::GetWorkflowRequest { workflow_id: wf.workflow_id.clone() };
    let mine = mesh.onboarding().get_workflow(authed(get, &t.token)).await.unwrap().into_inner().workflow.unwrap();
    let file_name = std::path::Path::new(&export_path).file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(mine.export_path, file_name);
    let list = ListTenantResourcesRequest { tenant_id: t.tenant_id.clone(), include_removed: false };
    let resources =
        mesh.onboarding().list_tenant_resources(authed(list, &t.token)).await.unwrap().into_inner().resources;
    let export = resources.iter().find(|r| r.kind == "export").expect("the export is counted");
    assert_eq!(export.name, file_name);
    assert_eq!(export.bytes, std::fs::metadata(&export_path).unwrap().len());
    assert!(export.bytes > 20 * 8 * 1024, "{export:?}");
    // Billed by the GB-hour it is kept (a second so far).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let now = history::now_us() / 1_000_000;
    let cost = tenantmesh_proto::metering::v1::GetTenantCostRequest {
        tenant_id: t.tenant_id.clone(),
        from: now - 3600,
        to: now + 3600,
    };
    let cost = mesh.metering().get_tenant_cost(authed(cost, &admin)).await.unwrap().into_inner().cost.unwrap();
    let line = cost.lines.iter().find(|l| l.item == "export_gb_hours").expect("the export is billed");
    assert!(line.quantity > 0.0 && line.cost > 0.0, "{line:?}");
}

/// A restore whose last step fails for good is undone: the items are as
/// they were before it, and the tenant takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_cannot_finish_is_rolled_back() {
    let faults = [("TENANTMESH_FAULTS", "fail-permanent:resume_writes:1")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &faults).await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("rr"), "premium").await;
    let (_, at) = history_around_an_instant(&mesh, &t.token).await;
    let current = items(&mesh, &t.token).await;
    let wf = restored(&mesh, &admin, restore(&t.tenant_id, at, RestoreTarget::InPlace)).await;
    assert_eq!(wf.status, WorkflowStatus::RolledBack as i32, "{wf:?}");
    assert!(wf.error.starts_with("resume_writes"), "{wf:?}");
    assert_eq!(items(&mesh, &t.token).await, current);
    put(&mesh, &t.token, "a9", "writes go on").await;
}

/// The largest item the data service accepts (`MAX_ITEM_BYTES` encoded)
/// is overwritten and restored whole: its history entry holds all of it.
/// One byte more is INVALID_ARGUMENT naming `attributes`, and nothing is
/// written. On the emulator, only the refusal: moto caps an item at
/// 405,000 bytes, below DynamoDB's 409,600, and sizes an overwrite as the
/// old item plus the new one. The DynamoDB sizes are checked by the data
/// service's `the_largest_item_and_its_history_entry_fit_in_a_dynamodb_item`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_item_is_kept_whole_in_the_history_and_one_byte_more_is_refused() {
    use prost::Message;
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard_on(&unique_tenant("large"), "standard").await;
    // The encoded size of the item the service stores for a value of n bytes.
    let encoded = |n: usize| {
        let req = put_v("big", &"x".repeat(n));
        let now_ms = history::now_us() / 1000;
        Item { collection: req.collection, id: req.id, attributes: req.attributes, version: 0, update_time_ms: now_ms }
            .encoded_len()
    };
    let n =
        (0..tenantmesh_data::MAX_ITEM_BYTES).rev().find(|&n| encoded(n) <= tenantmesh_data::MAX_ITEM_BYTES).unwrap();
    assert!(encoded(n + 1) > tenantmesh_data::MAX_ITEM_BYTES);

    let s =
        expect_invalid(mesh.data().put_item(authed(put_v("big", &"x".repeat(n + 1)), &t.token)).await, "attributes");
    assert!(s.message().contains(&tenantmesh_data::MAX_ITEM_BYTES.to_string()), "{s:?}");
    assert!(items(&mesh, &t.token).await.is_empty());
    if mesh.backend() == TestBackend::DynamoDb {
        return;
    }
    let first = put(&mesh, &t.token, "big", &"x".repeat(n)).await;
    let at = instant().await;
    put(&mesh, &t.token, "big", &"y".repeat(n)).await;
    let wf = restored(&mesh, &admin, restore(&t.tenant_id, at, RestoreTarget::InPlace)).await;
    assert_eq!(wf.status, WorkflowStatus::Succeeded as i32, "{wf:?}");
    assert!(items(&mesh, &t.token).await == vec![first], "the largest item did not come back whole");
}

// ---- The property, on the table --------------------------------------

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    /// Tenant, key, value; conditioned on the version the model holds.
    Put(usize, usize, u8, bool),
    Delete(usize, usize),
    /// Tenant 0 back to the instant after step `n % steps so far`; the
    /// first attempt interrupted after `k` writes when `k` is set.
    Rewind(usize, Option<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..6usize, any::<u8>(), any::<bool>()).prop_map(|(t, k, v, c)| Op::Put(t, k, v, c)),
        2 => (0..3usize, 0..6usize).prop_map(|(t, k)| Op::Delete(t, k)),
        1 => (any::<usize>(), proptest::option::of(0..6usize)).prop_map(|(n, k)| Op::Rewind(n, k)),
    ]
}

type State = BTreeMap<String, (u64, Vec<u8>)>;

/// A tenant's items in the table (not the history or the fence).
async fn stored(table: &dyn Table, pk: &str) -> State {
    let (mut out, mut start_after) = (State::new(), None);
    loop {
        let q = Query { pk: pk.into(), sk_prefix: String::new(), start_after, limit: 100 };
        let page = table.query(q).await.unwrap();
        out.extend(page.items.into_iter().filter(|i| !i.sk.starts_with('~')).map(|i| (i.sk, (i.version, i.data))));
        match page.last_evaluated {
            Some(sk) => start_after = Some(sk),
            None => return out,
        }
    }
}

/// A table that fails every write after the first `left`: a process that
/// dies half-way through a rewind.
struct Interrupted {
    inner: DynTable,
    left: AtomicUsize,
}

impl Interrupted {
    fn write(&self) -> Result<(), StorageError> {
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(drop)
            .map_err(|_| StorageError::Backend("interrupted".into()))
    }
}

#[async_trait]
impl Table for Interrupted {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<tenantmesh_storage::Item>, StorageError> {
        self.inner.get(pk, sk).await
    }
    async fn put(
        &self,
        pk: &str,
        sk: &str,
        data: Vec<u8>,
        c: Condition,
    ) -> Result<tenantmesh_storage::Item, StorageError> {
        self.write()?;
        self.inner.put(pk, sk, data, c).await
    }
    async fn delete(&self, pk: &str, sk: &str, c: Condition) -> Result<Option<u64>, StorageError> {
        self.write()?;
        self.inner.delete(pk, sk, c).await
    }
    async fn query(&self, q: Query) -> Result<Page, StorageError> {
        self.inner.query(q).await
    }
    async fn transact_write(&self, writes: Vec<Write>) -> Result<(), StorageError> {
        self.write()?;
        self.inner.transact_write(writes).await
    }
    async fn restore(&self, item: tenantmesh_storage::Item) -> Result<(), StorageError> {
        self.write()?;
        self.inner.restore(item).await
    }
}

/// Runs `ops` on three fresh tenants of `table` and checks the property
/// after every rewind and at the end.
async fn check_history(table: DynTable, ops: Vec<Op>) -> Result<(), String> {
    let run = uuid_hex();
    let pks: Vec<String> = (0..3).map(|t| format!("p{run}-{t}")).collect();
    for pk in &pks {
        let marked = history::mark_start(table.as_ref(), pk, FENCE_SK).await.map_err(|e| e.to_string())?;
        assert!(marked, "{pk} is not fenced");
    }
    let mut model: Vec<State> = vec![State::new(); 3];
    // The instant after each step, and every tenant's items then.
    let mut instants: Vec<(i64, Vec<State>)> = vec![(history::now_us(), model.clone())];
    for op in ops {
        match op {
            Op::Put(t, k, v, conditional) => {
                let (pk, sk) = (&pks[t], format!("c#{k}"));
                let current = model[t].get(&sk).map_or(0, |(version, _)| *version);
                let condition = if conditional { Condition::Version(current) } else { Condition::None };
                let item = history::put(table.as_ref(), pk, &sk, vec![v; 3], condition, FENCE_SK)
                    .await
                    .map_err(|e| format!("{op:?}: {e}"))?;
                if item.version != current + 1 {
                    return Err(format!("{op:?}: version {} after {current}", item.version));
                }
                model[t].insert(sk, (item.version, vec![v; 3]));
            }
            Op::Delete(t, k) => {
                let (pk, sk) = (&pks[t], format!("c#{k}"));
                let r = history::delete(table.as_ref(), pk, &sk, Condition::Exists, FENCE_SK).await;
                match (model[t].remove(&sk), r) {
                    (Some((v, _)), Ok(done)) if v == done.previous_version => {}
                    (None, Err(StorageError::ConditionFailed { current: None, .. })) => {}
                    (m, r) => return Err(format!("{op:?}: model {m:?}, table {r:?}")),
                }
            }
            Op::Rewind(n, interrupt) => {
                let (at, then) = instants[n % instants.len()].clone();
                let pk = &pks[0];
                // The export at that instant, in small pages (the merge of
                // current items and before-images crosses page ends).
                let mut pages = history::ItemsAt::new(table.clone(), pk, at).await.map_err(|e| e.to_string())?;
                let mut exported = State::new();
                let mut last = String::new();
                while let Some(page) = pages.next_page(2).await.map_err(|e| e.to_string())? {
                    for i in page {
                        if i.sk <= last {
                            return Err(format!("items at {at} out of order: {} after {last}", i.sk));
                        }
                        last = i.sk.clone();
                        exported.insert(i.sk, (i.version, i.data));
                    }
                }
                if exported != then[0] {
                    return Err(format!("items at {at}: {exported:?}, model {:?}", then[0]));
                }
                if let Some(k) = interrupt {
                    let cut = Interrupted { inner: table.clone(), left: AtomicUsize::new(k) };
                    // Fails, or finishes within k writes; either way, running it again finishes it.
                    let _ = history::rewind(&cut, pk, at).await;
                }
                history::rewind(table.as_ref(), pk, at).await.map_err(|e| e.to_string())?;
                model[0] = then[0].clone();
                for t in 0..3 {
                    let got = stored(table.as_ref(), &pks[t]).await;
                    if got != model[t] {
                        return Err(format!("after {op:?} to {at}: tenant {t} holds {got:?}, model {:?}", model[t]));
                    }
                }
            }
        }
        instants.push((history::now_us(), model.clone()));
    }
    for t in 0..3 {
        let got = stored(table.as_ref(), &pks[t]).await;
        if got != model[t] {
            return Err(format!("at the end: tenant {t} holds {got:?}, model {:?}", model[t]));
        }
    }
    Ok(())
}

fn uuid_hex() -> String {
    unique_tenant("x").split_off(2)
}

/// The property, on the backend under test (DynamoDB: the emulator).
#[test]
fn restoring_a_tenant_to_any_instant_gives_its_items_then_and_leaves_the_others() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (table, cases, _moto): (DynTable, u32, _) = match TestBackend::from_env() {
        TestBackend::Embedded => {
            let t = tenantmesh_storage::EmbeddedTable::open(dir.path().join("h.redb")).unwrap();
            (Arc::new(t), 64, None)
        }
        TestBackend::DynamoDb => {
            let moto = moto::Moto::start();
            let table = rt.block_on(async {
                let aws = tenantmesh_isolation::aws::AwsSettings::from_env(&moto.env()).await;
                tenantmesh_storage::DynamoTable::ensure_table(&aws.dynamodb(), "history").await.unwrap();
                tenantmesh_storage::DynamoTable::new(aws.dynamodb(), "history")
            });
            (Arc::new(table), 12, Some(moto))
        }
    };
    let config = proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let ops = proptest::collection::vec(op(), 1..60);
    let result = runner.run(&ops, |ops| {
        rt.block_on(check_history(table.clone(), ops)).map_err(proptest::test_runner::TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The history kept, as the data service exports it with the items:
/// (history entries, the start of the history in µs).
async fn history_of(mesh: &TestMesh, tenant: &str, table: &str) -> (usize, Option<i64>) {
    use tenantmesh_proto::data::v1::{ExportItemsRequest, StoreRef};
    let req = ExportItemsRequest {
        store: Some(StoreRef { tenant_id: tenant.into(), table: table.into() }),
        include_history: true,
        as_of_us: None,
        charge_tenant: false,
    };
    let mut pages =
        mesh.data_admin().export_items(authed(req, &mesh.service_token().await)).await.unwrap().into_inner();
    let (mut entries, mut start) = (0, None);
    while let Some(page) = pages.message().await.unwrap() {
        for i in page.items {
            if i.sort_key.starts_with(history::PREFIX) {
                entries += 1;
            } else if i.sort_key == history::START_SK {
                start = std::str::from_utf8(&i.data).ok().and_then(|s| s.parse().ok());
            }
        }
    }
    (entries, start)
}

/// The history is trimmed to each tier's `history_days` by the stored-bytes
/// sampler (here every second): a tier that keeps none loses its entries
/// and its history then starts after them, so the instants before can no
/// longer be restored; a tier that keeps days keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_trimmed_to_the_tiers_days() {
    trimmed_to_the_tiers_days("on").await;
}

/// The same with metering off: nothing is sampled, the history is still
/// trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_trimmed_to_the_tiers_days_with_metering_off() {
    trimmed_to_the_tiers_days("off").await;
}

async fn trimmed_to_the_tiers_days(metering: &str) {
    let tiers = std::fs::read_to_string(test_tiers_file()).unwrap();
    let standard = tiers.find("name = \"standard\"").unwrap();
    let keep = standard + tiers[standard..].find("history_days = 7").unwrap();
    let tiers = format!("{}history_days = 0{}", &tiers[..keep], &tiers[keep + "history_days = 7".len()..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiers.toml");
    std::fs::write(&path, tiers).unwrap();
    let settings = [
        ("TENANTMESH_STORAGE_SAMPLE_SECS", "1"),
        ("TENANTMESH_TIERS_FILE", path.to_str().unwrap()),
        ("TENANTMESH_METERING", metering),
    ];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let admin = mesh.admin_token().await;
    let none = mesh.onboard_on(&unique_tenant("keep0"), "standard").await;
    let days = mesh.onboard_on(&unique_tenant("keep14"), "premium").await;
    let mut tables = Vec::new();
    for t in [&none, &days] {
        put(&mesh, &t.token, "k", "one").await;
        put(&mesh, &t.token, "k", "two").await;
        let req = tenantmesh_proto::registry::v1::GetTenantRequest { tenant_id: t.tenant_id.clone() };
        let tenant = mesh.registry().get_tenant(authed(req, &admin)).await.unwrap().into_inner().tenant.unwrap();
        tables.push(tenant.placement.unwrap().table);
    }
    // Both tenants' writes made two entries each (the 14-day tier shows it
    // below); the sampler may trim the 0-day one's at any second from now.
    let written = history::now_us();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let start = loop {
        match history_of(&mesh, &none.tenant_id, &tables[0]).await {
            (0, Some(start)) if start > written => break start,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "the history of a tier keeping 0 days was never trimmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (entries, _) = history_of(&mesh, &days.tenant_id, &tables[1]).await;
    assert_eq!(entries, 2, "a tier keeping 14 days lost its history");
    // Before the trim can no longer be restored; the items are as they were.
    let rewind = tenantmesh_proto::data::v1::RewindItemsRequest {
        store: Some(tenantmesh_proto::data::v1::StoreRef {
            tenant_id: none.tenant_id.clone(),
            table: tables[0].clone(),
        }),
        point_in_time_us: start - 1,
        charge_tenant: false,
    };
    let r = mesh.data_admin().rewind_items(authed(rewind, &mesh.service_token().await)).await;
    let s = expect_code(r, Code::FailedPrecondition);
    assert!(s.message().contains("history starts"), "{s:?}");
    let kept: Vec<(String, u64)> = items(&mesh, &none.token).await.into_iter().map(|i| (i.id, i.version)).collect();
    assert_eq!(kept, [("k".to_owned(), 2)]);
    mesh.shutdown().await;
}
