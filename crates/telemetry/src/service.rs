//! Which service is at work: the OpenTelemetry `service.name` (and
//! `service.instance.id`) of what a task does.
//!
//! A process may host several services (`tenantmesh up` runs the four of
//! the mesh and every silo instance in one). Each request is handled in a
//! task-local scope naming its service (the telemetry layer sets it), and
//! so is each service's own background work when it is run with
//! [`Service::run`] or spawned with [`spawn`] from inside one. Spans are
//! exported under that service's resource, log lines carry it as
//! `service`, and metrics are recorded by its own meter; work outside any
//! scope is the process's (the name given to [`crate::init`]).

use std::future::Future;
use std::sync::Arc;

/// A service (and optionally one instance of it) that work is done for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service(Arc<Names>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct Names {
    name: Box<str>,
    instance: Option<Box<str>>,
}

tokio::task_local! {
    static SERVICE: Service;
}

/// The span attribute that carries a span's service until export, where it
/// becomes the `service.name` of the resource the span is exported under.
pub(crate) const NAME_KEY: &str = "service.name";
/// Likewise for `service.instance.id`.
pub(crate) const INSTANCE_KEY: &str = "service.instance.id";

impl Service {
    /// The service `name` (its `service.name`).
    pub fn new(name: impl Into<Box<str>>) -> Self {
        Self(Arc::new(Names { name: name.into(), instance: None }))
    }

    /// One `instance` of the service `name` (its `service.instance.id`),
    /// e.g. a silo tenant's own data service.
    pub fn instance(name: impl Into<Box<str>>, instance: impl Into<Box<str>>) -> Self {
        Self(Arc::new(Names { name: name.into(), instance: Some(instance.into()) }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.0.instance.as_deref()
    }

    /// The service the current task works for, if it is in a scope.
    pub fn current() -> Option<Service> {
        SERVICE.try_with(Service::clone).ok()
    }

    /// Runs `fut` as this service's work (see the module docs).
    pub fn run<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        SERVICE.scope(self, fut)
    }

    /// Runs `f` as this service's work, synchronously.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        SERVICE.sync_scope(self.clone(), f)
    }

    /// The OpenTelemetry resource of this service: the process's resource
    /// settings (`OTEL_RESOURCE_ATTRIBUTES`, the SDK's) with its names.
    pub(crate) fn resource(&self) -> opentelemetry_sdk::Resource {
        let mut builder = opentelemetry_sdk::Resource::builder().with_service_name(self.name().to_owned());
        if let Some(instance) = self.instance_id() {
            builder = builder.with_attribute(opentelemetry::KeyValue::new(INSTANCE_KEY, instance.to_owned()));
        }
        builder.build()
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.instance_id() {
            Some(instance) => write!(f, "{}/{instance}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// `fut`, run as the current service's work wherever it is polled (for a
/// `JoinSet` or another executor; see [`spawn`]).
pub fn carried<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let service = Service::current();
    async move {
        match service {
            Some(service) => service.run(fut).await,
            None => fut.await,
        }
    }
}

/// `tokio::spawn`, keeping the current service: spawned work is still
/// that service's.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(carried(fut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_work_keeps_its_service_and_work_outside_has_none() {
        assert_eq!(Service::current(), None);
        let data = Service::instance("data", "silo-acme");
        let seen =
            data.clone().run(async { spawn(async { Service::current() }).await.unwrap() }).await.expect("a service");
        assert_eq!((seen.name(), seen.instance_id()), ("data", Some("silo-acme")));
        assert_eq!(seen.to_string(), "data/silo-acme");
        assert_eq!(tokio::spawn(async { Service::current() }).await.unwrap(), None, "plain tokio::spawn outside");
        assert_eq!(Service::new("auth").enter(|| Service::current().map(|s| s.to_string())), Some("auth".into()));
    }
}
