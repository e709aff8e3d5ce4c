//! Tenant-scoped tables: a service's own tables, each call confined to
//! its caller's tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use tenantmesh_isolation::{PolicyError, TenantStores, stores::dedicated_table};
use tenantmesh_proto::registry::v1::{IsolationModel, Placement, TenantStatus};
use tenantmesh_storage::{Condition, DynTable, Item, Page, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tonic::Status;

use crate::history;
use crate::quota::{self, OverQuota, Quotas};
use tenantmesh_service::tiers::Tiers;

/// How often a tenant refused by its quota may have its bytes counted again.
const QUOTA_RESCAN: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest key of an item in a [`TenantTable`].
pub const MAX_KEY_LEN: usize = 512;

/// The tables a service declared ([`crate::App::table`]), by name.
#[derive(Clone)]
pub struct Tables {
    service: Arc<str>,
    /// The store's table-name prefix (`TENANTMESH_TABLE_PREFIX`).
    prefix: Arc<str>,
    tables: Arc<BTreeMap<String, Table>>,
    /// Each tier's cap on its tenants' change history.
    tiers: Arc<Tiers>,
}

#[derive(Clone)]
pub(crate) struct Table {
    /// The pooled table's name in the store (`<prefix><service>-<table>`).
    pooled: Arc<str>,
    /// `<service>-<table>`: the end of the tenant's dedicated table's name.
    suffix: String,
    stores: Arc<dyn TenantStores>,
    /// Where this process has seen tenants' history marked complete.
    started: Arc<history::Started>,
    /// The tenants' stored bytes in this table, as this process counts them.
    quotas: Arc<Quotas>,
}

impl Table {
    /// The name in the store of this table for `tenant` placed as `model`:
    /// the pooled table, or the tenant's own
    /// (`<prefix>tenant-<tenant>-<model>-<service>-<table>`). Derived from
    /// the model alone: a placement's table names the data service's.
    /// (The pooled table's name is shared: a pool tenant's call allocates none.)
    pub(crate) fn at(&self, prefix: &str, tenant: &str, model: IsolationModel) -> Arc<str> {
        match model {
            IsolationModel::Bridge => format!("{}-{}", dedicated_table(prefix, tenant, "bridge"), self.suffix).into(),
            IsolationModel::Silo => format!("{}-{}", dedicated_table(prefix, tenant, "silo"), self.suffix).into(),
            IsolationModel::Pool | IsolationModel::Unspecified => self.pooled.clone(),
        }
    }

    pub(crate) fn dedicated(&self, name: &str) -> bool {
        name != &*self.pooled
    }

    pub(crate) fn stores(&self) -> &Arc<dyn TenantStores> {
        &self.stores
    }

    /// `tenant`'s bytes here changed outside its writes (an import, a
    /// rewind, a purge, a trim): counted again at its next write.
    pub(crate) fn changed(&self, tenant: &str) {
        self.quotas.forget(tenant);
    }
}

/// The isolation model of a placement (none: pooled).
pub(crate) fn model_of(placement: Option<&Placement>) -> IsolationModel {
    placement.and_then(|p| IsolationModel::try_from(p.model).ok()).unwrap_or(IsolationModel::Pool)
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables").field("service", &self.service).finish_non_exhaustive()
    }
}

impl Tables {
    pub(crate) fn new(service: &str, prefix: &str, tiers: Arc<Tiers>) -> Self {
        Self { service: service.into(), prefix: prefix.into(), tables: Default::default(), tiers }
    }

    pub(crate) fn add(&mut self, name: &str, stores: Arc<dyn TenantStores>) {
        let pooled = stores.pooled_table().into();
        let table = Table {
            pooled,
            suffix: format!("{}-{name}", self.service),
            stores,
            started: Default::default(),
            quotas: Arc::new(Quotas::new(QUOTA_RESCAN)),
        };
        Arc::make_mut(&mut self.tables).insert(name.to_owned(), table);
    }

    pub(crate) fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// The declared tables, by name.
    pub(crate) fn declared(&self) -> impl Iterator<Item = (&str, &Table)> {
        self.tables.iter().map(|(name, t)| (name.as_str(), t))
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// The caller's view of the table `name`, where its tenant's placement
    /// keeps it (the pooled table, or the tenant's own under a bridge or
    /// silo tier): every read and write of it is confined to the caller's
    /// tenant (a key of another tenant is refused by the isolation policy
    /// before it reaches the store). While the tenant is being moved, its
    /// writes are refused (UNAVAILABLE, retry) and its reads served.
    ///
    /// Errors: UNAUTHENTICATED outside an authenticated call;
    /// FAILED_PRECONDITION when the tenant's dedicated table does not exist
    /// (the tenant was not provisioned for this service); INTERNAL for a
    /// table the service did not declare.
    pub async fn of<T>(&self, request: &tonic::Request<T>, name: &str) -> Result<TenantTable, Status> {
        let ctx = TenantContext::from_request(request)?;
        let table = self.tables.get(name).ok_or_else(|| {
            tracing::error!(table = name, service = %self.service, "a handler asked for a table the service did not declare");
            Status::internal("internal error")
        })?;
        let physical = table.at(&self.prefix, &ctx.tenant_id, model_of(ctx.placement()));
        let store = table.stores.store_for(&ctx.tenant_id, &physical).await.map_err(|e| match e {
            PolicyError::NoSuchTable(t) => storage_status(StorageError::NoSuchTable(t)),
            e => {
                tracing::error!(error = %e, table = name, "no tenant-scoped view of the table");
                Status::internal("internal error")
            }
        })?;
        // Its quota, and its history's cap (the tier's multiple of it).
        let limits = ctx.tenant.storage_quota.map(|items| {
            let multiple = self.tiers.get(ctx.tier()).map_or(2, |t| u64::from(t.history_quota_multiple));
            quota::Limits { items, history: items.saturating_mul(multiple), count: None }
        });
        Ok(TenantTable {
            tenant: ctx.tenant_id.clone(),
            store,
            migrating: ctx.status() == TenantStatus::Migrating,
            started: table.started.clone(),
            physical,
            quotas: table.quotas.clone(),
            limits,
        })
    }
}

/// One table as one tenant sees it: items by key, confined to the tenant.
/// Keys are 1-[`MAX_KEY_LEN`] bytes and never start with `~` (reserved
/// for the mesh's bookkeeping). Every write is logged in the tenant's
/// change history (so a restore to an instant covers it) and checked
/// against the tenant's write fence, in one atomic step.
#[derive(Clone)]
pub struct TenantTable {
    tenant: Arc<str>,
    store: DynTable,
    /// The tenant is being moved: its writes are refused.
    migrating: bool,
    started: Arc<history::Started>,
    /// The table's name in the store.
    physical: Arc<str>,
    quotas: Arc<Quotas>,
    /// The tenant's storage limits, when it has any.
    limits: Option<quota::Limits>,
}

impl std::fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTable")
            .field("tenant", &self.tenant)
            .field("table", &self.physical)
            .finish_non_exhaustive()
    }
}

fn check_key(key: &str) -> Result<(), StorageError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.starts_with('~') {
        return Err(StorageError::Invalid(format!("item key {key:?}: 1-{MAX_KEY_LEN} bytes, not starting with '~'")));
    }
    Ok(())
}

impl TenantTable {
    /// The tenant this view is confined to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The item at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Item>, StorageError> {
        check_key(key)?;
        self.store.get(&self.tenant, key).await
    }

    /// Before a write: refused while the tenant moves; its history marked.
    async fn writable(&self) -> Result<(), StorageError> {
        if self.migrating {
            return Err(StorageError::Fenced);
        }
        self.started.ensure(self.store.as_ref(), &self.tenant, &self.physical).await
    }

    /// Writes `data` at `key` if `condition` holds; the stored version.
    /// Refused while the tenant is being moved or restored
    /// ([`StorageError::Fenced`]), past its storage quota
    /// ([`TableError::OverQuota`]), and for an item over
    /// [`history::MAX_ITEM_BYTES`] ([`TableError::TooLarge`]).
    pub async fn put(&self, key: &str, data: Vec<u8>, condition: Condition) -> Result<u64, TableError> {
        check_key(key)?;
        if data.len() > history::MAX_ITEM_BYTES {
            return Err(TableError::TooLarge { size: data.len(), limit: history::MAX_ITEM_BYTES });
        }
        self.writable().await?;
        if let Some(limits) = self.limits {
            let admitted = self.quotas.admit(&self.tenant, &self.store, key, data.len() as u64, limits).await?;
            admitted.map_err(TableError::OverQuota)?;
        }
        let done = history::put(self.store.as_ref(), &self.tenant, key, data, condition, history::FENCE_SK).await?;
        if self.limits.is_some() {
            self.quotas.settle(&self.tenant, &done);
        }
        Ok(done.version)
    }

    /// Deletes the item at `key` if `condition` holds; its last version,
    /// `None` when there was none. Never refused by the quota: it makes room.
    pub async fn delete(&self, key: &str, condition: Condition) -> Result<Option<u64>, TableError> {
        check_key(key)?;
        self.writable().await?;
        let done = history::delete(self.store.as_ref(), &self.tenant, key, condition, history::FENCE_SK).await?;
        if self.limits.is_some() {
            self.quotas.settle(&self.tenant, &done);
        }
        Ok((done.previous_version > 0).then_some(done.previous_version))
    }

    /// One page of the items whose keys start with `prefix`, in key order,
    /// after `start_after`, at most `limit` (and about 1 MiB) of them;
    /// `last_evaluated` is the key to continue after, `None` at the end.
    pub async fn query(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<Page, StorageError> {
        /// After every reserved key (`~` and ASCII): they are skipped at once.
        const PAST_RESERVED: &str = "~\u{10FFFF}";
        let limit = limit.max(1);
        let (mut items, mut start) = (Vec::new(), start_after.map(str::to_owned));
        loop {
            let query = Query {
                pk: self.tenant.to_string(),
                sk_prefix: prefix.to_owned(),
                start_after: start.take(),
                limit: limit - items.len(),
            };
            let page = self.store.query(query).await?;
            // The mesh's own bookkeeping is never an item of the service.
            items.extend(page.items.into_iter().filter(|i| !history::reserved_sort_key(&i.sk)));
            let Some(last) = page.last_evaluated else { return Ok(Page { items, last_evaluated: None }) };
            let reserved = history::reserved_sort_key(&last);
            if items.len() >= limit || (!items.is_empty() && !reserved) {
                // Full, or cut at the page's size: go on after its last item.
                let last_evaluated = items.last().map(|i| i.sk.clone());
                return Ok(Page { items, last_evaluated });
            }
            start = Some(if reserved { PAST_RESERVED.to_owned() } else { last });
        }
    }
}

/// Why a write to a [`TenantTable`] did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The store refused or failed (a failed condition is
    /// [`StorageError::ConditionFailed`]; see [`TableError::condition_failed`]).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The write would take the tenant's items past its storage quota, or
    /// its change history past its cap.
    #[error("{0}")]
    OverQuota(OverQuota),
    /// The item is larger than an item may be.
    #[error("an item of {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
}

impl TableError {
    /// Whether the write's condition did not hold (the item exists, or is
    /// at another version).
    pub fn condition_failed(&self) -> bool {
        matches!(self, TableError::Storage(StorageError::ConditionFailed { .. }))
    }
}

/// The status a table's error is answered with: a failed condition is
/// ABORTED (a concurrent write), a refused key PERMISSION_DENIED (and
/// logged as a security event), a backend failure or a write while the
/// tenant moves UNAVAILABLE (retry), a write past the tenant's storage
/// quota RESOURCE_EXHAUSTED (with a `QuotaFailure`), an item too large
/// INVALID_ARGUMENT, an invalid key INTERNAL (a handler's bug; validate
/// input first).
pub fn storage_status(e: impl Into<TableError>) -> Status {
    match e.into() {
        TableError::Storage(e) => tenantmesh_service::errors::storage_status(e, "application"),
        TableError::OverQuota(over) => {
            tracing::warn!(limit = ?over.over, quota = over.quota, stored = over.stored, "write refused by the storage quota");
            over.status()
        }
        e @ TableError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
    }
}
