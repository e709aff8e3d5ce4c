//! Usage metering: what each tenant used, counted on the hot path for the
//! price of a few atomic additions, and kept in the store so that no flush
//! is ever counted twice.
//!
//! - **Counting.** [`Meters::record`] adds one request's usage to its
//!   tenant's counters (one per RPC for `requests`, one per built-in meter)
//!   under a shared read lock: no allocation once the tenant is known.
//! - **Flushing.** Every flush interval (aligned to the wall clock) the
//!   counters are swapped to zero and their totals filed under the minute
//!   the interval began in. The totals go to one item per (tenant, hour,
//!   replica) — `pk = usage#<tenant>`, `sk = u#<hour>#<replica>` — holding
//!   per-minute values and the sequence number of the last flush applied
//!   to it. A flush is written with a conditional write and skipped where
//!   the item already holds its sequence number, so a flush retried after
//!   a timeout (which may or may not have landed) counts once. Flushes are
//!   applied in order: one whose outcome is unknown is retried before any
//!   newer counts, which wait merged (never merged into the one in doubt).
//!   The replica id is new for every process, so a restarted process never
//!   collides with what its predecessor wrote.
//! - **Losses.** A process killed with -9 loses what it counted since its
//!   last successful flush (one interval, or more while the store is
//!   unreachable); [`Meters::shutdown`] flushes what is left on a graceful
//!   stop.
//! - **Application events** ([`record_event`]) are items of their own,
//!   `sk = e#<meter>#<minute>#<id>`, written after their id is claimed by
//!   a conditional write of an `id#<id>` item: a repeated event is found
//!   by its id and counted once, whatever the replica. (No transaction:
//!   both writes are idempotent, and a retry completes a call that
//!   failed between them.)
//!
//! Reading ([`read_usage`]) sums those items over a time range.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tenantmesh_storage::{Condition, DynTable, StorageError};

pub use crate::schema::{
    BUILT_IN, BYTES_RETURNED, COMPUTE_US, READ_UNITS, REQUESTS, RPC_DIMENSION, STORAGE_BYTE_HOURS, WRITE_UNITS,
    usage_pk,
};
pub use tenantmesh_service::handled::Usage;

use crate::schema::{
    HOUR, HourItem, LATENCY, LATENCY_BOUNDS_US, LATENCY_DIMENSION, MINUTE, REFUSAL_DIMENSION, REFUSAL_LIMITS, REFUSED,
    VALUE_METERS,
};

/// One tenant's counters: `requests` per RPC, then [`VALUE_METERS`], then
/// `refused` per limit ([`REFUSAL_LIMITS`]), then `latency` per bucket
/// ([`LATENCY_BOUNDS_US`]).
struct Counters(Box<[AtomicU64]>);

/// Totals waiting to be written: `(tenant, hour start)` to the values of
/// its item.
#[derive(Debug, Default)]
struct Batch {
    seq: u64,
    rows: BTreeMap<(Arc<str>, i64), BTreeMap<String, i64>>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[derive(Default)]
struct Pending {
    /// Sent, outcome unknown: retried as it is before anything newer.
    in_doubt: Option<Batch>,
    /// Counted, never sent.
    waiting: Batch,
    next_seq: u64,
}

/// What a flush reports to whoever exports usage as metrics.
pub type FlushHook = Box<dyn Fn(&str, &str, u64) + Send + Sync>;

/// One total of a flush, as a [`UsageSink`] receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushedUsage {
    /// Unique to this total of this flush, and the same when the flush is
    /// retried (`<replica>:<seq>:<hour>:<n>`): a sink that deduplicates by
    /// it counts a retried flush once.
    pub id: String,
    pub tenant: Arc<str>,
    /// A built-in meter (`requests`, `read_units`, ...).
    pub meter: &'static str,
    /// For `requests`, the RPC (as the service's meters name it).
    pub rpc: Option<String>,
    /// The minute it was counted in (Unix seconds).
    pub minute: i64,
    pub value: i64,
}

/// Where a service that does not own the usage table sends its flushes
/// (an application service: to the metering service). A flush whose
/// outcome is unknown is sent again with the same ids.
pub trait UsageSink: Send + Sync + 'static {
    fn send(&self, usage: Vec<FlushedUsage>)
    -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// A latency bucket's name: its bound in microseconds, or `inf`.
fn bound_name(bound: u64) -> String {
    if bound == u64::MAX { "inf".to_owned() } else { bound.to_string() }
}

/// Where flushes are written.
enum Destination {
    Table(DynTable),
    Sink(Box<dyn UsageSink>),
}

/// Usage counters of every tenant of this process, and their flushing.
pub struct Meters {
    rpcs: Box<[Box<str>]>,
    tenants: RwLock<HashMap<Arc<str>, Counters>>,
    destination: Destination,
    replica: String,
    interval: Duration,
    pending: tokio::sync::Mutex<Pending>,
    hook: Option<FlushHook>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Meters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meters").field("replica", &self.replica).field("interval", &self.interval).finish()
    }
}

/// Failure of a flush: what is left is retried at the next one.
#[derive(Debug, thiserror::Error)]
#[error("usage flush: {0}")]
pub struct FlushError(#[from] StorageError);

impl Meters {
    /// Meters for a service whose RPCs are `rpcs` (by index in
    /// [`Meters::record`]), flushed to `table` every `interval`. Call
    /// [`Meters::start`] to flush in the background.
    pub fn new(table: DynTable, rpcs: &[impl AsRef<str>], interval: Duration) -> Self {
        Self::to(Destination::Table(table), rpcs, interval)
    }

    /// Meters like [`Meters::new`] whose flushes go to `sink`.
    pub fn with_sink(sink: impl UsageSink, rpcs: &[impl AsRef<str>], interval: Duration) -> Self {
        Self::to(Destination::Sink(Box::new(sink)), rpcs, interval)
    }

    fn to(destination: Destination, rpcs: &[impl AsRef<str>], interval: Duration) -> Self {
        Self {
            rpcs: rpcs.iter().map(|r| r.as_ref().into()).collect(),
            tenants: RwLock::new(HashMap::new()),
            destination,
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            interval: interval.max(Duration::from_millis(10)),
            pending: tokio::sync::Mutex::new(Pending { next_seq: 1, ..Pending::default() }),
            hook: None,
            stop: tokio::sync::watch::channel(false).0,
        }
    }

    /// Calls `hook(tenant, meter, value)` for the totals of every flush.
    pub fn with_hook(mut self, hook: FlushHook) -> Self {
        self.hook = Some(hook);
        self
    }

    #[cfg(test)]
    fn table(&self) -> &DynTable {
        match &self.destination {
            Destination::Table(t) => t,
            Destination::Sink(_) => panic!("meters with a sink"),
        }
    }

    /// This process's replica id (in the keys of what it flushes).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Where the value meters' slots start.
    fn values_at(&self) -> usize {
        self.rpcs.len()
    }

    /// Where the refusals' slots start.
    fn refused_at(&self) -> usize {
        self.values_at() + VALUE_METERS.len()
    }

    /// Where the latency buckets' slots start.
    fn latency_at(&self) -> usize {
        self.refused_at() + REFUSAL_LIMITS.len()
    }

    /// Counts one request of `tenant` to RPC number `rpc` (an index into
    /// the service's RPCs), with its usage and handler time (also counted
    /// in its `latency` bucket).
    pub fn record(&self, tenant: &Arc<str>, rpc: usize, usage: Usage, handler: Duration) {
        let micros = handler.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = self.latency_at()
            + LATENCY_BOUNDS_US.iter().position(|b| micros <= *b).unwrap_or(LATENCY_BOUNDS_US.len() - 1);
        let add = |c: &Counters| {
            let s = &c.0;
            // An index past the RPCs is a caller's bug: counted nowhere
            // rather than as another RPC.
            if rpc < self.rpcs.len() {
                s[rpc].fetch_add(1, Ordering::Relaxed);
                s[bucket].fetch_add(1, Ordering::Relaxed);
            }
            let base = self.rpcs.len();
            for (i, v) in [usage.read_units, usage.write_units, usage.bytes_returned, micros].into_iter().enumerate() {
                if v > 0 {
                    s[base + i].fetch_add(v, Ordering::Relaxed);
                }
            }
        };
        {
            let map = self.tenants.read().expect("meters lock");
            if let Some(c) = map.get(tenant) {
                return add(c);
            }
        }
        self.with_new(tenant, add);
    }

    /// Runs `add` on `tenant`'s counters, made first.
    fn with_new(&self, tenant: &Arc<str>, add: impl Fn(&Counters)) {
        let mut map = self.tenants.write().expect("meters lock");
        let slots = self.latency_at() + LATENCY_BOUNDS_US.len();
        let c = map.entry(tenant.clone()).or_insert_with(|| Counters((0..slots).map(|_| AtomicU64::new(0)).collect()));
        add(c);
    }

    /// Counts one call of `tenant` refused by `limit` (one of
    /// [`REFUSAL_LIMITS`]; another name counts nowhere) before it ran.
    pub fn refused(&self, tenant: &Arc<str>, limit: &str) {
        let Some(i) = REFUSAL_LIMITS.iter().position(|l| *l == limit) else { return };
        let slot = self.refused_at() + i;
        let add = |c: &Counters| {
            c.0[slot].fetch_add(1, Ordering::Relaxed);
        };
        {
            let map = self.tenants.read().expect("meters lock");
            if let Some(c) = map.get(tenant) {
                return add(c);
            }
        }
        self.with_new(tenant, add);
    }

    /// What is counted for `tenant` and not yet flushed: each RPC's
    /// requests by its name, and each value meter by its own (zeros left
    /// out).
    pub fn unflushed(&self, tenant: &str) -> std::collections::BTreeMap<String, u64> {
        let map = self.tenants.read().expect("meters lock");
        let Some(c) = map.get(tenant) else { return Default::default() };
        let refused = REFUSAL_LIMITS.iter().map(|l| format!("{REFUSED}|{REFUSAL_DIMENSION}={l}"));
        let names =
            self.rpcs.iter().map(|r| r.to_string()).chain(VALUE_METERS.iter().map(|m| (*m).to_owned())).chain(refused);
        names.zip(c.0.iter()).map(|(name, v)| (name, v.load(Ordering::Relaxed))).filter(|(_, v)| *v > 0).collect()
    }

    /// Swaps every counter to zero; the totals, filed under the minute
    /// starting at `minute`, join the waiting batch. Tenants with nothing
    /// counted are dropped (their next request adds them again).
    fn collect(&self, minute: i64, waiting: &mut Batch) {
        let mut idle = Vec::new();
        {
            let map = self.tenants.read().expect("meters lock");
            for (tenant, c) in map.iter() {
                let mut any = false;
                let hour = minute - minute.rem_euclid(HOUR);
                let offset = (minute - hour) / MINUTE;
                for (i, slot) in c.0.iter().enumerate() {
                    let v = slot.swap(0, Ordering::Relaxed);
                    if v == 0 {
                        continue;
                    }
                    any = true;
                    let (meter, key) = if i < self.values_at() {
                        (REQUESTS, format!("{offset:02}|{REQUESTS}|{RPC_DIMENSION}={}", self.rpcs[i]))
                    } else if i < self.refused_at() {
                        let m = VALUE_METERS[i - self.values_at()];
                        (m, format!("{offset:02}|{m}"))
                    } else if i < self.latency_at() {
                        let limit = REFUSAL_LIMITS[i - self.refused_at()];
                        (REFUSED, format!("{offset:02}|{REFUSED}|{REFUSAL_DIMENSION}={limit}"))
                    } else {
                        let bound = bound_name(LATENCY_BOUNDS_US[i - self.latency_at()]);
                        (LATENCY, format!("{offset:02}|{LATENCY}|{LATENCY_DIMENSION}={bound}"))
                    };
                    // The buckets are requests counted again: not usage.
                    if let Some(hook) = self.hook.as_ref().filter(|_| meter != LATENCY) {
                        hook(tenant, meter, v);
                    }
                    let row = waiting.rows.entry((tenant.clone(), hour)).or_default();
                    let sum = row.entry(key).or_default();
                    *sum = sum.saturating_add(v.min(i64::MAX as u64) as i64);
                }
                if !any {
                    idle.push(tenant.clone());
                }
            }
        }
        if !idle.is_empty() {
            let mut map = self.tenants.write().expect("meters lock");
            for t in idle {
                // Unless it counted something since.
                if map.get(&t).is_some_and(|c| c.0.iter().all(|s| s.load(Ordering::Relaxed) == 0)) {
                    map.remove(&t);
                }
            }
        }
    }

    /// Counts what is in the counters now under the minute of `minute`
    /// and writes everything pending. On an error the rest stays pending.
    pub async fn flush_at(&self, minute: i64) -> Result<(), FlushError> {
        let mut pending = self.pending.lock().await;
        self.collect(minute - minute.rem_euclid(MINUTE), &mut pending.waiting);
        if let Some(batch) = pending.in_doubt.take()
            && let Err(e) = self.apply(&batch).await
        {
            pending.in_doubt = Some(batch);
            return Err(e);
        }
        if pending.waiting.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut pending.waiting);
        batch.seq = pending.next_seq;
        pending.next_seq += 1;
        let outcome = self.apply(&batch).await;
        if outcome.is_err() {
            pending.in_doubt = Some(batch);
        }
        outcome
    }

    /// Writes every item of `batch` that does not hold it yet (or sends
    /// it to the sink).
    async fn apply(&self, batch: &Batch) -> Result<(), FlushError> {
        let table = match &self.destination {
            Destination::Table(table) => table,
            Destination::Sink(sink) => {
                let usage = self.flushed(batch);
                return sink.send(usage).await.map_err(|e| FlushError(StorageError::Backend(e)));
            }
        };
        let mut set = tokio::task::JoinSet::new();
        let mut first_error = None;
        for ((tenant, hour), values) in &batch.rows {
            if set.len() >= 16
                && let Some(Ok(Err(e))) = set.join_next().await
            {
                first_error.get_or_insert(e);
            }
            let (table, pk) = (table.clone(), usage_pk(tenant));
            let sk = format!("u#{hour:013}#{}", self.replica);
            let (values, seq) = (values.clone(), batch.seq);
            set.spawn(tenantmesh_telemetry::carried(async move { apply_item(&table, &pk, &sk, seq, values).await }));
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// The totals of `batch`, as a sink receives them.
    fn flushed(&self, batch: &Batch) -> Vec<FlushedUsage> {
        let mut usage = Vec::new();
        for ((tenant, hour), values) in &batch.rows {
            for (n, (key, value)) in values.iter().enumerate() {
                // `<offset>|<meter>` or `<offset>|requests|rpc=<path>`.
                let mut parts = key.splitn(3, '|');
                let offset: i64 = parts.next().and_then(|o| o.parse().ok()).unwrap_or(0);
                let Some(meter) = parts.next().and_then(|m| BUILT_IN.iter().copied().find(|b| *b == m)) else {
                    continue;
                };
                let rpc = parts.next().and_then(|d| d.strip_prefix(&format!("{RPC_DIMENSION}="))).map(str::to_owned);
                usage.push(FlushedUsage {
                    id: format!("{}:{}:{hour}:{n}", self.replica, batch.seq),
                    tenant: tenant.clone(),
                    meter,
                    rpc,
                    minute: hour + offset * MINUTE,
                    value: *value,
                });
            }
        }
        usage
    }

    /// Flushes every interval (aligned to the wall clock) until
    /// [`Meters::shutdown`].
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut stop = self.stop.subscribe();
        let interval = self.interval.as_millis().max(1) as u64;
        let now_ms = || tenantmesh_service::clock::now_ms().max(0) as u64;
        tenantmesh_telemetry::spawn(async move {
            let mut began = now_ms();
            loop {
                let now = now_ms();
                let next = (now / interval + 1) * interval;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(next - now)) => {}
                    _ = stop.changed() => return,
                }
                let Some(meters) = weak.upgrade() else { return };
                if let Err(e) = meters.flush_at((began / 1000) as i64).await {
                    tracing::warn!(error = %e, "usage not flushed; it stays counted and is retried at the next flush");
                }
                began = next;
            }
        });
    }

    /// Stops the background flushes and writes what is left (a graceful
    /// shutdown loses no usage), trying a few times.
    pub async fn shutdown(&self) -> Result<(), FlushError> {
        self.stop.send_replace(true);
        let mut last = Ok(());
        for attempt in 0..3 {
            last = self.flush_at(tenantmesh_service::clock::now_secs()).await;
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        last
    }
}

/// Adds `values` to the item at `(pk, sk)` unless it holds flush `seq`
/// already; a conflict (another write of the same item) is read again.
async fn apply_item(
    table: &DynTable,
    pk: &str,
    sk: &str,
    seq: u64,
    values: BTreeMap<String, i64>,
) -> Result<(), StorageError> {
    for _ in 0..5 {
        let current = table.get(pk, sk).await?;
        let (mut item, condition) = match &current {
            Some(raw) => (
                serde_json::from_slice::<HourItem>(&raw.data)
                    .map_err(|e| StorageError::Invalid(format!("usage item {pk}/{sk}: {e}")))?,
                Condition::Version(raw.version),
            ),
            None => (HourItem::default(), Condition::NotExists),
        };
        if item.seq >= seq {
            return Ok(());
        }
        for (k, v) in &values {
            let sum = item.values.entry(k.clone()).or_default();
            *sum = sum.saturating_add(*v);
        }
        item.seq = seq;
        let data = serde_json::to_vec(&item).map_err(|e| StorageError::Invalid(e.to_string()))?;
        match table.put(pk, sk, data, condition).await {
            Ok(_) => return Ok(()),
            Err(StorageError::ConditionFailed { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Backend(format!("usage item {pk}/{sk}: changed under every attempt")))
}

#[cfg(test)]
mod tests;
