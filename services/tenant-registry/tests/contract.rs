//! Contract tests of `tenantmesh.registry.v1.TenantRegistry`: every RPC,
//! happy and error paths, and who may call what.

use tenantmesh_proto::registry::v1::*;
use tenantmesh_test_support::*;
use tonic::Code;

fn create(id: &str, tier: &str) -> CreateTenantRequest {
    CreateTenantRequest { tenant_id: id.into(), name: format!("Tenant {id}"), tier: tier.into(), ..Default::default() }
}

/// A platform admin creates, reads, lists, updates and suspends tenants;
/// versions count the writes.
#[tokio::test]
async fn tenant_lifecycle() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    let id = unique_tenant("life");

    let t = reg.create_tenant(authed(create(&id, "basic"), &admin)).await.unwrap().into_inner().tenant.unwrap();
    assert_eq!(t.status, TenantStatus::Provisioning as i32, "new tenants start provisioning");
    assert_eq!(t.isolation_model, IsolationModel::Pool as i32);
    assert_eq!(t.version, 1);
    assert!(t.create_time > 0);

    let got = reg.get_tenant(authed(GetTenantRequest { tenant_id: id.clone() }, &admin)).await.unwrap();
    assert_eq!(got.into_inner().tenant.unwrap(), t);

    let upd = |name: &str, tier: &str, v: Option<u64>| UpdateTenantRequest {
        tenant_id: id.clone(),
        name: name.into(),
        tier: tier.into(),
        expected_version: v,
    };
    let u = reg.update_tenant(authed(upd("Renamed", "standard", Some(1)), &admin)).await.unwrap().into_inner();
    let u = u.tenant.unwrap();
    assert_eq!((u.name.as_str(), u.tier.as_str(), u.version), ("Renamed", "standard", 2));
    expect_code(reg.update_tenant(authed(upd("Again", "", Some(1)), &admin)).await, Code::Aborted);
    let s = expect_code(reg.update_tenant(authed(upd("", "premium", None), &admin)).await, Code::FailedPrecondition);
    assert!(s.message().contains("isolation model"), "{s:?}");
    expect_invalid(reg.update_tenant(authed(upd("", "", None), &admin)).await, "name");
    expect_invalid(reg.update_tenant(authed(upd("", "gold", None), &admin)).await, "tier");
    expect_code(
        reg.update_tenant(authed(
            UpdateTenantRequest {
                tenant_id: unique_tenant("nope"),
                name: "x".into(),
                tier: String::new(),
                expected_version: None,
            },
            &admin,
        ))
        .await,
        Code::NotFound,
    );

    let status = |s: TenantStatus| SetTenantStatusRequest { tenant_id: id.clone(), status: s as i32 };
    let s = reg.set_tenant_status(authed(status(TenantStatus::Suspended), &admin)).await.unwrap().into_inner();
    assert_eq!(s.tenant.unwrap().status, TenantStatus::Suspended as i32);
    expect_invalid(reg.set_tenant_status(authed(status(TenantStatus::Unspecified), &admin)).await, "status");
    expect_code(
        reg.set_tenant_status(authed(
            SetTenantStatusRequest { tenant_id: "platform".into(), status: TenantStatus::Suspended as i32 },
            &admin,
        ))
        .await,
        Code::FailedPrecondition,
    );
    mesh.shutdown().await;
}

/// ListTenants pages through every tenant once, in id order.
#[tokio::test]
async fn list_tenants_pages() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    let mut created: Vec<String> = (0..5).map(|i| format!("{}-{i}", unique_tenant("list"))).collect();
    for id in &created {
        reg.create_tenant(authed(create(id, "basic"), &admin)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = reg
            .list_tenants(authed(ListTenantsRequest { page_size: 2, page_token: token.clone() }, &admin))
            .await
            .unwrap()
            .into_inner();
        assert!(page.tenants.len() <= 2);
        seen.extend(page.tenants.into_iter().map(|t| t.tenant_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    created.push("platform".into());
    created.sort();
    assert_eq!(seen, created);
    expect_invalid(
        reg.list_tenants(authed(ListTenantsRequest { page_size: 1001, page_token: String::new() }, &admin)).await,
        "page_size",
    );
    expect_invalid(
        reg.list_tenants(authed(ListTenantsRequest { page_size: 1, page_token: "junk".into() }, &admin)).await,
        "page_token",
    );
    mesh.shutdown().await;
}

/// CreateTenant refuses bad ids, names, tiers and statuses by field, and
/// a taken id with ALREADY_EXISTS.
#[tokio::test]
async fn create_tenant_validation() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    for bad in ["ab", "Acme", "-acme", "acme_1", "a*b", &"a".repeat(64)] {
        expect_invalid(reg.create_tenant(authed(create(bad, "basic"), &admin)).await, "tenant_id");
    }
    expect_invalid(reg.create_tenant(authed(create(&unique_tenant("t"), "gold"), &admin)).await, "tier");
    let mut no_name = create(&unique_tenant("t"), "basic");
    no_name.name.clear();
    expect_invalid(reg.create_tenant(authed(no_name, &admin)).await, "name");
    let mut deleted = create(&unique_tenant("t"), "basic");
    deleted.status = TenantStatus::Deleted as i32;
    expect_invalid(reg.create_tenant(authed(deleted, &admin)).await, "status");
    expect_code(reg.create_tenant(authed(create("platform", "basic"), &admin)).await, Code::AlreadyExists);
    expect_code(
        reg.get_tenant(authed(GetTenantRequest { tenant_id: unique_tenant("missing") }, &admin)).await,
        Code::NotFound,
    );
    mesh.shutdown().await;
}

/// Tenant admins read only their own tenant and cannot manage tenants.
#[tokio::test]
async fn tenant_roles_are_confined() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let mut reg = mesh.registry();
    let own = reg.get_tenant(authed(GetTenantRequest { tenant_id: a.tenant_id.clone() }, &a.token)).await.unwrap();
    assert_eq!(own.into_inner().tenant.unwrap().status, TenantStatus::Active as i32);
    expect_code(
        reg.get_tenant(authed(GetTenantRequest { tenant_id: b.tenant_id.clone() }, &a.token)).await,
        Code::PermissionDenied,
    );
    expect_code(
        reg.create_tenant(authed(create(&unique_tenant("x"), "basic"), &a.token)).await,
        Code::PermissionDenied,
    );
    expect_code(reg.list_tenants(authed(ListTenantsRequest::default(), &a.token)).await, Code::PermissionDenied);
    expect_code(
        reg.set_tenant_status(authed(
            SetTenantStatusRequest { tenant_id: a.tenant_id.clone(), status: TenantStatus::Active as i32 },
            &a.token,
        ))
        .await,
        Code::PermissionDenied,
    );
    expect_code(reg.get_tenant(GetTenantRequest { tenant_id: a.tenant_id.clone() }).await, Code::Unauthenticated);
    // A service identity may read any tenant (the platform's own lookups).
    let service = mesh.service_token().await;
    reg.get_tenant(authed(GetTenantRequest { tenant_id: b.tenant_id.clone() }, &service)).await.unwrap();
    mesh.shutdown().await;
}

/// SetPlacement records tier, placement and status in one write, checks the
/// placement against the tier's model, honours expected_version, and never
/// touches the platform tenant; SetTenantLimits records limits.
#[tokio::test]
async fn placement_and_limits() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    let id = unique_tenant("place");
    reg.create_tenant(authed(create(&id, "standard"), &admin)).await.unwrap();
    let bridge = Placement {
        model: IsolationModel::Bridge as i32,
        table: format!("tenantmesh-tenant-{id}-bridge"),
        endpoint: String::new(),
    };
    let req = |tier: &str, p: Option<Placement>, status: TenantStatus, v: Option<u64>| SetPlacementRequest {
        tenant_id: id.clone(),
        tier: tier.into(),
        placement: p,
        status: status as i32,
        expected_version: v,
    };
    let t = reg
        .set_placement(authed(req("premium", Some(bridge.clone()), TenantStatus::Migrating, Some(1)), &admin))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(
        (t.tier.as_str(), t.isolation_model, t.status, t.placement.as_ref(), t.version),
        ("premium", IsolationModel::Bridge as i32, TenantStatus::Migrating as i32, Some(&bridge), 2)
    );
    // UNSPECIFIED keeps the status; a stale version is ABORTED.
    let same = reg.set_placement(authed(req("", Some(bridge.clone()), TenantStatus::Unspecified, None), &admin));
    assert_eq!(same.await.unwrap().into_inner().tenant.unwrap().status, TenantStatus::Migrating as i32);
    let stale = reg.set_placement(authed(req("", Some(bridge.clone()), TenantStatus::Active, Some(1)), &admin));
    expect_code(stale.await, Code::Aborted);

    // A pool placement on a bridge tier, with or without naming the tier.
    let pool =
        Placement { model: IsolationModel::Pool as i32, table: "tenantmesh-data".into(), endpoint: String::new() };
    let r = reg.set_placement(authed(req("premium", Some(pool.clone()), TenantStatus::Active, None), &admin)).await;
    expect_invalid(r, "placement.model");
    let r = reg.set_placement(authed(req("", Some(pool), TenantStatus::Active, None), &admin)).await;
    expect_code(r, Code::FailedPrecondition);
    let mut bad = bridge.clone();
    bad.table = "no spaces allowed".into();
    expect_invalid(
        reg.set_placement(authed(req("", Some(bad), TenantStatus::Active, None), &admin)).await,
        "placement.table",
    );
    let mut bad = bridge.clone();
    bad.endpoint = "http://127.0.0.1:1".into();
    let r = reg.set_placement(authed(req("", Some(bad), TenantStatus::Active, None), &admin)).await;
    expect_invalid(r, "placement.endpoint");
    let silo = Placement { model: IsolationModel::Silo as i32, table: "t-silo".into(), endpoint: "ftp://x".into() };
    let r = reg.set_placement(authed(req("enterprise", Some(silo), TenantStatus::Active, None), &admin)).await;
    expect_invalid(r, "placement.endpoint");
    expect_invalid(reg.set_placement(authed(req("", None, TenantStatus::Active, None), &admin)).await, "placement");
    let r = reg.set_placement(authed(req("", Some(bridge.clone()), TenantStatus::Deleted, None), &admin)).await;
    expect_invalid(r, "status");
    let mut platform = req("", Some(bridge.clone()), TenantStatus::Active, None);
    platform.tenant_id = "platform".into();
    expect_code(reg.set_placement(authed(platform, &admin)).await, Code::FailedPrecondition);

    let limits = TenantLimits { requests_per_second: 7, burst: 8, max_concurrency: 9, storage_quota_bytes: 10 };
    let lreq = |l: Option<TenantLimits>| SetTenantLimitsRequest { tenant_id: id.clone(), limits: l };
    let t = reg.set_tenant_limits(authed(lreq(Some(limits)), &admin)).await.unwrap().into_inner().tenant.unwrap();
    assert_eq!(t.limits, Some(limits));
    expect_invalid(reg.set_tenant_limits(authed(lreq(None), &admin)).await, "limits");
    let zero = TenantLimits { burst: 0, ..limits };
    expect_invalid(reg.set_tenant_limits(authed(lreq(Some(zero)), &admin)).await, "limits.burst");

    // Tenants themselves never move their own placement.
    let tenant = mesh.onboard(&unique_tenant("self")).await;
    let mut own = req("", Some(bridge), TenantStatus::Active, None);
    own.tenant_id = tenant.tenant_id.clone();
    expect_code(reg.set_placement(authed(own, &tenant.token)).await, Code::PermissionDenied);
    mesh.shutdown().await;
}

/// SetIdentityProvider binds a tenant to an external identity provider
/// (checked: https keys, a tenant claim) and unbinds it; only the platform
/// may.
#[tokio::test]
async fn identity_providers_are_bound_and_unbound() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("idp")).await;
    let mut reg = mesh.registry();
    let idp = IdentityProvider {
        issuer: "https://idp.example/pool".into(),
        jwks_url: "https://idp.example/pool/.well-known/jwks.json".into(),
        audience: "app-client".into(),
        tenant_claim: "custom:tenant_id".into(),
    };
    let bind = |p: Option<IdentityProvider>| SetIdentityProviderRequest {
        tenant_id: t.tenant_id.clone(),
        identity_provider: p,
    };
    let bound = reg.set_identity_provider(authed(bind(Some(idp.clone())), &admin)).await.unwrap();
    assert_eq!(bound.into_inner().tenant.unwrap().identity_provider, Some(idp.clone()));
    expect_code(reg.set_identity_provider(authed(bind(Some(idp.clone())), &t.token)).await, Code::PermissionDenied);
    let plain_http = IdentityProvider { jwks_url: "http://idp.example/jwks.json".into(), ..idp.clone() };
    expect_code(reg.set_identity_provider(authed(bind(Some(plain_http)), &admin)).await, Code::InvalidArgument);
    let no_claim = IdentityProvider { tenant_claim: String::new(), ..idp };
    expect_code(reg.set_identity_provider(authed(bind(Some(no_claim)), &admin)).await, Code::InvalidArgument);
    let unbound = reg.set_identity_provider(authed(bind(None), &admin)).await.unwrap();
    assert_eq!(unbound.into_inner().tenant.unwrap().identity_provider, None);
    mesh.shutdown().await;
}

/// WatchTenants, for service identities with the directory scope and the platform admin: a reset
/// first, then the id of each tenant whose record changes.
#[tokio::test]
async fn watchers_hear_of_each_change() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("watched")).await;
    let mut reg = mesh.registry();
    // A tenant's admin may not watch; the platform admin may (the console's live fleet).
    expect_code(reg.watch_tenants(authed(WatchTenantsRequest {}, &t.token)).await.map(drop), Code::PermissionDenied);
    let mut operator = reg.watch_tenants(authed(WatchTenantsRequest {}, &admin)).await.unwrap().into_inner();
    assert!(operator.message().await.unwrap().unwrap().reset);
    let directory = mesh.service_token_as("tests-directory").await;
    let mut stream = reg.watch_tenants(authed(WatchTenantsRequest {}, &directory)).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().unwrap().reset, "a reset comes first");
    let suspend = SetTenantStatusRequest { tenant_id: t.tenant_id.clone(), status: TenantStatus::Suspended as i32 };
    reg.set_tenant_status(authed(suspend, &admin)).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await.expect("the change is heard");
        if next.unwrap().unwrap().tenant_ids.contains(&t.tenant_id) {
            break;
        }
    }
    mesh.shutdown().await;
}

/// Every RPC of the registry has a test here.
#[test]
fn every_rpc_has_a_contract_test() {
    assert_contract_covers(include_str!("contract.rs"), &["tenantmesh.registry.v1.TenantRegistry"]);
}

/// The service catalog: a registration is idempotent, a changed one is a
/// new version, bad input names its field; a service identity registers
/// itself only, and tenants see nothing of the catalog.
#[tokio::test]
async fn the_service_catalog() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let mut reg = mesh.registry();
    let invoices = |endpoint: &str| ApplicationService {
        name: "invoices".into(),
        endpoint: endpoint.into(),
        grpc_services: vec!["acme.invoices.v1.Invoices".into()],
        tables: vec!["invoices".into(), "lines".into()],
        ..Default::default()
    };
    let register =
        |service: ApplicationService, token: &str| authed(RegisterServiceRequest { service: Some(service) }, token);
    let first = reg.register_service(register(invoices("http://invoices:50060"), &admin)).await.unwrap().into_inner();
    let stored = first.service.clone().unwrap();
    assert!(first.changed);
    assert_eq!(stored.version, 1);
    assert!(!stored.registered_by.is_empty() && !stored.registered_by.starts_with("service:"), "{stored:?}");
    assert!(stored.registered_at > 0);
    let again = reg.register_service(register(invoices("http://invoices:50060"), &admin)).await.unwrap().into_inner();
    assert_eq!(
        (again.changed, again.service.as_ref()),
        (false, Some(&stored)),
        "the same registration changes nothing"
    );
    let moved =
        reg.register_service(register(invoices("https://invoices.internal"), &admin)).await.unwrap().into_inner();
    assert_eq!((moved.changed, moved.service.unwrap().version), (true, 2));

    let bad = |f: fn(&mut ApplicationService)| {
        let mut s = invoices("http://invoices:50060");
        f(&mut s);
        s
    };
    expect_invalid(reg.register_service(register(bad(|s| s.name = "Invoices".into()), &admin)).await, "service.name");
    expect_invalid(
        reg.register_service(register(bad(|s| s.endpoint = "invoices:1".into()), &admin)).await,
        "service.endpoint",
    );
    expect_invalid(
        reg.register_service(register(bad(|s| s.grpc_services.clear()), &admin)).await,
        "service.grpc_services",
    );
    expect_invalid(
        reg.register_service(register(bad(|s| s.tables = vec!["a b".into()]), &admin)).await,
        "service.tables[0]",
    );
    expect_invalid(reg.register_service(authed(RegisterServiceRequest { service: None }, &admin)).await, "service");
    expect_invalid(
        reg.register_service(register(bad(|s| s.image = "registry.example/invoices 1.0".into()), &admin)).await,
        "service.image",
    );
    expect_invalid(
        reg.register_service(register(bad(|s| s.command = vec!["invoices".into()]), &admin)).await,
        "service.command",
    );
    expect_invalid(
        reg.register_service(register(
            bad(|s| (s.image, s.command) = ("registry.example/invoices:1.0".into(), vec!["run".into(), String::new()])),
            &admin,
        ))
        .await,
        "service.command[1]",
    );
    // The image its silo instances run is part of the registration.
    let imaged = |s: &mut ApplicationService| {
        (s.image, s.command) = ("registry.example/invoices:1.0".into(), vec!["invoices".into()]);
    };
    let with_image = reg.register_service(register(bad(imaged), &admin)).await.unwrap().into_inner();
    assert_eq!(
        (with_image.changed, with_image.service.unwrap().image.as_str()),
        (true, "registry.example/invoices:1.0")
    );
    let back = reg.register_service(register(invoices("https://invoices.internal"), &admin)).await.unwrap();
    assert!(back.into_inner().changed, "dropping the image is a change");

    // A service identity with the catalog scope registers only the
    // service its client id names; a tenant admin nothing.
    let catalog = mesh.service_token_as("tests-catalog").await;
    expect_code(reg.register_service(register(invoices("http://evil:1"), &catalog)).await, Code::PermissionDenied);
    let own = ApplicationService { name: "tests-catalog".into(), ..invoices("http://catalog:1") };
    let own = reg.register_service(register(own, &catalog)).await.unwrap().into_inner().service.unwrap();
    assert_eq!(own.registered_by, "service:tests-catalog");
    let tenant = mesh.onboard(&unique_tenant("nosy")).await;
    expect_code(reg.register_service(register(invoices("http://x:1"), &tenant.token)).await, Code::PermissionDenied);
    expect_code(reg.list_services(authed(ListServicesRequest {}, &tenant.token)).await, Code::PermissionDenied);

    let listed = reg.list_services(authed(ListServicesRequest {}, &admin)).await.unwrap().into_inner().services;
    let names: Vec<(&str, &str, u64)> =
        listed.iter().map(|s| (s.name.as_str(), s.endpoint.as_str(), s.version)).collect();
    assert_eq!(names, [("invoices", "https://invoices.internal", 4), ("tests-catalog", "http://catalog:1", 1)]);

    // DeregisterService: the operator only, idempotent, the name checked.
    let deregister = |name: &str, token: &str| {
        authed(DeregisterServiceRequest { name: name.into(), silo_tenant: String::new() }, token)
    };
    expect_code(reg.deregister_service(deregister("invoices", &tenant.token)).await, Code::PermissionDenied);
    expect_code(reg.deregister_service(deregister("invoices", &catalog)).await, Code::PermissionDenied);
    expect_invalid(reg.deregister_service(deregister("Invoices!", &admin)).await, "name");
    assert!(reg.deregister_service(deregister("invoices", &admin)).await.unwrap().into_inner().removed);
    assert!(!reg.deregister_service(deregister("invoices", &admin)).await.unwrap().into_inner().removed);
    let listed = reg.list_services(authed(ListServicesRequest {}, &admin)).await.unwrap().into_inner().services;
    assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["tests-catalog"]);
}

/// SetEntitlementOverride: the operator sets, replaces and clears a
/// tenant's exception to its tier's plan, one per feature; bad overrides
/// name their field; a tenant admin is refused; the platform has no plan;
/// each change is an audit event.
#[tokio::test]
async fn entitlement_overrides() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("exceptions")).await;
    let mut reg = mesh.registry();
    let set = |feature: &str, granted: Option<bool>, limit: Option<u64>, clear: bool| SetEntitlementOverrideRequest {
        tenant_id: t.tenant_id.clone(),
        r#override: Some(EntitlementOverride { feature: feature.into(), granted, limit, hard: None }),
        clear,
    };
    let overrides = |r: SetEntitlementOverrideResponse| r.tenant.unwrap().entitlement_overrides;
    reg.set_entitlement_override(authed(set("restore", Some(false), None, false), &admin)).await.unwrap();
    let now = reg.set_entitlement_override(authed(set("max_users", None, Some(3), false), &admin)).await.unwrap();
    let now = overrides(now.into_inner());
    assert_eq!(now.iter().map(|o| o.feature.as_str()).collect::<Vec<_>>(), ["max_users", "restore"]);
    let replaced = reg.set_entitlement_override(authed(set("max_users", None, Some(9), false), &admin)).await.unwrap();
    let replaced = overrides(replaced.into_inner());
    assert_eq!((replaced.len(), replaced[0].limit), (2, Some(9)), "one per feature: {replaced:?}");
    let cleared = reg.set_entitlement_override(authed(set("restore", None, None, true), &admin)).await.unwrap();
    assert_eq!(overrides(cleared.into_inner()).len(), 1);

    expect_invalid(
        reg.set_entitlement_override(authed(set("gold", Some(true), None, false), &admin)).await,
        "override.feature",
    );
    expect_invalid(
        reg.set_entitlement_override(authed(set("max_users", None, Some(0), false), &admin)).await,
        "override.limit",
    );
    expect_invalid(
        reg.set_entitlement_override(authed(set("export", None, None, false), &admin)).await,
        "override.granted",
    );
    let none = SetEntitlementOverrideRequest { tenant_id: t.tenant_id.clone(), r#override: None, clear: false };
    expect_invalid(reg.set_entitlement_override(authed(none, &admin)).await, "override");
    expect_code(
        reg.set_entitlement_override(authed(set("export", Some(true), None, false), &t.token)).await,
        Code::PermissionDenied,
    );
    let platform =
        SetEntitlementOverrideRequest { tenant_id: "platform".into(), ..set("export", Some(true), None, false) };
    expect_code(reg.set_entitlement_override(authed(platform, &admin)).await, Code::FailedPrecondition);

    let audit = tenantmesh_proto::audit::v1::ListAuditEventsRequest {
        tenant_id: t.tenant_id.clone(),
        action: "tenant.entitlement".into(),
        ..Default::default()
    };
    let mut log = tenantmesh_proto::audit::v1::audit_client::AuditClient::new(TestMesh::channel(mesh.addrs.registry));
    let events = log.list_audit_events(authed(audit, &admin)).await.unwrap().into_inner().events;
    let done: Vec<&str> = events.iter().filter(|e| e.error.is_empty()).map(|e| e.after.as_str()).collect();
    assert_eq!(done.len(), 4, "{events:#?}");
    assert_eq!(done[3], "the tier's plan but max_users 9");
}

/// SetUsageAlert: set by the tenant's own admin or the operator (another
/// tenant's admin and users refused), one per alert_id, bad alerts named
/// by field (a percentage needs a monthly quantity in the plan), removal
/// of an unknown one NOT_FOUND, and each change audited.
#[tokio::test]
async fn usage_alerts() {
    use tenantmesh_proto::registry::v1::usage_alert::Threshold;
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let t = mesh.onboard(&unique_tenant("alerts")).await;
    let other = mesh.onboard(&unique_tenant("alerts-other")).await;
    let mut reg = mesh.registry();
    let alert = |id: &str, meter: &str, threshold: Option<Threshold>| UsageAlert {
        alert_id: id.into(),
        meter: meter.into(),
        threshold,
        create_time: 0,
    };
    let set =
        |a: UsageAlert, clear: bool| SetUsageAlertRequest { tenant_id: t.tenant_id.clone(), alert: Some(a), clear };
    let reads = alert("reads", "read_units", Some(Threshold::Absolute(1000)));
    let answer = reg.set_usage_alert(authed(set(reads.clone(), false), &t.token)).await.unwrap().into_inner();
    let alerts = answer.tenant.unwrap().usage_alerts;
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0].create_time > 0, "the registry stamps when it was set: {alerts:?}");
    let calls = alert("calls", "requests", Some(Threshold::Absolute(50)));
    reg.set_usage_alert(authed(set(calls, false), &admin)).await.unwrap();
    let raised = alert("reads", "read_units", Some(Threshold::Absolute(2000)));
    let answer = reg.set_usage_alert(authed(set(raised, false), &admin)).await.unwrap().into_inner();
    let alerts = answer.tenant.unwrap().usage_alerts;
    let ids: Vec<&str> = alerts.iter().map(|a| a.alert_id.as_str()).collect();
    assert_eq!(ids, ["calls", "reads"], "one per alert_id, in order");
    assert_eq!(alerts[1].threshold, Some(Threshold::Absolute(2000)));

    for (bad, field) in [
        (alert("Bad Id", "requests", Some(Threshold::Absolute(1))), "alert.alert_id"),
        (alert("x", "gold", Some(Threshold::Absolute(1))), "alert.meter"),
        (alert("x", "requests", None), "alert.threshold"),
        (alert("x", "requests", Some(Threshold::Absolute(0))), "alert.absolute"),
        // The built-in tiers cap no monthly quantity: nothing to take a percentage of.
        (alert("x", "write_units", Some(Threshold::Percent(80))), "alert.percent"),
    ] {
        expect_invalid(reg.set_usage_alert(authed(set(bad, false), &admin)).await, field);
    }
    let none = SetUsageAlertRequest { tenant_id: t.tenant_id.clone(), alert: None, clear: false };
    expect_invalid(reg.set_usage_alert(authed(none, &admin)).await, "alert");
    let bad_tenant = SetUsageAlertRequest { tenant_id: "Bad!".into(), ..set(reads.clone(), false) };
    expect_invalid(reg.set_usage_alert(authed(bad_tenant, &admin)).await, "tenant_id");
    expect_code(reg.set_usage_alert(authed(set(reads.clone(), false), &other.token)).await, Code::PermissionDenied);
    let user = mesh.user_token(&t, &[tenantmesh_proto::auth::v1::Role::TenantUser]).await;
    expect_code(reg.set_usage_alert(authed(set(reads.clone(), false), &user)).await, Code::PermissionDenied);
    let platform = SetUsageAlertRequest { tenant_id: "platform".into(), ..set(reads.clone(), false) };
    expect_code(reg.set_usage_alert(authed(platform, &admin)).await, Code::FailedPrecondition);
    expect_code(reg.set_usage_alert(authed(set(alert("never-set", "", None), true), &admin)).await, Code::NotFound);
    let cleared = reg.set_usage_alert(authed(set(alert("calls", "", None), true), &t.token)).await.unwrap();
    assert_eq!(cleared.into_inner().tenant.unwrap().usage_alerts.len(), 1);

    let audit = tenantmesh_proto::audit::v1::ListAuditEventsRequest {
        tenant_id: t.tenant_id.clone(),
        action: "tenant.usage_alert".into(),
        ..Default::default()
    };
    let mut log = tenantmesh_proto::audit::v1::audit_client::AuditClient::new(TestMesh::channel(mesh.addrs.registry));
    let events = log.list_audit_events(authed(audit, &admin)).await.unwrap().into_inner().events;
    let done: Vec<&str> = events.iter().filter(|e| e.error.is_empty()).map(|e| e.after.as_str()).collect();
    assert_eq!(done.len(), 4, "{events:#?}");
    assert_eq!(done[2], "usage alerts calls: requests at 50, reads: read_units at 2000");
    assert_eq!(done[3], "usage alerts reads: read_units at 2000");
    assert!(events.iter().any(|e| !e.error.is_empty()), "refused attempts are recorded too: {events:#?}");
}
