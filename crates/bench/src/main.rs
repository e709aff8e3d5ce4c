//! `tenantmesh-bench`: what `cargo xtask bench` runs.
//!
//! - `run`: every scenario (or `--only` some), results into
//!   `bench/results/<scenario>.json` and `BENCHMARKS.md`;
//!   `--quick` runs each for a second or two into `target/bench-quick/`
//!   (how `cargo xtask test` keeps the harness from rotting).
//! - `baseline`: the bare tonic server the ratios are measured against.
//! - `flood`: a scenario's attacker, in a process of its own.
//! - `layer-server`: the data service's path up to a given layer, for the
//!   per-layer breakdown.

mod baseline;
mod client;
mod layers;
mod load;
mod procs;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tenantmesh-bench",
    about = "tenantmesh benchmarks: the isolation tax and friends, as ratios to bare tonic"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the scenarios and write their results.
    ///
    /// Each scenario starts the processes it measures (the release
    /// `tenantmesh` binary, the baseline, the moto emulator), measures them
    /// from outside, writes `<results>/<scenario>.json` and regenerates
    /// the markdown summary from every results file.
    Run {
        /// A second or two per measurement: checks the harness, figures are indicative only.
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (comma-separated); default: all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The repository root (default: found from this binary's path).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Where results go (default: ROOT/bench/results, or ROOT/target/bench-quick/results with --quick).
        #[arg(long)]
        results: Option<PathBuf>,
        /// The markdown summary (default: ROOT/BENCHMARKS.md, or next to the results with --quick).
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Flood a service for a while, then print what was done (one line of
    /// JSON): a scenario's attacker, in a process of its own.
    Flood(scenarios::floods::FloodSpec),
    /// Serve the bare tonic baseline (prints `listening ADDR`).
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: std::net::SocketAddr,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Serve the data service's path up to a layer, for the per-layer
    /// breakdown (prints `listening ADDR`): 1 handler, 2 + session policy,
    /// 3 + authentication, 4 + logs, 5 + span export.
    LayerServer {
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
        layers: u8,
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: std::net::SocketAddr,
        #[arg(long)]
        data_dir: PathBuf,
        /// The tenant the fixed context names (layers 1-2).
        #[arg(long)]
        tenant: String,
        /// The mesh's registry and auth URLs (layers 3-5).
        #[arg(long)]
        registry: Option<String>,
        #[arg(long)]
        auth: Option<String>,
        /// OTLP endpoint (layer 5).
        #[arg(long)]
        otlp: Option<String>,
    },
}

const ALL: &[&str] = report::ORDER;

fn find_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().find(|d| d.join("Cargo.toml").exists() && d.join("crates/bench").is_dir()).map(PathBuf::from)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Baseline { addr, data_dir } => baseline::serve(addr, &data_dir).await,
        Cmd::LayerServer { layers: n, addr, data_dir, tenant, registry, auth, otlp } => {
            layers::serve(n.into(), addr, &data_dir, &tenant, registry.zip(auth), otlp).await
        }
        Cmd::Run { quick, only, root, results, markdown } => run(quick, only, root, results, markdown).await,
        Cmd::Flood(spec) => scenarios::floods::flood(&spec).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantmesh-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    quick: bool,
    only: Vec<String>,
    root: Option<PathBuf>,
    results: Option<PathBuf>,
    markdown: Option<PathBuf>,
) -> Result<(), String> {
    let root = root.or_else(find_root).ok_or("cannot find the repository root: pass --root")?;
    if let Some(bad) = only.iter().find(|s| !ALL.contains(&s.as_str())) {
        return Err(format!("unknown scenario {bad:?}; scenarios: {}", ALL.join(", ")));
    }
    let base = if quick { root.join("target/bench-quick") } else { root.clone() };
    let results = results.unwrap_or_else(|| base.join(if quick { "results" } else { "bench/results" }));
    let markdown = markdown.unwrap_or_else(|| base.join("BENCHMARKS.md"));
    let work = root.join("target/bench-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let ctx = scenarios::Ctx { root: root.clone(), quick, work: work.clone() };
    let selected: Vec<&str> = ALL.iter().copied().filter(|s| only.is_empty() || only.iter().any(|o| o == s)).collect();
    let started = Instant::now();
    for (i, name) in selected.iter().enumerate() {
        scenarios::progress(format!("[{}/{}] {name}", i + 1, selected.len()));
        let t0 = Instant::now();
        let result = match *name {
            "isolation_tax" => scenarios::tax::isolation_tax(&ctx).await.map(Some),
            "tax_before_after" => scenarios::tax::before_after(&ctx).await,
            "app_tax" => scenarios::app::app_tax(&ctx).await.map(Some),
            "light_load" => scenarios::tax::light_load(&ctx).await.map(Some),
            "h2load" => scenarios::tax::h2load_crosscheck(&ctx).await,
            "sts_calls" => scenarios::sts::sts_calls(&ctx).await.map(Some),
            "onboarding" => scenarios::onboarding::onboarding(&ctx).await.map(Some),
            "memory_per_tenant" => scenarios::memory::memory_per_tenant(&ctx).await.map(Some),
            "silo_hop" => scenarios::hop::silo_hop(&ctx).await.map(Some),
            "token_verification" => scenarios::tokens::token_verification(&ctx).await.map(Some),
            "metering_cost" => scenarios::metering::metering_cost(&ctx).await.map(Some),
            "layers" => scenarios::layers::layers(&ctx).await.map(Some),
            "limiter_cost" => scenarios::fairness::limiter_cost(&ctx).await.map(Some),
            "entitlement_check" => scenarios::fairness::entitlement_check(&ctx).await.map(Some),
            "noisy_neighbour" => scenarios::fairness::noisy_neighbour(&ctx).await.map(Some),
            "saturation" => scenarios::fairness::saturation(&ctx).await.map(Some),
            "login_flood" => scenarios::fairness::login_flood(&ctx).await.map(Some),
            "rapid_reset" => scenarios::floods::rapid_reset(&ctx).await.map(Some),
            "backup_restore" => scenarios::backup::backup_restore(&ctx).await.map(Some),
            "tenant_restore" => scenarios::restore::tenant_restore(&ctx).await.map(Some),
            other => return Err(format!("scenario {other} is not implemented")),
        }
        .map_err(|e| format!("{name}: {e}"))?;
        if let Some(result) = result {
            for f in &result.figures {
                let met = match f.met {
                    Some(true) => " [met]",
                    Some(false) => " [NOT MET]",
                    None => "",
                };
                let vs = f.ratio.map(|r| format!(" ({r:.2}x baseline)")).unwrap_or_default();
                scenarios::progress(format!("  = {}: {} {}{vs}{met}", f.name, report::fmt_num(f.value), f.unit));
            }
            report::write_result(&results, &result)?;
            report::write_markdown(&results, &markdown)?;
        }
        scenarios::progress(format!("  ({name} took {:.0}s)", t0.elapsed().as_secs_f64()));
    }
    let _ = std::fs::remove_dir_all(&work);
    scenarios::progress(format!(
        "done in {:.0}s: results in {}, summary in {}",
        started.elapsed().as_secs_f64(),
        results.display(),
        markdown.display()
    ));
    Ok(())
}
