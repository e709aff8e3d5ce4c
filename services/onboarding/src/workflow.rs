//! The onboarding workflow: persisted after every step, every step
//! idempotent, so a crash at any point is repaired by running it again.

use serde::{Deserialize, Serialize};

/// The steps, in order.
pub const STEPS: [&str; 3] = ["create_tenant", "create_admin_user", "activate_tenant"];

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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workflow {
    pub params: Params,
    /// argon2id PHC of the admin password: the clear text is never stored.
    pub admin_password_hash: String,
    pub idempotency_key: String,
    pub state: WorkflowState,
    pub steps: Vec<StepRecord>,
    pub create_time: i64,
    pub update_time: i64,
}

impl Workflow {
    pub fn new(params: Params, admin_password_hash: String, idempotency_key: String, now: i64) -> Self {
        Self {
            params,
            admin_password_hash,
            idempotency_key,
            state: WorkflowState::Running,
            steps: STEPS
                .iter()
                .map(|s| StepRecord {
                    name: (*s).into(),
                    state: StepState::Pending,
                    attempts: 0,
                    last_error: String::new(),
                })
                .collect(),
            create_time: now,
            update_time: now,
        }
    }

    /// The index of the first step not yet done.
    pub fn next_step(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.state != StepState::Done)
    }
}
