//! The one table that says which roles may call each RPC of every service.
//! The server layer consults it before any handler runs; an RPC missing
//! from the table is refused (fail closed), and a unit test holds the
//! table to the compiled protos: every RPC has exactly one line, and every
//! line names a real RPC.

use crate::Role;

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (health, reflection, login, JWKS, service login).
    Public,
    /// A verified token with one of these roles.
    Roles(&'static [Role]),
}

use Role::{PlatformAdmin as PA, Service as SVC, TenantAdmin as TA, TenantUser as TU};

const PLATFORM: &[Role] = &[PA, SVC];
/// User management: platform callers anywhere, tenant admins in their own
/// tenant (the handlers check which tenant).
const USER_ADMIN: &[Role] = &[PA, TA, SVC];
const ANY: &[Role] = &[PA, TA, TU, SVC];
/// Tenant items are for the tenant's own users; a service identity never
/// reads them through `Data` (the lifecycle workflows move them through
/// `DataAdmin`, which no user or tenant token may call).
const TENANT_DATA: &[Role] = &[PA, TA, TU];

/// `(gRPC path, access)` for every RPC of every tenantmesh service.
pub const TABLE: &[(&str, Access)] = &[
    ("/tenantmesh.auth.v1.Auth/Login", Access::Public),
    ("/tenantmesh.auth.v1.Auth/GetJwks", Access::Public),
    ("/tenantmesh.auth.v1.Auth/IssueServiceToken", Access::Public),
    ("/tenantmesh.auth.v1.Auth/Refresh", Access::Public),
    ("/tenantmesh.auth.v1.Auth/Revoke", Access::Public),
    ("/tenantmesh.auth.v1.Auth/CreateUser", Access::Roles(USER_ADMIN)),
    ("/tenantmesh.auth.v1.Auth/ListUsers", Access::Roles(USER_ADMIN)),
    ("/tenantmesh.auth.v1.Auth/DisableUser", Access::Roles(USER_ADMIN)),
    ("/tenantmesh.auth.v1.Auth/DeleteUser", Access::Roles(USER_ADMIN)),
    ("/tenantmesh.auth.v1.Auth/RotateSigningKey", Access::Roles(&[PA])),
    ("/tenantmesh.registry.v1.TenantRegistry/CreateTenant", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/GetTenant", Access::Roles(ANY)),
    ("/tenantmesh.registry.v1.TenantRegistry/ListTenants", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/UpdateTenant", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantStatus", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetIdentityProvider", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetPlacement", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantLimits", Access::Roles(PLATFORM)),
    ("/tenantmesh.registry.v1.TenantRegistry/WatchTenants", Access::Roles(&[SVC])),
    ("/tenantmesh.onboarding.v1.Onboarding/RegisterTenant", Access::Roles(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/GetOnboardingStatus", Access::Roles(&[PA, TA, SVC])),
    ("/tenantmesh.onboarding.v1.Onboarding/GetWorkflow", Access::Roles(&[PA, TA, SVC])),
    ("/tenantmesh.onboarding.v1.Onboarding/RetryOnboarding", Access::Roles(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/OffboardTenant", Access::Roles(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/ChangeTier", Access::Roles(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/WatchEvents", Access::Roles(&[PA, TA])),
    ("/tenantmesh.onboarding.v1.Onboarding/ListTenantResources", Access::Roles(&[PA, TA, SVC])),
    // A tenant admin only for their own tenant, and only when its tier allows it (the handler checks).
    ("/tenantmesh.onboarding.v1.Onboarding/RestoreTenant", Access::Roles(&[PA, TA])),
    ("/tenantmesh.data.v1.Data/PutItem", Access::Roles(TENANT_DATA)),
    ("/tenantmesh.data.v1.Data/GetItem", Access::Roles(TENANT_DATA)),
    ("/tenantmesh.data.v1.Data/DeleteItem", Access::Roles(TENANT_DATA)),
    ("/tenantmesh.data.v1.Data/QueryItems", Access::Roles(TENANT_DATA)),
    ("/tenantmesh.data.v1.DataAdmin/ProvisionStore", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/DropStore", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/ExportItems", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/ImportItems", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/PurgeItems", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/SetFence", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/RewindItems", Access::Roles(&[SVC])),
    ("/tenantmesh.data.v1.DataAdmin/TrimHistory", Access::Roles(&[SVC])),
    // Usage is recorded by the platform (applications with a service
    // identity, or an operator's correction), never by the tenant it bills.
    ("/tenantmesh.metering.v1.Metering/RecordUsage", Access::Roles(PLATFORM)),
    // A tenant admin reads their own tenant's (the handlers check which).
    ("/tenantmesh.metering.v1.Metering/GetUsage", Access::Roles(&[PA, TA, SVC])),
    ("/tenantmesh.metering.v1.Metering/ExportUsage", Access::Roles(&[PA, TA, SVC])),
    ("/tenantmesh.metering.v1.Metering/GetTenantCost", Access::Roles(&[PA, TA, SVC])),
    ("/tenantmesh.metering.v1.Metering/ListTenantCosts", Access::Roles(PLATFORM)),
    // Every tenant's data at once: the operator only.
    ("/tenantmesh.backup.v1.Backup/TakeBackup", Access::Roles(&[PA])),
];

/// Infrastructure services reachable without a token.
const PUBLIC_PREFIXES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// The access rule for a gRPC path; `None` for paths not in the table.
pub fn access_for(path: &str) -> Option<Access> {
    if PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Some(Access::Public);
    }
    TABLE.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Whether a caller holding `roles` may call `path`.
pub fn allows(path: &str, roles: &[Role]) -> bool {
    match access_for(path) {
        Some(Access::Public) => true,
        Some(Access::Roles(allowed)) => roles.iter().any(|r| allowed.contains(r)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table and the protos list the same RPCs: a new RPC without a
    /// line (or a line for a removed one) fails here, not at run time.
    #[test]
    fn the_table_lists_exactly_the_rpcs_of_the_protos() {
        use prost::Message as _;
        use std::collections::BTreeSet;
        let set = prost_types::FileDescriptorSet::decode(tenantmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut rpcs = BTreeSet::new();
        for file in set.file.iter().filter(|f| f.package().starts_with("tenantmesh.")) {
            for service in &file.service {
                for method in &service.method {
                    rpcs.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        let table: BTreeSet<String> = TABLE.iter().map(|(p, _)| (*p).to_owned()).collect();
        assert_eq!(table.len(), TABLE.len(), "an RPC has two lines in the table");
        let missing: Vec<_> = rpcs.difference(&table).collect();
        assert!(missing.is_empty(), "RPCs without a line in the role table: {missing:?}");
        let stale: Vec<_> = table.difference(&rpcs).collect();
        assert!(stale.is_empty(), "role table lines for RPCs that do not exist: {stale:?}");
    }

    #[test]
    fn unknown_paths_fail_closed_and_infrastructure_is_public() {
        assert_eq!(access_for("/tenantmesh.data.v1.Data/Scan"), None);
        assert!(!allows("/tenantmesh.data.v1.Data/Scan", &Role::ALL));
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Some(Access::Public));
        assert!(allows("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &[]));
    }

    #[test]
    fn only_services_move_items_in_bulk() {
        for (path, _) in TABLE.iter().filter(|(p, _)| p.starts_with("/tenantmesh.data.v1.DataAdmin/")) {
            assert!(allows(path, &[Role::Service]), "{path}");
            assert!(!allows(path, &[Role::PlatformAdmin, Role::TenantAdmin, Role::TenantUser]), "{path}");
        }
    }

    #[test]
    fn services_never_read_tenant_items() {
        for (path, _) in TABLE.iter().filter(|(p, _)| p.starts_with("/tenantmesh.data.v1.Data/")) {
            assert!(!allows(path, &[Role::Service]), "{path}");
            assert!(allows(path, &[Role::TenantUser]), "{path}");
        }
    }
}
