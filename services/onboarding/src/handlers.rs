//! The gRPC API of the onboarding service: requests are validated, turned
//! into workflows (started through the engine) and read back.

use crate::service::started;
use tenantmesh_credentials as credentials;
use tenantmesh_proto::onboarding::v1::onboarding_server::Onboarding;
use tenantmesh_proto::onboarding::v1::*;
use tenantmesh_proto::registry::v1::TenantStatus;
use tenantmesh_service::errors::{Violations, invalid_field};
use tenantmesh_storage::{Condition, StorageError, Write};
use tenantmesh_tenant_context::{PLATFORM_TENANT, Role, TenantContext};
use tonic::{Request, Response, Status};

use crate::engine;
use crate::error::OnboardingError;
use crate::service::{IDEMPOTENCY_PK, OnboardingService};
use crate::views::{
    EventStream, MAX_KEY_LEN, Redactor, check_workflow_id, params_of, tenant_of, to_proto, to_proto_status, workflow_id,
};
use crate::workflow::{self, Kind, Params, Workflow, WorkflowState, model_name};
use tenantmesh_service::clock::{now_secs, now_us};

#[tonic::async_trait]
impl Onboarding for OnboardingService {
    async fn register_tenant(
        &self,
        request: Request<RegisterTenantRequest>,
    ) -> Result<Response<RegisterTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let (audited_tenant, target) = (req.tenant_id.clone(), format!("tenant/{}", req.tenant_id));
        let who = &caller;
        self.inner.auditor.audited(who, &audited_tenant, "tenant.onboard", target, async move {
            let mut v = Violations::new();
            v.tenant_id("tenant_id", &req.tenant_id);
            v.tenant_name("name", &req.name, true);
            if self.inner.tiers.get(&req.tier).is_none() {
                v.add("tier", self.inner.tiers.unknown_tier_message());
            }
            let email = credentials::normalize_email(&req.admin_email);
            credentials::check_email(&mut v, "admin_email", &email);
            credentials::check_password(&mut v, "admin_password", &req.admin_password);
            if req.idempotency_key.is_empty() || req.idempotency_key.len() > MAX_KEY_LEN {
                v.add("idempotency_key", format!("must be 1 to {MAX_KEY_LEN} bytes"));
            } else if req.idempotency_key.chars().any(char::is_control) {
                v.add("idempotency_key", "must not contain control characters");
            }
            v.check()?;
            if req.tenant_id == PLATFORM_TENANT {
                return Err(OnboardingError::TenantTaken(req.tenant_id).into());
            }
            let to = self.spot_for(&req.tenant_id, &req.tier).expect("tier validated");
            let params = Params { tenant_id: req.tenant_id.clone(), name: req.name, tier: req.tier, admin_email: email };
            let id = workflow_id(&params.tenant_id, Kind::Onboard);

            let mut hash = None;
            let mut hooks = None;
            loop {
                if let Some(item) =
                    self.inner.store.get(IDEMPOTENCY_PK, &req.idempotency_key).await.map_err(OnboardingError::from)?
                {
                    let recorded: Params =
                        serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                    if recorded != params {
                        return Err(invalid_field(
                            "idempotency_key",
                            "was already used for a different RegisterTenant request",
                        ));
                    }
                    let (wf, _) =
                        self.inner.engine.load(&id).await?.ok_or_else(|| OnboardingError::NotFound(id.clone()))?;
                    return Ok(Response::new(RegisterTenantResponse {
                        tenant_id: params.tenant_id,
                        status: to_proto_status(wf.state) as i32,
                        workflow_id: id,
                    }));
                }
                let password_hash = match &hash {
                    Some(h) => h,
                    None => {
                        let h = self.inner.hashing.hash(req.admin_password.clone(), self.inner.hash_params).await;
                        hash.insert(h.map_err(OnboardingError::from)?)
                    }
                };
                let hooks = match &hooks {
                    Some(h) => h,
                    None => hooks.insert(self.hooks().await?),
                };
                let steps = workflow::onboard_steps(&to, hooks);
                let mut wf = Workflow::new(id.clone(), Kind::Onboard, params.clone(), &steps, now_secs());
                wf.admin_password_hash = password_hash.clone();
                wf.idempotency_key = req.idempotency_key.clone();
                wf.to = to.clone();
                // Idempotency: the key's record, the tenant's active record and
                // the workflow are created together.
                let key = Write::Put {
                    pk: IDEMPOTENCY_PK.into(),
                    sk: req.idempotency_key.clone(),
                    data: serde_json::to_vec(&params).map_err(|e| OnboardingError::Internal(e.to_string()))?,
                    condition: Condition::NotExists,
                };
                let event = started(who, &wf, "tenant.onboard", String::new(), format!("tier {}, admin {}", params.tier, params.admin_email));
            let audit = Some((&self.inner.auditor.log, event));
            match self.inner.engine.start(&wf, None, vec![key], audit).await {
                    Ok(()) => {
                        tracing::info!(onboarded_tenant = %params.tenant_id, tier = %params.tier, model = %model_name::as_str(to.model), "onboarding started");
                        break;
                    }
                    // A concurrent call with the same key won: compare with it.
                    Err(StorageError::ConditionFailed { index: 0, .. }) => continue,
                    Err(StorageError::ConditionFailed { .. }) => {
                        return Err(OnboardingError::TenantTaken(params.tenant_id).into());
                    }
                    Err(e) => return Err(OnboardingError::from(e).into()),
                }
            }
            self.inner.engine.spawn(id.clone());
            Ok(Response::new(RegisterTenantResponse {
                tenant_id: params.tenant_id,
                status: WorkflowStatus::Running as i32,
                workflow_id: id,
            }))
        })
        .await
    }

    async fn get_onboarding_status(
        &self,
        request: Request<GetOnboardingStatusRequest>,
    ) -> Result<Response<GetOnboardingStatusResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let id = workflow_id(&req.tenant_id, Kind::Onboard);
        let (wf, _) = self.inner.engine.load(&id).await?.ok_or_else(|| OnboardingError::NotFound(id.clone()))?;
        let w = self.inner.redactor.workflow(&ctx, to_proto(&wf));
        Ok(Response::new(GetOnboardingStatusResponse {
            tenant_id: w.tenant_id,
            status: w.status,
            steps: w.steps,
            workflow_id: w.workflow_id,
            kind: w.kind,
            error: w.error,
            create_time: w.create_time,
            update_time: w.update_time,
            export_path: w.export_path,
        }))
    }

    async fn get_workflow(
        &self,
        request: Request<GetWorkflowRequest>,
    ) -> Result<Response<GetWorkflowResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        check_workflow_id(&req.workflow_id)?;
        ctx.authorize_tenant(tenant_of(&req.workflow_id))?;
        let (wf, _) = self
            .inner
            .engine
            .load(&req.workflow_id)
            .await?
            .ok_or_else(|| OnboardingError::NotFound(req.workflow_id.clone()))?;
        Ok(Response::new(GetWorkflowResponse { workflow: Some(self.inner.redactor.workflow(&ctx, to_proto(&wf))) }))
    }

    async fn list_workflows(
        &self,
        request: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if !(0..=1000).contains(&req.limit) {
            v.add("limit", "must be 1..=1000 (0 means 100)");
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let limit = if req.limit == 0 { 100 } else { req.limit as usize };
        let mut all = self.inner.engine.of_tenant(&req.tenant_id).await?;
        // Newest first. Within one second: a tenant's onboarding came
        // first and its offboarding last; the others' ids end in their
        // start in milliseconds.
        let order = |wf: &Workflow| {
            let rank = match wf.kind {
                Kind::Onboard => 0,
                Kind::Offboard => 2,
                _ => 1,
            };
            let ms: i64 = wf.id.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            std::cmp::Reverse((wf.create_time, rank, ms, wf.id.clone()))
        };
        all.sort_by_cached_key(order);
        let more = all.len() > limit;
        let workflows =
            all.into_iter().take(limit).map(|wf| self.inner.redactor.workflow(&ctx, to_proto(&wf))).collect();
        Ok(Response::new(ListWorkflowsResponse { workflows, more }))
    }

    async fn retry_onboarding(
        &self,
        request: Request<RetryOnboardingRequest>,
    ) -> Result<Response<RetryOnboardingResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let (audited_tenant, target) =
            (req.workflow_id.split('/').next().unwrap_or_default().to_owned(), format!("workflow/{}", req.workflow_id));
        let who = &caller;
        self.inner
            .auditor
            .audited(who, &audited_tenant, "workflow.retry", target, async move {
                check_workflow_id(&req.workflow_id)?;
                let engine = &self.inner.engine;
                let (mut wf, mut version) = engine
                    .load(&req.workflow_id)
                    .await?
                    .ok_or_else(|| OnboardingError::NotFound(req.workflow_id.clone()))?;
                if let Some((active, _)) = engine.active(&wf.params.tenant_id).await?
                    && active.id != wf.id
                {
                    return Err(OnboardingError::Replaced { id: wf.id, by: active.id }.into());
                }
                let failed = wf.error();
                engine::retry(&mut wf).map_err(|state| OnboardingError::NotRetryable { id: wf.id.clone(), state })?;
                let event = started(who, &wf, "workflow.retry", format!("failed at {failed}"), "resumed".into());
                engine.save_audited(&mut wf, &mut version, &self.inner.auditor.log, event).await?;
                tracing::info!(workflow_id = %wf.id, "workflow retried");
                engine.spawn(wf.id.clone());
                Ok(Response::new(RetryOnboardingResponse { workflow: Some(to_proto(&wf)) }))
            })
            .await
    }

    async fn offboard_tenant(
        &self,
        request: Request<OffboardTenantRequest>,
    ) -> Result<Response<OffboardTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let (audited_tenant, target) = (req.tenant_id.clone(), format!("tenant/{}", req.tenant_id));
        let who = &caller;
        self.inner
            .auditor
            .audited(who, &audited_tenant, "tenant.offboard", target, async move {
                let mut v = Violations::new();
                v.tenant_id("tenant_id", &req.tenant_id);
                v.check()?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(OnboardingError::PlatformTenant("cannot be offboarded").into());
                }
                let id = workflow_id(&req.tenant_id, Kind::Offboard);
                if let Some((wf, _)) = self.inner.engine.load(&id).await? {
                    return Ok(Response::new(OffboardTenantResponse {
                        workflow_id: id,
                        status: to_proto_status(wf.state) as i32,
                    }));
                }
                let tenant = self.tenant(&req.tenant_id).await?;
                let active = self.inner.engine.active(&req.tenant_id).await?;
                if let Some((running, _)) = active.as_ref().filter(|(w, _)| w.state == WorkflowState::Running) {
                    return Err(OnboardingError::InProgress { id: running.id.clone(), state: running.state }.into());
                }
                let params = params_of(&tenant, &tenant.tier);
                let hooks = self.hooks().await?;
                let steps = workflow::offboard_steps(&hooks);
                let mut wf = Workflow::new(id.clone(), Kind::Offboard, params, &steps, now_secs());
                wf.from_tier = tenant.tier.clone();
                wf.from = self.spot_of(&tenant);
                let event = started(
                    who,
                    &wf,
                    "tenant.offboard",
                    format!("tier {}", wf.from_tier),
                    "offboarded, its items exported".into(),
                );
                self.start(&wf, active.map(|(_, v)| v), Some(event)).await?;
                tracing::info!(offboarded_tenant = %req.tenant_id, "offboarding started");
                self.inner.engine.spawn(id.clone());
                Ok(Response::new(OffboardTenantResponse { workflow_id: id, status: WorkflowStatus::Running as i32 }))
            })
            .await
    }

    async fn list_tenant_resources(
        &self,
        request: Request<ListTenantResourcesRequest>,
    ) -> Result<Response<ListTenantResourcesResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let resources =
            self.inner.resources.list(&req.tenant_id, req.include_removed).await.map_err(OnboardingError::from)?;
        let sees_all = Redactor::sees_all(&ctx);
        Ok(Response::new(ListTenantResourcesResponse {
            resources: resources
                .into_iter()
                .map(|r| TenantResource {
                    name: match r.kind.as_str() {
                        _ if sees_all => r.name,
                        // Where its instance runs is the operator's to know.
                        crate::resources::SILO_INSTANCE => String::new(),
                        _ => self.inner.redactor.text(&r.name),
                    },
                    kind: r.kind,
                    tags: r.tags.into_iter().collect(),
                    create_time: r.create_time,
                    remove_time: r.remove_time.unwrap_or_default(),
                    bytes: r.bytes,
                })
                .collect(),
        }))
    }

    async fn change_tier(&self, request: Request<ChangeTierRequest>) -> Result<Response<ChangeTierResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let (audited_tenant, target) = (req.tenant_id.clone(), format!("tenant/{}", req.tenant_id));
        let who = &caller;
        self.inner.auditor.audited(who, &audited_tenant, "tenant.change_tier", target, async move {
            let mut v = Violations::new();
            v.tenant_id("tenant_id", &req.tenant_id);
            if self.inner.tiers.get(&req.tier).is_none() {
                v.add("tier", self.inner.tiers.unknown_tier_message());
            }
            v.check()?;
            if req.tenant_id == PLATFORM_TENANT {
                return Err(OnboardingError::PlatformTenant("cannot change tier").into());
            }
            if let Some((wf, _)) = self.inner.engine.active(&req.tenant_id).await? {
                if wf.kind == Kind::ChangeTier && wf.params.tier == req.tier {
                    return Ok(Response::new(ChangeTierResponse {
                        workflow_id: wf.id,
                        status: to_proto_status(wf.state) as i32,
                    }));
                }
                return Err(OnboardingError::InProgress { id: wf.id, state: wf.state }.into());
            }
            let tenant = self.tenant(&req.tenant_id).await?;
            if tenant.status != TenantStatus::Active as i32 {
                return Err(OnboardingError::NotActive.into());
            }
            if tenant.tier == req.tier {
                return Err(OnboardingError::SameTier(req.tier).into());
            }
            let from = self.spot_of(&tenant);
            let target = self.spot_for(&tenant.tenant_id, &req.tier).expect("tier validated");
            let to = if target.model == from.model { from.clone() } else { target };
            let params = params_of(&tenant, &req.tier);
            let id = workflow_id(&tenant.tenant_id, Kind::ChangeTier);
            let hooks = self.hooks().await?;
            let steps = workflow::change_tier_steps(&from, &to, &hooks);
            let mut wf = Workflow::new(id.clone(), Kind::ChangeTier, params, &steps, now_secs());
            wf.from_tier = tenant.tier.clone();
            wf.from = from;
            wf.to = to;
            let event = started(who, &wf, "tenant.change_tier", format!("tier {}", wf.from_tier), format!("tier {}", req.tier));
            self.start(&wf, None, Some(event)).await?;
            tracing::info!(target_tenant = %tenant.tenant_id, from = %wf.from_tier, to = %req.tier, "tier change started");
            self.inner.engine.spawn(id.clone());
            Ok(Response::new(ChangeTierResponse { workflow_id: id, status: WorkflowStatus::Running as i32 }))
        })
        .await
    }

    async fn restore_tenant(
        &self,
        request: Request<RestoreTenantRequest>,
    ) -> Result<Response<RestoreTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let (audited_tenant, target) = (req.tenant_id.clone(), format!("tenant/{}", req.tenant_id));
        let who = &caller;
        self.inner.auditor.audited(who, &audited_tenant, "tenant.restore", target, async move {
            let now = now_us();
            let mut v = Violations::new();
            v.tenant_id("tenant_id", &req.tenant_id);
            let at = match &req.point_in_time {
                None => {
                    v.add("point_in_time", "is required");
                    0
                }
                Some(t) if t.seconds <= 0 || !(0..1_000_000_000).contains(&t.nanos) => {
                    v.add("point_in_time", "must be a valid time after the Unix epoch");
                    0
                }
                Some(t) => t.seconds.saturating_mul(1_000_000).saturating_add(i64::from(t.nanos / 1000)),
            };
            if at > now {
                v.add("point_in_time", "is in the future");
            }
            let export = match RestoreTarget::try_from(req.target) {
                Ok(RestoreTarget::Unspecified | RestoreTarget::InPlace) => false,
                Ok(RestoreTarget::Export) => true,
                Err(_) => {
                    v.add("target", "must be RESTORE_TARGET_IN_PLACE or RESTORE_TARGET_EXPORT");
                    false
                }
            };
            v.check()?;
            if req.tenant_id == PLATFORM_TENANT {
                return Err(OnboardingError::PlatformTenant("cannot be restored").into());
            }
            ctx.authorize_tenant(&req.tenant_id)?;
            let tenant = self.tenant(&req.tenant_id).await?;
            let tier = self
                .inner
                .tiers
                .get(&tenant.tier)
                .ok_or_else(|| OnboardingError::Internal(format!("tier {} is not in the tiers file", tenant.tier)))?;
            // What the tier's plan includes, whoever asks.
            use tenantmesh_service::entitlements::Feature;
            let plan = tier.entitlements.with(&tenant.entitlement_overrides);
            plan.check(Feature::Restore, &tenant.tier)?;
            if export {
                plan.check(Feature::Export, &tenant.tier)?;
            }
            if !ctx.has_role(Role::PlatformAdmin) && !tier.tenant_restore {
                return Err(Status::permission_denied(format!(
                    "tier {} does not let a tenant restore itself (tenant_restore); ask a platform admin",
                    tenant.tier
                )));
            }
            let earliest = now - tier.history_us();
            if at < earliest {
                return Err(invalid_field(
                    "point_in_time",
                    format!(
                        "is older than the tier's history of {} days (the earliest instant is {} µs since the epoch)",
                        tier.history_days, earliest
                    ),
                ));
            }
            if let Some((wf, _)) = self.inner.engine.active(&req.tenant_id).await? {
                if wf.kind == Kind::Restore
                    && wf.point_in_time_us == at
                    && wf.steps.iter().all(|s| s.name != workflow::Step::PauseWrites) == export
                {
                    return Ok(Response::new(RestoreTenantResponse {
                        workflow_id: wf.id,
                        status: to_proto_status(wf.state) as i32,
                    }));
                }
                return Err(OnboardingError::InProgress { id: wf.id, state: wf.state }.into());
            }
            if !export && tenant.status != TenantStatus::Active as i32 {
                return Err(OnboardingError::NotActive.into());
            }
            let params = params_of(&tenant, &tenant.tier);
            let id = workflow_id(&tenant.tenant_id, Kind::Restore);
            let hooks = self.hooks().await?;
            let steps = workflow::restore_steps(export, &hooks);
            let mut wf = Workflow::new(id.clone(), Kind::Restore, params, &steps, now_secs());
            wf.from_tier = tenant.tier.clone();
            wf.from = self.spot_of(&tenant);
            wf.to = wf.from.clone();
            wf.point_in_time_us = at;
            // A restore the tenant asked for itself is charged to its limits.
            wf.charge_tenant = !ctx.has_role(Role::PlatformAdmin);
            let into = if export { "into an export" } else { "in place" };
            let after = format!("as it was at {} ({at} us), {into}", tenantmesh_service::clock::rfc3339(at / 1_000_000));
            let event = started(who, &wf, "tenant.restore", String::new(), after);
            self.start(&wf, None, Some(event)).await?;
            tracing::info!(target_tenant = %tenant.tenant_id, point_in_time_us = at, export, caller = %ctx.subject, "restore started");
            self.inner.engine.spawn(id.clone());
            Ok(Response::new(RestoreTenantResponse { workflow_id: id, status: WorkflowStatus::Running as i32 }))
        })
        .await
    }

    type WatchEventsStream = EventStream;

    async fn record_usage_threshold(
        &self,
        request: Request<RecordUsageThresholdRequest>,
    ) -> Result<Response<RecordUsageThresholdResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.require("alert_id", &req.alert_id);
        if req.alert_id.len() > 32 || req.alert_id.contains(['@', '/']) {
            v.add("alert_id", "must be at most 32 characters, without @ or /");
        }
        if tenantmesh_service::alerts::period(req.period_start).0 != req.period_start {
            v.add("period_start", "must be the first second of a calendar month (UTC)");
        }
        v.require("detail", &req.detail);
        if req.detail.len() > 1024 {
            v.add("detail", "must be at most 1024 bytes");
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let period = tenantmesh_service::alerts::period_name(req.period_start);
        let workflow_id = format!("{}@{period}", req.alert_id);
        let once = format!("usage/{}/{}/{}/{}", req.tenant_id, req.alert_id, req.alert_create_time, req.period_start);
        let event = self
            .inner
            .events
            .emit_once(&once, EventKind::UsageThresholdReached, &req.tenant_id, &workflow_id, req.detail)
            .await
            .map_err(OnboardingError::from)?;
        Ok(Response::new(RecordUsageThresholdResponse { recorded: event.is_some(), event }))
    }

    async fn watch_events(&self, request: Request<WatchEventsRequest>) -> Result<Response<EventStream>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let filter = if req.tenant_id.is_empty() {
            if ctx.has_role(Role::PlatformAdmin) { None } else { Some(ctx.tenant_id.to_string()) }
        } else {
            let mut v = Violations::new();
            v.tenant_id("tenant_id", &req.tenant_id);
            v.check()?;
            ctx.authorize_tenant(&req.tenant_id)?;
            Some(req.tenant_id)
        };
        let watching = self.inner.watchers.enter(&ctx.tenant_id, &ctx.subject)?;
        // Subscribe before replaying, so nothing falls between the two.
        let mut live = self.inner.events.subscribe();
        let this = self.clone();
        // A tenant admin sees no host paths or endpoints in the details.
        let redactor = (!Redactor::sees_all(&ctx)).then(|| self.inner.redactor.clone());
        let shown = move |mut e: Event| {
            if let Some(r) = &redactor {
                e.detail = r.text(&e.detail);
            }
            WatchEventsResponse { event: Some(e) }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tenantmesh_telemetry::spawn(async move {
            // Held until the stream's task ends: when the client goes away.
            let _watching = watching;
            let wanted = |e: &Event| filter.as_ref().is_none_or(|t| *t == e.tenant_id);
            let mut last = 0;
            if let Some(mut after) = req.after_sequence {
                loop {
                    let batch = match this.inner.events.replay(after, 100).await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(OnboardingError::from(e).into())).await;
                            return;
                        }
                    };
                    let Some(end) = batch.last().map(|e| e.sequence) else { break };
                    for e in batch.into_iter().filter(|e| wanted(e)) {
                        if tx.send(Ok(shown(e))).await.is_err() {
                            return;
                        }
                    }
                    after = end;
                }
                last = after;
            }
            loop {
                // Ends when the client goes away, not at the next event.
                let next = tokio::select! {
                    next = live.recv() => next,
                    () = tx.closed() => return,
                };
                match next {
                    Ok(e) if e.sequence > last && wanted(&e) => {
                        if tx.send(Ok(shown(e))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(Err(OnboardingError::Lagged(n).into())).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests;
