//! `tenantmesh backup` and `tenantmesh restore`: a running embedded mesh's
//! stores copied to a directory (through a service's `Backup` RPC, without
//! stopping it), and a stopped mesh's data directory brought back
//! from one. The format is `tenantmesh_service::backup`'s.

use std::io::Write;
use std::path::{Path, PathBuf};

use tenantmesh_proto::backup::v1::backup_client::BackupClient;
use tenantmesh_proto::backup::v1::{BackupManifest, TakeBackupRequest, take_backup_response::Chunk};
use tenantmesh_service::backup::{MANIFEST, manifest_json, safe_relative, verify};

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// Takes a backup from the service at `addr` into `out` (absent or an
/// empty directory): every file, then the manifest, then every file checked
/// against it. An interrupted backup has no manifest, and restore refuses it.
pub async fn take(addr: &str, token: &str, out: &Path) -> Result<BackupManifest, String> {
    if out.exists() && !is_empty_dir(out) {
        return Err(format!("{} exists and is not empty", out.display()));
    }
    // Every tenant's data: the owner's alone, whatever `out` was before.
    tenantmesh_storage::files::private_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let channel = tonic::transport::Endpoint::from_shared(crate::ops::client::url(addr))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut request = tonic::Request::new(TakeBackupRequest {});
    let bearer = format!("Bearer {token}").parse().map_err(|_| "the token is not a valid header value".to_owned())?;
    request.metadata_mut().insert("authorization", bearer);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut stream =
        tenantmesh_service::sized!(BackupClient::new(channel)).take_backup(request).await.map_err(status)?.into_inner();
    let Some(Chunk::Manifest(manifest)) = stream.message().await.map_err(status)?.and_then(|m| m.chunk) else {
        return Err("the service sent no manifest first".into());
    };
    for file in &manifest.files {
        if !safe_relative(&file.path) || file.path == MANIFEST {
            return Err(format!("the service named an unsafe path {:?}", file.path));
        }
        let path = out.join(&file.path);
        let mut writer =
            tenantmesh_storage::files::create_private(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut written = 0u64;
        while written < file.size {
            let chunk =
                stream.message().await.map_err(status)?.and_then(|m| m.chunk).ok_or_else(|| {
                    format!("the stream ended inside {} ({written} of {} bytes)", file.path, file.size)
                })?;
            let Chunk::Data(bytes) = chunk else { return Err("a second manifest in the stream".into()) };
            if written + bytes.len() as u64 > file.size {
                return Err(format!("{}: more bytes than the manifest says", file.path));
            }
            writer.write_all(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            written += bytes.len() as u64;
        }
        writer.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if stream.message().await.map_err(status)?.is_some() {
        return Err("more data than the manifest names".into());
    }
    let tmp = out.join(format!("{MANIFEST}.tmp"));
    tenantmesh_storage::files::write_private(&tmp, manifest_json(&manifest).as_bytes())
        .and_then(|()| std::fs::rename(&tmp, out.join(MANIFEST)))
        .map_err(|e| format!("{}: {e}", out.display()))?;
    verify(out)
}

/// Restores the data directory `data_dir` of a stopped mesh from the backup
/// `dir` (checked first). A non-empty `data_dir` is refused, or with
/// `replace` moved aside to `<data_dir>.replaced-<unix seconds>` (refused
/// while a mesh runs on it). Returns where the old one went, if anywhere.
pub fn restore(dir: &Path, data_dir: &Path, replace: bool) -> Result<Option<PathBuf>, String> {
    let manifest = verify(dir)?;
    let mut moved = None;
    if data_dir.exists() && !is_empty_dir(data_dir) {
        if !replace {
            return Err(format!(
                "{} is not empty: stop the mesh and pass --replace to move it aside",
                data_dir.display()
            ));
        }
        in_use(data_dir)?;
        let aside = PathBuf::from(format!("{}.replaced-{}", data_dir.display(), tenantmesh_service::clock::now_secs()));
        std::fs::rename(data_dir, &aside).map_err(|e| format!("cannot move {} aside: {e}", data_dir.display()))?;
        moved = Some(aside);
    }
    // Filled beside it and renamed into place: a crash leaves no half-restored data dir.
    let staging = PathBuf::from(format!("{}.restoring-{}", data_dir.display(), std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    tenantmesh_storage::files::private_dir(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    for file in &manifest.files {
        let to = staging.join(&file.path);
        let copied = (|| {
            let mut from = std::fs::File::open(dir.join(&file.path))?;
            let mut into = tenantmesh_storage::files::create_private(&to)?;
            std::io::copy(&mut from, &mut into)?;
            into.sync_all()
        })();
        copied.map_err(|e| format!("{}: {e}", to.display()))?;
    }
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    }
    std::fs::rename(&staging, data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    Ok(moved)
}

/// Refuses a data directory whose stores a running process holds open.
fn in_use(data_dir: &Path) -> Result<(), String> {
    let stores = ["registry.redb", "auth.redb", "onboarding.redb", "data.redb"];
    for store in stores.iter().map(|s| data_dir.join(s)).filter(|p| p.exists()) {
        if let Err(e) = tenantmesh_storage::EmbeddedTable::open(&store) {
            return Err(format!("{} is in use ({e}): stop the mesh first", store.display()));
        }
    }
    Ok(())
}
