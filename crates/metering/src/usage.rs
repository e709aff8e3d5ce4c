//! What else is kept besides the flushed counts, and reading it back:
//! application events (each counted once, whatever the retries), storage
//! samples, reading usage by window, and expiring it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, Pages, Query, StorageError};

use crate::schema::*;

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
