//! The access layer: a call of an authenticated caller reaches its handler
//! only when the RPC's policy (its proto's `tenantmesh.options.v1.policy`,
//! see [`crate::access`]) lets the caller's roles, or a service identity's
//! scopes, call it; otherwise it is PERMISSION_DENIED and logged as a
//! security event. A path without a policy is callable by nobody. A call
//! without a tenant context passes only to a public RPC (the only calls
//! the authentication layer lets through unauthenticated); any other is
//! UNAUTHENTICATED.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use crate::access::{Access, Policies};
use crate::context::{BoxFuture, TenantContext};

/// Checks each call against `policies`.
pub fn layer(policies: Arc<Policies>) -> AccessLayer {
    AccessLayer { policies, refusals: None }
}

/// What is told of a refused call: the caller, the RPC's path and the answer.
pub type OnRefusal = Arc<dyn Fn(&TenantContext, &str, &Status) + Send + Sync>;

/// Told of each authenticated call the policy refuses (how a service
/// audits refused attempts).
#[derive(Clone)]
pub struct Refusals(pub OnRefusal);

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refusals")
    }
}

#[derive(Clone, Debug)]
pub struct AccessLayer {
    policies: Arc<Policies>,
    refusals: Option<Refusals>,
}

impl AccessLayer {
    /// Tells `refusals` of every refused call of an authenticated caller.
    pub fn with_refusals(mut self, refusals: Option<Refusals>) -> Self {
        self.refusals = refusals;
        self
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService { inner, policies: self.policies.clone(), refusals: self.refusals.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct AccessService<S> {
    inner: S,
    policies: Arc<Policies>,
    refusals: Option<Refusals>,
}

/// Why `ctx` may not call `path` under `policies`, if it may not.
fn refused(policies: &Policies, path: &str, ctx: &TenantContext) -> Option<Status> {
    let scopes = ctx.grant.as_ref().map_or(&[][..], |g| g.scopes.as_slice());
    if policies.rule(path).is_some_and(|r| r.access.allows(&ctx.roles, scopes)) {
        return None;
    }
    tracing::warn!(
        security_event = "role_denied",
        tenant_id = %ctx.tenant_id,
        subject = %ctx.subject,
        rpc = path,
        "caller's roles do not allow this rpc"
    );
    Some(Status::permission_denied("caller's role may not call this rpc"))
}

impl<S, B, ResBody> Service<Request<B>> for AccessService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Send + 'static,
    B: http_body::Body + Unpin + Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<BoxFuture<Result<Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let refusal = match req.extensions().get::<TenantContext>() {
            Some(ctx) => {
                let refusal = refused(&self.policies, req.uri().path(), ctx);
                if let (Some(status), Some(Refusals(tell))) = (&refusal, &self.refusals) {
                    tell(ctx, req.uri().path(), status);
                }
                refusal
            }
            // Fail closed even if no authentication layer ran before this
            // one: only a public RPC goes on without a caller.
            None => (!self.policies.rule(req.uri().path()).is_some_and(|r| r.access == Access::Public))
                .then(|| Status::unauthenticated("no verified caller")),
        };
        match refusal {
            // Answered once a unary request is read (see `refuse`): a
            // refusal sent before it makes h2 reset the stream, and enough
            // of those end the connection, with every other call on it.
            Some(status) => {
                let streams = self.policies.rule(req.uri().path()).is_some_and(|r| r.streams);
                Either::Left(Box::pin(async move { Ok(crate::context::refuse(status, req, streams, None).await) }))
            }
            None => Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Grant, Role, Scope};
    use std::convert::Infallible;
    use tower::ServiceExt as _;

    fn ctx(roles: &[Role], scopes: &[Scope]) -> TenantContext {
        let grant = (!scopes.is_empty()).then(|| Arc::new(Grant { scopes: scopes.to_vec(), tenants: None }));
        TenantContext { tenant_id: "acme".into(), roles: roles.into(), grant, ..Default::default() }
    }

    async fn code(path: &str, caller: Option<TenantContext>) -> Option<String> {
        let handler = tower::service_fn(|_req: Request<tonic::body::Body>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        });
        let svc = layer(Arc::new(Policies::mesh().unwrap().clone())).layer(handler);
        let mut req = Request::builder().uri(path).body(tonic::body::Body::empty()).unwrap();
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        let resp = svc.oneshot(req).await.unwrap();
        resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
    }

    /// A fake handler behind the layer: the roles and scopes a policy names
    /// reach it, others are PERMISSION_DENIED (7), undeclared paths reach it
    /// for nobody, and calls without a context reach only public RPCs
    /// (otherwise UNAUTHENTICATED, 16).
    #[tokio::test]
    async fn policies_decide_who_reaches_the_handler() {
        let put = "/tenantmesh.data.v1.Data/PutItem";
        assert_eq!(code(put, Some(ctx(&[Role::TenantUser], &[]))).await, None);
        assert_eq!(code(put, Some(ctx(&[Role::Service], &Scope::ALL))).await.as_deref(), Some("7"));
        let purge = "/tenantmesh.data.v1.DataAdmin/PurgeItems";
        assert_eq!(code(purge, Some(ctx(&[Role::Service], &[Scope::Lifecycle]))).await, None);
        assert_eq!(code(purge, Some(ctx(&[Role::PlatformAdmin], &[]))).await.as_deref(), Some("7"));
        let undeclared = "/tenantmesh.data.v1.Data/Scan";
        assert_eq!(code(undeclared, Some(ctx(&Role::ALL, &Scope::ALL))).await.as_deref(), Some("7"));
        assert_eq!(code("/tenantmesh.auth.v1.Auth/GetJwks", None).await, None);
        assert_eq!(code("/grpc.health.v1.Health/Check", None).await, None);
        assert_eq!(code(put, None).await.as_deref(), Some("16"), "no caller, no data");
        assert_eq!(code(undeclared, None).await.as_deref(), Some("16"));
    }

    /// A refused unary call is answered once its request has been read (its
    /// body ends 50 ms after its headers here), never before: an answer
    /// before the client's END_STREAM makes h2 reset the stream, and 1,024
    /// such resets end the connection with every call on it (a gateway's,
    /// for one tenant's forbidden calls).
    #[tokio::test]
    async fn a_refusal_is_answered_after_its_request_is_read() {
        let handler = tower::service_fn(|_req: Request<tonic::body::Body>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        });
        let svc = layer(Arc::new(Policies::mesh().unwrap().clone())).layer(handler);
        let late = futures_util::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            Ok::<_, Status>(http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\0")))
        });
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(late));
        let mut req = Request::builder().uri("/tenantmesh.data.v1.DataAdmin/PurgeItems").body(body).unwrap();
        req.extensions_mut().insert(ctx(&[Role::TenantUser], &[]));
        let started = std::time::Instant::now();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.headers().get("grpc-status").unwrap(), "7");
        assert!(started.elapsed() >= std::time::Duration::from_millis(45), "answered before the request was read");
    }
}
