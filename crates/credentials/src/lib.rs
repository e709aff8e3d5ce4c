//! The credential rules shared by the auth service (which keeps users)
//! and onboarding (which creates each tenant's admin): what an email and a
//! password must be, and how passwords are hashed ([`password`]), on a
//! bounded pool of threads of their own ([`pool`]).

pub mod password;
pub mod pool;

pub use password::HashParams;
pub use pool::{HashPool, PoolError, PoolSettings};
use tenantmesh_service::errors::Violations;

/// Longest email address accepted (RFC 5321's path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// The canonical form of an email (trimmed, lower-case) used as user key.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// Checks a normalized email address.
pub fn check_email(v: &mut Violations, field: &str, email: &str) {
    if email.is_empty() {
        v.add(field, "is required");
    } else if email.len() > MAX_EMAIL_LEN
        || email.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#')
        || !email.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
    {
        v.add(field, "must be an email address such as user@example.com");
    }
}

/// Checks a clear-text password against the length policy.
pub fn check_password(v: &mut Violations, field: &str, password: &str) {
    let n = password.chars().count();
    if n < password::MIN_PASSWORD_LEN {
        v.add(field, format!("must be at least {} characters", password::MIN_PASSWORD_LEN));
    } else if password.len() > password::MAX_PASSWORD_LEN {
        v.add(field, format!("must be at most {} bytes", password::MAX_PASSWORD_LEN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_passwords() {
        let fields = |f: &dyn Fn(&mut Violations)| {
            let mut v = Violations::new();
            f(&mut v);
            v.is_empty()
        };
        assert_eq!(normalize_email("  Admin@Acme.Example "), "admin@acme.example");
        assert!(fields(&|v| check_email(v, "email", "admin@acme.example")));
        for bad in ["", "no-at-sign", "@acme", "a@", "a b@c.d", "a#b@c.d", &format!("{}@x.y", "a".repeat(260))] {
            assert!(!fields(&|v| check_email(v, "email", bad)), "{bad:?}");
        }
        assert!(fields(&|v| check_password(v, "password", "twelve chars")));
        assert!(!fields(&|v| check_password(v, "password", "short")));
        assert!(!fields(&|v| check_password(v, "password", &"x".repeat(1025))));
    }
}
