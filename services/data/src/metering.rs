//! The `tenantmesh.metering.v1.Metering` service: usage and cost per
//! tenant.
//!
//! It is hosted by the data service, because that is where usage is
//! measured (every data operation, for the caller's tenant) and flushed,
//! and where it is read back: the usage table (`<prefix>usage`, or
//! `usage.redb` in the data dir) is the data service's own, so reading it
//! needs no new process, deployment or credentials, and it scales with the
//! data-service replicas. Tenant records (tier, placement, age) come from
//! the registry, asked with the caller's own token, so the registry's
//! rules about who may see a tenant apply here too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tenantmesh_metering::meters::BUILT_IN;
use tenantmesh_metering::pricing::{DEDICATED_TABLE, EXPORT_GB_HOURS, Pricing, SILO_INSTANCE};
use tenantmesh_metering::usage::{self as metering, Event, EventOutcome, Read, ReadError, WindowUsage};
use tenantmesh_proto::metering::v1::metering_server::Metering;
use tenantmesh_proto::metering::v1::*;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::onboarding::v1::{ListTenantResourcesRequest, TenantResource};
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{GetTenantRequest, IsolationModel, Tenant};
use tenantmesh_service::errors::{Violations, invalid_field, storage_status};
use tenantmesh_storage::DynTable;
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::client::PropagatedChannel;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events per RecordUsage call.
pub const MAX_EVENTS: usize = 500;
/// The largest quantity of one event, either way: sums of a year of
/// events stay far from overflowing.
pub const MAX_EVENT_VALUE: i64 = 1_000_000_000_000;
/// Windows per GetUsage answer, and per export.
pub const MAX_WINDOWS: i64 = 10_000;
pub const MAX_EXPORT_WINDOWS: i64 = 100_000;
/// The longest range any metering call reads: a year and then some.
pub const MAX_RANGE_SECS: i64 = 400 * 86_400;
/// Rows (windows x meters x dimension sets) one GetUsage answer, one cost,
/// or one day of an export holds at most: what a read keeps in memory.
pub const MAX_ROWS: usize = 100_000;
/// An export is read and sent a day at a time (every window divides a day).
const EXPORT_SPAN_SECS: i64 = 86_400;
/// How far ahead of the service's clock an event may be.
pub const MAX_FUTURE_SECS: i64 = 300;
const MAX_DIMENSIONS: usize = 8;
const MAX_GROUP_BY: usize = 8;
/// An export is streamed in chunks of about this many bytes.
const CHUNK_BYTES: usize = 64 * 1024;

pub struct MeteringService {
    table: DynTable,
    pricing: Arc<Pricing>,
    grace: Duration,
    registry: TenantRegistryClient<PropagatedChannel>,
    onboarding: OnboardingClient<PropagatedChannel>,
    /// The registry as the data service itself (its service identity),
    /// when it has one: whether the tenants an event names exist is asked
    /// with it, so a metering writer needs no right to read tenants.
    own_registry: Option<TenantRegistryClient<PropagatedChannel>>,
    /// How long an export waits for its client to read before it ends.
    stall: Duration,
}

impl MeteringService {
    /// `registry`, `onboarding`: clients that send the caller's own
    /// identity.
    pub fn new(
        table: DynTable,
        pricing: Arc<Pricing>,
        grace: Duration,
        registry: TenantRegistryClient<PropagatedChannel>,
        onboarding: OnboardingClient<PropagatedChannel>,
    ) -> Self {
        Self { table, pricing, grace, registry, onboarding, own_registry: None, stall: Duration::from_secs(30) }
    }

    /// How long an export waits for its client to read before it ends
    /// (`TENANTMESH_STREAM_STALL_MS`).
    pub fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Asks whether the tenants of recorded events exist as the data
    /// service itself (`registry` sends its service identity).
    pub fn with_own_registry(mut self, registry: TenantRegistryClient<PropagatedChannel>) -> Self {
        self.own_registry = Some(registry);
        self
    }

    /// Whether `tenant_id` exists (asked as the data service when it has
    /// an identity, else as the caller).
    async fn exists(&self, tenant_id: &str) -> Result<bool, Status> {
        let mut registry = self.own_registry.clone().unwrap_or_else(|| self.registry.clone());
        match registry.get_tenant(GetTenantRequest { tenant_id: tenant_id.to_owned() }).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(s),
        }
    }

    /// Every resource `tenant` held alone, removed ones included.
    async fn resources(&self, tenant: &str) -> Result<Vec<TenantResource>, Status> {
        let req = ListTenantResourcesRequest { tenant_id: tenant.to_owned(), include_removed: true };
        Ok(self.onboarding.clone().list_tenant_resources(req).await?.into_inner().resources)
    }

    async fn tenant(&self, tenant_id: &str) -> Result<Tenant, Status> {
        let req = GetTenantRequest { tenant_id: tenant_id.to_owned() };
        let tenant = self.registry.clone().get_tenant(req).await?.into_inner().tenant;
        tenant.ok_or_else(|| Status::internal("the registry answered without a tenant"))
    }

    async fn cost(&self, tenant: &Tenant, from: i64, to: i64) -> Result<TenantCost, Status> {
        let resources = self.resources(&tenant.tenant_id).await?;
        let rows = totals(&self.table, &tenant.tenant_id, from, to).await?;
        Ok(price(&self.pricing, tenant, &rows, &resources, from, to, tenantmesh_service::clock::now_secs()))
    }
}

/// `tenant`'s total of every meter over `[from, to)`: a row per meter.
async fn totals(table: &DynTable, tenant: &str, from: i64, to: i64) -> Result<Vec<WindowUsage>, Status> {
    let read = Read { meter: None, from, to, window: i64::MAX, group_by: Some(&[]), max_rows: MAX_ROWS };
    metering::read_usage(table, tenant, read).await.map_err(|e| read_status(e, "to"))
}

/// The status of a read that failed; `field` is the request field that
/// makes a read smaller.
fn read_status(e: ReadError, field: &str) -> Status {
    match e {
        e @ ReadError::TooManyRows(_) => {
            invalid_field(field, format!("{e}: use a longer window, a shorter range or fewer group_by dimensions"))
        }
        ReadError::Storage(e) => storage_status(e, "metering"),
    }
}

/// Hours within `[from, to)` that `resources` of `kind` were held (until
/// `now` for those that still exist), or `None` if none was held then.
fn held(resources: &[TenantResource], kind: &str, from: i64, to: i64, now: i64) -> Option<f64> {
    let lives: Vec<(i64, i64)> = resources
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| (r.create_time, if r.remove_time > 0 { r.remove_time } else { now }))
        .filter(|&(start, end)| start < to && end >= from)
        .collect();
    (!lives.is_empty())
        .then(|| lives.iter().map(|&(start, end)| (end.min(to) - start.max(from)).max(0) as f64 / 3600.0).sum())
}

/// A tenant's cost over `[from, to)`, at `now`: its usage, and the hours
/// it held dedicated resources (from the onboarding service's ledger).
fn price(
    pricing: &Pricing,
    tenant: &Tenant,
    rows: &[WindowUsage],
    resources: &[TenantResource],
    from: i64,
    to: i64,
    now: i64,
) -> TenantCost {
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows {
        let sum = totals.entry(r.meter.clone()).or_default();
        *sum = sum.saturating_add(r.value);
    }
    let mut dedicated: Vec<(&str, f64)> = [(DEDICATED_TABLE, "table"), (SILO_INSTANCE, "silo_instance")]
        .into_iter()
        .filter_map(|(item, kind)| held(resources, kind, from, to, now).map(|h| (item, h)))
        .collect();
    // Exports kept, by their GB and the hours they were kept in the period.
    let exports: Vec<f64> = resources
        .iter()
        .filter(|r| r.kind == "export")
        .filter_map(|r| held(std::slice::from_ref(r), "export", from, to, now).map(|h| h * r.bytes as f64 / 1e9))
        .collect();
    if !exports.is_empty() {
        dedicated.push((EXPORT_GB_HOURS, exports.iter().sum()));
    }
    let model = tenant.placement.as_ref().map_or(tenant.isolation_model(), |p| p.model());
    let isolation = match model {
        IsolationModel::Bridge => "bridge",
        IsolationModel::Silo => "silo",
        _ => "pool",
    };
    let c = pricing.cost(&totals, &dedicated, &tenant.tier, (to - from) as f64 / 3600.0);
    TenantCost {
        tenant_id: tenant.tenant_id.clone(),
        tier: tenant.tier.clone(),
        isolation: isolation.into(),
        from,
        to,
        lines: c
            .lines
            .into_iter()
            .map(|l| CostLine { item: l.item, quantity: l.quantity, unit_price: l.unit_price, cost: l.cost })
            .collect(),
        cost: c.cost,
        revenue: c.revenue,
        margin: c.margin,
        currency: pricing.currency().to_owned(),
    }
}

/// Meter, dimension key: 1-64 of a-z, 0-9 and `_.-`.
fn check_meter_name(v: &mut Violations, field: &str, name: &str) {
    if name.is_empty() {
        v.add(field, "is required");
    } else if name.len() > 64
        || !name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
    {
        v.add(field, "must be 1-64 of a-z, 0-9 and _.-");
    }
}

fn check_range(v: &mut Violations, from: i64, to: i64) {
    if from < 0 {
        v.add("from", "must be a time at or after 1970 (Unix seconds)");
    }
    if to <= from {
        v.add("to", "must be after from");
    } else if to.saturating_sub(from) > MAX_RANGE_SECS {
        v.add("to", format!("must be at most {} days after from", MAX_RANGE_SECS / 86_400));
    }
}

/// The window's length in seconds (HOUR when unspecified).
fn window_secs(v: &mut Violations, window: i32) -> i64 {
    match Window::try_from(window) {
        Ok(Window::Minute) => 60,
        Ok(Window::Hour | Window::Unspecified) => 3600,
        Ok(Window::Day) => 86_400,
        Err(_) => {
            v.add("window", "must be WINDOW_MINUTE, WINDOW_HOUR or WINDOW_DAY");
            3600
        }
    }
}

fn check_windows(v: &mut Violations, from: i64, to: i64, window: i64, max: i64) {
    let span = to.saturating_sub(from);
    if span > 0 && span / window + i64::from(span % window != 0) > max {
        v.add("window", format!("the range holds more than {max} windows of {window} s; use a longer window"));
    }
}

/// `rows` of `tenant` as answered, each window `window` long.
fn usage_rows(tenant: &str, rows: Vec<WindowUsage>, window: i64) -> Vec<UsageRow> {
    rows.into_iter()
        .map(|r| UsageRow {
            window_start: r.start,
            window_end: r.start.saturating_add(window),
            value: r.value,
            dimensions: r.dimensions.into_iter().collect(),
            meter: r.meter,
            tenant_id: tenant.to_owned(),
        })
        .collect()
}

fn dims_text(d: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = d.iter().collect();
    sorted.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

/// The first line of an export in `format`, if it has one.
fn export_header(format: ExportFormat) -> Option<&'static str> {
    (format == ExportFormat::Csv).then_some("tenant_id,meter,window_start,window_end,value,dimensions")
}

/// `rows` (of one tenant, in window order) as lines of `format`.
fn export_lines(rows: &[UsageRow], format: ExportFormat) -> Vec<String> {
    match format {
        ExportFormat::Csv => rows
            .iter()
            .map(|r| {
                format!(
                    "{},{},{},{},{},{}",
                    r.tenant_id,
                    r.meter,
                    r.window_start,
                    r.window_end,
                    r.value,
                    dims_text(&r.dimensions)
                )
            })
            .collect(),
        ExportFormat::Marketplace => {
            // One record per (window, meter); its dimension sets are the
            // allocations.
            let mut records: BTreeMap<(i64, &str), Vec<&UsageRow>> = BTreeMap::new();
            for r in rows {
                records.entry((r.window_start, r.meter.as_str())).or_default().push(r);
            }
            records
                .into_iter()
                .map(|((start, meter), parts)| {
                    let allocations: Vec<_> = parts
                        .iter()
                        .map(|p| {
                            let tags: BTreeMap<_, _> = p.dimensions.iter().collect();
                            serde_json::json!({
                                "AllocatedUsageQuantity": p.value,
                                "Tags": tags.into_iter().map(|(k, v)| serde_json::json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "CustomerIdentifier": parts[0].tenant_id,
                        "Dimension": meter,
                        "Quantity": parts.iter().map(|p| p.value).sum::<i64>(),
                        "Timestamp": start,
                        "UsageAllocations": allocations,
                    })
                    .to_string()
                })
                .collect()
        }
        ExportFormat::Jsonl | ExportFormat::Unspecified => rows
            .iter()
            .map(|r| {
                let dims: BTreeMap<_, _> = r.dimensions.iter().collect();
                serde_json::json!({
                    "tenant_id": r.tenant_id,
                    "meter": r.meter,
                    "window_start": r.window_start,
                    "window_end": r.window_end,
                    "value": r.value,
                    "dimensions": dims,
                })
                .to_string()
            })
            .collect(),
    }
}

/// Checks one event; the field names carry its index.
fn check_event(v: &mut Violations, i: usize, e: &UsageEvent, now: i64, grace: i64) {
    let f = |name: &str| format!("events[{i}].{name}");
    if e.value.unsigned_abs() > MAX_EVENT_VALUE.unsigned_abs() {
        v.add(&f("value"), format!("must be at most {MAX_EVENT_VALUE} either way"));
    } else if e.value < 0 && !e.correction {
        v.add(&f("value"), "may be negative only in a correction (correction: true, recorded by the platform admin)");
    }
    if e.id.is_empty() || e.id.len() > 128 || !e.id.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(&c)) {
        v.add(&f("id"), "must be 1-128 of letters, digits and _.:-");
    }
    v.tenant_id(&f("tenant_id"), &e.tenant_id);
    check_meter_name(v, &f("meter"), &e.meter);
    if BUILT_IN.contains(&e.meter.as_str()) {
        v.add(&f("meter"), format!("{:?} is a built-in meter, counted by the mesh itself", e.meter));
    }
    if e.time < now - grace {
        v.add(
            &f("time"),
            format!(
                "is {} s in the past; events more than {grace} s old (TENANTMESH_USAGE_GRACE_SECS) are refused: record a correction now instead",
                now - e.time
            ),
        );
    } else if e.time > now + MAX_FUTURE_SECS {
        v.add(&f("time"), format!("is {} s in the future; at most {MAX_FUTURE_SECS} s is allowed", e.time - now));
    }
    if e.dimensions.len() > MAX_DIMENSIONS {
        v.add(&f("dimensions"), format!("at most {MAX_DIMENSIONS} dimensions"));
    }
    for (k, val) in &e.dimensions {
        check_meter_name(v, &f(&format!("dimensions[{k}]")), k);
        if val.is_empty()
            || val.len() > 128
            || !val.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.:@/-".contains(&c))
        {
            v.add(&f(&format!("dimensions[{k}]")), "the value must be 1-128 of letters, digits and _.:@/-");
        }
    }
}

#[tonic::async_trait]
impl Metering for MeteringService {
    async fn record_usage(
        &self,
        request: Request<RecordUsageRequest>,
    ) -> Result<Response<RecordUsageResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.events.is_empty() {
            v.add("events", "at least one event is required");
        } else if req.events.len() > MAX_EVENTS {
            v.add("events", format!("at most {MAX_EVENTS} events per call"));
        }
        let now = tenantmesh_service::clock::now_secs();
        let grace = self.grace.as_secs() as i64;
        for (i, e) in req.events.iter().enumerate().take(MAX_EVENTS) {
            check_event(&mut v, i, e, now, grace);
        }
        v.check()?;
        // Corrections rewrite what a tenant is billed: the operator's alone.
        if req.events.iter().any(|e| e.correction) && !ctx.has_role(tenantmesh_tenant_context::Role::PlatformAdmin) {
            tracing::warn!(security_event = "correction_refused", subject = %ctx.subject, "a usage correction by a service identity was refused");
            return Err(Status::permission_denied("only the platform admin may record a correction"));
        }
        // Every tenant named must be one the caller may record for, and
        // must exist: usage of a mistyped tenant would be counted where
        // nobody ever bills it.
        let mut v = Violations::new();
        let mut known: HashMap<&str, bool> = HashMap::new();
        for (i, e) in req.events.iter().enumerate() {
            if !known.contains_key(e.tenant_id.as_str()) {
                ctx.authorize_tenant(&e.tenant_id)?;
                let exists = self.exists(&e.tenant_id).await?;
                known.insert(&e.tenant_id, exists);
            }
            if !known[e.tenant_id.as_str()] {
                v.add(&format!("events[{i}].tenant_id"), format!("no tenant {:?}", e.tenant_id));
            }
        }
        v.check()?;
        let (mut recorded, mut duplicates, mut conflicts) = (0u32, 0u32, Vec::new());
        for (i, e) in req.events.into_iter().enumerate() {
            let event = Event {
                id: e.id,
                tenant: e.tenant_id,
                meter: e.meter,
                value: e.value,
                time: e.time,
                dimensions: e.dimensions.into_iter().collect(),
                correction: e.correction,
            };
            match metering::record_event(&self.table, &event).await.map_err(|e| storage_status(e, "metering"))? {
                EventOutcome::Recorded => recorded += 1,
                EventOutcome::Duplicate => duplicates += 1,
                EventOutcome::Conflict => conflicts.push(format!("events[{i}] (id {:?})", event.id)),
            }
        }
        if !conflicts.is_empty() {
            return Err(Status::already_exists(format!(
                "a different event was recorded before under the id of {}; the other events were recorded ({recorded} new, {duplicates} seen before)",
                conflicts.join(", ")
            )));
        }
        tracing::debug!(recorded, duplicates, "usage events recorded");
        Ok(Response::new(RecordUsageResponse { recorded, duplicates }))
    }

    async fn get_usage(&self, request: Request<GetUsageRequest>) -> Result<Response<GetUsageResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        check_meter_name(&mut v, "meter", &req.meter);
        check_range(&mut v, req.from, req.to);
        let window = window_secs(&mut v, req.window);
        check_windows(&mut v, req.from, req.to, window, MAX_WINDOWS);
        if req.group_by.len() > MAX_GROUP_BY {
            v.add("group_by", format!("at most {MAX_GROUP_BY} dimensions"));
        }
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let read = Read {
            meter: Some(&req.meter),
            from: req.from,
            to: req.to,
            window,
            group_by: Some(&req.group_by),
            max_rows: MAX_ROWS,
        };
        let rows =
            metering::read_usage(&self.table, &req.tenant_id, read).await.map_err(|e| read_status(e, "window"))?;
        Ok(Response::new(GetUsageResponse { rows: usage_rows(&req.tenant_id, rows, window) }))
    }

    type ExportUsageStream = ReceiverStream<Result<ExportUsageResponse, Status>>;

    async fn export_usage(
        &self,
        request: Request<ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        let held = tenantmesh_admission::limits::HeldSlot::take(&request);
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        check_range(&mut v, req.from, req.to);
        let window = window_secs(&mut v, req.window);
        check_windows(&mut v, req.from, req.to, window, MAX_EXPORT_WINDOWS);
        let format = ExportFormat::try_from(req.format).unwrap_or_else(|_| {
            v.add("format", "must be EXPORT_FORMAT_JSONL, EXPORT_FORMAT_CSV or EXPORT_FORMAT_MARKETPLACE");
            ExportFormat::Jsonl
        });
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        // Read and sent a day at a time, as the client reads: memory is a
        // day's rows, whatever the range; the stream holds the caller's
        // place among its requests in flight until it ends, and ends if the
        // client stops reading.
        let (mut tx, rx) = tenantmesh_service::runtime::stream(4, self.stall);
        let table = self.table.clone();
        tenantmesh_telemetry::spawn(async move {
            let _held = held;
            let mut chunk = Vec::with_capacity(CHUNK_BYTES);
            if let Some(header) = export_header(format) {
                chunk.extend_from_slice(header.as_bytes());
                chunk.push(b'\n');
            }
            let mut day = req.from;
            while day < req.to {
                let end = (day - day.rem_euclid(EXPORT_SPAN_SECS) + EXPORT_SPAN_SECS).min(req.to);
                let read = Read { meter: None, from: day, to: end, window, group_by: None, max_rows: MAX_ROWS };
                let rows = match metering::read_usage(&table, &req.tenant_id, read).await {
                    Ok(rows) => rows,
                    Err(e) => return tx.fail(read_status(e, "window")),
                };
                for line in export_lines(&usage_rows(&req.tenant_id, rows, window), format) {
                    chunk.extend_from_slice(line.as_bytes());
                    chunk.push(b'\n');
                    if chunk.len() >= CHUNK_BYTES {
                        let data = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES));
                        if !tx.send(ExportUsageResponse { data }).await {
                            return;
                        }
                    }
                }
                day = end;
            }
            if !chunk.is_empty() {
                tx.send(ExportUsageResponse { data: chunk }).await;
            }
        });
        Ok(Response::new(rx))
    }

    async fn get_tenant_cost(
        &self,
        request: Request<GetTenantCostRequest>,
    ) -> Result<Response<GetTenantCostResponse>, Status> {
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.tenant_id("tenant_id", &req.tenant_id);
        check_range(&mut v, req.from, req.to);
        v.check()?;
        ctx.authorize_tenant(&req.tenant_id)?;
        let tenant = self.tenant(&req.tenant_id).await?;
        Ok(Response::new(GetTenantCostResponse { cost: Some(self.cost(&tenant, req.from, req.to).await?) }))
    }

    async fn list_tenant_costs(
        &self,
        request: Request<ListTenantCostsRequest>,
    ) -> Result<Response<ListTenantCostsResponse>, Status> {
        // The calls below go out as the caller, from tasks of their own.
        let ctx = TenantContext::from_request(&request)?.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        check_range(&mut v, req.from, req.to);
        v.check()?;
        ctx.authorize_all_tenants()?;
        let tenants = tenantmesh_tenant_context::directory::all_tenants(&self.registry).await?;
        let mut costs = Vec::with_capacity(tenants.len());
        let mut set = tokio::task::JoinSet::new();
        let pricing = self.pricing.clone();
        let now = tenantmesh_service::clock::now_secs();
        for tenant in tenants {
            if set.len() >= 16
                && let Some(done) = set.join_next().await
            {
                costs.push(done.map_err(|e| Status::internal(e.to_string()))??);
            }
            let (table, pricing, mut onboarding) = (self.table.clone(), pricing.clone(), self.onboarding.clone());
            set.spawn(tenantmesh_telemetry::carried(ctx.clone().scope(async move {
                let list = ListTenantResourcesRequest { tenant_id: tenant.tenant_id.clone(), include_removed: true };
                let resources = onboarding.list_tenant_resources(list).await?.into_inner().resources;
                let rows = totals(&table, &tenant.tenant_id, req.from, req.to).await?;
                Ok::<_, Status>(price(&pricing, &tenant, &rows, &resources, req.from, req.to, now))
            })));
        }
        while let Some(done) = set.join_next().await {
            costs.push(done.map_err(|e| Status::internal(e.to_string()))??);
        }
        costs.sort_by(|a, b| a.margin.total_cmp(&b.margin).then_with(|| a.tenant_id.cmp(&b.tenant_id)));
        Ok(Response::new(ListTenantCostsResponse { tenants: costs }))
    }
}

#[cfg(test)]
mod tests;
