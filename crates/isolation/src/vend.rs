//! Scoped credentials: `sts:AssumeRole` on the tenant-access role with the
//! tenant's session policy, cached per (tenant, policy hash), refreshed
//! ahead of expiry, one STS call in flight per key however many requests
//! wait for it, in a bounded cache. At steady state a request makes no STS
//! call at all (STS allows roughly 600 calls/s per account).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_sts::types::Tag;

/// STS AssumeRole calls made by this process (every vendor), for tests and
/// metrics.
static ASSUME_ROLE_CALLS: AtomicU64 = AtomicU64::new(0);

/// AssumeRole calls made by this process so far.
pub fn assume_role_calls() -> u64 {
    ASSUME_ROLE_CALLS.load(Ordering::Relaxed)
}

/// Session length requested from STS.
pub const SESSION_DURATION: Duration = Duration::from_secs(900);
/// Credentials closer than this to expiry are renewed.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum VendError {
    #[error("sts assume-role failed: {0}")]
    Sts(String),
    #[error("sts returned no credentials")]
    NoCredentials,
}

type Slot = Arc<tokio::sync::Mutex<Option<Credentials>>>;

/// Vends tenant-scoped credentials (see the module docs).
pub struct CredentialVendor {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    capacity: usize,
    slots: Mutex<HashMap<(String, u64), Slot>>,
}

impl std::fmt::Debug for CredentialVendor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialVendor").field("role_arn", &self.role_arn).finish_non_exhaustive()
    }
}

fn policy_hash(policy: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    policy.hash(&mut h);
    h.finish()
}

fn fresh(c: &Credentials) -> bool {
    c.expiry().and_then(|e| e.duration_since(SystemTime::now()).ok()).is_some_and(|left| left > REFRESH_AHEAD)
}

impl CredentialVendor {
    /// `capacity` bounds the number of cached (tenant, policy) entries.
    pub fn new(sts: aws_sdk_sts::Client, role_arn: impl Into<String>, capacity: usize) -> Self {
        Self { sts, role_arn: role_arn.into(), capacity: capacity.max(1), slots: Mutex::new(HashMap::new()) }
    }

    fn slot(&self, key: (String, u64)) -> Slot {
        let mut slots = self.slots.lock().expect("vendor lock");
        if !slots.contains_key(&key) && slots.len() >= self.capacity {
            // Drop entries nobody is using, stale ones first.
            slots.retain(|_, s| Arc::strong_count(s) > 1 || s.try_lock().is_ok_and(|c| c.as_ref().is_some_and(fresh)));
            if slots.len() >= self.capacity
                && let Some(k) = slots.iter().find(|(_, s)| Arc::strong_count(s) == 1).map(|(k, _)| k.clone())
            {
                slots.remove(&k);
            }
        }
        slots.entry(key).or_default().clone()
    }

    /// Credentials confined by `policy` for `tenant_id`.
    pub async fn credentials(&self, tenant_id: &str, policy: &str) -> Result<Credentials, VendError> {
        let slot = self.slot((tenant_id.to_owned(), policy_hash(policy)));
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        ASSUME_ROLE_CALLS.fetch_add(1, Ordering::Relaxed);
        // Counted by the meter of the service at work (a call is rare: the
        // credentials are cached), so the instrument is looked up here.
        tenantmesh_telemetry::metrics::meter()
            .u64_counter("tenantmesh.sts.assume_role.calls")
            .with_description("STS AssumeRole calls made to vend tenant-scoped credentials")
            .build()
            .add(1, &[]);
        let session: String = format!("tenant-{tenant_id}").chars().take(64).collect();
        let tag = Tag::builder().key("tenant").value(tenant_id).build().map_err(|e| VendError::Sts(e.to_string()))?;
        let out = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(&session)
            .source_identity(&session)
            .policy(policy)
            .duration_seconds(SESSION_DURATION.as_secs() as i32)
            .tags(tag)
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(tenant_id, error = %aws_sdk_sts::error::DisplayErrorContext(&e), "assume-role failed");
                VendError::Sts(aws_sdk_sts::error::DisplayErrorContext(&e).to_string())
            })?;
        let c = out.credentials().ok_or(VendError::NoCredentials)?;
        let expiry = SystemTime::try_from(*c.expiration()).ok();
        let creds = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            expiry,
            "tenantmesh-sts",
        );
        tracing::debug!(tenant_id, "vended tenant-scoped credentials");
        *cached = Some(creds.clone());
        Ok(creds)
    }
}

/// A credentials provider for one tenant's DynamoDB client.
#[derive(Debug, Clone)]
pub struct TenantCredentials {
    pub vendor: Arc<CredentialVendor>,
    pub tenant_id: String,
    pub policy: Arc<str>,
}

impl ProvideCredentials for TenantCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.vendor.credentials(&self.tenant_id, &self.policy).await.map_err(CredentialsError::provider_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(valid_for: Duration) -> Credentials {
        Credentials::new("a", "s", Some("t".into()), Some(SystemTime::now() + valid_for), "test")
    }

    #[test]
    fn credentials_are_renewed_ahead_of_expiry() {
        assert!(fresh(&creds(SESSION_DURATION)));
        assert!(!fresh(&creds(REFRESH_AHEAD - Duration::from_secs(1))));
        assert!(!fresh(&Credentials::new("a", "s", None, None, "no expiry")));
        assert!(!fresh(&Credentials::new("a", "s", None, Some(SystemTime::UNIX_EPOCH), "expired")));
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::config::Builder::new()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new("us-east-1"))
                .build(),
        );
        let vendor = CredentialVendor::new(sts, "arn:aws:iam::123456789012:role/r", 2);
        for t in ["t1", "t2", "t3", "t4"] {
            let slot = vendor.slot((t.to_owned(), 1));
            *slot.lock().await = Some(creds(SESSION_DURATION));
        }
        assert!(vendor.slots.lock().unwrap().len() <= 2);
        // Entries in use are never dropped.
        let held = vendor.slot(("held".to_owned(), 1));
        for t in ["t5", "t6", "t7"] {
            let _ = vendor.slot((t.to_owned(), 1));
        }
        assert!(vendor.slots.lock().unwrap().contains_key(&("held".to_owned(), 1)));
        drop(held);
        assert_ne!(policy_hash("a"), policy_hash("b"));
    }
}
