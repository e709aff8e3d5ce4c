//! Every test that runs the mesh, in one test binary: on a 2-core CI
//! machine each test binary that links the whole mesh costs a link of
//! everything, so they share one.
//!
//! Run by cargo-nextest (`cargo xtask test` installs it when missing), which
//! gives every test a process of its own. The modules marked "own process"
//! rely on that: they install the global telemetry or read a process-wide
//! counter.
//!
//! The services' contract suites stay beside their services
//! (`services/<service>/tests/contract.rs`) and the README walk-through
//! beside the CLI; they are compiled here.

mod access;
mod attacks;
mod auth_records;
mod backup;
mod compose_wiring;
mod crash_recovery;
mod cross_service;
mod external_idp;
/// Own process: reads the auth service's process-wide JWKS request counter.
mod isolation_model;
mod jwks_flood;
mod lifecycle;
mod limits;
mod metering;
/// Own process: installs the global telemetry (OTLP exporter).
mod otlp_export;
mod outage;
mod replicas;
mod restore;
mod storage_backends;
/// Own process: reads the process-wide AssumeRole counter.
mod sts_calls;
mod tenant_watch;
/// Own process: installs the global telemetry (in-memory span exporter).
mod trace_spans;
mod workflow_faults;

// The services' contract suites: each service's gRPC contract, through
// the real mesh.
#[path = "../../services/auth/tests/contract.rs"]
mod auth_contract;
#[path = "../../services/data/tests/contract.rs"]
mod data_contract;
#[path = "../../services/onboarding/tests/contract.rs"]
mod onboarding_contract;
#[path = "../../services/tenant-registry/tests/contract.rs"]
mod registry_contract;

#[path = "../../crates/cli/tests/readme_walkthrough.rs"]
mod readme_walkthrough;
