//! Upkeep of a service's tables, as the data service keeps its own: every
//! `TENANTMESH_STORAGE_SAMPLE_SECS` (default 3600, aligned to the clock),
//! for every tenant, the bytes it stores in each declared table where its
//! placement keeps them (items and change history) are recorded as the
//! usage `<service>.storage_byte_hours` (bytes x hours of the interval,
//! rounded up; the pricing file prices it like any meter), and its change
//! history older
//! than its tier's `history_days` is trimmed.
//!
//! Replicas sample alike: each interval's event of a tenant has the same
//! id on every replica, and the metering service counts it once. Tenants
//! come from the registry, asked with the service's identity; without one
//! the service says at start that its storage is neither metered nor
//! trimmed.

use std::time::Duration;

use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::metering::v1::{RecordUsageRequest, UsageEvent};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{Tenant, TenantStatus};
use tenantmesh_tenant_context::client::PropagatedChannel;

use crate::history;
use crate::quota::Quotas;
use crate::tables::{Tables, model_of};

use tenantmesh_metering::schema::STORAGE_BYTE_HOURS;

/// Most events in one RecordUsage call.
const MAX_EVENTS: usize = 500;

pub(crate) struct Upkeep {
    pub(crate) tables: Tables,
    pub(crate) registry: TenantRegistryClient<PropagatedChannel>,
    pub(crate) metering: MeteringClient<PropagatedChannel>,
    pub(crate) interval: Duration,
    /// An instance of one silo tenant measures that tenant alone.
    pub(crate) silo_tenant: Option<String>,
    /// The shared instance's silo instances: a tenant that has one is
    /// measured (and trimmed) there, not here (on DynamoDB both reach its
    /// one table).
    pub(crate) instances: Option<crate::silo::Instances>,
}

impl Upkeep {
    /// Samples at every interval boundary, for as long as the service runs.
    pub(crate) fn start(self) -> tokio::task::JoinHandle<()> {
        let every = self.interval.as_secs().max(1) as i64;
        tenantmesh_telemetry::spawn(async move {
            loop {
                let now_ms = tenantmesh_service::clock::now_ms();
                let next = (now_ms / 1000 / every + 1) * every;
                tokio::time::sleep(Duration::from_millis((next * 1000 - now_ms).max(0) as u64)).await;
                match self.sample(next - every, every).await {
                    Ok(n) => tracing::debug!(tenants = n, "stored bytes sampled, change history trimmed"),
                    Err(e) => tracing::warn!(error = %e, "stored bytes not sampled for this interval"),
                }
            }
        })
    }

    /// Measures, records and trims every tenant for the interval of `secs`
    /// starting at `start`; how many tenants were measured. One tenant
    /// whose store fails stops no other.
    pub(crate) async fn sample(&self, start: i64, secs: i64) -> Result<usize, String> {
        let tenants = tenantmesh_tenant_context::directory::all_tenants(&self.registry)
            .await
            .map_err(|s| format!("listing tenants: {}", s.message()))?;
        let mut events = Vec::new();
        for tenant in &tenants {
            // A silo instance measures its tenant alone; the shared instance
            // every tenant but those an instance of their own measures.
            if tenant.status() == TenantStatus::Deleted
                || tenant.tenant_id == tenantmesh_tenant_context::PLATFORM_TENANT
                || self.silo_tenant.as_ref().is_some_and(|t| *t != tenant.tenant_id)
                || self.instances.as_ref().is_some_and(|i| i.has(&tenant.tenant_id))
            {
                continue;
            }
            match self.keep(tenant).await {
                Ok(bytes) => events.push(UsageEvent {
                    // The shared instance's and a silo instance's are
                    // different events (each measures its own stores).
                    id: match &self.silo_tenant {
                        None => format!("{}:storage:{}:{start}", self.tables.service(), tenant.tenant_id),
                        Some(_) => format!("{}@:storage:{}:{start}", self.tables.service(), tenant.tenant_id),
                    },
                    tenant_id: tenant.tenant_id.clone(),
                    meter: format!("{}.{STORAGE_BYTE_HOURS}", self.tables.service()),
                    value: (u128::from(bytes) * secs as u128).div_ceil(3600).min(1_000_000_000_000) as i64,
                    time: start,
                    ..Default::default()
                }),
                Err(e) => tracing::warn!(target_tenant = %tenant.tenant_id, error = %e, "stored bytes not measured"),
            }
        }
        let measured = events.len();
        for chunk in events.chunks(MAX_EVENTS) {
            let request = RecordUsageRequest { events: chunk.to_vec() };
            self.metering
                .clone()
                .record_usage(request)
                .await
                .map_err(|s| format!("RecordUsage: {:?}: {}", s.code(), s.message()))?;
        }
        Ok(measured)
    }

    /// `tenant`'s stored bytes in every table (trimming its history first).
    async fn keep(&self, tenant: &Tenant) -> Result<u64, String> {
        let id = tenant.tenant_id.as_str();
        let tier = self.tables.tiers().get(&tenant.tier).ok_or_else(|| format!("tier {} is unknown", tenant.tier))?;
        let before_us = history::now_us() - tier.history_us();
        let model = model_of(tenant.placement.as_ref());
        let mut bytes = 0;
        for (_, table) in self.tables.declared() {
            let physical = table.at(self.tables.prefix(), id, model);
            let store = match table.stores().store_for(id, &physical).await {
                Ok(store) => store,
                // Not provisioned here (yet, or any more): nothing stored.
                Err(tenantmesh_isolation::PolicyError::NoSuchTable(_)) => continue,
                Err(e) => return Err(e.to_string()),
            };
            let trimmed = history::trim(store.as_ref(), id, before_us).await.map_err(|e| e.to_string())?;
            if trimmed > 0 {
                table.changed(id);
            }
            bytes += Quotas::scan(&store, id).await.map_err(|e| e.to_string())?.total();
        }
        Ok(bytes)
    }
}
