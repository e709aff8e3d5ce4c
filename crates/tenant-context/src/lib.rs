//! The tenant context: the one cross-cutting concern every tenantmesh service
//! shares.
//!
//! - [`server::layer`] validates the bearer JWT (signature against the auth
//!   service's JWKS, `exp`, `nbf`, `iss`, `aud`, algorithm allow-list), refuses
//!   a mismatching `x-tenant-id`, checks the caller's roles against the
//!   RPC's policy, declared in its proto ([`access`]), loads the tenant's
//!   tier and status from the registry (cached), refuses suspended tenants
//!   and admits the call under its tenant's limits. It puts a
//!   [`TenantContext`] in the request extensions and runs the handler
//!   inside a task-local scope holding it.
//! - [`meter::layer`] counts each metered call for its tenant, from what
//!   the handler reports ([`tenantmesh_service::handled::Handled`]).
//!   [`server::stack`] stacks both, and refuses to when an RPC declares no
//!   policy.
//! - [`client::layer`] wraps every outgoing channel: it injects the current
//!   context's token and tenant id (or a service token) and the W3C
//!   `traceparent`, and fails closed when it has neither.

pub mod access;
pub mod admission;
pub mod audit;
pub mod authorize;
pub mod client;
pub mod context;
pub mod directory;
pub mod external;
pub mod identity;
pub mod metadata;
pub mod meter;
pub mod server;
pub mod verify;
pub mod webhook;

pub use context::TenantContext;
pub use identity::{Claims, Grant, PLATFORM_TENANT, PLATFORM_TIER, Role, Scope};
