//! Tiers in force and bounded work, through the real mesh: a tenant held to
//! its rate while another is untouched, refusals that say which limit and
//! when to retry, password hashing and anonymous calls that a flood cannot
//! turn into unbounded work, event streams that end with their client, and
//! query pages bounded in bytes.

use std::time::Duration;

use tenantmesh_proto::auth::v1::LoginRequest;
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest, QueryItemsRequest};
use tenantmesh_proto::onboarding::v1::WatchEventsRequest;
use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};
use tenantmesh_test_support::*;
use tonic::Code;
use tonic_types::StatusExt;

/// Sends `n` GetItems for `tenant` at once; returns the refusals.
async fn burst(mesh: &TestMesh, tenant: &TestTenant, n: usize) -> Vec<tonic::Status> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (mut data, token) = (mesh.data(), tenant.token.clone());
            tokio::spawn(async move {
                data.get_item(authed(GetItemRequest { collection: "c".into(), id: format!("{i}") }, &token)).await
            })
        })
        .collect();
    let mut refused = Vec::new();
    for c in calls {
        match c.await.unwrap() {
            Err(s) if s.code() == Code::ResourceExhausted => refused.push(s),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
            Ok(r) => panic!("no item was stored: {r:?}"),
        }
    }
    refused
}

/// A tenant over its rate is refused with RESOURCE_EXHAUSTED, RetryInfo and
/// QuotaFailure naming it and its limit; another tenant sending at once is
/// never refused; after the advised wait the tenant is served again.
#[tokio::test]
async fn a_tenant_is_held_to_its_rate_and_others_are_not() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let (acme, globex) = (mesh.onboard(&unique_tenant("acme")).await, mesh.onboard(&unique_tenant("globex")).await);
    let limits = TenantLimits { requests_per_second: 5, burst: 5, max_concurrency: 100, storage_quota_bytes: 1 << 30 };
    let req = SetTenantLimitsRequest { tenant_id: acme.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();

    // Services see the new limits within their tenant cache's TTL (and
    // their lookups of acme at the registry count against acme's rate
    // there, refused alike).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refusals = loop {
        let refused = burst(&mesh, &acme, 30).await;
        if !refused.is_empty() {
            break refused;
        }
        assert!(tokio::time::Instant::now() < deadline, "acme's new limits never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refusals.len() >= 20, "30 at once on a burst of 5: only {} refused", refusals.len());
    let s = &refusals[0];
    let retry = s.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(6), "{retry:?}");
    let quota = s.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", acme.tenant_id));
    assert!(quota.violations[0].description.contains("5 requests per second"), "{quota:?}");
    assert!(s.message().contains("requests_per_second"), "{}", s.message());

    assert!(burst(&mesh, &globex, 30).await.is_empty(), "globex was refused for acme's load");

    tokio::time::sleep(retry).await;
    assert!(burst(&mesh, &acme, 1).await.is_empty(), "acme is served again after the advised wait");
    mesh.shutdown().await;
}

/// Limits must be above 0; the platform tenant's requests are not limited.
#[tokio::test]
async fn limits_are_checked_and_the_platform_is_not_limited() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let zero = TenantLimits { requests_per_second: 0, burst: 1, max_concurrency: 1, storage_quota_bytes: 1 };
    let req = SetTenantLimitsRequest { tenant_id: acme.tenant_id.clone(), limits: Some(zero) };
    expect_invalid(mesh.registry().set_tenant_limits(authed(req, &admin)).await, "limits.requests_per_second");
    // The platform admin lists tenants 50 times at once: nothing refused.
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (mut reg, token) = (mesh.registry(), admin.clone());
            tokio::spawn(async move {
                reg.list_tenants(authed(tenantmesh_proto::registry::v1::ListTenantsRequest::default(), &token)).await
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    mesh.shutdown().await;
}

/// A login flood cannot queue password checks without bound: with one
/// hashing thread and one waiting place, most of 24 logins at once are
/// refused at once with RESOURCE_EXHAUSTED (QuotaFailure: the hashing
/// pool), every call returns, and a tenant's data calls go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_refused_not_queued() {
    let settings = [
        ("TENANTMESH_HASH_THREADS", "1"),
        ("TENANTMESH_HASH_QUEUE", "1"),
        ("TENANTMESH_ARGON2_M_KIB", "8192"),
        ("TENANTMESH_ARGON2_T", "3"),
    ];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let flood: Vec<_> = (0..24)
        .map(|i| {
            let mut auth = mesh.auth();
            tokio::spawn(async move {
                let req = LoginRequest {
                    tenant_id: format!("flood-{i:03}"),
                    email: format!("nobody-{i}@example.com"),
                    password: "not-the-password".into(),
                };
                auth.login(req).await
            })
        })
        .collect();
    // The tenant's calls are answered while the flood is on.
    for _ in 0..5 {
        let get = GetItemRequest { collection: "c".into(), id: "1".into() };
        expect_code(mesh.data().get_item(authed(get, &acme.token)).await, Code::NotFound);
    }
    let (mut refused, mut checked) = (0, 0);
    for call in flood {
        match call.await.unwrap() {
            Err(s) if s.code() == Code::ResourceExhausted => {
                let quota = s.get_details_quota_failure().expect("QuotaFailure");
                assert_eq!(quota.violations[0].subject, "service:password-hashing");
                assert!(s.get_details_retry_info().is_some(), "{s:?}");
                refused += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                checked += 1;
            }
            Ok(_) => panic!("a login with a wrong password succeeded"),
        }
    }
    assert!(refused >= 1 && checked >= 1, "{refused} refused, {checked} checked");
    mesh.shutdown().await;
}

/// Calls without a token have rates of their own: failed logins naming one
/// tenant past its rate are refused (QuotaFailure `tenant:<id>`) before any
/// password is checked, while logins naming another tenant go on.
#[tokio::test]
async fn anonymous_calls_are_held_to_a_rate_per_tenant_named() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_ANON_TENANT_RATE", "1")]).await;
    let login = |tenant: &str| LoginRequest {
        tenant_id: tenant.into(),
        email: "someone@example.com".into(),
        password: "not-the-password".into(),
    };
    let target = unique_tenant("target");
    // A burst of 2, then one a second.
    for _ in 0..2 {
        expect_code(mesh.auth().login(login(&target)).await, Code::Unauthenticated);
    }
    let s = expect_code(mesh.auth().login(login(&target)).await, Code::ResourceExhausted);
    let quota = s.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{target}"));
    expect_code(mesh.auth().login(login(&unique_tenant("other"))).await, Code::Unauthenticated);
    mesh.shutdown().await;
}

/// Nobody can lock a tenant's users out by failing on purpose: made-up
/// refresh tokens naming the tenant spend nothing of its budget (a correct
/// login from the same address goes through after 60 of them), and once
/// failed logins from one address have spent the tenant's budget, that
/// address is refused (QuotaFailure `tenant:<id>`) while a correct login
/// from another address goes through.
#[tokio::test]
async fn failed_credentials_never_lock_out_a_correct_login() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_ANON_TENANT_RATE", "1")]).await;
    let globex = mesh.onboard(&unique_tenant("globex")).await;
    let auth_from = |ip: [u8; 4]| {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.addrs.auth)).unwrap();
        tenantmesh_proto::auth::v1::auth_client::AuthClient::new(
            endpoint.local_address(Some(std::net::IpAddr::from(ip))).connect_lazy(),
        )
    };
    let login = |password: &str| LoginRequest {
        tenant_id: globex.tenant_id.clone(),
        email: globex.admin_email.clone(),
        password: password.into(),
    };
    let mut user = auth_from([127, 0, 0, 1]);
    for i in 0..60 {
        let token = format!("{}.{}", globex.tenant_id, format!("{i:04}").repeat(12));
        let refresh = tenantmesh_proto::auth::v1::RefreshRequest { refresh_token: token };
        expect_code(user.refresh(refresh).await, Code::Unauthenticated);
    }
    for _ in 0..5 {
        user.login(login(&globex.admin_password)).await.expect("made-up refresh tokens blocked a correct login");
    }
    // An attacker's address spends globex's budget (a burst of 2) with wrong passwords.
    let mut attacker = auth_from([127, 0, 0, 2]);
    let mut refused = None;
    for _ in 0..10 {
        match attacker.login(login("not-the-password")).await {
            Err(s) if s.code() == Code::Unauthenticated => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused = Some(s);
                break;
            }
            other => panic!("a wrong password: {other:?}"),
        }
    }
    let refused = refused.expect("the failing address was never held to globex's budget");
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", globex.tenant_id));
    // The admin, from elsewhere, signs in.
    let mut elsewhere = auth_from([127, 0, 0, 3]);
    elsewhere.login(login(&globex.admin_password)).await.expect("a correct login from another address");
    mesh.shutdown().await;
}

/// WatchEvents streams are capped per caller, and a stream its client
/// abandoned ends on the server (its place is given back), not at the next
/// event.
#[tokio::test]
async fn event_streams_are_capped_and_end_with_their_client() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_MAX_WATCHERS", "3")]).await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let watch = || {
        let (mut onb, token) = (mesh.onboarding(), acme.token.clone());
        async move { onb.watch_events(authed(WatchEventsRequest::default(), &token)).await }
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch().await.unwrap().into_inner());
    }
    let s = expect_code(watch().await, Code::ResourceExhausted);
    assert!(s.get_details_quota_failure().is_some(), "{s:?}");
    drop(open);
    // The abandoned streams' server tasks end and give their places back.
    let (mut again, deadline) = (Vec::new(), tokio::time::Instant::now() + Duration::from_secs(10));
    while again.len() < 3 {
        match watch().await {
            Ok(s) => again.push(s.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(tokio::time::Instant::now() < deadline, "abandoned streams kept their places");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    mesh.shutdown().await;
}

/// Items near the 400 KiB limit: a QueryItems page stops at about 1 MiB
/// whatever page_size asks, and paging returns every item once.
#[tokio::test]
async fn query_pages_are_bounded_in_bytes() {
    let mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let big = "x".repeat(350 * 1024);
    for i in 0..6 {
        let put = PutItemRequest {
            collection: "big".into(),
            id: format!("{i}"),
            attributes: Some(attrs(&[("blob", &big)])),
            expected_version: None,
        };
        mesh.data().put_item(authed(put, &acme.token)).await.unwrap();
    }
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let q = QueryItemsRequest { collection: "big".into(), page_size: 100, page_token: token, ..Default::default() };
        let page = mesh.data().query_items(authed(q, &acme.token)).await.unwrap().into_inner();
        assert!(page.items.len() <= 4, "a page of {} items of 350 KB", page.items.len());
        seen.extend(page.items.into_iter().map(|i| i.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..6).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(pages >= 2);
    mesh.shutdown().await;
}

/// Writes item `big/<id>` of about 150 KB for `tenant` (moto refuses an
/// overwrite whose old and new item together pass 400 KB, which DynamoDB
/// itself allows).
fn put_blob(
    mesh: &TestMesh,
    tenant: &TestTenant,
    id: &str,
) -> impl std::future::Future<Output = Result<tonic::Response<tenantmesh_proto::data::v1::PutItemResponse>, tonic::Status>>
+ use<> {
    let (mut data, token) = (mesh.data(), tenant.token.clone());
    let req = PutItemRequest {
        collection: "big".into(),
        id: id.into(),
        attributes: Some(attrs(&[("blob", &"x".repeat(150 * 1024))])),
        expected_version: None,
    };
    async move { data.put_item(authed(req, &token)).await }
}

/// A tenant's writes stop at its storage quota with RESOURCE_EXHAUSTED and
/// QuotaFailure; deleting items makes room again; another tenant is not
/// affected; overwrites of a tenant near its quota keep working. (Items of
/// 150 KB: moto refuses an UpdateItem whose old and new item together pass
/// 400 KB, which DynamoDB itself allows.)
#[tokio::test]
async fn writes_stop_at_the_storage_quota() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_QUOTA_RESCAN_MS", "0")]).await;
    let admin = mesh.admin_token().await;
    let (acme, globex) = (mesh.onboard(&unique_tenant("acme")).await, mesh.onboard(&unique_tenant("globex")).await);
    let limits = TenantLimits {
        requests_per_second: 100_000,
        burst: 100_000,
        max_concurrency: 100,
        storage_quota_bytes: 500_000,
    };
    let req = SetTenantLimitsRequest { tenant_id: acme.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    let put = |tenant: &TestTenant, id: &str| put_blob(&mesh, tenant, id);
    // The new quota reaches the data service within its cache TTL (100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        put(&acme, &format!("{i}")).await.unwrap();
    }
    let refused = expect_code(put(&acme, "3").await, Code::ResourceExhausted);
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", acme.tenant_id));
    assert!(quota.violations[0].description.contains("storage_quota_bytes 500000"), "{quota:?}");
    // Overwriting a stored item still works (the count is corrected by a scan).
    put(&acme, "0").await.unwrap();
    put(&acme, "0").await.unwrap();
    expect_code(put(&acme, "9").await, Code::ResourceExhausted);
    // Deleting one makes room for one.
    let del = tenantmesh_proto::data::v1::DeleteItemRequest {
        collection: "big".into(),
        id: "0".into(),
        expected_version: None,
    };
    mesh.data().delete_item(authed(del, &acme.token)).await.unwrap();
    put(&acme, "9").await.unwrap();
    // globex (its tier's quota) writes on.
    for i in 0..4 {
        put(&globex, &format!("{i}")).await.unwrap();
    }
    mesh.shutdown().await;
}

/// Every byte a tenant's overwrites leave in its change history counts:
/// a tenant overwriting a large item in a loop is refused at the history's
/// cap (RESOURCE_EXHAUSTED, QuotaFailure naming `history_quota_bytes`,
/// no RetryInfo), with what it stores then within its quota and the cap;
/// deletes still go; once the history is trimmed, writes go on.
#[tokio::test]
async fn overwrites_stop_at_the_history_cap() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_QUOTA_RESCAN_MS", "0")]).await;
    let admin = mesh.admin_token().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    const QUOTA: u64 = 400_000;
    let limits =
        TenantLimits { requests_per_second: 100_000, burst: 100_000, max_concurrency: 100, storage_quota_bytes: QUOTA };
    let req = SetTenantLimitsRequest { tenant_id: acme.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let put = |id: &str| put_blob(&mesh, &acme, id);
    let mut written = 0;
    let refused = loop {
        match put("x").await {
            Ok(_) => written += 1,
            Err(s) => break s,
        }
        assert!(written <= 20, "a 150 KB item was overwritten {written} times under a 800 KB history cap");
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", acme.tenant_id));
    assert_eq!(quota.violations[0].description, format!("history_quota_bytes {}", 2 * QUOTA));
    assert!(refused.get_details_retry_info().is_none(), "waiting a few seconds does not help");
    // The first write and five overwrites of about 154 KB: a sixth would pass 800 KB.
    assert_eq!(written, 1 + 5, "{refused:?}");
    // What is stored is within the quota and the cap: the item, and the history of its overwrites.
    let service = mesh.service_token().await;
    let pooled = tenantmesh_proto::data::v1::StoreRef {
        tenant_id: acme.tenant_id.clone(),
        table: mesh.state_table_name("data"),
    };
    let export = tenantmesh_proto::data::v1::ExportItemsRequest {
        store: Some(pooled.clone()),
        include_history: true,
        as_of_us: None,
        charge_tenant: false,
    };
    let mut pages = mesh.data_admin().export_items(authed(export, &service)).await.unwrap().into_inner();
    let (mut items, mut history) = (0u64, 0u64);
    while let Some(page) = pages.message().await.unwrap() {
        for i in page.items {
            match i.sort_key.starts_with("~u#") {
                true => history += i.data.len() as u64,
                false if !i.sort_key.starts_with('~') => items += i.data.len() as u64,
                false => {}
            }
        }
    }
    assert!(items <= QUOTA && history <= 2 * QUOTA && history > QUOTA, "items {items}, history {history}");
    // A delete is never refused (it frees items), and a new small item still fits.
    let del = tenantmesh_proto::data::v1::DeleteItemRequest {
        collection: "big".into(),
        id: "x".into(),
        expected_version: None,
    };
    mesh.data().delete_item(authed(del, &acme.token)).await.unwrap();
    expect_code(put("x").await, Code::ResourceExhausted);
    // Trimmed (as the hourly trim does past history_days), the history frees and writes go on.
    let trim = tenantmesh_proto::data::v1::TrimHistoryRequest { store: Some(pooled), before_us: i64::MAX / 2 };
    mesh.data_admin().trim_history(authed(trim, &service)).await.unwrap();
    put("x").await.unwrap();
    mesh.shutdown().await;
}

/// Requests cost DynamoDB's units: a 300 KB write costs 300 write units,
/// all of them charged after it (never capped at a burst), so the tenant's
/// next request waits until its rate has paid for the write; small
/// requests cost one token each.
#[tokio::test]
async fn large_writes_cost_more_tokens() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let limits =
        TenantLimits { requests_per_second: 10, burst: 10, max_concurrency: 100, storage_quota_bytes: 1 << 30 };
    let req = SetTenantLimitsRequest { tenant_id: acme.tenant_id.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(req, &admin)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let put = |blob: String| {
        let (mut data, token) = (mesh.data(), acme.token.clone());
        let req = PutItemRequest {
            collection: "c".into(),
            id: "x".into(),
            attributes: Some(attrs(&[("blob", &blob)])),
            expected_version: None,
        };
        async move { data.put_item(authed(req, &token)).await }
    };
    let get = || {
        let (mut data, token) = (mesh.data(), acme.token.clone());
        async move { data.get_item(authed(GetItemRequest { collection: "c".into(), id: "x".into() }, &token)).await }
    };
    // Small calls: one token each, well within the burst of 10.
    put("small".into()).await.unwrap();
    get().await.unwrap();
    // A 300 KB write is admitted, then charged its 300 units: at 10 per
    // second with a burst of 10, the next call waits about 29 s.
    put("x".repeat(300 * 1024)).await.unwrap();
    let s = expect_code(get().await, Code::ResourceExhausted);
    let retry = s.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(retry > Duration::from_secs(25), "the write's cost was not charged whole: retry after {retry:?}");
    mesh.shutdown().await;
}
