//! Who a caller is: the roles and scopes a token carries, a service
//! identity's grant, the token's claims, and the platform tenant.

use serde::{Deserialize, Serialize};

/// The tenant id of the platform operator (and of service identities).
pub const PLATFORM_TENANT: &str = "platform";
/// The platform tenant's tier: never limited, the heaviest fair-queue weight.
pub const PLATFORM_TIER: &str = "enterprise";

/// A caller's role, as carried in the token's `roles` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    TenantUser,
    Service,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::PlatformAdmin, Role::TenantAdmin, Role::TenantUser, Role::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::TenantUser => "tenant_user",
            Role::Service => "service",
        }
    }
}

/// What a service identity may do, as its declaration names it
/// (`TENANTMESH_SERVICE_CLIENTS=id:secret:scope+scope[@tenant+tenant]`):
/// each scope opens a set of RPCs (see [`access`](crate::access)), and none is implied.
/// A service identity declared without scopes may call nothing that
/// needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read tenant records: GetTenant, ListTenants, WatchTenants (every
    /// service's tenant cache).
    Directory,
    /// Run tenants' lifecycles: the registry's writes, user management,
    /// DataAdmin, workflow status (the onboarding service).
    Lifecycle,
    /// The data service's own work on its silo instances: measuring and
    /// trimming what they store.
    DataPlane,
    /// Record application usage events (RecordUsage), nothing else.
    MeteringWriter,
    /// Read usage and cost (GetUsage, ExportUsage, GetTenantCost,
    /// ListTenantCosts), e.g. for a billing system.
    UsageReader,
    /// Register the service itself in the control plane's catalog
    /// (RegisterService, for the service its client id names).
    Catalog,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Directory,
        Scope::Lifecycle,
        Scope::DataPlane,
        Scope::MeteringWriter,
        Scope::UsageReader,
        Scope::Catalog,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Directory => "directory",
            Scope::Lifecycle => "lifecycle",
            Scope::DataPlane => "data_plane",
            Scope::MeteringWriter => "metering_writer",
            Scope::UsageReader => "usage_reader",
            Scope::Catalog => "catalog",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A service identity's grant: its scopes and, when it is confined to
/// some tenants, which.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub scopes: Vec<Scope>,
    /// `None`: any tenant.
    pub tenants: Option<Vec<String>>,
}

impl Grant {
    pub fn allows_tenant(&self, tenant_id: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.iter().any(|t| t == tenant_id))
    }
}

/// The claims of a tenantmesh access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub tenant_id: String,
    pub roles: Vec<Role>,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    /// A service identity's scopes (service tokens only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<Scope>,
    /// The tenants a service identity is confined to, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}
