//! Storage quotas: a tenant's writes stop at its `storage_quota_bytes`.
//!
//! Each tenant's stored bytes are tracked in memory, without a scan per
//! write: the count starts from one scan of the tenant's partition (its
//! first write in this process), and each accepted write adds its item's
//! size. Overwrites and deletes are not subtracted, so the count only ever
//! over-states what is stored; when a write would take it past the quota,
//! the partition is scanned again (at most once per `rescan_interval` per
//! tenant) and the write is refused only if the exact figure is over too.
//! So a tenant far from its quota pays nothing, one at its quota a scan now
//! and then, and no tenant is refused for bytes it no longer stores.
//!
//! The bound is per data-service instance: replicas count separately, each
//! starting from the store's truth, so the quota holds to within the writes
//! in flight on other replicas between two of their scans.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tenantmesh_storage::{DynTable, Query, StorageError};

struct Usage {
    /// Stored bytes, never less than the truth.
    bytes: u64,
    /// When `bytes` was last the exact figure (a scan).
    scanned: Instant,
}

/// Stored bytes per tenant of this instance.
pub struct Quotas {
    usage: Mutex<HashMap<String, Usage>>,
    rescan_interval: Duration,
}

/// A write refused by the quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub tenant: String,
    pub quota: u64,
    pub stored: u64,
    pub size: u64,
}

impl Quotas {
    pub fn new(rescan_interval: Duration) -> Self {
        Self { usage: Mutex::new(HashMap::new()), rescan_interval }
    }

    /// The bytes of `pk`'s items in `store`, page by page, and with
    /// `with_history` those of its change history too (what it is billed
    /// for; its quota counts only its items).
    pub async fn scan(store: &DynTable, pk: &str, with_history: bool) -> Result<u64, StorageError> {
        let (mut bytes, mut start_after) = (0u64, None);
        loop {
            let q = Query { pk: pk.to_owned(), sk_prefix: String::new(), start_after, limit: 1000 };
            let page = store.query(q).await?;
            let counted = |i: &&tenantmesh_storage::Item| with_history || !crate::reserved_sort_key(&i.sk);
            bytes += page.items.iter().filter(counted).map(|i| i.data.len() as u64).sum::<u64>();
            match page.last_evaluated {
                // The service's own keys ('~') sort after every item.
                Some(sk) if with_history || !crate::reserved_sort_key(&sk) => start_after = Some(sk),
                _ => return Ok(bytes),
            }
        }
    }

    /// Counts a write of `size` bytes by `tenant` to item `sk` (items in
    /// `store` under partition `tenant`) against `quota`, or refuses it. At
    /// the quota, an overwrite counts only what it adds to the item it
    /// replaces.
    pub async fn admit(
        &self,
        tenant: &str,
        store: &DynTable,
        sk: &str,
        size: u64,
        quota: u64,
    ) -> Result<Result<(), OverQuota>, StorageError> {
        // Decided from the count when it can be; otherwise (first write in
        // this process, or at the quota) counted again below.
        if let Some(u) = self.usage.lock().expect("quota lock").get_mut(tenant) {
            if u.bytes + size <= quota {
                u.bytes += size;
                return Ok(Ok(()));
            }
            if u.scanned.elapsed() < self.rescan_interval {
                return Ok(Err(OverQuota { tenant: tenant.to_owned(), quota, stored: u.bytes, size }));
            }
        }
        let mut stored = Self::scan(store, tenant, false).await?;
        if stored + size > quota {
            // Over only if this is a new item: an overwrite frees its old bytes.
            let old = store.get(tenant, sk).await?.map_or(0, |i| i.data.len() as u64);
            stored -= old.min(stored);
        }
        let mut usage = self.usage.lock().expect("quota lock");
        if usage.len() >= 100_000 && !usage.contains_key(tenant) {
            // Bounded: forget the others; they rescan on their next write.
            usage.clear();
        }
        let u = usage.entry(tenant.to_owned()).or_insert(Usage { bytes: 0, scanned: Instant::now() });
        u.bytes = stored;
        u.scanned = Instant::now();
        if stored + size > quota {
            return Ok(Err(OverQuota { tenant: tenant.to_owned(), quota, stored, size }));
        }
        u.bytes += size;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::{Condition, EmbeddedTable};

    #[tokio::test]
    async fn writes_stop_at_the_quota_and_deletes_give_room_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::ZERO);
        for i in 0..3 {
            assert_eq!(q.admit("acme", &store, &format!("i#{i}"), 300, 1000).await.unwrap(), Ok(()));
            store.put("acme", &format!("i#{i}"), vec![0; 300], Condition::None).await.unwrap();
        }
        let refused = q.admit("acme", &store, "i#3", 300, 1000).await.unwrap().unwrap_err();
        assert_eq!((refused.stored, refused.quota), (900, 1000));
        // An overwrite at the quota counts only what it adds.
        assert_eq!(q.admit("acme", &store, "i#1", 300, 1000).await.unwrap(), Ok(()));
        // Another tenant's count is its own.
        assert_eq!(q.admit("globex", &store, "g", 900, 1000).await.unwrap(), Ok(()));
        // Deletes make room (found by the next scan).
        store.delete("acme", "i#0", Condition::None).await.unwrap();
        assert_eq!(q.admit("acme", &store, "i#3", 300, 1000).await.unwrap(), Ok(()), "the delete made room");
    }

    #[tokio::test]
    async fn scans_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = std::sync::Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let q = Quotas::new(Duration::from_secs(3600));
        store.put("acme", "a", vec![0; 800], Condition::None).await.unwrap();
        assert!(q.admit("acme", &store, "b", 300, 1000).await.unwrap().is_err(), "first write: scanned, over");
        store.delete("acme", "a", Condition::None).await.unwrap();
        // Within the interval the count stands (no scan per refused write).
        assert!(q.admit("acme", &store, "b", 300, 1000).await.unwrap().is_err());
    }
}
