//! Assertions on statuses, and waiting for a condition.

use std::time::Duration;

use tonic::{Code, Status};

pub use tenantmesh_service::errors::violated_fields;

/// Asserts that `result` failed with `code`; returns the status.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// Asserts INVALID_ARGUMENT naming `field` among its BadRequest violations.
#[track_caller]
pub fn expect_invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) -> Status {
    let s = expect_code(result, Code::InvalidArgument);
    let fields = violated_fields(&s);
    assert!(fields.iter().any(|f| f == field), "expected a violation of {field:?}, got {fields:?} ({s:?})");
    s
}

/// Polls `check` until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
