//! The tenant registry: the system of record for tenants (id, name, tier,
//! isolation model, lifecycle status). It also answers the tenant-context
//! layer's lookups for its own requests straight from its store.

mod error;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use prost::Message as _;
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_proto::registry::v1::tenant_registry_server::{TenantRegistry, TenantRegistryServer};
use tenantmesh_proto::registry::v1::*;
use tenantmesh_service::config::{CommonConfig, ConfigError, REGISTRY_PORT};
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{Condition, DynTable, Query};
use tenantmesh_tenant_context::directory::{TenantDirectory, TenantInfo};
use tenantmesh_tenant_context::server::Authenticator;
use tenantmesh_tenant_context::verify::{JwksCache, TokenVerifier};
use tenantmesh_tenant_context::{PLATFORM_TENANT, TenantContext};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub use error::RegistryError;

/// Partition holding every tenant record (sort key: tenant id; value: the
/// encoded [`Tenant`]).
pub const TENANTS_PK: &str = "_tenants";

/// Registry settings (see [`CommonConfig`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
}

impl tenantmesh_isolation::backend::ServiceConfig for Config {
    const STORE: &'static str = "registry";
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn storage(&self) -> &StorageConfig {
        &self.storage
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(env, REGISTRY_PORT)?, storage: StorageConfig::from_env(env)? })
    }
}

/// The registry's state: its table of tenants.
#[derive(Clone)]
pub struct Registry {
    store: DynTable,
    /// The platform's own token issuer, which no external provider may claim.
    own_issuer: String,
    tiers: Arc<Tiers>,
    /// `TENANTMESH_JWKS_ALLOW_PRIVATE`.
    allow_private_jwks: bool,
    /// Ids of tenants whose record changed, for `WatchTenants`.
    changes: tokio::sync::broadcast::Sender<String>,
    /// Set once the registry shuts down: the watch streams end then, so
    /// they never hold a graceful shutdown up.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// One permit per open watch stream.
    watchers: Arc<tokio::sync::Semaphore>,
}

/// Changes a watcher may fall behind by before it is told to reset.
const WATCH_BUFFER: usize = 1024;
/// Watch streams open at once: every replica of every service holds one;
/// past this, a new one is RESOURCE_EXHAUSTED (the TTL still holds).
pub const MAX_TENANT_WATCHERS: usize = 256;

use tenantmesh_service::clock::now_secs;

impl Registry {
    pub fn new(store: DynTable, own_issuer: impl Into<String>, tiers: Arc<Tiers>) -> Self {
        Self {
            store,
            own_issuer: own_issuer.into(),
            tiers,
            allow_private_jwks: false,
            changes: tokio::sync::broadcast::channel(WATCH_BUFFER).0,
            stopping: tokio::sync::watch::channel(false).1,
            watchers: Arc::new(tokio::sync::Semaphore::new(MAX_TENANT_WATCHERS)),
        }
    }

    /// At most `n` watch streams open at once (default [`MAX_TENANT_WATCHERS`]).
    pub fn with_max_watchers(mut self, n: usize) -> Self {
        self.watchers = Arc::new(tokio::sync::Semaphore::new(n));
        self
    }

    /// Ends the watch streams once `stopping` turns true.
    pub fn with_stopping(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// Tells the watchers that `tenant_id`'s record changed.
    fn changed(&self, tenant_id: &str) {
        // No watcher is not an error.
        let _ = self.changes.send(tenant_id.to_owned());
    }

    /// Whether identity providers may serve their JWKS from loopback or
    /// private hosts (`TENANTMESH_JWKS_ALLOW_PRIVATE`).
    pub fn with_private_jwks(mut self, allow: bool) -> Self {
        self.allow_private_jwks = allow;
        self
    }

    fn check_tier(&self, v: &mut Violations, tier: &str) {
        if self.tiers.isolation_model(tier).is_none() {
            v.add("tier", self.tiers.unknown_tier_message());
        }
    }

    /// Reads one tenant (its `version` is the stored item's version).
    pub async fn get(&self, tenant_id: &str) -> Result<Option<Tenant>, RegistryError> {
        let Some(item) = self.store.get(TENANTS_PK, tenant_id).await? else {
            return Ok(None);
        };
        let mut tenant = Tenant::decode(item.data.as_slice()).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        tenant.version = item.version;
        Ok(Some(tenant))
    }

    async fn insert(&self, mut tenant: Tenant) -> Result<Tenant, RegistryError> {
        let item = self
            .store
            .put(TENANTS_PK, &tenant.tenant_id, tenant.encode_to_vec(), Condition::NotExists)
            .await
            .map_err(|e| RegistryError::from_write(e, &tenant.tenant_id))?;
        tenant.version = item.version;
        self.changed(&tenant.tenant_id);
        Ok(tenant)
    }

    /// Applies `change` to the stored tenant; with `expected` the write
    /// applies only at that version, otherwise it retries on a concurrent
    /// write.
    async fn modify(
        &self,
        tenant_id: &str,
        expected: Option<u64>,
        change: impl Fn(&mut Tenant) -> Result<(), RegistryError>,
    ) -> Result<Tenant, RegistryError> {
        loop {
            let mut tenant = self.get(tenant_id).await?.ok_or_else(|| RegistryError::NotFound(tenant_id.into()))?;
            if let Some(v) = expected
                && v != tenant.version
            {
                return Err(RegistryError::VersionMismatch { expected: v, current: tenant.version });
            }
            change(&mut tenant)?;
            tenant.update_time = now_secs();
            let version = tenant.version;
            match self.store.put(TENANTS_PK, tenant_id, tenant.encode_to_vec(), Condition::Version(version)).await {
                Ok(item) => {
                    tenant.version = item.version;
                    self.changed(tenant_id);
                    return Ok(tenant);
                }
                Err(tenantmesh_storage::StorageError::ConditionFailed { current, .. }) if expected.is_none() => {
                    tracing::debug!(tenant_id, ?current, "concurrent tenant update; retrying");
                }
                Err(tenantmesh_storage::StorageError::ConditionFailed { current, .. }) => {
                    return Err(RegistryError::VersionMismatch {
                        expected: version,
                        current: current.unwrap_or_default(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Creates the `platform` operator tenant on first start.
    pub async fn bootstrap(&self) -> Result<(), RegistryError> {
        if self.get(PLATFORM_TENANT).await?.is_some() {
            return Ok(());
        }
        let now = now_secs();
        let tenant = Tenant {
            tenant_id: PLATFORM_TENANT.into(),
            name: "Platform operator".into(),
            tier: tenantmesh_tenant_context::PLATFORM_TIER.into(),
            isolation_model: IsolationModel::Pool as i32,
            status: TenantStatus::Active as i32,
            create_time: now,
            update_time: now,
            version: 0,
            identity_provider: None,
            placement: None,
            limits: None,
        };
        match self.insert(tenant).await {
            Ok(_) => tracing::info!(tenant_id = PLATFORM_TENANT, "bootstrap: created the platform tenant"),
            Err(RegistryError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Lookups for the registry's own tenant-context layer: straight from the
/// store (asking itself over gRPC would recurse).
#[async_trait]
impl TenantDirectory for Registry {
    async fn lookup(
        &self,
        tenant_id: &str,
        _token: &str,
        _caller: Option<&str>,
    ) -> Result<Option<Arc<TenantInfo>>, Status> {
        let tenant = self.get(tenant_id).await.map_err(Status::from)?;
        Ok(tenant.map(|t| Arc::new(TenantInfo::from(t))))
    }
}

/// Checks a placement against the tenant's `model`.
fn check_placement(v: &mut Violations, placement: &Placement, model: Option<IsolationModel>) {
    if model.is_some_and(|m| m as i32 != placement.model) {
        v.add("placement.model", "must be the isolation model of the tier");
    }
    if !tenantmesh_isolation::policy::valid_table_name(&placement.table) {
        v.add("placement.table", "must be 3-255 of letters, digits, _ - .");
    }
    let silo = placement.model == IsolationModel::Silo as i32;
    // A silo tenant's endpoint is empty until its instance is provisioned.
    let url = placement.endpoint.starts_with("http://") || placement.endpoint.starts_with("https://");
    if silo && !placement.endpoint.is_empty() && !url {
        v.add("placement.endpoint", "must be an http:// or https:// URL");
    } else if !silo && !placement.endpoint.is_empty() {
        v.add("placement.endpoint", "only a silo tenant has its own endpoint");
    } else if placement.endpoint.len() > 512 || placement.endpoint.chars().any(char::is_control) {
        v.add("placement.endpoint", "must be at most 512 printable characters");
    }
}

#[tonic::async_trait]
impl TenantRegistry for Registry {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.tenant_name("name", &req.name, true);
        self.check_tier(&mut v, &req.tier);
        if let Some(p) = &req.placement {
            check_placement(&mut v, p, self.tiers.isolation_model(&req.tier));
        }
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Unspecified) => TenantStatus::Provisioning,
            Ok(TenantStatus::Deleted) | Err(_) => {
                v.add("status", "must be PROVISIONING, ACTIVE or SUSPENDED");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let model = self.tiers.isolation_model(&req.tier).expect("tier validated");
        let now = now_secs();
        let tenant = self
            .insert(Tenant {
                tenant_id: req.tenant_id,
                name: req.name,
                tier: req.tier,
                isolation_model: model as i32,
                status: status as i32,
                create_time: now,
                update_time: now,
                version: 0,
                identity_provider: None,
                placement: req.placement,
                limits: None,
            })
            .await?;
        tracing::info!(created_tenant = %tenant.tenant_id, tier = %tenant.tier, "tenant created");
        Ok(Response::new(CreateTenantResponse { tenant: Some(tenant) }))
    }

    async fn get_tenant(&self, request: Request<GetTenantRequest>) -> Result<Response<GetTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let tenant = self.get(&req.tenant_id).await?.ok_or(RegistryError::NotFound(req.tenant_id))?;
        Ok(Response::new(GetTenantResponse { tenant: Some(tenant) }))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        let limit = paging::page_size(&mut v, req.page_size);
        // Sort keys here are tenant ids: a token must resume after one.
        let start_after = paging::decode_token(&mut v, &req.page_token, "");
        if start_after.as_deref().is_some_and(|id| tenantmesh_service::validate_tenant_id(id).is_err()) {
            v.add("page_token", "is not a token from a previous response to this query");
        }
        v.check()?;
        ctx.authorize_all_tenants()?;
        let page = self
            .store
            .query(Query { pk: TENANTS_PK.into(), sk_prefix: String::new(), start_after, limit })
            .await
            .map_err(RegistryError::from)?;
        let mut tenants = Vec::with_capacity(page.items.len());
        for item in page.items {
            let mut t = Tenant::decode(item.data.as_slice()).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
            t.version = item.version;
            tenants.push(t);
        }
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        Ok(Response::new(ListTenantsResponse { tenants, next_page_token }))
    }

    async fn update_tenant(
        &self,
        request: Request<UpdateTenantRequest>,
    ) -> Result<Response<UpdateTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.tenant_name("name", &req.name, false);
        if !req.tier.is_empty() {
            self.check_tier(&mut v, &req.tier);
        }
        if req.name.is_empty() && req.tier.is_empty() {
            v.add("name", "name or tier must be set");
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let tenant = self
            .modify(&req.tenant_id, req.expected_version, |t| {
                if !req.name.is_empty() {
                    t.name = req.name.clone();
                }
                if !req.tier.is_empty() && req.tier != t.tier {
                    let model = self.tiers.isolation_model(&req.tier).expect("tier validated");
                    if model as i32 != t.isolation_model {
                        return Err(RegistryError::ModelChange { from: t.tier.clone(), to: req.tier.clone() });
                    }
                    t.tier = req.tier.clone();
                }
                Ok(())
            })
            .await?;
        tracing::info!(updated_tenant = %tenant.tenant_id, version = tenant.version, "tenant updated");
        Ok(Response::new(UpdateTenantResponse { tenant: Some(tenant) }))
    }

    async fn set_tenant_status(
        &self,
        request: Request<SetTenantStatusRequest>,
    ) -> Result<Response<SetTenantStatusResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Unspecified) | Err(_) => {
                v.add("status", "must be a TenantStatus other than UNSPECIFIED");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        if req.tenant_id == PLATFORM_TENANT && status != TenantStatus::Active {
            return Err(RegistryError::PlatformTenant("cannot be deactivated").into());
        }
        let tenant = self
            .modify(&req.tenant_id, None, |t| {
                t.status = status as i32;
                Ok(())
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, status = ?status, "tenant status changed");
        Ok(Response::new(SetTenantStatusResponse { tenant: Some(tenant) }))
    }

    async fn set_identity_provider(
        &self,
        request: Request<SetIdentityProviderRequest>,
    ) -> Result<Response<SetIdentityProviderResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if let Some(p) = &req.identity_provider {
            let bounded = |v: &mut Violations, field: &str, value: &str, max: usize| {
                if value.is_empty() {
                    v.add(field, "is required");
                } else if value.len() > max || value.chars().any(char::is_control) {
                    v.add(field, format!("must be at most {max} printable characters"));
                }
            };
            bounded(&mut v, "identity_provider.issuer", &p.issuer, 512);
            bounded(&mut v, "identity_provider.audience", &p.audience, 512);
            bounded(&mut v, "identity_provider.tenant_claim", &p.tenant_claim, 128);
            if p.issuer == self.own_issuer {
                v.add("identity_provider.issuer", "is the platform's own issuer");
            }
            if p.jwks_url.len() > 2048 {
                v.add("identity_provider.jwks_url", "must be at most 2048 characters");
            } else if let Some(why) =
                tenantmesh_tenant_context::external::jwks_url_refusal(&p.jwks_url, self.allow_private_jwks)
            {
                v.add("identity_provider.jwks_url", why);
            }
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(RegistryError::PlatformTenant("signs in with platform tokens only").into());
        }
        let provider = req.identity_provider;
        let tenant = self
            .modify(&req.tenant_id, None, |t| {
                t.identity_provider = provider.clone();
                Ok(())
            })
            .await?;
        tracing::info!(
            target_tenant = %tenant.tenant_id,
            issuer = tenant.identity_provider.as_ref().map(|p| p.issuer.as_str()).unwrap_or("(none)"),
            "identity provider set"
        );
        Ok(Response::new(SetIdentityProviderResponse { tenant: Some(tenant) }))
    }

    async fn set_placement(
        &self,
        request: Request<SetPlacementRequest>,
    ) -> Result<Response<SetPlacementResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if !req.tier.is_empty() {
            self.check_tier(&mut v, &req.tier);
        }
        match &req.placement {
            Some(p) if req.tier.is_empty() => check_placement(&mut v, p, None),
            Some(p) => check_placement(&mut v, p, self.tiers.isolation_model(&req.tier)),
            None => {
                v.add("placement", "is required");
            }
        }
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Deleted) | Err(_) => {
                v.add("status", "must not be DELETED (use SetTenantStatus)");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(RegistryError::PlatformTenant("keeps its placement").into());
        }
        let placement = req.placement.expect("validated");
        let tenant = self
            .modify(&req.tenant_id, req.expected_version, |t| {
                let tier = if req.tier.is_empty() { t.tier.clone() } else { req.tier.clone() };
                let model = self.tiers.isolation_model(&tier);
                if model.is_some_and(|m| m as i32 != placement.model) {
                    return Err(RegistryError::PlacementMismatch { tier });
                }
                t.tier = tier;
                t.isolation_model = placement.model;
                t.placement = Some(placement.clone());
                if status != TenantStatus::Unspecified {
                    t.status = status as i32;
                }
                Ok(())
            })
            .await?;
        tracing::info!(
            target_tenant = %tenant.tenant_id,
            tier = %tenant.tier,
            table = %placement.table,
            endpoint = %placement.endpoint,
            "placement set"
        );
        Ok(Response::new(SetPlacementResponse { tenant: Some(tenant) }))
    }

    type WatchTenantsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchTenantsResponse, Status>> + Send>>;

    async fn watch_tenants(
        &self,
        request: Request<WatchTenantsRequest>,
    ) -> Result<Response<Self::WatchTenantsStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        TenantContext::from_request(&request)?.authorize_all_tenants()?;
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            tracing::warn!("tenant watch refused: too many open");
            return Err(Status::resource_exhausted("too many tenant watch streams are open; retry later"));
        };
        let mut changes = self.changes.subscribe();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _permit = permit;
            // Whatever changed before the subscription is unknown to the watcher.
            let mut next = Some(WatchTenantsResponse { tenant_ids: Vec::new(), reset: true });
            loop {
                if let Some(message) = next.take()
                    && tx.send(Ok(message)).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    Ok(_) = stopping.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                    change = changes.recv() => match change {
                        Ok(id) => {
                            let mut ids = vec![id];
                            while let Ok(more) = changes.try_recv() {
                                ids.push(more);
                                if ids.len() == 256 { break; }
                            }
                            next = Some(WatchTenantsResponse { tenant_ids: ids, reset: false });
                        }
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "a tenant watcher fell behind; telling it to reset");
                            next = Some(WatchTenantsResponse { tenant_ids: Vec::new(), reset: true });
                        }
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        tracing::info!("a service is watching tenant changes");
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn set_tenant_limits(
        &self,
        request: Request<SetTenantLimitsRequest>,
    ) -> Result<Response<SetTenantLimitsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        match &req.limits {
            None => {
                v.add("limits", "is required");
            }
            Some(l) => {
                for (field, value) in [
                    ("limits.requests_per_second", u64::from(l.requests_per_second)),
                    ("limits.burst", u64::from(l.burst)),
                    ("limits.max_concurrency", u64::from(l.max_concurrency)),
                    ("limits.storage_quota_bytes", l.storage_quota_bytes),
                ] {
                    if value == 0 {
                        v.add(field, "must be above 0");
                    }
                }
            }
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(RegistryError::PlatformTenant("is not limited").into());
        }
        let limits = req.limits;
        let tenant = self
            .modify(&req.tenant_id, None, |t| {
                t.limits = limits;
                Ok(())
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, "limits set");
        Ok(Response::new(SetTenantLimitsResponse { tenant: Some(tenant) }))
    }
}

/// Runs the registry on `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let registry = Registry::new(store, &config.common.issuer, config.common.tiers.clone())
        .with_private_jwks(config.common.jwks_allow_private)
        .with_stopping(stopping);
    registry.bootstrap().await?;
    let auth_channel = tenantmesh_tenant_context::client::channel(&config.common.auth_url)?;
    let verifier =
        TokenVerifier::new(Arc::new(JwksCache::new(auth_channel)), &config.common.issuer, &config.common.audience)
            .with_cache_capacity(config.common.token_cache_capacity);
    let authn = Authenticator::new(Arc::new(verifier), Arc::new(registry.clone())).with_admission(&config.common);
    let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
    tenantmesh_service::runtime::serve(
        listener,
        tenantmesh_service::sized!(TenantRegistryServer::new(registry)),
        Some(tenantmesh_service::backup::server(config.common.data_dir.clone(), embedded)),
        tenantmesh_tenant_context::server::stack(authn, None)?,
        config.common.shutdown_grace,
        shutdown,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use tenantmesh_storage::EmbeddedTable;
    use tokio_stream::StreamExt as _;

    fn registry(dir: &tempfile::TempDir) -> Registry {
        let store = EmbeddedTable::open_shared(dir.path().join("registry.redb")).unwrap();
        Registry::new(store, "tenantmesh-auth", Arc::new(Tiers::default())).with_max_watchers(2)
    }

    async fn open(r: &Registry) -> Result<<Registry as TenantRegistry>::WatchTenantsStream, Status> {
        let mut request = Request::new(WatchTenantsRequest {});
        let grant = tenantmesh_tenant_context::Grant {
            scopes: vec![tenantmesh_tenant_context::Scope::Directory],
            tenants: None,
        };
        request.extensions_mut().insert(TenantContext {
            tenant_id: PLATFORM_TENANT.into(),
            roles: vec![tenantmesh_tenant_context::Role::Service].into(),
            grant: Some(Arc::new(grant)),
            ..Default::default()
        });
        r.watch_tenants(request).await.map(Response::into_inner)
    }

    /// A watcher is told to reset first, then hears of each changed
    /// tenant; the streams open at once are bounded, and a closed one
    /// frees its place.
    #[tokio::test]
    async fn watchers_hear_of_changes_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir);
        let mut first = open(&r).await.unwrap();
        let second = open(&r).await.unwrap();
        assert_eq!(open(&r).await.err().map(|s| s.code()), Some(tonic::Code::ResourceExhausted));

        assert!(first.next().await.unwrap().unwrap().reset);
        let tenant =
            Tenant { tenant_id: "acme".into(), name: "Acme".into(), tier: "basic".into(), ..Default::default() };
        r.insert(tenant).await.unwrap();
        let change = first.next().await.unwrap().unwrap();
        assert_eq!((change.reset, change.tenant_ids), (false, vec!["acme".to_owned()]));

        drop(second);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while open(&r).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "a closed stream kept its place");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
