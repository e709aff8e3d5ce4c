//! The RPCs' policies, walked through the real mesh: every RPC of every
//! service called with a token of every role and of every service grant is
//! let through exactly when the policy its proto declares
//! (`tenantmesh.options.v1.policy`) says so, and refused with
//! PERMISSION_DENIED otherwise. RPCs are called generically, from the
//! compiled descriptor set: a new RPC needs no line here.

use tenantmesh_tenant_context::access::{Access, Policies};
use tenantmesh_tenant_context::{Role, Scope};
use tenantmesh_test_support::*;
use tonic::{Code, Status};

/// Calls the RPC at `path` with an empty request (every request message
/// encodes to nothing when empty) and `token`; the answer is read as an
/// empty message (unknown fields are skipped). The outcome says whether
/// the layer let it through.
async fn call(mesh: &TestMesh, path: &str, token: &str) -> Result<(), Status> {
    let package = path.trim_start_matches('/').split('.').nth(1).unwrap_or_default();
    let addr = match package {
        // The registry serves its audit log.
        "registry" | "audit" => mesh.addrs.registry,
        "auth" => mesh.addrs.auth,
        "onboarding" => mesh.addrs.onboarding,
        // Metering and Backup are hosted by the data service.
        "data" | "metering" | "backup" => mesh.addrs.data,
        other => panic!("{path}: no service serves package {other}"),
    };
    call_at(addr, path, token).await
}

/// The lifecycle service every application serves (not the mesh's own).
const LIFECYCLE_PATH: &str = "/tenantmesh.lifecycle.v1.TenantLifecycle/";

/// [`call`], to the service at `addr`.
async fn call_at(addr: std::net::SocketAddr, path: &str, token: &str) -> Result<(), Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = path.parse().expect("a gRPC path");
    // Server streaming fits every RPC: a unary answer is a one-message stream.
    grpc.server_streaming(authed((), token), path, codec).await.map(drop)
}

/// Every RPC in the table, with a token of every user role and of a
/// service identity for every grant (no scope, each scope, a scope
/// confined to one tenant): those the table lets in pass the layer (the
/// empty request then fails validation or succeeds), the others are
/// PERMISSION_DENIED before the handler runs. So a metering writer is
/// refused every DataAdmin and registry RPC, and an identity declared
/// without scopes everything but the public RPCs.
/// A caller: its name, roles, scopes and token.
type Caller = (String, Vec<Role>, Vec<Scope>, String);

/// A token of every user role (of `tenant`) and of a service identity for
/// every grant.
async fn callers(mesh: &TestMesh, tenant: &TestTenant) -> Vec<Caller> {
    let mut callers: Vec<Caller> = vec![
        ("platform admin".into(), vec![Role::PlatformAdmin], vec![], mesh.admin_token().await),
        ("tenant admin".into(), vec![Role::TenantAdmin], vec![], tenant.token.clone()),
        (
            "tenant user".into(),
            vec![Role::TenantUser],
            vec![],
            mesh.user_token(tenant, &[tenantmesh_proto::auth::v1::Role::TenantUser]).await,
        ),
    ];
    for (id, grant) in SCOPED_CLIENTS {
        let scopes =
            grant.split('@').next().unwrap().split('+').filter(|s| !s.is_empty()).map(|s| Scope::parse(s).unwrap());
        callers.push(((*id).into(), vec![Role::Service], scopes.collect(), mesh.service_token_as(id).await));
    }
    callers
}

#[tokio::test]
async fn every_rpc_with_every_role_and_scope() {
    let mesh = TestMesh::start().await;
    let tenant = mesh.onboard(&unique_tenant("roles")).await;
    let callers = callers(&mesh, &tenant).await;
    let mut rules = Policies::mesh().expect("every RPC declares its policy").rules();
    // Served by every application service, and walked there.
    rules.retain(|(p, _)| !p.starts_with(LIFECYCLE_PATH));
    let services: std::collections::HashSet<&str> =
        rules.iter().map(|(p, _)| p.trim_start_matches('/').split('/').next().unwrap()).collect();
    assert_eq!(services.len(), 8, "the four services, DataAdmin, Metering, Backup and Audit");
    let mut checked = 0;
    let mut writer_reaches = Vec::new();
    for (path, rule) in &rules {
        let (path, access) = (*path, rule.access);
        for (who, roles, scopes, token) in &callers {
            let outcome = call(&mesh, path, token).await;
            let allowed = access.allows(roles, scopes);
            let code = outcome.as_ref().err().map(Status::code);
            if allowed {
                assert!(
                    !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented)),
                    "{who} must reach {path}: {outcome:?}"
                );
                if who == "tests-metering-writer" && access != Access::Public {
                    writer_reaches.push(path);
                }
            } else {
                assert_eq!(code, Some(Code::PermissionDenied), "{who} must be refused {path}: {outcome:?}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, rules.len() * callers.len());
    assert_eq!(writer_reaches, ["/tenantmesh.metering.v1.Metering/RecordUsage"]);
    mesh.shutdown().await;
}

/// A service identity confined to one tenant records usage for it and is
/// refused for another (PERMISSION_DENIED, nothing recorded); a metering
/// writer cannot export, purge or rewind a tenant, nor repoint its
/// placement, nor create its users.
#[tokio::test]
async fn service_identities_act_within_their_grant() {
    use tenantmesh_proto::metering::v1::{RecordUsageRequest, UsageEvent};
    let mesh = TestMesh::start().await;
    let confined = mesh.onboard_on("confined-a", "basic").await;
    let other = mesh.onboard(&unique_tenant("other")).await;
    let event = |id: &str, tenant: &str| UsageEvent {
        id: id.into(),
        tenant_id: tenant.into(),
        meter: "invoices".into(),
        value: 1,
        time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64,
        ..Default::default()
    };
    let writer = mesh.service_token_as("tests-confined-writer").await;
    let record = |events: Vec<UsageEvent>| {
        let (mut m, token) = (mesh.metering(), writer.clone());
        async move { m.record_usage(authed(RecordUsageRequest { events }, &token)).await }
    };
    assert_eq!(record(vec![event("c1", &confined.tenant_id)]).await.unwrap().into_inner().recorded, 1);
    let refused = record(vec![event("c2", &confined.tenant_id), event("o1", &other.tenant_id)]).await;
    expect_code(refused, Code::PermissionDenied);
    // Nothing of the refused call was recorded: the same events again count as new.
    let again = record(vec![event("c2", &confined.tenant_id)]).await.unwrap().into_inner();
    assert_eq!((again.recorded, again.duplicates), (1, 0));
    // A metering writer's token against the lifecycle of another tenant.
    let writer = mesh.service_token_as("tests-metering-writer").await;
    let store = Some(tenantmesh_proto::data::v1::StoreRef {
        tenant_id: other.tenant_id.clone(),
        table: mesh.state_table_name("data"),
    });
    let export = tenantmesh_proto::data::v1::ExportItemsRequest { store: store.clone(), ..Default::default() };
    expect_code(mesh.data_admin().export_items(authed(export, &writer)).await, Code::PermissionDenied);
    let purge = tenantmesh_proto::data::v1::PurgeItemsRequest { store: store.clone() };
    expect_code(mesh.data_admin().purge_items(authed(purge, &writer)).await, Code::PermissionDenied);
    let rewind = tenantmesh_proto::data::v1::RewindItemsRequest { store, point_in_time_us: 1, charge_tenant: false };
    expect_code(mesh.data_admin().rewind_items(authed(rewind, &writer)).await, Code::PermissionDenied);
    let placement = tenantmesh_proto::registry::v1::SetPlacementRequest {
        tenant_id: other.tenant_id.clone(),
        placement: Some(Default::default()),
        ..Default::default()
    };
    expect_code(mesh.registry().set_placement(authed(placement, &writer)).await, Code::PermissionDenied);
    let user = tenantmesh_proto::auth::v1::CreateUserRequest {
        tenant_id: other.tenant_id.clone(),
        email: "x@other.example".into(),
        password: "a-long-enough-password".into(),
        ..Default::default()
    };
    expect_code(mesh.auth().create_user(authed(user, &writer)).await, Code::PermissionDenied);
    mesh.shutdown().await;
}

/// The same walk through the example application service: every RPC its
/// own proto declares, with every caller, is let through exactly when its
/// policy says so (a service built on `tenantmesh-app` inherits the
/// access layer, and its policies come from its descriptor set alone).
#[tokio::test]
async fn every_rpc_of_an_application_service_with_every_role_and_scope() {
    let mesh = TestMesh::start().await;
    let orders = crate::orders_contract::start(&mesh).await;
    let tenant = mesh.onboard(&unique_tenant("approles")).await;
    let callers = callers(&mesh, &tenant).await;
    let policies = Policies::from_descriptor_sets(&[tenantmesh_orders::proto::FILE_DESCRIPTOR_SET]).unwrap();
    let mut rules: Vec<_> =
        policies.rules().into_iter().filter(|(p, _)| p.starts_with("/example.orders.v1.Orders/")).collect();
    assert_eq!(rules.len(), 4);
    // And the lifecycle service every application serves.
    let mesh_policies = Policies::mesh().unwrap();
    rules.extend(mesh_policies.rules().into_iter().filter(|(p, _)| p.starts_with(LIFECYCLE_PATH)));
    assert_eq!(rules.len(), 10);
    let mut reached = std::collections::BTreeSet::new();
    for (path, rule) in &rules {
        for (who, roles, scopes, token) in &callers {
            let outcome = call_at(orders.addr, path, token).await;
            let code = outcome.as_ref().err().map(Status::code);
            if rule.access.allows(roles, scopes) {
                assert!(
                    !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated)),
                    "{who} must reach {path}: {outcome:?}"
                );
                reached.insert((who.clone(), path.rsplit('/').next().unwrap().to_owned()));
            } else {
                assert_eq!(code, Some(Code::PermissionDenied), "{who} must be refused {path}: {outcome:?}");
            }
        }
        expect_code(call_at(orders.addr, path, "").await, Code::Unauthenticated);
    }
    // The lifecycle: the workflows' identity (scope lifecycle) only.
    let lifecycle: Vec<&(String, String)> = reached.iter().filter(|(_, m)| m.ends_with("Tenant")).collect();
    assert_eq!(lifecycle.len(), 6, "{lifecycle:?}");
    assert!(lifecycle.iter().all(|(w, _)| w == "tests-lifecycle"), "{lifecycle:?}");
    // Tenant users everything but CancelOrder, tenant admins everything, nobody else anything.
    let who: Vec<String> =
        reached.iter().filter(|(_, m)| !m.ends_with("Tenant")).map(|(w, m)| format!("{w}:{m}")).collect();
    assert_eq!(who.len(), 7, "{who:?}");
    assert!(
        !who.iter()
            .any(|w| w == "tenant user:CancelOrder" || w.starts_with("platform admin") || w.starts_with("tests")),
        "{who:?}"
    );
}
