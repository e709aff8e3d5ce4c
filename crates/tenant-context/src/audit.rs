//! Auditing a control-plane service's changes with the caller's context:
//! the actor of a request, the events of attempts that were refused or
//! failed (those of committed changes are written with the change, see
//! [`tenantmesh_service::audit`]), the access layer's refusals, and the
//! `tenantmesh.audit.v1.Audit` service over a service's log.

use std::future::Future;
use std::sync::Arc;

use tenantmesh_proto::audit::v1::audit_server::Audit;
use tenantmesh_proto::audit::v1::*;
use tenantmesh_service::audit::{AuditLog, Caller};
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tonic::{Code, Request, Response, Status};

use crate::authorize::OnRefusal;
use crate::{PLATFORM_TENANT, TenantContext};

/// The actor of `ctx`.
pub fn actor(ctx: &TenantContext) -> Actor {
    Actor {
        subject: ctx.subject.to_string(),
        tenant_id: ctx.tenant_id.to_string(),
        roles: ctx.roles.iter().map(|r| r.as_str().to_owned()).collect(),
    }
}

/// The caller of `request`, authenticated as `ctx`.
pub fn caller<T>(request: &Request<T>, ctx: &TenantContext) -> Caller {
    Caller::of(request, actor(ctx))
}

/// Refused calls being recorded at once by one service (see
/// [`Auditor::refusals`]).
pub const REFUSALS_IN_FLIGHT: usize = 16;

/// The tier of a tenant, as the service can tell (`None`: not known).
pub type TierOf = Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, Option<String>> + Send + Sync>;

/// A service's audit log, as its handlers use it.
#[derive(Clone)]
pub struct Auditor {
    pub log: AuditLog,
}

impl Auditor {
    pub fn new(log: AuditLog) -> Self {
        Self { log }
    }

    /// Runs `work`, an audited change of `tenant_id`'s `target`: when it
    /// fails or is refused, records that attempt (a committed change
    /// records its own event with it).
    pub async fn audited<T>(
        &self,
        caller: &Caller,
        tenant_id: &str,
        action: &str,
        target: String,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let result = work.await;
        if let Err(status) = &result {
            self.attempted(caller, tenant_id, action, target, status).await;
        }
        result
    }

    /// Records a refused or failed attempt (nothing changed): on
    /// `tenant_id`'s chain (the platform's when that is not a tenant id);
    /// a tenant's user refused at another tenant on their own tenant's
    /// chain, so that neither tenant learns of the other from its log.
    pub async fn attempted(&self, caller: &Caller, tenant_id: &str, action: &str, target: String, status: &Status) {
        let outcome = match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => Outcome::Denied,
            _ => Outcome::Failed,
        };
        let own = caller.actor.tenant_id.as_str();
        let chain = if outcome == Outcome::Denied && own != PLATFORM_TENANT && own != tenant_id {
            own
        } else if tenantmesh_service::validate_tenant_id(tenant_id).is_ok() {
            tenant_id
        } else {
            PLATFORM_TENANT
        };
        let mut event = caller.event(chain, action, target);
        event.outcome = outcome as i32;
        event.error = format!("{:?}: {}", status.code(), status.message());
        if let Err(e) = self.log.record(event).await {
            tracing::error!(
                error = %e,
                service = self.log.service(),
                action,
                tenant_id,
                "a refused attempt could not be recorded in the audit log"
            );
        }
    }

    /// What the access layer calls for a refused call of one of `actions`
    /// (RPC path, action): an event on the caller's own tenant's chain (the
    /// refused request's body, which names its target, is not read),
    /// recorded in the background.
    ///
    /// A refused call costs its caller no admission (refusals come first),
    /// so a flood of them must not become a flood of writes: at most
    /// [`REFUSALS_IN_FLIGHT`] are being recorded at once; one refused while
    /// they are is counted instead, and the next one recorded says how many
    /// went uncounted one by one (never silently dropped).
    pub fn refusals(&self, actions: &'static [(&'static str, &'static str)]) -> OnRefusal {
        let auditor = self.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(REFUSALS_IN_FLIGHT));
        let unrecorded = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Arc::new(move |ctx: &TenantContext, path: &str, status: &Status| {
            use std::sync::atomic::Ordering::Relaxed;
            let Some((_, action)) = actions.iter().find(|(p, _)| *p == path) else { return };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if unrecorded.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!(
                        security_event = "refusal_flood",
                        tenant_id = %ctx.tenant_id,
                        subject = %ctx.subject,
                        "refused calls come faster than the audit log records them: counted, recorded in summary"
                    );
                }
                return;
            };
            let caller = Caller {
                actor: actor(ctx),
                trace_id: tenantmesh_telemetry::current_trace_id().unwrap_or_default(),
                ..Default::default()
            };
            let missed = unrecorded.swap(0, Relaxed);
            let status = match missed {
                0 => status.clone(),
                n => Status::new(
                    status.code(),
                    format!(
                        "{} (and {n} more refused attempts, on this service, not recorded one by one)",
                        status.message()
                    ),
                ),
            };
            let (auditor, tenant) = (auditor.clone(), ctx.tenant_id.to_string());
            tenantmesh_telemetry::spawn(async move {
                auditor.attempted(&caller, &tenant, action, String::new(), &status).await;
                drop(slot);
            });
        })
    }

    /// The `Backup` service of a process whose stores are under
    /// `data_dir`, each backup taken (or refused) recorded in this log, by
    /// its caller.
    pub fn backup_server(
        &self,
        data_dir: std::path::PathBuf,
        embedded: bool,
    ) -> tenantmesh_proto::backup::v1::backup_server::BackupServer<tenantmesh_service::backup::BackupService> {
        let caller_of: tenantmesh_service::backup::CallerOf =
            Arc::new(|request| TenantContext::from_request(request).ok().map(|ctx| caller(request, ctx)));
        let service =
            tenantmesh_service::backup::BackupService::new(data_dir, embedded).with_audit(self.log.clone(), caller_of);
        tenantmesh_proto::backup::v1::backup_server::BackupServer::new(service)
    }

    /// Every `every`, purges each chain's events older than its tenant's
    /// tier's `audit_retention_days` (`tier_of` says the tier; a tenant it
    /// does not know, and the platform, keep the longest of any tier); each
    /// purge is an event of the chain (`audit.purge`, by the service
    /// itself), and the chain verifies from where it now starts. Replicas
    /// may purge at once: a batch another already removed is passed over.
    pub fn sweep(
        &self,
        tiers: Arc<tenantmesh_service::tiers::Tiers>,
        tier_of: TierOf,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.log.clone();
        tenantmesh_telemetry::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let chains = match log.chains().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit purge: the chains could not be listed; next time");
                        continue;
                    }
                };
                for tenant in chains {
                    let tier = tier_of(tenant.clone()).await;
                    let days = tier
                        .and_then(|t| tiers.get(&t).map(|t| t.audit_retention_days))
                        .unwrap_or_else(|| tiers.longest_audit_retention_days());
                    let cutoff = tenantmesh_service::clock::now_ms() * 1000 - i64::from(days) * 86_400_000_000;
                    let service = log.service();
                    let purged = |first: u64, last: u64| {
                        let who = Caller {
                            actor: Actor {
                                subject: format!("service:{service}"),
                                tenant_id: PLATFORM_TENANT.into(),
                                roles: vec!["service".into()],
                            },
                            ..Default::default()
                        };
                        let mut event =
                            who.event(&tenant, tenantmesh_service::audit::PURGE_ACTION, format!("audit/{tenant}"));
                        event.before = format!("events {first}-{last}");
                        event.after = format!("removed: older than {days} days");
                        event
                    };
                    match log.purge_before(&tenant, cutoff, purged).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(tenant_id = %tenant, events = n, days, "purged audit events past their retention");
                        }
                        Err(e) => tracing::warn!(tenant_id = %tenant, error = %e, "audit purge failed; next time"),
                    }
                }
            }
        })
    }
}

/// `tenantmesh.audit.v1.Audit` over a service's log: a tenant admin reads
/// their own tenant's events, the platform admin any tenant's.
#[derive(Clone)]
pub struct AuditService {
    log: AuditLog,
    /// The store's name, in errors.
    store: &'static str,
}

impl AuditService {
    pub fn new(auditor: &Auditor) -> Self {
        Self { log: auditor.log.clone(), store: auditor.log.service() }
    }
}

/// Events a page reads at most to fill itself (a filter that keeps few of
/// them ends the page early, with a token to go on).
const MAX_SCAN: usize = 1000;

#[tonic::async_trait]
impl Audit for AuditService {
    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let limit = paging::page_size(&mut v, req.page_size);
        // A tail ignores the token.
        let token = if req.last > 0 { "" } else { req.page_token.as_str() };
        let after = match paging::decode_token(&mut v, token, "") {
            None => 0,
            Some(sequence) => sequence.parse::<u64>().unwrap_or_else(|_| {
                v.add("page_token", "is not a token from a previous response to this query");
                0
            }),
        };
        let window = Window::checked(&mut v, req.from_us, req.to_us);
        if req.last > 100 {
            v.add("last", "must be at most 100");
        }
        if req.action.len() > 64 {
            v.add("action", "must be at most 64 characters");
        }
        if req.actor.len() > 256 {
            v.add("actor", "must be at most 256 characters");
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let keep = |e: &AuditEvent| {
            (req.action.is_empty() || e.action == req.action)
                && (req.actor.is_empty() || e.actor.as_ref().is_some_and(|a| a.subject == req.actor))
                && window.holds(e)
        };
        let stored = |e| tenantmesh_service::errors::storage_status(e, self.store);
        if req.last > 0 {
            let end = self.log.last_sequence(&req.tenant_id).await.map_err(stored)?;
            let from = end.saturating_sub(u64::from(req.last));
            let (events, _) =
                self.log.list(&req.tenant_id, from, req.last as usize, MAX_SCAN, keep).await.map_err(stored)?;
            return Ok(Response::new(ListAuditEventsResponse { events, next_page_token: String::new() }));
        }
        let (events, next) = self.log.list(&req.tenant_id, after, limit, MAX_SCAN, keep).await.map_err(stored)?;
        let next_page_token = next.map(|s| paging::encode_token(&s.to_string())).unwrap_or_default();
        Ok(Response::new(ListAuditEventsResponse { events, next_page_token }))
    }

    type ExportAuditEventsStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<ExportAuditEventsResponse, Status>> + Send>>;

    async fn export_audit_events(
        &self,
        request: Request<ExportAuditEventsRequest>,
    ) -> Result<Response<Self::ExportAuditEventsStream>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let window = Window::checked(&mut v, req.from_us, req.to_us);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let (log, store) = (self.log.clone(), self.store);
        // A page of events at a time, each a chunk of lines.
        let stream = export_pages(log, req.tenant_id, window, store);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<VerifyAuditChainRequest>,
    ) -> Result<Response<VerifyAuditChainResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let verified = self
            .log
            .verify(&req.tenant_id)
            .await
            .map_err(|e| tenantmesh_service::errors::storage_status(e, self.store))?;
        if !verified.intact {
            tracing::error!(
                security_event = "audit_chain_broken",
                tenant_id = %req.tenant_id,
                first_broken = verified.first_broken,
                reason = %verified.reason,
                "a tenant's audit chain does not hold"
            );
        }
        Ok(Response::new(verified))
    }
}

/// A request's time range, `[from_us, to_us)` in Unix microseconds (0:
/// unbounded).
#[derive(Clone, Copy)]
struct Window {
    from_us: i64,
    to_us: i64,
}

impl Window {
    /// The range, its violation added to `v` when it is not one.
    fn checked(v: &mut Violations, from_us: i64, to_us: i64) -> Self {
        if from_us < 0 || to_us < 0 || (to_us > 0 && to_us <= from_us) {
            v.add("to_us", "must be after from_us (both Unix microseconds, 0 for unbounded)");
        }
        Self { from_us, to_us }
    }

    fn holds(self, e: &AuditEvent) -> bool {
        e.time_us >= self.from_us && (self.to_us == 0 || e.time_us < self.to_us)
    }
}

/// The export of `tenant`'s events in `window` as a stream of chunks: one
/// page of the log per chunk, read as the client takes them.
fn export_pages(
    log: AuditLog,
    tenant: String,
    window: Window,
    store: &'static str,
) -> impl futures_util::Stream<Item = Result<ExportAuditEventsResponse, Status>> + Send {
    let keep = move |e: &AuditEvent| window.holds(e);
    futures_util::stream::unfold(Some(0u64), move |after| {
        let (log, tenant) = (log.clone(), tenant.clone());
        async move {
            let after = after?;
            let page = log.list(&tenant, after, 500, MAX_SCAN, keep).await;
            match page {
                Err(e) => Some((Err(tenantmesh_service::errors::storage_status(e, store)), None)),
                Ok((events, next)) => {
                    if events.is_empty() && next.is_none() {
                        return None;
                    }
                    let mut jsonl = Vec::new();
                    for e in &events {
                        serde_json::to_writer(&mut jsonl, &tenantmesh_service::audit::to_json(e))
                            .expect("JSON of an event");
                        jsonl.push(b'\n');
                    }
                    Some((Ok(ExportAuditEventsResponse { jsonl }), next))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    /// A burst of refused calls: some recorded one by one, the rest counted
    /// and named by the next one recorded; none lost.
    #[tokio::test]
    async fn a_flood_of_refusals_is_recorded_in_summary_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store: tenantmesh_storage::DynTable =
            Arc::new(tenantmesh_storage::EmbeddedTable::open(dir.path().join("t.redb")).unwrap());
        let auditor = Auditor::new(AuditLog::new(store, "registry"));
        const PATH: &str = "/tenantmesh.registry.v1.TenantRegistry/SetTenantStatus";
        let tell = auditor.refusals(&[(PATH, "tenant.status")]);
        let ctx = TenantContext {
            tenant_id: "acme".into(),
            subject: "u-1".into(),
            roles: [Role::TenantUser].into(),
            ..Default::default()
        };
        let denied = Status::permission_denied("caller's role may not call this rpc");
        for _ in 0..200 {
            tell(&ctx, PATH, &denied);
        }
        // Another path is not audited at all.
        tell(&ctx, "/tenantmesh.registry.v1.TenantRegistry/GetTenant", &denied);
        let recorded = |n: usize| {
            let log = auditor.log.clone();
            async move {
                for _ in 0..200 {
                    let (events, _) = log.list("acme", 0, 1000, 1000, |_| true).await.unwrap();
                    if events.len() >= n {
                        return events;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                panic!("fewer than {n} events recorded");
            }
        };
        let first = recorded(REFUSALS_IN_FLIGHT).await;
        assert_eq!(first.len(), REFUSALS_IN_FLIGHT, "the burst: as many as there are slots");
        tell(&ctx, PATH, &denied);
        let all = recorded(REFUSALS_IN_FLIGHT + 1).await;
        let summary = &all.last().unwrap().error;
        let missed = 200 - REFUSALS_IN_FLIGHT;
        assert!(summary.contains(&format!("and {missed} more refused attempts")), "{summary}");
        assert!(all.iter().all(|e| e.outcome() == Outcome::Denied && e.action == "tenant.status"));
    }
}
