//! Tenants' limits held across a service's replicas.
//!
//! A service on DynamoDB may run as several replicas behind one address;
//! each would otherwise grant every tenant its full rate. Each replica
//! instead takes a share of each tenant's limits, by leases in the
//! `<prefix>leases` table (see `tenantmesh_admission::leases`), keyed by
//! the service's name: the replicas of one service share, different
//! services do not. On the embedded store there is one process; a silo
//! tenant's instance serves one tenant behind the shared instance, which
//! already holds that tenant's limits.

use std::sync::Arc;

use tenantmesh_admission::leases::RateShares;
use tenantmesh_isolation::backend::{Backend, StorageConfig};
use tenantmesh_service::config::CommonConfig;

/// The table of the replicas' heartbeats and leases (`<prefix>leases`).
pub const LEASES_TABLE: &str = "leases";

/// The shares of `service`'s replicas when they must share (DynamoDB,
/// limits on, not a silo tenant's instance); `None` otherwise.
pub async fn rate_shares(
    storage: &StorageConfig,
    common: &CommonConfig,
    service: &str,
    silo_instance: bool,
) -> Result<Option<Arc<RateShares>>, Box<dyn std::error::Error + Send + Sync>> {
    if storage.backend != Backend::DynamoDb || silo_instance || !common.limits {
        return Ok(None);
    }
    let table = storage.open_table(common, LEASES_TABLE).await?;
    tracing::info!(
        table = %storage.table_name(LEASES_TABLE),
        interval_ms = common.lease_interval.as_millis() as u64,
        "tenants' limits are shared with the other replicas of {service}"
    );
    Ok(Some(RateShares::start(table, service, common.lease_interval)))
}
