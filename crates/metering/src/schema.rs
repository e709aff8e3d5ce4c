//! How usage is kept in its table: the meters' names, the partition of a
//! tenant's usage and the item of a flushed hour.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The built-in meters, in slot order after the per-RPC request counters.
pub const READ_UNITS: &str = "read_units";
pub const WRITE_UNITS: &str = "write_units";
pub const BYTES_RETURNED: &str = "bytes_returned";
pub const COMPUTE_US: &str = "compute_us";
pub const REQUESTS: &str = "requests";
/// Stored item bytes × hours, from periodic samples ([`file_sample`]).
pub const STORAGE_BYTE_HOURS: &str = "storage_byte_hours";
/// Calls refused by a limit before they ran, by the limit (dimension
/// [`REFUSAL_DIMENSION`]).
pub const REFUSED: &str = "refused";
/// Requests by how long they took from admission to the handler's answer:
/// a count per bucket (dimension [`LATENCY_DIMENSION`], the bucket's upper
/// bound in microseconds, [`LATENCY_BOUNDS_US`]), from which a period's
/// percentiles are read. Not priced.
pub const LATENCY: &str = "latency";
/// Every built-in meter (reserved: applications cannot record them).
pub const BUILT_IN: &[&str] =
    &[REQUESTS, READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US, STORAGE_BYTE_HOURS, REFUSED, LATENCY];
/// The meters counted per call, each a total over a period (the
/// `latency` buckets aside): what an operator's view shows per tenant.
pub const CALL_METERS: &[&str] = &[REQUESTS, READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US, REFUSED];
/// The meters counted per request (the others come from samples).
pub(crate) const COUNTED: &[&str] = &[REQUESTS, READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US, REFUSED, LATENCY];
pub(crate) const VALUE_METERS: &[&str] = &[READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US];

/// The dimension of `requests` that names the RPC.
pub const RPC_DIMENSION: &str = "rpc";
/// The dimension of `latency` that names the bucket: its upper bound in
/// microseconds, or `inf`.
pub const LATENCY_DIMENSION: &str = "le_us";
/// The upper bounds of the `latency` buckets, in microseconds (the last
/// takes the rest).
pub const LATENCY_BOUNDS_US: &[u64] =
    &[250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, u64::MAX];
/// The dimension of `refused` that names the limit.
pub const REFUSAL_DIMENSION: &str = "limit";
/// The limits a call can be refused by, as `refused` names them (the
/// admission limits' names).
pub const REFUSAL_LIMITS: &[&str] = &["requests_per_second", "max_concurrency", "capacity", "storage_quota_bytes"];

/// Minute and hour in seconds.
pub(crate) const MINUTE: i64 = 60;
pub(crate) const HOUR: i64 = 3600;

/// The partition of a tenant's usage.
pub fn usage_pk(tenant: &str) -> String {
    format!("usage#{tenant}")
}

/// A flushed hour: values by `"<minute of the hour>|<meter>[|rpc=<name>]"`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct HourItem {
    /// The last flush applied.
    pub(crate) seq: u64,
    pub(crate) values: BTreeMap<String, i64>,
}
