//! The onboarding service: `RegisterTenant` runs a durable, idempotent
//! workflow (create the tenant record -> create its admin user -> activate)
//! against the registry and auth services, as a platform service identity.
//! State is persisted after every step; the same idempotency key never
//! creates anything twice; unfinished workflows resume on start-up.
#![forbid(unsafe_code)]

mod error;
pub mod workflow;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::backend::StorageConfig;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{CreateUserRequest, Role as ProtoRole};
use tenantmesh_proto::onboarding::v1::onboarding_server::{Onboarding, OnboardingServer};
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{
    CreateTenantRequest, GetTenantRequest, IsolationModel, SetTenantStatusRequest, TenantStatus,
};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError, Write};
use tenantmesh_tenant_context::client::{self, Identity, PropagatedChannel, ServiceCredentials, ServiceTokenSource};
use tenantmesh_tenant_context::config::{CommonConfig, ConfigError, ONBOARDING_PORT, var};
use tenantmesh_tenant_context::errors::{Violations, invalid_field};
use tenantmesh_tenant_context::server::Authenticator;
use tenantmesh_tenant_context::{PLATFORM_TENANT, TenantContext, tiers};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

pub use error::OnboardingError;
use workflow::{Params, StepState, Workflow, WorkflowState};

const WORKFLOWS_PK: &str = "_workflows";
const IDEMPOTENCY_PK: &str = "_idempotency";
const MAX_KEY_LEN: usize = 128;
/// Attempts of a step whose failure looks transient, before the workflow
/// is marked FAILED.
const STEP_ATTEMPTS: u32 = 4;

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
        Ok(Self {
            common: CommonConfig::from_env(env, ONBOARDING_PORT)?,
            storage: StorageConfig::from_env(env)?,
            credentials: ServiceCredentials {
                client_id: var(env, "TENANTMESH_SERVICE_CLIENT_ID").unwrap_or("onboarding").to_owned(),
                client_secret: client_secret.to_owned(),
            },
            hash_params: tenantmesh_auth::HashParams::from_env(env)?,
        })
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
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
    hash_params: tenantmesh_auth::HashParams,
    /// One run of a tenant's workflow at a time in this process.
    running: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// A step failed; `retryable` when the cause looks transient.
struct StepError {
    reason: String,
    retryable: bool,
}

impl From<Status> for StepError {
    fn from(s: Status) -> Self {
        let retryable =
            matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted);
        StepError { reason: format!("{:?}: {}", s.code(), s.message()), retryable }
    }
}

impl OnboardingService {
    /// `registry` and `auth` must be wrapped with a service identity.
    pub fn new(
        store: DynTable,
        registry: PropagatedChannel,
        auth: PropagatedChannel,
        hash_params: tenantmesh_auth::HashParams,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                registry: TenantRegistryClient::new(registry),
                auth: AuthClient::new(auth),
                hash_params,
                running: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn load(&self, tenant_id: &str) -> Result<Option<(Workflow, u64)>, OnboardingError> {
        match self.inner.store.get(WORKFLOWS_PK, tenant_id).await? {
            Some(item) => {
                let wf = serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                Ok(Some((wf, item.version)))
            }
            None => Ok(None),
        }
    }

    async fn save(&self, wf: &mut Workflow, version: &mut u64) -> Result<(), OnboardingError> {
        wf.update_time = now_secs();
        let data = serde_json::to_vec(wf).map_err(|e| OnboardingError::Internal(e.to_string()))?;
        let item = self.inner.store.put(WORKFLOWS_PK, &wf.params.tenant_id, data, Condition::Version(*version)).await?;
        *version = item.version;
        Ok(())
    }

    /// Runs the tenant's workflow from its first unfinished step to the end.
    pub async fn run(&self, tenant_id: &str) -> Result<Workflow, OnboardingError> {
        let lock = self.inner.running.lock().await.entry(tenant_id.to_owned()).or_default().clone();
        let result = {
            let _guard = lock.lock().await;
            self.run_locked(tenant_id).await
        };
        let mut running = self.inner.running.lock().await;
        // The map's handle and ours: nobody else is waiting, forget the lock.
        if Arc::strong_count(&lock) == 2 {
            running.remove(tenant_id);
        }
        result
    }

    /// [`OnboardingService::run`] under the tenant's lock.
    async fn run_locked(&self, tenant_id: &str) -> Result<Workflow, OnboardingError> {
        let (mut wf, mut version) =
            self.load(tenant_id).await?.ok_or_else(|| OnboardingError::NotFound(tenant_id.into()))?;
        if wf.state == WorkflowState::Succeeded {
            return Ok(wf);
        }
        if wf.state == WorkflowState::Failed {
            wf.state = WorkflowState::Running;
            self.save(&mut wf, &mut version).await?;
        }
        while let Some(i) = wf.next_step() {
            let name = workflow::STEPS[i];
            let span = tracing::info_span!("onboarding.step", step = name, tenant.id = %tenant_id);
            let outcome = async {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    wf.steps[i].attempts += 1;
                    match self.step(i, &wf).await {
                        Ok(()) => return Ok(()),
                        Err(e) if e.retryable && attempt < STEP_ATTEMPTS => {
                            tracing::warn!(step = name, attempt, reason = %e.reason, "step failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            .instrument(span)
            .await;
            match outcome {
                Ok(()) => {
                    wf.steps[i].state = StepState::Done;
                    wf.steps[i].last_error.clear();
                    if wf.next_step().is_none() {
                        wf.state = WorkflowState::Succeeded;
                    }
                    self.save(&mut wf, &mut version).await?;
                    tracing::info!(step = name, onboarded_tenant = tenant_id, "onboarding step done");
                }
                Err(e) => {
                    wf.steps[i].state = StepState::Failed;
                    wf.steps[i].last_error = e.reason.clone();
                    wf.state = WorkflowState::Failed;
                    self.save(&mut wf, &mut version).await?;
                    tracing::warn!(step = name, onboarded_tenant = tenant_id, reason = %e.reason, "onboarding failed");
                    return Err(OnboardingError::StepFailed { step: name, reason: e.reason, retryable: e.retryable });
                }
            }
        }
        tracing::info!(onboarded_tenant = tenant_id, "tenant onboarded");
        Ok(wf)
    }

    /// One step; each is idempotent (re-running it after a crash creates nothing twice).
    async fn step(&self, index: usize, wf: &Workflow) -> Result<(), StepError> {
        let p = &wf.params;
        match workflow::STEPS[index] {
            "create_tenant" => {
                let created = self
                    .inner
                    .registry
                    .clone()
                    .create_tenant(CreateTenantRequest {
                        tenant_id: p.tenant_id.clone(),
                        name: p.name.clone(),
                        tier: p.tier.clone(),
                        status: TenantStatus::Provisioning as i32,
                    })
                    .await;
                match created {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => {
                        // Adopt only the record an earlier run of this very
                        // workflow created: still provisioning, same name and tier.
                        let existing = self
                            .inner
                            .registry
                            .clone()
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
                            Err(StepError {
                                reason: format!("tenant {} already exists outside this onboarding", p.tenant_id),
                                retryable: false,
                            })
                        }
                    }
                    Err(s) => Err(s.into()),
                }
            }
            "create_admin_user" => {
                let created = self
                    .inner
                    .auth
                    .clone()
                    .create_user(CreateUserRequest {
                        tenant_id: p.tenant_id.clone(),
                        email: p.admin_email.clone(),
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
            "activate_tenant" => {
                self.inner
                    .registry
                    .clone()
                    .set_tenant_status(SetTenantStatusRequest {
                        tenant_id: p.tenant_id.clone(),
                        status: TenantStatus::Active as i32,
                    })
                    .await?;
                Ok(())
            }
            other => Err(StepError { reason: format!("unknown step {other}"), retryable: false }),
        }
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
                let wf: Workflow =
                    serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                if wf.state == WorkflowState::Running {
                    pending.push(wf.params.tenant_id);
                }
            }
            match page.last_evaluated {
                Some(sk) => start_after = Some(sk),
                None => break,
            }
        }
        let n = pending.len();
        for tenant_id in pending {
            tracing::info!(onboarded_tenant = %tenant_id, "resuming an unfinished onboarding");
            if let Err(e) = self.run(&tenant_id).await {
                tracing::warn!(onboarded_tenant = %tenant_id, error = %e, "resumed onboarding failed");
            }
        }
        Ok(n)
    }
}

fn to_proto_status(wf: &Workflow) -> WorkflowStatus {
    match wf.state {
        WorkflowState::Running => WorkflowStatus::Running,
        WorkflowState::Succeeded => WorkflowStatus::Succeeded,
        WorkflowState::Failed => WorkflowStatus::Failed,
    }
}

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
        let model = tiers::isolation_model(&req.tier);
        if model.is_none() {
            v.add("tier", tiers::unknown_tier_message());
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
        if model != Some(IsolationModel::Pool) {
            return Err(Status::unimplemented(format!(
                "tier {} uses the {:?} isolation model; only pool tiers (basic, standard) can be onboarded yet",
                req.tier,
                model.expect("validated")
            )));
        }
        let params = Params { tenant_id: req.tenant_id.clone(), name: req.name, tier: req.tier, admin_email: email };

        // Idempotency: the key's record and the workflow are created together.
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
                break;
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
            let wf = Workflow::new(params.clone(), password_hash.clone(), req.idempotency_key.clone(), now_secs());
            let writes = vec![
                Write::Put {
                    pk: IDEMPOTENCY_PK.into(),
                    sk: req.idempotency_key.clone(),
                    data: serde_json::to_vec(&params).map_err(|e| OnboardingError::Internal(e.to_string()))?,
                    condition: Condition::NotExists,
                },
                Write::Put {
                    pk: WORKFLOWS_PK.into(),
                    sk: params.tenant_id.clone(),
                    data: serde_json::to_vec(&wf).map_err(|e| OnboardingError::Internal(e.to_string()))?,
                    condition: Condition::NotExists,
                },
            ];
            match self.inner.store.transact_write(writes).await {
                Ok(()) => {
                    tracing::info!(onboarded_tenant = %params.tenant_id, "onboarding started");
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
        let wf = self.run(&params.tenant_id).await?;
        Ok(Response::new(RegisterTenantResponse { tenant_id: params.tenant_id, status: to_proto_status(&wf) as i32 }))
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
        let (wf, _) =
            self.load(&req.tenant_id).await?.ok_or_else(|| OnboardingError::NotFound(req.tenant_id.clone()))?;
        let steps = wf
            .steps
            .iter()
            .map(|s| Step {
                name: s.name.clone(),
                state: match s.state {
                    StepState::Pending => tenantmesh_proto::onboarding::v1::StepState::Pending,
                    StepState::Done => tenantmesh_proto::onboarding::v1::StepState::Done,
                    StepState::Failed => tenantmesh_proto::onboarding::v1::StepState::Failed,
                } as i32,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
            })
            .collect();
        Ok(Response::new(GetOnboardingStatusResponse {
            tenant_id: req.tenant_id,
            status: to_proto_status(&wf) as i32,
            steps,
        }))
    }
}

/// Opens the onboarding service's table on the configured backend.
pub async fn open_store(config: &Config) -> Result<DynTable, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.open_table(&config.common, "onboarding").await
}

/// Runs the onboarding service on `listener` until `shutdown` completes,
/// resuming unfinished workflows in the background.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let auth = client::channel(&config.common.auth_url)?;
    let registry = client::channel(&config.common.registry_url)?;
    let tokens = Arc::new(ServiceTokenSource::new(auth.clone(), config.credentials.clone()));
    let service = OnboardingService::new(
        store,
        client::wrap(registry.clone(), Identity::Service(tokens.clone())),
        client::wrap(auth.clone(), Identity::Service(tokens)),
        config.hash_params,
    );
    let resumer = service.clone();
    tokio::spawn(async move {
        if let Err(e) = resumer.resume_unfinished().await {
            tracing::error!(error = %e, "could not resume unfinished onboardings");
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
