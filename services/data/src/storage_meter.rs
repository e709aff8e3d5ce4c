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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::TenantStores;
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::{ExportItemsRequest, StoreRef};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{Tenant, TenantStatus};
use tenantmesh_service::metering::{self, Sample};
use tenantmesh_storage::DynTable;
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceTokenSource};

/// Measures and files every tenant's stored bytes each interval.
pub struct StorageSampler {
    usage: DynTable,
    stores: Arc<dyn TenantStores>,
    table_prefix: String,
    tokens: Arc<ServiceTokenSource>,
    registry: TenantRegistryClient<PropagatedChannel>,
    silos: std::sync::Mutex<HashMap<String, DataAdminClient<PropagatedChannel>>>,
    interval: Duration,
}

impl StorageSampler {
    pub fn new(
        usage: DynTable,
        stores: Arc<dyn TenantStores>,
        table_prefix: &str,
        registry_url: &str,
        tokens: Arc<ServiceTokenSource>,
        interval: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let registry =
            TenantRegistryClient::new(client::wrap(client::channel(registry_url)?, Identity::Service(tokens.clone())));
        Ok(Self {
            usage,
            stores,
            table_prefix: table_prefix.to_owned(),
            tokens,
            registry,
            silos: Default::default(),
            interval: interval.max(Duration::from_secs(1)),
        })
    }

    /// Samples at every interval boundary until `stop` changes.
    pub fn start(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(async move {
            let every = self.interval.as_secs() as i64;
            loop {
                let now_ms = metering::now_ms() as i64;
                let next = (now_ms / 1000 / every + 1) * every;
                let wait = Duration::from_millis((next * 1000 - now_ms).max(0) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                // The interval that just ended.
                match self.sample(next - every).await {
                    Ok(n) => tracing::debug!(tenants = n, "stored bytes sampled"),
                    Err(e) => tracing::warn!(error = %e, "stored bytes not sampled for this interval"),
                }
            }
        });
    }

    /// Measures and files every tenant for the interval starting at `start`;
    /// the number of tenants filed by this replica.
    pub async fn sample(&self, start: i64) -> Result<usize, String> {
        let tenants = crate::metering::all_tenants(&self.registry)
            .await
            .map_err(|s| format!("listing tenants: {}", s.message()))?;
        let mut filed = 0;
        for tenant in tenants.iter().filter(|t| t.status() != TenantStatus::Deleted) {
            if metering::sample_filed(&self.usage, &tenant.tenant_id, start).await.map_err(|e| e.to_string())? {
                continue;
            }
            match self.measure(tenant).await {
                Ok(bytes) => {
                    let sample = Sample { start, secs: self.interval.as_secs() as i64, bytes };
                    if metering::file_sample(&self.usage, &tenant.tenant_id, &sample)
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        filed += 1;
                    }
                }
                Err(e) => tracing::warn!(tenant_id = %tenant.tenant_id, error = %e, "stored bytes not measured"),
            }
        }
        Ok(filed)
    }

    /// `tenant`'s stored item bytes where its placement keeps them.
    async fn measure(&self, tenant: &Tenant) -> Result<u64, String> {
        let id = tenant.tenant_id.as_str();
        let placement = tenant.placement.clone().unwrap_or_default();
        let table = if placement.table.is_empty() { self.stores.pooled_table().to_owned() } else { placement.table };
        if !placement.endpoint.is_empty() {
            let mut admin = self.silo(&placement.endpoint)?;
            let req = ExportItemsRequest { store: Some(StoreRef { tenant_id: id.into(), table }) };
            let mut pages = admin.export_items(req).await.map_err(|s| s.message().to_owned())?.into_inner();
            let mut bytes = 0u64;
            while let Some(page) = pages.message().await.map_err(|s| s.message().to_owned())? {
                bytes += page.items.iter().map(|i| i.data.len() as u64).sum::<u64>();
            }
            return Ok(bytes);
        }
        if !tenantmesh_isolation::stores::table_allowed(self.stores.as_ref(), &self.table_prefix, id, &table) {
            return Err(format!("table {table} is not one of the tenant's"));
        }
        let store = self.stores.store_for(id, &table).await.map_err(|e| e.to_string())?;
        crate::quota::Quotas::scan(&store, id).await.map_err(|e| e.to_string())
    }

    fn silo(&self, endpoint: &str) -> Result<DataAdminClient<PropagatedChannel>, String> {
        let mut silos = self.silos.lock().expect("silo clients lock");
        if let Some(c) = silos.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = client::channel(endpoint).map_err(|e| format!("silo endpoint {endpoint}: {e}"))?;
        let c = DataAdminClient::new(client::wrap(channel, Identity::Service(self.tokens.clone())))
            .max_decoding_message_size(tenantmesh_service::runtime::MAX_MESSAGE_BYTES);
        if silos.len() >= 1024 {
            silos.clear();
        }
        silos.insert(endpoint.to_owned(), c.clone());
        Ok(c)
    }
}
