//! Unit tests of [`super`].

use std::collections::VecDeque;

use super::*;
use crate::workflow::{Kind, Params, Step};

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
    async fn run(&self, at: usize, wf: &mut Workflow) -> Result<(), StepError> {
        let step = wf.steps[at].name;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.ran.lock().unwrap().push(step);
        self.script.lock().unwrap().get_mut(&step).and_then(VecDeque::pop_front).unwrap_or(Ok(()))
    }
    async fn failed(&self, wf: &Workflow, at: usize, reason: &str) {
        self.failed.lock().unwrap().push((wf.steps[at].name, reason.to_owned()));
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
    let steps: Vec<_> = steps.iter().map(|s| crate::workflow::Planned::from(*s)).collect();
    Workflow::new("acme/onboard".into(), Kind::Onboard, params, &steps, 0)
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
    engine.start(&workflow(&STEPS), None, Vec::new(), None).await.unwrap();
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
    engine.start(&workflow(&STEPS), None, Vec::new(), None).await.unwrap();
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
    engine.start(&workflow(&STEPS), None, Vec::new(), None).await.unwrap();
    let wf = engine.run("acme/onboard").await.unwrap();
    assert_eq!((wf.state, wf.steps[0].attempts), (WorkflowState::Failed, 1));
}

fn tier_change() -> Workflow {
    use crate::workflow::change_tier_steps;
    let params =
        Params { tenant_id: "acme".into(), name: "Acme".into(), tier: "premium".into(), admin_email: String::new() };
    let from = crate::workflow::Spot::default();
    let to = crate::workflow::Spot { model: tenantmesh_proto::registry::v1::IsolationModel::Bridge, ..from.clone() };
    Workflow::new("acme/change-tier/1".into(), Kind::ChangeTier, params, &change_tier_steps(&from, &to, &[]), 0)
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
    engine.start(&tier_change(), None, Vec::new(), None).await.unwrap();
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
    engine.start(&tier_change(), None, Vec::new(), None).await.unwrap();
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
    first.start(&wf, None, Vec::new(), None).await.unwrap();
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
    first.start(&wf, None, Vec::new(), None).await.unwrap();
    let mut done = workflow(&STEPS);
    done.id = "globex/onboard".into();
    done.params.tenant_id = "globex".into();
    done.state = WorkflowState::Failed;
    first.start(&done, None, Vec::new(), None).await.unwrap();
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
    one.start(&workflow(&STEPS), None, Vec::new(), None).await.unwrap();
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
