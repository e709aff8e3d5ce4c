//! gRPC errors shared by the services: INVALID_ARGUMENT with
//! `google.rpc.BadRequest` field violations, and the one mapping of a
//! storage failure to a status code ([`storage_status`]). Each service's
//! own error enum keeps only its own variants and hands storage failures
//! here.

use tenantmesh_storage::StorageError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The status for a storage failure of `store` (the service's name, or
/// `data`). Internal detail is logged, never sent:
/// - a refused condition: ABORTED (a concurrent write won);
/// - the isolation policy refused the call: PERMISSION_DENIED (a security event);
/// - a missing table: FAILED_PRECONDITION (it must be provisioned);
/// - an invalid request to the store: INTERNAL (a bug here);
/// - the backend failed or is unreachable, or a fenced write found its
///   partition fenced (its tenant moved on): UNAVAILABLE (retry).
pub fn storage_status(e: StorageError, store: &str) -> Status {
    match e {
        StorageError::ConditionFailed { current, .. } => {
            Status::aborted(format!("concurrent write (current version {current:?})"))
        }
        StorageError::AccessDenied { action, key } => {
            tracing::warn!(security_event = "access_denied", action, refused_key = key, store, "storage access denied");
            Status::permission_denied("access denied by the tenant's isolation policy")
        }
        StorageError::NoSuchTable(table) => {
            tracing::warn!(table, store, "table does not exist");
            Status::failed_precondition(format!("table {table} does not exist"))
        }
        StorageError::Invalid(cause) => {
            tracing::error!(cause, store, "invalid storage request");
            Status::internal("internal error")
        }
        StorageError::Fenced => {
            tracing::info!(store, "write refused by the partition's fence: the tenant is being moved or removed");
            Status::unavailable("the tenant is being moved; retry")
        }
        StorageError::Backend(cause) => {
            tracing::error!(cause, store, "storage failed");
            Status::unavailable(format!("{store} storage unavailable"))
        }
    }
}

/// Longest tenant display name.
pub const MAX_TENANT_NAME_LEN: usize = 200;

/// Collects field violations of one request.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: &str, description: impl Into<String>) -> &mut Self {
        self.0.push(FieldViolation::new(field, description));
        self
    }

    /// Adds a violation if `value` is empty.
    pub fn require(&mut self, field: &str, value: &str) -> &mut Self {
        if value.is_empty() {
            self.add(field, "is required");
        }
        self
    }

    /// Adds a violation if `value` is not a valid tenant id.
    pub fn tenant_id(&mut self, field: &str, value: &str) -> &mut Self {
        if let Err(why) = crate::ids::validate_tenant_id(value) {
            self.add(field, format!("{why} (pattern ^[a-z0-9][a-z0-9-]{{2,62}}$)"));
        }
        self
    }

    /// Adds a violation if `value` is too long for a tenant's display name
    /// (or empty, when `required`).
    pub fn tenant_name(&mut self, field: &str, value: &str, required: bool) -> &mut Self {
        if required {
            self.require(field, value);
        }
        if value.chars().count() > MAX_TENANT_NAME_LEN {
            self.add(field, format!("must be at most {MAX_TENANT_NAME_LEN} characters"));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` if nothing was violated, else INVALID_ARGUMENT naming every field.
    pub fn check(self) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = self.0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect();
        Err(Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {}", fields.join("; ")),
            ErrorDetails::with_bad_request(self.0),
        ))
    }
}

/// INVALID_ARGUMENT for one field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    let mut v = Violations::new();
    v.add(field, description);
    v.check().expect_err("one violation was added")
}

/// The field names in a status's BadRequest details (for tests and clients).
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_map_to_one_code_each() {
        let cases = [
            (StorageError::ConditionFailed { index: 0, current: Some(2) }, Code::Aborted),
            (
                StorageError::AccessDenied { action: "dynamodb:GetItem".into(), key: "globex".into() },
                Code::PermissionDenied,
            ),
            (StorageError::NoSuchTable("t".into()), Code::FailedPrecondition),
            (StorageError::Invalid("empty key".into()), Code::Internal),
            (StorageError::Backend("disk on fire".into()), Code::Unavailable),
            (StorageError::Fenced, Code::Unavailable),
        ];
        for (e, code) in cases {
            let status = storage_status(e, "auth");
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("disk on fire") && !status.message().contains("empty key"));
        }
        assert_eq!(storage_status(StorageError::Backend("x".into()), "auth").message(), "auth storage unavailable");
    }

    #[test]
    fn violations_become_invalid_argument_with_fields() {
        let mut v = Violations::new();
        v.require("name", "").tenant_id("tenant_id", "Bad!");
        let status = v.check().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), vec!["name", "tenant_id"]);
        assert!(status.message().contains("tenant_id"));
        assert!(Violations::new().check().is_ok());
    }
}
