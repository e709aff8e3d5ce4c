//! The metering layer: every call of an RPC whose policy meters it
//! (`meter: METER_USAGE`) is counted for its caller's tenant: one request
//! of that RPC whatever its outcome, the handler's time, and, when it
//! succeeded, the units and bytes its handler reported
//! ([`tenantmesh_service::handled::Handled`]). A call forwarded to
//! a silo instance is counted here, once, from what the forwarding handler
//! reports of the answer.
//!
//! It sits inside the tenant-context layer, which puts the caller's
//! [`TenantContext`] in the request; a call without one (public RPCs) is
//! not metered.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tenantmesh_metering::meters::{Meters, Usage};
use tenantmesh_service::handled::Handled;
use tower::{Layer, Service};

use crate::access::Policies;
use crate::context::{BoxFuture, TenantContext};

/// Meters calls with `meters` (their RPC indexes are `policies`'
/// [`Policies::metered`] order); `None`: counts nothing (a service that
/// does not meter, a silo instance).
pub fn layer(meters: Option<Arc<Meters>>, policies: Arc<Policies>) -> MeterLayer {
    MeterLayer { meters, policies }
}

#[derive(Clone, Debug)]
pub struct MeterLayer {
    meters: Option<Arc<Meters>>,
    policies: Arc<Policies>,
}

impl<S> Layer<S> for MeterLayer {
    type Service = MeterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MeterService { inner, meters: self.meters.clone(), policies: self.policies.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct MeterService<S> {
    inner: S,
    meters: Option<Arc<Meters>>,
    policies: Arc<Policies>,
}

impl<S, B, ResBody> Service<Request<B>> for MeterService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let metered = self.meters.as_ref().and_then(|meters| {
            let rpc = self.policies.rule(req.uri().path())?.meter?;
            let tenant = req.extensions().get::<TenantContext>()?.tenant_id.clone();
            Some((meters.clone(), rpc, tenant))
        });
        let call = self.inner.call(req);
        let Some((meters, rpc, tenant)) = metered else { return Box::pin(call) };
        let started = std::time::Instant::now();
        Box::pin(async move {
            let response = call.await;
            // A failed call reports nothing: it counts as a request.
            let usage = response.as_ref().ok().and_then(Handled::of).map_or(Usage::default(), |h| h.usage);
            meters.record(&tenant, usize::from(rpc), usage, started.elapsed());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tenantmesh_metering::meters::{BYTES_RETURNED, COMPUTE_US, READ_UNITS};
    use tenantmesh_service::handled::Cost;

    const GET: &str = "/tenantmesh.data.v1.Data/GetItem";

    fn meters(dir: &tempfile::TempDir, policies: &Policies) -> Arc<Meters> {
        let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("usage.redb")).unwrap();
        Arc::new(Meters::new(table, policies.metered(), std::time::Duration::from_secs(3600)))
    }

    /// A fake handler that sleeps a little and answers OK reporting `handled`, or
    /// fails (a response without a report, as tonic makes of an error).
    fn handler(
        handled: Option<Handled>,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Send + Clone + 'static
    {
        tower::service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let mut response = Response::new(());
            if let Some(h) = handled {
                response.extensions_mut().insert(h);
            }
            Ok::<_, Infallible>(response)
        })
    }

    fn request(path: &str, tenant: Option<&str>) -> Request<()> {
        let mut req = Request::builder().uri(path).body(()).unwrap();
        if let Some(t) = tenant {
            req.extensions_mut().insert(TenantContext { tenant_id: t.into(), ..Default::default() });
        }
        req
    }

    async fn call<S>(svc: &mut MeterService<S>, req: Request<()>)
    where
        S: Service<Request<()>, Response = Response<()>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        use tower::ServiceExt as _;
        svc.ready().await.unwrap().call(req).await.unwrap();
    }

    /// A metered RPC counts a request, its handler's time and what it
    /// reported; a failed one counts the request alone.
    #[tokio::test]
    async fn metered_calls_count_what_their_handler_reported() {
        let dir = tempfile::tempdir().unwrap();
        let policies = Arc::new(Policies::mesh().unwrap().clone());
        let meters = meters(&dir, &policies);
        let reported = Handled { usage: Usage::read([5000], 5100), cost: Cost(2), forwarded: false };
        let mut ok = layer(Some(meters.clone()), policies.clone()).layer(handler(Some(reported)));
        call(&mut ok, request(GET, Some("acme"))).await;
        let mut failing = layer(Some(meters.clone()), policies).layer(handler(None));
        call(&mut failing, request(GET, Some("acme"))).await;
        let counted = meters.unflushed("acme");
        assert_eq!(counted["GetItem"], 2);
        assert_eq!(counted[READ_UNITS], 2, "5,000 bytes are two read units, once");
        assert_eq!(counted[BYTES_RETURNED], 5100);
        assert!(counted[COMPUTE_US] >= 4_000, "two handlers of 2 ms: {counted:?}");
        assert!(meters.unflushed("bolt").is_empty());
    }

    /// Calls of RPCs that meter nothing (METER_NONE), of paths without a
    /// policy, and calls without a tenant context are not counted.
    #[tokio::test]
    async fn unmetered_calls_count_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let policies = Arc::new(Policies::mesh().unwrap().clone());
        let meters = meters(&dir, &policies);
        let reported = Handled { usage: Usage::write(10, 0), cost: Cost(1), forwarded: false };
        let mut svc = layer(Some(meters.clone()), policies).layer(handler(Some(reported)));
        call(&mut svc, request("/tenantmesh.data.v1.DataAdmin/PurgeItems", Some("acme"))).await;
        call(&mut svc, request("/tenantmesh.data.v1.Data/Scan", Some("acme"))).await;
        call(&mut svc, request("/grpc.health.v1.Health/Check", Some("acme"))).await;
        call(&mut svc, request(GET, None)).await;
        assert!(meters.unflushed("acme").is_empty(), "{:?}", meters.unflushed("acme"));
    }
}
