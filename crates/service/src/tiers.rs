//! Tiers: each tier's isolation model and limits, from a TOML file
//! (`TENANTMESH_TIERS_FILE`) or the built-in default (`tiers.toml` in this
//! crate: basic and standard pool, premium bridge, enterprise silo).

use std::path::Path;

use serde::Deserialize;
use tenantmesh_proto::registry::v1::{IsolationModel, TenantLimits};

/// The built-in tiers file.
pub const DEFAULT_TIERS_TOML: &str = include_str!("../tiers.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Isolation {
    Pool,
    Bridge,
    Silo,
}

/// One tier of the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub name: String,
    isolation: Isolation,
    pub requests_per_second: u32,
    pub burst: u32,
    pub max_concurrency: u32,
    pub storage_quota_bytes: u64,
    /// The tier's share of a saturated service (fair queuing), relative to
    /// the other tiers'; 1 when unset.
    #[serde(default = "one")]
    pub weight: u32,
    /// How long each tenant's change history is kept: how far back
    /// RestoreTenant reaches (default 7 days).
    #[serde(default = "seven")]
    pub history_days: u32,
    /// Whether the tenant's own admins may call RestoreTenant (default:
    /// platform admins only).
    #[serde(default)]
    pub tenant_restore: bool,
    /// How many times its storage quota a tenant's change history may
    /// hold (default 2): past that, its puts are refused until the history
    /// ages out.
    #[serde(default = "two")]
    pub history_quota_multiple: u32,
    /// How long the export of a tenant's items that a restore into an
    /// export or an offboarding writes is kept before it is deleted
    /// (default 7 days); it is billed while it is kept.
    #[serde(default = "seven")]
    pub export_retention_days: u32,
    /// How long a tenant's audit events are kept (default 365 days); older
    /// ones are purged, the purge itself recorded.
    #[serde(default = "year")]
    pub audit_retention_days: u32,
    /// What the tier's plan includes (`[tier.entitlements]`; absent:
    /// everything, no cap). See [`crate::entitlements`].
    #[serde(default)]
    pub entitlements: crate::entitlements::Plan,
}

fn year() -> u32 {
    365
}

fn one() -> u32 {
    1
}

fn two() -> u32 {
    2
}

fn seven() -> u32 {
    7
}

impl Tier {
    pub fn model(&self) -> IsolationModel {
        match self.isolation {
            Isolation::Pool => IsolationModel::Pool,
            Isolation::Bridge => IsolationModel::Bridge,
            Isolation::Silo => IsolationModel::Silo,
        }
    }

    /// The history's retention in microseconds.
    pub fn history_us(&self) -> i64 {
        i64::from(self.history_days) * 86_400 * 1_000_000
    }

    /// The cap on a tenant's change history when its storage quota is
    /// `storage_quota_bytes` (its own, or the tier's).
    pub fn history_quota(&self, storage_quota_bytes: u64) -> u64 {
        storage_quota_bytes.saturating_mul(u64::from(self.history_quota_multiple))
    }

    /// How long audit events are kept, in microseconds.
    pub fn audit_retention_us(&self) -> i64 {
        i64::from(self.audit_retention_days) * 86_400 * 1_000_000
    }

    /// How long an export is kept, in seconds.
    pub fn export_retention_secs(&self) -> i64 {
        i64::from(self.export_retention_days) * 86_400
    }

    pub fn limits(&self) -> TenantLimits {
        TenantLimits {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
            max_concurrency: self.max_concurrency,
            storage_quota_bytes: self.storage_quota_bytes,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tier: Vec<Tier>,
}

/// The tiers in effect, cheapest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    tiers: Vec<Tier>,
}

#[derive(Debug, thiserror::Error)]
#[error("tiers file {source_name}: {message}")]
pub struct TiersError {
    pub source_name: String,
    pub message: String,
}

impl Default for Tiers {
    fn default() -> Self {
        Self::parse(DEFAULT_TIERS_TOML, "(built in)").expect("the built-in tiers file is valid")
    }
}

impl Tiers {
    /// Reads and checks a tiers file.
    pub fn load(path: &Path) -> Result<Self, TiersError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TiersError { source_name: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks tiers TOML; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, TiersError> {
        let err = |message: String| TiersError { source_name: source_name.to_owned(), message };
        let file: File = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if file.tier.is_empty() {
            return Err(err("defines no [[tier]]".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &file.tier {
            let name_ok = (1..=32).contains(&t.name.len())
                && t.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
            if !name_ok {
                return Err(err(format!("tier name {:?} must be 1-32 of a-z 0-9 -", t.name)));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(err(format!("tier {:?} is defined twice", t.name)));
            }
            if t.requests_per_second == 0
                || t.burst == 0
                || t.max_concurrency == 0
                || t.storage_quota_bytes == 0
                || t.weight == 0
                || t.history_quota_multiple == 0
            {
                return Err(err(format!("tier {:?}: every limit must be above 0", t.name)));
            }
            if t.entitlements.max_users == Some(0) {
                return Err(err(format!("tier {:?}: entitlements.max_users must be at least 1 (its admin)", t.name)));
            }
            if t.entitlements.max_items == Some(0) {
                return Err(err(format!("tier {:?}: entitlements.max_items must be at least 1", t.name)));
            }
            for f in crate::entitlements::MeteredFeature::ALL {
                if t.entitlements.metered(f).is_some_and(|m| m.per_month == 0) {
                    let name = f.as_str();
                    return Err(err(format!("tier {:?}: entitlements.{name}.per_month must be at least 1", t.name)));
                }
            }
        }
        Ok(Self { tiers: file.tier })
    }

    /// The largest tier weight (the platform's share of a saturated service).
    pub fn max_weight(&self) -> u32 {
        self.tiers.iter().map(|t| t.weight).max().unwrap_or(1)
    }

    /// The tiers' names, cheapest first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|t| t.name.as_str())
    }

    pub fn get(&self, tier: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == tier)
    }

    /// The longest audit retention of any tier, in days: what the
    /// platform's own chain and a tenant no longer known keep.
    pub fn longest_audit_retention_days(&self) -> u32 {
        self.tiers.iter().map(|t| t.audit_retention_days).max().unwrap_or(365)
    }

    /// The isolation model of `tier`, or `None` for an unknown tier.
    pub fn isolation_model(&self, tier: &str) -> Option<IsolationModel> {
        self.get(tier).map(Tier::model)
    }

    /// A field violation message for an unknown tier.
    pub fn unknown_tier_message(&self) -> String {
        let names: Vec<&str> = self.names().collect();
        format!("must be one of {}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_maps_tiers_to_models() {
        let t = Tiers::default();
        assert_eq!(t.isolation_model("basic"), Some(IsolationModel::Pool));
        assert_eq!(t.isolation_model("standard"), Some(IsolationModel::Pool));
        assert_eq!(t.isolation_model("premium"), Some(IsolationModel::Bridge));
        assert_eq!(t.isolation_model("enterprise"), Some(IsolationModel::Silo));
        assert_eq!(t.isolation_model("gold"), None);
        assert_eq!(t.unknown_tier_message(), "must be one of basic, standard, premium, enterprise");
        assert_eq!(t.get("premium").unwrap().limits().requests_per_second, 200);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let one = |extra: &str| {
            format!(
                "[[tier]]\nname = \"gold\"\nisolation = \"silo\"\nrequests_per_second = 1\nburst = 1\n\
                 max_concurrency = 1\nstorage_quota_bytes = 1\n{extra}"
            )
        };
        let t = Tiers::parse(&one(""), "t.toml").unwrap();
        assert_eq!(t.isolation_model("gold"), Some(IsolationModel::Silo));
        for (text, expect) in [
            ("".to_owned(), "missing field `tier`"),
            ("tier = []".to_owned(), "defines no [[tier]]"),
            (one("colour = \"red\""), "unknown field `colour`"),
            (one("").replace("silo", "shared"), "unknown variant `shared`"),
            (one("").replace("gold", "Gold!"), "must be 1-32 of a-z 0-9 -"),
            (one("").replace("burst = 1", "burst = 0"), "every limit must be above 0"),
            (format!("{}\n{}", one(""), one("")), "defined twice"),
        ] {
            let e = Tiers::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(e.starts_with("tiers file t.toml: ") && e.contains(expect), "{text:?}: {e}");
        }
    }
}
