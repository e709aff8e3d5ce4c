//! The role table, walked through the real mesh: every RPC of every service
//! called with a token of every role is let through exactly when the table
//! in `tenant-context/src/access.rs` says so, and refused with
//! PERMISSION_DENIED otherwise. RPCs are called generically, from the
//! table (which a unit test holds to the protos): a new RPC needs no line
//! here.

use tenantmesh_tenant_context::Role;
use tenantmesh_tenant_context::access::{Access, TABLE};
use tenantmesh_test_support::*;
use tonic::{Code, Status};

/// Calls the RPC at `path` with an empty request (every request message
/// encodes to nothing when empty) and `token`; the answer is read as an
/// empty message (unknown fields are skipped). The outcome says whether
/// the layer let it through.
async fn call(mesh: &TestMesh, path: &str, token: &str) -> Result<(), Status> {
    let package = path.trim_start_matches('/').split('.').nth(1).unwrap_or_default();
    let addr = match package {
        "registry" => mesh.addrs.registry,
        "auth" => mesh.addrs.auth,
        "onboarding" => mesh.addrs.onboarding,
        // Metering and Backup are hosted by the data service.
        "data" | "metering" | "backup" => mesh.addrs.data,
        other => panic!("{path}: no service serves package {other}"),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = path.parse().expect("a gRPC path");
    // Server streaming fits every RPC: a unary answer is a one-message stream.
    grpc.server_streaming(authed((), token), path, codec).await.map(drop)
}

/// Every RPC in the table, with every role: allowed roles pass the layer
/// (the empty request then fails validation or succeeds), the others are
/// PERMISSION_DENIED before the handler runs.
#[tokio::test]
async fn every_rpc_with_every_role() {
    let mesh = TestMesh::start().await;
    let tenant = mesh.onboard(&unique_tenant("roles")).await;
    let tokens = [
        (Role::PlatformAdmin, mesh.admin_token().await),
        (Role::TenantAdmin, tenant.token.clone()),
        (Role::TenantUser, mesh.user_token(&tenant, &[tenantmesh_proto::auth::v1::Role::TenantUser]).await),
        (Role::Service, mesh.service_token().await),
    ];
    let services: std::collections::HashSet<&str> =
        TABLE.iter().map(|(p, _)| p.trim_start_matches('/').split('/').next().unwrap()).collect();
    assert_eq!(services.len(), 7, "the table covers the four services, DataAdmin, Metering and Backup");
    let mut checked = 0;
    for (path, access) in TABLE {
        for (role, token) in &tokens {
            let outcome = call(&mesh, path, token).await;
            let allowed = match access {
                Access::Public => true,
                Access::Roles(roles) => roles.contains(role),
            };
            let code = outcome.as_ref().err().map(Status::code);
            if allowed {
                assert!(
                    !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented)),
                    "{role:?} must reach {path}: {outcome:?}"
                );
            } else {
                assert_eq!(code, Some(Code::PermissionDenied), "{role:?} must be refused {path}: {outcome:?}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, TABLE.len() * 4);
    mesh.shutdown().await;
}
