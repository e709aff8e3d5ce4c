//! A durable workflow: a list of named steps, persisted after every step,
//! every step idempotent, so a crash at any point is repaired by running
//! it again from its first unfinished step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Onboard,
    ChangeTier,
    Offboard,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Onboard => "onboard",
            Kind::ChangeTier => "change_tier",
            Kind::Offboard => "offboard",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    pub attempts: u32,
    pub last_error: String,
}

/// The parameters that make two RegisterTenant calls "the same request".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub tenant_id: String,
    pub name: String,
    pub tier: String,
    pub admin_email: String,
}

/// Where a tenant's items live (mirrors the registry's Placement).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spot {
    /// "pool", "bridge" or "silo".
    pub model: String,
    pub table: String,
    /// Silo only: the tenant's data-service instance.
    pub endpoint: String,
}

impl Spot {
    pub fn dedicated(&self) -> bool {
        self.model != "pool"
    }
    pub fn silo(&self) -> bool {
        self.model == "silo"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workflow {
    /// `<tenant>/onboard`, `<tenant>/change-tier/<ms>`, `<tenant>/offboard`.
    pub id: String,
    pub kind: Kind,
    pub params: Params,
    /// Onboarding: argon2id PHC of the admin password (never the clear text).
    #[serde(default)]
    pub admin_password_hash: String,
    #[serde(default)]
    pub idempotency_key: String,
    /// The tier and placement the tenant had when the workflow started.
    pub from_tier: String,
    pub from: Spot,
    /// Where the workflow takes the tenant (onboarding and tier change).
    pub to: Spot,
    pub state: WorkflowState,
    pub steps: Vec<StepRecord>,
    /// Offboarding: the JSONL export of the tenant's items.
    #[serde(default)]
    pub export_path: String,
    pub create_time: i64,
    pub update_time: i64,
    /// Values steps hand to later steps.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
}

impl Workflow {
    pub fn new(id: String, kind: Kind, params: Params, steps: &[&str], now: i64) -> Self {
        Self {
            id,
            kind,
            params,
            admin_password_hash: String::new(),
            idempotency_key: String::new(),
            from_tier: String::new(),
            from: Spot::default(),
            to: Spot::default(),
            state: WorkflowState::Running,
            steps: steps
                .iter()
                .map(|s| StepRecord {
                    name: (*s).into(),
                    state: StepState::Pending,
                    attempts: 0,
                    last_error: String::new(),
                })
                .collect(),
            export_path: String::new(),
            create_time: now,
            update_time: now,
            outputs: BTreeMap::new(),
        }
    }

    /// The index of the first step not yet done.
    pub fn next_step(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.state != StepState::Done)
    }

    /// "<step>: <reason>" of the failed step, if any.
    pub fn error(&self) -> String {
        self.steps
            .iter()
            .find(|s| s.state == StepState::Failed)
            .map(|s| format!("{}: {}", s.name, s.last_error))
            .unwrap_or_default()
    }
}

/// The steps of onboarding a tenant into `to`.
pub fn onboard_steps(to: &Spot) -> Vec<&'static str> {
    let mut steps = vec!["create_tenant"];
    if to.silo() {
        steps.push("provision_compute");
    }
    steps.extend(["provision_storage", "create_admin_user", "apply_limits", "activate_tenant"]);
    steps
}

/// The steps of moving a tenant from `from` to `to`.
pub fn change_tier_steps(from: &Spot, to: &Spot) -> Vec<&'static str> {
    if from.model == to.model {
        return vec!["switch_placement", "apply_limits"];
    }
    let mut steps = vec!["pause_writes"];
    if to.silo() {
        steps.push("provision_compute");
    }
    steps.extend(["provision_storage", "copy_items", "switch_placement", "apply_limits", "drain", "remove_old_copy"]);
    steps
}

/// The steps of offboarding a tenant.
pub fn offboard_steps() -> Vec<&'static str> {
    vec!["suspend_tenant", "export_items", "delete_items", "delete_resources", "delete_users", "mark_deleted"]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spot(model: &str) -> Spot {
        Spot { model: model.into(), ..Default::default() }
    }

    #[test]
    fn steps_follow_the_models() {
        assert_eq!(
            onboard_steps(&spot("pool")),
            ["create_tenant", "provision_storage", "create_admin_user", "apply_limits", "activate_tenant"]
        );
        assert_eq!(onboard_steps(&spot("silo"))[1], "provision_compute");
        assert_eq!(change_tier_steps(&spot("pool"), &spot("pool")), ["switch_placement", "apply_limits"]);
        let up = change_tier_steps(&spot("pool"), &spot("bridge"));
        assert_eq!(up.first(), Some(&"pause_writes"));
        assert!(up.contains(&"copy_items") && !up.contains(&"provision_compute"));
        assert!(change_tier_steps(&spot("bridge"), &spot("silo")).contains(&"provision_compute"));
    }

    #[test]
    fn next_step_and_error() {
        let mut wf = Workflow::new("a/onboard".into(), Kind::Onboard, params(), &["one", "two"], 0);
        assert_eq!(wf.next_step(), Some(0));
        wf.steps[0].state = StepState::Done;
        wf.steps[1].state = StepState::Failed;
        wf.steps[1].last_error = "boom".into();
        assert_eq!((wf.next_step(), wf.error().as_str()), (Some(1), "two: boom"));
    }

    fn params() -> Params {
        Params { tenant_id: "a".into(), name: "A".into(), tier: "basic".into(), admin_email: "a@b.c".into() }
    }
}
