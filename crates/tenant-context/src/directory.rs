//! Where the server layer learns a tenant's tier and status: the registry's
//! own store inside the registry, and a cached gRPC lookup (made with the
//! caller's own verified token) everywhere else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tenantmesh_admission::limits::Limits;
use tenantmesh_proto::registry::v1::{
    GetTenantRequest, IdentityProvider, Placement, Tenant, TenantStatus, WatchTenantsRequest,
    tenant_registry_client::TenantRegistryClient,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What the layer needs to know about a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantInfo {
    pub tier: Arc<str>,
    pub status: TenantStatus,
    /// The external identity provider whose tokens the tenant accepts.
    /// Boxed: most tenants have none, and a cached tenant stays small.
    pub identity_provider: Option<Box<IdentityProvider>>,
    /// Where the tenant's items live.
    pub placement: Option<Placement>,
    /// The tenant's request limits (its tier's, or its own override), if
    /// the registry holds any; none means not limited (the platform).
    pub limits: Option<Limits>,
    /// The tenant's storage quota in bytes, if the registry holds one.
    pub storage_quota: Option<u64>,
    /// The operator's exceptions to its tier's plan (entitlements).
    pub entitlement_overrides: Vec<tenantmesh_proto::registry::v1::EntitlementOverride>,
}

impl From<Tenant> for TenantInfo {
    fn from(t: Tenant) -> Self {
        TenantInfo {
            tier: t.tier.into(),
            status: TenantStatus::try_from(t.status).unwrap_or(TenantStatus::Unspecified),
            identity_provider: t.identity_provider.map(Box::new),
            placement: t.placement,
            // The registry accepts only limits above 0; `max(1)` keeps an
            // older record from meaning "no cap".
            storage_quota: t.limits.map(|l| l.storage_quota_bytes.max(1)),
            entitlement_overrides: t.entitlement_overrides,
            limits: t.limits.map(|l| Limits {
                rate_per_second: l.requests_per_second.max(1),
                burst: l.burst.max(1),
                max_in_flight: l.max_concurrency.max(1),
            }),
        }
    }
}

/// The platform operator's tenant, as the registry keeps it.
pub fn platform_tenant() -> Arc<TenantInfo> {
    static PLATFORM: std::sync::OnceLock<Arc<TenantInfo>> = std::sync::OnceLock::new();
    PLATFORM
        .get_or_init(|| {
            Arc::new(TenantInfo {
                tier: crate::identity::PLATFORM_TIER.into(),
                status: TenantStatus::Active,
                ..Default::default()
            })
        })
        .clone()
}

#[async_trait]
pub trait TenantDirectory: Send + Sync + 'static {
    /// Looks up `tenant_id` with the caller's `token`; `caller_tenant` is
    /// the tenant an external-provider token is presented for (sent as
    /// `x-tenant-id`), `None` for platform tokens. `Ok(None)` when the
    /// tenant does not exist.
    async fn lookup(
        &self,
        tenant_id: &str,
        token: &str,
        caller_tenant: Option<&str>,
    ) -> Result<Option<Arc<TenantInfo>>, Status>;
}

/// When a lookup was made, and its answer (`None`: no such tenant).
type Cached = (Instant, Option<Arc<TenantInfo>>);

/// Registry lookups over gRPC with a short-lived cache, so a tenant's
/// requests cost one registry call per `ttl`. Settled states (active,
/// suspended, deleted) are cached; transitional ones are not.
pub struct RemoteDirectory {
    client: TenantRegistryClient<Channel>,
    ttl: Duration,
    capacity: usize,
    cache: Mutex<HashMap<String, Cached>>,
    /// One registry call per tenant at a time: concurrent misses of a
    /// tenant wait for the first one's answer instead of each calling.
    lookups: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
}

impl RemoteDirectory {
    /// Lookups answered from memory for `ttl`, for at most `capacity` tenants.
    pub fn new(registry: Channel, ttl: Duration, capacity: usize) -> Self {
        Self {
            client: tenantmesh_service::sized!(TenantRegistryClient::new(registry)),
            ttl,
            capacity,
            cache: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
        }
    }
}

impl RemoteDirectory {
    /// Forgets `tenant_id`: its next lookup asks the registry.
    pub fn forget(&self, tenant_id: &str) {
        self.cache.lock().expect("cache lock").remove(tenant_id);
    }

    /// Forgets every tenant.
    pub fn forget_all(&self) {
        self.cache.lock().expect("cache lock").clear();
    }

    /// Forgets tenants as the registry reports their records changed
    /// (`WatchTenants`, called as the service identity `tokens` gives), so
    /// a suspension or a new placement takes effect here at once; the TTL
    /// stays the fallback. Reconnects with backoff (forgetting everything:
    /// changes may have been missed meanwhile) and ends once the directory
    /// is dropped.
    pub fn watch(self: &Arc<Self>, tokens: Arc<crate::client::ServiceTokenSource>) -> tokio::task::JoinHandle<()> {
        let directory = Arc::downgrade(self);
        let client = self.client.clone();
        tenantmesh_telemetry::spawn(async move {
            let mut backoff = WATCH_BACKOFF_MIN;
            while directory.strong_count() > 0 {
                match watch_once(&directory, client.clone(), &tokens).await {
                    Ok(()) => backoff = WATCH_BACKOFF_MIN,
                    Err(s) => {
                        tracing::debug!(code = ?s.code(), error = %s.message(), "watching tenant changes failed; the cache TTL holds meanwhile");
                    }
                }
                match directory.upgrade() {
                    Some(d) => d.forget_all(),
                    None => return,
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
            }
        })
    }
}

/// Has `directory` forget tenants as the registry reports their changes,
/// when the service has a platform identity to watch with
/// (`TENANTMESH_SERVICE_CLIENT_ID`/`_SECRET`); otherwise the cache TTL
/// alone bounds how long a change takes to show. Returns that identity's
/// token source, for the service's other calls as itself.
pub fn watch_changes(
    directory: &Arc<RemoteDirectory>,
    config: &tenantmesh_service::config::CommonConfig,
) -> Result<Option<Arc<crate::client::ServiceTokenSource>>, tonic::transport::Error> {
    match &config.service_client {
        Some(credentials) => {
            let auth = crate::client::channel(&config.auth_url)?;
            let tokens = Arc::new(crate::client::ServiceTokenSource::new(auth, credentials.clone()));
            directory.watch(tokens.clone());
            Ok(Some(tokens))
        }
        None => {
            tracing::info!(
                ttl_ms = config.tenant_cache_ttl.as_millis() as u64,
                "no service identity: tenant changes show when the cache TTL ends"
            );
            Ok(None)
        }
    }
}

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One subscription to the registry's tenant changes, until it ends.
async fn watch_once(
    directory: &std::sync::Weak<RemoteDirectory>,
    mut client: TenantRegistryClient<Channel>,
    tokens: &crate::client::ServiceTokenSource,
) -> Result<(), Status> {
    let token = tokens.token().await?;
    let mut req = tonic::Request::new(WatchTenantsRequest {});
    let bearer = format!("Bearer {token}").parse().map_err(|_| Status::internal("malformed service token"))?;
    req.metadata_mut().insert(crate::metadata::AUTHORIZATION, bearer);
    let mut changes = client.watch_tenants(req).await?.into_inner();
    while let Some(change) = changes.message().await? {
        let Some(d) = directory.upgrade() else { return Ok(()) };
        if change.reset {
            d.forget_all();
        }
        for id in &change.tenant_ids {
            d.forget(id);
        }
    }
    Ok(())
}

/// The registry RPC a lookup calls.
const GET_TENANT: &str = "/tenantmesh.registry.v1.TenantRegistry/GetTenant";

#[async_trait]
impl TenantDirectory for RemoteDirectory {
    async fn lookup(
        &self,
        tenant_id: &str,
        token: &str,
        caller_tenant: Option<&str>,
    ) -> Result<Option<Arc<TenantInfo>>, Status> {
        // The operator's tenant is always there, always active and never
        // limited (the registry refuses to change that): every service
        // identity and platform admin is known without asking the registry
        // (which a service identity may not ask, unless its scopes say so).
        if tenant_id == crate::identity::PLATFORM_TENANT {
            return Ok(Some(platform_tenant()));
        }
        let cached = || match self.cache.lock().expect("cache lock").get(tenant_id) {
            Some((at, info)) if at.elapsed() < self.ttl => Some(info.clone()),
            _ => None,
        };
        if let Some(info) = cached() {
            return Ok(info);
        }
        let lock = {
            let mut lookups = self.lookups.lock().expect("lookups lock");
            match lookups.get(tenant_id).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    if lookups.len() >= 1024 {
                        lookups.retain(|_, l| l.strong_count() > 0);
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    lookups.insert(tenant_id.to_owned(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        let _one_at_a_time = lock.lock().await;
        if let Some(info) = cached() {
            return Ok(info);
        }
        let mut req = tonic::Request::new(GetTenantRequest { tenant_id: tenant_id.to_owned() });
        let bearer = format!("Bearer {token}").parse().map_err(|_| Status::unauthenticated("malformed token"))?;
        req.metadata_mut().insert(crate::metadata::AUTHORIZATION, bearer);
        if let Some(v) = caller_tenant.and_then(|t| t.parse().ok()) {
            req.metadata_mut().insert(crate::metadata::TENANT_ID, v);
        }
        // The lookup is the layer's call, not the tenant's: it is marked so
        // the registry leaves it out of the tenant's request count, and it
        // is a client span of its own in the caller's trace.
        req.metadata_mut().insert(crate::metadata::LOOKUP, tonic::metadata::MetadataValue::from_static("tenant"));
        let mut headers = http::HeaderMap::new();
        let span = tenantmesh_telemetry::start_client_call(GET_TENANT, tenant_id, &mut headers);
        if let Some(tp) = headers.get(crate::metadata::TRACEPARENT).and_then(|v| v.to_str().ok())
            && let Ok(v) = tp.parse()
        {
            req.metadata_mut().insert(crate::metadata::TRACEPARENT, v);
        }
        let mut client = self.client.clone();
        let call = client.get_tenant(req);
        let answer = match &span {
            Some(span) => {
                use tracing::Instrument as _;
                call.instrument(span.clone()).await
            }
            None => call.await,
        };
        if let Some(span) = &span {
            tenantmesh_telemetry::record_client_status(span, answer.as_ref().err().map_or(0, |s| s.code() as i32));
        }
        let info = match answer {
            Ok(resp) => resp.into_inner().tenant.map(|t| Arc::new(TenantInfo::from(t))),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => {
                tracing::warn!(tenant_id, code = ?s.code(), error = %s.message(), "tenant lookup failed");
                return Err(match s.code() {
                    // The registry's own answer about the caller (its limit
                    // included) is the caller's answer, details and all.
                    Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted => s,
                    _ => Status::unavailable("tenant registry unavailable"),
                });
            }
        };
        // Transitional answers are not cached: a tenant that does not exist
        // yet, or is still being onboarded, is expected to change any moment
        // (caching PROVISIONING would lock a new tenant's admin out for a TTL).
        if info.as_ref().is_none_or(|i| i.status == TenantStatus::Provisioning) {
            return Ok(info);
        }
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= self.capacity {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if cache.len() >= self.capacity {
                cache.clear();
            }
        }
        cache.insert(tenant_id.to_owned(), (Instant::now(), info.clone()));
        Ok(info)
    }
}

/// Every tenant in the registry, page by page, as `registry`'s identity
/// may list them.
pub async fn all_tenants(
    registry: &tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient<
        crate::client::PropagatedChannel,
    >,
) -> Result<Vec<Tenant>, Status> {
    let (mut tenants, mut page_token) = (Vec::new(), String::new());
    loop {
        let req = tenantmesh_proto::registry::v1::ListTenantsRequest { page_size: 1000, page_token };
        let page = registry.clone().list_tenants(req).await?.into_inner();
        tenants.extend(page.tenants);
        if page.next_page_token.is_empty() {
            return Ok(tenants);
        }
        page_token = page.next_page_token;
    }
}
