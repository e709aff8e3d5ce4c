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
        .serve_with_incoming(tenantmesh_tenant_context::runtime::incoming(listener));
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

pub async fn layers(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let dir = ctx.dir("layers");
    let (mesh, addrs) = procs::start_mesh(&dir.join("mesh"), &HashMap::new())?;
    let (baseline, baseline_addr) = procs::start_baseline(&dir.join("baseline"))?;
    let admin = platform_admin(addrs.auth).await?;
    let tenant = unique("layers");
    let token = onboard(&addrs, &admin, &tenant, "standard").await?;
    seed(lazy(baseline_addr), &token).await?;
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
             cost is the difference to the row above. \
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
    progress(format!("  bare tonic: {base_cpu:.1} us per call"));
    r.figures.push(Figure::new("bare tonic (baseline)", "us CPU/call", base_cpu));
    let mut details = vec![json!({"layer": "bare tonic", "server_cpu_us": base_cpu})];
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
        server.stop(Duration::from_secs(10))?;
        let (cpu, throughput) = (median(cpus), median(thr));
        progress(format!(
            "  + {name}: {cpu:.1} us per call ({:+.1}), {throughput:.0}/s answered, errors {errors}",
            cpu - previous
        ));
        if errors > 0 {
            return Err(format!("layer {name}: {errors} calls failed (see {})", dir.display()));
        }
        r.figures.push(
            Figure::new(format!("+ {name}"), "us CPU/call", cpu)
                .vs(base_cpu)
                .note(format!("{:+.2} us for this layer", cpu - previous)),
        );
        details.push(
            json!({"layer": name, "server_cpu_us": cpu, "throughput": throughput, "layer_cost_us": cpu - previous}),
        );
        previous = cpu;
    }
    let exported = sink.0.load(Ordering::Relaxed);
    if exported == 0 {
        return Err("the span-export layer exported no span".into());
    }
    r.details = json!({"layers": details, "spans_exported": exported});
    baseline.stop(Duration::from_secs(10))?;
    mesh.stop(Duration::from_secs(15))?;
    Ok(r)
}
