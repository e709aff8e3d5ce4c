//! Runtime tenant isolation: "make unauthorized access architecturally
//! impossible, not merely prohibited by policy".
//!
//! - [`policy`] builds the IAM session policy for a tenant's placement with
//!   serde (never string templates): the data actions on its table, limited
//!   by `ForAllValues:StringEquals` on `dynamodb:LeadingKeys` to the
//!   tenant's own partition key.
//! - [`eval`] evaluates the IAM subset those policies use, so the same
//!   document is enforced locally where AWS does not enforce it.
//! - [`scoped::ScopedTable`] checks every storage call against the tenant's
//!   policy before it reaches the store (embedded backend).
//! - [`vend`] gets tenant-scoped credentials from STS with that policy,
//!   cached so steady-state requests make no STS call, and [`guard`] checks
//!   every DynamoDB request of a tenant's client before it is sent.
//! - [`stores`] hands out a tenant's view of the data store on either backend.

pub mod aws;
pub mod backend;
pub mod eval;
pub mod guard;
pub mod policy;
pub mod scoped;
pub mod stores;
pub mod vend;

pub use eval::{Decision, RequestContext, evaluate};
pub use policy::{Placement, PolicyDocument, PolicyError, tenant_policy};
pub use scoped::ScopedTable;
pub use stores::{DynamoStores, EmbeddedStores, TenantStores};
