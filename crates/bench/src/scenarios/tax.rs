//! The isolation tax: the whole request path of `tenantmesh up` (token
//! check, tenant lookup, role table, session-policy enforcement, embedded
//! store, telemetry as configured by default) against the bare tonic
//! baseline, at high load (closed loop), at light load (open loop), and
//! cross-checked with h2load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::{Ctx, Run, closed_run, median, progress, unique};
use crate::client::{self, Op, lazy, onboard, platform_admin, seed};
use crate::load::{self, OpenClient};
use crate::procs::{self, MeshAddrs, Proc};
use crate::report::{Figure, ScenarioResult, Target};

/// Connections x streams of the throughput runs: 500 calls in flight, as
/// in the h2load measurement of issue 9.
pub const CONNECTIONS: usize = 50;
pub const STREAMS: usize = 10;

/// A mesh with one seeded standard-tier tenant, and a seeded baseline.
pub struct Setup {
    pub mesh: Proc,
    pub addrs: MeshAddrs,
    pub baseline: Proc,
    pub baseline_addr: SocketAddr,
    pub token: String,
}

impl Setup {
    pub async fn start(dir: &Path) -> Result<Setup, String> {
        let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
        let (baseline, baseline_addr) = procs::start_baseline(&dir.join("baseline"))?;
        let admin = platform_admin(addrs.auth).await?;
        let token = onboard(&addrs, &admin, &unique("tax"), "standard").await?;
        seed(lazy(addrs.data), &token).await?;
        // The baseline gets the very same requests, token included (it
        // ignores it): the same bytes on the wire, the same HPACK work.
        seed(lazy(baseline_addr), &token).await?;
        Ok(Setup { mesh, addrs, baseline, baseline_addr, token })
    }

    pub fn stop(self) -> Result<(), String> {
        self.baseline.stop(Duration::from_secs(10))?;
        self.mesh.stop(Duration::from_secs(15))
    }
}

/// Rounds of baseline then mesh, alternating (so drift hits both alike).
async fn compare(ctx: &Ctx, s: &Setup, op: Op) -> Result<(Vec<Run>, Vec<Run>), String> {
    let (_, _, rounds) = ctx.window();
    let (mut base, mut mesh) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let b = closed_run(ctx, &client::url(s.baseline_addr), &s.baseline, CONNECTIONS, STREAMS, op.call(&s.token))
            .await?;
        let m = closed_run(ctx, &client::url(s.addrs.data), &s.mesh, CONNECTIONS, STREAMS, op.call(&s.token)).await?;
        progress(format!(
            "  {} round {}: baseline {:.0}/s p99 {:.2} ms ({:.1} us cpu), mesh {:.0}/s p99 {:.2} ms ({:.1} us cpu), errors {:?} / {:?}",
            op.name(),
            round + 1,
            b.summary.throughput,
            b.summary.p99_ms,
            b.server_cpu_us,
            m.summary.throughput,
            m.summary.p99_ms,
            m.server_cpu_us,
            b.summary.errors,
            m.summary.errors,
        ));
        base.push(b);
        mesh.push(m);
    }
    Ok((base, mesh))
}

/// The median of `f` over `runs`.
pub(super) fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

pub async fn isolation_tax(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let s = Setup::start(&ctx.dir("tax")).await?;
    let (_, window, rounds) = ctx.window();
    let mut r = ctx.result(
        "isolation_tax",
        "Isolation tax: the whole request path vs bare tonic",
        format!(
            "`tenantmesh up` (release, embedded store, default settings: JSON logs at info, no span exporter) against the bare tonic \
             baseline (`crates/bench/src/baseline.rs`), closed loop, {CONNECTIONS} connections x {STREAMS} streams, \
             {rounds} alternating rounds of {}s, medians. Every call carries a standard-tier tenant's access token \
             (the baseline receives the same requests and ignores it). \
             Server CPU is user+system time of the server process per call. PutItem: both sides commit each \
             acknowledged write to disk (redb, fsync).",
            window.as_secs_f64()
        ),
    );
    let mut details = serde_json::Map::new();
    for op in [Op::GetItem, Op::PutItem, Op::QueryItems] {
        let (base, mesh) = compare(ctx, &s, op).await?;
        let (bt, mt) = (med(&base, |r| r.summary.throughput), med(&mesh, |r| r.summary.throughput));
        let (bp, mp) = (med(&base, |r| r.summary.p99_ms), med(&mesh, |r| r.summary.p99_ms));
        let (bc, mc) = (med(&base, |r| r.server_cpu_us), med(&mesh, |r| r.server_cpu_us));
        let errors: u64 = mesh.iter().chain(&base).map(|r| r.summary.errors.values().sum::<u64>()).sum();
        let mut thr = Figure::new(format!("{} throughput", op.name()), "req/s", mt).vs(bt);
        let mut p99 = Figure::new(format!("{} p99 at {} in flight", op.name(), CONNECTIONS * STREAMS), "ms", mp).vs(bp);
        match op {
            Op::GetItem | Op::PutItem => {
                thr = thr.target(Target::RatioAtLeast(0.8));
            }
            Op::QueryItems => thr = thr.note(format!("page of {} items", client::QUERY_ITEMS)),
        }
        if op == Op::GetItem {
            p99 = p99.target(Target::RatioAtMost(1.5));
        }
        if errors > 0 {
            thr = thr.note(format!("{errors} failed calls"));
        }
        r.figures.push(thr);
        r.figures.push(p99);
        r.figures.push(Figure::new(format!("{} server CPU per call", op.name()), "us", mc).vs(bc));
        if op == Op::GetItem {
            r.figures.push(
                Figure::new("tenant path overhead per call (server CPU, GetItem)", "us", mc - bc)
                    .note("mesh CPU per call minus baseline CPU per call"),
            );
        }
        details.insert(op.name().into(), json!({"baseline": base, "mesh": mesh}));
    }
    r.details = serde_json::Value::Object(details);
    s.stop()?;
    Ok(r)
}

/// The variable naming an earlier build's `tenantmesh` binary, for
/// [`before_after`].
pub const BEFORE_VAR: &str = "TENANTMESH_BENCH_BEFORE";

/// An earlier build by its commit (the repository its binary was built
/// in), else by its file name.
fn describe_build(binary: &Path) -> String {
    let repo = binary.ancestors().find(|d| d.join("Cargo.toml").exists());
    let commit = repo.and_then(|r| {
        let out = std::process::Command::new("git").arg("-C").arg(r).args(["rev-parse", "--short=12", "HEAD"]).output();
        out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    });
    match commit {
        Some(c) => format!("commit `{c}`"),
        None => binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

/// The isolation tax of this build against an earlier one's, in one
/// sitting: both meshes and the bare tonic baseline run at once, and each
/// round measures the three in turn (so drift hits them alike). Skipped
/// unless [`BEFORE_VAR`] names the earlier build's `tenantmesh`.
pub async fn before_after(ctx: &Ctx) -> Result<Option<ScenarioResult>, String> {
    let Some(before_bin) = std::env::var_os(BEFORE_VAR).map(PathBuf::from) else {
        progress(format!("{BEFORE_VAR} names no earlier build; the before/after comparison is skipped"));
        return Ok(None);
    };
    let dir = ctx.dir("before-after");
    let (before, before_addrs) = procs::start_mesh_of(&before_bin, &dir.join("before"), &HashMap::new())?;
    let s = Setup::start(&dir).await?;
    let admin = platform_admin(before_addrs.auth).await?;
    let before_token = onboard(&before_addrs, &admin, &unique("tax"), "standard").await?;
    seed(lazy(before_addrs.data), &before_token).await?;
    let (_, window, rounds) = ctx.window();
    // More rounds than the tax alone: two builds differ by less than the drift.
    let rounds = ctx.pick(7, rounds);
    let mut r = ctx.result(
        "tax_before_after",
        "Isolation tax, this build against the one before it",
        format!(
            "The isolation tax load (closed loop, {CONNECTIONS} connections x {STREAMS} streams, {rounds} rounds of {}s, \
             medians) on `tenantmesh up` of this build and of an earlier one ({}), both running, with the \
             bare tonic baseline, measured in turn in each round (the two builds' order swapped every round): the request \
             path's cost of the change, free of the drift between runs.",
            window.as_secs_f64(),
            describe_build(&before_bin)
        ),
    );
    let mut details = serde_json::Map::new();
    for op in [Op::GetItem, Op::PutItem, Op::QueryItems] {
        let (mut base, mut old, mut new) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let b =
                closed_run(ctx, &client::url(s.baseline_addr), &s.baseline, CONNECTIONS, STREAMS, op.call(&s.token))
                    .await?;
            let (old_url, new_url) = (client::url(before_addrs.data), client::url(s.addrs.data));
            let old_run = || closed_run(ctx, &old_url, &before, CONNECTIONS, STREAMS, op.call(&before_token));
            let new_run = || closed_run(ctx, &new_url, &s.mesh, CONNECTIONS, STREAMS, op.call(&s.token));
            let (o, n) = if round % 2 == 0 {
                let o = old_run().await?;
                (o, new_run().await?)
            } else {
                let n = new_run().await?;
                (old_run().await?, n)
            };
            progress(format!(
                "  {} round {}: baseline {:.0}/s, before {:.0}/s ({:.1} us cpu), after {:.0}/s ({:.1} us cpu)",
                op.name(),
                round + 1,
                b.summary.throughput,
                o.summary.throughput,
                o.server_cpu_us,
                n.summary.throughput,
                n.server_cpu_us,
            ));
            base.push(b);
            old.push(o);
            new.push(n);
        }
        let thr = |runs: &[Run]| med(runs, |r| r.summary.throughput);
        let cpu = |runs: &[Run]| med(runs, |r| r.server_cpu_us);
        // The ratio is the median of each round's after / before: the two
        // builds met the same moment of the machine in a round.
        let per_round = |f: &dyn Fn(&Run) -> f64| median(new.iter().zip(&old).map(|(n, o)| f(n) / f(o)).collect());
        let mut after_vs_before = Figure::new(format!("{} throughput, after vs before", op.name()), "req/s", thr(&new))
            .vs(thr(&old))
            .ratio(per_round(&|r| r.summary.throughput));
        if op != Op::QueryItems {
            after_vs_before = after_vs_before.target(Target::RatioAtLeast(0.9));
        }
        r.figures.push(after_vs_before.note("ratio: median of the rounds' after / before"));
        r.figures.push(
            Figure::new(format!("{} server CPU per call, after vs before", op.name()), "us", cpu(&new))
                .vs(cpu(&old))
                .ratio(per_round(&|r| r.server_cpu_us)),
        );
        r.figures.push(
            Figure::new(format!("{} throughput before, vs bare tonic", op.name()), "req/s", thr(&old)).vs(thr(&base)),
        );
        r.figures.push(
            Figure::new(format!("{} throughput after, vs bare tonic", op.name()), "req/s", thr(&new)).vs(thr(&base)),
        );
        details.insert(op.name().into(), json!({"baseline": base, "before": old, "after": new}));
    }
    r.details = serde_json::Value::Object(details);
    s.stop()?;
    before.stop(Duration::from_secs(15))?;
    Ok(Some(r))
}

/// Five clients at 20 calls/s each, open loop: on their own connections,
/// then sharing one.
pub async fn light_load(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let s = Setup::start(&ctx.dir("light")).await?;
    let duration = ctx.pick(Duration::from_secs(20), Duration::from_secs(2));
    let warmup = ctx.pick(Duration::from_secs(2), Duration::from_millis(200));
    let mut r = ctx.result(
        "light_load",
        "Light load: GetItem latency, open loop",
        format!(
            "5 clients at 20 GetItem/s each for {}s, open loop (latency from the intended send time), first each on its \
             own connection, then all on one, then each on its own with the client sending HTTP/2 BDP pings (as grpc-go \
             and gRPC C-core clients do); the baseline and the mesh at the same time, each with its own clients. Catches Nagle's algorithm meeting delayed ACKs \
             (a 40 ms mode, bounded here by the pings' 15 ms interval) on any listener.",
            duration.as_secs()
        ),
    );
    let mut details = serde_json::Map::new();
    for (shared, pings) in [(false, false), (true, false), (false, true)] {
        let label = match (shared, pings) {
            (true, _) => "one shared connection",
            (false, false) => "own connections",
            (false, true) => "own connections, client BDP pings",
        };
        // Both at once, so both meet the same machine (a quiet moment or a
        // noisy neighbour) and only the server differs.
        let mut clients = Vec::new();
        for addr in [s.baseline_addr, s.addrs.data] {
            let channels = load::connect_with(&client::url(addr), if shared { 1 } else { 5 }, pings).await?;
            clients.extend((0..5).map(|i| OpenClient {
                channel: channels[i % channels.len()].clone(),
                rate_per_s: 20.0,
                call: Op::GetItem.call(&s.token),
            }));
        }
        let per_client = load::open_loop(clients, warmup, duration, 10_000).await;
        let out = [load::merged(&per_client[..5]), load::merged(&per_client[5..])];
        for (name, stats) in ["baseline", "mesh"].iter().zip(&out) {
            progress(format!(
                "  light load ({label}), {name}: p50 {:.2} ms p99 {:.2} ms max {:.2} ms, {:.1}% >= 10 ms, errors {:?}",
                stats.quantile_ms(0.5),
                stats.quantile_ms(0.99),
                stats.latency.max() as f64 / 1000.0,
                stats.share_at_least_ms(10.0) * 100.0,
                stats.errors
            ));
        }
        let (b, m) = (&out[0], &out[1]);
        r.figures.push(
            Figure::new(format!("GetItem p99, 5 x 20/s, {label}"), "ms", m.quantile_ms(0.99))
                .vs(b.quantile_ms(0.99))
                .target(Target::RatioAtMost(1.5)),
        );
        r.figures.push(
            Figure::new(format!("GetItem p50, 5 x 20/s, {label}"), "ms", m.quantile_ms(0.5)).vs(b.quantile_ms(0.5)),
        );
        r.figures.push(
            Figure::new(format!("calls at >= 10 ms, {label}"), "%", m.share_at_least_ms(10.0) * 100.0)
                .vs(b.share_at_least_ms(10.0) * 100.0)
                // Nagle's 40 ms mode puts 5-40% of calls here; the odd
                // scheduling hiccup of a shared machine, a call or two.
                .target(Target::AtMost(1.0)),
        );
        details.insert(label.into(), json!({"baseline": b.summary(), "mesh": m.summary()}));
    }
    r.details = serde_json::Value::Object(details);
    s.stop()?;
    Ok(r)
}

/// h2load, if installed (Debian's nghttp2-client), on `PATH` or in `.tools/bin`.
fn h2load_binary(root: &Path) -> Option<PathBuf> {
    let local = root.join(".tools/bin/h2load");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("h2load")).find(|p| p.exists())
}

/// Runs h2load; (requests/s, succeeded, failed).
fn h2load(bin: &Path, body: &Path, url: &str, token: &str, n: usize) -> Result<(f64, u64, u64), String> {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["-n", &n.to_string(), "-c", &CONNECTIONS.to_string(), "-m", &STREAMS.to_string(), "-t", "1"])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    if !token.is_empty() {
        cmd.args(["-H", &format!("authorization: Bearer {token}")]);
    }
    let out = cmd.arg(url).output().map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot read h2load's output:\n{text}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("requests:"))
            .and_then(|l| l.split(", ").find(|p| p.ends_with(name)))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((rps, field("succeeded"), field("failed")))
}

pub async fn h2load_crosscheck(ctx: &Ctx) -> Result<Option<ScenarioResult>, String> {
    let Some(bin) = h2load_binary(&ctx.root) else {
        progress("h2load is not installed (Debian: nghttp2-client); cross-check skipped");
        return Ok(None);
    };
    let dir = ctx.dir("h2load");
    let s = Setup::start(&dir).await?;
    let body = dir.join("get-item.bin");
    let req = tenantmesh_proto::data::v1::GetItemRequest { collection: "notes".into(), id: "n1".into() };
    std::fs::write(&body, crate::load::frame(&req)).map_err(|e| e.to_string())?;
    // h2load counts a gRPC error (HTTP 200 + grpc-status) as a success:
    // prove on a sample that the very same call is answered OK.
    let sample = tenantmesh_proto::data::v1::data_client::DataClient::new(lazy(s.addrs.data))
        .get_item(client::authed(req.clone(), &s.token))
        .await;
    if let Err(status) = sample {
        return Err(format!("the h2load request fails with the mesh: {status:?}"));
    }
    let n = ctx.pick(300_000, 20_000);
    let path = "/tenantmesh.data.v1.Data/GetItem";
    let (_, _, rounds) = ctx.window();
    let (mut base, mut mesh) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(h2load(&bin, &body, &format!("http://{}{path}", s.baseline_addr), &s.token, n)?);
        mesh.push(h2load(&bin, &body, &format!("http://{}{path}", s.addrs.data), &s.token, n)?);
    }
    // And after the runs: still answered OK, with the tenant's limits not in the way.
    let after = tenantmesh_proto::data::v1::data_client::DataClient::new(lazy(s.addrs.data))
        .get_item(client::authed(req, &s.token))
        .await;
    if let Err(status) = after {
        return Err(format!("the h2load request failed after the run: {status:?}"));
    }
    let (b, m) = (median(base.iter().map(|x| x.0).collect()), median(mesh.iter().map(|x| x.0).collect()));
    progress(format!("  h2load GetItem: baseline {b:.0}/s, mesh {m:.0}/s"));
    let mut r = ctx.result(
        "h2load",
        "Cross-check with h2load",
        format!(
            "h2load (nghttp2), one thread, {CONNECTIONS} connections x {STREAMS} streams, {n} GetItem calls per run, \
             {rounds} alternating rounds, medians; a sample call before and after each run is checked for grpc-status OK."
        ),
    );
    r.figures.push(Figure::new("GetItem throughput (h2load)", "req/s", m).vs(b).target(Target::RatioAtLeast(0.8)));
    r.details = json!({"baseline": base, "mesh": mesh});
    s.stop()?;
    Ok(Some(r))
}
