//! The registry's audit log: an event for every change to a tenant's
//! record and to the service catalog, in the same transaction as the change
//! (see [`tenantmesh_service::audit`]), one for every refused or failed
//! attempt ([`tenantmesh_tenant_context::audit::Auditor`]), and the `Audit` service that reads them.

use tenantmesh_proto::registry::v1::Tenant;
use tenantmesh_service::audit::Caller;

use crate::registry::Registry;

/// What an audited change says of itself: who, what, and how to summarise
/// the record before and after it.
pub(crate) struct Audited<'a> {
    pub caller: &'a Caller,
    pub action: &'static str,
    pub summary: fn(&Tenant) -> String,
}

/// The registry's RPCs that change something, by path: their actions.
const ACTIONS: [(&str, &str); 10] = [
    ("/tenantmesh.registry.v1.TenantRegistry/CreateTenant", "tenant.register"),
    ("/tenantmesh.registry.v1.TenantRegistry/UpdateTenant", "tenant.update"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantStatus", "tenant.status"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetIdentityProvider", "tenant.identity_provider"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetPlacement", "tenant.placement"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetTenantLimits", "tenant.limits"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetEntitlementOverride", "tenant.entitlement"),
    ("/tenantmesh.registry.v1.TenantRegistry/SetUsageAlert", "tenant.usage_alert"),
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
    pub(crate) fn entitlements(t: &Tenant) -> String {
        if t.entitlement_overrides.is_empty() {
            return "the tier's plan".into();
        }
        let each: Vec<String> = t
            .entitlement_overrides
            .iter()
            .map(|o| match (o.granted, o.limit) {
                (Some(g), _) => format!("{} {}", o.feature, if g { "granted" } else { "not granted" }),
                (_, Some(l)) if o.hard == Some(true) => format!("{} {l} (hard)", o.feature),
                (_, Some(l)) => format!("{} {l}", o.feature),
                _ => o.feature.clone(),
            })
            .collect();
        format!("the tier's plan but {}", each.join(", "))
    }
    pub(crate) fn usage_alerts(t: &Tenant) -> String {
        if t.usage_alerts.is_empty() {
            return "no usage alerts".into();
        }
        let each: Vec<String> = t.usage_alerts.iter().map(tenantmesh_proto::names::usage_alert).collect();
        format!("usage alerts {}", each.join(", "))
    }
    pub(crate) fn limits(t: &Tenant) -> String {
        t.limits.as_ref().map_or_else(|| "the tier's limits".into(), tenantmesh_proto::names::limits)
    }
}

impl Registry {
    /// What the access layer calls for a refused call of a registry RPC
    /// that changes something.
    pub fn refusals(&self) -> tenantmesh_tenant_context::authorize::OnRefusal {
        self.auditor.refusals(&ACTIONS)
    }

    /// Purges, every `every`, each tenant's audit events past its tier's
    /// `audit_retention_days` (the platform's chain, and a tenant no longer
    /// in the registry, keep the longest of any tier).
    pub fn sweep_audit(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        let tier_of: tenantmesh_tenant_context::audit::TierOf = std::sync::Arc::new(move |tenant: String| {
            let registry = registry.clone();
            Box::pin(async move { registry.get(&tenant).await.ok().flatten().map(|t| t.tier) })
        });
        self.auditor.sweep(self.tiers.clone(), tier_of, every)
    }

    /// The registry's audit log (its `Audit` and `Backup` services).
    pub fn auditor(&self) -> &tenantmesh_tenant_context::audit::Auditor {
        &self.auditor
    }
}
