//! Limits of the RPCs anyone may call without a token (Login, Refresh,
//! IssueServiceToken, GetJwks): there is no tenant to hold to its quota yet,
//! so each caller's address has a rate, for every attempt.
//!
//! A tenant has a budget too, so that a flood of guesses against one
//! tenant cannot take everyone's password checks; but it is spent by
//! *failed* sign-ins only, never by attempts, and it is turned only
//! against the addresses that failed: while a tenant's budget is spent,
//! a sign-in naming it is refused from an address that failed against it
//! in the last [`FAILED_RECENTLY`], and goes on from any other. So nobody
//! can lock a tenant's users out by failing on purpose, or by sending
//! made-up refresh tokens (a refresh token is checked against the store,
//! which costs no password check, before anything about its tenant is
//! spent: Refresh is held to its caller's address alone). Refusals are
//! RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure (`peer:<ip>` or
//! `tenant:<id>`), before any password is checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_admission::limits::{KeyedLimiter, Limits, LogThrottle, Quota, Refusal};
use tenantmesh_service::config::{ConfigError, parse_var};
use tonic::Status;

/// How long an address that failed to sign in to a tenant is held to the
/// tenant's spent budget.
pub const FAILED_RECENTLY: Duration = Duration::from_secs(60);

/// Rates of anonymous calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousLimits {
    /// `TENANTMESH_ANON_PEER_RATE` (default 100 per second, burst twice
    /// that): calls of Login, Refresh and IssueServiceToken per address.
    pub per_peer: u32,
    /// `TENANTMESH_ANON_TENANT_RATE` (default 20 per second, burst twice
    /// that): failed sign-ins naming one tenant.
    pub per_tenant: u32,
    /// `TENANTMESH_JWKS_PEER_RATE` (default 50 per second, burst twice
    /// that): GetJwks per address (validators fetch it on a key change).
    pub jwks_per_peer: u32,
}

impl AnonymousLimits {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let rate = |var: &'static str, default: u32| -> Result<u32, ConfigError> {
            match parse_var(env, var, default)? {
                0 => Err(ConfigError { var, message: "must be at least 1".into() }),
                n => Ok(n),
            }
        };
        Ok(Self {
            per_peer: rate("TENANTMESH_ANON_PEER_RATE", 100)?,
            per_tenant: rate("TENANTMESH_ANON_TENANT_RATE", 20)?,
            jwks_per_peer: rate("TENANTMESH_JWKS_PEER_RATE", 50)?,
        })
    }
}

/// Which anonymous call is being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    /// Login, Refresh, IssueServiceToken: a secret is checked.
    Credentials,
    GetJwks,
}

/// Keys of the limiter besides calls by address.
#[derive(Hash)]
enum Key<'a> {
    /// A tenant's budget of failed sign-ins.
    TenantFailures(&'a str),
    /// An address that failed against a tenant lately.
    FailedFrom(&'a str, IpAddr),
}

pub struct Anonymous {
    limits: AnonymousLimits,
    limiter: Arc<KeyedLimiter>,
    /// At most one log line per refused subject and second: a flood must
    /// not become a log flood.
    logs: LogThrottle,
}

fn per_second(rate: u32) -> Limits {
    Limits { rate_per_second: rate, burst: rate.saturating_mul(2), max_in_flight: 0 }
}

impl Anonymous {
    pub fn new(limits: AnonymousLimits) -> Self {
        Self { limits, limiter: Arc::new(KeyedLimiter::new()), logs: LogThrottle::new() }
    }

    fn refuse(&self, call: Call, subject: String, rate: u32, retry_after: Duration) -> Status {
        if self.logs.allow(subject.as_str()) {
            tracing::warn!(
                subject,
                ?call,
                "anonymous call refused by its rate (further refusals within a second are not logged)"
            );
        }
        Refusal {
            limit: tenantmesh_admission::limits::Limit::Rate,
            subject,
            description: format!("{rate} calls per second, burst {}", rate.saturating_mul(2)),
            retry_after,
        }
        .status()
    }

    /// Admits an anonymous `call` from `peer`: every attempt counts
    /// against the address.
    pub fn admit(&self, call: Call, peer: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = peer else { return Ok(()) };
        let rate = match call {
            Call::Credentials => self.limits.per_peer,
            Call::GetJwks => self.limits.jwks_per_peer,
        };
        match self.limiter.admit(&(call, ip), 1, per_second(rate)) {
            Ok(_) => Ok(()),
            Err((_, retry)) => Err(self.refuse(call, format!("peer:{ip}"), rate, retry)),
        }
    }

    /// Whether a sign-in naming `tenant` from `peer` may have its password
    /// checked: refused only while the tenant's budget of failures is spent
    /// *and* this address failed against it lately. Takes nothing.
    pub fn admit_sign_in(&self, peer: Option<IpAddr>, tenant: &str) -> Result<(), Status> {
        let rate = self.limits.per_tenant;
        let Some(retry) = self.limiter.owing(&Key::TenantFailures(tenant), 1, per_second(rate)) else {
            return Ok(());
        };
        let failed_here = peer.is_some_and(|ip| {
            self.limiter.owing(&Key::FailedFrom(tenant, ip), 1, Quota::every(FAILED_RECENTLY)).is_some()
        });
        if !failed_here {
            return Ok(());
        }
        Err(self.refuse(Call::Credentials, format!("tenant:{tenant}"), rate, retry))
    }

    /// A sign-in naming `tenant` from `peer` failed (a wrong password, an
    /// unknown or disabled user): it spends the tenant's budget, and the
    /// address is remembered as failing against it for [`FAILED_RECENTLY`].
    pub fn failed_sign_in(&self, peer: Option<IpAddr>, tenant: &str) {
        let _ = self.limiter.admit(&Key::TenantFailures(tenant), 1, per_second(self.limits.per_tenant));
        if let Some(ip) = peer {
            // Owing from now on: `admit` refused means it owes already.
            let _ = self.limiter.admit(&Key::FailedFrom(tenant, ip), 1, Quota::every(FAILED_RECENTLY));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    /// Every attempt counts against its address; only failures count
    /// against a tenant, and a tenant's spent budget refuses only the
    /// addresses that failed against it.
    #[test]
    fn failures_spend_the_tenants_budget_against_the_failing_addresses_only() {
        let a = Anonymous::new(AnonymousLimits { per_peer: 5, per_tenant: 2, jwks_per_peer: 1 });
        let (attacker, user): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // Attempts alone never spend the tenant's budget.
        for _ in 0..20 {
            a.admit_sign_in(Some(attacker), "acme").unwrap();
        }
        // The attacker fails four times: acme's budget (burst 4) is spent.
        for _ in 0..4 {
            a.admit_sign_in(Some(attacker), "acme").unwrap();
            a.failed_sign_in(Some(attacker), "acme");
        }
        let s = a.admit_sign_in(Some(attacker), "acme").unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.get_details_quota_failure().unwrap().violations[0].subject, "tenant:acme");
        assert!(s.get_details_retry_info().unwrap().retry_delay.is_some());
        // Another address signs in to acme; the attacker to another tenant.
        a.admit_sign_in(Some(user), "acme").unwrap();
        a.admit_sign_in(Some(attacker), "globex").unwrap();
        // Per address, every call counts: a burst of 10, the 11th is refused.
        for _ in 0..10 {
            a.admit(Call::Credentials, Some(user)).unwrap();
        }
        let s = a.admit(Call::Credentials, Some(user)).unwrap_err();
        assert_eq!(s.get_details_quota_failure().unwrap().violations[0].subject, "peer:10.0.0.2");
        // GetJwks has its own bucket per address.
        a.admit(Call::GetJwks, Some(user)).unwrap();
    }

    #[test]
    fn rates_must_be_positive_numbers() {
        let env = |k: &str, v: &str| [(k.to_owned(), v.to_owned())].into_iter().collect::<HashMap<_, _>>();
        assert_eq!(
            AnonymousLimits::from_env(&env("TENANTMESH_ANON_PEER_RATE", "0")).unwrap_err().var,
            "TENANTMESH_ANON_PEER_RATE"
        );
        assert_eq!(
            AnonymousLimits::from_env(&env("TENANTMESH_ANON_TENANT_RATE", "x")).unwrap_err().var,
            "TENANTMESH_ANON_TENANT_RATE"
        );
        assert_eq!(AnonymousLimits::from_env(&HashMap::new()).unwrap().per_peer, 100);
    }
}
