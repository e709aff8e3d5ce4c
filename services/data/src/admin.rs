//! `DataAdmin`: the data plane's lifecycle calls (provision, export,
//! import, purge, fence, rewind to an instant, trim history), for the
//! onboarding workflows only (the access table allows the service role
//! and nobody else). Every call names a tenant and a table; the table must be the
//! pooled one or that tenant's own dedicated one, and the tenant's session
//! policy still confines every storage call to its partition.

use std::pin::Pin;
use std::sync::Arc;

use tenantmesh_admission::limits::{Cost, KeyedLimiter, Limit, Limits, Refusal};
use tenantmesh_isolation::TenantStores;
use tenantmesh_isolation::stores::table_allowed;
use tenantmesh_proto::data::v1::data_admin_server::DataAdmin;
use tenantmesh_proto::data::v1::*;
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{DynTable, Item, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::directory::{TenantDirectory, TenantInfo};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::DataError;
use tenantmesh_app::history::{self, HistoryError};
use tenantmesh_app::quota::Quotas;

/// Largest number of items in one ImportItems call.
pub const MAX_IMPORT_BATCH: usize = 500;
const PAGE: usize = 100;
const MAX_SORT_KEY_LEN: usize = 1024;

#[derive(Clone)]
pub struct DataAdminService {
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    silo_tenant: Option<String>,
    /// The data service's counts of its tenants' stored bytes: forgotten
    /// (counted again at the next write) when a call here changes them.
    quotas: Option<Arc<Quotas>>,
    /// How long an export waits for its client to read before it ends.
    stall: std::time::Duration,
    /// Charging tenants for the restores and exports they ask for.
    charges: Option<TenantCharges>,
}

/// What charging a tenant for lifecycle work it asked for itself (a
/// restore, into place or an export) takes: the service's per-tenant
/// limiter, the tenants' records (their limits and quota), the tiers
/// (their history caps).
#[derive(Clone)]
pub struct TenantCharges {
    pub limiter: Arc<KeyedLimiter>,
    pub directory: Arc<dyn TenantDirectory>,
    pub tiers: Arc<Tiers>,
}

/// A charged call: where to charge, and under which limits.
struct Charged {
    limiter: Arc<KeyedLimiter>,
    limits: Limits,
}

impl Charged {
    fn charge(&self, tenant: &str, cost: Cost) {
        self.limiter.charge(tenant, cost.0, self.limits);
    }
}

impl DataAdminService {
    pub fn new(stores: Arc<dyn TenantStores>, table_prefix: &str, silo_tenant: Option<String>) -> Self {
        Self {
            stores,
            table_prefix: table_prefix.to_owned(),
            silo_tenant,
            quotas: None,
            stall: std::time::Duration::from_secs(30),
            charges: None,
        }
    }

    /// Charges tenants for the restores and exports they ask for
    /// (`charge_tenant`); without it (limits off) nothing is charged.
    pub fn with_charges(mut self, charges: Option<TenantCharges>) -> Self {
        self.charges = charges;
        self
    }

    /// When `charge` (the tenant asked for this itself) and the tenant has
    /// limits: the limits to charge it under, once it may be admitted
    /// (RESOURCE_EXHAUSTED with RetryInfo while it owes its rate), and its
    /// record.
    async fn charged(
        &self,
        charge: bool,
        tenant: &str,
        ctx: &TenantContext,
    ) -> Result<Option<(Charged, Arc<TenantInfo>)>, Status> {
        let Some(charges) = self.charges.as_ref().filter(|_| charge) else { return Ok(None) };
        let info = charges
            .directory
            .lookup(tenant, &ctx.token, None)
            .await?
            .ok_or_else(|| Status::failed_precondition(format!("tenant {tenant} does not exist")))?;
        let Some(limits) = info.limits else { return Ok(None) };
        if let Some(retry_after) = charges.limiter.owing(tenant, 1, limits) {
            tracing::info!(target_tenant = %tenant, retry_after_ms = retry_after.as_millis() as u64, "a restore the tenant asked for waits for its rate");
            let description = format!(
                "{} requests per second, burst {} (a restore the tenant asks for is charged to it)",
                limits.rate_per_second, limits.burst
            );
            return Err(
                Refusal { limit: Limit::Rate, subject: format!("tenant:{tenant}"), description, retry_after }.status()
            );
        }
        Ok(Some((Charged { limiter: charges.limiter.clone(), limits }, info)))
    }

    /// FAILED_PRECONDITION when `tenant`'s change history is at its cap: a
    /// rewind it asked for would only add to it.
    async fn within_history_cap(&self, tenant: &str, info: &TenantInfo, store: &DynTable) -> Result<(), Status> {
        let (Some(quotas), Some(quota), Some(charges)) = (&self.quotas, info.storage_quota, &self.charges) else {
            return Ok(());
        };
        let cap = charges.tiers.get(&info.tier).map_or(quota.saturating_mul(2), |t| t.history_quota(quota));
        let stored = quotas.stored(tenant, store).await.map_err(storage_status)?;
        if stored.history >= cap {
            return Err(Status::failed_precondition(format!(
                "the tenant's change history is at its cap of {cap} bytes ({} kept): a restore would add to it; \
                 it frees as entries age past the tier's history_days",
                stored.history
            )));
        }
        Ok(())
    }

    /// How long an export waits for its client to read before it ends.
    pub fn with_stall(mut self, stall: std::time::Duration) -> Self {
        self.stall = stall;
        self
    }

    /// The counts to forget when a call changes a tenant's stored bytes.
    pub fn with_quotas(mut self, quotas: Arc<Quotas>) -> Self {
        self.quotas = Some(quotas);
        self
    }

    /// `tenant`'s stored bytes changed here: the data service counts them again.
    fn changed(&self, tenant: &str) {
        if let Some(q) = &self.quotas {
            q.forget(tenant);
        }
    }

    /// Checks `store`, and that the caller may act on its tenant (PERMISSION_DENIED
    /// otherwise, after the request is found well-formed): (tenant, table).
    fn check(
        &self,
        ctx: &TenantContext,
        store: Option<&StoreRef>,
        dedicated: bool,
    ) -> Result<(String, String), Status> {
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
        ctx.authorize_tenant(&r.tenant_id)?;
        Ok((r.tenant_id.clone(), r.table.clone()))
    }

    async fn store(&self, tenant: &str, table: &str) -> Result<DynTable, Status> {
        Ok(self.stores.store_for(tenant, table).await.map_err(DataError::from)?)
    }
}

fn storage_status(e: StorageError) -> Status {
    DataError::from(e).into()
}

fn history_status(e: HistoryError) -> Status {
    e.status(storage_status)
}

fn stored(i: Item) -> StoredItem {
    StoredItem { sort_key: i.sk, version: i.version, data: i.data }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportItemsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DataAdmin for DataAdminService {
    async fn provision_store(
        &self,
        request: Request<ProvisionStoreRequest>,
    ) -> Result<Response<ProvisionStoreResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), true)?;
        if req.tier.is_empty() || req.tier.len() > 32 {
            return Err(invalid_field("tier", "is required (at most 32 characters)"));
        }
        let created = self.stores.provision(&tenant, &table, &req.tier).await.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, created, "store provisioned");
        Ok(Response::new(ProvisionStoreResponse { created }))
    }

    async fn drop_store(&self, request: Request<DropStoreRequest>) -> Result<Response<DropStoreResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), true)?;
        let dropped = self.stores.drop_table(&table).await.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, dropped, "store dropped");
        Ok(Response::new(DropStoreResponse { dropped }))
    }

    type ExportItemsStream = ExportStream;

    async fn export_items(
        &self,
        request: Request<ExportItemsRequest>,
    ) -> Result<Response<Self::ExportItemsStream>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        if req.include_history && req.as_of_us.is_some() {
            return Err(invalid_field("include_history", "cannot be set with as_of_us"));
        }
        let store = self.store(&tenant, &table).await?;
        let charged = self.charged(req.charge_tenant, &tenant, &ctx).await?.map(|(c, _)| c);
        let charged_tenant = tenant.clone();
        let mut pages = match req.as_of_us {
            Some(at) => history::ExportPages::at(store, &tenant, at).await.map_err(history_status)?,
            None => history::ExportPages::now(store, &tenant, req.include_history),
        };
        // The first page before answering: a missing table or an outage is
        // the call's status, not a broken stream.
        let next = async |pages: &mut history::ExportPages| {
            Ok::<_, StorageError>(
                pages.next(PAGE).await?.map(|items| items.into_iter().map(stored).collect::<Vec<_>>()),
            )
        };
        let first = next(&mut pages).await.map_err(storage_status)?;
        let (mut tx, rx) = tenantmesh_service::runtime::stream(4, self.stall);
        tenantmesh_telemetry::spawn(async move {
            let mut page = first;
            while let Some(items) = page {
                if let Some(charged) = &charged {
                    charged.charge(&charged_tenant, Cost::read(items.iter().map(|i| i.data.len()).sum()));
                }
                if !tx.send(ExportItemsResponse { items }).await {
                    return;
                }
                page = match next(&mut pages).await {
                    Ok(p) => p,
                    Err(e) => return tx.fail(storage_status(e)),
                };
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn import_items(
        &self,
        request: Request<ImportItemsRequest>,
    ) -> Result<Response<ImportItemsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        if req.items.len() > MAX_IMPORT_BATCH {
            return Err(invalid_field("items", format!("at most {MAX_IMPORT_BATCH} per call")));
        }
        let mut v = Violations::new();
        for (i, item) in req.items.iter().enumerate() {
            if item.sort_key.is_empty() || item.sort_key.len() > MAX_SORT_KEY_LEN {
                v.add(&format!("items[{i}].sort_key"), format!("must be 1 to {MAX_SORT_KEY_LEN} bytes"));
            } else if !history::importable(&item.sort_key) {
                v.add(
                    &format!("items[{i}].sort_key"),
                    "must not start with '~' (reserved for the service), unless it is change history",
                );
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
        self.changed(&tenant);
        Ok(Response::new(ImportItemsResponse { imported: n }))
    }

    async fn purge_items(&self, request: Request<PurgeItemsRequest>) -> Result<Response<PurgeItemsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        // Items and their history; the fence stays.
        let deleted = history::purge(store.as_ref(), &tenant).await;
        self.changed(&tenant);
        let deleted = deleted.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, deleted, "items purged");
        Ok(Response::new(PurgeItemsResponse { deleted }))
    }

    async fn set_fence(&self, request: Request<SetFenceRequest>) -> Result<Response<SetFenceResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        let changed = history::set_fence(store.as_ref(), &tenant, req.raised).await.map_err(storage_status)?;
        tracing::info!(target_tenant = %tenant, table, raised = req.raised, changed, "write fence set");
        Ok(Response::new(SetFenceResponse { changed }))
    }

    async fn rewind_items(
        &self,
        request: Request<RewindItemsRequest>,
    ) -> Result<Response<RewindItemsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        if req.point_in_time_us <= 0 {
            return Err(invalid_field("point_in_time_us", "must be a time after the Unix epoch"));
        }
        let store = self.store(&tenant, &table).await?;
        let charged = self.charged(req.charge_tenant, &tenant, &ctx).await?;
        if let Some((_, info)) = &charged {
            self.within_history_cap(&tenant, info, &store).await?;
        }
        let started = std::time::Instant::now();
        let done = history::rewind(store.as_ref(), &tenant, req.point_in_time_us).await;
        // Whatever part of it ran changed the tenant's bytes.
        self.changed(&tenant);
        let done = done.map_err(history_status)?;
        if let Some((charged, _)) = &charged {
            charged.charge(&tenant, Cost::write(done.bytes as usize));
        }
        tracing::info!(
            target_tenant = %tenant,
            table,
            point_in_time_us = req.point_in_time_us,
            restored = done.restored,
            deleted = done.deleted,
            bytes = done.bytes,
            charged = charged.is_some(),
            ms = started.elapsed().as_millis() as u64,
            "items rewound"
        );
        Ok(Response::new(RewindItemsResponse {
            restored: done.restored,
            deleted: done.deleted,
            bytes_written: done.bytes,
        }))
    }

    async fn trim_history(
        &self,
        request: Request<TrimHistoryRequest>,
    ) -> Result<Response<TrimHistoryResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let (tenant, table) = self.check(&ctx, req.store.as_ref(), false)?;
        let store = self.store(&tenant, &table).await?;
        let trimmed = history::trim(store.as_ref(), &tenant, req.before_us).await.map_err(storage_status)?;
        if trimmed > 0 {
            self.changed(&tenant);
        }
        tracing::debug!(target_tenant = %tenant, table, trimmed, before_us = req.before_us, "history trimmed");
        Ok(Response::new(TrimHistoryResponse { trimmed }))
    }
}
