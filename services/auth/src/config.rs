//! The auth service's settings: its table, the bootstrap admin, token
//! lifetimes and the declared service identities.

use std::collections::HashMap;
use std::time::Duration;
use tenantmesh_credentials::{HashParams, PoolSettings, normalize_email, password};

use crate::{anonymous, lockout};
use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_service::config::{AUTH_PORT, CommonConfig, ConfigError, parse_var, var};

/// Default bootstrap admin email.
pub const DEFAULT_BOOTSTRAP_EMAIL: &str = "admin@platform.local";
/// File (in the data dir) holding a generated bootstrap password.
pub const BOOTSTRAP_PASSWORD_FILE: &str = "bootstrap-password";
pub(crate) const MIN_SECRET_LEN: usize = 16;
/// Longest client secret accepted by `IssueServiceToken`.
pub(crate) const MAX_CLIENT_SECRET_LEN: usize = 1024;

/// Auth settings.
#[derive(Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `TENANTMESH_DATA_URL` (default `http://127.0.0.1:50054`): the data
    /// service, whose Metering says a tenant's use of its monthly
    /// quantities (`GetEntitlements`).
    pub data_url: String,
    pub storage: StorageConfig,
    /// `TENANTMESH_BOOTSTRAP_EMAIL`.
    pub bootstrap_email: String,
    /// `TENANTMESH_BOOTSTRAP_PASSWORD`; generated when unset.
    pub bootstrap_password: Option<String>,
    /// `TENANTMESH_SERVICE_CLIENTS`: `id:secret[:scope+scope[@tenant+tenant]],...`.
    pub service_clients: HashMap<String, ServiceClient>,
    /// `TENANTMESH_ACCESS_TOKEN_TTL_SECS` (default 900).
    pub access_token_ttl: Duration,
    /// `TENANTMESH_ARGON2_M_KIB`, `_T`, `_P`.
    pub hash_params: HashParams,
    /// `TENANTMESH_HASH_THREADS`, `TENANTMESH_HASH_QUEUE`: the password
    /// hashing pool.
    pub hash_pool: PoolSettings,
    /// Rates of the calls made without a token.
    pub anonymous: anonymous::AnonymousLimits,
    /// `TENANTMESH_LOGIN_FREE_ATTEMPTS`, `TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS`,
    /// `TENANTMESH_LOGIN_MAX_LOCKOUT_SECS`.
    pub lockout: lockout::LockoutPolicy,
    /// `TENANTMESH_KEY_PUBLISH_DELAY_SECS` (default 10): how long a rotated
    /// key is published before it signs; more than validators' JWKS refresh
    /// interval.
    pub key_publish_delay: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("common", &self.common)
            .field("bootstrap_email", &self.bootstrap_email)
            .field("service_clients", &self.service_clients.keys().collect::<Vec<_>>())
            .field("access_token_ttl", &self.access_token_ttl)
            .field("hash_params", &self.hash_params)
            .finish_non_exhaustive()
    }
}

/// A service identity that may call `IssueServiceToken`: its secret, and
/// what its tokens grant.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceClient {
    pub secret: String,
    pub grant: tenantmesh_tenant_context::Grant,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient").field("grant", &self.grant).finish_non_exhaustive()
    }
}

/// Longest service client id.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Whether `id` is a well-formed service client id: 1-64 of a-z, 0-9 and `_.-`.
pub fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
}

/// One entry of `TENANTMESH_SERVICE_CLIENTS`: `id:secret`, optionally
/// `:scope+scope`, optionally `@tenant+tenant` after the scopes.
fn parse_service_client(env: &HashMap<String, String>, entry: &str) -> Result<(String, ServiceClient), ConfigError> {
    let bad = |message: String| ConfigError { var: "TENANTMESH_SERVICE_CLIENTS", message };
    let mut parts = entry.splitn(3, ':');
    let (Some(id), Some(secret)) = (parts.next(), parts.next()) else {
        return Err(bad("entries must be id:secret[:scope+scope[@tenant+tenant]]".into()));
    };
    if !valid_client_id(id) {
        return Err(bad(format!("client id {id:?} must be 1-{MAX_CLIENT_ID_LEN} of a-z, 0-9 and _.-")));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(bad(format!("client {id:?} needs a secret of at least {MIN_SECRET_LEN} characters")));
    }
    tenantmesh_service::config::refuse_placeholder(env, "TENANTMESH_SERVICE_CLIENTS", secret)?;
    let mut grant = tenantmesh_tenant_context::Grant::default();
    if let Some(spec) = parts.next() {
        let (scopes, tenants) = match spec.split_once('@') {
            Some((scopes, tenants)) => (scopes, Some(tenants)),
            None => (spec, None),
        };
        for name in scopes.split('+').filter(|n| !n.is_empty()) {
            let scope = tenantmesh_tenant_context::Scope::parse(name).ok_or_else(|| {
                let known: Vec<&str> = tenantmesh_tenant_context::Scope::ALL.iter().map(|s| s.as_str()).collect();
                bad(format!("client {id:?}: unknown scope {name:?} (known: {})", known.join(", ")))
            })?;
            if !grant.scopes.contains(&scope) {
                grant.scopes.push(scope);
            }
        }
        if let Some(tenants) = tenants {
            let list: Vec<String> = tenants.split('+').filter(|t| !t.is_empty()).map(str::to_owned).collect();
            if list.is_empty() {
                return Err(bad(format!("client {id:?}: name at least one tenant after '@'")));
            }
            if let Some(t) = list.iter().find(|t| tenantmesh_service::validate_tenant_id(t).is_err()) {
                return Err(bad(format!("client {id:?}: {t:?} is not a tenant id")));
            }
            grant.tenants = Some(list);
        }
    }
    Ok((id.to_owned(), ServiceClient { secret: secret.to_owned(), grant }))
}

impl tenantmesh_isolation::backend::ServiceConfig for Config {
    const STORE: &'static str = "auth";
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn storage(&self) -> &StorageConfig {
        &self.storage
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut service_clients = HashMap::new();
        if let Some(list) = var(env, "TENANTMESH_SERVICE_CLIENTS") {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (id, client) = parse_service_client(env, entry)?;
                if service_clients.insert(id.clone(), client).is_some() {
                    return Err(ConfigError {
                        var: "TENANTMESH_SERVICE_CLIENTS",
                        message: format!("client {id:?} is declared twice"),
                    });
                }
            }
        }
        let ttl: u64 = parse_var(env, "TENANTMESH_ACCESS_TOKEN_TTL_SECS", 900)?;
        if !(60..=86_400).contains(&ttl) {
            return Err(ConfigError { var: "TENANTMESH_ACCESS_TOKEN_TTL_SECS", message: "must be 60..=86400".into() });
        }
        let hash_params = HashParams::from_env(env)?;
        let bootstrap_password = var(env, "TENANTMESH_BOOTSTRAP_PASSWORD").map(str::to_owned);
        if let Some(p) = &bootstrap_password {
            tenantmesh_service::config::refuse_placeholder(env, "TENANTMESH_BOOTSTRAP_PASSWORD", p)?;
        }
        if let Some(p) = &bootstrap_password
            && p.chars().count() < password::MIN_PASSWORD_LEN
        {
            return Err(ConfigError {
                var: "TENANTMESH_BOOTSTRAP_PASSWORD",
                message: format!("must be at least {} characters", password::MIN_PASSWORD_LEN),
            });
        }
        Ok(Self {
            common: CommonConfig::from_env(env, AUTH_PORT)?,
            data_url: tenantmesh_service::config::url_var(
                env,
                "TENANTMESH_DATA_URL",
                tenantmesh_service::config::DATA_PORT,
            )?,
            storage: StorageConfig::from_env(env)?,
            bootstrap_email: normalize_email(var(env, "TENANTMESH_BOOTSTRAP_EMAIL").unwrap_or(DEFAULT_BOOTSTRAP_EMAIL)),
            bootstrap_password,
            service_clients,
            access_token_ttl: Duration::from_secs(ttl),
            hash_params,
            hash_pool: PoolSettings::from_env(env)?,
            anonymous: anonymous::AnonymousLimits::from_env(env)?,
            key_publish_delay: Duration::from_secs(parse_var(env, "TENANTMESH_KEY_PUBLISH_DELAY_SECS", 10)?),
            lockout: lockout::LockoutPolicy {
                free_attempts: parse_var(env, "TENANTMESH_LOGIN_FREE_ATTEMPTS", 5)?,
                account_free_attempts: parse_var(env, "TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS", 100)?,
                max_lockout: Duration::from_secs(parse_var(env, "TENANTMESH_LOGIN_MAX_LOCKOUT_SECS", 900)?),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_tenant_context::{Grant, Scope};

    fn clients(value: &str) -> Result<HashMap<String, ServiceClient>, ConfigError> {
        let env: HashMap<String, String> = [("TENANTMESH_SERVICE_CLIENTS".to_owned(), value.to_owned())].into();
        Config::from_env(&env).map(|c| c.service_clients)
    }

    /// An identity gets exactly the scopes (and tenants) its declaration
    /// names: none when it names none.
    #[test]
    fn service_clients_carry_the_scopes_they_declare() {
        let c = clients(
            "app:0123456789abcdef,onboarding:0123456789abcdef:lifecycle,billing:0123456789abcdef:metering_writer+usage_reader@acme+globex",
        )
        .unwrap();
        assert_eq!(c["app"].grant, Grant::default());
        assert_eq!(c["onboarding"].grant, Grant { scopes: vec![Scope::Lifecycle], tenants: None });
        assert_eq!(
            c["billing"].grant,
            Grant {
                scopes: vec![Scope::MeteringWriter, Scope::UsageReader],
                tenants: Some(vec!["acme".into(), "globex".into()])
            }
        );
        assert!(format!("{:?}", c["app"]).find("0123456789abcdef").is_none(), "the secret is never printed");
        for (bad, says) in [
            ("app", "entries must be"),
            ("app:short", "at least 16"),
            ("APP:0123456789abcdef", "client id"),
            ("app:0123456789abcdef:admin", "unknown scope \"admin\""),
            ("app:0123456789abcdef:lifecycle@", "at least one tenant"),
            ("app:0123456789abcdef:lifecycle@Acme!", "not a tenant id"),
            ("app:0123456789abcdef,app:0123456789abcdef", "declared twice"),
        ] {
            let e = clients(bad).unwrap_err();
            assert_eq!(e.var, "TENANTMESH_SERVICE_CLIENTS");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }
}
