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

/// Polls `check` until it returns something, failing after `timeout`;
/// what it returned.
pub async fn eventually_some<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing found within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts that a contract suite (`suite`: its source, `include_str!`)
/// calls every RPC of `services` (full names, as in the compiled protos):
/// each method's client call, `.snake_case_name(`, appears in it. A new RPC
/// without a contract test fails here, naming it.
pub fn assert_contract_covers(suite: &str, services: &[&str]) {
    assert_contract_covers_in(tenantmesh_proto::FILE_DESCRIPTOR_SET, suite, services);
}

/// [`assert_contract_covers`] for the services of another descriptor set
/// (an application service's).
pub fn assert_contract_covers_in(descriptor_set: &[u8], suite: &str, services: &[&str]) {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(descriptor_set).expect("descriptor set");
    let mut missing = Vec::new();
    let mut found = 0;
    for file in &set.file {
        for service in &file.service {
            let name = format!("{}.{}", file.package(), service.name());
            if !services.contains(&name.as_str()) {
                continue;
            }
            found += 1;
            for method in &service.method {
                let mut snake = String::new();
                for (i, c) in method.name().chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        snake.push('_');
                    }
                    snake.push(c.to_ascii_lowercase());
                }
                if !suite.contains(&format!(".{snake}(")) {
                    missing.push(format!("{name}/{}", method.name()));
                }
            }
        }
    }
    assert_eq!(found, services.len(), "a service named is not in the protos: {services:?}");
    assert!(missing.is_empty(), "RPCs without a contract test: {missing:?}");
}

/// Waits (up to 30 s) until the service catalog of the registry behind
/// `registry` lists the application service `name` at `endpoint`, asked
/// with `admin`'s token.
pub async fn until_listed(registry: tonic::transport::Channel, admin: &str, name: &str, endpoint: &str) {
    use tenantmesh_proto::registry::v1::{ListServicesRequest, tenant_registry_client::TenantRegistryClient};
    eventually(Duration::from_secs(30), || {
        let mut registry = TenantRegistryClient::new(registry.clone());
        let req = crate::authed(ListServicesRequest {}, admin);
        async move {
            let listed = registry.list_services(req).await.unwrap().into_inner().services;
            listed.iter().any(|s| s.name == name && s.endpoint == endpoint)
        }
    })
    .await;
}
