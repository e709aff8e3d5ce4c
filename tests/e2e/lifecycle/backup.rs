//! Backups of the embedded mesh (`tenantmesh backup` / `tenantmesh
//! restore`, the real binary against a running mesh): taken under load
//! without stopping anything, and restored into a mesh that holds every
//! write acknowledged before the backup's instant and nothing written after
//! the backup ended, for a pool, a bridge and a silo tenant alike.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantmesh_proto::backup::v1::TakeBackupRequest;
use tenantmesh_proto::backup::v1::backup_client::BackupClient;
use tenantmesh_proto::data::v1::{PutItemRequest, QueryItemsRequest};
use tenantmesh_test_support::*;

/// One writer's calls: id, when it was sent and when it was acknowledged
/// (Unix ms; `None` if it failed).
type Log = Arc<Mutex<Vec<(String, u64, Option<u64>)>>>;

fn now_ms() -> u64 {
    tenantmesh_service::clock::now_ms().max(0) as u64
}

async fn ids(mesh: &TestMesh, token: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let req = QueryItemsRequest { collection: "w".into(), id_prefix: String::new(), page_size: 1000, page_token };
        let page = mesh.data().query_items(authed(req, token)).await.unwrap().into_inner();
        out.extend(page.items.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

/// Runs the `tenantmesh` binary. Blocking: a command that calls the mesh
/// (which runs in this process) goes through `spawn_blocking`.
fn tenantmesh(args: &[&str]) -> std::process::Output {
    tenantmesh_with_token(args, None)
}

/// [`tenantmesh`] with the operator's `token` in `TENANTMESH_TOKEN` (never
/// on the command line).
fn tenantmesh_with_token(args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(service_binary("tenantmesh"));
    cmd.args(args).env("RUST_LOG", "warn").env_remove("TENANTMESH_TOKEN");
    if let Some(t) = token {
        cmd.env("TENANTMESH_TOKEN", t);
    }
    cmd.output().unwrap()
}

/// Every entry under `dir` with its mode: directories 0700, files 0600.
fn modes(dir: &std::path::Path, out: &mut Vec<(String, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push((path.display().to_string(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            modes(&path, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_exactly_what_was_acknowledged_before_it() {
    let mesh = TestMesh::start_with(TestBackend::Embedded).await;
    let mut tenants = Vec::new();
    for tier in ["standard", "premium", "enterprise"] {
        tenants.push(mesh.onboard_on(&unique_tenant("bk"), tier).await);
    }
    let admin = mesh.admin_token().await;

    // Only the operator may take one: it holds every tenant's data.
    let mut req = tonic::Request::new(TakeBackupRequest {});
    req.metadata_mut().insert("authorization", format!("Bearer {}", tenants[0].token).parse().unwrap());
    let refused = BackupClient::new(TestMesh::channel(mesh.addrs.data)).take_backup(req).await;
    expect_code(refused.map(drop), tonic::Code::PermissionDenied);

    // Two writers per tenant, all the time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut logs: HashMap<String, Log> = HashMap::new();
    let mut writers = Vec::new();
    for tenant in &tenants {
        let log: Log = Default::default();
        logs.insert(tenant.tenant_id.clone(), log.clone());
        for w in 0..2 {
            let (log, stop, token, mut data) = (log.clone(), stop.clone(), tenant.token.clone(), mesh.data());
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("{w}-{n:06}");
                    n += 1;
                    let put = PutItemRequest {
                        collection: "w".into(),
                        id: id.clone(),
                        attributes: Some(attrs(&[("n", &id)])),
                        expected_version: None,
                    };
                    let sent = now_ms();
                    let ok = data.put_item(authed(put, &token)).await.is_ok();
                    log.lock().unwrap().push((id, sent, ok.then(now_ms)));
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("backup");
    let data_addr = mesh.addrs.data.to_string();
    let backup = {
        let (addr, admin, out) = (data_addr.clone(), admin.clone(), out.display().to_string());
        tokio::task::spawn_blocking(move || {
            tenantmesh_with_token(&["backup", "--addr", &addr, "--out", &out], Some(&admin))
        })
        .await
        .unwrap()
    };
    let backup_ended = now_ms();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let manifest = tenantmesh_service::backup::verify(&out).unwrap();
    let taken_at = manifest.taken_at_ms as u64;
    let files: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    for store in ["registry.redb", "auth.redb", "onboarding.redb", "data.redb", "silos.json"] {
        assert!(files.contains(&store), "{store} missing from {files:?}");
    }
    assert_eq!(files.iter().filter(|f| f.starts_with("tables/")).count(), 2, "{files:?}");
    // A second backup into the same place is refused, not mixed.
    let again =
        tenantmesh_with_token(&["backup", "--addr", &data_addr, "--out", &out.display().to_string()], Some(&admin));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Not over a running mesh, even with --replace.
    let running_dir = mesh.data_dir().display().to_string();
    let running = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &running_dir, "--replace"]);
    assert!(String::from_utf8_lossy(&running.stderr).contains("stop the mesh first"), "{running:?}");
    let state = mesh.stop().await;
    let data_dir = state.data_dir().display().to_string();
    let refused = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &data_dir]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--replace"), "{refused:?}");
    let restored = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &data_dir, "--replace"]);
    assert!(restored.status.success(), "{}", String::from_utf8_lossy(&restored.stderr));

    let mesh = TestMesh::start_on(state).await;
    for tenant in &tenants {
        let token = mesh.login(&tenant.tenant_id, &tenant.admin_email, &tenant.admin_password).await.unwrap();
        let present = ids(&mesh, &token).await;
        let log = logs[&tenant.tenant_id].lock().unwrap().clone();
        let acked_before: Vec<&String> =
            log.iter().filter(|(_, _, ack)| ack.is_some_and(|a| a < taken_at)).map(|(id, _, _)| id).collect();
        let sent_after: Vec<&String> =
            log.iter().filter(|(_, sent, _)| *sent > backup_ended).map(|(id, _, _)| id).collect();
        assert!(acked_before.len() > 10 && !sent_after.is_empty(), "{}: too little load", tenant.tenant_id);
        for id in &acked_before {
            assert!(present.contains(*id), "{}: {id} was acknowledged before the backup and is lost", tenant.tenant_id);
        }
        for id in &sent_after {
            assert!(!present.contains(*id), "{}: {id} was written after the backup and is in it", tenant.tenant_id);
        }
        let known: BTreeSet<&String> = log.iter().map(|(id, _, _)| id).collect();
        assert!(present.iter().all(|id| known.contains(id)), "{}: an item nobody wrote", tenant.tenant_id);
    }
    mesh.shutdown().await;
}

/// A backup with a file changed or its manifest missing is refused, naming
/// the problem, and the data directory is left as it was. A backup, and
/// the data directory restored from it, are the owner's alone (0700
/// directories, 0600 files), whatever the directory was before; a link in
/// a backup is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_incomplete_backup_is_refused() {
    let mesh = TestMesh::start_with(TestBackend::Embedded).await;
    let tenant = mesh.onboard_on(&unique_tenant("bk"), "standard").await;
    let admin = mesh.admin_token().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    // Into a directory anyone may read: it ends the owner's alone, every file 0600.
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let no_token = tenantmesh(&["backup", "--addr", &mesh.addrs.data.to_string(), "--out", &out.display().to_string()]);
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("TENANTMESH_TOKEN"), "{no_token:?}");
    let taken = tenantmesh_with_token(
        &["backup", "--addr", &mesh.addrs.data.to_string(), "--out", &out.display().to_string()],
        Some(&admin),
    );
    assert!(taken.status.success(), "{}", String::from_utf8_lossy(&taken.stderr));
    let _ = tenant;
    let mut found = vec![(out.display().to_string(), {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777
    })];
    modes(&out, &mut found);
    for (path, mode) in &found {
        let want = if std::path::Path::new(path).is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{path}: {mode:o}");
    }
    assert!(found.iter().any(|(p, _)| p.ends_with("auth.redb")), "{found:?}");
    let target = dir.path().join("restored");
    // Restored, every file is the owner's alone too.
    let restored = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &target.display().to_string()]);
    assert!(restored.status.success(), "{restored:?}");
    let mut found = Vec::new();
    modes(&target, &mut found);
    assert!(found.iter().all(|(p, m)| *m == if std::path::Path::new(p).is_dir() { 0o700 } else { 0o600 }), "{found:?}");
    std::fs::remove_dir_all(&target).unwrap();
    // A link in a backup is refused, not followed.
    std::os::unix::fs::symlink("/etc/hostname", out.join("linked.redb")).unwrap();
    let linked = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &target.display().to_string()]);
    assert!(String::from_utf8_lossy(&linked.stderr).contains("not a regular file"), "{linked:?}");
    assert!(!target.exists());
    std::fs::remove_file(out.join("linked.redb")).unwrap();

    let mut bytes = std::fs::read(out.join("registry.redb")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(out.join("registry.redb"), &bytes).unwrap();
    let damaged = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &target.display().to_string()]);
    assert!(String::from_utf8_lossy(&damaged.stderr).contains("does not match"), "{damaged:?}");
    assert!(!target.exists());

    std::fs::remove_file(out.join("backup.json")).unwrap();
    let partial = tenantmesh(&["restore", &out.display().to_string(), "--data-dir", &target.display().to_string()]);
    assert!(String::from_utf8_lossy(&partial.stderr).contains("incomplete"), "{partial:?}");
    assert!(!target.exists());
    mesh.shutdown().await;
}
