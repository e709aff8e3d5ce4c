//! The JSON log layer: one object per line with `timestamp`, `level`,
//! `service` (the [`crate::Service`] at work, and `service_instance` for
//! one instance of it; the process's name outside any), `target`, `message`, the event's fields, and the request
//! context captured from enclosing spans (`tenant_id`, `tenant_tier`,
//! `trace_id`) at the top level, so log queries can filter on them directly.
//!
//! One layer does both jobs (remember the context fields of spans, write
//! events), so a span costs only the capture of those few fields: nothing
//! formats a span's other fields, which no log line shows.

use std::fmt;
use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Span field name -> log key, for the fields copied onto every log line.
const CONTEXT_FIELDS: &[(&str, &str)] =
    &[("tenant.id", "tenant_id"), ("tenant.tier", "tenant_tier"), ("trace_id", "trace_id")];

/// The context fields recorded on one span.
#[derive(Default, Debug)]
struct Captured(Vec<(&'static str, String)>);

impl Visit for Captured {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(key) = Self::key(field) {
            self.set(key, value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if let Some(key) = Self::key(field) {
            self.set(key, format!("{value:?}"));
        }
    }
}

impl Captured {
    fn key(field: &Field) -> Option<&'static str> {
        CONTEXT_FIELDS.iter().find(|(name, _)| *name == field.name()).map(|(_, key)| *key)
    }

    fn set(&mut self, key: &'static str, value: String) {
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, value));
    }
}

/// Collects an event's fields into a JSON object.
struct FieldsToJson<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsToJson<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().to_owned(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

/// The layer (see the module docs); `make_writer` gives where lines go.
#[derive(Debug, Clone)]
pub struct JsonLayer<W> {
    service: String,
    make_writer: W,
}

impl<W> JsonLayer<W> {
    pub fn new(service: impl Into<String>, make_writer: W) -> Self {
        Self { service: service.into(), make_writer }
    }
}

impl<S, W> tracing_subscriber::Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut captured = Captured::default();
        attrs.record(&mut captured);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(captured);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(captured) = ext.get_mut::<Captured>() {
                values.record(captured);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut obj = Map::new();
        let mut ts = String::new();
        let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut ts));
        obj.insert("timestamp".into(), Value::from(ts));
        obj.insert("level".into(), Value::from(event.metadata().level().as_str()));
        let service = crate::service::Service::current();
        obj.insert("service".into(), Value::from(service.as_ref().map_or(self.service.as_str(), |s| s.name())));
        if let Some(instance) = service.as_ref().and_then(|s| s.instance_id()) {
            obj.insert("service_instance".into(), Value::from(instance));
        }
        obj.insert("target".into(), Value::from(event.metadata().target()));
        event.record(&mut FieldsToJson(&mut obj));
        if let Some(scope) = ctx.event_scope(event) {
            let mut innermost = true;
            for span in scope {
                if innermost {
                    obj.insert("span".into(), Value::from(span.name()));
                    innermost = false;
                }
                if let Some(captured) = span.extensions().get::<Captured>() {
                    for (key, value) in &captured.0 {
                        request_field(&mut obj, key, value);
                    }
                }
            }
        }
        // A request that is not a span keeps its context in a task-local
        // scope; so does the tenant a request names before it proves one.
        let _ = crate::request::REQUEST.try_with(|r| {
            if let Some(trace) = &r.trace {
                obj.entry("trace_id").or_insert_with(|| Value::from(trace.trace_id_hex()));
            }
            if let Some((tenant, tier)) = r.tenant.get() {
                request_field(&mut obj, "tenant_id", tenant);
                request_field(&mut obj, "tenant_tier", tier);
            } else if let Some(named) = &*r.named.lock().expect("named tenant lock") {
                request_field(&mut obj, "tenant_id", &named.tenant);
                if !named.proven {
                    obj.insert("tenant_claimed".into(), Value::from(true));
                }
            }
        });
        let Ok(mut line) = serde_json::to_vec(&Value::Object(obj)) else { return };
        line.push(b'\n');
        let _ = self.make_writer.make_writer_for(event.metadata()).write_all(&line);
    }
}

/// Puts a field of the request's context on a log line. The request's
/// tenant is the line's tenant: a log call that names another one in its
/// own `tenant_id` (a platform call acting on a tenant) keeps it as
/// `event_tenant_id`, so a line is never filed under a tenant whose
/// request it was not.
fn request_field(obj: &mut serde_json::Map<String, Value>, key: &str, value: &str) {
    match obj.get(key) {
        None => {
            obj.insert(key.to_owned(), Value::from(value));
        }
        Some(own) if (key == "tenant_id" || key == "tenant_tier") && own.as_str() != Some(value) => {
            let own = obj.insert(key.to_owned(), Value::from(value)).unwrap_or_default();
            obj.insert(format!("event_{key}"), own);
        }
        Some(_) => {}
    }
}

/// Where tests' log lines go: a buffer shared by its clones.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Buf(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Every line logged inside a request span carries the tenant recorded
    /// on that span (even when recorded after the span was created), and a
    /// line outside any span carries none.
    #[test]
    fn log_lines_inside_a_span_carry_its_tenant() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new("test-svc", move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("req", tenant.id = tracing::field::Empty, trace_id = "abc");
            span.record("tenant.id", "acme");
            let _g = span.enter();
            let inner = tracing::info_span!("inner");
            let _g2 = inner.enter();
            tracing::warn!(item = 7, "inside");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("tenant_id").is_none());
        assert_eq!(lines[1]["tenant_id"], "acme");
        assert_eq!(lines[1]["trace_id"], "abc");
        assert_eq!(lines[1]["item"], 7);
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["service"], "test-svc");
        assert_eq!(lines[1]["span"], "inner");
    }

    /// The request's tenant is the line's tenant: a log call naming another
    /// tenant keeps it as `event_tenant_id` and cannot file the line under
    /// it; a call naming the same tenant changes nothing.
    #[test]
    fn a_log_calls_own_tenant_never_overrides_the_requests() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new("test-svc", move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("req", tenant.id = "acme", trace_id = "abc");
            let _g = span.enter();
            tracing::info!(tenant_id = "globex", "acting on another tenant");
            tracing::info!(tenant_id = "acme", "its own");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            (&lines[0]["tenant_id"], &lines[0]["event_tenant_id"]),
            (&Value::from("acme"), &Value::from("globex"))
        );
        assert_eq!(lines[1]["tenant_id"], "acme");
        assert!(lines[1].get("event_tenant_id").is_none());
    }
}
