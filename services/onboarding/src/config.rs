//! The onboarding service's settings.

use std::collections::HashMap;
use std::time::Duration;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_service::config::{CommonConfig, ConfigError, ONBOARDING_PORT, parse_var, var};
use tenantmesh_tenant_context::client::ServiceCredentials;

use crate::faults::Faults;
use crate::gitops;

/// Onboarding settings.
#[derive(Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
    /// `TENANTMESH_SERVICE_CLIENT_ID` / `TENANTMESH_SERVICE_CLIENT_SECRET`:
    /// this service's client credentials for `Auth.IssueServiceToken`.
    pub credentials: ServiceCredentials,
    /// Cost of the admin password hash kept by the workflow.
    pub hash_params: tenantmesh_credentials::HashParams,
    /// `TENANTMESH_HASH_THREADS`, `TENANTMESH_HASH_QUEUE`: the password
    /// hashing pool.
    pub hash_pool: tenantmesh_credentials::PoolSettings,
    /// `TENANTMESH_MAX_WATCHERS` (default 8): WatchEvents streams one
    /// caller (tenant and subject) may hold open at once.
    pub max_watchers: usize,
    /// `TENANTMESH_DATA_URL` (default `http://127.0.0.1:50054`): the shared
    /// data service, whose DataAdmin the workflows call.
    pub data_url: String,
    /// `TENANTMESH_SILO_ENDPOINT_TEMPLATE`, e.g. `http://data-{tenant}:50054`:
    /// where silo tenants' instances run when the deployment runs them.
    pub silo_endpoint_template: Option<String>,
    /// `TENANTMESH_SILO_GITOPS_REPO` and the rest: silo instances as
    /// manifests committed to a GitOps repository ([`gitops`]).
    pub gitops: Option<gitops::GitOpsConfig>,
    /// `TENANTMESH_STEP_MAX_ATTEMPTS` (default 5): attempts of a failing step
    /// before the workflow is FAILED.
    pub step_attempts: u32,
    /// `TENANTMESH_STEP_BACKOFF_MS` (default 200): the first retry's backoff
    /// ceiling; it doubles per attempt (full jitter), up to 30 s.
    pub step_backoff: Duration,
    /// `TENANTMESH_FAULTS`: fault injection for tests (see [`faults`]).
    pub faults: String,
    /// `TENANTMESH_EXPORT_SWEEP_SECS` (default 3600): how often exports
    /// kept past their tier's `export_retention_days` are deleted.
    pub export_sweep: Duration,
    /// `TENANTMESH_CATCH_UP_MS` (default 10000): how often the service
    /// catalog is checked for application services that existing tenants
    /// must be provisioned in (see `catch_up`).
    pub catch_up: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("common", &self.common).field("credentials", &self.credentials).finish()
    }
}

impl tenantmesh_isolation::backend::ServiceConfig for Config {
    const STORE: &'static str = "onboarding";
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn storage(&self) -> &StorageConfig {
        &self.storage
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env, ONBOARDING_PORT)?;
        let credentials = common
            .service_client
            .clone()
            .ok_or(ConfigError { var: "TENANTMESH_SERVICE_CLIENT_SECRET", message: "is required".into() })?;
        let data_url = var(env, "TENANTMESH_DATA_URL").unwrap_or("http://127.0.0.1:50054").to_owned();
        if !(data_url.starts_with("http://") || data_url.starts_with("https://")) {
            return Err(ConfigError {
                var: "TENANTMESH_DATA_URL",
                message: "must start with http:// or https://".into(),
            });
        }
        let template = var(env, "TENANTMESH_SILO_ENDPOINT_TEMPLATE").map(str::to_owned);
        if template.as_deref().is_some_and(|t| !(t.starts_with("http://") || t.starts_with("https://"))) {
            return Err(ConfigError {
                var: "TENANTMESH_SILO_ENDPOINT_TEMPLATE",
                message: "must start with http:// or https://".into(),
            });
        }
        let faults = var(env, "TENANTMESH_FAULTS").unwrap_or_default().to_owned();
        Faults::parse(&faults).map_err(|message| ConfigError { var: "TENANTMESH_FAULTS", message })?;
        let step_attempts = parse_var(env, "TENANTMESH_STEP_MAX_ATTEMPTS", 5u32)?;
        if step_attempts == 0 {
            return Err(ConfigError { var: "TENANTMESH_STEP_MAX_ATTEMPTS", message: "must be at least 1".into() });
        }
        Ok(Self {
            common,
            storage: StorageConfig::from_env(env)?,
            credentials,
            hash_params: tenantmesh_credentials::HashParams::from_env(env)?,
            hash_pool: tenantmesh_credentials::PoolSettings::from_env(env)?,
            max_watchers: match parse_var(env, "TENANTMESH_MAX_WATCHERS", 8)? {
                0 => return Err(ConfigError { var: "TENANTMESH_MAX_WATCHERS", message: "must be at least 1".into() }),
                n => n,
            },
            data_url,
            silo_endpoint_template: template,
            gitops: gitops::GitOpsConfig::from_env(env)?,
            step_attempts,
            step_backoff: Duration::from_millis(parse_var(env, "TENANTMESH_STEP_BACKOFF_MS", 200)?),
            faults,
            export_sweep: Duration::from_secs(parse_var(env, "TENANTMESH_EXPORT_SWEEP_SECS", 3600u64)?.max(1)),
            catch_up: Duration::from_millis(parse_var(env, "TENANTMESH_CATCH_UP_MS", 10_000u64)?.max(10)),
        })
    }
}
