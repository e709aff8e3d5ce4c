//! Tiers and the isolation model each maps to (the built-in default).

use tenantmesh_proto::registry::v1::IsolationModel;

/// Every known tier, cheapest first.
pub const TIERS: &[&str] = &["basic", "standard", "premium", "enterprise"];

/// The isolation model of `tier`, or `None` for an unknown tier.
pub fn isolation_model(tier: &str) -> Option<IsolationModel> {
    match tier {
        "basic" | "standard" => Some(IsolationModel::Pool),
        "premium" => Some(IsolationModel::Bridge),
        "enterprise" => Some(IsolationModel::Silo),
        _ => None,
    }
}

/// A field violation message for an unknown tier.
pub fn unknown_tier_message() -> String {
    format!("must be one of {}", TIERS.join(", "))
}
