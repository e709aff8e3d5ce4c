//! Stored bytes over time: every sample interval
//! (`TENANTMESH_STORAGE_SAMPLE_SECS`, default 3600, aligned to the clock)
//! the data service measures each tenant's stored item bytes where its
//! placement keeps them, and files `bytes × interval` as the meter
//! `storage_byte_hours` for that interval.
//!
//! Every tenant is measured, busy or idle (storage costs whether or not
//! the tenant calls), so the tenants come from the registry, asked with
//! the service's platform identity; without one
//! (`TENANTMESH_SERVICE_CLIENT_ID`/`_SECRET`) storage is not metered and
//! the service says so at start. Pool and bridge tenants are measured here
//! (a query of the tenant's partition through its confined store); a silo
//! tenant through its instance's DataAdmin export. Replicas sample alike,
//! and the first to file an interval for a tenant (a conditional write of
//! `s#<interval start>`) is the one that counts: an interval is never
//! counted twice. The cost is one read of every tenant's items per
//! interval.
//!
//! Stored bytes include the tenant's change history (see
//! [`tenantmesh_app::history`]), which the replica that filed the interval then
//! trims to the tier's `history_days`. With metering off
//! (`TENANTMESH_METERING=off`) nothing is measured or filed, and every
//! replica trims every tenant's history each interval (a trim is
//! idempotent), so the history never outgrows the tiers' days.
//!
//! Each interval also deletes every tenant's usage older than the usage
//! retention (`TENANTMESH_USAGE_RETENTION_DAYS`, default 400), offboarded
//! tenants' included.

use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::TenantStores;
use tenantmesh_metering::usage::{self as metering, Sample};
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::{ExportItemsRequest, StoreRef, TrimHistoryRequest};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{Tenant, TenantStatus};
use tenantmesh_storage::DynTable;
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceTokenSource};

/// Measures and files every tenant's stored bytes each interval, and
/// trims their change history.
pub struct StorageSampler {
    /// Where samples are filed; `None` with metering off: trim only.
    usage: Option<DynTable>,
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    registry: TenantRegistryClient<PropagatedChannel>,
    /// Silo instances' DataAdmin, called with the data service's identity.
    silos: client::Channels,
    interval: Duration,
    tiers: Arc<tenantmesh_service::tiers::Tiers>,
    /// The data service's counts of stored bytes: a tenant's are forgotten
    /// when its history is trimmed here.
    quotas: Option<Arc<tenantmesh_app::quota::Quotas>>,
    /// Usage older than this many days is deleted.
    usage_retention_days: u32,
    /// Tenants being sampled now (by an earlier round still at it).
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A tenant marked busy in a sampler until dropped.
struct Busy<'a>(&'a std::sync::Mutex<std::collections::HashSet<String>>, &'a str);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("busy tenants").remove(self.1);
    }
}

/// Tenants measured at once.
pub const CONCURRENCY: usize = 8;

/// Where a tenant's items are: a silo instance (its DataAdmin, the table)
/// or a store here.
enum Kept {
    Silo(DataAdminClient<PropagatedChannel>, StoreRef),
    /// The tenant and the table, here.
    Table(String, String),
}

impl StorageSampler {
    pub fn new(
        usage: Option<DynTable>,
        stores: Arc<dyn TenantStores>,
        table_prefix: &str,
        registry_url: &str,
        tokens: Arc<ServiceTokenSource>,
        interval: Duration,
        tiers: Arc<tenantmesh_service::tiers::Tiers>,
    ) -> Result<Self, tonic::transport::Error> {
        let registry =
            TenantRegistryClient::new(client::wrap(client::channel(registry_url)?, Identity::Service(tokens.clone())));
        let silos = client::Channels::new(Identity::Service(tokens));
        Ok(Self {
            usage,
            stores,
            table_prefix: table_prefix.to_owned(),
            registry,
            silos,
            interval: interval.max(Duration::from_secs(1)),
            tiers,
            quotas: None,
            usage_retention_days: 400,
            busy: Default::default(),
        })
    }

    /// Deletes usage older than `days` (`TENANTMESH_USAGE_RETENTION_DAYS`).
    pub fn with_usage_retention(mut self, days: u32) -> Self {
        self.usage_retention_days = days.max(1);
        self
    }

    /// The counts to forget when a tenant's history is trimmed.
    pub fn with_quotas(mut self, quotas: Arc<tenantmesh_app::quota::Quotas>) -> Self {
        self.quotas = Some(quotas);
        self
    }

    /// Samples at every interval boundary until `stop` changes.
    pub fn start(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        tenantmesh_telemetry::spawn(async move {
            let every = self.interval.as_secs() as i64;
            loop {
                let now_ms = tenantmesh_service::clock::now_ms();
                let next = (now_ms / 1000 / every + 1) * every;
                let wait = Duration::from_millis((next * 1000 - now_ms).max(0) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                // The interval that just ended, in a task of its own: a
                // round held up by one slow tenant delays no later round
                // (which leaves that tenant alone while it is busy).
                let round = self.clone();
                tenantmesh_telemetry::spawn(async move {
                    match round.sample(next - every).await {
                        Ok(n) => tracing::debug!(tenants = n, "stored bytes sampled"),
                        Err(e) => tracing::warn!(error = %e, "stored bytes not sampled for this interval"),
                    }
                });
            }
        });
    }

    /// Measures and files every tenant for the interval starting at `start`
    /// (with metering off, only trims), and deletes usage older than its
    /// retention; the number of tenants filed (or trimmed) by this
    /// replica. Tenants are done [`CONCURRENCY`] at a time, and one whose
    /// store fails or is slow stops no other: its error is logged, and the
    /// others go on (and later rounds leave it alone while it is busy).
    pub async fn sample(&self, start: i64) -> Result<usize, String> {
        use futures_util::StreamExt as _;
        let tenants = tenantmesh_tenant_context::directory::all_tenants(&self.registry)
            .await
            .map_err(|s| format!("listing tenants: {}", s.message()))?;
        let expire_before = tenantmesh_service::clock::now_secs() - i64::from(self.usage_retention_days) * 86_400;
        let (mut running, mut filed) = (futures_util::stream::FuturesUnordered::new(), 0);
        for tenant in &tenants {
            if running.len() >= CONCURRENCY {
                filed += usize::from(running.next().await.unwrap_or(false));
            }
            running.push(self.sample_one(tenant, start, expire_before));
        }
        while let Some(one) = running.next().await {
            filed += usize::from(one);
        }
        Ok(filed)
    }

    /// [`StorageSampler::sample`] for one tenant: whether this replica
    /// filed (or, with metering off, trimmed) it.
    async fn sample_one(&self, tenant: &Tenant, start: i64, expire_before: i64) -> bool {
        let id = tenant.tenant_id.as_str();
        // Still at it from an earlier round: left alone until it is done.
        if !self.busy.lock().expect("busy tenants").insert(id.to_owned()) {
            tracing::debug!(tenant_id = %id, "still being sampled; skipped this interval");
            return false;
        }
        let _busy = Busy(&self.busy, id);
        if let Some(usage) = &self.usage
            && let Err(e) = metering::expire_usage(usage, id, expire_before).await
        {
            tracing::warn!(tenant_id = %id, error = %e, "old usage not expired");
        }
        if tenant.status() == TenantStatus::Deleted {
            return false;
        }
        if let Some(usage) = &self.usage {
            match metering::sample_filed(usage, id, start).await {
                Ok(true) => return false,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant_id = %id, error = %e, "stored bytes not sampled");
                    return false;
                }
            }
        }
        let kept = match self.kept(tenant) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(tenant_id = %id, error = %e, "stored bytes not measured, history not trimmed");
                return false;
            }
        };
        let trims = match &self.usage {
            None => true,
            Some(usage) => match self.measure(&kept, id).await {
                Ok(bytes) => {
                    let sample = Sample { start, secs: self.interval.as_secs() as i64, bytes };
                    // The replica that filed the interval trims too.
                    match metering::file_sample(usage, id, &sample).await {
                        Ok(filed) => filed,
                        Err(e) => {
                            tracing::warn!(tenant_id = %id, error = %e, "stored bytes not filed");
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %id, error = %e, "stored bytes not measured");
                    false
                }
            },
        };
        if trims && let Err(e) = self.trim(&kept, tenant).await {
            tracing::warn!(tenant_id = %id, error = %e, "change history not trimmed");
        }
        trims
    }

    /// Where `tenant`'s placement keeps its items.
    fn kept(&self, tenant: &Tenant) -> Result<Kept, String> {
        use tenantmesh_isolation::stores::{Location, locate};
        let id = tenant.tenant_id.as_str();
        let (table, endpoint) = tenant.placement.as_ref().map_or(("", ""), |p| (p.table.as_str(), p.endpoint.as_str()));
        match locate(self.stores.as_ref(), &self.table_prefix, id, table, endpoint) {
            Some(Location::Silo { endpoint, table }) => {
                Ok(Kept::Silo(self.silo(endpoint)?, StoreRef { tenant_id: id.into(), table: table.into() }))
            }
            Some(Location::Here { table }) => Ok(Kept::Table(id.to_owned(), table.to_owned())),
            None => Err(format!("table {table} is not one of the tenant's")),
        }
    }

    /// `tenant`'s stored bytes, its items' and their change history's.
    async fn measure(&self, kept: &Kept, id: &str) -> Result<u64, String> {
        match kept {
            Kept::Silo(admin, store) => {
                let req =
                    ExportItemsRequest { store: Some(store.clone()), include_history: true, ..Default::default() };
                let mut pages = admin.clone().export_items(req).await.map_err(|s| s.message().to_owned())?.into_inner();
                let mut bytes = 0u64;
                while let Some(page) = pages.message().await.map_err(|s| s.message().to_owned())? {
                    bytes += page.items.iter().map(|i| i.data.len() as u64).sum::<u64>();
                }
                Ok(bytes)
            }
            Kept::Table(_, table) => {
                let store = self.stores.store_for(id, table).await.map_err(|e| e.to_string())?;
                Ok(tenantmesh_app::quota::Quotas::scan(&store, id).await.map_err(|e| e.to_string())?.total())
            }
        }
    }

    /// Deletes `tenant`'s change history older than its tier keeps.
    async fn trim(&self, kept: &Kept, tenant: &Tenant) -> Result<(), String> {
        let Some(tier) = self.tiers.get(&tenant.tier) else {
            return Err(format!("tier {} is not in the tiers file", tenant.tier));
        };
        let before_us = tenantmesh_app::history::now_us() - tier.history_us();
        let trimmed = match kept {
            Kept::Silo(admin, store) => {
                let req = TrimHistoryRequest { store: Some(store.clone()), before_us };
                admin.clone().trim_history(req).await.map_err(|s| s.message().to_owned())?.into_inner().trimmed
            }
            Kept::Table(id, table) => {
                let store = self.stores.store_for(id, table).await.map_err(|e| e.to_string())?;
                let trimmed =
                    tenantmesh_app::history::trim(store.as_ref(), id, before_us).await.map_err(|e| e.to_string())?;
                if let (Some(q), true) = (&self.quotas, trimmed > 0) {
                    q.forget(id);
                }
                trimmed
            }
        };
        tracing::debug!(tenant_id = %tenant.tenant_id, trimmed, "change history trimmed");
        Ok(())
    }

    fn silo(&self, endpoint: &str) -> Result<DataAdminClient<PropagatedChannel>, String> {
        let channel = self.silos.get(endpoint).map_err(|e| format!("silo endpoint {endpoint}: {e}"))?;
        Ok(tenantmesh_service::sized!(DataAdminClient::new(channel)))
    }
}
