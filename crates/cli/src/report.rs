//! `tenantmesh cost-report`: every tenant's cost to serve, what its tier
//! pays and the margin, lowest margin first (the Metering service's
//! ListTenantCosts, as a table).

use tenantmesh_proto::metering::v1::metering_client::MeteringClient;
use tenantmesh_proto::metering::v1::{ListTenantCostsRequest, TenantCost};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Asks the metering service at `addr` (the data service) for every
/// tenant's cost over `[from, to)` with `token` (a platform admin's).
pub async fn fetch(addr: &str, token: &str, from: i64, to: i64) -> Result<Vec<TenantCost>, BoxError> {
    let channel = tonic::transport::Endpoint::from_shared(crate::ops::client::url(addr))?.connect().await?;
    let mut request = tonic::Request::new(ListTenantCostsRequest { from, to });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let costs = MeteringClient::new(channel)
        .list_tenant_costs(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(costs.into_inner().tenants)
}

/// The report as text: a line about the period, then one row per tenant.
pub fn render(costs: &[TenantCost], from: i64, to: i64) -> String {
    let currency = costs.first().map_or("", |c| c.currency.as_str());
    let mut out = format!(
        "cost to serve from {from} to {to} (Unix seconds, {} h){}, lowest margin first\n",
        (to - from) / 3600,
        if currency.is_empty() { String::new() } else { format!(", in {currency}") }
    );
    out.push_str(&format!(
        "{:<24} {:<12} {:<7} {:>14} {:>14} {:>14}\n",
        "TENANT", "TIER", "MODEL", "COST", "REVENUE", "MARGIN"
    ));
    for c in costs {
        out.push_str(&format!(
            "{:<24} {:<12} {:<7} {:>14.6} {:>14.6} {:>14.6}{}\n",
            c.tenant_id,
            c.tier,
            c.isolation,
            c.cost,
            c.revenue,
            c.margin,
            if c.margin < 0.0 { "  costs more than it pays" } else { "" }
        ));
    }
    if costs.is_empty() {
        out.push_str("(no tenants)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_in_the_order_given_with_losses_flagged() {
        let cost = |id: &str, margin: f64| TenantCost {
            tenant_id: id.into(),
            tier: "basic".into(),
            isolation: "pool".into(),
            cost: 1.0,
            revenue: 1.0 + margin,
            margin,
            currency: "USD".into(),
            ..Default::default()
        };
        let text = render(&[cost("loss", -0.5), cost("gain", 2.0)], 0, 7200);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("2 h") && lines[0].contains("USD"), "{text}");
        assert!(lines[1].starts_with("TENANT"), "{text}");
        assert!(lines[2].starts_with("loss") && lines[2].ends_with("costs more than it pays"), "{text}");
        assert!(lines[3].starts_with("gain") && lines[3].contains("2.000000"), "{text}");
    }
}
