//! Tenant ids: safe in keys, table names, tags and policy documents; and
//! the names of application services and their tables.

/// Checks a tenant id against `^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$`, so it is safe in
/// keys, table names, tags and policy documents.
pub fn validate_tenant_id(id: &str) -> Result<(), &'static str> {
    let bytes = id.as_bytes();
    if !(3..=63).contains(&bytes.len()) {
        return Err("must be 3 to 63 characters");
    }
    if !bytes[0].is_ascii_lowercase() && !bytes[0].is_ascii_digit() {
        return Err("must start with a lowercase letter or digit");
    }
    if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    // Kubernetes label values (a silo tenant's manifests) end alphanumeric.
    if bytes.last() == Some(&b'-') {
        return Err("must end with a lowercase letter or digit");
    }
    Ok(())
}

/// Longest name of an application service or of one of its tables.
pub const MAX_SERVICE_NAME_LEN: usize = 40;

/// Whether `name` may name an application service or one of its tables:
/// 1-[`MAX_SERVICE_NAME_LEN`] of a-z, 0-9 and -, starting with a letter
/// (safe in table names, metric names and event ids).
pub fn valid_service_name(name: &str) -> bool {
    name.len() <= MAX_SERVICE_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_pattern() {
        for ok in ["orders", "a", "a-1", &"a".repeat(40)] {
            assert!(valid_service_name(ok), "{ok}");
        }
        for bad in ["", "Orders", "9lives", "a_b", "a.b", &"a".repeat(41)] {
            assert!(!valid_service_name(bad), "{bad}");
        }
    }

    #[test]
    fn tenant_id_pattern() {
        for ok in ["acme", "abc", "a-1", "0ab", &"a".repeat(63)] {
            assert!(validate_tenant_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "-ab", "abc-", "Acme", "ac me", "a*b", "a\"b", "a#b", "acme_1", &"a".repeat(64), "ümlaut"]
        {
            assert!(validate_tenant_id(bad).is_err(), "{bad}");
        }
    }
}
