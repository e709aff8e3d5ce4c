//! What every tenantmesh service shares below the tenant layer:
//!
//! - [`config`]: settings read from an injected environment, named by their
//!   variable when wrong; [`tiers`]: the tiers file.
//! - [`runtime`]: serving with health, reflection and a graceful shutdown,
//!   the gRPC message limits ([`sized!`]); [`health`]: the health service;
//!   [`connection`]: shedding by connection (pausing a flooding one, a
//!   bound on each peer's connection setups); [`load`]: whether the
//!   process is short of CPU.
//! - [`errors`]: field violations and the one mapping of storage failures
//!   to status codes; [`paging`]: page sizes and page tokens.
//! - [`backup`]: a consistent copy of a process's embedded stores.
//! - [`clock`]: the one wall clock.
//! - [`handled`]: what a handler reports to the layers around it (usage
//!   and cost).
//! - [`ids`]: tenant ids.
//! - [`entitlements`]: what each plan includes; [`alerts`]: usage alerts
//!   and the billing period.

pub mod alerts;
pub mod audit;
pub mod backup;
pub mod clock;
pub mod config;
pub mod connection;
pub mod entitlements;
pub mod errors;
pub mod handled;
pub mod health;
pub mod ids;
pub mod load;
pub mod paging;
pub mod runtime;
pub mod tiers;

pub use ids::validate_tenant_id;
