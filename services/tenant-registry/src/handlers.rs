//! The `TenantRegistry` RPCs.

use prost::Message as _;
use tenantmesh_proto::registry::v1::tenant_registry_server::TenantRegistry;
use tenantmesh_proto::registry::v1::*;
use tenantmesh_service::errors::Violations;
use tenantmesh_service::paging;
use tenantmesh_storage::Query;
use tenantmesh_tenant_context::{PLATFORM_TENANT, TenantContext};
use tonic::{Request, Response, Status};

use crate::audit::{Audited, summary};
use crate::error::RegistryError;
use crate::registry::*;
use tenantmesh_service::clock::now_secs;

#[tonic::async_trait]
impl TenantRegistry for Registry {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.tenant_name("name", &req.name, true);
        self.check_tier(&mut v, &req.tier);
        if let Some(p) = &req.placement {
            check_placement(&mut v, p, self.tiers.isolation_model(&req.tier));
        }
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Unspecified) => TenantStatus::Provisioning,
            Ok(TenantStatus::Deleted) | Err(_) => {
                v.add("status", "must be PROVISIONING, ACTIVE or SUSPENDED");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let id = req.tenant_id.clone();
        let tenant = self
            .auditor
            .audited(&caller, &id, "tenant.register", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                let model = self.tiers.isolation_model(&req.tier).expect("tier validated");
                let now = now_secs();
                let audited = Audited { caller: &caller, action: "tenant.register", summary: summary::all };
                Ok(self
                    .insert(
                        Tenant {
                            tenant_id: req.tenant_id,
                            name: req.name,
                            tier: req.tier,
                            isolation_model: model as i32,
                            status: status as i32,
                            create_time: now,
                            update_time: now,
                            version: 0,
                            identity_provider: None,
                            placement: req.placement,
                            limits: None,
                            entitlement_overrides: Vec::new(),
                            usage_alerts: Vec::new(),
                        },
                        Some(audited),
                    )
                    .await?)
            })
            .await?;
        tracing::info!(created_tenant = %tenant.tenant_id, tier = %tenant.tier, "tenant created");
        Ok(Response::new(CreateTenantResponse { tenant: Some(tenant) }))
    }

    async fn get_tenant(&self, request: Request<GetTenantRequest>) -> Result<Response<GetTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let tenant = self.get(&req.tenant_id).await?.ok_or(RegistryError::NotFound(req.tenant_id))?;
        Ok(Response::new(GetTenantResponse { tenant: Some(tenant) }))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        let limit = paging::page_size(&mut v, req.page_size);
        // Sort keys here are tenant ids: a token must resume after one.
        let start_after = paging::decode_token(&mut v, &req.page_token, "");
        if start_after.as_deref().is_some_and(|id| tenantmesh_service::validate_tenant_id(id).is_err()) {
            v.add("page_token", "is not a token from a previous response to this query");
        }
        v.check()?;
        ctx.authorize_all_tenants()?;
        let page = self
            .store
            .query(Query { pk: TENANTS_PK.into(), sk_prefix: String::new(), start_after, limit })
            .await
            .map_err(RegistryError::from)?;
        let mut tenants = Vec::with_capacity(page.items.len());
        for item in page.items {
            let mut t = Tenant::decode(item.data.as_slice()).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
            t.version = item.version;
            tenants.push(t);
        }
        let next_page_token = page.last_evaluated.as_deref().map(paging::encode_token).unwrap_or_default();
        Ok(Response::new(ListTenantsResponse { tenants, next_page_token }))
    }

    async fn update_tenant(
        &self,
        request: Request<UpdateTenantRequest>,
    ) -> Result<Response<UpdateTenantResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        v.tenant_name("name", &req.name, false);
        if !req.tier.is_empty() {
            self.check_tier(&mut v, &req.tier);
        }
        if req.name.is_empty() && req.tier.is_empty() {
            v.add("name", "name or tier must be set");
        }
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.update", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                let audited = Audited { caller: &caller, action: "tenant.update", summary: summary::name_and_tier };
                Ok(self
                    .modify(&req.tenant_id, req.expected_version, audited, |t| {
                        if !req.name.is_empty() {
                            t.name = req.name.clone();
                        }
                        if !req.tier.is_empty() && req.tier != t.tier {
                            let model = self.tiers.isolation_model(&req.tier).expect("tier validated");
                            if model as i32 != t.isolation_model {
                                return Err(RegistryError::ModelChange { from: t.tier.clone(), to: req.tier.clone() });
                            }
                            t.tier = req.tier.clone();
                        }
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(updated_tenant = %tenant.tenant_id, version = tenant.version, "tenant updated");
        Ok(Response::new(UpdateTenantResponse { tenant: Some(tenant) }))
    }

    async fn set_tenant_status(
        &self,
        request: Request<SetTenantStatusRequest>,
    ) -> Result<Response<SetTenantStatusResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Unspecified) | Err(_) => {
                v.add("status", "must be a TenantStatus other than UNSPECIFIED");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.status", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT && status != TenantStatus::Active {
                    return Err(RegistryError::PlatformTenant("cannot be deactivated").into());
                }
                let audited = Audited { caller: &caller, action: "tenant.status", summary: summary::status };
                Ok(self
                    .modify(&req.tenant_id, None, audited, |t| {
                        t.status = status as i32;
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, status = ?status, "tenant status changed");
        Ok(Response::new(SetTenantStatusResponse { tenant: Some(tenant) }))
    }

    async fn set_identity_provider(
        &self,
        request: Request<SetIdentityProviderRequest>,
    ) -> Result<Response<SetIdentityProviderResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if let Some(p) = &req.identity_provider {
            let bounded = |v: &mut Violations, field: &str, value: &str, max: usize| {
                if value.is_empty() {
                    v.add(field, "is required");
                } else if value.len() > max || value.chars().any(char::is_control) {
                    v.add(field, format!("must be at most {max} printable characters"));
                }
            };
            bounded(&mut v, "identity_provider.issuer", &p.issuer, 512);
            bounded(&mut v, "identity_provider.audience", &p.audience, 512);
            bounded(&mut v, "identity_provider.tenant_claim", &p.tenant_claim, 128);
            if p.issuer == self.own_issuer {
                v.add("identity_provider.issuer", "is the platform's own issuer");
            }
            if p.jwks_url.len() > 2048 {
                v.add("identity_provider.jwks_url", "must be at most 2048 characters");
            } else if let Some(why) =
                tenantmesh_tenant_context::external::jwks_url_refusal(&p.jwks_url, self.allow_private_jwks)
            {
                v.add("identity_provider.jwks_url", why);
            }
        }
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.identity_provider", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(RegistryError::PlatformTenant("signs in with platform tokens only").into());
                }
                // Binding one is what the tier's plan must include (removing one never is).
                if req.identity_provider.is_some() {
                    let tenant =
                        self.get(&req.tenant_id).await?.ok_or(RegistryError::NotFound(req.tenant_id.clone()))?;
                    if let Some(tier) = self.tiers.get(&tenant.tier) {
                        use tenantmesh_service::entitlements::Feature;
                        let plan = tier.entitlements.with(&tenant.entitlement_overrides);
                        plan.check(Feature::ExternalIdp, &tenant.tier)?;
                    }
                }
                let audited = Audited {
                    caller: &caller,
                    action: "tenant.identity_provider",
                    summary: summary::identity_provider,
                };
                Ok(self
                    .modify(&req.tenant_id, None, audited, |t| {
                        t.identity_provider = req.identity_provider.clone();
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(
            target_tenant = %tenant.tenant_id,
            issuer = tenant.identity_provider.as_ref().map(|p| p.issuer.as_str()).unwrap_or("(none)"),
            "identity provider set"
        );
        Ok(Response::new(SetIdentityProviderResponse { tenant: Some(tenant) }))
    }

    async fn set_placement(
        &self,
        request: Request<SetPlacementRequest>,
    ) -> Result<Response<SetPlacementResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        if !req.tier.is_empty() {
            self.check_tier(&mut v, &req.tier);
        }
        match &req.placement {
            Some(p) if req.tier.is_empty() => check_placement(&mut v, p, None),
            Some(p) => check_placement(&mut v, p, self.tiers.isolation_model(&req.tier)),
            None => {
                v.add("placement", "is required");
            }
        }
        let status = match TenantStatus::try_from(req.status) {
            Ok(TenantStatus::Deleted) | Err(_) => {
                v.add("status", "must not be DELETED (use SetTenantStatus)");
                TenantStatus::Unspecified
            }
            Ok(s) => s,
        };
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let placement = req.placement.clone().expect("validated");
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.placement", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(RegistryError::PlatformTenant("keeps its placement").into());
                }
                let audited = Audited { caller: &caller, action: "tenant.placement", summary: summary::placement };
                Ok(self
                    .modify(&req.tenant_id, req.expected_version, audited, |t| {
                        let tier = if req.tier.is_empty() { t.tier.clone() } else { req.tier.clone() };
                        let model = self.tiers.isolation_model(&tier);
                        if model.is_some_and(|m| m as i32 != placement.model) {
                            return Err(RegistryError::PlacementMismatch { tier });
                        }
                        t.tier = tier;
                        t.isolation_model = placement.model;
                        t.placement = Some(placement.clone());
                        if status != TenantStatus::Unspecified {
                            t.status = status as i32;
                        }
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(
            target_tenant = %tenant.tenant_id,
            tier = %tenant.tier,
            table = %placement.table,
            endpoint = %placement.endpoint,
            "placement set"
        );
        Ok(Response::new(SetPlacementResponse { tenant: Some(tenant) }))
    }

    async fn register_service(
        &self,
        request: Request<RegisterServiceRequest>,
    ) -> Result<Response<RegisterServiceResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        Ok(Response::new(self.catalog_register(&ctx, &caller, request.into_inner()).await?))
    }

    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        TenantContext::from_request(&request)?.authorize_all_tenants()?;
        Ok(Response::new(self.catalog_list().await?))
    }

    async fn deregister_service(
        &self,
        request: Request<DeregisterServiceRequest>,
    ) -> Result<Response<DeregisterServiceResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        Ok(Response::new(self.catalog_deregister(&ctx, &caller, request.into_inner()).await?))
    }

    type WatchTenantsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchTenantsResponse, Status>> + Send>>;

    async fn watch_tenants(
        &self,
        request: Request<WatchTenantsRequest>,
    ) -> Result<Response<Self::WatchTenantsStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        TenantContext::from_request(&request)?.authorize_all_tenants()?;
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            tracing::warn!("tenant watch refused: too many open");
            return Err(Status::resource_exhausted("too many tenant watch streams are open; retry later"));
        };
        let mut changes = self.changes.subscribe();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tenantmesh_telemetry::spawn(async move {
            let _permit = permit;
            // Whatever changed before the subscription is unknown to the watcher.
            let mut next = Some(WatchTenantsResponse { tenant_ids: Vec::new(), reset: true });
            loop {
                if let Some(message) = next.take()
                    && tx.send(Ok(message)).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    Ok(_) = stopping.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                    change = changes.recv() => match change {
                        Ok(id) => {
                            let mut ids = vec![id];
                            while let Ok(more) = changes.try_recv() {
                                ids.push(more);
                                if ids.len() == 256 { break; }
                            }
                            next = Some(WatchTenantsResponse { tenant_ids: ids, reset: false });
                        }
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "a tenant watcher fell behind; telling it to reset");
                            next = Some(WatchTenantsResponse { tenant_ids: Vec::new(), reset: true });
                        }
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        tracing::info!("a service is watching tenant changes");
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn set_entitlement_override(
        &self,
        request: Request<SetEntitlementOverrideRequest>,
    ) -> Result<Response<SetEntitlementOverrideResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        match &req.r#override {
            None => {
                v.add("override", "is required");
            }
            Some(o) if req.clear => {
                if !tenantmesh_service::entitlements::FEATURES.contains(&o.feature.as_str()) {
                    let features = tenantmesh_service::entitlements::FEATURES.join(", ");
                    v.add("override.feature", format!("must be one of {features}"));
                }
            }
            Some(o) => tenantmesh_service::entitlements::check_override(&mut v, "override", o),
        }
        v.check()?;
        let o = req.r#override.clone().expect("validated");
        let target = format!("tenant/{}", req.tenant_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.entitlement", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(RegistryError::PlatformTenant("has no plan").into());
                }
                let audited = Audited { caller: &caller, action: "tenant.entitlement", summary: summary::entitlements };
                Ok(self
                    .modify(&req.tenant_id, None, audited, |t| {
                        t.entitlement_overrides.retain(|x| x.feature != o.feature);
                        if !req.clear {
                            t.entitlement_overrides.push(o.clone());
                            t.entitlement_overrides.sort_by(|a, b| a.feature.cmp(&b.feature));
                        }
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, feature = %o.feature, clear = req.clear, "entitlement override set");
        Ok(Response::new(SetEntitlementOverrideResponse { tenant: Some(tenant) }))
    }

    async fn set_usage_alert(
        &self,
        request: Request<SetUsageAlertRequest>,
    ) -> Result<Response<SetUsageAlertResponse>, Status> {
        use tenantmesh_service::alerts;
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        match &req.alert {
            None => {
                v.add("alert", "is required");
            }
            Some(a) if req.clear => {
                v.require("alert.alert_id", &a.alert_id);
            }
            // Checked against the plan once the tenant is read.
            Some(_) => {}
        }
        v.check()?;
        let mut alert = req.alert.clone().expect("validated");
        alert.create_time = tenantmesh_service::clock::now_secs();
        let target = format!("tenant/{}/alert/{}", req.tenant_id, alert.alert_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.usage_alert", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(RegistryError::PlatformTenant("has no usage alerts").into());
                }
                let audited = Audited { caller: &caller, action: "tenant.usage_alert", summary: summary::usage_alerts };
                Ok(self
                    .modify(&req.tenant_id, None, audited, |t| {
                        let known = t.usage_alerts.iter().any(|x| x.alert_id == alert.alert_id);
                        if req.clear {
                            if !known {
                                return Err(RegistryError::NoSuchAlert(alert.alert_id.clone()));
                            }
                            t.usage_alerts.retain(|x| x.alert_id != alert.alert_id);
                            return Ok(());
                        }
                        let mut v = Violations::new();
                        let plan = self.tiers.get(&t.tier).map(|tier| tier.entitlements.with(&t.entitlement_overrides));
                        alerts::check_alert(&mut v, "alert", &alert, &plan.unwrap_or_default());
                        if !known && t.usage_alerts.len() >= alerts::MAX_ALERTS {
                            v.add("alert", format!("a tenant holds at most {} usage alerts", alerts::MAX_ALERTS));
                        }
                        v.check().map_err(RegistryError::Invalid)?;
                        t.usage_alerts.retain(|x| x.alert_id != alert.alert_id);
                        t.usage_alerts.push(alert.clone());
                        t.usage_alerts.sort_by(|a, b| a.alert_id.cmp(&b.alert_id));
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, alert_id = %alert.alert_id, clear = req.clear, "usage alert set");
        Ok(Response::new(SetUsageAlertResponse { tenant: Some(tenant) }))
    }

    async fn set_tenant_limits(
        &self,
        request: Request<SetTenantLimitsRequest>,
    ) -> Result<Response<SetTenantLimitsResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let caller = tenantmesh_tenant_context::audit::caller(&request, &ctx);
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        match &req.limits {
            None => {
                v.add("limits", "is required");
            }
            Some(l) => {
                for (field, value) in [
                    ("limits.requests_per_second", u64::from(l.requests_per_second)),
                    ("limits.burst", u64::from(l.burst)),
                    ("limits.max_concurrency", u64::from(l.max_concurrency)),
                    ("limits.storage_quota_bytes", l.storage_quota_bytes),
                ] {
                    if value == 0 {
                        v.add(field, "must be above 0");
                    }
                }
            }
        }
        v.check()?;
        let target = format!("tenant/{}", req.tenant_id);
        let tenant = self
            .auditor
            .audited(&caller, &req.tenant_id, "tenant.limits", target, async {
                ctx.authorize_tenant(&req.tenant_id)?;
                if req.tenant_id == PLATFORM_TENANT {
                    return Err(RegistryError::PlatformTenant("is not limited").into());
                }
                let audited = Audited { caller: &caller, action: "tenant.limits", summary: summary::limits };
                Ok(self
                    .modify(&req.tenant_id, None, audited, |t| {
                        t.limits = req.limits;
                        Ok(())
                    })
                    .await?)
            })
            .await?;
        tracing::info!(target_tenant = %tenant.tenant_id, "limits set");
        Ok(Response::new(SetTenantLimitsResponse { tenant: Some(tenant) }))
    }
}
