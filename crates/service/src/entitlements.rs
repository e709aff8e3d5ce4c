//! Entitlements: what a tier's plan includes beyond its isolation model
//! and limits, declared per tier in the tiers file (`[tier.entitlements]`)
//! and checked in-process where each feature is used, from the tier the
//! caller's tenant record (cached) names: no call to anyone.
//!
//! - `restore`, `export`, `external_idp` (booleans, default granted): a
//!   restore to an instant, a restore into an export, binding the tenant's
//!   own identity provider. Refused: PERMISSION_DENIED with a google.rpc
//!   `ErrorInfo` (reason `FEATURE_NOT_ENTITLED`, the feature named).
//! - `max_users` (default unlimited): creating a user past it is
//!   RESOURCE_EXHAUSTED with `ErrorInfo` (reason `ENTITLEMENT_EXHAUSTED`)
//!   and a `QuotaFailure`.
//! - `max_items` (default unlimited): the data service refuses a new
//!   item past it (an overwrite or a delete is never refused), with the
//!   same details as `max_users`.
//! - `requests`, `write_units` (metered, per calendar month UTC; default
//!   uncapped): `{ per_month = N, hard = true|false }`. Hard: once the
//!   month's usage reaches N, the data service refuses the tenant's calls
//!   (`requests`) or writes (`write_units`) until the month ends, with the
//!   same details as `max_users`; soft: only reported (and what a usage
//!   alert's percentage is of).

use serde::Deserialize;
use tenantmesh_proto::registry::v1::EntitlementOverride;

/// The error domain of entitlement refusals.
pub const DOMAIN: &str = "tenantmesh.io";

/// A tier's plan. Absent from a tier: everything granted, nothing capped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default = "granted")]
    pub restore: bool,
    #[serde(default = "granted")]
    pub export: bool,
    #[serde(default = "granted")]
    pub external_idp: bool,
    /// At most this many users in a tenant (its admin included).
    #[serde(default)]
    pub max_users: Option<u64>,
    /// At most this many items in the data service.
    #[serde(default)]
    pub max_items: Option<u64>,
    /// Requests per calendar month (every metered RPC of every service).
    #[serde(default)]
    pub requests: Option<Metered>,
    /// Write units per calendar month (a unit per KiB written).
    #[serde(default)]
    pub write_units: Option<Metered>,
}

/// A monthly quantity of a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metered {
    pub per_month: u64,
    /// Refused past `per_month` (else only reported).
    #[serde(default)]
    pub hard: bool,
}

/// A metered feature: a meter counted per calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeteredFeature {
    Requests,
    WriteUnits,
}

impl MeteredFeature {
    pub const ALL: [MeteredFeature; 2] = [MeteredFeature::Requests, MeteredFeature::WriteUnits];

    /// Its name, which is also its meter's.
    pub fn as_str(self) -> &'static str {
        match self {
            MeteredFeature::Requests => "requests",
            MeteredFeature::WriteUnits => "write_units",
        }
    }

    pub fn of(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

fn granted() -> bool {
    true
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            restore: true,
            export: true,
            external_idp: true,
            max_users: None,
            max_items: None,
            requests: None,
            write_units: None,
        }
    }
}

/// A feature a plan grants or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Restore,
    Export,
    ExternalIdp,
}

impl Feature {
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Restore => "restore",
            Feature::Export => "export",
            Feature::ExternalIdp => "external_idp",
        }
    }
}

/// Every feature a plan holds, by name.
pub const FEATURES: [&str; 7] =
    ["restore", "export", "external_idp", "max_users", "max_items", "requests", "write_units"];

impl Feature {
    fn of(name: &str) -> Option<Self> {
        match name {
            "restore" => Some(Feature::Restore),
            "export" => Some(Feature::Export),
            "external_idp" => Some(Feature::ExternalIdp),
            _ => None,
        }
    }
}

/// The violations of an override (`field` names it in them).
pub fn check_override(v: &mut crate::errors::Violations, field: &str, o: &EntitlementOverride) {
    match o.feature.as_str() {
        name @ ("max_users" | "max_items" | "requests" | "write_units") => {
            if o.limit.is_none_or(|l| l == 0) {
                v.add(&format!("{field}.limit"), format!("must be at least 1 for {name}"));
            }
            if o.granted.is_some() {
                v.add(&format!("{field}.granted"), "is for restore, export and external_idp");
            }
            if o.hard.is_some() && matches!(name, "max_users" | "max_items") {
                v.add(&format!("{field}.hard"), "is for requests and write_units");
            }
        }
        name if Feature::of(name).is_some() => {
            if o.granted.is_none() {
                v.add(&format!("{field}.granted"), format!("is required for {name}"));
            }
            if o.limit.is_some() {
                v.add(&format!("{field}.limit"), "is for max_users, max_items, requests and write_units");
            }
            if o.hard.is_some() {
                v.add(&format!("{field}.hard"), "is for requests and write_units");
            }
        }
        _ => {
            v.add(&format!("{field}.feature"), format!("must be one of {}", FEATURES.join(", ")));
        }
    }
}

impl Plan {
    /// This plan with a tenant's `overrides` applied.
    pub fn with(&self, overrides: &[EntitlementOverride]) -> Plan {
        let mut plan = self.clone();
        for o in overrides {
            match (o.feature.as_str(), o.granted, o.limit) {
                ("restore", Some(g), _) => plan.restore = g,
                ("export", Some(g), _) => plan.export = g,
                ("external_idp", Some(g), _) => plan.external_idp = g,
                ("max_users", _, Some(l)) => plan.max_users = Some(l),
                ("max_items", _, Some(l)) => plan.max_items = Some(l),
                (name, _, Some(per_month)) => {
                    if let Some(f) = MeteredFeature::of(name) {
                        let slot = plan.metered_mut(f);
                        let hard = o.hard.unwrap_or(slot.is_some_and(|m| m.hard));
                        *slot = Some(Metered { per_month, hard });
                    }
                }
                _ => {}
            }
        }
        plan
    }

    /// The plan's monthly quantity of `feature`, if it caps it.
    pub fn metered(&self, feature: MeteredFeature) -> Option<Metered> {
        match feature {
            MeteredFeature::Requests => self.requests,
            MeteredFeature::WriteUnits => self.write_units,
        }
    }

    fn metered_mut(&mut self, feature: MeteredFeature) -> &mut Option<Metered> {
        match feature {
            MeteredFeature::Requests => &mut self.requests,
            MeteredFeature::WriteUnits => &mut self.write_units,
        }
    }

    /// Whether the plan grants `feature`.
    pub fn grants(&self, feature: Feature) -> bool {
        match feature {
            Feature::Restore => self.restore,
            Feature::Export => self.export,
            Feature::ExternalIdp => self.external_idp,
        }
    }

    /// `Ok` when the plan of `tier` grants `feature`; otherwise the
    /// refusal (PERMISSION_DENIED, `ErrorInfo` naming the feature).
    pub fn check(&self, feature: Feature, tier: &str) -> Result<(), tonic::Status> {
        if self.grants(feature) {
            return Ok(());
        }
        use tonic_types::{ErrorDetails, StatusExt};
        let metadata = [("feature".to_owned(), feature.as_str().to_owned()), ("tier".to_owned(), tier.to_owned())];
        let details = ErrorDetails::with_error_info("FEATURE_NOT_ENTITLED", DOMAIN, metadata);
        Err(tonic::Status::with_error_details(
            tonic::Code::PermissionDenied,
            format!("tier {tier} does not include {}: change tier, or ask the operator", feature.as_str()),
            details,
        ))
    }

    /// `Ok` when a tenant with `users` users may have one more; otherwise
    /// RESOURCE_EXHAUSTED with `ErrorInfo` and a `QuotaFailure`.
    pub fn check_users(&self, tenant: &str, tier: &str, users: u64) -> Result<(), tonic::Status> {
        let Some(max) = self.max_users.filter(|max| users >= *max) else { return Ok(()) };
        use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};
        let mut details = ErrorDetails::with_error_info(
            "ENTITLEMENT_EXHAUSTED",
            DOMAIN,
            [("feature".to_owned(), "max_users".to_owned()), ("tier".to_owned(), tier.to_owned())],
        );
        details.set_quota_failure(vec![QuotaViolation::new(format!("tenant:{tenant}"), format!("max_users {max}"))]);
        Err(tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            format!("tier {tier} includes at most {max} users ({users} exist): delete one, or change tier"),
            details,
        ))
    }
}

/// The refusal of a call past a hard monthly quantity of `feature`
/// (RESOURCE_EXHAUSTED, `ErrorInfo` and a `QuotaFailure`).
pub fn metered_refusal(tenant: &str, feature: MeteredFeature, per_month: u64) -> tonic::Status {
    use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};
    let name = feature.as_str();
    let mut details = ErrorDetails::with_error_info(
        "ENTITLEMENT_EXHAUSTED",
        DOMAIN,
        [("feature".to_owned(), name.to_owned()), ("reset_period".to_owned(), "month".to_owned())],
    );
    details
        .set_quota_failure(vec![QuotaViolation::new(format!("tenant:{tenant}"), format!("{name} {per_month}/month"))]);
    let what = match feature {
        MeteredFeature::Requests => "calls",
        MeteredFeature::WriteUnits => "writes",
    };
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "the tenant's plan includes {per_month} {name} a month and this month's are used: \
             {what} are refused until the month ends (UTC), or the operator raises it"
        ),
        details,
    )
}

/// A tenant's entitlements as `GetEntitlements` answers them: the plan of
/// `tier` with `overrides`, `users` (how many it has, when counted) and
/// `monthly` (this month's usage of the metered features, when read).
pub fn listed(
    tier: &crate::tiers::Tier,
    overrides: &[EntitlementOverride],
    users: Option<u64>,
    monthly: &[(MeteredFeature, u64)],
) -> Vec<tenantmesh_proto::auth::v1::Entitlement> {
    use tenantmesh_proto::auth::v1::{Entitlement, EntitlementKind, EntitlementSource};
    let plan = tier.entitlements.with(overrides);
    let source = |feature: &str| {
        if overrides.iter().any(|o| o.feature == feature) {
            EntitlementSource::Override
        } else {
            EntitlementSource::Tier
        }
    };
    let metered = |feature: MeteredFeature| {
        let m = plan.metered(feature);
        let used = monthly.iter().find(|(f, _)| *f == feature).map(|(_, used)| *used);
        Entitlement {
            feature: feature.as_str().into(),
            kind: EntitlementKind::Metered as i32,
            granted: m.is_none_or(|m| !m.hard || used.is_none_or(|u| u < m.per_month)),
            limit: m.map(|m| m.per_month),
            used,
            reset_period: "month".into(),
            source: source(feature.as_str()) as i32,
            hard: m.is_some_and(|m| m.hard),
        }
    };
    let boolean = |feature: Feature| Entitlement {
        feature: feature.as_str().into(),
        kind: EntitlementKind::Boolean as i32,
        granted: plan.grants(feature),
        source: source(feature.as_str()) as i32,
        ..Default::default()
    };
    vec![
        boolean(Feature::Restore),
        boolean(Feature::Export),
        boolean(Feature::ExternalIdp),
        Entitlement {
            feature: "max_users".into(),
            kind: EntitlementKind::Numeric as i32,
            granted: plan.max_users.is_none_or(|max| users.is_none_or(|u| u < max)),
            limit: plan.max_users,
            used: users,
            source: source("max_users") as i32,
            ..Default::default()
        },
        metered(MeteredFeature::Requests),
        metered(MeteredFeature::WriteUnits),
        Entitlement {
            feature: "max_items".into(),
            kind: EntitlementKind::Numeric as i32,
            granted: true,
            limit: plan.max_items,
            source: source("max_items") as i32,
            ..Default::default()
        },
        Entitlement {
            feature: "history_days".into(),
            kind: EntitlementKind::Numeric as i32,
            granted: true,
            limit: Some(u64::from(tier.history_days)),
            source: EntitlementSource::Tier as i32,
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn metered_refusals_say_when_they_end() {
        let refused = metered_refusal("acme", MeteredFeature::WriteUnits, 1000);
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let details = refused.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["feature"].as_str()), ("ENTITLEMENT_EXHAUSTED", "write_units"));
        assert_eq!(info.metadata["reset_period"], "month");
        assert_eq!(details.quota_failure().unwrap().violations[0].description, "write_units 1000/month");
        assert!(refused.message().contains("writes are refused until the month ends"), "{}", refused.message());
    }

    #[test]
    fn refusals_name_the_feature() {
        let plan = Plan { restore: false, max_users: Some(2), ..Plan::default() };
        assert!(plan.check(Feature::Export, "basic").is_ok());
        let refused = plan.check(Feature::Restore, "basic").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let info = refused.get_error_details().error_info().cloned().unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["feature"].as_str()), ("FEATURE_NOT_ENTITLED", "restore"));
        assert!(plan.check_users("acme", "basic", 1).is_ok());
        let full = plan.check_users("acme", "basic", 2).unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        let details = full.get_error_details();
        assert_eq!(details.error_info().unwrap().metadata["feature"], "max_users");
        assert_eq!(details.quota_failure().unwrap().violations[0].subject, "tenant:acme");
        assert!(Plan::default().check_users("acme", "basic", u64::MAX - 1).is_ok(), "unlimited by default");
    }

    #[test]
    fn overrides_apply_feature_by_feature_and_are_checked() {
        let plan = Plan { restore: false, max_users: Some(2), ..Plan::default() };
        let o = |feature: &str, granted: Option<bool>, limit: Option<u64>| EntitlementOverride {
            feature: feature.into(),
            granted,
            limit,
            hard: None,
        };
        let with = plan.with(&[o("restore", Some(true), None), o("max_users", None, Some(10))]);
        assert!(with.restore && with.max_users == Some(10) && with.export);
        assert_eq!(plan.with(&[]), plan);
        // A metered override keeps the tier's hardness unless it says.
        let metered = Plan { write_units: Some(Metered { per_month: 5, hard: true }), ..Plan::default() };
        let raised = metered.with(&[o("write_units", None, Some(50))]);
        assert_eq!(raised.write_units, Some(Metered { per_month: 50, hard: true }));
        let soft = metered.with(&[EntitlementOverride { hard: Some(false), ..o("write_units", None, Some(50)) }]);
        assert_eq!(soft.write_units, Some(Metered { per_month: 50, hard: false }));
        let new = Plan::default().with(&[o("requests", None, Some(9))]);
        assert_eq!(new.requests, Some(Metered { per_month: 9, hard: false }), "soft unless said");
        for (bad, field) in [
            (o("max_users", None, None), "o.limit"),
            (o("max_users", Some(true), Some(3)), "o.granted"),
            (o("restore", None, None), "o.granted"),
            (o("export", Some(true), Some(1)), "o.limit"),
            (o("gold", Some(true), None), "o.feature"),
            (o("write_units", None, None), "o.limit"),
            (o("requests", Some(true), Some(3)), "o.granted"),
            (EntitlementOverride { hard: Some(true), ..o("max_users", None, Some(3)) }, "o.hard"),
            (EntitlementOverride { hard: Some(true), ..o("restore", Some(true), None) }, "o.hard"),
        ] {
            let mut v = crate::errors::Violations::new();
            check_override(&mut v, "o", &bad);
            let status = v.check().unwrap_err();
            assert!(format!("{status:?}").contains(field), "{bad:?}: {status:?}");
        }
    }
}
