//! Serving the data service: its gRPC services, metering, the stored-bytes
//! sampler and replicas' leases.

use std::future::Future;
use std::sync::Arc;

use crate::config::Config;
use crate::items::DataService;
use crate::{admin, metering, monthly, quota, storage_meter};
use tenantmesh_isolation::TenantStores;
use tenantmesh_metering::meters::Meters;
use tenantmesh_proto::data::v1::data_admin_server::DataAdminServer;
use tenantmesh_proto::data::v1::data_server::DataServer;
use tenantmesh_proto::metering::v1::metering_server::MeteringServer;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_telemetry::Service;
use tenantmesh_tenant_context::client::{self, Identity};
use tenantmesh_tenant_context::server::Authenticator;
use tokio::net::TcpListener;

/// Opens the pooled data table on the configured backend, as per-tenant
/// policy-confined stores.
pub async fn open_store(config: &Config) -> Result<Arc<dyn TenantStores>, Box<dyn std::error::Error + Send + Sync>> {
    config.storage.tenant_stores(&config.common, "data").await
}

/// The table of the replicas' heartbeats and leases (`<prefix>leases`).
pub use tenantmesh_app::replicas::LEASES_TABLE;

/// Runs the data service (and its DataAdmin) on `listener` until
/// `shutdown` completes.
pub async fn serve(
    config: Config,
    stores: Arc<dyn TenantStores>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let named = match &config.silo_tenant {
        Some(tenant) => Service::instance("data", format!("silo-{tenant}")),
        None => Service::new("data"),
    };
    // Boxed: the service's state is large, and a caller's future holds it.
    Service::run(
        named.clone(),
        Box::pin(async move {
            let mut authn = Authenticator::remote(&config.common)?;
            let policies = authn.policies().clone();
            let charges = authn.limiter().map(|limiter| admin::TenantCharges {
                limiter,
                directory: authn.directory(),
                tiers: config.common.tiers.clone(),
            });
            let shares = tenantmesh_app::replicas::rate_shares(
                &config.storage,
                &config.common,
                "data",
                config.silo_tenant.is_some(),
            )
            .await?;
            if let Some(shares) = shares {
                authn = authn.with_rate_shares(shares);
            }
            if let Some(t) = &config.silo_tenant {
                tracing::info!(silo_tenant = %t, "serving as a silo tenant's dedicated data service");
            }
            // A silo instance is only ever called through the shared service,
            // which meters its tenant's calls; it meters nothing itself.
            let usage = match config.silo_tenant {
                Some(_) => None,
                None if !config.metering => {
                    tracing::warn!(
                        "TENANTMESH_METERING=off: no usage is metered, and the Metering service is not served \
                     (the change history is still trimmed to the tiers' history_days)"
                    );
                    None
                }
                None => Some(config.storage.open_table(&config.common, USAGE_TABLE).await?),
            };
            let meters = usage.clone().map(|table| {
                let hook: tenantmesh_metering::meters::FlushHook = Box::new(tenantmesh_telemetry::metrics::usage);
                let meters = Arc::new(Meters::new(table, policies.metered(), config.metering_flush).with_hook(hook));
                meters.start();
                tracing::info!(
                    replica = %meters.replica(),
                    flush_ms = config.metering_flush.as_millis() as u64,
                    "metering every tenant's usage"
                );
                meters
            });
            let quotas = Arc::new(quota::Quotas::new(config.quota_rescan));
            let (stop_sampling, sampling_stopped) = tokio::sync::watch::channel(false);
            // The data service's own identity, when it has one.
            let tokens = match &config.common.service_client {
                Some(credentials) => Some(Arc::new(client::ServiceTokenSource::new(
                    client::channel(&config.common.auth_url)?,
                    credentials.clone(),
                ))),
                None => None,
            };
            // A silo instance's tenant is sampled and trimmed by the shared service.
            match (config.silo_tenant.is_none(), &tokens) {
                (true, Some(tokens)) => {
                    let tokens = tokens.clone();
                    let sampler = storage_meter::StorageSampler::new(
                        usage.clone(),
                        stores.clone(),
                        &config.storage.table_prefix,
                        &config.common.registry_url,
                        tokens,
                        config.storage_sample,
                        config.common.tiers.clone(),
                    )?
                    .with_quotas(quotas.clone())
                    .with_usage_retention(config.usage_retention_days);
                    Arc::new(sampler).start(sampling_stopped.clone());
                }
                (true, None) => {
                    tracing::warn!(
                        "no service identity (TENANTMESH_SERVICE_CLIENT_ID/_SECRET): stored bytes are not metered, \
                     and the change history is not trimmed (it grows past the tiers' history_days)"
                    );
                }
                (false, _) => {}
            }
            let data = DataService::new(stores.clone(), &config.storage.table_prefix, config.silo_tenant.clone())
                .with_quotas(quotas.clone())
                .with_tiers(config.common.tiers.clone())
                .with_stalled_writes(config.stall_writes);
            let admin = admin::DataAdminService::new(stores, &config.storage.table_prefix, config.silo_tenant.clone())
                .with_quotas(quotas)
                .with_stall(config.stream_stall)
                .with_charges(charges);
            let mut routes = tonic::service::Routes::new(tenantmesh_service::sized!(DataServer::new(data)))
                .add_service(tenantmesh_service::sized!(DataAdminServer::new(admin)));
            let mut names = vec![
                <DataServer<DataService> as tonic::server::NamedService>::NAME,
                <DataAdminServer<admin::DataAdminService> as tonic::server::NamedService>::NAME,
            ];
            // This month's usage: hard monthly limits and usage alerts, read
            // where the usage is (a silo instance's calls are refused, if
            // they are, by the shared instance that forwards them).
            let exhausted = match (&usage, &tokens) {
                (Some(table), Some(tokens)) => {
                    let own = |url: &str| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                        Ok(client::wrap(client::channel(url)?, Identity::Service(tokens.clone())))
                    };
                    let monitor = Arc::new(monthly::Monitor::new(
                        table.clone(),
                        TenantRegistryClient::new(own(&config.common.registry_url)?),
                        OnboardingClient::new(own(&config.onboarding_url)?),
                        config.common.tiers.clone(),
                        config.alert_webhook.clone(),
                        config.usage_check,
                    ));
                    let exhausted = monitor.exhausted();
                    tracing::info!(
                        check_ms = config.usage_check.as_millis() as u64,
                        webhook = config.alert_webhook.as_ref().map(|w| w.url()).unwrap_or_default(),
                        "watching monthly usage (hard monthly limits, usage alerts)"
                    );
                    monitor.start(sampling_stopped.clone());
                    Some(exhausted)
                }
                (Some(_), None) => {
                    tracing::warn!(
                        "no service identity (TENANTMESH_SERVICE_CLIENT_ID/_SECRET): hard monthly limits are not \
                     enforced and usage alerts do not fire"
                    );
                    None
                }
                (None, _) => None,
            };
            if let Some(table) = usage {
                let registry_channel = client::channel(&config.common.registry_url)?;
                let registry = TenantRegistryClient::new(client::wrap(registry_channel.clone(), Identity::Caller));
                let onboarding =
                    OnboardingClient::new(client::wrap(client::channel(&config.onboarding_url)?, Identity::Caller));
                let mut service = metering::MeteringService::new(
                    table,
                    config.pricing.clone(),
                    config.usage_grace,
                    registry,
                    onboarding,
                )
                .with_stall(config.stream_stall);
                if let Some(tokens) = &tokens {
                    // The same connection, with the data service's identity.
                    let own = client::wrap(registry_channel, Identity::Service(tokens.clone()));
                    service = service.with_own_registry(TenantRegistryClient::new(own));
                }
                routes = routes.add_service(MeteringServer::new(service));
                names.push(<MeteringServer<metering::MeteringService> as tonic::server::NamedService>::NAME);
            }
            // A silo tenant's Data calls go to its own instance (its
            // placement's endpoint) before any handler; a silo instance serves
            // its tenant alone and reports each call's usage to the shared one.
            let silo = match &config.silo_tenant {
                Some(tenant) => tenantmesh_app::silo::SiloLayer::silo(tenant),
                None => tenantmesh_app::silo::SiloLayer::by_placement(&[
                    <DataServer<DataService> as tonic::server::NamedService>::NAME,
                ]),
            };
            let stack = tower::ServiceBuilder::new()
                .layer(tenantmesh_tenant_context::server::stack(named, authn, meters.clone())?)
                .option_layer(exhausted.map(monthly::MonthlyLayer))
                .layer(silo);
            let embedded = config.storage.backend == tenantmesh_isolation::backend::Backend::Embedded;
            routes = routes.add_service(tenantmesh_service::backup::server(config.common.data_dir.clone(), embedded));
            names.push(tenantmesh_service::backup::NAME);
            let served = tenantmesh_service::runtime::serve_routes(
                listener,
                routes,
                &names,
                &[],
                stack,
                config.common.shutdown_grace,
                shutdown,
            )
            .await;
            stop_sampling.send_replace(true);
            // Whatever the outcome, what was counted is written.
            if let Some(meters) = meters {
                match meters.shutdown().await {
                    Ok(()) => tracing::info!("usage flushed"),
                    Err(e) => tracing::error!(error = %e, "usage counted since the last flush is lost"),
                }
            }
            served?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }),
    )
    .await
}

/// The table of metered usage (`<prefix>usage`, or `usage.redb`).
pub const USAGE_TABLE: &str = "usage";
