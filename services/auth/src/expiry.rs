//! Purging what expires in the auth table, so that it does not grow
//! without bound however many cheap calls are made: refresh tokens once
//! they expire, their families when their last token expires (a revoked
//! family at once), and login-failure records once quiet for the lockout
//! window.
//!
//! One mechanism on both backends (DynamoDB's own TTL deletes "within a
//! few days" and the emulator not at all): every such record, when
//! created, gets an entry in an expiry index, the partition
//! `expiry#<hour>` of the hour it expires in, sort key
//! `<tenant>#<record sort key>`, written in the same transaction. A
//! sweeper (every auth replica, every minute) goes through the hours
//! that have ended since its cursor: each record it finds expired is
//! deleted (conditioned on the version it read); one that has been
//! extended since (a family refreshed, a failure counted again) gets an
//! entry at its new expiry instead; then the entry goes. Replicas sweeping
//! the same minute do the same idempotent work.

use std::time::Duration;

use tenantmesh_storage::{Condition, DynTable, Pages, StorageError};

use crate::expiry_index::{bucket, index_pk, put_entry};
use tenantmesh_service::clock::now_secs;

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// At most a week of buckets per sweep (catching up after a longer stop
/// takes several sweeps).
pub const MAX_BUCKETS_PER_SWEEP: i64 = 7 * 24;
/// Where the sweeper keeps the last bucket it finished.
const CURSOR: (&str, &str) = ("sweeper", "expiry-cursor");

pub use crate::expiry_index::BUCKET_SECS;

/// When the record `sk` holding `data` expires (Unix seconds), if it is a
/// kind that does.
fn expires_at(sk: &str, data: &[u8], window: Duration) -> Option<i64> {
    if sk.starts_with(crate::refresh::TOKEN_PREFIX) || sk.starts_with(crate::refresh::FAMILY_PREFIX) {
        crate::refresh::expires_at(sk, data)
    } else if sk.starts_with(crate::lockout::ACCOUNT_PREFIX) || sk.starts_with(crate::lockout::CLIENT_PREFIX) {
        crate::lockout::expires_at(data, window)
    } else {
        None
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Buckets gone through.
    pub buckets: u64,
    /// Expired records deleted.
    pub deleted: u64,
    /// Records found extended, looked at again at their new expiry.
    pub rescheduled: u64,
}

/// Sweeps every bucket that ended by `now_secs` and after the cursor (at
/// most [`MAX_BUCKETS_PER_SWEEP`]), deleting what has expired; `window` is the
/// login-failure window ([`crate::lockout::LockoutPolicy::window`]).
pub async fn sweep(store: &DynTable, now_secs: i64, window: Duration) -> Result<Swept, StorageError> {
    let mut swept = Swept::default();
    let current = bucket(now_secs);
    // The first sweep of a table starts a day back: entries are written
    // for future hours, and the sweeper runs from a service's start.
    let cursor = match store.get(CURSOR.0, CURSOR.1).await? {
        Some(item) => std::str::from_utf8(&item.data).ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or(current - 24),
        None => current - 24,
    };
    let last = (current - 1).min(cursor + MAX_BUCKETS_PER_SWEEP);
    for b in cursor + 1..=last {
        sweep_bucket(store, b, now_secs, window, &mut swept).await?;
        swept.buckets += 1;
    }
    // Once per sweep: a sweep cut short does its buckets again (the same
    // idempotent work).
    if last > cursor {
        store.put(CURSOR.0, CURSOR.1, last.to_string().into_bytes(), Condition::None).await?;
    }
    if swept.deleted > 0 || swept.rescheduled > 0 {
        tracing::info!(deleted = swept.deleted, rescheduled = swept.rescheduled, "expired auth records purged");
    }
    Ok(swept)
}

async fn sweep_bucket(
    store: &DynTable,
    b: i64,
    now_secs: i64,
    window: Duration,
    swept: &mut Swept,
) -> Result<(), StorageError> {
    let pk = index_pk(b);
    let mut pages = Pages::new(store.as_ref(), pk.clone(), "", 100);
    while let Some(items) = pages.next().await? {
        for e in &items {
            if let Some((tenant, sk)) = e.sk.split_once('#')
                && let Some(record) = store.get(tenant, sk).await?
            {
                match expires_at(sk, &record.data, window) {
                    Some(at) if at > now_secs => {
                        put_entry(store, tenant, sk, at).await?;
                        swept.rescheduled += 1;
                    }
                    Some(_) => match store.delete(tenant, sk, Condition::Version(record.version)).await {
                        Ok(_) => swept.deleted += 1,
                        // Written meanwhile: look again next bucket.
                        Err(StorageError::ConditionFailed { .. }) => {
                            put_entry(store, tenant, sk, now_secs + BUCKET_SECS).await?;
                            swept.rescheduled += 1;
                        }
                        Err(e) => return Err(e),
                    },
                    None => {}
                }
            }
            store.delete(&pk, &e.sk, Condition::None).await?;
        }
    }
    Ok(())
}

/// Sweeps every [`SWEEP_EVERY`] until dropped (aborted with the service).
pub fn start(store: DynTable, window: Duration) -> tokio::task::JoinHandle<()> {
    tenantmesh_telemetry::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = sweep(&store, now_secs(), window).await {
                tracing::warn!(error = %e, "sweeping expired auth records failed; trying again next minute");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockout::{LockoutPolicy, reserve};

    /// Sweeps until caught up with `at`; what it deleted and rescheduled.
    async fn sweep_to(store: &DynTable, at: i64, window: Duration) -> (u64, u64) {
        let (mut deleted, mut rescheduled) = (0, 0);
        loop {
            let s = sweep(store, at, window).await.unwrap();
            (deleted, rescheduled) = (deleted + s.deleted, rescheduled + s.rescheduled);
            if s.buckets == 0 {
                return (deleted, rescheduled);
            }
        }
    }

    /// A record written again after its entry (a failure counted later)
    /// is not deleted at its first expiry but looked at again at its new
    /// one; an untouched one goes at its expiry; the index empties.
    #[tokio::test]
    async fn extended_records_are_looked_at_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("auth.redb")).unwrap();
        let policy = LockoutPolicy::default();
        let window = policy.window();
        let now = now_secs();
        // One failure: the account's record and the client's, each with its entry.
        reserve(&store, policy, "acme", "a@acme.example", "10.0.0.1").await.unwrap();
        // The account's record counted again a day later.
        let later = serde_json::json!({"count": 2, "locked_until_ms": 0, "last_ms": (now + 86_400) * 1000});
        store.put("acme", "login#a@acme.example", later.to_string().into_bytes(), Condition::Exists).await.unwrap();
        let exists = |sk: &'static str| {
            let store = store.clone();
            async move { store.get("acme", sk).await.unwrap().is_some() }
        };

        // Nothing is due yet.
        assert_eq!(sweep_to(&store, now, window).await, (0, 0));
        // Past the first expiry: the client's record goes, the account's is rescheduled.
        let first = now + window.as_secs() as i64 + 2 * BUCKET_SECS;
        assert_eq!(sweep_to(&store, first, window).await, (1, 1));
        assert!(!exists("login-client#10.0.0.1#a@acme.example").await);
        assert!(exists("login#a@acme.example").await);
        // Past its new expiry it goes too, and no entry is left anywhere swept.
        let second = now + 86_400 + window.as_secs() as i64 + 2 * BUCKET_SECS;
        assert_eq!(sweep_to(&store, second, window).await, (1, 0));
        assert!(!exists("login#a@acme.example").await);
        for b in bucket(now)..bucket(second) {
            let q =
                tenantmesh_storage::Query { pk: index_pk(b), sk_prefix: String::new(), start_after: None, limit: 10 };
            assert!(store.query(q).await.unwrap().items.is_empty(), "entries left in bucket {b}");
        }
    }
}
