//! Serving the registry.

use std::future::Future;
use std::sync::Arc;

use tenantmesh_proto::audit::v1::audit_server::AuditServer;
use tenantmesh_proto::registry::v1::tenant_registry_server::TenantRegistryServer;
use tenantmesh_storage::DynTable;
use tenantmesh_telemetry::Service;
use tenantmesh_tenant_context::server::Authenticator;
use tenantmesh_tenant_context::verify::{JwksCache, TokenVerifier};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::registry::Registry;

/// Runs the registry on `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let named = Service::new("tenant-registry");
    Service::run(named.clone(), async move {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let registry = Registry::new(store, &config.common.issuer, config.common.tiers.clone())
            .with_private_jwks(config.common.jwks_allow_private)
            .with_stopping(stopping);
        registry.bootstrap().await?;
        let auth_channel = tenantmesh_tenant_context::client::channel(&config.common.auth_url)?;
        let verifier =
            TokenVerifier::new(Arc::new(JwksCache::new(auth_channel)), &config.common.issuer, &config.common.audience)
                .with_cache_capacity(config.common.token_cache_capacity);
        let authn = Authenticator::new(Arc::new(verifier), Arc::new(registry.clone()))
            .with_admission(&config.common)
            .with_refusals(registry.refusals());
        let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
        let audit = AuditServer::new(tenantmesh_tenant_context::audit::AuditService::new(registry.auditor()));
        let backup = registry.auditor().backup_server(config.common.data_dir.clone(), embedded);
        let purging = registry.sweep_audit(config.common.audit_sweep);
        let routes = tonic::service::Routes::new(tenantmesh_service::sized!(TenantRegistryServer::new(registry)))
            .add_service(tenantmesh_service::sized!(audit))
            .add_service(backup);
        let names = [
            tenantmesh_proto::registry::v1::tenant_registry_server::SERVICE_NAME,
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
        // It holds the store: it ends with the service.
        tenantmesh_service::runtime::end_tasks([purging]).await;
        served?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
