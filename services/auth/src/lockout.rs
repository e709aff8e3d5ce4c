//! Login backoff, counted where an attacker cannot turn it against the
//! account's owner:
//!
//! - per (tenant, email, client address): the first `free_attempts`
//!   failures in a row are free; each further one doubles a lockout (1 s,
//!   2 s, 4 s, ... up to `max_lockout`) of that client only;
//! - per (tenant, email) from every client together, with a much higher
//!   ceiling (`account_free_attempts`): a guess spread over many addresses
//!   is stopped too, later.
//!
//! An attempt is *reserved* before its password is checked: counted as a
//! failure by a conditional write (the lockout, if the count calls for one,
//! written in the same write), and cleared only once the password is right.
//! So a burst of parallel guesses gets at most the free attempts checked,
//! however many arrive at once. While locked, logins are refused with
//! RESOURCE_EXHAUSTED and `RetryInfo`, even with the right password.
//! Failures are counted for unknown emails too, so the lockout reveals
//! nothing about which users exist. The records live in the auth table, so
//! replicas share them. A record expires once quiet for the lockout window
//! (`max_lockout`: no failure in that long and no lockout running), and
//! the sweeper ([`crate::expiry`]) purges it: failures far apart do not add
//! up, and guesses at random emails from random addresses leave nothing
//! behind for long.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, StorageError, Write};

use crate::error::AuthError;

/// The backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// `TENANTMESH_LOGIN_FREE_ATTEMPTS` (default 5): per client address.
    pub free_attempts: u32,
    /// `TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS` (default 100): per account,
    /// from all addresses together.
    pub account_free_attempts: u32,
    /// `TENANTMESH_LOGIN_MAX_LOCKOUT_SECS` (default 900).
    pub max_lockout: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self { free_attempts: 5, account_free_attempts: 100, max_lockout: Duration::from_secs(900) }
    }
}

impl LockoutPolicy {
    /// How long a failure is remembered: the longest lockout (at least a
    /// minute).
    pub fn window(&self) -> Duration {
        self.max_lockout.max(Duration::from_secs(60))
    }

    /// The lockout after `failures` failures in a row, if any.
    pub fn lockout_after(&self, failures: u32) -> Option<Duration> {
        let over = failures.checked_sub(self.free_attempts.saturating_add(1))?;
        let secs = 1u64.checked_shl(over.min(30)).unwrap_or(u64::MAX);
        Some(Duration::from_secs(secs).min(self.max_lockout))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Failures {
    count: u32,
    locked_until_ms: i64,
    /// When the last failure was counted.
    #[serde(default)]
    last_ms: i64,
}

pub(crate) const ACCOUNT_PREFIX: &str = "login#";
pub(crate) const CLIENT_PREFIX: &str = "login-client#";

/// The account's record.
fn account_sk(email: &str) -> String {
    format!("{ACCOUNT_PREFIX}{email}")
}

/// The record of one client address of the account (a prefix no account
/// record has, whatever the email holds).
fn client_sk(email: &str, client: &str) -> String {
    format!("{CLIENT_PREFIX}{client}#{email}")
}

/// When a failures record holding `data` expires (Unix seconds): `window`
/// after its last failure, and never while its lockout runs.
pub(crate) fn expires_at(data: &[u8], window: Duration) -> Option<i64> {
    let f: Failures = serde_json::from_slice(data).ok()?;
    let until_ms = f.locked_until_ms.max(f.last_ms.saturating_add(window.as_millis() as i64));
    Some(until_ms.div_euclid(1000) + 1)
}

use tenantmesh_service::clock::now_ms;

fn corrupt(e: serde_json::Error) -> AuthError {
    AuthError::Corrupt(format!("login failures: {e}"))
}

/// Reserves one login attempt of (tenant, email) from `client` before its
/// password is checked: counted as a failure for the client and for the
/// account, or refused (`LockedOut`) if either is locked. [`clear`] it once
/// the password is right.
pub async fn reserve(
    store: &DynTable,
    policy: LockoutPolicy,
    tenant: &str,
    email: &str,
    client: &str,
) -> Result<(), AuthError> {
    take(store, policy.free_attempts, policy, tenant, &client_sk(email, client)).await?;
    take(store, policy.account_free_attempts, policy, tenant, &account_sk(email)).await
}

/// Counts one attempt in record `sk` (locking it if past `free` attempts),
/// or refuses if it is locked.
async fn take(store: &DynTable, free: u32, policy: LockoutPolicy, tenant: &str, sk: &str) -> Result<(), AuthError> {
    let policy = LockoutPolicy { free_attempts: free, ..policy };
    // Parallel attempts conflict; each round one of them is counted, and
    // once the record locks the rest are refused without writing.
    for _ in 0..32 {
        let current = store.get(tenant, sk).await?;
        let (mut f, condition) = match &current {
            Some(item) => {
                (serde_json::from_slice::<Failures>(&item.data).map_err(corrupt)?, Condition::Version(item.version))
            }
            None => (Failures::default(), Condition::NotExists),
        };
        let now = now_ms();
        if f.locked_until_ms > now {
            return Err(AuthError::LockedOut(Duration::from_millis((f.locked_until_ms - now) as u64)));
        }
        f.count = f.count.saturating_add(1);
        f.last_ms = now;
        let lock = policy.lockout_after(f.count);
        if let Some(lock) = lock {
            f.locked_until_ms = now + lock.as_millis() as i64;
        }
        let data = serde_json::to_vec(&f).map_err(corrupt)?;
        let written = if condition == Condition::NotExists {
            // A new record gets its expiry entry with it.
            let at = expires_at(&data, policy.window()).expect("a record just encoded");
            let expiry = crate::expiry_index::entry(tenant, sk, at);
            let record = Write::Put { pk: tenant.into(), sk: sk.into(), data, condition };
            store.transact_write(vec![record, expiry]).await
        } else {
            store.put(tenant, sk, data, condition).await.map(drop)
        };
        match written {
            Ok(()) => {
                if let Some(lock) = lock {
                    let scope = if sk.starts_with(CLIENT_PREFIX) { "client" } else { "account" };
                    tracing::warn!(security_event = "login_locked", scope, failures = f.count, lockout = ?lock, "login locked out");
                }
                return Ok(());
            }
            Err(StorageError::ConditionFailed { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Still contended after that many rounds: a flood of attempts.
    Err(AuthError::LockedOut(Duration::from_secs(1)))
}

/// A login whose password was right: the client's and the account's counts
/// start afresh.
pub async fn clear(store: &DynTable, tenant: &str, email: &str, client: &str) -> Result<(), AuthError> {
    store.delete(tenant, &client_sk(email, client), Condition::None).await?;
    store.delete(tenant, &account_sk(email), Condition::None).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_double_up_to_the_cap() {
        let p = LockoutPolicy { free_attempts: 3, account_free_attempts: 100, max_lockout: Duration::from_secs(10) };
        let got: Vec<Option<u64>> = (0..9).map(|n| p.lockout_after(n).map(|d| d.as_secs())).collect();
        assert_eq!(got, vec![None, None, None, None, Some(1), Some(2), Some(4), Some(8), Some(10)]);
        assert_eq!(p.lockout_after(u32::MAX), Some(Duration::from_secs(10)));
    }
}

#[cfg(test)]
mod reservation_tests {
    use super::*;

    /// A burst of parallel attempts gets at most the free ones (and the one
    /// that locks) through; another client is not locked by it, and the
    /// account ceiling stops a guess spread over clients.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_attempts_get_at_most_the_free_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("auth.redb")).unwrap();
        let policy =
            LockoutPolicy { free_attempts: 5, account_free_attempts: 12, max_lockout: Duration::from_secs(60) };
        let attempts: Vec<_> = (0..30)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { reserve(&store, policy, "acme", "a@acme.example", "10.0.0.1").await })
            })
            .collect();
        let mut through = 0;
        for a in attempts {
            match a.await.unwrap() {
                Ok(()) => through += 1,
                Err(AuthError::LockedOut(_)) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(through, 6, "five free attempts and the one that locks");
        // Another address of the same account is not locked...
        for _ in 0..5 {
            reserve(&store, policy, "acme", "a@acme.example", "10.0.0.2").await.unwrap();
        }
        clear(&store, "acme", "a@acme.example", "10.0.0.2").await.unwrap();
        // ...until the account's ceiling, counted over every address (a
        // right password cleared it above): 12 free, the 13th locks.
        for client in ["10.0.0.3", "10.0.0.4"] {
            for _ in 0..6 {
                reserve(&store, policy, "acme", "a@acme.example", client).await.unwrap();
            }
        }
        reserve(&store, policy, "acme", "a@acme.example", "10.0.0.5").await.unwrap();
        let locked = reserve(&store, policy, "acme", "a@acme.example", "10.0.0.6").await;
        assert!(matches!(locked, Err(AuthError::LockedOut(_))), "{locked:?}");
    }
}
