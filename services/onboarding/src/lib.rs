//! The onboarding service: the durable workflows of a tenant's life,
//! run against the registry, auth and data services as a platform service
//! identity.
//!
//! - Onboarding: create the tenant record -> (silo) provision its
//!   data-service instance -> provision its storage -> create its admin
//!   user -> apply its tier's limits -> activate.
//! - Tier change: pause writes -> provision the target -> copy items ->
//!   switch the placement atomically -> apply limits -> drain -> remove the
//!   old copy (or just switch the tier when the model stays).
//! - Offboarding: suspend -> export items to JSONL -> delete items ->
//!   delete dedicated resources -> delete users -> mark deleted.
//!
//! Every registered application service (the service catalog) takes part
//! in each of these through its `TenantLifecycle` ([`hooks`]): one step per
//! service next to the data step it mirrors (provision, fence, copy,
//! export, rewind, purge), with the same retries, rollback and crash
//! guarantees; a failed one is shown with the service's name.
//!
//! The crate is in three parts: [`engine`] runs workflows (persist after
//! every step, retry with backoff, FAILED with the reason, resume after a
//! restart) and knows nothing of what steps do; [`steps`] does them; the
//! gRPC handlers (`handlers.rs`) turn requests into workflows. One
//! workflow runs per tenant at a time (an `_active` record, written in the
//! same transaction as the workflow, guards it).

mod catch_up;
pub mod compute;
mod config;
pub mod engine;
mod error;
mod events;
pub mod export;
pub mod faults;
pub mod gitops;
mod handlers;
pub mod hooks;
pub mod resources;
mod serve;
mod service;
pub mod steps;
mod views;
pub mod workflow;

pub use config::Config;
pub use error::OnboardingError;
pub use serve::serve;
pub use service::{Dependencies, OnboardingService};
