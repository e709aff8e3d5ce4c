//! The audit log of a control-plane service: one event per committed
//! change, written in the same store transaction as the change, chained per
//! tenant by SHA-256 (see `proto/tenantmesh/audit/v1/audit.proto`).
//!
//! Layout, in the service's own table: a tenant's events under the
//! partition `_audit#<tenant>`, sort key `e#<sequence, 20 digits>`, and the
//! chain's head (`<sequence> <hash>`) under `~head` there. Appending an
//! event is one transaction: the change's own writes, the event (which must
//! not exist yet) and the head (at the version read). Two writers racing on
//! one tenant's chain: one transaction wins, the other fails on the head
//! and is made again on the new head; a change whose own condition fails
//! is not retried (the caller's condition decides), and nothing of it, the
//! event included, is written. So a change and its event are committed
//! together or not at all, whatever kills the process when.
//!
//! A tenant's first event also lists the tenant under `_audit_chains`
//! (how the purge finds the chains). A purge deletes the oldest events in
//! batches, each batch in one transaction with the chain's floor
//! (`~floor`: the first kept sequence and the hash it links to), so the
//! chain verifies from its floor on, and then records itself as an event.

use aws_lc_rs::digest;
use prost::Message as _;
use tenantmesh_proto::audit::v1::{Actor, AuditEvent, Outcome, VerifyAuditChainResponse};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError, Write};

/// The partition prefix of the tenants' chains.
pub const PARTITION_PREFIX: &str = "_audit#";
/// The partition listing every tenant that has a chain (for the purge).
const CHAINS_PK: &str = "_audit_chains";
const HEAD: &str = "~head";
/// Where a chain starts once its oldest events were purged:
/// `<first kept sequence> <hash of the last purged event>`.
const FLOOR: &str = "~floor";
/// Events deleted per transaction by a purge (DynamoDB takes 100 writes).
const PURGE_BATCH: usize = 90;
/// The action of the event that records a purge.
pub const PURGE_ACTION: &str = "audit.purge";
const EVENT_PREFIX: &str = "e#";
/// How often a transaction is made again when another writer moved the
/// tenant's chain on meanwhile.
const HEAD_RETRIES: usize = 16;

/// A tenant's chain partition.
pub fn partition(tenant_id: &str) -> String {
    format!("{PARTITION_PREFIX}{tenant_id}")
}

fn event_key(sequence: u64) -> String {
    format!("{EVENT_PREFIX}{sequence:020}")
}

/// Who made a request, and where it came from: what every event of the
/// request carries.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub actor: Actor,
    pub request_id: String,
    pub trace_id: String,
    pub source: String,
}

impl Caller {
    /// From a request's metadata: its `x-request-id` (when sent), the
    /// current trace and the peer's address; the actor is the caller's.
    pub fn of<T>(request: &tonic::Request<T>, actor: Actor) -> Self {
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(128).collect())
            .unwrap_or_default();
        // The request's span's trace when spans are recorded, else the
        // trace the caller sent (W3C `traceparent`: version-trace-span-flags).
        let sent = || {
            let header = request.metadata().get("traceparent")?.to_str().ok()?;
            let trace = header.split('-').nth(1)?;
            (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace.to_ascii_lowercase())
        };
        Self {
            actor,
            request_id,
            trace_id: tenantmesh_telemetry::current_trace_id().or_else(sent).unwrap_or_default(),
            source: request.remote_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// An event of this caller: `action` on `target` of `tenant_id`.
    pub fn event(&self, tenant_id: &str, action: &str, target: String) -> AuditEvent {
        AuditEvent {
            id: uuid::Uuid::new_v4().to_string(),
            time_us: crate::clock::now_ms() * 1000,
            tenant_id: tenant_id.to_owned(),
            actor: Some(self.actor.clone()),
            action: action.to_owned(),
            target,
            outcome: Outcome::Succeeded as i32,
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            source: self.source.clone(),
            ..Default::default()
        }
    }
}

/// The hash of `event` (every field but `hash`, its link included).
pub fn hash_of(event: &AuditEvent) -> String {
    let mut unhashed = event.clone();
    unhashed.hash.clear();
    let digest = digest::digest(&digest::SHA256, &unhashed.encode_to_vec());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The head of a chain: its last event's sequence and hash, and the head
/// item's version (0: no event yet).
struct Head {
    sequence: u64,
    hash: String,
    version: u64,
}

/// The audit log in a service's table.
#[derive(Clone)]
pub struct AuditLog {
    store: DynTable,
    /// The service whose log it is (each event says so).
    service: &'static str,
}

/// A failed append: the change's own write refused (`Change`, with the
/// index of the write among the change's and the store's answer), or the
/// store failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the change's write {index} did not hold: {source}")]
    Change { index: usize, source: StorageError },
    #[error(transparent)]
    Store(#[from] StorageError),
}

impl AuditLog {
    pub fn new(store: DynTable, service: &'static str) -> Self {
        Self { store, service }
    }

    /// The service whose log it is.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// A chain's marker item `sk` (its head or its floor, both
    /// `<sequence> <hash>`): sequence, hash and item version; `None` when
    /// there is none.
    async fn marker(&self, tenant_id: &str, sk: &str) -> Result<Option<(u64, String, u64)>, StorageError> {
        let Some(item) = self.store.get(&partition(tenant_id), sk).await? else { return Ok(None) };
        let text = String::from_utf8_lossy(&item.data);
        let (sequence, hash) = text.split_once(' ').unwrap_or_default();
        let sequence = sequence
            .parse()
            .map_err(|_| StorageError::Backend(format!("the audit chain {sk} of {tenant_id} is unreadable")))?;
        Ok(Some((sequence, hash.to_owned(), item.version)))
    }

    async fn head(&self, tenant_id: &str) -> Result<Head, StorageError> {
        Ok(match self.marker(tenant_id, HEAD).await? {
            Some((sequence, hash, version)) => Head { sequence, hash, version },
            None => Head { sequence: 0, hash: String::new(), version: 0 },
        })
    }

    /// Commits `writes` (the change) and `event` in one transaction, the
    /// event appended to its tenant's chain (`event.tenant_id`); the event
    /// as stored. Without writes, records the event alone (an attempt that
    /// changed nothing).
    pub async fn commit(&self, writes: Vec<Write>, mut event: AuditEvent) -> Result<AuditEvent, AppendError> {
        let pk = partition(&event.tenant_id);
        let changes = writes.len();
        event.service = self.service.to_owned();
        for _ in 0..HEAD_RETRIES {
            let head = self.head(&event.tenant_id).await?;
            event.sequence = head.sequence + 1;
            event.prev_hash = head.hash;
            event.hash = hash_of(&event);
            let mut all = writes.clone();
            all.push(Write::Put {
                pk: pk.clone(),
                sk: event_key(event.sequence),
                data: event.encode_to_vec(),
                condition: Condition::NotExists,
            });
            if head.version == 0 {
                // A new chain: listed, for the purge to find.
                all.push(Write::Put {
                    pk: CHAINS_PK.into(),
                    sk: event.tenant_id.clone(),
                    data: Vec::new(),
                    condition: Condition::None,
                });
            }
            all.push(Write::Put {
                pk: pk.clone(),
                sk: HEAD.into(),
                data: format!("{} {}", event.sequence, event.hash).into_bytes(),
                condition: Condition::Version(head.version),
            });
            match self.store.transact_write(all).await {
                Ok(()) => return Ok(event),
                Err(StorageError::ConditionFailed { index, current }) if index < changes => {
                    return Err(AppendError::Change {
                        index,
                        source: StorageError::ConditionFailed { index, current },
                    });
                }
                // Another event was appended meanwhile: on the new head.
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StorageError::Backend(format!("the audit chain of {} kept moving; retry", event.tenant_id)).into())
    }

    /// Records `event` alone (a refused or failed attempt).
    pub async fn record(&self, event: AuditEvent) -> Result<AuditEvent, StorageError> {
        self.commit(Vec::new(), event).await.map_err(|e| match e {
            AppendError::Change { source, .. } | AppendError::Store(source) => source,
        })
    }

    /// Up to `limit` of `tenant_id`'s events after sequence `after` that
    /// `keep` keeps, reading at most `scan` events; and the sequence to go
    /// on after, when more may follow.
    pub async fn list(
        &self,
        tenant_id: &str,
        after: u64,
        limit: usize,
        scan: usize,
        keep: impl Fn(&AuditEvent) -> bool,
    ) -> Result<(Vec<AuditEvent>, Option<u64>), StorageError> {
        let pk = partition(tenant_id);
        let mut events = Vec::new();
        // Nothing below the chain's floor is left to read.
        let mut last = after.max(self.floor(tenant_id).await?.0 - 1);
        let mut scanned = 0;
        loop {
            let start_after = (last > 0).then(|| event_key(last));
            let want = (scan - scanned).min(1000);
            let page = self
                .store
                .query(Query { pk: pk.clone(), sk_prefix: EVENT_PREFIX.into(), start_after, limit: want })
                .await?;
            let more = page.last_evaluated.is_some();
            for item in page.items {
                let event = decode(&item.data)?;
                scanned += 1;
                last = event.sequence;
                if keep(&event) {
                    events.push(event);
                    if events.len() == limit {
                        return Ok((events, Some(last)));
                    }
                }
            }
            if !more {
                return Ok((events, None));
            }
            if scanned >= scan {
                return Ok((events, Some(last)));
            }
        }
    }

    /// Every tenant with a chain in this log.
    pub async fn chains(&self) -> Result<Vec<String>, StorageError> {
        let mut tenants = Vec::new();
        let mut pages = tenantmesh_storage::Pages::new(self.store.as_ref(), CHAINS_PK, "", 1000);
        while let Some(items) = pages.next().await? {
            tenants.extend(items.into_iter().map(|i| i.sk));
        }
        Ok(tenants)
    }

    /// Where `tenant_id`'s chain starts: the first kept sequence and the
    /// hash its first event links to (1 and "" until a purge).
    async fn floor(&self, tenant_id: &str) -> Result<(u64, String, u64), StorageError> {
        Ok(self.marker(tenant_id, FLOOR).await?.unwrap_or((1, String::new(), 0)))
    }

    /// Deletes `tenant_id`'s events older than `cutoff_us`, batch by batch,
    /// each batch with the chain's floor moved past it in the same
    /// transaction (the head keeps naming the last event, so the chain
    /// still verifies from its floor); then records `purged(first, last)`
    /// (the range removed) as an event of the chain. Earlier purges' own
    /// records alone are not purged again (which would only record another
    /// purge). How many events went.
    pub async fn purge_before(
        &self,
        tenant_id: &str,
        cutoff_us: i64,
        purged: impl FnOnce(u64, u64) -> AuditEvent,
    ) -> Result<u64, StorageError> {
        let pk = partition(tenant_id);
        let (first, _, _) = self.floor(tenant_id).await?;
        let mut removed = 0u64;
        loop {
            let (floor, _, floor_version) = self.floor(tenant_id).await?;
            let start_after = (floor > 1).then(|| event_key(floor - 1));
            let page = self
                .store
                .query(Query { pk: pk.clone(), sk_prefix: EVENT_PREFIX.into(), start_after, limit: PURGE_BATCH })
                .await?;
            let mut writes = Vec::new();
            let mut next = (floor, String::new());
            let mut only_purges = true;
            for item in &page.items {
                let event = decode(&item.data)?;
                if event.time_us >= cutoff_us {
                    break;
                }
                only_purges &= event.action == PURGE_ACTION;
                writes.push(Write::Delete { pk: pk.clone(), sk: item.sk.clone(), condition: Condition::Exists });
                next = (event.sequence + 1, event.hash);
            }
            if writes.is_empty() || (only_purges && removed == 0) {
                break;
            }
            let batch = writes.len() as u64;
            writes.push(Write::Put {
                pk: pk.clone(),
                sk: FLOOR.into(),
                data: format!("{} {}", next.0, next.1).into_bytes(),
                condition: Condition::Version(floor_version),
            });
            match self.store.transact_write(writes).await {
                Ok(()) => removed += batch,
                // Another purge moved on meanwhile: go on from where it is.
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        if removed > 0 {
            let event = purged(first, first + removed - 1);
            self.record(event).await?;
        }
        Ok(removed)
    }

    /// The sequence of `tenant_id`'s last event (0: none yet).
    pub async fn last_sequence(&self, tenant_id: &str) -> Result<u64, StorageError> {
        Ok(self.head(tenant_id).await?.sequence)
    }

    /// Checks `tenant_id`'s chain from its first event: each event's hash,
    /// its link to the one before, its place, and the head.
    pub async fn verify(&self, tenant_id: &str) -> Result<VerifyAuditChainResponse, StorageError> {
        let pk = partition(tenant_id);
        let broken = |at: u64, events: u64, reason: String| VerifyAuditChainResponse {
            intact: false,
            events,
            first_broken: at,
            reason,
        };
        let (floor, floor_hash, _) = self.floor(tenant_id).await?;
        let mut expected = floor;
        let mut prev = floor_hash;
        let mut start_after = (floor > 1).then(|| event_key(floor - 1));
        loop {
            let page = self
                .store
                .query(Query { pk: pk.clone(), sk_prefix: EVENT_PREFIX.into(), start_after, limit: 1000 })
                .await?;
            for item in &page.items {
                let checked = expected - floor;
                let Ok(event) = decode(&item.data) else {
                    return Ok(broken(expected, checked, format!("{} does not decode", item.sk)));
                };
                if item.sk != event_key(expected) || event.sequence != expected {
                    let reason = format!("event {expected} is missing (found {} at {})", event.sequence, item.sk);
                    return Ok(broken(expected, checked, reason));
                }
                if event.prev_hash != prev {
                    return Ok(broken(expected, checked, "its link does not name the event before it".into()));
                }
                if hash_of(&event) != event.hash {
                    return Ok(broken(expected, checked, "its contents do not match its hash".into()));
                }
                prev = event.hash;
                expected += 1;
            }
            match page.last_evaluated {
                Some(last) => start_after = Some(last),
                None => break,
            }
        }
        let events = expected - floor;
        let last = expected - 1;
        let head = self.head(tenant_id).await?;
        if head.sequence != last || head.hash != prev {
            let reason = format!("the chain's head names event {} but it ends at {last}", head.sequence);
            return Ok(broken(last.min(head.sequence) + 1, events, reason));
        }
        Ok(VerifyAuditChainResponse { intact: true, events, first_broken: 0, reason: String::new() })
    }
}

/// Events of several logs (the services' of one tenant) as one timeline,
/// oldest first: all of them, or the last `last`.
pub fn timeline(mut events: Vec<AuditEvent>, last: Option<usize>) -> Vec<AuditEvent> {
    events.sort_by_key(|e| e.time_us);
    match last {
        Some(n) => events.split_off(events.len().saturating_sub(n)),
        None => events,
    }
}

/// `event` as a JSON object (its export line), its fields named as in the
/// proto; the outcome by name (`ok`, `denied`, `failed`), the time also in
/// RFC 3339.
pub fn to_json(event: &AuditEvent) -> serde_json::Value {
    let actor = event.actor.clone().unwrap_or_default();
    serde_json::json!({
        "service": event.service,
        "sequence": event.sequence,
        "id": event.id,
        "time_us": event.time_us,
        "time": crate::clock::rfc3339(event.time_us.div_euclid(1_000_000)),
        "tenant_id": event.tenant_id,
        "actor": {"subject": actor.subject, "tenant_id": actor.tenant_id, "roles": actor.roles},
        "action": event.action,
        "target": event.target,
        "outcome": tenantmesh_proto::names::outcome(event.outcome),
        "error": event.error,
        "before": event.before,
        "after": event.after,
        "request_id": event.request_id,
        "trace_id": event.trace_id,
        "source": event.source,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    })
}

fn decode(data: &[u8]) -> Result<AuditEvent, StorageError> {
    AuditEvent::decode(data).map_err(|e| StorageError::Backend(format!("an audit event does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tenantmesh_storage::EmbeddedTable;

    fn log() -> (tempfile::TempDir, AuditLog, DynTable) {
        let dir = tempfile::tempdir().unwrap();
        let store: DynTable = Arc::new(EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        (dir, AuditLog::new(store.clone(), "registry"), store)
    }

    fn caller() -> Caller {
        Caller {
            actor: Actor { subject: "u-1".into(), tenant_id: "platform".into(), roles: vec!["platform_admin".into()] },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_change_and_its_event_commit_together_or_not_at_all() {
        let (_dir, log, store) = log();
        let put = |v: u64| Write::Put {
            pk: "_tenants".into(),
            sk: "acme".into(),
            data: vec![v as u8],
            condition: Condition::Version(v),
        };
        let first =
            log.commit(vec![put(0)], caller().event("acme", "tenant.register", "tenant/acme".into())).await.unwrap();
        assert_eq!((first.sequence, first.prev_hash.as_str()), (1, ""));
        // The change's condition fails: neither it nor its event is written.
        let refused = log.commit(vec![put(7)], caller().event("acme", "tenant.tier", "tenant/acme".into())).await;
        assert!(matches!(refused, Err(AppendError::Change { index: 0, .. })), "{refused:?}");
        let second =
            log.commit(vec![put(1)], caller().event("acme", "tenant.tier", "tenant/acme".into())).await.unwrap();
        assert_eq!((second.sequence, &second.prev_hash), (2, &first.hash));
        assert_eq!(store.get("_tenants", "acme").await.unwrap().unwrap().version, 2);
        let (events, next) = log.list("acme", 0, 10, 100, |_| true).await.unwrap();
        assert_eq!(events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["tenant.register", "tenant.tier"]);
        assert_eq!(next, None);
        assert!(log.verify("acme").await.unwrap().intact);
        // Another tenant's chain is its own.
        let other = log.record(caller().event("globex", "tenant.status", "tenant/globex".into())).await.unwrap();
        assert_eq!(other.sequence, 1);
    }

    #[tokio::test]
    async fn concurrent_appends_make_one_chain() {
        let (_dir, log, _store) = log();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(caller().event("acme", "tenant.limits", format!("n{i}"))).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let verified = log.verify("acme").await.unwrap();
        assert!(verified.intact && verified.events == 16, "{verified:?}");
    }

    #[tokio::test]
    async fn a_changed_removed_or_reordered_event_breaks_the_chain_there() {
        let (_dir, log, store) = log();
        for i in 0..5 {
            log.record(caller().event("acme", "tenant.status", format!("tenant/acme#{i}"))).await.unwrap();
        }
        let pk = partition("acme");
        // Changed: event 3 says another thing.
        let item = store.get(&pk, &event_key(3)).await.unwrap().unwrap();
        let mut event = AuditEvent::decode(item.data.as_slice()).unwrap();
        event.after = "status ACTIVE".into();
        store.put(&pk, &event_key(3), event.encode_to_vec(), Condition::None).await.unwrap();
        let v = log.verify("acme").await.unwrap();
        assert_eq!((v.intact, v.first_broken, v.events), (false, 3, 2), "{v:?}");
        // Its hash recomputed as well: the link of event 4 breaks.
        event.hash = hash_of(&event);
        store.put(&pk, &event_key(3), event.encode_to_vec(), Condition::None).await.unwrap();
        let v = log.verify("acme").await.unwrap();
        assert_eq!((v.intact, v.first_broken), (false, 4), "{v:?}");
        // Removed: the last event (the head still names it).
        let (_dir, log, store) = self::log();
        for i in 0..3 {
            log.record(caller().event("acme", "tenant.status", format!("#{i}"))).await.unwrap();
        }
        store.delete(&pk, &event_key(3), Condition::None).await.unwrap();
        let v = log.verify("acme").await.unwrap();
        assert_eq!((v.intact, v.first_broken), (false, 3), "{v:?}");
        // Removed from the middle.
        store.delete(&pk, &event_key(2), Condition::None).await.unwrap();
        let v = log.verify("acme").await.unwrap();
        assert_eq!((v.intact, v.first_broken), (false, 2), "{v:?}");
    }

    /// Events older than the cutoff go, batch by batch (never the last);
    /// the purge is an event of its own, and the chain still holds from
    /// where it now starts. A change to a kept event still shows.
    #[tokio::test]
    async fn a_purge_keeps_the_chain_verifiable_from_its_new_start() {
        let (_dir, log, store) = log();
        for i in 0..200 {
            let mut event = caller().event("acme", "tenant.status", format!("#{i}"));
            event.time_us = if i < 190 { 1_000 + i } else { 10_000_000 + i };
            log.record(event).await.unwrap();
        }
        let purge = |first: u64, last: u64| {
            let mut e = caller().event("acme", PURGE_ACTION, "audit/acme".into());
            e.before = format!("events {first}-{last}");
            e
        };
        assert_eq!(log.purge_before("acme", 5_000_000, purge).await.unwrap(), 190);
        assert_eq!(log.purge_before("acme", 5_000_000, purge).await.unwrap(), 0, "nothing twice");
        let v = log.verify("acme").await.unwrap();
        assert!(v.intact && v.events == 11, "{v:?}");
        let (events, _) = log.list("acme", 0, 100, 1000, |_| true).await.unwrap();
        assert_eq!(events.first().map(|e| e.sequence), Some(191));
        assert_eq!(
            (events.last().unwrap().action.as_str(), events.last().unwrap().before.as_str()),
            ("audit.purge", "events 1-190")
        );
        assert_eq!(log.chains().await.unwrap(), ["acme"]);
        // Tampering with a kept event still breaks the chain.
        let pk = partition("acme");
        let item = store.get(&pk, &event_key(195)).await.unwrap().unwrap();
        let good = item.data.clone();
        let mut event = AuditEvent::decode(item.data.as_slice()).unwrap();
        event.after = "forged".into();
        store.put(&pk, &event_key(195), event.encode_to_vec(), Condition::None).await.unwrap();
        assert_eq!(log.verify("acme").await.unwrap().first_broken, 195);
        store.put(&pk, &event_key(195), good, Condition::None).await.unwrap();
        // Everything is older than the cutoff: every event goes, the last
        // too; the chain is then its purge's record alone, and holds.
        assert_eq!(log.purge_before("acme", i64::MAX, purge).await.unwrap(), 11);
        let v = log.verify("acme").await.unwrap();
        assert!(v.intact && v.events == 1, "{v:?}");
        // A purge record alone is not purged again (no purge of purges).
        assert_eq!(log.purge_before("acme", i64::MAX, purge).await.unwrap(), 0);
        assert_eq!(log.last_sequence("acme").await.unwrap(), 202);
    }

    #[tokio::test]
    async fn listing_filters_and_pages_with_a_bounded_scan() {
        let (_dir, log, _store) = log();
        for i in 0..30 {
            let action = if i % 3 == 0 { "tenant.tier" } else { "tenant.status" };
            log.record(caller().event("acme", action, format!("#{i}"))).await.unwrap();
        }
        let tier = |e: &AuditEvent| e.action == "tenant.tier";
        let (page, next) = log.list("acme", 0, 4, 100, tier).await.unwrap();
        assert_eq!(page.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 4, 7, 10]);
        let (page, next) = log.list("acme", next.unwrap(), 100, 100, tier).await.unwrap();
        assert_eq!(page.len(), 6);
        assert_eq!(next, None);
        // A scan that stops early says where to go on.
        let (page, next) = log.list("acme", 0, 100, 5, tier).await.unwrap();
        assert_eq!((page.len(), next), (2, Some(5)));
    }
}
