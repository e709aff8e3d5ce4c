//! Fault injection for the crash and retry tests, from
//! `TENANTMESH_FAULTS` (`;`-separated; never set it in production, the
//! service logs a warning when it is):
//! - `fail:<step>:<n>`: the first `n` attempts of `<step>` in this process
//!   fail with a retryable error (`always` for every attempt);
//! - `fail-permanent:<step>:<n>`: the first `n` attempts of `<step>` fail
//!   with an error that is not retried (the workflow fails at once);
//! - `halt-after:<kind>:<step>`: once `<step>` of a `<kind>` workflow is
//!   done and persisted, the workflow stops there for good (the process
//!   lives on), for a test to kill -9 it at exactly that point;
//! - `halt-unsaved:<kind>:<step>`: the same, but once the step's effect is
//!   done and before it is recorded, so the restarted service runs the step
//!   again (which must create nothing twice).
//!
//! Steps and kinds are checked against the real ones: a misspelt fault is
//! refused at start-up instead of never firing.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::workflow::{Kind, Step, StepError};

#[derive(Debug, Default)]
pub struct Faults {
    /// step -> attempts still to fail (`u32::MAX`: always), and whether
    /// with an error that is not retried.
    fail: Mutex<HashMap<Step, (u32, bool)>>,
    halt_after: Vec<(Kind, Step)>,
    halt_unsaved: Vec<(Kind, Step)>,
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut faults = Faults::default();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let fields: Vec<&str> = part.split(':').collect();
            let in_part = |e: String| format!("{part:?}: {e}");
            match fields.as_slice() {
                [kind @ ("fail" | "fail-permanent"), step, n] => {
                    let n = if *n == "always" {
                        u32::MAX
                    } else {
                        n.parse().map_err(|_| format!("{part:?}: bad count"))?
                    };
                    let permanent = *kind == "fail-permanent";
                    faults.fail.get_mut().expect("fresh lock").insert(step.parse().map_err(in_part)?, (n, permanent));
                }
                ["halt-after", kind, step] => {
                    faults.halt_after.push((kind.parse().map_err(in_part)?, step.parse().map_err(in_part)?));
                }
                ["halt-unsaved", kind, step] => {
                    faults.halt_unsaved.push((kind.parse().map_err(in_part)?, step.parse().map_err(in_part)?));
                }
                _ => {
                    return Err(format!(
                        "{part:?} is not fail:<step>:<n|always>, fail-permanent:<step>:<n|always>, \
                         halt-after:<kind>:<step> or halt-unsaved:<kind>:<step>"
                    ));
                }
            }
        }
        Ok(faults)
    }

    pub fn is_empty(&self) -> bool {
        self.halt_after.is_empty() && self.halt_unsaved.is_empty() && self.fail.lock().expect("faults lock").is_empty()
    }

    /// An injected failure of this attempt of `step`, if one is due.
    pub fn before(&self, step: Step) -> Option<StepError> {
        let mut fail = self.fail.lock().expect("faults lock");
        let (left, permanent) = fail.get_mut(&step)?;
        if *left == 0 {
            return None;
        }
        if *left != u32::MAX {
            *left -= 1;
        }
        Some(if *permanent {
            StepError::permanent(format!("injected permanent fault in {step}"))
        } else {
            StepError::transient(format!("injected fault in {step}"))
        })
    }

    /// Whether to halt once `step` of a `kind` workflow took effect, before it is saved.
    pub fn halt_unsaved(&self, kind: Kind, step: Step) -> bool {
        self.halt_unsaved.contains(&(kind, step))
    }

    /// Whether to halt once `step` of a `kind` workflow is done.
    pub fn halt_after(&self, kind: Kind, step: Step) -> bool {
        self.halt_after.contains(&(kind, step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_halts() {
        let f = Faults::parse("fail:provision_storage:2; halt-after:onboard:create_tenant").unwrap();
        assert!(f.before(Step::ProvisionStorage).is_some());
        assert!(f.before(Step::ProvisionStorage).is_some());
        assert!(f.before(Step::ProvisionStorage).is_none());
        assert!(f.before(Step::CreateTenant).is_none());
        assert!(f.halt_after(Kind::Onboard, Step::CreateTenant) && !f.halt_after(Kind::Offboard, Step::CreateTenant));
        let unsaved = Faults::parse("halt-unsaved:offboard:export_items").unwrap();
        assert!(unsaved.halt_unsaved(Kind::Offboard, Step::ExportItems));
        let always = Faults::parse("fail:copy_items:always").unwrap();
        assert!((0..10).all(|_| always.before(Step::CopyItems).is_some_and(|e| e.retryable)));
        let permanent = Faults::parse("fail-permanent:copy_items:1").unwrap();
        assert!(permanent.before(Step::CopyItems).is_some_and(|e| !e.retryable));
        assert!(permanent.before(Step::CopyItems).is_none());
        assert!(Faults::parse("").unwrap().is_empty());
    }

    /// A fault that names no real step or kind is refused, saying which.
    #[test]
    fn unknown_steps_and_kinds_are_refused() {
        for (spec, names) in [
            ("explode", "is not fail"),
            ("fail:provision_everything:1", "provision_everything"),
            ("halt-after:onbaord:create_tenant", "onbaord"),
            ("halt-unsaved:offboard:export_item", "export_item"),
            ("fail:copy_items:often", "bad count"),
        ] {
            let err = Faults::parse(spec).unwrap_err();
            assert!(err.contains(names), "{spec}: {err}");
        }
    }
}
