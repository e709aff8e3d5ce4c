//! The per-layer breakdown: the data service's GetItem path built up one
//! layer at a time (see [`crate::layers`]), each against the bare baseline
//! in the same run, so each layer's cost shows (and later layers, as issues
//! add them, show theirs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::json;

use super::{Ctx, median, open_run, progress, unique};
use crate::client::{self, Op, lazy, onboard, platform_admin, seed};
use crate::layers::LAYERS;
use crate::load::{self, OpenClient};
use crate::procs::{self, Proc};
use crate::report::{Figure, ScenarioResult};

/// Calls per second in every run: well below what any variant can serve,
/// so each batches its work alike and CPU per call is the cost of a call.
const RATE: f64 = 20_000.0;
const CONNECTIONS: usize = 50;

/// An OTLP trace collector that counts spans and drops them.
#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize =
            request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_sink() -> Result<(Sink, String), String> {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .serve_with_incoming(tenantmesh_service::runtime::incoming(listener));
    tokio::spawn(server);
    Ok((sink, format!("http://{addr}")))
}

fn start_layers(
    layers: usize,
    dir: &std::path::Path,
    tenant: &str,
    mesh: &procs::MeshAddrs,
    otlp: &str,
) -> Result<(Proc, std::net::SocketAddr), String> {
    let mut cmd = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    cmd.arg("layer-server")
        .args(["--layers", &layers.to_string(), "--tenant", tenant])
        .arg("--data-dir")
        .arg(dir.join(format!("layers-{layers}")))
        .args(["--registry", &client::url(mesh.registry), "--auth", &client::url(mesh.auth), "--otlp", otlp]);
    procs::spawn_until("layer server", cmd, dir.join(format!("layers-{layers}.log")), Duration::from_secs(30), |l| {
        l.strip_prefix("listening ").and_then(|a| a.parse().ok())
    })
}

/// p50 and p99 (ms) of GetItem at light load: 5 clients at 20 calls/s.
async fn light_latency(ctx: &Ctx, url: &str, token: &str) -> Result<(f64, f64), String> {
    let clients = load::connect(url, 5)
        .await?
        .into_iter()
        .map(|channel| OpenClient { channel, rate_per_s: 20.0, call: Op::GetItem.call(token) })
        .collect();
    let d = ctx.pick(Duration::from_secs(10), Duration::from_secs(1));
    let stats = load::merged(&load::open_loop(clients, Duration::from_millis(500), d, 1000).await);
    Ok((stats.quantile_ms(0.5), stats.quantile_ms(0.99)))
}

pub async fn layers(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("layers");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let (baseline, baseline_addr) = procs::start_baseline(&dir.join("baseline"))?;
    let admin = platform_admin(addrs.auth).await?;
    let tenant = unique("layers");
    let token = onboard(&addrs, &admin, &tenant, "standard").await?;
    seed(lazy(baseline_addr), &token).await?;
    seed(lazy(addrs.data), &token).await?;
    let (sink, otlp) = start_sink().await?;
    let (_, window, rounds) = ctx.window();
    let mut r = ctx.result(
        "layers",
        "Per-layer cost of the GetItem path",
        format!(
            "The data service's GetItem path assembled from the mesh's own crates one layer at a time, each in its own \
             process (`tenantmesh-bench layer-server`), against the bare baseline: open loop at {RATE} calls/s over \
             {CONNECTIONS} connections (the same load for every variant, below saturation), {rounds} rounds of {}s \
             each, medians. Every call carries the tenant's token. Server CPU per call is the cost; each layer's own \
             cost is the difference to the row above (run to run, a row moves by about 2 us: smaller differences \
             are noise). Then each variant's GetItem latency at light load (5 clients at \
             20 calls/s, open loop). \
             `span export` sends every request's span to an OTLP collector (a sink in the benchmark process).",
            window.as_secs_f64()
        ),
    );
    let base_cpu = {
        let mut cpus = Vec::new();
        for _ in 0..rounds {
            let run =
                open_run(ctx, &client::url(baseline_addr), &baseline, CONNECTIONS, RATE, Op::GetItem.call(&token))
                    .await?;
            cpus.push(run.server_cpu_us);
        }
        median(cpus)
    };
    let (base_p50, base_p99) = light_latency(ctx, &client::url(baseline_addr), &token).await?;
    progress(format!("  bare tonic: {base_cpu:.1} us per call, light load p50 {base_p50:.3} ms"));
    r.figures.push(Figure::new("bare tonic (baseline)", "us CPU/call", base_cpu));
    let mut details = vec![
        json!({"layer": "bare tonic", "server_cpu_us": base_cpu, "light_p50_ms": base_p50, "light_p99_ms": base_p99}),
    ];
    let mut light = Vec::new();
    let mut previous = base_cpu;
    for (i, name) in LAYERS.iter().enumerate() {
        let layers = i + 1;
        let (server, addr) = start_layers(layers, &dir, &tenant, &addrs, &otlp)?;
        seed(lazy(addr), &token).await?;
        let (mut cpus, mut thr, mut errors) = (Vec::new(), Vec::new(), 0);
        for _ in 0..rounds {
            let run = open_run(ctx, &client::url(addr), &server, CONNECTIONS, RATE, Op::GetItem.call(&token)).await?;
            errors += run.summary.errors.values().sum::<u64>();
            cpus.push(run.server_cpu_us);
            thr.push(run.summary.throughput);
        }
        let (p50, p99) = light_latency(ctx, &client::url(addr), &token).await?;
        server.stop(Duration::from_secs(10))?;
        let (cpu, throughput) = (median(cpus), median(thr));
        progress(format!(
            "  + {name}: {cpu:.1} us per call ({:+.1}), {throughput:.0}/s answered, errors {errors}; light load p50 {p50:.3} ms",
            cpu - previous
        ));
        light.push(Figure::new(format!("GetItem p50 at 5 x 20/s, + {name}"), "ms", p50).vs(base_p50));
        if errors > 0 {
            return Err(format!("layer {name}: {errors} calls failed (see {})", dir.display()));
        }
        r.figures.push(
            Figure::new(format!("+ {name}"), "us CPU/call", cpu)
                .vs(base_cpu)
                .note(format!("{:+.2} us for this layer", cpu - previous)),
        );
        details.push(json!({
            "layer": name, "server_cpu_us": cpu, "throughput": throughput, "layer_cost_us": cpu - previous,
            "light_p50_ms": p50, "light_p99_ms": p99,
        }));
        previous = cpu;
    }
    // The shipped binaries, default settings (layer 4's configuration):
    // the data service on its own, and inside `tenantmesh up` (four
    // services and their runtime in one process).
    let (standalone, standalone_addr) = crate::scenarios::memory::start_data(&dir, &addrs)?;
    seed(lazy(standalone_addr), &token).await?;
    for (name, addr, server) in
        [("tenantmesh-data", standalone_addr, &standalone), ("tenantmesh up", addrs.data, &mesh)]
    {
        let (mut cpus, mut thr) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let run = open_run(ctx, &client::url(addr), server, CONNECTIONS, RATE, Op::GetItem.call(&token)).await?;
            if !run.summary.errors.is_empty() {
                return Err(format!("{name}: calls failed: {:?}", run.summary.errors));
            }
            cpus.push(run.server_cpu_us);
            thr.push(run.summary.throughput);
        }
        let (p50, p99) = light_latency(ctx, &client::url(addr), &token).await?;
        let cpu = median(cpus);
        progress(format!("  {name}: {cpu:.1} us per call, light load p50 {p50:.3} ms"));
        r.figures.push(Figure::new(format!("{name} (shipped binary)"), "us CPU/call", cpu).vs(base_cpu));
        light.push(Figure::new(format!("GetItem p50 at 5 x 20/s, {name}"), "ms", p50).vs(base_p50));
        details.push(json!({"layer": name, "server_cpu_us": cpu, "throughput": median(thr),
            "light_p50_ms": p50, "light_p99_ms": p99}));
    }
    // A refused call next to a served one: the same standalone data
    // service, a tenant whose limits refuse nearly every call (1 call/s),
    // the same open loop. Refusing costs what the layers do before the
    // limiter decides (HTTP/2, headers, the token and tenant caches) plus
    // the refusal itself.
    let standalone_cpu = details[details.len() - 2]["server_cpu_us"].as_f64().unwrap_or(0.0);
    let refused_tenant = unique("refused");
    let refused_token = onboard(&addrs, &admin, &refused_tenant, "standard").await?;
    crate::scenarios::fairness::set_limits(&addrs, &admin, &refused_tenant, 1, 1, 1000).await?;
    let (mut cpus, mut refused, mut all) = (Vec::new(), 0u64, 0u64);
    let profile = Profile::start(&dir, "refused", Some(standalone.pid()));
    for _ in 0..rounds {
        let run = open_run(
            ctx,
            &client::url(standalone_addr),
            &standalone,
            CONNECTIONS,
            RATE,
            Op::GetItem.call(&refused_token),
        )
        .await?;
        refused += run.summary.errors.get("ResourceExhausted").copied().unwrap_or(0);
        all += run.summary.errors.values().sum::<u64>() + run.summary.ok;
        cpus.push(run.server_cpu_us);
    }
    if refused * 10 < all * 9 {
        return Err(format!("the refused tenant's calls were not refused: {refused} of {all}"));
    }
    if let Some(profile) = profile {
        profile.report(&ctx.root.join("bench/results/refused_call_profile.txt"))?;
    }
    let refused_cpu = median(cpus);
    progress(format!("  tenantmesh-data, refused: {refused_cpu:.1} us per call ({refused} of {all} refused)"));
    r.figures.push(
        Figure::new("refused GetItem, tenantmesh-data (shipped binary)", "us CPU/call", refused_cpu)
            .vs(standalone_cpu)
            .note("vs a served GetItem on the same binary"),
    );
    details.push(json!({"layer": "tenantmesh-data, refused", "server_cpu_us": refused_cpu, "refused": refused,
        "calls": all}));
    standalone.stop(Duration::from_secs(10))?;
    r.figures.extend(light);
    let exported = sink.0.load(Ordering::Relaxed);
    if exported == 0 {
        return Err("the span-export layer exported no span".into());
    }
    r.details = json!({"layers": details, "spans_exported": exported});
    baseline.stop(Duration::from_secs(10))?;
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}

/// A `perf` profile while a run goes on, when `TENANTMESH_BENCH_PERF` is
/// set (and `perf` runs here): of one process (where a refused call's CPU
/// goes, by function), or of the whole machine, by process first (where
/// an attack's CPU goes: the server's share, the attacker's client's).
pub(crate) struct Profile {
    perf: std::process::Child,
    data: std::path::PathBuf,
    machine: bool,
}

impl Profile {
    /// Of process `pid`, or of every process when `pid` is `None`.
    pub(crate) fn start(dir: &std::path::Path, name: &str, pid: Option<u32>) -> Option<Profile> {
        std::env::var_os("TENANTMESH_BENCH_PERF")?;
        let data = dir.join(format!("{name}.perf.data"));
        let target = match pid {
            Some(pid) => vec!["-p".to_owned(), pid.to_string()],
            None => vec!["-a".to_owned()],
        };
        let perf = std::process::Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o"])
            .arg(&data)
            .args(target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| progress(format!("  no profile: perf: {e}")))
            .ok()?;
        Some(Profile { perf, data, machine: pid.is_none() })
    }

    /// Stops recording and writes where the samples went to `out`: (of the
    /// machine: by process, then) by binary (the kernel, the service,
    /// libc), then the functions over 1% (self time).
    pub(crate) fn report(mut self, out: &std::path::Path) -> Result<(), String> {
        let stopped = std::process::Command::new("kill").args(["-INT", &self.perf.id().to_string()]).status();
        if !stopped.is_ok_and(|s| s.success()) {
            let _ = self.perf.kill();
        }
        let _ = self.perf.wait();
        let mut text = String::new();
        let sorts: &[(&str, &str)] = if self.machine {
            &[
                ("by process", "comm"),
                ("by process and binary", "comm,dso"),
                ("by function (over 1%)", "comm,dso,symbol"),
            ]
        } else {
            &[("by binary", "dso"), ("by function (over 1%)", "dso,symbol")]
        };
        for (title, sort) in sorts {
            let report = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "-g",
                    "none",
                    "--percent-limit",
                    "1",
                    "--sort",
                    sort,
                    "-i",
                ])
                .arg(&self.data)
                .output()
                .map_err(|e| format!("perf report: {e}"))?;
            text.push_str(&format!("# {title}\n"));
            for line in String::from_utf8_lossy(&report.stdout).lines() {
                // Rows only, without perf's padding and empty columns.
                if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                }
                let row = line.trim_end().trim_end_matches(['-', ' ']);
                text.push_str(row);
                text.push('\n');
            }
        }
        std::fs::write(out, text).map_err(|e| format!("{}: {e}", out.display()))?;
        progress(format!("  profile: {}", out.display()));
        Ok(())
    }
}
