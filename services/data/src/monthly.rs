//! This month's usage, for the tenants with a reason to watch it: hard
//! monthly entitlements (`requests`, `write_units`) and usage alerts.
//!
//! Every replica of the shared data service runs a [`Monitor`]: every
//! `TENANTMESH_USAGE_CHECK_MS` it lists the tenants, and for each one whose
//! plan caps a meter hard or that holds usage alerts it reads the month's
//! usage from the usage table (every replica's flushes, every service's).
//!
//! - **Hard limits.** A tenant at its hard monthly quantity is refused by
//!   [`MonthlyLayer`] before any handler (and before a silo tenant's call
//!   is forwarded): every Data call past `requests`, Data writes past
//!   `write_units`, RESOURCE_EXHAUSTED with `ErrorInfo` and `QuotaFailure`,
//!   until the month ends (or the operator raises it). The usage read is
//!   what was flushed: a tenant may pass the limit by what it uses in one
//!   flush interval and one check interval.
//! - **Alerts, once per period.** An alert whose threshold the month's
//!   usage reached is *claimed*: an item `alert#<tenant>` /
//!   `<period start>#<alert id>#<alert create time>` written only if absent,
//!   so one replica claims it, once, whatever the restarts. The claim is
//!   also the outbox of its deliveries: any replica that finds it pending
//!   takes a short lease on it (a conditional write), records the
//!   `USAGE_THRESHOLD_REACHED` event (onboarding records it once per key),
//!   then posts the signed webhook (never before the event is recorded: a
//!   receiver that reads WatchEvents on a delivery finds it), and writes
//!   down what landed. A replica
//!   killed mid-way leaves the claim pending for the next round of any
//!   replica; the webhook then goes again with the same idempotency key.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use serde::{Deserialize, Serialize};
use tenantmesh_metering::usage::{Read, read_usage};
use tenantmesh_proto::onboarding::v1::RecordUsageThresholdRequest;
use tenantmesh_proto::onboarding::v1::onboarding_client::OnboardingClient;
use tenantmesh_proto::registry::v1::tenant_registry_client::TenantRegistryClient;
use tenantmesh_proto::registry::v1::{Tenant, TenantStatus, UsageAlert};
use tenantmesh_service::alerts;
use tenantmesh_service::entitlements::{MeteredFeature, metered_refusal};
use tenantmesh_service::tiers::Tiers;
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};
use tenantmesh_tenant_context::TenantContext;
use tenantmesh_tenant_context::client::PropagatedChannel;
use tenantmesh_tenant_context::webhook::{Webhook, backoff};
use tonic::body::Body;

/// How long a replica holds a claim while it delivers it.
const LEASE_MS: i64 = 30_000;
/// Webhook attempts before a delivery is given up (about two hours with
/// the backoff capped at ten minutes).
const MAX_ATTEMPTS: u32 = 20;
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The Data RPCs a hard `write_units` limit refuses.
const WRITES: [&str; 2] = ["/tenantmesh.data.v1.Data/PutItem", "/tenantmesh.data.v1.Data/DeleteItem"];
const DATA: &str = "/tenantmesh.data.v1.Data/";

/// The tenants at a hard monthly limit, as the last round found them.
#[derive(Debug, Default)]
pub struct Exhausted {
    /// Whether any tenant is: the only thing a call reads otherwise.
    any: AtomicBool,
    tenants: RwLock<HashMap<String, Vec<(MeteredFeature, u64)>>>,
}

impl Exhausted {
    /// `Err` (the refusal) when `tenant`'s call of `path` is past a hard
    /// monthly limit.
    pub fn check(&self, tenant: &str, path: &str) -> Result<(), tonic::Status> {
        if !self.any.load(Ordering::Relaxed) || !path.starts_with(DATA) {
            return Ok(());
        }
        let tenants = self.tenants.read().expect("exhausted lock");
        let Some(features) = tenants.get(tenant) else { return Ok(()) };
        for (feature, per_month) in features {
            if *feature == MeteredFeature::Requests || WRITES.contains(&path) {
                return Err(metered_refusal(tenant, *feature, *per_month));
            }
        }
        Ok(())
    }

    /// Sets the tenants at a hard limit (each with the features it is at
    /// and their monthly quantities), as a round found them.
    pub fn replace(&self, tenants: HashMap<String, Vec<(MeteredFeature, u64)>>) {
        let any = !tenants.is_empty();
        *self.tenants.write().expect("exhausted lock") = tenants;
        self.any.store(any, Ordering::Relaxed);
    }
}

/// Refuses calls past a hard monthly limit ([`Exhausted`]); a call of a
/// tenant within its limits costs one relaxed load.
#[derive(Clone)]
pub struct MonthlyLayer(pub Arc<Exhausted>);

impl<S> tower::Layer<S> for MonthlyLayer {
    type Service = MonthlyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MonthlyService { inner, exhausted: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct MonthlyService<S> {
    inner: S,
    exhausted: Arc<Exhausted>,
}

impl<S> tower::Service<http::Request<Body>> for MonthlyService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = std::convert::Infallible>,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<Body>, std::convert::Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let Some(ctx) = req.extensions().get::<TenantContext>()
            && let Err(status) = self.exhausted.check(&ctx.tenant_id, req.uri().path())
        {
            return Either::Right(std::future::ready(Ok(status.into_http())));
        }
        Either::Left(self.inner.call(req))
    }
}

/// A claimed alert: what crossed, and what of its delivery landed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Claim {
    tenant_id: String,
    alert_id: String,
    alert_create_time: i64,
    meter: String,
    /// The usage the alert fires at.
    threshold: u64,
    /// The month's usage when it was claimed.
    usage: u64,
    /// The plan's monthly quantity of the meter, if it caps it.
    limit: Option<u64>,
    period_start: i64,
    period_end: i64,
    /// When it was claimed (Unix seconds).
    time: i64,
    /// The lifecycle event is recorded.
    event: bool,
    /// The webhook: "pending", "delivered", "failed" (given up), or "none"
    /// (no webhook where it was claimed).
    webhook: String,
    attempts: u32,
    next_attempt_ms: i64,
    last_error: String,
    lease_until_ms: i64,
}

impl Claim {
    /// Whether its webhook's next attempt is due at `now_ms` (`hook`: this
    /// replica has the webhook; one without it leaves the delivery to one
    /// with it).
    fn webhook_due(&self, now_ms: i64, hook: bool) -> bool {
        hook && self.webhook == "pending" && self.next_attempt_ms <= now_ms
    }

    /// Whether a replica should deliver it at `now_ms`: not leased, and its
    /// event or its webhook's next attempt is owed.
    fn due(&self, now_ms: i64, hook: bool) -> bool {
        self.lease_until_ms <= now_ms && (!self.event || self.webhook_due(now_ms, hook))
    }

    /// The id of the event and of its webhook delivery.
    fn id(&self) -> String {
        format!(
            "{}/{}@{}/{}",
            self.tenant_id,
            self.alert_id,
            alerts::period_name(self.period_start),
            self.alert_create_time
        )
    }

    fn detail(&self) -> String {
        let of = self.limit.map(|l| format!(" of {l}")).unwrap_or_default();
        format!(
            "{} reached {}{of} ({} used) in {}",
            self.meter,
            self.threshold,
            self.usage,
            alerts::period_name(self.period_start)
        )
    }

    /// The webhook's JSON body.
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": self.id(),
            "type": "usage.threshold_reached",
            "tenant_id": self.tenant_id,
            "alert_id": self.alert_id,
            "meter": self.meter,
            "threshold": self.threshold,
            "usage": self.usage,
            "limit": self.limit,
            "period": alerts::period_name(self.period_start),
            "period_start": tenantmesh_service::clock::rfc3339(self.period_start),
            "period_end": tenantmesh_service::clock::rfc3339(self.period_end),
            "time": tenantmesh_service::clock::rfc3339(self.time),
        }))
        .expect("a JSON value serializes")
    }
}

fn alerts_pk(tenant: &str) -> String {
    format!("alert#{tenant}")
}

fn claim_sk(period_start: i64, alert: &UsageAlert) -> String {
    format!("{period_start:013}#{}#{}", alert.alert_id, alert.create_time)
}

/// Watches the month's usage; see the module's documentation.
pub struct Monitor {
    usage: DynTable,
    /// As the data service itself.
    registry: TenantRegistryClient<PropagatedChannel>,
    onboarding: OnboardingClient<PropagatedChannel>,
    tiers: Arc<Tiers>,
    webhook: Option<Webhook>,
    every: Duration,
    exhausted: Arc<Exhausted>,
}

impl Monitor {
    pub fn new(
        usage: DynTable,
        registry: TenantRegistryClient<PropagatedChannel>,
        onboarding: OnboardingClient<PropagatedChannel>,
        tiers: Arc<Tiers>,
        webhook: Option<Webhook>,
        every: Duration,
    ) -> Self {
        Self { usage, registry, onboarding, tiers, webhook, every, exhausted: Default::default() }
    }

    /// What the layer refuses by.
    pub fn exhausted(&self) -> Arc<Exhausted> {
        self.exhausted.clone()
    }

    /// Runs a round every interval until `stop` turns true.
    pub fn start(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tenantmesh_telemetry::spawn(async move {
            let mut tick = tokio::time::interval(self.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if let Err(e) = self.round(tenantmesh_service::clock::now_secs()).await {
                    tracing::warn!(error = %e, "could not check this month's usage; the last round's refusals stand");
                }
            }
        })
    }

    /// One round: every watched tenant's month read, its hard limits
    /// applied, its crossed alerts claimed and its pending ones delivered.
    pub async fn round(&self, now: i64) -> Result<(), tonic::Status> {
        let tenants = tenantmesh_tenant_context::directory::all_tenants(&self.registry).await?;
        let mut exhausted = HashMap::new();
        for tenant in tenants {
            match self.tenant(&tenant, now).await {
                Ok(Some(at)) => {
                    exhausted.insert(tenant.tenant_id, at);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target_tenant = %tenant.tenant_id, error = %e, "could not check the tenant's usage this round");
                    // Keep what the last round found for it.
                    let last = self.exhausted.tenants.read().expect("exhausted lock").get(&tenant.tenant_id).cloned();
                    if let Some(last) = last {
                        exhausted.insert(tenant.tenant_id, last);
                    }
                }
            }
        }
        self.exhausted.replace(exhausted);
        Ok(())
    }

    /// One tenant's round: the hard limits it is at, if any.
    async fn tenant(&self, t: &Tenant, now: i64) -> Result<Option<Vec<(MeteredFeature, u64)>>, String> {
        let active = matches!(
            TenantStatus::try_from(t.status).unwrap_or_default(),
            TenantStatus::Active | TenantStatus::Suspended | TenantStatus::Migrating
        );
        let Some(tier) = self.tiers.get(&t.tier).filter(|_| active) else { return Ok(None) };
        let plan = tier.entitlements.with(&t.entitlement_overrides);
        let hard: Vec<(MeteredFeature, u64)> = MeteredFeature::ALL
            .into_iter()
            .filter_map(|f| plan.metered(f).filter(|m| m.hard).map(|m| (f, m.per_month)))
            .collect();
        if hard.is_empty() && t.usage_alerts.is_empty() {
            return Ok(None);
        }
        let (start, end) = alerts::period(now);
        let used = self.month(&t.tenant_id, start, now).await.map_err(|e| e.to_string())?;
        let at: Vec<_> =
            hard.into_iter().filter(|(f, per_month)| used.get(f.as_str()).is_some_and(|u| u >= per_month)).collect();
        for alert in &t.usage_alerts {
            let Some(threshold) = alerts::threshold(alert, &plan) else { continue };
            let usage = used.get(alert.meter.as_str()).copied().unwrap_or(0);
            if usage < threshold {
                continue;
            }
            let claim = Claim {
                tenant_id: t.tenant_id.clone(),
                alert_id: alert.alert_id.clone(),
                alert_create_time: alert.create_time,
                meter: alert.meter.clone(),
                threshold,
                usage,
                limit: MeteredFeature::of(&alert.meter).and_then(|f| plan.metered(f)).map(|m| m.per_month),
                period_start: start,
                period_end: end,
                time: now,
                event: false,
                webhook: if self.webhook.is_some() { "pending" } else { "none" }.into(),
                attempts: 0,
                next_attempt_ms: 0,
                last_error: String::new(),
                lease_until_ms: 0,
            };
            let data = serde_json::to_vec(&claim).expect("a claim serializes");
            match self.usage.put(&alerts_pk(&t.tenant_id), &claim_sk(start, alert), data, Condition::NotExists).await {
                Ok(_) => {
                    tracing::info!(target_tenant = %t.tenant_id, alert_id = %alert.alert_id, meter = %alert.meter, threshold, usage, "usage alert crossed");
                }
                Err(StorageError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if !t.usage_alerts.is_empty() {
            // This period's, and the last one's (a round at the turn of a month).
            let (last, _) = alerts::period(start - 1);
            for period in [last, start] {
                self.deliver(&t.tenant_id, period).await.map_err(|e| e.to_string())?;
            }
        }
        Ok((!at.is_empty()).then_some(at))
    }

    /// `tenant`'s usage in `[start, now]`, by meter.
    async fn month(&self, tenant: &str, start: i64, now: i64) -> Result<BTreeMap<String, u64>, StorageError> {
        let read =
            Read { meter: None, from: start, to: now + 1, window: i64::MAX, group_by: Some(&[]), max_rows: 10_000 };
        let rows = read_usage(&self.usage, tenant, read).await.map_err(|e| match e {
            tenantmesh_metering::usage::ReadError::Storage(e) => e,
            e => StorageError::Backend(e.to_string()),
        })?;
        let mut used = BTreeMap::new();
        for row in rows.into_iter().filter(|r| alerts::METERS.contains(&r.meter.as_str())) {
            *used.entry(row.meter).or_insert(0u64) += u64::try_from(row.value).unwrap_or(0);
        }
        Ok(used)
    }

    /// Delivers what is pending of `tenant`'s claims of the period starting
    /// at `period`.
    async fn deliver(&self, tenant: &str, period: i64) -> Result<(), StorageError> {
        let q = Query { pk: alerts_pk(tenant), sk_prefix: format!("{period:013}#"), start_after: None, limit: 100 };
        for item in self.usage.query(q).await?.items {
            let Ok(mut claim) = serde_json::from_slice::<Claim>(&item.data) else {
                tracing::error!(target_tenant = tenant, key = %item.sk, "unreadable usage alert claim; skipped");
                continue;
            };
            let now_ms = tenantmesh_service::clock::now_ms();
            if !claim.due(now_ms, self.webhook.is_some()) {
                continue;
            }
            let webhook_due = claim.webhook_due(now_ms, self.webhook.is_some());
            // The lease: another replica finding it now leaves it alone.
            claim.lease_until_ms = now_ms + LEASE_MS;
            let leased = serde_json::to_vec(&claim).expect("a claim serializes");
            let version = match self.usage.put(&item.pk, &item.sk, leased, Condition::Version(item.version)).await {
                Ok(written) => written.version,
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            };
            if !claim.event {
                let req = RecordUsageThresholdRequest {
                    tenant_id: claim.tenant_id.clone(),
                    alert_id: claim.alert_id.clone(),
                    period_start: claim.period_start,
                    alert_create_time: claim.alert_create_time,
                    detail: claim.detail(),
                };
                match self.onboarding.clone().record_usage_threshold(req).await {
                    Ok(_) => claim.event = true,
                    Err(status) => {
                        tracing::warn!(target_tenant = tenant, alert_id = %claim.alert_id, error = %status.message(), "could not record the usage alert's event; retried next round");
                    }
                }
            }
            // The webhook announces an event its receiver can read: it
            // goes once the event is recorded (a failed record is retried
            // next round, the webhook with it).
            if webhook_due
                && claim.event
                && let Some(webhook) = &self.webhook
            {
                claim.attempts += 1;
                match webhook.post(&claim.id(), &claim.body()).await {
                    Ok(()) => {
                        claim.webhook = "delivered".into();
                        claim.last_error.clear();
                        tracing::info!(target_tenant = tenant, alert_id = %claim.alert_id, attempts = claim.attempts, "usage alert webhook delivered");
                    }
                    Err(e) if claim.attempts >= MAX_ATTEMPTS => {
                        claim.webhook = "failed".into();
                        claim.last_error = e.to_string();
                        tracing::error!(target_tenant = tenant, alert_id = %claim.alert_id, attempts = claim.attempts, error = %e, "usage alert webhook given up");
                    }
                    Err(e) => {
                        let wait = backoff(claim.attempts, MAX_BACKOFF);
                        claim.next_attempt_ms = tenantmesh_service::clock::now_ms() + wait.as_millis() as i64;
                        claim.last_error = e.to_string();
                        tracing::warn!(target_tenant = tenant, alert_id = %claim.alert_id, attempts = claim.attempts, retry_ms = wait.as_millis() as u64, error = %e, "usage alert webhook failed; retrying");
                    }
                }
            }
            claim.lease_until_ms = 0;
            let data = serde_json::to_vec(&claim).expect("a claim serializes");
            match self.usage.put(&item.pk, &item.sk, data, Condition::Version(version)).await {
                Ok(_) => {}
                // The lease ran out and another replica took it: its record stands.
                Err(StorageError::ConditionFailed { .. }) => {
                    tracing::warn!(target_tenant = tenant, alert_id = %claim.alert_id, "a usage alert's delivery outlived its lease");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_limit_refuses_what_it_caps() {
        let e = Exhausted::default();
        assert!(e.check("acme", WRITES[0]).is_ok());
        e.replace(HashMap::from([("acme".to_owned(), vec![(MeteredFeature::WriteUnits, 10)])]));
        let refused = e.check("acme", "/tenantmesh.data.v1.Data/PutItem").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(e.check("acme", "/tenantmesh.data.v1.Data/DeleteItem").is_err());
        assert!(e.check("acme", "/tenantmesh.data.v1.Data/GetItem").is_ok(), "reads go on");
        assert!(e.check("acme", "/tenantmesh.metering.v1.Metering/GetUsage").is_ok(), "not a Data call");
        assert!(e.check("globex", WRITES[0]).is_ok(), "another tenant");
        e.replace(HashMap::from([("acme".to_owned(), vec![(MeteredFeature::Requests, 10)])]));
        assert!(e.check("acme", "/tenantmesh.data.v1.Data/GetItem").is_err(), "every Data call");
        e.replace(HashMap::new());
        assert!(e.check("acme", WRITES[0]).is_ok(), "lifted");
    }

    #[test]
    fn a_claim_reads_and_posts_what_crossed() {
        let claim = Claim {
            tenant_id: "acme".into(),
            alert_id: "warn-50".into(),
            alert_create_time: 7,
            meter: "write_units".into(),
            threshold: 500,
            usage: 612,
            limit: Some(1000),
            period_start: alerts::period(1_796_662_800).0,
            period_end: alerts::period(1_796_662_800).1,
            time: 1_796_662_800,
            event: false,
            webhook: "pending".into(),
            attempts: 0,
            next_attempt_ms: 0,
            last_error: String::new(),
            lease_until_ms: 0,
        };
        assert_eq!(claim.id(), "acme/warn-50@2026-12/7");
        assert_eq!(claim.detail(), "write_units reached 500 of 1000 (612 used) in 2026-12");
        let body: serde_json::Value = serde_json::from_slice(&claim.body()).unwrap();
        assert_eq!(body["type"], "usage.threshold_reached");
        assert_eq!(body["period_start"], "2026-12-01T00:00:00Z");
        assert_eq!((body["usage"].as_u64(), body["limit"].as_u64()), (Some(612), Some(1000)));
        assert!(claim.due(0, true));
        let done = Claim { event: true, webhook: "delivered".into(), ..claim.clone() };
        assert!(!done.due(0, true));
        assert!(
            !Claim { event: true, webhook: "none".into(), ..claim.clone() }.due(0, true),
            "no webhook: done once recorded"
        );
        let recorded = Claim { event: true, ..claim.clone() };
        assert!(recorded.due(0, true) && !recorded.due(0, false), "the webhook is left to a replica that has it");
        assert!(!Claim { lease_until_ms: 10, ..claim.clone() }.due(0, true), "leased by another replica");
        assert!(!Claim { event: true, next_attempt_ms: 10, ..claim }.due(0, true), "its retry is not due yet");
    }
}
