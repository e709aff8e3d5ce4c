//! Lifecycle events: stored in the onboarding table (partition `_events`,
//! sort key the zero-padded sequence) so a watcher can replay them, and
//! broadcast to live watchers.

use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use tenantmesh_proto::onboarding::v1::{Event, EventKind};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};
use tokio::sync::broadcast;

const EVENTS_PK: &str = "_events";

pub struct EventLog {
    store: DynTable,
    live: broadcast::Sender<Event>,
    last: AtomicU64,
}

fn key(sequence: u64) -> String {
    format!("{sequence:020}")
}

fn now_micros() -> u64 {
    tenantmesh_service::clock::now_us().max(0) as u64
}

impl EventLog {
    pub fn new(store: DynTable) -> Self {
        Self { store, live: broadcast::channel(1024).0, last: AtomicU64::new(0) }
    }

    /// Records and broadcasts an event. Sequences are microsecond clock
    /// readings made unique (a taken one is skipped), so they increase
    /// across restarts and replicas.
    pub async fn emit(&self, kind: EventKind, tenant_id: &str, workflow_id: &str, detail: String) {
        let mut event = Event {
            sequence: 0,
            kind: kind as i32,
            tenant_id: tenant_id.to_owned(),
            workflow_id: workflow_id.to_owned(),
            detail,
            time: (now_micros() / 1_000_000) as i64,
        };
        for _ in 0..16 {
            let now = now_micros();
            let next = |last: u64| last.max(now) + 1;
            let seq =
                next(self.last.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(next(l))).unwrap_or(now));
            event.sequence = seq;
            match self.store.put(EVENTS_PK, &key(seq), event.encode_to_vec(), Condition::NotExists).await {
                Ok(_) => {
                    tracing::info!(event = ?kind, target_tenant = tenant_id, workflow_id, detail = %event.detail, "lifecycle event");
                    let _ = self.live.send(event);
                    return;
                }
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => {
                    // The workflow's own state is already saved; a lost event is logged, not fatal.
                    tracing::error!(error = %e, event = ?kind, target_tenant = tenant_id, "could not store a lifecycle event");
                    let _ = self.live.send(event);
                    return;
                }
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// Stored events after `after`, oldest first, up to `limit`.
    pub async fn replay(&self, after: u64, limit: usize) -> Result<Vec<Event>, StorageError> {
        let q = Query { pk: EVENTS_PK.into(), sk_prefix: String::new(), start_after: Some(key(after)), limit };
        let page = self.store.query(q).await?;
        page.items
            .iter()
            .map(|i| Event::decode(i.data.as_slice()).map_err(|e| StorageError::Backend(format!("corrupt event: {e}"))))
            .collect()
    }
}
