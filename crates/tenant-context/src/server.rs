//! The server layer: every request either carries a verified tenant context
//! into its handler or is refused before the handler runs.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tenantmesh_proto::registry::v1::TenantStatus;
use tonic::Status;
use tower::{Layer, Service};

use crate::access::{Access, Charge, Policies, PolicyError, Set};
use crate::context::{BoxFuture, TenantContext};
use crate::directory::TenantDirectory;
use crate::directory::TenantInfo;
use crate::external::ExternalVerifier;
use crate::identity::Role;
use crate::metadata;
use crate::verify::{TokenVerifier, Verified, VerifyError};
use tenantmesh_admission::fairq::{FairQueue, FairQueueSettings, Seat};
use tenantmesh_admission::leases::RateShares;
use tenantmesh_admission::limits::{Cost, InFlight, KeyedLimiter, Limit, LogThrottle, Refusal};
use tenantmesh_service::handled::Handled;
use tenantmesh_service::tiers::Tiers;

/// The access of a path that declares no policy.
const NOBODY: Access = Access::Callers { roles: Set::EMPTY, scopes: Set::EMPTY };

/// Longest `authorization` value accepted; longer is refused unparsed.
const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// What the layer needs: a token verifier and a tenant directory; and,
/// once a caller is known, the admission of its tenant's requests.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    directory: Arc<dyn TenantDirectory>,
    external: Arc<ExternalVerifier>,
    /// Per-tenant rate and requests in flight, from the tenant's limits;
    /// `None` with limits switched off (`TENANTMESH_LIMITS=off`).
    limiter: Option<Arc<KeyedLimiter>>,
    /// This replica's shares of its tenants' limits, when several replicas
    /// share them (see `tenantmesh_admission::leases`); `None`: the whole.
    shares: Option<Arc<RateShares>>,
    /// At most one refusal log line per tenant and second (the rest are
    /// counted in the refusal metric): a flood must not become a log flood.
    refusal_logs: Arc<LogThrottle>,
    /// The service's seats, shared fairly (by tier weight) when they run out.
    seats: Arc<FairQueue>,
    /// Tier weights for the fair queue.
    tiers: Arc<Tiers>,
    /// Hashes tenants onto the fair queue's queues (keyed per process).
    hasher: std::hash::RandomState,
    /// Every RPC's policy (from the served protos' options).
    policies: Arc<Policies>,
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
            limiter: Some(Arc::new(KeyedLimiter::new())),
            shares: None,
            refusal_logs: Arc::new(LogThrottle::new()),
            seats: FairQueue::new(FairQueueSettings::default()),
            tiers: Arc::new(Tiers::default()),
            hasher: std::hash::RandomState::new(),
            // Incomplete declarations leave the table empty: every call is
            // refused (and the service's start-up refused to serve, see
            // `Policies::mesh`).
            policies: Arc::new(Policies::mesh().cloned().unwrap_or_default()),
        }
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
    pub fn with_admission(mut self, config: &tenantmesh_service::config::CommonConfig) -> Self {
        self.limiter = config.limits.then(|| Arc::new(KeyedLimiter::new()));
        self.external = Arc::new(ExternalVerifier::with_private_hosts(config.jwks_allow_private));
        self.seats = FairQueue::new(config.fair_queue);
        self.tiers = config.tiers.clone();
        self
    }

    /// The per-tenant limiter (`None` with limits off): to charge a tenant
    /// for work it asked for outside its own calls (a restore it started).
    pub fn limiter(&self) -> Option<Arc<KeyedLimiter>> {
        self.limiter.clone()
    }

    /// Where tenants' records (their limits) come from.
    pub fn directory(&self) -> Arc<dyn TenantDirectory> {
        self.directory.clone()
    }

    /// Holds each tenant's limits across this service's replicas: this one
    /// admits at its share (leases renewed with the others, see
    /// `tenantmesh_admission::leases`).
    pub fn with_rate_shares(mut self, shares: Arc<RateShares>) -> Self {
        self.shares = Some(shares);
        self
    }

    /// A seat for the caller's request among the service's, waiting in the
    /// fair queue (weighted by tier) when they are all taken, until the
    /// call's `grpc-timeout` at the latest.
    pub async fn seat(&self, ctx: &TenantContext, headers: &http::HeaderMap) -> Result<Seat<'_>, Status> {
        use std::hash::BuildHasher;
        // Not saturated (the common case): no weight, deadline or hash needed.
        if let Some(seat) = self.seats.try_acquire() {
            return Ok(seat);
        }
        let weight = match ctx.tenant.limits {
            Some(_) => self.tiers.get(&ctx.tenant.tier).map_or(1, |t| t.weight),
            // The platform (onboarding, operators) counts as the heaviest tier.
            None => self.tiers.max_weight(),
        };
        let deadline = tenantmesh_service::runtime::grpc_timeout(headers).map(|t| std::time::Instant::now() + t);
        match self.seats.acquire(self.hasher.hash_one(&*ctx.tenant_id), weight, deadline).await {
            Ok(seat) => Ok(seat),
            Err(refusal) => {
                tenantmesh_telemetry::metrics::refused(&ctx.tenant_id, refusal.limit.name());
                if self.refusal_logs.allow(&*ctx.tenant_id) {
                    tracing::warn!(
                        tenant_id = %ctx.tenant_id,
                        limit = refusal.limit.name(),
                        reason = %refusal.description,
                        "request refused: the service is saturated (further refusals within a second are counted, not logged)"
                    );
                }
                Err(refusal.status())
            }
        }
    }

    /// Admits a request of the caller's tenant under its limits (rate and
    /// requests in flight); the guard holds its slot until dropped. Tenants
    /// without limits (the platform) are not limited.
    pub fn admit(&self, ctx: &TenantContext) -> Result<Option<InFlight<'_>>, Status> {
        let (Some(limiter), Some(limits)) = (&self.limiter, ctx.tenant.limits) else { return Ok(None) };
        let share = self.shares.as_ref().map_or(1.0, |s| s.share(&ctx.tenant_id, limits));
        match limiter.admit(&*ctx.tenant_id, 1, limits.share(share)) {
            Ok(guard) => Ok(Some(guard)),
            Err((limit, retry_after)) => {
                if let Some(shares) = &self.shares {
                    shares.refused(&ctx.tenant_id);
                }
                let mut description = match limit {
                    Limit::Concurrency => format!("{} requests in flight", limits.max_in_flight),
                    _ => format!("{} requests per second, burst {}", limits.rate_per_second, limits.burst),
                };
                if share < 1.0 {
                    description.push_str(&format!(" (across replicas; this one's share {:.0}%)", share * 100.0));
                }
                let refusal = Refusal { limit, subject: format!("tenant:{}", ctx.tenant_id), description, retry_after };
                tenantmesh_telemetry::metrics::refused(&ctx.tenant_id, limit.name());
                if self.refusal_logs.allow(&*ctx.tenant_id) {
                    tracing::warn!(
                        tenant_id = %ctx.tenant_id,
                        limit = limit.name(),
                        retry_after_ms = retry_after.as_millis() as u64,
                        "request refused by the tenant's limit (further refusals within a second are counted, not logged)"
                    );
                }
                Err(refusal.status())
            }
        }
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
    pub async fn authenticate(
        &self,
        path: &str,
        access: Access,
        headers: &http::HeaderMap,
    ) -> Result<TenantContext, Status> {
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
        if !access.allows(&verified.roles, verified.scopes()) {
            tracing::warn!(
                security_event = "role_denied",
                tenant_id = %verified.tenant_id,
                subject = %verified.subject,
                rpc = path,
                "caller's roles do not allow this rpc"
            );
            return Err(Status::permission_denied("caller's role may not call this rpc"));
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
    /// Unverified: it only picks which verification applies.
    fn is_ours(&self, token: &str) -> bool {
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token)
            .ok()
            .and_then(|c| c.get("iss").and_then(|i| i.as_str()).map(str::to_owned));
        iss.is_none_or(|iss| iss == self.verifier.issuer())
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

/// Charges the request's tenant for what it cost beyond the one token taken
/// at admission: the cost its handler reported ([`Handled`]).
fn charge<B, E>(in_flight: Option<&InFlight<'_>>, response: &Result<Response<B>, E>) {
    if let (Some(guard), Ok(r)) = (in_flight, response)
        && let Some(Handled { cost: Cost(tokens), .. }) = Handled::of(r)
    {
        guard.charge(tokens.saturating_sub(1));
    }
}

/// The layers every tenantmesh service is served with, outermost first:
/// telemetry and the tenant context (authentication, access from the RPC's
/// policy, admission), then metering ([`crate::meter`]), then the handler.
/// Refuses to build when the authenticator's policies are empty: the
/// served protos' declarations are incomplete (the error names each RPC).
pub fn stack(
    auth: Authenticator,
    meters: Option<Arc<tenantmesh_metering::meters::Meters>>,
) -> Result<tower::layer::util::Stack<crate::meter::MeterLayer, TenantContextLayer>, PolicyError> {
    if auth.policies.is_empty() {
        return Err(Policies::mesh()
            .err()
            .cloned()
            .unwrap_or_else(|| PolicyError(vec!["no RPC declares a policy".into()])));
    }
    let policies = auth.policies.clone();
    Ok(tower::layer::util::Stack::new(crate::meter::layer(meters, policies), layer(auth)))
}

/// The tower layer that authenticates every request (see the crate docs).
pub fn layer(auth: Authenticator) -> TenantContextLayer {
    // One Arc for the whole authenticator: a request clones one reference
    // count, not one per cache and limiter (shared counters that every
    // core would otherwise bounce between them on every call).
    TenantContextLayer { auth: Arc::new(auth) }
}

#[derive(Clone, Debug)]
pub struct TenantContextLayer {
    auth: Arc<Authenticator>,
}

impl<S> Layer<S> for TenantContextLayer {
    type Service = TenantContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantContextService { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct TenantContextService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, ResBody> Service<Request<B>> for TenantContextService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let rule = auth.policies.rule(req.uri().path());
        let request = tenantmesh_telemetry::incoming(req.uri().path(), req.headers());
        request.run(async move {
            let response = match rule {
                Some(rule) if rule.access == Access::Public => {
                    // Identity headers on an unauthenticated call prove nothing.
                    req.headers_mut().remove(metadata::TENANT_ID);
                    inner.call(req).await
                }
                // A path without a policy is callable by nobody (fail
                // closed): the caller is authenticated, then refused.
                _ => match auth.authenticate(req.uri().path(), rule.map_or(NOBODY, |r| r.access), req.headers()).await {
                    Ok(ctx) => {
                        tenantmesh_telemetry::record_tenant(&ctx.tenant_id, &ctx.tenant.tier);
                        let admitted = match auth.admit(&ctx) {
                            Ok(in_flight) => auth.seat(&ctx, req.headers()).await.map(|seat| (in_flight, seat)),
                            Err(status) => Err(status),
                        };
                        match admitted {
                            Ok((mut in_flight, _seat)) => {
                                // A stream holds its slot for as long as it is open.
                                if rule.is_some_and(|r| r.streams)
                                    && let (Some(guard), Some(limiter)) = (in_flight.take(), &auth.limiter)
                                    && let Some(held) = guard.hold(limiter)
                                {
                                    req.extensions_mut().insert(tenantmesh_admission::limits::HeldSlot::new(held));
                                }
                                // Timed only when per-tenant metrics are exported.
                                let timing = (tenantmesh_telemetry::metrics::enabled()
                                    && !req.headers().contains_key(metadata::LOOKUP))
                                .then(|| (std::time::Instant::now(), req.uri().path().to_owned(), ctx.tenant_id.clone()));
                                req.extensions_mut().insert(ctx.clone());
                                let response = ctx.scope(inner.call(req)).await;
                                // A call forwarded to another instance is counted there.
                                let forwarded = response.as_ref().ok().and_then(Handled::of).is_some_and(|h| h.forwarded);
                                if let Some((started, rpc, tenant)) = timing.filter(|_| !forwarded) {
                                    tenantmesh_telemetry::metrics::request(&tenant, &rpc, started.elapsed().as_secs_f64());
                                }
                                if rule.is_some_and(|r| r.charge == Charge::Units) {
                                    charge(in_flight.as_ref(), &response);
                                }
                                response
                            }
                            Err(status) => Ok(status.into_http()),
                        }
                    }
                    Err(status) => {
                        tracing::info!(code = ?status.code(), reason = %status.message(), rpc = %req.uri().path(), "request refused");
                        Ok(status.into_http())
                    }
                },
            };
            if let Ok(resp) = &response {
                tenantmesh_telemetry::record_response(resp.headers());
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
        let err = stack(empty, None).unwrap_err();
        assert!(err.to_string().contains("no RPC declares a policy"), "{err}");
        assert!(stack(authenticator(), None).is_ok(), "the mesh's own protos declare every policy");
    }

    /// A fake handler that counts its calls, behind the layer: a path
    /// without a policy never reaches it (UNAUTHENTICATED without a token,
    /// as any protected RPC), a public RPC does.
    #[tokio::test]
    async fn undeclared_rpcs_never_reach_the_handler() {
        use tower::ServiceExt as _;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let handler = tower::service_fn(move |_req: Request<()>| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, Infallible>(Response::new(String::new())) }
        });
        let svc = layer(authenticator()).layer(handler);
        let call = |path: &str| {
            let req = Request::builder().uri(path).body(()).unwrap();
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
