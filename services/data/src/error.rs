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
            DataError::Storage(StorageError::AccessDenied { action, key }) => {
                // The span carries the tenant; the guard has logged its own
                // refusals, this also covers denials coming back from AWS.
                tracing::warn!(security_event = "access_denied", action, refused_key = key, "storage access denied");
                Status::permission_denied("access denied by the tenant's isolation policy")
            }
            DataError::Storage(StorageError::NoSuchTable(cause)) => {
                tracing::warn!(cause, "the tenant's table does not exist");
                Status::failed_precondition("the tenant's table does not exist")
            }
            DataError::Storage(StorageError::Invalid(cause)) => {
                tracing::error!(cause, "invalid storage request");
                Status::internal("internal error")
            }
            DataError::Storage(StorageError::ConditionFailed { current, .. }) => {
                Status::aborted(format!("concurrent write (current version {current:?})"))
            }
            DataError::Storage(e) => {
                tracing::error!(error = %e, "data storage failed");
                Status::unavailable("data storage unavailable")
            }
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
