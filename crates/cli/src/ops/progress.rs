//! Following a workflow as it runs: its steps redrawn in place on a
//! terminal (state, attempt, elapsed, last error), one plain line per
//! change elsewhere, one JSON object per change with `-o json`. Fed by
//! GetWorkflow, asked a few times a second.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use tenantmesh_proto::onboarding::v1::{GetWorkflowRequest, StepState, Workflow, WorkflowStatus};

use super::client::{CliError, Ops, Service};
use super::output::clean;
use super::views::{step_json, step_name, workflow_json, workflow_status};
use super::when::elapsed;

/// How the progress shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A terminal: the steps redrawn in place.
    Live,
    /// One line per change (a pipe, a log, CI).
    Lines,
    /// One JSON object per change, then the workflow.
    Json,
}

const POLL: Duration = Duration::from_millis(250);

/// When each step started and finished, as this watcher saw it.
#[derive(Default)]
struct Clock {
    started: HashMap<usize, Instant>,
    took: HashMap<usize, Duration>,
}

impl Clock {
    fn observe(&mut self, w: &Workflow, now: Instant) {
        let current = w.steps.iter().position(|s| s.state != StepState::Done as i32);
        for (i, s) in w.steps.iter().enumerate() {
            if Some(i) == current && w.status == WorkflowStatus::Running as i32 {
                self.started.entry(i).or_insert(now);
            }
            if s.state != StepState::Pending as i32
                && !self.took.contains_key(&i)
                && let Some(start) = self.started.get(&i)
            {
                self.took.insert(i, now - *start);
            }
        }
    }

    fn of(&self, i: usize, now: Instant) -> Option<Duration> {
        self.took.get(&i).copied().or_else(|| self.started.get(&i).map(|s| now - *s))
    }
}

/// The live display of `w`: a header, then one line per step.
fn frame(w: &Workflow, clock: &Clock, total: Duration, now: Instant) -> Vec<String> {
    let mut lines = vec![format!("{}  {}  {}", w.workflow_id, workflow_status(w.status), elapsed(total))];
    let current = w.steps.iter().position(|s| s.state != StepState::Done as i32);
    let width = w.steps.iter().map(|s| step_name(s).len()).max().unwrap_or(0);
    for (i, s) in w.steps.iter().enumerate() {
        let running = Some(i) == current && w.status == WorkflowStatus::Running as i32;
        let mark = match StepState::try_from(s.state) {
            Ok(StepState::Done) => "✓",
            Ok(StepState::Failed) => "✗",
            _ if running => "▸",
            _ => "·",
        };
        let mut line = format!("  {mark} {:<width$}", step_name(s));
        if s.attempts > 0 || running {
            line.push_str(&format!("  attempt {}", s.attempts.max(1)));
        }
        if let Some(d) = clock.of(i, now) {
            line.push_str(&format!("  {}", elapsed(d)));
        }
        if !s.last_error.is_empty() && s.state != StepState::Done as i32 {
            line.push_str(&format!("  last error: {}", clean(&s.last_error)));
        }
        lines.push(line.trim_end().to_owned());
    }
    lines
}

/// The plain line for a step that changed.
fn change_line(w: &Workflow, i: usize) -> String {
    let s = &w.steps[i];
    let what = match StepState::try_from(s.state) {
        Ok(StepState::Done) => "done".to_owned(),
        Ok(StepState::Failed) => "failed".to_owned(),
        _ if !s.last_error.is_empty() => "retrying".to_owned(),
        _ => "running".to_owned(),
    };
    let mut line = format!("{}  {}  {what}  attempt {}", w.workflow_id, step_name(s), s.attempts.max(1));
    let note = if s.last_error.is_empty() || s.state == StepState::Done as i32 { &s.detail } else { &s.last_error };
    if !note.is_empty() {
        line.push_str(&format!("  {}", clean(note)));
    }
    line
}

/// What identifies a step's visible state: a change of any is printed.
fn step_key(w: &Workflow, i: usize) -> (i32, u32, String) {
    let s = &w.steps[i];
    (s.state, s.attempts, s.last_error.clone())
}

/// Follows workflow `id` until it ends: Ok with the workflow when it
/// succeeded, an error naming the failed step and its error otherwise.
pub async fn watch(ops: &Ops, id: &str, mode: Mode) -> Result<Workflow, CliError> {
    let mut client = ops.onboarding()?;
    let start = Instant::now();
    let mut clock = Clock::default();
    let mut seen: HashMap<usize, (i32, u32, String)> = HashMap::new();
    let mut drawn = 0usize;
    let mut out = std::io::stdout();
    loop {
        let request = ops.request(GetWorkflowRequest { workflow_id: id.to_owned() });
        let w = client.get_workflow(request).await.map_err(ops.error(Service::Onboarding))?.into_inner();
        let w = w.workflow.ok_or_else(|| CliError(format!("the onboarding service sent no workflow for {id}")))?;
        let now = Instant::now();
        clock.observe(&w, now);
        let running = w.status == WorkflowStatus::Running as i32;
        match mode {
            Mode::Live => {
                let lines = frame(&w, &clock, now - start, now);
                let mut text = String::new();
                if drawn > 0 {
                    // Back to the first line drawn, and clear what follows.
                    text.push_str(&format!("\x1b[{drawn}F\x1b[J"));
                }
                for l in &lines {
                    text.push_str(l);
                    text.push('\n');
                }
                drawn = lines.len();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            }
            Mode::Lines | Mode::Json => {
                for i in 0..w.steps.len() {
                    let key = step_key(&w, i);
                    let fresh = key.1 > 0 || key.0 != StepState::Pending as i32;
                    if fresh && seen.get(&i) != Some(&key) {
                        if mode == Mode::Json {
                            let mut event = step_json(&w.steps[i]);
                            event["workflow_id"] = w.workflow_id.clone().into();
                            println!("{event}");
                        } else {
                            println!("{}", change_line(&w, i));
                        }
                        seen.insert(i, key);
                    }
                }
            }
        }
        if !running {
            return finish(w, mode, now - start);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last word on a workflow that ended.
fn finish(w: Workflow, mode: Mode, took: Duration) -> Result<Workflow, CliError> {
    let status = workflow_status(w.status);
    if mode == Mode::Json {
        println!("{}", serde_json::json!({ "workflow": workflow_json(&w) }));
    } else {
        let mut line = format!("{} {status} after {}", w.workflow_id, elapsed(took));
        if !w.export_path.is_empty() {
            line.push_str(&format!("; export: {}", clean(&w.export_path)));
        }
        println!("{line}");
    }
    if w.status == WorkflowStatus::Succeeded as i32 {
        return Ok(w);
    }
    let failed = w.steps.iter().find(|s| s.state == StepState::Failed as i32);
    let hint = if w.status == WorkflowStatus::Failed as i32 {
        format!("; once the cause is fixed, `tenantmesh workflow retry {}` resumes it there", w.workflow_id)
    } else {
        String::new()
    };
    let why = match failed {
        Some(s) if !w.error.contains(&s.name) => format!("{}: {}", step_name(s), clean(&s.last_error)),
        _ => clean(&w.error),
    };
    Err(CliError(format!("{} {status}: {why}{hint}", w.workflow_id)))
}

/// `-o json` follows as JSON; otherwise a terminal gets the live display.
pub fn mode(json: bool) -> Mode {
    use std::io::IsTerminal;
    if json {
        Mode::Json
    } else if std::io::stdout().is_terminal() && std::env::var_os("TERM").is_some_and(|t| t != "dumb") {
        Mode::Live
    } else {
        Mode::Lines
    }
}

#[cfg(test)]
mod tests {
    use tenantmesh_proto::onboarding::v1::Step;

    use super::*;

    fn workflow(states: &[(StepState, u32, &str)], status: WorkflowStatus) -> Workflow {
        let names = ["create_tenant", "provision_service", "activate_tenant"];
        Workflow {
            workflow_id: "acme/onboard".into(),
            status: status as i32,
            error: String::new(),
            steps: states
                .iter()
                .zip(names)
                .map(|((state, attempts, err), name)| Step {
                    name: name.into(),
                    service: if name == "provision_service" { "orders".into() } else { String::new() },
                    state: *state as i32,
                    attempts: *attempts,
                    last_error: (*err).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_live_frame_marks_done_current_and_waiting_steps() {
        let t0 = Instant::now();
        let mut clock = Clock::default();
        let w = workflow(
            &[(StepState::Done, 1, ""), (StepState::Pending, 2, "Unavailable: refused"), (StepState::Pending, 0, "")],
            WorkflowStatus::Running,
        );
        clock.observe(&w, t0);
        let lines = frame(&w, &clock, Duration::from_millis(1500), t0 + Duration::from_millis(300));
        assert_eq!(lines[0], "acme/onboard  RUNNING  1.5s");
        assert_eq!(lines[1], "  ✓ create_tenant               attempt 1");
        assert_eq!(lines[2], "  ▸ provision_service (orders)  attempt 2  300ms  last error: Unavailable: refused");
        assert_eq!(lines[3], "  · activate_tenant");
    }

    #[test]
    fn plain_lines_say_what_changed() {
        let w = workflow(
            &[(StepState::Done, 1, ""), (StepState::Pending, 2, "Unavailable: refused"), (StepState::Failed, 1, "no")],
            WorkflowStatus::Failed,
        );
        assert_eq!(change_line(&w, 0), "acme/onboard  create_tenant  done  attempt 1");
        assert_eq!(
            change_line(&w, 1),
            "acme/onboard  provision_service (orders)  retrying  attempt 2  Unavailable: refused"
        );
        assert_eq!(change_line(&w, 2), "acme/onboard  activate_tenant  failed  attempt 1  no");
    }

    #[test]
    fn a_failed_workflow_is_an_error_naming_its_step() {
        let mut w = workflow(
            &[(StepState::Done, 1, ""), (StepState::Failed, 3, "boom"), (StepState::Pending, 0, "")],
            WorkflowStatus::Failed,
        );
        w.error = "provision_service (orders): boom".into();
        let e = finish(w, Mode::Lines, Duration::from_secs(2)).unwrap_err().0;
        assert!(e.starts_with("acme/onboard FAILED: provision_service (orders): boom"), "{e}");
        assert!(e.contains("tenantmesh workflow retry acme/onboard"), "{e}");
        let ok = workflow(&[(StepState::Done, 1, "")], WorkflowStatus::Succeeded);
        assert!(finish(ok, Mode::Lines, Duration::from_secs(2)).is_ok());
    }
}
