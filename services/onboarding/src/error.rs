//! The onboarding service's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum OnboardingError {
    #[error("no workflow {0}")]
    NotFound(String),
    #[error("tenant {0} is already registered")]
    TenantTaken(String),
    #[error("workflow {0} is being run by another instance")]
    Superseded(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<OnboardingError> for Status {
    fn from(e: OnboardingError) -> Self {
        match e {
            e @ OnboardingError::NotFound(_) => Status::not_found(e.to_string()),
            e @ OnboardingError::TenantTaken(_) => Status::already_exists(e.to_string()),
            e @ OnboardingError::Superseded(_) => Status::aborted(e.to_string()),
            OnboardingError::Corrupt(cause) | OnboardingError::Internal(cause) => {
                tracing::error!(cause, "onboarding internal error");
                Status::internal("internal error")
            }
            OnboardingError::Storage(StorageError::AccessDenied { .. }) => Status::permission_denied("access denied"),
            OnboardingError::Storage(e) => {
                tracing::error!(error = %e, "onboarding storage failed");
                Status::unavailable("onboarding storage unavailable")
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
            (OnboardingError::NotFound("a".into()), Code::NotFound),
            (OnboardingError::TenantTaken("a".into()), Code::AlreadyExists),
            (OnboardingError::Superseded("a/onboard".into()), Code::Aborted),
            (OnboardingError::Internal("x".into()), Code::Internal),
            (OnboardingError::Storage(StorageError::Backend("io".into())), Code::Unavailable),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
