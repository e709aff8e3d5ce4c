//! Per-key admission: a rate (GCRA, the token bucket written as one
//! timestamp) and a cap on requests in flight, for every tenant of a
//! process, in bounded memory.
//!
//! A key's whole state is its theoretical arrival time (when its bucket is
//! full again) and its requests in flight: 16 bytes, stored under a 64-bit
//! keyed hash of the key, so an idle tenant costs about 25-57 bytes of map
//! (the load factor moves between 7/16 and 7/8). A key whose bucket is full
//! and that has nothing in flight is indistinguishable from a key never
//! seen, so evicting it loses nothing: maps are swept of such keys as they
//! grow.
//!
//! Refusals are RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` (when the
//! request would be admitted) and `google.rpc.QuotaFailure` (which limit),
//! see [`Refusal::status`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};

pub use tenantmesh_service::handled::Cost;

/// A key's limits. `rate_per_second` and `burst` above 0; `max_in_flight`
/// 0 means no cap on requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rate_per_second: u32,
    pub burst: u32,
    pub max_in_flight: u32,
}

/// Limits as a limiter applies them: a key's whole [`Limits`], or its share
/// of them (see [`Limits::share`]), as GCRA's emission interval and
/// tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Nanoseconds per token.
    interval: u64,
    /// Nanoseconds of burst: how far ahead of now a key may have spent.
    tolerance: u64,
    /// Tokens of burst (a share's, for replicas).
    burst: u32,
    /// 0: no cap on requests in flight.
    max_in_flight: u32,
}

impl From<Limits> for Quota {
    fn from(limits: Limits) -> Self {
        let interval = 1_000_000_000 / u64::from(limits.rate_per_second.max(1));
        let burst = limits.burst.max(1);
        Quota { interval, tolerance: interval * u64::from(burst), burst, max_in_flight: limits.max_in_flight }
    }
}

impl Quota {
    /// One token every `interval`, a burst of one: a key admitted under
    /// it owes for `interval` (how long something is remembered of it).
    pub fn every(interval: Duration) -> Quota {
        let interval = (interval.as_nanos() as u64).max(1);
        Quota { interval, tolerance: interval, burst: 1, max_in_flight: 0 }
    }
}

impl Limits {
    /// A `fraction` (0 to 1] of these limits, for one of several replicas
    /// that share a key's limits: the rate, burst and requests in flight
    /// scaled by it (at least one token of burst and one request in flight).
    /// The burst lasts as long as the whole one: a key may spend its
    /// share's tokens as early as it may spend the whole bucket.
    pub fn share(self, fraction: f64) -> Quota {
        // 1 (or not a number): the whole, without floating point.
        if fraction.is_nan() || fraction >= 1.0 {
            return self.into();
        }
        let fraction = fraction.max(1e-6);
        let whole = Quota::from(self);
        let interval = ((whole.interval as f64) / fraction).min(u64::MAX as f64 / 4.0) as u64;
        Quota {
            interval,
            tolerance: whole.tolerance.max(interval),
            burst: ((f64::from(whole.burst) * fraction).ceil() as u32).max(1),
            max_in_flight: match self.max_in_flight {
                0 => 0,
                n => ((f64::from(n) * fraction).ceil() as u32).max(1),
            },
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The rate (token bucket) of the key.
    Rate,
    /// Requests in flight of the key.
    Concurrency,
    /// Work of a shared, bounded pool (password hashing, the process's
    /// capacity): not the key's own quota.
    Capacity,
    /// Stored bytes.
    Storage,
}

impl Limit {
    /// The name used in QuotaFailure, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Rate => "requests_per_second",
            Limit::Concurrency => "max_concurrency",
            Limit::Capacity => "capacity",
            Limit::Storage => "storage_quota_bytes",
        }
    }
}

/// A refused request: which limit, on what, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    /// What the limit applies to, as QuotaFailure's subject (for example
    /// `tenant:acme`, `peer:127.0.0.1`).
    pub subject: String,
    /// The limit, in words (for example `10 requests per second, burst 20`).
    pub description: String,
    pub retry_after: Duration,
}

impl Refusal {
    /// RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure.
    pub fn status(&self) -> Status {
        let mut details = ErrorDetails::with_retry_info(Some(self.retry_after));
        details.set_quota_failure(vec![QuotaViolation::new(self.subject.clone(), self.description.clone())]);
        Status::with_error_details(
            tonic::Code::ResourceExhausted,
            format!(
                "{} exceeded for {}; retry after {} ms",
                self.limit.name(),
                self.subject,
                self.retry_after.as_millis()
            ),
            details,
        )
    }
}

/// Nanoseconds since the process's first use of a limiter (monotonic).
fn now_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Theoretical arrival time, ns: the bucket is full again at `tat`.
    tat: u64,
    in_flight: u32,
}

const SHARDS: usize = 16;

/// Admission of many keys, each with its own limits.
pub struct KeyedLimiter {
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<Shard>]>,
}

struct Shard {
    slots: HashMap<u64, Slot>,
    /// Sweep idle keys when the map reaches this size.
    sweep_at: usize,
}

impl std::fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter").field("keys", &self.len()).finish()
    }
}

impl Default for KeyedLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// An admitted request: charges it more when its cost is known, and, with
/// a cap on requests in flight, holds its slot until dropped. It borrows
/// its limiter (no shared reference count to bump per request).
#[derive(Debug)]
pub struct InFlight<'a> {
    limiter: &'a KeyedLimiter,
    key: u64,
    quota: Quota,
}

impl InFlight<'_> {
    /// Charges the request's key `tokens` more, under the quota it was
    /// admitted with (see [`KeyedLimiter::charge`]).
    pub fn charge(&self, tokens: u32) {
        self.limiter.charge_hashed(self.key, tokens, self.quota);
    }

    /// This request's slot among its key's requests in flight, owned: for
    /// a stream that goes on after its handler returns, and holds the slot
    /// until it ends. `None` without a cap on requests in flight.
    pub fn hold(mut self, limiter: &std::sync::Arc<KeyedLimiter>) -> Option<Held> {
        (self.quota.max_in_flight > 0).then(|| {
            let held = Held { limiter: limiter.clone(), key: self.key };
            // Released by `held` from now on.
            self.quota.max_in_flight = 0;
            held
        })
    }
}

/// A request's slot among its key's requests in flight, held by whatever
/// owns it (a server stream's task) until dropped. The server layer puts
/// it in a streaming request's extensions as a [`HeldSlot`]; the handler
/// takes it into its stream.
#[derive(Debug)]
pub struct Held {
    limiter: std::sync::Arc<KeyedLimiter>,
    key: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.limiter.release(self.key);
    }
}

/// A streaming request's [`Held`] slot, in its extensions (which must be
/// `Clone`): the handler takes it; if none does, it is released with the
/// request.
#[derive(Debug, Clone)]
pub struct HeldSlot(std::sync::Arc<std::sync::Mutex<Option<Held>>>);

impl HeldSlot {
    pub fn new(held: Held) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Some(held))))
    }

    /// The slot of the request whose extensions hold this, to keep while
    /// its stream is open (`None` when its caller is not limited).
    pub fn take<T>(request: &tonic::Request<T>) -> Option<Held> {
        request.extensions().get::<HeldSlot>().and_then(|s| s.0.lock().expect("held slot").take())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.quota.max_in_flight > 0 {
            self.limiter.release(self.key);
        }
    }
}

impl KeyedLimiter {
    /// Gives back one of `key`'s requests in flight.
    fn release(&self, key: u64) {
        let mut shard = self.shard(key).lock().expect("limiter lock");
        if let Some(slot) = shard.slots.get_mut(&key) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
    }
}

impl KeyedLimiter {
    pub fn new() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard { slots: HashMap::new(), sweep_at: 1024 })).collect(),
        }
    }

    fn key(&self, key: &(impl Hash + ?Sized)) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key >> 59) as usize % SHARDS]
    }

    /// Admits one request of `key` costing `cost` tokens, or says which
    /// limit refuses it. With `max_in_flight` above 0 the request holds a
    /// slot until the returned guard drops.
    pub fn admit(
        &self,
        key: &(impl Hash + ?Sized),
        cost: u32,
        quota: impl Into<Quota>,
    ) -> Result<InFlight<'_>, (Limit, Duration)> {
        let key = self.key(key);
        let now = now_nanos();
        let quota = quota.into();
        let Quota { interval, tolerance, max_in_flight, .. } = quota;
        let mut shard = self.shard(key).lock().expect("limiter lock");
        if shard.slots.len() >= shard.sweep_at {
            shard.sweep(now);
        }
        let slot = shard.slots.entry(key).or_default();
        if max_in_flight > 0 && slot.in_flight >= max_in_flight {
            // Roughly when one finishes: the time of one token.
            return Err((Limit::Concurrency, Duration::from_nanos(interval.min(1_000_000_000))));
        }
        let tat = slot.tat.max(now) + interval * u64::from(cost.max(1));
        if tat > now + tolerance {
            return Err((Limit::Rate, Duration::from_nanos(tat - tolerance - now)));
        }
        slot.tat = tat;
        if max_in_flight > 0 {
            slot.in_flight += 1;
        }
        Ok(InFlight { limiter: self, key, quota })
    }

    /// Charges `tokens` more to `key` after the fact (work whose cost was
    /// known only once done), all of them: past a burst, the key owes, and
    /// its requests are refused until its rate has paid the debt (every
    /// byte a tenant writes is paid for, however large the write).
    pub fn charge(&self, key: &(impl Hash + ?Sized), tokens: u32, quota: impl Into<Quota>) {
        self.charge_hashed(self.key(key), tokens, quota.into());
    }

    /// When `key` may be admitted again for a request of `cost` tokens
    /// under `quota`, without taking anything: `None` if it may now.
    pub fn owing(&self, key: &(impl Hash + ?Sized), cost: u32, quota: impl Into<Quota>) -> Option<Duration> {
        let key = self.key(key);
        let Quota { interval, tolerance, .. } = quota.into();
        let now = now_nanos();
        let shard = self.shard(key).lock().expect("limiter lock");
        let tat = shard.slots.get(&key).map_or(0, |s| s.tat).max(now) + interval * u64::from(cost.max(1));
        (tat > now + tolerance).then(|| Duration::from_nanos(tat - tolerance - now))
    }

    fn charge_hashed(&self, key: u64, tokens: u32, quota: Quota) {
        if tokens == 0 {
            return;
        }
        let now = now_nanos();
        let mut shard = self.shard(key).lock().expect("limiter lock");
        let slot = shard.slots.entry(key).or_default();
        slot.tat = slot.tat.max(now) + quota.interval * u64::from(tokens);
    }

    /// Keys held (idle ones included until swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("limiter lock").slots.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every idle key now (full bucket, nothing in flight).
    pub fn sweep(&self) {
        let now = now_nanos();
        for shard in self.shards.iter() {
            shard.lock().expect("limiter lock").sweep(now);
        }
    }

    /// Bytes the maps hold (their allocations, not their headers).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket (plus a group), buckets are
        // a power of two above capacity * 8 / 7.
        let per_bucket = std::mem::size_of::<(u64, Slot)>() + 1;
        self.shards
            .iter()
            .map(|s| {
                let cap = s.lock().expect("limiter lock").slots.capacity();
                if cap == 0 { 0 } else { (cap * 8 / 7).next_power_of_two() * per_bucket + 16 }
            })
            .sum()
    }
}

/// At most one log line per key and second: refusals under a flood are
/// counted in metrics, not each written to the log.
#[derive(Debug, Default)]
pub struct LogThrottle(KeyedLimiter);

impl LogThrottle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a line about `key` may be written now.
    pub fn allow(&self, key: &(impl Hash + ?Sized)) -> bool {
        self.0.admit(key, 1, Limits { rate_per_second: 1, burst: 1, max_in_flight: 0 }).is_ok()
    }
}

impl Shard {
    fn sweep(&mut self, now: u64) {
        self.slots.retain(|_, s| s.in_flight > 0 || s.tat > now);
        // Sweep again when the live keys have doubled (at least 1024).
        self.sweep_at = (self.slots.len() * 2).max(1024);
        if self.slots.capacity() > self.sweep_at * 2 {
            self.slots.shrink_to(self.sweep_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn limits(rate: u32, burst: u32, in_flight: u32) -> Limits {
        Limits { rate_per_second: rate, burst, max_in_flight: in_flight }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = Arc::new(KeyedLimiter::new());
        let lim = limits(10, 5, 0);
        for i in 0..5 {
            assert!(l.admit("acme", 1, lim).is_ok(), "request {i} of the burst");
        }
        let (limit, retry) = l.admit("acme", 1, lim).unwrap_err();
        assert_eq!(limit, Limit::Rate);
        assert!(retry > Duration::ZERO && retry <= Duration::from_millis(100), "{retry:?}");
        // Another key has its own bucket.
        assert!(l.admit("globex", 1, lim).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.admit("acme", 1, lim).is_ok(), "a token came back after 100 ms");
    }

    #[test]
    fn costs_and_charges_take_more_tokens() {
        let l = Arc::new(KeyedLimiter::new());
        let lim = limits(1, 10, 0);
        assert!(l.admit("k", 8, lim).is_ok());
        assert_eq!(l.admit("k", 3, lim).unwrap_err().0, Limit::Rate);
        assert!(l.admit("k", 2, lim).is_ok());
        // A charge is never capped: 1000 tokens at 1/s with a burst of 10
        // leave the key owing about 990 s, and `owing` says so without taking.
        l.charge("other", 1000, lim);
        let (_, retry) = l.admit("other", 1, lim).unwrap_err();
        assert!(retry > Duration::from_secs(989) && retry <= Duration::from_secs(991), "{retry:?}");
        let owed = l.owing("other", 1, lim).unwrap();
        assert!(owed > Duration::from_secs(989) && owed <= retry, "{owed:?}");
        assert_eq!(l.owing("fresh", 1, lim), None);
        assert_eq!(l.owing("fresh", 11, lim).map(|_| ()), Some(()), "more than a burst is never admitted at once");
        assert_eq!(l.owing("fresh", 1, lim), None, "owing takes nothing");
    }

    #[test]
    fn a_share_is_that_fraction_of_the_rate_burst_and_concurrency() {
        let l = KeyedLimiter::new();
        // A third of 30/s with a burst of 30: a burst of 10, then 10/s.
        let third = limits(30, 30, 9).share(1.0 / 3.0);
        let admitted = (0..30).filter(|_| l.admit("k", 1, third).is_ok()).count();
        assert_eq!(admitted, 10);
        let (limit, retry) = l.admit("k", 1, third).unwrap_err();
        assert_eq!(limit, Limit::Rate);
        assert!(retry > Duration::from_millis(50) && retry <= Duration::from_millis(100), "{retry:?}");
        let _held: Vec<_> = (0..3).map(|_| l.admit("c", 1, third).unwrap()).collect();
        assert_eq!(l.admit("c", 1, third).unwrap_err().0, Limit::Concurrency, "3 of 9 in flight");
        // A sliver still admits one request at a time, never none.
        let sliver = limits(10, 1, 1).share(0.01);
        assert!(l.admit("s", 1, sliver).is_ok());
        assert_eq!(l.admit("s", 1, sliver).unwrap_err().0, Limit::Rate);
        assert_eq!(limits(10, 5, 2).share(1.0), Quota::from(limits(10, 5, 2)));
        assert_eq!(limits(10, 5, 2).share(f64::NAN), Quota::from(limits(10, 5, 2)));
    }

    #[test]
    fn costs_are_dynamodb_units() {
        assert_eq!(Cost::read(0), Cost(1));
        assert_eq!(Cost::read(4096), Cost(1));
        assert_eq!(Cost::read(4097), Cost(2));
        assert_eq!(Cost::write(1), Cost(1));
        assert_eq!(Cost::write(300 * 1024), Cost(300));
    }

    /// A held slot outlives the request's guard and is released when the
    /// holder drops it.
    #[test]
    fn a_held_slot_stays_taken_until_dropped() {
        let l = Arc::new(KeyedLimiter::new());
        let lim = limits(1000, 1000, 1);
        let held = l.admit("k", 1, lim).unwrap().hold(&l).expect("a cap on requests in flight");
        assert_eq!(l.admit("k", 1, lim).unwrap_err().0, Limit::Concurrency);
        drop(held);
        assert!(l.admit("k", 1, lim).is_ok());
        assert!(l.admit("k", 1, limits(1000, 1000, 0)).unwrap().hold(&l).is_none());
    }

    #[test]
    fn requests_in_flight_are_capped_and_released() {
        let l = Arc::new(KeyedLimiter::new());
        let lim = limits(1000, 1000, 2);
        let a = l.admit("k", 1, lim).unwrap();
        let _b = l.admit("k", 1, lim).unwrap();
        assert_eq!(l.admit("k", 1, lim).unwrap_err().0, Limit::Concurrency);
        drop(a);
        assert!(l.admit("k", 1, lim).is_ok());
    }

    #[test]
    fn idle_keys_are_evicted_and_small() {
        let l = Arc::new(KeyedLimiter::new());
        // A whole bucket taken at once: each key stays busy for 10 s.
        let lim = limits(1, 10, 0);
        for i in 0..100_000 {
            l.admit(&format!("tenant-{i}"), 10, lim).unwrap();
        }
        assert_eq!(l.len(), 100_000, "busy keys were evicted");
        let bytes = l.heap_bytes() as f64 / 100_000.0;
        assert!(bytes <= 64.0, "{bytes:.1} bytes per tenant");

        // Keys whose buckets are full again are idle: swept, as they grow
        // and on demand.
        let l = Arc::new(KeyedLimiter::new());
        for i in 0..50_000 {
            l.admit(&format!("tenant-{i}"), 1, limits(1000, 1, 0)).unwrap();
        }
        let _busy = l.admit("busy", 1, limits(1000, 1000, 5)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        l.sweep();
        assert_eq!(l.len(), 1, "only the key with a request in flight is left");
    }

    #[test]
    fn log_lines_are_throttled_per_key() {
        let t = LogThrottle::new();
        assert!(t.allow("acme"));
        assert!(!t.allow("acme"), "a second line within the second");
        assert!(t.allow("globex"));
    }

    #[test]
    fn refusal_status_carries_retry_info_and_quota_failure() {
        let r = Refusal {
            limit: Limit::Rate,
            subject: "tenant:acme".into(),
            description: "10 requests per second, burst 20".into(),
            retry_after: Duration::from_millis(250),
        };
        let s = r.status();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_millis(250)));
        let q = s.get_details_quota_failure().unwrap();
        assert_eq!(q.violations[0].subject, "tenant:acme");
        assert!(s.message().contains("requests_per_second"), "{}", s.message());
    }
}
