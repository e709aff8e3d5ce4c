//! Password hashing on a bounded pool of its own.
//!
//! argon2id is expensive on purpose (19 MiB and two passes a call by
//! default). Run on tokio's blocking pool, a flood of logins queued without
//! bound there, took the memory of a hash per caller, and delayed every
//! store call of every service that shares the pool. Here it runs on
//! `threads` threads of its own with at most `queue` callers waiting;
//! beyond that a caller is refused at once ([`PoolError::Busy`]), so the
//! memory of hashing is bounded by `threads` hashes and the stores never
//! wait behind it. The threads run at a lower CPU priority (nice 9) than
//! the threads serving requests: under contention hashing yields the CPU,
//! so a login flood slows logins, not every tenant's requests.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantmesh_admission::limits::{Limit, Refusal};
use tenantmesh_service::config::{ConfigError, parse_var};

use crate::password::{self, HashParams, PasswordError};

type Job = Box<dyn FnOnce() + Send>;

/// How soon a refused caller should try again.
pub const BUSY_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every thread is hashing and the queue is full.
    #[error("password hashing is at capacity")]
    Busy,
    #[error(transparent)]
    Password(#[from] PasswordError),
    /// The pool's threads are gone (the process is shutting down).
    #[error("password hashing pool stopped")]
    Stopped,
}

impl PoolError {
    /// The refusal for [`PoolError::Busy`]: RESOURCE_EXHAUSTED, retry soon.
    pub fn busy_refusal() -> Refusal {
        Refusal {
            limit: Limit::Capacity,
            subject: "service:password-hashing".into(),
            description: "password checks at once on this instance".into(),
            retry_after: BUSY_RETRY,
        }
    }
}

/// A bounded pool of password-hashing threads. Cloning shares it; the
/// threads stop when the last clone is dropped.
#[derive(Clone)]
pub struct HashPool {
    jobs: SyncSender<Job>,
    threads: usize,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool").field("threads", &self.threads).finish_non_exhaustive()
    }
}

/// Lowers the calling thread's CPU priority to nice 9 (a thread may always
/// lower its own); if the platform refuses, hashing runs at normal priority.
fn lower_priority() {
    use thread_priority::{ThreadPriority, ThreadPriorityValue, set_current_thread_priority};
    // 23 of 0..=99 maps to niceness 9 for the normal scheduling policy.
    let set = match ThreadPriorityValue::try_from(23u8) {
        Ok(value) => set_current_thread_priority(ThreadPriority::Crossplatform(value)).map_err(|e| format!("{e:?}")),
        Err(e) => Err(e),
    };
    if let Err(e) = set {
        tracing::warn!(error = %e, "password hashing threads keep normal priority");
    }
}

/// Threads by default: half the cores (at least one), so hashing never
/// takes every core from the requests being served.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// How big a [`HashPool`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Hashing threads (at least 1).
    pub threads: usize,
    /// Callers that may wait for a thread.
    pub queue: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        let threads = default_threads();
        Self { threads, queue: threads * 4 }
    }
}

impl PoolSettings {
    /// `TENANTMESH_HASH_THREADS` (default: half the cores) and
    /// `TENANTMESH_HASH_QUEUE` (default: 4 per thread).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let threads: usize = parse_var(env, "TENANTMESH_HASH_THREADS", default_threads())?;
        if threads == 0 {
            return Err(ConfigError { var: "TENANTMESH_HASH_THREADS", message: "must be at least 1".into() });
        }
        let queue = parse_var(env, "TENANTMESH_HASH_QUEUE", threads * 4)?;
        Ok(Self { threads, queue })
    }
}

impl HashPool {
    /// Starts the pool's threads.
    pub fn new(settings: PoolSettings) -> Self {
        let (threads, queue) = (settings.threads.max(1), settings.queue);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // Hold the lock only to take a job, not to run it.
                        let job = rx.lock().map_err(drop).and_then(|r| r.recv().map_err(drop));
                        match job {
                            Ok(job) => job(),
                            Err(()) => return,
                        }
                    }
                })
                .expect("spawn a password hashing thread");
        }
        Self { jobs, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // A caller that went away no longer wants the answer.
            let _ = tx.send(work());
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.map_err(|_| PoolError::Stopped),
            Err(TrySendError::Full(_)) => Err(PoolError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(PoolError::Stopped),
        }
    }

    /// Hashes `password` into an argon2id PHC string.
    pub async fn hash(&self, password: String, params: HashParams) -> Result<String, PoolError> {
        Ok(self.run(move || password::hash(&password, params)).await??)
    }

    /// Whether `password` matches `phc`.
    pub async fn verify(&self, password: String, phc: String) -> Result<bool, PoolError> {
        self.run(move || password::verify(&password, &phc)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> HashParams {
        HashParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 }
    }

    #[tokio::test]
    async fn hashes_and_verifies() {
        let pool = HashPool::new(PoolSettings { threads: 1, queue: 2 });
        let phc = pool.hash("a-long-password".into(), cheap()).await.unwrap();
        assert!(pool.verify("a-long-password".into(), phc.clone()).await.unwrap());
        assert!(!pool.verify("another-password".into(), phc).await.unwrap());
    }

    /// One thread, one waiting: of many callers at once, those past the
    /// thread and the queue are refused at once, the others all answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_past_the_queue_are_refused_at_once() {
        let pool = HashPool::new(PoolSettings { threads: 1, queue: 1 });
        let params = HashParams { m_cost_kib: 8 * 1024, t_cost: 3, p_cost: 1 };
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.hash(format!("password-number-{i}"), params).await })
            })
            .collect();
        let (mut done, mut busy) = (0, 0);
        for c in calls {
            match c.await.unwrap() {
                Ok(_) => done += 1,
                Err(PoolError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(busy >= 10, "{busy} refused, {done} hashed");
        assert!(done >= 1, "{busy} refused, {done} hashed");
        assert_eq!(PoolError::busy_refusal().status().code(), tonic::Code::ResourceExhausted);
    }

    /// The hashing threads run at nice 9 (read back from /proc).
    #[tokio::test]
    async fn hashing_threads_run_at_a_lower_priority() {
        let pool = HashPool::new(PoolSettings { threads: 1, queue: 1 });
        let stat = pool.run(|| std::fs::read_to_string("/proc/thread-self/stat").unwrap()).await.unwrap();
        // Field 19 (nice), counted after the command name's closing parenthesis.
        let nice: i32 = stat.rsplit_once(") ").unwrap().1.split(' ').nth(16).unwrap().parse().unwrap();
        assert_eq!(nice, 9, "{stat}");
    }

    #[test]
    fn settings_are_checked() {
        let env = |k: &str, v: &str| [(k.to_owned(), v.to_owned())].into_iter().collect::<HashMap<_, _>>();
        let from = |k, v| PoolSettings::from_env(&env(k, v));
        assert_eq!(from("TENANTMESH_HASH_THREADS", "0").unwrap_err().var, "TENANTMESH_HASH_THREADS");
        assert_eq!(from("TENANTMESH_HASH_QUEUE", "x").unwrap_err().var, "TENANTMESH_HASH_QUEUE");
        assert_eq!(from("TENANTMESH_HASH_THREADS", "3").unwrap(), PoolSettings { threads: 3, queue: 12 });
    }
}
