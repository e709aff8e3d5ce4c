//! The onboarding service's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

use crate::workflow::WorkflowState;

#[derive(Debug, thiserror::Error)]
pub enum OnboardingError {
    #[error("no workflow {0}")]
    NotFound(String),
    #[error("tenant {0} not found")]
    TenantNotFound(String),
    #[error("tenant {0} is already registered")]
    TenantTaken(String),
    #[error("workflow {0} is being run by another instance")]
    Superseded(String),
    #[error("workflow {id} is {state:?}; only a FAILED workflow can be retried")]
    NotRetryable { id: String, state: WorkflowState },
    #[error("workflow {by} superseded {id} for the tenant")]
    Replaced { id: String, by: String },
    #[error("workflow {id} is {state:?} for the tenant; wait for it to end, or retry it, first")]
    InProgress { id: String, state: WorkflowState },
    #[error("another workflow for the tenant started meanwhile; try again")]
    Busy,
    #[error("the platform tenant {0}")]
    PlatformTenant(&'static str),
    #[error("only an ACTIVE tenant can change tier")]
    NotActive,
    #[error("the tenant is already on tier {0}")]
    SameTier(String),
    #[error("watcher fell {0} events behind; resume with after_sequence")]
    Lagged(u64),
    /// Password hashing is at capacity (RESOURCE_EXHAUSTED, retry soon).
    #[error("password hashing is at capacity")]
    HashingBusy,
    /// The caller has as many event streams open as it may.
    #[error("{0} event streams are open for this caller; close one first")]
    TooManyWatchers(usize),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<OnboardingError> for Status {
    fn from(e: OnboardingError) -> Self {
        use OnboardingError as E;
        match e {
            e @ (E::NotFound(_) | E::TenantNotFound(_)) => Status::not_found(e.to_string()),
            e @ E::TenantTaken(_) => Status::already_exists(e.to_string()),
            e @ (E::Superseded(_) | E::Busy) => Status::aborted(e.to_string()),
            e @ (E::NotRetryable { .. }
            | E::Replaced { .. }
            | E::InProgress { .. }
            | E::PlatformTenant(_)
            | E::NotActive
            | E::SameTier(_)) => Status::failed_precondition(e.to_string()),
            e @ E::Lagged(_) => Status::resource_exhausted(e.to_string()),
            E::HashingBusy => tenantmesh_credentials::PoolError::busy_refusal().status(),
            E::TooManyWatchers(n) => tenantmesh_admission::limits::Refusal {
                limit: tenantmesh_admission::limits::Limit::Concurrency,
                subject: "caller:event-streams".into(),
                description: format!("{n} WatchEvents streams per caller"),
                retry_after: std::time::Duration::from_secs(1),
            }
            .status(),
            E::Corrupt(cause) | E::Internal(cause) => {
                tracing::error!(cause, "onboarding internal error");
                Status::internal("internal error")
            }
            E::Storage(e) => tenantmesh_service::errors::storage_status(e, "onboarding"),
        }
    }
}

impl From<tenantmesh_credentials::PoolError> for OnboardingError {
    fn from(e: tenantmesh_credentials::PoolError) -> Self {
        match e {
            tenantmesh_credentials::PoolError::Busy => OnboardingError::HashingBusy,
            other => OnboardingError::Internal(other.to_string()),
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
            (OnboardingError::Busy, Code::Aborted),
            (OnboardingError::HashingBusy, Code::ResourceExhausted),
            (OnboardingError::TooManyWatchers(8), Code::ResourceExhausted),
            (OnboardingError::NotRetryable { id: "a".into(), state: WorkflowState::Running }, Code::FailedPrecondition),
            (OnboardingError::PlatformTenant("cannot be offboarded"), Code::FailedPrecondition),
            (OnboardingError::Lagged(3), Code::ResourceExhausted),
            (OnboardingError::Internal("x".into()), Code::Internal),
            (OnboardingError::Storage(StorageError::Backend("io".into())), Code::Unavailable),
            (OnboardingError::Storage(StorageError::Invalid("x".into())), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
