//! The tenant context: the one cross-cutting concern every tenantmesh service
//! shares.
//!
//! - [`server::layer`] validates the bearer JWT (signature against the auth
//!   service's JWKS, `exp`, `nbf`, `iss`, `aud`, algorithm allow-list), refuses
//!   a mismatching `x-tenant-id`, checks the caller's roles against the one
//!   [`access`] table, loads the tenant's tier and status from the registry
//!   (cached) and refuses suspended tenants. It puts a [`TenantContext`] in
//!   the request extensions and runs the handler inside a task-local scope
//!   holding it.
//! - [`client::layer`] wraps every outgoing channel: it injects the current
//!   context's token and tenant id (or a service token) and the W3C
//!   `traceparent`, and fails closed when it has neither.

pub mod access;
pub mod client;
pub mod directory;
pub mod external;
pub mod server;
pub mod verify;

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::Status;

/// Metadata keys used on the wire.
pub mod metadata {
    pub const AUTHORIZATION: &str = "authorization";
    pub const TENANT_ID: &str = "x-tenant-id";
    pub const TRACEPARENT: &str = "traceparent";
    pub const GRPC_TIMEOUT: &str = "grpc-timeout";
}

/// The tenant id of the platform operator (and of service identities).
pub const PLATFORM_TENANT: &str = "platform";

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
}

/// Who is calling, established from a verified token and nothing else.
/// Cheap to clone: every part is shared (the token's identity with the
/// verified-token cache, the tenant's record with the directory's cache).
#[derive(Debug, Clone, Default)]
pub struct TenantContext {
    pub tenant_id: Arc<str>,
    /// The token's subject (a user id, or `service:<client>`).
    pub subject: Arc<str>,
    pub roles: Arc<[Role]>,
    /// The verified bearer token, forwarded on downstream calls.
    pub token: Arc<str>,
    /// The tenant as the registry records it: tier, status (ACTIVE, or
    /// MIGRATING while a tier change moves its items: read-only) and
    /// placement.
    pub tenant: Arc<directory::TenantInfo>,
    /// When the caller stops waiting (its `grpc-timeout`): every call made
    /// on its behalf carries what is left of it, and ends by then.
    pub deadline: Option<std::time::Instant>,
}
/// The future type of the tower services in this crate.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

tokio::task_local! {
    static CURRENT: TenantContext;
}

impl TenantContext {
    /// The context the server layer attached to `request`.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<&TenantContext, Status> {
        request.extensions().get::<TenantContext>().ok_or_else(|| Status::unauthenticated("no verified tenant context"))
    }

    /// The context of the request the current task is serving, if any.
    pub fn current() -> Option<TenantContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this context as the current one (for work spawned
    /// onto other tasks).
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }

    /// The tenant's tier as recorded in the registry.
    pub fn tier(&self) -> &str {
        &self.tenant.tier
    }

    pub fn status(&self) -> tenantmesh_proto::registry::v1::TenantStatus {
        self.tenant.status
    }

    /// Where the tenant's items live (`None`: the pooled table).
    pub fn placement(&self) -> Option<&tenantmesh_proto::registry::v1::Placement> {
        self.tenant.placement.as_ref()
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Platform admins and services act across tenants.
    pub fn is_platform(&self) -> bool {
        self.has_role(Role::PlatformAdmin) || self.has_role(Role::Service)
    }

    /// Refuses (PERMISSION_DENIED) unless the caller may act on `tenant_id`:
    /// its own tenant, or any tenant for platform callers.
    pub fn authorize_tenant(&self, tenant_id: &str) -> Result<(), Status> {
        if self.is_platform() || *self.tenant_id == *tenant_id {
            Ok(())
        } else {
            tracing::warn!(
                security_event = "cross_tenant_request",
                caller_tenant = %self.tenant_id,
                requested_tenant = %tenant_id,
                "refused a request naming another tenant"
            );
            Err(Status::permission_denied("caller may not act on another tenant"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_tenant_allows_own_and_platform_only() {
        let ctx = |t: &str, roles: Vec<Role>| TenantContext {
            tenant_id: t.into(),
            subject: "u".into(),
            roles: roles.into(),
            token: "t".into(),
            ..Default::default()
        };
        assert!(ctx("acme", vec![Role::TenantAdmin]).authorize_tenant("acme").is_ok());
        let denied = ctx("acme", vec![Role::TenantAdmin]).authorize_tenant("globex").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(ctx("platform", vec![Role::PlatformAdmin]).authorize_tenant("globex").is_ok());
        assert!(ctx("platform", vec![Role::Service]).authorize_tenant("globex").is_ok());
    }
}
