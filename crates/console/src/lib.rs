//! The operator's web console: server-rendered pages (askama templates,
//! checked at compile time) over the mesh's gRPC APIs, called with the
//! signed-in user's own token, so the mesh enforces who sees what as it
//! does for any client; the console also refuses another tenant's pages
//! itself (404, never the data). Plots are inline SVG drawn here; live
//! updates come by server-sent events; each page has a JSON twin under
//! `/api/`.
//!
//! Security: the session is an HttpOnly, SameSite=Strict cookie (Secure
//! when the console's origin is https); every state-changing request is a
//! POST that must carry the session's CSRF token and an Origin header equal
//! to the console's own; tokens never appear in URLs, pages or logs; every
//! response carries a strict Content-Security-Policy (scripts and styles
//! from the console's own files only).

pub mod plot;
pub mod sessions;
pub mod views;

mod pages;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

pub use pages::router;
use sessions::Sessions;

/// Where the console finds the mesh, and how it is reached.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    pub registry: String,
    pub auth: String,
    pub onboarding: String,
    pub data: String,
    /// The console's origin as browsers reach it (e.g.
    /// `https://console.example.com`); `None`: `http://` + the request's
    /// Host. An https origin makes the session cookie Secure.
    pub origin: Option<String>,
    /// The tiers offered in the forms.
    pub tiers: Vec<String>,
    /// How many days of change history each tier keeps (how far back a
    /// restore reaches), and whether its tenants' admins may restore.
    pub history: std::collections::HashMap<String, (u32, bool)>,
    /// A session ends after this long without a request.
    pub idle: Duration,
}

impl ConsoleConfig {
    /// From the environment the services read: TENANTMESH_REGISTRY_URL,
    /// TENANTMESH_AUTH_URL, TENANTMESH_ONBOARDING_URL, TENANTMESH_DATA_URL
    /// (default: localhost's 50051-50054), TENANTMESH_CONSOLE_ORIGIN and
    /// TENANTMESH_TIERS_FILE.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, String> {
        use tenantmesh_service::config::{AUTH_PORT, DATA_PORT, ONBOARDING_PORT, REGISTRY_PORT, url_var, var};
        let url = |name, port| url_var(env, name, port).map_err(|e| e.to_string());
        let tiers = tenantmesh_service::config::tiers_var(env).map_err(|e| e.to_string())?;
        let origin = var(env, "TENANTMESH_CONSOLE_ORIGIN").map(str::to_owned);
        if let Some(o) = &origin
            && !(o.starts_with("http://") || o.starts_with("https://"))
        {
            return Err(format!("TENANTMESH_CONSOLE_ORIGIN: {o:?} is not an http:// or https:// origin"));
        }
        Ok(ConsoleConfig {
            registry: url("TENANTMESH_REGISTRY_URL", REGISTRY_PORT)?,
            auth: url("TENANTMESH_AUTH_URL", AUTH_PORT)?,
            onboarding: url("TENANTMESH_ONBOARDING_URL", ONBOARDING_PORT)?,
            data: url("TENANTMESH_DATA_URL", DATA_PORT)?,
            origin: origin.map(|o| o.trim_end_matches('/').to_owned()),
            history: tiers
                .names()
                .filter_map(|n| tiers.get(n).map(|t| (n.to_owned(), (t.history_days, t.tenant_restore))))
                .collect(),
            tiers: tiers.names().map(str::to_owned).collect(),
            idle: Duration::from_secs(8 * 3600),
        })
    }

    fn secure(&self) -> bool {
        self.origin.as_deref().is_some_and(|o| o.starts_with("https://"))
    }
}

struct Channels {
    registry: Channel,
    auth: Channel,
    onboarding: Channel,
    data: Channel,
}

/// A running console's state.
pub struct Console {
    config: ConsoleConfig,
    sessions: Sessions,
    channels: Channels,
    /// Fleet pages following the registry at once: each holds one of the
    /// registry's tenant watches, which the services need for their caches.
    fleet_watches: Arc<tokio::sync::Semaphore>,
    /// Held while a session's tokens are refreshed (see `session_by_id`).
    refreshing: tokio::sync::Mutex<()>,
}

/// Fleet pages of one console that follow the registry live at once; more
/// are told so and show the figures of their load.
pub const MAX_FLEET_WATCHES: usize = 16;

/// Default port of the console.
pub const DEFAULT_PORT: u16 = 50080;

impl Console {
    pub fn new(config: ConsoleConfig) -> Result<Arc<Self>, String> {
        let channel = |url: &str| -> Result<Channel, String> {
            Ok(tonic::transport::Endpoint::from_shared(url.to_owned())
                .map_err(|e| format!("{url}: {e}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .connect_lazy())
        };
        let channels = Channels {
            registry: channel(&config.registry)?,
            auth: channel(&config.auth)?,
            onboarding: channel(&config.onboarding)?,
            data: channel(&config.data)?,
        };
        Ok(Arc::new(Console {
            sessions: Sessions::new(config.idle, 10_000),
            config,
            channels,
            fleet_watches: Arc::new(tokio::sync::Semaphore::new(MAX_FLEET_WATCHES)),
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }
}

/// Serves the console on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(console)).with_graceful_shutdown(shutdown).await
}
