//! Build a tenant-aware gRPC service that joins a tenantmesh.
//!
//! A team's own service (orders, invoices, documents: where its tenants'
//! work happens) gets from this crate what the mesh's own services have:
//!
//! - **The request pipeline**: every call is authenticated against the
//!   mesh's issuer (or the tenant's own identity provider), checked against
//!   the policy its RPC declares in the service's proto
//!   (`tenantmesh.options.v1.policy`: roles, scopes, charge, meter), held
//!   to its tenant's rate and in-flight limits and fair-queue share (on
//!   DynamoDB shared across the service's replicas, [`replicas`]), and
//!   traced and logged with its tenant. An RPC without a policy stops the
//!   service at start-up ([`AppError::Policies`] names it).
//! - **Metering**: each call of an RPC that declares `METER_USAGE` is
//!   counted for its tenant (requests by RPC, handler time, and the units a
//!   handler reports with [`Handled`]) and flushed to the metering service
//!   as `<service>.<meter>` usage, with the service's own identity; a
//!   retried flush counts once. The pricing file prices those meters like
//!   any other.
//! - **The service catalog**: on start, a service with an identity
//!   registers itself with the control plane (name, endpoint, gRPC
//!   services, tables), idempotently, retrying until the registry answers.
//! - **Health, reflection, backup, graceful shutdown**: `grpc.health.v1`
//!   per service, server reflection for `grpcurl`, the mesh's `Backup`
//!   service over the service's local store, and draining in-flight calls
//!   on shutdown.
//! - **Tenant-scoped tables** ([`Tables`]): each call gets a view of a
//!   table confined to the caller's tenant, by the same session policy
//!   (`dynamodb:LeadingKeys`), scoped STS credentials and in-process guard
//!   as the data service, on the embedded store or DynamoDB, in the table
//!   the tenant's tier places it in (the pooled one, or the tenant's own).
//!   Every write is logged in the tenant's change [`history`], checked
//!   against its write fence and held to its storage [`quota`]; stored
//!   bytes are metered (`<service>.storage_byte_hours`) and the history
//!   trimmed to the tier's days. Handler code never passes a tenant id.
//! - **The tenant's lifecycle**: the service serves
//!   `tenantmesh.lifecycle.v1.TenantLifecycle` ([`LIFECYCLE`]) for its
//!   declared tables (provision, fence, export, import, rewind, purge), so
//!   the control plane's workflows (onboarding, tier changes, restores,
//!   offboarding, and a catch-up for tenants that existed before it)
//!   include it as durable steps.
//! - **Silo instances**: started for one silo tenant
//!   (`TENANTMESH_SILO_TENANT`), an instance serves that tenant alone and
//!   registers as its instance; the shared instance forwards that tenant's
//!   calls to it by itself, per call, whatever the RPC (the call as it
//!   came: token, tenant, trace, deadline), metered once, to the unit, with
//!   the usage the instance reports ([`silo::SiloLayer`], which the data
//!   service uses too).
//! - **Calls to other services** ([`client`]) that carry the caller's
//!   token, tenant, trace and deadline.
//!
//! ```no_run
//! use tenantmesh_app::App;
//! # async fn run(descriptor_set: &'static [u8], routes: tonic::service::Routes) -> Result<(), tenantmesh_app::AppError> {
//! let env: std::collections::HashMap<String, String> = std::env::vars().collect();
//! let app = App::new("orders", descriptor_set)?.table("orders")?.configure(&env)?;
//! let listener = tokio::net::TcpListener::bind(app.listen_addr()).await?;
//! // `routes`: the service's generated servers, built from `ctx.tables()`.
//! app.serve(listener, tenantmesh_app::shutdown_signal(), |_ctx| Ok(routes)).await
//! # }
//! ```
//!
//! What a service declares and where: its RPCs' policies in its proto
//! (import `tenantmesh/options/v1/options.proto`, compile with a file
//! descriptor set, hand the set to [`App::new`]); its tables' names to
//! [`App::table`]; its settings in the environment (see [`App::configure`]).

mod app;
pub mod client;
mod error;
pub mod history;
mod lifecycle;
mod metering;
pub mod quota;
pub mod replicas;
pub mod silo;
mod tables;
mod upkeep;

pub use app::{App, Context, DEFAULT_PORT, LIFECYCLE};
pub use error::AppError;
pub use tables::{MAX_KEY_LEN, TableError, Tables, TenantTable, storage_status};

/// The caller of the current request: its tenant, roles and placement.
pub use tenantmesh_tenant_context::TenantContext;

/// Field violations answered as INVALID_ARGUMENT with a `BadRequest`.
pub use tenantmesh_service::errors::Violations;

/// Completes on SIGINT or SIGTERM: a service's shutdown signal.
pub use tenantmesh_service::runtime::shutdown_signal;

/// A generated client or server with both message limits set to the
/// mesh's (`sized!(OrdersServer::new(orders))`).
pub use tenantmesh_service::sized;

/// What a handler reports in its response: the units it read and wrote
/// (metered, and charged by admission for `CHARGE_UNITS` RPCs).
pub use tenantmesh_service::handled::{Cost, Handled, Usage};

/// Stored items and write conditions of [`TenantTable`].
pub use tenantmesh_storage::{Condition, Item, Page, StorageError};

/// The mesh's own gRPC contracts (clients of the data service, the
/// registry, ...), to call them with [`client::connect`].
pub use tenantmesh_proto as mesh;

/// Telemetry set-up for a service's `main` (`telemetry::init`).
pub use tenantmesh_telemetry as telemetry;
