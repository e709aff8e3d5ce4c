//! The telemetry layer, outermost in every service's stack: each call is
//! one request of the layer's [`crate::Service`] (a server span made a child of the caller's `traceparent`,
//! or, with nothing exporting spans, a task-local scope holding its trace),
//! and its outcome is recorded from the response (`rpc.grpc.status_code`;
//! ERROR only for the codes that are the server's, see
//! [`crate::server_failed`]).

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::request::{BoxFuture, incoming, record_response};
use crate::service::Service as Named;

/// Makes each call a request of its own, done by `service` (see the
/// module docs).
pub fn layer(service: Named) -> TelemetryLayer {
    TelemetryLayer { service }
}

#[derive(Clone, Debug)]
pub struct TelemetryLayer {
    service: Named,
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TelemetryService { inner, service: self.service.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct TelemetryService<S> {
    inner: S,
    service: Named,
}

impl<S, B, ResBody> Service<Request<B>> for TelemetryService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request = incoming(req.uri().path(), req.headers(), &self.service);
        // Called here, not cloned into the future: the inner layers only
        // build their futures when called (they log when those run, inside
        // the request), and a clone of the whole stack per call costs.
        let call = self.inner.call(req);
        request.run(async move {
            let response = call.await;
            if let Ok(resp) = &response {
                record_response(resp.headers());
            }
            response
        })
    }
}
