//! Storage quotas: every byte a tenant causes to be stored counts against
//! it. Its items stop at its `storage_quota_bytes`; its change history
//! (the before-images its overwrites and deletes leave, see
//! [`crate::history`]) at the tier's `history_quota_multiple` times that.
//!
//! Each tenant's bytes are tracked in memory, without a scan per write:
//! the counts start from one scan of the tenant's partition (its first
//! write in this process), and each write settles them exactly from what
//! the store says it did ([`tenantmesh_storage::Fenced`]: the bytes it
//! replaced and the bytes of its history entry). A write is admitted from
//! the counts alone while it is well within both limits; near either, the
//! item it would replace is read (one get) so an overwrite is held to what
//! it adds, and when the counts still say no, the partition is scanned
//! again (at most once per `rescan_interval` per tenant: another replica's
//! writes and trims of the history show there) before the write is
//! refused. So a tenant far from its quota pays nothing, one at its quota a
//! read now and then, and no tenant is refused for bytes it no longer
//! stores.
//!
//! Deletes are never refused: they make room for items (the history keeps
//! the deleted bytes, so the history may pass its cap by at most what the
//! tenant deletes while there; puts are refused until it trims).
//!
//! The bound is per service instance: replicas count separately, each
//! starting from the store's truth, so the quota holds to within the writes
//! in flight on other replicas between two of their scans.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tenantmesh_storage::{DynTable, Fenced, Pages, StorageError};

/// Bytes of a history entry beyond the item it holds: the before-image's
/// header (version and key length) and the sort key.
pub fn entry_overhead(sk: &str) -> u64 {
    12 + sk.len() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    /// Bytes of the tenant's items.
    items: u64,
    /// How many items it has.
    count: u64,
    /// Bytes of its change history.
    history: u64,
    /// When the counts were last the store's exact figures (a scan).
    scanned: Instant,
}

/// A tenant's limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Its items: `storage_quota_bytes`.
    pub items: u64,
    /// Its change history: the tier's `history_quota_multiple` times the quota.
    pub history: u64,
    /// How many items it may have (its plan's `max_items`), if capped.
    pub count: Option<u64>,
}

/// Stored bytes per tenant of this instance.
pub struct Quotas {
    usage: Mutex<HashMap<String, Usage>>,
    rescan_interval: Duration,
}

/// Which limit refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `storage_quota_bytes`: the tenant's items.
    Items,
    /// The history's cap.
    History,
    /// The plan's `max_items` (an entitlement): the number of items.
    Count,
}

/// A write refused by a quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub tenant: String,
    pub over: Over,
    /// The limit that refused it, and what is stored against it.
    pub quota: u64,
    pub stored: u64,
    /// What the write would have added to it.
    pub size: u64,
}

impl std::fmt::Display for OverQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let OverQuota { quota, stored, size, .. } = self;
        match self.over {
            Over::Items => write!(
                f,
                "storage quota of {quota} bytes reached ({stored} stored, {size} more asked); deleting items makes room"
            ),
            Over::History => write!(
                f,
                "change history cap of {quota} bytes reached ({stored} kept, {size} more asked): every overwrite and \
                 delete keeps the item's earlier bytes for restores for the tier's history_days, and they free as \
                 they age out"
            ),
            Over::Count => write!(
                f,
                "the tenant's plan includes at most {quota} items ({stored} stored): delete one, or change tier"
            ),
        }
    }
}

impl OverQuota {
    /// RESOURCE_EXHAUSTED with a `QuotaFailure` naming the limit. No
    /// RetryInfo: waiting does not help (or only after days, for the
    /// history), deleting items does.
    pub fn status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};
        let limit = match self.over {
            Over::Items => "storage_quota_bytes",
            Over::History => "history_quota_bytes",
            Over::Count => "max_items",
        };
        let violation = QuotaViolation::new(format!("tenant:{}", self.tenant), format!("{limit} {}", self.quota));
        let details = match self.over {
            // An entitlement: named as the plan's other refusals are.
            Over::Count => {
                let mut d = ErrorDetails::with_error_info(
                    "ENTITLEMENT_EXHAUSTED",
                    tenantmesh_service::entitlements::DOMAIN,
                    [("feature".to_owned(), "max_items".to_owned())],
                );
                d.set_quota_failure(vec![violation]);
                d
            }
            _ => ErrorDetails::with_quota_failure(vec![violation]),
        };
        tonic::Status::with_error_details(tonic::Code::ResourceExhausted, self.to_string(), details)
    }
}

/// The bytes of `pk`'s items and of its change history in a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    pub items: u64,
    pub history: u64,
    /// How many items.
    pub count: u64,
}

impl Stored {
    pub fn total(&self) -> u64 {
        self.items + self.history
    }
}

impl Quotas {
    pub fn new(rescan_interval: Duration) -> Self {
        Self { usage: Mutex::new(HashMap::new()), rescan_interval }
    }

    /// The bytes of `pk`'s items and change history in `store`, page by
    /// page. The fence and the history's start mark are the service's own,
    /// counted nowhere.
    pub async fn scan(store: &DynTable, pk: &str) -> Result<Stored, StorageError> {
        let mut stored = Stored::default();
        let mut pages = Pages::new(store.as_ref(), pk, "", 1000);
        while let Some(items) = pages.next().await? {
            for i in &items {
                if !crate::history::reserved_sort_key(&i.sk) {
                    stored.items += i.data.len() as u64;
                    stored.count += 1;
                } else if i.sk.starts_with(crate::history::PREFIX) {
                    stored.history += i.data.len() as u64;
                }
            }
        }
        Ok(stored)
    }

    /// The counts of `tenant`, scanned when this process has none (or
    /// `rescan` and the last scan is older than the interval).
    async fn counts(&self, tenant: &str, store: &DynTable, rescan: bool) -> Result<Usage, StorageError> {
        if let Some(u) = self.usage.lock().expect("quota lock").get(tenant).copied()
            && (!rescan || u.scanned.elapsed() < self.rescan_interval)
        {
            return Ok(u);
        }
        let stored = Self::scan(store, tenant).await?;
        let mut usage = self.usage.lock().expect("quota lock");
        if usage.len() >= 100_000 && !usage.contains_key(tenant) {
            // Bounded: forget the others; they scan again on their next write.
            usage.clear();
        }
        let u = Usage { items: stored.items, history: stored.history, count: stored.count, scanned: Instant::now() };
        usage.insert(tenant.to_owned(), u);
        Ok(u)
    }

    /// Admits a write of `size` bytes by `tenant` to item `sk` (items in
    /// `store` under partition `tenant`) within `limits`, or refuses it:
    /// its items may not pass the quota (an overwrite counts only what it
    /// adds to the item it replaces), and the history entry it leaves (the
    /// item it replaces) may not take the history past its cap. Once
    /// admitted, the write counts as a new item until [`Quotas::settle`]
    /// says what it replaced.
    pub async fn admit(
        &self,
        tenant: &str,
        store: &DynTable,
        sk: &str,
        size: u64,
        limits: Limits,
    ) -> Result<Result<(), OverQuota>, StorageError> {
        // The largest entry an overwrite can leave: the largest item.
        let worst_entry = crate::history::MAX_ITEM_BYTES as u64 + entry_overhead(sk);
        // What the write replaces: `None` while unknown (the worst: a
        // new item, and the largest entry), `Some(None)` nothing.
        let fits = |u: &Usage, replaced: Option<Option<u64>>| {
            let (freed, entry, new) = match replaced {
                None => (0, worst_entry, 1),
                Some(None) => (0, entry_overhead(sk), 1),
                Some(Some(bytes)) => (bytes, bytes + entry_overhead(sk), 0),
            };
            let over = |over, quota, stored, size| OverQuota { tenant: tenant.to_owned(), over, quota, stored, size };
            if u.items.saturating_sub(freed) + size > limits.items {
                Err(over(Over::Items, limits.items, u.items.saturating_sub(freed), size))
            } else if u.history + entry > limits.history {
                Err(over(Over::History, limits.history, u.history, entry))
            } else if let Some(max) = limits.count.filter(|max| u.count + new > *max) {
                Err(over(Over::Count, max, u.count, 1))
            } else {
                Ok(())
            }
        };
        // Well within every limit (the common case): the counts decide,
        // whatever the write replaces, under one lock.
        if let Some(u) = self.usage.lock().expect("quota lock").get_mut(tenant)
            && fits(u, None).is_ok()
        {
            u.items += size;
            u.count += 1;
            return Ok(Ok(()));
        }
        let u = self.counts(tenant, store, false).await?;
        if fits(&u, None).is_ok() {
            return self.add(tenant, size);
        }
        // Near a limit: what the write replaces decides, from the counts
        // and, if they still say no, from a fresh scan.
        let replaced = Some(store.get(tenant, sk).await?.map(|i| i.data.len() as u64));
        if fits(&u, replaced).is_ok() {
            return self.add(tenant, size);
        }
        let u = self.counts(tenant, store, true).await?;
        match fits(&u, replaced) {
            Ok(()) => self.add(tenant, size),
            Err(over) => Ok(Err(over)),
        }
    }

    fn add(&self, tenant: &str, size: u64) -> Result<Result<(), OverQuota>, StorageError> {
        if let Some(u) = self.usage.lock().expect("quota lock").get_mut(tenant) {
            u.items += size;
            u.count += 1;
        }
        Ok(Ok(()))
    }

    /// Settles a write that landed (`done`, of `tenant`): the item it
    /// replaced or deleted leaves the items, and its history entry joins
    /// the history. A put was counted whole, as a new item, when admitted.
    pub fn settle(&self, tenant: &str, done: &Fenced) {
        if let Some(u) = self.usage.lock().expect("quota lock").get_mut(tenant) {
            u.items = u.items.saturating_sub(done.previous_bytes);
            u.history += done.undo_bytes;
            if done.previous_version != 0 {
                u.count = u.count.saturating_sub(1);
            }
        }
    }

    /// What `tenant` stores in `store` as this process counts it (counted
    /// from a scan when it has no count).
    pub async fn stored(&self, tenant: &str, store: &DynTable) -> Result<Stored, StorageError> {
        let u = self.counts(tenant, store, false).await?;
        Ok(Stored { items: u.items, history: u.history, count: u.count })
    }

    /// Forgets what this process counted for `tenant` (its history was
    /// trimmed, its items restored): the next write scans again.
    pub fn forget(&self, tenant: &str) {
        self.usage.lock().expect("quota lock").remove(tenant);
    }

    /// What this process counts for `tenant`, if anything: its items and its history.
    pub fn counted(&self, tenant: &str) -> Option<Stored> {
        self.usage.lock().expect("quota lock").get(tenant).map(|u| Stored {
            items: u.items,
            history: u.history,
            count: u.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::{Condition, EmbeddedTable};

    const FENCE: &str = "~fence";

    fn limits(items: u64, history: u64) -> Limits {
        Limits { items, history, count: None }
    }

    async fn put(q: &Quotas, store: &DynTable, sk: &str, size: usize, undo: &str) -> Fenced {
        let done = store.put_fenced("acme", sk, vec![0; size], Condition::None, FENCE, Some(undo)).await.unwrap();
        q.settle("acme", &done);
        done
    }

    #[tokio::test]
    async fn writes_stop_at_the_quota_and_deletes_give_room_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::ZERO);
        let l = limits(1000, 1 << 30);
        for i in 0..3 {
            assert_eq!(q.admit("acme", &store, &format!("i#{i}"), 300, l).await.unwrap(), Ok(()));
            put(&q, &store, &format!("i#{i}"), 300, &format!("~u#{i}")).await;
        }
        let refused = q.admit("acme", &store, "i#3", 300, l).await.unwrap().unwrap_err();
        assert_eq!((refused.over, refused.stored, refused.quota), (Over::Items, 900, 1000));
        // An overwrite at the quota counts only what it adds, at once (not at the next scan).
        let q = Quotas::new(Duration::from_secs(3600));
        for _ in 0..5 {
            assert_eq!(q.admit("acme", &store, "i#1", 300, l).await.unwrap(), Ok(()));
            put(&q, &store, "i#1", 300, &format!("~u#x{}", uuid::Uuid::new_v4().simple())).await;
        }
        assert_eq!(q.counted("acme").unwrap().items, 900);
        // Another tenant's count is its own.
        assert_eq!(q.admit("globex", &store, "g", 900, l).await.unwrap(), Ok(()));
        // Deletes make room at once.
        let done = store.delete_fenced("acme", "i#0", Condition::None, FENCE, Some("~u#d")).await.unwrap();
        q.settle("acme", &done);
        assert_eq!(q.admit("acme", &store, "i#3", 300, l).await.unwrap(), Ok(()), "the delete made room");
    }

    /// Overwrites leave their before-images in the history; at its cap,
    /// puts are refused, naming the history, while deletes still go.
    #[tokio::test]
    async fn the_history_has_a_cap_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::from_secs(3600));
        let l = limits(100_000, 2 * 100_000);
        let mut overwrites = 0;
        loop {
            match q.admit("acme", &store, "c#big", 50_000, l).await.unwrap() {
                Ok(()) => {
                    put(&q, &store, "c#big", 50_000, &format!("~u#{overwrites:04}")).await;
                    overwrites += 1;
                }
                Err(over) => {
                    assert_eq!((over.over, over.quota), (Over::History, 200_000), "{over:?}");
                    break;
                }
            }
            assert!(overwrites < 100, "never refused");
        }
        // The first write left an entry of 17 bytes (an absent item), then
        // each overwrite one of 50,017: three fit under 200,000, a fourth not.
        assert_eq!(overwrites, 1 + 3);
        let counted = q.counted("acme").unwrap();
        assert_eq!(counted, Quotas::scan(&store, "acme").await.unwrap(), "the counts are the store's");
        assert!(counted.history <= l.history);
        // A new item leaves a tiny entry (nothing was there): it still fits.
        let small = q.admit("acme", &store, "c#small", 10, l).await.unwrap();
        assert_eq!(small, Ok(()), "a new item's entry fits");
        // Once trimmed (here: removed by hand, then a rescan), puts go on.
        let q = Quotas::new(Duration::ZERO);
        for i in 0..4 {
            store.delete("acme", &format!("~u#{i:04}"), Condition::None).await.unwrap();
        }
        assert_eq!(q.admit("acme", &store, "c#big", 50_000, l).await.unwrap(), Ok(()));
    }

    /// `max_items`: a new item past it is refused, naming the feature; an
    /// overwrite at it is not; a delete makes room at once.
    #[tokio::test]
    async fn the_plan_caps_the_number_of_items() {
        use tonic_types::StatusExt;
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::from_secs(3600));
        let l = Limits { count: Some(2), ..limits(1 << 20, 1 << 30) };
        for i in 0..2 {
            assert_eq!(q.admit("acme", &store, &format!("i#{i}"), 10, l).await.unwrap(), Ok(()));
            put(&q, &store, &format!("i#{i}"), 10, &format!("~u#{i}")).await;
        }
        let refused = q.admit("acme", &store, "i#2", 10, l).await.unwrap().unwrap_err();
        assert_eq!((refused.over, refused.quota, refused.stored), (Over::Count, 2, 2));
        let status = refused.status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.get_error_details().error_info().unwrap().metadata["feature"], "max_items");
        for n in 0..3 {
            assert_eq!(q.admit("acme", &store, "i#1", 10, l).await.unwrap(), Ok(()), "an overwrite at the cap");
            put(&q, &store, "i#1", 10, &format!("~u#o{n}")).await;
        }
        assert_eq!(q.counted("acme").unwrap().count, 2, "overwrites add no item");
        let done = store.delete_fenced("acme", "i#0", Condition::None, FENCE, Some("~u#d")).await.unwrap();
        q.settle("acme", &done);
        assert_eq!(q.admit("acme", &store, "i#2", 10, l).await.unwrap(), Ok(()), "the delete made room");
        assert_eq!(Quotas::scan(&store, "acme").await.unwrap().count, 1, "the scan counts items, not history");
    }

    #[tokio::test]
    async fn scans_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::from_secs(3600));
        let l = limits(1000, 1 << 30);
        store.put("acme", "a", vec![0; 800], Condition::None).await.unwrap();
        assert!(q.admit("acme", &store, "b", 300, l).await.unwrap().is_err(), "first write: scanned, over");
        store.delete("acme", "a", Condition::None).await.unwrap();
        // Within the interval the count stands (no scan per refused write).
        assert!(q.admit("acme", &store, "b", 300, l).await.unwrap().is_err());
        q.forget("acme");
        assert!(q.admit("acme", &store, "b", 300, l).await.unwrap().is_ok(), "forgotten: scanned again");
    }
}
