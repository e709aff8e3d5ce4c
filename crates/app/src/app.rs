//! An application service: what it declares, and serving it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;
use tenantmesh_isolation::backend::{Backend, StorageConfig};

use tenantmesh_metering::meters::Meters;
use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{ApplicationService, RegisterServiceRequest};
use tenantmesh_service::config::{self, CommonConfig};
use tenantmesh_telemetry::Service;
use tenantmesh_tenant_context::access::{Policies, PolicyError};
use tenantmesh_tenant_context::client::{self, Identity, ServiceTokenSource};
use tenantmesh_tenant_context::server::{self, Authenticator};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::service::Routes;

use crate::error::AppError;
use crate::lifecycle::Lifecycle;
use crate::silo::{Mode, Resolve, SiloLayer};
use crate::tables::Tables;
use tenantmesh_proto::lifecycle::v1::tenant_lifecycle_server::TenantLifecycleServer;

/// The full name of the lifecycle service every application serves (see
/// `proto/tenantmesh/lifecycle/v1/lifecycle.proto`); the catalog lists it
/// among the service's gRPC services.
pub const LIFECYCLE: &str = tenantmesh_proto::lifecycle::v1::tenant_lifecycle_server::SERVICE_NAME;

/// The port an application service listens on unless
/// `TENANTMESH_LISTEN_ADDR` says otherwise (loopback).
pub const DEFAULT_PORT: u16 = 50060;

/// An application service: its name, its protos' descriptor set, its
/// tables and its settings. See the crate docs.
pub struct App {
    name: String,
    descriptor_set: &'static [u8],
    /// The gRPC services its descriptor set declares (served, health).
    services: Vec<String>,
    tables: Vec<String>,
    common: CommonConfig,
    storage: StorageConfig,
    metering: Metering,
    /// `TENANTMESH_ADVERTISE_URL`: where others reach it (the catalog's
    /// endpoint); default `http://<the address it listens on>`.
    advertise: Option<String>,
    /// `TENANTMESH_SILO_TENANT`: this instance serves that silo tenant alone.
    silo_tenant: Option<String>,
    /// `TENANTMESH_SILO_INSTANCES`: the deployment starts an instance per
    /// silo tenant (the shared instance forwards to them).
    silo_instances: bool,
    /// `TENANTMESH_SERVICE_IMAGE` and `TENANTMESH_SERVICE_COMMAND`: what a
    /// deployment that starts silo instances from the registration (GitOps
    /// on Kubernetes) runs.
    image: String,
    command: Vec<String>,
}

/// Where and how often the service's calls' usage goes, and how often its
/// tenants' stored bytes are sampled.
#[derive(Debug, Clone)]
struct Metering {
    url: String,
    flush: Duration,
    storage_sample: Duration,
}

impl Metering {
    fn from_env(env: &HashMap<String, String>) -> Result<Self, AppError> {
        Ok(Self {
            url: config::url_var(env, "TENANTMESH_METERING_URL", config::DATA_PORT)?,
            flush: config::metering_flush(env)?,
            storage_sample: config::storage_sample(env)?,
        })
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("name", &self.name).field("tables", &self.tables).finish_non_exhaustive()
    }
}

/// What a service's handlers are built from (see [`App::serve`]).
#[derive(Debug)]
pub struct Context {
    tables: Tables,
}

impl Context {
    /// The service's tables, each seen by a call as its tenant's.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }
}

fn check_name(what: &str, name: &str) -> Result<(), AppError> {
    use tenantmesh_service::ids::{MAX_SERVICE_NAME_LEN, valid_service_name};
    if valid_service_name(name) {
        Ok(())
    } else {
        Err(AppError::Name(format!(
            "{what} {name:?}: 1-{MAX_SERVICE_NAME_LEN} of a-z, 0-9 and -, starting with a letter"
        )))
    }
}

/// The full names of the gRPC services a descriptor set declares.
fn services_of(descriptor_set: &[u8]) -> Result<Vec<String>, PolicyError> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)
        .map_err(|e| PolicyError(vec![format!("the descriptor set does not decode: {e}")]))?;
    Ok(set.file.iter().flat_map(|f| f.service.iter().map(move |s| format!("{}.{}", f.package(), s.name()))).collect())
}

impl App {
    /// The service `name` (1-40 of a-z, 0-9 and -: its telemetry's
    /// `service.name` and its tables' prefix), serving the gRPC services of
    /// `descriptor_set` (compiled with their imports). Every RPC there must
    /// declare its policy: otherwise [`AppError::Policies`] names each
    /// one. Settings are the defaults until [`App::configure`].
    pub fn new(name: &str, descriptor_set: &'static [u8]) -> Result<Self, AppError> {
        check_name("service name", name)?;
        let services = services_of(descriptor_set)?;
        if services.is_empty() {
            return Err(PolicyError(vec!["the descriptor set declares no gRPC service".into()]).into());
        }
        Policies::from_descriptor_sets(&[descriptor_set])?;
        let env = HashMap::new();
        Ok(Self {
            name: name.to_owned(),
            descriptor_set,
            services,
            tables: Vec::new(),
            common: CommonConfig::from_env(&env, DEFAULT_PORT)?,
            storage: StorageConfig::from_env(&env)?,
            metering: Metering::from_env(&env)?,
            advertise: None,
            silo_tenant: None,
            silo_instances: false,
            image: String::new(),
            command: Vec::new(),
        })
    }

    /// Declares the table `name` (1-40 of a-z, 0-9 and -): one table in the
    /// store (`<data dir>/<service>-<name>.redb`, or the DynamoDB table
    /// `<prefix><service>-<name>`) holding every tenant's items, each
    /// tenant confined to its own (see [`crate::Tables`]).
    pub fn table(mut self, name: &str) -> Result<Self, AppError> {
        check_name("table name", name)?;
        if self.tables.iter().any(|t| t == name) {
            return Err(AppError::Name(format!("table {name:?} is declared twice")));
        }
        self.tables.push(name.to_owned());
        Ok(self)
    }

    /// Reads the settings from `env`, as the mesh's services do:
    /// `TENANTMESH_LISTEN_ADDR` (default `127.0.0.1:50060`),
    /// `TENANTMESH_DATA_DIR`, `TENANTMESH_AUTH_URL`,
    /// `TENANTMESH_REGISTRY_URL`, the token issuer and audience, the tiers
    /// file, the service's own identity
    /// (`TENANTMESH_SERVICE_CLIENT_ID`/`_SECRET`, granted `directory` to
    /// learn of tenant changes at once, `metering_writer` to record its
    /// calls' usage and `catalog` to register itself; the client id is the
    /// service's name), where usage goes (`TENANTMESH_METERING_URL`, the data
    /// service by default; every `TENANTMESH_METERING_FLUSH_MS`, default
    /// 10000), where others reach it (`TENANTMESH_ADVERTISE_URL`, for the
    /// service catalog; default the address it listens on), whether it is
    /// one silo tenant's instance (`TENANTMESH_SILO_TENANT`) or a shared
    /// instance whose deployment starts such instances
    /// (`TENANTMESH_SILO_INSTANCES=true`; on Kubernetes the onboarding
    /// service starts them from the image and command the service registers,
    /// `TENANTMESH_SERVICE_IMAGE` and `TENANTMESH_SERVICE_COMMAND`, words
    /// split on spaces), and the store (`TENANTMESH_STORAGE`,
    /// `TENANTMESH_TABLE_PREFIX`, the AWS settings).
    pub fn configure(mut self, env: &HashMap<String, String>) -> Result<Self, AppError> {
        self.common = CommonConfig::from_env(env, DEFAULT_PORT)?;
        self.storage = StorageConfig::from_env(env)?;
        self.metering = Metering::from_env(env)?;
        self.advertise = match config::var(env, "TENANTMESH_ADVERTISE_URL") {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url.to_owned()),
            Some(_) => {
                return Err(config::ConfigError {
                    var: "TENANTMESH_ADVERTISE_URL",
                    message: "must be an http:// or https:// URL".into(),
                }
                .into());
            }
            None => None,
        };
        self.silo_tenant = match config::var(env, "TENANTMESH_SILO_TENANT") {
            Some(t) if tenantmesh_service::validate_tenant_id(t).is_ok() => Some(t.to_owned()),
            Some(_) => {
                return Err(config::ConfigError {
                    var: "TENANTMESH_SILO_TENANT",
                    message: "must be a tenant id (^[a-z0-9][a-z0-9-]{2,62}$)".into(),
                }
                .into());
            }
            None => None,
        };
        self.silo_instances = config::parse_var(env, "TENANTMESH_SILO_INSTANCES", false)?;
        self.image = config::var(env, "TENANTMESH_SERVICE_IMAGE").unwrap_or_default().to_owned();
        if self.image.contains(char::is_whitespace) {
            return Err(config::ConfigError {
                var: "TENANTMESH_SERVICE_IMAGE",
                message: "must be a container image reference (no spaces)".into(),
            }
            .into());
        }
        self.command = config::var(env, "TENANTMESH_SERVICE_COMMAND")
            .map(|c| c.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if self.image.is_empty() && !self.command.is_empty() {
            return Err(config::ConfigError {
                var: "TENANTMESH_SERVICE_COMMAND",
                message: "is the command in TENANTMESH_SERVICE_IMAGE: set the image too".into(),
            }
            .into());
        }
        Ok(self)
    }

    /// Where the service listens (`TENANTMESH_LISTEN_ADDR`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.common.listen_addr
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves on `listener` until `shutdown` completes, then drains
    /// in-flight calls for the grace period. `routes` builds the service's
    /// generated servers from the [`Context`]; health, reflection and
    /// backup are added, and every call passes the mesh's layers first.
    pub async fn serve<F>(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        routes: F,
    ) -> Result<(), AppError>
    where
        F: FnOnce(&Context) -> Result<Routes, AppError>,
    {
        let named = Service::new(self.name.clone());
        Service::run(named.clone(), async move {
            let policies =
                Policies::from_descriptor_sets(&[tenantmesh_proto::FILE_DESCRIPTOR_SET, self.descriptor_set])?;
            let tokens = self.common.service_client.clone().map(|credentials| {
                client::channel(&self.common.auth_url).map(|auth| Arc::new(ServiceTokenSource::new(auth, credentials)))
            });
            let tokens = tokens.transpose()?;
            let meters = match &tokens {
                // The shared instance counts a silo tenant's calls, once, as it forwards them.
                Some(_) if self.silo_tenant.is_some() => None,
                Some(tokens) => Some(self.meters(&policies, tokens)?),
                None => {
                    tracing::warn!(
                        "no service identity (TENANTMESH_SERVICE_CLIENT_ID/_SECRET): this service's calls are not \
                         metered, and it is not registered in the service catalog"
                    );
                    None
                }
            };
            let mut authn = Authenticator::remote(&self.common)?.with_policies(Arc::new(policies));
            let shares = crate::replicas::rate_shares(&self.storage, &self.common, &self.name, self.silo_tenant.is_some())
                .await
                .map_err(|e| AppError::Storage(format!("the replicas' leases: {e}")))?;
            if let Some(shares) = shares {
                authn = authn.with_rate_shares(shares);
            }
            let mut tables = Tables::new(&self.name, &self.storage.table_prefix, self.common.tiers.clone());
            for table in &self.tables {
                let pooled = format!("{}-{table}", self.name);
                let stores = self
                    .storage
                    .tenant_stores(&self.common, &pooled)
                    .await
                    .map_err(|e| AppError::Storage(format!("table {table}: {e}")))?;
                tables.add(table, stores);
            }
            let mode = match &self.silo_tenant {
                Some(tenant) => {
                    tracing::info!(silo_tenant = %tenant, "an instance of one silo tenant: it serves that tenant alone");
                    Mode::Silo { tenant: tenant.as_str().into() }
                }
                None => Mode::Shared {
                    resolve: Resolve::Catalog(Default::default()),
                    forwarded: self.services.iter().map(|s| format!("/{s}/")).collect(),
                },
            };
            let lifecycle = TenantLifecycleServer::new(Lifecycle::new(tables.clone()));
            let upkeep_tables = tables.clone();
            let routes = routes(&Context { tables })?;
            let embedded = self.storage.backend == Backend::Embedded;
            let routes = routes
                .add_service(tenantmesh_service::backup::server(self.common.data_dir.clone(), embedded))
                .add_service(tenantmesh_service::sized!(lifecycle));
            let mut names: Vec<&str> = self.services.iter().map(String::as_str).collect();
            names.extend([tenantmesh_service::backup::NAME, LIFECYCLE]);
            tracing::info!(tables = ?self.tables, "application service starting");
            // Background work that ends with serving: registering, upkeep.
            let background = match &tokens {
                Some(tokens) => {
                    let registering = self.register(self.registration(listener.local_addr().ok()), tokens)?;
                    let upkeep = crate::upkeep::Upkeep {
                        tables: upkeep_tables,
                        registry: TenantRegistryClient::new(self.with_identity(&self.common.registry_url, tokens)?),
                        metering: MeteringClient::new(self.with_identity(&self.metering.url, tokens)?),
                        interval: self.metering.storage_sample,
                        silo_tenant: self.silo_tenant.clone(),
                        instances: match &mode {
                            Mode::Shared { resolve: Resolve::Catalog(instances), .. } => Some(instances.clone()),
                            _ => None,
                        },
                    };
                    let mut tasks = vec![registering, upkeep.start()];
                    if let Mode::Shared { resolve: Resolve::Catalog(instances), .. } = &mode {
                        let registry = TenantRegistryClient::new(self.with_identity(&self.common.registry_url, tokens)?);
                        tasks.push(instances.watch(self.name.clone(), registry));
                    }
                    tasks
                }
                None => {
                    tracing::warn!("without a service identity, the tables' stored bytes are not metered and their change history is not trimmed");
                    Vec::new()
                }
            };
            let served = tenantmesh_service::runtime::serve_routes(
                listener,
                routes,
                &names,
                &[self.descriptor_set],
                tower::ServiceBuilder::new()
                    .layer(server::stack(named, authn, meters.clone())?)
                    .layer(SiloLayer(mode)),
                self.common.shutdown_grace,
                shutdown,
            )
            .await;
            tenantmesh_service::runtime::end_tasks(background).await;
            // Whatever the outcome, what was counted is sent.
            if let Some(meters) = meters {
                match meters.shutdown().await {
                    Ok(()) => tracing::info!("usage flushed"),
                    Err(e) => tracing::error!(error = %e, "usage counted since the last flush is lost"),
                }
            }
            served?;
            Ok(())
        })
        .await
    }
}

impl App {
    /// A channel to `url` whose calls carry the service's own identity.
    fn with_identity(
        &self,
        url: &str,
        tokens: &Arc<ServiceTokenSource>,
    ) -> Result<client::PropagatedChannel, AppError> {
        Ok(client::wrap(client::channel(url)?, Identity::Service(tokens.clone())))
    }

    /// The meters of the service's calls, flushing to the metering service
    /// with the service's identity (`tokens`).
    fn meters(&self, policies: &Policies, tokens: &Arc<ServiceTokenSource>) -> Result<Arc<Meters>, AppError> {
        let sink = crate::metering::RecordUsage {
            service: self.name.clone(),
            client: tenantmesh_service::sized!(MeteringClient::new(self.with_identity(&self.metering.url, tokens)?)),
        };
        let meters = Arc::new(Meters::with_sink(sink, policies.metered(), self.metering.flush));
        meters.start();
        tracing::info!(
            replica = %meters.replica(),
            to = %self.metering.url,
            flush_ms = self.metering.flush.as_millis() as u64,
            "metering this service's calls"
        );
        Ok(meters)
    }

    /// What the catalog is told of this service, served at `addr`.
    fn registration(&self, addr: Option<SocketAddr>) -> ApplicationService {
        let endpoint = match (&self.advertise, addr) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => format!("http://{}", self.common.listen_addr),
        };
        ApplicationService {
            name: self.name.clone(),
            endpoint,
            grpc_services: self.services.iter().cloned().chain([LIFECYCLE.to_owned()]).collect(),
            tables: self.tables.clone(),
            silo_instances: self.silo_instances,
            silo_tenant: self.silo_tenant.clone().unwrap_or_default(),
            image: self.image.clone(),
            command: self.command.clone(),
            ..Default::default()
        }
    }

    /// Registers the service in the registry's catalog, with its own
    /// identity, retrying (1 s, doubling to 30 s) until the registry
    /// answers; a refusal that retrying cannot change is logged and ends it.
    fn register(
        &self,
        service: ApplicationService,
        tokens: &Arc<ServiceTokenSource>,
    ) -> Result<tokio::task::JoinHandle<()>, AppError> {
        let channel = self.with_identity(&self.common.registry_url, tokens)?;
        let mut registry = tenantmesh_service::sized!(TenantRegistryClient::new(channel));
        Ok(tenantmesh_telemetry::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let request = RegisterServiceRequest { service: Some(service.clone()) };
                match registry.register_service(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let version = r.service.map_or(0, |s| s.version);
                        tracing::info!(endpoint = %service.endpoint, version, changed = r.changed, "registered in the service catalog");
                        return;
                    }
                    Err(s)
                        if matches!(
                            s.code(),
                            Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated
                        ) =>
                    {
                        tracing::error!(code = ?s.code(), error = %s.message(), "the service catalog refused this service's registration");
                        return;
                    }
                    Err(s) => {
                        tracing::warn!(code = ?s.code(), error = %s.message(), retry_ms = backoff.as_millis() as u64, "registering in the service catalog failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_declarations_are_checked_before_serving() {
        let set = tenantmesh_proto::FILE_DESCRIPTOR_SET;
        for bad in ["", "Orders", "9lives", "a_b", &"x".repeat(41)] {
            let err = App::new(bad, set).unwrap_err();
            assert!(matches!(err, AppError::Name(_)), "{bad:?}: {err}");
        }
        let app = App::new("orders", set).unwrap().table("orders").unwrap();
        assert!(app.services.iter().any(|s| s == "tenantmesh.data.v1.Data"), "{:?}", app.services);
        let twice = app.table("orders").unwrap_err();
        assert!(twice.to_string().contains("declared twice"), "{twice}");
        let garbage = App::new("orders", b"\xff\xff").unwrap_err();
        assert!(matches!(garbage, AppError::Policies(_)), "{garbage}");
        let env = HashMap::from([("TENANTMESH_LISTEN_ADDR".to_owned(), "nowhere".to_owned())]);
        let refused = App::new("orders", set).unwrap().configure(&env).unwrap_err();
        assert!(refused.to_string().contains("TENANTMESH_LISTEN_ADDR"), "{refused}");
        let env = HashMap::from([("TENANTMESH_SILO_TENANT".to_owned(), "Not A Tenant".to_owned())]);
        let refused = App::new("orders", set).unwrap().configure(&env).unwrap_err();
        assert!(refused.to_string().contains("TENANTMESH_SILO_TENANT"), "{refused}");
        let env = HashMap::from([("TENANTMESH_SILO_TENANT".to_owned(), "acme".to_owned())]);
        let silo = App::new("orders", set).unwrap().configure(&env).unwrap();
        assert_eq!(silo.registration(None).silo_tenant, "acme", "it registers as acme's instance");
        let env = HashMap::from([("TENANTMESH_SERVICE_COMMAND".to_owned(), "tenantmesh-orders".to_owned())]);
        let refused = App::new("orders", set).unwrap().configure(&env).unwrap_err();
        assert!(refused.to_string().contains("TENANTMESH_SERVICE_COMMAND"), "{refused}");
        let env = HashMap::from([
            ("TENANTMESH_SERVICE_IMAGE".to_owned(), "registry.example/shop:2".to_owned()),
            ("TENANTMESH_SERVICE_COMMAND".to_owned(), " tenantmesh-orders  --quiet ".to_owned()),
        ]);
        let imaged = App::new("orders", set).unwrap().configure(&env).unwrap().registration(None);
        assert_eq!(
            (imaged.image.as_str(), imaged.command.as_slice()),
            ("registry.example/shop:2", &["tenantmesh-orders".to_owned(), "--quiet".to_owned()][..])
        );
    }
}
