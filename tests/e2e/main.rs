//! Every test that runs the mesh, in one test binary: on a 2-core CI
//! machine each test binary that links the whole mesh costs a link of
//! everything, so they share one.
//!
//! Run by cargo-nextest (`cargo xtask test` installs it when missing), which
//! gives every test a process of its own. The modules marked "own process"
//! rely on that: they install the global telemetry or read a process-wide
//! counter. One folder per theme.
//!
//! The services' contract suites stay beside their services
//! (`services/<service>/tests/contract.rs`) and the README walk-through
//! beside the CLI; they are compiled here.

/// Who may do what: roles and scopes, attacks, tokens, runtime isolation.
mod security {
    mod access;
    mod attacks;
    mod audit_log;
    mod auth_records;
    mod external_idp;
    mod floods;
    mod isolation_model;
    /// Own process: reads the auth service's process-wide JWKS request counter.
    mod jwks_flood;
    /// Own process: reads the process-wide AssumeRole counter.
    mod sts_calls;
}
/// Crashes, outages, replicas and failing workflow steps.
mod faults {
    mod crash_recovery;
    mod outage;
    mod replicas;
    mod workflow_faults;
}
/// Tenants' lives: onboarding to offboarding, tier changes, backup and restore, watching changes.
mod lifecycle {
    mod application;
    mod backup;
    mod cross_service;
    mod restore;
    mod tenant_watch;
    mod workflows;
}
/// The deploy files (compose, Kubernetes, CloudFormation) and the storage backends.
mod deploy {
    mod compose_wiring;
    mod storage_backends;
}
/// Spans, metrics and logs.
mod observability {
    /// Own process: installs the global telemetry (OTLP exporter).
    mod otlp_export;
    /// Own process: installs the global telemetry (in-memory span exporter).
    mod trace_spans;
}
/// The operator's `tenantmesh` commands.
pub(crate) mod operator {
    /// The console in a real browser (Chromium, selenium).
    mod browser;
    mod cli;
    pub(crate) mod console;
}
/// Limits, fair sharing, metering and cost.
mod usage {
    mod alerts;
    mod entitlements;
    mod limits;
    mod metering;
}

// The services' contract suites: each service's gRPC contract, through
// the real mesh.
#[path = "../../services/auth/tests/contract.rs"]
mod auth_contract;
#[path = "../../services/data/tests/contract.rs"]
mod data_contract;
/// The lifecycle service every application serves (through the example).
#[path = "../../crates/app/tests/lifecycle_contract.rs"]
mod lifecycle_contract;
#[path = "../../services/onboarding/tests/contract.rs"]
mod onboarding_contract;
#[path = "../../services/orders/tests/contract.rs"]
mod orders_contract;
#[path = "../../services/tenant-registry/tests/audit_contract.rs"]
mod registry_audit_contract;
#[path = "../../services/tenant-registry/tests/contract.rs"]
mod registry_contract;

#[path = "../../crates/cli/tests/readme_walkthrough.rs"]
mod readme_walkthrough;
