//! The benchmark scenarios. Each returns a [`ScenarioResult`]; the driver
//! writes it and regenerates BENCHMARKS.md.

pub mod app;
pub mod backup;
pub mod fairness;
pub mod floods;
pub mod hop;
pub mod layers;
pub mod memory;
pub mod metering;
pub mod onboarding;
pub mod restore;
pub mod sts;
pub mod tax;
pub mod tokens;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::load::{self, CallFn, Stats, Summary};
use crate::procs::Proc;
use crate::report::{Machine, ScenarioResult};

/// What every scenario gets.
pub struct Ctx {
    /// The repository root.
    pub root: PathBuf,
    /// Seconds per measurement instead of the full run: proves the harness
    /// works, figures are indicative only.
    pub quick: bool,
    /// Scratch space (data dirs, logs); removed at the end of the run.
    pub work: PathBuf,
}

impl Ctx {
    /// (warm-up, measured window, rounds) of a closed-loop comparison.
    pub fn window(&self) -> (Duration, Duration, usize) {
        if self.quick {
            (Duration::from_millis(300), Duration::from_secs(1), 1)
        } else {
            (Duration::from_secs(2), Duration::from_secs(5), 3)
        }
    }

    /// `full` in a full run, `quick` in quick mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.work.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    pub fn result(&self, scenario: &str, title: &str, method: String) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.into(),
            title: title.into(),
            method,
            machine: Machine::this(),
            commit: crate::report::commit(&self.root),
            date: crate::report::now_utc(),
            quick: self.quick,
            figures: Vec::new(),
            details: serde_json::Value::Null,
        }
    }
}

/// A tenant id no other run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Progress, on stderr.
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// One closed-loop run against a server process: the figures, plus the
/// server's CPU time per call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    pub summary: Summary,
    /// Server CPU (user + system) per successful call, microseconds.
    pub server_cpu_us: f64,
}

/// A closed loop of `call` on `connections` x `streams` against `url`,
/// with `server`'s CPU time measured around it.
pub async fn closed_run(
    ctx: &Ctx,
    url: &str,
    server: &Proc,
    connections: usize,
    streams: usize,
    call: CallFn,
) -> Result<Run, String> {
    let (warmup, window, _) = ctx.window();
    let channels = load::connect(url, connections).await?;
    let cpu0 = server.cpu_time();
    let stats = load::closed_loop(&channels, streams, warmup, window, call).await;
    let cpu = server.cpu_time().saturating_sub(cpu0);
    Ok(Run { server_cpu_us: cpu_per_call(cpu, &stats), summary: stats.summary() })
}

/// An open loop of `call` at `rate` calls/s in all, spread over
/// `connections`, against `url`, with `server`'s CPU time measured around
/// it: at a fixed rate below saturation every variant batches alike, so
/// CPU per call compares the work each call costs.
pub async fn open_run(
    ctx: &Ctx,
    url: &str,
    server: &Proc,
    connections: usize,
    rate: f64,
    call: CallFn,
) -> Result<Run, String> {
    let (warmup, window, _) = ctx.window();
    let clients = load::connect(url, connections)
        .await?
        .into_iter()
        .map(|channel| load::OpenClient { channel, rate_per_s: rate / connections as f64, call: call.clone() })
        .collect();
    let cpu0 = server.cpu_time();
    let stats = load::merged(&load::open_loop(clients, warmup, window, 100_000).await);
    let cpu = server.cpu_time().saturating_sub(cpu0);
    Ok(Run { server_cpu_us: cpu_per_call(cpu, &stats), summary: stats.summary() })
}

/// Server CPU per call, over the whole run (warm-up included, so divided
/// by every call the run made).
fn cpu_per_call(cpu: Duration, stats: &Stats) -> f64 {
    cpu.as_secs_f64() * 1e6 / (stats.all_calls.max(1) as f64)
}

/// The median of `xs`.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// Environment for a mesh whose logins are cheap (argon2 at test cost):
/// for scenarios that log in many users but do not measure logins.
pub fn cheap_hashing() -> HashMap<String, String> {
    [("TENANTMESH_ARGON2_M_KIB", "1024"), ("TENANTMESH_ARGON2_T", "1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
