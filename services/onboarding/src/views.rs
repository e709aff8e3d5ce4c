//! What the onboarding API shows and how: workflows as their protos, with
//! paths and secrets redacted for those who may not see them, workflow ids,
//! and the bounded set of event watchers.

use std::pin::Pin;

use tenantmesh_proto::onboarding::v1::{self as pb, *};
use tenantmesh_proto::registry::v1::Tenant;
use tenantmesh_service::errors::invalid_field;
use tenantmesh_tenant_context::{Role, TenantContext};
use tokio_stream::Stream;
use tonic::Status;

use crate::error::OnboardingError;
use crate::workflow::{Kind, Params, StepState, Workflow, WorkflowState};

pub(crate) const MAX_KEY_LEN: usize = 128;

/// Open WatchEvents streams per caller, capped.
pub(crate) struct Watchers {
    max: usize,
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, String), usize>>>,
}

/// One open stream; closes its place on drop.
pub(crate) struct Watching {
    key: (String, String),
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, String), usize>>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("watchers lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Watchers {
    pub(crate) fn new(max: usize) -> Self {
        Self { max, open: Default::default() }
    }

    /// A place for one more stream of the caller (tenant, subject).
    pub(crate) fn enter(&self, tenant: &str, subject: &str) -> Result<Watching, OnboardingError> {
        let key = (tenant.to_owned(), subject.to_owned());
        let mut open = self.open.lock().expect("watchers lock");
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            tracing::warn!(
                tenant_id = tenant,
                subject,
                open = *n,
                "WatchEvents refused: too many streams for the caller"
            );
            return Err(OnboardingError::TooManyWatchers(self.max));
        }
        *n += 1;
        Ok(Watching { key, open: self.open.clone() })
    }
}

/// Where the workflow of `kind` for `tenant_id` is recorded.
pub(crate) fn workflow_id(tenant_id: &str, kind: Kind) -> String {
    match kind {
        Kind::Onboard => format!("{tenant_id}/onboard"),
        Kind::Offboard => format!("{tenant_id}/offboard"),
        Kind::ChangeTier => format!("{tenant_id}/change-tier/{}", now_millis()),
        Kind::Restore => format!("{tenant_id}/restore/{}", now_millis()),
        // One per service: see `catch_up`.
        Kind::CatchUp => format!("{tenant_id}/catch-up"),
    }
}

/// The parameters of a lifecycle workflow of a registered tenant, to `tier`.
pub(crate) fn params_of(tenant: &Tenant, tier: &str) -> Params {
    Params {
        tenant_id: tenant.tenant_id.clone(),
        name: tenant.name.clone(),
        tier: tier.to_owned(),
        admin_email: String::new(),
    }
}

pub(crate) fn now_millis() -> u128 {
    tenantmesh_service::clock::since_epoch().as_millis()
}

pub(crate) fn tenant_of(workflow_id: &str) -> &str {
    workflow_id.split('/').next().unwrap_or_default()
}

/// Checks a workflow id from a request.
pub(crate) fn check_workflow_id(id: &str) -> Result<(), Status> {
    let mut parts = id.split('/');
    let tenant = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let ok = tenantmesh_service::validate_tenant_id(tenant).is_ok()
        && match rest.as_slice() {
            ["onboard"] | ["offboard"] => true,
            ["change-tier" | "restore", n] => !n.is_empty() && n.len() <= 20 && n.bytes().all(|c| c.is_ascii_digit()),
            ["catch-up", service] => tenantmesh_service::ids::valid_service_name(service),
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(invalid_field(
            "workflow_id",
            "must be <tenant>/onboard, <tenant>/offboard, <tenant>/change-tier/<n>, <tenant>/restore/<n> or \
             <tenant>/catch-up/<service>",
        ))
    }
}

pub(crate) fn to_proto_status(state: WorkflowState) -> WorkflowStatus {
    match state {
        // Still working, towards the tenant's state before it.
        WorkflowState::Running | WorkflowState::RollingBack => WorkflowStatus::Running,
        WorkflowState::Succeeded => WorkflowStatus::Succeeded,
        WorkflowState::Failed => WorkflowStatus::Failed,
        WorkflowState::RolledBack => WorkflowStatus::RolledBack,
    }
}

/// What a tenant admin is shown of what the platform writes: host paths
/// (a file shows by its name) and endpoints are the operator's to see.
#[derive(Clone)]
pub(crate) struct Redactor {
    /// Directories whose files show by their names alone.
    dirs: Vec<String>,
}

impl Redactor {
    pub(crate) fn new(dirs: &[&std::path::Path]) -> Self {
        let mut names = Vec::new();
        for dir in dirs {
            names.push(format!("{}/", dir.display()));
            if let Ok(abs) = std::path::absolute(dir) {
                names.push(format!("{}/", abs.display()));
            }
        }
        // Longest first: an absolute path before its relative tail.
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        names.dedup();
        Self { dirs: names }
    }

    /// Whether `ctx` sees everything (the operator and services do).
    pub(crate) fn sees_all(ctx: &TenantContext) -> bool {
        ctx.has_role(Role::PlatformAdmin) || ctx.has_role(Role::Service)
    }

    /// `text` with host paths under the known directories shortened to
    /// their file names, and URLs replaced by `<endpoint>`.
    pub(crate) fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for dir in &self.dirs {
            out = out.replace(dir.as_str(), "");
        }
        let mut redacted = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = ["http://", "https://"].into_iter().filter_map(|scheme| rest.find(scheme)).min() {
            redacted.push_str(&rest[..at]);
            redacted.push_str("<endpoint>");
            let end =
                rest[at..].find(|c: char| c.is_whitespace() || "\"'),;]>".contains(c)).map_or(rest.len(), |n| at + n);
            rest = &rest[end..];
        }
        redacted.push_str(rest);
        redacted
    }

    /// `wf` as `ctx` may see it.
    pub(crate) fn workflow(&self, ctx: &TenantContext, mut wf: pb::Workflow) -> pb::Workflow {
        if Self::sees_all(ctx) {
            return wf;
        }
        wf.export_path = self.text(&wf.export_path);
        wf.error = self.text(&wf.error);
        for step in &mut wf.steps {
            step.last_error = self.text(&step.last_error);
            step.detail = self.text(&step.detail);
        }
        wf
    }
}

pub(crate) fn to_proto(wf: &Workflow) -> pb::Workflow {
    pb::Workflow {
        workflow_id: wf.id.clone(),
        kind: wf.kind.as_str().into(),
        tenant_id: wf.params.tenant_id.clone(),
        status: to_proto_status(wf.state) as i32,
        steps: wf
            .steps
            .iter()
            .map(|s| Step {
                name: s.name.as_str().into(),
                state: match s.state {
                    StepState::Pending => pb::StepState::Pending,
                    StepState::Done => pb::StepState::Done,
                    StepState::Failed => pb::StepState::Failed,
                } as i32,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
                service: s.service.clone(),
                detail: s.detail.clone(),
            })
            .collect(),
        error: wf.error(),
        create_time: wf.create_time,
        update_time: wf.update_time,
        export_path: wf.export_path.clone(),
    }
}

/// The stream WatchEvents answers with.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<WatchEventsResponse, Status>> + Send>>;
