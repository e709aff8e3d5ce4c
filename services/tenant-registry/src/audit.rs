//! The registry's audit log: an event for every change to a tenant's
//! record and to the service catalog, in the same transaction as the change
//! (see [`tenantmesh_service::audit`]), one for every refused or failed
//! attempt, and the `Audit` service that reads them.

use std::future::Future;

use tenantmesh_proto::audit::v1::audit_server::Audit;
use tenantmesh_proto::audit::v1::*;
use tenantmesh_proto::registry::v1::Tenant;
use tenantmesh_service::audit::{AuditLog, Caller};
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tenantmesh_tenant_context::{PLATFORM_TENANT, TenantContext};
use tonic::{Code, Request, Response, Status};

use crate::registry::Registry;

/// What an audited change says of itself: who, what, and how to summarise
/// the record before and after it.
pub(crate) struct Audited<'a> {
    pub caller: &'a Caller,
    pub action: &'static str,
    pub summary: fn(&Tenant) -> String,
}

/// The actor of `ctx`.
pub(crate) fn actor(ctx: &TenantContext) -> Actor {
    Actor {
        subject: ctx.subject.to_string(),
        tenant_id: ctx.tenant_id.to_string(),
        roles: ctx.roles.iter().map(|r| r.as_str().to_owned()).collect(),
    }
}

/// The registry's RPCs that change something, by path: their actions.
const ACTIONS: [(&str, &str); 8] = [
    ("/tenantmesh.registry.v1.TenantRegistry/CreateTenant", "tenant.register"),
    ("/tenantmesh.registry.v1.TenantRegistry/UpdateTenant", "tenant.update"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantStatus", "tenant.status"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetIdentityProvider", "tenant.identity_provider"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetPlacement", "tenant.placement"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantLimits", "tenant.limits"),
    ("/tenantmesh.registry.v1.TenantRegistry/RegisterService", "service.register"),
    ("/tenantmesh.registry.v1.TenantRegistry/DeregisterService", "service.deregister"),
];

/// Summaries of a tenant's record, per action.
pub(crate) mod summary {
    use tenantmesh_proto::registry::v1::{IsolationModel, Tenant, TenantStatus};

    pub(crate) fn all(t: &Tenant) -> String {
        format!("name {:?}, tier {}, {}", t.name, t.tier, status(t))
    }
    pub(crate) fn name_and_tier(t: &Tenant) -> String {
        format!("name {:?}, tier {}", t.name, t.tier)
    }
    pub(crate) fn status(t: &Tenant) -> String {
        let s = TenantStatus::try_from(t.status).unwrap_or_default();
        format!("status {}", s.as_str_name().trim_start_matches("TENANT_STATUS_"))
    }
    pub(crate) fn identity_provider(t: &Tenant) -> String {
        match &t.identity_provider {
            Some(p) => format!("issuer {}, audience {}", p.issuer, p.audience),
            None => "no identity provider".into(),
        }
    }
    pub(crate) fn placement(t: &Tenant) -> String {
        let model = IsolationModel::try_from(t.isolation_model).unwrap_or_default();
        let model = model.as_str_name().trim_start_matches("ISOLATION_MODEL_").to_lowercase();
        match &t.placement {
            Some(p) => {
                format!("tier {}, {model}, table {:?}, endpoint {:?}, {}", t.tier, p.table, p.endpoint, status(t))
            }
            None => format!("tier {}, {model}, no placement, {}", t.tier, status(t)),
        }
    }
    pub(crate) fn limits(t: &Tenant) -> String {
        match &t.limits {
            Some(l) => format!(
                "{} requests/s, burst {}, {} in flight, {} bytes stored",
                l.requests_per_second, l.burst, l.max_concurrency, l.storage_quota_bytes
            ),
            None => "the tier's limits".into(),
        }
    }
}

impl Registry {
    /// The caller of `request` (authenticated: `ctx`).
    pub(crate) fn caller<T>(request: &Request<T>, ctx: &TenantContext) -> Caller {
        Caller::of(request, actor(ctx))
    }

    /// Runs `work`, an audited change of `tenant_id`'s `target`: when it
    /// fails or is refused, records that attempt (a committed change
    /// recorded its own event with it).
    pub(crate) async fn audited<T>(
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

    /// Records a refused or failed attempt (nothing changed).
    pub(crate) async fn attempted(
        &self,
        caller: &Caller,
        tenant_id: &str,
        action: &str,
        target: String,
        status: &Status,
    ) {
        // A tenant id that is none (the attempt named no valid one) goes
        // to the platform's chain.
        let chain = if tenantmesh_service::validate_tenant_id(tenant_id).is_ok() { tenant_id } else { PLATFORM_TENANT };
        let mut event = caller.event(chain, action, target);
        event.outcome = match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => Outcome::Denied,
            _ => Outcome::Failed,
        } as i32;
        event.error = format!("{:?}: {}", status.code(), status.message());
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, action, tenant_id, "a refused attempt could not be recorded in the audit log");
        }
    }

    /// What the access layer calls for a refused call: an event on the
    /// caller's own tenant's chain (the request's body, which names its
    /// target, is not read for a call that goes no further), recorded in
    /// the background.
    pub fn refusals(&self) -> tenantmesh_tenant_context::authorize::OnRefusal {
        let registry = self.clone();
        std::sync::Arc::new(move |ctx: &TenantContext, path: &str, status: &Status| {
            let Some((_, action)) = ACTIONS.iter().find(|(p, _)| *p == path) else { return };
            let caller = Caller {
                actor: actor(ctx),
                trace_id: tenantmesh_telemetry::current_trace_id().unwrap_or_default(),
                ..Default::default()
            };
            let (registry, status, tenant) = (registry.clone(), status.clone(), ctx.tenant_id.to_string());
            tenantmesh_telemetry::spawn(async move {
                registry.attempted(&caller, &tenant, action, String::new(), &status).await;
            });
        })
    }
}

/// `Audit` over the registry's log.
#[derive(Clone)]
pub struct AuditService {
    log: AuditLog,
}

impl AuditService {
    pub fn new(registry: &Registry) -> Self {
        Self { log: registry.audit.clone() }
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
        if req.from_us < 0 || req.to_us < 0 || (req.to_us > 0 && req.to_us <= req.from_us) {
            v.add("to_us", "must be after from_us (both Unix microseconds, 0 for unbounded)");
        }
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
                && e.time_us >= req.from_us
                && (req.to_us == 0 || e.time_us < req.to_us)
        };
        let stored = |e| tenantmesh_service::errors::storage_status(e, "registry");
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
            .map_err(|e| tenantmesh_service::errors::storage_status(e, "registry"))?;
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
