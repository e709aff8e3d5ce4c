//! `DataAdmin`: the data plane's lifecycle calls, for the onboarding
//! workflows only (the access table allows the service role and nobody
//! else). Every call names a tenant and a table; the table must be the
//! pooled one or that tenant's own dedicated one, and the tenant's session
//! policy still confines every storage call to its partition.

use std::pin::Pin;
use std::sync::Arc;

use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::stores::table_allowed;
use tenantmesh_proto::data::v1::data_admin_server::DataAdmin;
use tenantmesh_proto::data::v1::*;
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_storage::{Condition, DynTable, Item, Query, StorageError};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{DataError, FENCE_SK, reserved_sort_key};

/// Largest number of items in one ImportItems call.
pub const MAX_IMPORT_BATCH: usize = 500;
const PAGE: usize = 100;
const MAX_SORT_KEY_LEN: usize = 1024;

#[derive(Clone)]
pub struct DataAdminService {
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    silo_tenant: Option<String>,
}

impl DataAdminService {
    pub fn new(stores: Arc<dyn TenantStores>, table_prefix: &str, silo_tenant: Option<String>) -> Self {
        Self { stores, table_prefix: table_prefix.to_owned(), silo_tenant }
    }

    /// Checks `store` and returns (tenant, table).
    fn check(&self, store: Option<&StoreRef>, dedicated: bool) -> Result<(String, String), Status> {
        let mut v = Violations::new();
        let Some(r) = store else {
            return Err(invalid_field("store", "is required"));
        };
        v.tenant_id("store.tenant_id", &r.tenant_id);
        v.check()?;
        if !table_allowed(self.stores.as_ref(), &self.table_prefix, &r.tenant_id, &r.table) {
            return Err(invalid_field("store.table", "must be the pooled table or the tenant's own dedicated table"));
        }
        if dedicated && r.table == self.stores.pooled_table() {
            return Err(invalid_field("store.table", "must be a dedicated table, not the pooled one"));
        }
        if let Some(silo) = &self.silo_tenant
            && *silo != r.tenant_id
        {
            return Err(DataError::WrongSilo.into());
        }
        Ok((r.tenant_id.clone(), r.table.clone()))
    }

    async fn store(&self, tenant: &str, table: &str) -> Result<DynTable, Status> {
        Ok(self.stores.store_for(tenant, table).await.map_err(DataError::from)?)
    }
}

fn storage_status(e: StorageError) -> Status {
    DataError::from(e).into()
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportItemsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DataAdmin for DataAdminService {
    async fn provision_store(
        &self,
        request: Request<ProvisionStoreRequest>,
    ) -> Result<Response<ProvisionStoreResponse>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), true)?;
        if req.tier.is_empty() || req.tier.len() > 32 {
            return Err(invalid_field("tier", "is required (at most 32 characters)"));
        }
        let created = self.stores.provision(&tenant, &table, &req.tier).await.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, created, "store provisioned");
        Ok(Response::new(ProvisionStoreResponse { created }))
    }

    async fn drop_store(&self, request: Request<DropStoreRequest>) -> Result<Response<DropStoreResponse>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), true)?;
        let dropped = self.stores.drop_table(&table).await.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, dropped, "store dropped");
        Ok(Response::new(DropStoreResponse { dropped }))
    }

    type ExportItemsStream = ExportStream;

    async fn export_items(
        &self,
        request: Request<ExportItemsRequest>,
    ) -> Result<Response<Self::ExportItemsStream>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        // The first page before answering: a missing table or an outage is
        // the call's status, not a broken stream.
        let first = Query { pk: tenant.clone(), sk_prefix: String::new(), start_after: None, limit: PAGE };
        let first = store.query(first).await.map_err(storage_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut page = first;
            loop {
                let items = std::mem::take(&mut page.items)
                    .into_iter()
                    .filter(|i| !reserved_sort_key(&i.sk))
                    .map(|i| StoredItem { sort_key: i.sk, version: i.version, data: i.data })
                    .collect();
                if tx.send(Ok(ExportItemsResponse { items })).await.is_err() {
                    return;
                }
                let Some(sk) = page.last_evaluated else { return };
                let q = Query { pk: tenant.clone(), sk_prefix: String::new(), start_after: Some(sk), limit: PAGE };
                match store.query(q).await {
                    Ok(p) => page = p,
                    Err(e) => {
                        let _ = tx.send(Err(storage_status(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn import_items(
        &self,
        request: Request<ImportItemsRequest>,
    ) -> Result<Response<ImportItemsResponse>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), false)?;
        if req.items.len() > MAX_IMPORT_BATCH {
            return Err(invalid_field("items", format!("at most {MAX_IMPORT_BATCH} per call")));
        }
        let mut v = Violations::new();
        for (i, item) in req.items.iter().enumerate() {
            if item.sort_key.is_empty() || item.sort_key.len() > MAX_SORT_KEY_LEN {
                v.add(&format!("items[{i}].sort_key"), format!("must be 1 to {MAX_SORT_KEY_LEN} bytes"));
            } else if reserved_sort_key(&item.sort_key) {
                v.add(&format!("items[{i}].sort_key"), "must not start with '~' (reserved for the service)");
            }
            if item.version == 0 {
                v.add(&format!("items[{i}].version"), "must be at least 1");
            }
        }
        v.check()?;
        let store = self.store(&tenant, &table).await?;
        let n = req.items.len() as u32;
        for item in req.items {
            store
                .restore(Item { pk: tenant.clone(), sk: item.sort_key, version: item.version, data: item.data })
                .await
                .map_err(storage_status)?;
        }
        Ok(Response::new(ImportItemsResponse { imported: n }))
    }

    async fn purge_items(&self, request: Request<PurgeItemsRequest>) -> Result<Response<PurgeItemsResponse>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        let mut deleted = 0u32;
        let mut start_after = None;
        loop {
            let q = Query { pk: tenant.clone(), sk_prefix: String::new(), start_after, limit: PAGE };
            let page = store.query(q).await.map_err(storage_status)?;
            for item in page.items.iter().filter(|i| !reserved_sort_key(&i.sk)) {
                if store.delete(&tenant, &item.sk, Condition::None).await.map_err(storage_status)?.is_some() {
                    deleted += 1;
                }
            }
            match page.last_evaluated {
                Some(sk) => start_after = Some(sk),
                None => break,
            }
        }
        tracing::info!(target_tenant = %tenant, table, deleted, "items purged");
        Ok(Response::new(PurgeItemsResponse { deleted }))
    }

    async fn set_fence(&self, request: Request<SetFenceRequest>) -> Result<Response<SetFenceResponse>, Status> {
        let req = request.into_inner();
        let (tenant, table) = self.check(req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        let changed = if req.raised {
            match store.put(&tenant, FENCE_SK, Vec::new(), Condition::NotExists).await {
                Ok(_) => true,
                Err(StorageError::ConditionFailed { .. }) => false,
                Err(e) => return Err(storage_status(e)),
            }
        } else {
            store.delete(&tenant, FENCE_SK, Condition::None).await.map_err(storage_status)?.is_some()
        };
        tracing::info!(target_tenant = %tenant, table, raised = req.raised, changed, "write fence set");
        Ok(Response::new(SetFenceResponse { changed }))
    }
}
