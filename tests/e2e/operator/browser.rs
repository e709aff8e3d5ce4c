//! The console in a real browser: Debian's Chromium driven by selenium
//! (from the xtask's Python environment) through console_browser.py, against
//! a real mesh. The operator signs in, registers a tenant and watches its
//! steps finish live, sees the n requests sent as that tenant in the usage
//! table and the plot, changes its tier; the tenant's admin is confined to
//! their tenant; no page logs an error in the browser's console. A
//! screenshot of each page is saved under target/console-screenshots/
//! (with TENANTMESH_BLESS=1, the fleet's also to docs/console-fleet.png for
//! the README).
//!
//! When CI=true a missing browser fails the test; elsewhere it is skipped
//! with the reason printed (`cargo xtask setup` installs what it needs).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_proto::metering::v1::{GetUsageRequest, Window};
use tenantmesh_proto::registry::v1::{SetTenantLimitsRequest, TenantLimits};
use tenantmesh_test_support::*;

/// What is missing to drive a browser, if anything.
fn missing() -> Option<String> {
    let python = workspace_root().join(".tools/venv/bin/python3");
    for path in [std::path::Path::new("/usr/bin/chromium"), std::path::Path::new("/usr/bin/chromedriver"), &python] {
        if !path.exists() {
            return Some(format!("{} is missing (cargo xtask setup installs it)", path.display()));
        }
    }
    let selenium = Command::new(&python).args(["-c", "import selenium"]).status();
    if !selenium.is_ok_and(|s| s.success()) {
        return Some("selenium is not installed in .tools/venv (cargo xtask setup installs it)".into());
    }
    None
}

/// The script's next line of output (two minutes at most).
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    if let Some(why) = missing() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true and the browser test cannot run: {why}");
        eprintln!("SKIPPED the browser test: {why}");
        return;
    }
    // The first onboarding's last step fails three times (retried after
    // up to 1, 2 and 4 s), so its page is seen RUNNING, then turning DONE.
    let settings = [("TENANTMESH_FAULTS", "fail:activate_tenant:3"), ("TENANTMESH_STEP_BACKOFF_MS", "1000")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let console = super::console::start_console(&mesh).await;
    // Onboarded once the browser's has run (the faults are the first onboarding's).
    let other = unique_tenant("other");
    let tenant = unique_tenant("browser");
    let shots = workspace_root().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let password = "browser-admin-password";
    let mut script = Command::new(workspace_root().join(".tools/venv/bin/python3"))
        .arg(workspace_root().join("tests/e2e/operator/console_browser.py"))
        .env("CONSOLE_URL", format!("http://{console}"))
        .env("TENANT", &tenant)
        .env("TENANT_PASSWORD", password)
        .env("ADMIN_EMAIL", ADMIN_EMAIL)
        .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("OTHER_TENANT", &other)
        .env("OTHER_EMAIL", format!("admin@{other}.example"))
        .env("SCREENSHOTS", &shots)
        .env("PROFILE", profile.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = script.stdin.take().unwrap();
    let lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let stderr = script.stderr.take().unwrap();
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let registered = next_line(&mut rx).await;
    if registered.as_deref() != Some(&format!("REGISTERED {tenant}")) {
        let _ = script.kill();
        panic!("the browser did not register the tenant: {registered:?}\n{}", errors.join().unwrap());
    }

    mesh.onboard_on(&other, "basic").await;

    // n requests as the tenant, then wait until they are metered.
    const N: i64 = 5;
    let token = mesh.login(&tenant, "admin@browser.example", password).await.unwrap();
    for i in 0..N {
        mesh.data().put_item(authed(put_v(&format!("b{i}"), "v"), &token)).await.unwrap();
    }
    let admin = mesh.admin_token().await;
    // Then, held to one call a second, calls refused.
    let limits = TenantLimits { requests_per_second: 1, burst: 1, max_concurrency: 4, storage_quota_bytes: 1 << 20 };
    let set = SetTenantLimitsRequest { tenant_id: tenant.clone(), limits: Some(limits) };
    mesh.registry().set_tenant_limits(authed(set, &admin)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0i64;
    for _ in 0..10 {
        let get = GetItemRequest { collection: "c".into(), id: "b0".into() };
        refused += i64::from(mesh.data().get_item(authed(get, &token)).await.is_err());
    }
    assert!(refused > 0);
    let metered = |meter: &'static str, expected: i64| {
        let (mut metering, admin, tenant) = (mesh.metering(), admin.clone(), tenant.clone());
        async move {
            let now = tenantmesh_service::clock::now_secs();
            let request = GetUsageRequest {
                tenant_id: tenant,
                meter: meter.into(),
                from: now - 3600,
                to: now + 60,
                window: Window::Minute as i32,
                group_by: vec![],
            };
            let rows = metering.get_usage(authed(request, &admin)).await.unwrap().into_inner().rows;
            rows.iter().map(|r| r.value).sum::<i64>() == expected
        }
    };
    eventually(Duration::from_secs(30), || metered("requests", N + 10 - refused)).await;
    eventually(Duration::from_secs(30), || metered("refused", refused)).await;
    writeln!(stdin, "SENT {} {refused}", N + 10 - refused).unwrap();
    let done = next_line(&mut rx).await;
    let status = script.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(done.as_deref() == Some("BROWSER-OK") && status.success(), "{done:?} {status:?}\n{errors}");
    for page in ["fleet", "register", "workflow", "tenant", "tenant-admin-404"] {
        assert!(shots.join(format!("{page}.png")).exists(), "no screenshot of {page}");
    }
    if std::env::var_os("TENANTMESH_BLESS").is_some() {
        std::fs::copy(shots.join("fleet.png"), workspace_root().join("docs/console-fleet.png")).unwrap();
    }
    mesh.shutdown().await;
}
