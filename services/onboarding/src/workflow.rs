//! A durable workflow: a list of named steps, persisted after every step,
//! every step idempotent, so a crash at any point is repaired by running
//! it again from its first unfinished step. This is the stored shape
//! (JSON): names and fields stay stable across releases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantmesh_proto::registry::v1::IsolationModel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Onboard,
    ChangeTier,
    Offboard,
    Restore,
    /// An application service registered after the tenant existed:
    /// provisioning the tenant in it.
    CatchUp,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Onboard, Kind::ChangeTier, Kind::Offboard, Kind::Restore, Kind::CatchUp];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Onboard => "onboard",
            Kind::ChangeTier => "change_tier",
            Kind::Offboard => "offboard",
            Kind::Restore => "restore",
            Kind::CatchUp => "catch_up",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            format!("{s:?} is not a workflow kind ({})", all.join(", "))
        })
    }
}

/// Every step of every workflow. Stored by name (snake_case), so a step
/// that does not exist cannot be written, read or named in a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    CreateTenant,
    ProvisionCompute,
    ProvisionStorage,
    CreateAdminUser,
    ApplyLimits,
    ActivateTenant,
    PauseWrites,
    CopyItems,
    SwitchPlacement,
    Drain,
    RemoveOldCopy,
    SuspendTenant,
    ExportItems,
    DeleteItems,
    DeleteResources,
    DeleteUsers,
    MarkDeleted,
    RewindItems,
    ResumeWrites,
    /// The steps of an application service (its `TenantLifecycle`), one
    /// per registered service ([`StepRecord::service`]).
    ProvisionService,
    FenceService,
    CopyService,
    UnfenceService,
    ExportService,
    RewindService,
    PurgeService,
}

impl Step {
    pub const ALL: [Step; 26] = [
        Step::CreateTenant,
        Step::ProvisionCompute,
        Step::ProvisionStorage,
        Step::CreateAdminUser,
        Step::ApplyLimits,
        Step::ActivateTenant,
        Step::PauseWrites,
        Step::CopyItems,
        Step::SwitchPlacement,
        Step::Drain,
        Step::RemoveOldCopy,
        Step::SuspendTenant,
        Step::ExportItems,
        Step::DeleteItems,
        Step::DeleteResources,
        Step::DeleteUsers,
        Step::MarkDeleted,
        Step::RewindItems,
        Step::ResumeWrites,
        Step::ProvisionService,
        Step::FenceService,
        Step::CopyService,
        Step::UnfenceService,
        Step::ExportService,
        Step::RewindService,
        Step::PurgeService,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::CreateTenant => "create_tenant",
            Step::ProvisionCompute => "provision_compute",
            Step::ProvisionStorage => "provision_storage",
            Step::CreateAdminUser => "create_admin_user",
            Step::ApplyLimits => "apply_limits",
            Step::ActivateTenant => "activate_tenant",
            Step::PauseWrites => "pause_writes",
            Step::CopyItems => "copy_items",
            Step::SwitchPlacement => "switch_placement",
            Step::Drain => "drain",
            Step::RemoveOldCopy => "remove_old_copy",
            Step::SuspendTenant => "suspend_tenant",
            Step::ExportItems => "export_items",
            Step::DeleteItems => "delete_items",
            Step::DeleteResources => "delete_resources",
            Step::DeleteUsers => "delete_users",
            Step::MarkDeleted => "mark_deleted",
            Step::RewindItems => "rewind_items",
            Step::ResumeWrites => "resume_writes",
            Step::ProvisionService => "provision_service",
            Step::FenceService => "fence_service",
            Step::CopyService => "copy_service",
            Step::UnfenceService => "unfence_service",
            Step::ExportService => "export_service",
            Step::RewindService => "rewind_service",
            Step::PurgeService => "purge_service",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Step::ALL.into_iter().find(|step| step.as_str() == s).ok_or_else(|| format!("{s:?} is not a workflow step"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    Running,
    Succeeded,
    /// Failed for good at a step; a retry runs it again from there.
    Failed,
    /// Failed for good where stopping would leave the tenant mid-way (a
    /// tier change before its switch): undoing what it did.
    RollingBack,
    /// Undone: the tenant is as it was before; the failed step says why.
    /// Not retried (start a new workflow).
    RolledBack,
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
    pub name: Step,
    pub state: StepState,
    pub attempts: u32,
    pub last_error: String,
    /// A step of an application service: its name in the service catalog.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// What the step reported (e.g. how a service serves the tenant).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl StepRecord {
    /// The step as shown: its name, and the service it calls (`provision_service (orders)`).
    pub fn label(&self) -> String {
        if self.service.is_empty() { self.name.to_string() } else { format!("{} ({})", self.name, self.service) }
    }
}

/// One step to run: a mesh step, or one of an application service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub step: Step,
    pub service: String,
}

impl From<Step> for Planned {
    fn from(step: Step) -> Self {
        Planned { step, service: String::new() }
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spot {
    /// Stored as "pool", "bridge" or "silo".
    #[serde(with = "model_name")]
    pub model: IsolationModel,
    pub table: String,
    /// Silo only: the tenant's data-service instance.
    pub endpoint: String,
}

impl Default for Spot {
    fn default() -> Self {
        Spot { model: IsolationModel::Pool, table: String::new(), endpoint: String::new() }
    }
}

impl Spot {
    /// As the registry records it.
    pub fn placement(&self) -> tenantmesh_proto::registry::v1::Placement {
        tenantmesh_proto::registry::v1::Placement {
            model: self.model as i32,
            table: self.table.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    pub fn dedicated(&self) -> bool {
        self.model != IsolationModel::Pool
    }
    pub fn silo(&self) -> bool {
        self.model == IsolationModel::Silo
    }
}

/// An isolation model by its stored name.
pub mod model_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tenantmesh_proto::registry::v1::IsolationModel;

    pub fn as_str(model: IsolationModel) -> &'static str {
        match model {
            IsolationModel::Bridge => "bridge",
            IsolationModel::Silo => "silo",
            IsolationModel::Pool | IsolationModel::Unspecified => "pool",
        }
    }

    pub fn serialize<S: Serializer>(model: &IsolationModel, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(as_str(*model))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IsolationModel, D::Error> {
        match String::deserialize(d)?.as_str() {
            "pool" => Ok(IsolationModel::Pool),
            "bridge" => Ok(IsolationModel::Bridge),
            "silo" => Ok(IsolationModel::Silo),
            other => Err(serde::de::Error::custom(format!("unknown isolation model {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workflow {
    /// `<tenant>/onboard`, `<tenant>/change-tier/<ms>`,
    /// `<tenant>/restore/<ms>`, `<tenant>/offboard`,
    /// `<tenant>/catch-up/<service>`.
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
    /// A restore: the instant the tenant's items are put back to
    /// (microseconds since the epoch).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub point_in_time_us: i64,
    /// A restore the tenant's own admin asked for: its work is charged to
    /// the tenant's limits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charge_tenant: bool,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Workflow {
    pub fn new(id: String, kind: Kind, params: Params, steps: &[Planned], now: i64) -> Self {
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
                    name: s.step,
                    state: StepState::Pending,
                    attempts: 0,
                    last_error: String::new(),
                    service: s.service.clone(),
                    detail: String::new(),
                })
                .collect(),
            export_path: String::new(),
            create_time: now,
            update_time: now,
            outputs: BTreeMap::new(),
            point_in_time_us: 0,
            charge_tenant: false,
        }
    }

    /// The index of the first step not yet done.
    pub fn next_step(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.state != StepState::Done)
    }

    /// Whether this workflow, failed for good, must be undone rather than
    /// left where it stopped: a tier change before its switch of placement
    /// (the tenant would stay MIGRATING, its writes refused, for good).
    /// So is a restore (in place, the tenant would stay paused with its
    /// items half put back; into an export, there is nothing to retry
    /// that could end otherwise, and the tenant must not stay blocked).
    pub fn must_roll_back(&self) -> bool {
        let before = |step: Step| self.steps.iter().any(|s| s.name == step && s.state != StepState::Done);
        match self.kind {
            Kind::ChangeTier => self.steps.iter().any(|s| s.name == Step::CopyItems) && before(Step::SwitchPlacement),
            Kind::Restore => self.next_step().is_some(),
            Kind::Onboard | Kind::Offboard | Kind::CatchUp => false,
        }
    }

    /// "<step>: <reason>" of the failed step, if any.
    pub fn error(&self) -> String {
        self.steps
            .iter()
            .find(|s| s.state == StepState::Failed)
            .map(|s| format!("{}: {}", s.label(), s.last_error))
            .unwrap_or_default()
    }
}

/// `step` once per application service, after the mesh's own.
fn each(step: Step, services: &[String]) -> impl Iterator<Item = Planned> + '_ {
    services.iter().map(move |s| Planned { step, service: s.clone() })
}

/// The steps of onboarding a tenant into `to`, with `services`.
pub fn onboard_steps(to: &Spot, services: &[String]) -> Vec<Planned> {
    let mut steps = vec![Step::CreateTenant.into()];
    if to.silo() {
        steps.push(Step::ProvisionCompute.into());
    }
    steps.push(Step::ProvisionStorage.into());
    steps.extend(each(Step::ProvisionService, services));
    steps.extend([Step::CreateAdminUser, Step::ApplyLimits, Step::ActivateTenant].map(Planned::from));
    steps
}

/// The steps of moving a tenant from `from` to `to`, with `services`.
pub fn change_tier_steps(from: &Spot, to: &Spot, services: &[String]) -> Vec<Planned> {
    if from.model == to.model {
        return vec![Step::SwitchPlacement.into(), Step::ApplyLimits.into()];
    }
    let mut steps = vec![Step::PauseWrites.into()];
    steps.extend(each(Step::FenceService, services));
    if to.silo() {
        steps.push(Step::ProvisionCompute.into());
    }
    steps.push(Step::ProvisionStorage.into());
    steps.extend(each(Step::ProvisionService, services));
    steps.push(Step::CopyItems.into());
    steps.extend(each(Step::CopyService, services));
    // The new place takes the tenant's writes before the switch sends them there.
    steps.extend(each(Step::UnfenceService, services));
    steps.extend([Step::SwitchPlacement, Step::ApplyLimits, Step::Drain, Step::RemoveOldCopy].map(Planned::from));
    steps.extend(each(Step::PurgeService, services));
    steps
}

/// The steps of restoring a tenant to an instant, with `services`: in
/// place, or (`export`) into export files, the tenant untouched.
pub fn restore_steps(export: bool, services: &[String]) -> Vec<Planned> {
    if export {
        let mut steps = vec![Step::ExportItems.into()];
        steps.extend(each(Step::ExportService, services));
        return steps;
    }
    let mut steps = vec![Step::PauseWrites.into()];
    steps.extend(each(Step::FenceService, services));
    steps.push(Step::RewindItems.into());
    steps.extend(each(Step::RewindService, services));
    steps.extend(each(Step::UnfenceService, services));
    steps.push(Step::ResumeWrites.into());
    steps
}

/// The steps of provisioning an existing tenant in a service registered
/// since it was onboarded.
pub fn catch_up_steps(service: &str) -> Vec<Planned> {
    vec![Planned { step: Step::ProvisionService, service: service.to_owned() }]
}

/// The steps of offboarding a tenant, with `services`.
pub fn offboard_steps(services: &[String]) -> Vec<Planned> {
    let mut steps = vec![Step::SuspendTenant.into()];
    steps.extend(each(Step::FenceService, services));
    steps.push(Step::ExportItems.into());
    steps.extend(each(Step::ExportService, services));
    steps.push(Step::DeleteItems.into());
    steps.extend(each(Step::PurgeService, services));
    steps.extend([Step::DeleteResources, Step::DeleteUsers, Step::MarkDeleted].map(Planned::from));
    steps
}

/// A step attempt failed; `retryable` when the cause looks transient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub reason: String,
    pub retryable: bool,
}

impl StepError {
    pub fn permanent(reason: impl Into<String>) -> Self {
        StepError { reason: reason.into(), retryable: false }
    }

    pub fn transient(reason: impl Into<String>) -> Self {
        StepError { reason: reason.into(), retryable: true }
    }
}

impl From<tonic::Status> for StepError {
    fn from(s: tonic::Status) -> Self {
        let retryable = matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Unknown
        );
        StepError { reason: format!("{:?}: {}", s.code(), s.message()), retryable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spot(model: IsolationModel) -> Spot {
        Spot { model, ..Default::default() }
    }

    #[test]
    fn steps_follow_the_models() {
        use IsolationModel::{Bridge, Pool, Silo};
        let names = |planned: Vec<Planned>| planned.into_iter().map(|p| p.step).collect::<Vec<_>>();
        assert_eq!(
            names(onboard_steps(&spot(Pool), &[])),
            [
                Step::CreateTenant,
                Step::ProvisionStorage,
                Step::CreateAdminUser,
                Step::ApplyLimits,
                Step::ActivateTenant
            ]
        );
        assert_eq!(onboard_steps(&spot(Silo), &[])[1].step, Step::ProvisionCompute);
        assert_eq!(names(change_tier_steps(&spot(Pool), &spot(Pool), &[])), [Step::SwitchPlacement, Step::ApplyLimits]);
        let up = names(change_tier_steps(&spot(Pool), &spot(Bridge), &[]));
        assert_eq!(up.first(), Some(&Step::PauseWrites));
        assert!(up.contains(&Step::CopyItems) && !up.contains(&Step::ProvisionCompute));
        assert!(names(change_tier_steps(&spot(Bridge), &spot(Silo), &[])).contains(&Step::ProvisionCompute));
    }

    /// Each application service gets its steps, each right after the mesh
    /// step it mirrors, in the services' order.
    #[test]
    fn application_services_get_their_steps() {
        use IsolationModel::{Bridge, Pool};
        let services = ["orders".to_owned(), "invoices".to_owned()];
        let show = |planned: Vec<Planned>| {
            planned
                .into_iter()
                .map(|p| if p.service.is_empty() { p.step.to_string() } else { format!("{}:{}", p.step, p.service) })
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            show(onboard_steps(&spot(Pool), &services)),
            "create_tenant provision_storage provision_service:orders provision_service:invoices \
             create_admin_user apply_limits activate_tenant"
        );
        assert_eq!(
            show(change_tier_steps(&spot(Pool), &spot(Bridge), &services[..1])),
            "pause_writes fence_service:orders provision_storage provision_service:orders copy_items \
             copy_service:orders unfence_service:orders switch_placement apply_limits drain remove_old_copy \
             purge_service:orders"
        );
        assert_eq!(show(change_tier_steps(&spot(Pool), &spot(Pool), &services)), "switch_placement apply_limits");
        assert_eq!(
            show(restore_steps(false, &services[..1])),
            "pause_writes fence_service:orders rewind_items rewind_service:orders unfence_service:orders resume_writes"
        );
        assert_eq!(show(restore_steps(true, &services[..1])), "export_items export_service:orders");
        assert_eq!(
            show(offboard_steps(&services[..1])),
            "suspend_tenant fence_service:orders export_items export_service:orders delete_items \
             purge_service:orders delete_resources delete_users mark_deleted"
        );
    }

    #[test]
    fn next_step_and_error() {
        let steps = [Step::CreateTenant.into(), Planned { step: Step::ProvisionService, service: "orders".into() }];
        let mut wf = Workflow::new("a/onboard".into(), Kind::Onboard, params(), &steps, 0);
        assert_eq!(wf.next_step(), Some(0));
        wf.steps[0].state = StepState::Done;
        wf.steps[1].state = StepState::Failed;
        wf.steps[1].last_error = "boom".into();
        assert_eq!((wf.next_step(), wf.error().as_str()), (Some(1), "provision_service (orders): boom"));
    }

    /// Records written before steps and models were types read back the
    /// same, and are written back the same.
    #[test]
    fn the_stored_shape_is_unchanged() {
        let stored = r#"{"id":"acme/onboard","kind":"onboard","params":{"tenant_id":"acme","name":"Acme",
            "tier":"enterprise","admin_email":"a@acme.example"},"admin_password_hash":"","idempotency_key":"k",
            "from_tier":"","from":{"model":"pool","table":"","endpoint":""},
            "to":{"model":"silo","table":"tenantmesh-tenant-acme-silo","endpoint":"http://127.0.0.1:1"},
            "state":"running","steps":[{"name":"create_tenant","state":"done","attempts":1,"last_error":""},
            {"name":"provision_compute","state":"pending","attempts":0,"last_error":""}],
            "export_path":"","create_time":1,"update_time":2,"outputs":{}}"#;
        let wf: Workflow = serde_json::from_str(stored).unwrap();
        assert_eq!((wf.to.model, wf.steps[1].name), (IsolationModel::Silo, Step::ProvisionCompute));
        let again: serde_json::Value = serde_json::to_value(&wf).unwrap();
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(stored).unwrap());
        let bad = stored.replace("provision_compute", "provision_everything");
        assert!(serde_json::from_str::<Workflow>(&bad).is_err());
        for step in Step::ALL {
            assert_eq!(step.as_str().parse::<Step>(), Ok(step));
            assert_eq!(serde_json::to_value(step).unwrap(), step.as_str());
        }
    }

    fn params() -> Params {
        Params { tenant_id: "a".into(), name: "A".into(), tier: "basic".into(), admin_email: "a@b.c".into() }
    }
}
