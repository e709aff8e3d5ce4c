//! Serving the onboarding service.

use std::future::Future;
use std::sync::Arc;

use tenantmesh_proto::onboarding::v1::onboarding_server::OnboardingServer;
use tenantmesh_storage::DynTable;
use tenantmesh_telemetry::Service;
use tenantmesh_tenant_context::client::{self, Identity, ServiceTokenSource};
use tenantmesh_tenant_context::server::Authenticator;
use tokio::net::TcpListener;

use crate::compute::SiloCompute;
use crate::config::Config;
use crate::service::{Dependencies, OnboardingService};
use crate::{compute, gitops};

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
    let named = Service::new("onboarding");
    Service::run(named.clone(), async move {
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
        tenantmesh_telemetry::spawn(async move {
            if let Err(e) = resumer.resume_unfinished().await {
                tracing::error!(error = %e, "could not resume unfinished workflows");
            }
        });
        let sweeper = service.clone().sweep_exports(config.export_sweep);
        let catching_up = service.clone().catch_up(config.catch_up);
        let purging = service.sweep_audit(config.common.audit_sweep);
        let authn = Authenticator::remote(&config.common)?.with_refusals(service.refusals());
        let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
        let audit = tenantmesh_tenant_context::audit::AuditService::new(service.auditor());
        let audit = tenantmesh_proto::audit::v1::audit_server::AuditServer::new(audit);
        let backup = service.auditor().backup_server(config.common.data_dir.clone(), embedded);
        let routes = tonic::service::Routes::new(tenantmesh_service::sized!(OnboardingServer::new(service)))
            .add_service(tenantmesh_service::sized!(audit))
            .add_service(backup);
        let names = [
            tenantmesh_proto::onboarding::v1::onboarding_server::SERVICE_NAME,
            tenantmesh_proto::audit::v1::audit_server::SERVICE_NAME,
            tenantmesh_service::backup::NAME,
        ];
        let served = tenantmesh_service::runtime::serve_routes(
            listener,
            routes,
            &names,
            &[],
            tenantmesh_tenant_context::server::stack(named, authn, None)?,
            config.common.shutdown_grace,
            shutdown,
        )
        .await;
        // They hold the store: they end with the service.
        tenantmesh_service::runtime::end_tasks([sweeper, catching_up, purging]).await;
        served?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
