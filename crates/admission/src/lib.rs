//! Admission: whether a tenant's request runs now, waits, or is refused.
//!
//! - [`limits`]: each tenant's rate and requests in flight (GCRA, keyed),
//!   the refusal a caller sees (RESOURCE_EXHAUSTED with QuotaFailure and
//!   RetryInfo), and a throttle for refusal logs.
//! - [`fairq`]: the service's seats, shared fairly by tier weight when they
//!   run out (shuffle-sharded queues, as Kubernetes API Priority and
//!   Fairness does).
//! - [`leases`]: the shares of each tenant's limits that the replicas of a
//!   service hold, renewed through a shared table.
//!
//! The tenant-context server layer admits every authenticated call with
//! them; the settings come from `tenantmesh_service::config`
//! (`TENANTMESH_LIMITS`, `TENANTMESH_MAX_IN_FLIGHT`,
//! `TENANTMESH_QUEUE_WAIT_MS`, `TENANTMESH_LEASE_INTERVAL_MS`).

pub mod fairq;
pub mod leases;
pub mod limits;
