//! The mesh's records as operators read them: short state names, times in
//! UTC, and one JSON shape per record for scripts.

use serde_json::{Value, json};
use tenantmesh_proto::auth::v1::User;
use tenantmesh_proto::metering::v1::TenantCost;
use tenantmesh_proto::onboarding::v1::{Step, TenantResource, Workflow};
use tenantmesh_proto::registry::v1::Tenant;

use super::output::clean;
use super::when;

pub use tenantmesh_proto::names::{model, role, step_state, tenant_status, workflow_status};

/// A step's name, with its application service when it has one.
pub fn step_name(s: &Step) -> String {
    if s.service.is_empty() { s.name.clone() } else { format!("{} ({})", s.name, s.service) }
}

pub fn tenant_json(t: &Tenant) -> Value {
    let limits = t.limits.as_ref().map(|l| {
        json!({
            "requests_per_second": l.requests_per_second,
            "burst": l.burst,
            "max_concurrency": l.max_concurrency,
            "storage_quota_bytes": l.storage_quota_bytes,
        })
    });
    let placement =
        t.placement.as_ref().map(|p| json!({ "model": model(p.model), "table": p.table, "endpoint": p.endpoint }));
    let idp = t.identity_provider.as_ref().map(|i| {
        json!({ "issuer": i.issuer, "jwks_url": i.jwks_url, "audience": i.audience, "tenant_claim": i.tenant_claim })
    });
    json!({
        "tenant_id": t.tenant_id,
        "name": t.name,
        "tier": t.tier,
        "model": model(t.isolation_model),
        "status": tenant_status(t.status),
        "create_time": t.create_time,
        "update_time": t.update_time,
        "version": t.version,
        "limits": limits,
        "placement": placement,
        "identity_provider": idp,
    })
}

pub fn step_json(s: &Step) -> Value {
    json!({
        "name": s.name,
        "service": s.service,
        "state": step_state(s.state),
        "attempts": s.attempts,
        "last_error": s.last_error,
        "detail": s.detail,
    })
}

pub fn workflow_json(w: &Workflow) -> Value {
    json!({
        "workflow_id": w.workflow_id,
        "kind": w.kind,
        "tenant_id": w.tenant_id,
        "status": workflow_status(w.status),
        "error": w.error,
        "export_path": w.export_path,
        "create_time": w.create_time,
        "update_time": w.update_time,
        "steps": w.steps.iter().map(step_json).collect::<Vec<_>>(),
    })
}

/// A workflow for people: its header, then one line per step.
pub fn workflow_text(w: &Workflow) -> String {
    let mut out = super::output::fields(&[
        ("workflow", w.workflow_id.clone()),
        ("kind", w.kind.clone()),
        ("tenant", w.tenant_id.clone()),
        ("status", workflow_status(w.status).to_owned()),
        ("started", when::format(w.create_time)),
        ("updated", when::format(w.update_time)),
    ]);
    if !w.error.is_empty() {
        out.push_str(&format!("error     {}\n", clean(&w.error)));
    }
    if !w.export_path.is_empty() {
        out.push_str(&format!("export    {}\n", clean(&w.export_path)));
    }
    let mut table = super::output::Table::new(&["STEP", "STATE", "ATTEMPTS", "LAST ERROR / DETAIL"]);
    for s in &w.steps {
        let note = if s.last_error.is_empty() { &s.detail } else { &s.last_error };
        table.row(vec![step_name(s), step_state(s.state).to_owned(), s.attempts.to_string(), clean(note)]);
    }
    out.push('\n');
    out.push_str(&table.render("no steps"));
    out
}

pub fn user_json(u: &User) -> Value {
    json!({
        "user_id": u.user_id,
        "tenant_id": u.tenant_id,
        "email": u.email,
        "roles": u.roles.iter().map(|r| role(*r)).collect::<Vec<_>>(),
        "create_time": u.create_time,
        "disabled": u.disabled,
    })
}

pub fn resource_json(r: &TenantResource) -> Value {
    json!({
        "kind": r.kind,
        "name": r.name,
        "tags": r.tags,
        "create_time": r.create_time,
        "remove_time": r.remove_time,
        "bytes": r.bytes,
    })
}

pub fn cost_json(c: &TenantCost) -> Value {
    json!({
        "tenant_id": c.tenant_id,
        "tier": c.tier,
        "isolation": c.isolation,
        "from": c.from,
        "to": c.to,
        "lines": c.lines.iter().map(|l| json!({
            "item": l.item, "quantity": l.quantity, "unit_price": l.unit_price, "cost": l.cost,
        })).collect::<Vec<_>>(),
        "cost": c.cost,
        "revenue": c.revenue,
        "margin": c.margin,
        "currency": c.currency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use tenantmesh_proto::onboarding::v1::{StepState, WorkflowStatus};

    #[test]
    fn steps_name_their_service() {
        let step = Step { name: "provision_service".into(), service: "orders".into(), ..Default::default() };
        assert_eq!(step_name(&step), "provision_service (orders)");
    }

    #[test]
    fn a_failed_workflow_shows_its_error_and_each_steps() {
        let w = Workflow {
            workflow_id: "acme/onboard".into(),
            kind: "onboard".into(),
            tenant_id: "acme".into(),
            status: WorkflowStatus::Failed as i32,
            error: format!("activate_tenant: {}", "x".repeat(500)),
            steps: vec![
                Step { name: "create_tenant".into(), state: StepState::Done as i32, attempts: 1, ..Default::default() },
                Step {
                    name: "activate_tenant".into(),
                    state: StepState::Failed as i32,
                    attempts: 3,
                    last_error: "Unavailable: \x1b[2Jgone".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = workflow_text(&w);
        assert!(text.contains("status    FAILED"), "{text}");
        assert!(text.contains(&"x".repeat(500)), "the whole error, not cut: {text}");
        assert!(text.contains("activate_tenant  FAILED  3") && !text.contains('\x1b'), "{text}");
        let json = workflow_json(&w);
        assert_eq!(json["steps"][1]["state"], "FAILED");
        assert_eq!(json["status"], "FAILED");
    }
}
