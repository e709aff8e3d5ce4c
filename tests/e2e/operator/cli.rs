//! The operator's `tenantmesh` commands against a real mesh, as a person
//! or a script runs them: the session file, refresh and logout, a
//! workflow followed to its failure and retried, JSON for scripts, a
//! restore to an instant, a tenant admin confined to their tenant, and
//! errors that say what to do.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use tenantmesh_proto::data::v1::{DeleteItemRequest, GetItemRequest};
use tenantmesh_test_support::*;
use tonic::Code;

/// The `tenantmesh` binary with its own config dir, pointed at a mesh.
struct Cli {
    config: tempfile::TempDir,
    addrs: Vec<(&'static str, String)>,
}

impl Cli {
    fn new(mesh: &TestMesh) -> Cli {
        let a = mesh.addrs;
        let addrs = vec![
            ("TENANTMESH_REGISTRY_ADDR", a.registry.to_string()),
            ("TENANTMESH_AUTH_ADDR", a.auth.to_string()),
            ("TENANTMESH_ONBOARDING_ADDR", a.onboarding.to_string()),
            ("TENANTMESH_DATA_ADDR", a.data.to_string()),
        ];
        Cli { config: tempfile::tempdir().unwrap(), addrs }
    }

    fn session_path(&self) -> std::path::PathBuf {
        self.config.path().join("session.json")
    }

    /// Runs `tenantmesh args` with `stdin`; its output (stdout is a pipe,
    /// so progress comes as plain lines).
    fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(service_binary("tenantmesh"))
            .args(args)
            .envs(self.addrs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TENANTMESH_CONFIG_DIR", self.config.path())
            .env_remove("TENANTMESH_PASSWORD")
            .env_remove("TENANTMESH_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs and expects success; its stdout.
    fn ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, stdin);
        assert!(out.status.success(), "tenantmesh {args:?} failed: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects exit status 1; its stdout and stderr.
    fn fails(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, stdin);
        assert_eq!(out.status.code(), Some(1), "tenantmesh {args:?} should fail: {}", text(&out));
        text(&out)
    }

    fn login_operator(&self) {
        let out = self.ok(&["login", "--email", ADMIN_EMAIL, "--password-stdin"], &format!("{ADMIN_PASSWORD}\n"));
        assert!(out.contains("signed in as admin@platform.local of tenant platform"), "{out}");
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A workflow that fails is followed to its failing step, exits 1 with the
/// step's error and how to retry; `workflow retry` finishes it. JSON output
/// parses, and the tenant's workflows list newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_workflow_is_followed_and_retried() {
    let faults = "fail-permanent:activate_tenant:1";
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_FAULTS", faults)]).await;
    let cli = Cli::new(&mesh);
    cli.login_operator();
    let id = unique_tenant("cli");
    let register = ["tenant", "register", &id, "--name", "CLI <b>&", "--tier", "standard"];
    let out = cli.fails(
        &[&register[..], &["--admin-email", "admin@cli.example", "--password-stdin"]].concat(),
        "cli-admin-password\n",
    );
    assert!(out.contains(&format!("{id}/onboard  create_tenant  done  attempt 1")), "{out}");
    assert!(out.contains(&format!("{id}/onboard  activate_tenant  failed  attempt 1")), "{out}");
    assert!(out.contains(&format!("tenantmesh tenant register: {id}/onboard FAILED: activate_tenant")), "{out}");
    assert!(out.contains(&format!("tenantmesh workflow retry {id}/onboard")), "{out}");

    let shown = cli.ok(&["workflow", "show", &id], "");
    assert!(shown.contains("status    FAILED") && shown.contains("activate_tenant"), "{shown}");
    let out = cli.ok(&["workflow", "retry", &format!("{id}/onboard")], "");
    assert!(out.contains(&format!("{id}/onboard SUCCEEDED")), "{out}");

    // -o json: one object per change, then the workflow.
    let out = cli.ok(&["tenant", "change-tier", &id, "premium", "-o", "json"], "");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["name"] == "switch_placement" && l["state"] == "DONE"), "{out}");
    let last = &lines.last().unwrap()["workflow"];
    assert_eq!((last["kind"].as_str(), last["status"].as_str()), (Some("change_tier"), Some("SUCCEEDED")));

    let listed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["workflow", "list", &id, "-o", "json"], "")).unwrap();
    let kinds: Vec<&str> = listed.as_array().unwrap().iter().map(|w| w["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["change_tier", "onboard"]);
    let shown: serde_json::Value = serde_json::from_str(&cli.ok(&["tenant", "show", &id, "-o", "json"], "")).unwrap();
    assert_eq!(shown["tenant"]["model"], "bridge");
    assert_eq!(shown["tenant"]["name"], "CLI <b>&");
    assert_eq!(shown["workflow"]["kind"], "change_tier");
    assert!(shown["resources"].as_array().unwrap().iter().any(|r| r["kind"] == "table"), "{shown}");
    let list = cli.ok(&["tenant", "list"], "");
    assert!(list.lines().any(|l| l.starts_with(&id) && l.contains("premium") && l.contains("ACTIVE")), "{list}");

    // Bad input names the field; an unknown tenant says so.
    let out = cli.fails(&["tenant", "change-tier", &id, "gold"], "");
    assert!(out.contains("invalid tier:"), "{out}");
    let out = cli.fails(&["tenant", "show", &unique_tenant("nobody")], "");
    assert!(out.contains("not found"), "{out}");
    let out = cli.fails(&["tenant", "offboard", &id], "");
    assert!(out.contains("pass --yes"), "{out}");

    // --watch: the list, then a line per tenant as it changes.
    let mut watch = Command::new(service_binary("tenantmesh"))
        .args(["tenant", "list", "--watch", "-o", "json"])
        .envs(cli.addrs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TENANTMESH_CONFIG_DIR", cli.config.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
    });
    let listed = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(listed.contains("\"tenant_id\""), "{listed}");
    // Once the watch is open (its first lines are the list), a change.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    cli.ok(&["tenant", "suspend", &id], "");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).expect("the change");
        let t: serde_json::Value = serde_json::from_str(&line).unwrap();
        if t["tenant_id"] == id.as_str() && t["status"] == "SUSPENDED" {
            break;
        }
    }
    watch.kill().unwrap();
    let _ = watch.wait();
    mesh.shutdown().await;
}

/// The session is private, refreshed when its access token has expired,
/// and ended by `logout` (the refresh token revoked: a copy of the session
/// no longer works). A tenant admin sees their tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_is_private_refreshed_and_revoked() {
    use std::os::unix::fs::PermissionsExt;
    let mesh = TestMesh::start().await;
    let cli = Cli::new(&mesh);
    let out = cli.fails(&["tenant", "list"], "");
    assert!(out.contains("not signed in: run `tenantmesh login"), "{out}");
    let out = cli.fails(&["login", "--email", ADMIN_EMAIL, "--password-stdin"], "wrong-password\n");
    assert!(out.contains("sign-in refused for admin@platform.local of tenant platform"), "{out}");
    cli.login_operator();
    let path = cli.session_path();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    // An expired access token is refreshed, and the new one saved.
    let mut session: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    session["access_token"] = "expired".into();
    session["expires_at"] = 0.into();
    std::fs::write(&path, serde_json::to_vec(&session).unwrap()).unwrap();
    let out = cli.ok(&["tenant", "list"], "");
    assert!(out.contains("platform"), "{out}");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_ne!(saved["access_token"], "expired");
    assert!(saved["expires_at"].as_i64().unwrap() > tenantmesh_service::clock::now_secs());

    // Commands run at once with an expired token refresh it once between
    // them (a refresh token is good for one use): all work, and so does the next.
    let mut expired = saved.clone();
    expired["expires_at"] = 0.into();
    std::fs::write(&path, serde_json::to_vec(&expired).unwrap()).unwrap();
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..4).map(|_| scope.spawn(|| cli.run(&["tenant", "list", "-o", "json"], ""))).collect();
        for run in runs {
            let out = run.join().unwrap();
            assert!(out.status.success(), "{}", text(&out));
        }
    });
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(cli.ok(&["tenant", "list"], "").contains("platform"));

    // logout revokes the refresh token: the copy kept aside is refused.
    let mut copy = saved.clone();
    copy["expires_at"] = 0.into();
    let out = cli.ok(&["logout"], "");
    assert!(out.contains("refresh token is revoked"), "{out}");
    assert!(!path.exists());
    std::fs::write(&path, serde_json::to_vec(&copy).unwrap()).unwrap();
    let out = cli.fails(&["tenant", "list"], "");
    assert!(out.contains("the session has ended") && out.contains("tenantmesh login"), "{out}");

    // A tenant admin: their tenant's record and users, nobody else's.
    let a = mesh.onboard(&unique_tenant("own")).await;
    let b = mesh.onboard(&unique_tenant("other")).await;
    let admin = Cli::new(&mesh);
    let login = ["login", "--tenant", &a.tenant_id, "--email", &a.admin_email, "--password-stdin"];
    admin.ok(&login, &format!("{}\n", a.admin_password));
    assert!(admin.ok(&["tenant", "show", &a.tenant_id], "").contains("ACTIVE"));
    assert!(admin.ok(&["user", "list"], "").contains(&a.admin_email));
    for args in
        [&["tenant", "show", &b.tenant_id][..], &["user", "list", "--tenant", &b.tenant_id], &["tenant", "list"]]
    {
        let out = admin.fails(args, "");
        assert!(
            out.contains("not allowed:") && out.contains(&a.tenant_id) && !out.contains("ACTIVE"),
            "{args:?}: {out}"
        );
    }
    mesh.shutdown().await;
}

/// A restore to an instant from the CLI puts a deleted item back; the
/// instant can be written as Unix seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_an_instant_from_the_cli() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("rewind")).await;
    mesh.data().put_item(authed(put_v("n1", "kept"), &t.token)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let instant = tenantmesh_service::clock::now_secs();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let delete = DeleteItemRequest { collection: "c".into(), id: "n1".into(), expected_version: None };
    mesh.data().delete_item(authed(delete, &t.token)).await.unwrap();
    let get = || authed(GetItemRequest { collection: "c".into(), id: "n1".into() }, &t.token);
    expect_code(mesh.data().get_item(get()).await, Code::NotFound);

    let cli = Cli::new(&mesh);
    cli.login_operator();
    let out = cli.fails(&["tenant", "restore", &t.tenant_id, "--to", &format!("@{instant}")], "");
    assert!(out.contains("pass --yes"), "in place needs confirmation: {out}");
    let out = cli.ok(&["tenant", "restore", &t.tenant_id, "--to", &format!("@{instant}"), "--yes"], "");
    assert!(out.contains("restore_items  done") || out.contains("SUCCEEDED"), "{out}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    let item = mesh.data().get_item(get()).await.unwrap().into_inner().item.unwrap();
    assert_eq!(item.id, "n1");
    let out = cli.fails(&["tenant", "restore", &t.tenant_id, "--to", "tomorrow", "--yes"], "");
    assert!(out.contains("RFC 3339"), "{out}");
    mesh.shutdown().await;
}

/// Errors that say what to do: a mesh that is not there, a bad address.
#[test]
fn an_unreachable_mesh_says_so() {
    let config = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = Command::new(service_binary("tenantmesh"))
        .args(["login", "--email", "a@b.example", "--password-stdin", "--auth", &format!("127.0.0.1:{port}")])
        .env("TENANTMESH_CONFIG_DIR", config.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the password is empty") || err.contains("cannot reach"), "{err}");
    let mut child = Command::new(service_binary("tenantmesh"))
        .args(["login", "--email", "a@b.example", "--password-stdin", "--auth", &format!("127.0.0.1:{port}")])
        .env("TENANTMESH_CONFIG_DIR", config.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"some-password\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot reach the auth service at 127.0.0.1:{port}")), "{err}");
    assert!(err.contains("tenantmesh up"), "{err}");
    assert!(!config.path().join("session.json").exists());
}
