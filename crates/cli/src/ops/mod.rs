//! The operator's commands (`tenantmesh login`, `tenant`, `user`,
//! `workflow`, `usage`, `cost`): the mesh's APIs without writing JSON.

pub mod client;
pub mod commands;
pub mod output;
pub mod progress;
pub mod session;
pub mod views;
pub mod when;

pub use client::CliError;
pub use commands::{OpsCommand, run};
