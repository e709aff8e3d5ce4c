//! Fair sharing of a service when it is itself saturated, in the style of
//! Kubernetes API Priority and Fairness: at most `capacity` requests run at
//! once; past that a request waits in one of `queues` queues, chosen by
//! shuffle sharding (the shortest of `hand` queues dealt from the tenant's
//! hash, so a flooding tenant fills its own queues and rarely all of
//! another's), and freed seats go to the queues by deficit round robin,
//! weighted by the tenant's tier. A request waits at most `max_wait` (less
//! when its deadline is nearer) and finds a full queue refused at once:
//! RESOURCE_EXHAUSTED, never a hang.
//!
//! While the service is not saturated a request takes its seat with two
//! atomic operations and no lock.
//!
//! A tenant's waiting requests stay in one queue (the one its first waiting
//! request chose) until none waits: a tenant's share is its queue's share,
//! whatever the number of requests it sends.
//!
//! **When the process is short of CPU** (`tenantmesh_service::load`) the
//! queue takes over admission for every request (the layers no longer take
//! the lock-free seat), and:
//! - while work queues for the CPU (the probe wakes late: a busy runtime
//!   that runs what it is given at once is short, but running less of it
//!   at a time would make nobody faster, and would throttle calls that wait
//!   on I/O), the seats shrink to what is running, by an eighth per probe,
//!   down to a floor of twice the machine's cores (at least 4): work past
//!   that waits here, in turn, instead of slowing every running request;
//!   they grow back by an eighth per probe once it no longer queues;
//! - a freed seat goes to the waiting tenant with the least recent usage
//!   for its weight (seconds of seats held, decayed over
//!   [`USAGE_HALF_LIFE`], as Kueue's admission fair sharing orders by
//!   usage): a tenant that used more recently waits behind one of the same
//!   weight that did not, and a tenant well within its quota behind none.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tenantmesh_service::load::{self, LoadListener, Verdict};

use tokio::sync::oneshot;

use crate::limits::{Limit, Refusal};

pub use tenantmesh_service::config::FairQueueSettings;

struct Waiter {
    id: u64,
    tenant: u64,
    weight: u32,
    seat: oneshot::Sender<()>,
}

#[derive(Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    /// Seats this queue may still take in its current turn.
    deficit: u64,
}

struct State {
    queues: Vec<Queue>,
    /// The queue whose turn it is.
    turn: usize,
    next_id: u64,
    /// The queue each tenant with requests waiting waits in, and how many.
    sticky: HashMap<u64, (usize, usize)>,
    /// Tenants' recent usage (seconds of seats held, decayed), counted
    /// while the process is short of CPU.
    usage: HashMap<u64, Usage>,
}

/// The half-life of a tenant's recorded usage.
pub const USAGE_HALF_LIFE: Duration = Duration::from_secs(10);
/// Tenants whose usage is remembered at once; past it the smallest
/// (decayed under a millisecond) are forgotten.
const USAGE_TENANTS: usize = 4096;

#[derive(Clone, Copy)]
struct Usage {
    seconds: f64,
    at: Instant,
}

impl Usage {
    fn now(self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.seconds * 0.5f64.powf(age / USAGE_HALF_LIFE.as_secs_f64())
    }
}

impl State {
    /// `tenant`'s recent usage now.
    fn usage(&self, tenant: u64, now: Instant) -> f64 {
        self.usage.get(&tenant).map_or(0.0, |u| u.now(now))
    }

    /// `tenant` held a seat for `held`.
    fn used(&mut self, tenant: u64, held: Duration, now: Instant) {
        if self.usage.len() >= USAGE_TENANTS && !self.usage.contains_key(&tenant) {
            self.usage.retain(|_, u| u.now(now) >= 1e-3);
            if self.usage.len() >= USAGE_TENANTS {
                return;
            }
        }
        let u = self.usage.entry(tenant).or_insert(Usage { seconds: 0.0, at: now });
        *u = Usage { seconds: u.now(now) + held.as_secs_f64(), at: now };
    }

    /// One waiter of `tenant` left the queues.
    fn left(&mut self, tenant: u64) {
        if let Some((_, n)) = self.sticky.get_mut(&tenant) {
            *n -= 1;
            if *n == 0 {
                self.sticky.remove(&tenant);
            }
        }
    }
}

/// Seats of one service process, shared fairly when they run out.
pub struct FairQueue {
    settings: FairQueueSettings,
    /// Seats now: the capacity, or fewer while the process is short of CPU.
    limit: AtomicUsize,
    /// The fewest seats it shrinks to.
    floor: usize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    state: Mutex<State>,
}

impl std::fmt::Debug for FairQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("settings", &self.settings)
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .field("running", &self.running.load(Ordering::Relaxed))
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish()
    }
}

/// A running request's seat; freed (and given to the next in turn) on drop.
/// It borrows its queue (no shared reference count to bump per request).
#[derive(Debug)]
pub struct Seat<'a> {
    queue: &'a FairQueue,
    /// The tenant and when it took the seat, when its usage is counted.
    used_by: Option<(u64, Instant)>,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        self.queue.running.fetch_sub(1, Ordering::SeqCst);
        let used = self.used_by.take();
        if used.is_some() || self.queue.waiting.load(Ordering::SeqCst) > 0 {
            let mut state = self.queue.state.lock().expect("fair queue lock");
            if let Some((tenant, since)) = used {
                let now = Instant::now();
                state.used(tenant, now.saturating_duration_since(since), now);
            }
            if self.queue.waiting.load(Ordering::SeqCst) > 0 {
                self.queue.dispatch(&mut state);
            }
        }
    }
}

impl LoadListener for FairQueue {
    fn tick(&self, verdict: Verdict) {
        let (limit, capacity) = (self.limit.load(Ordering::SeqCst), self.settings.capacity);
        if verdict.queueing {
            let running = self.running.load(Ordering::SeqCst);
            if running > self.floor {
                let base = running.min(limit);
                let shrunk = (base - (base / 8).max(1)).max(self.floor);
                self.limit.store(shrunk, Ordering::SeqCst);
            }
        } else if limit < capacity {
            self.limit.store((limit + (limit / 8).max(1)).min(capacity), Ordering::SeqCst);
            if self.waiting.load(Ordering::SeqCst) > 0 {
                self.dispatch(&mut self.state.lock().expect("fair queue lock"));
            }
        }
    }
}

impl FairQueue {
    pub fn new(settings: FairQueueSettings) -> Arc<Self> {
        let settings = FairQueueSettings {
            capacity: settings.capacity.max(1),
            queues: settings.queues.max(1),
            hand: settings.hand.clamp(1, settings.queues.max(1)),
            ..settings
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let queue = Arc::new(Self {
            settings,
            limit: AtomicUsize::new(settings.capacity),
            floor: (2 * cores).max(4).min(settings.capacity),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            state: Mutex::new(State {
                queues: (0..settings.queues).map(|_| Queue::default()).collect(),
                turn: 0,
                next_id: 0,
                sticky: HashMap::new(),
                usage: HashMap::new(),
            }),
        });
        let listener: Weak<dyn LoadListener> = Arc::downgrade(&queue) as Weak<FairQueue>;
        load::listen(listener);
        queue
    }

    pub fn settings(&self) -> FairQueueSettings {
        self.settings
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Seats now (fewer than the capacity while the process is short of
    /// CPU, or just after).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn try_take(&self) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        self.running.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).is_ok()
    }

    /// A seat at once if one is free and nobody waits (two atomic
    /// operations, no lock): callers try this before working out what
    /// [`FairQueue::acquire`] needs, unless the process is short of CPU.
    pub fn try_acquire(&self) -> Option<Seat<'_>> {
        (self.waiting.load(Ordering::SeqCst) == 0 && self.try_take()).then(|| Seat { queue: self, used_by: None })
    }

    /// A seat for a request of the tenant hashed to `tenant`, with its
    /// tier's `weight`, waiting at most until `deadline` (and `max_wait`).
    /// While the process is short of CPU, the seat's time counts in the
    /// tenant's usage.
    pub async fn acquire(&self, tenant: u64, weight: u32, deadline: Option<Instant>) -> Result<Seat<'_>, Refusal> {
        let counted = load::short_of_cpu();
        let seat = |queue| Seat { queue, used_by: counted.then(|| (tenant, Instant::now())) };
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_take() {
            return Ok(seat(self));
        }
        let (id, rx) = {
            let mut state = self.state.lock().expect("fair queue lock");
            self.waiting.fetch_add(1, Ordering::SeqCst);
            // Seats freed since the check above (nobody else waits for them).
            if state.queues.iter().all(|q| q.waiters.is_empty()) && self.try_take() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Ok(seat(self));
            }
            let q = match state.sticky.get(&tenant) {
                Some(&(q, _)) => q,
                None => self.shortest_of_hand(&state, tenant),
            };
            if state.queues[q].waiters.len() >= self.settings.queue_length {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(self.refusal("its queue is full"));
            }
            let (tx, rx) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            state.queues[q].waiters.push_back(Waiter { id, tenant, weight: weight.max(1), seat: tx });
            state.sticky.entry(tenant).or_insert((q, 0)).1 += 1;
            (id, rx)
        };
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .map_or(self.settings.max_wait, |d| d.min(self.settings.max_wait));
        let mut rx = rx;
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(())) => Ok(seat(self)),
            _ => {
                let mut state = self.state.lock().expect("fair queue lock");
                // Granted just as the wait ended: take it.
                if rx.try_recv().is_ok() {
                    return Ok(seat(self));
                }
                let mut gone = None;
                for q in state.queues.iter_mut() {
                    if let Some(at) = q.waiters.iter().position(|w| w.id == id) {
                        gone = q.waiters.remove(at).map(|w| w.tenant);
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                }
                if let Some(tenant) = gone {
                    state.left(tenant);
                }
                Err(self.refusal("no seat within its wait"))
            }
        }
    }

    fn refusal(&self, why: &str) -> Refusal {
        Refusal {
            limit: Limit::Capacity,
            subject: "service:capacity".into(),
            description: match self.limit() {
                limit if limit < self.settings.capacity => format!(
                    "{limit} requests at once on this instance while it is short of CPU (of {}); {why}",
                    self.settings.capacity
                ),
                limit => format!("{limit} requests at once on this instance; {why}"),
            },
            retry_after: self.settings.max_wait,
        }
    }

    /// The shortest of the `hand` queues dealt from `tenant`'s hash.
    fn shortest_of_hand(&self, state: &State, tenant: u64) -> usize {
        let n = self.settings.queues as u64;
        let mut hash = tenant;
        let mut best = (usize::MAX, 0);
        for _ in 0..self.settings.hand {
            let q = (hash % n) as usize;
            hash = hash.rotate_right(17).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (hash >> 29);
            let len = state.queues[q].waiters.len();
            if len < best.0 {
                best = (len, q);
            }
        }
        best.1
    }

    /// Gives free seats to waiters: queue by queue in deficit round robin,
    /// or, while the process is short of CPU, by least recent usage.
    fn dispatch(&self, state: &mut State) {
        let queues = state.queues.len();
        while self.waiting.load(Ordering::SeqCst) > 0 && self.try_take() {
            let mut granted = false;
            // Until a live waiter has the seat; waiters whose callers went
            // away (their requests dropped) are skipped and forgotten.
            let mut empty_visits = 0;
            let by_usage = load::short_of_cpu();
            while self.waiting.load(Ordering::SeqCst) > 0 && empty_visits <= queues {
                let waiter = if by_usage {
                    // The head with the least recent usage for its weight;
                    // among equals, the first from the turn on.
                    let now = Instant::now();
                    let best = (0..queues)
                        .map(|k| (state.turn + k) % queues)
                        .filter_map(|i| {
                            let head = state.queues[i].waiters.front()?;
                            Some((i, state.usage(head.tenant, now) / f64::from(head.weight)))
                        })
                        .min_by(|a, b| a.1.total_cmp(&b.1));
                    let Some((i, _)) = best else { break };
                    state.queues[i].deficit = 0;
                    state.turn = (i + 1) % queues;
                    state.queues[i].waiters.pop_front().expect("a head")
                } else {
                    let turn = state.turn;
                    let q = &mut state.queues[turn];
                    let Some(head) = q.waiters.front() else {
                        q.deficit = 0;
                        state.turn = (turn + 1) % queues;
                        empty_visits += 1;
                        continue;
                    };
                    empty_visits = 0;
                    if q.deficit == 0 {
                        q.deficit = u64::from(head.weight);
                    }
                    let waiter = q.waiters.pop_front().expect("a head");
                    q.deficit -= 1;
                    if q.deficit == 0 || q.waiters.is_empty() {
                        q.deficit = 0;
                        state.turn = (turn + 1) % queues;
                    }
                    waiter
                };
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                state.left(waiter.tenant);
                if waiter.seat.send(()).is_ok() {
                    granted = true;
                    break;
                }
                // Its caller stopped waiting: the seat goes to the next one.
            }
            if !granted {
                self.running.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(capacity: usize) -> FairQueueSettings {
        FairQueueSettings { capacity, queues: 8, hand: 2, queue_length: 1000, max_wait: Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn seats_are_free_until_capacity_then_waited_for() {
        let q = FairQueue::new(settings(2));
        let a = q.acquire(1, 1, None).await.unwrap();
        let _b = q.acquire(2, 1, None).await.unwrap();
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.acquire(3, 1, None).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a third request got a seat of two");
        drop(a);
        waiting.await.unwrap().unwrap();
        assert_eq!(q.running(), 1);
    }

    #[tokio::test]
    async fn a_wait_is_bounded_by_the_deadline_and_refused() {
        let q = FairQueue::new(settings(1));
        let _a = q.acquire(1, 1, None).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(30);
        let r = q.acquire(2, 1, Some(deadline)).await.unwrap_err();
        assert_eq!(r.limit, Limit::Capacity);
        assert_eq!(r.status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(q.waiting.load(Ordering::SeqCst), 0, "the refused waiter left its queue");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let q = FairQueue::new(FairQueueSettings { queue_length: 1, queues: 1, hand: 1, ..settings(1) });
        let _a = q.acquire(1, 1, None).await.unwrap();
        let q2 = q.clone();
        let _waiter = tokio::spawn(async move { q2.acquire(1, 1, None).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = q.acquire(1, 1, None).await.unwrap_err();
        assert!(r.description.contains("queue is full"), "{r:?}");
    }

    /// Waiters whose requests were dropped (their callers went away) do not
    /// hold a freed seat: it goes to the next live waiter, however many
    /// dead ones are ahead of it.
    #[tokio::test]
    async fn a_seat_skips_waiters_that_went_away() {
        let q = FairQueue::new(FairQueueSettings { queues: 2, hand: 1, ..settings(1) });
        let seat = q.acquire(1, 1, None).await.unwrap();
        // Twenty waiters that go away without a trace (their futures dropped).
        for t in 0..20u64 {
            let q = q.clone();
            let task = tokio::spawn(async move { q.acquire(t, 1, None).await.map(drop) });
            tokio::time::sleep(Duration::from_millis(2)).await;
            task.abort();
        }
        let q2 = q.clone();
        let live = tokio::spawn(async move { q2.acquire(99, 1, None).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(seat);
        tokio::time::timeout(Duration::from_secs(1), live)
            .await
            .expect("the live waiter got the seat")
            .unwrap()
            .unwrap();
        assert_eq!(q.waiting.load(Ordering::SeqCst), 0);
    }

    /// A tenant's waiting requests share one queue of its hand, so sending
    /// more requests does not win it more turns.
    #[tokio::test]
    async fn a_tenant_waits_in_one_queue() {
        let q = FairQueue::new(FairQueueSettings { hand: 4, ..settings(1) });
        let _seat = q.acquire(7, 1, None).await.unwrap();
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.acquire(7, 1, None).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let used = q.state.lock().unwrap().queues.iter().filter(|q| !q.waiters.is_empty()).count();
        assert_eq!(used, 1);
        drop(_seat);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert!(q.state.lock().unwrap().sticky.is_empty(), "no tenant waits: nothing kept");
    }

    /// Short of CPU, a freed seat goes to the waiting tenant with the least
    /// recent usage: a tenant that held seats for 100 ms just before waits
    /// behind one of the same weight that held none, however long it waited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_of_cpu_seats_go_to_the_least_recent_usage_first() {
        use tenantmesh_service::load::{Overload, OverloadSettings, configure};
        configure(OverloadSettings { mode: Overload::On, ..Default::default() });
        let q = FairQueue::new(FairQueueSettings { hand: 1, ..settings(1) });
        let used = q.acquire(11, 1, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(used);
        let first = q.acquire(0, 1, None).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for tenant in [11, 22] {
            tasks.extend(waiters(&q, &order, tenant, 1, 20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order[..20], [22; 20], "the quiet tenant first: {order:?}");
        configure(OverloadSettings::default());
    }

    /// `n` requests of `tenant` (with `weight`) waiting for a seat, each
    /// writing its tenant to `order` once seated, then leaving.
    fn waiters(
        q: &Arc<FairQueue>,
        order: &Arc<Mutex<Vec<u64>>>,
        tenant: u64,
        weight: u32,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let (q, order) = (q.clone(), order.clone());
                tokio::spawn(async move {
                    let seat = q.acquire(tenant, weight, None).await.unwrap();
                    order.lock().unwrap().push(tenant);
                    drop(seat);
                })
            })
            .collect()
    }

    const QUEUEING: Verdict = Verdict { short: true, queueing: true };

    /// While work queues for the CPU, the seats shrink to what is running
    /// (by an eighth a probe, not under the floor): new requests wait; once
    /// it no longer does they grow back to the capacity and the waiters
    /// are seated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seats_shrink_while_short_of_cpu_and_grow_back() {
        let q = FairQueue::new(settings(64));
        let held: Vec<_> = (0..40).map(|t| q.try_acquire().unwrap_or_else(|| panic!("seat {t}"))).collect();
        q.tick(QUEUEING);
        assert_eq!(q.limit(), 35, "an eighth under what runs");
        q.tick(QUEUEING);
        assert_eq!(q.limit(), 31, "an eighth a probe");
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.acquire(7, 1, None).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "seated past the limit");
        for _ in 0..100 {
            q.tick(QUEUEING);
        }
        assert_eq!(q.limit(), q.floor, "down to the floor, not under it");
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("seated once seats are freed")
            .unwrap()
            .unwrap();
        q.tick(QUEUEING);
        assert_eq!(q.limit(), q.floor, "nothing runs past the floor: no change");
        for _ in 0..100 {
            q.tick(Verdict::default());
        }
        assert_eq!(q.limit(), 64, "back to the capacity");
        // Growing back seats the waiters at once.
        let held: Vec<_> = (0..40).map(|_| q.try_acquire().unwrap()).collect();
        for _ in 0..100 {
            q.tick(QUEUEING);
        }
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.acquire(7, 1, None).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        for _ in 0..100 {
            q.tick(Verdict::default());
        }
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("seated when the seats grew")
            .unwrap()
            .unwrap();
        drop(held);
    }

    /// One seat; a flooder (weight 1) with 200 requests waiting, then a
    /// tenant of weight 3 with 60: while both wait, seats go 1:3, so the
    /// second tenant is served within the flood, not after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seats_are_shared_by_deficit_round_robin() {
        // One queue per tenant (hand 1): 11 and 22 wait in queues 3 and 6 of 8.
        let q = FairQueue::new(FairQueueSettings { hand: 1, ..settings(1) });
        let first = q.acquire(0, 1, None).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        tasks.extend(waiters(&q, &order, 11, 1, 200));
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks.extend(waiters(&q, &order, 22, 3, 60));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let first_80: Vec<u64> = order.iter().take(80).copied().collect();
        let quiet = first_80.iter().filter(|&&t| t == 22).count();
        // Weighted 3:1 while both wait: about 60 of the first 80.
        assert!((50..=62).contains(&quiet), "the weighted tenant got {quiet} of the first 80 seats: {first_80:?}");
    }
}
