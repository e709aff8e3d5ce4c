//! Backups of the embedded stores: the `Backup` service every tenantmesh
//! service serves (a read snapshot of every table file open in its process
//! under its data directory, and a copy of the files beside them, streamed
//! to the caller), and what `tenantmesh backup` / `tenantmesh restore`
//! write and check.
//!
//! A backup directory holds the files at their paths relative to the data
//! directory and `backup.json`, the manifest (written last, so a backup
//! without it is incomplete), naming each file with its size and SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};

use tenantmesh_proto::backup::v1::backup_server::{Backup, BackupServer};
use tenantmesh_proto::backup::v1::{
    BackupFile, BackupManifest, TakeBackupRequest, TakeBackupResponse, take_backup_response::Chunk,
};
use tenantmesh_storage::EmbeddedTable;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "backup.json";
/// Where a backup is staged inside the data directory while it streams.
pub const STAGING_PREFIX: &str = ".backup-";

/// Bytes per streamed message.
const CHUNK: usize = 1 << 20;

pub struct BackupService {
    data_dir: PathBuf,
    /// On DynamoDB there is nothing here to copy: its point-in-time
    /// recovery covers the tables.
    embedded: bool,
    /// Where each backup taken (or refused) is recorded, and who asked.
    audit: Option<(crate::audit::AuditLog, CallerOf)>,
}

/// Who made a backup request (from its verified context), for the audit log.
pub type CallerOf = std::sync::Arc<dyn Fn(&Request<TakeBackupRequest>) -> Option<crate::audit::Caller> + Send + Sync>;

impl BackupService {
    pub fn new(data_dir: PathBuf, embedded: bool) -> Self {
        Self { data_dir, embedded, audit: None }
    }

    /// Records each backup taken, or refused, in `log` (the platform's
    /// chain, `backup.take`), as the caller `caller_of` names.
    pub fn with_audit(mut self, log: crate::audit::AuditLog, caller_of: CallerOf) -> Self {
        self.audit = Some((log, caller_of));
        self
    }

    /// Records the backup `request` asked for: taken (`after`) or not (`error`).
    async fn record(&self, request: &Request<TakeBackupRequest>, outcome: Result<String, &Status>) {
        let Some((log, caller_of)) = &self.audit else { return };
        let caller = caller_of(request).unwrap_or_default();
        let mut event = caller.event("platform", "backup.take", "backup".into());
        match outcome {
            Ok(after) => event.after = after,
            Err(status) => {
                event.outcome = tenantmesh_proto::audit::v1::Outcome::Failed as i32;
                event.error = format!("{:?}: {}", status.code(), status.message());
            }
        }
        if let Err(e) = log.record(event).await {
            tracing::error!(error = %e, "a backup could not be recorded in the audit log");
        }
    }
}

/// Removes the staging directory when the stream ends, however it ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tonic::async_trait]
impl Backup for BackupService {
    type TakeBackupStream = tokio_stream::wrappers::ReceiverStream<Result<TakeBackupResponse, Status>>;

    async fn take_backup(&self, req: Request<TakeBackupRequest>) -> Result<Response<Self::TakeBackupStream>, Status> {
        let taken = self.take_backup_of(&req).await;
        match &taken {
            Ok((_, files, bytes)) => self.record(&req, Ok(format!("{files} files, {bytes} bytes"))).await,
            Err(status) => self.record(&req, Err(status)).await,
        }
        taken.map(|(stream, _, _)| stream)
    }
}

impl BackupService {
    /// The backup: its stream, and how many files and bytes it holds.
    async fn take_backup_of(
        &self,
        _req: &Request<TakeBackupRequest>,
    ) -> Result<(Response<<Self as Backup>::TakeBackupStream>, usize, u64), Status> {
        if !self.embedded {
            return Err(Status::failed_precondition(
                "backups are of the embedded store; on DynamoDB use its point-in-time recovery (on for every table)",
            ));
        }
        let taken_at_ms = crate::clock::now_ms();
        let data_dir = self.data_dir.clone();
        let staging = Staging(data_dir.join(format!("{}{}", STAGING_PREFIX, uuid::Uuid::new_v4().simple())));
        let at = staging.0.clone();
        let started = std::time::Instant::now();
        let manifest = tokio::task::spawn_blocking(move || take(&data_dir, &at, taken_at_ms))
            .await
            .map_err(|e| Status::internal(format!("backup task: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "backup failed");
                Status::unavailable(format!("backup failed: {e}"))
            })?;
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        let files = manifest.files.len();
        tracing::info!(
            files = manifest.files.len(),
            bytes,
            taken_at_ms,
            snapshot_ms = started.elapsed().as_millis() as u64,
            "backup taken; streaming it"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tenantmesh_telemetry::spawn(async move {
            let staging = staging;
            let paths: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
            if tx.send(Ok(TakeBackupResponse { chunk: Some(Chunk::Manifest(manifest)) })).await.is_err() {
                return;
            }
            for path in paths {
                let mut file = match tokio::fs::File::open(staging.0.join(&path)).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("{path}: {e}")))).await;
                        return;
                    }
                };
                loop {
                    let mut buf = Vec::with_capacity(CHUNK);
                    match (&mut file).take(CHUNK as u64).read_to_end(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) => {
                            if tx.send(Ok(TakeBackupResponse { chunk: Some(Chunk::Data(buf)) })).await.is_err() {
                                return; // the caller went away
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(format!("{path}: {e}")))).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok((Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)), files, bytes))
    }
}

/// The Backup service for a process whose stores are under `data_dir`.
pub fn server(data_dir: PathBuf, embedded: bool) -> BackupServer<BackupService> {
    BackupServer::new(BackupService::new(data_dir, embedded))
}

/// The gRPC name of the Backup service, for health and reflection.
pub const NAME: &str = <BackupServer<BackupService> as tonic::server::NamedService>::NAME;

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    Ok(context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a relative path is safe to write under a directory: no root, no
/// `..`, no empty or `.` components.
pub fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains('\\')
}

/// Takes a backup of `data_dir` into `staging` (created; inside the data
/// directory is fine, it is skipped): every `*.redb` file from one read
/// snapshot each, through the handles this process has open, and every
/// other regular file (silo records, exports, ...) copied. Temporary files
/// (`*.tmp`) and earlier stagings are left out. Blocking.
pub fn take(data_dir: &Path, staging: &Path, taken_at_ms: i64) -> Result<BackupManifest, String> {
    let fail = |what: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", what.display());
    tenantmesh_storage::files::private_dir(staging).map_err(|e| fail(staging, &e))?;
    let mut found = Vec::new();
    walk(data_dir, data_dir, &mut found).map_err(|e| fail(data_dir, &e))?;
    let (stores, others): (Vec<PathBuf>, Vec<PathBuf>) =
        found.into_iter().partition(|rel| rel.extension().is_some_and(|e| e == "redb"));
    let mut files = Vec::new();
    for rel in stores {
        // A table dropped since the walk is simply not in the backup.
        let Some(table) = EmbeddedTable::open_existing(&data_dir.join(&rel)).map_err(|e| fail(&rel, &e))? else {
            continue;
        };
        let dest = staging.join(&rel);
        table.snapshot_to(&dest).map_err(|e| fail(&dest, &e))?;
        files.push(rel);
    }
    for rel in others {
        let dest = staging.join(&rel);
        let copied = std::fs::File::open(data_dir.join(&rel)).and_then(|mut from| {
            let mut into = tenantmesh_storage::files::create_private(&dest)?;
            std::io::copy(&mut from, &mut into).map(drop)
        });
        match copied {
            Ok(()) => files.push(rel),
            // Removed meanwhile (a finished temporary, a dropped export).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&dest, &e)),
        }
    }
    files.sort();
    let mut manifest = BackupManifest { taken_at_ms, files: Vec::new(), version: env!("CARGO_PKG_VERSION").into() };
    for rel in files {
        let path = staging.join(&rel);
        let size = std::fs::metadata(&path).map_err(|e| fail(&path, &e))?.len();
        let sha256 = sha256_file(&path).map_err(|e| fail(&path, &e))?;
        let path = rel.to_str().ok_or_else(|| format!("{} is not UTF-8", rel.display()))?.to_owned();
        manifest.files.push(BackupFile { path, size, sha256 });
    }
    Ok(manifest)
}

fn skipped(rel: &Path) -> bool {
    let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
    first.starts_with(STAGING_PREFIX) || rel.extension().is_some_and(|e| e == "tmp")
}

/// The regular files under `dir`, relative to `root`, leaving stagings and
/// temporary files out.
fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("under root").to_owned();
        if skipped(&rel) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

/// The manifest as JSON (`backup.json`).
pub fn manifest_json(m: &BackupManifest) -> String {
    let files: Vec<serde_json::Value> =
        m.files.iter().map(|f| serde_json::json!({"path": f.path, "size": f.size, "sha256": f.sha256})).collect();
    let doc = serde_json::json!({"taken_at_ms": m.taken_at_ms, "version": m.version, "files": files});
    serde_json::to_string_pretty(&doc).expect("json")
}

/// Refuses anything under `dir` that is not a directory or a regular file
/// (a symlink, a device, a pipe): a backup holds regular files only, and
/// restoring one must never copy what a link points at.
fn only_regular_files(dir: &Path) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let kind = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?.file_type();
        if kind.is_dir() {
            only_regular_files(&path)?;
        } else if !kind.is_file() {
            return Err(format!("{}: not a regular file (a backup holds regular files only)", path.display()));
        }
    }
    Ok(())
}

/// Reads and checks a backup directory: the manifest, and every file it
/// names present with its size and hash, and nothing in it but
/// directories and regular files. The error names what is wrong.
pub fn verify(dir: &Path) -> Result<BackupManifest, String> {
    let kind = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?.file_type();
    if !kind.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    only_regular_files(dir)?;
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (an incomplete backup has no manifest)", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: {what}", path.display());
    let mut manifest = BackupManifest {
        taken_at_ms: doc["taken_at_ms"].as_i64().ok_or_else(|| bad("no taken_at_ms"))?,
        version: doc["version"].as_str().unwrap_or_default().to_owned(),
        files: Vec::new(),
    };
    for f in doc["files"].as_array().ok_or_else(|| bad("no files"))? {
        let file = BackupFile {
            path: f["path"].as_str().ok_or_else(|| bad("a file without a path"))?.to_owned(),
            size: f["size"].as_u64().ok_or_else(|| bad("a file without a size"))?,
            sha256: f["sha256"].as_str().ok_or_else(|| bad("a file without a sha256"))?.to_owned(),
        };
        if !safe_relative(&file.path) || file.path == MANIFEST {
            return Err(bad(&format!("unsafe path {:?}", file.path)));
        }
        let on_disk = dir.join(&file.path);
        let size = std::fs::metadata(&on_disk).map_err(|e| format!("{}: {e}", on_disk.display()))?.len();
        let sha256 = sha256_file(&on_disk).map_err(|e| format!("{}: {e}", on_disk.display()))?;
        if size != file.size || sha256 != file.sha256 {
            return Err(format!("{}: does not match the manifest (damaged or changed)", on_disk.display()));
        }
        manifest.files.push(file);
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::Table;

    #[test]
    fn paths_outside_the_directory_are_refused() {
        for ok in ["data.redb", "tables/t.redb", "exports/a.jsonl"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_backup_holds_every_store_and_file_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = EmbeddedTable::open_shared(data.join("registry.redb")).unwrap();
        store.put("t", "a", b"one".to_vec(), tenantmesh_storage::Condition::None).await.unwrap();
        let dedicated = EmbeddedTable::open_shared(data.join("tables/x.redb")).unwrap();
        dedicated.put("t", "b", b"two".to_vec(), tenantmesh_storage::Condition::None).await.unwrap();
        std::fs::write(data.join("silos.json"), "{}").unwrap();
        std::fs::write(data.join("half.tmp"), "x").unwrap();

        let staging = data.join(".backup-1");
        let manifest = take(&data, &staging, 7).unwrap();
        let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["registry.redb", "silos.json", "tables/x.redb"]);
        std::fs::write(staging.join(MANIFEST), manifest_json(&manifest)).unwrap();
        assert_eq!(verify(&staging).unwrap(), manifest);
        // The copy is a table of its own with the items.
        let copy = EmbeddedTable::open(staging.join("tables/x.redb")).unwrap();
        assert_eq!(copy.get("t", "b").await.unwrap().unwrap().data, b"two");
        drop(copy);
        // A second backup leaves the first (inside the data dir) out.
        let again = take(&data, &data.join(".backup-2"), 8).unwrap();
        assert_eq!(again.files.len(), 3);
        // A table file that is gone is not in the backup, and not created again.
        assert!(EmbeddedTable::open_existing(&data.join("tables/gone.redb")).unwrap().is_none());
        assert!(!data.join("tables/gone.redb").exists());

        // Everything is the owner's alone.
        use std::os::unix::fs::PermissionsExt;
        for f in &manifest.files {
            let mode = std::fs::metadata(staging.join(&f.path)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.path);
        }
        // A link in a backup is refused, whatever it points at.
        std::os::unix::fs::symlink("/etc/passwd", staging.join("tables/extra.redb")).unwrap();
        assert!(verify(&staging).unwrap_err().contains("not a regular file"));
        std::fs::remove_file(staging.join("tables/extra.redb")).unwrap();
        std::fs::remove_file(staging.join("silos.json")).unwrap();
        std::os::unix::fs::symlink(data.join("silos.json"), staging.join("silos.json")).unwrap();
        assert!(verify(&staging).unwrap_err().contains("not a regular file"), "a file of the manifest as a link");
        std::fs::remove_file(staging.join("silos.json")).unwrap();

        std::fs::write(staging.join("silos.json"), "{\"x\":1}").unwrap();
        assert!(verify(&staging).unwrap_err().contains("does not match"));
        std::fs::remove_file(staging.join(MANIFEST)).unwrap();
        assert!(verify(&staging).unwrap_err().contains("incomplete"));
    }
}
