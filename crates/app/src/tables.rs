//! Tenant-scoped tables: a service's own tables, each call confined to
//! its caller's tenant.

use std::collections::HashMap;
use std::sync::Arc;

use tenantmesh_isolation::TenantStores;
use tenantmesh_storage::{Condition, DynTable, Item, Page, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tonic::Status;

/// Longest key of an item in a [`TenantTable`].
pub const MAX_KEY_LEN: usize = 512;

/// The tables a service declared ([`crate::App::table`]), by name.
#[derive(Clone)]
pub struct Tables {
    service: Arc<str>,
    stores: Arc<HashMap<String, Table>>,
}

#[derive(Clone)]
struct Table {
    /// The pooled table's name in the store (`<prefix><service>-<table>`).
    pooled: String,
    stores: Arc<dyn TenantStores>,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables").field("service", &self.service).finish_non_exhaustive()
    }
}

impl Tables {
    pub(crate) fn new(service: &str) -> Self {
        Self { service: service.into(), stores: Default::default() }
    }

    pub(crate) fn add(&mut self, name: &str, stores: Arc<dyn TenantStores>) {
        let pooled = stores.pooled_table().to_owned();
        Arc::make_mut(&mut self.stores).insert(name.to_owned(), Table { pooled, stores });
    }

    /// The caller's view of the table `name`: every read and write of it is
    /// confined to the caller's tenant (a key of another tenant is refused
    /// by the isolation policy before it reaches the store).
    ///
    /// Errors: UNAUTHENTICATED outside an authenticated call; INTERNAL for
    /// a table the service did not declare.
    pub async fn of<T>(&self, request: &tonic::Request<T>, name: &str) -> Result<TenantTable, Status> {
        let ctx = TenantContext::from_request(request)?;
        let table = self.stores.get(name).ok_or_else(|| {
            tracing::error!(table = name, service = %self.service, "a handler asked for a table the service did not declare");
            Status::internal("internal error")
        })?;
        let store = table.stores.store_for(&ctx.tenant_id, &table.pooled).await.map_err(|e| {
            tracing::error!(error = %e, table = name, "no tenant-scoped view of the table");
            Status::internal("internal error")
        })?;
        Ok(TenantTable { tenant: ctx.tenant_id.clone(), store })
    }
}

/// One table as one tenant sees it: items by key, confined to the tenant.
/// Keys are 1-[`MAX_KEY_LEN`] bytes and never start with `~` (reserved
/// for the mesh's bookkeeping).
#[derive(Clone)]
pub struct TenantTable {
    tenant: Arc<str>,
    store: DynTable,
}

impl std::fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTable").field("tenant", &self.tenant).finish_non_exhaustive()
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

    /// Writes `data` at `key` if `condition` holds; the stored item.
    pub async fn put(&self, key: &str, data: Vec<u8>, condition: Condition) -> Result<Item, StorageError> {
        check_key(key)?;
        self.store.put(&self.tenant, key, data, condition).await
    }

    /// Deletes the item at `key` if `condition` holds; its last version,
    /// `None` when there was none.
    pub async fn delete(&self, key: &str, condition: Condition) -> Result<Option<u64>, StorageError> {
        check_key(key)?;
        self.store.delete(&self.tenant, key, condition).await
    }

    /// One page of the items whose keys start with `prefix`, in key order,
    /// after `start_after`, at most `limit` (and about 1 MiB) of them.
    pub async fn query(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<Page, StorageError> {
        let page = self
            .store
            .query(Query {
                pk: self.tenant.to_string(),
                sk_prefix: prefix.to_owned(),
                start_after: start_after.map(str::to_owned),
                limit: limit.max(1),
            })
            .await?;
        // The mesh's own bookkeeping is never an item of the service.
        let items = page.items.into_iter().filter(|i| !i.sk.starts_with('~')).collect();
        Ok(Page { items, last_evaluated: page.last_evaluated })
    }
}

/// The status a storage error is answered with: a failed condition is
/// ABORTED (a concurrent write), a refused key PERMISSION_DENIED (and
/// logged as a security event), a backend failure UNAVAILABLE, an invalid
/// key INTERNAL (a handler's bug; validate input first).
pub fn storage_status(e: StorageError) -> Status {
    tenantmesh_service::errors::storage_status(e, "application")
}
