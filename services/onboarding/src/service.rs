//! The onboarding service's state: the engine, the steps and what the
//! handlers need.

use std::sync::Arc;
use std::time::Duration;
use tenantmesh_proto::audit::v1::AuditEvent;
use tenantmesh_service::audit::Caller;

use tenantmesh_isolation::stores::dedicated_table;
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, Tenant};
use tenantmesh_service::config::ConfigError;
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{DynTable, StorageError};
use tenantmesh_tenant_context::client::{self, PropagatedChannel, ServiceTokenSource};

use crate::compute::SiloCompute;
use crate::config::Config;
use crate::engine::{Engine, RetryPolicy};
use crate::error::OnboardingError;
use crate::events::EventLog;
use crate::faults::Faults;
use crate::workflow::{Spot, Workflow};
use crate::{resources, steps, views, workflow};
use tenantmesh_service::clock::now_secs;

/// Partition of the RegisterTenant idempotency keys (data: the request's [`workflow::Params`]).
pub(crate) const IDEMPOTENCY_PK: &str = "_idempotency";

/// The onboarding service's state: the engine and what the handlers need.
#[derive(Clone)]
pub struct OnboardingService {
    pub(crate) inner: Arc<Inner>,
}

/// The lifecycle service every application serves (the `tenantmesh-app` crate's).
pub(crate) const LIFECYCLE: &str = tenantmesh_proto::lifecycle::v1::tenant_lifecycle_server::SERVICE_NAME;

/// Whether a catalog entry is an application service that takes part in
/// the workflows: a shared instance (not one silo tenant's) serving the
/// lifecycle service.
pub(crate) fn takes_part(service: &tenantmesh_proto::registry::v1::ApplicationService) -> bool {
    service.silo_tenant.is_empty() && service.grpc_services.iter().any(|g| g == LIFECYCLE)
}

/// The RPCs that start workflows, by path: their audit actions.
const AUDITED: [(&str, &str); 5] = [
    ("/tenantmesh.onboarding.v1.Onboarding/RegisterTenant", "tenant.onboard"),
    ("/tenantmesh.onboarding.v1.Onboarding/RetryOnboarding", "workflow.retry"),
    ("/tenantmesh.onboarding.v1.Onboarding/OffboardTenant", "tenant.offboard"),
    ("/tenantmesh.onboarding.v1.Onboarding/ChangeTier", "tenant.change_tier"),
    ("/tenantmesh.onboarding.v1.Onboarding/RestoreTenant", "tenant.restore"),
];

/// The audit event of starting `wf` for `caller`: `action`, from `before`
/// to `after`.
pub(crate) fn started(caller: &Caller, wf: &Workflow, action: &str, before: String, after: String) -> AuditEvent {
    let mut event = caller.event(&wf.params.tenant_id, action, format!("workflow/{}", wf.id));
    event.before = before;
    event.after = after;
    event
}

pub(crate) struct Inner {
    pub(crate) engine: Engine,
    /// The idempotency keys and the event log live here too.
    pub(crate) store: DynTable,
    pub(crate) registry: TenantRegistryClient<PropagatedChannel>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) resources: Arc<resources::Ledger>,
    pub(crate) tiers: Arc<Tiers>,
    pub(crate) table_prefix: String,
    pub(crate) pooled_table: String,
    pub(crate) hash_params: tenantmesh_credentials::HashParams,
    pub(crate) hashing: tenantmesh_credentials::HashPool,
    /// Open WatchEvents streams per caller (tenant, subject).
    pub(crate) watchers: views::Watchers,
    /// What tenant admins are not shown (host paths, endpoints).
    pub(crate) redactor: views::Redactor,
    /// The audit log, in the same table: a workflow's start and its event
    /// (who asked for it) are one transaction.
    pub(crate) auditor: tenantmesh_tenant_context::audit::Auditor,
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
                auditor: tenantmesh_tenant_context::audit::Auditor::new(tenantmesh_service::audit::AuditLog::new(
                    store.clone(),
                    "onboarding",
                )),
                store,
                registry,
                events,
                resources,
                tiers: config.common.tiers.clone(),
                table_prefix: config.storage.table_prefix.clone(),
                pooled_table: config.storage.table_name("data"),
                hash_params: config.hash_params,
                hashing: tenantmesh_credentials::HashPool::new(config.hash_pool),
                watchers: views::Watchers::new(config.max_watchers),
                redactor: views::Redactor::new(&[&config.common.data_dir.join("exports"), &config.common.data_dir]),
            }),
        })
    }

    /// The refusals of the RPCs that start workflows, for the audit log.
    pub fn refusals(&self) -> tenantmesh_tenant_context::authorize::OnRefusal {
        self.inner.auditor.refusals(&AUDITED)
    }

    /// Purges, every `every`, each tenant's audit events past its tier's
    /// `audit_retention_days`, the tenant's tier asked of the registry (the
    /// platform's chain, and a tenant it no longer knows, keep the longest
    /// of any tier).
    pub fn sweep_audit(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let tier_of: tenantmesh_tenant_context::audit::TierOf = Arc::new(move |tenant: String| {
            let this = this.clone();
            Box::pin(async move { this.tenant(&tenant).await.ok().map(|t| t.tier) })
        });
        self.inner.auditor.sweep(self.inner.tiers.clone(), tier_of, every)
    }

    /// Onboarding's audit log (its `Audit` and `Backup` services).
    pub fn auditor(&self) -> &tenantmesh_tenant_context::audit::Auditor {
        &self.inner.auditor
    }

    /// Resumes every workflow left RUNNING (by a crash or a shutdown).
    pub async fn resume_unfinished(&self) -> Result<usize, OnboardingError> {
        self.inner.engine.resume_unfinished().await
    }

    /// Where `tenant_id`'s items go on `tier`.
    pub(crate) fn spot_for(&self, tenant_id: &str, tier: &str) -> Option<Spot> {
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
    pub(crate) fn spot_of(&self, tenant: &Tenant) -> Spot {
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
    /// The application services the workflow of a tenant includes, by
    /// name: every one of the catalog that takes part ([`takes_part`]), now.
    pub(crate) async fn hooks(&self) -> Result<Vec<String>, tonic::Status> {
        use tenantmesh_proto::registry::v1::ListServicesRequest;
        let services = self.inner.registry.clone().list_services(ListServicesRequest {}).await?.into_inner().services;
        Ok(services.into_iter().filter(takes_part).map(|s| s.name).collect())
    }

    pub(crate) async fn tenant(&self, tenant_id: &str) -> Result<Tenant, tonic::Status> {
        let resp = self.inner.registry.clone().get_tenant(GetTenantRequest { tenant_id: tenant_id.into() }).await?;
        resp.into_inner().tenant.ok_or_else(|| OnboardingError::TenantNotFound(tenant_id.into()).into())
    }

    /// Deletes, every `every`, the exports kept past their tier's
    /// `export_retention_days` (every tenant's, offboarded ones' included),
    /// recording each removal in the resource ledger.
    pub(crate) fn sweep_exports(self, every: Duration) -> tokio::task::JoinHandle<()> {
        tenantmesh_telemetry::spawn(async move {
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
    /// of the record it replaces), with `event` (who asked for it) in the
    /// same transaction; `Busy` if another one started meanwhile.
    pub(crate) async fn start(
        &self,
        wf: &Workflow,
        active: Option<u64>,
        event: Option<AuditEvent>,
    ) -> Result<(), OnboardingError> {
        let audit = event.map(|e| (&self.inner.auditor.log, e));
        match self.inner.engine.start(wf, active, Vec::new(), audit).await {
            Ok(()) => Ok(()),
            Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Busy),
            Err(e) => Err(e.into()),
        }
    }
}
