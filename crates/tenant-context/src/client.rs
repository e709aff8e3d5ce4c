//! The client layer: every outgoing call carries an identity and the trace.
//!
//! With [`Identity::Caller`] the layer forwards the current request's
//! [`TenantContext`] (token and tenant id); with [`Identity::Service`] it
//! sends a service token from `Auth.IssueServiceToken`. A call with no
//! identity to send fails closed with UNAUTHENTICATED before it leaves the
//! process. Either way a client span is opened and its W3C `traceparent`
//! injected, so one trace spans the whole call chain. Inside a request
//! with a deadline (its `grpc-timeout`) the call carries what is left of it
//! as its own `grpc-timeout` and ends with DEADLINE_EXCEEDED by then, even
//! if the peer never answers; every channel also has a 30 s timeout.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use tenantmesh_proto::auth::v1::{IssueServiceTokenRequest, auth_client::AuthClient};
use tokio::sync::Mutex;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::context::{BoxFuture, TenantContext};
use crate::identity::PLATFORM_TENANT;
use crate::metadata;

/// A lazily connecting channel to `url` (e.g. `http://127.0.0.1:50051`).
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        // A peer that vanished without closing (a killed host) is noticed
        // on long-lived streams (the registry's tenant watch) too.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect_lazy())
}

pub use tenantmesh_service::config::ServiceCredentials;

/// Channels to peers by endpoint (silo instances, the data service), each
/// wrapped to carry one identity: one connection per peer however many
/// calls share it. Bounded: past [`Channels::CAPACITY`] peers it starts
/// over (a cache of lazily connected channels, cheap to build again).
pub struct Channels {
    identity: Identity,
    cached: std::sync::Mutex<std::collections::HashMap<String, PropagatedChannel>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

impl Channels {
    pub const CAPACITY: usize = 1024;

    pub fn new(identity: Identity) -> Self {
        Self { identity, cached: Default::default() }
    }

    /// The channel to `endpoint` (built on first use).
    pub fn get(&self, endpoint: &str) -> Result<PropagatedChannel, tonic::transport::Error> {
        let mut cached = self.cached.lock().expect("channels lock");
        if let Some(c) = cached.get(endpoint) {
            return Ok(c.clone());
        }
        let c = wrap(channel(endpoint)?, self.identity.clone());
        if cached.len() >= Self::CAPACITY {
            cached.clear();
        }
        cached.insert(endpoint.to_owned(), c.clone());
        Ok(c)
    }
}

/// Fetches and caches a service token, renewing it a minute before expiry;
/// concurrent callers share one fetch.
pub struct ServiceTokenSource {
    auth: AuthClient<Channel>,
    credentials: ServiceCredentials,
    cached: Mutex<Option<(Arc<str>, Instant)>>,
}

impl std::fmt::Debug for ServiceTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokenSource").field("credentials", &self.credentials).finish()
    }
}

impl ServiceTokenSource {
    /// `auth` must be a plain channel to the auth service (not one wrapped
    /// in this layer).
    pub fn new(auth: Channel, credentials: ServiceCredentials) -> Self {
        Self { auth: tenantmesh_service::sized!(AuthClient::new(auth)), credentials, cached: Mutex::new(None) }
    }

    pub async fn token(&self) -> Result<Arc<str>, Status> {
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let resp = self
            .auth
            .clone()
            .issue_service_token(IssueServiceTokenRequest {
                client_id: self.credentials.client_id.clone(),
                client_secret: self.credentials.client_secret.clone(),
            })
            .await
            .map_err(|s| {
                tracing::warn!(code = ?s.code(), error = %s.message(), "service token request failed");
                Status::unavailable(format!("cannot obtain a service token: {}", s.message()))
            })?
            .into_inner();
        let lifetime = Duration::from_secs(resp.expires_in.max(0) as u64);
        let renew_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(60));
        let token: Arc<str> = Arc::from(resp.access_token);
        *cached = Some((token.clone(), renew_at));
        Ok(token)
    }
}

/// `grpc-timeout` for `left` (milliseconds, at least 1, at most 8 digits),
/// rounded up: the channel's own timer reads it, and must not fire before
/// the caller's deadline, or a call that ran out of time would be taken
/// for a broken one (UNAVAILABLE instead of DEADLINE_EXCEEDED).
fn grpc_timeout_value(left: Duration) -> HeaderValue {
    let ms = left.as_micros().div_ceil(1000).clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit")
}

/// Which identity outgoing calls carry.
#[derive(Clone, Debug)]
pub enum Identity {
    /// The current request's tenant context (fails closed outside one).
    Caller,
    /// A platform service identity acting for no tenant.
    Service(Arc<ServiceTokenSource>),
}

/// Wraps a channel so every call carries `identity` and the trace context.
pub fn layer(identity: Identity) -> PropagationLayer {
    PropagationLayer { identity }
}

#[derive(Clone, Debug)]
pub struct PropagationLayer {
    identity: Identity,
}

impl<S> Layer<S> for PropagationLayer {
    type Service = Propagation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Propagation { inner, identity: self.identity.clone() }
    }
}

/// A channel wrapped by [`layer`].
#[derive(Clone, Debug)]
pub struct Propagation<S> {
    inner: S,
    identity: Identity,
}

/// A channel that propagates identity and trace.
pub type PropagatedChannel = Propagation<Channel>;

/// Wraps `channel` with [`layer`].
pub fn wrap(channel: Channel, identity: Identity) -> PropagatedChannel {
    layer(identity).layer(channel)
}

impl<S, B, ResBody> Service<Request<B>> for Propagation<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send,
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
        let mut inner = crate::context::take_ready(&mut self.inner);
        let identity = self.identity.clone();
        // Read the task-local now: the returned future may be polled elsewhere.
        let current = TenantContext::current();
        let deadline = current.as_ref().and_then(|c| c.deadline);
        Box::pin(async move {
            let (token, tenant_id): (Arc<str>, Arc<str>) = match (&identity, current) {
                (Identity::Service(source), _) => match source.token().await {
                    Ok(t) => (t, PLATFORM_TENANT.into()),
                    Err(status) => return Ok(status.into_http()),
                },
                (Identity::Caller, Some(ctx)) => (ctx.token.clone(), ctx.tenant_id),
                (Identity::Caller, None) => {
                    tracing::error!(rpc = %req.uri().path(), "outgoing call without a tenant context refused");
                    return Ok(Status::unauthenticated("no tenant context for outgoing call").into_http());
                }
            };
            let path = req.uri().path().to_owned();
            let headers = req.headers_mut();
            match HeaderValue::from_str(&format!("Bearer {token}")) {
                Ok(v) => headers.insert(metadata::AUTHORIZATION, v),
                Err(_) => return Ok(Status::unauthenticated("malformed token").into_http()),
            };
            match HeaderValue::from_str(&tenant_id) {
                Ok(v) => headers.insert(metadata::TENANT_ID, v),
                Err(_) => return Ok(Status::unauthenticated("malformed tenant id").into_http()),
            };
            let left = match deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(
                            Status::deadline_exceeded("the caller's deadline passed before this call").into_http()
                        );
                    }
                    // The request's own timeout, if shorter, stands.
                    if tenantmesh_service::runtime::grpc_timeout(headers).is_none_or(|own| own > left) {
                        headers.insert(metadata::GRPC_TIMEOUT, grpc_timeout_value(left));
                    }
                    Some(left)
                }
            };
            let span = tenantmesh_telemetry::start_client_call(&path, &tenant_id, headers);
            let call = async {
                let Some(span) = span else { return inner.call(req).await };
                let response = inner.call(req).instrument(span.clone()).await;
                if let Ok(resp) = &response {
                    tenantmesh_telemetry::record_response_status(&span, resp.headers());
                }
                response
            };
            // A transport failure (the peer gone, a connection broken under
            // the call) is UNAVAILABLE, which callers retry, not UNKNOWN.
            let unavailable = |e: S::Error| {
                tracing::warn!(rpc = %path, error = %e, "outgoing call failed in transport");
                Ok(Status::unavailable(format!("{path}: {e}")).into_http())
            };
            let Some(left) = left else {
                return match call.await {
                    Err(e) => unavailable(e),
                    ok => ok,
                };
            };
            let expired = || Status::deadline_exceeded(format!("{path}: no answer within the caller's deadline"));
            match tokio::time::timeout(left, call).await {
                // The channel's own timer (it reads grpc-timeout too) may
                // fire first: still the deadline, not a cancellation.
                Err(_) => Ok(expired().into_http()),
                Ok(Err(_)) if deadline.is_some_and(|d| Instant::now() >= d) => Ok(expired().into_http()),
                Ok(Err(e)) => unavailable(e),
                Ok(response) => response,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_proto::auth::v1::GetJwksRequest;

    fn within(ms: u64) -> TenantContext {
        TenantContext {
            tenant_id: "acme".into(),
            token: "t".into(),
            deadline: Some(Instant::now() + Duration::from_millis(ms)),
            ..Default::default()
        }
    }

    /// A peer that accepts connections and never answers: a call made for
    /// a caller with 300 ms left ends with DEADLINE_EXCEEDED by then; one
    /// whose caller's deadline has passed never leaves.
    #[tokio::test]
    async fn calls_end_by_the_callers_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let mut client = AuthClient::new(wrap(channel(&format!("http://{addr}")).unwrap(), Identity::Caller));
        let started = Instant::now();
        let status = within(300).scope(client.get_jwks(GetJwksRequest {})).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        let status = within(0).scope(client.get_jwks(GetJwksRequest {})).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    }

    /// A peer that hangs up under the call: UNAVAILABLE (which callers
    /// retry), not tonic's UNKNOWN "transport error".
    #[tokio::test]
    async fn a_broken_connection_is_unavailable() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = conn.read(&mut buf).await;
                drop(conn);
            }
        });
        let mut client = AuthClient::new(wrap(channel(&format!("http://{addr}")).unwrap(), Identity::Caller));
        let status = within(5_000).scope(client.get_jwks(GetJwksRequest {})).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// Never less than what is left: 299.1 ms is 300 ms.
    #[test]
    fn grpc_timeouts_round_up() {
        let v = |us: u64| grpc_timeout_value(Duration::from_micros(us)).to_str().unwrap().to_owned();
        assert_eq!([v(0), v(1), v(299_100), v(300_000), v(300_001)], ["1m", "1m", "300m", "300m", "301m"]);
        assert_eq!(v(u64::MAX), "99999999m");
    }

    /// The call carries what is left of the caller's deadline as its
    /// `grpc-timeout`, unless its own is shorter.
    #[tokio::test]
    async fn the_deadline_travels_as_grpc_timeout() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = tower::service_fn(move |req: Request<()>| {
            let value = req.headers().get(metadata::GRPC_TIMEOUT).map(|v| v.to_str().unwrap().to_owned());
            record.lock().unwrap().push(value);
            async { Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default())) }
        });
        let mut svc = layer(Identity::Caller).layer(inner);
        // The context is read when the call is made: make it inside the scope.
        within(5_000).scope(async { svc.call(Request::new(())).await }).await.unwrap();
        let mut own = Request::new(());
        own.headers_mut().insert(metadata::GRPC_TIMEOUT, HeaderValue::from_static("100m"));
        within(5_000).scope(async { svc.call(own).await }).await.unwrap();
        let mut no_deadline = within(0);
        no_deadline.deadline = None;
        no_deadline.scope(async { svc.call(Request::new(())).await }).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let first: u64 = seen[0].as_deref().unwrap().trim_end_matches('m').parse().unwrap();
        assert!((4_000..=5_000).contains(&first), "{seen:?}");
        assert_eq!(seen[1].as_deref(), Some("100m"));
        assert_eq!(seen[2], None);
    }
}
