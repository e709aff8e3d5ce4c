//! Metering an application service's calls: the mesh's meter layer counts
//! them per tenant, and each flush goes to the metering service as usage
//! events (`<service>.<meter>`, e.g. `orders.requests` with the RPC as its
//! `rpc` dimension), sent with the service's own identity (the
//! `metering_writer` scope). A flush retried after an unknown outcome
//! carries the same event ids, and the metering service counts each once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use tenantmesh_metering::meters::{FlushedUsage, UsageSink};
use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::metering::v1::{RecordUsageRequest, UsageEvent};
use tenantmesh_tenant_context::client::PropagatedChannel;

/// Most events in one RecordUsage call.
const MAX_EVENTS: usize = 500;

/// Sends flushes to the metering service.
pub(crate) struct RecordUsage {
    pub(crate) service: String,
    pub(crate) client: MeteringClient<PropagatedChannel>,
}

/// The event of one flushed total of `service`.
fn event(service: &str, u: FlushedUsage) -> UsageEvent {
    UsageEvent {
        id: format!("{service}:{}", u.id),
        tenant_id: u.tenant.to_string(),
        meter: format!("{service}.{}", u.meter),
        value: u.value,
        time: u.minute,
        dimensions: u.rpc.map(|rpc| HashMap::from([("rpc".to_owned(), rpc)])).unwrap_or_default(),
        correction: false,
    }
}

impl UsageSink for RecordUsage {
    fn send(&self, usage: Vec<FlushedUsage>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let events: Vec<UsageEvent> = usage.into_iter().map(|u| event(&self.service, u)).collect();
            for chunk in events.chunks(MAX_EVENTS) {
                let request = RecordUsageRequest { events: chunk.to_vec() };
                let mut client = self.client.clone();
                client
                    .record_usage(request)
                    .await
                    .map_err(|s| format!("RecordUsage: {:?}: {}", s.code(), s.message()))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flushed_total_is_an_event_of_the_services_meter() {
        let u = FlushedUsage {
            id: "r1:3:1700000000:0".into(),
            tenant: "acme".into(),
            meter: "requests",
            rpc: Some("GetOrder".into()),
            minute: 1_700_000_040,
            value: 7,
        };
        let e = event("orders", u);
        assert_eq!(
            (e.id.as_str(), e.meter.as_str(), e.tenant_id.as_str()),
            ("orders:r1:3:1700000000:0", "orders.requests", "acme")
        );
        assert_eq!((e.value, e.time, e.correction), (7, 1_700_000_040, false));
        assert_eq!(e.dimensions["rpc"], "GetOrder");
    }
}
