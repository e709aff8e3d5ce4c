//! The data service: a tenant's items, keyed `pk = <tenant id>`,
//! `sk = <collection>#<id>`. The tenant always comes from the verified
//! [`TenantContext`](tenantmesh_tenant_context::TenantContext), never from the request, so no request can name
//! another tenant's items; and every storage call goes through the store
//! [`TenantStores`](tenantmesh_isolation::TenantStores) hands out for that tenant, confined by the tenant's
//! session policy (checked locally on the embedded backend; vended STS
//! credentials plus a request guard on DynamoDB), so even a bug here cannot
//! reach another tenant's partition.
//!
//! Placement: a pool tenant's items are in the pooled table; a bridge
//! tenant's in its dedicated table; a silo tenant's in its dedicated table
//! behind its own data-service instance (`TENANTMESH_SILO_TENANT`), to which
//! this service forwards the tenant's calls with their context (same token,
//! the trace continued, what is left of the deadline) by the application
//! crate's silo layer, which meters each with the units the instance
//! reports. While a tier change moves a tenant (status MIGRATING),
//! reads are served and writes are UNAVAILABLE with RetryInfo.
//!
//! The fence: a service that has not yet seen MIGRATING (its cached record
//! is older) would still write, so the status alone cannot keep a late
//! write out of a copy. Every PutItem and DeleteItem is therefore one
//! atomic step with a check of the tenant's fence item ([`FENCE_SK`]) in
//! the table it writes to; a workflow raises that fence (`SetFence`) before
//! it copies or exports, and from then on a write to the old table is
//! refused (UNAVAILABLE with RetryInfo) instead of landing where no copy
//! will see it. The client's retry reaches the new placement.
//!
//! Hard monthly entitlements and usage alerts: [`monthly`].
//!
//! [`DataAdminService`](admin::DataAdminService) is the lifecycle side, for the onboarding workflows
//! only: provision and drop dedicated tables, export, import and purge.

pub mod admin;
mod config;
mod error;
mod items;
mod keys;
pub mod metering;
pub mod monthly;
mod serve;
pub mod storage_meter;

pub use config::Config;
pub use error::DataError;
pub use items::DataService;
pub use keys::{FENCE_SK, MAX_ITEM_BYTES, reserved_sort_key};
pub use serve::{LEASES_TABLE, USAGE_TABLE, open_store, serve};
/// Each tenant's change history (kept by the application crate, which
/// every service's tables share).
pub use tenantmesh_app::{history, quota};
