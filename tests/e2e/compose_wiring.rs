//! docker-compose.yml's service-to-service wiring, exercised without a
//! Docker engine: the four standalone service binaries run as separate
//! processes with exactly the environment compose gives them (compose host
//! names and ports mapped to free loopback ports), and a tenant is onboarded
//! and uses its data through them.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tenantmesh_proto::onboarding::v1::{GetWorkflowRequest, RegisterTenantRequest, WorkflowStatus};
use tenantmesh_test_support::*;
use yaml_rust2::{Yaml, YamlLoader};

/// The compose services that are tenantmesh binaries, with their ports.
const SERVICES: [(&str, u16); 4] =
    [("tenant-registry", 50051), ("auth", 50052), ("onboarding", 50053), ("data", 50054)];

struct Service {
    binary: String,
    env: HashMap<String, String>,
}

/// `${VAR:-default}` with the default (the test never reads the host's variables).
fn expand_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let expr = &rest[start + 2..end];
        let (_, default) = expr.split_once(":-").unwrap_or_else(|| panic!("${{{expr}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out + rest
}

fn compose_services() -> HashMap<String, Service> {
    let text = std::fs::read_to_string(workspace_root().join("docker-compose.yml")).unwrap();
    let doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
    let mut out = HashMap::new();
    for (name, _) in SERVICES {
        let svc = &doc["services"][name];
        assert!(!svc.is_badvalue(), "compose has no service {name}");
        let binary = svc["command"][0].as_str().unwrap_or_else(|| panic!("{name}: no command")).to_owned();
        let Yaml::Hash(env) = &svc["environment"] else { panic!("{name}: environment must be a map") };
        let env = env
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_owned(), expand_defaults(v.as_str().expect("string values"))))
            .collect();
        out.insert(name.to_owned(), Service { binary, env });
    }
    out
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

/// With compose's defaults alone, auth and onboarding refuse to start on
/// the placeholder secrets, naming the variable to set.
#[test]
fn placeholder_secrets_are_refused_outside_a_demo() {
    let services = compose_services();
    let dir = tempfile::tempdir().unwrap();
    for (name, var) in [
        ("auth", "TENANTMESH_SERVICE_CLIENTS"),
        ("onboarding", "TENANTMESH_SERVICE_CLIENT_SECRET"),
        ("data", "TENANTMESH_SERVICE_CLIENT_SECRET"),
    ] {
        let svc = &services[name];
        assert_eq!(svc.env["TENANTMESH_DEMO"], "false", "{name}");
        let out = Command::new(service_binary(&svc.binary))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TENANTMESH_DATA_DIR", dir.path().join(name))
            .envs(svc.env.iter().filter(|(k, _)| !k.starts_with("OTEL_")))
            .env("TENANTMESH_LISTEN_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} started on a placeholder secret");
        assert!(stderr.contains(var) && stderr.contains("placeholder"), "{name}: {stderr}");
        // One line naming the process and the variable, not a Debug dump.
        let line = stderr.lines().last().unwrap_or_default();
        assert!(line.starts_with(&format!("{}: TENANTMESH_", svc.binary)), "{name}: {stderr}");
    }
}

/// Onboarding, login and data work across the four compose services run
/// as separate processes with compose's environment (as a demo:
/// `TENANTMESH_DEMO=true docker compose up`).
#[tokio::test]
async fn compose_environment_wires_the_services() {
    let mut services = compose_services();
    for svc in services.values_mut() {
        if let Some(demo) = svc.env.get_mut("TENANTMESH_DEMO") {
            *demo = "true".into();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let free: Vec<u16> = SERVICES
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
        .collect();
    let remap = |value: &str| {
        let mut v = value.to_owned();
        for ((name, port), to) in SERVICES.iter().zip(&free) {
            v = v.replace(&format!("{name}:{port}"), &format!("127.0.0.1:{to}"));
            v = v.replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{to}"));
        }
        v
    };

    let mut procs = Processes(Vec::new());
    for (name, _) in SERVICES {
        let svc = &services[name];
        let mut cmd = Command::new(service_binary(&svc.binary));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // The data service logs each write at debug: a line from inside a request.
            .env("RUST_LOG", "info,tenantmesh_data=debug")
            .env("TENANTMESH_SHUTDOWN_GRACE_MS", "1000")
            .env("TENANTMESH_DATA_DIR", dir.path().join(name))
            .stdout(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap())
            .stderr(Stdio::inherit());
        for (k, v) in &svc.env {
            // No collector runs here; everything else is compose's own value.
            if k != "OTEL_EXPORTER_OTLP_ENDPOINT" {
                cmd.env(k, remap(v));
            }
        }
        procs.0.push((name.to_owned(), cmd.spawn().unwrap()));
    }
    for ((name, _), port) in SERVICES.iter().zip(&free) {
        tenantmesh_cli::wait_serving(name, ([127, 0, 0, 1], *port).into()).await.unwrap();
    }

    let addr = |i: usize| format!("http://127.0.0.1:{}", free[i]);
    let channel = |i: usize| tonic::transport::Endpoint::from_shared(addr(i)).unwrap().connect_lazy();
    let mut auth = tenantmesh_proto::auth::v1::auth_client::AuthClient::new(channel(1));
    let login = |tenant: &str, email: &str, password: &str| tenantmesh_proto::auth::v1::LoginRequest {
        tenant_id: tenant.into(),
        email: email.into(),
        password: password.into(),
    };
    let bootstrap = &services["auth"].env["TENANTMESH_BOOTSTRAP_PASSWORD"];
    let admin = auth.login(login("platform", ADMIN_EMAIL, bootstrap)).await.unwrap().into_inner().access_token;

    let tenant = unique_tenant("compose");
    let mut onboarding = tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient::new(channel(2));
    onboarding
        .register_tenant(authed(
            RegisterTenantRequest {
                tenant_id: tenant.clone(),
                name: "Compose".into(),
                tier: "basic".into(),
                admin_email: "admin@compose.example".into(),
                admin_password: "compose-password".into(),
                idempotency_key: "k".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    // Onboarding runs on after RegisterTenant returns.
    let workflow = format!("{tenant}/onboard");
    for _ in 0..400 {
        let req = authed(GetWorkflowRequest { workflow_id: workflow.clone() }, &admin);
        let wf = onboarding.get_workflow(req).await.unwrap().into_inner().workflow.unwrap();
        if wf.status == WorkflowStatus::Succeeded as i32 {
            break;
        }
        assert_eq!(wf.status, WorkflowStatus::Running as i32, "{wf:?}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let token = auth
        .login(login(&tenant, "admin@compose.example", "compose-password"))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let mut data = tenantmesh_proto::data::v1::data_client::DataClient::new(channel(3));
    let put = PutItemRequest {
        collection: "c".into(),
        id: "1".into(),
        attributes: Some(attrs(&[("k", "v")])),
        expected_version: None,
    };
    data.put_item(authed(put, &token)).await.unwrap();
    let got = data.get_item(authed(GetItemRequest { collection: "c".into(), id: "1".into() }, &token)).await.unwrap();
    assert_eq!(got.into_inner().item.unwrap().version, 1);

    // No collector here, so no OpenTelemetry layer: the services keep the
    // W3C trace context themselves, and a caller's trace id is on the log
    // line of its request.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(GetItemRequest { collection: "c".into(), id: "1".into() });
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    expect_code(data.get_item(req).await, tonic::Code::Unauthenticated);

    // SIGTERM, callers first (as an orchestrator stops them): every service
    // stops and exits 0, bounded by its grace period.
    drop((auth, onboarding, data));
    for (name, child) in procs.0.iter_mut().rev() {
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{name} did not exit cleanly on SIGTERM: {status:?}");
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert!(log.contains("shutting down: draining in-flight calls"), "{name} did not drain:\n{log}");
        if name == "data" {
            let refused = log.lines().find(|l| l.contains("request refused")).expect("the refusal is logged");
            assert!(refused.contains(&format!("\"trace_id\":\"{trace_id}\"")), "{refused}");
            // A line logged inside an authenticated request carries its tenant and a trace id.
            let written = log.lines().find(|l| l.contains("item written")).expect("the write is logged");
            let line: serde_json::Value = serde_json::from_str(written).unwrap();
            assert_eq!(
                (line["tenant_id"].as_str(), line["tenant_tier"].as_str()),
                (Some(tenant.as_str()), Some("basic"))
            );
            assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{written}");
        }
    }
}
