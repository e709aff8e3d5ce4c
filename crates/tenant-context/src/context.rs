//! The tenant context a request carries from the server layer to its
//! handler and on to every downstream call.

use std::future::Future;
use std::sync::Arc;

use tonic::Status;

use crate::directory;
use crate::identity::{Grant, Role, Scope};

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
    /// A service identity's grant (`None` for users and platform admins).
    pub grant: Option<Arc<Grant>>,
}
/// The future type of the tower services in this crate.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// The inner service a layer's `call` uses: the one `poll_ready` drove to
/// readiness, leaving a fresh clone in its place (tower's rule for a
/// service whose future outlives `call`).
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

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

    /// Whether the caller is a service identity granted `scope`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.has_role(Role::Service) && self.grant.as_ref().is_some_and(|g| g.scopes.contains(&scope))
    }

    /// Platform admins, and services not confined to some tenants, act
    /// on every tenant.
    fn acts_on_every_tenant(&self) -> bool {
        self.has_role(Role::PlatformAdmin)
            || (self.has_role(Role::Service) && self.grant.as_ref().is_none_or(|g| g.tenants.is_none()))
    }

    /// Refuses (PERMISSION_DENIED) unless the caller may act on every
    /// tenant at once (lists, watches): a platform admin, or a service
    /// identity confined to no tenants.
    pub fn authorize_all_tenants(&self) -> Result<(), Status> {
        if self.acts_on_every_tenant() {
            return Ok(());
        }
        tracing::warn!(
            security_event = "cross_tenant_request",
            caller_tenant = %self.tenant_id,
            subject = %self.subject,
            "refused a request about every tenant"
        );
        Err(Status::permission_denied("caller may act only on its own tenants, not on every tenant"))
    }

    /// Refuses (PERMISSION_DENIED) unless the caller may act on `tenant_id`:
    /// its own tenant; any tenant for platform admins; for service
    /// identities, any tenant or the ones they are confined to.
    pub fn authorize_tenant(&self, tenant_id: &str) -> Result<(), Status> {
        let service_may =
            self.has_role(Role::Service) && self.grant.as_ref().is_none_or(|g| g.allows_tenant(tenant_id));
        if self.has_role(Role::PlatformAdmin) || service_may || *self.tenant_id == *tenant_id {
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

/// The request of a call refused before its body was read, read to its end
/// (at most 100 ms and 64 KiB) and discarded: answered before the client's
/// END_STREAM, the stream would be reset by the server, and a DATA frame of
/// the client's arriving after many more such resets counts as a protocol
/// error of the peer's; 1,024 of those end the connection (the guard
/// against MadeYouReset), every call on it with them. A unary request's
/// body is a few bytes, usually read with its headers.
async fn drain<B>(body: B)
where
    B: http_body::Body + Unpin,
{
    use http_body_util::BodyExt as _;
    let mut body = body;
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), async {
        let mut read = 0usize;
        while read < 64 * 1024 {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read += bytes::Buf::remaining(data);
                    }
                }
                _ => return,
            }
        }
    })
    .await;
}

/// The answer refusing a call with `status`: a unary call's request
/// [`drain`]ed first (a streaming one's is not: its client may never end it),
/// then `paced`'s wait waited out (a paced refusal: see
/// `tenantmesh_service::connection::Connection::refused`).
pub async fn refuse<B, R>(
    status: tonic::Status,
    request: http::Request<B>,
    streaming: bool,
    paced: Option<tenantmesh_service::connection::Paced>,
) -> http::Response<R>
where
    B: http_body::Body + Unpin,
    R: Default,
{
    if !streaming {
        drain(request.into_body()).await;
    }
    if let Some(paced) = paced {
        paced.done().await;
    }
    status.into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PLATFORM_TENANT;

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
        assert!(ctx("acme", vec![Role::TenantAdmin]).authorize_all_tenants().is_err());
        assert!(ctx("platform", vec![Role::PlatformAdmin]).authorize_all_tenants().is_ok());
    }

    /// A service identity confined to some tenants acts on those only, and
    /// never on every tenant at once; its scopes are its own.
    #[test]
    fn a_confined_service_acts_on_its_tenants_only() {
        let grant = Grant { scopes: vec![Scope::MeteringWriter], tenants: Some(vec!["acme".into()]) };
        let ctx = TenantContext {
            tenant_id: PLATFORM_TENANT.into(),
            subject: "service:billing".into(),
            roles: vec![Role::Service].into(),
            grant: Some(Arc::new(grant)),
            ..Default::default()
        };
        assert!(ctx.authorize_tenant("acme").is_ok());
        assert_eq!(ctx.authorize_tenant("globex").unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(ctx.authorize_all_tenants().unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(ctx.has_scope(Scope::MeteringWriter) && !ctx.has_scope(Scope::Lifecycle));
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("admin"), None);
    }
}
