//! The standard `TenantLifecycle` service every application serves: what
//! the control plane's workflows do to a tenant's items in the service's
//! declared tables (provision, fence, export, import, rewind, purge), per
//! placement. Every call is idempotent.

use std::pin::Pin;

use tenantmesh_isolation::PolicyError;
use tenantmesh_proto::lifecycle::v1::tenant_lifecycle_server::TenantLifecycle;
use tenantmesh_proto::lifecycle::v1::*;
use tenantmesh_proto::registry::v1::{IsolationModel, Placement};
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_storage::{DynTable, Item, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::history::{self, HistoryError};
use crate::tables::{Table, Tables, model_of, storage_status};

/// Largest number of items in one ImportTenant call.
pub const MAX_IMPORT_BATCH: usize = 500;
/// Longest sort key an import takes (an item's key, or a history entry's).
const MAX_SORT_KEY_LEN: usize = 1024;
/// Items per exported page.
const PAGE: usize = 100;

/// The `TenantLifecycle` service over a service's declared tables.
#[derive(Clone, Debug)]
pub(crate) struct Lifecycle {
    tables: Tables,
}

impl Lifecycle {
    pub(crate) fn new(tables: Tables) -> Self {
        Self { tables }
    }

    /// Checks the tenant and placement, and that the caller may act on
    /// the tenant: (tenant, model).
    fn check<T>(
        request: &Request<T>,
        tenant: &str,
        placement: Option<&Placement>,
    ) -> Result<(String, IsolationModel), Status> {
        let ctx = TenantContext::from_request(request)?;
        let mut v = Violations::new();
        v.tenant_id("tenant_id", tenant);
        match placement.map(|p| IsolationModel::try_from(p.model)) {
            None => {
                v.add("placement", "is required");
            }
            Some(Err(_)) => {
                v.add("placement.model", "is not an isolation model");
            }
            Some(Ok(_)) => {}
        }
        v.check()?;
        ctx.authorize_tenant(tenant)?;
        Ok((tenant.to_owned(), model_of(placement)))
    }

    /// Each declared table at `model` for `tenant`: (declared name, table,
    /// its name in the store).
    fn at<'a>(
        &'a self,
        tenant: &'a str,
        model: IsolationModel,
    ) -> impl Iterator<Item = (&'a str, &'a Table, std::sync::Arc<str>)> + 'a {
        self.tables.declared().map(move |(name, t)| (name, t, t.at(self.tables.prefix(), tenant, model)))
    }

    /// The tenant's view of `physical`; `None` when that dedicated table
    /// does not exist (never provisioned, or dropped).
    async fn store(table: &Table, tenant: &str, physical: &str) -> Result<Option<DynTable>, Status> {
        match table.stores().store_for(tenant, physical).await {
            Ok(store) => Ok(Some(store)),
            Err(PolicyError::NoSuchTable(_)) if table.dedicated(physical) => Ok(None),
            Err(PolicyError::NoSuchTable(t)) => Err(storage_status(StorageError::NoSuchTable(t))),
            Err(e) => {
                tracing::error!(error = %e, table = physical, "no tenant-scoped view of the table");
                Err(Status::internal("internal error"))
            }
        }
    }
}

fn history_status(e: HistoryError) -> Status {
    e.status(storage_status)
}

/// Whether `store` holds no item of `tenant` (its history aside).
async fn empty(store: &DynTable, tenant: &str) -> Result<bool, StorageError> {
    let mut pages = history::ExportPages::now(store.clone(), tenant, false);
    while let Some(page) = pages.next(PAGE).await? {
        if !page.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportTenantResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TenantLifecycle for Lifecycle {
    async fn provision_tenant(
        &self,
        request: Request<ProvisionTenantRequest>,
    ) -> Result<Response<ProvisionTenantResponse>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let tier = &request.get_ref().tier;
        if tier.is_empty() || tier.len() > 32 {
            return Err(invalid_field("tier", "is required (at most 32 characters)"));
        }
        let (mut tables, mut created) = (Vec::new(), 0);
        for (_, table, physical) in self.at(&tenant, model) {
            if table.dedicated(&physical)
                && table.stores().provision(&tenant, &physical, tier).await.map_err(storage_status)?
            {
                created += 1;
            }
            // The tenant's history here is complete from now: a restore
            // to any later instant covers this table, written to or not.
            if let Some(store) = Self::store(table, &tenant, &physical).await? {
                history::mark_start(store.as_ref(), &tenant, history::FENCE_SK).await.map_err(storage_status)?;
            }
            tables.push(physical.to_string());
        }
        let detail = match model {
            IsolationModel::Silo => format!(
                "a silo tenant: served by the shared instance of {} on its own tables (the service has no silo instances)",
                self.tables.service()
            ),
            IsolationModel::Bridge => "on its own tables".to_owned(),
            _ => "in the pooled tables".to_owned(),
        };
        tracing::info!(target_tenant = %tenant, ?tables, created, "tenant provisioned");
        Ok(Response::new(ProvisionTenantResponse { tables, created, detail }))
    }

    async fn fence_tenant(
        &self,
        request: Request<FenceTenantRequest>,
    ) -> Result<Response<FenceTenantResponse>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let raised = request.get_ref().raised;
        let mut changed = 0;
        for (_, table, physical) in self.at(&tenant, model) {
            // Nothing to fence where a dedicated table is gone.
            let Some(store) = Self::store(table, &tenant, &physical).await? else { continue };
            if history::set_fence(store.as_ref(), &tenant, raised).await.map_err(storage_status)? {
                changed += 1;
            }
        }
        tracing::info!(target_tenant = %tenant, raised, changed, "write fence set");
        Ok(Response::new(FenceTenantResponse { changed }))
    }

    type ExportTenantStream = ExportStream;

    async fn export_tenant(
        &self,
        request: Request<ExportTenantRequest>,
    ) -> Result<Response<Self::ExportTenantStream>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let req = request.into_inner();
        if req.include_history && req.as_of_us.is_some() {
            return Err(invalid_field("include_history", "cannot be set with as_of_us"));
        }
        // Every table's pages opened first: a missing history is the call's
        // status, not a broken stream.
        let mut all = Vec::new();
        for (name, table, physical) in self.at(&tenant, model) {
            let Some(store) = Self::store(table, &tenant, &physical).await? else { continue };
            let pages = match req.as_of_us {
                Some(at) => match history::ExportPages::at(store.clone(), &tenant, at).await {
                    Ok(p) => p,
                    // Never written and empty: it held nothing then either.
                    Err(HistoryError::TooOld { start_us: None })
                        if empty(&store, &tenant).await.map_err(storage_status)? =>
                    {
                        continue;
                    }
                    Err(e) => return Err(history_status(e)),
                },
                None => history::ExportPages::now(store, &tenant, req.include_history),
            };
            all.push((name.to_owned(), pages));
        }
        let (mut tx, rx) = tenantmesh_service::runtime::stream(4, std::time::Duration::from_secs(30));
        tenantmesh_telemetry::spawn(async move {
            for (name, mut pages) in all {
                loop {
                    let items = match pages.next(PAGE).await {
                        Ok(Some(items)) => items,
                        Ok(None) => break,
                        Err(e) => return tx.fail(storage_status(e)),
                    };
                    let items = items
                        .into_iter()
                        .map(|i| TableItem { table: name.clone(), key: i.sk, version: i.version, data: i.data })
                        .collect();
                    if !tx.send(ExportTenantResponse { items }).await {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn import_tenant(
        &self,
        request: Request<ImportTenantRequest>,
    ) -> Result<Response<ImportTenantResponse>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let req = request.into_inner();
        if req.items.len() > MAX_IMPORT_BATCH {
            return Err(invalid_field("items", format!("at most {MAX_IMPORT_BATCH} per call")));
        }
        let tables: Vec<_> = self.at(&tenant, model).collect();
        let mut v = Violations::new();
        for (i, item) in req.items.iter().enumerate() {
            if !tables.iter().any(|(name, ..)| *name == item.table) {
                v.add(&format!("items[{i}].table"), "is not a table of this service");
            }
            if item.key.is_empty() || item.key.len() > MAX_SORT_KEY_LEN || !history::importable(&item.key) {
                v.add(
                    &format!("items[{i}].key"),
                    format!("must be 1 to {MAX_SORT_KEY_LEN} bytes, not starting with '~' unless it is change history"),
                );
            }
            if item.version == 0 {
                v.add(&format!("items[{i}].version"), "must be at least 1");
            }
        }
        v.check()?;
        let mut stores = Vec::new();
        for (name, table, physical) in &tables {
            let store = Self::store(table, &tenant, physical)
                .await?
                .ok_or_else(|| storage_status(StorageError::NoSuchTable(physical.to_string())))?;
            stores.push((*name, store));
        }
        let imported = req.items.len() as u32;
        for (_, table, _) in &tables {
            table.changed(&tenant);
        }
        for item in req.items {
            let (_, store) = stores.iter().find(|(name, _)| *name == item.table).expect("checked above");
            let item = Item { pk: tenant.clone(), sk: item.key, version: item.version, data: item.data };
            store.restore(item).await.map_err(storage_status)?;
        }
        Ok(Response::new(ImportTenantResponse { imported }))
    }

    async fn rewind_tenant(
        &self,
        request: Request<RewindTenantRequest>,
    ) -> Result<Response<RewindTenantResponse>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let at = request.get_ref().point_in_time_us;
        if at <= 0 {
            return Err(invalid_field("point_in_time_us", "must be a time after the Unix epoch"));
        }
        let (mut restored, mut deleted) = (0, 0);
        for (_, table, physical) in self.at(&tenant, model) {
            let Some(store) = Self::store(table, &tenant, &physical).await? else { continue };
            table.changed(&tenant);
            match history::rewind(store.as_ref(), &tenant, at).await {
                Ok(done) => (restored, deleted) = (restored + done.restored, deleted + done.deleted),
                // Never written and empty: nothing to put back.
                Err(HistoryError::TooOld { start_us: None })
                    if empty(&store, &tenant).await.map_err(storage_status)? => {}
                Err(e) => return Err(history_status(e)),
            }
        }
        tracing::info!(target_tenant = %tenant, point_in_time_us = at, restored, deleted, "items rewound");
        Ok(Response::new(RewindTenantResponse { restored, deleted }))
    }

    async fn purge_tenant(
        &self,
        request: Request<PurgeTenantRequest>,
    ) -> Result<Response<PurgeTenantResponse>, Status> {
        let (tenant, model) =
            Self::check(&request, &request.get_ref().tenant_id, request.get_ref().placement.as_ref())?;
        let (mut deleted, mut dropped, mut tables) = (0, 0, Vec::new());
        for (_, table, physical) in self.at(&tenant, model) {
            if table.dedicated(&physical) {
                if table.stores().drop_table(&physical).await.map_err(storage_status)? {
                    dropped += 1;
                }
                tables.push(physical.to_string());
            } else if let Some(store) = Self::store(table, &tenant, &physical).await? {
                table.changed(&tenant);
                deleted += history::purge(store.as_ref(), &tenant).await.map_err(storage_status)?;
            }
        }
        tracing::info!(target_tenant = %tenant, deleted, dropped, "tenant purged");
        Ok(Response::new(PurgeTenantResponse { deleted, dropped, tables }))
    }
}
