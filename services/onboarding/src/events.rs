//! Lifecycle events: stored in the onboarding table (partition `_events`,
//! sort key the zero-padded sequence) so a watcher can replay them, and
//! broadcast to live watchers.

use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use tenantmesh_proto::onboarding::v1::{Event, EventKind};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError, Write};
use tokio::sync::broadcast;

const EVENTS_PK: &str = "_events";
/// Keys of events recorded at most once (see [`EventLog::emit_once`]).
const ONCE_PK: &str = "_event_once";

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

/// An event as of now, its sequence not yet chosen.
fn new_event(kind: EventKind, tenant_id: &str, workflow_id: &str, detail: String) -> Event {
    Event {
        sequence: 0,
        kind: kind as i32,
        tenant_id: tenant_id.to_owned(),
        workflow_id: workflow_id.to_owned(),
        detail,
        time: (now_micros() / 1_000_000) as i64,
    }
}

impl EventLog {
    pub fn new(store: DynTable) -> Self {
        Self { store, live: broadcast::channel(1024).0, last: AtomicU64::new(0) }
    }

    /// Records and broadcasts an event. Sequences are microsecond clock
    /// readings made unique (a taken one is skipped), so they increase
    /// across restarts and replicas.
    pub async fn emit(&self, kind: EventKind, tenant_id: &str, workflow_id: &str, detail: String) {
        let mut event = new_event(kind, tenant_id, workflow_id, detail);
        for _ in 0..16 {
            let seq = self.next_sequence();
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

    /// The next sequence: a microsecond clock reading, above every one
    /// this process used.
    fn next_sequence(&self) -> u64 {
        let now = now_micros();
        let next = |last: u64| last.max(now) + 1;
        next(self.last.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(next(l))).unwrap_or(now))
    }

    /// Records and broadcasts an event once for `once`, however often it is
    /// called, by however many callers: the event and the key's marker are
    /// one transaction. `None`: the key's event was recorded before.
    pub async fn emit_once(
        &self,
        once: &str,
        kind: EventKind,
        tenant_id: &str,
        workflow_id: &str,
        detail: String,
    ) -> Result<Option<Event>, StorageError> {
        let mut event = new_event(kind, tenant_id, workflow_id, detail);
        for _ in 0..16 {
            event.sequence = self.next_sequence();
            let writes = vec![
                Write::Put {
                    pk: ONCE_PK.into(),
                    sk: once.into(),
                    data: key(event.sequence).into_bytes(),
                    condition: Condition::NotExists,
                },
                Write::Put {
                    pk: EVENTS_PK.into(),
                    sk: key(event.sequence),
                    data: event.encode_to_vec(),
                    condition: Condition::NotExists,
                },
            ];
            match self.store.transact_write(writes).await {
                Ok(()) => {
                    tracing::info!(event = ?kind, target_tenant = tenant_id, workflow_id, detail = %event.detail, "lifecycle event");
                    let _ = self.live.send(event.clone());
                    return Ok(Some(event));
                }
                Err(StorageError::ConditionFailed { index: 0, .. }) => return Ok(None),
                // Another event took the sequence: a new one.
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::Backend("no free event sequence after 16 tries".into()))
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
