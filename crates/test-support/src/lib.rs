//! Test support for tenantmesh, by role:
//!
//! - [`mesh`]: an in-process mesh on ephemeral ports, on the backend
//!   `TENANTMESH_TEST_STORAGE` names, with typed clients, tenant onboarding
//!   and tokens;
//! - [`moto`]: the DynamoDB + STS emulator, one per test;
//! - [`spans`]: in-memory span capture for telemetry tests;
//! - [`requests`] and [`assertions`]: authenticated requests, expected
//!   status codes and violated fields, polling;
//! - [`tools`]: the repository, built binaries and installed tools;
//! - [`memory`]: this process's peak resident memory.
//!
//! Everything but the emulator and span capture is re-exported at the top,
//! so suites `use tenantmesh_test_support::*;`.

pub mod assertions;
pub mod memory;
pub mod mesh;
pub mod moto;
pub mod requests;
pub mod spans;
pub mod tools;

pub use assertions::*;
pub use memory::*;
pub use mesh::*;
pub use requests::*;
pub use tools::*;
