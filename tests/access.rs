//! The role table, walked through the real mesh: every RPC of every service
//! called with a token of every role is let through exactly when the table
//! in `tenant-context/src/access.rs` says so, and refused with
//! PERMISSION_DENIED otherwise.

use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::*;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::*;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::*;
use tenantmesh_tenant_context::Role;
use tenantmesh_tenant_context::access::{Access, TABLE};
use tenantmesh_test_support::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Calls the RPC at `path` with an empty request and `token`; the outcome
/// says whether the layer let it through.
async fn call(mesh: &TestMesh, path: &str, token: &str) -> Result<(), Status> {
    let mut reg: TenantRegistryClient<Channel> = mesh.registry();
    let mut auth: AuthClient<Channel> = mesh.auth();
    let mut onb: OnboardingClient<Channel> = mesh.onboarding();
    let mut data: DataClient<Channel> = mesh.data();
    let method = path.rsplit('/').next().unwrap();
    let service = path.trim_start_matches('/').split('/').next().unwrap();
    match (service, method) {
        ("tenantmesh.auth.v1.Auth", "Login") => auth.login(authed(LoginRequest::default(), token)).await.map(drop),
        ("tenantmesh.auth.v1.Auth", "GetJwks") => {
            auth.get_jwks(authed(GetJwksRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "IssueServiceToken") => {
            auth.issue_service_token(authed(IssueServiceTokenRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "Refresh") => {
            auth.refresh(authed(RefreshRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "Revoke") => auth.revoke(authed(RevokeRequest::default(), token)).await.map(drop),
        ("tenantmesh.auth.v1.Auth", "ListUsers") => {
            auth.list_users(authed(ListUsersRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "DisableUser") => {
            auth.disable_user(authed(DisableUserRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "DeleteUser") => {
            auth.delete_user(authed(DeleteUserRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "RotateSigningKey") => {
            auth.rotate_signing_key(authed(RotateSigningKeyRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.auth.v1.Auth", "CreateUser") => {
            auth.create_user(authed(CreateUserRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "CreateTenant") => {
            reg.create_tenant(authed(CreateTenantRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "GetTenant") => {
            reg.get_tenant(authed(GetTenantRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "ListTenants") => {
            reg.list_tenants(authed(ListTenantsRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "UpdateTenant") => {
            reg.update_tenant(authed(UpdateTenantRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "SetIdentityProvider") => {
            reg.set_identity_provider(authed(SetIdentityProviderRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "SetTenantStatus") => {
            reg.set_tenant_status(authed(SetTenantStatusRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "RegisterTenant") => {
            onb.register_tenant(authed(RegisterTenantRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "GetOnboardingStatus") => {
            onb.get_onboarding_status(authed(GetOnboardingStatusRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.data.v1.Data", "PutItem") => {
            data.put_item(authed(PutItemRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.data.v1.Data", "GetItem") => {
            data.get_item(authed(GetItemRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.data.v1.Data", "DeleteItem") => {
            data.delete_item(authed(DeleteItemRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.data.v1.Data", "QueryItems") => {
            data.query_items(authed(QueryItemsRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "SetPlacement") => {
            reg.set_placement(authed(SetPlacementRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.registry.v1.TenantRegistry", "SetTenantLimits") => {
            reg.set_tenant_limits(authed(SetTenantLimitsRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "GetWorkflow") => {
            onb.get_workflow(authed(GetWorkflowRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "RetryOnboarding") => {
            onb.retry_onboarding(authed(RetryOnboardingRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "OffboardTenant") => {
            onb.offboard_tenant(authed(OffboardTenantRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "ChangeTier") => {
            onb.change_tier(authed(ChangeTierRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.onboarding.v1.Onboarding", "WatchEvents") => {
            onb.watch_events(authed(WatchEventsRequest::default(), token)).await.map(drop)
        }
        ("tenantmesh.data.v1.DataAdmin", m) => {
            let mut admin = mesh.data_admin();
            match m {
                "ProvisionStore" => {
                    admin.provision_store(authed(ProvisionStoreRequest::default(), token)).await.map(drop)
                }
                "DropStore" => admin.drop_store(authed(DropStoreRequest::default(), token)).await.map(drop),
                "ExportItems" => admin.export_items(authed(ExportItemsRequest::default(), token)).await.map(drop),
                "ImportItems" => admin.import_items(authed(ImportItemsRequest::default(), token)).await.map(drop),
                "PurgeItems" => admin.purge_items(authed(PurgeItemsRequest::default(), token)).await.map(drop),
                _ => panic!("{path} is in the role table but not in this test: add it"),
            }
        }
        _ => panic!("{path} is in the role table but not in this test: add it"),
    }
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
    assert_eq!(services.len(), 5, "the table covers the four services and DataAdmin");
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
                    !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated)),
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
