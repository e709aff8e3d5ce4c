//! Catching up: an application service registered after tenants exist is
//! provisioned for each of them by a workflow of its own
//! (`<tenant>/catch-up/<service>`, kind `catch_up`, one ProvisionService
//! step), with the same retries and crash guarantees as any workflow.
//!
//! The service watches the catalog: every `TENANTMESH_CATCH_UP_MS` it lists
//! the services that serve the lifecycle; for one it has not caught up (a
//! new name, or a new version of its registration) it walks the tenants.
//! An ACTIVE tenant whose onboarding did not include the service and that
//! has no catch-up workflow for it gets one; a tenant busy in another
//! workflow, or not yet ACTIVE, is tried again at the next tick; a
//! suspended or deleted one is left alone. A service counts as caught up
//! once every tenant was handled. Replicas may race: the workflow's id is
//! the guard (created once).

use std::collections::HashMap;
use std::time::Duration;

use tenantmesh_proto::registry::v1::{Tenant, TenantStatus};

use crate::OnboardingError;
use crate::service::OnboardingService;
use crate::views::{params_of, workflow_id};
use crate::workflow::{Kind, Step, Workflow, catch_up_steps};

/// What a tenant needs for a service.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// Provisioned already (by its onboarding, or a catch-up).
    Nothing,
    /// A catch-up workflow was started now.
    Started,
    /// Not now (busy in another workflow, or not ACTIVE yet): next tick.
    Later,
}

impl OnboardingService {
    /// Runs the catch-up loop every `every` until the task is dropped.
    pub(crate) fn catch_up(self, every: Duration) -> tokio::task::JoinHandle<()> {
        tenantmesh_telemetry::spawn(async move {
            // Service name -> the registration version caught up.
            let mut done: HashMap<String, u64> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.catch_up_once(&mut done).await {
                    tracing::warn!(error = %e, "catching up application services failed; trying again");
                }
            }
        })
    }

    async fn catch_up_once(&self, done: &mut HashMap<String, u64>) -> Result<(), tonic::Status> {
        use tenantmesh_proto::registry::v1::ListServicesRequest;
        let services = self.inner.registry.clone().list_services(ListServicesRequest {}).await?.into_inner().services;
        let due: Vec<_> = services
            .into_iter()
            .filter(crate::service::takes_part)
            .filter(|s| done.get(&s.name) != Some(&s.version))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let tenants = tenantmesh_tenant_context::directory::all_tenants(&self.inner.registry).await?;
        for service in due {
            let hook = service.name.clone();
            let (mut started, mut later) = (0, 0);
            for tenant in &tenants {
                match self.catch_up_tenant(tenant, &hook).await {
                    Ok(Need::Nothing) => {}
                    Ok(Need::Started) => started += 1,
                    Ok(Need::Later) => later += 1,
                    Err(e) => {
                        tracing::warn!(target_tenant = %tenant.tenant_id, service = %hook, error = %e, "catch-up not started");
                        later += 1;
                    }
                }
            }
            if started > 0 || later > 0 {
                tracing::info!(service = %hook, started, later, "catching up tenants in an application service");
            }
            if later == 0 {
                done.insert(service.name, service.version);
            }
        }
        Ok(())
    }

    async fn catch_up_tenant(&self, tenant: &Tenant, hook: &str) -> Result<Need, OnboardingError> {
        if tenant.tenant_id == tenantmesh_tenant_context::PLATFORM_TENANT {
            return Ok(Need::Nothing);
        }
        match TenantStatus::try_from(tenant.status) {
            Ok(TenantStatus::Active) => {}
            // Leaving: nothing to provision.
            Ok(TenantStatus::Suspended | TenantStatus::Deleted) => return Ok(Need::Nothing),
            _ => return Ok(Need::Later),
        }
        let id = format!("{}/{}", workflow_id(&tenant.tenant_id, Kind::CatchUp), hook);
        let engine = &self.inner.engine;
        if engine.load(&id).await?.is_some() {
            return Ok(Need::Nothing);
        }
        let onboarded = engine.load(&workflow_id(&tenant.tenant_id, Kind::Onboard)).await?;
        let included = |wf: &Workflow| wf.steps.iter().any(|s| s.name == Step::ProvisionService && s.service == hook);
        if onboarded.is_some_and(|(wf, _)| included(&wf)) {
            return Ok(Need::Nothing);
        }
        if engine.active(&tenant.tenant_id).await?.is_some() {
            return Ok(Need::Later);
        }
        let mut wf = Workflow::new(
            id.clone(),
            Kind::CatchUp,
            params_of(tenant, &tenant.tier),
            &catch_up_steps(hook),
            tenantmesh_service::clock::now_secs(),
        );
        wf.from_tier = tenant.tier.clone();
        wf.from = self.spot_of(tenant);
        wf.to = wf.from.clone();
        match self.start(&wf, None, None).await {
            Ok(()) => {}
            // Another replica, or a workflow the tenant began meanwhile.
            Err(OnboardingError::Busy) => return Ok(Need::Later),
            Err(e) => return Err(e),
        }
        tracing::info!(target_tenant = %tenant.tenant_id, service = %hook, workflow_id = %id, "catch-up started");
        engine.spawn(id);
        Ok(Need::Started)
    }
}
