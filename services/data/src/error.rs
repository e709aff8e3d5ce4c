//! The data service's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

/// How long a client should wait before retrying a write refused while
/// its tenant is being moved.
pub const MIGRATION_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("item not found")]
    NotFound,
    /// `expected_version` did not match: ABORTED (optimistic concurrency).
    #[error("version mismatch: expected {expected}, current {}", current.map_or("none (item does not exist)".to_owned(), |c| c.to_string()))]
    VersionMismatch { expected: u64, current: Option<u64> },
    #[error("corrupt item: {0}")]
    Corrupt(String),
    /// A silo instance asked for another tenant's items.
    #[error("this data-service instance serves another tenant only")]
    WrongSilo,
    /// A placement names a table the tenant may not use.
    #[error("the tenant's placement names a table it may not use")]
    ForeignTable,
    /// The tenant is moving: writes pause, reads go on. (A write that
    /// passed this check and then met the store's fence is
    /// `Storage(Fenced)`, answered the same way.)
    #[error("the tenant is changing tier: writes are paused for a moment, reads go on; retry")]
    Migrating,
    /// The tenant's store cannot be had (its table is missing, or its
    /// policy cannot be built).
    #[error(transparent)]
    Policy(#[from] tenantmesh_isolation::PolicyError),
    /// The write would take the tenant's items past its storage quota, or
    /// its change history past its cap.
    #[error("{0}")]
    OverQuota(tenantmesh_app::quota::OverQuota),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<DataError> for Status {
    fn from(e: DataError) -> Self {
        match e {
            DataError::NotFound => Status::not_found("item not found"),
            DataError::OverQuota(over) => over.status(),
            e @ DataError::VersionMismatch { .. } => Status::aborted(e.to_string()),
            DataError::Corrupt(cause) => {
                tracing::error!(cause, "corrupt item");
                Status::internal("internal error")
            }
            e @ DataError::WrongSilo => {
                tracing::warn!(security_event = "wrong_silo", "refused another tenant's call");
                Status::permission_denied(e.to_string())
            }
            e @ DataError::ForeignTable => {
                tracing::error!(security_event = "foreign_table", "a placement names a table the tenant may not use");
                Status::permission_denied(e.to_string())
            }
            DataError::Migrating | DataError::Storage(StorageError::Fenced) => {
                use tonic_types::{ErrorDetails, StatusExt};
                Status::with_error_details(
                    tonic::Code::Unavailable,
                    DataError::Migrating.to_string(),
                    ErrorDetails::with_retry_info(Some(MIGRATION_RETRY)),
                )
            }
            DataError::Policy(tenantmesh_isolation::PolicyError::NoSuchTable(table)) => {
                tenantmesh_service::errors::storage_status(StorageError::NoSuchTable(table), "data")
            }
            DataError::Policy(e) => {
                tracing::error!(error = %e, "cannot build the tenant's session policy");
                Status::internal("internal error")
            }
            DataError::Storage(e) => tenantmesh_service::errors::storage_status(e, "data"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_codes() {
        let cases = [
            (DataError::NotFound, Code::NotFound),
            (DataError::VersionMismatch { expected: 1, current: Some(2) }, Code::Aborted),
            (DataError::Corrupt("x".into()), Code::Internal),
            (DataError::WrongSilo, Code::PermissionDenied),
            (DataError::ForeignTable, Code::PermissionDenied),
            (DataError::Migrating, Code::Unavailable),
            (DataError::Storage(StorageError::Fenced), Code::Unavailable),
            (
                DataError::OverQuota(tenantmesh_app::quota::OverQuota {
                    tenant: "a".into(),
                    over: tenantmesh_app::quota::Over::History,
                    quota: 10,
                    stored: 9,
                    size: 2,
                }),
                Code::ResourceExhausted,
            ),
            (DataError::Policy(tenantmesh_isolation::PolicyError::NoSuchTable("t".into())), Code::FailedPrecondition),
            (DataError::Policy(tenantmesh_isolation::PolicyError::TooLong(3000)), Code::Internal),
            (DataError::Storage(StorageError::Backend("io".into())), Code::Unavailable),
            (DataError::Storage(StorageError::Invalid("x".into())), Code::Internal),
            (
                DataError::Storage(StorageError::AccessDenied { action: "a".into(), key: "k".into() }),
                Code::PermissionDenied,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
