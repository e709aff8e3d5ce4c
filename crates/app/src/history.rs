//! Each tenant's change history: an undo log in the tenant's own
//! partition, from which its items can be put back as they were at any
//! instant of the history (`RestoreTenant`).
//!
//! Every PutItem and DeleteItem writes, in the same transaction as the
//! item (and its fence check), one history entry under the sort key
//! `~u#<µs>#<random>` holding the item's *before-image*: its sort key,
//! version and bytes just before the write, or "absent". The items as they
//! were at instant `T` are then, for every item changed since `T`, the
//! before-image of its first entry after `T`, and for every other item what
//! it is now. A rewind writes those before-images back (versions
//! included, so clients' optimistic concurrency holds), logging each
//! change it makes as an ordinary write would: a rewind is undone by
//! rewinding to the instant before it, and a rewind stopped half-way by a
//! crash is finished by running it again (items already put back are left
//! alone).
//!
//! `~h` records from when the history is complete: the first write this
//! process logged for the tenant, raised by every trim (entries older than
//! the tier's retention are deleted). No instant before it can be
//! restored. History moves with the tenant's items on a tier change and is
//! deleted with them on offboarding; it is in the tenant's stored bytes
//! (metered), and has a cap of its own (see [`crate::quota`]): the tier's
//! `history_quota_multiple` times the tenant's storage quota.
//!
//! Times are microseconds since the epoch from this process's clock, made
//! strictly increasing within the process; replicas' clocks are assumed to
//! agree to well within the gap between two writes of one item.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};

use tenantmesh_storage::{BeforeImage, Condition, DynTable, Fenced, Item, Query, StorageError, Table, Write};

/// The sort key of a tenant's write fence in a table: while it exists,
/// every logged write of the tenant there is refused
/// ([`StorageError::Fenced`]). A workflow raises it before it copies,
/// exports or rewinds the tenant's items, so no late write is lost.
pub const FENCE_SK: &str = "~fence";

/// Largest item stored: DynamoDB's item limit (400 KiB, names and values
/// of all attributes) less 1 KiB, so that both the stored item and the
/// history entry holding it as a before-image (its bytes plus its sort key
/// and version) fit, whatever the tenant id and key.
pub const MAX_ITEM_BYTES: usize = 399 * 1024;

/// Whether `sort_key` is reserved for the mesh's own bookkeeping (the
/// fence, the history): keys starting with `~`, never an item of a
/// service.
pub fn reserved_sort_key(sort_key: &str) -> bool {
    sort_key.starts_with('~')
}

/// Sort-key prefix of the history entries.
pub const PREFIX: &str = "~u#";
/// Sort key of the instant from which the history is complete.
pub const START_SK: &str = "~h";

/// Whether `sk` is part of the history (entries and start), which moves
/// with the tenant's items but is not one of them.
pub fn is_history(sk: &str) -> bool {
    sk.starts_with(PREFIX) || sk == START_SK
}

static LAST: AtomicI64 = AtomicI64::new(0);

/// Now, in microseconds since the epoch, later than any earlier answer
/// of this process.
pub fn now_us() -> i64 {
    let wall = tenantmesh_service::clock::now_us();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = wall.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A new entry's sort key at `time_us`: in time order, and unique (two
/// replicas writing one tenant in the same microsecond differ by the
/// random part; a clash fails the transaction, which is tried again).
pub fn entry_key(time_us: i64) -> String {
    format!("{PREFIX}{time_us:016}#{:08x}", uuid::Uuid::new_v4().as_u128() as u32)
}

/// The time of an entry's sort key.
fn entry_time(sk: &str) -> Option<i64> {
    sk.strip_prefix(PREFIX)?.split('#').next()?.parse().ok()
}

/// The sort key after which every entry is later than `time_us`.
fn after(time_us: i64) -> String {
    // '~' sorts after the random part's hex digits.
    format!("{PREFIX}{time_us:016}#~")
}

/// An item as it was before a write (`version` 0: it did not exist).
pub type Before = BeforeImage;

/// Whether `current` is the state `before` describes.
fn is(before: &Before, current: Option<&Item>) -> bool {
    match current {
        None => before.version == 0,
        Some(c) => c.version == before.version && c.data == before.data,
    }
}

/// The item `before` describes, if it existed.
fn item(before: &Before, pk: &str) -> Option<Item> {
    (before.version > 0).then(|| Item {
        pk: pk.to_owned(),
        sk: before.sk.clone(),
        version: before.version,
        data: before.data.clone(),
    })
}

/// Writes `data` under `(pk, sk)` if `condition` holds and the fence
/// `(pk, fence_sk)` is down, with its history entry, in one atomic step;
/// what it replaced.
pub async fn put<T: Table + ?Sized>(
    store: &T,
    pk: &str,
    sk: &str,
    data: Vec<u8>,
    condition: Condition,
    fence_sk: &str,
) -> Result<Fenced, StorageError> {
    store.put_fenced(pk, sk, data, condition, fence_sk, Some(&entry_key(now_us()))).await
}

/// Deletes `(pk, sk)` if `condition` holds and the fence is down, with its
/// history entry; what it deleted (`previous_version` 0: nothing).
pub async fn delete<T: Table + ?Sized>(
    store: &T,
    pk: &str,
    sk: &str,
    condition: Condition,
    fence_sk: &str,
) -> Result<Fenced, StorageError> {
    store.delete_fenced(pk, sk, condition, fence_sk, Some(&entry_key(now_us()))).await
}

/// Records that `pk`'s history is complete from now on, unless it already
/// was from earlier, in one step with a check that the fence `(pk,
/// fence_sk)` is down: `false` (nothing recorded) if it is raised. Called
/// before a process's first logged write of the tenant.
pub async fn mark_start<T: Table + ?Sized>(store: &T, pk: &str, fence_sk: &str) -> Result<bool, StorageError> {
    let writes = vec![
        Write::Check { pk: pk.into(), sk: fence_sk.into(), condition: Condition::NotExists },
        Write::Put {
            pk: pk.into(),
            sk: START_SK.into(),
            data: now_us().to_string().into_bytes(),
            condition: Condition::NotExists,
        },
    ];
    match store.transact_write(writes).await {
        Err(StorageError::ConditionFailed { index: 0, .. }) => Ok(false),
        // Marked now, or earlier.
        Ok(()) | Err(StorageError::ConditionFailed { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The (tenant, table) pairs whose history this process has seen marked
/// complete ([`mark_start`]): looked up before every logged write, so
/// only a process's first write of a tenant in a table pays the marking.
#[derive(Debug, Default)]
pub struct Started {
    /// Tenant -> the table where it was marked (a tenant writes to one
    /// table per service at a time: its placement's).
    marked: std::sync::Mutex<std::collections::HashMap<std::sync::Arc<str>, String>>,
}

impl Started {
    /// Before a logged write of `tenant` in `table`: marks its history
    /// complete from now, unless this process has done so already. A raised
    /// fence marks nothing (the write is refused by it anyway, and the next
    /// one marks).
    pub async fn ensure<T: Table + ?Sized>(
        &self,
        store: &T,
        tenant: &std::sync::Arc<str>,
        table: &str,
    ) -> Result<(), StorageError> {
        if self.marked.lock().expect("history lock").get(tenant).is_some_and(|t| t == table) {
            return Ok(());
        }
        if !mark_start(store, tenant, FENCE_SK).await? {
            return Ok(());
        }
        let mut marked = self.marked.lock().expect("history lock");
        if marked.len() >= 100_000 {
            marked.clear();
        }
        marked.insert(tenant.clone(), table.to_owned());
        Ok(())
    }
}

/// The instant a start item `~h` holds.
fn start_of(item: &Item) -> Option<i64> {
    std::str::from_utf8(&item.data).ok()?.parse().ok()
}

/// From when `pk`'s history is complete (`None`: no history at all).
pub async fn start<T: Table + ?Sized>(store: &T, pk: &str) -> Result<Option<i64>, StorageError> {
    match store.get(pk, START_SK).await? {
        Some(i) => Ok(Some(start_of(&i).ok_or_else(|| StorageError::Backend("the history start is damaged".into()))?)),
        None => Ok(None),
    }
}

/// Why an instant cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no history goes back to that instant: the tenant's history starts at {start_us:?} µs")]
    TooOld { start_us: Option<i64> },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl HistoryError {
    /// The status it is answered with: an instant the history does not
    /// reach is FAILED_PRECONDITION saying where it starts; a store's
    /// failure as `storage` answers it.
    pub fn status(self, storage: impl FnOnce(StorageError) -> tonic::Status) -> tonic::Status {
        match self {
            HistoryError::TooOld { start_us } => tonic::Status::failed_precondition(match start_us {
                Some(s) => format!(
                    "the tenant's change history starts at {s} µs since the epoch; no earlier instant can be restored"
                ),
                None => "the tenant has no change history yet (none of its writes has been logged)".to_owned(),
            }),
            HistoryError::Storage(e) => storage(e),
        }
    }
}

/// What a rewind did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewound {
    /// Items written back as they were (changed or deleted since).
    pub restored: u32,
    /// Items deleted (created since).
    pub deleted: u32,
    /// Bytes written: the items put back and the history entries of what
    /// they replaced.
    pub bytes: u64,
}

async fn check_start<T: Table + ?Sized>(store: &T, pk: &str, time_us: i64) -> Result<(), HistoryError> {
    match start(store, pk).await? {
        Some(s) if s <= time_us => Ok(()),
        start_us => Err(HistoryError::TooOld { start_us }),
    }
}

/// The first entry after an instant of every item changed since, in time
/// order, a page at a time (only the sort keys already seen are held).
struct FirstChanges<'a, T: ?Sized> {
    pages: tenantmesh_storage::Pages<'a, T>,
    seen: HashSet<String>,
}

impl<'a, T: Table + ?Sized> FirstChanges<'a, T> {
    fn new(store: &'a T, pk: &'a str, time_us: i64) -> Self {
        let pages = tenantmesh_storage::Pages::new(store, pk, PREFIX, 500).after(Some(after(time_us)));
        Self { pages, seen: HashSet::new() }
    }

    /// The next page: each first entry's key and the before-image it holds.
    async fn next_page(&mut self) -> Result<Option<Vec<(String, Before)>>, StorageError> {
        let Some(items) = self.pages.next().await? else { return Ok(None) };
        let mut first = Vec::new();
        for entry in items {
            let before = Before::decode(&entry.data)?;
            if self.seen.insert(before.sk.clone()) {
                first.push((entry.sk, before));
            }
        }
        Ok(Some(first))
    }
}

/// Puts `pk`'s items back as they were at `time_us` (see the module docs).
/// The caller keeps the tenant's writes out meanwhile (its fence).
pub async fn rewind<T: Table + ?Sized>(store: &T, pk: &str, time_us: i64) -> Result<Rewound, HistoryError> {
    use futures_util::StreamExt;
    check_start(store, pk, time_us).await?;
    let mut done = Rewound::default();
    let mut changes = FirstChanges::new(store, pk, time_us);
    while let Some(page) = changes.next_page().await? {
        // Items are independent: several at once, so their writes share
        // commits (each item's own order, entry first, stays).
        let mut applied = futures_util::stream::iter(page)
            .map(|(_, target)| put_back(store, pk, target))
            .buffer_unordered(REWIND_CONCURRENCY);
        while let Some(outcome) = applied.next().await {
            match outcome? {
                Some((true, bytes)) => (done.restored, done.bytes) = (done.restored + 1, done.bytes + bytes),
                Some((false, bytes)) => (done.deleted, done.bytes) = (done.deleted + 1, done.bytes + bytes),
                None => {}
            }
        }
    }
    Ok(done)
}

/// Items put back at once by a rewind.
const REWIND_CONCURRENCY: usize = 16;

/// Puts one item back as `target` says, its change logged first: whether
/// it was restored (`true`) or deleted (`false`), with the bytes written,
/// or `None` if it was already so.
async fn put_back<T: Table + ?Sized>(store: &T, pk: &str, target: Before) -> Result<Option<(bool, u64)>, StorageError> {
    let current = store.get(pk, &target.sk).await?;
    if is(&target, current.as_ref()) {
        return Ok(None);
    }
    // Logged first: whatever happens next, the change can be undone.
    let entry = Before::of(&target.sk, current.as_ref()).encode();
    let logged = entry.len() as u64;
    store.put(pk, &entry_key(now_us()), entry, Condition::NotExists).await?;
    match item(&target, pk) {
        Some(item) => {
            let bytes = logged + item.data.len() as u64;
            store.restore(item).await?;
            Ok(Some((true, bytes)))
        }
        None => {
            store.delete(pk, &target.sk, Condition::None).await?;
            Ok(Some((false, logged)))
        }
    }
}

/// A tenant's items (not the history or the fence) as they were at an
/// instant, in sort-key order, a bounded page at a time: its current items,
/// read page by page, merged with the before-images of the items changed
/// since, each read when its turn comes. What is held as a whole is the
/// sort keys of the items changed since (with the keys of their entries),
/// as a rewind holds them: never their bytes.
pub struct ItemsAt {
    store: DynTable,
    pk: String,
    /// The items changed since, not yet returned: sort key -> the key of
    /// the entry holding what the item was at the instant.
    changed: BTreeMap<String, String>,
    /// Current items read and not yet returned.
    pending: VecDeque<Item>,
    start_after: Option<String>,
    read_all: bool,
}

impl ItemsAt {
    pub async fn new(store: DynTable, pk: &str, time_us: i64) -> Result<Self, HistoryError> {
        check_start(store.as_ref(), pk, time_us).await?;
        let mut changed = BTreeMap::new();
        let mut changes = FirstChanges::new(store.as_ref(), pk, time_us);
        while let Some(page) = changes.next_page().await? {
            changed.extend(page.into_iter().map(|(entry, b)| (b.sk, entry)));
        }
        Ok(Self { store, pk: pk.to_owned(), changed, pending: VecDeque::new(), start_after: None, read_all: false })
    }

    /// The next items, at most `limit` of them and about
    /// [`tenantmesh_storage::MAX_PAGE_BYTES`]; `None` after the last.
    pub async fn next_page(&mut self, limit: usize) -> Result<Option<Vec<Item>>, StorageError> {
        let (mut out, mut bytes) = (Vec::new(), 0);
        while out.len() < limit.max(1) && bytes < tenantmesh_storage::MAX_PAGE_BYTES {
            if self.pending.is_empty() && !self.read_all {
                let q = Query {
                    pk: self.pk.clone(),
                    sk_prefix: String::new(),
                    start_after: self.start_after.take(),
                    limit,
                };
                let page = self.store.query(q).await?;
                self.pending.extend(page.items.into_iter().filter(|i| !reserved_sort_key(&i.sk)));
                match page.last_evaluated {
                    // Past the items: the rest is the service's own.
                    Some(sk) if !reserved_sort_key(&sk) => self.start_after = Some(sk),
                    _ => self.read_all = true,
                }
                continue;
            }
            let current = self.pending.front().map(|i| i.sk.as_str());
            let before = self.changed.first_key_value().map(|(sk, _)| sk.as_str());
            let next = match (current, before) {
                (None, None) => break,
                // Changed since: as it was then (if it was).
                (c, Some(b)) if c.is_none_or(|c| b <= c) => {
                    if c == Some(b) {
                        self.pending.pop_front();
                    }
                    let (sk, entry) = self.changed.pop_first().expect("a first entry");
                    let Some(raw) = self.store.get(&self.pk, &entry).await? else {
                        return Err(StorageError::Backend(format!(
                            "the history entry of {sk} was deleted while it was read (trimmed?)"
                        )));
                    };
                    match item(&Before::decode(&raw.data)?, &self.pk) {
                        Some(i) => i,
                        None => continue,
                    }
                }
                _ => self.pending.pop_front().expect("a pending item"),
            };
            bytes += next.data.len();
            out.push(next);
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// Whether an item with sort key `sk` may be written by an import: an
/// item, or its change history (which moves with it); never the fence.
pub fn importable(sk: &str) -> bool {
    !reserved_sort_key(sk) || is_history(sk)
}

/// The pages of an export of one tenant's items in one table: as they are
/// (with their history when asked: what moves with them), or as they were
/// at an instant. Never the fence.
pub enum ExportPages {
    Now { store: DynTable, pk: String, include_history: bool, start_after: Option<String>, done: bool },
    At(ItemsAt),
}

impl ExportPages {
    /// The items as they are.
    pub fn now(store: DynTable, pk: &str, include_history: bool) -> Self {
        ExportPages::Now { store, pk: pk.to_owned(), include_history, start_after: None, done: false }
    }

    /// The items as they were at `time_us`.
    pub async fn at(store: DynTable, pk: &str, time_us: i64) -> Result<Self, HistoryError> {
        Ok(ExportPages::At(ItemsAt::new(store, pk, time_us).await?))
    }

    /// The next page of at most `limit` items (`None` after the last; a
    /// page may be empty).
    pub async fn next(&mut self, limit: usize) -> Result<Option<Vec<Item>>, StorageError> {
        match self {
            ExportPages::Now { done: true, .. } => Ok(None),
            ExportPages::Now { store, pk, include_history, start_after, done } => {
                let q = Query { pk: pk.clone(), sk_prefix: String::new(), start_after: start_after.take(), limit };
                let page = store.query(q).await?;
                let exported = |sk: &str| !reserved_sort_key(sk) || (*include_history && is_history(sk));
                *start_after = page.last_evaluated;
                *done = start_after.is_none();
                Ok(Some(page.items.into_iter().filter(|i| exported(&i.sk)).collect()))
            }
            ExportPages::At(at) => at.next_page(limit).await,
        }
    }
}

/// Deletes every item of `pk` and its history, leaving the fence; how many.
pub async fn purge<T: Table + ?Sized>(store: &T, pk: &str) -> Result<u32, StorageError> {
    let mut deleted = 0u32;
    let mut pages = tenantmesh_storage::Pages::new(store, pk, "", 100);
    while let Some(items) = pages.next().await? {
        for item in items.iter().filter(|i| i.sk != FENCE_SK) {
            if store.delete(pk, &item.sk, Condition::None).await?.is_some() {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Raises (or lowers) `pk`'s write fence; whether that changed it.
pub async fn set_fence<T: Table + ?Sized>(store: &T, pk: &str, raised: bool) -> Result<bool, StorageError> {
    if raised {
        match store.put(pk, FENCE_SK, Vec::new(), Condition::NotExists).await {
            Ok(_) => Ok(true),
            Err(StorageError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    } else {
        Ok(store.delete(pk, FENCE_SK, Condition::None).await?.is_some())
    }
}

/// Deletes `pk`'s entries older than `before_us`, having first recorded
/// that the history starts there (if it started earlier); how many.
pub async fn trim<T: Table + ?Sized>(store: &T, pk: &str, before_us: i64) -> Result<u32, StorageError> {
    loop {
        let current = store.get(pk, START_SK).await?;
        let start = current.as_ref().and_then(start_of);
        if start.is_some_and(|s| s >= before_us) {
            break;
        }
        let condition = Condition::Version(current.map_or(0, |i| i.version));
        match store.put(pk, START_SK, before_us.to_string().into_bytes(), condition).await {
            Ok(_) => break,
            Err(StorageError::ConditionFailed { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    let mut trimmed = 0;
    let mut pages = tenantmesh_storage::Pages::new(store, pk, PREFIX, 500);
    while let Some(items) = pages.next().await? {
        let old: Vec<&Item> = items.iter().filter(|i| entry_time(&i.sk).is_some_and(|t| t < before_us)).collect();
        for entry in &old {
            store.delete(pk, &entry.sk, Condition::None).await?;
            trimmed += 1;
        }
        if old.len() < items.len() {
            break;
        }
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_and_sort_by_time() {
        let b = Before { sk: "c#x".into(), version: 7, data: vec![1, 2, 3] };
        assert_eq!(Before::decode(&b.encode()).unwrap(), b);
        let absent = Before::of("c#y", None);
        assert_eq!(Before::decode(&absent.encode()).unwrap(), absent);
        assert!(Before::decode(&[1, 2]).is_err());
        assert!(is(&absent, None) && !is(&b, None) && item(&absent, "p").is_none());
        let (a, z) = (entry_key(5), entry_key(10));
        assert!(a < after(5) && after(5) < entry_key(6) && entry_key(6) < z);
        assert_eq!(entry_time(&a), Some(5));
        assert!(now_us() < now_us());
    }
}
