//! An application service's request path: the example `orders` service
//! (built only on `tenantmesh-app`, as a team would) next to `tenantmesh
//! up`, against the same contract served by bare tonic, in the same run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::tax::{CONNECTIONS, STREAMS, med};
use super::{Ctx, closed_run, progress, unique};
use crate::client::{self, lazy, onboard, platform_admin};
use crate::procs::{self, Proc};
use crate::report::{Figure, ScenarioResult, Target};

/// The orders service's own identity, as `tenantmesh up` is told of it.
const ORDERS_SECRET: &str = "bench-orders-secret-0123456789abcdef";

/// Starts the orders service (release) against the mesh at `addrs`, with
/// its identity (metered, registered), on a free port.
fn start_orders(dir: &std::path::Path, addrs: &procs::MeshAddrs) -> Result<(Proc, SocketAddr), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let mut cmd = std::process::Command::new(procs::sibling("tenantmesh-orders")?);
    cmd.env("TENANTMESH_LISTEN_ADDR", addr.to_string())
        .env("TENANTMESH_DATA_DIR", dir)
        .env("TENANTMESH_AUTH_URL", client::url(addrs.auth))
        .env("TENANTMESH_REGISTRY_URL", client::url(addrs.registry))
        .env("TENANTMESH_DATA_URL", client::url(addrs.data))
        .env("TENANTMESH_METERING_URL", client::url(addrs.data))
        .env("TENANTMESH_SERVICE_CLIENT_ID", "orders")
        .env("TENANTMESH_SERVICE_CLIENT_SECRET", ORDERS_SECRET);
    // Ready once registered: its identity works (the same one meters its
    // calls), and its listener, bound before, accepts.
    let (proc, ()) = procs::spawn_until("orders", cmd, dir.with_extension("log"), Duration::from_secs(30), |line| {
        line.contains("registered in the service catalog").then_some(())
    })?;
    Ok((proc, addr))
}

pub async fn app_tax(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("app");
    let clients = HashMap::from([(
        "TENANTMESH_SERVICE_CLIENTS".to_owned(),
        format!("orders:{ORDERS_SECRET}:directory+metering_writer+catalog"),
    )]);
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &clients)?;
    let (orders, orders_addr) = start_orders(&dir.join("orders"), &addrs)?;
    let (baseline, baseline_addr) = procs::start_baseline(&dir.join("baseline"))?;
    let admin = platform_admin(addrs.auth).await?;
    let token = onboard(&addrs, &admin, &unique("app"), "standard").await?;
    client::seed_order(Some(lazy(addrs.data)), lazy(orders_addr), &token).await?;
    client::seed_order(None, lazy(baseline_addr), &token).await?;

    let (_, window, rounds) = ctx.window();
    let (mut base, mut app) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let call = client::get_order(&token);
        let b = closed_run(ctx, &client::url(baseline_addr), &baseline, CONNECTIONS, STREAMS, call.clone()).await?;
        let a = closed_run(ctx, &client::url(orders_addr), &orders, CONNECTIONS, STREAMS, call).await?;
        progress(format!(
            "  GetOrder round {}: baseline {:.0}/s p99 {:.2} ms ({:.1} us cpu), orders {:.0}/s p99 {:.2} ms ({:.1} us cpu), errors {:?} / {:?}",
            round + 1,
            b.summary.throughput,
            b.summary.p99_ms,
            b.server_cpu_us,
            a.summary.throughput,
            a.summary.p99_ms,
            a.server_cpu_us,
            b.summary.errors,
            a.summary.errors,
        ));
        base.push(b);
        app.push(a);
    }
    let mut r = ctx.result(
        "app_tax",
        "An application service's request path vs bare tonic",
        format!(
            "The example application service (`services/orders`, built only on `tenantmesh-app`: authentication, its \
             proto's policies, limits, fair queue, metering flushed to the metering service, JSON logs, a tenant-scoped \
             table on the embedded store) next to `tenantmesh up` (release), against the same `GetOrder` served by \
             bare tonic from memory (`crates/bench/src/baseline.rs`); closed loop, {CONNECTIONS} connections x \
             {STREAMS} streams, {rounds} alternating rounds of {}s, medians. Every call carries a standard-tier \
             tenant's token. Server CPU is the orders process's (its calls to the mesh are cached tenant lookups).",
            window.as_secs_f64()
        ),
    );
    let (bt, at) = (med(&base, |r| r.summary.throughput), med(&app, |r| r.summary.throughput));
    let (bp, ap) = (med(&base, |r| r.summary.p99_ms), med(&app, |r| r.summary.p99_ms));
    let (bc, ac) = (med(&base, |r| r.server_cpu_us), med(&app, |r| r.server_cpu_us));
    let errors: u64 = app.iter().chain(&base).map(|r| r.summary.errors.values().sum::<u64>()).sum();
    let mut thr = Figure::new("GetOrder throughput", "req/s", at).vs(bt).target(Target::RatioAtLeast(0.8));
    if errors > 0 {
        thr = thr.note(format!("{errors} failed calls"));
    }
    r.figures.push(thr);
    r.figures.push(
        Figure::new(format!("GetOrder p99 at {} in flight", CONNECTIONS * STREAMS), "ms", ap)
            .vs(bp)
            .target(Target::RatioAtMost(1.5)),
    );
    r.figures.push(Figure::new("GetOrder server CPU per call", "us", ac).vs(bc));
    r.details = json!({"baseline": base, "orders": app});
    orders.stop(Duration::from_secs(10))?;
    baseline.stop(Duration::from_secs(10))?;
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}
