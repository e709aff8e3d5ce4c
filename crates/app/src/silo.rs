//! Silo instances of an application service, and forwarding to them by
//! the stack itself.
//!
//! An instance started for one silo tenant (`TENANTMESH_SILO_TENANT`)
//! registers in the catalog with that tenant, serves it alone (another
//! tenant's call is PERMISSION_DENIED; the workflows' service identity is
//! let through) and meters nothing: the shared instance counts each of the
//! tenant's calls once, as it forwards it.
//!
//! The shared instance keeps the catalog's instances of its service (asked
//! every second with its identity) and, for every call of the service's
//! own gRPC services by a tenant placed in a silo that has an instance,
//! forwards the call as it came (HTTP/2, headers and all: the caller's
//! token, tenant, trace and deadline) to that instance, generically, per
//! call: no handler has an arm for it. Without an instance the shared
//! instance serves the tenant itself, on the tenant's own tables.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{IsolationModel, ListServicesRequest};
use tenantmesh_service::handled::{Cost, Handled, Usage};
use tenantmesh_tenant_context::client::PropagatedChannel;
use tenantmesh_tenant_context::{Role, TenantContext};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Layer, Service};

use crate::tables::model_of;

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The instances of one service, by silo tenant: endpoint and its channel.
#[derive(Clone, Default)]
pub(crate) struct Instances {
    by_tenant: Arc<RwLock<HashMap<String, (String, Channel)>>>,
}

impl Instances {
    /// Whether `tenant` has an instance of its own.
    pub(crate) fn has(&self, tenant: &str) -> bool {
        self.by_tenant.read().expect("instances lock").contains_key(tenant)
    }

    fn get(&self, tenant: &str) -> Option<Channel> {
        self.by_tenant.read().expect("instances lock").get(tenant).map(|(_, c)| c.clone())
    }

    /// Keeps the instances of `service` as the catalog lists them, every
    /// second, for as long as the service runs.
    pub(crate) fn watch(
        &self,
        service: String,
        mut registry: TenantRegistryClient<PropagatedChannel>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tenantmesh_telemetry::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let listed = match registry.list_services(ListServicesRequest {}).await {
                    Ok(r) => r.into_inner().services,
                    Err(s) => {
                        tracing::debug!(error = %s.message(), "the catalog's silo instances not refreshed");
                        continue;
                    }
                };
                let mut now = HashMap::new();
                for s in listed.into_iter().filter(|s| s.name == service && !s.silo_tenant.is_empty()) {
                    let known = this.by_tenant.read().expect("instances lock").get(&s.silo_tenant).cloned();
                    let channel = match known {
                        Some((endpoint, channel)) if endpoint == s.endpoint => channel,
                        _ => match tenantmesh_tenant_context::client::channel(&s.endpoint) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(endpoint = %s.endpoint, error = %e, "a silo instance's endpoint is unusable");
                                continue;
                            }
                        },
                    };
                    now.insert(s.silo_tenant, (s.endpoint, channel));
                }
                *this.by_tenant.write().expect("instances lock") = now;
            }
        })
    }
}

/// What this instance is: the shared one (forwarding the calls under the
/// path prefixes `forwarded`, `/<gRPC service>/`, to `instances`), or one
/// silo tenant's.
#[derive(Clone)]
pub(crate) enum Mode {
    Shared { instances: Instances, forwarded: Arc<[String]> },
    Silo { tenant: Arc<str> },
}

/// The layer, inside the mesh's stack (the caller is authenticated).
#[derive(Clone)]
pub(crate) struct SiloLayer(pub(crate) Mode);

impl<S> Layer<S> for SiloLayer {
    type Service = SiloService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SiloService { inner, role: self.0.clone() }
    }
}

#[derive(Clone)]
pub(crate) struct SiloService<S> {
    inner: S,
    role: Mode,
}

impl<S> Service<Request<Body>> for SiloService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let ctx = req.extensions().get::<TenantContext>();
        match (&self.role, ctx) {
            (Mode::Silo { tenant }, Some(ctx)) if !ctx.has_role(Role::Service) && *ctx.tenant_id != **tenant => {
                tracing::warn!(security_event = "wrong_silo", caller_tenant = %ctx.tenant_id, "refused another tenant's call at a silo instance");
                let status = tonic::Status::permission_denied("this instance serves one silo tenant only");
                Box::pin(async move { Ok(status.into_http()) })
            }
            (Mode::Shared { instances, forwarded }, Some(ctx))
                if model_of(ctx.placement()) == IsolationModel::Silo
                    && forwarded.iter().any(|prefix| req.uri().path().starts_with(prefix.as_str())) =>
            {
                let Some(channel) = instances.get(&ctx.tenant_id) else {
                    return Box::pin(self.inner.call(req));
                };
                Box::pin(async move {
                    use tower::ServiceExt as _;
                    let mut response = match channel.oneshot(req).await {
                        Ok(r) => r.map(Body::new),
                        Err(e) => {
                            tracing::warn!(error = %e, "the tenant's silo instance is unreachable");
                            tonic::Status::unavailable("the tenant's instance is unreachable; retry").into_http()
                        }
                    };
                    // Counted once, here: the instance meters nothing.
                    response.extensions_mut().insert(Handled {
                        usage: Usage::default(),
                        cost: Cost(1),
                        forwarded: true,
                    });
                    Ok(response)
                })
            }
            _ => Box::pin(self.inner.call(req)),
        }
    }
}
