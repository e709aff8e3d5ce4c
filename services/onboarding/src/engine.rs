//! The workflow engine: runs a workflow's steps in order, persists the
//! workflow after every step, retries a failing step with exponential
//! backoff and full jitter, gives up with the reason after the last
//! attempt, and resumes unfinished workflows after a restart. It knows
//! nothing of what the steps do (a [`StepRunner`] does) or of the gRPC API.
//!
//! The transitions are pure ([`record`], [`retry`]): a workflow and the
//! outcome of a step attempt in, what happens next out. The loop around
//! them ([`Engine::run`]) only loads, runs, records and saves. A save is
//! conditional on the version it loaded, so of two runners racing on one
//! workflow (two processes after a restart, say) the second to save is
//! `Superseded` and stops; steps being idempotent, the other finishes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tenantmesh_proto::audit::v1::AuditEvent;
use tenantmesh_service::audit::{AppendError, AuditLog};

use async_trait::async_trait;
use tenantmesh_storage::{Condition, DynTable, Pages, StorageError, Write};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::error::OnboardingError;
use crate::faults::Faults;
use crate::workflow::{StepState, Workflow, WorkflowState};

/// Partition of the workflow records (sort key: workflow id).
pub const WORKFLOWS_PK: &str = "_workflows";
/// The workflow a tenant is in (sort key: tenant id; data: workflow id).
pub const ACTIVE_PK: &str = "_active";
/// The longest a retry backoff grows to.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub use crate::workflow::StepError;

/// How a failing step is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of a step (in one run) before the workflow is FAILED.
    pub attempts: u32,
    /// The first retry's backoff ceiling; it doubles per attempt.
    pub backoff: Duration,
}

impl RetryPolicy {
    /// The ceiling of the wait before retry `attempt` (1-based):
    /// `backoff * 2^(attempt-1)`, at most 30 s.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(MAX_BACKOFF)
    }

    /// Full jitter: `random` (in 0..1) of the ceiling, at least 1 ms.
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        self.ceiling(attempt).mul_f64(random.clamp(0.0, 1.0)).max(Duration::from_millis(1))
    }
}

/// What follows an attempt of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The step is done: save, then run the next one.
    Next,
    /// Every step is done: save (which releases the tenant), and stop.
    Succeeded,
    /// The attempt failed and is retried after this wait: save the error first.
    Retry(Duration),
    /// The step failed for good: save the FAILED workflow, with this reason.
    Failed(String),
}

/// Records the outcome of `attempt` (1-based, within this run) of step `i`
/// of `wf`, and says what follows. `random` (0..1) draws the jitter.
pub fn record(
    wf: &mut Workflow,
    i: usize,
    attempt: u32,
    outcome: Result<(), StepError>,
    policy: &RetryPolicy,
    random: f64,
) -> Transition {
    let step = &mut wf.steps[i];
    match outcome {
        Ok(()) => {
            step.state = StepState::Done;
            step.last_error.clear();
            if wf.next_step().is_none() {
                wf.state = WorkflowState::Succeeded;
                Transition::Succeeded
            } else {
                Transition::Next
            }
        }
        Err(e) if e.retryable && attempt < policy.attempts => {
            step.last_error = e.reason;
            Transition::Retry(policy.backoff(attempt, random))
        }
        Err(e) => {
            step.state = StepState::Failed;
            step.last_error = e.reason.clone();
            wf.state = WorkflowState::Failed;
            Transition::Failed(e.reason)
        }
    }
}

/// Makes a FAILED workflow run again from its failed step; the state it is
/// in, if it is not FAILED.
pub fn retry(wf: &mut Workflow) -> Result<(), WorkflowState> {
    if wf.state != WorkflowState::Failed {
        return Err(wf.state);
    }
    for s in &mut wf.steps {
        if s.state == StepState::Failed {
            s.state = StepState::Pending;
        }
    }
    wf.state = WorkflowState::Running;
    Ok(())
}

/// Does the steps.
#[async_trait]
pub trait StepRunner: Send + Sync + 'static {
    /// Performs step `at` of `wf` (idempotently: it may run again after a
    /// crash); it may record outputs in `wf`.
    async fn run(&self, at: usize, wf: &mut Workflow) -> Result<(), StepError>;

    /// Called once `wf` has failed for good at step `at`.
    async fn failed(&self, _wf: &Workflow, _at: usize, _reason: &str) {}

    /// Undoes what `wf` did (see [`Workflow::must_roll_back`]),
    /// idempotently: it may run again after a crash, or after an attempt
    /// that failed half-way.
    async fn roll_back(&self, _wf: &mut Workflow) -> Result<(), StepError> {
        Ok(())
    }
}

/// A random number in 0..1 for the backoff's jitter.
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

use tenantmesh_service::clock::now_secs;

/// The engine (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: DynTable,
    runner: Arc<dyn StepRunner>,
    policy: RetryPolicy,
    faults: Faults,
    /// One run of a workflow at a time in this process.
    running: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Engine {
    pub fn new(store: DynTable, runner: Arc<dyn StepRunner>, policy: RetryPolicy, faults: Faults) -> Self {
        Self { inner: Arc::new(Inner { store, runner, policy, faults, running: Mutex::new(HashMap::new()) }) }
    }

    /// A stored workflow and its record's version.
    pub async fn load(&self, id: &str) -> Result<Option<(Workflow, u64)>, OnboardingError> {
        match self.inner.store.get(WORKFLOWS_PK, id).await? {
            Some(item) => {
                let wf = serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?;
                Ok(Some((wf, item.version)))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn encode(wf: &Workflow) -> Result<Vec<u8>, OnboardingError> {
        serde_json::to_vec(wf).map_err(|e| OnboardingError::Internal(e.to_string()))
    }

    /// Saves `wf` at `version`; another runner's save in between is
    /// `Superseded`. A workflow that succeeded or was rolled back releases
    /// the tenant in the same transaction.
    pub async fn save(&self, wf: &mut Workflow, version: &mut u64) -> Result<(), OnboardingError> {
        wf.update_time = now_secs();
        let data = Self::encode(wf)?;
        if matches!(wf.state, WorkflowState::Succeeded | WorkflowState::RolledBack) {
            let writes = vec![
                Write::Put {
                    pk: WORKFLOWS_PK.into(),
                    sk: wf.id.clone(),
                    data,
                    condition: Condition::Version(*version),
                },
                Write::Delete { pk: ACTIVE_PK.into(), sk: wf.params.tenant_id.clone(), condition: Condition::None },
            ];
            return match self.inner.store.transact_write(writes).await {
                Ok(()) => {
                    *version += 1;
                    Ok(())
                }
                Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Superseded(wf.id.clone())),
                Err(e) => Err(e.into()),
            };
        }
        match self.inner.store.put(WORKFLOWS_PK, &wf.id, data, Condition::Version(*version)).await {
            Ok(item) => {
                *version = item.version;
                Ok(())
            }
            Err(StorageError::ConditionFailed { .. }) => Err(OnboardingError::Superseded(wf.id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Engine::save`] of a RUNNING (retried) workflow, with `event` (who
    /// retried it) in the same transaction.
    pub async fn save_audited(
        &self,
        wf: &mut Workflow,
        version: &mut u64,
        log: &AuditLog,
        event: AuditEvent,
    ) -> Result<(), OnboardingError> {
        wf.update_time = now_secs();
        let data = Self::encode(wf)?;
        let write =
            Write::Put { pk: WORKFLOWS_PK.into(), sk: wf.id.clone(), data, condition: Condition::Version(*version) };
        match log.commit(vec![write], event).await {
            Ok(_) => {
                *version += 1;
                Ok(())
            }
            Err(AppendError::Change { .. }) => Err(OnboardingError::Superseded(wf.id.clone())),
            Err(AppendError::Store(e)) => Err(e.into()),
        }
    }

    /// Records the new workflow `wf` and makes it its tenant's active one
    /// (`active`: the version of the active record it replaces), in one
    /// transaction after `first` (writes of the caller's). A condition that
    /// fails says which write (`first` come first).
    /// With `audit`, the writes and the audit event are one transaction.
    pub async fn start(
        &self,
        wf: &Workflow,
        active: Option<u64>,
        mut first: Vec<Write>,
        audit: Option<(&AuditLog, AuditEvent)>,
    ) -> Result<(), StorageError> {
        let data = Self::encode(wf).map_err(|e| StorageError::Invalid(e.to_string()))?;
        first.extend([
            Write::Put {
                pk: ACTIVE_PK.into(),
                sk: wf.params.tenant_id.clone(),
                data: wf.id.clone().into_bytes(),
                condition: active.map_or(Condition::NotExists, Condition::Version),
            },
            Write::Put { pk: WORKFLOWS_PK.into(), sk: wf.id.clone(), data, condition: Condition::NotExists },
        ]);
        match audit {
            None => self.inner.store.transact_write(first).await,
            Some((log, event)) => log.commit(first, event).await.map(drop).map_err(|e| match e {
                AppendError::Change { source, .. } | AppendError::Store(source) => source,
            }),
        }
    }

    /// The workflow the tenant is in, with the active record's version.
    pub async fn active(&self, tenant_id: &str) -> Result<Option<(Workflow, u64)>, OnboardingError> {
        let Some(item) = self.inner.store.get(ACTIVE_PK, tenant_id).await? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&item.data).into_owned();
        Ok(self.load(&id).await?.map(|(wf, _)| (wf, item.version)))
    }

    /// Starts running workflow `id` in the background.
    pub fn spawn(&self, id: String) {
        let this = self.clone();
        let tenant = id.split('/').next().unwrap_or_default().to_owned();
        let span = tracing::info_span!("workflow", workflow_id = %id, tenant.id = %tenant);
        tenantmesh_telemetry::spawn(
            async move {
                match this.run(&id).await {
                    Ok(_) | Err(OnboardingError::Superseded(_)) => {}
                    Err(e) => tracing::error!(workflow_id = %id, error = %e, "workflow run stopped"),
                }
            }
            .instrument(span),
        );
    }

    /// Runs workflow `id` from its first unfinished step to the end (or to
    /// a step that keeps failing).
    pub async fn run(&self, id: &str) -> Result<Workflow, OnboardingError> {
        let lock = self.inner.running.lock().await.entry(id.to_owned()).or_default().clone();
        let result = {
            let _guard = lock.lock().await;
            self.run_locked(id).await
        };
        let mut running = self.inner.running.lock().await;
        // The map's handle and ours: nobody else is waiting, forget the lock.
        if Arc::strong_count(&lock) == 2 {
            running.remove(id);
        }
        result
    }

    async fn run_locked(&self, id: &str) -> Result<Workflow, OnboardingError> {
        let (mut wf, mut version) = self.load(id).await?.ok_or_else(|| OnboardingError::NotFound(id.into()))?;
        if wf.state == WorkflowState::RollingBack {
            return self.roll_back(wf, version).await;
        }
        if wf.state != WorkflowState::Running {
            return Ok(wf);
        }
        let (kind, faults) = (wf.kind, &self.inner.faults);
        while let Some(i) = wf.next_step() {
            let step = wf.steps[i].name;
            let label = wf.steps[i].label();
            let span = tracing::info_span!("workflow.step", step = %label, workflow_id = %id, tenant.id = %wf.params.tenant_id);
            let mut attempt = 0;
            loop {
                attempt += 1;
                wf.steps[i].attempts += 1;
                let outcome = match faults.before(step) {
                    Some(fault) => Err(fault),
                    None => self.inner.runner.run(i, &mut wf).instrument(span.clone()).await,
                };
                if outcome.is_ok() && faults.halt_unsaved(kind, step) {
                    tracing::warn!(%step, workflow_id = id, "fault injection: halting before saving the step");
                    std::future::pending::<()>().await;
                }
                match record(&mut wf, i, attempt, outcome, &self.inner.policy, jitter()) {
                    Transition::Next | Transition::Succeeded => {
                        self.save(&mut wf, &mut version).await?;
                        tracing::info!(step = %label, workflow_id = id, kind = kind.as_str(), attempt, "workflow step done");
                        break;
                    }
                    Transition::Retry(wait) => {
                        self.save(&mut wf, &mut version).await?;
                        let reason = &wf.steps[i].last_error;
                        tracing::warn!(step = %label, workflow_id = id, attempt, %reason, ?wait, "step failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Transition::Failed(reason) => {
                        let undo = wf.must_roll_back();
                        if undo {
                            wf.state = WorkflowState::RollingBack;
                        }
                        // Saved first: a crash from here on resumes the rollback.
                        self.save(&mut wf, &mut version).await?;
                        tracing::warn!(step = %label, workflow_id = id, attempt, %reason, rolling_back = undo, "workflow FAILED");
                        self.inner.runner.failed(&wf, i, &reason).await;
                        if undo {
                            return self.roll_back(wf, version).await;
                        }
                        return Ok(wf);
                    }
                }
            }
            if faults.halt_after(kind, step) {
                tracing::warn!(%step, workflow_id = id, "fault injection: halting after this step");
                std::future::pending::<()>().await;
            }
        }
        tracing::info!(workflow_id = id, kind = kind.as_str(), "workflow succeeded");
        Ok(wf)
    }

    /// Undoes `wf` (ROLLING_BACK), retrying with backoff until it is done:
    /// a rollback needs only the services a step needed, and stopping it
    /// half-way would leave the tenant stuck; then ROLLED_BACK, which
    /// releases the tenant.
    async fn roll_back(&self, mut wf: Workflow, mut version: u64) -> Result<Workflow, OnboardingError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.inner.runner.roll_back(&mut wf).await {
                Ok(()) => break,
                Err(e) => {
                    // Even an error that looks permanent: giving up would
                    // leave the tenant stuck; the log says so loudly.
                    let wait = self.inner.policy.backoff(attempt, jitter());
                    let (id, reason) = (&wf.id, &e.reason);
                    tracing::error!(workflow_id = %id, attempt, %reason, retryable = e.retryable, ?wait, "rollback failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        wf.state = WorkflowState::RolledBack;
        self.save(&mut wf, &mut version).await?;
        tracing::warn!(workflow_id = %wf.id, error = %wf.error(), "workflow rolled back: the tenant is as it was before");
        Ok(wf)
    }

    /// Every workflow of `tenant_id` (ids are `<tenant>/...`), in id order.
    pub async fn of_tenant(&self, tenant_id: &str) -> Result<Vec<Workflow>, OnboardingError> {
        let mut all = Vec::new();
        let mut pages = Pages::new(self.inner.store.as_ref(), WORKFLOWS_PK, format!("{tenant_id}/"), 100);
        while let Some(items) = pages.next().await? {
            for item in &items {
                all.push(serde_json::from_slice(&item.data).map_err(|e| OnboardingError::Corrupt(e.to_string()))?);
            }
        }
        Ok(all)
    }

    /// Resumes every workflow left RUNNING or ROLLING_BACK (by a crash or a
    /// shutdown); how many.
    pub async fn resume_unfinished(&self) -> Result<usize, OnboardingError> {
        let mut pending = Vec::new();
        let mut pages = Pages::new(self.inner.store.as_ref(), WORKFLOWS_PK, "", 100);
        while let Some(items) = pages.next().await? {
            for item in &items {
                // One unreadable record (e.g. from an older release) must not stop the others resuming.
                match serde_json::from_slice::<Workflow>(&item.data) {
                    Ok(wf) if matches!(wf.state, WorkflowState::Running | WorkflowState::RollingBack) => {
                        pending.push(wf.id);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(key = %item.sk, error = %e, "unreadable workflow record; not resumed"),
                }
            }
        }
        let n = pending.len();
        for id in pending {
            tracing::info!(workflow_id = %id, "resuming an unfinished workflow");
            self.spawn(id);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
