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

use async_trait::async_trait;
use tenantmesh_storage::{Condition, DynTable, Pages, StorageError, Write};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::error::OnboardingError;
use crate::faults::Faults;
use crate::workflow::{Step, StepState, Workflow, WorkflowState};

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
    /// Performs `step` of `wf` (idempotently: it may run again after a
    /// crash); it may record outputs in `wf`.
    async fn run(&self, step: Step, wf: &mut Workflow) -> Result<(), StepError>;

    /// Called once `wf` has failed for good at `step`.
    async fn failed(&self, _wf: &Workflow, _step: Step, _reason: &str) {}

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

    /// Records the new workflow `wf` and makes it its tenant's active one
    /// (`active`: the version of the active record it replaces), in one
    /// transaction after `first` (writes of the caller's). A condition that
    /// fails says which write (`first` come first).
    pub async fn start(&self, wf: &Workflow, active: Option<u64>, mut first: Vec<Write>) -> Result<(), StorageError> {
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
        self.inner.store.transact_write(first).await
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
        tokio::spawn(
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
            let span =
                tracing::info_span!("workflow.step", step = %step, workflow_id = %id, tenant.id = %wf.params.tenant_id);
            let mut attempt = 0;
            loop {
                attempt += 1;
                wf.steps[i].attempts += 1;
                let outcome = match faults.before(step) {
                    Some(fault) => Err(fault),
                    None => self.inner.runner.run(step, &mut wf).instrument(span.clone()).await,
                };
                if outcome.is_ok() && faults.halt_unsaved(kind, step) {
                    tracing::warn!(%step, workflow_id = id, "fault injection: halting before saving the step");
                    std::future::pending::<()>().await;
                }
                match record(&mut wf, i, attempt, outcome, &self.inner.policy, jitter()) {
                    Transition::Next | Transition::Succeeded => {
                        self.save(&mut wf, &mut version).await?;
                        tracing::info!(%step, workflow_id = id, kind = kind.as_str(), attempt, "workflow step done");
                        break;
                    }
                    Transition::Retry(wait) => {
                        self.save(&mut wf, &mut version).await?;
                        let reason = &wf.steps[i].last_error;
                        tracing::warn!(%step, workflow_id = id, attempt, %reason, ?wait, "step failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Transition::Failed(reason) => {
                        let undo = wf.must_roll_back();
                        if undo {
                            wf.state = WorkflowState::RollingBack;
                        }
                        // Saved first: a crash from here on resumes the rollback.
                        self.save(&mut wf, &mut version).await?;
                        tracing::warn!(%step, workflow_id = id, attempt, %reason, rolling_back = undo, "workflow FAILED");
                        self.inner.runner.failed(&wf, step, &reason).await;
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
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::workflow::{Kind, Params};

    /// Steps that do nothing but what the test scripted: each attempt of a
    /// step takes the next scripted outcome (Ok once the script runs out).
    #[derive(Default)]
    struct Scripted {
        script: std::sync::Mutex<HashMap<Step, VecDeque<Result<(), StepError>>>>,
        ran: std::sync::Mutex<Vec<Step>>,
        failed: std::sync::Mutex<Vec<(Step, String)>>,
        /// How long each attempt takes.
        delay: Duration,
        /// Outcomes of rollback attempts (Ok once it runs out); attempts made.
        rollbacks: std::sync::Mutex<VecDeque<Result<(), StepError>>>,
        rolled_back: std::sync::Mutex<u32>,
    }

    impl Scripted {
        fn with(script: &[(Step, Vec<Result<(), StepError>>)]) -> Self {
            let s = Scripted::default();
            for (step, outcomes) in script {
                s.script.lock().unwrap().insert(*step, outcomes.iter().cloned().collect());
            }
            s
        }
        fn ran(&self) -> Vec<Step> {
            self.ran.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl StepRunner for Scripted {
        async fn run(&self, step: Step, _wf: &mut Workflow) -> Result<(), StepError> {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.ran.lock().unwrap().push(step);
            self.script.lock().unwrap().get_mut(&step).and_then(VecDeque::pop_front).unwrap_or(Ok(()))
        }
        async fn failed(&self, _wf: &Workflow, step: Step, reason: &str) {
            self.failed.lock().unwrap().push((step, reason.to_owned()));
        }
        async fn roll_back(&self, _wf: &mut Workflow) -> Result<(), StepError> {
            *self.rolled_back.lock().unwrap() += 1;
            self.rollbacks.lock().unwrap().pop_front().unwrap_or(Ok(()))
        }
    }

    const STEPS: [Step; 3] = [Step::CreateTenant, Step::ProvisionStorage, Step::ActivateTenant];
    const FAST: RetryPolicy = RetryPolicy { attempts: 3, backoff: Duration::from_millis(1) };

    fn temp_store() -> (tempfile::TempDir, DynTable) {
        let dir = tempfile::tempdir().unwrap();
        let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("onboarding.redb")).unwrap();
        (dir, table)
    }

    fn workflow(steps: &[Step]) -> Workflow {
        let params =
            Params { tenant_id: "acme".into(), name: "Acme".into(), tier: "basic".into(), admin_email: String::new() };
        Workflow::new("acme/onboard".into(), Kind::Onboard, params, steps, 0)
    }

    async fn engine_with(store: &DynTable, runner: Arc<Scripted>, policy: RetryPolicy) -> Engine {
        Engine::new(store.clone(), runner, policy, Faults::default())
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let p = RetryPolicy { attempts: 5, backoff: Duration::from_millis(200) };
        assert_eq!(p.ceiling(1), Duration::from_millis(200));
        assert_eq!(p.ceiling(3), Duration::from_millis(800));
        assert_eq!(p.ceiling(30), Duration::from_secs(30));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(400));
        assert_eq!(p.backoff(3, 0.0), Duration::from_millis(1), "never zero");
        assert_eq!(p.backoff(1, 7.0), Duration::from_millis(200), "jitter is clamped to the ceiling");
    }

    #[test]
    fn transitions() {
        let mut wf = workflow(&STEPS);
        let t = record(&mut wf, 0, 1, Err(StepError::transient("flaky")), &FAST, 0.5);
        assert!(matches!(t, Transition::Retry(_)));
        assert_eq!((wf.steps[0].state, wf.steps[0].last_error.as_str()), (StepState::Pending, "flaky"));
        assert_eq!(record(&mut wf, 0, 2, Ok(()), &FAST, 0.5), Transition::Next);
        assert!(wf.steps[0].last_error.is_empty());
        // The last attempt, and a permanent error at once, fail the workflow.
        let t = record(&mut wf, 1, 3, Err(StepError::transient("still down")), &FAST, 0.5);
        assert_eq!(t, Transition::Failed("still down".into()));
        assert_eq!((wf.state, wf.error().as_str()), (WorkflowState::Failed, "provision_storage: still down"));
        assert_eq!(retry(&mut wf), Ok(()));
        assert_eq!((wf.state, wf.steps[1].state), (WorkflowState::Running, StepState::Pending));
        assert_eq!(retry(&mut wf), Err(WorkflowState::Running), "only a FAILED workflow is retried");
        let t = record(&mut wf, 1, 1, Err(StepError::permanent("no such tier")), &FAST, 0.5);
        assert_eq!(t, Transition::Failed("no such tier".into()));
        retry(&mut wf).unwrap();
        assert_eq!(record(&mut wf, 1, 1, Ok(()), &FAST, 0.5), Transition::Next);
        assert_eq!(record(&mut wf, 2, 1, Ok(()), &FAST, 0.5), Transition::Succeeded);
        assert_eq!(wf.state, WorkflowState::Succeeded);
    }

    /// A step that fails twice is retried (with backoff) and the workflow
    /// succeeds; every attempt is counted, the tenant is released.
    #[tokio::test]
    async fn a_failing_step_is_retried_until_it_succeeds() {
        let (_dir, store) = temp_store();
        let flaky = vec![Err(StepError::transient("down")), Err(StepError::transient("down"))];
        let runner = Arc::new(Scripted::with(&[(Step::ProvisionStorage, flaky)]));
        let engine = engine_with(&store, runner.clone(), FAST).await;
        engine.start(&workflow(&STEPS), None, Vec::new()).await.unwrap();
        let wf = engine.run("acme/onboard").await.unwrap();
        assert_eq!(wf.state, WorkflowState::Succeeded);
        assert_eq!(wf.steps.iter().map(|s| s.attempts).collect::<Vec<_>>(), [1, 3, 1]);
        assert_eq!(engine.load("acme/onboard").await.unwrap().unwrap().0.state, WorkflowState::Succeeded);
        assert!(engine.active("acme").await.unwrap().is_none(), "a finished workflow releases the tenant");
        assert_eq!(runner.ran().len(), 5);
    }

    /// A step that keeps failing ends the workflow FAILED with the step and
    /// the reason, after the allowed attempts (a permanent error at once);
    /// later steps never run, and the runner hears of it once.
    #[tokio::test]
    async fn a_step_that_keeps_failing_fails_the_workflow_with_the_reason() {
        let (_dir, store) = temp_store();
        let down = vec![Err(StepError::transient("storage unavailable")); 10];
        let runner = Arc::new(Scripted::with(&[(Step::ProvisionStorage, down)]));
        let engine = engine_with(&store, runner.clone(), FAST).await;
        engine.start(&workflow(&STEPS), None, Vec::new()).await.unwrap();
        let wf = engine.run("acme/onboard").await.unwrap();
        assert_eq!((wf.state, wf.error().as_str()), (WorkflowState::Failed, "provision_storage: storage unavailable"));
        assert_eq!(wf.steps[1].attempts, FAST.attempts);
        assert_eq!(wf.steps[2].state, StepState::Pending);
        assert!(!runner.ran().contains(&Step::ActivateTenant));
        assert_eq!(*runner.failed.lock().unwrap(), [(Step::ProvisionStorage, "storage unavailable".to_owned())]);
        assert_eq!(engine.load("acme/onboard").await.unwrap().unwrap().0.error(), wf.error());

        let (_dir, store) = temp_store();
        let runner = Arc::new(Scripted::with(&[(Step::CreateTenant, vec![Err(StepError::permanent("taken"))])]));
        let engine = engine_with(&store, runner.clone(), FAST).await;
        engine.start(&workflow(&STEPS), None, Vec::new()).await.unwrap();
        let wf = engine.run("acme/onboard").await.unwrap();
        assert_eq!((wf.state, wf.steps[0].attempts), (WorkflowState::Failed, 1));
    }

    fn tier_change() -> Workflow {
        use crate::workflow::change_tier_steps;
        let params = Params {
            tenant_id: "acme".into(),
            name: "Acme".into(),
            tier: "premium".into(),
            admin_email: String::new(),
        };
        let from = crate::workflow::Spot::default();
        let to =
            crate::workflow::Spot { model: tenantmesh_proto::registry::v1::IsolationModel::Bridge, ..from.clone() };
        Workflow::new("acme/change-tier/1".into(), Kind::ChangeTier, params, &change_tier_steps(&from, &to), 0)
    }

    /// A tier change that fails for good before its switch is rolled back
    /// (retrying the rollback until it is done): ROLLED_BACK with the failed
    /// step's reason, the tenant released, and no retry of it. One that fails
    /// after the switch is FAILED, to be retried, and nothing is undone.
    #[tokio::test]
    async fn a_tier_change_that_fails_before_its_switch_is_rolled_back() {
        let (_dir, store) = temp_store();
        let runner = Arc::new(Scripted::with(&[(Step::CopyItems, vec![Err(StepError::permanent("too large"))])]));
        *runner.rollbacks.lock().unwrap() = [Err(StepError::transient("registry down"))].into();
        let engine = engine_with(&store, runner.clone(), FAST).await;
        engine.start(&tier_change(), None, Vec::new()).await.unwrap();
        let wf = engine.run("acme/change-tier/1").await.unwrap();
        assert_eq!((wf.state, wf.error().as_str()), (WorkflowState::RolledBack, "copy_items: too large"));
        assert_eq!(*runner.rolled_back.lock().unwrap(), 2, "the failed rollback attempt was retried");
        assert!(!runner.ran().contains(&Step::SwitchPlacement));
        assert!(engine.active("acme").await.unwrap().is_none(), "a rolled-back workflow releases the tenant");
        let (mut stored, _) = engine.load("acme/change-tier/1").await.unwrap().unwrap();
        assert_eq!(stored.state, WorkflowState::RolledBack);
        assert_eq!(retry(&mut stored), Err(WorkflowState::RolledBack), "a rolled-back change is not retried");

        // Past the switch: FAILED, no rollback.
        let (_dir, store) = temp_store();
        let runner = Arc::new(Scripted::with(&[(Step::RemoveOldCopy, vec![Err(StepError::permanent("denied"))])]));
        let engine = engine_with(&store, runner.clone(), FAST).await;
        engine.start(&tier_change(), None, Vec::new()).await.unwrap();
        let wf = engine.run("acme/change-tier/1").await.unwrap();
        assert_eq!(wf.state, WorkflowState::Failed);
        assert_eq!(*runner.rolled_back.lock().unwrap(), 0);
        assert!(engine.active("acme").await.unwrap().is_some(), "a FAILED workflow keeps the tenant");
    }

    /// A crash during a rollback: the restarted engine finishes it.
    #[tokio::test]
    async fn a_rollback_interrupted_by_a_crash_is_resumed() {
        let (_dir, store) = temp_store();
        let mut wf = tier_change();
        wf.steps[0].state = StepState::Done;
        wf.steps[1].state = StepState::Failed;
        wf.steps[1].last_error = "boom".into();
        wf.state = WorkflowState::RollingBack;
        let first = Engine::new(store.clone(), Arc::new(Scripted::default()), FAST, Faults::default());
        first.start(&wf, None, Vec::new()).await.unwrap();
        drop(first);
        let runner = Arc::new(Scripted::default());
        let engine = engine_with(&store, runner.clone(), FAST).await;
        assert_eq!(engine.resume_unfinished().await.unwrap(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.load(&wf.id).await.unwrap().unwrap().0.state != WorkflowState::RolledBack {
            assert!(tokio::time::Instant::now() < deadline, "rollback not resumed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*runner.rolled_back.lock().unwrap(), 1);
        assert!(runner.ran().is_empty(), "no step runs again");
        assert!(engine.active("acme").await.unwrap().is_none());
    }

    /// After a crash, a new engine on the same store resumes every RUNNING
    /// workflow from its first unfinished step; finished ones stay as they are.
    #[tokio::test]
    async fn a_restarted_engine_resumes_from_the_first_unfinished_step() {
        let (_dir, store) = temp_store();
        let mut wf = workflow(&STEPS);
        wf.steps[0].state = StepState::Done;
        wf.steps[0].attempts = 1;
        let first = Engine::new(store.clone(), Arc::new(Scripted::default()), FAST, Faults::default());
        first.start(&wf, None, Vec::new()).await.unwrap();
        let mut done = workflow(&STEPS);
        done.id = "globex/onboard".into();
        done.params.tenant_id = "globex".into();
        done.state = WorkflowState::Failed;
        first.start(&done, None, Vec::new()).await.unwrap();
        drop(first);

        let runner = Arc::new(Scripted::default());
        let engine = engine_with(&store, runner.clone(), FAST).await;
        assert_eq!(engine.resume_unfinished().await.unwrap(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.load("acme/onboard").await.unwrap().unwrap().0.state == WorkflowState::Running {
            assert!(tokio::time::Instant::now() < deadline, "not resumed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(runner.ran(), [Step::ProvisionStorage, Step::ActivateTenant]);
        assert_eq!(engine.load("globex/onboard").await.unwrap().unwrap().0.state, WorkflowState::Failed);
    }

    /// Two runners (two processes) racing on one workflow: the one whose
    /// save comes second is Superseded and stops; the workflow ends
    /// SUCCEEDED once, with no step failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_runners_racing_on_one_workflow_finish_it_once() {
        let (_dir, store) = temp_store();
        let slow = || Arc::new(Scripted { delay: Duration::from_millis(20), ..Scripted::default() });
        let (a, b) = (slow(), slow());
        let one = engine_with(&store, a.clone(), FAST).await;
        let two = engine_with(&store, b.clone(), FAST).await;
        one.start(&workflow(&STEPS), None, Vec::new()).await.unwrap();
        let (r1, r2) = tokio::join!(one.run("acme/onboard"), two.run("acme/onboard"));
        let outcomes = [&r1, &r2];
        assert!(
            outcomes.iter().any(|r| matches!(r, Err(OnboardingError::Superseded(_)))),
            "one runner must be superseded: {r1:?} {r2:?}"
        );
        assert!(outcomes.iter().any(|r| matches!(r, Ok(wf) if wf.state == WorkflowState::Succeeded)), "{r1:?} {r2:?}");
        let (stored, _) = one.load("acme/onboard").await.unwrap().unwrap();
        assert_eq!(stored.state, WorkflowState::Succeeded);
        assert!(stored.steps.iter().all(|s| s.state == StepState::Done));
        // Every step ran at least once; a step both ran is why steps are idempotent.
        let mut ran = a.ran();
        ran.extend(b.ran());
        assert!(STEPS.iter().all(|s| ran.contains(s)), "{ran:?}");
    }
}
