//! Settings every service shares, parsed from an injected environment map
//! so tests never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A configuration error names the variable and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// Settings shared by all four services.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// `TENANTMESH_LISTEN_ADDR` (default `127.0.0.1:<service port>`).
    pub listen_addr: SocketAddr,
    /// `TENANTMESH_DATA_DIR` (default `./.tenantmesh`).
    pub data_dir: PathBuf,
    /// `TENANTMESH_AUTH_URL` (default `http://127.0.0.1:50052`).
    pub auth_url: String,
    /// `TENANTMESH_REGISTRY_URL` (default `http://127.0.0.1:50051`).
    pub registry_url: String,
    /// `TENANTMESH_TOKEN_ISSUER` (default `tenantmesh-auth`).
    pub issuer: String,
    /// `TENANTMESH_TOKEN_AUDIENCE` (default `tenantmesh`).
    pub audience: String,
    /// `TENANTMESH_TENANT_CACHE_TTL_MS` (default 5000): how long a tenant's
    /// tier and status are cached by the tenant-context layer, i.e. how
    /// soon a suspension takes effect everywhere.
    pub tenant_cache_ttl: std::time::Duration,
    /// `TENANTMESH_SHUTDOWN_GRACE_MS` (default 10000): how long in-flight
    /// calls may run on after SIGTERM before the server stops anyway.
    pub shutdown_grace: std::time::Duration,
    /// `TENANTMESH_TIERS_FILE`: the tiers TOML (default: the built-in one).
    pub tiers: std::sync::Arc<crate::tiers::Tiers>,
    /// `TENANTMESH_TENANT_CACHE_CAPACITY` (default 100000): how many
    /// tenants' records (and, in the data service, policy-confined stores
    /// and credentials) a service keeps; past it, the least recently added
    /// are looked up again.
    pub tenant_cache_capacity: usize,
    /// `TENANTMESH_TOKEN_CACHE_CAPACITY` (default 100000): how many verified
    /// access tokens a service remembers (0: verify every request in full).
    pub token_cache_capacity: usize,
    /// `TENANTMESH_LIMITS` (`on`, the default, or `off`): whether each
    /// tenant's requests are held to its limits (rate, requests in flight).
    pub limits: bool,
    /// `TENANTMESH_MAX_IN_FLIGHT` (default 1024) requests of tenants run at
    /// once in the service; past it they wait in the fair queue up to
    /// `TENANTMESH_QUEUE_WAIT_MS` (default 1000) or their deadline.
    pub fair_queue: FairQueueSettings,
    /// `TENANTMESH_LEASE_INTERVAL_MS` (default 2000): how often a replica
    /// renews its shares of its tenants' limits with the other replicas
    /// (on DynamoDB; see `leases`). Leases last three intervals.
    pub lease_interval: std::time::Duration,
    /// `TENANTMESH_JWKS_ALLOW_PRIVATE` (default false): whether tenants'
    /// identity providers may serve their JWKS from loopback or private
    /// addresses (and over http:// there). For development and tests only:
    /// otherwise a provider URL could reach the mesh's own network or the
    /// cloud metadata service.
    pub jwks_allow_private: bool,
    /// `TENANTMESH_AUDIT_SWEEP_MS` (default 3600000, an hour): how often a
    /// service with an audit log purges events past their tenants' tiers'
    /// `audit_retention_days`.
    pub audit_sweep: std::time::Duration,
    /// `TENANTMESH_SERVICE_CLIENT_ID` / `TENANTMESH_SERVICE_CLIENT_SECRET`:
    /// the platform service identity this service acts as when it calls
    /// for no tenant (the onboarding workflows; every service's watch of
    /// tenant changes). None: the service has no such identity.
    pub service_client: Option<ServiceCredentials>,
    /// `TENANTMESH_PEER_CONNECTIONS_PER_SECOND` (default 100; 0: no bound):
    /// new connections one peer address may open per second, after a burst
    /// of twice as many; faster ones wait (see `connection`). Behind a
    /// proxy or load balancer that opens a connection per client, raise it.
    pub peer_connections_per_second: u32,
    /// `TENANTMESH_OVERLOAD` (`auto`, the default; `on`; `off`),
    /// `TENANTMESH_OVERLOAD_BUSY_PERCENT` (default 90, 21..=100) and
    /// `TENANTMESH_OVERLOAD_DELAY_MS` (default 5, 1..=1000): whether the
    /// process is short of CPU is measured (the runtime busy ratio or the
    /// scheduling delay past which it is), assumed, or never; see `load`.
    pub overload: crate::load::OverloadSettings,
}

/// Client credentials of a platform service (the secret never shows in
/// `Debug`).
#[derive(Clone)]
pub struct ServiceCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

fn service_client(env: &HashMap<String, String>) -> Result<Option<ServiceCredentials>, ConfigError> {
    let Some(secret) = var(env, "TENANTMESH_SERVICE_CLIENT_SECRET") else { return Ok(None) };
    refuse_placeholder(env, "TENANTMESH_SERVICE_CLIENT_SECRET", secret)?;
    let id = var(env, "TENANTMESH_SERVICE_CLIENT_ID").unwrap_or("onboarding");
    Ok(Some(ServiceCredentials { client_id: id.to_owned(), client_secret: secret.to_owned() }))
}

/// Default `iss` of tokens minted by the auth service.
pub const DEFAULT_ISSUER: &str = "tenantmesh-auth";
/// Default `aud` of tokens minted by the auth service.
pub const DEFAULT_AUDIENCE: &str = "tenantmesh";

pub const REGISTRY_PORT: u16 = 50051;
pub const AUTH_PORT: u16 = 50052;
pub const ONBOARDING_PORT: u16 = 50053;
pub const DATA_PORT: u16 = 50054;

/// `TENANTMESH_METERING_FLUSH_MS` (default 10000, at least 10): how often
/// a service sends what its meters counted.
pub fn metering_flush(env: &HashMap<String, String>) -> Result<std::time::Duration, ConfigError> {
    Ok(std::time::Duration::from_millis(parse_var(env, "TENANTMESH_METERING_FLUSH_MS", 10_000u64)?.max(10)))
}

/// `TENANTMESH_STORAGE_SAMPLE_SECS` (default 3600, at least 1): how often
/// every tenant's stored bytes are measured (`storage_byte_hours`) and its
/// change history trimmed.
pub fn storage_sample(env: &HashMap<String, String>) -> Result<std::time::Duration, ConfigError> {
    Ok(std::time::Duration::from_secs(parse_var(env, "TENANTMESH_STORAGE_SAMPLE_SECS", 3600u64)?.max(1)))
}

/// The process environment as a map (for `main`).
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// A non-empty variable's value.
pub fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// How the shipped compose file's placeholder secrets begin.
pub const PLACEHOLDER_PREFIX: &str = "change-me";

/// Refuses a secret that is still a shipped placeholder (`change-me...`)
/// unless `TENANTMESH_DEMO=true` says this is a throwaway demo: a
/// deployment never runs on a secret everyone can read in the repository.
pub fn refuse_placeholder(
    env: &HashMap<String, String>,
    var_name: &'static str,
    secret: &str,
) -> Result<(), ConfigError> {
    if !secret.starts_with(PLACEHOLDER_PREFIX) || parse_var(env, "TENANTMESH_DEMO", false)? {
        return Ok(());
    }
    Err(ConfigError {
        var: var_name,
        message: "is still the shipped placeholder (change-me...): set a secret of your own, or \
                  TENANTMESH_DEMO=true for a throwaway demo"
            .into(),
    })
}

/// Parses a variable with `FromStr`, naming it in the error.
pub fn parse_var<T: std::str::FromStr>(
    env: &HashMap<String, String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match var(env, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e: T::Err| ConfigError { var: name, message: format!("{v:?}: {e}") }),
    }
}

/// An `http(s)://` URL from `name`, or the loopback one on `default_port`.
pub fn url_var(env: &HashMap<String, String>, name: &'static str, default_port: u16) -> Result<String, ConfigError> {
    let url = var(env, name).map(str::to_owned).unwrap_or_else(|| format!("http://127.0.0.1:{default_port}"));
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError { var: name, message: format!("{url:?} must start with http:// or https://") });
    }
    Ok(url)
}

/// The tiers of `TENANTMESH_TIERS_FILE`, else the built-in ones.
pub fn tiers_var(env: &HashMap<String, String>) -> Result<crate::tiers::Tiers, ConfigError> {
    match var(env, "TENANTMESH_TIERS_FILE") {
        Some(path) => crate::tiers::Tiers::load(std::path::Path::new(path))
            .map_err(|e| ConfigError { var: "TENANTMESH_TIERS_FILE", message: e.to_string() }),
        None => Ok(crate::tiers::Tiers::default()),
    }
}

impl CommonConfig {
    pub fn from_env(env: &HashMap<String, String>, default_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: parse_var(env, "TENANTMESH_LISTEN_ADDR", SocketAddr::from(([127, 0, 0, 1], default_port)))?,
            data_dir: var(env, "TENANTMESH_DATA_DIR").unwrap_or(".tenantmesh").into(),
            auth_url: url_var(env, "TENANTMESH_AUTH_URL", AUTH_PORT)?,
            registry_url: url_var(env, "TENANTMESH_REGISTRY_URL", REGISTRY_PORT)?,
            issuer: var(env, "TENANTMESH_TOKEN_ISSUER").unwrap_or(DEFAULT_ISSUER).into(),
            audience: var(env, "TENANTMESH_TOKEN_AUDIENCE").unwrap_or(DEFAULT_AUDIENCE).into(),
            tenant_cache_ttl: std::time::Duration::from_millis(parse_var(env, "TENANTMESH_TENANT_CACHE_TTL_MS", 5000)?),
            shutdown_grace: std::time::Duration::from_millis(parse_var(env, "TENANTMESH_SHUTDOWN_GRACE_MS", 10_000)?),
            tenant_cache_capacity: match parse_var(env, "TENANTMESH_TENANT_CACHE_CAPACITY", 100_000)? {
                0 => {
                    return Err(ConfigError {
                        var: "TENANTMESH_TENANT_CACHE_CAPACITY",
                        message: "must be at least 1".into(),
                    });
                }
                n => n,
            },
            token_cache_capacity: parse_var(env, "TENANTMESH_TOKEN_CACHE_CAPACITY", 100_000)?,
            limits: match var(env, "TENANTMESH_LIMITS") {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError { var: "TENANTMESH_LIMITS", message: format!("{other:?}: use on or off") });
                }
            },
            fair_queue: {
                let d = FairQueueSettings::default();
                let capacity = parse_var(env, "TENANTMESH_MAX_IN_FLIGHT", d.capacity)?;
                if capacity == 0 {
                    return Err(ConfigError { var: "TENANTMESH_MAX_IN_FLIGHT", message: "must be at least 1".into() });
                }
                let wait_ms = parse_var(env, "TENANTMESH_QUEUE_WAIT_MS", d.max_wait.as_millis() as u64)?;
                FairQueueSettings { capacity, max_wait: std::time::Duration::from_millis(wait_ms), ..d }
            },
            lease_interval: match parse_var(env, "TENANTMESH_LEASE_INTERVAL_MS", 2000u64)? {
                ms @ 10..=600_000 => std::time::Duration::from_millis(ms),
                _ => {
                    return Err(ConfigError {
                        var: "TENANTMESH_LEASE_INTERVAL_MS",
                        message: "must be between 10 and 600000".into(),
                    });
                }
            },
            jwks_allow_private: parse_var(env, "TENANTMESH_JWKS_ALLOW_PRIVATE", false)?,
            audit_sweep: match parse_var(env, "TENANTMESH_AUDIT_SWEEP_MS", 3_600_000u64)? {
                0 => {
                    return Err(ConfigError { var: "TENANTMESH_AUDIT_SWEEP_MS", message: "must be at least 1".into() });
                }
                ms => std::time::Duration::from_millis(ms),
            },
            service_client: service_client(env)?,
            peer_connections_per_second: parse_var(
                env,
                "TENANTMESH_PEER_CONNECTIONS_PER_SECOND",
                crate::connection::SETUPS_PER_SECOND_PER_PEER,
            )?,
            overload: crate::load::OverloadSettings {
                mode: parse_var(env, "TENANTMESH_OVERLOAD", crate::load::Overload::Auto)?,
                delay: match parse_var(
                    env,
                    "TENANTMESH_OVERLOAD_DELAY_MS",
                    crate::load::DEFAULT_DELAY.as_millis() as u64,
                )? {
                    ms @ 1..=1000 => std::time::Duration::from_millis(ms),
                    _ => {
                        return Err(ConfigError {
                            var: "TENANTMESH_OVERLOAD_DELAY_MS",
                            message: "must be between 1 and 1000".into(),
                        });
                    }
                },
                busy_percent: match parse_var(
                    env,
                    "TENANTMESH_OVERLOAD_BUSY_PERCENT",
                    crate::load::DEFAULT_BUSY_PERCENT,
                )? {
                    p @ 21..=100 => p,
                    _ => {
                        return Err(ConfigError {
                            var: "TENANTMESH_OVERLOAD_BUSY_PERCENT",
                            message: "must be between 21 and 100".into(),
                        });
                    }
                },
            },
            tiers: std::sync::Arc::new(tiers_var(env)?),
        })
    }

    /// The redb file of `service` under the data directory, creating the
    /// directory, or making an existing one, readable by its owner only.
    pub fn store_path(&self, service: &str) -> std::io::Result<PathBuf> {
        tenantmesh_storage::files::private_dir(&self.data_dir)?;
        Ok(self.data_dir.join(format!("{service}.redb")))
    }
}

/// How the fair queue of requests waiting for a seat
/// (`tenantmesh_admission::fairq`) is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairQueueSettings {
    /// Requests running at once (`TENANTMESH_MAX_IN_FLIGHT`).
    pub capacity: usize,
    /// Queues (a power of two is not required).
    pub queues: usize,
    /// Queues dealt to each tenant; it waits in the shortest.
    pub hand: usize,
    /// Requests waiting in one queue.
    pub queue_length: usize,
    /// Longest wait (`TENANTMESH_QUEUE_WAIT_MS`).
    pub max_wait: std::time::Duration,
}

impl Default for FairQueueSettings {
    fn default() -> Self {
        Self { capacity: 1024, queues: 64, hand: 4, queue_length: 128, max_wait: std::time::Duration::from_secs(1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let env = HashMap::new();
        let c = CommonConfig::from_env(&env, DATA_PORT).unwrap();
        assert_eq!(c.listen_addr.port(), DATA_PORT);
        assert_eq!(c.auth_url, "http://127.0.0.1:50052");
        let bad: HashMap<_, _> = [("TENANTMESH_LISTEN_ADDR".to_owned(), "nope".to_owned())].into();
        let err = CommonConfig::from_env(&bad, DATA_PORT).unwrap_err();
        assert_eq!(err.var, "TENANTMESH_LISTEN_ADDR");
        let bad: HashMap<_, _> = [("TENANTMESH_AUTH_URL".to_owned(), "ftp://x".to_owned())].into();
        assert_eq!(CommonConfig::from_env(&bad, DATA_PORT).unwrap_err().var, "TENANTMESH_AUTH_URL");
        assert_eq!((c.tenant_cache_capacity, c.token_cache_capacity), (100_000, 100_000));
        assert_eq!(c.lease_interval, std::time::Duration::from_secs(2));
        assert_eq!(c.peer_connections_per_second, 100);
        refuse_placeholder(&env, "S", "a-real-secret").unwrap();
        assert_eq!(refuse_placeholder(&env, "S", "change-me-secret").unwrap_err().var, "S");
        let demo: HashMap<_, _> = [("TENANTMESH_DEMO".to_owned(), "true".to_owned())].into();
        refuse_placeholder(&demo, "S", "change-me-secret").unwrap();
        for (var, value) in [
            ("TENANTMESH_TENANT_CACHE_CAPACITY", "0"),
            ("TENANTMESH_TOKEN_CACHE_CAPACITY", "-1"),
            ("TENANTMESH_LEASE_INTERVAL_MS", "5"),
            ("TENANTMESH_LEASE_INTERVAL_MS", "soon"),
            ("TENANTMESH_PEER_CONNECTIONS_PER_SECOND", "-1"),
        ] {
            let bad: HashMap<_, _> = [(var.to_owned(), value.to_owned())].into();
            assert_eq!(CommonConfig::from_env(&bad, DATA_PORT).unwrap_err().var, var);
        }
    }
}
