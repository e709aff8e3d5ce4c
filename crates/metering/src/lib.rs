//! Metering: what each tenant used, exactly once.
//!
//! - [`meters`]: per-tenant counters of requests, units, bytes and handler
//!   time (fed by the tenant-context metering layer from what handlers
//!   report), flushed once a minute under idempotent keys so that a retry
//!   never counts twice.
//! - [`usage`]: application events and storage samples, reading usage by
//!   window and expiring it; [`schema`]: how it is all kept.
//! - [`pricing`]: unit prices, dedicated resources per hour and tier
//!   prices (`pricing.toml`, or `TENANTMESH_PRICING_FILE`), and the cost and
//!   margin of a tenant's usage.

pub mod latency;
pub mod meters;
pub mod pricing;
pub mod schema;
pub mod usage;
