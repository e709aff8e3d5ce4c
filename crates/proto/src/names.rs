//! The contracts' enums as operators read them: the value's name without
//! its enum's prefix (`WORKFLOW_STATUS_ROLLED_BACK` is `ROLLED_BACK`), and
//! the isolation models and roles in lower case as the tiers file and the
//! CLI's flags write them. A value this build does not know reads
//! `UNKNOWN`.

use crate::audit::v1::{AuditEvent, Outcome};
use crate::auth::v1::Role;
use crate::onboarding::v1::{StepState, WorkflowStatus};
use crate::registry::v1::{IsolationModel, TenantLimits, TenantStatus};

fn short(name: &'static str, prefix: &str) -> &'static str {
    name.strip_prefix(prefix).unwrap_or(name)
}

pub fn workflow_status(v: i32) -> &'static str {
    WorkflowStatus::try_from(v).map_or("UNKNOWN", |s| short(s.as_str_name(), "WORKFLOW_STATUS_"))
}

pub fn step_state(v: i32) -> &'static str {
    StepState::try_from(v).map_or("UNKNOWN", |s| short(s.as_str_name(), "STEP_STATE_"))
}

pub fn tenant_status(v: i32) -> &'static str {
    TenantStatus::try_from(v).map_or("UNKNOWN", |s| short(s.as_str_name(), "TENANT_STATUS_"))
}

/// `pool`, `bridge` or `silo` (`-` when unset).
pub fn model(v: i32) -> &'static str {
    match IsolationModel::try_from(v) {
        Ok(IsolationModel::Pool) => "pool",
        Ok(IsolationModel::Bridge) => "bridge",
        Ok(IsolationModel::Silo) => "silo",
        Ok(IsolationModel::Unspecified) => "-",
        Err(_) => "unknown",
    }
}

/// `platform-admin`, `admin`, `user` or `service`.
pub fn role(v: i32) -> &'static str {
    match Role::try_from(v) {
        Ok(Role::PlatformAdmin) => "platform-admin",
        Ok(Role::TenantAdmin) => "admin",
        Ok(Role::TenantUser) => "user",
        Ok(Role::Service) => "service",
        Ok(Role::Unspecified) => "-",
        Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short() {
        assert_eq!(workflow_status(WorkflowStatus::RolledBack as i32), "ROLLED_BACK");
        assert_eq!(workflow_status(99), "UNKNOWN");
        assert_eq!(step_state(StepState::Done as i32), "DONE");
        assert_eq!(tenant_status(TenantStatus::Migrating as i32), "MIGRATING");
        assert_eq!(model(IsolationModel::Bridge as i32), "bridge");
        assert_eq!(role(Role::TenantAdmin as i32), "admin");
    }
}

/// An audit event's outcome: `ok`, `denied` or `failed`.
pub fn outcome(v: i32) -> &'static str {
    match Outcome::try_from(v) {
        Ok(Outcome::Succeeded) => "ok",
        Ok(Outcome::Denied) => "denied",
        Ok(Outcome::Failed) => "failed",
        Ok(Outcome::Unspecified) => "-",
        Err(_) => "unknown",
    }
}

/// What an audit event says happened: `before -> after` for a change, the
/// error for a refused or failed attempt.
pub fn audit_change(e: &AuditEvent) -> String {
    if !e.error.is_empty() {
        return e.error.clone();
    }
    match (e.before.is_empty(), e.after.is_empty()) {
        (true, true) => String::new(),
        (true, false) => e.after.clone(),
        (false, true) => format!("{} -> (removed)", e.before),
        (false, false) => format!("{} -> {}", e.before, e.after),
    }
}

/// A tenant's limits as operators read them.
pub fn limits(l: &TenantLimits) -> String {
    format!(
        "{} requests/s, burst {}, {} in flight, {} bytes stored",
        l.requests_per_second, l.burst, l.max_concurrency, l.storage_quota_bytes
    )
}

/// A usage alert as operators read it: "warn-50: write_units at 50%".
pub fn usage_alert(a: &crate::registry::v1::UsageAlert) -> String {
    use crate::registry::v1::usage_alert::Threshold;
    match a.threshold {
        Some(Threshold::Percent(p)) => format!("{}: {} at {p}%", a.alert_id, a.meter),
        Some(Threshold::Absolute(n)) => format!("{}: {} at {n}", a.alert_id, a.meter),
        None => format!("{}: {}", a.alert_id, a.meter),
    }
}
