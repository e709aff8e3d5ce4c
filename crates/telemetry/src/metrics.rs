//! Per-tenant metrics: requests, their latency, refusals by limit and
//! metered usage, each with `tenant.id`. Recorded only while metrics are exported (an OTLP
//! endpoint is set); otherwise each call is one relaxed load.
//!
//! Cardinality is capped: the first `TENANTMESH_METRICS_TENANT_CAP` tenants
//! (default 100) seen by a process get series of their own, later ones are
//! counted under `tenant.id = "_other"`, so a flood of tenant ids cannot
//! grow the metrics without bound.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

static ENABLED: AtomicBool = AtomicBool::new(false);
static CAP: AtomicUsize = AtomicUsize::new(DEFAULT_TENANT_CAP);

/// Tenants with series of their own, by default.
pub const DEFAULT_TENANT_CAP: usize = 100;
/// The `tenant.id` of every tenant past the cap.
pub const OTHER_TENANTS: &str = "_other";

struct Instruments {
    requests: Counter<u64>,
    latency: Histogram<f64>,
    refused: Counter<u64>,
    usage: Counter<u64>,
    tenants: RwLock<HashSet<Arc<str>>>,
}

fn instruments() -> &'static Instruments {
    static I: OnceLock<Instruments> = OnceLock::new();
    I.get_or_init(|| {
        let meter = opentelemetry::global::meter("tenantmesh");
        Instruments {
            requests: meter
                .u64_counter("tenantmesh.requests")
                .with_description("Requests handled, by tenant and RPC")
                .build(),
            latency: meter
                .f64_histogram("tenantmesh.request.duration")
                .with_unit("s")
                .with_description("Time from authentication to the handler's reply, by tenant and RPC")
                .build(),
            refused: meter
                .u64_counter("tenantmesh.limits.refused")
                .with_description("Requests refused by a limit, by tenant and limit")
                .build(),
            usage: meter
                .u64_counter("tenantmesh.usage")
                .with_description("Metered usage, by tenant and meter (as flushed to the usage table)")
                .build(),
            tenants: RwLock::new(HashSet::new()),
        }
    })
}

/// Turns recording on (with `tenant_cap` tenants getting series of their
/// own); `init` does this when it installs a meter provider.
pub fn enable(tenant_cap: usize) {
    CAP.store(tenant_cap, Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether metrics are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The `tenant.id` value for `tenant`: itself while under the cap.
fn tenant_value(i: &Instruments, tenant: &str) -> opentelemetry::Value {
    if i.tenants.read().expect("tenants lock").contains(tenant) {
        return tenant.to_owned().into();
    }
    let mut known = i.tenants.write().expect("tenants lock");
    if known.contains(tenant) || known.len() < CAP.load(Ordering::Relaxed) {
        known.insert(tenant.into());
        tenant.to_owned().into()
    } else {
        OTHER_TENANTS.into()
    }
}

/// A request of `tenant` to the RPC at gRPC `path` handled in `seconds`:
/// attributed as the RPC conventions name it (`rpc.system` grpc,
/// `rpc.service` the full service name, `rpc.method` the method).
pub fn request(tenant: &str, path: &str, seconds: f64) {
    if !enabled() {
        return;
    }
    let i = instruments();
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let attrs = [
        KeyValue::new("tenant.id", tenant_value(i, tenant)),
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", method.to_owned()),
    ];
    i.requests.add(1, &attrs);
    i.latency.record(seconds, &attrs);
}

/// A request of `tenant` refused by `limit`.
pub fn refused(tenant: &str, limit: &'static str) {
    if !enabled() {
        return;
    }
    let i = instruments();
    i.refused.add(1, &[KeyValue::new("tenant.id", tenant_value(i, tenant)), KeyValue::new("limit", limit)]);
}

/// `value` of `meter` used by `tenant` (a metering flush's totals).
pub fn usage(tenant: &str, meter: &str, value: u64) {
    if !enabled() {
        return;
    }
    let i = instruments();
    i.usage
        .add(value, &[KeyValue::new("tenant.id", tenant_value(i, tenant)), KeyValue::new("meter", meter.to_owned())]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_cap_share_one_series() {
        let i = instruments();
        CAP.store(2, Ordering::Relaxed);
        assert_eq!(tenant_value(i, "a").as_str(), "a");
        assert_eq!(tenant_value(i, "b").as_str(), "b");
        assert_eq!(tenant_value(i, "c").as_str(), OTHER_TENANTS);
        assert_eq!(tenant_value(i, "a").as_str(), "a", "a known tenant keeps its series");
        CAP.store(DEFAULT_TENANT_CAP, Ordering::Relaxed);
    }
}
