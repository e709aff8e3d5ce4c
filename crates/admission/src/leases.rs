//! One tenant's limits held across several replicas of a service, in the
//! style of Google's Doorman: each replica admits a tenant's requests at its
//! *share* of the tenant's rate, and the shares are leases kept in the store
//! the deployment already has (a `leases` table on DynamoDB), renewed every
//! interval with each replica's demand.
//!
//! - **Membership.** Every interval each replica writes a heartbeat
//!   (`replicas#<service>`, one item per replica) and counts the live ones:
//!   `N`.
//! - **Leases.** A tenant's lease item (`rate#<service>#<tenant>`) holds, per
//!   replica that asked, its demand (requests per second arriving there,
//!   refused ones included) and when its lease expires (three intervals).
//!   A replica renews it with a conditional write (read, change its own
//!   entry, write if the version is unchanged) and computes its share from
//!   what it wrote: the tenant's rate split max-min fairly over the holders'
//!   demands (each wants 5% more than it saw, room to grow), what is
//!   left over split evenly. Every holder computes from the same item, so
//!   the shares add up to the rate (give or take the change in demand
//!   between two replicas' renewals).
//! - **Light tenants cost nothing.** A replica holds a lease only while the
//!   tenant's demand there is at least a tenth of an even share
//!   (`rate / 10N`); below that it admits at that tenth without asking, and
//!   the holders leave that much aside for each replica without a lease. So
//!   a tenant well inside its limits on every replica never touches the
//!   table, and the shares never add up to more than the rate. A replica
//!   that sees a tenant for the first time admits at an even share (`1/N`)
//!   and asks for a lease at once; one whose tenant is refused asks at once
//!   too. A replica alone (no other heartbeat) admits at the whole rate
//!   and holds no leases.
//! - **Failures.** When the table cannot be reached a replica keeps its last
//!   share until its lease expires, then falls back to the tenth.
//!
//! The cost is one read and one write of the lease table per replica, per
//! interval, per tenant near its limit, and two calls per replica per
//! interval for the heartbeat. On the embedded store there is one process,
//! and no leases: its limiter holds the whole limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, Pages, StorageError};

use crate::limits::Limits;
// Wall-clock milliseconds: leases are compared across processes.
/// Wall-clock milliseconds, as heartbeats and leases keep them.
fn wall_ms() -> u64 {
    tenantmesh_service::clock::now_ms().max(0) as u64
}

/// Share of an even share at which a replica asks for a lease.
const LEASE_THRESHOLD: f64 = 0.1;
/// What a holder asks for beyond the demand it saw.
const HEADROOM: f64 = 1.05;
/// Leases and heartbeats last this many intervals.
const EXPIRY_INTERVALS: u32 = 3;
/// Leases renewed at once.
const RENEWALS_AT_ONCE: usize = 32;

/// Shares as fixed point: parts per `ONE`.
const ONE: u32 = 1 << 24;

fn to_fixed(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * f64::from(ONE)).round() as u32
}

/// One replica's entry in a lease item.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Lease {
    /// Requests per second it wants.
    want: f64,
    /// Wall-clock ms when the lease lapses.
    expires: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseItem {
    /// Replica id to its lease.
    replicas: HashMap<String, Lease>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    expires: u64,
}

/// Max-min fair shares of `rate` among holders that want `wants` (requests
/// per second), with `replicas` live replicas in all: each replica without
/// a lease keeps a tenth of an even share, the holders split the rest
/// (water filling: nobody gets more than it wants while another wants
/// more), and what nobody wants is split evenly among the holders. Returns
/// each holder's fraction of `rate`.
pub fn allocate(rate: f64, wants: &[f64], replicas: usize) -> Vec<f64> {
    let holders = wants.len();
    if holders == 0 || rate <= 0.0 {
        return vec![0.0; holders];
    }
    let replicas = replicas.max(holders) as f64;
    let reserved = (replicas - holders as f64) * LEASE_THRESHOLD / replicas;
    let mut left = rate * (1.0 - reserved);
    let mut order: Vec<usize> = (0..holders).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]));
    let mut given = vec![0.0; holders];
    for (i, &h) in order.iter().enumerate() {
        let fair = left / (holders - i) as f64;
        given[h] = wants[h].max(0.0).min(fair);
        left -= given[h];
    }
    let extra = left / holders as f64;
    given.iter().map(|g| (g + extra) / rate).collect()
}

/// What the hot path and the renewals share about one tenant.
#[derive(Debug)]
struct Tenant {
    /// Requests that arrived since the last renewal.
    arrivals: AtomicU32,
    /// This replica's share, fixed point.
    share: AtomicU32,
    /// The tenant's rate, per second (its limits may change).
    rate: AtomicU32,
    /// Whether this replica holds a lease.
    holder: AtomicBool,
    /// Whether a lease should be asked for before the next interval.
    wanted: AtomicBool,
    /// Wall-clock ms when the lease lapses (0: none).
    lease_until: AtomicU64,
}

/// The renewals' own state of a tenant.
#[derive(Debug, Default)]
struct Demand {
    /// Requests per second, smoothed over intervals.
    rate: Option<f64>,
    idle_intervals: u32,
}

/// A replica's shares of its tenants' limits (see the module docs).
pub struct RateShares {
    table: DynTable,
    service: String,
    replica: String,
    interval: Duration,
    /// Live replicas of the service, this one included.
    live: AtomicU32,
    tenants: RwLock<HashMap<Arc<str>, Arc<Tenant>>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for RateShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateShares")
            .field("service", &self.service)
            .field("replica", &self.replica)
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RateShares {
    /// Shares of `service`'s replicas, kept in `table` and renewed every
    /// `interval` by a task on the current runtime that ends when the
    /// returned value is dropped.
    pub fn start(table: DynTable, service: &str, interval: Duration) -> Arc<Self> {
        let shares = Arc::new(Self {
            table,
            service: service.to_owned(),
            replica: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            interval,
            live: AtomicU32::new(1),
            tenants: RwLock::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        });
        tenantmesh_telemetry::spawn(renewals(Arc::downgrade(&shares)));
        shares
    }

    /// This replica's id in the lease items.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Live replicas, as of the last heartbeat.
    pub fn replicas(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Counts one request of `tenant` and returns this replica's share of
    /// its limits (a fraction in (0, 1]).
    pub fn share(&self, tenant: &Arc<str>, limits: Limits) -> f64 {
        // Alone: the whole, no lease needed.
        if self.replicas() == 1 {
            return 1.0;
        }
        let known = self.tenants.read().expect("shares lock").get(tenant).cloned();
        let t = match known {
            Some(t) => t,
            None => {
                // First sight: an even share until the lease says otherwise.
                let even = to_fixed(1.0 / f64::from(self.replicas()));
                let t = self
                    .tenants
                    .write()
                    .expect("shares lock")
                    .entry(tenant.clone())
                    .or_insert_with(|| {
                        Arc::new(Tenant {
                            arrivals: AtomicU32::new(0),
                            share: AtomicU32::new(even),
                            rate: AtomicU32::new(limits.rate_per_second),
                            holder: AtomicBool::new(false),
                            wanted: AtomicBool::new(true),
                            lease_until: AtomicU64::new(0),
                        })
                    })
                    .clone();
                self.wake.notify_one();
                t
            }
        };
        t.arrivals.fetch_add(1, Ordering::Relaxed);
        if t.rate.load(Ordering::Relaxed) != limits.rate_per_second {
            t.rate.store(limits.rate_per_second, Ordering::Relaxed);
        }
        f64::from(t.share.load(Ordering::Relaxed).max(1)) / f64::from(ONE)
    }

    /// A request of `tenant` was refused by its share: without a lease,
    /// ask for one now rather than at the next interval.
    pub fn refused(&self, tenant: &str) {
        if let Some(t) = self.tenants.read().expect("shares lock").get(tenant)
            && !t.holder.load(Ordering::Relaxed)
            && !t.wanted.swap(true, Ordering::Relaxed)
        {
            self.wake.notify_one();
        }
    }

    /// Tenants this replica keeps a share of.
    pub fn len(&self) -> usize {
        self.tenants.read().expect("shares lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expiry(&self) -> u64 {
        wall_ms() + self.interval.as_millis() as u64 * u64::from(EXPIRY_INTERVALS)
    }

    /// Writes this replica's heartbeat and counts the live replicas.
    async fn heartbeat(&self) -> Result<(), StorageError> {
        let pk = format!("replicas#{}", self.service);
        let beat = serde_json::to_vec(&Heartbeat { expires: self.expiry() }).expect("heartbeat encodes");
        self.table.put(&pk, &self.replica, beat, Condition::None).await?;
        let (mut live, now) = (0, wall_ms());
        let mut pages = Pages::new(self.table.as_ref(), pk.clone(), "", 1000);
        while let Some(items) = pages.next().await? {
            for item in &items {
                match serde_json::from_slice::<Heartbeat>(&item.data) {
                    Ok(h) if h.expires > now => live += 1,
                    // Gone for a minute: forget it (whoever sees it first).
                    Ok(h) if h.expires + 60_000 < now => {
                        let _ = self.table.delete(&pk, &item.sk, Condition::Version(item.version)).await;
                    }
                    _ => {}
                }
            }
        }
        self.live.store(live.max(1), Ordering::Relaxed);
        Ok(())
    }

    /// Renews (`want` > 0) or gives up (`want` = 0) this replica's lease of
    /// `tenant`; returns its share.
    async fn renew(&self, tenant: &str, rate: u32, want: f64) -> Result<f64, StorageError> {
        let pk = format!("rate#{}#{tenant}", self.service);
        for _ in 0..8 {
            let current = self.table.get(&pk, "lease").await?;
            let (version, mut item) = match &current {
                Some(i) => (i.version, serde_json::from_slice::<LeaseItem>(&i.data).unwrap_or_default()),
                None => (0, LeaseItem::default()),
            };
            let now = wall_ms();
            item.replicas.retain(|_, l| l.expires > now);
            if want > 0.0 {
                item.replicas.insert(self.replica.clone(), Lease { want, expires: self.expiry() });
            } else {
                item.replicas.remove(&self.replica);
            }
            let written = if item.replicas.is_empty() {
                match current {
                    Some(_) => self.table.delete(&pk, "lease", Condition::Version(version)).await.map(drop),
                    None => Ok(()),
                }
            } else {
                let data = serde_json::to_vec(&item).expect("lease encodes");
                self.table.put(&pk, "lease", data, Condition::Version(version)).await.map(drop)
            };
            match written {
                Ok(()) => {}
                // Another replica renewed in between: read again.
                Err(StorageError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
            let mut ids: Vec<&String> = item.replicas.keys().collect();
            ids.sort();
            let Some(me) = ids.iter().position(|id| **id == self.replica) else { return Ok(0.0) };
            let wants: Vec<f64> = ids.iter().map(|id| item.replicas[*id].want).collect();
            return Ok(allocate(f64::from(rate.max(1)), &wants, self.replicas() as usize)[me]);
        }
        Err(StorageError::Backend(format!("lease of {tenant}: too many concurrent renewals")))
    }

    /// The share of a replica without a lease.
    fn tenth(&self) -> u32 {
        to_fixed(LEASE_THRESHOLD / f64::from(self.replicas()))
    }

    /// One interval: heartbeat, then every tenant's lease taken, renewed or
    /// given up by its demand; idle tenants forgotten.
    async fn interval_passed(self: &Arc<Self>, elapsed: Duration, demands: &mut HashMap<Arc<str>, Demand>) {
        if let Err(e) = self.heartbeat().await {
            tracing::warn!(service = %self.service, error = %e, "rate shares: heartbeat failed; shares stay as they are");
        }
        let tenants: Vec<(Arc<str>, Arc<Tenant>)> =
            self.tenants.read().expect("shares lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        demands.retain(|k, _| tenants.iter().any(|(t, _)| t == k));
        let secs = elapsed.as_secs_f64().max(1e-3);
        let mut renewals = Vec::new();
        let mut forget = Vec::new();
        if self.replicas() == 1 {
            // Alone now: every share is the whole; give the leases up.
            let holders = tenants.iter().filter(|(_, t)| t.holder.load(Ordering::Relaxed));
            let releases = holders.map(|(id, t)| (id.clone(), t.clone(), 0.0)).collect();
            self.tenants.write().expect("shares lock").clear();
            demands.clear();
            return self.renew_all(releases).await;
        }
        for (id, t) in tenants {
            let arrived = t.arrivals.swap(0, Ordering::Relaxed);
            let d = demands.entry(id.clone()).or_default();
            let seen = f64::from(arrived) / secs;
            let smoothed = d.rate.map_or(seen, |r| 0.5 * r + 0.5 * seen);
            d.rate = Some(smoothed);
            d.idle_intervals = if arrived == 0 { d.idle_intervals + 1 } else { 0 };
            let rate = t.rate.load(Ordering::Relaxed).max(1);
            let threshold = f64::from(rate) * LEASE_THRESHOLD / f64::from(self.replicas());
            let holder = t.holder.load(Ordering::Relaxed);
            let wanted = t.wanted.swap(false, Ordering::Relaxed);
            let keep = if holder { smoothed >= threshold / 2.0 } else { wanted || smoothed >= threshold };
            if keep {
                renewals.push((id, t, (smoothed * HEADROOM).max(threshold)));
            } else if holder {
                renewals.push((id, t, 0.0));
            } else {
                t.share.store(self.tenth(), Ordering::Relaxed);
                if d.idle_intervals >= EXPIRY_INTERVALS {
                    forget.push(id);
                }
            }
        }
        if !forget.is_empty() {
            let mut map = self.tenants.write().expect("shares lock");
            for id in &forget {
                // Unless a request came in since.
                if map.get(id).is_some_and(|t| t.arrivals.load(Ordering::Relaxed) == 0) {
                    map.remove(id);
                    demands.remove(id);
                }
            }
        }
        self.renew_all(renewals).await;
    }

    /// Tenants that asked for a lease between intervals.
    async fn asked(self: &Arc<Self>, demands: &HashMap<Arc<str>, Demand>) {
        let replicas = f64::from(self.replicas());
        let renewals: Vec<_> = self
            .tenants
            .read()
            .expect("shares lock")
            .iter()
            .filter(|(_, t)| t.wanted.swap(false, Ordering::Relaxed))
            .map(|(id, t)| {
                let rate = f64::from(t.rate.load(Ordering::Relaxed).max(1));
                // Not measured yet: an even share.
                let want = demands.get(id).and_then(|d| d.rate).map_or(rate / replicas, |r| r * HEADROOM);
                (id.clone(), t.clone(), want.max(rate * LEASE_THRESHOLD / replicas))
            })
            .collect();
        self.renew_all(renewals).await;
    }

    async fn renew_all(self: &Arc<Self>, renewals: Vec<(Arc<str>, Arc<Tenant>, f64)>) {
        let mut pending = renewals.into_iter();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < RENEWALS_AT_ONCE
                && let Some((id, t, want)) = pending.next()
            {
                let shares = self.clone();
                running.spawn(async move {
                    let result = shares.renew(&id, t.rate.load(Ordering::Relaxed), want).await;
                    (id, t, want, result)
                });
            }
            let Some(done) = running.join_next().await else { break };
            let Ok((id, t, want, result)) = done else { continue };
            match result {
                Ok(share) if want > 0.0 => {
                    t.share.store(to_fixed(share).max(1), Ordering::Relaxed);
                    t.holder.store(true, Ordering::Relaxed);
                    t.lease_until.store(self.expiry(), Ordering::Relaxed);
                }
                Ok(_) => {
                    t.holder.store(false, Ordering::Relaxed);
                    t.lease_until.store(0, Ordering::Relaxed);
                    t.share.store(self.tenth(), Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, tenant_id = %id, error = %e, "rate shares: lease not renewed");
                    if t.lease_until.load(Ordering::Relaxed) <= wall_ms() {
                        t.holder.store(false, Ordering::Relaxed);
                        t.share.store(self.tenth(), Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The renewal task: every interval, and whenever a tenant asks; ends with
/// its [`RateShares`].
async fn renewals(shares: Weak<RateShares>) {
    let Some(interval) = shares.upgrade().map(|s| s.interval) else { return };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut demands = HashMap::new();
    let mut last = Instant::now();
    loop {
        let Some(s) = shares.upgrade() else { return };
        let woken = tokio::select! {
            _ = ticks.tick() => false,
            _ = s.wake.notified() => true,
        };
        // Nobody else holds the shares any more.
        if Arc::strong_count(&s) == 1 {
            return;
        }
        if woken {
            s.asked(&demands).await;
        } else {
            let now = Instant::now();
            s.interval_passed(now - last, &mut demands).await;
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::EmbeddedTable;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn allocation_is_max_min_fair_and_adds_up_to_the_rate() {
        // Even demand: even shares.
        let s = allocate(30.0, &[20.0, 20.0, 20.0], 3);
        assert!(s.iter().all(|&x| close(x, 1.0 / 3.0)), "{s:?}");
        // Uneven: the small ones get what they want, the big one the rest.
        let s = allocate(40.0, &[48.0, 9.0, 3.0], 3);
        assert!(close(s[0] * 40.0, 28.0) && close(s[1] * 40.0, 9.0) && close(s[2] * 40.0, 3.0), "{s:?}");
        // Nobody wants it all: the rest is split evenly among the holders.
        let s = allocate(40.0, &[4.0, 2.0], 2);
        assert!(close(s[0] * 40.0, 21.0) && close(s[1] * 40.0, 19.0), "{s:?}");
        // A replica without a lease keeps a tenth of an even share.
        let s = allocate(30.0, &[100.0], 3);
        assert!(close(s[0], 1.0 - 2.0 * 0.1 / 3.0), "{s:?}");
        // Everyone wants more than there is: the rate, split evenly.
        let s = allocate(10.0, &[100.0, 50.0], 2);
        assert!(s.iter().all(|&x| close(x, 0.5)), "{s:?}");
        assert!(allocate(10.0, &[], 3).is_empty());
    }

    fn limits(rate: u32) -> Limits {
        Limits { rate_per_second: rate, burst: rate, max_in_flight: 0 }
    }

    /// Sends `n` requests of `tenant` over `over`, returns the last share.
    async fn send(shares: &RateShares, tenant: &Arc<str>, per_second: u32, over: Duration) -> f64 {
        let mut share = 0.0;
        let end = Instant::now() + over;
        while Instant::now() < end {
            share = shares.share(tenant, limits(100));
            tokio::time::sleep(Duration::from_secs(1) / per_second).await;
        }
        share
    }

    /// Two replicas on one table: the one that sees the tenant's load gets
    /// nearly all of its rate, the other a tenth of an even share; when
    /// both see load they split it by demand and never hand out more than
    /// the rate; leases of idle tenants are given up and forgotten.
    #[tokio::test]
    async fn replicas_share_a_tenants_rate_by_demand() {
        let dir = tempfile::tempdir().unwrap();
        let table = EmbeddedTable::open_shared(dir.path().join("leases.redb")).unwrap();
        let interval = Duration::from_millis(100);
        let a = RateShares::start(table.clone(), "data", interval);
        let b = RateShares::start(table.clone(), "data", interval);
        tokio::time::sleep(interval * 3).await;
        assert_eq!((a.replicas(), b.replicas()), (2, 2), "each sees the other's heartbeat");

        let tenant: Arc<str> = Arc::from("acme");
        // First sight: an even share, then a lease for nearly all of it.
        assert!(close(a.share(&tenant, limits(100)), 0.5));
        let share = send(&a, &tenant, 400, interval * 8).await;
        assert!((share - (1.0 - 0.1 / 2.0)).abs() < 0.01, "a's share alone: {share}");
        // One request at b: an even share at first sight, and a lease; b
        // gives it up as its demand fades, and a has nearly all again.
        assert!(close(b.share(&tenant, limits(100)), 0.5));
        let share = send(&a, &tenant, 400, interval * 14).await;
        assert!((share - 0.95).abs() < 0.01, "a's share once b gave up: {share}");
        let item = table.get("rate#data#acme", "lease").await.unwrap().unwrap();
        let item: LeaseItem = serde_json::from_slice(&item.data).unwrap();
        assert_eq!(item.replicas.keys().collect::<Vec<_>>(), [a.replica()]);

        // Both busy, a over the rate, b at a fifth of it: b gets what it
        // wants (with room to grow), a the rest; they add up to the rate
        // (each computes from the item as it wrote it, so while demands
        // shift the sum may be off by the change since the other's renewal:
        // a few hundredths, more on a loaded machine whose timers run late,
        // as CI's did once at 1.02).
        let (sa, sb) = tokio::join!(send(&a, &tenant, 200, interval * 10), send(&b, &tenant, 20, interval * 10));
        assert!(sa + sb <= 1.05, "{sa} + {sb}");
        assert!(sa > 0.6 && sb > 0.15 && sb < 0.4, "{sa} {sb}");

        // Idle: leases given up, the tenant forgotten, the item deleted.
        tokio::time::sleep(interval * 12).await;
        assert!(a.is_empty() && b.is_empty(), "{} {}", a.len(), b.len());
        assert!(table.get("rate#data#acme", "lease").await.unwrap().is_none());

        // A dropped replica stops renewing and its heartbeat lapses: a,
        // alone, admits at the whole rate without a lease.
        drop(b);
        tokio::time::sleep(interval * 5).await;
        assert_eq!(a.replicas(), 1);
        assert!(close(send(&a, &tenant, 100, interval * 4).await, 1.0));
        assert!(a.is_empty());
        assert!(table.get("rate#data#acme", "lease").await.unwrap().is_none());
    }
}
