//! docker-compose.yml (and deploy/k8s/base, last), exercised without a
//! Docker engine or a cluster: the service
//! binaries run as separate processes with exactly the environment compose
//! gives them (`${VAR:-default}` resolved as the shell would, compose host
//! names and ports mapped to free loopback ports), profile by profile:
//!
//! - default (embedded store): the four services, their healthcheck command,
//!   and a silo tenant's own container started as the file's comment says;
//! - `dynamodb`: the emulator (the moto server `cargo xtask setup`
//!   installs) set up by `deploy/compose/moto-init.py` as the `moto-init`
//!   service runs it, then the same walk-through on DynamoDB and STS.
//!
//! The parts that are images of others (collector, Jaeger, moto) are checked
//! for their wiring: pinned, published, reachable by the names used.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tenantmesh_proto::onboarding::v1::{GetWorkflowRequest, RegisterTenantRequest, WorkflowStatus};
use tenantmesh_test_support::*;
use yaml_rust2::{Yaml, YamlLoader};

/// The compose services that are tenantmesh binaries, with their ports, in
/// the order their `depends_on` starts them (the example application
/// service last).
const SERVICES: [(&str, u16); 5] =
    [("tenant-registry", 50051), ("auth", 50052), ("data", 50054), ("onboarding", 50053), ("orders", 50060)];

/// The web console: an HTTP service, started after the others.
const CONSOLE: (&str, u16) = ("console", 50080);

/// The shell's variables, as the README's commands set them.
type Shell<'a> = &'a [(&'a str, &'a str)];

/// A process's command and environment, as a deployment file gives them.
type Spec = (Vec<String>, HashMap<String, String>);

fn compose() -> Yaml {
    let text = std::fs::read_to_string(workspace_root().join("docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// A mapping's entries with YAML merge keys (`<<: *a`, `<<: [*a, *b]`)
/// resolved: explicit keys win, then the merged maps in order.
fn entries(map: &Yaml) -> Vec<(String, Yaml)> {
    let Yaml::Hash(h) = map else { return Vec::new() };
    let mut out: Vec<(String, Yaml)> = Vec::new();
    let put = |k: String, v: Yaml, out: &mut Vec<(String, Yaml)>| {
        if !out.iter().any(|(x, _)| *x == k) {
            out.push((k, v));
        }
    };
    for (k, v) in h {
        if k.as_str() != Some("<<") {
            put(k.as_str().expect("string keys").to_owned(), v.clone(), &mut out);
        }
    }
    if let Some(merged) = h.get(&Yaml::String("<<".into())) {
        let sources = match merged {
            Yaml::Array(a) => a.clone(),
            m => vec![m.clone()],
        };
        for source in sources {
            for (k, v) in entries(&source) {
                put(k, v, &mut out);
            }
        }
    }
    out
}

fn field(map: &Yaml, key: &str) -> Option<Yaml> {
    entries(map).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn service(doc: &Yaml, name: &str) -> Yaml {
    let svc = &doc["services"][name];
    assert!(!svc.is_badvalue(), "compose has no service {name}");
    svc.clone()
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().map(|s| s.as_str().expect("strings").to_owned()).collect()).unwrap_or_default()
}

/// `${VAR:-default}` as a shell with `shell`'s variables (and no others) would.
fn interpolate(value: &str, shell: Shell) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let expr = &rest[start + 2..end];
        let (name, default) = expr.split_once(":-").unwrap_or_else(|| panic!("${{{expr}}} has no default"));
        let set = shell.iter().find(|(k, v)| *k == name && !v.is_empty()).map(|(_, v)| *v);
        out.push_str(set.unwrap_or(default));
        rest = &rest[end + 1..];
    }
    out + rest
}

/// A service's command and environment.
fn environment(doc: &Yaml, name: &str, shell: Shell) -> Spec {
    let svc = service(doc, name);
    let command = field(&svc, "command").map(|c| strings(&c)).unwrap_or_default();
    let env = field(&svc, "environment").unwrap_or_else(|| panic!("{name}: no environment"));
    let env = entries(&env)
        .into_iter()
        .map(|(k, v)| {
            let v = v.as_str().unwrap_or_else(|| panic!("{name}: {k} must be a quoted string")).to_owned();
            (k, interpolate(&v, shell))
        })
        .collect();
    (command, env)
}

/// Kills the processes if the test panics.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
        }
    }
}

/// With compose's defaults alone, auth, onboarding and data refuse to start
/// on the placeholder secrets, naming the variable to set.
#[test]
fn placeholder_secrets_are_refused_outside_a_demo() {
    let doc = compose();
    let dir = tempfile::tempdir().unwrap();
    for (name, var) in [
        ("auth", "TENANTMESH_SERVICE_CLIENTS"),
        ("onboarding", "TENANTMESH_SERVICE_CLIENT_SECRET"),
        ("data", "TENANTMESH_SERVICE_CLIENT_SECRET"),
        ("orders", "TENANTMESH_SERVICE_CLIENT_SECRET"),
    ] {
        let (command, env) = environment(&doc, name, &[]);
        assert_eq!(env["TENANTMESH_DEMO"], "false", "{name}");
        let out = Command::new(service_binary(&command[0]))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TENANTMESH_DATA_DIR", dir.path().join(name))
            .envs(env.iter().filter(|(k, _)| !k.starts_with("OTEL_")))
            .env("TENANTMESH_LISTEN_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} started on a placeholder secret");
        assert!(stderr.contains(var) && stderr.contains("placeholder"), "{name}: {stderr}");
        // One line naming the process and the variable, not a Debug dump.
        let line = stderr.lines().last().unwrap_or_default();
        assert!(line.starts_with(&format!("{}: TENANTMESH_", command[0])), "{name}: {stderr}");
    }
}

/// The parts of the file no process here runs: every tenantmesh service has
/// the healthcheck and waits for what it calls to be healthy; the image has
/// every binary the file runs; traces go collector -> Jaeger with its UI
/// published; other images are pinned; the emulator's set-up runs before
/// any service and the `silo` service only when asked for.
#[test]
fn the_compose_file_wires_health_traces_and_profiles() {
    let doc = compose();
    let dockerfile = std::fs::read_to_string(workspace_root().join("deploy/Dockerfile")).unwrap();
    let Yaml::Hash(services) = &doc["services"] else { panic!("no services") };
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let image = field(svc, "image").and_then(|i| i.as_str().map(str::to_owned)).expect("an image");
        let Some(command) = field(svc, "command").map(|c| strings(&c)) else { continue };
        if !command[0].starts_with("tenantmesh") {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
            assert!(!tag.is_empty() && tag != "latest", "{name}: image {image} is not pinned");
            continue;
        }
        assert!(dockerfile.contains(&format!("/release/{}", command[0])), "the image lacks {}", command[0]);
        let health = field(svc, "healthcheck").unwrap_or_else(|| panic!("{name}: no healthcheck"));
        // The console answers HTTP: its own binary asks its /healthz.
        let check: &[&str] =
            if name == "console" { &["CMD", "tenantmesh-console", "health"] } else { &["CMD", "tenantmesh", "health"] };
        assert_eq!(strings(&health["test"]), check, "{name}");
        assert!(dockerfile.contains("/release/tenantmesh "), "the image lacks the tenantmesh command");
        let depends = field(svc, "depends_on").map(|d| entries(&d)).unwrap_or_default();
        for (on, how) in depends {
            let condition = how["condition"].as_str().unwrap_or_default();
            if on == "moto-init" {
                assert_eq!(condition, "service_completed_successfully", "{name}");
                assert_eq!(how["required"].as_bool(), Some(false), "{name}: moto-init runs only in its profile");
            } else {
                assert_eq!(condition, "service_healthy", "{name} on {on}");
            }
        }
        if name == "silo" {
            assert_eq!(strings(&svc["profiles"]), ["silo"], "`up` must not start the silo template");
        } else {
            assert!(svc["profiles"].is_badvalue(), "{name} runs in the default profile");
        }
    }
    for name in ["moto", "moto-init"] {
        assert_eq!(strings(&service(&doc, name)["profiles"]), ["dynamodb"], "{name}");
    }

    // Traces: services -> collector -> Jaeger, whose UI is published.
    let (_, env) = environment(&doc, "data", &[]);
    assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://otel-collector:4317");
    let mounts = strings(&service(&doc, "otel-collector")["volumes"]);
    let config_file = mounts[0].split(':').next().unwrap().trim_start_matches("./");
    let text = std::fs::read_to_string(workspace_root().join(config_file)).unwrap();
    let config = YamlLoader::load_from_str(&text).unwrap().remove(0);
    let exporters = strings(&config["service"]["pipelines"]["traces"]["exporters"]);
    let jaeger = exporters.iter().find(|e| e.starts_with("otlp")).expect("traces are exported over OTLP");
    let endpoint = config["exporters"][jaeger.as_str()]["endpoint"].as_str().unwrap();
    assert_eq!(endpoint, "jaeger:4317");
    assert!(strings(&config["service"]["pipelines"]["metrics"]["receivers"]).contains(&"otlp".to_owned()));
    assert!(strings(&service(&doc, "jaeger")["ports"]).contains(&"127.0.0.1:16686:16686".to_owned()));
}

/// Every port the file publishes listens on the host's loopback only, and
/// the emulator (any credentials, every tenant's items) publishes none.
#[test]
fn published_ports_are_on_loopback_only() {
    let doc = compose();
    let mut published = 0;
    for (name, svc) in entries(&doc["services"]) {
        if let Some(ports) = field(&svc, "ports") {
            for port in strings(&ports) {
                assert!(port.starts_with("127.0.0.1:"), "{name} publishes {port} on every interface");
                published += 1;
            }
        }
    }
    assert_eq!(published, 7, "the four services, the example application service, the console and the trace UI");
    assert!(field(&service(&doc, "moto"), "ports").is_none(), "the emulator is published");
}

/// The emulator's set-up makes the tables the CloudFormation stack makes in
/// AWS, no more, no fewer (the services create none in either), and gives
/// the tenant-access role the same item actions.
#[test]
fn the_emulator_set_up_and_the_cloudformation_stack_make_the_same_tables() {
    use tenantmesh_isolation::backend::ServiceConfig;
    let root = workspace_root();
    let script = std::fs::read_to_string(root.join("deploy/compose/moto-init.py")).unwrap();
    let block = script.split("TABLES = {").nth(1).unwrap().split('}').next().unwrap();
    let mut init: Vec<&str> = block.lines().filter_map(|l| l.trim().strip_prefix('"')?.split('"').next()).collect();
    let stack = std::fs::read_to_string(root.join("deploy/aws/tenantmesh.yaml")).unwrap();
    let mut cfn: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TableName: !Sub \"${TablePrefix}")?.strip_suffix('"'))
        .collect();
    init.sort_unstable();
    cfn.sort_unstable();
    assert_eq!(init, cfn);
    for table in
        [tenantmesh_auth::Config::STORE, tenantmesh_onboarding::Config::STORE, "registry", "data", "leases", "usage"]
    {
        assert!(cfn.contains(&table), "no {table} table in the stack");
    }
    // And the tenant-access role gets the same ceiling: the item actions.
    let actions = |text: &str| -> std::collections::BTreeSet<String> {
        // `dynamodb:GetItem`, not the `:dynamodb:` of a resource ARN.
        let names = text.split("dynamodb:").skip(1).map(|a| a.chars().take_while(char::is_ascii_alphabetic).collect());
        names.filter(|n: &String| !n.is_empty()).collect()
    };
    let init_role = script.split("items = {").nth(1).unwrap().split("try:").next().unwrap();
    let stack_role = stack.split("PolicyName: tenant-items").nth(1).unwrap().split("ServicePolicy:").next().unwrap();
    assert_eq!(actions(init_role), actions(stack_role));
    assert!(actions(stack_role).contains("ConditionCheckItem"), "{:?}", actions(stack_role));
}

/// Disaster recovery in the stack: every table is a global table whose
/// second replica (in `ReplicaRegion`, when set) is the first one moved to
/// that region, with the stream replication needs always on; the tables
/// holding customers' and billing data keep point-in-time recovery in every
/// replica, refuse DeleteTable and outlive the stack; and every DynamoDB
/// resource the IAM policies grant in the stack's region is granted in the
/// replica's region too (when set), so the services can fail over.
#[test]
fn the_cloudformation_stack_replicates_every_table_to_the_replica_region() {
    let stack = std::fs::read_to_string(workspace_root().join("deploy/aws/tenantmesh.yaml")).unwrap();
    // yaml-rust2 drops CloudFormation's `!Sub`/`!If`/`!Ref` tags and keeps
    // their values: `!If [c, a, b]` is the array [c, a, b].
    let doc = YamlLoader::load_from_str(&stack).unwrap().remove(0);
    assert_eq!(doc["Conditions"]["HasReplica"], YamlLoader::load_from_str("[[ReplicaRegion, '']]").unwrap()[0]);
    let mut tables = Vec::new();
    for (name, resource) in doc["Resources"].as_hash().unwrap() {
        let name = name.as_str().unwrap();
        if resource["Type"].as_str() == Some("AWS::DynamoDB::Table") {
            panic!("{name} is a plain table: it cannot be given a replica without being replaced");
        }
        if resource["Type"].as_str() != Some("AWS::DynamoDB::GlobalTable") {
            continue;
        }
        // Not the earlier template's ids: updating an old stack with this
        // one must fail on the taken table names, not change a type.
        let earlier = ["RegistryTable", "AuthTable", "OnboardingTable", "LeasesTable", "UsageTable", "DataTable"];
        assert!(!earlier.contains(&name), "{name} is an earlier template's plain table id");
        tables.push(name.to_owned());
        let props = &resource["Properties"];
        assert_eq!(props["StreamSpecification"]["StreamViewType"].as_str(), Some("NEW_AND_OLD_IMAGES"), "{name}");
        let replicas = props["Replicas"].as_vec().unwrap();
        assert_eq!(replicas.len(), 2, "{name}: the stack's region and the optional replica");
        let first = &replicas[0];
        assert_eq!(first["Region"].as_str(), Some("AWS::Region"), "{name}");
        let optional = replicas[1].as_vec().expect("the second replica is an !If");
        assert_eq!(optional[0].as_str(), Some("HasReplica"), "{name}");
        assert_eq!(optional[2].as_str(), Some("AWS::NoValue"), "{name}");
        let mut moved = first.clone();
        if let Yaml::Hash(h) = &mut moved {
            *h.get_mut(&Yaml::String("Region".into())).unwrap() = Yaml::String("ReplicaRegion".into());
        }
        assert_eq!(optional[1], moved, "{name}: the replica differs from the first one");
        let holds_data = name != "LeasesGlobalTable";
        let pitr = first["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool();
        assert_eq!(pitr == Some(true), holds_data, "{name}: point-in-time recovery");
        assert_eq!(first["DeletionProtectionEnabled"].as_bool() == Some(true), holds_data, "{name}");
        for policy in ["DeletionPolicy", "UpdateReplacePolicy"] {
            assert_eq!(resource[policy].as_str() == Some("Retain"), holds_data, "{name}: {policy}");
        }
    }
    assert_eq!(tables.len(), 7, "{tables:?}");

    // Every ARN granted in the stack's region has its twin in the replica's.
    fn arns(node: &Yaml, out: &mut Vec<(bool, String)>) {
        match node {
            Yaml::String(s) if s.contains(":dynamodb:") => out.push((false, s.clone())),
            Yaml::Array(a) if a.first().and_then(Yaml::as_str) == Some("HasReplica") => {
                let mut inner = Vec::new();
                arns(&a[1], &mut inner);
                out.extend(inner.into_iter().map(|(_, arn)| (true, arn)));
            }
            Yaml::Array(a) => a.iter().for_each(|n| arns(n, out)),
            Yaml::Hash(h) => h.values().for_each(|n| arns(n, out)),
            _ => {}
        }
    }
    let mut granted = Vec::new();
    arns(&doc["Resources"], &mut granted);
    let here: Vec<_> = granted.iter().filter(|(c, _)| !c).map(|(_, a)| a.clone()).collect();
    let there: Vec<_> = granted.iter().filter(|(c, _)| *c).map(|(_, a)| a.clone()).collect();
    assert!(here.len() >= 8, "{here:?}");
    for arn in &here {
        assert!(arn.contains(":dynamodb:${AWS::Region}:"), "{arn}: not in the stack's region");
        let twin = arn.replace("${AWS::Region}", "${ReplicaRegion}");
        assert!(there.contains(&twin), "{arn} has no twin in the replica's region");
    }
    assert_eq!(here.len(), there.len(), "{there:?}");
}

/// The processes of one profile, on free loopback ports.
struct Running {
    dir: tempfile::TempDir,
    ports: HashMap<String, u16>,
    procs: Processes,
    /// compose host:port -> 127.0.0.1:port
    names: Vec<(String, String)>,
}

impl Running {
    fn new(moto: Option<&str>) -> Self {
        let mut ports = HashMap::new();
        let mut names = Vec::new();
        for (name, port) in SERVICES.into_iter().chain([CONSOLE]) {
            let free = free_port();
            ports.insert(name.to_owned(), free);
            names.push((format!("{name}:{port}"), format!("127.0.0.1:{free}")));
            names.push((format!("0.0.0.0:{port}"), format!("127.0.0.1:{free}")));
            // Where a browser reaches it (the console's origin).
            names.push((format!("localhost:{port}"), format!("127.0.0.1:{free}")));
        }
        if let Some(moto) = moto {
            names.push(("http://moto:5000".into(), moto.to_owned()));
        }
        Running { dir: tempfile::tempdir().unwrap(), ports, procs: Processes(Vec::new()), names }
    }

    fn remap(&self, value: &str) -> String {
        let mut v = value.to_owned();
        for (from, to) in &self.names {
            v = v.replace(from, to);
        }
        v
    }

    /// The healthcheck command of the image (`command`'s), in its environment.
    fn healthcheck(&self, command: &str, env: &HashMap<String, String>) -> std::process::Output {
        let binary = if command == "tenantmesh-console" { command } else { "tenantmesh" };
        Command::new(service_binary(binary))
            .arg("health")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.clone(), self.remap(v))))
            .output()
            .unwrap()
    }

    /// Starts `process` as its orchestrator would, with `extra` settings
    /// (a `docker compose run -e`): the healthcheck fails before and passes
    /// after.
    async fn start(&mut self, process: &str, (command, mut env): Spec, extra: &[(&str, &str)]) {
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let before = self.healthcheck(&command[0], &env);
        assert!(!before.status.success(), "{process}: healthy before it started");
        let mut cmd = Command::new(service_binary(&command[0]));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(std::fs::File::create(self.dir.path().join(format!("{process}.log"))).unwrap())
            .stderr(Stdio::inherit());
        for (k, v) in &env {
            // No collector runs here; everything else is the file's own value.
            if k != "OTEL_EXPORTER_OTLP_ENDPOINT" {
                cmd.env(k, self.remap(v));
            }
        }
        // The volume, here a directory; the data service logs each write at
        // debug (a line from inside a request); a short drain.
        cmd.env("TENANTMESH_DATA_DIR", self.dir.path().join(process))
            .env("RUST_LOG", "info,tenantmesh_data=debug")
            .env("TENANTMESH_SHUTDOWN_GRACE_MS", "1000");
        self.procs.0.push((process.to_owned(), cmd.spawn().unwrap()));
        let addr: std::net::SocketAddr = self.remap(&env["TENANTMESH_LISTEN_ADDR"]).parse().unwrap();
        if command[0] == "tenantmesh-console" {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !self.healthcheck(&command[0], &env).status.success() {
                assert!(std::time::Instant::now() < deadline, "{process} did not become healthy");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        } else {
            tenantmesh_cli::wait_serving("service", addr).await.unwrap();
        }
        let after = self.healthcheck(&command[0], &env);
        assert!(after.status.success(), "{process}: {}", String::from_utf8_lossy(&after.stderr));
    }

    fn channel(&self, name: &str) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.ports[name]))
            .unwrap()
            .connect_lazy()
    }
}

/// The four services started as `spec` describes them (and, with `silo`,
/// a silo tenant's own container); a pool tenant (and the silo tenant)
/// onboarded, logged in and using their data through them; then every
/// process stopped with SIGTERM.
async fn walk_through(spec: &dyn Fn(&str) -> Spec, moto: Option<&str>, silo: bool) {
    let mut mesh = Running::new(moto);
    // Onboarding reaches a silo tenant's container by its name, through
    // TENANTMESH_SILO_ENDPOINT_TEMPLATE; here, the one such container's port.
    let silo_tenant = unique_tenant("silo");
    let silo_listen = format!("127.0.0.1:{}", free_port());
    if silo {
        let template = spec("onboarding").1["TENANTMESH_SILO_ENDPOINT_TEMPLATE"].clone();
        assert_eq!(template, "http://data-{tenant}:50054", "the silo containers are named data-<tenant id>");
        mesh.names.insert(0, (template, format!("http://{silo_listen}")));
    }
    for (name, _) in SERVICES {
        mesh.start(name, spec(name), &[]).await;
    }
    if silo {
        // The silo tenant's container, as the file's comment starts it:
        // `docker compose run -d --name data-<tenant> ... -e TENANTMESH_SILO_TENANT=<tenant> silo`.
        let settings =
            [("TENANTMESH_SILO_TENANT", silo_tenant.as_str()), ("TENANTMESH_LISTEN_ADDR", silo_listen.as_str())];
        mesh.start(&format!("data-{silo_tenant}"), spec("silo"), &settings).await;
    }

    let mut auth = tenantmesh_proto::auth::v1::auth_client::AuthClient::new(mesh.channel("auth"));
    let login = |tenant: &str, email: &str, password: &str| tenantmesh_proto::auth::v1::LoginRequest {
        tenant_id: tenant.into(),
        email: email.into(),
        password: password.into(),
    };
    let (_, auth_env) = spec("auth");
    let bootstrap = &auth_env["TENANTMESH_BOOTSTRAP_PASSWORD"];
    let admin = auth.login(login("platform", ADMIN_EMAIL, bootstrap)).await.unwrap().into_inner().access_token;
    let mut onboarding =
        tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient::new(mesh.channel("onboarding"));
    let mut data = tenantmesh_proto::data::v1::data_client::DataClient::new(mesh.channel("data"));
    // The example service is in the catalog where the onboarding service
    // reaches it (its advertised compose name), before any tenant exists.
    let advertised = mesh.remap(&spec("orders").1["TENANTMESH_ADVERTISE_URL"]);
    until_listed(mesh.channel("tenant-registry"), &admin, "orders", &advertised).await;
    let mut orders = tenantmesh_orders::proto::orders_client::OrdersClient::new(mesh.channel("orders"));
    let mut order_tokens = Vec::new();
    let pool_tenant = unique_tenant("compose");
    let tenants = [(&pool_tenant, "basic"), (&silo_tenant, "enterprise")];
    let mut pool_token = String::new();
    for &(tenant, tier) in &tenants[..if silo { 2 } else { 1 }] {
        let register = RegisterTenantRequest {
            tenant_id: tenant.clone(),
            name: "Compose".into(),
            tier: tier.into(),
            admin_email: "admin@compose.example".into(),
            admin_password: "compose-password".into(),
            idempotency_key: format!("register-{tenant}"),
        };
        onboarding.register_tenant(authed(register, &admin)).await.unwrap();
        // Onboarding runs on after RegisterTenant returns.
        let workflow = format!("{tenant}/onboard");
        let mut done = false;
        for _ in 0..800 {
            let req = authed(GetWorkflowRequest { workflow_id: workflow.clone() }, &admin);
            let wf = onboarding.get_workflow(req).await.unwrap().into_inner().workflow.unwrap();
            if wf.status == WorkflowStatus::Succeeded as i32 {
                done = true;
                break;
            }
            assert_eq!(wf.status, WorkflowStatus::Running as i32, "{wf:?}");
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(done, "{tenant} was not onboarded");
        let token = auth
            .login(login(tenant, "admin@compose.example", "compose-password"))
            .await
            .unwrap()
            .into_inner()
            .access_token;
        let put = PutItemRequest {
            collection: "c".into(),
            id: "1".into(),
            attributes: Some(attrs(&[("tier", tier)])),
            expected_version: None,
        };
        data.put_item(authed(put, &token)).await.unwrap();
        if tenant == &pool_tenant {
            pool_token = token.clone();
        }
        // An order for a product of its catalog: in the pooled orders
        // table, or (silo) the tenant's own, provisioned by its onboarding.
        let product =
            PutItemRequest { collection: "products".into(), id: "p1".into(), attributes: None, expected_version: None };
        data.put_item(authed(product, &token)).await.unwrap();
        let order = tenantmesh_orders::proto::CreateOrderRequest {
            order_id: format!("o-{tier}"),
            product_id: "p1".into(),
            quantity: 1,
        };
        orders.create_order(authed(order, &token)).await.unwrap();
        order_tokens.push((tier, token.clone()));
        let req = authed(GetItemRequest { collection: "c".into(), id: "1".into() }, &token);
        let got = data.get_item(req).await.unwrap().into_inner().item.unwrap();
        assert_eq!(
            (got.version, got.attributes.unwrap().fields["tier"].clone()),
            (1, attrs(&[("tier", tier)]).fields["tier"].clone())
        );
    }
    // Each tenant sees its own order only.
    for (tier, token) in &order_tokens {
        let req =
            authed(tenantmesh_orders::proto::ListOrdersRequest { page_size: 10, page_token: String::new() }, token);
        let listed = orders.list_orders(req).await.unwrap().into_inner().orders;
        let ids: Vec<&str> = listed.iter().map(|o| o.order_id.as_str()).collect();
        assert_eq!(ids, [format!("o-{tier}")], "{tier}");
    }
    if moto.is_some() {
        let mut files = Vec::new();
        let mut dirs = vec![mesh.dir.path().to_owned()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    dirs.push(e.path());
                } else if e.path().extension().is_some_and(|x| x == "redb") {
                    files.push(e.path());
                }
            }
        }
        assert!(files.is_empty(), "on DynamoDB nothing is stored locally: {files:?}");
    }
    if silo {
        // The silo tenant's item is in its own container's store, not the shared one.
        let silo_log = std::fs::read_to_string(mesh.dir.path().join(format!("data-{silo_tenant}.log"))).unwrap();
        assert!(silo_log.contains("item written"), "the silo container did not write: {silo_log}");
    }

    // Every container can be backed up while it runs (`tenantmesh backup
    // --addr <service>`), each with its own store; on DynamoDB there is
    // nothing local to back up.
    for (name, store) in [
        ("tenant-registry", "registry.redb"),
        ("auth", "auth.redb"),
        ("onboarding", "onboarding.redb"),
        ("data", "data.redb"),
        ("orders", "orders-orders.redb"),
    ] {
        let out = mesh.dir.path().join(format!("backup-{name}"));
        let taken = tenantmesh_cli::backup::take(&format!("127.0.0.1:{}", mesh.ports[name]), &admin, &out).await;
        match (moto, taken) {
            (None, Ok(m)) => assert!(m.files.iter().any(|f| f.path == store), "{name}: {m:?}"),
            (Some(_), Err(e)) => assert!(e.contains("FailedPrecondition"), "{name}: {e}"),
            (_, other) => panic!("{name}: {other:?}"),
        }
    }

    // No collector here, so no OpenTelemetry layer: the services keep the
    // W3C trace context themselves, and a caller's trace id is on the log
    // line of its request.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(GetItemRequest { collection: "c".into(), id: "1".into() });
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    expect_code(data.get_item(req).await, tonic::Code::Unauthenticated);
    // A call nobody proved: a token with a broken signature, a wrong
    // password. Their lines are filed under the tenant they claim, marked
    // as claimed.
    let mut forged = pool_token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let req = authed(GetItemRequest { collection: "c".into(), id: "1".into() }, &forged);
    expect_code(data.get_item(req).await, tonic::Code::Unauthenticated);
    let wrong = auth.login(login(&pool_tenant, "admin@compose.example", "not-the-password")).await;
    expect_code(wrong, tonic::Code::Unauthenticated);

    // The console, as its container runs: the operator signs in and sees
    // the tenant onboarded above, through the services' compose names.
    mesh.start(CONSOLE.0, spec(CONSOLE.0), &[]).await;
    let console: std::net::SocketAddr = format!("127.0.0.1:{}", mesh.ports[CONSOLE.0]).parse().unwrap();
    let mut browser = crate::operator::console::Browser::new(console);
    browser.sign_in("platform", ADMIN_EMAIL, bootstrap).await;
    let shown = browser.json(&format!("/api/tenants/{pool_tenant}?hours=1")).await;
    assert_eq!((shown["tenant"]["tier"].as_str(), shown["tenant"]["status"].as_str()), (Some("basic"), Some("ACTIVE")));

    // SIGTERM, callers first (as an orchestrator stops them): every service
    // stops and exits 0, bounded by its grace period.
    drop((auth, onboarding, data, orders));
    let line_of = |log: &str, message: &str| -> serde_json::Value {
        let found = log.lines().find(|l| l.contains(message)).unwrap_or_else(|| panic!("no {message:?} in {log}"));
        serde_json::from_str(found).unwrap()
    };
    for (name, child) in mesh.procs.0.iter_mut().rev() {
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{name} did not exit cleanly on SIGTERM: {status:?}");
        let log = std::fs::read_to_string(mesh.dir.path().join(format!("{name}.log"))).unwrap();
        assert!(log.contains("shutting down: draining in-flight calls"), "{name} did not drain:\n{log}");
        if name == "data" {
            let refused = log.lines().find(|l| l.contains("request refused")).expect("the refusal is logged");
            assert!(refused.contains(&format!("\"trace_id\":\"{trace_id}\"")), "{refused}");
            // A line logged inside an authenticated request carries its tenant and a trace id.
            let written = log.lines().find(|l| l.contains("item written")).expect("the write is logged");
            let line: serde_json::Value = serde_json::from_str(written).unwrap();
            assert_eq!(
                (line["tenant_id"].as_str(), line["tenant_tier"].as_str()),
                (Some(pool_tenant.as_str()), Some("basic"))
            );
            assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{written}");
            let refused = line_of(&log, "refused a token");
            assert_eq!(
                (refused["tenant_id"].as_str(), &refused["tenant_claimed"]),
                (Some(pool_tenant.as_str()), &true.into())
            );
            assert_eq!(refused["service"], "data");
        }
        if name == "auth" {
            // A sign-in is filed under its tenant: claimed until the
            // password is checked.
            let refused = line_of(&log, "login refused");
            assert_eq!(
                (refused["tenant_id"].as_str(), &refused["tenant_claimed"]),
                (Some(pool_tenant.as_str()), &true.into())
            );
            let signed_in = log
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|l| l["message"] == "login succeeded" && l["tenant_id"] == pool_tenant.as_str())
                .expect("the tenant admin's sign-in is filed under the tenant");
            assert!(signed_in.get("tenant_claimed").is_none(), "{signed_in}");
        }
    }
}

/// The default profile, as a demo: `TENANTMESH_DEMO=true docker compose up`.
#[tokio::test]
async fn the_default_profile_wires_the_services_on_the_embedded_store() {
    let doc = compose();
    walk_through(&|name| environment(&doc, name, &[("TENANTMESH_DEMO", "true")]), None, true).await;
}

/// `moto-init` as the dynamodb profile runs it: the script from the mounted
/// directory, with the service's environment, against the emulator.
fn moto_init(doc: &Yaml, moto: &str, shell: Shell) -> std::process::Output {
    let (_, env) = environment(doc, "moto-init", shell);
    let svc = service(doc, "moto-init");
    let entrypoint = strings(&svc["entrypoint"]);
    assert_eq!(entrypoint[0], "python");
    // ./deploy/compose:/init:ro -> the script's path in the repository.
    let mount = strings(&svc["volumes"]).remove(0);
    let mut parts = mount.split(':');
    let (host, container) = (parts.next().unwrap(), parts.next().unwrap());
    let script =
        PathBuf::from(entrypoint[1].replacen(container, &workspace_root().join(host).display().to_string(), 1));
    let python = workspace_root().join(".tools/venv/bin/python3");
    assert!(python.exists(), "{} is missing: run `cargo xtask setup`", python.display());
    Command::new(python)
        .arg(script)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.clone(), v.replace("http://moto:5000", moto))))
        .output()
        .unwrap()
}

/// The dynamodb profile: `TENANTMESH_STORAGE=dynamodb docker compose
/// --profile dynamodb up` (as a demo). The set-up is idempotent and refuses
/// to run without TENANTMESH_STORAGE=dynamodb; the services, which create no
/// table themselves there, work on what it made.
#[tokio::test]
async fn the_dynamodb_profile_sets_up_the_emulator_and_wires_the_services_on_it() {
    let moto = moto::Moto::start();
    let doc = compose();
    let shell = [("TENANTMESH_DEMO", "true"), ("TENANTMESH_STORAGE", "dynamodb")];

    let refused = moto_init(&doc, &moto.endpoint, &[("TENANTMESH_DEMO", "true")]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("TENANTMESH_STORAGE=dynamodb"));
    for _ in 0..2 {
        let out = moto_init(&doc, &moto.endpoint, &shell);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("ready"), "{stdout}");
    }
    let (_, env) = environment(&doc, "data", &shell);
    assert_eq!((env["TENANTMESH_STORAGE"].as_str(), env["TENANTMESH_CREATE_TABLES"].as_str()), ("dynamodb", "false"));
    walk_through(&|name| environment(&doc, name, &shell), Some(&moto.endpoint), true).await;
}

/// deploy/k8s/base's documents, every file.
fn kubernetes_base() -> Vec<Yaml> {
    let dir = workspace_root().join("deploy/k8s/base");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_name() != "kustomization.yaml" {
            docs.extend(YamlLoader::load_from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap());
        }
    }
    docs
}

fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A Deployment's container as Kubernetes starts it: the ConfigMaps it
/// takes its environment from, its own variables (`$(VAR)` expanded,
/// secrets from `secrets`), and the mounted ConfigMap files written under
/// `files` (their paths in the environment rewritten). Checks the
/// container's port is its Service's and its probes'.
fn kubernetes_spec(docs: &[Yaml], name: &str, secrets: &HashMap<&str, &str>, files: &std::path::Path) -> Spec {
    let deployment = object(docs, "Deployment", name);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut env: HashMap<String, String> = HashMap::new();
    for from in container["envFrom"].as_vec().unwrap() {
        let map = object(docs, "ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in entries(&map["data"]) {
            env.insert(k, v.as_str().unwrap().to_owned());
        }
    }
    for var in container["env"].as_vec().unwrap() {
        let key = var["name"].as_str().unwrap().to_owned();
        let value = match var["value"].as_str() {
            Some(v) => {
                let mut v = v.to_owned();
                for (k, known) in &env {
                    v = v.replace(&format!("$({k})"), known);
                }
                assert!(!v.contains("$("), "{name}: {key} refers to an undefined variable");
                v
            }
            None => {
                let secret = &var["valueFrom"]["secretKeyRef"];
                assert_eq!(secret["name"].as_str(), Some("tenantmesh-secrets"), "{name}: {key}");
                secrets[secret["key"].as_str().unwrap()].to_owned()
            }
        };
        env.insert(key, value);
    }
    for mount in container["volumeMounts"].as_vec().unwrap() {
        let volume = pod["volumes"].as_vec().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        let Some(config) = volume["configMap"]["name"].as_str() else { continue };
        let at = mount["mountPath"].as_str().unwrap();
        for (file, text) in entries(&object(docs, "ConfigMap", config)["data"]) {
            std::fs::write(files.join(&file), text.as_str().unwrap()).unwrap();
        }
        for v in env.values_mut() {
            *v = v.replace(at, &files.display().to_string());
        }
    }
    let port = container["ports"][0]["containerPort"].as_i64().unwrap();
    assert_eq!(env["TENANTMESH_LISTEN_ADDR"], format!("0.0.0.0:{port}"), "{name}");
    for probe in ["readinessProbe", "livenessProbe"] {
        if name == CONSOLE.0 {
            assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some("/healthz"), "{name}");
            assert_eq!(container[probe]["httpGet"]["port"].as_i64(), Some(port), "{name}");
        } else {
            assert_eq!(container[probe]["grpc"]["port"].as_i64(), Some(port), "{name}");
        }
    }
    assert_eq!(object(docs, "Service", name)["spec"]["ports"][0]["port"].as_i64(), Some(port), "{name}");
    (strings(&container["command"]), env)
}

/// The Secret tenantmesh-secrets, as the README creates it.
fn kubernetes_secrets() -> HashMap<&'static str, &'static str> {
    [
        ("onboarding-client-secret", "k8s-test-onboarding-secret"),
        ("data-client-secret", "k8s-test-data-secret-0"),
        ("auth-client-secret", "k8s-test-auth-secret-0"),
        ("orders-client-secret", "k8s-test-orders-secret"),
        ("bootstrap-password", "k8s-test-bootstrap"),
    ]
    .into()
}

/// deploy/k8s/base, without a cluster: the four Deployments' containers run
/// with the environment Kubernetes would give them (ConfigMap, variables,
/// Secret, mounted tiers and pricing files), and a tenant is onboarded and
/// uses its data through them.
#[tokio::test]
async fn the_kubernetes_base_wires_the_services() {
    let docs = kubernetes_base();
    let files = tempfile::tempdir().unwrap();
    let secrets = kubernetes_secrets();
    let specs: HashMap<&str, Spec> = SERVICES
        .iter()
        .chain([&CONSOLE])
        .map(|(name, _)| (*name, kubernetes_spec(&docs, name, &secrets, files.path())))
        .collect();
    assert!(!specs["auth"].1.contains_key("TENANTMESH_DEMO"), "no demo mode in a cluster");
    walk_through(&|name| specs[name].clone(), None, false).await;
}

/// The README's "Run with docker compose", "Deploy to Kubernetes" and
/// "Deploy to AWS" commands, which need Docker, a cluster or an AWS account,
/// checked against the files they name: profiles, services, variables,
/// kustomizations, secrets and their keys, ports, template and parameters.
#[test]
fn the_readme_deploy_commands_match_the_files() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = |title: &str| -> String {
        let start = readme.find(&format!("\n## {title}\n")).unwrap_or_else(|| panic!("README has no {title}"));
        let rest = &readme[start + 4..];
        rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
    };
    // The shell commands of a section, continuation lines joined.
    let commands = |text: &str| -> Vec<String> {
        let mut out = Vec::new();
        for block in text.split("```sh\n").skip(1) {
            let block = block.split("```").next().unwrap().replace("\\\n", " ");
            out.extend(block.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(str::to_owned));
        }
        assert!(!out.is_empty(), "no commands");
        out
    };
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let arg_after = |words: &[&str], flag: &str| -> Option<String> {
        words.iter().position(|w| *w == flag).map(|i| words[i + 1].to_owned())
    };

    let compose_text = read("docker-compose.yml");
    let doc = compose();
    for command in commands(&section("Run with docker compose")) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "docker").expect("a docker command");
        for assignment in &words[..at] {
            let var = assignment.split('=').next().unwrap();
            assert!(compose_text.contains(&format!("${{{var}:-")), "the compose file does not read {var}");
        }
        if let Some(profile) = arg_after(&words, "--profile") {
            assert!(compose_text.contains(&format!("profiles: [\"{profile}\"]")), "no profile {profile}");
        }
        if words.contains(&"run") {
            let service_name = *words.last().unwrap();
            service(&doc, service_name);
            let name = arg_after(&words, "--name").unwrap();
            let tenant = arg_after(&words, "-e").unwrap().strip_prefix("TENANTMESH_SILO_TENANT=").unwrap().to_owned();
            let (_, onboarding) = environment(&doc, "onboarding", &[]);
            let host = onboarding["TENANTMESH_SILO_ENDPOINT_TEMPLATE"].replace("{tenant}", &tenant);
            assert_eq!(host, format!("http://{name}:50054"), "onboarding would not find {name}");
            let volume = arg_after(&words, "-v").unwrap();
            assert!(
                read("deploy/Dockerfile")
                    .contains(&format!("TENANTMESH_DATA_DIR={}", volume.split(':').nth(1).unwrap()))
            );
        }
    }

    let k8s = section("Deploy to Kubernetes");
    let mut manifests = String::new();
    for dir in ["deploy/k8s/base", "deploy/k8s/overlays/dynamodb"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            manifests.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    let base = kubernetes_base();
    for command in commands(&k8s) {
        let words: Vec<&str> = command.split_whitespace().collect();
        if let Some(dir) = arg_after(&words, "-k") {
            assert!(root.join(&dir).join("kustomization.yaml").exists(), "{dir} is not a kustomization");
        }
        if let Some(namespace) = arg_after(&words, "-n").or_else(|| (words[1] == "create").then(|| words[3].to_owned()))
        {
            assert!(read("deploy/k8s/base/kustomization.yaml").contains(&format!("namespace: {namespace}")));
        }
        if words.contains(&"secret") {
            let name = words[words.iter().position(|w| *w == "generic").unwrap() + 1];
            assert!(manifests.contains(&format!("name: {name}\n")), "nothing reads the secret {name}");
            for literal in words.iter().filter_map(|w| w.strip_prefix("--from-literal=")) {
                let key = literal.split('=').next().unwrap();
                assert!(manifests.contains(&format!("key: {key}\n")), "nothing reads {name}'s key {key}");
            }
        }
        if let Some(target) = words.iter().find_map(|w| w.strip_prefix("svc/")) {
            let port: i64 = words.last().unwrap().split(':').next().unwrap().parse().unwrap();
            assert_eq!(object(&base, "Service", target)["spec"]["ports"][0]["port"].as_i64(), Some(port));
        }
    }
    let flux_path = k8s.split("path: ./").nth(1).unwrap().lines().next().unwrap();
    assert!(
        read("deploy/k8s/overlays/dynamodb/config.patch.yaml")
            .contains(&format!("TENANTMESH_SILO_GITOPS_PATH: \"{flux_path}\"")),
        "Flux watches {flux_path}, onboarding writes elsewhere"
    );

    for command in commands(&section("Deploy to AWS")) {
        let words: Vec<&str> = command.split_whitespace().collect();
        if words[2] != "deploy" {
            continue;
        }
        let template = read(&arg_after(&words, "--template-file").unwrap());
        let parameters = template.split("\nParameters:\n").nth(1).unwrap().split("\nResources:\n").next().unwrap();
        let overrides = &words[words.iter().position(|w| *w == "--parameter-overrides").unwrap() + 1..];
        for key in overrides.iter().map(|o| o.split('=').next().unwrap()) {
            assert!(parameters.contains(&format!("\n  {key}:\n")), "the template has no parameter {key}");
        }
        // CAPABILITY_IAM suffices only while no IAM resource is named.
        assert_eq!(arg_after(&words, "--capabilities").as_deref(), Some("CAPABILITY_IAM"));
        assert!(!template.contains("RoleName:") && !template.contains("ManagedPolicyName:"));
    }
}

/// deploy/k8s/overlays/dynamodb as Kubernetes gets it (`kubectl kustomize`,
/// the kubectl `cargo xtask setup` installs), without a cluster: the
/// emulator set up as the CloudFormation stack would be (moto-init), the
/// init container's clone of the fleet repository run as written, and the
/// four services started with the environment the rendered Deployments
/// give them (AWS credentials, which IRSA gives in a cluster, from the
/// emulator), a tenant onboarded and using its data through them.
#[tokio::test]
async fn the_kubernetes_dynamodb_overlay_wires_the_services() {
    let overlay = workspace_root().join("deploy/k8s/overlays/dynamodb");
    let rendered = Command::new(tool("kubectl")).arg("kustomize").arg(&overlay).output().unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let docs = YamlLoader::load_from_str(&String::from_utf8(rendered.stdout).unwrap()).unwrap();
    let moto = moto::Moto::start();
    let init = moto_init(&compose(), &moto.endpoint, &[("TENANTMESH_STORAGE", "dynamodb")]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let files = tempfile::tempdir().unwrap();
    let secrets = kubernetes_secrets();
    let mut specs: HashMap<&str, Spec> = SERVICES
        .iter()
        .chain([&CONSOLE])
        .map(|(name, _)| (*name, kubernetes_spec(&docs, name, &secrets, files.path())))
        .collect();

    // Onboarding's init container, run as written, against a local "remote".
    let volume = files.path().join("volume");
    let remote = files.path().join("fleet.git");
    std::fs::create_dir_all(&volume).unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    git(files.path(), &["init", "--quiet", "--bare", remote.to_str().unwrap()]);
    let seed = files.path().join("seed");
    git(files.path(), &["clone", "--quiet", remote.to_str().unwrap(), seed.to_str().unwrap()]);
    git(
        &seed,
        &[
            "-c",
            "user.name=fleet",
            "-c",
            "user.email=fleet@example.invalid",
            "commit",
            "--quiet",
            "--allow-empty",
            "-m",
            "fleet",
        ],
    );
    git(&seed, &["push", "--quiet", "origin", "HEAD"]);
    let onboarding = object(&docs, "Deployment", "onboarding");
    let init_container = &onboarding["spec"]["template"]["spec"]["initContainers"][0];
    let mount = init_container["volumeMounts"][0]["mountPath"].as_str().unwrap().to_owned();
    let script = strings(&init_container["command"])[2].replace(&mount, &volume.display().to_string());
    for _ in 0..2 {
        // A restarted pod runs it again over the clone it left.
        let out = Command::new("sh").args(["-c", &script]).env("FLEET_URL", &remote).output().unwrap();
        assert!(out.status.success(), "the init container: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The overlay's placeholder account replaced with the emulator's, as a
    // user puts theirs (a tenant role in another account sees no table).
    assert!(uses_the_placeholder_account(&docs));
    for (_, env) in specs.values_mut() {
        for v in env.values_mut() {
            *v = v.replace(&mount, &volume.display().to_string()).replace("111122223333", "123456789012");
        }
        env.extend(moto.env());
    }
    let (_, onboarding_env) = &specs["onboarding"];
    assert_eq!(onboarding_env["TENANTMESH_STORAGE"], "dynamodb");
    assert!(std::path::Path::new(&onboarding_env["TENANTMESH_SILO_GITOPS_REPO"]).join(".git").exists());
    walk_through(&|name| specs[name].clone(), Some(&moto.endpoint), false).await;
}

/// The dynamodb overlay names the placeholder account the README tells
/// users to replace.
fn uses_the_placeholder_account(docs: &[Yaml]) -> bool {
    let config = object(docs, "ConfigMap", "tenantmesh-config");
    config["data"]["TENANTMESH_TENANT_ROLE_ARN"].as_str().is_some_and(|arn| arn.contains(":111122223333:"))
}

/// The tiers and pricing files in deploy/k8s/base are the binaries' built-in
/// defaults, so a change to one is made to the other (a deployment edits its
/// own copy).
#[test]
fn the_kubernetes_config_carries_the_built_in_tiers_and_prices() {
    let docs = kubernetes_base();
    let files = &object(&docs, "ConfigMap", "tenantmesh-files")["data"];
    assert_eq!(files["tiers.toml"].as_str(), Some(tenantmesh_service::tiers::DEFAULT_TIERS_TOML));
    assert_eq!(files["pricing.toml"].as_str(), Some(tenantmesh_metering::pricing::DEFAULT_PRICING_TOML));
}
