//! Usage alerts: a tenant's thresholds on its monthly usage of a meter
//! (`UsageAlert` in the tenant's record), what they are checked against,
//! and the billing period (the calendar month, UTC).
//!
//! The registry validates them ([`check_alert`]); the data service, which
//! reads every tenant's usage, decides when one is crossed
//! ([`threshold`]) and fires it once per period.

use tenantmesh_proto::registry::v1::UsageAlert;
use tenantmesh_proto::registry::v1::usage_alert::Threshold;

use crate::entitlements::{MeteredFeature, Plan};
use crate::errors::Violations;

/// The meters an alert may watch: the built-in meters counted per call.
pub const METERS: [&str; 5] = ["requests", "read_units", "write_units", "bytes_returned", "compute_us"];
/// Alerts one tenant may hold.
pub const MAX_ALERTS: usize = 20;
/// The largest percentage (10x the entitlement).
pub const MAX_PERCENT: u32 = 1000;

/// The billing period holding `secs` (Unix seconds): `[start, end)` of its
/// calendar month, UTC.
pub fn period(secs: i64) -> (i64, i64) {
    let (y, m, _) = crate::clock::civil_from_days(secs.div_euclid(86_400));
    let start = crate::clock::days_from_civil(y, m, 1) * 86_400;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, crate::clock::days_from_civil(ny, nm, 1) * 86_400)
}

/// A period's name: `2026-12`.
pub fn period_name(start: i64) -> String {
    let (y, m, _) = crate::clock::civil_from_days(start.div_euclid(86_400));
    format!("{y:04}-{m:02}")
}

fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The violations of an alert `a` (named `field`) for a tenant on `plan`.
pub fn check_alert(v: &mut Violations, field: &str, a: &UsageAlert, plan: &Plan) {
    if !valid_id(&a.alert_id) {
        v.add(&format!("{field}.alert_id"), "must match ^[a-z0-9][a-z0-9-]{0,31}$");
    }
    if !METERS.contains(&a.meter.as_str()) {
        v.add(&format!("{field}.meter"), format!("must be one of {}", METERS.join(", ")));
    }
    match a.threshold {
        None => {
            v.add(&format!("{field}.threshold"), "is required: percent or absolute");
        }
        Some(Threshold::Absolute(0)) => {
            v.add(&format!("{field}.absolute"), "must be at least 1");
        }
        Some(Threshold::Absolute(_)) => {}
        Some(Threshold::Percent(p)) => {
            if p == 0 || p > MAX_PERCENT {
                v.add(&format!("{field}.percent"), format!("must be 1 to {MAX_PERCENT}"));
            }
            match MeteredFeature::of(&a.meter) {
                None if METERS.contains(&a.meter.as_str()) => {
                    let msg = format!("is of a monthly entitlement (requests, write_units); {} has none", a.meter);
                    v.add(&format!("{field}.percent"), msg);
                }
                Some(f) if plan.metered(f).is_none() => {
                    let msg =
                        format!("the tenant's plan has no monthly {} to take a percentage of: use absolute", a.meter);
                    v.add(&format!("{field}.percent"), msg);
                }
                _ => {}
            }
        }
    }
}

/// The usage at which `a` fires for a tenant on `plan`: `None` for a
/// percentage of a quantity the plan no longer caps.
pub fn threshold(a: &UsageAlert, plan: &Plan) -> Option<u64> {
    match a.threshold? {
        Threshold::Absolute(n) => Some(n.max(1)),
        Threshold::Percent(p) => {
            let of = plan.metered(MeteredFeature::of(&a.meter)?)?.per_month;
            // Rounded up: 50% of 3 fires at 2, never before half is used.
            let at = (u128::from(of) * u128::from(p)).div_ceil(100);
            Some(u64::try_from(at).unwrap_or(u64::MAX).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entitlements::Metered;

    fn alert(id: &str, meter: &str, threshold: Option<Threshold>) -> UsageAlert {
        UsageAlert { alert_id: id.into(), meter: meter.into(), threshold, create_time: 0 }
    }

    #[test]
    fn periods_are_calendar_months() {
        // 2026-12-07T17:00:00Z
        let (start, end) = period(1_796_662_800);
        assert_eq!(
            (crate::clock::rfc3339(start), crate::clock::rfc3339(end)),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        assert_eq!(period_name(start), "2026-12");
        assert_eq!(period(start), (start, end), "a period's first second is in it");
        assert_eq!(period(end - 1).1, end);
        let (feb, mar) = period(crate::clock::days_from_civil(2028, 2, 29) * 86_400);
        assert_eq!((mar - feb) / 86_400, 29, "a leap February");
    }

    #[test]
    fn thresholds_are_absolute_or_a_share_of_the_plan() {
        let plan = Plan { write_units: Some(Metered { per_month: 3, hard: false }), ..Plan::default() };
        assert_eq!(threshold(&alert("a", "write_units", Some(Threshold::Percent(50))), &plan), Some(2));
        assert_eq!(threshold(&alert("a", "write_units", Some(Threshold::Percent(100))), &plan), Some(3));
        assert_eq!(threshold(&alert("a", "requests", Some(Threshold::Percent(50))), &plan), None);
        assert_eq!(threshold(&alert("a", "read_units", Some(Threshold::Absolute(7))), &plan), Some(7));
        let huge = Plan { requests: Some(Metered { per_month: u64::MAX, hard: true }), ..Plan::default() };
        assert_eq!(threshold(&alert("a", "requests", Some(Threshold::Percent(1000))), &huge), Some(u64::MAX));
    }

    #[test]
    fn bad_alerts_name_their_field() {
        let plan = Plan { write_units: Some(Metered { per_month: 10, hard: true }), ..Plan::default() };
        let ok = [
            alert("warn-50", "write_units", Some(Threshold::Percent(50))),
            alert("big", "read_units", Some(Threshold::Absolute(1))),
        ];
        for a in ok {
            let mut v = Violations::new();
            check_alert(&mut v, "alert", &a, &plan);
            assert!(v.is_empty(), "{a:?}");
        }
        for (a, field) in [
            (alert("", "requests", Some(Threshold::Absolute(1))), "alert.alert_id"),
            (alert("Upper", "requests", Some(Threshold::Absolute(1))), "alert.alert_id"),
            (alert(&"a".repeat(33), "requests", Some(Threshold::Absolute(1))), "alert.alert_id"),
            (alert("a", "gold", Some(Threshold::Absolute(1))), "alert.meter"),
            (alert("a", "requests", None), "alert.threshold"),
            (alert("a", "requests", Some(Threshold::Absolute(0))), "alert.absolute"),
            (alert("a", "write_units", Some(Threshold::Percent(0))), "alert.percent"),
            (alert("a", "write_units", Some(Threshold::Percent(1001))), "alert.percent"),
            (alert("a", "requests", Some(Threshold::Percent(50))), "alert.percent"),
            (alert("a", "read_units", Some(Threshold::Percent(50))), "alert.percent"),
        ] {
            let mut v = Violations::new();
            check_alert(&mut v, "alert", &a, &plan);
            let status = v.check().unwrap_err();
            assert_eq!(crate::errors::violated_fields(&status), vec![field.to_owned()], "{a:?}");
        }
    }
}
