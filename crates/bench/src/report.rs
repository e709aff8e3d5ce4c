//! Results: one JSON file per scenario (`bench/results/<scenario>.json`:
//! machine, commit, date, figures) and `BENCHMARKS.md`, regenerated from
//! every results file so a run of one scenario keeps the others' tables.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a figure is held to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// value / baseline >= this
    RatioAtLeast(f64),
    /// value / baseline <= this
    RatioAtMost(f64),
    /// value <= this
    AtMost(f64),
    /// value >= this
    AtLeast(f64),
    /// this.0 <= value / baseline <= this.1
    RatioBetween(f64, f64),
}

impl Target {
    fn describe(&self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(r) => format!(">= {r}x"),
            Target::RatioAtMost(r) => format!("<= {r}x"),
            Target::AtMost(v) => format!("<= {} {unit}", fmt_num(*v)),
            Target::AtLeast(v) => format!(">= {} {unit}", fmt_num(*v)),
            Target::RatioBetween(lo, hi) => format!("{lo}x to {hi}x"),
        }
    }

    fn met(&self, value: f64, ratio: Option<f64>) -> Option<bool> {
        Some(match *self {
            Target::RatioAtLeast(r) => ratio? >= r,
            Target::RatioAtMost(r) => ratio? <= r,
            Target::AtMost(v) => value <= v,
            Target::AtLeast(v) => value >= v,
            Target::RatioBetween(lo, hi) => (lo..=hi).contains(&ratio?),
        })
    }
}

/// One measured figure, with its baseline from the same run when it has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: &str, value: f64) -> Self {
        Figure {
            name: name.into(),
            unit: unit.into(),
            value,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
            note: String::new(),
        }
    }

    /// Adds the baseline (and the ratio value / baseline).
    pub fn vs(mut self, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        self.ratio = (baseline != 0.0).then(|| self.value / baseline);
        self.met = self.target.and_then(|t| t.met(self.value, self.ratio));
        self
    }

    /// Sets the ratio to `ratio` (one the scenario computed otherwise than
    /// value / baseline, e.g. a median of per-round ratios).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self.met = self.target.and_then(|t| t.met(self.value, self.ratio));
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self.met = target.met(self.value, self.ratio);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        }
    }
}

/// One scenario's results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub title: String,
    /// What was run and how, in a sentence or two.
    pub method: String,
    pub machine: Machine,
    pub commit: String,
    pub date: String,
    pub quick: bool,
    pub figures: Vec<Figure>,
    /// Raw measurements behind the figures.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// `git describe`-like: the short commit, `-dirty` when the tree has changes.
pub fn commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    tenantmesh_service::clock::rfc3339(tenantmesh_service::clock::now_secs())
}

pub fn write_result(dir: &Path, result: &ScenarioResult) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.json", result.scenario));
    let json = serde_json::to_string_pretty(result).map_err(|e| e.to_string())?;
    std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        // Thousands separators for big round figures.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The scenarios in the order BENCHMARKS.md lists them.
pub const ORDER: &[&str] = &[
    "isolation_tax",
    "tax_before_after",
    "app_tax",
    "light_load",
    "h2load",
    "token_verification",
    "metering_cost",
    "sts_calls",
    "onboarding",
    "memory_per_tenant",
    "silo_hop",
    "layers",
    "limiter_cost",
    "entitlement_check",
    "noisy_neighbour",
    "saturation",
    "login_flood",
    "rapid_reset",
    "backup_restore",
    "tenant_restore",
];

/// Rewrites `out` (BENCHMARKS.md) from every results file in `dir`.
pub fn write_markdown(dir: &Path, out: &Path) -> Result<(), String> {
    let mut results: Vec<ScenarioResult> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            results.push(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?);
        }
    }
    results.sort_by_key(|r| ORDER.iter().position(|s| *s == r.scenario).unwrap_or(usize::MAX));
    let mut md = String::from(
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench` from the files in [`bench/results/`](bench/results/); do not edit by hand.\n\
         Every ratio compares two figures measured **in the same run, on the same machine, with the same client**\n\
         (these machines are shared and noisy: absolute figures move between runs, ratios much less).\n\
         The load generator is `crates/bench`: pre-encoded gRPC calls on h2 (the HTTP/2 stack under tonic), in a\n\
         closed loop for throughput or an open loop (latency from the intended send time) for latency; client and\n\
         servers share the machine. `met` compares the figure with the target the issue set.\n\n",
    );
    if let Some(first) = results.first() {
        let m = &first.machine;
        md.push_str(&format!("Machine: {} ({} cores, {} GiB, Linux {}).\n\n", m.cpu, m.cores, m.memory_gib, m.kernel));
    }
    for r in &results {
        md.push_str(&format!("## {}\n\n", r.title));
        md.push_str(&format!(
            "{}\n\n_Run {} at commit `{}`{}._\n\n",
            r.method,
            r.date,
            r.commit,
            if r.quick { " (quick mode: indicative only)" } else { "" }
        ));
        md.push_str("| figure | value | baseline | ratio | target | met |\n|---|---|---|---|---|---|\n");
        for f in &r.figures {
            let unit = if f.unit.is_empty() { String::new() } else { format!(" {}", f.unit) };
            let value = format!("{}{unit}", fmt_num(f.value));
            let baseline = f.baseline.map(|b| format!("{}{unit}", fmt_num(b))).unwrap_or_default();
            let ratio = f.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default();
            let target = f.target.map(|t| t.describe(&f.unit)).unwrap_or_default();
            let met = match f.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "",
            };
            let name = if f.note.is_empty() { f.name.clone() } else { format!("{} ({})", f.name, f.note) };
            md.push_str(&format!("| {name} | {value} | {baseline} | {ratio} | {target} | {met} |\n"));
        }
        md.push('\n');
    }
    std::fs::write(out, md).map_err(|e| format!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_formatting() {
        let f = Figure::new("x", "req/s", 80.0).vs(100.0).target(Target::RatioAtLeast(0.8));
        assert_eq!((f.ratio, f.met), (Some(0.8), Some(true)));
        let f = Figure::new("p99", "ms", 3.0).target(Target::RatioAtMost(1.5)).vs(1.0);
        assert_eq!(f.met, Some(false));
        assert_eq!(Figure::new("t", "us", 4.0).target(Target::AtMost(5.0)).met, Some(true));
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(now_utc().len(), 20);
    }
}
