//! The registry's state: its table of tenants, the watchers of their
//! changes, and the layer's lookups straight from the store.

use std::sync::Arc;

use async_trait::async_trait;
use prost::Message as _;
use tenantmesh_proto::registry::v1::*;
use tenantmesh_service::audit::AppendError;
use tenantmesh_service::errors::Violations;
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{Condition, DynTable, StorageError, Write};

use crate::audit::Audited;
use tenantmesh_tenant_context::PLATFORM_TENANT;
use tenantmesh_tenant_context::directory::{TenantDirectory, TenantInfo};
use tonic::Status;

use crate::error::RegistryError;

/// Partition holding every tenant record (sort key: tenant id; value: the
/// encoded [`Tenant`]).
pub const TENANTS_PK: &str = "_tenants";

/// The registry's state: its table of tenants.
#[derive(Clone)]
pub struct Registry {
    pub(crate) store: DynTable,
    /// The platform's own token issuer, which no external provider may claim.
    pub(crate) own_issuer: String,
    pub(crate) tiers: Arc<Tiers>,
    /// `TENANTMESH_JWKS_ALLOW_PRIVATE`.
    pub(crate) allow_private_jwks: bool,
    /// Ids of tenants whose record changed, for `WatchTenants`.
    pub(crate) changes: tokio::sync::broadcast::Sender<String>,
    /// Set once the registry shuts down: the watch streams end then, so
    /// they never hold a graceful shutdown up.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// One permit per open watch stream.
    pub(crate) watchers: Arc<tokio::sync::Semaphore>,
    /// The audit log, in the same table: each change and its event are
    /// one transaction.
    pub(crate) auditor: tenantmesh_tenant_context::audit::Auditor,
}

/// Changes a watcher may fall behind by before it is told to reset.
pub(crate) const WATCH_BUFFER: usize = 1024;
/// Watch streams open at once: every replica of every service holds one;
/// past this, a new one is RESOURCE_EXHAUSTED (the TTL still holds).
pub const MAX_TENANT_WATCHERS: usize = 256;

use tenantmesh_service::clock::now_secs;

impl Registry {
    pub fn new(store: DynTable, own_issuer: impl Into<String>, tiers: Arc<Tiers>) -> Self {
        Self {
            auditor: tenantmesh_tenant_context::audit::Auditor::new(tenantmesh_service::audit::AuditLog::new(
                store.clone(),
                "registry",
            )),
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
    pub(crate) fn changed(&self, tenant_id: &str) {
        // No watcher is not an error.
        let _ = self.changes.send(tenant_id.to_owned());
    }

    /// Whether identity providers may serve their JWKS from loopback or
    /// private hosts (`TENANTMESH_JWKS_ALLOW_PRIVATE`).
    pub fn with_private_jwks(mut self, allow: bool) -> Self {
        self.allow_private_jwks = allow;
        self
    }

    pub(crate) fn check_tier(&self, v: &mut Violations, tier: &str) {
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

    /// Creates `tenant` (its id must be free), with its audit event in the
    /// same transaction; without `audited` (the platform's own record at
    /// first start), alone.
    pub(crate) async fn insert(
        &self,
        mut tenant: Tenant,
        audited: Option<Audited<'_>>,
    ) -> Result<Tenant, RegistryError> {
        let id = tenant.tenant_id.clone();
        let data = tenant.encode_to_vec();
        match audited {
            Some(a) => {
                let mut event = a.caller.event(&id, a.action, format!("tenant/{id}"));
                event.after = (a.summary)(&tenant);
                let write = Write::Put { pk: TENANTS_PK.into(), sk: id.clone(), data, condition: Condition::NotExists };
                self.auditor.log.commit(vec![write], event).await.map_err(|e| match e {
                    AppendError::Change { source, .. } => RegistryError::from_write(source, &id),
                    AppendError::Store(e) => e.into(),
                })?;
            }
            None => {
                let put = self.store.put(TENANTS_PK, &id, data, Condition::NotExists).await;
                put.map_err(|e| RegistryError::from_write(e, &id))?;
            }
        }
        tenant.version = 1;
        self.changed(&id);
        Ok(tenant)
    }

    /// Applies `change` to the stored tenant, and records it (`audited`) in
    /// the same transaction; with `expected` the write applies only at
    /// that version, otherwise it retries on a concurrent write.
    pub(crate) async fn modify(
        &self,
        tenant_id: &str,
        expected: Option<u64>,
        audited: Audited<'_>,
        change: impl Fn(&mut Tenant) -> Result<(), RegistryError>,
    ) -> Result<Tenant, RegistryError> {
        loop {
            let mut tenant = self.get(tenant_id).await?.ok_or_else(|| RegistryError::NotFound(tenant_id.into()))?;
            if let Some(v) = expected
                && v != tenant.version
            {
                return Err(RegistryError::VersionMismatch { expected: v, current: tenant.version });
            }
            let mut event = audited.caller.event(tenant_id, audited.action, format!("tenant/{tenant_id}"));
            event.before = (audited.summary)(&tenant);
            change(&mut tenant)?;
            event.after = (audited.summary)(&tenant);
            tenant.update_time = now_secs();
            let version = tenant.version;
            let write = Write::Put {
                pk: TENANTS_PK.into(),
                sk: tenant_id.into(),
                data: tenant.encode_to_vec(),
                condition: Condition::Version(version),
            };
            match self.auditor.log.commit(vec![write], event).await {
                Ok(_) => {
                    // A write makes the next version.
                    tenant.version = version + 1;
                    self.changed(tenant_id);
                    return Ok(tenant);
                }
                Err(AppendError::Change { source: StorageError::ConditionFailed { current, .. }, .. })
                    if expected.is_none() =>
                {
                    tracing::debug!(tenant_id, ?current, "concurrent tenant update; retrying");
                }
                Err(AppendError::Change { source: StorageError::ConditionFailed { current, .. }, .. }) => {
                    return Err(RegistryError::VersionMismatch {
                        expected: version,
                        current: current.unwrap_or_default(),
                    });
                }
                Err(AppendError::Change { source, .. } | AppendError::Store(source)) => return Err(source.into()),
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
            entitlement_overrides: Vec::new(),
            usage_alerts: Vec::new(),
        };
        match self.insert(tenant, None).await {
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
pub(crate) fn check_placement(v: &mut Violations, placement: &Placement, model: Option<IsolationModel>) {
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

#[cfg(test)]
mod watch_tests {
    use super::*;
    use tenantmesh_proto::registry::v1::tenant_registry_server::TenantRegistry;
    use tenantmesh_storage::EmbeddedTable;
    use tenantmesh_tenant_context::TenantContext;
    use tokio_stream::StreamExt as _;
    use tonic::{Request, Response};

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
        r.insert(tenant, None).await.unwrap();
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
