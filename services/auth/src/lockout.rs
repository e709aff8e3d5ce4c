//! Login backoff per (tenant, email): the first `free_attempts` failures in
//! a row are free; each further failure doubles a lockout (1 s, 2 s, 4 s, ... up to
//! `max_lockout`) during which logins are refused with RESOURCE_EXHAUSTED
//! and `RetryInfo`, even with the right password. Failures are counted for
//! unknown emails too, so the lockout reveals nothing about which users
//! exist. The record lives in the auth table, so replicas share it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, StorageError};

use crate::AuthError;

/// The backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// `TENANTMESH_LOGIN_FREE_ATTEMPTS` (default 5).
    pub free_attempts: u32,
    /// `TENANTMESH_LOGIN_MAX_LOCKOUT_SECS` (default 900).
    pub max_lockout: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self { free_attempts: 5, max_lockout: Duration::from_secs(900) }
    }
}

impl LockoutPolicy {
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
}

fn sk(email: &str) -> String {
    format!("login#{email}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn corrupt(e: serde_json::Error) -> AuthError {
    AuthError::Corrupt(format!("login failures: {e}"))
}

/// The failure record of (tenant, email) as a login finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No failures counted: nothing to clear after a success.
    Clean,
    /// Failures counted, not locked now.
    Failed,
    /// Locked for this much longer.
    Locked(Duration),
}

/// Where logins of (tenant, email) stand.
pub async fn standing(store: &DynTable, tenant: &str, email: &str) -> Result<Standing, AuthError> {
    let Some(item) = store.get(tenant, &sk(email)).await? else { return Ok(Standing::Clean) };
    let f: Failures = serde_json::from_slice(&item.data).map_err(corrupt)?;
    let left = f.locked_until_ms - now_ms();
    Ok(if left > 0 { Standing::Locked(Duration::from_millis(left as u64)) } else { Standing::Failed })
}

/// Counts a failed login, locking further attempts once past the free ones.
pub async fn record_failure(
    store: &DynTable,
    policy: LockoutPolicy,
    tenant: &str,
    email: &str,
) -> Result<(), AuthError> {
    for _ in 0..5 {
        let current = store.get(tenant, &sk(email)).await?;
        let (mut f, condition) = match &current {
            Some(item) => {
                (serde_json::from_slice::<Failures>(&item.data).map_err(corrupt)?, Condition::Version(item.version))
            }
            None => (Failures::default(), Condition::NotExists),
        };
        f.count = f.count.saturating_add(1);
        if let Some(lock) = policy.lockout_after(f.count) {
            f.locked_until_ms = now_ms() + lock.as_millis() as i64;
            tracing::warn!(security_event = "login_locked", email, failures = f.count, lockout = ?lock, "login locked out");
        }
        let data = serde_json::to_vec(&f).map_err(corrupt)?;
        match store.put(tenant, &sk(email), data, condition).await {
            Ok(_) => return Ok(()),
            // A concurrent failure was counted first: count again on top of it.
            Err(StorageError::ConditionFailed { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AuthError::Internal("login failure counter kept conflicting".into()))
}

/// A successful login after failures starts the count afresh.
pub async fn clear(store: &DynTable, tenant: &str, email: &str) -> Result<(), AuthError> {
    store.delete(tenant, &sk(email), Condition::None).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_double_up_to_the_cap() {
        let p = LockoutPolicy { free_attempts: 3, max_lockout: Duration::from_secs(10) };
        let got: Vec<Option<u64>> = (0..9).map(|n| p.lockout_after(n).map(|d| d.as_secs())).collect();
        assert_eq!(got, vec![None, None, None, None, Some(1), Some(2), Some(4), Some(8), Some(10)]);
        assert_eq!(p.lockout_after(u32::MAX), Some(Duration::from_secs(10)));
    }
}
