//! Exporting each span under its own service's resource, when one process
//! hosts several services (see [`crate::Service`]).
//!
//! [`Tagger`] marks a span started inside a service's scope with that
//! service (`service.name`, `service.instance.id` as span attributes); the
//! server and client spans carry them from the start. [`ByService`] moves
//! those attributes to the resource at export: spans are grouped by
//! service and each group goes to an exporter of its own, made on first
//! use with that service's resource. Spans of no service go to the
//! process's exporter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use crate::service::{INSTANCE_KEY, NAME_KEY, Service};

/// Marks spans started in a service's scope with the service.
#[derive(Debug, Default)]
pub(crate) struct Tagger;

impl SpanProcessor for Tagger {
    fn on_start(&self, span: &mut Span, _cx: &Context) {
        use opentelemetry::trace::Span as _;
        if let Some(service) = Service::current() {
            span.set_attribute(KeyValue::new(NAME_KEY, service.name().to_owned()));
            if let Some(instance) = service.instance_id() {
                span.set_attribute(KeyValue::new(INSTANCE_KEY, instance.to_owned()));
            }
        }
    }
    fn on_end(&self, _span: SpanData) {}
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

type Make<E> = dyn Fn() -> Result<E, String> + Send + Sync;

/// Exports each span under its service's resource (see the module docs).
pub(crate) struct ByService<E> {
    make: Box<Make<E>>,
    /// The process's exporter, for spans of no service.
    process: E,
    services: Mutex<HashMap<Service, Arc<E>>>,
}

impl<E> std::fmt::Debug for ByService<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByService").finish_non_exhaustive()
    }
}

impl<E: SpanExporter> ByService<E> {
    /// `make` makes one exporter (each gets its resource set once made).
    pub(crate) fn new(make: impl Fn() -> Result<E, String> + Send + Sync + 'static) -> Result<Self, String> {
        let process = make()?;
        Ok(Self { make: Box::new(make), process, services: Mutex::new(HashMap::new()) })
    }

    fn exporter(&self, service: &Service) -> Result<Arc<E>, OTelSdkError> {
        let mut services = self.services.lock().expect("exporters lock");
        if let Some(e) = services.get(service) {
            return Ok(e.clone());
        }
        let mut exporter = (self.make)().map_err(OTelSdkError::InternalFailure)?;
        exporter.set_resource(&service.resource());
        let exporter = Arc::new(exporter);
        services.insert(service.clone(), exporter.clone());
        Ok(exporter)
    }

    fn each(&self, f: impl Fn(&E) -> OTelSdkResult) -> OTelSdkResult {
        let services: Vec<_> = self.services.lock().expect("exporters lock").values().cloned().collect();
        services.iter().map(|e| f(e)).fold(f(&self.process), |all, one| all.and(one))
    }
}

/// Takes the service attributes off `span`: its service, if it has one.
fn take_service(span: &mut SpanData) -> Option<Service> {
    let mut name = None;
    let mut instance = None;
    span.attributes.retain(|kv| {
        let slot = match kv.key.as_str() {
            NAME_KEY => &mut name,
            INSTANCE_KEY => &mut instance,
            _ => return true,
        };
        if slot.is_none()
            && let Value::String(s) = &kv.value
        {
            *slot = Some(s.as_str().to_owned());
        }
        false
    });
    name.map(|name| match instance {
        Some(instance) => Service::instance(name, instance),
        None => Service::new(name),
    })
}

impl<E: SpanExporter> SpanExporter for ByService<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut groups: HashMap<Option<Service>, Vec<SpanData>> = HashMap::new();
        for mut span in batch {
            groups.entry(take_service(&mut span)).or_default().push(span);
        }
        let mut outcome = Ok(());
        for (service, spans) in groups {
            let result = match service {
                None => self.process.export(spans).await,
                Some(service) => match self.exporter(&service) {
                    Ok(exporter) => exporter.export(spans).await,
                    Err(e) => Err(e),
                },
            };
            outcome = outcome.and(result);
        }
        outcome
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.each(|e| e.shutdown_with_timeout(timeout))
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.each(|e| e.force_flush())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.process.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps what it exported, with the `service.name` of its resource.
    #[derive(Debug, Clone, Default)]
    struct Kept {
        resource: Arc<Mutex<String>>,
        spans: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let resource = self.resource.lock().unwrap().clone();
            for span in batch {
                assert!(span.attributes.iter().all(|kv| kv.key.as_str() != NAME_KEY), "taken off the span");
                self.spans.lock().unwrap().push((resource.clone(), span.name.into_owned()));
            }
            Ok(())
        }
        fn set_resource(&mut self, resource: &Resource) {
            let name = resource.get(&opentelemetry::Key::from_static_str(NAME_KEY)).map(|v| v.to_string());
            let instance = resource.get(&opentelemetry::Key::from_static_str(INSTANCE_KEY)).map(|v| v.to_string());
            *self.resource.lock().unwrap() = format!("{}{}", name.unwrap_or_default(), instance.unwrap_or_default());
        }
    }

    fn span(name: &'static str, attributes: Vec<KeyValue>) -> SpanData {
        use opentelemetry::trace::{SpanContext, SpanKind, Status};
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: name.into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[tokio::test]
    async fn each_span_is_exported_under_its_services_resource() {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let made = spans.clone();
        let mut routed =
            ByService::new(move || Ok(Kept { resource: Default::default(), spans: made.clone() })).unwrap();
        routed.set_resource(&Resource::builder().with_service_name("tenantmesh").build());
        let batch = vec![
            span("login", vec![KeyValue::new(NAME_KEY, "auth"), KeyValue::new("tenant.id", "acme")]),
            span("get", vec![KeyValue::new(NAME_KEY, "data"), KeyValue::new(INSTANCE_KEY, "silo-acme")]),
            span("put", vec![KeyValue::new(NAME_KEY, "data")]),
            span("startup", vec![]),
            span("again", vec![KeyValue::new(NAME_KEY, "auth"), KeyValue::new(NAME_KEY, "data")]),
        ];
        routed.export(batch).await.unwrap();
        let mut got = spans.lock().unwrap().clone();
        got.sort();
        let want = [
            ("auth", "again"),
            ("auth", "login"),
            ("data", "put"),
            ("datasilo-acme", "get"),
            ("tenantmesh", "startup"),
        ];
        assert_eq!(got, want.map(|(r, s)| (r.to_owned(), s.to_owned())));
        assert_eq!(routed.services.lock().unwrap().len(), 3, "one exporter per service, made once");
        routed.force_flush().unwrap();
        routed.shutdown().unwrap();
    }
}
