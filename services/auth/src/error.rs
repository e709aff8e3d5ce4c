//! The auth service's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, unknown or disabled user: one error for all three.
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("too many failed logins")]
    LockedOut(std::time::Duration),
    #[error("user {0} already exists in this tenant")]
    UserExists(String),
    #[error("tenant {0} not found")]
    TenantNotFound(String),
    #[error("tenant {0} is deleted")]
    TenantDeleted(String),
    #[error("user {0} not found")]
    UserNotFound(String),
    #[error("you cannot disable or delete yourself")]
    OwnAccount,
    #[error("only platform services may set password_hash")]
    HashNotAllowed,
    #[error("the user changed concurrently; retry")]
    ConcurrentChange,
    /// Password hashing is at capacity (RESOURCE_EXHAUSTED, retry soon).
    #[error("password hashing is at capacity")]
    Busy,
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidCredentials => Status::unauthenticated("invalid credentials"),
            AuthError::LockedOut(wait) => {
                use tonic_types::{ErrorDetails, StatusExt};
                // Round up: a client that waits exactly this long gets in.
                let wait = std::time::Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
                Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    format!("too many failed logins; retry in {} s", wait.as_secs()),
                    ErrorDetails::with_retry_info(Some(wait)),
                )
            }
            e @ AuthError::UserExists(_) => Status::already_exists(e.to_string()),
            e @ (AuthError::TenantNotFound(_) | AuthError::UserNotFound(_)) => Status::not_found(e.to_string()),
            e @ (AuthError::TenantDeleted(_) | AuthError::OwnAccount) => Status::failed_precondition(e.to_string()),
            e @ AuthError::HashNotAllowed => Status::permission_denied(e.to_string()),
            e @ AuthError::ConcurrentChange => Status::aborted(e.to_string()),
            AuthError::Busy => {
                tracing::warn!("refused: password hashing at capacity");
                tenantmesh_credentials::PoolError::busy_refusal().status()
            }
            AuthError::Corrupt(cause) | AuthError::Internal(cause) => {
                tracing::error!(cause, "auth internal error");
                Status::internal("internal error")
            }
            AuthError::Storage(e) => tenantmesh_service::errors::storage_status(e, "auth"),
        }
    }
}

impl From<tenantmesh_credentials::PoolError> for AuthError {
    fn from(e: tenantmesh_credentials::PoolError) -> Self {
        match e {
            tenantmesh_credentials::PoolError::Busy => AuthError::Busy,
            other => AuthError::Internal(other.to_string()),
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
            (AuthError::InvalidCredentials, Code::Unauthenticated),
            (AuthError::LockedOut(std::time::Duration::from_millis(1500)), Code::ResourceExhausted),
            (AuthError::UserExists("a".into()), Code::AlreadyExists),
            (AuthError::TenantNotFound("a".into()), Code::NotFound),
            (AuthError::UserNotFound("a@b.c".into()), Code::NotFound),
            (AuthError::TenantDeleted("a".into()), Code::FailedPrecondition),
            (AuthError::OwnAccount, Code::FailedPrecondition),
            (AuthError::HashNotAllowed, Code::PermissionDenied),
            (AuthError::ConcurrentChange, Code::Aborted),
            (AuthError::Busy, Code::ResourceExhausted),
            (AuthError::Corrupt("x".into()), Code::Internal),
            (AuthError::Storage(StorageError::Backend("io".into())), Code::Unavailable),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
