//! The registry's errors and their gRPC status.

use tenantmesh_storage::StorageError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("tenant {0} not found")]
    NotFound(String),
    #[error("tenant {0} already exists")]
    AlreadyExists(String),
    #[error("version mismatch: expected {expected}, current {current}")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("tier change from {from} to {to} changes the isolation model")]
    ModelChange { from: String, to: String },
    #[error("the placement's isolation model is not that of tier {tier}")]
    PlacementMismatch { tier: String },
    #[error("the platform tenant {0}")]
    PlatformTenant(&'static str),
    #[error("corrupt tenant record: {0}")]
    Corrupt(String),
    #[error("the tenant has no usage alert {0}")]
    NoSuchAlert(String),
    /// Field violations found once the record was read.
    #[error("{}", .0.message())]
    Invalid(Status),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl RegistryError {
    /// A failed insert: a condition failure means the id is taken.
    pub(crate) fn from_write(e: StorageError, tenant_id: &str) -> Self {
        match e {
            StorageError::ConditionFailed { .. } => RegistryError::AlreadyExists(tenant_id.into()),
            e => e.into(),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(id) => Status::not_found(format!("tenant {id} not found")),
            RegistryError::AlreadyExists(id) => Status::already_exists(format!("tenant {id} already exists")),
            e @ RegistryError::VersionMismatch { .. } => Status::aborted(e.to_string()),
            e @ RegistryError::ModelChange { .. } => {
                Status::failed_precondition(format!("{e}: moving between isolation models is Onboarding.ChangeTier"))
            }
            e @ (RegistryError::PlacementMismatch { .. } | RegistryError::PlatformTenant(_)) => {
                Status::failed_precondition(e.to_string())
            }
            RegistryError::Corrupt(cause) => {
                tracing::error!(cause, "corrupt tenant record");
                Status::internal("internal error")
            }
            RegistryError::Storage(e) => tenantmesh_service::errors::storage_status(e, "registry"),
            e @ RegistryError::NoSuchAlert(_) => Status::not_found(e.to_string()),
            RegistryError::Invalid(status) => status,
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
            (RegistryError::NotFound("a".into()), Code::NotFound),
            (RegistryError::AlreadyExists("a".into()), Code::AlreadyExists),
            (RegistryError::VersionMismatch { expected: 1, current: 2 }, Code::Aborted),
            (RegistryError::ModelChange { from: "a".into(), to: "b".into() }, Code::FailedPrecondition),
            (RegistryError::PlatformTenant("cannot be deactivated"), Code::FailedPrecondition),
            (RegistryError::Corrupt("x".into()), Code::Internal),
            (RegistryError::Storage(StorageError::Backend("io".into())), Code::Unavailable),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
