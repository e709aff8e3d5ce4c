//! What each page shows, gathered from the mesh's APIs with the signed-in
//! user's token; each is also served as JSON (the page's twin, for
//! scripts and tests).

use serde::Serialize;
use tenantmesh_proto::auth::v1::User;
use tenantmesh_proto::metering::v1::TenantCost;
use tenantmesh_proto::onboarding::v1::{TenantResource, Workflow};
use tenantmesh_proto::registry::v1::Tenant;

pub use tenantmesh_proto::names::{model, role, step_state, tenant_status, workflow_status};

/// `secs` as `2026-12-07T09:30:00Z`; 0 as `-` (by reference, as the
/// templates pass it).
pub fn time(secs: &i64) -> String {
    if *secs == 0 { "-".into() } else { tenantmesh_service::clock::rfc3339(*secs) }
}

#[derive(Serialize, Debug, Clone)]
pub struct TenantRow {
    pub tenant_id: String,
    pub name: String,
    pub status: &'static str,
    pub tier: String,
    pub model: &'static str,
    /// Over the fleet's period.
    pub requests: i64,
    pub requests_per_minute: f64,
    /// Calls refused by a limit over the period.
    pub refused: i64,
    /// The 99th percentile of the service's time per request (from
    /// admission to the handler's answer) over the period, as a bucket's
    /// bound (`<= 2.5 ms`); `-` without requests. Filled for the rows shown.
    pub p99: String,
    pub cost: f64,
    pub revenue: f64,
    pub margin: f64,
}

impl TenantRow {
    pub fn new(t: &Tenant, cost: Option<&TenantCost>, minutes: f64) -> Self {
        let quantity = |item: &str| {
            cost.and_then(|c| c.lines.iter().find(|l| l.item == item)).map_or(0, |l| l.quantity.round() as i64)
        };
        let requests = quantity("requests");
        TenantRow {
            tenant_id: t.tenant_id.clone(),
            name: t.name.clone(),
            status: tenant_status(t.status),
            tier: t.tier.clone(),
            model: model(t.isolation_model),
            requests,
            requests_per_minute: (requests as f64 / minutes.max(1.0) * 10.0).round() / 10.0,
            refused: quantity("refused"),
            p99: "-".into(),
            cost: cost.map_or(0.0, |c| c.cost),
            revenue: cost.map_or(0.0, |c| c.revenue),
            margin: cost.map_or(0.0, |c| c.margin),
        }
    }
}

/// Columns the fleet sorts by.
pub const SORTS: [&str; 8] = ["tenant", "status", "tier", "requests", "refused", "cost", "revenue", "margin"];

/// Sorts `rows` by `key` (one of [`SORTS`]; margin ascending and the
/// numbers descending by default, `desc` flips).
pub fn sort_rows(rows: &mut [TenantRow], key: &str, desc: bool) {
    let cmp_f = |a: f64, b: f64| a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal);
    rows.sort_by(|a, b| {
        let order = match key {
            "status" => a.status.cmp(b.status),
            "tier" => a.tier.cmp(&b.tier),
            "requests" => a.requests.cmp(&b.requests),
            "refused" => a.refused.cmp(&b.refused),
            "cost" => cmp_f(a.cost, b.cost),
            "revenue" => cmp_f(a.revenue, b.revenue),
            "margin" => cmp_f(a.margin, b.margin),
            _ => std::cmp::Ordering::Equal,
        };
        order.then_with(|| a.tenant_id.cmp(&b.tenant_id))
    });
    if desc {
        rows.reverse();
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct Fleet {
    pub hours: i64,
    pub from: i64,
    pub to: i64,
    pub currency: String,
    pub total: usize,
    pub page: usize,
    pub pages: usize,
    pub sort: String,
    pub desc: bool,
    pub rows: Vec<TenantRow>,
    pub top_by_requests: Vec<TenantRow>,
    pub top_by_cost: Vec<TenantRow>,
}

/// Rows per fleet page.
pub const PAGE: usize = 100;

impl Fleet {
    /// The fleet page `page` (from 1) of `rows`, sorted by `sort`.
    pub fn new(
        mut rows: Vec<TenantRow>,
        hours: i64,
        to: i64,
        currency: String,
        sort: &str,
        desc: bool,
        page: usize,
    ) -> Self {
        let sort = if SORTS.contains(&sort) { sort } else { "tenant" };
        let total = rows.len();
        let pages = total.div_ceil(PAGE).max(1);
        let page = page.clamp(1, pages);
        let mut by_requests = rows.clone();
        sort_rows(&mut by_requests, "requests", true);
        by_requests.truncate(5);
        by_requests.retain(|r| r.requests > 0);
        let mut by_cost = rows.clone();
        sort_rows(&mut by_cost, "cost", true);
        by_cost.truncate(5);
        by_cost.retain(|r| r.cost > 0.0);
        sort_rows(&mut rows, sort, desc);
        let rows = rows.into_iter().skip((page - 1) * PAGE).take(PAGE).collect();
        Fleet {
            hours,
            from: to - hours * 3600,
            to,
            currency,
            total,
            page,
            pages,
            sort: sort.to_owned(),
            desc,
            rows,
            top_by_requests: by_requests,
            top_by_cost: by_cost,
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct StepView {
    pub index: usize,
    pub name: String,
    pub service: String,
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: String,
    pub detail: String,
}

/// One audit event of a tenant, as its page lists it.
#[derive(Serialize, Debug, Clone)]
pub struct ChangeView {
    /// The log it is in (registry, auth, onboarding), and its place there.
    pub service: String,
    pub sequence: u64,
    pub time: i64,
    pub who: String,
    pub action: String,
    pub outcome: &'static str,
    pub change: String,
}

impl From<&tenantmesh_proto::audit::v1::AuditEvent> for ChangeView {
    fn from(e: &tenantmesh_proto::audit::v1::AuditEvent) -> Self {
        ChangeView {
            service: e.service.clone(),
            sequence: e.sequence,
            time: e.time_us / 1_000_000,
            who: e.actor.as_ref().map(|a| a.subject.clone()).unwrap_or_default(),
            action: e.action.clone(),
            outcome: tenantmesh_proto::names::outcome(e.outcome),
            change: tenantmesh_proto::names::audit_change(e),
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct WorkflowView {
    pub workflow_id: String,
    pub kind: String,
    pub tenant_id: String,
    pub status: &'static str,
    pub error: String,
    pub export_path: String,
    pub create_time: i64,
    pub update_time: i64,
    pub steps: Vec<StepView>,
}

impl From<&Workflow> for WorkflowView {
    fn from(w: &Workflow) -> Self {
        WorkflowView {
            workflow_id: w.workflow_id.clone(),
            kind: w.kind.clone(),
            tenant_id: w.tenant_id.clone(),
            status: workflow_status(w.status),
            error: w.error.clone(),
            export_path: w.export_path.clone(),
            create_time: w.create_time,
            update_time: w.update_time,
            steps: w
                .steps
                .iter()
                .enumerate()
                .map(|(index, s)| StepView {
                    index,
                    name: s.name.clone(),
                    service: s.service.clone(),
                    state: step_state(s.state),
                    attempts: s.attempts,
                    last_error: s.last_error.clone(),
                    detail: s.detail.clone(),
                })
                .collect(),
        }
    }
}

impl WorkflowView {
    pub fn running(&self) -> bool {
        self.status == "RUNNING"
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct Point {
    pub t: i64,
    pub v: i64,
}

#[derive(Serialize, Debug, Clone)]
pub struct MeterUsage {
    pub meter: String,
    pub total: i64,
    pub window_secs: i64,
    pub points: Vec<Point>,
}

#[derive(Serialize, Debug, Clone)]
pub struct CostLineView {
    pub item: String,
    pub quantity: f64,
    pub unit_price: f64,
    pub cost: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct CostView {
    pub cost: f64,
    pub revenue: f64,
    pub margin: f64,
    pub currency: String,
    pub lines: Vec<CostLineView>,
}

impl From<&TenantCost> for CostView {
    fn from(c: &TenantCost) -> Self {
        CostView {
            cost: c.cost,
            revenue: c.revenue,
            margin: c.margin,
            currency: c.currency.clone(),
            lines: c
                .lines
                .iter()
                .map(|l| CostLineView {
                    item: l.item.clone(),
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                    cost: l.cost,
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct UserView {
    pub email: String,
    pub roles: Vec<&'static str>,
    pub disabled: bool,
    pub create_time: i64,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        let roles = u.roles.iter().map(|r| role(*r)).collect();
        UserView { email: u.email.clone(), roles, disabled: u.disabled, create_time: u.create_time }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ResourceView {
    pub kind: String,
    pub name: String,
    pub create_time: i64,
    pub tags: Vec<String>,
}

impl From<&TenantResource> for ResourceView {
    fn from(r: &TenantResource) -> Self {
        let mut tags: Vec<String> = r.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        tags.sort();
        ResourceView { kind: r.kind.clone(), name: r.name.clone(), create_time: r.create_time, tags }
    }
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct LimitsView {
    pub requests_per_second: u32,
    pub burst: u32,
    pub max_concurrency: u32,
    pub storage_quota_bytes: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct TenantPage {
    pub tenant: TenantRow,
    pub create_time: i64,
    pub version: u64,
    pub table: String,
    pub instance: String,
    pub limits: LimitsView,
    pub hours: i64,
    pub from: i64,
    pub to: i64,
    pub usage: Vec<MeterUsage>,
    /// Calls refused over the period, by the limit that refused them.
    pub refusals: Vec<(String, i64)>,
    /// Requests over the period by the bucket of their time (upper bound
    /// in microseconds, `u64::MAX` for the last), and the percentiles read
    /// from them.
    pub latency: Vec<(u64, i64)>,
    pub p50: String,
    pub p99: String,
    pub cost: CostView,
    pub users: Vec<UserView>,
    pub workflows: Vec<WorkflowView>,
    /// Its last changes, from the registry's audit log (oldest first).
    pub changes: Vec<ChangeView>,
    pub resources: Vec<ResourceView>,
    /// Its restore points: any instant from `restore_from` to now (its
    /// tier keeps `history_days` of change history, and none before the
    /// tenant existed); whether its own admins may restore.
    pub restore_from: i64,
    pub history_days: u32,
    pub tenant_restore: bool,
}

pub use tenantmesh_metering::latency::quantile;

#[cfg(test)]
mod tests {

    use super::*;

    fn row(id: &str, requests: i64, margin: f64) -> TenantRow {
        TenantRow {
            tenant_id: id.into(),
            name: id.into(),
            status: "ACTIVE",
            tier: "basic".into(),
            model: "pool",
            requests,
            requests_per_minute: 0.0,
            refused: 0,
            p99: "-".into(),
            cost: requests as f64,
            revenue: 1.0,
            margin,
        }
    }

    #[test]
    fn the_fleet_sorts_pages_and_ranks() {
        let rows: Vec<TenantRow> = (0..250).map(|i| row(&format!("t{i:03}"), i, 1.0 - i as f64)).collect();
        let fleet = Fleet::new(rows.clone(), 1, 3600, "USD".into(), "margin", false, 3);
        assert_eq!((fleet.total, fleet.pages, fleet.page, fleet.rows.len()), (250, 3, 3, 50));
        assert_eq!(fleet.rows[0].tenant_id, "t049", "lowest margin first: page 3 holds the 50 highest");
        assert_eq!(fleet.top_by_requests[0].tenant_id, "t249");
        assert_eq!(fleet.top_by_requests.len(), 5);
        let fleet = Fleet::new(rows, 1, 3600, "USD".into(), "bogus", false, 99);
        assert_eq!((fleet.sort.as_str(), fleet.page, fleet.rows[0].tenant_id.as_str()), ("tenant", 3, "t200"));
        let empty = Fleet::new(Vec::new(), 1, 3600, String::new(), "tenant", false, 1);
        assert_eq!((empty.pages, empty.rows.len(), empty.top_by_cost.len()), (1, 0, 0));
        assert_eq!(time(&951_782_400), "2000-02-29T00:00:00Z");
    }
}
