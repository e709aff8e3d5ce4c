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
//! State is persisted after every step and every step is idempotent;
//! failed steps retry with exponential backoff and full jitter, then the
//! workflow is FAILED with the step and the reason until RetryOnboarding;
//! unfinished workflows resume on start-up. One workflow runs per tenant
//! at a time (an `_active` record, written in the same transaction as the
//! workflow, guards it).
#![forbid(unsafe_code)]

pub mod compute;
mod error;
mod events;
pub mod export;
pub mod faults;
pub mod workflow;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_isolation::stores::dedicated_table;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{CreateUserRequest, DeleteUserRequest, ListUsersRequest, Role as ProtoRole};
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::{
    DropStoreRequest, ExportItemsRequest, ImportItemsRequest, ProvisionStoreRequest, PurgeItemsRequest, StoreRef,
    StoredItem,
};
use tenantmesh_proto::onboarding::v1::onboarding_server::{Onboarding, OnboardingServer};
use tenantmesh_proto::onboarding::v1::{self as pb, *};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{
    CreateTenantRequest, GetTenantRequest, IsolationModel, Placement, SetPlacementRequest, SetTenantLimitsRequest,
    SetTenantStatusRequest, Tenant, TenantStatus,
};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError, Write};
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceCredentials, ServiceTokenSource};
use tenantmesh_tenant_context::config::{CommonConfig, ConfigError, ONBOARDING_PORT, parse_var, var};
use tenantmesh_tenant_context::errors::{Violations, invalid_field};
use tenantmesh_tenant_context::server::Authenticator;
use tenantmesh_tenant_context::tiers::Tiers;
use tenantmesh_tenant_context::{PLATFORM_TENANT, Role, TenantContext};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use compute::SiloCompute;
pub use error::OnboardingError;
use events::EventLog;
use faults::Faults;
use workflow::{Kind, Params, Spot, StepState, Workflow, WorkflowState};

const WORKFLOWS_PK: &str = "_workflows";
const IDEMPOTENCY_PK: &str = "_idempotency";
/// The workflow a tenant is in (sort key: tenant id; data: workflow id).
const ACTIVE_PK: &str = "_active";
const MAX_KEY_LEN: usize = 128;
const IMPORT_BATCH: usize = 500;
/// The longest a retry backoff grows to.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Onboarding settings.
#[derive(Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
    /// `TENANTMESH_SERVICE_CLIENT_ID` / `TENANTMESH_SERVICE_CLIENT_SECRET`:
    /// this service's client credentials for `Auth.IssueServiceToken`.
    pub credentials: ServiceCredentials,
    /// Cost of the admin password hash kept by the workflow.
    pub hash_params: tenantmesh_auth::HashParams,
    /// `TENANTMESH_DATA_URL` (default `http://127.0.0.1:50054`): the shared
    /// data service, whose DataAdmin the workflows call.
    pub data_url: String,
    /// `TENANTMESH_SILO_ENDPOINT_TEMPLATE`, e.g. `http://data-{tenant}:50054`:
    /// where silo tenants' instances run when the deployment runs them.
    pub silo_endpoint_template: Option<String>,
    /// `TENANTMESH_STEP_MAX_ATTEMPTS` (default 5): attempts of a failing step
    /// before the workflow is FAILED.
    pub step_attempts: u32,
    /// `TENANTMESH_STEP_BACKOFF_MS` (default 200): the first retry's backoff
    /// ceiling; it doubles per attempt (full jitter), up to 30 s.
    pub step_backoff: Duration,
    /// `TENANTMESH_FAULTS`: fault injection for tests (see [`faults`]).
    pub faults: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("common", &self.common).field("credentials", &self.credentials).finish()
    }
}

impl Config {
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let client_secret = var(env, "TENANTMESH_SERVICE_CLIENT_SECRET")
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
            common: CommonConfig::from_env(env, ONBOARDING_PORT)?,
            storage: StorageConfig::from_env(env)?,
            credentials: ServiceCredentials {
                client_id: var(env, "TENANTMESH_SERVICE_CLIENT_ID").unwrap_or("onboarding").to_owned(),
                client_secret: client_secret.to_owned(),
            },
            hash_params: tenantmesh_auth::HashParams::from_env(env)?,
            data_url,
            silo_endpoint_template: template,
            step_attempts,
            step_backoff: Duration::from_millis(parse_var(env, "TENANTMESH_STEP_BACKOFF_MS", 200)?),
            faults,
        })
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

fn now_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default()
}

/// The onboarding service's state.
#[derive(Clone)]
pub struct OnboardingService {
    inner: Arc<Inner>,
}

struct Inner {
    store: DynTable,
    registry: TenantRegistryClient<PropagatedChannel>,
    auth: AuthClient<PropagatedChannel>,
    /// The shared data service's DataAdmin, and silo instances' ones.
    data_url: String,
    data_clients: std::sync::Mutex<HashMap<String, DataAdminClient<PropagatedChannel>>>,
    tokens: Arc<ServiceTokenSource>,
    compute: Arc<dyn SiloCompute>,
    tiers: Arc<Tiers>,
    table_prefix: String,
    pooled_table: String,
    hash_params: tenantmesh_auth::HashParams,
    /// How long every service may go on using a tenant's cached status and
    /// placement: after a pause or a switch, waiting this long means no
    /// instance still acts on the old one.
    fence: Duration,
    attempts: u32,
    backoff: Duration,
    faults: Faults,
    exports_dir: PathBuf,
    events: EventLog,
    /// One run of a workflow at a time in this process.
    running: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// A step failed; `retryable` when the cause looks transient.
#[derive(Debug)]
struct StepError {
    reason: String,
    retryable: bool,
}

impl StepError {
    fn permanent(reason: impl Into<String>) -> Self {
        StepError { reason: reason.into(), retryable: false }
    }
}

impl From<Status> for StepError {
    fn from(s: Status) -> Self {
        let retryable = matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted | Code::Unknown
        );
        StepError { reason: format!("{:?}: {}", s.code(), s.message()), retryable }
    }
}

fn model_name(model: IsolationModel) -> &'static str {
    match model {
        IsolationModel::Bridge => "bridge",
        IsolationModel::Silo => "silo",
        _ => "pool",
    }
}

fn placement(spot: &Spot) -> Placement {
    let model = match spot.model.as_str() {
        "bridge" => IsolationModel::Bridge,
        "silo" => IsolationModel::Silo,
        _ => IsolationModel::Pool,
    };
    Placement { model: model as i32, table: spot.table.clone(), endpoint: spot.endpoint.clone() }
}

/// Where the workflow's records live.
fn workflow_id(tenant_id: &str, kind: Kind) -> String {
    match kind {
        Kind::Onboard => format!("{tenant_id}/onboard"),
        Kind::Offboard => format!("{tenant_id}/offboard"),
        Kind::ChangeTier => format!("{tenant_id}/change-tier/{}", now_millis()),
    }
}

fn tenant_of(workflow_id: &str) -> &str {
    workflow_id.split('/').next().unwrap_or_default()
}

/// Checks a workflow id from a request.
fn check_workflow_id(id: &str) -> Result<(), Status> {
    let mut parts = id.split('/');
    let tenant = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let ok = tenantmesh_tenant_context::validate_tenant_id(tenant).is_ok()
        && match rest.as_slice() {
            ["onboard"] | ["offboard"] => true,
            ["change-tier", n] => !n.is_empty() && n.len() <= 20 && n.bytes().all(|c| c.is_ascii_digit()),
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(invalid_field("workflow_id", "must be <tenant>/onboard, <tenant>/offboard or <tenant>/change-tier/<n>"))
    }
}

/// Backoff before retry `attempt` (1-based): full jitter over
/// `base * 2^(attempt-1)`, capped.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(MAX_BACKOFF);
    let random = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
    ceiling.mul_f64(random).max(Duration::from_millis(1))
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
        Ok(Self {
            inner: Arc::new(Inner {
                events: EventLog::new(store.clone()),
                store,
                registry: TenantRegistryClient::new(deps.registry),
                auth: AuthClient::new(deps.auth),
                data_url: config.data_url.clone(),
                data_clients: Default::default(),
                tokens: deps.tokens,
                compute: deps.compute,
                tiers: config.common.tiers.clone(),
                table_prefix: config.storage.table_prefix.clone(),
                pooled_table: config.storage.table_name("data"),
                hash_params: config.hash_params,
                fence: config.common.tenant_cache_ttl + Duration::from_millis(250),
                attempts: config.step_attempts,
                backoff: config.step_backoff,
                faults,
                exports_dir: config.common.data_dir.join("exports"),
                running: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Where `tenant_id`'s items go on `tier`.
    fn spot_for(&self, tenant_id: &str, tier: &str) -> Option<Spot> {
        let model = model_name(self.inner.tiers.isolation_model(tier)?);
        let table = match model {
            "pool" => self.inner.pooled_table.clone(),
            m => dedicated_table(&self.inner.table_prefix, tenant_id, m),
        };
        Some(Spot { model: model.into(), table, endpoint: String::new() })
    }

    /// Where a registered tenant's items are now.
    fn spot_of(&self, tenant: &Tenant) -> Spot {
        match &tenant.placement {
            Some(p) => Spot {
                model: model_name(IsolationModel::try_from(p.model).unwrap_or(IsolationModel::Pool)).into(),
                table: p.table.clone(),
                endpoint: p.endpoint.clone(),
            },
            None => self.spot_for(&tenant.tenant_id, &tenant.tier).unwrap_or_else(|| Spot {
                model: "pool".into(),
                table: self.inner.pooled_table.clone(),
                endpoint: String::new(),
            }),
        }
    }

    /// DataAdmin of the instance serving `spot`.
    fn data_admin(&self, spot: &Spot) -> Result<DataAdminClient<PropagatedChannel>, StepError> {
        let url = if spot.endpoint.is_empty() { self.inner.data_url.as_str() } else { spot.endpoint.as_str() };
        let mut clients = self.inner.data_clients.lock().expect("data clients lock");
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let channel = client::channel(url).map_err(|e| StepError::permanent(format!("data endpoint {url}: {e}")))?;
        let c = DataAdminClient::new(client::wrap(channel, Identity::Service(self.inner.tokens.clone())));
        clients.insert(url.to_owned(), c.clone());
        Ok(c)
    }

    async fn load(&self, id: &str) -> Result<Option<(Workflow, u64)>, OnboardingError> {
        match self.inner.store.get(WORKFLOWS_PK, id).await? {
            Some(item) => {
                let wf = serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                Ok(Some((wf, item.version)))
            }
            None => Ok(None),
        }
    }

    fn encode(wf: &Workflow) -> Result<Vec<u8>, OnboardingError> {
        serde_json::to_vec(wf).map_err(|e| OnboardingError::Internal(e.to_string()))
    }

    /// Saves `wf` at `version`; another runner's save in between is
    /// `Superseded`. A finished workflow releases the tenant in the same
    /// transaction.
    async fn save(&self, wf: &mut Workflow, version: &mut u64) -> Result<(), OnboardingError> {
        wf.update_time = now_secs();
        let data = Self::encode(wf)?;
        if wf.state == WorkflowState::Succeeded {
            let writes = vec![
                Write::Put {
                    pk: WORKFLOWS_PK.into(),
                    sk: wf.id.clone(),
                    data,
                    condition: Condition::Version(*version),
                },
                Write::Delete { pk: ACTIVE_PK.into(), sk: wf.params.tenant_id.clone(), condition: Condition::None },
            ];
            return match self.inner.store.transact_write(writes).await {
                Ok(()) => {
                    *version += 1;
                    Ok(())
                }
                Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Superseded(wf.id.clone())),
                Err(e) => Err(e.into()),
            };
        }
        match self.inner.store.put(WORKFLOWS_PK, &wf.id, data, Condition::Version(*version)).await {
            Ok(item) => {
                *version = item.version;
                Ok(())
            }
            Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Superseded(wf.id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts running workflow `id` in the background.
    fn spawn(&self, id: String) {
        let this = self.clone();
        let span = tracing::info_span!("workflow", workflow_id = %id, tenant.id = %tenant_of(&id));
        tokio::spawn(
            async move {
                match this.run(&id).await {
                    Ok(_) | Err(OnboardingError::Superseded(_)) => {}
                    Err(e) => tracing::error!(workflow_id = %id, error = %e, "workflow run stopped"),
                }
            }
            .instrument(span),
        );
    }

    /// Runs workflow `id` from its first unfinished step to the end (or to
    /// a step that keeps failing).
    pub async fn run(&self, id: &str) -> Result<Workflow, OnboardingError> {
        let lock = self.inner.running.lock().await.entry(id.to_owned()).or_default().clone();
        let result = {
            let _guard = lock.lock().await;
            self.run_locked(id).await
        };
        let mut running = self.inner.running.lock().await;
        // The map's handle and ours: nobody else is waiting, forget the lock.
        if Arc::strong_count(&lock) == 2 {
            running.remove(id);
        }
        result
    }

    async fn run_locked(&self, id: &str) -> Result<Workflow, OnboardingError> {
        let (mut wf, mut version) = self.load(id).await?.ok_or_else(|| OnboardingError::NotFound(id.into()))?;
        if wf.state != WorkflowState::Running {
            return Ok(wf);
        }
        let kind = wf.kind.as_str();
        while let Some(i) = wf.next_step() {
            let name = wf.steps[i].name.clone();
            let span =
                tracing::info_span!("workflow.step", step = %name, workflow_id = %id, tenant.id = %wf.params.tenant_id);
            let mut attempt = 0;
            loop {
                attempt += 1;
                wf.steps[i].attempts += 1;
                let result = match self.inner.faults.before(&name) {
                    Some(reason) => Err(StepError { reason, retryable: true }),
                    None => self.step(&name, &mut wf).instrument(span.clone()).await,
                };
                if result.is_ok() && self.inner.faults.halt_unsaved(kind, &name) {
                    tracing::warn!(step = %name, workflow_id = id, "fault injection: halting before saving the step");
                    std::future::pending::<()>().await;
                }
                match result {
                    Ok(()) => {
                        wf.steps[i].state = StepState::Done;
                        wf.steps[i].last_error.clear();
                        if wf.next_step().is_none() {
                            wf.state = WorkflowState::Succeeded;
                        }
                        self.save(&mut wf, &mut version).await?;
                        tracing::info!(step = %name, workflow_id = id, kind, attempt, "workflow step done");
                        break;
                    }
                    Err(e) if e.retryable && attempt < self.inner.attempts => {
                        wf.steps[i].last_error = e.reason.clone();
                        self.save(&mut wf, &mut version).await?;
                        let wait = backoff(self.inner.backoff, attempt);
                        tracing::warn!(step = %name, workflow_id = id, attempt, reason = %e.reason, ?wait, "step failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        wf.steps[i].state = StepState::Failed;
                        wf.steps[i].last_error = e.reason.clone();
                        wf.state = WorkflowState::Failed;
                        self.save(&mut wf, &mut version).await?;
                        tracing::warn!(step = %name, workflow_id = id, attempt, reason = %e.reason, "workflow FAILED");
                        self.inner
                            .events
                            .emit(EventKind::StepFailed, &wf.params.tenant_id, id, format!("{name}: {}", e.reason))
                            .await;
                        return Ok(wf);
                    }
                }
            }
            if self.inner.faults.halt_after(kind, &name) {
                tracing::warn!(step = %name, workflow_id = id, "fault injection: halting after this step");
                std::future::pending::<()>().await;
            }
        }
        tracing::info!(workflow_id = id, kind, "workflow succeeded");
        Ok(wf)
    }

    /// One step; each is idempotent (re-running it after a crash creates
    /// nothing twice).
    async fn step(&self, name: &str, wf: &mut Workflow) -> Result<(), StepError> {
        let tenant = wf.params.tenant_id.clone();
        let registry = || self.inner.registry.clone();
        let set_status = |status: TenantStatus| {
            let tenant = tenant.clone();
            async move {
                registry()
                    .set_tenant_status(SetTenantStatusRequest { tenant_id: tenant, status: status as i32 })
                    .await
                    .map(drop)
            }
        };
        let store_ref = |spot: &Spot| Some(StoreRef { tenant_id: tenant.clone(), table: spot.table.clone() });
        match name {
            "create_tenant" => {
                let p = &wf.params;
                let created = registry()
                    .create_tenant(CreateTenantRequest {
                        tenant_id: p.tenant_id.clone(),
                        name: p.name.clone(),
                        tier: p.tier.clone(),
                        status: TenantStatus::Provisioning as i32,
                        placement: Some(placement(&wf.to)),
                    })
                    .await;
                match created {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => {
                        // Adopt only the record an earlier run of this very
                        // workflow created: still provisioning, same name and tier.
                        let existing = registry()
                            .get_tenant(GetTenantRequest { tenant_id: p.tenant_id.clone() })
                            .await?
                            .into_inner()
                            .tenant
                            .unwrap_or_default();
                        let ours = existing.status == TenantStatus::Provisioning as i32
                            && existing.name == p.name
                            && existing.tier == p.tier;
                        if ours {
                            Ok(())
                        } else {
                            Err(StepError::permanent(format!(
                                "tenant {} already exists outside this onboarding",
                                p.tenant_id
                            )))
                        }
                    }
                    Err(s) => Err(s.into()),
                }
            }
            "provision_compute" => {
                let endpoint = self
                    .inner
                    .compute
                    .provision(&tenant)
                    .await
                    .map_err(|reason| StepError { reason, retryable: true })?;
                wf.to.endpoint = endpoint;
                if wf.kind == Kind::Onboard {
                    // Recorded now, so a retry or an offboarding finds the instance.
                    registry()
                        .set_placement(SetPlacementRequest {
                            tenant_id: tenant.clone(),
                            placement: Some(placement(&wf.to)),
                            ..Default::default()
                        })
                        .await?;
                }
                Ok(())
            }
            "provision_storage" => {
                if !wf.to.dedicated() {
                    return Ok(());
                }
                let created = self
                    .data_admin(&wf.to)?
                    .provision_store(ProvisionStoreRequest { store: store_ref(&wf.to), tier: wf.params.tier.clone() })
                    .await?
                    .into_inner()
                    .created;
                tracing::info!(table = %wf.to.table, created, "tenant storage provisioned");
                Ok(())
            }
            "create_admin_user" => {
                let created = self
                    .inner
                    .auth
                    .clone()
                    .create_user(CreateUserRequest {
                        tenant_id: tenant.clone(),
                        email: wf.params.admin_email.clone(),
                        password: String::new(),
                        roles: vec![ProtoRole::TenantAdmin as i32],
                        password_hash: wf.admin_password_hash.clone(),
                    })
                    .await;
                match created {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                    Err(s) => Err(s.into()),
                }
            }
            "apply_limits" => {
                let tier =
                    self.inner.tiers.get(&wf.params.tier).ok_or_else(|| {
                        StepError::permanent(format!("tier {} is not in the tiers file", wf.params.tier))
                    })?;
                registry()
                    .set_tenant_limits(SetTenantLimitsRequest {
                        tenant_id: tenant.clone(),
                        limits: Some(tier.limits()),
                    })
                    .await?;
                Ok(())
            }
            "activate_tenant" => {
                set_status(TenantStatus::Active).await?;
                self.inner.events.emit(EventKind::TenantOnboarded, &tenant, &wf.id, wf.params.tier.clone()).await;
                Ok(())
            }
            "pause_writes" => {
                set_status(TenantStatus::Migrating).await?;
                // Every instance now sees MIGRATING (no more writes) once its cache expires.
                tokio::time::sleep(self.inner.fence).await;
                Ok(())
            }
            "copy_items" => {
                let items = self.export(&wf.from, &tenant).await?;
                let mut target = self.data_admin(&wf.to)?;
                for batch in items.chunks(IMPORT_BATCH) {
                    target.import_items(ImportItemsRequest { store: store_ref(&wf.to), items: batch.to_vec() }).await?;
                }
                wf.outputs.insert("copied_items".into(), items.len().to_string());
                tracing::info!(items = items.len(), from = %wf.from.table, to = %wf.to.table, "items copied");
                Ok(())
            }
            "switch_placement" => {
                registry()
                    .set_placement(SetPlacementRequest {
                        tenant_id: tenant.clone(),
                        tier: wf.params.tier.clone(),
                        placement: Some(placement(&wf.to)),
                        status: TenantStatus::Active as i32,
                        expected_version: None,
                    })
                    .await?;
                let detail = format!("{} -> {}", wf.from_tier, wf.params.tier);
                self.inner.events.emit(EventKind::TierChanged, &tenant, &wf.id, detail).await;
                Ok(())
            }
            "drain" => {
                // Instances that still route by the old placement stop doing so within the fence.
                tokio::time::sleep(self.inner.fence).await;
                Ok(())
            }
            "remove_old_copy" => self.remove_copy(&wf.from, &tenant, true).await,
            "suspend_tenant" => {
                set_status(TenantStatus::Suspended).await?;
                tokio::time::sleep(self.inner.fence).await;
                self.inner.events.emit(EventKind::TenantSuspended, &tenant, &wf.id, "offboarding".into()).await;
                Ok(())
            }
            "export_items" => {
                let items = self.export(&wf.from, &tenant).await?;
                let lines =
                    items.iter().map(export::line).collect::<Result<Vec<_>, _>>().map_err(StepError::permanent)?;
                let path = self.inner.exports_dir.join(format!("{tenant}.jsonl"));
                let write = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || export::write_atomically(&path, &lines))
                };
                write
                    .await
                    .map_err(|e| StepError::permanent(e.to_string()))?
                    .map_err(|e| StepError { reason: format!("export {}: {e}", path.display()), retryable: true })?;
                wf.export_path = path.display().to_string();
                tracing::info!(items = items.len(), path = %wf.export_path, "tenant items exported");
                Ok(())
            }
            "delete_items" => {
                match self.data_admin(&wf.from)?.purge_items(PurgeItemsRequest { store: store_ref(&wf.from) }).await {
                    Ok(r) => tracing::info!(deleted = r.into_inner().deleted, "tenant items deleted"),
                    // A dedicated table that never got made (or was dropped by an earlier run).
                    Err(s) if s.code() == Code::FailedPrecondition => {}
                    Err(s) => return Err(s.into()),
                }
                Ok(())
            }
            "delete_resources" => self.remove_copy(&wf.from, &tenant, false).await,
            "delete_users" => {
                let mut auth = self.inner.auth.clone();
                loop {
                    let page = auth
                        .list_users(ListUsersRequest {
                            tenant_id: tenant.clone(),
                            page_size: 100,
                            page_token: String::new(),
                        })
                        .await?
                        .into_inner();
                    if page.users.is_empty() {
                        return Ok(());
                    }
                    for u in page.users {
                        match auth.delete_user(DeleteUserRequest { tenant_id: tenant.clone(), email: u.email }).await {
                            Ok(_) => {}
                            Err(s) if s.code() == Code::NotFound => {}
                            Err(s) => return Err(s.into()),
                        }
                    }
                }
            }
            "mark_deleted" => {
                set_status(TenantStatus::Deleted).await?;
                self.inner.events.emit(EventKind::TenantOffboarded, &tenant, &wf.id, wf.export_path.clone()).await;
                Ok(())
            }
            other => Err(StepError::permanent(format!("unknown step {other}"))),
        }
    }

    /// Every item of `tenant` where `spot` keeps them (none if its table is gone).
    async fn export(&self, spot: &Spot, tenant: &str) -> Result<Vec<StoredItem>, StepError> {
        let request =
            ExportItemsRequest { store: Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() }) };
        let mut stream = match self.data_admin(spot)?.export_items(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::FailedPrecondition && spot.dedicated() => return Ok(Vec::new()),
            Err(s) => return Err(s.into()),
        };
        let mut items = Vec::new();
        while let Some(batch) = stream.message().await? {
            items.extend(batch.items);
        }
        Ok(items)
    }

    /// Removes the tenant's items at `spot`: its dedicated table and silo
    /// instance, or (`purge_pooled`) its items in the pooled table.
    async fn remove_copy(&self, spot: &Spot, tenant: &str, purge_pooled: bool) -> Result<(), StepError> {
        let store = Some(StoreRef { tenant_id: tenant.into(), table: spot.table.clone() });
        if spot.dedicated() {
            let dropped = self.data_admin(spot)?.drop_store(DropStoreRequest { store }).await?.into_inner().dropped;
            tracing::info!(table = %spot.table, dropped, "dedicated table removed");
        } else if purge_pooled {
            let deleted = self.data_admin(spot)?.purge_items(PurgeItemsRequest { store }).await?.into_inner().deleted;
            tracing::info!(deleted, "pooled items removed");
        }
        if spot.silo() {
            self.inner.compute.deprovision(tenant).await.map_err(|reason| StepError { reason, retryable: true })?;
            tracing::info!("silo instance removed");
        }
        Ok(())
    }

    /// Resumes every workflow left RUNNING (by a crash or a shutdown).
    pub async fn resume_unfinished(&self) -> Result<usize, OnboardingError> {
        let mut start_after = None;
        let mut pending = Vec::new();
        loop {
            let page = self
                .inner
                .store
                .query(Query { pk: WORKFLOWS_PK.into(), sk_prefix: String::new(), start_after, limit: 100 })
                .await?;
            for item in &page.items {
                // One unreadable record (e.g. from an older release) must not stop the others resuming.
                match serde_json::from_slice::<Workflow>(&item.data) {
                    Ok(wf) if wf.state == WorkflowState::Running => pending.push(wf.id),
                    Ok(_) => {}
                    Err(e) => tracing::error!(key = %item.sk, error = %e, "unreadable workflow record; not resumed"),
                }
            }
            match page.last_evaluated {
                Some(sk) => start_after = Some(sk),
                None => break,
            }
        }
        let n = pending.len();
        for id in pending {
            tracing::info!(workflow_id = %id, "resuming an unfinished workflow");
            self.spawn(id);
        }
        Ok(n)
    }

    /// The tenant's registry record (as the service identity).
    async fn tenant(&self, tenant_id: &str) -> Result<Tenant, Status> {
        let resp = self.inner.registry.clone().get_tenant(GetTenantRequest { tenant_id: tenant_id.into() }).await?;
        resp.into_inner().tenant.ok_or_else(|| Status::not_found(format!("tenant {tenant_id} not found")))
    }

    /// The workflow the tenant is in, with the active record's version.
    async fn active(&self, tenant_id: &str) -> Result<Option<(Workflow, u64)>, OnboardingError> {
        let Some(item) = self.inner.store.get(ACTIVE_PK, tenant_id).await? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&item.data).into_owned();
        Ok(self.load(&id).await?.map(|(wf, _)| (wf, item.version)))
    }

    /// Records `wf` and makes it the tenant's active workflow (`active`:
    /// the version of the record it replaces).
    async fn start(&self, wf: &Workflow, active: Option<u64>) -> Result<bool, OnboardingError> {
        let writes = vec![
            Write::Put {
                pk: ACTIVE_PK.into(),
                sk: wf.params.tenant_id.clone(),
                data: wf.id.clone().into_bytes(),
                condition: active.map_or(Condition::NotExists, Condition::Version),
            },
            Write::Put {
                pk: WORKFLOWS_PK.into(),
                sk: wf.id.clone(),
                data: Self::encode(wf)?,
                condition: Condition::NotExists,
            },
        ];
        match self.inner.store.transact_write(writes).await {
            Ok(()) => Ok(true),
            Err(StorageError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn to_proto_status(state: WorkflowState) -> WorkflowStatus {
    match state {
        WorkflowState::Running => WorkflowStatus::Running,
        WorkflowState::Succeeded => WorkflowStatus::Succeeded,
        WorkflowState::Failed => WorkflowStatus::Failed,
    }
}

fn to_proto(wf: &Workflow) -> pb::Workflow {
    pb::Workflow {
        workflow_id: wf.id.clone(),
        kind: wf.kind.as_str().into(),
        tenant_id: wf.params.tenant_id.clone(),
        status: to_proto_status(wf.state) as i32,
        steps: wf
            .steps
            .iter()
            .map(|s| Step {
                name: s.name.clone(),
                state: match s.state {
                    StepState::Pending => pb::StepState::Pending,
                    StepState::Done => pb::StepState::Done,
                    StepState::Failed => pb::StepState::Failed,
                } as i32,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
            })
            .collect(),
        error: wf.error(),
        create_time: wf.create_time,
        update_time: wf.update_time,
        export_path: wf.export_path.clone(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Onboarding for OnboardingService {
    async fn register_tenant(
        &self,
        request: Request<RegisterTenantRequest>,
    ) -> Result<Response<RegisterTenantResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.tenant_name("name", &req.name, true);
        if self.inner.tiers.get(&req.tier).is_none() {
            v.add("tier", self.inner.tiers.unknown_tier_message());
        }
        let email = tenantmesh_auth::normalize_email(&req.admin_email);
        tenantmesh_auth::check_email(&mut v, "admin_email", &email);
        tenantmesh_auth::check_password(&mut v, "admin_password", &req.admin_password);
        if req.idempotency_key.is_empty() || req.idempotency_key.len() > MAX_KEY_LEN {
            v.add("idempotency_key", format!("must be 1 to {MAX_KEY_LEN} bytes"));
        } else if req.idempotency_key.chars().any(char::is_control) {
            v.add("idempotency_key", "must not contain control characters");
        }
        v.check()?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(OnboardingError::TenantTaken(req.tenant_id).into());
        }
        let to = self.spot_for(&req.tenant_id, &req.tier).expect("tier validated");
        let params = Params { tenant_id: req.tenant_id.clone(), name: req.name, tier: req.tier, admin_email: email };
        let id = workflow_id(&params.tenant_id, Kind::Onboard);

        // Idempotency: the key's record, the workflow and the tenant's
        // active record are created together.
        let mut hash = None;
        loop {
            if let Some(item) =
                self.inner.store.get(IDEMPOTENCY_PK, &req.idempotency_key).await.map_err(OnboardingError::from)?
            {
                let recorded: Params =
                    serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                if recorded != params {
                    return Err(invalid_field(
                        "idempotency_key",
                        "was already used for a different RegisterTenant request",
                    ));
                }
                let (wf, _) = self.load(&id).await?.ok_or_else(|| OnboardingError::NotFound(id.clone()))?;
                return Ok(Response::new(RegisterTenantResponse {
                    tenant_id: params.tenant_id,
                    status: to_proto_status(wf.state) as i32,
                    workflow_id: id,
                }));
            }
            let password_hash = match &hash {
                Some(h) => h,
                None => {
                    let (pw, hp) = (req.admin_password.clone(), self.inner.hash_params);
                    let h = tokio::task::spawn_blocking(move || tenantmesh_auth::password::hash(&pw, hp))
                        .await
                        .map_err(|e| OnboardingError::Internal(e.to_string()))?
                        .map_err(|e| OnboardingError::Internal(e.to_string()))?;
                    hash.insert(h)
                }
            };
            let mut wf =
                Workflow::new(id.clone(), Kind::Onboard, params.clone(), &workflow::onboard_steps(&to), now_secs());
            wf.admin_password_hash = password_hash.clone();
            wf.idempotency_key = req.idempotency_key.clone();
            wf.to = to.clone();
            let writes = vec![
                Write::Put {
                    pk: IDEMPOTENCY_PK.into(),
                    sk: req.idempotency_key.clone(),
                    data: serde_json::to_vec(&params).map_err(|e| OnboardingError::Internal(e.to_string()))?,
                    condition: Condition::NotExists,
                },
                Write::Put {
                    pk: WORKFLOWS_PK.into(),
                    sk: id.clone(),
                    data: Self::encode(&wf)?,
                    condition: Condition::NotExists,
                },
                Write::Put {
                    pk: ACTIVE_PK.into(),
                    sk: params.tenant_id.clone(),
                    data: id.clone().into_bytes(),
                    condition: Condition::NotExists,
                },
            ];
            match self.inner.store.transact_write(writes).await {
                Ok(()) => {
                    tracing::info!(onboarded_tenant = %params.tenant_id, tier = %params.tier, model = %to.model, "onboarding started");
                    break;
                }
                // A concurrent call with the same key won: compare with it.
                Err(StorageError::ConditionFailed { index: 0, .. }) => continue,
                Err(StorageError::ConditionFailed { .. }) => {
                    return Err(OnboardingError::TenantTaken(params.tenant_id).into());
                }
                Err(e) => return Err(OnboardingError::from(e).into()),
            }
        }
        self.spawn(id.clone());
        Ok(Response::new(RegisterTenantResponse {
            tenant_id: params.tenant_id,
            status: WorkflowStatus::Running as i32,
            workflow_id: id,
        }))
    }

    async fn get_onboarding_status(
        &self,
        request: Request<GetOnboardingStatusRequest>,
    ) -> Result<Response<GetOnboardingStatusResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let id = workflow_id(&req.tenant_id, Kind::Onboard);
        let (wf, _) = self.load(&id).await?.ok_or_else(|| OnboardingError::NotFound(id.clone()))?;
        let w = to_proto(&wf);
        Ok(Response::new(GetOnboardingStatusResponse {
            tenant_id: w.tenant_id,
            status: w.status,
            steps: w.steps,
            workflow_id: w.workflow_id,
            kind: w.kind,
            error: w.error,
            create_time: w.create_time,
            update_time: w.update_time,
            export_path: w.export_path,
        }))
    }

    async fn get_workflow(
        &self,
        request: Request<GetWorkflowRequest>,
    ) -> Result<Response<GetWorkflowResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        check_workflow_id(&req.workflow_id)?;
        ctx.authorize_tenant(tenant_of(&req.workflow_id))?;
        let (wf, _) =
            self.load(&req.workflow_id).await?.ok_or_else(|| OnboardingError::NotFound(req.workflow_id.clone()))?;
        Ok(Response::new(GetWorkflowResponse { workflow: Some(to_proto(&wf)) }))
    }

    async fn retry_onboarding(
        &self,
        request: Request<RetryOnboardingRequest>,
    ) -> Result<Response<RetryOnboardingResponse>, Status> {
        let req = request.into_inner();
        check_workflow_id(&req.workflow_id)?;
        let (mut wf, mut version) =
            self.load(&req.workflow_id).await?.ok_or_else(|| OnboardingError::NotFound(req.workflow_id.clone()))?;
        if wf.state != WorkflowState::Failed {
            return Err(Status::failed_precondition(format!(
                "workflow {} is {:?}; only a FAILED workflow can be retried",
                wf.id, wf.state
            )));
        }
        if let Some((active, _)) = self.active(&wf.params.tenant_id).await?
            && active.id != wf.id
        {
            return Err(Status::failed_precondition(format!(
                "workflow {} superseded this one for the tenant",
                active.id
            )));
        }
        for s in &mut wf.steps {
            if s.state == StepState::Failed {
                s.state = StepState::Pending;
            }
        }
        wf.state = WorkflowState::Running;
        self.save(&mut wf, &mut version).await?;
        tracing::info!(workflow_id = %wf.id, "workflow retried");
        self.spawn(wf.id.clone());
        Ok(Response::new(RetryOnboardingResponse { workflow: Some(to_proto(&wf)) }))
    }

    async fn offboard_tenant(
        &self,
        request: Request<OffboardTenantRequest>,
    ) -> Result<Response<OffboardTenantResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(Status::failed_precondition("the platform tenant cannot be offboarded"));
        }
        let id = workflow_id(&req.tenant_id, Kind::Offboard);
        if let Some((wf, _)) = self.load(&id).await? {
            return Ok(Response::new(OffboardTenantResponse {
                workflow_id: id,
                status: to_proto_status(wf.state) as i32,
            }));
        }
        let tenant = self.tenant(&req.tenant_id).await?;
        let active = self.active(&req.tenant_id).await?;
        if let Some((running, _)) = active.as_ref().filter(|(w, _)| w.state == WorkflowState::Running) {
            return Err(Status::failed_precondition(format!(
                "workflow {} is running; offboard the tenant once it ends",
                running.id
            )));
        }
        let params = Params {
            tenant_id: tenant.tenant_id.clone(),
            name: tenant.name.clone(),
            tier: tenant.tier.clone(),
            admin_email: String::new(),
        };
        let mut wf = Workflow::new(id.clone(), Kind::Offboard, params, &workflow::offboard_steps(), now_secs());
        wf.from_tier = tenant.tier.clone();
        wf.from = self.spot_of(&tenant);
        if !self.start(&wf, active.map(|(_, v)| v)).await? {
            return Err(Status::aborted("another workflow for the tenant started meanwhile; try again"));
        }
        tracing::info!(offboarded_tenant = %req.tenant_id, "offboarding started");
        self.spawn(id.clone());
        Ok(Response::new(OffboardTenantResponse { workflow_id: id, status: WorkflowStatus::Running as i32 }))
    }

    async fn change_tier(&self, request: Request<ChangeTierRequest>) -> Result<Response<ChangeTierResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if self.inner.tiers.get(&req.tier).is_none() {
            v.add("tier", self.inner.tiers.unknown_tier_message());
        }
        v.check()?;
        if req.tenant_id == PLATFORM_TENANT {
            return Err(Status::failed_precondition("the platform tenant's tier is fixed"));
        }
        if let Some((wf, _)) = self.active(&req.tenant_id).await? {
            if wf.kind == Kind::ChangeTier && wf.params.tier == req.tier {
                return Ok(Response::new(ChangeTierResponse {
                    workflow_id: wf.id,
                    status: to_proto_status(wf.state) as i32,
                }));
            }
            return Err(Status::failed_precondition(format!(
                "workflow {} is {:?} for the tenant; finish or retry it first",
                wf.id, wf.state
            )));
        }
        let tenant = self.tenant(&req.tenant_id).await?;
        if tenant.status != TenantStatus::Active as i32 {
            return Err(Status::failed_precondition("only an ACTIVE tenant can change tier"));
        }
        if tenant.tier == req.tier {
            return Err(Status::failed_precondition(format!("the tenant is already on tier {}", req.tier)));
        }
        let from = self.spot_of(&tenant);
        let target = self.spot_for(&tenant.tenant_id, &req.tier).expect("tier validated");
        let to = if target.model == from.model { from.clone() } else { target };
        let params = Params {
            tenant_id: tenant.tenant_id.clone(),
            name: tenant.name.clone(),
            tier: req.tier.clone(),
            admin_email: String::new(),
        };
        let id = workflow_id(&tenant.tenant_id, Kind::ChangeTier);
        let steps = workflow::change_tier_steps(&from, &to);
        let mut wf = Workflow::new(id.clone(), Kind::ChangeTier, params, &steps, now_secs());
        wf.from_tier = tenant.tier.clone();
        wf.from = from;
        wf.to = to;
        if !self.start(&wf, None).await? {
            return Err(Status::aborted("another workflow for the tenant started meanwhile; try again"));
        }
        tracing::info!(target_tenant = %tenant.tenant_id, from = %wf.from_tier, to = %req.tier, "tier change started");
        self.spawn(id.clone());
        Ok(Response::new(ChangeTierResponse { workflow_id: id, status: WorkflowStatus::Running as i32 }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(&self, request: Request<WatchEventsRequest>) -> Result<Response<EventStream>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let filter = if req.tenant_id.is_empty() {
            if ctx.has_role(Role::PlatformAdmin) { None } else { Some(ctx.tenant_id.to_string()) }
        } else {
            let mut v = Violations::new();
            v.tenant_id("tenant_id", &req.tenant_id);
            v.check()?;
            ctx.authorize_tenant(&req.tenant_id)?;
            Some(req.tenant_id)
        };
        // Subscribe before replaying, so nothing falls between the two.
        let mut live = self.inner.events.subscribe();
        let this = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let wanted = |e: &Event| filter.as_ref().is_none_or(|t| *t == e.tenant_id);
            let mut last = 0;
            if let Some(mut after) = req.after_sequence {
                loop {
                    let batch = match this.inner.events.replay(after, 100).await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(Status::unavailable(format!("event log: {e}")))).await;
                            return;
                        }
                    };
                    let Some(end) = batch.last().map(|e| e.sequence) else { break };
                    for e in batch.into_iter().filter(|e| wanted(e)) {
                        if tx.send(Ok(WatchEventsResponse { event: Some(e) })).await.is_err() {
                            return;
                        }
                    }
                    after = end;
                }
                last = after;
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.sequence > last && wanted(&e) => {
                        if tx.send(Ok(WatchEventsResponse { event: Some(e) })).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "watcher fell {n} events behind; resume with after_sequence"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Opens the onboarding service's table on the configured backend.
pub async fn open_store(config: &Config) -> Result<DynTable, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.open_table(&config.common, "onboarding").await
}

/// Runs the onboarding service on `listener` until `shutdown` completes,
/// resuming unfinished workflows in the background. Silo compute comes from
/// `compute`, else from the endpoint template, else is unavailable.
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
    let compute = compute.unwrap_or_else(|| match &config.silo_endpoint_template {
        Some(t) => Arc::new(compute::EndpointTemplate(t.clone())),
        None => Arc::new(compute::Unconfigured),
    });
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
    let authn = Authenticator::remote(&config.common)?;
    tenantmesh_tenant_context::runtime::serve(
        listener,
        OnboardingServer::new(service),
        authn,
        config.common.shutdown_grace,
        shutdown,
    )
    .await?;
    Ok(())
}
