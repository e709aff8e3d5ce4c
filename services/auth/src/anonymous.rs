//! Limits of the RPCs anyone may call without a token (Login, Refresh,
//! IssueServiceToken, GetJwks): there is no tenant to hold to its quota yet,
//! so each caller's address has a rate, and so does each tenant a request
//! names (a login flood against one tenant slows that tenant's logins, not
//! everyone's). Refusals are RESOURCE_EXHAUSTED with RetryInfo and
//! QuotaFailure (`peer:<ip>` or `tenant:<id>`), before any password is
//! checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tenantmesh_service::config::{ConfigError, parse_var};
use tenantmesh_service::limits::{KeyedLimiter, Limits, LogThrottle, Refusal};
use tonic::Status;

/// Rates of anonymous calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousLimits {
    /// `TENANTMESH_ANON_PEER_RATE` (default 100 per second, burst twice
    /// that): calls of Login, Refresh and IssueServiceToken per address.
    pub per_peer: u32,
    /// `TENANTMESH_ANON_TENANT_RATE` (default 20 per second, burst twice
    /// that): logins and refreshes naming one tenant.
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

    /// Admits an anonymous `call` from `peer` naming `tenant` (if any).
    pub fn admit(&self, call: Call, peer: Option<IpAddr>, tenant: Option<&str>) -> Result<(), Status> {
        let refuse = |subject: String, rate: u32, retry_after| {
            if self.logs.allow(subject.as_str()) {
                tracing::warn!(
                    subject,
                    ?call,
                    "anonymous call refused by its rate (further refusals within a second are not logged)"
                );
            }
            Refusal {
                limit: tenantmesh_service::limits::Limit::Rate,
                subject,
                description: format!("{rate} calls per second, burst {}", rate.saturating_mul(2)),
                retry_after,
            }
            .status()
        };
        if let Some(ip) = peer {
            let rate = match call {
                Call::Credentials => self.limits.per_peer,
                Call::GetJwks => self.limits.jwks_per_peer,
            };
            if let Err((_, retry)) = self.limiter.admit(&(call, ip), 1, per_second(rate)) {
                return Err(refuse(format!("peer:{ip}"), rate, retry));
            }
        }
        if let Some(tenant) = tenant.filter(|t| !t.is_empty()) {
            let rate = self.limits.per_tenant;
            if let Err((_, retry)) = self.limiter.admit(&(call, tenant), 1, per_second(rate)) {
                return Err(refuse(format!("tenant:{tenant}"), rate, retry));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn peers_and_named_tenants_have_their_own_rates() {
        let a = Anonymous::new(AnonymousLimits { per_peer: 5, per_tenant: 2, jwks_per_peer: 1 });
        let (p1, p2): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // A tenant's burst is 4: the fifth login naming it is refused, from any address.
        for _ in 0..4 {
            a.admit(Call::Credentials, Some(p1), Some("acme")).unwrap();
        }
        let s = a.admit(Call::Credentials, Some(p2), Some("acme")).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.get_details_quota_failure().unwrap().violations[0].subject, "tenant:acme");
        assert!(s.get_details_retry_info().unwrap().retry_delay.is_some());
        // p1 has used 4 of its 10; other tenants go on until p1's burst is gone.
        for _ in 0..6 {
            a.admit(Call::Credentials, Some(p1), Some("globex")).ok();
        }
        let s = a.admit(Call::Credentials, Some(p1), Some("initech")).unwrap_err();
        assert_eq!(s.get_details_quota_failure().unwrap().violations[0].subject, "peer:10.0.0.1");
        // GetJwks has its own bucket per address.
        a.admit(Call::GetJwks, Some(p1), None).unwrap();
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
