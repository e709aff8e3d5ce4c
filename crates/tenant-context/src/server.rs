//! The authentication layer, and the stack every service is served with.
//!
//! [`stack`] layers, outermost first: telemetry (the request's span or
//! scope, `tenantmesh_telemetry::layer`) -> authentication (here: the
//! verified token and the tenant's record become the call's
//! [`TenantContext`], or the call is refused) -> access (the RPC's
//! policy, [`crate::authorize`]) -> admission (the tenant's limits and the
//! service's seats, [`crate::admission`]) -> metering ([`crate::meter`]) ->
//! the handler. Each is a tower layer of its own, testable alone with a
//! fake inner service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tenantmesh_proto::registry::v1::TenantStatus;
use tonic::Status;
use tower::{Layer, Service};

use crate::access::{Access, Policies, PolicyError};
use crate::admission::Admission;
use crate::context::{BoxFuture, TenantContext};
use crate::directory::TenantDirectory;
use crate::directory::TenantInfo;
use crate::external::ExternalVerifier;
use crate::identity::Role;
use crate::metadata;
use crate::verify::{TokenVerifier, Verified, VerifyError};
use tenantmesh_admission::leases::RateShares;
use tenantmesh_admission::limits::KeyedLimiter;
use tenantmesh_service::connection::{ANONYMOUS, Connection, MAX_PAUSE};
use tenantmesh_service::handled::Handled;

/// Longest `authorization` value accepted; longer is refused unparsed.
const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// What the layers need: a token verifier and a tenant directory, the
/// admission of known callers' requests, and every RPC's policy.
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    directory: Arc<dyn TenantDirectory>,
    external: Arc<ExternalVerifier>,
    admission: Admission,
    /// Every RPC's policy (from the served protos' options).
    policies: Arc<Policies>,
    /// Told of refused calls (see [`Authenticator::with_refusals`]).
    refusals: Option<crate::authorize::Refusals>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(verifier: Arc<TokenVerifier>, directory: Arc<dyn TenantDirectory>) -> Self {
        Self {
            verifier,
            directory,
            external: Arc::new(ExternalVerifier::new()),
            admission: Admission::default(),
            // Incomplete declarations leave the table empty: every call is
            // refused (and the service's start-up refused to serve, see
            // `Policies::mesh`).
            policies: Arc::new(Policies::mesh().cloned().unwrap_or_default()),
            refusals: None,
        }
    }

    /// Tells `tell` of every call of an authenticated caller that the RPC's
    /// policy refuses (PERMISSION_DENIED): the caller, the path and the
    /// answer. It runs on the request path: it must not block.
    pub fn with_refusals(mut self, tell: crate::authorize::OnRefusal) -> Self {
        self.refusals = Some(crate::authorize::Refusals(tell));
        self
    }

    /// Serves RPCs with these policies instead of the mesh's own (a service
    /// built on the layer stack, with its own protos).
    pub fn with_policies(mut self, policies: Arc<Policies>) -> Self {
        self.policies = policies;
        self
    }

    /// The policies the layer enforces.
    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// Admission as `config` says: per-tenant limits on or off
    /// (`TENANTMESH_LIMITS`), the service's seats and wait
    /// (`TENANTMESH_MAX_IN_FLIGHT`, `TENANTMESH_QUEUE_WAIT_MS`), and the
    /// tiers whose weights share the seats.
    /// It also bounds the process's connection setups per peer
    /// (`TENANTMESH_PEER_CONNECTIONS_PER_SECOND`, see
    /// `tenantmesh_service::connection`).
    pub fn with_admission(mut self, config: &tenantmesh_service::config::CommonConfig) -> Self {
        tenantmesh_service::connection::bound_peer_setups(config.peer_connections_per_second);
        tenantmesh_service::load::configure(config.overload);
        self.external = Arc::new(ExternalVerifier::with_private_hosts(config.jwks_allow_private));
        self.admission = Admission::new(config.limits, config.fair_queue, config.tiers.clone());
        self
    }

    /// The per-tenant limiter (`None` with limits off): to charge a tenant
    /// for work it asked for outside its own calls (a restore it started).
    pub fn limiter(&self) -> Option<Arc<KeyedLimiter>> {
        self.admission.limiter()
    }

    /// Where tenants' records (their limits) come from.
    pub fn directory(&self) -> Arc<dyn TenantDirectory> {
        self.directory.clone()
    }

    /// Holds each tenant's limits across this service's replicas: this one
    /// admits at its share (leases renewed with the others, see
    /// `tenantmesh_admission::leases`).
    pub fn with_rate_shares(mut self, shares: Arc<RateShares>) -> Self {
        self.admission = self.admission.with_rate_shares(shares);
        self
    }

    /// The authenticator of a service that is neither auth nor registry:
    /// keys from the auth service's JWKS, tenants from the registry.
    pub fn remote(config: &tenantmesh_service::config::CommonConfig) -> Result<Self, tonic::transport::Error> {
        let keys = crate::verify::JwksCache::new(crate::client::channel(&config.auth_url)?);
        let verifier = TokenVerifier::new(Arc::new(keys), &config.issuer, &config.audience)
            .with_cache_capacity(config.token_cache_capacity);
        let registry = crate::client::channel(&config.registry_url)?;
        let directory = Arc::new(crate::directory::RemoteDirectory::new(
            registry,
            config.tenant_cache_ttl,
            config.tenant_cache_capacity,
        ));
        crate::directory::watch_changes(&directory, config)?;
        Ok(Self::new(Arc::new(verifier), directory).with_admission(config))
    }

    /// Establishes the caller's context from request headers, or the status
    /// to refuse the request with.
    pub async fn authenticate(&self, path: &str, headers: &http::HeaderMap) -> Result<TenantContext, Status> {
        let token = bearer_token(headers)?;
        let (verified, known) = match self.verifier.remembered(token) {
            Some(v) => (v, None),
            None if self.is_ours(token) => (self.verifier.verify(token).await.map_err(refusal)?, None),
            None => {
                let (verified, info) = self.authenticate_external(token, headers).await?;
                (Arc::new(verified), Some(info))
            }
        };
        if let Some(value) = headers.get(metadata::TENANT_ID) {
            let claimed = value.to_str().map_err(|_| Status::invalid_argument("x-tenant-id is not valid ASCII"))?;
            if claimed != &*verified.tenant_id {
                tracing::warn!(
                    security_event = "tenant_header_mismatch",
                    token_tenant = %verified.tenant_id,
                    header_tenant = %claimed,
                    subject = %verified.subject,
                    rpc = path,
                    "refused x-tenant-id that differs from the token's tenant"
                );
                return Err(Status::permission_denied("x-tenant-id does not match the token's tenant"));
            }
        }
        let info = match known {
            Some(info) => info,
            None => self
                .directory
                .lookup(&verified.tenant_id, token, None)
                .await?
                .ok_or_else(|| Status::permission_denied("tenant does not exist"))?,
        };
        match info.status {
            // Migrating tenants are read-only: the data service refuses their writes.
            TenantStatus::Active | TenantStatus::Migrating => {}
            TenantStatus::Provisioning => {
                return Err(Status::failed_precondition("tenant is still being onboarded"));
            }
            TenantStatus::Suspended | TenantStatus::Deleted | TenantStatus::Unspecified => {
                tracing::warn!(
                    security_event = "inactive_tenant",
                    tenant_id = %verified.tenant_id,
                    status = ?info.status,
                    "refused a token of an inactive tenant"
                );
                return Err(Status::permission_denied("tenant is not active"));
            }
        }
        Ok(TenantContext {
            tenant_id: verified.tenant_id.clone(),
            subject: verified.subject.clone(),
            roles: verified.roles.clone(),
            token: Arc::from(token),
            tenant: info,
            deadline: tenantmesh_service::runtime::grpc_timeout(headers).map(|t| std::time::Instant::now() + t),
            grant: verified.grant.clone(),
        })
    }
}

impl Authenticator {
    /// Whether `token` claims to come from our auth service (its `iss`).
    /// Unverified: it only picks which verification applies, and names the
    /// tenant the request's log lines are about until it is verified or
    /// refused (see `tenantmesh_telemetry::record_claimed_tenant`).
    fn is_ours(&self, token: &str) -> bool {
        let claims = jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token).ok();
        let claim = |name: &str| claims.as_ref().and_then(|c| c.get(name)?.as_str());
        if let Some(tenant) = claim("tenant_id").filter(|t| tenantmesh_service::validate_tenant_id(t).is_ok()) {
            tenantmesh_telemetry::record_claimed_tenant(tenant);
        }
        claim("iss").is_none_or(|iss| iss == self.verifier.issuer())
    }

    /// A token from another issuer: only valid for the tenant named in
    /// `x-tenant-id`, against the identity provider bound to that tenant,
    /// with the provider's signed tenant claim naming the same tenant. Such
    /// callers are tenant users.
    async fn authenticate_external(
        &self,
        token: &str,
        headers: &http::HeaderMap,
    ) -> Result<(Verified, Arc<TenantInfo>), Status> {
        let tenant = headers
            .get(metadata::TENANT_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|t| tenantmesh_service::validate_tenant_id(t).is_ok())
            .ok_or_else(|| Status::unauthenticated("tokens of an external identity provider need x-tenant-id"))?;
        tenantmesh_telemetry::record_claimed_tenant(tenant);
        let info = self.directory.lookup(tenant, token, Some(tenant)).await?.ok_or_else(|| {
            tracing::info!(
                security_event = "token_rejected",
                tenant_id = tenant,
                "external token for an unknown tenant"
            );
            Status::unauthenticated("token issuer not accepted")
        })?;
        let provider = info.identity_provider.as_ref().ok_or_else(|| {
            tracing::info!(
                security_event = "token_rejected",
                tenant_id = tenant,
                "tenant has no external identity provider"
            );
            Status::unauthenticated("token issuer not accepted")
        })?;
        let identity = self.external.verify(token, provider, tenant).await.map_err(refusal)?;
        let verified = Verified {
            tenant_id: identity.tenant_id.into(),
            subject: identity.subject.into(),
            roles: Arc::new([Role::TenantUser]),
            exp: jsonwebtoken::get_current_timestamp(),
            grant: None,
        };
        Ok((verified, info))
    }
}

/// The status for a refused token.
fn refusal(e: VerifyError) -> Status {
    match e {
        VerifyError::KeysUnavailable(_) => Status::unavailable("token keys unavailable"),
        e => {
            tracing::info!(security_event = "token_rejected", reason = %e, "refused a token");
            Status::unauthenticated(e.to_string())
        }
    }
}

fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Status> {
    let value = headers
        .get(metadata::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("missing authorization bearer token"))?;
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(Status::unauthenticated("authorization header too large"));
    }
    let value = value.to_str().map_err(|_| Status::unauthenticated("authorization header is not valid ASCII"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))
}

/// The layers every tenantmesh service is served with (see the module
/// docs), as `service` (the name its spans, logs and metrics carry).
/// Refuses to build when the authenticator's policies are empty: the
/// served protos' declarations are incomplete (the error names each RPC).
pub fn stack(
    service: tenantmesh_telemetry::Service,
    mut auth: Authenticator,
    meters: Option<Arc<tenantmesh_metering::meters::Meters>>,
) -> Result<ServerStack, PolicyError> {
    if auth.policies.is_empty() {
        return Err(Policies::mesh()
            .err()
            .cloned()
            .unwrap_or_else(|| PolicyError(vec!["no RPC declares a policy".into()])));
    }
    let policies = auth.policies.clone();
    let refusals = auth.refusals.clone();
    let admission = Arc::new(std::mem::take(&mut auth.admission).with_meters(meters.clone()));
    Ok(ServerStack {
        telemetry: tenantmesh_telemetry::layer::layer(service),
        authentication: AuthenticationLayer { auth: Arc::new(auth) },
        access: crate::authorize::layer(policies.clone()).with_refusals(refusals),
        admission: crate::admission::layer(admission, policies.clone()),
        metering: crate::meter::layer(meters, policies),
    })
}

/// The stack [`stack`] builds: one tower layer of them all.
#[derive(Clone, Debug)]
pub struct ServerStack {
    telemetry: tenantmesh_telemetry::layer::TelemetryLayer,
    authentication: AuthenticationLayer,
    access: crate::authorize::AccessLayer,
    admission: crate::admission::AdmissionLayer,
    metering: crate::meter::MeterLayer,
}

/// The service a handler is wrapped in by [`ServerStack`].
pub type Stacked<S> = tenantmesh_telemetry::layer::TelemetryService<
    AuthenticationService<
        crate::authorize::AccessService<crate::admission::AdmissionService<crate::meter::MeterService<S>>>,
    >,
>;

impl<S> Layer<S> for ServerStack {
    type Service = Stacked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = self.admission.layer(self.metering.layer(inner));
        self.telemetry.layer(self.authentication.layer(self.access.layer(inner)))
    }
}

/// The authentication layer (see the module docs).
#[derive(Clone, Debug)]
pub struct AuthenticationLayer {
    auth: Arc<Authenticator>,
}

impl<S> Layer<S> for AuthenticationLayer {
    type Service = AuthenticationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthenticationService { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AuthenticationService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, ResBody> Service<Request<B>> for AuthenticationService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Unpin + Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = crate::context::take_ready(&mut self.inner);
        if self.auth.policies.rule(req.uri().path()).is_some_and(|r| r.access == Access::Public) {
            // Identity headers on an unauthenticated call prove nothing.
            req.headers_mut().remove(metadata::TENANT_ID);
            let Some(connection) = Connection::of(&req).cloned() else { return Box::pin(inner.call(req)) };
            return Box::pin(async move {
                let response = inner.call(req).await;
                // Public RPCs refuse anonymous callers by their own limits
                // (logins per address): told to the connection too.
                let response = response?;
                let exhausted = response.headers().get("grpc-status").is_some_and(|s| s.as_bytes() == b"8");
                if !exhausted {
                    connection.admitted(ANONYMOUS);
                } else if let Some(paced) = connection.refused(ANONYMOUS, MAX_PAUSE) {
                    paced.done().await;
                }
                Ok(response)
            });
        }
        let auth = self.auth.clone();
        Box::pin(async move {
            let ctx = match auth.authenticate(req.uri().path(), req.headers()).await {
                Ok(ctx) => ctx,
                Err(status) => {
                    let paced = if matches!(
                        status.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                    ) && let Some(connection) = Connection::of(&req)
                    {
                        connection.refused(ANONYMOUS, MAX_PAUSE)
                    } else {
                        None
                    };
                    // Filed under the tenant the call names (unproven), if
                    // its token did not name one already.
                    if let Some(tenant) = req.headers().get(metadata::TENANT_ID).and_then(|v| v.to_str().ok())
                        && tenantmesh_service::validate_tenant_id(tenant).is_ok()
                    {
                        tenantmesh_telemetry::record_claimed_tenant(tenant);
                    }
                    tracing::info!(code = ?status.code(), reason = %status.message(), rpc = %req.uri().path(), "request refused");
                    let streaming = auth.policies.rule(req.uri().path()).is_some_and(|r| r.streams);
                    return Ok(crate::context::refuse(status, req, streaming, paced).await);
                }
            };
            tenantmesh_telemetry::record_tenant(&ctx.tenant_id, &ctx.tenant.tier);
            // Timed only when per-tenant metrics are exported; the layer's
            // own lookups are not the tenant's requests.
            let timing = (tenantmesh_telemetry::metrics::enabled() && !req.headers().contains_key(metadata::LOOKUP))
                .then(|| (std::time::Instant::now(), req.uri().path().to_owned(), ctx.tenant_id.clone()));
            req.extensions_mut().insert(ctx.clone());
            let response = ctx.scope(inner.call(req)).await;
            // A call forwarded to another instance is counted there.
            let forwarded = response.as_ref().ok().and_then(Handled::of).is_some_and(|h| h.forwarded);
            if let Some((started, rpc, tenant)) = timing.filter(|_| !forwarded) {
                tenantmesh_telemetry::metrics::request(&tenant, &rpc, started.elapsed().as_secs_f64());
            }
            response
        })
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(value) {
            h.insert(metadata::AUTHORIZATION, v);
        }
        h
    }

    proptest! {
        /// `Bearer <token>` yields exactly the token, for any token a JWT or
        /// an opaque token could be.
        #[test]
        fn bearer_tokens_are_read(token in "[A-Za-z0-9._~+/=-]{1,2000}", lower in any::<bool>()) {
            let scheme = if lower { "bearer" } else { "Bearer" };
            let h = headers(&format!("{scheme} {token}"));
            prop_assert_eq!(bearer_token(&h).unwrap(), token.as_str());
        }

        /// Any other header is UNAUTHENTICATED, never a panic, and never
        /// yields an empty token.
        #[test]
        fn anything_else_is_unauthenticated(value in ".{0,100}") {
            match bearer_token(&headers(&value)) {
                Ok(t) => prop_assert!(!t.is_empty() && (value.starts_with("Bearer ") || value.starts_with("bearer "))),
                Err(s) => prop_assert_eq!(s.code(), tonic::Code::Unauthenticated),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::TenantInfo;
    use crate::verify::KeySource;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct NoKeys;

    #[async_trait::async_trait]
    impl KeySource for NoKeys {
        async fn key(&self, _kid: &str) -> Result<Option<jsonwebtoken::DecodingKey>, VerifyError> {
            Ok(None)
        }
    }

    struct NoTenants;

    #[async_trait::async_trait]
    impl TenantDirectory for NoTenants {
        async fn lookup(&self, _: &str, _: &str, _: Option<&str>) -> Result<Option<Arc<TenantInfo>>, Status> {
            Ok(None)
        }
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(Arc::new(TokenVerifier::new(Arc::new(NoKeys), "iss", "aud")), Arc::new(NoTenants))
    }

    /// Without a complete set of declarations there is no stack to serve
    /// with: the error says why.
    #[test]
    fn a_stack_without_policies_is_refused() {
        let empty = authenticator().with_policies(Arc::new(Policies::default()));
        let err = stack(tenantmesh_telemetry::Service::new("test"), empty, None).unwrap_err();
        assert!(err.to_string().contains("no RPC declares a policy"), "{err}");
        assert!(
            stack(tenantmesh_telemetry::Service::new("test"), authenticator(), None).is_ok(),
            "the mesh's own protos declare every policy"
        );
    }

    /// A fake handler that counts its calls, behind the layer: a path
    /// without a policy never reaches it (UNAUTHENTICATED without a token,
    /// as any protected RPC), a public RPC does.
    #[tokio::test]
    async fn undeclared_rpcs_never_reach_the_handler() {
        use tower::ServiceExt as _;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let handler = tower::service_fn(move |_req: Request<tonic::body::Body>| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, Infallible>(Response::new(String::new())) }
        });
        let svc = stack(tenantmesh_telemetry::Service::new("test"), authenticator(), None).unwrap().layer(handler);
        let call = |path: &str| {
            let req = Request::builder().uri(path).body(tonic::body::Body::empty()).unwrap();
            svc.clone().oneshot(req)
        };
        let refused = call("/tenantmesh.data.v1.Data/Scan").await.unwrap();
        assert_eq!(refused.headers().get("grpc-status").map(|v| v.to_str().unwrap()), Some("16"));
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        let public = call("/tenantmesh.auth.v1.Auth/GetJwks").await.unwrap();
        assert!(public.headers().get("grpc-status").is_none(), "public RPCs need no token");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
