//! Whether this process is short of CPU.
//!
//! Every [`PROBE_EVERY`] a probe task reads two measures of its runtime:
//! - **how busy its workers were** since the last probe (tokio's busy time
//!   per worker over the wall time: a worker that had tasks to run all
//!   along, or was preempted by the kernel while it had, was busy), the
//!   runtime busy ratio; and
//! - **how late the probe itself woke up**, as CockroachDB's admission
//!   control counts runnable work: a runtime with a free worker runs it
//!   within its timer's millisecond; one whose workers are all taken (or a
//!   machine whose cores are) runs it after the work queued ahead of it.
//!
//! The ratio is taken over the last quarter of a second, the delay smoothed
//! (exponentially weighted over about eight probes). The
//! process is **short of CPU** from when the busy ratio passes
//! `TENANTMESH_OVERLOAD_BUSY_PERCENT` (default [`DEFAULT_BUSY_PERCENT`]) or
//! the delay `TENANTMESH_OVERLOAD_DELAY_MS` (default [`DEFAULT_DELAY`]),
//! until both have stayed under their calm levels (the ratio 20 points
//! lower, the delay half) for [`CALM_AFTER`].
//!
//! What the layers do about it (the overload actions, as Envoy's overload
//! manager takes them per resource):
//! - a connection whose calls are nearly all refused starts being paused
//!   (`connection`): while the CPU is plentiful, refusing a flood call by
//!   call costs nobody anything, and pausing an open-loop client only
//!   bunches what it sends;
//! - the fair queue takes over admission for every call, anonymous ones
//!   included, ordering tenants of the same weight by their recent usage,
//!   and while work queues for the CPU (the delay past its threshold)
//!   shrinking the seats to what is running
//!   (`tenantmesh_admission::fairq`).
//!
//! One probe per process (the services of `tenantmesh up` share their
//! runtime, and so their CPU); listeners ([`LoadListener`]) hear each
//! probe's verdict.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How often the probe runs.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);
/// The smoothed scheduling delay past which the process is short of CPU.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(5);
/// The runtime busy ratio (percent, over the last quarter second) past
/// which the process is short of CPU.
pub const DEFAULT_BUSY_PERCENT: u32 = 90;
/// Probes the busy ratio is measured over (a quarter of a second).
const BUSY_WINDOW: usize = 25;
/// How far under the busy threshold (percentage points) counts as calm.
const CALM_BUSY_POINTS: f64 = 20.0;
/// How long both measures must stay calm before the process counts as
/// having CPU again (so that the actions do not flap
/// with each pause they cause).
pub const CALM_AFTER: Duration = Duration::from_secs(1);

/// `TENANTMESH_OVERLOAD`: how the process decides it is short of CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overload {
    /// Measured (the default).
    #[default]
    Auto,
    /// Always: the overload actions apply to every call (for tests, or an
    /// operator who wants them whatever the load).
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for Overload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err("must be auto, on or off".into()),
        }
    }
}

/// The process's overload settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadSettings {
    /// `TENANTMESH_OVERLOAD`.
    pub mode: Overload,
    /// `TENANTMESH_OVERLOAD_DELAY_MS`: the smoothed scheduling delay that
    /// means short of CPU.
    pub delay: Duration,
    /// `TENANTMESH_OVERLOAD_BUSY_PERCENT`: the runtime busy ratio (over the
    /// last quarter second) that means short of CPU.
    pub busy_percent: u32,
}

impl Default for OverloadSettings {
    fn default() -> Self {
        Self { mode: Overload::Auto, delay: DEFAULT_DELAY, busy_percent: DEFAULT_BUSY_PERCENT }
    }
}

/// A probe's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Short of CPU (busy past its threshold, or work queueing).
    pub short: bool,
    /// Work queueing for the CPU: the probe's delay past its threshold.
    /// A busy runtime that runs what it is given at once is short, but
    /// running less of it at a time would not make anyone faster (and
    /// would throttle work that waits on I/O, as on DynamoDB).
    pub queueing: bool,
}

/// Told of each probe's verdict (on the probe's task: keep it short).
pub trait LoadListener: Send + Sync {
    fn tick(&self, verdict: Verdict);
}

struct Load {
    short: AtomicBool,
    /// The smoothed delay, in microseconds.
    delay_us: AtomicU64,
    /// The busy ratio over the last quarter second, in tenths of a percent.
    busy_permille: AtomicU64,
    settings: Mutex<OverloadSettings>,
    listeners: Mutex<Vec<Weak<dyn LoadListener>>>,
    probe: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn load() -> &'static Load {
    static LOAD: OnceLock<Load> = OnceLock::new();
    LOAD.get_or_init(|| Load {
        short: AtomicBool::new(false),
        delay_us: AtomicU64::new(0),
        busy_permille: AtomicU64::new(0),
        settings: Mutex::new(OverloadSettings::default()),
        listeners: Mutex::new(Vec::new()),
        probe: Mutex::new(None),
    })
}

/// Whether the process is short of CPU now (one atomic load).
pub fn short_of_cpu() -> bool {
    load().short.load(Relaxed)
}

/// The smoothed scheduling delay the probe measures.
pub fn delay() -> Duration {
    Duration::from_micros(load().delay_us.load(Relaxed))
}

/// The runtime busy ratio the probe measured over the last quarter second
/// (0 to 1).
pub fn busy() -> f64 {
    load().busy_permille.load(Relaxed) as f64 / 1000.0
}

/// Sets the process's overload settings (a process-wide setting, as the
/// services of one process share its CPU): `On` and `Off` take effect at
/// once.
pub fn configure(settings: OverloadSettings) {
    let l = load();
    *l.settings.lock().expect("load settings") = settings;
    match settings.mode {
        Overload::On => l.short.store(true, Relaxed),
        Overload::Off => l.short.store(false, Relaxed),
        Overload::Auto => {}
    }
}

/// Tells `listener` of each probe's verdict while it lives.
pub fn listen(listener: Weak<dyn LoadListener>) {
    let mut listeners = load().listeners.lock().expect("load listeners");
    listeners.retain(|l| l.strong_count() > 0);
    listeners.push(listener);
}

/// Starts the probe on the current runtime, unless one runs already.
/// Without a runtime, does nothing.
pub fn start() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let mut probe = load().probe.lock().expect("load probe");
    if probe.as_ref().is_some_and(|p| !p.is_finished()) {
        return;
    }
    *probe = Some(runtime.spawn(run()));
}

async fn run() {
    let l = load();
    let metrics = tokio::runtime::Handle::current().metrics();
    let workers = metrics.num_workers().max(1);
    let busy_time = || (0..workers).map(|w| metrics.worker_total_busy_duration(w)).sum::<Duration>();
    // The busy ratio over the last BUSY_WINDOW probes: tokio publishes a
    // worker's busy time in steps (at its maintenance, every 61 polls), so
    // one probe's difference says little.
    let mut samples = std::collections::VecDeque::from([(Instant::now(), busy_time())]);
    let (mut delay, mut busy) = (0.0f64, 0.0f64);
    let mut calm_since: Option<Instant> = None;
    let mut last_log: Option<Instant> = None;
    loop {
        let asked = Instant::now() + PROBE_EVERY;
        tokio::time::sleep_until(asked.into()).await;
        let now = Instant::now();
        let late = now.saturating_duration_since(asked);
        delay += (late.as_secs_f64() - delay) / 8.0;
        let busy_now = busy_time();
        if samples.len() > BUSY_WINDOW {
            samples.pop_front();
        }
        if let Some(&(then, busy_then)) = samples.front() {
            busy = (busy_now.saturating_sub(busy_then).as_secs_f64()
                / (now.saturating_duration_since(then).as_secs_f64() * workers as f64).max(1e-6))
            .min(1.0);
        }
        samples.push_back((now, busy_now));
        l.delay_us.store((delay * 1e6) as u64, Relaxed);
        l.busy_permille.store((busy * 1000.0) as u64, Relaxed);
        let settings = *l.settings.lock().expect("load settings");
        let Verdict { short, queueing } = match settings.mode {
            Overload::On => Verdict { short: true, queueing: true },
            Overload::Off => Verdict::default(),
            Overload::Auto => {
                let (delay_limit, busy_limit) =
                    (settings.delay.as_secs_f64(), f64::from(settings.busy_percent) / 100.0);
                let was = l.short.load(Relaxed);
                let short = if delay >= delay_limit || busy >= busy_limit {
                    calm_since = None;
                    true
                } else if was && delay < delay_limit / 2.0 && busy < busy_limit - CALM_BUSY_POINTS / 100.0 {
                    let since = *calm_since.get_or_insert(now);
                    since.elapsed() < CALM_AFTER
                } else {
                    calm_since = None;
                    was
                };
                Verdict { short, queueing: delay >= delay_limit }
            }
        };
        if l.short.swap(short, Relaxed) != short && last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_log = Some(Instant::now());
            let (delay_ms, busy_percent) = (delay * 1e3, busy * 100.0);
            if short {
                tracing::warn!(
                    delay_ms,
                    busy_percent,
                    "short of CPU (tasks wait for a worker): pausing connections whose calls are refused, queueing calls fairly by recent usage"
                );
            } else {
                tracing::info!(delay_ms, busy_percent, "CPU available again: overload actions off");
            }
        }
        let listeners: Vec<Arc<dyn LoadListener>> =
            l.listeners.lock().expect("load listeners").iter().filter_map(Weak::upgrade).collect();
        for listener in listeners {
            listener.tick(Verdict { short, queueing });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(AtomicU64, AtomicU64);

    impl LoadListener for Count {
        fn tick(&self, verdict: Verdict) {
            self.0.fetch_add(1, Relaxed);
            if verdict.short {
                self.1.fetch_add(1, Relaxed);
            }
        }
    }

    /// Workers kept busy (four tasks on two workers, each spinning 2 ms
    /// between yields) make the runtime busy: the process
    /// is short of CPU, and its listeners hear so; once they stop, it is
    /// not, after the calm period.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_workers_make_the_process_short_of_cpu() {
        // The busy ratio only (the delay's threshold out of reach): this
        // test shares a busy machine, where the probe may wake late anyway.
        configure(OverloadSettings { delay: Duration::from_secs(1), ..Default::default() });
        let count = Arc::new(Count(AtomicU64::new(0), AtomicU64::new(0)));
        listen(Arc::downgrade(&count) as Weak<dyn LoadListener>);
        start();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!short_of_cpu() && busy() < 0.5, "an idle runtime is short of CPU: busy {}", busy());
        let hogging = Arc::new(AtomicBool::new(true));
        let hogs: Vec<_> = (0..4)
            .map(|_| {
                let hogging = hogging.clone();
                tokio::spawn(async move {
                    while hogging.load(Relaxed) {
                        let until = Instant::now() + Duration::from_millis(2);
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !short_of_cpu() {
            assert!(Instant::now() < deadline, "busy workers never made the process short: {:?}, {}", delay(), busy());
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(20));
        }
        hogging.store(false, Relaxed);
        for h in hogs {
            h.await.unwrap();
        }
        assert!(count.1.load(Relaxed) > 0, "the listener heard of it");
        let deadline = Instant::now() + Duration::from_secs(10);
        while short_of_cpu() {
            assert!(Instant::now() < deadline, "still short after the work stopped: {:?}", delay());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Forced modes take effect at once.
        configure(OverloadSettings { mode: Overload::On, ..Default::default() });
        assert!(short_of_cpu());
        configure(OverloadSettings { mode: Overload::Off, ..Default::default() });
        assert!(!short_of_cpu());
    }
}
