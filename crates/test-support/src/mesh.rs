//! The whole mesh in-process for a test: its settings, backend, state kept
//! across restarts, typed clients and tenant onboarding.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tenantmesh_cli::{Mesh, MeshAddrs, MeshOptions};
use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{CreateUserRequest, IssueServiceTokenRequest, LoginRequest, Role};
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::onboarding::v1::RegisterTenantRequest;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tonic::Status;
use tonic::transport::Channel;

use crate::moto;
use crate::requests::authed;

/// The bootstrap admin password every test mesh uses.
pub const ADMIN_PASSWORD: &str = "platform-admin-password";
pub const ADMIN_EMAIL: &str = "admin@platform.local";
/// A service client registered with every test mesh, granted every scope.
pub const TEST_CLIENT_ID: &str = "tests";
pub const TEST_CLIENT_SECRET: &str = "tests-client-secret-0123456789";
/// Service clients registered with every test mesh (secret
/// [`TEST_CLIENT_SECRET`]) with one grant each: a scope, none, or a scope
/// confined to tenant `confined-a`.
pub const SCOPED_CLIENTS: &[(&str, &str)] = &[
    ("tests-no-scope", ""),
    ("tests-directory", "directory"),
    ("tests-lifecycle", "lifecycle"),
    ("tests-data-plane", "data_plane"),
    ("tests-metering-writer", "metering_writer"),
    ("tests-usage-reader", "usage_reader"),
    ("tests-confined-writer", "metering_writer@confined-a"),
    ("tests-catalog", "catalog"),
];

/// Application services' own identities in a test mesh (client id = the
/// service's name, [`TEST_CLIENT_SECRET`]), granted what an application
/// needs: `directory+metering_writer+catalog`.
pub const APPLICATION_CLIENTS: &[&str] = &["orders"];

/// `TENANTMESH_SERVICE_CLIENTS` of a test mesh.
fn test_clients() -> String {
    let all = tenantmesh_tenant_context::Scope::ALL.map(|s| s.as_str()).join("+");
    std::iter::once(format!("{TEST_CLIENT_ID}:{TEST_CLIENT_SECRET}:{all}"))
        .chain(SCOPED_CLIENTS.iter().map(|(id, grant)| match *grant {
            "" => format!("{id}:{TEST_CLIENT_SECRET}"),
            grant => format!("{id}:{TEST_CLIENT_SECRET}:{grant}"),
        }))
        .chain(
            APPLICATION_CLIENTS.iter().map(|id| format!("{id}:{TEST_CLIENT_SECRET}:directory+metering_writer+catalog")),
        )
        .collect::<Vec<_>>()
        .join(",")
}

/// A tenant id no other test uses: `<prefix>-<8 random hex>`.
pub fn unique_tenant(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The tiers of a test mesh: the built-in tiers (same names and models)
/// with rates and concurrency raised far above what a suite sends, so the
/// limits layer runs on every request of every suite without refusing any;
/// tests of the limits lower one tenant's through SetTenantLimits. Written
/// once per process under `target/`.
pub fn test_tiers_file() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let raise = |line: &str| -> String {
            for (key, factor) in [("requests_per_second", 10_000u64), ("burst", 10_000), ("max_concurrency", 1_000)] {
                if let Some(n) = line.strip_prefix(key).and_then(|r| r.trim().strip_prefix('=')) {
                    let n: u64 = n.trim().parse().expect("a number in the tiers file");
                    return format!("{key} = {}", n * factor);
                }
            }
            line.to_owned()
        };
        let text: Vec<String> = tenantmesh_service::tiers::DEFAULT_TIERS_TOML.lines().map(raise).collect();
        let dir = crate::tools::workspace_root().join("target/test-tiers");
        std::fs::create_dir_all(&dir).expect("target/test-tiers");
        let path = dir.join("tiers.toml");
        // Another test process may be writing the same content: swap it in whole.
        let tmp = dir.join(format!("tiers.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text.join("\n")).expect("write the test tiers");
        std::fs::rename(&tmp, &path).expect("install the test tiers");
        path
    })
    .clone()
}

/// Settings of a test mesh: cheap argon2 (tests measure behaviour, not
/// hashing cost), a known admin password and test client, a short tenant
/// cache so status changes show within a poll, usage flushed every
/// second, tiers with high limits
/// ([`test_tiers_file`]), identity providers allowed on loopback, and the
/// overload actions off.
pub fn test_env() -> HashMap<String, String> {
    let tiers = test_tiers_file().display().to_string();
    [
        ("TENANTMESH_TIERS_FILE", tiers.as_str()),
        ("TENANTMESH_BOOTSTRAP_PASSWORD", ADMIN_PASSWORD),
        ("TENANTMESH_ARGON2_M_KIB", "1024"),
        ("TENANTMESH_ARGON2_T", "1"),
        ("TENANTMESH_SERVICE_CLIENTS", &test_clients()),
        ("TENANTMESH_TENANT_CACHE_TTL_MS", "100"),
        ("TENANTMESH_STEP_BACKOFF_MS", "20"),
        // An application service registered late catches up within a second.
        ("TENANTMESH_CATCH_UP_MS", "300"),
        // Usage shows within a second or two.
        ("TENANTMESH_METERING_FLUSH_MS", "1000"),
        // The tests' identity providers serve on loopback.
        ("TENANTMESH_JWKS_ALLOW_PRIVATE", "true"),
        // Whether the process is short of CPU is not measured: tests share
        // a busy machine, where the verdict would be a coin toss. The
        // tests of the overload actions set it `on`.
        ("TENANTMESH_OVERLOAD", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A tenant onboarded for a test, with its admin's token.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub tenant_id: String,
    pub admin_email: String,
    pub admin_password: String,
    pub token: String,
}

/// The storage backend a test mesh runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    Embedded,
    /// DynamoDB and STS on a moto emulator owned by the mesh.
    DynamoDb,
}

impl TestBackend {
    /// `TENANTMESH_TEST_STORAGE` (`embedded`, the default, or `dynamodb`):
    /// `cargo xtask test` runs the mesh suites once with each.
    pub fn from_env() -> Self {
        match std::env::var("TENANTMESH_TEST_STORAGE").as_deref() {
            Ok("dynamodb") => TestBackend::DynamoDb,
            Ok("embedded") | Ok("") | Err(_) => TestBackend::Embedded,
            Ok(other) => panic!("TENANTMESH_TEST_STORAGE={other:?}: use embedded or dynamodb"),
        }
    }
}

/// What outlives a mesh between a stop and a start: its data directory and,
/// on DynamoDB, its emulator.
pub struct MeshState {
    dir: tempfile::TempDir,
    moto: Option<std::sync::Arc<moto::Moto>>,
    env: HashMap<String, String>,
}

impl MeshState {
    /// A setting as the next start will see it.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// A fresh temp dir (and emulator, on DynamoDB) with the test settings,
    /// to adjust with [`MeshState::set_env`] before [`TestMesh::start_on`].
    pub fn new(backend: TestBackend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut env = test_env();
        env.insert("TENANTMESH_DATA_DIR".into(), dir.path().join("data").display().to_string());
        let moto = (backend == TestBackend::DynamoDb).then(|| std::sync::Arc::new(moto::Moto::start()));
        if let Some(m) = &moto {
            env.extend(m.env());
            env.insert("TENANTMESH_STORAGE".into(), "dynamodb".into());
        }
        Self { dir, moto, env }
    }

    /// The services' data directory (holds redb files on the embedded backend).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Sets (or, with `None`, removes) a setting for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.env.insert(key.to_owned(), v.to_owned()),
            None => self.env.remove(key),
        };
    }

    /// The full table name of `name` on this mesh's backend (prefix included).
    pub fn table_name(&self, name: &str) -> String {
        tenantmesh_isolation::backend::StorageConfig::from_env(&self.env).expect("storage config").table_name(name)
    }

    /// A service's own table (`registry`, `auth`, `onboarding`, `data`) on
    /// the mesh's backend; on the embedded backend the mesh must be stopped.
    pub async fn table(&self, name: &str) -> tenantmesh_storage::DynTable {
        let storage = tenantmesh_isolation::backend::StorageConfig::from_env(&self.env).expect("storage config");
        let common = tenantmesh_service::config::CommonConfig::from_env(&self.env, 0).expect("config");
        storage.open_table(&common, name).await.expect("table opens")
    }

    async fn start(&self) -> Mesh {
        let mut options = MeshOptions::ephemeral(self.dir.path().join("data"));
        options.env = self.env.clone();
        // As `tenantmesh up` reads it: the example application service too.
        if self.env.get("TENANTMESH_NO_EXAMPLE").is_some_and(|v| v == "false") {
            options.example = Some(0);
        }
        Box::pin(Mesh::start(options)).await.expect("mesh starts")
    }
}

/// A service of a test mesh started again as a process of its own: a
/// replica. Killed on drop; its log is `<mesh temp dir>/<service>-<port>.log`.
pub struct ServiceProcess {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl ServiceProcess {
    /// A lazy channel to the process.
    pub fn channel(&self) -> Channel {
        TestMesh::channel(self.addr)
    }

    /// Stops the process gracefully (SIGTERM) and waits (up to 30 s) for
    /// it to exit; panics unless it exits with success.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the replica") {
                assert!(status.success(), "the replica exited with {status}");
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the replica did not stop within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole mesh, in-process, on ephemeral loopback ports, in a temp dir,
/// on the backend `TENANTMESH_TEST_STORAGE` names.
pub struct TestMesh {
    mesh: Option<Mesh>,
    pub addrs: MeshAddrs,
    state: MeshState,
}

impl TestMesh {
    /// Starts a mesh in a fresh temp dir (and emulator, for DynamoDB).
    pub async fn start() -> TestMesh {
        Self::start_with(TestBackend::from_env()).await
    }

    /// Starts a mesh on `backend`, whatever the environment says.
    pub async fn start_with(backend: TestBackend) -> TestMesh {
        Self::start_on(MeshState::new(backend)).await
    }

    /// Starts a mesh on `backend` with some settings overridden.
    pub async fn start_with_env(backend: TestBackend, settings: &[(&str, &str)]) -> TestMesh {
        let mut state = MeshState::new(backend);
        state.env.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Self::start_on(state).await
    }

    /// Starts a mesh on the state a stopped one left.
    pub async fn start_on(state: MeshState) -> TestMesh {
        let mesh = state.start().await;
        TestMesh { addrs: mesh.addrs, mesh: Some(mesh), state }
    }

    /// The settings of an application service `name` joining this mesh:
    /// the mesh's URLs, tiers and store (its emulator on DynamoDB), its own
    /// data directory and identity, usage flushed every second.
    pub fn app_env(&self, name: &str) -> HashMap<String, String> {
        let mut env = self.state.env.clone();
        let dir = self.state.dir.path().join("apps").join(name);
        env.insert("TENANTMESH_DATA_DIR".into(), dir.display().to_string());
        env.insert("TENANTMESH_LISTEN_ADDR".into(), "127.0.0.1:0".into());
        env.insert("TENANTMESH_AUTH_URL".into(), format!("http://{}", self.addrs.auth));
        env.insert("TENANTMESH_REGISTRY_URL".into(), format!("http://{}", self.addrs.registry));
        env.insert("TENANTMESH_DATA_URL".into(), format!("http://{}", self.addrs.data));
        env.insert("TENANTMESH_METERING_URL".into(), format!("http://{}", self.addrs.data));
        // Its own identity (one of APPLICATION_CLIENTS).
        env.insert("TENANTMESH_SERVICE_CLIENT_ID".into(), name.into());
        env.insert("TENANTMESH_SERVICE_CLIENT_SECRET".into(), TEST_CLIENT_SECRET.into());
        env
    }

    /// The running mesh's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.state.data_dir()
    }

    pub fn backend(&self) -> TestBackend {
        if self.state.moto.is_some() { TestBackend::DynamoDb } else { TestBackend::Embedded }
    }

    /// Stops the mesh gracefully and starts it again on the same data
    /// (new ports).
    pub async fn restart(&mut self) {
        self.mesh.take().expect("running").shutdown().await.expect("clean shutdown");
        let mesh = self.state.start().await;
        self.addrs = mesh.addrs;
        self.mesh = Some(mesh);
    }

    /// Stops the mesh; panics if any service failed.
    pub async fn shutdown(mut self) {
        self.mesh.take().expect("running").shutdown().await.expect("clean shutdown");
    }

    /// The auth service's current signing key (kid and key), to mint tokens
    /// with arbitrary claims. Stops and restarts the mesh (new ports) to read
    /// it from the auth store, on either backend.
    pub async fn signing_key(&mut self) -> (String, jsonwebtoken::EncodingKey) {
        self.mesh.take().expect("running").shutdown().await.expect("clean shutdown");
        let key = {
            let store = self.state.table("auth").await;
            tenantmesh_auth::SigningKeys::load_or_create(&store).await.expect("signing keys").signer()
        };
        let mesh = self.state.start().await;
        self.addrs = mesh.addrs;
        self.mesh = Some(mesh);
        key
    }

    /// Stops the mesh and keeps its data, to inspect or to start on again.
    pub async fn stop(mut self) -> MeshState {
        self.mesh.take().expect("running").shutdown().await.expect("clean shutdown");
        self.state
    }

    /// Starts `tenantmesh-<service>` (built by `cargo build --bins`) as a
    /// process on a free loopback port, with this mesh's settings (backend,
    /// data dir, the registry and auth it calls) plus `extra`, and waits
    /// until it serves.
    pub async fn spawn_replica(&self, service: &'static str, extra: &[(&str, &str)]) -> ServiceProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let log = self.state.dir.path().join(format!("{service}-{port}.log"));
        let child = std::process::Command::new(crate::tools::service_binary(&format!("tenantmesh-{service}")))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.state.env)
            .env("TENANTMESH_DATA_DIR", self.state.data_dir())
            .env("TENANTMESH_REGISTRY_URL", format!("http://{}", self.addrs.registry))
            .env("TENANTMESH_AUTH_URL", format!("http://{}", self.addrs.auth))
            .env("TENANTMESH_ONBOARDING_URL", format!("http://{}", self.addrs.onboarding))
            .env("TENANTMESH_LISTEN_ADDR", addr.to_string())
            .envs(extra.iter().copied())
            .stdout(std::fs::File::create(&log).expect("replica log"))
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("replica starts");
        let process = ServiceProcess { child, addr };
        tenantmesh_cli::wait_serving(service, addr).await.expect("replica serves");
        process
    }

    /// A lazy channel to `addr`.
    pub fn channel(addr: std::net::SocketAddr) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy()
    }

    pub fn registry(&self) -> TenantRegistryClient<Channel> {
        TenantRegistryClient::new(Self::channel(self.addrs.registry))
    }
    pub fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(Self::channel(self.addrs.auth))
    }
    pub fn onboarding(&self) -> OnboardingClient<Channel> {
        OnboardingClient::new(Self::channel(self.addrs.onboarding))
    }
    pub fn data(&self) -> DataClient<Channel> {
        DataClient::new(Self::channel(self.addrs.data))
    }
    /// The metering service (hosted by the data service).
    pub fn metering(&self) -> tenantmesh_proto::metering::v1::metering_client::MeteringClient<Channel> {
        tenantmesh_proto::metering::v1::metering_client::MeteringClient::new(Self::channel(self.addrs.data))
    }
    /// The full table name of `name` on this mesh's backend.
    pub fn state_table_name(&self, name: &str) -> String {
        self.state.table_name(name)
    }

    /// A service's own table while the mesh runs: on the embedded backend
    /// through the handle this process has open (tests write to it as the
    /// service would).
    pub async fn running_table(&self, name: &str) -> tenantmesh_storage::DynTable {
        self.state.table(name).await
    }
    pub fn data_admin(&self) -> tenantmesh_proto::data::v1::data_admin_client::DataAdminClient<Channel> {
        tenantmesh_proto::data::v1::data_admin_client::DataAdminClient::new(Self::channel(self.addrs.data))
    }

    /// Logs in and returns the access token.
    pub async fn login(&self, tenant_id: &str, email: &str, password: &str) -> Result<String, Status> {
        let resp = self
            .auth()
            .login(LoginRequest { tenant_id: tenant_id.into(), email: email.into(), password: password.into() })
            .await?;
        Ok(resp.into_inner().access_token)
    }

    /// The platform admin's token.
    pub async fn admin_token(&self) -> String {
        self.login("platform", ADMIN_EMAIL, ADMIN_PASSWORD).await.expect("platform admin logs in")
    }

    /// A `service` token of the test client (every scope).
    pub async fn service_token(&self) -> String {
        self.service_token_as(TEST_CLIENT_ID).await
    }

    /// A `service` token of one of the test mesh's clients
    /// ([`TEST_CLIENT_ID`] or one of [`SCOPED_CLIENTS`]).
    pub async fn service_token_as(&self, client_id: &str) -> String {
        self.auth()
            .issue_service_token(IssueServiceTokenRequest {
                client_id: client_id.into(),
                client_secret: TEST_CLIENT_SECRET.into(),
            })
            .await
            .expect("service token")
            .into_inner()
            .access_token
    }

    /// Onboards a tenant (tier `standard`) through the onboarding service
    /// and logs its admin in.
    pub async fn onboard(&self, tenant_id: &str) -> TestTenant {
        self.onboard_on(tenant_id, "standard").await
    }

    /// Waits (up to 60 s) until workflow `id` is no longer RUNNING; its
    /// final state.
    pub async fn wait_workflow(&self, id: &str) -> tenantmesh_proto::onboarding::v1::Workflow {
        use tenantmesh_proto::onboarding::v1::{GetWorkflowRequest, WorkflowStatus};
        let admin = self.admin_token().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let req = authed(GetWorkflowRequest { workflow_id: id.into() }, &admin);
            let wf = self.onboarding().get_workflow(req).await.expect("GetWorkflow").into_inner().workflow.unwrap();
            if wf.status != WorkflowStatus::Running as i32 {
                return wf;
            }
            assert!(tokio::time::Instant::now() < deadline, "workflow {id} still running: {wf:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Onboards a tenant on `tier`, waits for the workflow to succeed and
    /// logs its admin in.
    pub async fn onboard_on(&self, tenant_id: &str, tier: &str) -> TestTenant {
        let admin = self.admin_token().await;
        let admin_email = format!("admin@{tenant_id}.example");
        let admin_password = format!("{tenant_id}-password");
        self.onboarding()
            .register_tenant(authed(
                RegisterTenantRequest {
                    tenant_id: tenant_id.into(),
                    name: format!("Tenant {tenant_id}"),
                    tier: tier.into(),
                    admin_email: admin_email.clone(),
                    admin_password: admin_password.clone(),
                    idempotency_key: format!("onboard-{tenant_id}"),
                },
                &admin,
            ))
            .await
            .expect("onboarding starts");
        let wf = self.wait_workflow(&format!("{tenant_id}/onboard")).await;
        assert_eq!(wf.status, tenantmesh_proto::onboarding::v1::WorkflowStatus::Succeeded as i32, "{wf:?}");
        let token = self.login(tenant_id, &admin_email, &admin_password).await.expect("tenant admin logs in");
        TestTenant { tenant_id: tenant_id.into(), admin_email, admin_password, token }
    }

    /// Creates a user with `roles` in `tenant` (as its admin) and returns
    /// the user's token.
    pub async fn user_token(&self, tenant: &TestTenant, roles: &[Role]) -> String {
        let email = format!("{}@{}.example", uuid::Uuid::new_v4().simple(), tenant.tenant_id);
        let password = "user-password-123".to_owned();
        self.auth()
            .create_user(authed(
                CreateUserRequest {
                    tenant_id: tenant.tenant_id.clone(),
                    email: email.clone(),
                    password: password.clone(),
                    roles: roles.iter().map(|r| *r as i32).collect(),
                    password_hash: String::new(),
                },
                &tenant.token,
            ))
            .await
            .expect("user created");
        self.login(&tenant.tenant_id, &email, &password).await.expect("user logs in")
    }
}
