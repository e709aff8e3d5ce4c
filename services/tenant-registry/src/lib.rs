//! The tenant registry: the system of record for tenants (id, name, tier,
//! isolation model, lifecycle status). It also answers the tenant-context
//! layer's lookups for its own requests straight from its store, and keeps
//! the catalog of the application services that joined the mesh, and the
//! audit log of every change to them ([`audit`]).

pub mod audit;
mod catalog;
mod config;
mod error;
mod handlers;
mod registry;
mod serve;

pub use catalog::SERVICES_PK;
pub use config::Config;
pub use error::RegistryError;
pub use registry::{MAX_TENANT_WATCHERS, Registry, TENANTS_PK};
pub use serve::serve;
