//! The whole tenantmesh mesh in one process: the four services on their own
//! listeners, wired to each other over gRPC exactly as separate processes
//! would be (and, for `tenantmesh up`, the example application service).
//! Used by `tenantmesh up` and by the test harness.

pub mod backup;
pub mod health;
pub mod ops;
pub mod report;
pub mod silos;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_isolation::backend::{ServiceConfig, open_store};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where and how to run the mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub data_dir: PathBuf,
    pub host: IpAddr,
    /// Ports of registry, auth, onboarding and data (0: any free port).
    pub ports: [u16; 4],
    /// Extra settings, as the services read them from the environment
    /// (e.g. `TENANTMESH_BOOTSTRAP_PASSWORD`); addresses and the data dir
    /// are set from the fields above.
    pub env: HashMap<String, String>,
    /// Also run the example application service (`orders`, built only on
    /// `tenantmesh-app`) on this port (0: any free port), with its own
    /// identity, registered in the service catalog.
    pub example: Option<u16>,
    /// Also serve the operator's web console on this port (0: any free
    /// port), beside the services.
    pub console: Option<u16>,
}

impl MeshOptions {
    /// Loopback, ephemeral ports, the given data dir, no extra settings.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            host: IpAddr::from([127, 0, 0, 1]),
            ports: [0; 4],
            env: HashMap::new(),
            example: None,
            console: None,
        }
    }
}

/// The addresses a running mesh listens on.
#[derive(Debug, Clone, Copy)]
pub struct MeshAddrs {
    pub registry: SocketAddr,
    pub auth: SocketAddr,
    pub onboarding: SocketAddr,
    pub data: SocketAddr,
    /// The example application service, when it runs.
    pub orders: Option<SocketAddr>,
    /// The web console, when it runs.
    pub console: Option<SocketAddr>,
}

/// A running mesh; [`Mesh::shutdown`] stops it gracefully.
pub struct Mesh {
    pub addrs: MeshAddrs,
    pub data_dir: PathBuf,
    /// `embedded` or `dynamodb`.
    pub storage: String,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, Result<(), BoxError>)>,
    /// Silo tenants' data-service instances.
    silos: Arc<silos::InProcessSilos>,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen on {addr} for {service}: {source}")]
    Bind { service: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("configuration: {0}")]
    Config(#[from] tenantmesh_service::config::ConfigError),
    #[error("{service}: {message}")]
    Service { service: &'static str, message: String },
    #[error("{service} did not become ready: {message}")]
    NotReady { service: &'static str, message: String },
}

fn random_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

async fn bind(service: &'static str, addr: SocketAddr) -> Result<TcpListener, MeshError> {
    TcpListener::bind(addr).await.map_err(|source| MeshError::Bind { service, addr, source })
}

fn addr_of(service: &'static str, l: &TcpListener) -> Result<SocketAddr, MeshError> {
    l.local_addr().map_err(|e| MeshError::Service { service, message: e.to_string() })
}

impl Mesh {
    /// Starts the four services and waits until each reports SERVING.
    pub async fn start(options: MeshOptions) -> Result<Mesh, MeshError> {
        let [rp, ap, op, dp] = options.ports;
        let host = options.host;
        let registry_l = bind("tenant-registry", SocketAddr::new(host, rp)).await?;
        let auth_l = bind("auth", SocketAddr::new(host, ap)).await?;
        let onboarding_l = bind("onboarding", SocketAddr::new(host, op)).await?;
        let data_l = bind("data", SocketAddr::new(host, dp)).await?;
        let orders_l = match options.example {
            Some(port) => Some(bind("orders", SocketAddr::new(host, port)).await?),
            None => None,
        };
        let console_l = match options.console {
            Some(port) => Some(bind("console", SocketAddr::new(host, port)).await?),
            None => None,
        };
        let addrs = MeshAddrs {
            registry: addr_of("tenant-registry", &registry_l)?,
            auth: addr_of("auth", &auth_l)?,
            onboarding: addr_of("onboarding", &onboarding_l)?,
            data: addr_of("data", &data_l)?,
            orders: orders_l.as_ref().map(|l| addr_of("orders", l)).transpose()?,
            console: console_l.as_ref().map(|l| addr_of("console", l)).transpose()?,
        };

        let mut env = options.env.clone();
        env.insert("TENANTMESH_DATA_DIR".into(), options.data_dir.display().to_string());
        env.insert("TENANTMESH_REGISTRY_URL".into(), format!("http://{}", addrs.registry));
        env.insert("TENANTMESH_AUTH_URL".into(), format!("http://{}", addrs.auth));
        env.insert("TENANTMESH_DATA_URL".into(), format!("http://{}", addrs.data));
        env.insert("TENANTMESH_ONBOARDING_URL".into(), format!("http://{}", addrs.onboarding));
        // Each service its own identity, with exactly the scopes it uses
        // (the registry needs none); the secrets live only in this process.
        // The onboarding service's may be given (TENANTMESH_SERVICE_CLIENT_ID
        // and _SECRET), for processes of it started elsewhere.
        let onboarding_id = env.remove("TENANTMESH_SERVICE_CLIENT_ID").unwrap_or_else(|| "onboarding".into());
        let onboarding_secret = env.remove("TENANTMESH_SERVICE_CLIENT_SECRET").unwrap_or_else(random_secret);
        let mut identities = vec![
            ("onboarding", onboarding_id, onboarding_secret, "lifecycle"),
            ("data", "data".to_owned(), random_secret(), "directory+data_plane"),
            ("auth", "auth".to_owned(), random_secret(), "directory+usage_reader"),
        ];
        // The example's identity, unless the settings declare one already.
        let given_orders = env.get("TENANTMESH_SERVICE_CLIENTS").and_then(|clients| {
            clients
                .split(',')
                .find_map(|c| c.strip_prefix("orders:"))
                .and_then(|rest| rest.split(':').next())
                .map(str::to_owned)
        });
        let declared_before = identities.len();
        if orders_l.is_some() {
            // What an application needs: tenant changes, recording usage, registering itself.
            let secret = given_orders.clone().unwrap_or_else(random_secret);
            identities.push(("orders", "orders".to_owned(), secret, "directory+metering_writer+catalog"));
        }
        let undeclared = if given_orders.is_some() { declared_before } else { identities.len() };
        let declared = identities[..undeclared].iter().map(|(_, id, secret, scopes)| format!("{id}:{secret}:{scopes}"));
        let clients: Vec<String> = env
            .get("TENANTMESH_SERVICE_CLIENTS")
            .filter(|c| !c.is_empty())
            .cloned()
            .into_iter()
            .chain(declared)
            .collect();
        env.insert("TENANTMESH_SERVICE_CLIENTS".into(), clients.join(","));
        let with_listen = |service: &str, addr: SocketAddr| {
            let mut e = env.clone();
            e.insert("TENANTMESH_LISTEN_ADDR".into(), addr.to_string());
            if let Some((_, id, secret, _)) = identities.iter().find(|(s, ..)| *s == service) {
                e.insert("TENANTMESH_SERVICE_CLIENT_ID".into(), id.clone());
                e.insert("TENANTMESH_SERVICE_CLIENT_SECRET".into(), secret.clone());
            }
            e
        };

        let registry_config = tenantmesh_registry::Config::from_env(&with_listen("tenant-registry", addrs.registry))?;
        let (registry, registry_store) = prepare("tenant-registry", registry_config).await?;
        let (auth, auth_store) =
            prepare("auth", tenantmesh_auth::Config::from_env(&with_listen("auth", addrs.auth))?).await?;
        let onboarding_config = tenantmesh_onboarding::Config::from_env(&with_listen("onboarding", addrs.onboarding))?;
        let (onboarding, onboarding_store) = prepare("onboarding", onboarding_config).await?;
        let data_env = with_listen("data", addrs.data);
        let data = tenantmesh_data::Config::from_env(&data_env)?;
        let data_stores = tenantmesh_data::open_store(&data)
            .await
            .map_err(|e| MeshError::Service { service: "data", message: e.to_string() })?;

        // Silo instances are data services: the data service's identity.
        let silos = Arc::new(silos::InProcessSilos::new(host, data_env, options.data_dir.clone()));
        let compute: Arc<dyn tenantmesh_onboarding::compute::SiloCompute> = silos.clone();
        let (stop, stopped) = watch::channel(false);
        let signal = move || {
            let mut rx = stopped.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = JoinSet::new();
        let mut spawn = |service: &'static str, run: BoxFuture<Result<(), BoxError>>| {
            tasks.spawn(async move { (service, run.await) });
        };
        spawn("tenant-registry", Box::pin(tenantmesh_registry::serve(registry, registry_store, registry_l, signal())));
        spawn("auth", Box::pin(tenantmesh_auth::serve(auth, auth_store, auth_l, signal())));
        let onboarding_run =
            tenantmesh_onboarding::serve(onboarding, onboarding_store, onboarding_l, Some(compute), signal());
        spawn("onboarding", Box::pin(onboarding_run));
        spawn("data", Box::pin(tenantmesh_data::serve(data, data_stores, data_l, signal())));
        if let (Some(listener), Some(addr)) = (orders_l, addrs.orders) {
            let mut orders_env = with_listen("orders", addr);
            orders_env.insert("TENANTMESH_DATA_DIR".into(), options.data_dir.join("apps/orders").display().to_string());
            orders_env.insert("TENANTMESH_METERING_URL".into(), format!("http://{}", addrs.data));
            let data_url = format!("http://{}", addrs.data);
            // Silo tenants get an instance of their own, here, with the same
            // identity, each on its own port and store.
            let (silo_env, silo_data_url) = (orders_env.clone(), data_url.clone());
            let data_dir = options.data_dir.clone();
            silos.with_app(
                "orders",
                Arc::new(move |tenant: String, listener: TcpListener, mut stop: watch::Receiver<bool>| {
                    let mut env = silo_env.clone();
                    env.insert("TENANTMESH_SILO_TENANT".into(), tenant.clone());
                    // Reached where it listens, not where the shared one is.
                    env.remove("TENANTMESH_ADVERTISE_URL");
                    let dir = data_dir.join(format!("apps/orders-{tenant}"));
                    env.insert("TENANTMESH_DATA_DIR".into(), dir.display().to_string());
                    if let Ok(addr) = listener.local_addr() {
                        env.insert("TENANTMESH_LISTEN_ADDR".into(), addr.to_string());
                    }
                    let data_url = silo_data_url.clone();
                    Box::pin(async move {
                        let app =
                            tenantmesh_orders::app().and_then(|a| a.configure(&env)).map_err(|e| e.to_string())?;
                        let shutdown = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        app.serve(listener, shutdown, move |ctx| tenantmesh_orders::routes(ctx, &data_url))
                            .await
                            .map_err(|e| e.to_string())
                    })
                }),
            );
            orders_env.insert("TENANTMESH_SILO_INSTANCES".into(), "true".into());
            let app = tenantmesh_orders::app()
                .and_then(|app| app.configure(&orders_env))
                .map_err(|e| MeshError::Service { service: "orders", message: e.to_string() })?;
            let run = app.serve(listener, signal(), move |ctx| tenantmesh_orders::routes(ctx, &data_url));
            spawn("orders", Box::pin(async move { run.await.map_err(BoxError::from) }));
        }

        if let Some(listener) = console_l {
            let config = tenantmesh_console::ConsoleConfig::from_env(&env)
                .map_err(|message| MeshError::Service { service: "console", message })?;
            let console = tenantmesh_console::Console::new(config)
                .map_err(|message| MeshError::Service { service: "console", message })?;
            let run = tenantmesh_console::serve(listener, console, signal());
            spawn("console", Box::pin(async move { run.await.map_err(BoxError::from) }));
        }

        let storage = env.get("TENANTMESH_STORAGE").cloned().unwrap_or_else(|| "embedded".into());
        let mut mesh = Mesh { addrs, data_dir: options.data_dir, storage, stop, tasks, silos };
        let mesh_silos = mesh.silos.clone();
        let ready = async {
            for (service, addr) in [
                ("tenant-registry", addrs.registry),
                ("auth", addrs.auth),
                ("onboarding", addrs.onboarding),
                ("data", addrs.data),
            ]
            .into_iter()
            .chain(addrs.orders.map(|a| ("orders", a)))
            {
                wait_serving(service, addr).await?;
            }
            let restored = mesh_silos.restore().await;
            if restored > 0 {
                tracing::info!(restored, "silo data-service instances restarted");
            }
            Ok::<(), MeshError>(())
        };
        tokio::select! {
            r = ready => match r {
                Ok(()) => Ok(mesh),
                Err(e) => {
                    let _ = mesh.shutdown().await;
                    Err(e)
                }
            },
            Some(Ok((service, result))) = mesh.tasks.join_next() => {
                let message = match result {
                    Ok(()) => "exited during start-up".to_owned(),
                    Err(e) => e.to_string(),
                };
                let _ = mesh.shutdown().await;
                Err(MeshError::Service { service, message })
            }
        }
    }

    /// Completes when any service stops on its own (which is a failure).
    pub async fn wait_for_failure(&mut self) -> MeshError {
        match self.tasks.join_next().await {
            Some(Ok((service, Ok(())))) => MeshError::Service { service, message: "stopped unexpectedly".into() },
            Some(Ok((service, Err(e)))) => MeshError::Service { service, message: e.to_string() },
            Some(Err(e)) => MeshError::Service { service: "mesh", message: e.to_string() },
            None => MeshError::Service { service: "mesh", message: "no services running".into() },
        }
    }

    /// Stops every service (health NOT_SERVING, in-flight calls drained).
    pub async fn shutdown(mut self) -> Result<(), MeshError> {
        let _ = self.stop.send(true);
        self.silos.shutdown().await;
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let err = match joined {
                Ok((_, Ok(()))) => None,
                Ok((service, Err(e))) => Some(MeshError::Service { service, message: e.to_string() }),
                Err(e) => Some(MeshError::Service { service: "mesh", message: e.to_string() }),
            };
            if first_error.is_none() {
                first_error = err;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A service's settings and its opened table.
async fn prepare<C: ServiceConfig>(
    service: &'static str,
    config: C,
) -> Result<(C, tenantmesh_storage::DynTable), MeshError> {
    let store = open_store(&config).await.map_err(|e| MeshError::Service { service, message: e.to_string() })?;
    Ok((config, store))
}

/// Polls the gRPC health check of `addr` until it answers SERVING.
pub async fn wait_serving(service: &'static str, addr: SocketAddr) -> Result<(), MeshError> {
    tenantmesh_service::health::wait(&addr.to_string(), Duration::from_secs(30), Duration::from_millis(50))
        .await
        .map_err(|message| MeshError::NotReady { service, message })
}
