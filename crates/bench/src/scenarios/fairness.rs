//! Tiers in force: a noisy neighbour held to its quota while ten tenants
//! work, fair shares of a saturated service, an anonymous login flood, and
//! the limiter's own cost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tenantmesh_admission::limits::{KeyedLimiter, Limits};
use tenantmesh_proto::auth::v1::LoginRequest;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};

use super::{Ctx, progress, unique};
use crate::client::{self, Op, authed, lazy, onboard_on_tier, platform_admin, seed};
use crate::load::{self, CallFn, Method, OpenClient, Stats, frame};
use crate::procs::{self, MeshAddrs, Proc};
use crate::report::{Figure, ScenarioResult, Target};
use crate::scenarios::floods::{FloodKind, FloodSpec, Flooder};

/// Each steady tenant's limits in the noisy-neighbour runs.
const RATE: u32 = 200;
const BURST: u32 = 20;
/// Each steady tenant's open-loop rate: a quarter of its quota.
pub(crate) const STEADY: f64 = 50.0;
pub(crate) const TENANTS: usize = 10;

pub(crate) async fn set_limits(
    addrs: &MeshAddrs,
    admin: &str,
    tenant: &str,
    rate: u32,
    burst: u32,
    concurrency: u32,
) -> Result<(), String> {
    let limits =
        TenantLimits { requests_per_second: rate, burst, max_concurrency: concurrency, storage_quota_bytes: 1 << 40 };
    let req = SetTenantLimitsRequest { tenant_id: tenant.into(), limits: Some(limits) };
    TenantRegistryClient::new(lazy(addrs.registry))
        .set_tenant_limits(authed(req, admin))
        .await
        .map_err(|s| format!("limits of {tenant}: {s:?}"))?;
    Ok(())
}

/// A mesh with `n` tenants on `tier`s (cycled), each with an item to read
/// and the given limits; returns the tenants' tokens.
pub(crate) async fn tenants(
    addrs: &MeshAddrs,
    tiers: &[&str],
    n: usize,
    limits: (u32, u32, u32),
) -> Result<Vec<(String, String)>, String> {
    let admin = platform_admin(addrs.auth).await?;
    let mut out = Vec::new();
    for i in 0..n {
        let tenant = unique("nn");
        let token = onboard_on_tier(addrs, &admin, &tenant, tiers[i % tiers.len()]).await?;
        set_limits(addrs, &admin, &tenant, limits.0, limits.1, limits.2).await?;
        seed(lazy(addrs.data), &token).await?;
        out.push((tenant, token));
    }
    // The services' tenant caches (5 s TTL) pick the new limits up.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    Ok(out)
}

pub(crate) fn steady_clients(conns: &[load::Conn], tokens: &[(String, String)], rate: f64) -> Vec<OpenClient> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, (_, token))| OpenClient {
            channel: conns[i % conns.len()].clone(),
            rate_per_s: rate,
            call: Op::GetItem.call(token),
        })
        .collect()
}

fn refused(s: &Stats) -> u64 {
    s.errors.get("ResourceExhausted").copied().unwrap_or(0)
}

fn errors(s: &Stats) -> u64 {
    s.errors.values().sum::<u64>() + s.late_starts
}

/// One run: the steady tenants for `window`, with a flooder at `flood`
/// calls/s (open loop) or, with `flood = None`, none. Returns the steady
/// tenants' merged stats (the flooder's own steady client excluded) and
/// the flooder's (its steady and flood calls together).
/// How tenant 0 floods in a noisy-neighbour run.
#[derive(Clone, Copy)]
enum Flood {
    None,
    /// Open loop at this rate, on 4 connections of its own.
    Open(f64),
    /// A closed loop in a flooder process: connections x calls in flight.
    Closed {
        connections: usize,
        streams: usize,
    },
    /// A closed loop of 4 x 125 on the connections the others' calls use.
    Shared,
}

async fn noisy_run(
    addr: std::net::SocketAddr,
    tokens: &[(String, String)],
    flood: Flood,
    warmup: Duration,
    window: Duration,
) -> Result<(Stats, Stats, Option<f64>), String> {
    let url = client::url(addr);
    let conns = load::connect(&url, 4).await?;
    let mut clients = steady_clients(&conns, tokens, STEADY);
    let (mut process, mut task) = (None, None);
    match flood {
        Flood::None => {}
        Flood::Open(rate) => {
            // The flooder (tenant 0) on connections of its own.
            let own = load::connect(&url, 4).await?;
            for conn in own {
                clients.push(OpenClient {
                    channel: conn,
                    rate_per_s: rate / 4.0,
                    call: Op::GetItem.call(&tokens[0].1),
                });
            }
        }
        Flood::Closed { connections, streams } => {
            let (kind, token) = (FloodKind::GetItem, tokens[0].1.clone());
            process = Some(Flooder::start(&FloodSpec { kind, addr, token, connections, streams, warmup, window })?);
        }
        Flood::Shared => {
            let (shared, call) = (conns.clone(), Op::GetItem.call(&tokens[0].1));
            task = Some(tokio::spawn(async move { load::closed_loop(&shared, 125, warmup, window, call).await }));
        }
    }
    let stats = load::open_loop(clients, warmup, window, 20_000).await;
    let others = load::merged(&stats[1..tokens.len()]);
    // Tenant 0's calls: its steady ones and its flood's.
    let mut flooder = vec![stats[0].clone()];
    flooder.extend(stats[tokens.len()..].iter().cloned());
    let mut flooder_cores = None;
    if let Some(p) = process {
        let report = p.report().await?;
        flooder_cores = Some(report.cpu_cores);
        flooder.push(report.stats(window));
    }
    if let Some(t) = task {
        flooder.push(t.await.map_err(|e| e.to_string())?);
    }
    Ok((others, load::merged(&flooder), flooder_cores))
}

/// Ten tenants at a quarter of their quota each (open loop); then one of
/// them floods at ten times its quota; then as fast as a closed loop of 500
/// calls in flight goes; and the 10x flood again with the limits switched
/// off, as the control.
pub async fn noisy_neighbour(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let (warmup, window) = (
        ctx.pick(Duration::from_secs(2), Duration::from_millis(300)),
        ctx.pick(Duration::from_secs(15), Duration::from_secs(2)),
    );
    let mut r = ctx.result(
        "noisy_neighbour",
        "Noisy neighbour: ten tenants and one flooding",
        format!(
            "`tenantmesh up`; {TENANTS} pool tenants, each limited to {RATE} requests/s (burst {BURST}), each sending \
             GetItem at {STEADY}/s open loop for {}s; then tenant 0 adds a flood at 10x its quota (open loop, on \
             connections of its own); then tenant 0 floods with a closed loop (each call sent again as soon as it \
             is answered) from a flooder process of its own: 4 connections x 125 streams, then 100 connections x \
             5; then the closed loop of 4 x 125 on the very connections the others' calls use (from the measuring \
             process); then the 10x flood on a mesh with TENANTMESH_LIMITS=off, as the control. The others' \
             latency is from the intended send time. The flooder's admitted calls include its steady ones.",
            window.as_secs()
        ),
    );
    let mut details = serde_json::Map::new();
    let mut baseline_p99 = 0.0;
    for limits_on in [true, false] {
        let dir = ctx.dir(if limits_on { "noisy" } else { "noisy-off" });
        let env: HashMap<String, String> =
            if limits_on { HashMap::new() } else { [("TENANTMESH_LIMITS".to_owned(), "off".to_owned())].into() };
        let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &env)?;
        let tokens = tenants(&addrs, &["standard"], TENANTS, (RATE, BURST, 64)).await?;
        let runs: Vec<(&str, Flood)> = if limits_on {
            vec![
                ("no flood", Flood::None),
                ("flood at 10x quota", Flood::Open(10.0 * f64::from(RATE))),
                ("closed-loop flood", Flood::Closed { connections: 4, streams: 125 }),
                ("closed-loop flood on 100 connections", Flood::Closed { connections: 100, streams: 5 }),
                ("closed-loop flood on the others' connections", Flood::Shared),
            ]
        } else {
            vec![("limits off, flood at 10x quota", Flood::Open(10.0 * f64::from(RATE)))]
        };
        for (label, flood) in runs {
            let (cpu0, started) = (mesh.cpu_time(), std::time::Instant::now());
            let (others, flooder, flooder_cores) = noisy_run(addrs.data, &tokens, flood, warmup, window).await?;
            let mesh_cores = (mesh.cpu_time() - cpu0).as_secs_f64() / started.elapsed().as_secs_f64();
            // Server CPU per call over the whole run (warm-up included).
            let calls = (others.all_calls + flooder.all_calls).max(1) as f64;
            let cpu_us = (mesh.cpu_time() - cpu0).as_secs_f64() * 1e6 / calls;
            let offered = (flooder.ok + errors(&flooder)) as f64 / window.as_secs_f64();
            let admitted = flooder.ok as f64 / window.as_secs_f64();
            progress(format!(
                "  {label}: others p50 {:.2} ms p99 {:.2} ms, {} refused, {} other errors; flooder offered {:.0}/s, \
                 admitted {admitted:.0}/s, refused {}",
                others.quantile_ms(0.5),
                others.quantile_ms(0.99),
                refused(&others),
                errors(&others) - refused(&others),
                offered,
                refused(&flooder)
            ));
            let p99 = others.quantile_ms(0.99);
            if matches!(flood, Flood::None) {
                baseline_p99 = p99;
                r.figures.push(Figure::new("others' GetItem p99, no flood", "ms", p99));
            } else {
                if let Some(cores) = flooder_cores {
                    r.figures.push(super::floods::cpu_figure(label, mesh_cores, cores));
                }
                if limits_on && matches!(flood, Flood::Closed { connections: 4, .. }) {
                    r.figures.push(
                        Figure::new("server CPU per call, closed-loop flood (almost all refused)", "us", cpu_us).note(
                            "the mesh's CPU over the run divided by every call answered, the others' and the \
                             flooder's; compare `GetItem server CPU per call` of isolation_tax, a call served under \
                             load",
                        ),
                    );
                }
                let mut f = Figure::new(format!("others' GetItem p99, {label}"), "ms", p99).vs(baseline_p99);
                if limits_on {
                    // The bound for a closed loop is 2x (1.2x is
                    // what CockroachDB's admission control reaches).
                    f = f.target(Target::RatioAtMost(if matches!(flood, Flood::Open(_)) { 1.2 } else { 2.0 }));
                }
                r.figures.push(f);
                r.figures.push({
                    let f =
                        Figure::new(format!("others' refusals and errors, {label}"), "calls", errors(&others) as f64);
                    if limits_on { f.target(Target::AtMost(0.0)) } else { f }
                });
                if limits_on {
                    // The flooder's admitted rate: its quota plus one burst over the window.
                    let quota = f64::from(RATE) + f64::from(BURST) / window.as_secs_f64();
                    let f = Figure::new(format!("flooder admitted, {label}"), "calls/s", admitted)
                        .vs(quota)
                        .note(format!("quota {RATE}/s + burst {BURST} over the window; offered {offered:.0}/s"));
                    r.figures.push(f.target(Target::RatioBetween(0.95, 1.05)));
                }
            }
            details.insert(
                label.into(),
                json!({"others": others.summary(), "flooder": flooder.summary(), "flooder_offered_per_s": offered,
                    "mesh_cores": mesh_cores, "flooder_cores": flooder_cores}),
            );
        }
        mesh.stop(Duration::from_secs(15))?;
    }
    r.details = serde_json::Value::Object(details);
    Ok(r)
}

/// Jain's fairness index of `xs`: 1 when all equal, 1/n when one has all.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 { 1.0 } else { sum * sum / (xs.len() as f64 * squares) }
}

/// Six tenants on three tiers (weights 1, 2, 4), each within its quota but
/// together beyond the service's seats (`TENANTMESH_MAX_IN_FLIGHT=1`), each
/// a closed loop of 64 calls in flight: the seats each gets, divided by its
/// tier's weight, should be equal.
pub async fn saturation(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let (warmup, window) = (
        ctx.pick(Duration::from_secs(2), Duration::from_millis(300)),
        ctx.pick(Duration::from_secs(10), Duration::from_secs(2)),
    );
    let tiers = [("basic", 1.0), ("standard", 2.0), ("premium", 4.0)];
    let mut r = ctx.result(
        "saturation",
        "Saturation: fair shares by tier",
        format!(
            "`tenantmesh up` with TENANTMESH_MAX_IN_FLIGHT=1 (the data service runs one tenant request at a time, \
             the rest wait in its fair queue: seats, not this machine's CPU, are what runs out); 6 tenants, two per tier (basic, standard, premium: weights 1, 2, 4), \
             limits far above the load; each sends GetItem in a closed loop of 64 calls in flight for {}s. \
             Delivered share = calls served; fairness = Jain's index over calls served / tier weight.",
            window.as_secs()
        ),
    );
    let dir = ctx.dir("saturation");
    let env: HashMap<String, String> = [("TENANTMESH_MAX_IN_FLIGHT".to_owned(), "1".to_owned())].into();
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &env)?;
    let tier_names: Vec<&str> = tiers.iter().map(|t| t.0).collect();
    let tokens = tenants(&addrs, &tier_names, 6, (1_000_000, 1_000_000, 1_000)).await?;
    let url = client::url(addrs.data);
    let mut runs = Vec::new();
    for (_, token) in &tokens {
        let conns = load::connect(&url, 1).await?;
        let call = Op::GetItem.call(token);
        runs.push(tokio::spawn(async move { load::closed_loop(&conns, 64, warmup, window, call).await }));
    }
    let mut served = Vec::new();
    for run in runs {
        served.push(run.await.map_err(|e| e.to_string())?);
    }
    let per_weight: Vec<f64> = served.iter().enumerate().map(|(i, s)| s.ok as f64 / tiers[i % tiers.len()].1).collect();
    let mean = per_weight.iter().sum::<f64>() / per_weight.len() as f64;
    let index = jain(&per_weight);
    let worst = per_weight.iter().map(|x| (x / mean - 1.0).abs()).fold(0.0, f64::max);
    for (i, s) in served.iter().enumerate() {
        progress(format!(
            "  tenant {i} ({}): {:.0}/s served, {} refused, p99 {:.2} ms",
            tiers[i % tiers.len()].0,
            s.throughput(),
            refused(s),
            s.quantile_ms(0.99)
        ));
    }
    r.figures.push(Figure::new("Jain's fairness index (served / weight)", "", index).target(Target::AtLeast(0.95)));
    r.figures.push(
        Figure::new("largest deviation from the weighted share", "%", worst * 100.0).target(Target::AtMost(10.0)),
    );
    r.figures.push(Figure::new("total served", "calls/s", served.iter().map(Stats::throughput).sum()));
    r.details = json!({
        "tenants": served.iter().enumerate().map(|(i, s)| json!({"tier": tiers[i % tiers.len()].0, "stats": s.summary()})).collect::<Vec<_>>(),
    });
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}

pub(crate) fn login_flood_call() -> CallFn {
    let method = Method::new("/tenantmesh.auth.v1.Auth/Login", "");
    Arc::new(move |conn, seq| {
        let req = LoginRequest {
            tenant_id: format!("flood-{}", seq % 1000),
            email: format!("nobody-{seq}@example.com"),
            password: "not-the-password".into(),
        };
        let (method, body) = (method.clone(), frame(&req));
        Box::pin(async move { method.call(conn, body).await })
    })
}

/// Ten tenants at 50 GetItem/s each while 128 anonymous streams flood
/// Auth.Login with random emails (real argon2id cost): the tenants'
/// latency without and with the flood, in alternating rounds, and the
/// mesh's resident memory.
pub async fn login_flood(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let (warmup, window, rounds) = (
        ctx.pick(Duration::from_secs(2), Duration::from_millis(300)),
        ctx.pick(Duration::from_secs(5), Duration::from_secs(1)),
        ctx.pick(4, 1),
    );
    let mut r = ctx.result(
        "login_flood",
        "Anonymous login flood",
        format!(
            "`tenantmesh up` with the default argon2id cost (19 MiB, 2 passes); {TENANTS} tenants at {STEADY} \
             GetItem/s each (open loop), alone and then with 128 streams (4 connections x 32) of a flooder \
             process sending Auth.Login with random emails in a closed loop; {rounds} rounds of the two, {}s \
             windows. The p99s are the medians of the rounds' (a calm window's p99 alone moves by 2x between \
             windows on this machine: one window each was a coin toss). Resident memory of the mesh sampled \
             every 100 ms.",
            window.as_secs()
        ),
    );
    let dir = ctx.dir("login-flood");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let tokens = tenants(&addrs, &["standard"], TENANTS, (1_000, 1_000, 64)).await?;
    let url = client::url(addrs.data);
    let rss_before = mesh.rss();
    // By flood (false, true): each round's p99, the peak memory, the calls.
    let mut p99s: [Vec<f64>; 2] = Default::default();
    let mut peaks = [0u64; 2];
    let (mut logins, mut refused_at_once, mut errors) = (0u64, 0u64, 0u64);
    let mut details = Vec::new();
    for round in 0..rounds {
        for flood in [false, true] {
            let sampler = RssSampler::start(&mesh);
            let login = FloodSpec {
                kind: FloodKind::Login,
                addr: addrs.auth,
                token: String::new(),
                connections: 4,
                streams: 32,
                warmup,
                window,
            };
            let flooding = if flood { Some(Flooder::start(&login)?) } else { None };
            let conns = load::connect(&url, 4).await?;
            let stats =
                load::merged(&load::open_loop(steady_clients(&conns, &tokens, STEADY), warmup, window, 20_000).await);
            let answered = match flooding {
                Some(f) => Some(f.report().await?.stats(window)),
                None => None,
            };
            let peak = sampler.stop();
            let label = if flood { "login flood" } else { "no flood" };
            progress(format!(
                "  round {}, {label}: tenants p99 {:.2} ms, errors {:?}; logins answered {:?}; mesh RSS peak {:.0} MiB",
                round + 1,
                stats.quantile_ms(0.99),
                stats.errors,
                answered.as_ref().map(|l| (l.ok, l.errors.clone())),
                peak as f64 / (1 << 20) as f64
            ));
            p99s[usize::from(flood)].push(stats.quantile_ms(0.99));
            peaks[usize::from(flood)] = peaks[usize::from(flood)].max(peak);
            errors += stats.errors.values().sum::<u64>();
            if let Some(l) = &answered {
                logins += l.ok + l.errors.values().sum::<u64>();
                refused_at_once += l.errors.get("ResourceExhausted").copied().unwrap_or(0);
            }
            details.push(json!({"round": round + 1, "flood": flood, "tenants": stats.summary(),
                "logins": answered.map(|l| l.summary()), "rss_peak": peak}));
        }
    }
    let ratios: Vec<String> =
        p99s[0].iter().zip(&p99s[1]).map(|(calm, flooded)| format!("{:.2}x", flooded / calm)).collect();
    let calm = super::median(p99s[0].clone());
    r.figures
        .push(Figure::new("tenants' GetItem p99, no flood", "ms", calm).note(format!("median of {rounds} rounds")));
    r.figures.push(
        Figure::new("tenants' GetItem p99, login flood", "ms", super::median(p99s[1].clone()))
            .vs(calm)
            .target(Target::RatioAtMost(1.5))
            .note(format!("median of {rounds} rounds; each round against its own calm window: {}", ratios.join(", "))),
    );
    r.figures.push(Figure::new("tenants' errors, login flood", "calls", errors as f64).target(Target::AtMost(0.0)));
    for (flood, label) in [(0, "no flood"), (1, "login flood")] {
        r.figures.push(Figure::new(
            format!("mesh resident memory peak, {label}"),
            "MiB",
            peaks[flood] as f64 / (1 << 20) as f64,
        ));
    }
    let seconds = window.as_secs_f64() * rounds as f64;
    r.figures.push(
        Figure::new("logins answered during the flood", "calls/s", logins as f64 / seconds)
            .note(format!("refused at once: {refused_at_once}")),
    );
    r.details = json!({"rounds": details, "rss_before": rss_before});
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}

/// Samples a process's resident memory every 100 ms; keeps the peak.
pub(crate) struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub(crate) fn start(proc: &Proc) -> Self {
        let pid = proc.pid();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(procs::rss(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        Self { stop, thread }
    }

    pub(crate) fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// An entitlement check as a service makes it at a point of use, in this
/// process: the plan of the tenant's tier (from the tiers file in memory)
/// with the tenant's overrides (from its cached record) applied, then the
/// feature checked; with no override, and with two.
pub async fn entitlement_check(ctx: &Ctx) -> Result<ScenarioResult, String> {
    use tenantmesh_proto::registry::v1::EntitlementOverride;
    use tenantmesh_service::entitlements::Feature;
    let mut r = ctx.result(
        "entitlement_check",
        "Entitlements: cost of a check",
        "What a service does where a feature is used (a restore, binding an identity provider, creating a user): \
         the tenant's tier's plan from the tiers file in memory, the tenant's overrides from its cached record \
         applied, the feature checked. No network call. Timed in a loop in one thread. Then the check every Data \
         call passes for hard monthly limits (requests, write_units): whether the caller's tenant is at one, from \
         what the data service's last round of usage found."
            .into(),
    );
    let n = if ctx.quick { 200_000 } else { 5_000_000 };
    let tiers = tenantmesh_service::tiers::Tiers::default();
    let overrides = vec![
        EntitlementOverride { feature: "max_users".into(), granted: None, limit: Some(50), hard: None },
        EntitlementOverride { feature: "restore".into(), granted: Some(true), limit: None, hard: None },
    ];
    let time = |overrides: &[EntitlementOverride]| -> Result<f64, String> {
        let t0 = Instant::now();
        for i in 0..n {
            let tier = tiers.get(if i % 2 == 0 { "standard" } else { "premium" }).ok_or("no tier")?;
            let plan = tier.entitlements.with(std::hint::black_box(overrides));
            plan.check(Feature::Restore, &tier.name).map_err(|e| e.to_string())?;
            plan.check_users("acme", &tier.name, std::hint::black_box(10)).map_err(|e| e.to_string())?;
        }
        Ok(t0.elapsed().as_nanos() as f64 / n as f64)
    };
    let plain = time(&[])?;
    let overridden = time(&overrides)?;
    progress(format!("  {plain:.0} ns per check, {overridden:.0} ns with two overrides"));
    r.figures.push(Figure::new("check, the tier's plan", "ns", plain).target(Target::AtMost(1000.0)));
    r.figures.push(Figure::new("check, with two overrides", "ns", overridden).target(Target::AtMost(1000.0)));
    // The hard monthly limits' check, on every Data call: with no tenant
    // at a limit (one load), and with 1,000 tenants at one (a map lookup).
    use tenantmesh_data::monthly::Exhausted;
    use tenantmesh_service::entitlements::MeteredFeature;
    let exhausted = Exhausted::default();
    let path = "/tenantmesh.data.v1.Data/PutItem";
    let monthly = |exhausted: &Exhausted| -> Result<f64, String> {
        let t0 = Instant::now();
        for i in 0..n {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            exhausted.check(std::hint::black_box(tenant), std::hint::black_box(path)).map_err(|e| e.to_string())?;
        }
        Ok(t0.elapsed().as_nanos() as f64 / n as f64)
    };
    let none_at = monthly(&exhausted)?;
    exhausted.replace(
        (0..1000).map(|i| (format!("tenant-{i:04}"), vec![(MeteredFeature::WriteUnits, 1_000_000)])).collect(),
    );
    let some_at = monthly(&exhausted)?;
    progress(format!("  monthly limit: {none_at:.1} ns, {some_at:.0} ns with 1,000 tenants at their limit"));
    r.figures.push(Figure::new("hard monthly limit, no tenant at one", "ns", none_at).target(Target::AtMost(1000.0)));
    r.figures
        .push(Figure::new("hard monthly limit, 1,000 tenants at one", "ns", some_at).target(Target::AtMost(1000.0)));
    Ok(r)
}

/// The limiter's check, in this process: one tenant admitted over and over,
/// and 100,000 tenants in turn.
pub async fn limiter_cost(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let mut r = ctx.result(
        "limiter_cost",
        "Per-tenant limiter: cost of a check",
        "The rate and in-flight check every tenant request passes (`KeyedLimiter::admit`, release included), timed \
         in a loop in one thread: one tenant, then 100,000 tenants in turn (their buckets never full, so none is \
         evicted). Memory: the limiter's maps divided by the tenants they hold."
            .into(),
    );
    let n = if ctx.quick { 200_000 } else { 5_000_000 };
    let limiter = Arc::new(KeyedLimiter::new());
    let limits = Limits { rate_per_second: u32::MAX, burst: u32::MAX, max_in_flight: 1_000 };
    let t0 = Instant::now();
    for _ in 0..n {
        drop(limiter.admit("acme", 1, limits).map_err(|e| format!("{e:?}"))?);
    }
    let one = t0.elapsed().as_nanos() as f64 / n as f64;
    let ids: Vec<String> = (0..100_000).map(|i| format!("tenant-{i:06}")).collect();
    // A bucket that stays busy for a while: nobody is evicted mid-run.
    let busy = Limits { rate_per_second: 1, burst: 1_000_000, max_in_flight: 1_000 };
    let limiter = Arc::new(KeyedLimiter::new());
    let t0 = Instant::now();
    for i in 0..n {
        drop(limiter.admit(ids[i % ids.len()].as_str(), 1, busy).map_err(|e| format!("{e:?}"))?);
    }
    let many = t0.elapsed().as_nanos() as f64 / n as f64;
    let bytes = limiter.heap_bytes() as f64 / limiter.len() as f64;
    progress(format!("  one tenant {one:.0} ns, 100,000 tenants {many:.0} ns per check, {bytes:.0} bytes per tenant"));
    r.figures.push(Figure::new("check, one tenant", "ns", one).target(Target::AtMost(1000.0)));
    r.figures.push(Figure::new("check, 100,000 tenants in turn", "ns", many).target(Target::AtMost(1000.0)));
    r.figures.push(Figure::new("limiter memory per tenant", "bytes", bytes).target(Target::AtMost(64.0)));
    Ok(r)
}
