//! The cost of one hop: a silo tenant's GetItem sent to the shared data
//! service (which forwards it, with the caller's token and trace, to the
//! tenant's instance) against the same call sent straight to the instance.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tenantmesh_proto::registry::v1::GetTenantRequest;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;

use super::{Ctx, closed_run, median, progress, unique};
use crate::client::{self, Op, authed, lazy, onboard, platform_admin, seed};
use crate::load::{self, OpenClient};
use crate::procs;
use crate::report::{Figure, ScenarioResult};

pub async fn silo_hop(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("hop");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let admin = platform_admin(addrs.auth).await?;
    let tenant = unique("silo");
    let token = onboard(&addrs, &admin, &tenant, "enterprise").await?;
    let got = TenantRegistryClient::new(lazy(addrs.registry))
        .get_tenant(authed(GetTenantRequest { tenant_id: tenant.clone() }, &admin))
        .await
        .map_err(|s| format!("get tenant: {s:?}"))?;
    let direct = got.into_inner().tenant.and_then(|t| t.placement).map(|p| p.endpoint).unwrap_or_default();
    if direct.is_empty() {
        return Err("the silo tenant has no endpoint".into());
    }
    seed(lazy(addrs.data), &token).await?;
    let shared = client::url(addrs.data);
    let (_, window, rounds) = ctx.window();
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        d.push(closed_run(ctx, &direct, &mesh, 8, 8, Op::GetItem.call(&token)).await?);
        f.push(closed_run(ctx, &shared, &mesh, 8, 8, Op::GetItem.call(&token)).await?);
    }
    // Latency of one call at light load, each path alone.
    let light = |url: String| {
        let token = token.clone();
        async move {
            let channel = load::connect(&url, 1).await?.remove(0);
            let client = OpenClient { channel, rate_per_s: 200.0, call: Op::GetItem.call(&token) };
            let d = ctx.pick(Duration::from_secs(10), Duration::from_secs(1));
            Ok::<_, String>(load::merged(&load::open_loop(vec![client], Duration::from_millis(500), d, 1000).await))
        }
    };
    let (ld, lf) = (light(direct.clone()).await?, light(shared.clone()).await?);
    let thr = |runs: &[super::Run]| median(runs.iter().map(|r| r.summary.throughput).collect());
    let cpu = |runs: &[super::Run]| median(runs.iter().map(|r| r.server_cpu_us).collect());
    progress(format!(
        "  silo GetItem: direct {:.0}/s, forwarded {:.0}/s; p50 at 200/s direct {:.3} ms, forwarded {:.3} ms",
        thr(&d),
        thr(&f),
        ld.quantile_ms(0.5),
        lf.quantile_ms(0.5)
    ));
    let mut r = ctx.result(
        "silo_hop",
        "One hop: a silo tenant's call forwarded vs sent to its instance",
        format!(
            "`tenantmesh up` with an enterprise (silo) tenant: GetItem straight to its instance vs through the shared \
             data service, which verifies the call and forwards it with the caller's token and trace. Throughput: closed \
             loop, 8 connections x 8 streams, {rounds} rounds of {}s, medians; server CPU is the whole mesh process \
             (both instances run in it). Latency: open loop, 200 calls/s on one connection.",
            window.as_secs_f64()
        ),
    );
    r.figures.push(Figure::new("forwarded GetItem throughput", "req/s", thr(&f)).vs(thr(&d)));
    r.figures.push(Figure::new("mesh CPU per forwarded GetItem", "us", cpu(&f)).vs(cpu(&d)));
    r.figures.push(Figure::new("forwarded GetItem p50 at 200/s", "ms", lf.quantile_ms(0.5)).vs(ld.quantile_ms(0.5)));
    r.figures.push(Figure::new("forwarded GetItem p99 at 200/s", "ms", lf.quantile_ms(0.99)).vs(ld.quantile_ms(0.99)));
    r.details = json!({"direct": d, "forwarded": f, "light_direct": ld.summary(), "light_forwarded": lf.summary()});
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}
