//! Contract tests of `tenantmesh.data.v1.Data`, through the whole mesh
//! in-process: every RPC, happy and error paths, and tenant isolation.

use tenantmesh_proto::auth::v1::Role;
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::registry::v1::{SetTenantStatusRequest, TenantStatus};
use tenantmesh_test_support::*;
use tonic::Code;

fn put(collection: &str, id: &str, pairs: &[(&str, &str)], expected_version: Option<u64>) -> PutItemRequest {
    PutItemRequest { collection: collection.into(), id: id.into(), attributes: Some(attrs(pairs)), expected_version }
}

fn get(collection: &str, id: &str) -> GetItemRequest {
    GetItemRequest { collection: collection.into(), id: id.into() }
}

fn query(collection: &str, id_prefix: &str, page_size: i32, page_token: &str) -> QueryItemsRequest {
    QueryItemsRequest {
        collection: collection.into(),
        id_prefix: id_prefix.into(),
        page_size,
        page_token: page_token.into(),
    }
}

fn title(item: &Item) -> String {
    match item.attributes.as_ref().and_then(|a| a.fields.get("title")).and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        other => panic!("no title: {other:?}"),
    }
}

/// Put, get, optimistic versions and delete behave as the proto documents.
#[tokio::test]
async fn put_get_versions_and_delete() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("acme")).await;
    let mut data = mesh.data();

    let created = data.put_item(authed(put("notes", "n1", &[("title", "one")], Some(0)), &t.token)).await.unwrap();
    let item = created.into_inner().item.unwrap();
    assert_eq!((item.version, title(&item)), (1, "one".to_owned()));
    assert!(item.update_time_ms > 0);

    // expected_version 0 means "must not exist": refused now that it does.
    let s = expect_code(
        data.put_item(authed(put("notes", "n1", &[("title", "x")], Some(0)), &t.token)).await,
        Code::Aborted,
    );
    assert!(s.message().contains("version mismatch"), "{s:?}");
    expect_code(data.put_item(authed(put("notes", "n1", &[("title", "x")], Some(7)), &t.token)).await, Code::Aborted);
    let got = data.get_item(authed(get("notes", "n1"), &t.token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!((got.version, title(&got)), (1, "one".to_owned()), "a refused write changed the item");

    let v2 = data.put_item(authed(put("notes", "n1", &[("title", "two")], Some(1)), &t.token)).await.unwrap();
    assert_eq!(v2.into_inner().item.unwrap().version, 2);
    let v3 = data.put_item(authed(put("notes", "n1", &[("title", "three")], None), &t.token)).await.unwrap();
    assert_eq!(v3.into_inner().item.unwrap().version, 3, "an unconditional put still bumps the version");

    let del = |v| DeleteItemRequest { collection: "notes".into(), id: "n1".into(), expected_version: v };
    expect_code(data.delete_item(authed(del(Some(2)), &t.token)).await, Code::Aborted);
    data.delete_item(authed(del(Some(3)), &t.token)).await.unwrap();
    expect_code(data.get_item(authed(get("notes", "n1"), &t.token)).await, Code::NotFound);
    expect_code(data.delete_item(authed(del(None), &t.token)).await, Code::NotFound);
    mesh.shutdown().await;
}

/// Queries page through a collection in id order and honour id_prefix.
#[tokio::test]
async fn query_pages_and_prefix() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("pager")).await;
    let mut data = mesh.data();
    for i in 0..25 {
        let id = format!("item-{i:02}");
        data.put_item(authed(put("things", &id, &[("title", &id)], None), &t.token)).await.unwrap();
    }
    data.put_item(authed(put("things", "other-1", &[("title", "o")], None), &t.token)).await.unwrap();
    data.put_item(authed(put("elsewhere", "item-00", &[("title", "e")], None), &t.token)).await.unwrap();

    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = data.query_items(authed(query("things", "item-", 10, &token), &t.token)).await.unwrap().into_inner();
        pages += 1;
        assert!(page.items.len() <= 10);
        ids.extend(page.items.iter().map(|i| i.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(ids, (0..25).map(|i| format!("item-{i:02}")).collect::<Vec<_>>());

    let all = data.query_items(authed(query("things", "", 0, ""), &t.token)).await.unwrap().into_inner();
    assert_eq!(all.items.len(), 26, "default page size covers the whole collection");
    assert!(all.next_page_token.is_empty());
    mesh.shutdown().await;
}

/// Tenant B can neither read, list, overwrite nor delete tenant A's items,
/// even naming the same collection and id, or replaying A's page token.
#[tokio::test]
async fn tenants_cannot_see_each_others_items() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let mut data = mesh.data();

    for id in ["n1", "n2", "n3"] {
        data.put_item(authed(put("notes", id, &[("title", "secret of a")], None), &a.token)).await.unwrap();
    }
    expect_code(data.get_item(authed(get("notes", "n1"), &b.token)).await, Code::NotFound);
    let listed = data.query_items(authed(query("notes", "", 0, ""), &b.token)).await.unwrap().into_inner();
    assert!(listed.items.is_empty(), "b listed a's items: {:?}", listed.items);

    // B writing the same key creates B's own item; A's is untouched.
    let bs = data.put_item(authed(put("notes", "n1", &[("title", "b's")], Some(0)), &b.token)).await.unwrap();
    assert_eq!(bs.into_inner().item.unwrap().version, 1);
    let a1 = data.get_item(authed(get("notes", "n1"), &a.token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!((a1.version, title(&a1)), (1, "secret of a".to_owned()));

    expect_code(
        data.delete_item(authed(
            DeleteItemRequest { collection: "notes".into(), id: "n2".into(), expected_version: None },
            &b.token,
        ))
        .await,
        Code::NotFound,
    );
    assert!(data.get_item(authed(get("notes", "n2"), &a.token)).await.is_ok());

    // A's page token replayed by B still only reaches B's partition.
    let a_page = data.query_items(authed(query("notes", "", 1, ""), &a.token)).await.unwrap().into_inner();
    assert!(!a_page.next_page_token.is_empty());
    let b_page =
        data.query_items(authed(query("notes", "", 10, &a_page.next_page_token), &b.token)).await.unwrap().into_inner();
    assert!(b_page.items.iter().all(|i| title(i) == "b's"), "{:?}", b_page.items);
    mesh.shutdown().await;
}

/// Bad input is INVALID_ARGUMENT naming the field, never INTERNAL.
#[tokio::test]
async fn bad_input_names_the_field() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("valid")).await;
    let mut data = mesh.data();
    expect_invalid(data.put_item(authed(put("", "x", &[], None), &t.token)).await, "collection");
    expect_invalid(data.put_item(authed(put("bad collection", "x", &[], None), &t.token)).await, "collection");
    expect_invalid(data.put_item(authed(put("c#1", "x", &[], None), &t.token)).await, "collection");
    expect_invalid(data.put_item(authed(put("c", "", &[], None), &t.token)).await, "id");
    expect_invalid(data.put_item(authed(put("c", &"x".repeat(257), &[], None), &t.token)).await, "id");
    let big = "x".repeat(401 * 1024);
    expect_invalid(data.put_item(authed(put("c", "big", &[("blob", &big)], None), &t.token)).await, "attributes");
    expect_invalid(data.get_item(authed(get("c", "a/b"), &t.token)).await, "id");
    expect_invalid(data.query_items(authed(query("c", "", 1001, ""), &t.token)).await, "page_size");
    expect_invalid(data.query_items(authed(query("c", "", -1, ""), &t.token)).await, "page_size");
    expect_invalid(data.query_items(authed(query("c", "", 10, "not-a-token"), &t.token)).await, "page_token");
    expect_invalid(
        data.delete_item(authed(
            DeleteItemRequest { collection: "c".into(), id: "x".into(), expected_version: Some(0) },
            &t.token,
        ))
        .await,
        "expected_version",
    );
    // A token from another collection's query cannot widen this one.
    for id in ["a", "b"] {
        data.put_item(authed(put("one", id, &[], None), &t.token)).await.unwrap();
    }
    let page = data.query_items(authed(query("one", "", 1, ""), &t.token)).await.unwrap().into_inner();
    expect_invalid(data.query_items(authed(query("two", "", 1, &page.next_page_token), &t.token)).await, "page_token");
    mesh.shutdown().await;
}

/// Identity is enforced before any handler: no token, a spoofed
/// x-tenant-id, a service identity and a suspended tenant are all refused.
#[tokio::test]
async fn callers_without_a_valid_tenant_identity_are_refused() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let mut data = mesh.data();

    expect_code(data.get_item(get("notes", "n1")).await, Code::Unauthenticated);
    expect_code(data.get_item(authed(get("notes", "n1"), "not-a-jwt")).await, Code::Unauthenticated);

    let mut spoofed = authed(get("notes", "n1"), &a.token);
    spoofed.metadata_mut().insert("x-tenant-id", b.tenant_id.parse().unwrap());
    expect_code(data.get_item(spoofed).await, Code::PermissionDenied);
    let mut matching = authed(get("notes", "n1"), &a.token);
    matching.metadata_mut().insert("x-tenant-id", a.tenant_id.parse().unwrap());
    expect_code(data.get_item(matching).await, Code::NotFound);

    let service = mesh.service_token().await;
    expect_code(data.get_item(authed(get("notes", "n1"), &service)).await, Code::PermissionDenied);

    // A plain tenant user may use data.
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    data.put_item(authed(put("notes", "u1", &[("title", "by user")], None), &user)).await.unwrap();

    let admin = mesh.admin_token().await;
    mesh.registry()
        .set_tenant_status(authed(
            SetTenantStatusRequest { tenant_id: a.tenant_id.clone(), status: TenantStatus::Suspended as i32 },
            &admin,
        ))
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(5), || {
        let mut data = mesh.data();
        let token = a.token.clone();
        async move {
            matches!(data.get_item(authed(get("notes", "u1"), &token)).await, Err(s) if s.code() == Code::PermissionDenied)
        }
    })
    .await;
    mesh.shutdown().await;
}

/// DataAdmin refuses what it must: tables that are not the tenant's,
/// the pooled table where a dedicated one is meant, bad imports; and an
/// import keeps versions and replaces, so running it twice leaves one copy.
#[tokio::test]
async fn data_admin_checks_its_input() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("adm")).await;
    let svc = mesh.service_token().await;
    let mut admin = mesh.data_admin();
    let pooled = mesh.state_table_name("data");
    let own = format!("{}tenant-{}-bridge", pooled.trim_end_matches("data"), t.tenant_id);
    let store = |table: &str| Some(StoreRef { tenant_id: t.tenant_id.clone(), table: table.into() });

    let r =
        admin.provision_store(authed(ProvisionStoreRequest { store: store(&pooled), tier: "premium".into() }, &svc));
    expect_invalid(r.await, "store.table");
    let r = admin
        .provision_store(authed(ProvisionStoreRequest { store: store("tenantmesh-auth"), tier: "x".into() }, &svc));
    expect_invalid(r.await, "store.table");
    let r = admin.provision_store(authed(ProvisionStoreRequest { store: store(&own), tier: String::new() }, &svc));
    expect_invalid(r.await, "tier");
    expect_invalid(admin.drop_store(authed(DropStoreRequest { store: None }, &svc)).await, "store");
    let bad_tenant = Some(StoreRef { tenant_id: "Bad!".into(), table: pooled.clone() });
    expect_invalid(admin.purge_items(authed(PurgeItemsRequest { store: bad_tenant }, &svc)).await, "store.tenant_id");
    // A dedicated table that was never provisioned.
    let r = admin.export_items(authed(ExportItemsRequest { store: store(&own), ..Default::default() }, &svc)).await;
    expect_code(r, Code::FailedPrecondition);

    let item = |sk: &str, version: u64| StoredItem {
        sort_key: sk.into(),
        version,
        data: prost::Message::encode_to_vec(&Item { collection: "c".into(), id: "1".into(), ..Default::default() }),
    };
    let import = |items: Vec<StoredItem>| ImportItemsRequest { store: store(&pooled), items };
    for _ in 0..2 {
        admin.import_items(authed(import(vec![item("c#1", 7)]), &svc)).await.unwrap();
    }
    let got = mesh.data().get_item(authed(GetItemRequest { collection: "c".into(), id: "1".into() }, &t.token)).await;
    assert_eq!(got.unwrap().into_inner().item.unwrap().version, 7);
    expect_invalid(admin.import_items(authed(import(vec![item("", 1)]), &svc)).await, "items[0].sort_key");
    expect_invalid(admin.import_items(authed(import(vec![item("c#2", 0)]), &svc)).await, "items[0].version");
    let many = (0..501).map(|i| item(&format!("c#{i}"), 1)).collect();
    expect_invalid(admin.import_items(authed(import(many), &svc)).await, "items");
    let purged = admin.purge_items(authed(PurgeItemsRequest { store: store(&pooled) }, &svc)).await.unwrap();
    assert_eq!(purged.into_inner().deleted, 1);
    mesh.shutdown().await;
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// SetFence keeps a tenant's writes out of a table until it is lowered;
/// RewindItems puts its items back as they were at an instant (refusing
/// an instant before its history starts); TrimHistory drops the history
/// before an instant, after which that instant cannot be restored.
#[tokio::test]
async fn fence_rewind_and_trim() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("fence")).await;
    let (svc, mut admin, mut data) = (mesh.service_token().await, mesh.data_admin(), mesh.data());
    let store = Some(StoreRef { tenant_id: t.tenant_id.clone(), table: mesh.state_table_name("data") });
    let fence = |raised: bool| SetFenceRequest { store: store.clone(), raised };

    data.put_item(authed(put("notes", "n1", &[("title", "one")], None), &t.token)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let before_two = now_us();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    data.put_item(authed(put("notes", "n1", &[("title", "two")], None), &t.token)).await.unwrap();
    data.put_item(authed(put("notes", "n2", &[("title", "new")], None), &t.token)).await.unwrap();

    assert!(admin.set_fence(authed(fence(true), &svc)).await.unwrap().into_inner().changed);
    assert!(!admin.set_fence(authed(fence(true), &svc)).await.unwrap().into_inner().changed, "raised twice");
    let fenced = data.put_item(authed(put("notes", "n3", &[("title", "x")], None), &t.token)).await;
    expect_code(fenced, Code::Unavailable);

    let rewind = |at: i64| RewindItemsRequest { store: store.clone(), point_in_time_us: at, charge_tenant: false };
    let done = admin.rewind_items(authed(rewind(before_two), &svc)).await.unwrap().into_inner();
    assert_eq!((done.restored, done.deleted), (1, 1), "n1 back to one, n2 gone");
    assert!(admin.set_fence(authed(fence(false), &svc)).await.unwrap().into_inner().changed);
    let n1 = data.get_item(authed(get("notes", "n1"), &t.token)).await.unwrap().into_inner().item.unwrap();
    assert_eq!(title(&n1), "one");
    expect_code(data.get_item(authed(get("notes", "n2"), &t.token)).await, Code::NotFound);
    expect_invalid(admin.rewind_items(authed(rewind(0), &svc)).await, "point_in_time_us");
    expect_code(admin.rewind_items(authed(rewind(1), &svc)).await, Code::FailedPrecondition);

    let trim = TrimHistoryRequest { store: store.clone(), before_us: now_us() };
    assert!(admin.trim_history(authed(trim, &svc)).await.unwrap().into_inner().trimmed >= 3);
    expect_code(admin.rewind_items(authed(rewind(before_two), &svc)).await, Code::FailedPrecondition);
    expect_invalid(admin.trim_history(authed(TrimHistoryRequest { store: None, before_us: 1 }, &svc)).await, "store");
    mesh.shutdown().await;
}

/// Metering: application events count once and are read back per window,
/// exported, priced per tenant and across tenants; a tenant admin reads
/// only its own tenant.
#[tokio::test]
async fn usage_is_recorded_read_exported_and_priced() {
    use tenantmesh_proto::metering::v1::*;
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("meter")).await;
    let other = mesh.onboard(&unique_tenant("other")).await;
    let (svc, admin, mut m) = (mesh.service_token().await, mesh.admin_token().await, mesh.metering());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let event = |id: &str, value: i64| UsageEvent {
        id: id.into(),
        tenant_id: t.tenant_id.clone(),
        meter: "orders".into(),
        value,
        time: now,
        ..Default::default()
    };
    let recorded = m.record_usage(authed(RecordUsageRequest { events: vec![event("o1", 3), event("o2", 4)] }, &svc));
    assert_eq!(recorded.await.unwrap().into_inner().recorded, 2);
    let again = m.record_usage(authed(RecordUsageRequest { events: vec![event("o1", 3)] }, &svc)).await.unwrap();
    assert_eq!(again.into_inner().duplicates, 1);
    let bad = m.record_usage(authed(RecordUsageRequest { events: vec![event("", 1)] }, &svc)).await;
    expect_invalid(bad, "events[0].id");

    let usage = |tenant: &str| GetUsageRequest {
        tenant_id: tenant.into(),
        meter: "orders".into(),
        from: now - 3600,
        to: now + 60,
        window: Window::Hour as i32,
        group_by: vec![],
    };
    let rows = m.get_usage(authed(usage(&t.tenant_id), &t.token)).await.unwrap().into_inner().rows;
    assert_eq!(rows.iter().map(|r| r.value).sum::<i64>(), 7);
    expect_code(m.get_usage(authed(usage(&other.tenant_id), &t.token)).await, Code::PermissionDenied);
    let empty = GetUsageRequest { from: now, to: now - 1, ..usage(&t.tenant_id) };
    expect_code(m.get_usage(authed(empty, &t.token)).await, Code::InvalidArgument);

    let export = ExportUsageRequest {
        tenant_id: t.tenant_id.clone(),
        from: now - 3600,
        to: now + 60,
        window: Window::Hour as i32,
        format: ExportFormat::Jsonl as i32,
    };
    let mut stream = m.export_usage(authed(export, &t.token)).await.unwrap().into_inner();
    let mut jsonl = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        jsonl.extend(chunk.data);
    }
    let text = String::from_utf8(jsonl).unwrap();
    assert!(text.lines().any(|l| l.contains("\"orders\"")), "{text}");

    let cost = GetTenantCostRequest { tenant_id: t.tenant_id.clone(), from: now - 3600, to: now + 60 };
    let cost = m.get_tenant_cost(authed(cost, &t.token)).await.unwrap().into_inner().cost.unwrap();
    assert_eq!(cost.tenant_id, t.tenant_id);
    assert!((cost.margin - (cost.revenue - cost.cost)).abs() < 1e-9, "{cost:?}");
    let all = ListTenantCostsRequest { from: now - 3600, to: now + 60 };
    expect_code(m.list_tenant_costs(authed(all, &t.token)).await, Code::PermissionDenied);
    let all = m.list_tenant_costs(authed(all, &admin)).await.unwrap().into_inner().tenants;
    assert!(all.iter().any(|c| c.tenant_id == t.tenant_id) && all.iter().any(|c| c.tenant_id == other.tenant_id));
    mesh.shutdown().await;
}

/// TakeBackup streams a manifest and then the files it lists, for the
/// operator only; on DynamoDB it is FAILED_PRECONDITION, pointing at the
/// tables' own point-in-time recovery.
#[tokio::test]
async fn backups_stream_a_manifest_then_its_files() {
    use tenantmesh_proto::backup::v1::backup_client::BackupClient;
    use tenantmesh_proto::backup::v1::{TakeBackupRequest, take_backup_response::Chunk as Part};
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("backup")).await;
    let mut backup = BackupClient::new(TestMesh::channel(mesh.addrs.data));
    expect_code(backup.take_backup(authed(TakeBackupRequest {}, &t.token)).await.map(drop), Code::PermissionDenied);
    let taken = backup.take_backup(authed(TakeBackupRequest {}, &mesh.admin_token().await)).await;
    if mesh.backend() == TestBackend::DynamoDb {
        let s = expect_code(taken.map(drop), Code::FailedPrecondition);
        assert!(s.message().contains("point-in-time recovery"), "{s:?}");
        return mesh.shutdown().await;
    }
    let mut stream = taken.unwrap();
    let first = stream.get_mut().message().await.unwrap().and_then(|r| r.chunk);
    let Some(Part::Manifest(manifest)) = first else { panic!("the manifest comes first: {first:?}") };
    assert!(manifest.taken_at_ms > 0 && !manifest.files.is_empty());
    let mut bytes = 0u64;
    while let Some(r) = stream.get_mut().message().await.unwrap() {
        if let Some(Part::Data(d)) = r.chunk {
            bytes += d.len() as u64;
        }
    }
    assert_eq!(bytes, manifest.files.iter().map(|f| f.size).sum::<u64>(), "every listed byte, once");
    mesh.shutdown().await;
}

/// Every RPC of the services the data service hosts has a test here.
#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers(
        include_str!("contract.rs"),
        &[
            "tenantmesh.data.v1.Data",
            "tenantmesh.data.v1.DataAdmin",
            "tenantmesh.metering.v1.Metering",
            "tenantmesh.backup.v1.Backup",
        ],
    );
}
