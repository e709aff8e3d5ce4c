//! The admission layer: a call of a known tenant runs when its tenant's
//! limits (rate, requests in flight, this replica's share) admit it and the
//! service has a seat for it (waiting in the fair queue, weighted by tier,
//! when the seats run out); otherwise it is refused with
//! RESOURCE_EXHAUSTED, QuotaFailure and RetryInfo. A stream holds its slot
//! for as long as it is open. Once the handler answers, the tenant is
//! charged what the call cost beyond its one token (RPCs declared
//! `CHARGE_UNITS`, from the handler's [`Handled`] report).
//!
//! Calls without a tenant context (public RPCs) pass untouched, unless the
//! process is short of CPU (`tenantmesh_service::load`): then they too wait
//! for a seat, keyed by their caller's address, with the lightest weight.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tenantmesh_admission::fairq::{FairQueue, FairQueueSettings, Seat};
use tenantmesh_admission::leases::RateShares;
use tenantmesh_admission::limits::{Cost, HeldSlot, InFlight, KeyedLimiter, Limit, LogThrottle, Refusal};
use tenantmesh_service::connection::Connection;
use tenantmesh_service::handled::Handled;
use tenantmesh_service::tiers::Tiers;
use tonic::Status;
use tower::{Layer, Service};

use crate::access::{Charge, Policies};
use crate::context::{BoxFuture, TenantContext};

/// Per-tenant limits and the service's seats.
pub struct Admission {
    /// Per-tenant rate and requests in flight, from the tenant's limits;
    /// `None` with limits switched off (`TENANTMESH_LIMITS=off`).
    limiter: Option<Arc<KeyedLimiter>>,
    /// This replica's shares of its tenants' limits, when several replicas
    /// share them (see `tenantmesh_admission::leases`); `None`: the whole.
    shares: Option<Arc<RateShares>>,
    /// At most one refusal log line per tenant and second (the rest are
    /// counted in the refusal metric): a flood must not become a log flood.
    refusal_logs: LogThrottle,
    /// The service's seats, shared fairly (by tier weight) when they run out.
    seats: Arc<FairQueue>,
    /// Tier weights for the fair queue.
    tiers: Arc<Tiers>,
    /// Hashes tenants onto the fair queue's queues (keyed per process).
    hasher: std::hash::RandomState,
    /// Where refusals are counted per tenant and limit (the `refused`
    /// meter), in a service that meters.
    meters: Option<Arc<tenantmesh_metering::meters::Meters>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("limits", &self.limiter.is_some()).finish_non_exhaustive()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(true, FairQueueSettings::default(), Arc::new(Tiers::default()))
    }
}

impl Admission {
    /// Limits on or off, the service's seats, and the tiers whose weights
    /// share them.
    pub fn new(limits: bool, seats: FairQueueSettings, tiers: Arc<Tiers>) -> Self {
        Self {
            limiter: limits.then(|| Arc::new(KeyedLimiter::new())),
            shares: None,
            refusal_logs: LogThrottle::new(),
            seats: FairQueue::new(seats),
            tiers,
            hasher: std::hash::RandomState::new(),
            meters: None,
        }
    }

    /// Counts refusals in `meters` (the `refused` meter), per tenant and limit.
    pub fn with_meters(mut self, meters: Option<Arc<tenantmesh_metering::meters::Meters>>) -> Self {
        self.meters = meters;
        self
    }

    /// A refusal of the caller's call by `limit`: in the metrics, and in the
    /// tenant's usage where the service meters.
    fn count_refusal(&self, ctx: &TenantContext, limit: Limit) {
        tenantmesh_telemetry::metrics::refused(&ctx.tenant_id, limit.name());
        if let Some(meters) = &self.meters {
            meters.refused(&ctx.tenant_id, limit.name());
        }
    }

    /// Holds each tenant's limits across replicas: this one admits at its
    /// share.
    pub fn with_rate_shares(mut self, shares: Arc<RateShares>) -> Self {
        self.shares = Some(shares);
        self
    }

    /// The per-tenant limiter (`None` with limits off).
    pub fn limiter(&self) -> Option<Arc<KeyedLimiter>> {
        self.limiter.clone()
    }

    /// A seat for the caller's request among the service's, waiting in the
    /// fair queue (weighted by tier) when they are all taken, until the
    /// call's `grpc-timeout` at the latest.
    pub async fn seat(&self, ctx: &TenantContext, headers: &http::HeaderMap) -> Result<Seat<'_>, Status> {
        use std::hash::BuildHasher;
        // Not saturated (the common case): no weight, deadline or hash
        // needed. Short of CPU, every call goes through the queue (its
        // usage counted, its seat given by usage).
        if !tenantmesh_service::load::short_of_cpu()
            && let Some(seat) = self.seats.try_acquire()
        {
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
                self.count_refusal(ctx, refusal.limit);
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

    /// A seat for a call without a tenant (a public RPC: sign-in, token
    /// refresh, keys, health) from `peer`, for when the process is short of
    /// CPU: such calls wait their turn in the fair queue too, keyed by the
    /// caller's address, with the lightest weight.
    pub async fn anonymous_seat(
        &self,
        peer: Option<std::net::IpAddr>,
        deadline: Option<std::time::Instant>,
    ) -> Result<Seat<'_>, Status> {
        use std::hash::BuildHasher;
        match self.seats.acquire(self.hasher.hash_one(("anonymous", peer)), 1, deadline).await {
            Ok(seat) => Ok(seat),
            Err(refusal) => {
                tenantmesh_telemetry::metrics::refused("anonymous", refusal.limit.name());
                if self.refusal_logs.allow("anonymous") {
                    tracing::warn!(
                        peer = ?peer,
                        reason = %refusal.description,
                        "unauthenticated request refused: the service is short of CPU (further refusals within a second are counted, not logged)"
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
                self.count_refusal(ctx, limit);
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
}

/// The time `limits`' bucket takes to fill from empty.
fn refill(limits: tenantmesh_admission::limits::Limits) -> std::time::Duration {
    match limits.rate_per_second {
        0 => tenantmesh_service::connection::MAX_PAUSE,
        rate => std::time::Duration::from_secs_f64(f64::from(limits.burst.max(1)) / f64::from(rate)),
    }
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

/// Admits calls with `admission`, by the RPCs' `policies` (which stream,
/// which are charged by units).
pub fn layer(admission: Arc<Admission>, policies: Arc<Policies>) -> AdmissionLayer {
    AdmissionLayer { admission, policies }
}

#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    admission: Arc<Admission>,
    policies: Arc<Policies>,
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService { inner, admission: self.admission.clone(), policies: self.policies.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Arc<Admission>,
    policies: Arc<Policies>,
}

impl<S, B, ResBody> Service<Request<B>> for AdmissionService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Unpin + Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = crate::context::take_ready(&mut self.inner);
        if req.extensions().get::<TenantContext>().is_none() {
            if !tenantmesh_service::load::short_of_cpu() {
                return Box::pin(async move { inner.call(req).await.map(|r| r.map(tonic::body::Body::new)) });
            }
            let streams = self.policies.rule(req.uri().path()).is_some_and(|r| r.streams);
            let admission = self.admission.clone();
            let peer = req
                .extensions()
                .get::<tenantmesh_service::connection::ConnectionInfo>()
                .and_then(|i| i.tcp.remote_addr())
                .map(|a| a.ip());
            let deadline =
                tenantmesh_service::runtime::grpc_timeout(req.headers()).map(|t| std::time::Instant::now() + t);
            return Box::pin(async move {
                let _seat = match admission.anonymous_seat(peer, deadline).await {
                    Ok(seat) => seat,
                    Err(status) => return Ok(crate::context::refuse(status, req, streams, None).await),
                };
                inner.call(req).await.map(|r| r.map(tonic::body::Body::new))
            });
        }
        let rule = self.policies.rule(req.uri().path());
        let (streams, units) = (rule.is_some_and(|r| r.streams), rule.is_some_and(|r| r.charge == Charge::Units));
        let admission = self.admission.clone();
        Box::pin(async move {
            // Read in place, not cloned: the guards borrow the admission,
            // not the context.
            let ctx = req.extensions().get::<TenantContext>().expect("checked above");
            let connection = Connection::of(&req);
            // A call its client resets before the answer (rapid reset) was
            // work for nothing: its connection is told, as of a refusal.
            let mut abandoned = None;
            let mut in_flight = match admission.admit(ctx) {
                Ok(guard) => {
                    if let Some(c) = connection {
                        let identity = Connection::identity(&ctx.tenant_id);
                        c.admitted(identity);
                        let cap =
                            ctx.tenant.limits.map_or(tenantmesh_service::connection::MAX_PAUSE, |l| refill(l) / 2);
                        abandoned = Some(Abandoned { connection: c.clone(), identity, cap, answered: false });
                    }
                    guard
                }
                Err(status) => {
                    // Pausing the connection for half the time the
                    // tenant's bucket takes to refill costs it nothing it
                    // would have been admitted (the bucket is not full
                    // before it is read again).
                    let paced = match (connection, ctx.tenant.limits) {
                        (Some(c), Some(limits)) => c.refused(Connection::identity(&ctx.tenant_id), refill(limits) / 2),
                        _ => None,
                    };
                    return Ok(crate::context::refuse(status, req, streams, paced).await);
                }
            };
            let _seat = match admission.seat(ctx, req.headers()).await {
                Ok(seat) => seat,
                Err(status) => return Ok(crate::context::refuse(status, req, streams, None).await),
            };
            // A stream holds its slot for as long as it is open.
            if streams
                && let (Some(guard), Some(limiter)) = (in_flight.take(), &admission.limiter)
                && let Some(held) = guard.hold(limiter)
            {
                req.extensions_mut().insert(HeldSlot::new(held));
            }
            let response = inner.call(req).await;
            if let Some(a) = &mut abandoned {
                a.answered = true;
            }
            if units {
                charge(in_flight.as_ref(), &response);
            }
            // An answer holds its tenant's slot until it is sent (or its
            // stream ends): a client that reads none of its answers holds
            // its own tenant's requests in flight, not the server's memory.
            let held = in_flight.and_then(|guard| guard.hold(admission.limiter.as_ref()?));
            response.map(|r| {
                r.map(|body| match held {
                    Some(slot) => tonic::body::Body::new(Sending { body, _slot: slot }),
                    None => tonic::body::Body::new(body),
                })
            })
        })
    }
}

/// Tells a call's connection, when dropped before its call was answered
/// (its client reset the stream), that the call was abandoned.
struct Abandoned {
    connection: Arc<Connection>,
    identity: u64,
    cap: std::time::Duration,
    answered: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.answered {
            self.connection.abandoned(self.identity, self.cap);
        }
    }
}

/// An answer's body, holding its call's slot until it is dropped (sent,
/// or its stream ended).
struct Sending<B> {
    body: B,
    _slot: tenantmesh_admission::limits::Held,
}

impl<B: http_body::Body + Unpin> http_body::Body for Sending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::TenantInfo;
    use std::convert::Infallible;
    use tenantmesh_admission::limits::Limits;
    use tenantmesh_service::handled::Usage;
    use tower::ServiceExt as _;

    const GET: &str = "/tenantmesh.data.v1.Data/GetItem";

    fn tenant(id: &str) -> TenantContext {
        let limits = Some(Limits { rate_per_second: 1, burst: 2, max_in_flight: 0 });
        let tenant = Arc::new(TenantInfo { tier: "standard".into(), limits, ..Default::default() });
        TenantContext { tenant_id: id.into(), tenant, ..Default::default() }
    }

    /// A fake handler reporting that each call cost `cost` tokens.
    fn stacked(admission: &Arc<Admission>, cost: u32) -> impl Fn(&str, &str) -> BoxFuture<Option<String>> {
        let handler = tower::service_fn(move |_req: Request<tonic::body::Body>| async move {
            let mut response = Response::new(String::new());
            response.extensions_mut().insert(Handled { usage: Usage::default(), cost: Cost(cost), forwarded: false });
            Ok::<_, Infallible>(response)
        });
        let svc = layer(admission.clone(), Arc::new(Policies::mesh().unwrap().clone())).layer(handler);
        move |path: &str, id: &str| {
            let mut req = Request::builder().uri(path).body(tonic::body::Body::empty()).unwrap();
            req.extensions_mut().insert(tenant(id));
            let svc = svc.clone();
            Box::pin(async move {
                let resp = svc.oneshot(req).await.unwrap();
                resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
            })
        }
    }

    /// A tenant's burst is admitted and the next call refused
    /// (RESOURCE_EXHAUSTED, 8), another tenant unaffected; a call of an RPC
    /// charged by units leaves its tenant owing what its handler reported.
    #[tokio::test]
    async fn limits_refuse_and_reported_costs_are_charged() {
        let admission = Arc::new(Admission::default());
        let call = stacked(&admission, 1);
        assert_eq!(call(GET, "acme").await, None);
        assert_eq!(call(GET, "acme").await, None);
        assert_eq!(call(GET, "acme").await.as_deref(), Some("8"));
        assert_eq!(call(GET, "bolt").await, None, "another tenant's limit");

        let costly = stacked(&admission, 5);
        assert_eq!(costly(GET, "carl").await, None, "admitted on one token, then owes four");
        assert_eq!(costly(GET, "carl").await.as_deref(), Some("8"));
        // A one-token RPC's report is not charged.
        let purge = "/tenantmesh.data.v1.DataAdmin/PurgeItems";
        assert_eq!(costly(purge, "dora").await, None);
        assert_eq!(costly(purge, "dora").await, None, "charged one token each");
    }
}
