//! Onboarding latency: RegisterTenant until the platform announces the
//! tenant onboarded (ACTIVE), one tenant after another, with production
//! settings (argon2id at its default cost for the admin user).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::{EventKind, WatchEventsRequest};

use super::{Ctx, progress, unique};
use crate::client::{authed, lazy, platform_admin, register};
use crate::load::Stats;
use crate::procs;
use crate::report::{Figure, ScenarioResult, Target};

/// Onboards `n` tenants on `tier` in a row; latency of each.
async fn in_a_row(addrs: &procs::MeshAddrs, admin: &str, tier: &str, n: usize) -> Result<(Stats, Duration), String> {
    let mut onboarding = OnboardingClient::new(lazy(addrs.onboarding));
    let mut events = onboarding
        .watch_events(authed(WatchEventsRequest { tenant_id: String::new(), after_sequence: None }, admin))
        .await
        .map_err(|s| format!("watch events: {s:?}"))?
        .into_inner();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let tenant = unique(&format!("onb{i}"));
        let t0 = Instant::now();
        register(&mut onboarding, admin, &tenant, tier).await?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(60), events.message())
                .await
                .map_err(|_| format!("{tenant} not onboarded within 60 s"))?
                .map_err(|s| format!("event stream: {s:?}"))?
                .ok_or("event stream ended")?;
            let Some(e) = next.event else { continue };
            if e.tenant_id == tenant && e.kind == EventKind::TenantOnboarded as i32 {
                break;
            }
            if e.tenant_id == tenant && e.kind == EventKind::StepFailed as i32 {
                return Err(format!("onboarding {tenant}: {}", e.detail));
            }
        }
        latencies.push(t0.elapsed());
        if (i + 1) % 100 == 0 {
            progress(format!("  {tier}: {} tenants onboarded", i + 1));
        }
    }
    Ok((Stats::from_latencies(&latencies), started.elapsed()))
}

/// Waits (up to 30 s) until the catalog lists the application service `name`.
async fn registered(addrs: &procs::MeshAddrs, admin: &str, name: &str) -> Result<(), String> {
    use tenantmesh_proto::registry::v1::{ListServicesRequest, tenant_registry_client::TenantRegistryClient};
    let mut registry = TenantRegistryClient::new(lazy(addrs.registry));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = registry.list_services(authed(ListServicesRequest {}, admin)).await;
        if listed.is_ok_and(|r| r.get_ref().services.iter().any(|s| s.name == name)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{name} is not in the service catalog after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn onboarding(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("onboarding");
    // Production settings: argon2id at its default cost.
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let admin = platform_admin(addrs.auth).await?;
    let (pool_n, bridge_n) = ctx.pick((1000, 50), (10, 3));
    let (pool, pool_total) = in_a_row(&addrs, &admin, "standard", pool_n).await?;
    let (bridge, _) = in_a_row(&addrs, &admin, "premium", bridge_n).await?;
    mesh.stop(Duration::from_secs(15))?;

    // The same with one application service registered (the example, in
    // `tenantmesh up`): its provisioning step is in every onboarding.
    let with_app = HashMap::from([("TENANTMESH_NO_EXAMPLE".to_owned(), "false".to_owned())]);
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh-app"), &with_app)?;
    let admin = platform_admin(addrs.auth).await?;
    registered(&addrs, &admin, "orders").await?;
    let app_n = ctx.pick(200, 10);
    let (app, _) = in_a_row(&addrs, &admin, "standard", app_n).await?;
    mesh.stop(Duration::from_secs(15))?;
    progress(format!(
        "  pool p50 {:.1} ms p99 {:.1} ms; bridge p50 {:.1} ms; pool with an application service p50 {:.1} ms",
        pool.quantile_ms(0.5),
        pool.quantile_ms(0.99),
        bridge.quantile_ms(0.5),
        app.quantile_ms(0.5)
    ));
    let mut r = ctx.result(
        "onboarding",
        "Onboarding: RegisterTenant to ACTIVE",
        format!(
            "`tenantmesh up` (release, embedded store, default argon2id cost for the admin user). {pool_n} standard (pool) \
             tenants onboarded one after another, then {bridge_n} premium (bridge) ones: time from sending \
             RegisterTenant to the TENANT_ONBOARDED lifecycle event (WatchEvents), which follows activation. Then \
             {app_n} standard tenants on a mesh with one application service registered (the example `orders`, \
             in-process under `tenantmesh up`): its `provision_service` step is in each onboarding."
        ),
    );
    r.figures.push(Figure::new("pool tenant p50", "ms", pool.quantile_ms(0.5)).target(Target::AtMost(50.0)));
    r.figures.push(Figure::new("pool tenant p99", "ms", pool.quantile_ms(0.99)));
    r.figures.push(Figure::new(format!("{pool_n} pool tenants in a row"), "s", pool_total.as_secs_f64()));
    r.figures.push(Figure::new("bridge tenant p50", "ms", bridge.quantile_ms(0.5)));
    r.figures.push(Figure::new("bridge tenant p99", "ms", bridge.quantile_ms(0.99)));
    r.figures.push(Figure::new("pool tenant p50, one application service", "ms", app.quantile_ms(0.5)));
    r.figures.push(Figure::new(
        "pool tenant p50, one application service / none",
        "x",
        app.quantile_ms(0.5) / pool.quantile_ms(0.5).max(f64::EPSILON),
    ));
    r.details = json!({"pool": pool.summary(), "bridge": bridge.summary(), "pool_with_app": app.summary()});
    Ok(r)
}
