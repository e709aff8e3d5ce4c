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
//!   policy before it reaches the store.
#![forbid(unsafe_code)]

pub mod eval;
pub mod policy;
pub mod scoped;

pub use eval::{Decision, RequestContext, evaluate};
pub use policy::{Placement, PolicyDocument, PolicyError, tenant_policy};
pub use scoped::ScopedTable;
