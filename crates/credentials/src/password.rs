//! Password hashing policy: argon2id with configurable cost, PHC strings.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};

/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password accepted (argon2 input is bounded on purpose).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for HashParams {
    /// The OWASP baseline for argon2id: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        Self { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 }
    }
}

impl HashParams {
    /// `TENANTMESH_ARGON2_M_KIB`, `TENANTMESH_ARGON2_T`, `TENANTMESH_ARGON2_P`,
    /// checked by argon2 itself.
    pub fn from_env(
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Self, tenantmesh_service::config::ConfigError> {
        use tenantmesh_service::config::{ConfigError, parse_var};
        let d = Self::default();
        let params = Self {
            m_cost_kib: parse_var(env, "TENANTMESH_ARGON2_M_KIB", d.m_cost_kib)?,
            t_cost: parse_var(env, "TENANTMESH_ARGON2_T", d.t_cost)?,
            p_cost: parse_var(env, "TENANTMESH_ARGON2_P", d.p_cost)?,
        };
        hasher(params).map_err(|e| ConfigError { var: "TENANTMESH_ARGON2_M_KIB", message: e.to_string() })?;
        Ok(params)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    #[error("hashing failed: {0}")]
    Hash(String),
}

fn hasher(params: HashParams) -> Result<Argon2<'static>, PasswordError> {
    let p = Params::new(params.m_cost_kib, params.t_cost, params.p_cost, None)
        .map_err(|e| PasswordError::Params(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
}

/// Hashes `password` into an argon2id PHC string.
pub fn hash(password: &str, params: HashParams) -> Result<String, PasswordError> {
    let hash: argon2::password_hash::phc::PasswordHash =
        hasher(params)?.hash_password(password.as_bytes()).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches `phc` (parameters are read from the string).
pub fn verify(password: &str, phc: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), phc).is_ok()
}

/// Whether `phc` is a well-formed argon2id PHC string.
pub fn is_argon2id_phc(phc: &str) -> bool {
    phc.starts_with("$argon2id$") && argon2::password_hash::phc::PasswordHash::new(phc).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_roundtrip() {
        let params = HashParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 };
        let h = hash("correct horse battery", params).unwrap();
        assert!(is_argon2id_phc(&h), "{h}");
        assert!(h.contains("m=1024,t=1,p=1"), "{h}");
        assert!(verify("correct horse battery", &h));
        assert!(!verify("wrong horse battery", &h));
        assert!(!is_argon2id_phc("plaintext"));
        assert!(!is_argon2id_phc("$argon2i$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaA"));
    }
}
