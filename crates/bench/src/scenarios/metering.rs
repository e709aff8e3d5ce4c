//! What metering costs a request: `Meters::record` (the per-tenant atomic
//! counters every data call adds to), in process, for a tenant already
//! counted, on one thread and on two threads counting the same tenant at
//! once (the counters' cache lines bouncing between cores), among 1,000
//! tenants; and one flush of those tenants to the embedded store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tenantmesh_metering::meters::{Meters, Usage};

use super::{Ctx, median, progress};
use crate::report::{Figure, ScenarioResult, Target};

const RPCS: &[&str] = &["PutItem", "GetItem", "DeleteItem", "QueryItems"];
const TENANTS: usize = 1000;

/// Nanoseconds per `record` when `threads` threads each make `n` calls
/// for `tenant` at once.
fn per_call(meters: &Arc<Meters>, tenant: &Arc<str>, threads: usize, n: usize) -> f64 {
    let usage = Usage::read([1200], 1300);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for i in 0..n {
                    meters.record(tenant, i % RPCS.len(), usage, Duration::from_micros(12));
                }
            });
        }
    });
    t0.elapsed().as_nanos() as f64 / n as f64
}

pub async fn metering_cost(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.work.join("metering");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.join("usage.redb")).map_err(|e| e.to_string())?;
    let meters = Arc::new(Meters::new(table, RPCS, Duration::from_secs(3600)));
    let tenants: Vec<Arc<str>> = (0..TENANTS).map(|i| Arc::from(format!("tenant-{i:04}"))).collect();
    for t in &tenants {
        meters.record(t, 0, Usage::default(), Duration::ZERO);
    }
    let (rounds, n) = ctx.pick((7, 2_000_000), (3, 100_000));
    let one: Vec<f64> = (0..rounds).map(|r| per_call(&meters, &tenants[r % TENANTS], 1, n)).collect();
    let two: Vec<f64> = (0..rounds).map(|r| per_call(&meters, &tenants[r % TENANTS], 2, n)).collect();
    let (one, two) = (median(one), median(two));
    let t0 = Instant::now();
    meters.flush_at(tenantmesh_service::clock::now_secs()).await.map_err(|e| e.to_string())?;
    let flush = t0.elapsed();
    progress(format!(
        "  record: {one:.0} ns alone, {two:.0} ns with two threads; flush of {TENANTS} tenants {flush:?}"
    ));
    let mut r = ctx.result(
        "metering_cost",
        "Metering on the hot path",
        format!(
            "In process: `Meters::record` (a request's count, read and write units, bytes and handler time added to \
             its tenant's atomic counters under a shared lock) for a tenant already counted, among {TENANTS} tenants, \
             on one thread and on two threads counting the same tenant at once (the worst case for the counters' \
             cache lines), median of {rounds} rounds of {n} calls; then one flush of the {TENANTS} tenants' counts \
             to the embedded store (redb, fsync)."
        ),
    );
    r.figures.push(Figure::new("metering per request, one thread", "us", one / 1000.0).target(Target::AtMost(1.0)));
    r.figures.push(
        Figure::new("metering per request, two threads, same tenant", "us", two / 1000.0).target(Target::AtMost(1.0)),
    );
    r.figures.push(Figure::new(format!("flush of {TENANTS} tenants"), "ms", flush.as_secs_f64() * 1000.0));
    r.details = json!({"one_thread_ns": one, "two_threads_ns": two, "flush_ms": flush.as_secs_f64() * 1000.0, "tenants": TENANTS});
    Ok(r)
}
