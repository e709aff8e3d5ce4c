//! Unit tests of [`super`].

use super::*;
use crate::schema::{LATENCY, MINUTE, REFUSED};
use crate::usage::*;
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
    crate::usage::read_usage(table, tenant, read).await
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

    let rows = read_usage(meters.table(), "acme", None, minute, minute + 120).await.unwrap();
    assert_eq!(total(&rows, REQUESTS), 4);
    assert_eq!(total(&rows, READ_UNITS), 6);
    assert_eq!(total(&rows, WRITE_UNITS), 2);
    assert_eq!(total(&rows, BYTES_RETURNED), 15000);
    assert_eq!(total(&rows, COMPUTE_US), 21);
    let gets: Vec<_> = rows.iter().filter(|r| r.meter == REQUESTS).map(|r| (r.start, r.value)).collect();
    assert_eq!(gets, [(minute, 3), (minute + 60, 1)]);
    assert_eq!(rows.iter().find(|r| r.meter == REQUESTS).unwrap().dimensions["rpc"], "Get");
    // Only the range asked for, only the tenant asked for.
    let later = read_usage(meters.table(), "acme", Some(REQUESTS), minute + 60, minute + 61).await.unwrap();
    assert_eq!(total(&later, REQUESTS), 1);
    let bolt = read_usage(meters.table(), "bolt", None, 0, i64::MAX / 2).await.unwrap();
    assert_eq!((total(&bolt, REQUESTS), total(&bolt, WRITE_UNITS), total(&bolt, READ_UNITS)), (1, 1, 0));
}

/// Each request is counted in the bucket of its time, flushed as `latency`
/// with the bucket's bound as its dimension.
#[tokio::test]
async fn requests_are_counted_by_latency_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let meters = Meters::new(table(&dir), RPCS, Duration::from_secs(10));
    let a: Arc<str> = "acme".into();
    for micros in [100, 250, 251, 40_000, 5_000_000] {
        meters.record(&a, 0, Usage::default(), Duration::from_micros(micros));
    }
    let minute = 1_700_000_040;
    meters.flush_at(minute).await.unwrap();
    let rows = read_usage(meters.table(), "acme", Some(LATENCY), minute, minute + 60).await.unwrap();
    let mut buckets: Vec<(String, i64)> = rows.iter().map(|r| (r.dimensions["le_us"].clone(), r.value)).collect();
    buckets.sort();
    assert_eq!(buckets, [("250".into(), 2), ("500".into(), 1), ("50000".into(), 1), ("inf".into(), 1)]);
}

/// Refusals are counted per tenant and limit, flushed as `refused` with the
/// limit as its dimension; an unknown limit counts nowhere.
#[tokio::test]
async fn refusals_are_counted_by_limit() {
    let dir = tempfile::tempdir().unwrap();
    let meters = Meters::new(table(&dir), RPCS, Duration::from_secs(10));
    let a: Arc<str> = "acme".into();
    for _ in 0..3 {
        meters.refused(&a, "requests_per_second");
    }
    meters.refused(&a, "max_concurrency");
    meters.refused(&a, "no such limit");
    assert_eq!(meters.unflushed("acme").get("refused|limit=requests_per_second"), Some(&3));
    let minute = 1_700_000_040;
    meters.flush_at(minute).await.unwrap();
    let rows = read_usage(meters.table(), "acme", Some(REFUSED), minute, minute + 60).await.unwrap();
    let mut by_limit: Vec<(String, i64)> = rows.iter().map(|r| (r.dimensions["limit"].clone(), r.value)).collect();
    by_limit.sort();
    assert_eq!(by_limit, [("max_concurrency".to_owned(), 1), ("requests_per_second".to_owned(), 3)]);
    assert_eq!(total(&read_usage(meters.table(), "acme", None, minute, minute + 60).await.unwrap(), REQUESTS), 0);
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
    let rows = crate::usage::read_usage(&t, "acme", read(86_400, Some(none), 10)).await.unwrap();
    let got: Vec<_> = rows.iter().map(|r| (r.meter.as_str(), r.start, r.value)).collect();
    assert_eq!(got, [("emails", day, 24 * 60), ("emails.sent", day, 5)]);
    // Kept apart by plan: two rows of emails.
    let rows = crate::usage::read_usage(&t, "acme", read(i64::MAX, None, 10)).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    // Minutes of a day are 1441 rows: over a cap of 1000.
    let over = crate::usage::read_usage(&t, "acme", read(60, Some(none), 1000)).await.unwrap_err();
    assert!(matches!(over, ReadError::TooManyRows(1000)), "{over:?}");
    // One meter, from its first minute in the range.
    let one = Read { meter: Some("emails"), from: day + 3600, ..read(i64::MAX, Some(none), 10) };
    assert_eq!(total(&crate::usage::read_usage(&t, "acme", one).await.unwrap(), "emails"), 24 * 60 - 60);
    // Sums saturate rather than wrap.
    record_event(&t, &event("big1", "big", day, i64::MAX, &[])).await.unwrap();
    record_event(&t, &event("big2", "big", day + 60, i64::MAX, &[])).await.unwrap();
    let big = Read { meter: Some("big"), ..read(i64::MAX, Some(none), 10) };
    assert_eq!(total(&crate::usage::read_usage(&t, "acme", big).await.unwrap(), "big"), i64::MAX);
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

/// Keeps what it is sent; fails while `down`.
#[derive(Clone, Default)]
struct Kept {
    sent: Arc<std::sync::Mutex<Vec<FlushedUsage>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl UsageSink for Kept {
    fn send(
        &self,
        usage: Vec<FlushedUsage>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self.down.load(Ordering::Relaxed) {
                return Err("unreachable".into());
            }
            self.sent.lock().unwrap().extend(usage);
            Ok(())
        })
    }
}

/// A flush to a sink sends each total with its meter, RPC and minute; one
/// whose outcome is unknown is sent again with the same ids (so a sink
/// that deduplicates by id counts it once), before anything newer.
#[tokio::test]
async fn a_sink_gets_each_total_and_a_retry_keeps_its_ids() {
    let kept = Kept::default();
    let meters = Meters::with_sink(kept.clone(), RPCS, Duration::from_secs(10));
    let a: Arc<str> = "acme".into();
    meters.record(&a, 1, Usage::write(2048, 0), Duration::ZERO);
    meters.record(&a, 1, Usage::write(10, 0), Duration::ZERO);
    let minute = 1_700_000_040;
    kept.down.store(true, Ordering::Relaxed);
    assert!(meters.flush_at(minute).await.is_err(), "the sink is down");
    meters.record(&a, 0, Usage::default(), Duration::ZERO);
    kept.down.store(false, Ordering::Relaxed);
    meters.flush_at(minute + 60).await.unwrap();
    let sent = kept.sent.lock().unwrap().clone();
    let of = |meter: &str, minute: i64| -> Vec<(i64, Option<&str>)> {
        sent.iter().filter(|u| u.meter == meter && u.minute == minute).map(|u| (u.value, u.rpc.as_deref())).collect()
    };
    assert_eq!(of(REQUESTS, minute), [(2, Some("Put"))]);
    assert_eq!(of(WRITE_UNITS, minute), [(3, None)]);
    assert_eq!(of(REQUESTS, minute + 60), [(1, Some("Get"))]);
    assert!(sent.iter().all(|u| &*u.tenant == "acme"));
    let ids: std::collections::HashSet<_> = sent.iter().map(|u| &u.id).collect();
    assert_eq!(ids.len(), sent.len(), "one id per total");
    // The batch in doubt went first, alone: its ids name the first flush.
    let first = sent.iter().filter(|u| u.minute == minute).map(|u| u.id.split(':').nth(1)).collect::<Vec<_>>();
    assert!(first.iter().all(|seq| *seq == Some("1")), "{first:?}");
}
