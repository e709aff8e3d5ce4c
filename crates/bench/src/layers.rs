//! Servers for the per-layer breakdown: the data service's request path
//! built from the mesh's own parts, one layer added at a time, each served
//! by its own process (`tenantmesh-bench layer-server --layers N`) so its
//! CPU time is its own and telemetry (global) is per process.
//!
//! 1. `handler`: the Data handler on the raw embedded table; a fixed tenant
//!    context stands in for authentication.
//! 2. `policy`: + the tenant's session policy on every storage call.
//! 3. `authentication`: + the tenant-context layer (token check, role
//!    table, tenant lookup against a running mesh's auth and registry).
//! 4. `logs`: + telemetry as `tenantmesh up` has it by default (JSON logs,
//!    trace context, no exporter).
//! 5. `span export`: + every request exported as spans over OTLP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tenantmesh_isolation::{EmbeddedStores, PolicyError, TenantStores};
use tenantmesh_proto::data::v1::data_server::DataServer;
use tenantmesh_proto::registry::v1::{IsolationModel, Placement, TenantStatus};
use tenantmesh_storage::{DynTable, EmbeddedTable, StorageError};
use tenantmesh_tenant_context::directory::TenantInfo;
use tenantmesh_tenant_context::{Role, TenantContext};

pub const LAYERS: [&str; 5] = ["handler", "policy", "authentication", "logs", "span export"];

/// Tenant stores without the session policy: every tenant gets the raw table.
struct Unscoped {
    table: DynTable,
    name: String,
}

#[async_trait]
impl TenantStores for Unscoped {
    async fn store_for(&self, _tenant_id: &str, _table: &str) -> Result<DynTable, PolicyError> {
        Ok(self.table.clone())
    }
    fn pooled_table(&self) -> &str {
        &self.name
    }
    async fn provision(&self, _: &str, _: &str, _: &str) -> Result<bool, StorageError> {
        Err(StorageError::Invalid("not in this benchmark".into()))
    }
    async fn drop_table(&self, _: &str) -> Result<bool, StorageError> {
        Err(StorageError::Invalid("not in this benchmark".into()))
    }
}

/// A layer that gives every request the same tenant context, in place of
/// authentication.
#[derive(Clone)]
struct FixedTenant<S> {
    inner: S,
    ctx: TenantContext,
}

impl<S, B> tower::Service<http::Request<B>> for FixedTenant<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let ctx = self.ctx.clone();
        req.extensions_mut().insert(ctx.clone());
        Box::pin(ctx.scope(inner.call(req)))
    }
}

#[derive(Clone)]
struct FixedTenantLayer(TenantContext);

impl<S> tower::Layer<S> for FixedTenantLayer {
    type Service = FixedTenant<S>;
    fn layer(&self, inner: S) -> FixedTenant<S> {
        FixedTenant { inner, ctx: self.0.clone() }
    }
}

/// Serves the first `layers` layers of the path (1..=5) on `addr`; prints
/// `listening <addr>`. `tenant`: the tenant the fixed context names (layers
/// 1-2); `registry` / `auth`: the mesh that verifies tokens (layers 3+);
/// `otlp`: where spans go (layer 5).
pub async fn serve(
    layers: usize,
    addr: SocketAddr,
    data_dir: &Path,
    tenant: &str,
    mesh: Option<(String, String)>,
    otlp: Option<String>,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut _telemetry = None;
    if layers >= 4 {
        let mut config = tenantmesh_telemetry::Config::new("data");
        config.log_target = tenantmesh_telemetry::LogTarget::Stderr;
        if layers >= 5 {
            config.otlp_endpoint = Some(otlp.ok_or("span export needs --otlp")?);
        }
        _telemetry = Some(tenantmesh_telemetry::init(config).map_err(|x| e(&x))?);
    }
    std::fs::create_dir_all(data_dir).map_err(|x| e(&x))?;
    let pooled = "tenantmesh-data";
    let raw = EmbeddedTable::open_shared(data_dir.join("data.redb")).map_err(|x| e(&x))?;
    let stores: Arc<dyn TenantStores> = if layers >= 2 {
        Arc::new(EmbeddedStores::new(raw, pooled, data_dir.join("tables"), 10_000))
    } else {
        Arc::new(Unscoped { table: raw, name: pooled.into() })
    };
    let data = DataServer::new(tenantmesh_data::DataService::new(stores, "tenantmesh-", None));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|x| e(&x))?;
    println!("listening {}", listener.local_addr().map_err(|x| e(&x))?);
    if layers >= 3 {
        let (registry_url, auth_url) = mesh.ok_or("authentication needs the mesh's registry and auth")?;
        let mut env = std::collections::HashMap::new();
        env.insert("TENANTMESH_REGISTRY_URL".to_owned(), registry_url);
        env.insert("TENANTMESH_AUTH_URL".to_owned(), auth_url);
        let common = tenantmesh_service::config::CommonConfig::from_env(&env, 0).map_err(|x| e(&x))?;
        let auth = tenantmesh_tenant_context::server::Authenticator::remote(&common).map_err(|x| e(&x))?;
        return tenantmesh_service::runtime::serve(
            listener,
            data,
            None,
            tenantmesh_tenant_context::server::stack(tenantmesh_telemetry::Service::new("bench"), auth, None)
                .map_err(|x| e(&x))?,
            std::time::Duration::from_secs(5),
            crate::procs::shutdown_signal(),
        )
        .await
        .map_err(|x| e(&x));
    }
    let info = TenantInfo {
        limits: None,
        storage_quota: None,
        tier: "standard".into(),
        status: TenantStatus::Active,
        identity_provider: None,
        placement: Some(Placement {
            model: IsolationModel::Pool as i32,
            table: pooled.into(),
            endpoint: String::new(),
        }),
        entitlement_overrides: Vec::new(),
    };
    let ctx = TenantContext {
        tenant_id: tenant.into(),
        subject: "bench".into(),
        roles: [Role::TenantUser].into(),
        token: "".into(),
        tenant: Arc::new(info),
        deadline: None,
        grant: None,
    };
    tonic::transport::Server::builder()
        .layer(FixedTenantLayer(ctx))
        .add_service(data)
        .serve_with_incoming_shutdown(tenantmesh_service::runtime::incoming(listener), crate::procs::shutdown_signal())
        .await
        .map_err(|x| e(&x))
}
