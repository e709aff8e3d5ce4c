//! Serving the auth service.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::expiry;
use crate::service::AuthService;
use tenantmesh_proto::audit::v1::audit_server::AuditServer;
use tenantmesh_proto::auth::v1::auth_server::AuthServer;
use tenantmesh_storage::DynTable;
use tenantmesh_telemetry::Service;
use tenantmesh_tenant_context::audit::AuditService;
use tenantmesh_tenant_context::directory::{RemoteDirectory, TenantDirectory};
use tenantmesh_tenant_context::server::{self, Authenticator};
use tenantmesh_tenant_context::verify::TokenVerifier;
use tokio::net::TcpListener;

/// Runs the auth service on `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    store: DynTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let named = Service::new("auth");
    named.clone().run(async move {
        let mut clients: Vec<_> = config.service_clients.iter().collect();
        clients.sort_by_key(|(id, _)| id.as_str());
        for (id, client) in clients {
            let scopes: Vec<&str> = client.grant.scopes.iter().map(|s| s.as_str()).collect();
            if scopes.is_empty() {
                tracing::warn!(
                    client_id = %id,
                    "service client declared without scopes: its tokens open no RPC that needs a service identity \
                     (declare them as id:secret:scope+scope in TENANTMESH_SERVICE_CLIENTS)"
                );
            } else {
                tracing::info!(client_id = %id, scopes = %scopes.join("+"), tenants = ?client.grant.tenants, "service client");
            }
        }
        let (data_dir, embedded) = (
            config.common.data_dir.clone(),
            config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded,
        );
        let registry = tenantmesh_tenant_context::client::channel(&config.common.registry_url)?;
        let remote =
            Arc::new(RemoteDirectory::new(registry, config.common.tenant_cache_ttl, config.common.tenant_cache_capacity));
        let own_tokens = tenantmesh_tenant_context::directory::watch_changes(&remote, &config.common)?;
        let directory: Arc<dyn TenantDirectory> = remote;
        let (issuer, audience, grace, tokens, common) = (
            config.common.issuer.clone(),
            config.common.audience.clone(),
            config.common.shutdown_grace,
            config.common.token_cache_capacity,
            config.common.clone(),
        );
        let (sweep_store, window) = (store.clone(), config.lockout.window());
        let service = AuthService::new(config, store, directory.clone(), own_tokens).await?;
        if let Some(password) = service.bootstrap_admin().await? {
            // Printed once, on the terminal only: never into the JSON logs.
            eprintln!(
                "tenantmesh: generated the platform admin password: {password}\n\
                 tenantmesh: (also written to {}; set TENANTMESH_BOOTSTRAP_PASSWORD to choose it)",
                service.bootstrap_password_path().display()
            );
        }
        // Another replica may rotate: pick up its keys.
        let (keys, key_store) = (service.keys(), service.inner.store.clone());
        let reloader = tenantmesh_telemetry::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = keys.reload(&key_store).await {
                    tracing::warn!(error = %e, "signing key reload failed");
                }
            }
        });
        let sweeper = expiry::start(sweep_store, window);
        let verifier = TokenVerifier::new(service.keys(), &issuer, &audience).with_cache_capacity(tokens);
        let authn =
            Authenticator::new(Arc::new(verifier), directory).with_admission(&common).with_refusals(service.refusals());
        let audit = AuditServer::new(AuditService::new(service.auditor()));
        let backup = service.auditor().backup_server(data_dir, embedded);
        let purging = service.sweep_audit(common.audit_sweep);
        let routes = tonic::service::Routes::new(tenantmesh_service::sized!(AuthServer::new(service)))
            .add_service(tenantmesh_service::sized!(audit))
            .add_service(backup);
        let names = [
            tenantmesh_proto::auth::v1::auth_server::SERVICE_NAME,
            tenantmesh_proto::audit::v1::audit_server::SERVICE_NAME,
            tenantmesh_service::backup::NAME,
        ];
        let served = tenantmesh_service::runtime::serve_routes(
            listener,
            routes,
            &names,
            &[],
            server::stack(named, authn, None)?,
            grace,
            shutdown,
        )
        .await;
        // The reloader and the sweeper hold the store: they end with the service.
        tenantmesh_service::runtime::end_tasks([reloader, sweeper, purging]).await;
        served?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
}
