//! The data service's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("item not found")]
    NotFound,
    /// `expected_version` did not match: ABORTED (optimistic concurrency).
    #[error("version mismatch: expected {expected}, current {}", current.map_or("none (item does not exist)".to_owned(), |c| c.to_string()))]
    VersionMismatch { expected: u64, current: Option<u64> },
    #[error("corrupt item: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<DataError> for Status {
    fn from(e: DataError) -> Self {
        match e {
            DataError::NotFound => Status::not_found("item not found"),
            e @ DataError::VersionMismatch { .. } => Status::aborted(e.to_string()),
            DataError::Corrupt(cause) => {
                tracing::error!(cause, "corrupt item");
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
