//! HTTP/2 as the attack surface: a client that opens streams and resets
//! them at once (rapid reset, CVE-2023-44487), reconnecting whenever the
//! server ends its connection, while ten tenants work.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use super::fairness::{RssSampler, STEADY, TENANTS, steady_clients, tenants};
use super::{Ctx, progress};
use crate::client;
use crate::load;
use crate::procs;
use crate::report::{Figure, ScenarioResult, Target};

/// What the resetting client did.
#[derive(Default)]
struct Resets {
    streams: AtomicU64,
    /// Connections the server ended (GOAWAY, or closed).
    ended: AtomicU64,
}

/// Opens GetItem streams with `token` on `addr` and resets each at once,
/// as fast as one task can, until `stop`; a new connection whenever the
/// server ends one.
async fn reset_streams(addr: std::net::SocketAddr, token: String, stop: Arc<AtomicBool>, counts: Arc<Resets>) {
    let uri = format!("http://{addr}/tenantmesh.data.v1.Data/GetItem");
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok((client, connection)) = h2::client::handshake(tcp).await else { continue };
        let driver = tokio::spawn(connection);
        let mut sender = Some(client);
        let mut opened = 0u64;
        while let Some(client) = sender.take().filter(|_| !stop.load(Ordering::Relaxed)) {
            let Ok(mut client) = client.ready().await else { break };
            let request = http::Request::post(&uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", format!("Bearer {token}"))
                .body(())
                .expect("a request");
            let Ok((_response, mut stream)) = client.send_request(request, false) else { break };
            stream.send_reset(h2::Reason::CANCEL);
            sender = Some(client);
            opened += 1;
            counts.streams.fetch_add(1, Ordering::Relaxed);
            if opened.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        if !stop.load(Ordering::Relaxed) {
            counts.ended.fetch_add(1, Ordering::Relaxed);
        }
        drop(sender);
        driver.abort();
    }
}

/// What a flood does, in a process of its own (`tenantmesh-bench flood`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FloodKind {
    /// GetItem with a tenant's token, in a closed loop.
    GetItem,
    /// Auth.Login with random emails (anonymous), in a closed loop.
    Login,
    /// GetItem streams opened and reset at once (rapid reset), a new
    /// connection whenever the server ends one.
    Reset,
}

/// What a flooder process did: its one line of JSON on stdout.
#[derive(serde::Serialize, serde::Deserialize, Default, Debug)]
pub struct FloodReport {
    /// Calls answered OK in the window (closed loops).
    pub ok: u64,
    /// Calls refused or failed in the window, by code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Every call answered, warm-up included.
    pub all_calls: u64,
    /// Streams opened and reset (rapid reset).
    pub streams: u64,
    /// Connections the server ended (rapid reset).
    pub ended: u64,
    /// The flooder process's CPU over the flood (warm-up included), in
    /// cores: with the mesh's, whether the machine was saturated.
    #[serde(default)]
    pub cpu_cores: f64,
}

impl FloodReport {
    /// The flood's window statistics as the scenarios' [`load::Stats`]
    /// (no latencies: a flooder's are not measured).
    pub fn stats(&self, window: Duration) -> load::Stats {
        let mut s = load::Stats::from_latencies(&[]);
        s.ok = self.ok;
        s.errors = self.errors.clone();
        s.all_calls = self.all_calls;
        s.window = window;
        s
    }
}

/// A flood: what, where, how wide and how long (the `flood` command's
/// arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct FloodSpec {
    #[arg(long, value_enum)]
    pub kind: FloodKind,
    #[arg(long)]
    pub addr: std::net::SocketAddr,
    /// The flooding tenant's access token (unused by `login`).
    #[arg(long, default_value = "")]
    pub token: String,
    /// Connections (`reset`: tasks, each on its own connection).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Calls in flight per connection (closed loops).
    #[arg(long, default_value_t = 125)]
    pub streams: usize,
    #[arg(long = "warmup-ms", default_value = "2000", value_parser = millis)]
    pub warmup: Duration,
    #[arg(long = "window-ms", default_value = "15000", value_parser = millis)]
    pub window: Duration,
}

fn millis(s: &str) -> Result<Duration, String> {
    s.parse().map(Duration::from_millis).map_err(|e| format!("{s:?}: {e}"))
}

/// The `flood` command: floods for `warmup + window`, then prints a
/// [`FloodReport`].
pub async fn flood(spec: &FloodSpec) -> Result<(), String> {
    let FloodSpec { kind, addr, ref token, connections, streams, warmup, window } = *spec;
    let (cpu0, started) = (crate::procs::cpu_time(std::process::id()), std::time::Instant::now());
    let mut report = match kind {
        FloodKind::GetItem | FloodKind::Login => {
            let conns = load::connect(&client::url(addr), connections).await?;
            let call = match kind {
                FloodKind::Login => super::fairness::login_flood_call(),
                _ => client::Op::GetItem.call(token),
            };
            let s = load::closed_loop(&conns, streams, warmup, window, call).await;
            FloodReport { ok: s.ok, errors: s.errors, all_calls: s.all_calls, ..Default::default() }
        }
        FloodKind::Reset => {
            let (stop, counts) = (Arc::new(AtomicBool::new(false)), Arc::new(Resets::default()));
            let tasks: Vec<_> = (0..connections)
                .map(|_| tokio::spawn(reset_streams(addr, token.clone(), stop.clone(), counts.clone())))
                .collect();
            tokio::time::sleep(warmup + window).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            FloodReport {
                streams: counts.streams.load(Ordering::Relaxed),
                ended: counts.ended.load(Ordering::Relaxed),
                ..Default::default()
            }
        }
    };
    report.cpu_cores = crate::procs::cpu_time(std::process::id()).saturating_sub(cpu0).as_secs_f64()
        / started.elapsed().as_secs_f64().max(1e-3);
    println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    Ok(())
}

/// A flooder: this binary's `flood` command, a process of its own on this
/// machine (as an attacker's client would be: its CPU is not the
/// measuring process's).
pub struct Flooder(std::process::Child);

impl Flooder {
    pub fn start(spec: &FloodSpec) -> Result<Self, String> {
        Self::start_at(spec, false)
    }

    /// [`Flooder::start`], at the lowest CPU priority (`SCHED_IDLE`, by
    /// util-linux's `chrt`) when `idle`: an attacker's client that does not
    /// compete with this machine's other processes for the CPU, as on a
    /// machine of its own.
    pub fn start_at(spec: &FloodSpec, idle: bool) -> Result<Self, String> {
        use clap::ValueEnum as _;
        let kind = spec.kind.to_possible_value().expect("every kind has a name");
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = if !idle {
            std::process::Command::new(exe)
        } else {
            let mut c = std::process::Command::new("chrt");
            c.args(["--idle", "0"]).arg(exe);
            c
        };
        let child = command
            .args(["flood", "--kind", kind.get_name(), "--addr", &spec.addr.to_string(), "--token", &spec.token])
            .args(["--connections", &spec.connections.to_string(), "--streams", &spec.streams.to_string()])
            .args(["--warmup-ms", &spec.warmup.as_millis().to_string()])
            .args(["--window-ms", &spec.window.as_millis().to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start the flooder{}: {e}", if idle { " (by chrt, of util-linux)" } else { "" })
            })?;
        Ok(Self(child))
    }

    /// Waits for the flood to end; what it did.
    pub async fn report(self) -> Result<FloodReport, String> {
        let out = tokio::task::spawn_blocking(move || self.0.wait_with_output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("flooder: {e}"))?;
        if !out.status.success() {
            return Err(format!("the flooder failed: {}", out.status));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.trim()).map_err(|e| format!("the flooder's report {line:?}: {e}"))
    }
}

/// The mesh's and the flooder process's CPU during a flood, in cores of
/// this machine's: whether the machine, not the mesh, was saturated.
pub(crate) fn cpu_figure(label: &str, mesh_cores: f64, flooder_cores: f64) -> Figure {
    let of = std::thread::available_parallelism().map_or(1, |n| n.get());
    Figure::new(format!("mesh and flooder CPU, {label}"), "cores", mesh_cores + flooder_cores).note(format!(
        "of {of}: the mesh {mesh_cores:.2}, the flooder process {flooder_cores:.2} (as an attacker's client on the \
         same machine)"
    ))
}

/// Ten tenants' GetItem latency (open loop) alone and while four tasks
/// open and reset streams as fast as they can; the mesh's memory.
pub async fn rapid_reset(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let (warmup, window) = (
        ctx.pick(Duration::from_secs(2), Duration::from_millis(300)),
        ctx.pick(Duration::from_secs(15), Duration::from_secs(2)),
    );
    const RESETTERS: usize = 4;
    let mut r = ctx.result(
        "rapid_reset",
        "Rapid reset: streams opened and cancelled at once",
        format!(
            "`tenantmesh up`; {TENANTS} tenants at {STEADY} GetItem/s each (open loop) for {}s, alone and then while \
             {RESETTERS} tasks of a flooder process (another tenant's valid token) open GetItem streams on the data \
             service and reset each at once (RST_STREAM CANCEL), as fast as they can, each on a new connection \
             whenever the server ends its own; then the same with the flooder process at the lowest CPU \
             priority (SCHED_IDLE), as a control: an attacker's client on this 2-core machine takes the CPU from \
             everyone, the mesh's included, which one on a machine of its own would not (nice 19 is not enough: \
             the kernel still gives it its slice before a woken task). Resident memory of the mesh sampled every \
             100 ms.",
            window.as_secs()
        ),
    );
    let dir = ctx.dir("rapid-reset");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let mut tokens = tenants(&addrs, &["standard"], TENANTS + 1, (1_000, 1_000, 64)).await?;
    let (_, attacker) = tokens.pop().ok_or("no tenants")?;
    let url = client::url(addrs.data);
    let mut p99s = Vec::new();
    let mut peaks = Vec::new();
    let mut details = serde_json::Map::new();
    // The flooder at the benchmark's priority, then at the lowest (a
    // control: the mesh's own cost to the others, with the attacker's
    // client off this machine's CPU as it would be on a machine of its own).
    for (flood, idle) in [(false, false), (true, false), (true, true)] {
        let sampler = RssSampler::start(&mesh);
        let (cpu0, started) = (mesh.cpu_time(), std::time::Instant::now());
        // Where the machine's CPU goes while the flood runs at the
        // benchmark's priority (TENANTMESH_BENCH_PERF).
        let profile = (flood && !idle).then(|| super::layers::Profile::start(&dir, "rapid-reset", None)).flatten();
        let resetter = if flood {
            let kind = FloodKind::Reset;
            let (addr, token) = (addrs.data, attacker.clone());
            let spec = FloodSpec { kind, addr, token, connections: RESETTERS, streams: 0, warmup, window };
            Some(Flooder::start_at(&spec, idle)?)
        } else {
            None
        };
        let conns = load::connect(&url, 4).await?;
        let stats =
            load::merged(&load::open_loop(steady_clients(&conns, &tokens, STEADY), warmup, window, 20_000).await);
        let resets = match resetter {
            Some(f) => f.report().await?,
            None => FloodReport::default(),
        };
        let peak = sampler.stop();
        let mesh_cores = (mesh.cpu_time() - cpu0).as_secs_f64() / started.elapsed().as_secs_f64();
        if let Some(profile) = profile {
            profile.report(&ctx.root.join("bench/results/rapid_reset_profile.txt"))?;
        }
        let label = match (flood, idle) {
            (false, _) => "no flood",
            (true, false) => "rapid reset",
            (true, true) => "rapid reset, flooder at the lowest CPU priority",
        };
        let (streams, ended) = (resets.streams, resets.ended);
        let span = (warmup + window).as_secs_f64();
        progress(format!(
            "  {label}: tenants p99 {:.2} ms, errors {:?}; {:.0} streams reset/s, {ended} connections ended by the \
             server; mesh RSS peak {:.0} MiB",
            stats.quantile_ms(0.99),
            stats.errors,
            streams as f64 / span,
            peak as f64 / (1 << 20) as f64
        ));
        p99s.push(stats.quantile_ms(0.99));
        peaks.push(peak as f64 / (1 << 20) as f64);
        let mut p99 = Figure::new(format!("tenants' GetItem p99, {label}"), "ms", stats.quantile_ms(0.99));
        let mut rss = Figure::new(format!("mesh resident memory peak, {label}"), "MiB", peaks[peaks.len() - 1]);
        if flood {
            p99 = p99.vs(p99s[0]);
            rss = rss.vs(peaks[0]).target(Target::RatioAtMost(1.1));
            if !idle {
                p99 = p99.target(Target::RatioAtMost(1.5));
            }
        }
        r.figures.push(p99);
        r.figures.push(
            Figure::new(
                format!("tenants' refusals and errors, {label}"),
                "calls",
                (stats.errors.values().sum::<u64>()) as f64,
            )
            .target(Target::AtMost(0.0)),
        );
        r.figures.push(rss);
        if flood {
            r.figures.push(cpu_figure(label, mesh_cores, resets.cpu_cores));
            r.figures.push(
                Figure::new(
                    format!("streams the flooder opened and reset, {label}"),
                    "streams/s",
                    streams as f64 / span,
                )
                .note(format!(
                    "counted by the client, so those still queued when a GOAWAY came never reached the server; \
                     connections the server ended: {ended}, {:.0}/s",
                    ended as f64 / span
                )),
            );
        }
        details.insert(
            label.into(),
            json!({"tenants": stats.summary(), "streams": streams, "ended": ended, "rss_peak": peak,
                "mesh_cores": mesh_cores, "flooder_cores": resets.cpu_cores}),
        );
    }
    r.details = serde_json::Value::Object(details);
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}
