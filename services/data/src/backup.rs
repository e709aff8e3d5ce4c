//! `tenantmesh.backup.v1.Backup`: a consistent copy of the embedded stores
//! open in this process, streamed to the caller while the service runs
//! (see `tenantmesh_service::backup`).

use std::path::PathBuf;

use tenantmesh_proto::backup::v1::backup_server::Backup;
use tenantmesh_proto::backup::v1::{TakeBackupRequest, TakeBackupResponse, take_backup_response::Chunk};
use tenantmesh_service::backup as files;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

/// Bytes per streamed message.
const CHUNK: usize = 1 << 20;

pub struct BackupService {
    data_dir: PathBuf,
    /// On DynamoDB there is nothing here to copy: its point-in-time
    /// recovery covers the tables.
    embedded: bool,
}

impl BackupService {
    pub fn new(data_dir: PathBuf, embedded: bool) -> Self {
        Self { data_dir, embedded }
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

    async fn take_backup(&self, _req: Request<TakeBackupRequest>) -> Result<Response<Self::TakeBackupStream>, Status> {
        if !self.embedded {
            return Err(Status::failed_precondition(
                "backups are of the embedded store; on DynamoDB use its point-in-time recovery (on for every table)",
            ));
        }
        let taken_at_ms = tenantmesh_service::metering::now_ms() as i64;
        let data_dir = self.data_dir.clone();
        let staging = Staging(data_dir.join(format!("{}{}", files::STAGING_PREFIX, uuid::Uuid::new_v4().simple())));
        let at = staging.0.clone();
        let started = std::time::Instant::now();
        let manifest = tokio::task::spawn_blocking(move || files::take(&data_dir, &at, taken_at_ms))
            .await
            .map_err(|e| Status::internal(format!("backup task: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "backup failed");
                Status::unavailable(format!("backup failed: {e}"))
            })?;
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        tracing::info!(
            files = manifest.files.len(),
            bytes,
            taken_at_ms,
            snapshot_ms = started.elapsed().as_millis() as u64,
            "backup taken; streaming it"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
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
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
