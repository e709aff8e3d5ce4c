//! Silo tenants' dedicated data-service instances, run in this process
//! under `tenantmesh up`: each on its own port, recorded in
//! `<data dir>/silos.json` so it comes back on the same port (the endpoint
//! the registry records) after a restart. And silo tenants' instances of
//! the application services this process knows how to run (the example):
//! each on a port of its own, recorded in `<data dir>/app-silos.json` and
//! started again with the mesh (an instance registers where it serves).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tenantmesh_onboarding::compute::SiloCompute;
use tenantmesh_proto::registry::v1::ApplicationService;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

struct Instance {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Starts an instance of an application service for one silo tenant, on
/// a listener, until the signal: what the mesh knows of the service.
pub type AppStarter = Arc<
    dyn Fn(
            String,
            tokio::net::TcpListener,
            watch::Receiver<bool>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

pub struct InProcessSilos {
    host: IpAddr,
    env: HashMap<String, String>,
    file: PathBuf,
    running: Mutex<HashMap<String, Instance>>,
    /// Application services this process runs instances of, by name.
    apps: std::sync::Mutex<HashMap<String, AppStarter>>,
    /// Their instances, by `<service>@<tenant>`.
    app_instances: Mutex<HashMap<String, Instance>>,
    apps_file: PathBuf,
}

impl InProcessSilos {
    /// `env`: the mesh's settings (data dir, registry and auth URLs, storage).
    pub fn new(host: IpAddr, env: HashMap<String, String>, data_dir: PathBuf) -> Self {
        Self {
            host,
            env,
            file: data_dir.join("silos.json"),
            running: Mutex::new(HashMap::new()),
            apps: Default::default(),
            app_instances: Mutex::new(HashMap::new()),
            apps_file: data_dir.join("app-silos.json"),
        }
    }

    /// Runs silo instances of the application service `name` with `start`.
    pub fn with_app(&self, name: &str, start: AppStarter) {
        self.apps.lock().expect("apps lock").insert(name.to_owned(), start);
    }

    fn recorded_apps(&self) -> std::collections::BTreeSet<String> {
        std::fs::read(&self.apps_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn record_apps(&self, keys: &std::collections::BTreeSet<String>) -> Result<(), String> {
        let tmp = self.apps_file.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(keys).map_err(|e| e.to_string())?;
        tenantmesh_storage::files::write_private(&tmp, &data)
            .and_then(|()| std::fs::rename(&tmp, &self.apps_file))
            .map_err(|e| format!("{}: {e}", self.apps_file.display()))
    }

    fn recorded(&self) -> BTreeMap<String, u16> {
        std::fs::read(&self.file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn record(&self, ports: &BTreeMap<String, u16>) -> Result<(), String> {
        let tmp = self.file.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(ports).map_err(|e| e.to_string())?;
        tenantmesh_storage::files::write_private(&tmp, &data)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| format!("{}: {e}", self.file.display()))
    }

    /// Starts every recorded silo instance again; returns how many.
    pub async fn restore(&self) -> usize {
        let recorded = self.recorded();
        for tenant in recorded.keys() {
            if let Err(e) = self.provision(tenant, "").await {
                tracing::error!(silo_tenant = %tenant, error = %e, "could not restart a silo instance");
            }
        }
        let apps = self.recorded_apps();
        for key in &apps {
            let Some((service, tenant)) = key.split_once('@') else { continue };
            let entry = ApplicationService { name: service.to_owned(), ..Default::default() };
            if let Err(e) = self.provision_service(&entry, tenant, "").await {
                tracing::error!(silo_tenant = %tenant, %service, error = %e, "could not restart a silo instance");
            }
        }
        recorded.len() + apps.len()
    }

    /// Stops every instance (the mesh is shutting down); they stay recorded.
    pub async fn shutdown(&self) {
        let mut instances: Vec<Instance> = self.running.lock().await.drain().map(|(_, i)| i).collect();
        instances.extend(self.app_instances.lock().await.drain().map(|(_, i)| i));
        for i in instances {
            let _ = i.stop.send(true);
            let _ = i.task.await;
        }
    }

    fn endpoint(&self, addr: SocketAddr) -> String {
        let host = if addr.ip().is_unspecified() { IpAddr::from([127, 0, 0, 1]) } else { addr.ip() };
        format!("http://{}", SocketAddr::new(host, addr.port()))
    }
}

#[async_trait]
impl SiloCompute for InProcessSilos {
    async fn provision(&self, tenant_id: &str, _tier: &str) -> Result<String, String> {
        let mut running = self.running.lock().await;
        if let Some(i) = running.get(tenant_id) {
            return Ok(self.endpoint(i.addr));
        }
        let mut ports = self.recorded();
        let port = ports.get(tenant_id).copied().unwrap_or(0);
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.host, port))
            .await
            .map_err(|e| format!("silo instance of {tenant_id}: cannot listen on port {port}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut env = self.env.clone();
        env.insert("TENANTMESH_LISTEN_ADDR".into(), addr.to_string());
        env.insert("TENANTMESH_SILO_TENANT".into(), tenant_id.to_owned());
        let config = tenantmesh_data::Config::from_env(&env).map_err(|e| e.to_string())?;
        let stores = tenantmesh_data::open_store(&config).await.map_err(|e| e.to_string())?;
        let (stop, stopped) = watch::channel(false);
        let tenant = tenant_id.to_owned();
        let task = tokio::spawn(async move {
            let mut rx = stopped;
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = tenantmesh_data::serve(config, stores, listener, shutdown).await {
                tracing::error!(silo_tenant = %tenant, error = %e, "silo instance stopped");
            }
        });
        let (ready, poll) = (std::time::Duration::from_secs(30), std::time::Duration::from_millis(50));
        tenantmesh_service::health::wait(&addr.to_string(), ready, poll)
            .await
            .map_err(|e| format!("silo data service not ready: {e}"))?;
        ports.insert(tenant_id.to_owned(), addr.port());
        self.record(&ports)?;
        running.insert(tenant_id.to_owned(), Instance { addr, stop, task });
        tracing::info!(silo_tenant = tenant_id, %addr, "silo data-service instance running");
        Ok(self.endpoint(addr))
    }

    async fn deprovision(&self, tenant_id: &str) -> Result<(), String> {
        let instance = self.running.lock().await.remove(tenant_id);
        if let Some(i) = instance {
            let _ = i.stop.send(true);
            let _ = i.task.await;
        }
        let mut ports = self.recorded();
        if ports.remove(tenant_id).is_some() {
            self.record(&ports)?;
        }
        tracing::info!(silo_tenant = tenant_id, "silo data-service instance removed");
        Ok(())
    }

    async fn provision_service(
        &self,
        service: &ApplicationService,
        tenant_id: &str,
        _tier: &str,
    ) -> Result<Option<String>, String> {
        let service = service.name.as_str();
        let Some(start) = self.apps.lock().expect("apps lock").get(service).cloned() else { return Ok(None) };
        let key = format!("{service}@{tenant_id}");
        let mut running = self.app_instances.lock().await;
        if let Some(i) = running.get(&key) {
            return Ok(Some(self.endpoint(i.addr)));
        }
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.host, 0))
            .await
            .map_err(|e| format!("{service} instance of {tenant_id}: cannot listen: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = watch::channel(false);
        let serving = start(tenant_id.to_owned(), listener, stopped);
        let (service_name, tenant) = (service.to_owned(), tenant_id.to_owned());
        let task = tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!(silo_tenant = %tenant, service = %service_name, error = %e, "silo instance stopped");
            }
        });
        let mut keys = self.recorded_apps();
        keys.insert(key.clone());
        self.record_apps(&keys)?;
        running.insert(key, Instance { addr, stop, task });
        tracing::info!(silo_tenant = tenant_id, service, %addr, "silo instance of an application service running");
        Ok(Some(self.endpoint(addr)))
    }

    async fn deprovision_service(&self, service: &str, tenant_id: &str) -> Result<(), String> {
        let key = format!("{service}@{tenant_id}");
        let instance = self.app_instances.lock().await.remove(&key);
        if let Some(i) = instance {
            let _ = i.stop.send(true);
            let _ = i.task.await;
        }
        let mut keys = self.recorded_apps();
        if keys.remove(&key) {
            self.record_apps(&keys)?;
        }
        tracing::info!(silo_tenant = tenant_id, service, "silo instance of an application service removed");
        Ok(())
    }
}
