//! The onboarding service: the durable workflows of a tenant's life,
//! run against the registry, auth and data services as a platform service
//! identity.
//!
//! - Onboarding: create the tenant record -> (silo) provision its
//!   data-service instance -> provision its storage -> create its admin
//!   user -> apply its tier's limits -> activate.
//! - Tier change: pause writes -> provision the target -> copy items ->
//!   switch the placement atomically -> apply limits -> drain -> remove the
//!   old copy (or just switch the tier when the model stays).
//! - Offboarding: suspend -> export items to JSONL -> delete items ->
//!   delete dedicated resources -> delete users -> mark deleted.
//!
//! The crate is in three parts: [`engine`] runs workflows (persist after
//! every step, retry with backoff, FAILED with the reason, resume after a
//! restart) and knows nothing of what steps do; [`steps`] does them; the
//! gRPC handlers (`handlers.rs`) turn requests into workflows. One
//! workflow runs per tenant at a time (an `_active` record, written in the
//! same transaction as the workflow, guards it).

pub mod compute;
pub mod engine;
mod error;
mod events;
pub mod export;
pub mod faults;
pub mod gitops;
mod handlers;
pub mod resources;
pub mod steps;
pub mod workflow;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_isolation::stores::dedicated_table;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::onboarding::v1::onboarding_server::OnboardingServer;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, Tenant};
use tenantmesh_service::config::{CommonConfig, ConfigError, ONBOARDING_PORT, parse_var, var};
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{DynTable, StorageError};
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceCredentials, ServiceTokenSource};
use tenantmesh_tenant_context::server::Authenticator;
use tokio::net::TcpListener;

use compute::SiloCompute;
use engine::{Engine, RetryPolicy};
pub use error::OnboardingError;
use events::EventLog;
use faults::Faults;
use workflow::{Spot, Workflow};

/// Partition of the RegisterTenant idempotency keys (data: the request's [`workflow::Params`]).
const IDEMPOTENCY_PK: &str = "_idempotency";
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
        })
    }
}

// The data service's history clock reads the same microseconds.
use tenantmesh_service::clock::{now_secs, now_us};

/// The onboarding service's state: the engine and what the handlers need.
#[derive(Clone)]
pub struct OnboardingService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    /// The idempotency keys and the event log live here too.
    store: DynTable,
    registry: TenantRegistryClient<PropagatedChannel>,
    events: Arc<EventLog>,
    resources: Arc<resources::Ledger>,
    tiers: Arc<Tiers>,
    table_prefix: String,
    pooled_table: String,
    hash_params: tenantmesh_credentials::HashParams,
    hashing: tenantmesh_credentials::HashPool,
    /// Open WatchEvents streams per caller (tenant, subject).
    watchers: handlers::Watchers,
    /// What tenant admins are not shown (host paths, endpoints).
    redactor: handlers::Redactor,
}

/// What the service needs besides its store.
pub struct Dependencies {
    pub registry: PropagatedChannel,
    pub auth: PropagatedChannel,
    pub tokens: Arc<ServiceTokenSource>,
    pub compute: Arc<dyn SiloCompute>,
}

impl OnboardingService {
    pub fn new(config: &Config, store: DynTable, deps: Dependencies) -> Result<Self, ConfigError> {
        let faults =
            Faults::parse(&config.faults).map_err(|message| ConfigError { var: "TENANTMESH_FAULTS", message })?;
        if !faults.is_empty() {
            tracing::warn!(faults = %config.faults, "FAULT INJECTION IS ON (TENANTMESH_FAULTS): for tests only");
        }
        let events = Arc::new(EventLog::new(store.clone()));
        let tokens = deps.tokens;
        let registry = tenantmesh_service::sized!(TenantRegistryClient::new(deps.registry));
        let resources = Arc::new(resources::Ledger::new(store.clone()));
        let steps = steps::Steps {
            registry: registry.clone(),
            auth: tenantmesh_service::sized!(AuthClient::new(deps.auth)),
            data_url: config.data_url.clone(),
            tokens: tokens.clone(),
            compute: deps.compute,
            tiers: config.common.tiers.clone(),
            events: events.clone(),
            drain: config.common.tenant_cache_ttl + Duration::from_millis(250),
            exports_dir: config.common.data_dir.join("exports"),
            data_clients: client::Channels::new(client::Identity::Service(tokens)),
            resources: resources.clone(),
        };
        let policy = RetryPolicy { attempts: config.step_attempts, backoff: config.step_backoff };
        Ok(Self {
            inner: Arc::new(Inner {
                engine: Engine::new(store.clone(), Arc::new(steps), policy, faults),
                store,
                registry,
                events,
                resources,
                tiers: config.common.tiers.clone(),
                table_prefix: config.storage.table_prefix.clone(),
                pooled_table: config.storage.table_name("data"),
                hash_params: config.hash_params,
                hashing: tenantmesh_credentials::HashPool::new(config.hash_pool),
                watchers: handlers::Watchers::new(config.max_watchers),
                redactor: handlers::Redactor::new(&[&config.common.data_dir.join("exports"), &config.common.data_dir]),
            }),
        })
    }

    /// Resumes every workflow left RUNNING (by a crash or a shutdown).
    pub async fn resume_unfinished(&self) -> Result<usize, OnboardingError> {
        self.inner.engine.resume_unfinished().await
    }

    /// Where `tenant_id`'s items go on `tier`.
    fn spot_for(&self, tenant_id: &str, tier: &str) -> Option<Spot> {
        let model = self.inner.tiers.isolation_model(tier)?;
        let table = match model {
            IsolationModel::Bridge | IsolationModel::Silo => {
                dedicated_table(&self.inner.table_prefix, tenant_id, workflow::model_name::as_str(model))
            }
            IsolationModel::Pool | IsolationModel::Unspecified => self.inner.pooled_table.clone(),
        };
        Some(Spot { model, table, endpoint: String::new() })
    }

    /// Where a registered tenant's items are now.
    fn spot_of(&self, tenant: &Tenant) -> Spot {
        match &tenant.placement {
            Some(p) => Spot {
                model: IsolationModel::try_from(p.model).unwrap_or(IsolationModel::Pool),
                table: p.table.clone(),
                endpoint: p.endpoint.clone(),
            },
            None => self
                .spot_for(&tenant.tenant_id, &tenant.tier)
                .unwrap_or_else(|| Spot { table: self.inner.pooled_table.clone(), ..Spot::default() }),
        }
    }

    /// The tenant's registry record (as the service identity).
    async fn tenant(&self, tenant_id: &str) -> Result<Tenant, tonic::Status> {
        let resp = self.inner.registry.clone().get_tenant(GetTenantRequest { tenant_id: tenant_id.into() }).await?;
        resp.into_inner().tenant.ok_or_else(|| OnboardingError::TenantNotFound(tenant_id.into()).into())
    }

    /// Deletes, every `every`, the exports kept past their tier's
    /// `export_retention_days` (every tenant's, offboarded ones' included),
    /// recording each removal in the resource ledger.
    fn sweep_exports(self, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let tenants = match tenantmesh_tenant_context::directory::all_tenants(&self.inner.registry).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "exports not swept: the tenants cannot be listed");
                        continue;
                    }
                };
                for tenant in tenants {
                    let now = now_secs();
                    if let Err(e) =
                        resources::expire_exports(&self.inner.resources, &self.inner.tiers, &tenant.tenant_id, now)
                            .await
                    {
                        tracing::warn!(tenant_id = %tenant.tenant_id, error = %e, "exports not swept");
                    }
                }
            }
        })
    }

    /// Records `wf` as the tenant's active workflow (`active`: the version
    /// of the record it replaces); `Busy` if another one started meanwhile.
    async fn start(&self, wf: &Workflow, active: Option<u64>) -> Result<(), OnboardingError> {
        match self.inner.engine.start(wf, active, Vec::new()).await {
            Ok(()) => Ok(()),
            Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Busy),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs the onboarding service on `listener` until `shutdown` completes,
/// resuming unfinished workflows in the background. Silo compute comes from
/// `compute`, else from the GitOps repository, else from the endpoint
/// template, else is unavailable.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    compute: Option<Arc<dyn SiloCompute>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let auth = client::channel(&config.common.auth_url)?;
    let registry = client::channel(&config.common.registry_url)?;
    let tokens = Arc::new(ServiceTokenSource::new(auth.clone(), config.credentials.clone()));
    let compute: Arc<dyn SiloCompute> = match (compute, &config.gitops, &config.silo_endpoint_template) {
        (Some(c), _, _) => c,
        (None, Some(g), _) => Arc::new(gitops::GitOps::open(g.clone()).await?),
        (None, None, Some(t)) => Arc::new(compute::EndpointTemplate(t.clone())),
        (None, None, None) => Arc::new(compute::Unconfigured),
    };
    let service = OnboardingService::new(
        &config,
        store,
        Dependencies {
            registry: client::wrap(registry, Identity::Service(tokens.clone())),
            auth: client::wrap(auth, Identity::Service(tokens.clone())),
            tokens,
            compute,
        },
    )?;
    let resumer = service.clone();
    tokio::spawn(async move {
        if let Err(e) = resumer.resume_unfinished().await {
            tracing::error!(error = %e, "could not resume unfinished workflows");
        }
    });
    let sweeper = service.clone().sweep_exports(config.export_sweep);
    let authn = Authenticator::remote(&config.common)?;
    let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
    let served = tenantmesh_service::runtime::serve(
        listener,
        tenantmesh_service::sized!(OnboardingServer::new(service)),
        Some(tenantmesh_service::backup::server(config.common.data_dir.clone(), embedded)),
        tenantmesh_tenant_context::server::stack(authn, None)?,
        config.common.shutdown_grace,
        shutdown,
    )
    .await;
    sweeper.abort();
    served?;
    Ok(())
}
