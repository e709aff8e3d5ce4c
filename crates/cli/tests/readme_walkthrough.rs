//! Runs the README's walk-throughs verbatim against the real `tenantmesh
//! up` binary: the grpcurl one with the real grpcurl (only the ports are
//! swapped for free ones), and the operator's with the `tenantmesh` CLI
//! (pointed at the mesh by its TENANTMESH_*_ADDR variables); and checks
//! that Ctrl-C stops the mesh cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use tenantmesh_test_support::service_binary;

const START: &str = "<!-- walkthrough:start -->";
const END: &str = "<!-- walkthrough:end -->";
const OPERATOR_START: &str = "<!-- operator-walkthrough:start -->";
const OPERATOR_END: &str = "<!-- operator-walkthrough:end -->";

/// One command of the walk-through with what its output must (not) contain.
struct Step {
    command: String,
    expect: Vec<String>,
    expect_not: Vec<String>,
}

/// The steps of every walk-through block of the README, in order: one
/// shell session, so a later section goes on with the tokens of an
/// earlier one.
fn walkthrough_steps(readme: &str, start: &str, end: &str) -> Vec<Step> {
    let blocks: Vec<&str> =
        readme.split(start).skip(1).map(|rest| rest.split(end).next().expect("walkthrough end marker")).collect();
    assert!(!blocks.is_empty(), "walkthrough markers");
    let mut steps: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for line in blocks.iter().flat_map(|b| b.lines()) {
        let line = line.trim_end();
        if line.starts_with("```") || line.is_empty() {
            continue;
        }
        if let Some(e) = line.strip_prefix("# expect: ") {
            steps.last_mut().expect("expect after a command").expect.push(e.to_owned());
        } else if let Some(e) = line.strip_prefix("# expect-not: ") {
            steps.last_mut().expect("expect-not after a command").expect_not.push(e.to_owned());
        } else if line.starts_with('#') {
            continue;
        } else if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
        } else {
            pending.push_str(line);
            steps.push(Step { command: std::mem::take(&mut pending), expect: vec![], expect_not: vec![] });
        }
    }
    assert!(pending.is_empty(), "unterminated command in the walkthrough");
    steps
}

fn single_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How the README runs the `tenantmesh` command; the test runs the binary
/// built for the tests instead.
const CARGO_RUN: &str = "cargo run --release -p tenantmesh-cli -- ";

/// A bash script that runs each step and checks its output.
fn script(steps: &[Step], ports: &[(u16, u16)]) -> String {
    let mut out = String::from("set -euo pipefail\n");
    let tenantmesh = format!("{} ", service_binary("tenantmesh").display());
    for step in steps {
        let mut cmd = step.command.replace(CARGO_RUN, &tenantmesh);
        for (from, to) in ports {
            cmd = cmd.replace(&format!("localhost:{from}"), &format!("127.0.0.1:{to}"));
        }
        out.push_str(&format!("echo {}\n", single_quote(&format!("$ {}", step.command))));
        if step.expect.is_empty() && step.expect_not.is_empty() {
            out.push_str(&format!("{cmd}\n"));
            continue;
        }
        // Expected failures (grpcurl exits non-zero on an error status) are
        // judged by their output, not their exit code.
        out.push_str(&format!("out=$( {{ {cmd} ; }} 2>&1 ) || true\necho \"$out\"\n"));
        for e in &step.expect {
            out.push_str(&format!(
                "grep -qF -- {q} <<<\"$out\" || {{ echo 'EXPECTED:' {q}; exit 1; }}\n",
                q = single_quote(e)
            ));
        }
        for e in &step.expect_not {
            out.push_str(&format!(
                "if grep -qF -- {q} <<<\"$out\"; then echo 'NOT EXPECTED:' {q}; exit 1; fi\n",
                q = single_quote(e)
            ));
        }
    }
    out.push_str("echo WALKTHROUGH-OK\n");
    out
}

/// No token or password on a command line, where other users of the
/// machine see it (ps): tokens are named for grpcurl to expand from its
/// environment, or passed to tenantmesh in TENANTMESH_TOKEN; passwords go
/// in on stdin.
fn assert_no_secret_on_a_command_line(steps: &[Step]) {
    for step in steps {
        let c = &step.command;
        for (at, _) in c.match_indices("authorization: Bearer ") {
            let rest = &c[at + "authorization: Bearer ".len()..];
            assert!(rest.starts_with("${") && c.contains("-expand-headers"), "a token on the command line: {c}");
        }
        assert!(!c.contains("--token"), "a token on the command line: {c}");
        assert!(
            !c.contains("bootstrap-password") || c.contains("-d @") || c.contains("< "),
            "a password on the command line: {c}"
        );
        assert!(!c.contains("--password ") && !c.contains("--admin-password "), "a password on the command line: {c}");
    }
}

/// `tenantmesh up` running in a temp dir on free ports.
struct Up {
    dir: tempfile::TempDir,
    child: std::process::Child,
    /// (the README's port, the port it listens on), per service.
    ports: Vec<(u16, u16)>,
    stderr: std::thread::JoinHandle<String>,
}

impl Up {
    fn start() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(service_binary("tenantmesh"))
            .args(["up", "--registry-port", "0", "--auth-port", "0", "--onboarding-port", "0", "--data-port", "0"])
            .args(["--orders-port", "0", "--console-port", "0"])
            .current_dir(dir.path())
            .env_remove("TENANTMESH_BOOTSTRAP_PASSWORD")
            .env_remove("TENANTMESH_DATA_DIR")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        let mut ports = Vec::new();
        let services =
            [("tenant-registry", 50051), ("auth", 50052), ("onboarding", 50053), ("data", 50054), ("orders", 50060)];
        for (name, default) in services {
            loop {
                let mut line = String::new();
                assert!(stdout.read_line(&mut line).unwrap() > 0, "tenantmesh up exited early; printed:\n{banner}");
                banner.push_str(&line);
                if let Some(addr) = line.trim().strip_prefix(name) {
                    let port: u16 = addr.trim().rsplit(':').next().unwrap().parse().unwrap();
                    ports.push((default, port));
                    break;
                }
            }
        }
        // The rest of what it prints is read (and dropped) to its end: a
        // pipe closed under it would fail its next line (EPIPE).
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        assert!(banner.starts_with("tenantmesh is up"), "{banner}");
        Up { dir, child, ports, stderr }
    }

    /// Runs `steps` as one bash session in the mesh's directory, with
    /// `path` first on the PATH and the CLI pointed at the mesh; then
    /// stops the mesh with Ctrl-C. The transcript and the mesh's logs.
    fn run(mut self, steps: &[Step], path: &std::path::Path) -> (String, String) {
        let path = format!("{}:{}", path.display(), std::env::var("PATH").unwrap_or_default());
        let port = |default: u16| self.ports.iter().find(|(d, _)| *d == default).unwrap().1;
        let config = self.dir.path().join("config");
        let output = Command::new("bash")
            .arg("-c")
            .arg(script(steps, &self.ports))
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("TENANTMESH_CONFIG_DIR", &config)
            .env("TENANTMESH_REGISTRY_ADDR", format!("127.0.0.1:{}", port(50051)))
            .env("TENANTMESH_AUTH_ADDR", format!("127.0.0.1:{}", port(50052)))
            .env("TENANTMESH_ONBOARDING_ADDR", format!("127.0.0.1:{}", port(50053)))
            .env("TENANTMESH_DATA_ADDR", format!("127.0.0.1:{}", port(50054)))
            .env_remove("TENANTMESH_PASSWORD")
            .output()
            .unwrap();
        let transcript =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        // Ctrl-C: the mesh drains and exits 0.
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        let status = self.child.wait().unwrap();
        let logs = self.stderr.join().unwrap();
        assert!(
            output.status.success() && transcript.contains("WALKTHROUGH-OK"),
            "walkthrough failed:\n{transcript}\n--- tenantmesh up stderr:\n{logs}"
        );
        assert!(status.success(), "tenantmesh up did not exit cleanly on SIGINT: {status:?}\n{logs}");
        (transcript, logs)
    }
}

/// The README walk-through passes end to end against `tenantmesh up`.
#[test]
fn readme_walkthrough_passes_against_tenantmesh_up() {
    let root = tenantmesh_test_support::workspace_root();
    let grpcurl = tenantmesh_test_support::tool("grpcurl");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let steps = walkthrough_steps(&readme, START, END);
    assert!(steps.len() >= 15, "walkthrough too short: {} steps", steps.len());
    assert_no_secret_on_a_command_line(&steps);
    let up = Up::start();
    let password_file = up.dir.path().join(".tenantmesh/bootstrap-password");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&password_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "bootstrap password file must be private");
    }
    let (_, logs) = up.run(&steps, grpcurl.parent().unwrap());
    assert!(logs.contains("generated the platform admin password"), "{logs}");
}

/// The README's operator walk-through (the `tenantmesh` CLI) passes end to
/// end against `tenantmesh up`, and leaves the session file private.
#[test]
fn readme_operator_walkthrough_passes_against_tenantmesh_up() {
    let readme = std::fs::read_to_string(tenantmesh_test_support::workspace_root().join("README.md")).unwrap();
    let steps = walkthrough_steps(&readme, OPERATOR_START, OPERATOR_END);
    assert!(steps.len() >= 15, "operator walkthrough too short: {} steps", steps.len());
    assert!(steps.iter().all(|s| s.command.contains("tenantmesh ")), "only the CLI here");
    assert_no_secret_on_a_command_line(&steps);
    let up = Up::start();
    let binary = service_binary("tenantmesh");
    let (transcript, _) = up.run(&steps, binary.parent().unwrap());
    assert!(transcript.contains("initech/offboard SUCCEEDED"), "{transcript}");
}

/// `tenantmesh --help` and `tenantmesh up --help` explain the command, its
/// options and the variables the README points to.
#[test]
fn help_explains_the_command() {
    let help = |args: &[&str]| {
        let out = Command::new(service_binary("tenantmesh")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    assert!(top.contains("up") && top.contains("Run all four services"), "{top}");
    for command in ["login", "tenant", "user", "workflow", "usage", "cost", "completion"] {
        assert!(
            top.lines().any(|l| l.trim_start().starts_with(command)),
            "`tenantmesh --help` lacks {command}:\n{top}"
        );
    }
    let restore = help(&["tenant", "restore", "--help"]);
    assert!(restore.contains("RFC 3339") && restore.contains("tenantmesh tenant restore acme --to"), "{restore}");
    let bash = help(&["completion", "bash"]);
    assert!(bash.contains("change-tier") && bash.contains("set-limits"), "bash completions");
    let up = help(&["up", "--help"]);
    for needle in [
        "--data-dir",
        "--host",
        "--registry-port",
        "--data-port",
        "TENANTMESH_BOOTSTRAP_PASSWORD",
        "bootstrap-password",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "TENANTMESH_TIERS_FILE",
        "silos.json",
        "--orders-port",
        "--no-example",
        "--console-port",
        "--no-console",
    ] {
        assert!(up.contains(needle), "`tenantmesh up --help` does not mention {needle}:\n{up}");
    }
    let bad = Command::new(service_binary("tenantmesh")).args(["up", "--registry-port", "nope"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--registry-port"), "{bad:?}");
}

/// `tenantmesh up --storage dynamodb` runs on DynamoDB + STS (the moto
/// emulator, through the standard AWS variables): it creates its tables,
/// serves a login, and stops cleanly on Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_on_dynamodb() {
    let moto = tenantmesh_test_support::moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(service_binary("tenantmesh"));
    up.args(["up", "--storage", "dynamodb"])
        .args(["--registry-port", "0", "--auth-port", "0", "--onboarding-port", "0", "--data-port", "0"])
        .args(["--orders-port", "0", "--console-port", "0"])
        .current_dir(dir.path())
        .env("TENANTMESH_BOOTSTRAP_PASSWORD", "dynamo-admin-password")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in moto.env() {
        up.env(k, v);
    }
    let mut up = up.spawn().unwrap();
    let mut stdout = BufReader::new(up.stdout.take().unwrap());
    let mut auth = None;
    let mut banner = String::new();
    while auth.is_none() {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "tenantmesh up exited early:\n{banner}");
        banner.push_str(&line);
        auth = line.trim().strip_prefix("auth").map(|a| a.trim().to_owned());
    }
    assert!(banner.contains("storage dynamodb"), "{banner}");
    assert!(!dir.path().join(".tenantmesh/auth.redb").exists(), "embedded store used");
    let url = format!("http://{}", auth.unwrap());
    let mut client = tenantmesh_proto::auth::v1::auth_client::AuthClient::connect(url).await.unwrap();
    let login = tenantmesh_proto::auth::v1::LoginRequest {
        tenant_id: "platform".into(),
        email: "admin@platform.local".into(),
        password: "dynamo-admin-password".into(),
    };
    assert!(!client.login(login).await.unwrap().into_inner().access_token.is_empty());
    drop(client);
    Command::new("kill").args(["-INT", &up.id().to_string()]).status().unwrap();
    assert!(up.wait().unwrap().success());
}
