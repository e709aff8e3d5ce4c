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
//! instance serves the tenant itself, on the tenant's own tables. The
//! instance reports each call's usage in its answer's [`USAGE_HEADER`], so
//! the forwarded call is metered to the unit where it was forwarded.
//!
//! The data service uses the same layer ([`SiloLayer::by_placement`]): its
//! silo instances are found in the tenants' placements.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{IsolationModel, ListServicesRequest};
use tenantmesh_service::handled::{Cost, Handled, USAGE_HEADER, Usage};
use tenantmesh_tenant_context::client::{self, PropagatedChannel};
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

/// Where the shared instance finds a silo tenant's own instance.
#[derive(Clone)]
pub(crate) enum Resolve {
    /// The catalog's instances of the service (an application service).
    Catalog(Instances),
    /// The endpoint in the tenant's placement (the data service's silo
    /// instances, which the registry records), one channel per endpoint.
    Placement(Arc<client::Channels>),
}

impl Resolve {
    /// A channel to `ctx`'s own instance, `None` when the shared instance
    /// serves it; an endpoint no channel can be made to is an error.
    fn channel(&self, ctx: &TenantContext) -> Result<Option<PropagatedChannel>, tonic::Status> {
        match self {
            Resolve::Catalog(instances) => {
                if model_of(ctx.placement()) != IsolationModel::Silo {
                    return Ok(None);
                }
                Ok(instances.get(&ctx.tenant_id).map(|c| client::wrap(c, client::Identity::Caller)))
            }
            Resolve::Placement(channels) => {
                let Some(endpoint) = ctx.placement().map(|p| p.endpoint.as_str()).filter(|e| !e.is_empty()) else {
                    return Ok(None);
                };
                channels.get(endpoint).map(Some).map_err(|e| {
                    tracing::error!(%endpoint, error = %e, "the tenant's placement names an unusable silo endpoint");
                    tonic::Status::internal("internal error")
                })
            }
        }
    }
}

/// What this instance is: the shared one (forwarding the calls under the
/// path prefixes `forwarded`, `/<gRPC service>/`, of silo tenants with an
/// instance of their own), or one silo tenant's.
#[derive(Clone)]
pub(crate) enum Mode {
    Shared { resolve: Resolve, forwarded: Arc<[String]> },
    Silo { tenant: Arc<str> },
}

/// The layer that forwards silo tenants' calls to their own instances, and
/// confines such an instance to its tenant. It goes inside the mesh's
/// stack (the caller is authenticated, its tenant context known), next to
/// the service's routes.
///
/// A silo instance reports each call's usage to the shared instance in the
/// [`USAGE_HEADER`] of its answer; the shared instance counts the call
/// with it, exactly as if it had served it, and removes the header.
#[derive(Clone)]
pub struct SiloLayer(pub(crate) Mode);

impl SiloLayer {
    /// For the shared instance of a service whose silo tenants' instances
    /// are in their placements (`endpoint`): it forwards those tenants'
    /// calls under `services` (full gRPC service names) there.
    pub fn by_placement(services: &[&str]) -> Self {
        SiloLayer(Mode::Shared {
            resolve: Resolve::Placement(Arc::new(client::Channels::new(client::Identity::Caller))),
            forwarded: services.iter().map(|s| format!("/{s}/")).collect(),
        })
    }

    /// For an instance that serves silo tenant `tenant` alone: another
    /// tenant's call is PERMISSION_DENIED (the mesh's service identities
    /// pass, as the workflows act on the tenant's items there, and the
    /// platform admin, held to each RPC's policy as anywhere), and each
    /// answer reports its usage to the forwarding shared instance.
    pub fn silo(tenant: &str) -> Self {
        SiloLayer(Mode::Silo { tenant: tenant.into() })
    }
}

impl<S> Layer<S> for SiloLayer {
    type Service = SiloService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SiloService { inner, role: self.0.clone() }
    }
}

/// The service of [`SiloLayer`].
#[derive(Clone)]
pub struct SiloService<S> {
    inner: S,
    role: Mode,
}

/// A call served here costs no allocation of this layer; one forwarded,
/// refused or reported is boxed.
type Answer<F> = Either<F, BoxFuture<Result<Response<Body>, Infallible>>>;

impl<S> Service<Request<Body>> for SiloService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(ctx) = req.extensions().get::<TenantContext>() else { return Either::Left(self.inner.call(req)) };
        match &self.role {
            Mode::Silo { tenant }
                if !ctx.has_role(Role::Service) && !ctx.has_role(Role::PlatformAdmin) && *ctx.tenant_id != **tenant =>
            {
                tracing::warn!(security_event = "wrong_silo", caller_tenant = %ctx.tenant_id, "refused another tenant's call at a silo instance");
                let status = tonic::Status::permission_denied("this instance serves one silo tenant only");
                Either::Right(Box::pin(async move { Ok(status.into_http()) }))
            }
            Mode::Silo { .. } => {
                let call = self.inner.call(req);
                Either::Right(Box::pin(async move {
                    let mut response = call.await?;
                    if let Some(handled) = Handled::of(&response).copied() {
                        response.headers_mut().insert(USAGE_HEADER, handled.usage.header_value());
                    }
                    Ok(response)
                }))
            }
            Mode::Shared { resolve, forwarded }
                if forwarded.iter().any(|prefix| req.uri().path().starts_with(prefix.as_str())) =>
            {
                let channel = match resolve.channel(ctx) {
                    Ok(Some(channel)) => channel,
                    Ok(None) => return Either::Left(self.inner.call(req)),
                    Err(status) => return Either::Right(Box::pin(async move { Ok(status.into_http()) })),
                };
                Either::Right(Box::pin(forward(channel, req)))
            }
            Mode::Shared { .. } => Either::Left(self.inner.call(req)),
        }
    }
}

/// `req` sent on to the tenant's instance as it came (its token, tenant and
/// body; the trace continued and what is left of the deadline, by the
/// client layer), its answer reported as served here with the usage the
/// instance reported.
async fn forward(channel: PropagatedChannel, req: Request<Body>) -> Result<Response<Body>, Infallible> {
    use tower::ServiceExt as _;
    // The client layer sets the token, tenant, trace and deadline again
    // from the caller's context, over what came.
    let mut response = match channel.oneshot(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the tenant's silo instance is unreachable");
            tonic::Status::unavailable("the tenant's instance is unreachable; retry").into_http()
        }
    };
    let usage = response.headers_mut().remove(USAGE_HEADER).and_then(|v| Usage::from_header(&v));
    if usage.is_none() && response.headers().get("grpc-status").is_none_or(|s| s == "0") {
        tracing::debug!("the silo instance reported no usage for its answer");
    }
    // Counted once, here: the instance meters nothing.
    response.extensions_mut().insert(Handled { usage: usage.unwrap_or_default(), cost: Cost(1), forwarded: true });
    Ok(response)
}
