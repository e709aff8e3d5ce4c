//! The one table that says who may call each RPC of every service: which
//! user roles, and which service scopes (a service identity may call only
//! what the scopes its declaration names open, see [`Scope`]). The server
//! layer consults it before any handler runs; an RPC missing from the
//! table is refused (fail closed), and a unit test holds the table to the
//! compiled protos: every RPC has exactly one line, and every line names a
//! real RPC.

use crate::{Role, Scope};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (health, reflection, login, JWKS, service login).
    Public,
    /// A verified token of a user with one of `roles`, or of a service
    /// identity granted one of `scopes`.
    Callers { roles: &'static [Role], scopes: &'static [Scope] },
}

use Role::{PlatformAdmin as PA, TenantAdmin as TA, TenantUser as TU};
use Scope::{DataPlane, Directory, Lifecycle, MeteringWriter, UsageReader};

const NONE: &[Scope] = &[];
/// The registry's changes to a tenant, user management: the lifecycle
/// workflows (and the operator).
const LIFECYCLE: &[Scope] = &[Lifecycle];
/// Tenant records, read: every service's tenant cache, the workflows, and
/// the cost reports (which price every tenant).
const READ_TENANTS: &[Scope] = &[Directory, Lifecycle, DataPlane, UsageReader];
/// Usage and cost, read.
const READ_USAGE: &[Scope] = &[UsageReader];

const fn users(roles: &'static [Role]) -> Access {
    Access::Callers { roles, scopes: NONE }
}

const fn callers(roles: &'static [Role], scopes: &'static [Scope]) -> Access {
    Access::Callers { roles, scopes }
}

/// User management: platform callers anywhere, tenant admins in their own
/// tenant (the handlers check which tenant).
const USER_ADMIN: Access = callers(&[PA, TA], LIFECYCLE);
/// Tenant items are for the tenant's own users; no service identity reads
/// them through `Data` (the lifecycle workflows move them through
/// `DataAdmin`, which no user or tenant token may call).
const TENANT_DATA: Access = users(&[PA, TA, TU]);

/// `(gRPC path, access)` for every RPC of every tenantmesh service.
pub const TABLE: &[(&str, Access)] = &[
    ("/tenantmesh.auth.v1.Auth/Login", Access::Public),
    ("/tenantmesh.auth.v1.Auth/GetJwks", Access::Public),
    ("/tenantmesh.auth.v1.Auth/IssueServiceToken", Access::Public),
    ("/tenantmesh.auth.v1.Auth/Refresh", Access::Public),
    ("/tenantmesh.auth.v1.Auth/Revoke", Access::Public),
    ("/tenantmesh.auth.v1.Auth/CreateUser", USER_ADMIN),
    ("/tenantmesh.auth.v1.Auth/ListUsers", USER_ADMIN),
    ("/tenantmesh.auth.v1.Auth/DisableUser", USER_ADMIN),
    ("/tenantmesh.auth.v1.Auth/DeleteUser", USER_ADMIN),
    ("/tenantmesh.auth.v1.Auth/RotateSigningKey", users(&[PA])),
    ("/tenantmesh.registry.v1.TenantRegistry/CreateTenant", callers(&[PA], LIFECYCLE)),
    // Tenant admins and users see their own tenant (the handler checks which).
    ("/tenantmesh.registry.v1.TenantRegistry/GetTenant", callers(&[PA, TA, TU], READ_TENANTS)),
    ("/tenantmesh.registry.v1.TenantRegistry/ListTenants", callers(&[PA], READ_TENANTS)),
    ("/tenantmesh.registry.v1.TenantRegistry/UpdateTenant", callers(&[PA], LIFECYCLE)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantStatus", callers(&[PA], LIFECYCLE)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetIdentityProvider", callers(&[PA], LIFECYCLE)),
    // Where a tenant's data lives (and where its users' calls are sent).
    ("/tenantmesh.registry.v1.TenantRegistry/SetPlacement", callers(&[PA], LIFECYCLE)),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantLimits", callers(&[PA], LIFECYCLE)),
    ("/tenantmesh.registry.v1.TenantRegistry/WatchTenants", callers(&[], &[Directory, Lifecycle, DataPlane])),
    ("/tenantmesh.onboarding.v1.Onboarding/RegisterTenant", users(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/GetOnboardingStatus", callers(&[PA, TA], LIFECYCLE)),
    ("/tenantmesh.onboarding.v1.Onboarding/GetWorkflow", callers(&[PA, TA], LIFECYCLE)),
    ("/tenantmesh.onboarding.v1.Onboarding/RetryOnboarding", users(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/OffboardTenant", users(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/ChangeTier", users(&[PA])),
    ("/tenantmesh.onboarding.v1.Onboarding/WatchEvents", users(&[PA, TA])),
    // What a tenant holds alone: its cost (GetTenantCost asks with the caller's identity).
    ("/tenantmesh.onboarding.v1.Onboarding/ListTenantResources", callers(&[PA, TA], &[Lifecycle, UsageReader])),
    // A tenant admin only for their own tenant, and only when its tier allows it (the handler checks).
    ("/tenantmesh.onboarding.v1.Onboarding/RestoreTenant", users(&[PA, TA])),
    ("/tenantmesh.data.v1.Data/PutItem", TENANT_DATA),
    ("/tenantmesh.data.v1.Data/GetItem", TENANT_DATA),
    ("/tenantmesh.data.v1.Data/DeleteItem", TENANT_DATA),
    ("/tenantmesh.data.v1.Data/QueryItems", TENANT_DATA),
    ("/tenantmesh.data.v1.DataAdmin/ProvisionStore", callers(&[], LIFECYCLE)),
    ("/tenantmesh.data.v1.DataAdmin/DropStore", callers(&[], LIFECYCLE)),
    // The data service measures a silo instance's stored bytes through it.
    ("/tenantmesh.data.v1.DataAdmin/ExportItems", callers(&[], &[Lifecycle, DataPlane])),
    ("/tenantmesh.data.v1.DataAdmin/ImportItems", callers(&[], LIFECYCLE)),
    ("/tenantmesh.data.v1.DataAdmin/PurgeItems", callers(&[], LIFECYCLE)),
    ("/tenantmesh.data.v1.DataAdmin/SetFence", callers(&[], LIFECYCLE)),
    ("/tenantmesh.data.v1.DataAdmin/RewindItems", callers(&[], LIFECYCLE)),
    // The data service trims a silo instance's history through it.
    ("/tenantmesh.data.v1.DataAdmin/TrimHistory", callers(&[], &[Lifecycle, DataPlane])),
    // Usage is recorded by the platform (applications with a metering
    // identity, or an operator's correction), never by the tenant it bills.
    ("/tenantmesh.metering.v1.Metering/RecordUsage", callers(&[PA], &[MeteringWriter])),
    // A tenant admin reads their own tenant's (the handlers check which).
    ("/tenantmesh.metering.v1.Metering/GetUsage", callers(&[PA, TA], READ_USAGE)),
    ("/tenantmesh.metering.v1.Metering/ExportUsage", callers(&[PA, TA], READ_USAGE)),
    ("/tenantmesh.metering.v1.Metering/GetTenantCost", callers(&[PA, TA], READ_USAGE)),
    ("/tenantmesh.metering.v1.Metering/ListTenantCosts", callers(&[PA], READ_USAGE)),
    // Every tenant's data at once: the operator only.
    ("/tenantmesh.backup.v1.Backup/TakeBackup", users(&[PA])),
];

/// Infrastructure services reachable without a token.
const PUBLIC_PREFIXES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// What the server layer needs of an RPC: who may call it, and whether it
/// answers with a stream (its caller's slot among its tenant's requests in
/// flight is then held, by the stream, for as long as the stream is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub access: Access,
    pub streams: bool,
}

/// Every RPC's rule by path, built once from the table and the compiled
/// protos: one lookup per request.
fn rules() -> &'static std::collections::HashMap<&'static str, Rule> {
    static RULES: std::sync::OnceLock<std::collections::HashMap<&'static str, Rule>> = std::sync::OnceLock::new();
    RULES.get_or_init(|| {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(tenantmesh_proto::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        let mut streaming = std::collections::HashSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in service.method.iter().filter(|m| m.server_streaming()) {
                    streaming.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        TABLE
            .iter()
            .map(|(path, access)| (*path, Rule { access: *access, streams: streaming.contains(*path) }))
            .collect()
    })
}

/// The rule for a gRPC path; `None` for paths not in the table.
pub fn rule_for(path: &str) -> Option<Rule> {
    if PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Some(Rule { access: Access::Public, streams: false });
    }
    rules().get(path).copied()
}

/// The access rule for a gRPC path; `None` for paths not in the table.
pub fn access_for(path: &str) -> Option<Access> {
    rule_for(path).map(|r| r.access)
}

/// Whether the RPC at `path` answers with a stream (from the compiled protos).
pub fn streams(path: &str) -> bool {
    rule_for(path).is_some_and(|r| r.streams)
}

impl Access {
    /// Whether a caller holding `roles` (and, for a service identity,
    /// granted `scopes`) may call an RPC with this rule. A service identity
    /// is judged by its scopes alone.
    pub fn allows(&self, roles: &[Role], scopes: &[Scope]) -> bool {
        match self {
            Access::Public => true,
            Access::Callers { roles: allowed, scopes: opened } => {
                if roles.contains(&Role::Service) {
                    scopes.iter().any(|s| opened.contains(s))
                } else {
                    roles.iter().any(|r| allowed.contains(r))
                }
            }
        }
    }
}

/// Whether a caller holding `roles` and `scopes` may call `path`.
pub fn allows(path: &str, roles: &[Role], scopes: &[Scope]) -> bool {
    access_for(path).is_some_and(|a| a.allows(roles, scopes))
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
    fn streaming_rpcs_are_known_from_the_protos() {
        assert!(streams("/tenantmesh.metering.v1.Metering/ExportUsage"));
        assert!(streams("/tenantmesh.data.v1.DataAdmin/ExportItems"));
        assert!(!streams("/tenantmesh.data.v1.Data/GetItem"));
        assert!(!streams("/nope/Nope"));
    }

    #[test]
    fn unknown_paths_fail_closed_and_infrastructure_is_public() {
        assert_eq!(access_for("/tenantmesh.data.v1.Data/Scan"), None);
        assert!(!allows("/tenantmesh.data.v1.Data/Scan", &Role::ALL, &Scope::ALL));
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Some(Access::Public));
        assert!(allows("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &[], &[]));
    }

    #[test]
    fn only_lifecycle_services_move_items_in_bulk() {
        for (path, _) in TABLE.iter().filter(|(p, _)| p.starts_with("/tenantmesh.data.v1.DataAdmin/")) {
            assert!(allows(path, &[Role::Service], &[Scope::Lifecycle]), "{path}");
            assert!(!allows(path, &[Role::PlatformAdmin, Role::TenantAdmin, Role::TenantUser], &[]), "{path}");
            for scope in [Scope::Directory, Scope::MeteringWriter, Scope::UsageReader] {
                assert!(!allows(path, &[Role::Service], &[scope]), "{scope:?} may not call {path}");
            }
        }
    }

    #[test]
    fn services_never_read_tenant_items() {
        for (path, _) in TABLE.iter().filter(|(p, _)| p.starts_with("/tenantmesh.data.v1.Data/")) {
            assert!(!allows(path, &[Role::Service], &Scope::ALL), "{path}");
            assert!(allows(path, &[Role::TenantUser], &[]), "{path}");
        }
    }

    /// A service identity is judged by its scopes only: without one it may
    /// call nothing but the public RPCs, and a metering writer may record
    /// usage and nothing else.
    #[test]
    fn services_get_what_their_scopes_open_and_nothing_else() {
        for (path, access) in TABLE {
            if *access != Access::Public {
                assert!(!allows(path, &[Role::Service], &[]), "a service without scopes reached {path}");
            }
        }
        let writer: Vec<&str> = TABLE
            .iter()
            .filter(|(_, a)| *a != Access::Public && a.allows(&[Role::Service], &[Scope::MeteringWriter]))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(writer, ["/tenantmesh.metering.v1.Metering/RecordUsage"]);
        // Scopes never widen a user's rights.
        assert!(!allows("/tenantmesh.data.v1.DataAdmin/PurgeItems", &[Role::TenantAdmin], &Scope::ALL));
    }
}
