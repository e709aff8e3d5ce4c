//! Fault injection for the crash and retry tests, from
//! `TENANTMESH_FAULTS` (`;`-separated; never set it in production, the
//! service logs a warning when it is):
//! - `fail:<step>:<n>`: the first `n` attempts of `<step>` in this process
//!   fail with a retryable error (`always` for every attempt);
//! - `halt-after:<kind>:<step>`: once `<step>` of a `<kind>` workflow is
//!   done and persisted, the workflow stops there for good (the process
//!   lives on), for a test to kill -9 it at exactly that point;
//! - `halt-unsaved:<kind>:<step>`: the same, but once the step's effect is
//!   done and before it is recorded, so the restarted service runs the step
//!   again (which must create nothing twice).

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Faults {
    /// step -> attempts still to fail (`u32::MAX`: always).
    fail: Mutex<HashMap<String, u32>>,
    halt_after: Vec<(String, String)>,
    halt_unsaved: Vec<(String, String)>,
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut faults = Faults::default();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let fields: Vec<&str> = part.split(':').collect();
            match fields.as_slice() {
                ["fail", step, n] => {
                    let n = if *n == "always" {
                        u32::MAX
                    } else {
                        n.parse().map_err(|_| format!("{part:?}: bad count"))?
                    };
                    faults.fail.get_mut().expect("fresh lock").insert((*step).to_owned(), n);
                }
                ["halt-after", kind, step] => faults.halt_after.push(((*kind).to_owned(), (*step).to_owned())),
                ["halt-unsaved", kind, step] => faults.halt_unsaved.push(((*kind).to_owned(), (*step).to_owned())),
                _ => {
                    return Err(format!(
                        "{part:?} is not fail:<step>:<n|always>, halt-after:<kind>:<step> or halt-unsaved:<kind>:<step>"
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
    pub fn before(&self, step: &str) -> Option<String> {
        let mut fail = self.fail.lock().expect("faults lock");
        let left = fail.get_mut(step)?;
        if *left == 0 {
            return None;
        }
        if *left != u32::MAX {
            *left -= 1;
        }
        Some(format!("injected fault in {step}"))
    }

    /// Whether to halt once `step` of a `kind` workflow took effect, before it is saved.
    pub fn halt_unsaved(&self, kind: &str, step: &str) -> bool {
        self.halt_unsaved.iter().any(|(k, s)| k == kind && s == step)
    }

    /// Whether to halt once `step` of a `kind` workflow is done.
    pub fn halt_after(&self, kind: &str, step: &str) -> bool {
        self.halt_after.iter().any(|(k, s)| k == kind && s == step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_halts() {
        let f = Faults::parse("fail:provision_storage:2; halt-after:onboard:create_tenant").unwrap();
        assert!(f.before("provision_storage").is_some());
        assert!(f.before("provision_storage").is_some());
        assert!(f.before("provision_storage").is_none());
        assert!(f.before("create_tenant").is_none());
        assert!(f.halt_after("onboard", "create_tenant") && !f.halt_after("offboard", "create_tenant"));
        assert!(Faults::parse("halt-unsaved:offboard:export_items").unwrap().halt_unsaved("offboard", "export_items"));
        let always = Faults::parse("fail:x:always").unwrap();
        assert!((0..10).all(|_| always.before("x").is_some()));
        assert!(Faults::parse("explode").is_err());
        assert!(Faults::parse("").unwrap().is_empty());
    }
}
