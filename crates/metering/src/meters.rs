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

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, Pages, Query, StorageError};

/// The built-in meters, in slot order after the per-RPC request counters.
pub const READ_UNITS: &str = "read_units";
pub const WRITE_UNITS: &str = "write_units";
pub const BYTES_RETURNED: &str = "bytes_returned";
pub const COMPUTE_US: &str = "compute_us";
pub const REQUESTS: &str = "requests";
/// Stored item bytes × hours, from periodic samples ([`file_sample`]).
pub const STORAGE_BYTE_HOURS: &str = "storage_byte_hours";
/// Every built-in meter (reserved: applications cannot record them).
pub const BUILT_IN: &[&str] = &[REQUESTS, READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US, STORAGE_BYTE_HOURS];
/// The meters counted per request (the others come from samples).
const COUNTED: &[&str] = &[REQUESTS, READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US];
const VALUE_METERS: &[&str] = &[READ_UNITS, WRITE_UNITS, BYTES_RETURNED, COMPUTE_US];

/// The dimension of `requests` that names the RPC.
pub const RPC_DIMENSION: &str = "rpc";

/// Minute and hour in seconds.
const MINUTE: i64 = 60;
const HOUR: i64 = 3600;

pub use tenantmesh_service::handled::Usage;

/// One tenant's counters: `requests` per RPC, then [`VALUE_METERS`].
struct Counters(Box<[AtomicU64]>);

/// The partition of a tenant's usage.
pub fn usage_pk(tenant: &str) -> String {
    format!("usage#{tenant}")
}

/// A flushed hour: values by `"<minute of the hour>|<meter>[|rpc=<name>]"`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HourItem {
    /// The last flush applied.
    seq: u64,
    values: BTreeMap<String, i64>,
}

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

/// Usage counters of every tenant of this process, and their flushing.
pub struct Meters {
    rpcs: Box<[Box<str>]>,
    tenants: RwLock<HashMap<Arc<str>, Counters>>,
    table: DynTable,
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
        Self {
            rpcs: rpcs.iter().map(|r| r.as_ref().into()).collect(),
            tenants: RwLock::new(HashMap::new()),
            table,
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

    /// This process's replica id (in the keys of what it flushes).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Counts one request of `tenant` to RPC number `rpc` (an index into
    /// the service's RPCs), with its usage and handler time.
    pub fn record(&self, tenant: &Arc<str>, rpc: usize, usage: Usage, handler: Duration) {
        let add = |c: &Counters| {
            let s = &c.0;
            // An index past the RPCs is a caller's bug: counted nowhere
            // rather than as another RPC.
            if let Some(count) = s.get(rpc).filter(|_| rpc < self.rpcs.len()) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            let base = self.rpcs.len();
            for (i, v) in [usage.read_units, usage.write_units, usage.bytes_returned, handler.as_micros() as u64]
                .into_iter()
                .enumerate()
            {
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
        let mut map = self.tenants.write().expect("meters lock");
        let slots = self.rpcs.len() + VALUE_METERS.len();
        let c = map.entry(tenant.clone()).or_insert_with(|| Counters((0..slots).map(|_| AtomicU64::new(0)).collect()));
        add(c);
    }

    /// What is counted for `tenant` and not yet flushed: each RPC's
    /// requests by its name, and each value meter by its own (zeros left
    /// out).
    pub fn unflushed(&self, tenant: &str) -> std::collections::BTreeMap<String, u64> {
        let map = self.tenants.read().expect("meters lock");
        let Some(c) = map.get(tenant) else { return Default::default() };
        let names = self.rpcs.iter().map(|r| &**r).chain(VALUE_METERS.iter().copied());
        names
            .zip(c.0.iter())
            .map(|(name, v)| (name.to_owned(), v.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect()
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
                    let (meter, key) = if i < self.rpcs.len() {
                        (REQUESTS, format!("{offset:02}|{REQUESTS}|{RPC_DIMENSION}={}", self.rpcs[i]))
                    } else {
                        let m = VALUE_METERS[i - self.rpcs.len()];
                        (m, format!("{offset:02}|{m}"))
                    };
                    if let Some(hook) = &self.hook {
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

    /// Writes every item of `batch` that does not hold it yet.
    async fn apply(&self, batch: &Batch) -> Result<(), FlushError> {
        let mut set = tokio::task::JoinSet::new();
        let mut first_error = None;
        for ((tenant, hour), values) in &batch.rows {
            if set.len() >= 16
                && let Some(Ok(Err(e))) = set.join_next().await
            {
                first_error.get_or_insert(e);
            }
            let (table, pk) = (self.table.clone(), usage_pk(tenant));
            let sk = format!("u#{hour:013}#{}", self.replica);
            let (values, seq) = (values.clone(), batch.seq);
            set.spawn(async move { apply_item(&table, &pk, &sk, seq, values).await });
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

    /// Flushes every interval (aligned to the wall clock) until
    /// [`Meters::shutdown`].
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut stop = self.stop.subscribe();
        let interval = self.interval.as_millis().max(1) as u64;
        let now_ms = || tenantmesh_service::clock::now_ms().max(0) as u64;
        tokio::spawn(async move {
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

/// One application usage event, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub tenant: String,
    pub meter: String,
    pub value: i64,
    /// Unix seconds.
    pub time: i64,
    pub dimensions: BTreeMap<String, String>,
    /// A correction by the platform admin (the only events whose value
    /// may be negative).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub correction: bool,
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    Recorded,
    /// The same event was recorded before: counted once.
    Duplicate,
    /// Another event was recorded under its id.
    Conflict,
}

fn event_sk(e: &Event) -> String {
    let minute = e.time - e.time.rem_euclid(MINUTE);
    format!("e#{}#{minute:013}#{}", e.meter, e.id)
}

/// Records one event unless its id is known. The id is claimed first (a
/// conditional write of `id#<id>` holding the whole event), then the event
/// is written where reads find it; both writes are idempotent, so an event
/// whose id was claimed by a call that then failed is completed by the
/// retry (same payload), and a different payload under the id is refused.
pub async fn record_event(table: &DynTable, event: &Event) -> Result<EventOutcome, StorageError> {
    let pk = usage_pk(&event.tenant);
    let id_sk = format!("id#{}", event.id);
    let data = serde_json::to_vec(event).map_err(|e| StorageError::Invalid(e.to_string()))?;
    let outcome = match table.put(&pk, &id_sk, data.clone(), Condition::NotExists).await {
        Ok(_) => EventOutcome::Recorded,
        Err(StorageError::ConditionFailed { .. }) => {
            let known = table
                .get(&pk, &id_sk)
                .await?
                .ok_or_else(|| StorageError::Backend(format!("usage event {}: its id vanished", event.id)))?;
            let known: Event = serde_json::from_slice(&known.data)
                .map_err(|e| StorageError::Invalid(format!("usage event {}: {e}", event.id)))?;
            if known != *event {
                return Ok(EventOutcome::Conflict);
            }
            EventOutcome::Duplicate
        }
        Err(e) => return Err(e),
    };
    // The same bytes at the same key, however often: counted once.
    table.put(&pk, &event_sk(event), data, Condition::None).await?;
    Ok(outcome)
}

/// A tenant's stored bytes, measured for the interval starting at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix seconds.
    pub start: i64,
    /// The interval's length in seconds.
    pub secs: i64,
    pub bytes: u64,
}

impl Sample {
    /// Byte-hours of the interval, rounded to the nearest.
    pub fn byte_hours(&self) -> i64 {
        ((u128::from(self.bytes) * self.secs.max(0) as u128 + (HOUR as u128 / 2)) / HOUR as u128) as i64
    }
}

fn sample_sk(start: i64) -> String {
    format!("s#{start:013}")
}

/// Whether the interval starting at `start` is filed for `tenant` already.
pub async fn sample_filed(table: &DynTable, tenant: &str, start: i64) -> Result<bool, StorageError> {
    Ok(table.get(&usage_pk(tenant), &sample_sk(start)).await?.is_some())
}

/// Files `sample` unless the interval is filed already (by any replica):
/// whether this call filed it.
pub async fn file_sample(table: &DynTable, tenant: &str, sample: &Sample) -> Result<bool, StorageError> {
    let data = serde_json::to_vec(sample).map_err(|e| StorageError::Invalid(e.to_string()))?;
    match table.put(&usage_pk(tenant), &sample_sk(sample.start), data, Condition::NotExists).await {
        Ok(_) => Ok(true),
        Err(StorageError::ConditionFailed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Usage of one window, of one meter with one set of dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUsage {
    pub meter: String,
    /// Start of the window, Unix seconds.
    pub start: i64,
    pub dimensions: BTreeMap<String, String>,
    pub value: i64,
}

/// What to read of a tenant's usage.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    /// One meter, or every meter.
    pub meter: Option<&'a str>,
    /// `[from, to)`, Unix seconds.
    pub from: i64,
    pub to: i64,
    /// Window length in seconds: windows start at its multiples (UTC);
    /// `i64::MAX` sums the whole range in one window starting at 0.
    pub window: i64,
    /// The dimensions kept apart (the others are summed); `None`: all.
    pub group_by: Option<&'a [String]>,
    /// Most rows (windows x meters x dimension sets) held: past it the
    /// read stops with [`ReadError::TooManyRows`].
    pub max_rows: usize,
}

/// Why usage could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the range holds more than {0} rows of usage (windows x meters x dimension sets)")]
    TooManyRows(usize),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Largest page read at once.
const PAGE: usize = 1000;

async fn scan(
    table: &DynTable,
    pk: &str,
    prefix: &str,
    start_after: Option<String>,
    mut each: impl FnMut(&str, &[u8]) -> Result<bool, ReadError>,
) -> Result<(), ReadError> {
    let mut pages = Pages::new(table.as_ref(), pk, prefix, PAGE).after(start_after);
    while let Some(items) = pages.next().await? {
        for item in &items {
            if !each(&item.sk, &item.data)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The meters with application events for `pk`, each found by one query
/// (a skip over the events of the ones before).
async fn event_meters(table: &DynTable, pk: &str) -> Result<Vec<String>, StorageError> {
    let (mut meters, mut after) = (Vec::new(), None::<String>);
    loop {
        let q = Query { pk: pk.to_owned(), sk_prefix: "e#".into(), start_after: after.take(), limit: 1 };
        let Some(first) = table.query(q).await?.items.into_iter().next() else { return Ok(meters) };
        let Some(meter) = first.sk.strip_prefix("e#").and_then(|r| r.split('#').next()).map(str::to_owned) else {
            return Err(StorageError::Invalid(format!("usage item {pk}/{}: bad key", first.sk)));
        };
        // '~' sorts after every minute: the next key is another meter's.
        after = Some(format!("e#{meter}#~"));
        meters.push(meter);
    }
}

/// Sums into rows, at most `max` of them.
struct Rows<'a> {
    read: Read<'a>,
    sums: BTreeMap<(i64, String, BTreeMap<String, String>), i64>,
}

impl Rows<'_> {
    /// Adds `value` of `meter` at `at` (Unix seconds) with `dims`, if it
    /// is in range.
    fn add(&mut self, meter: &str, at: i64, dims: BTreeMap<String, String>, value: i64) -> Result<(), ReadError> {
        let r = &self.read;
        if at < r.from || at >= r.to || r.meter.is_some_and(|m| m != meter) {
            return Ok(());
        }
        let start = if r.window == i64::MAX { 0 } else { at - at.rem_euclid(r.window) };
        let dims = match r.group_by {
            Some(keep) => dims.into_iter().filter(|(k, _)| keep.contains(k)).collect(),
            None => dims,
        };
        let key = (start, meter.to_owned(), dims);
        let full = self.sums.len() >= r.max_rows;
        match self.sums.get_mut(&key) {
            Some(sum) => *sum = sum.saturating_add(value),
            None if full => return Err(ReadError::TooManyRows(r.max_rows)),
            None => {
                self.sums.insert(key, value);
            }
        }
        Ok(())
    }
}

/// `tenant`'s usage of one meter or every meter (built-in and
/// application meters alike) in `[from, to)`, summed over replicas into
/// windows as it is read: what is held is the rows returned, never the
/// minutes read. Hour items and samples are found by time; application
/// events by time within each meter. Sums saturate instead of wrapping.
pub async fn read_usage(table: &DynTable, tenant: &str, read: Read<'_>) -> Result<Vec<WindowUsage>, ReadError> {
    let pk = usage_pk(tenant);
    let (from, to, meter) = (read.from, read.to, read.meter);
    let mut rows = Rows { read, sums: BTreeMap::new() };
    let bad = |sk: &str, e: String| ReadError::Storage(StorageError::Invalid(format!("usage item {pk}/{sk}: {e}")));
    let first_hour = from - from.rem_euclid(HOUR);
    if meter.is_none_or(|m| COUNTED.contains(&m)) {
        // Hours before the first one sort before "u#<first - 1 hour>#~".
        let start = (first_hour > 0).then(|| format!("u#{:013}#~", first_hour - HOUR));
        scan(table, &pk, "u#", start, |sk, data| {
            let hour: i64 = sk.get(2..15).and_then(|h| h.parse().ok()).ok_or_else(|| bad(sk, "bad key".into()))?;
            if hour >= to {
                return Ok(false);
            }
            let item: HourItem = serde_json::from_slice(data).map_err(|e| bad(sk, e.to_string()))?;
            for (key, value) in item.values {
                let mut parts = key.split('|');
                let offset: i64 = parts.next().and_then(|o| o.parse().ok()).unwrap_or_default();
                let m = parts.next().unwrap_or_default();
                let dims = parts.filter_map(|d| d.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                rows.add(m, hour + offset * MINUTE, dims, value)?;
            }
            Ok(true)
        })
        .await?;
    }
    if meter.is_none_or(|m| m == STORAGE_BYTE_HOURS) {
        let start = (from > 0).then(|| format!("s#{:013}#", from - 1));
        scan(table, &pk, "s#", start, |sk, data| {
            let s: Sample = serde_json::from_slice(data).map_err(|e| bad(sk, e.to_string()))?;
            if s.start >= to {
                return Ok(false);
            }
            // In the range by its own second; filed under its minute.
            rows.add(STORAGE_BYTE_HOURS, s.start, BTreeMap::new(), s.byte_hours())?;
            Ok(true)
        })
        .await?;
    }
    if meter.is_none_or(|m| !BUILT_IN.contains(&m)) {
        let meters = match meter {
            Some(m) => vec![m.to_owned()],
            None => event_meters(table, &pk).await?,
        };
        let from_minute = from - from.rem_euclid(MINUTE);
        for m in meters {
            // Keys are e#<meter>#<minute>#<id>: the first minute of the
            // range and on, in time order.
            let start = Some(format!("e#{m}#{from_minute:013}"));
            scan(table, &pk, &format!("e#{m}#"), start, |sk, data| {
                let e: Event = serde_json::from_slice(data).map_err(|e| bad(sk, e.to_string()))?;
                let minute = e.time - e.time.rem_euclid(MINUTE);
                if minute >= to {
                    return Ok(false);
                }
                rows.add(&e.meter, minute, e.dimensions, e.value)?;
                Ok(true)
            })
            .await?;
        }
    }
    Ok(rows
        .sums
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|((start, meter, dimensions), value)| WindowUsage { meter, start, dimensions, value })
        .collect())
}

/// Deletes `tenant`'s usage that ended before `before` (Unix seconds):
/// hours, samples and application events, with the ids of those events
/// (an event that old is refused as late anyway). Reads from the oldest
/// on and stops at the first item to keep. How many items it deleted.
pub async fn expire_usage(table: &DynTable, tenant: &str, before: i64) -> Result<u32, StorageError> {
    let pk = usage_pk(tenant);
    // When a key's usage ends: an hour item `u#<hour>#..` with its hour; a
    // sample `s#<start>` is kept while it started at `before` or later.
    let ends = |sk: &str| -> Option<i64> {
        let start: i64 = sk.get(2..15)?.parse().ok()?;
        Some(if sk.starts_with("u#") { start + HOUR } else { start + 1 })
    };
    let mut deleted = 0;
    for prefix in ["u#", "s#"] {
        let mut pages = Pages::new(table.as_ref(), pk.clone(), prefix, PAGE);
        while let Some(items) = pages.next().await? {
            let old: Vec<&str> =
                items.iter().map(|i| i.sk.as_str()).take_while(|sk| ends(sk).is_some_and(|t| t <= before)).collect();
            for sk in &old {
                deleted += u32::from(table.delete(&pk, sk, Condition::None).await?.is_some());
            }
            if old.len() < items.len() {
                break;
            }
        }
    }
    for meter in event_meters(table, &pk).await? {
        let prefix = format!("e#{meter}#");
        let mut pages = Pages::new(table.as_ref(), pk.clone(), prefix, PAGE);
        while let Some(items) = pages.next().await? {
            let mut kept = false;
            for item in &items {
                // e#<meter>#<minute>#<id>
                let mut parts = item.sk.splitn(4, '#').skip(2);
                let (minute, id) = (parts.next().and_then(|m| m.parse::<i64>().ok()), parts.next());
                match (minute, id) {
                    (Some(m), Some(id)) if m + MINUTE <= before => {
                        table.delete(&pk, &format!("id#{id}"), Condition::None).await?;
                        deleted += u32::from(table.delete(&pk, &item.sk, Condition::None).await?.is_some());
                    }
                    _ => {
                        kept = true;
                        break;
                    }
                }
            }
            if kept {
                break;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::EmbeddedTable;

    const RPCS: &[&str] = &["Get", "Put"];

    fn table(dir: &tempfile::TempDir) -> DynTable {
        EmbeddedTable::open_shared(dir.path().join("usage.redb")).unwrap()
    }

    fn total(rows: &[WindowUsage], meter: &str) -> i64 {
        rows.iter().filter(|r| r.meter == meter).map(|r| r.value).sum()
    }

    /// Every minute of `tenant`'s usage of `meter` (every meter: `None`).
    async fn read_usage(
        table: &DynTable,
        tenant: &str,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<WindowUsage>, ReadError> {
        let read = Read { meter, from, to, window: MINUTE, group_by: None, max_rows: 100_000 };
        super::read_usage(table, tenant, read).await
    }

    #[test]
    fn units_follow_dynamodb_per_item() {
        assert_eq!(Usage::read([0, 4096, 4097], 10).read_units, 1 + 1 + 2);
        assert_eq!(Usage::write(1, 0).write_units, 1);
        assert_eq!(Usage::write(300 * 1024 + 1, 0).write_units, 301);
    }

    #[tokio::test]
    async fn counts_are_flushed_once_per_minute_and_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let meters = Meters::new(table(&dir), RPCS, Duration::from_secs(10));
        let (a, b): (Arc<str>, Arc<str>) = ("acme".into(), "bolt".into());
        for _ in 0..3 {
            meters.record(&a, 0, Usage::read([5000], 5000), Duration::from_micros(7));
        }
        meters.record(&b, 1, Usage::write(10, 0), Duration::ZERO);
        let minute = 1_700_000_040;
        meters.flush_at(minute).await.unwrap();
        meters.record(&a, 1, Usage::write(2048, 0), Duration::ZERO);
        meters.flush_at(minute + 60).await.unwrap();
        // Nothing new: nothing written, nothing counted twice.
        meters.flush_at(minute + 60).await.unwrap();

        let rows = read_usage(&meters.table, "acme", None, minute, minute + 120).await.unwrap();
        assert_eq!(total(&rows, REQUESTS), 4);
        assert_eq!(total(&rows, READ_UNITS), 6);
        assert_eq!(total(&rows, WRITE_UNITS), 2);
        assert_eq!(total(&rows, BYTES_RETURNED), 15000);
        assert_eq!(total(&rows, COMPUTE_US), 21);
        let gets: Vec<_> = rows.iter().filter(|r| r.meter == REQUESTS).map(|r| (r.start, r.value)).collect();
        assert_eq!(gets, [(minute, 3), (minute + 60, 1)]);
        assert_eq!(rows.iter().find(|r| r.meter == REQUESTS).unwrap().dimensions["rpc"], "Get");
        // Only the range asked for, only the tenant asked for.
        let later = read_usage(&meters.table, "acme", Some(REQUESTS), minute + 60, minute + 61).await.unwrap();
        assert_eq!(total(&later, REQUESTS), 1);
        let bolt = read_usage(&meters.table, "bolt", None, 0, i64::MAX / 2).await.unwrap();
        assert_eq!((total(&bolt, REQUESTS), total(&bolt, WRITE_UNITS), total(&bolt, READ_UNITS)), (1, 1, 0));
    }

    /// A flush whose write landed but whose answer was lost is sent again:
    /// the item already holds its sequence number, so it counts once.
    #[tokio::test]
    async fn a_repeated_flush_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&dir);
        let mut values = BTreeMap::new();
        values.insert("00|read_units".to_owned(), 5);
        for _ in 0..3 {
            apply_item(&t, "usage#acme", "u#0000000003600#r1", 1, values.clone()).await.unwrap();
        }
        apply_item(&t, "usage#acme", "u#0000000003600#r1", 2, values.clone()).await.unwrap();
        apply_item(&t, "usage#acme", "u#0000000003600#r1", 2, values).await.unwrap();
        let rows = read_usage(&t, "acme", Some(READ_UNITS), 0, 7200).await.unwrap();
        assert_eq!(total(&rows, READ_UNITS), 10);
    }

    #[tokio::test]
    async fn an_interval_of_stored_bytes_is_filed_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&dir);
        let s = Sample { start: 7200, secs: 3600, bytes: 5000 };
        assert!(!sample_filed(&t, "acme", 7200).await.unwrap());
        assert!(file_sample(&t, "acme", &s).await.unwrap());
        assert!(!file_sample(&t, "acme", &Sample { bytes: 9999, ..s }).await.unwrap(), "another replica's sample");
        assert!(sample_filed(&t, "acme", 7200).await.unwrap());
        file_sample(&t, "acme", &Sample { start: 10_800, secs: 1800, bytes: 1000 }).await.unwrap();
        let rows = read_usage(&t, "acme", Some(STORAGE_BYTE_HOURS), 7200, 10_801).await.unwrap();
        assert_eq!(total(&rows, STORAGE_BYTE_HOURS), 5000 + 500);
        let first = read_usage(&t, "acme", None, 7200, 10_800).await.unwrap();
        assert_eq!(total(&first, STORAGE_BYTE_HOURS), 5000);
        assert_eq!(Sample { start: 0, secs: 1, bytes: 1800 }.byte_hours(), 1);
    }

    #[tokio::test]
    async fn events_count_once_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&dir);
        let e = Event {
            id: "e1".into(),
            tenant: "acme".into(),
            meter: "emails".into(),
            value: 3,
            time: 1_700_000_000,
            dimensions: [("plan".to_owned(), "x".to_owned())].into(),
            correction: false,
        };
        assert_eq!(record_event(&t, &e).await.unwrap(), EventOutcome::Recorded);
        assert_eq!(record_event(&t, &e).await.unwrap(), EventOutcome::Duplicate);
        let other = Event { value: 4, ..e.clone() };
        assert_eq!(record_event(&t, &other).await.unwrap(), EventOutcome::Conflict);
        let fix = Event { id: "e2".into(), value: -1, correction: true, ..e.clone() };
        assert_eq!(record_event(&t, &fix).await.unwrap(), EventOutcome::Recorded);
        let rows = read_usage(&t, "acme", Some("emails"), 1_699_999_980, 1_700_000_040).await.unwrap();
        assert_eq!(total(&rows, "emails"), 2);
        assert!(read_usage(&t, "bolt", Some("emails"), 0, i64::MAX / 2).await.unwrap().is_empty());
    }

    fn event(id: &str, meter: &str, time: i64, value: i64, dims: &[(&str, &str)]) -> Event {
        Event {
            id: id.into(),
            tenant: "acme".into(),
            meter: meter.into(),
            value,
            time,
            dimensions: dims.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            correction: false,
        }
    }

    /// Usage is summed into windows as it is read: a day of per-minute
    /// events in one window is one row; asking for more rows than the cap
    /// stops with TooManyRows; meters whose names share a prefix stay apart
    /// and each is read from the start of the range on.
    #[tokio::test]
    async fn reads_hold_the_rows_returned_not_the_minutes_read() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&dir);
        // A day boundary (UTC).
        let day = 1_700_006_400;
        for m in 0..(24 * 60) {
            let plan = if m % 2 == 0 { "a" } else { "b" };
            record_event(&t, &event(&format!("e{m}"), "emails", day + m * 60, 1, &[("plan", plan)])).await.unwrap();
        }
        record_event(&t, &event("x1", "emails.sent", day + 60, 5, &[])).await.unwrap();
        record_event(&t, &event("old", "emails", day - 86_400, 100, &[])).await.unwrap();
        let read = |window: i64, group_by: Option<&'static [String]>, max_rows: usize| Read {
            meter: None,
            from: day,
            to: day + 86_400,
            window,
            group_by,
            max_rows,
        };
        let none: &'static [String] = &[];
        let rows = super::read_usage(&t, "acme", read(86_400, Some(none), 10)).await.unwrap();
        let got: Vec<_> = rows.iter().map(|r| (r.meter.as_str(), r.start, r.value)).collect();
        assert_eq!(got, [("emails", day, 24 * 60), ("emails.sent", day, 5)]);
        // Kept apart by plan: two rows of emails.
        let rows = super::read_usage(&t, "acme", read(i64::MAX, None, 10)).await.unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        // Minutes of a day are 1441 rows: over a cap of 1000.
        let over = super::read_usage(&t, "acme", read(60, Some(none), 1000)).await.unwrap_err();
        assert!(matches!(over, ReadError::TooManyRows(1000)), "{over:?}");
        // One meter, from its first minute in the range.
        let one = Read { meter: Some("emails"), from: day + 3600, ..read(i64::MAX, Some(none), 10) };
        assert_eq!(total(&super::read_usage(&t, "acme", one).await.unwrap(), "emails"), 24 * 60 - 60);
        // Sums saturate rather than wrap.
        record_event(&t, &event("big1", "big", day, i64::MAX, &[])).await.unwrap();
        record_event(&t, &event("big2", "big", day + 60, i64::MAX, &[])).await.unwrap();
        let big = Read { meter: Some("big"), ..read(i64::MAX, Some(none), 10) };
        assert_eq!(total(&super::read_usage(&t, "acme", big).await.unwrap(), "big"), i64::MAX);
    }

    /// Usage past its retention goes, hour items, samples and events with
    /// their ids; what is younger stays.
    #[tokio::test]
    async fn old_usage_expires() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(&dir);
        let meters = Meters::new(t.clone(), RPCS, Duration::from_secs(10));
        let (a, now): (Arc<str>, i64) = ("acme".into(), 1_700_000_000 - 1_700_000_000 % 3600);
        for hour in [now - 7200, now - 3600, now] {
            meters.record(&a, 0, Usage::default(), Duration::ZERO);
            meters.flush_at(hour).await.unwrap();
            file_sample(&t, "acme", &Sample { start: hour, secs: 3600, bytes: 10 }).await.unwrap();
            record_event(&t, &event(&format!("e{hour}"), "emails", hour, 1, &[])).await.unwrap();
        }
        // Everything that ended by `now - 3600`: the first hour of each.
        let deleted = expire_usage(&t, "acme", now - 3600).await.unwrap();
        assert_eq!(deleted, 3);
        let rows = read_usage(&t, "acme", None, 0, now + 3600).await.unwrap();
        assert_eq!((total(&rows, REQUESTS), total(&rows, "emails")), (2, 2));
        assert_eq!(total(&rows, STORAGE_BYTE_HOURS), 20);
        // The expired event's id went with it: the same event again is new (and late, upstream).
        let again = record_event(&t, &event(&format!("e{}", now - 7200), "emails", now - 7200, 1, &[])).await.unwrap();
        assert_eq!(again, EventOutcome::Recorded);
    }
}
