//! Unit tests of [`super`].

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn settings_are_checked_naming_the_variable() {
    assert!(GitOpsConfig::from_env(&env(&[])).unwrap().is_none());
    let err = GitOpsConfig::from_env(&env(&[("TENANTMESH_SILO_GITOPS_REPO", "/r")])).unwrap_err();
    assert_eq!(err.var, "TENANTMESH_SILO_IMAGE");
    for bad in ["/abs", "a/../b", "a//b", "."] {
        let err = GitOpsConfig::from_env(&env(&[
            ("TENANTMESH_SILO_GITOPS_REPO", "/r"),
            ("TENANTMESH_SILO_IMAGE", "i"),
            ("TENANTMESH_SILO_GITOPS_PATH", bad),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "TENANTMESH_SILO_GITOPS_PATH", "{bad}");
    }
    let err = GitOpsConfig::from_env(&env(&[
        ("TENANTMESH_SILO_GITOPS_REPO", "/r"),
        ("TENANTMESH_SILO_IMAGE", "i"),
        ("TENANTMESH_SILO_NAMESPACE", "Prod"),
    ]))
    .unwrap_err();
    assert_eq!(err.var, "TENANTMESH_SILO_NAMESPACE");
    let err = GitOpsConfig::from_env(&env(&[
        ("TENANTMESH_SILO_GITOPS_REPO", "/r"),
        ("TENANTMESH_SILO_IMAGE", "i"),
        ("TENANTMESH_SILO_READY_TIMEOUT_SECS", "0"),
    ]))
    .unwrap_err();
    assert_eq!(err.var, "TENANTMESH_SILO_READY_TIMEOUT_SECS");
    let ok = GitOpsConfig::from_env(&env(&[("TENANTMESH_SILO_GITOPS_REPO", "/r"), ("TENANTMESH_SILO_IMAGE", "i")]))
        .unwrap()
        .unwrap();
    assert_eq!((ok.path.as_str(), ok.namespace.as_str()), ("tenants", "tenantmesh"));
}

#[test]
fn instance_names_are_dns_labels_and_distinct() {
    assert_eq!(instance_name("bigco"), "data-bigco");
    let a = instance_name(&"a".repeat(63));
    let b = instance_name(&format!("{}b", "a".repeat(62)));
    assert!(is_dns_label(&a) && is_dns_label(&b), "{a} {b}");
    assert_ne!(a, b);
    assert_eq!(instance_name(&"a".repeat(58)).len(), 63);
    assert_eq!(a.len(), 63);
    // 64 bits of hash: the shortened names of 100,000 long ids never meet.
    let names: std::collections::HashSet<String> =
        (0..100_000).map(|i| instance_name(&format!("{}{i:08}", "t".repeat(55)))).collect();
    assert_eq!(names.len(), 100_000);
    // An application service's: readable, a label, and two pairs that read
    // alike stay apart.
    let orders = service_instance_name("orders", "bigco");
    assert!(orders.starts_with("orders-bigco-") && is_dns_label(&orders), "{orders}");
    assert_ne!(service_instance_name("orders", "x-acme"), service_instance_name("orders-x", "acme"));
    let long = service_instance_name(&"s".repeat(40), &"t".repeat(63));
    assert!(long.len() <= 63 && is_dns_label(&long), "{long}");
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git").arg("-C").arg(dir).args(AUTHOR).args(args).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn commits(dir: &Path) -> usize {
    git(dir, &["rev-list", "--count", "HEAD"]).trim().parse().unwrap()
}

/// A working tree with one commit, cloned from a bare "remote".
fn repo(root: &Path) -> PathBuf {
    let remote = root.join("remote.git");
    std::fs::create_dir_all(&remote).unwrap();
    git(&remote, &["init", "--quiet", "--bare", "--initial-branch=main"]);
    let work = root.join("work");
    git(root, &["clone", "--quiet", remote.to_str().unwrap(), "work"]);
    std::fs::write(work.join("README.md"), "fleet\n").unwrap();
    git(&work, &["add", "README.md"]);
    git(&work, &["commit", "--quiet", "-m", "init"]);
    git(&work, &["push", "--quiet", "origin", "HEAD"]);
    work
}

/// A gRPC server answering health SERVING: the instance the reconciler runs.
async fn instance() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await
    });
    format!("http://{addr}")
}

async fn config(repo: &Path) -> GitOpsConfig {
    let mut c = bare_config(repo);
    c.endpoint_template = instance().await;
    c
}

fn bare_config(repo: &Path) -> GitOpsConfig {
    GitOpsConfig::from_env(&env(&[
        ("TENANTMESH_SILO_GITOPS_REPO", repo.to_str().unwrap()),
        ("TENANTMESH_SILO_GITOPS_PATH", "clusters/prod/tenants"),
        ("TENANTMESH_SILO_GITOPS_REMOTE", "origin"),
        ("TENANTMESH_SILO_IMAGE", "registry.example/tenantmesh:1.0"),
        ("TENANTMESH_SILO_ROLE_ARN", "arn:aws:iam::123456789012:role/tenantmesh-silo"),
    ]))
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn a_silo_tenant_is_one_commit_in_and_one_out_however_often_the_step_runs() {
    let root = tempfile::tempdir().unwrap();
    let work = repo(root.path());
    let gitops = GitOps::open(config(&work).await).await.unwrap();

    let endpoint = gitops.provision("bigco", "enterprise").await.unwrap();
    assert_eq!(endpoint, gitops.config.endpoint_template);
    let cluster = GitOps::open(bare_config(&work)).await.unwrap();
    assert_eq!(cluster.endpoint("bigco"), "http://data-bigco.tenantmesh.svc.cluster.local:50054");
    assert_eq!(commits(&work), 2);
    // Again (a retried step, a resumed workflow): nothing new.
    gitops.provision("bigco", "enterprise").await.unwrap();
    assert_eq!(commits(&work), 2);
    let dir = work.join("clusters/prod/tenants/bigco");
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["deployment.yaml", "networkpolicy.yaml", "service.yaml", "serviceaccount.yaml"]);
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for label in ["tenantmesh.io/tenant: bigco", "tenantmesh.io/tier: enterprise", "tenantId: bigco"] {
            assert!(text.contains(label), "{f} lacks {label}");
        }
    }
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    assert!(deployment.contains("registry.example/tenantmesh:1.0") && deployment.contains("value: \"bigco\""));
    let sa = std::fs::read_to_string(dir.join("serviceaccount.yaml")).unwrap();
    assert!(sa.contains("eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/tenantmesh-silo"));
    // The commit is on the remote, and touches only the tenant's directory.
    let remote = root.path().join("remote.git");
    assert_eq!(commits(&remote), 2);
    let changed = git(&work, &["show", "--name-only", "--format=", "HEAD"]);
    assert!(changed.lines().all(|l| l.starts_with("clusters/prod/tenants/bigco/")), "{changed}");

    // A crash between writing and committing: the retry commits once.
    std::fs::remove_dir_all(&dir).unwrap();
    gitops.provision("acme", "enterprise").await.unwrap();
    assert_eq!(commits(&work), 3, "acme's commit must not carry bigco's removal");
    assert!(git(&work, &["status", "--porcelain"]).contains("bigco"));
    gitops.provision("bigco", "enterprise").await.unwrap();
    assert_eq!(commits(&work), 3);
    assert!(git(&work, &["status", "--porcelain"]).is_empty());

    // Another writer pushed meanwhile: ours is rebased onto it.
    let other = root.path().join("other");
    git(root.path(), &["clone", "--quiet", remote.to_str().unwrap(), "other"]);
    std::fs::write(other.join("NOTES.md"), "x\n").unwrap();
    git(&other, &["add", "NOTES.md"]);
    git(&other, &["commit", "--quiet", "-m", "someone else"]);
    git(&other, &["push", "--quiet", "origin", "HEAD"]);

    gitops.deprovision("bigco").await.unwrap();
    gitops.deprovision("bigco").await.unwrap();
    assert!(!dir.exists());
    assert_eq!(commits(&remote), 5, "acme, someone else's and the removal, once");
    assert!(work.join("clusters/prod/tenants/acme/deployment.yaml").exists());
    // Removing what was never there commits nothing.
    gitops.deprovision("never").await.unwrap();
    assert_eq!(commits(&remote), 5);

    // A clone made before acme was added (a restarted pod's, say) still
    // removes it: the step pulls first.
    git(root.path(), &["clone", "--quiet", remote.to_str().unwrap(), "stale"]);
    let stale = root.path().join("stale");
    git(&stale, &["reset", "--quiet", "--hard", "HEAD~3"]);
    assert!(!stale.join("clusters/prod/tenants/acme").exists());
    let second = GitOps::open(config(&stale).await).await.unwrap();
    second.deprovision("acme").await.unwrap();
    assert_eq!(commits(&remote), 6);
    let listed = git(&stale, &["ls-tree", "-r", "--name-only", "origin/main"]);
    assert!(!listed.contains("acme"), "{listed}");
}

#[tokio::test]
async fn provisioning_waits_for_the_instance_and_fails_when_it_never_comes() {
    let root = tempfile::tempdir().unwrap();
    let work = repo(root.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = bare_config(&work);
    c.endpoint_template = format!("http://127.0.0.1:{port}");
    c.ready_timeout = std::time::Duration::from_millis(300);
    let err = GitOps::open(c).await.unwrap().provision("late", "enterprise").await.unwrap_err();
    assert!(err.contains("not serving") && err.contains(&port.to_string()), "{err}");
    // The manifests are committed all the same: the retry finds them there.
    assert!(work.join("clusters/prod/tenants/late/deployment.yaml").exists());
}

#[tokio::test]
async fn a_lock_left_by_a_killed_git_is_cleared_at_start() {
    let root = tempfile::tempdir().unwrap();
    let work = repo(root.path());
    std::fs::write(work.join(".git/index.lock"), "").unwrap();
    let gitops = GitOps::open(config(&work).await).await.unwrap();
    assert!(!work.join(".git/index.lock").exists());
    gitops.provision("after-crash", "enterprise").await.unwrap();
    assert_eq!(commits(&work), 2);
}

#[tokio::test]
async fn not_a_working_tree_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = bare_config(dir.path());
    c.repo = dir.path().join("missing");
    assert!(GitOps::open(c).await.is_err());
}

/// The application service as it registered: its instances run `image`.
fn orders(image: &str) -> ApplicationService {
    ApplicationService {
        name: "orders".into(),
        endpoint: "http://orders:50061".into(),
        image: image.into(),
        command: if image.is_empty() { vec![] } else { vec!["tenantmesh-orders".into()] },
        silo_instances: true,
        ..Default::default()
    }
}

/// kubernetes-validate (installed by `cargo xtask setup`) on `files`,
/// strict: what a reconciler would apply must be valid objects. Required
/// under CI; skipped, saying so, where the tool is not installed.
fn validate(files: &[PathBuf]) {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/kubernetes-validate");
    if !tool.exists() {
        assert!(std::env::var("CI").is_err(), "{} is missing under CI: run `cargo xtask setup`", tool.display());
        eprintln!("kubernetes-validate not installed: the generated manifests are not validated");
        return;
    }
    let out =
        std::process::Command::new(tool).args(["--strict", "--quiet", "-k", "1.34.0"]).args(files).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn an_application_services_instance_is_committed_from_its_registration() {
    let root = tempfile::tempdir().unwrap();
    let work = repo(root.path());
    let mut c = config(&work).await;
    c.service_endpoint_template = c.endpoint_template.clone();
    let gitops = GitOps::open(c).await.unwrap();
    let entry = orders("registry.example/shop:2");

    gitops.provision("bigco", "enterprise").await.unwrap();
    let endpoint = gitops.provision_service(&entry, "bigco", "enterprise").await.unwrap();
    assert_eq!(endpoint.as_deref(), Some(gitops.config.endpoint_template.as_str()));
    assert_eq!(commits(&work), 3, "init, the data instance, the orders instance");
    gitops.provision_service(&entry, "bigco", "enterprise").await.unwrap();
    assert_eq!(commits(&work), 3, "a retried step commits nothing");
    let changed = git(&work, &["show", "--name-only", "--format=", "HEAD"]);
    assert!(changed.lines().all(|l| l.starts_with("clusters/prod/tenants/bigco/orders/")), "{changed}");

    let dir = work.join("clusters/prod/tenants/bigco/orders");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let deployment = read("deployment.yaml");
    let name = service_instance_name("orders", "bigco");
    let cluster = bare_config(&work);
    let default = service_endpoint(&cluster, "orders", "bigco", service_port(&entry.endpoint));
    assert_eq!(default, format!("http://{name}.tenantmesh.svc.cluster.local:50061"));
    assert_eq!(service_port("https://orders.example"), DEFAULT_SERVICE_PORT);
    for expected in [
        "image: registry.example/shop:2",
        "command: [\"tenantmesh-orders\"]",
        "app.kubernetes.io/component: silo-orders",
        "tenantmesh.io/tenant: bigco",
        "name: orders-config\n                optional: true",
        "key: orders-client-secret",
        "containerPort: 50061",
        // It registers where onboarding waits for it.
        &format!("- name: TENANTMESH_ADVERTISE_URL\n              value: \"{}\"", endpoint.as_deref().unwrap()),
    ] {
        assert!(deployment.contains(expected), "deployment lacks {expected}:\n{deployment}");
    }
    assert!(deployment.contains("- name: TENANTMESH_SILO_TENANT\n              value: \"bigco\""), "{deployment}");
    let policy = read("networkpolicy.yaml");
    assert!(policy.contains("app.kubernetes.io/component: orders\n") && policy.contains("port: 50054"), "{policy}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.extend(std::fs::read_dir(dir.parent().unwrap()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    assert_eq!(files.len(), 8);
    validate(&files);

    // Leaving the silo: the data instance's removal leaves the service's
    // instance to its own step, whose removal takes the tenant's directory.
    gitops.deprovision("bigco").await.unwrap();
    assert!(dir.join("deployment.yaml").exists() && !dir.parent().unwrap().join("deployment.yaml").exists());
    assert_eq!(commits(&work), 4);
    gitops.deprovision_service("orders", "bigco").await.unwrap();
    gitops.deprovision_service("orders", "bigco").await.unwrap();
    assert_eq!(commits(&work), 5);
    assert!(!dir.parent().unwrap().exists());
    assert_eq!(commits(&root.path().join("remote.git")), 5, "every change pushed");

    // A service that registered no image: no instance, nothing committed.
    assert_eq!(gitops.provision_service(&orders(""), "acme", "enterprise").await.unwrap(), None);
    assert_eq!(commits(&work), 5);
}
