//! Per-tenant metrics: requests, their latency, refusals by limit and
//! metered usage, each with `tenant.id`. Recorded only while metrics are exported (an OTLP
//! endpoint is set); otherwise each call is one relaxed load.
//!
//! Cardinality is capped: the first `TENANTMESH_METRICS_TENANT_CAP` tenants
//! (default 100) seen by a service get series of their own, later ones are
//! counted under `tenant.id = "_other"`, so a flood of tenant ids cannot
//! grow the metrics without bound.
//!
//! Each service a process hosts (see [`crate::Service`]) records with a
//! meter provider of its own, so its metrics are exported under its own
//! `service.name`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::service::Service;

static ENABLED: AtomicBool = AtomicBool::new(false);
static CAP: AtomicUsize = AtomicUsize::new(DEFAULT_TENANT_CAP);

/// Tenants with series of their own, by default.
pub const DEFAULT_TENANT_CAP: usize = 100;
/// The `tenant.id` of every tenant past the cap.
pub const OTHER_TENANTS: &str = "_other";

struct Instruments {
    meter: Meter,
    requests: Counter<u64>,
    latency: Histogram<f64>,
    refused: Counter<u64>,
    usage: Counter<u64>,
    tenants: RwLock<HashSet<Arc<str>>>,
}

impl Instruments {
    fn new(meter: Meter) -> Self {
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
            meter,
            tenants: RwLock::new(HashSet::new()),
        }
    }
}

/// Makes the meter provider of one service (its resource, its exporter).
pub(crate) type MakeProvider = Box<dyn Fn(&Service) -> Result<SdkMeterProvider, String> + Send + Sync>;

/// The instruments of the process and of each service it hosts, each
/// service's recorded by a meter provider of its own (its resource).
#[derive(Default)]
struct Registry {
    process: OnceLock<Arc<Instruments>>,
    services: RwLock<HashMap<Service, Arc<Instruments>>>,
    make: OnceLock<MakeProvider>,
    providers: Mutex<Vec<SdkMeterProvider>>,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

fn process() -> Arc<Instruments> {
    registry().process.get_or_init(|| Arc::new(Instruments::new(opentelemetry::global::meter("tenantmesh")))).clone()
}

/// The instruments of the service at work (see [`crate::Service`]), made on
/// first use; the process's outside any service, or when no provider can
/// be made (no `make` set, no tokio runtime to export from).
fn instruments() -> Arc<Instruments> {
    let Some(service) = Service::current() else { return process() };
    let r = registry();
    if let Some(i) = r.services.read().expect("instruments lock").get(&service) {
        return i.clone();
    }
    let Some(make) = r.make.get().filter(|_| tokio::runtime::Handle::try_current().is_ok()) else {
        return process();
    };
    let mut services = r.services.write().expect("instruments lock");
    if let Some(i) = services.get(&service) {
        return i.clone();
    }
    match make(&service) {
        Ok(provider) => {
            use opentelemetry::metrics::MeterProvider as _;
            let i = Arc::new(Instruments::new(provider.meter("tenantmesh")));
            r.providers.lock().expect("providers lock").push(provider);
            services.insert(service, i.clone());
            i
        }
        Err(e) => {
            tracing::warn!(service = %service, error = %e, "no metrics exporter for the service; its metrics go under the process");
            process()
        }
    }
}

/// The meter of the service at work, for instruments of its own.
pub fn meter() -> Meter {
    instruments().meter.clone()
}

/// Records each service's metrics with its own provider (`make`).
pub(crate) fn per_service(make: MakeProvider) {
    let _ = registry().make.set(make);
}

/// Flushes every service's meter provider.
pub(crate) fn flush_services() -> Result<(), String> {
    let providers = registry().providers.lock().expect("providers lock").clone();
    providers.iter().try_for_each(|p| p.force_flush().map_err(|e| e.to_string()))
}

/// Flushes and shuts down every service's meter provider.
pub(crate) fn shut_down_services() {
    let providers = std::mem::take(&mut *registry().providers.lock().expect("providers lock"));
    for p in providers {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
    registry().services.write().expect("instruments lock").clear();
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
        KeyValue::new("tenant.id", tenant_value(&i, tenant)),
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
    i.refused.add(1, &[KeyValue::new("tenant.id", tenant_value(&i, tenant)), KeyValue::new("limit", limit)]);
}

/// `value` of `meter` used by `tenant` (a metering flush's totals).
pub fn usage(tenant: &str, meter: &str, value: u64) {
    if !enabled() {
        return;
    }
    let i = instruments();
    i.usage
        .add(value, &[KeyValue::new("tenant.id", tenant_value(&i, tenant)), KeyValue::new("meter", meter.to_owned())]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_cap_share_one_series() {
        let i = instruments();
        CAP.store(2, Ordering::Relaxed);
        assert_eq!(tenant_value(&i, "a").as_str(), "a");
        assert_eq!(tenant_value(&i, "b").as_str(), "b");
        assert_eq!(tenant_value(&i, "c").as_str(), OTHER_TENANTS);
        assert_eq!(tenant_value(&i, "a").as_str(), "a", "a known tenant keeps its series");
        CAP.store(DEFAULT_TENANT_CAP, Ordering::Relaxed);
    }
}
