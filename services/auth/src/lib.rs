//! The auth service: users of every tenant with argon2id password hashes,
//! persisted Ed25519 signing keys published as a JWKS, login, service
//! tokens for platform services, and the bootstrap platform admin.

pub mod anonymous;
mod config;
mod error;
pub mod expiry;
mod expiry_index;
pub mod keys;
pub mod lockout;
mod refresh;
mod secrets;
mod serve;
mod service;

pub use config::{
    BOOTSTRAP_PASSWORD_FILE, Config, DEFAULT_BOOTSTRAP_EMAIL, MAX_CLIENT_ID_LEN, ServiceClient, valid_client_id,
};
pub use error::AuthError;
pub use keys::SigningKeys;
pub use serve::serve;
pub use service::{AuthService, jwks_requests};
