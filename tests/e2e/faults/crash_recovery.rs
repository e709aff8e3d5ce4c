//! Crash safety of the lifecycle workflows, with the service binaries as
//! real processes: for every step of onboarding, offboarding and a tier
//! change, the onboarding process is killed with SIGKILL right after the
//! step, once after it is persisted and once after its effect but before
//! it is recorded (held there by `TENANTMESH_FAULTS=halt-after:...` and
//! `halt-unsaved:...`), restarted without the fault, and the workflow must
//! complete with exactly
//! one tenant record, one admin user, one set of resources and (tier change)
//! every item present once. Runs on the backend `TENANTMESH_TEST_STORAGE`
//! names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tenantmesh_proto::auth::v1::auth_client::AuthClient;
use tenantmesh_proto::auth::v1::{IssueServiceTokenRequest, ListUsersRequest, LoginRequest};
use tenantmesh_proto::data::v1::data_admin_client::DataAdminClient;
use tenantmesh_proto::data::v1::data_client::DataClient;
use tenantmesh_proto::data::v1::{PutItemRequest, QueryItemsRequest};
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, ListTenantsRequest, Tenant, TenantStatus};
use tenantmesh_test_support::*;
use tonic::transport::Channel;

const ONBOARDING_SECRET: &str = "crash-test-onboarding-secret";

fn channel(port: u16) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy()
}

/// The four services as processes (plus silo data instances), killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
    ports: HashMap<&'static str, u16>,
    procs: Vec<(String, Child)>,
    admin: std::sync::OnceLock<String>,
    moto: Option<moto::Moto>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut env = test_env();
        let tests = env["TENANTMESH_SERVICE_CLIENTS"].clone();
        // One identity for every process here: the onboarding service's.
        let clients = format!("{tests},onboarding:{ONBOARDING_SECRET}:lifecycle");
        env.insert("TENANTMESH_SERVICE_CLIENTS".into(), clients);
        env.insert("TENANTMESH_SERVICE_CLIENT_ID".into(), "onboarding".into());
        env.insert("TENANTMESH_SERVICE_CLIENT_SECRET".into(), ONBOARDING_SECRET.into());
        env.insert("TENANTMESH_SHUTDOWN_GRACE_MS".into(), "500".into());
        env.insert("RUST_LOG".into(), "info".into());
        let moto = (TestBackend::from_env() == TestBackend::DynamoDb).then(moto::Moto::start);
        if let Some(m) = &moto {
            env.extend(m.env());
            env.insert("TENANTMESH_STORAGE".into(), "dynamodb".into());
        }
        let mut cluster =
            Cluster { dir, env, ports: HashMap::new(), procs: Vec::new(), admin: Default::default(), moto };
        // A port picked free may be taken by another test's process before
        // ours binds it: then pick new ones and start again.
        for attempt in 1..=3 {
            cluster.ports = ["registry", "auth", "onboarding", "data"].into_iter().map(|s| (s, free_port())).collect();
            for (var, name) in [
                ("TENANTMESH_REGISTRY_URL", "registry"),
                ("TENANTMESH_AUTH_URL", "auth"),
                ("TENANTMESH_DATA_URL", "data"),
            ] {
                cluster.env.insert(var.into(), format!("http://127.0.0.1:{}", cluster.ports[name]));
            }
            let mut started = Ok(());
            for name in ["registry", "auth", "data"] {
                let port = cluster.ports[name];
                started = cluster.try_spawn(name, name, port, &[]).await;
                if started.is_err() {
                    break;
                }
            }
            match started {
                Ok(()) => return cluster,
                Err(e) if attempt < 3 => {
                    eprintln!("cluster start {attempt}: {e}; again on other ports");
                    for (_, mut child) in cluster.procs.drain(..) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `tenantmesh-<binary>` as `name` on `port` with `extra` settings.
    async fn spawn(&mut self, name: &str, binary: &str, port: u16, extra: &[(&str, &str)]) {
        self.try_spawn(name, binary, port, extra).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts `tenantmesh-<binary>` as `name` on `port` and waits until
    /// *it* serves there: its own gRPC service's health (not whichever
    /// process holds the port), while it is alive.
    async fn try_spawn(&mut self, name: &str, binary: &str, port: u16, extra: &[(&str, &str)]) -> Result<(), String> {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
        let service = match binary {
            "registry" => tenantmesh_proto::registry::v1::tenant_registry_server::SERVICE_NAME,
            "auth" => tenantmesh_proto::auth::v1::auth_server::SERVICE_NAME,
            "onboarding" => tenantmesh_proto::onboarding::v1::onboarding_server::SERVICE_NAME,
            "orders" => tenantmesh_orders::proto::orders_server::SERVICE_NAME,
            _ => tenantmesh_proto::data::v1::data_server::SERVICE_NAME,
        };
        let mut cmd = Command::new(service_binary(&format!("tenantmesh-{binary}")));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .env("TENANTMESH_DATA_DIR", self.data_dir())
            .env("TENANTMESH_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .envs(extra.iter().copied())
            .stdout(std::fs::File::options().create(true).append(true).open(self.log(name)).unwrap())
            .stderr(Stdio::inherit());
        self.procs.push((name.to_owned(), cmd.spawn().unwrap()));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let child = &mut self.procs.last_mut().unwrap().1;
            if let Some(status) = child.try_wait().unwrap() {
                self.procs.pop();
                return Err(format!("{name} exited ({status}): port {port} taken by another process?"));
            }
            let req = HealthCheckRequest { service: service.into() };
            if let Ok(answer) = HealthClient::new(channel(port)).check(req).await
                && answer.get_ref().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{name} not serving on port {port} after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// SIGKILL (`Child::kill`) the process `name`.
    fn kill_9(&mut self, name: &str) {
        let i = self.procs.iter().position(|(n, _)| n == name).expect("running");
        let (_, mut child) = self.procs.remove(i);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "{name} was not killed: {status:?}");
    }

    async fn start_onboarding(&mut self, extra: &[(&str, &str)]) {
        let port = self.ports["onboarding"];
        self.spawn("onboarding", "onboarding", port, extra).await;
    }

    /// A dedicated data-service process for silo tenant `tenant`; its endpoint.
    async fn start_silo(&mut self, tenant: &str) -> String {
        let port = free_port();
        let dir = self.dir.path().join(format!("silo-{tenant}"));
        let name = format!("silo-{tenant}");
        let dir_setting = dir.display().to_string();
        self.spawn(&name, "data", port, &[("TENANTMESH_SILO_TENANT", tenant), ("TENANTMESH_DATA_DIR", &dir_setting)])
            .await;
        format!("http://127.0.0.1:{port}")
    }

    /// The example application service as its own process (its own
    /// identity and data dir), listed in the catalog before this returns.
    async fn start_orders(&mut self) -> u16 {
        let port = free_port();
        let dir = self.dir.path().join("orders").display().to_string();
        let metering = self.env["TENANTMESH_DATA_URL"].clone();
        let settings = [
            ("TENANTMESH_SERVICE_CLIENT_ID", "orders"),
            ("TENANTMESH_SERVICE_CLIENT_SECRET", TEST_CLIENT_SECRET),
            ("TENANTMESH_DATA_DIR", dir.as_str()),
            ("TENANTMESH_METERING_URL", metering.as_str()),
        ];
        self.spawn("orders", "orders", port, &settings).await;
        let endpoint = format!("http://127.0.0.1:{port}");
        until_listed(channel(self.ports["registry"]), &self.admin().await, "orders", &endpoint).await;
        port
    }

    fn registry(&self) -> TenantRegistryClient<Channel> {
        TenantRegistryClient::new(channel(self.ports["registry"]))
    }
    fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(channel(self.ports["auth"]))
    }
    fn onboarding(&self) -> OnboardingClient<Channel> {
        OnboardingClient::new(channel(self.ports["onboarding"]))
    }
    fn data(&self) -> DataClient<Channel> {
        DataClient::new(channel(self.ports["data"]))
    }

    async fn login(&self, tenant: &str, email: &str, password: &str) -> Result<String, tonic::Status> {
        let req = LoginRequest { tenant_id: tenant.into(), email: email.into(), password: password.into() };
        Ok(self.auth().login(req).await?.into_inner().access_token)
    }

    /// The platform admin's token, logged in once (polls call this often).
    async fn admin(&self) -> String {
        if let Some(t) = self.admin.get() {
            return t.clone();
        }
        let token = self.login("platform", ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
        self.admin.get_or_init(|| token).clone()
    }

    async fn service_token(&self) -> String {
        let req =
            IssueServiceTokenRequest { client_id: TEST_CLIENT_ID.into(), client_secret: TEST_CLIENT_SECRET.into() };
        self.auth().issue_service_token(req).await.unwrap().into_inner().access_token
    }

    async fn workflow(&self, id: &str) -> Workflow {
        let req = authed(GetWorkflowRequest { workflow_id: id.into() }, &self.admin().await);
        self.onboarding().get_workflow(req).await.unwrap().into_inner().workflow.unwrap()
    }

    /// Waits until `step` of workflow `id` is persisted as done.
    async fn until_done(&self, id: &str, step: &str) {
        for _ in 0..1200 {
            let wf = self.workflow(id).await;
            assert_ne!(wf.status, WorkflowStatus::Failed as i32, "{wf:?}");
            if wf.steps.iter().any(|s| s.name == step && s.state == StepState::Done as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id}: step {step} never finished; see {}", self.log("onboarding").display());
    }

    /// Waits until the onboarding process halted at `step` of `id`, as
    /// `mode` (`halt-after`: the step is persisted as done;
    /// `halt-unsaved`: its effect is done but not recorded).
    async fn until_halted(&self, mode: &str, id: &str, step: &str) {
        if mode == "halt-after" {
            return self.until_done(id, step).await;
        }
        for _ in 0..1200 {
            let log = std::fs::read_to_string(self.log("onboarding")).unwrap_or_default();
            if log.lines().any(|l| l.contains("halting before saving the step") && l.contains(id) && l.contains(step)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id}: never halted before saving {step}; see {}", self.log("onboarding").display());
    }

    /// Waits for workflow `id` to succeed.
    async fn until_succeeded(&self, id: &str) -> Workflow {
        for _ in 0..1500 {
            let wf = self.workflow(id).await;
            if wf.status == WorkflowStatus::Succeeded as i32 {
                return wf;
            }
            assert_eq!(wf.status, WorkflowStatus::Running as i32, "{wf:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id} did not finish; see {}", self.log("onboarding").display());
    }

    /// The tenant's audit log has one successful event per version of its
    /// record (each committed change), and its chain holds.
    async fn assert_one_event_per_change(&self, id: &str) {
        use tenantmesh_proto::audit::v1::audit_client::AuditClient;
        use tenantmesh_proto::audit::v1::{ListAuditEventsRequest, Outcome};
        let admin = self.admin().await;
        let mut audit = AuditClient::new(channel(self.ports["registry"]));
        let (mut succeeded, mut page_token) = (0u64, String::new());
        loop {
            let req = ListAuditEventsRequest { tenant_id: id.into(), page_size: 100, page_token, ..Default::default() };
            let page = audit.list_audit_events(authed(req, &admin)).await.unwrap().into_inner();
            succeeded += page.events.iter().filter(|e| e.outcome() == Outcome::Succeeded).count() as u64;
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let version = self.tenant(id).await.version;
        assert_eq!(succeeded, version, "{id}: one event per committed change");
        self.assert_chain_holds("registry", id).await;
    }

    /// The actions of `id`'s successful events in `service`'s audit log.
    async fn audit_actions(&self, service: &str, id: &str) -> Vec<String> {
        use tenantmesh_proto::audit::v1::audit_client::AuditClient;
        use tenantmesh_proto::audit::v1::{ListAuditEventsRequest, Outcome};
        let mut audit = AuditClient::new(channel(self.ports[service]));
        let req = ListAuditEventsRequest { tenant_id: id.into(), page_size: 1000, ..Default::default() };
        let events = audit.list_audit_events(authed(req, &self.admin().await)).await.unwrap().into_inner().events;
        events.into_iter().filter(|e| e.outcome() == Outcome::Succeeded).map(|e| e.action).collect()
    }

    /// `id`'s chain in `service`'s audit log holds.
    async fn assert_chain_holds(&self, service: &str, id: &str) {
        use tenantmesh_proto::audit::v1::VerifyAuditChainRequest;
        use tenantmesh_proto::audit::v1::audit_client::AuditClient;
        let mut audit = AuditClient::new(channel(self.ports[service]));
        let req = authed(VerifyAuditChainRequest { tenant_id: id.into() }, &self.admin().await);
        let verified = audit.verify_audit_chain(req).await.unwrap().into_inner();
        assert!(verified.intact, "{service} {id}: {verified:?}");
    }

    async fn tenant(&self, id: &str) -> Tenant {
        let req = authed(GetTenantRequest { tenant_id: id.into() }, &self.admin().await);
        self.registry().get_tenant(req).await.unwrap().into_inner().tenant.unwrap()
    }

    /// How many registry records carry `id` (every page of ListTenants).
    async fn records(&self, id: &str) -> usize {
        let admin = self.admin().await;
        let (mut n, mut page_token) = (0, String::new());
        loop {
            let req = authed(ListTenantsRequest { page_size: 1000, page_token }, &admin);
            let page = self.registry().list_tenants(req).await.unwrap().into_inner();
            n += page.tenants.iter().filter(|t| t.tenant_id == id).count();
            if page.next_page_token.is_empty() {
                return n;
            }
            page_token = page.next_page_token;
        }
    }

    async fn users(&self, tenant: &str) -> usize {
        let req = authed(ListUsersRequest { tenant_id: tenant.into(), ..Default::default() }, &self.admin().await);
        self.auth().list_users(req).await.unwrap().into_inner().users.len()
    }

    /// The tenant's dedicated tables that exist, on the cluster's backend.
    async fn dedicated_tables(&self, tenant: &str) -> Vec<String> {
        let needle = format!("tenant-{tenant}-");
        match &self.moto {
            Some(m) => {
                let aws = tenantmesh_isolation::aws::AwsSettings::from_env(&m.env()).await;
                let names = aws.dynamodb().list_tables().send().await.unwrap().table_names().to_vec();
                names.into_iter().filter(|n| n.contains(&needle)).collect()
            }
            None => {
                let mut found = Vec::new();
                for dir in std::fs::read_dir(self.dir.path()).unwrap() {
                    let tables = dir.unwrap().path().join("tables");
                    for f in std::fs::read_dir(&tables).into_iter().flatten() {
                        let name = f.unwrap().file_name().to_string_lossy().into_owned();
                        if let Some(table) =
                            name.strip_suffix(".redb").filter(|n| n.contains(&needle) && !n.starts_with('.'))
                        {
                            found.push(table.to_owned());
                        }
                    }
                }
                found
            }
        }
    }

    /// The tenant's items the service role finds in `table` (DataAdmin).
    async fn stored(&self, tenant: &str, table: &str) -> Result<usize, tonic::Status> {
        let mut admin = DataAdminClient::new(channel(self.ports["data"]));
        exported_items(&mut admin, &self.service_token().await, tenant, table).await
    }

    /// Registers `tenant` on `tier` (admin `admin@<tenant>.example`).
    async fn register(&self, tenant: &str, tier: &str) {
        let req = RegisterTenantRequest {
            tenant_id: tenant.into(),
            name: format!("Tenant {tenant}"),
            tier: tier.into(),
            admin_email: format!("admin@{tenant}.example"),
            admin_password: format!("{tenant}-password"),
            idempotency_key: format!("onboard-{tenant}"),
        };
        self.onboarding().register_tenant(authed(req, &self.admin().await)).await.unwrap();
    }

    async fn tenant_token(&self, tenant: &str) -> String {
        self.login(tenant, &format!("admin@{tenant}.example"), &format!("{tenant}-password")).await.unwrap()
    }

    /// The product `p1` in the tenant's catalog (an order names one).
    async fn put_product(&self, token: &str) {
        let req =
            PutItemRequest { collection: "products".into(), id: "p1".into(), attributes: None, expected_version: None };
        self.data().put_item(authed(req, token)).await.unwrap();
    }

    async fn service_token_as(&self, client_id: &str) -> String {
        let req = IssueServiceTokenRequest { client_id: client_id.into(), client_secret: TEST_CLIENT_SECRET.into() };
        self.auth().issue_service_token(req).await.unwrap().into_inner().access_token
    }

    async fn put_items(&self, token: &str, n: usize) {
        for i in 0..n {
            let req = PutItemRequest {
                collection: "c".into(),
                id: format!("i{i:03}"),
                attributes: Some(attrs(&[("n", &i.to_string())])),
                expected_version: None,
            };
            self.data().put_item(authed(req, token)).await.unwrap();
        }
    }

    /// Item ids of the caller, asserting none is listed twice.
    async fn item_ids(&self, token: &str) -> Vec<String> {
        let req = QueryItemsRequest {
            collection: "c".into(),
            id_prefix: String::new(),
            page_size: 1000,
            page_token: "".into(),
        };
        let page = self.data().query_items(authed(req, token)).await.unwrap().into_inner();
        assert!(page.next_page_token.is_empty());
        let ids: Vec<String> = page.items.iter().map(|i| i.id.clone()).collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "an item is listed twice: {ids:?}");
        ids
    }
}

/// Where the onboarding process is held for the kill: after the step is
/// persisted, and after its effect but before it is recorded (the restart
/// then runs the step again).
const MODES: [&str; 2] = ["halt-after", "halt-unsaved"];

/// Every (mode, step) of a workflow.
fn crash_points(steps: Vec<&'static str>) -> Vec<(&'static str, &'static str)> {
    steps.into_iter().flat_map(|s| MODES.map(|m| (m, s))).collect()
}

fn step_names(kind: &str, model_from: IsolationModel, model_to: IsolationModel) -> Vec<&'static str> {
    steps_of(kind, model_from, model_to, &[])
}

/// [`step_names`] of a mesh with one application service registered.
fn step_names_with(kind: &str, model_from: IsolationModel, model_to: IsolationModel) -> Vec<&'static str> {
    steps_of(kind, model_from, model_to, &["orders".to_owned()])
}

fn steps_of(kind: &str, from: IsolationModel, to: IsolationModel, services: &[String]) -> Vec<&'static str> {
    use tenantmesh_onboarding::workflow::{Spot, change_tier_steps, offboard_steps, onboard_steps, restore_steps};
    let spot = |model| Spot { model, ..Default::default() };
    let steps = match kind {
        "onboard" => onboard_steps(&spot(to), services),
        "change_tier" => change_tier_steps(&spot(from), &spot(to), services),
        "restore" => restore_steps(false, services),
        _ => offboard_steps(services),
    };
    steps.into_iter().map(|s| s.step.as_str()).collect()
}

fn assert_log_mentions(path: &Path, needle: &str) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    assert!(log.contains(needle), "{} does not mention {needle:?}", path.display());
}

/// Onboarding a silo tenant (every onboarding step, compute included),
/// killed after each step in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_completes_after_kill_9_at_every_step() {
    let mut cluster = Cluster::start().await;
    for (mode, step) in crash_points(step_names("onboard", IsolationModel::Pool, IsolationModel::Silo)) {
        let tenant = unique_tenant("onb");
        let endpoint = cluster.start_silo(&tenant).await;
        let fault = format!("{mode}:onboard:{step}");
        let template = [("TENANTMESH_SILO_ENDPOINT_TEMPLATE", endpoint.as_str())];
        cluster.start_onboarding(&[template[0], ("TENANTMESH_FAULTS", &fault)]).await;
        cluster.register(&tenant, "enterprise").await;
        let id = format!("{tenant}/onboard");
        cluster.until_halted(mode, &id, step).await;
        cluster.kill_9("onboarding");
        cluster.start_onboarding(&template).await;
        let wf = cluster.until_succeeded(&id).await;
        assert!(wf.steps.iter().all(|s| s.state == StepState::Done as i32), "after {step} ({mode}): {wf:?}");

        assert_eq!(cluster.records(&tenant).await, 1, "after {step} ({mode})");
        assert_eq!(cluster.users(&tenant).await, 1, "after {step} ({mode})");
        assert_eq!(cluster.dedicated_tables(&tenant).await.len(), 1, "after {step} ({mode})");
        let t = cluster.tenant(&tenant).await;
        assert_eq!(t.status, TenantStatus::Active as i32);
        assert_eq!(t.placement.unwrap().endpoint, endpoint, "after {step} ({mode})");
        // It works end to end, through the shared data service to the silo instance.
        let token = cluster.tenant_token(&tenant).await;
        cluster.put_items(&token, 2).await;
        assert_eq!(cluster.item_ids(&token).await.len(), 2);
        cluster.kill_9("onboarding");
    }
    assert_log_mentions(&cluster.log("onboarding"), "resuming an unfinished workflow");
}

/// Offboarding a bridge tenant, killed after each step in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_completes_after_kill_9_at_every_step() {
    let mut cluster = Cluster::start().await;
    for (mode, step) in crash_points(step_names("offboard", IsolationModel::Pool, IsolationModel::Pool)) {
        let tenant = unique_tenant("off");
        let fault = format!("{mode}:offboard:{step}");
        cluster.start_onboarding(&[("TENANTMESH_FAULTS", &fault)]).await;
        cluster.register(&tenant, "premium").await;
        cluster.until_succeeded(&format!("{tenant}/onboard")).await;
        let token = cluster.tenant_token(&tenant).await;
        cluster.put_items(&token, 5).await;
        let admin = cluster.admin().await;
        let req = authed(OffboardTenantRequest { tenant_id: tenant.clone() }, &admin);
        let id = cluster.onboarding().offboard_tenant(req).await.unwrap().into_inner().workflow_id;
        cluster.until_halted(mode, &id, step).await;
        cluster.kill_9("onboarding");
        cluster.start_onboarding(&[]).await;
        let wf = cluster.until_succeeded(&id).await;

        assert_eq!(cluster.records(&tenant).await, 1, "after {step} ({mode})");
        assert_eq!(cluster.tenant(&tenant).await.status, TenantStatus::Deleted as i32);
        assert_eq!(cluster.users(&tenant).await, 0, "after {step} ({mode})");
        assert!(cluster.dedicated_tables(&tenant).await.is_empty(), "after {step} ({mode})");
        let export = std::fs::read_to_string(&wf.export_path).unwrap();
        let mut ids: Vec<String> = export
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
            .collect();
        ids.dedup();
        assert_eq!(ids, ["i000", "i001", "i002", "i003", "i004"], "after {step} ({mode})");
        cluster.kill_9("onboarding");
    }
}

/// A tier change pool -> bridge, killed after each step in turn: every
/// item is in the new table once, none is left in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_change_completes_after_kill_9_at_every_step() {
    let mut cluster = Cluster::start().await;
    for (mode, step) in crash_points(step_names("change_tier", IsolationModel::Pool, IsolationModel::Bridge)) {
        let tenant = unique_tenant("move");
        let fault = format!("{mode}:change_tier:{step}");
        cluster.start_onboarding(&[("TENANTMESH_FAULTS", &fault)]).await;
        cluster.register(&tenant, "standard").await;
        cluster.until_succeeded(&format!("{tenant}/onboard")).await;
        let pooled = cluster.tenant(&tenant).await.placement.unwrap().table;
        let token = cluster.tenant_token(&tenant).await;
        cluster.put_items(&token, 25).await;
        let admin = cluster.admin().await;
        let req = authed(ChangeTierRequest { tenant_id: tenant.clone(), tier: "premium".into() }, &admin);
        let id = cluster.onboarding().change_tier(req).await.unwrap().into_inner().workflow_id;
        cluster.until_halted(mode, &id, step).await;
        cluster.kill_9("onboarding");
        cluster.start_onboarding(&[]).await;
        cluster.until_succeeded(&id).await;

        let t = cluster.tenant(&tenant).await;
        assert_eq!((t.tier.as_str(), t.status), ("premium", TenantStatus::Active as i32), "after {step} ({mode})");
        let table = t.placement.unwrap().table;
        assert_eq!(cluster.dedicated_tables(&tenant).await, std::slice::from_ref(&table), "after {step} ({mode})");
        let token = cluster.tenant_token(&tenant).await;
        let ids = cluster.item_ids(&token).await;
        assert_eq!(ids.len(), 25, "after {step} ({mode}): {ids:?}");
        assert_eq!(cluster.stored(&tenant, &table).await.unwrap(), 25, "after {step} ({mode})");
        assert_eq!(cluster.stored(&tenant, &pooled).await.unwrap(), 0, "after {step} ({mode}): items left in the pool");
        assert_eq!(cluster.records(&tenant).await, 1);
        cluster.assert_one_event_per_change(&tenant).await;
        // Who started them: one event per workflow, whatever was killed when.
        let started = cluster.audit_actions("onboarding", &tenant).await;
        assert_eq!(started, ["tenant.onboard", "tenant.change_tier"], "after {step} ({mode})");
        cluster.kill_9("onboarding");
    }
}

/// kill -9 of the auth service, three times, while a tenant's admin keeps
/// creating users: after each restart the auth log has exactly one
/// `user.create` event per user that exists, and its chain holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_keeps_one_event_per_user_through_kill_9_of_auth() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tenantmesh_proto::auth::v1::CreateUserRequest;
    let mut cluster = Cluster::start().await;
    cluster.start_onboarding(&[]).await;
    let tenant = unique_tenant("audit-users");
    cluster.register(&tenant, "standard").await;
    cluster.until_succeeded(&format!("{tenant}/onboard")).await;
    let mut before = 1; // its admin
    for round in 0..3 {
        let token = cluster.tenant_token(&tenant).await;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let creator = {
            let (stop, auth, tenant) = (stop.clone(), cluster.auth(), tenant.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let req = CreateUserRequest {
                        tenant_id: tenant.clone(),
                        email: format!("u{round}-{n}@{tenant}.example"),
                        password: "a-user-password-123".into(),
                        ..Default::default()
                    };
                    let _ = auth.clone().create_user(authed(req, &token)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500 + 150 * round)).await;
        cluster.kill_9("auth");
        stop.store(true, Ordering::Relaxed);
        creator.await.unwrap();
        cluster.spawn("auth", "auth", cluster.ports["auth"], &[]).await;
        let created = cluster.audit_actions("auth", &tenant).await.iter().filter(|a| *a == "user.create").count();
        let list = ListUsersRequest { tenant_id: tenant.clone(), page_size: 1000, ..Default::default() };
        let users = cluster.auth().list_users(authed(list, &cluster.admin().await)).await.unwrap().into_inner();
        assert!(users.next_page_token.is_empty());
        assert_eq!(created, users.users.len(), "round {round}: one event per user");
        assert!(created > before, "round {round}: no user was created before the kill");
        before = created;
        cluster.assert_chain_holds("auth", &tenant).await;
    }
}

/// kill -9 of the registry, three times, while an operator keeps changing a
/// tenant's status and limits: after each restart the tenant's audit log
/// has exactly one event per committed change (as many successful events
/// as the record has versions) and its chain holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_keeps_one_event_per_change_through_kill_9_of_the_registry() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tenantmesh_proto::registry::v1::{
        CreateTenantRequest, SetTenantLimitsRequest, SetTenantStatusRequest, TenantLimits,
    };
    let mut cluster = Cluster::start().await;
    let admin = cluster.admin().await;
    let tenant = unique_tenant("audit-kill");
    let create = CreateTenantRequest {
        tenant_id: tenant.clone(),
        name: "Audited".into(),
        tier: "basic".into(),
        ..Default::default()
    };
    cluster.registry().create_tenant(authed(create, &admin)).await.unwrap();
    for round in 0..3 {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let changer = {
            let (stop, registry, admin, tenant) = (stop.clone(), cluster.registry(), admin.clone(), tenant.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let status = if n.is_multiple_of(2) { TenantStatus::Active } else { TenantStatus::Suspended };
                    let req = SetTenantStatusRequest { tenant_id: tenant.clone(), status: status as i32 };
                    let _ = registry.clone().set_tenant_status(authed(req, &admin)).await;
                    let limits = TenantLimits {
                        requests_per_second: n,
                        burst: n,
                        max_concurrency: 1,
                        storage_quota_bytes: 1 << 20,
                    };
                    let req = SetTenantLimitsRequest { tenant_id: tenant.clone(), limits: Some(limits) };
                    let _ = registry.clone().set_tenant_limits(authed(req, &admin)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(400 + 150 * round)).await;
        cluster.kill_9("registry");
        stop.store(true, Ordering::Relaxed);
        changer.await.unwrap();
        cluster.spawn("registry", "registry", cluster.ports["registry"], &[]).await;
        cluster.assert_one_event_per_change(&tenant).await;
    }
}

/// The caller's items as (id, version, attribute n).
async fn versions(cluster: &Cluster, token: &str) -> Vec<(String, u64, String)> {
    let req =
        QueryItemsRequest { collection: "c".into(), id_prefix: String::new(), page_size: 1000, page_token: "".into() };
    let page = cluster.data().query_items(authed(req, token)).await.unwrap().into_inner();
    page.items
        .into_iter()
        .map(|i| {
            let n = i.attributes.as_ref().and_then(|a| a.fields.get("n")).and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
            (i.id, i.version, n.unwrap_or_default())
        })
        .collect()
}

/// Now, as a RestoreTenant instant.
fn timestamp_now() -> prost_types::Timestamp {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_micros() as i32 * 1000 }
}

/// A restore in place of a pool tenant, killed after each step in turn:
/// its items are exactly as they were at the instant (versions included),
/// writes were refused while it was paused and are taken after it, and a
/// neighbour in the same table is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_completes_after_kill_9_at_every_step() {
    use tenantmesh_onboarding::workflow::restore_steps;
    let mut cluster = Cluster::start().await;
    let neighbour = unique_tenant("nbr");
    cluster.start_onboarding(&[]).await;
    cluster.register(&neighbour, "standard").await;
    cluster.until_succeeded(&format!("{neighbour}/onboard")).await;
    let neighbour_token = cluster.tenant_token(&neighbour).await;
    cluster.put_items(&neighbour_token, 3).await;
    cluster.kill_9("onboarding");
    let steps: Vec<&str> = restore_steps(false, &[]).into_iter().map(|s| s.step.as_str()).collect();
    for (mode, step) in crash_points(steps) {
        let tenant = unique_tenant("rst");
        let fault = format!("{mode}:restore:{step}");
        cluster.start_onboarding(&[("TENANTMESH_FAULTS", &fault)]).await;
        cluster.register(&tenant, "standard").await;
        cluster.until_succeeded(&format!("{tenant}/onboard")).await;
        let token = cluster.tenant_token(&tenant).await;
        cluster.put_items(&token, 5).await;
        let then = versions(&cluster, &token).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let instant = timestamp_now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Changed, deleted and created since.
        cluster.put_items(&token, 7).await;
        let del = tenantmesh_proto::data::v1::DeleteItemRequest {
            collection: "c".into(),
            id: "i001".into(),
            expected_version: None,
        };
        cluster.data().delete_item(authed(del, &token)).await.unwrap();
        let neighbour_before = versions(&cluster, &neighbour_token).await;

        let admin = cluster.admin().await;
        let req = RestoreTenantRequest { tenant_id: tenant.clone(), point_in_time: Some(instant), target: 0 };
        let id = cluster.onboarding().restore_tenant(authed(req, &admin)).await.unwrap().into_inner().workflow_id;
        cluster.until_halted(mode, &id, step).await;
        if step == "pause_writes" {
            // Paused: reads go on, writes are refused with a retry hint.
            assert!(!versions(&cluster, &token).await.is_empty());
            let put = cluster.data().put_item(authed(put_v("late", "x"), &token)).await;
            expect_code(put.map(drop), tonic::Code::Unavailable);
        }
        cluster.kill_9("onboarding");
        cluster.start_onboarding(&[]).await;
        let wf = cluster.until_succeeded(&id).await;
        assert_eq!(wf.kind, "restore");

        assert_eq!(versions(&cluster, &token).await, then, "after {step} ({mode})");
        assert_eq!(versions(&cluster, &neighbour_token).await, neighbour_before, "after {step} ({mode})");
        assert_eq!(cluster.tenant(&tenant).await.status, TenantStatus::Active as i32);
        // Clients' optimistic concurrency holds: the version read then is current again.
        let mut put = put_v("i002", "after");
        put.expected_version = Some(then[2].1);
        cluster.data().put_item(authed(put, &token)).await.unwrap();
        cluster.kill_9("onboarding");
    }
}

/// What one writer saw: the writes acknowledged (id -> value), every
/// refusal's code, and the longest a call took.
#[derive(Default)]
struct Writes {
    acked: std::collections::BTreeMap<String, String>,
    refused: Vec<tonic::Code>,
    longest: Duration,
}

/// The code a client should act on for a failed call. tonic makes up two
/// statuses itself, without any answer from the server, when the
/// connection breaks: UNKNOWN "transport error" for a call it broke under
/// (the server killed mid-call), and CANCELLED "operation was canceled"
/// (hyper's words) for a call still queued on a connection that closed
/// before the call was sent. For a client both are UNAVAILABLE: retry. A
/// CANCELLED or UNKNOWN the server sent keeps its code, and fails the test.
fn refusal(s: &tonic::Status) -> tonic::Code {
    let broken = match s.code() {
        tonic::Code::Unknown => s.message() == "transport error",
        tonic::Code::Cancelled => s.message().starts_with("operation was canceled"),
        _ => false,
    };
    if broken { tonic::Code::Unavailable } else { s.code() }
}

/// Writes `w<writer>-<n>` items one after another, each retried (the same
/// id and value: an idempotent call) until it is acknowledged, every call
/// with a 3 s deadline, reading back one in ten; until `stop`.
async fn write_until(
    port: u16,
    token: String,
    writer: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Writes {
    use std::sync::atomic::Ordering;
    use tenantmesh_proto::data::v1::GetItemRequest;
    let mut data = DataClient::new(channel(port));
    let mut seen = Writes::default();
    for n in 0.. {
        let (id, value) = (format!("w{writer}-{n:05}"), format!("value {writer}/{n}"));
        loop {
            if stop.load(Ordering::Relaxed) {
                return seen;
            }
            let mut req = authed(put_v(&id, &value), &token);
            req.set_timeout(Duration::from_secs(3));
            let started = std::time::Instant::now();
            let answer = data.put_item(req).await;
            seen.longest = seen.longest.max(started.elapsed());
            match answer {
                Ok(_) => {
                    seen.acked.insert(id.clone(), value.clone());
                    break;
                }
                Err(s) => {
                    seen.refused.push(refusal(&s));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if n % 10 == 0 {
            let mut req = authed(GetItemRequest { collection: "c".into(), id: id.clone() }, &token);
            req.set_timeout(Duration::from_secs(3));
            if let Err(s) = data.get_item(req).await {
                seen.refused.push(refusal(&s));
            }
        }
    }
    seen
}

/// kill -9 of the data service, then of the registry, while four clients
/// keep writing: the calls caught by the kills end UNAVAILABLE (tonic's
/// own statuses for a broken connection are counted as such: `refusal`)
/// and never hang (none takes longer than its deadline), each write retried
/// after the restarts succeeds, and every acknowledged write is there
/// afterwards with its value (nothing half-written: every item decodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_data_service_and_the_registry() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = Cluster::start().await;
    cluster.start_onboarding(&[]).await;
    let tenant = unique_tenant("load");
    cluster.register(&tenant, "standard").await;
    cluster.until_succeeded(&format!("{tenant}/onboard")).await;
    let token = cluster.tenant_token(&tenant).await;

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let port = cluster.ports["data"];
    let writers: Vec<_> = (0..4).map(|w| tokio::spawn(write_until(port, token.clone(), w, stop.clone()))).collect();
    for service in ["data", "registry"] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.kill_9(service);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let binary = if service == "registry" { "registry" } else { "data" };
        cluster.spawn(service, binary, cluster.ports[service], &[]).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = std::collections::BTreeMap::new();
    let mut refused = Vec::new();
    for w in writers {
        let seen = w.await.unwrap();
        assert!(seen.longest < Duration::from_secs(4), "a call hung for {:?}", seen.longest);
        acked.extend(seen.acked);
        refused.extend(seen.refused);
    }
    eprintln!("{} writes acknowledged, {} calls refused", acked.len(), refused.len());
    assert!(!refused.is_empty(), "no call was caught by the kills");
    assert!(refused.iter().all(|c| *c == tonic::Code::Unavailable), "{refused:?}");

    // Every acknowledged write, with its value; nothing else but whole items.
    let mut page_token = String::new();
    let mut stored = std::collections::BTreeMap::new();
    loop {
        let req = QueryItemsRequest { collection: "c".into(), id_prefix: String::new(), page_size: 1000, page_token };
        let page = cluster.data().query_items(authed(req, &token)).await.unwrap().into_inner();
        for item in page.items {
            let v = item.attributes.as_ref().and_then(|a| a.fields.get("v")).and_then(|v| v.kind.clone());
            let Some(prost_types::value::Kind::StringValue(v)) = v else { panic!("a half-written item: {item:?}") };
            stored.insert(item.id, v);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for (id, value) in &acked {
        assert_eq!(stored.get(id), Some(value), "acknowledged write {id} lost");
    }
    // Beyond those, at most the one write per writer in flight at the end
    // (applied, its answer not awaited).
    assert!(stored.len() <= acked.len() + 4, "{} stored, {} acknowledged", stored.len(), acked.len());
}

/// The Kubernetes version the generated manifests are validated against
/// (as deploy/k8s is, by `cargo xtask test`).
const KUBERNETES_VERSION: &str = "1.34.0";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=fleet", "-c", "user.email=fleet@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Silo compute on Kubernetes, GitOps style: onboarding a silo tenant
/// commits its instance's manifests to the fleet repository (valid for
/// Kubernetes, strict), a kill -9 after the compute step's effect but before
/// it is recorded makes no second commit, and a tier change away from silo
/// removes them in one more commit. The instance itself (the reconciler's
/// part) is a process here, at the endpoint the manifests name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_tenants_manifests_are_committed_once_and_removed_when_it_leaves_the_silo() {
    let mut cluster = Cluster::start().await;
    let tenant = unique_tenant("git");
    let repo = cluster.dir.path().join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "--quiet"]);
    git(&repo, &["commit", "--quiet", "--allow-empty", "-m", "fleet"]);
    let commits = || git(&repo, &["rev-list", "--count", "HEAD"]).trim().parse::<usize>().unwrap();
    let endpoint = cluster.start_silo(&tenant).await;
    let repo_setting = repo.display().to_string();
    let settings = [
        ("TENANTMESH_SILO_GITOPS_REPO", repo_setting.as_str()),
        ("TENANTMESH_SILO_GITOPS_PATH", "clusters/prod/tenants"),
        ("TENANTMESH_SILO_IMAGE", "registry.example/tenantmesh:test"),
        ("TENANTMESH_SILO_ENDPOINT_TEMPLATE", endpoint.as_str()),
    ];
    let mut faulty = settings.to_vec();
    faulty.push(("TENANTMESH_FAULTS", "halt-unsaved:onboard:provision_compute"));
    cluster.start_onboarding(&faulty).await;
    cluster.register(&tenant, "enterprise").await;
    let id = format!("{tenant}/onboard");
    cluster.until_halted("halt-unsaved", &id, "provision_compute").await;
    assert_eq!(commits(), 2, "the manifests are committed before the step is recorded");
    cluster.kill_9("onboarding");
    cluster.start_onboarding(&settings).await;
    cluster.until_succeeded(&id).await;
    assert_eq!(commits(), 2, "the step ran again and committed nothing new");

    let dir = repo.join("clusters/prod/tenants").join(&tenant);
    let files: Vec<PathBuf> = ["deployment.yaml", "networkpolicy.yaml", "service.yaml", "serviceaccount.yaml"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for label in [format!("tenantmesh.io/tenant: {tenant}"), "tenantmesh.io/tier: enterprise".into()] {
            assert!(text.contains(&label), "{} lacks {label}", f.display());
        }
    }
    let out = Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(git(&repo, &["status", "--porcelain"]).is_empty(), "everything written is committed");
    assert_eq!(cluster.tenant(&tenant).await.placement.unwrap().endpoint, endpoint);
    let token = cluster.tenant_token(&tenant).await;
    cluster.put_items(&token, 3).await;
    assert_eq!(cluster.item_ids(&token).await.len(), 3);

    let admin = cluster.admin().await;
    let req = authed(ChangeTierRequest { tenant_id: tenant.clone(), tier: "premium".into() }, &admin);
    let id = cluster.onboarding().change_tier(req).await.unwrap().into_inner().workflow_id;
    cluster.until_succeeded(&id).await;
    assert!(!dir.exists(), "the tenant's manifests are gone from the working tree");
    assert_eq!(commits(), 3);
    let removed = git(&repo, &["show", "--name-status", "--format=", "HEAD"]);
    assert_eq!(removed.lines().filter(|l| l.starts_with('D')).count(), 4, "{removed}");
    assert_eq!(cluster.item_ids(&token).await.len(), 3, "the items moved with the tenant");
}

/// The steps of an application service (the example `orders`, its own
/// process) in onboarding, a tier change pool -> bridge, a restore in place
/// and offboarding, the onboarding process killed after each in turn: each
/// workflow completes with the orders exactly as it promises (every order
/// in the new table once and none left in the pool; back as they were at
/// the instant; exported once, then gone), and the tenant takes orders
/// again where it still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_service_steps_complete_after_kill_9() {
    use tenantmesh_orders::proto::{CreateOrderRequest, ListOrdersRequest, orders_client::OrdersClient};
    let mut cluster = Cluster::start().await;
    let port = cluster.start_orders().await;
    let orders = || OrdersClient::new(channel(port));
    let ids = |token: String| async move {
        let req = authed(ListOrdersRequest { page_size: 100, page_token: String::new() }, &token);
        let listed = orders().list_orders(req).await.unwrap().into_inner().orders;
        listed.into_iter().map(|o| o.order_id).collect::<Vec<_>>()
    };
    let service_steps = |steps: Vec<&'static str>| steps.into_iter().filter(|s| s.ends_with("_service")).collect();
    let onboard = crash_points(service_steps(step_names_with("onboard", IsolationModel::Pool, IsolationModel::Pool)));
    let moves =
        crash_points(service_steps(step_names_with("change_tier", IsolationModel::Pool, IsolationModel::Bridge)));
    let restores = crash_points(service_steps(step_names_with("restore", IsolationModel::Pool, IsolationModel::Pool)));
    let leaves = crash_points(service_steps(step_names_with("offboard", IsolationModel::Pool, IsolationModel::Pool)));
    let points = onboard.into_iter().map(|p| ("onboard", p)).chain(moves.into_iter().map(|p| ("change_tier", p)));
    let points =
        points.chain(restores.into_iter().map(|p| ("restore", p))).chain(leaves.into_iter().map(|p| ("offboard", p)));
    for (kind, (mode, step)) in points {
        let tenant = unique_tenant("app");
        let fault = format!("{mode}:{kind}:{step}");
        cluster.start_onboarding(&[("TENANTMESH_FAULTS", &fault)]).await;
        cluster.register(&tenant, "standard").await;
        let mut id = format!("{tenant}/onboard");
        if kind != "onboard" {
            cluster.until_succeeded(&id).await;
            let token = cluster.tenant_token(&tenant).await;
            cluster.put_product(&token).await;
            for i in 0..5 {
                let req = CreateOrderRequest { order_id: format!("o{i}"), product_id: "p1".into(), quantity: 1 };
                orders().create_order(authed(req, &token)).await.unwrap();
            }
            let admin = cluster.admin().await;
            id = match kind {
                "change_tier" => {
                    let req = authed(ChangeTierRequest { tenant_id: tenant.clone(), tier: "premium".into() }, &admin);
                    cluster.onboarding().change_tier(req).await.unwrap().into_inner().workflow_id
                }
                "restore" => {
                    // o5 and o6 come after the instant, and o0 is cancelled after it.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let instant = timestamp_now();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    for i in 5..7 {
                        let req =
                            CreateOrderRequest { order_id: format!("o{i}"), product_id: "p1".into(), quantity: 1 };
                        orders().create_order(authed(req, &token)).await.unwrap();
                    }
                    let cancel = tenantmesh_orders::proto::CancelOrderRequest { order_id: "o0".into() };
                    orders().cancel_order(authed(cancel, &token)).await.unwrap();
                    let req =
                        RestoreTenantRequest { tenant_id: tenant.clone(), point_in_time: Some(instant), target: 0 };
                    cluster.onboarding().restore_tenant(authed(req, &admin)).await.unwrap().into_inner().workflow_id
                }
                _ => {
                    let req = authed(OffboardTenantRequest { tenant_id: tenant.clone() }, &admin);
                    cluster.onboarding().offboard_tenant(req).await.unwrap().into_inner().workflow_id
                }
            };
        }
        cluster.until_halted(mode, &id, step).await;
        cluster.kill_9("onboarding");
        cluster.start_onboarding(&[]).await;
        let wf = cluster.until_succeeded(&id).await;
        let at = format!("{kind} {step} ({mode})");
        assert!(wf.steps.iter().any(|s| s.service == "orders"), "{at}: {wf:?}");

        if kind == "offboard" {
            // Exported once each, then nothing of the tenant left.
            let detail = &wf.steps.iter().find(|s| s.name == "export_service").unwrap().detail;
            let path = detail.split(" to ").nth(1).unwrap_or_else(|| panic!("{at}: {detail}"));
            let keys: Vec<String> = std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(keys, ["o0", "o1", "o2", "o3", "o4"], "{at}");
            let lifecycle = cluster.service_token_as("tests-lifecycle").await;
            assert_eq!(pooled_items(port, &lifecycle, &tenant).await, 0, "{at}: left in the pool");
            cluster.kill_9("onboarding");
            continue;
        }
        let token = cluster.tenant_token(&tenant).await;
        if kind == "onboard" {
            cluster.put_product(&token).await;
            let req = CreateOrderRequest { order_id: "o0".into(), product_id: "p1".into(), quantity: 1 };
            orders().create_order(authed(req, &token)).await.unwrap();
            assert_eq!(ids(token).await, ["o0"], "{at}");
        } else if kind == "restore" {
            // As at the instant: o5 and o6 gone, o0 placed again; writable.
            assert_eq!(ids(token.clone()).await, ["o0", "o1", "o2", "o3", "o4"], "{at}");
            let get = tenantmesh_orders::proto::GetOrderRequest { order_id: "o0".into() };
            let o0 = orders().get_order(authed(get, &token)).await.unwrap().into_inner().order.unwrap();
            assert_eq!(o0.status(), tenantmesh_orders::proto::OrderStatus::Placed, "{at}");
            let req = CreateOrderRequest { order_id: "o9".into(), product_id: "p1".into(), quantity: 1 };
            eventually(Duration::from_secs(10), || {
                let (mut client, req) = (orders(), authed(req.clone(), &token));
                async move { client.create_order(req).await.is_ok() }
            })
            .await;
        } else {
            let own = format!("tenant-{tenant}-bridge-orders-orders");
            let tables = cluster.dedicated_tables(&tenant).await;
            assert_eq!(tables.iter().filter(|t| t.ends_with(&own)).count(), 1, "{at}: {tables:?}");
            assert_eq!(ids(token.clone()).await, ["o0", "o1", "o2", "o3", "o4"], "{at}");
            // Nothing of the tenant is left in the pooled orders table.
            let lifecycle = cluster.service_token_as("tests-lifecycle").await;
            assert_eq!(pooled_items(port, &lifecycle, &tenant).await, 0, "{at}: left in the pool");
            let req = CreateOrderRequest { order_id: "o5".into(), product_id: "p1".into(), quantity: 1 };
            orders().create_order(authed(req, &token)).await.unwrap();
        }
        cluster.kill_9("onboarding");
    }
}

/// How many items and history entries of `tenant` the orders service at
/// `port` keeps in its pooled table (asked with a lifecycle `token`).
async fn pooled_items(port: u16, token: &str, tenant: &str) -> usize {
    use tenantmesh_proto::lifecycle::v1::{ExportTenantRequest, tenant_lifecycle_client::TenantLifecycleClient};
    let pooled = tenantmesh_proto::registry::v1::Placement { model: IsolationModel::Pool as i32, ..Default::default() };
    let req = ExportTenantRequest {
        tenant_id: tenant.into(),
        placement: Some(pooled),
        include_history: true,
        as_of_us: None,
    };
    let mut pages =
        TenantLifecycleClient::new(channel(port)).export_tenant(authed(req, token)).await.unwrap().into_inner();
    let mut items = 0;
    while let Some(page) = pages.message().await.unwrap() {
        items += page.items.len();
    }
    items
}
