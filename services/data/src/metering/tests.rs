//! Unit tests of [`super`].

use super::*;
use tenantmesh_proto::registry::v1::TenantStatus;

fn window(meter: &str, start: i64, dims: &[(&str, &str)], value: i64) -> WindowUsage {
    WindowUsage {
        meter: meter.into(),
        start,
        dimensions: dims.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        value,
    }
}

#[test]
fn exports_in_every_format() {
    let rows = usage_rows(
        "acme",
        vec![window("emails", 0, &[("plan", "a")], 2), window("emails", 0, &[("plan", "b")], 3)],
        3600,
    );
    assert_eq!(export_header(ExportFormat::Csv), Some("tenant_id,meter,window_start,window_end,value,dimensions"));
    assert_eq!(export_header(ExportFormat::Jsonl), None);
    let csv = export_lines(&rows, ExportFormat::Csv);
    assert_eq!(csv, ["acme,emails,0,3600,2,plan=a", "acme,emails,0,3600,3,plan=b"]);
    let jsonl = export_lines(&rows, ExportFormat::Jsonl);
    let first: serde_json::Value = serde_json::from_str(&jsonl[0]).unwrap();
    assert_eq!(first["dimensions"]["plan"], "a");
    let mp = export_lines(&rows, ExportFormat::Marketplace);
    assert_eq!(mp.len(), 1);
    let r: serde_json::Value = serde_json::from_str(&mp[0]).unwrap();
    assert_eq!(
        (r["CustomerIdentifier"].as_str(), r["Dimension"].as_str(), r["Quantity"].as_i64()),
        (Some("acme"), Some("emails"), Some(5))
    );
    assert_eq!(r["UsageAllocations"][1]["Tags"][0], serde_json::json!({"Key": "plan", "Value": "b"}));
}

#[test]
fn events_are_checked_field_by_field() {
    let ok = UsageEvent {
        id: "e-1".into(),
        tenant_id: "acme".into(),
        meter: "emails".into(),
        value: 1,
        time: 1000,
        dimensions: [("plan".to_owned(), "gold".to_owned())].into(),
        correction: false,
    };
    let mut v = Violations::new();
    check_event(&mut v, 0, &ok, 1000, 3600);
    assert!(v.check().is_ok());
    let mut v = Violations::new();
    check_event(&mut v, 0, &UsageEvent { value: -5, correction: true, ..ok.clone() }, 1000, 3600);
    assert!(v.check().is_ok(), "a correction may be negative (who may send one is the handler's check)");
    for (bad, field) in [
        (UsageEvent { id: String::new(), ..ok.clone() }, "events[0].id"),
        (UsageEvent { meter: "requests".into(), ..ok.clone() }, "events[0].meter"),
        (UsageEvent { meter: "Emails".into(), ..ok.clone() }, "events[0].meter"),
        (UsageEvent { time: 1000 - 3601, ..ok.clone() }, "events[0].time"),
        (UsageEvent { time: 1000 + 301, ..ok.clone() }, "events[0].time"),
        (UsageEvent { tenant_id: "A".into(), ..ok.clone() }, "events[0].tenant_id"),
        (UsageEvent { value: -1, ..ok.clone() }, "events[0].value"),
        (UsageEvent { value: MAX_EVENT_VALUE + 1, correction: true, ..ok.clone() }, "events[0].value"),
        (
            UsageEvent { dimensions: [("plan".to_owned(), "a,b".to_owned())].into(), ..ok.clone() },
            "events[0].dimensions[plan]",
        ),
    ] {
        let mut v = Violations::new();
        check_event(&mut v, 0, &bad, 1000, 3600);
        let status = v.check().unwrap_err();
        let details = tonic_types::StatusExt::get_details_bad_request(&status).unwrap();
        assert_eq!(details.field_violations[0].field, field, "{status:?}");
    }
}

#[test]
fn cost_counts_the_hours_each_dedicated_resource_was_held_in_the_period() {
    let pricing = Pricing::default();
    let mut t = Tenant {
        tenant_id: "acme".into(),
        tier: "enterprise".into(),
        isolation_model: IsolationModel::Silo as i32,
        status: TenantStatus::Active as i32,
        create_time: 3600,
        ..Default::default()
    };
    let resource = |kind: &str, create_time: i64, remove_time: i64| TenantResource {
        kind: kind.into(),
        create_time,
        remove_time,
        ..Default::default()
    };
    // A bridge table from 1 h to 2 h, then a silo table and instance
    // from 2 h on; the period is [0, 4 h) and it is 10 h now.
    let resources = [
        resource("table", 3600, 7200),
        resource("table", 7200, 0),
        resource("silo_instance", 7200, 0),
        TenantResource { bytes: 2_000_000_000, ..resource("export", 0, 0) },
    ];
    let rows = [window("requests", 0, &[], 1000)];
    let c = price(&pricing, &t, &rows, &resources, 0, 4 * 3600, 10 * 3600);
    let held = |c: &TenantCost, item: &str| c.lines.iter().find(|l| l.item == item).map(|l| l.quantity);
    assert_eq!((held(&c, DEDICATED_TABLE), held(&c, SILO_INSTANCE)), (Some(3.0), Some(2.0)));
    // A 2 GB export kept the whole 4 hours.
    assert_eq!(held(&c, EXPORT_GB_HOURS), Some(8.0));
    assert_eq!(c.revenue, 1499.0 * 4.0 / 730.0);
    assert!((c.margin - (c.revenue - c.cost)).abs() < 1e-9);
    // Before the resources existed: none of their hours.
    let early = price(&pricing, &t, &rows, &resources, 0, 1800, 10 * 3600);
    assert_eq!((held(&early, DEDICATED_TABLE), held(&early, SILO_INSTANCE)), (None, None));
    t.tier = "basic".into();
    t.isolation_model = IsolationModel::Pool as i32;
    let c = price(&pricing, &t, &rows, &[], 0, 4 * 3600, 10 * 3600);
    assert_eq!(held(&c, DEDICATED_TABLE), None);
    assert!(c.margin < 0.0, "a free tier with usage costs more than it pays");
}
