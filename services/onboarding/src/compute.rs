//! Compute for silo tenants: a dedicated data-service instance per tenant,
//! and an instance of each application service that can have one.
//! Under `tenantmesh up` the CLI runs them in-process; on Kubernetes the
//! onboarding service commits each instance's manifests to a GitOps
//! repository ([`crate::gitops`], `TENANTMESH_SILO_GITOPS_REPO`); elsewhere
//! (compose) the deployment runs the data-service instances and the
//! endpoint comes from `TENANTMESH_SILO_ENDPOINT_TEMPLATE` (`{tenant}` is
//! replaced by the id), and application services' silo tenants are served
//! by their shared instances on their own tables.

use async_trait::async_trait;
use tenantmesh_proto::registry::v1::ApplicationService;

#[async_trait]
pub trait SiloCompute: Send + Sync + 'static {
    /// Makes sure the tenant's instance runs (on `tier`, for its labels and
    /// cost tags); its gRPC endpoint. Idempotent.
    async fn provision(&self, tenant_id: &str, tier: &str) -> Result<String, String>;
    /// Stops and forgets the tenant's instance. Idempotent.
    async fn deprovision(&self, tenant_id: &str) -> Result<(), String>;

    /// Makes sure the application service `service` (its shared
    /// instance's catalog entry: name, endpoint, image) runs an instance of
    /// its own for silo tenant `tenant_id`, where the deployment can start
    /// one: its endpoint, or `None` when it cannot (the shared instance then
    /// serves the tenant, on the tenant's own tables). Idempotent.
    async fn provision_service(
        &self,
        _service: &ApplicationService,
        _tenant_id: &str,
        _tier: &str,
    ) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// Stops and forgets `service`'s instance of the tenant. Idempotent.
    async fn deprovision_service(&self, _service: &str, _tenant_id: &str) -> Result<(), String> {
        Ok(())
    }
}

/// Endpoints from a template; the instances are the deployment's job.
pub struct EndpointTemplate(pub String);

#[async_trait]
impl SiloCompute for EndpointTemplate {
    async fn provision(&self, tenant_id: &str, _tier: &str) -> Result<String, String> {
        Ok(self.0.replace("{tenant}", tenant_id))
    }

    async fn deprovision(&self, _tenant_id: &str) -> Result<(), String> {
        Ok(())
    }
}

/// No silo compute configured: onboarding a silo tenant fails with the reason.
pub struct Unconfigured;

#[async_trait]
impl SiloCompute for Unconfigured {
    async fn provision(&self, _tenant_id: &str, _tier: &str) -> Result<String, String> {
        Err("no silo compute is configured: set TENANTMESH_SILO_GITOPS_REPO or TENANTMESH_SILO_ENDPOINT_TEMPLATE, or run under `tenantmesh up`".into())
    }

    async fn deprovision(&self, _tenant_id: &str) -> Result<(), String> {
        Ok(())
    }
}
