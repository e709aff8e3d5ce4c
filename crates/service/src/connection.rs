//! Shedding by connection: what a server does about a connection rather
//! than a call.
//!
//! Refusing a call still costs the server its HTTP/2 framing, header
//! decoding, authentication from the caches and the limiter (about 13 us):
//! a client that sends as fast as it can, nearly every call refused, takes
//! the CPU from everyone though every one of its calls is refused. So each
//! accepted connection carries a [`Connection`] that the layers tell of
//! each call's outcome (which identity, admitted or refused), and:
//!
//! - **A connection whose calls are overwhelmingly refused, all of one
//!   identity,** (a call its client resets before its answer, as in rapid
//!   reset, counts as refused) is not read from for a while, once the
//!   process is short of CPU ([`crate::load`]) or its refusals come faster
//!   than [`SHED_REFUSALS_PER_SECOND`]: at least
//!   [`SHED_REFUSED_PERCENT`] of a window of [`WINDOW`] calls refused, and
//!   no other identity's call admitted in it. The pause starts at
//!   [`FIRST_PAUSE`] and doubles while the connection goes on (until a
//!   window under [`WELL_BEHAVED_PERCENT`] refused); the first refusal read
//!   after a pause starts the next one. Pauses last up to what the
//!   refusing layer says costs the caller nothing (half the time its
//!   tenant's bucket takes to refill: its calls are still admitted at its
//!   quota), never more than [`MAX_PAUSE`]. Unread, its next calls wait in the
//!   kernel's socket buffer and the client's, not in the server's memory or
//!   CPU. Between pauses it is read 2 KiB at a time, yielding in between,
//!   so that what it sent meanwhile is not one burst everyone waits behind.
//! - **A tenant's refusals are paced**: past a burst of [`REFUSAL_BURST`],
//!   answered one per [`REFUSAL_PACE`] over all its connections, gateways'
//!   included (the wait is that tenant's, on its own refused call), each
//!   waiting at most [`MAX_REFUSAL_WAIT`] ([`Paced`]); unauthenticated
//!   callers' likewise on a connection being shed, per connection. A
//!   client that waits for its answers (a closed loop: most floods, since
//!   HTTP/2 bounds the streams in flight) can then send no faster than its
//!   refusals come back, so its flood reaches the server as an even
//!   trickle instead of a connection's worth of calls read at once after
//!   every pause, or of a gateway's share of them. Admitted calls are
//!   never delayed.
//! - **A gateway** (a connection multiplexing several tenants' calls, as an
//!   application service calling the data service) is never paused for one
//!   tenant's flood on it: two identities' calls admitted one after the
//!   other in the last [`GATEWAY_MEMORY`] keep it read, however small a
//!   share of its calls the others are. Its flooding tenant is refused call
//!   by call, as before.
//! - **Connection setups per peer address** are bounded
//!   ([`SETUPS_PER_SECOND_PER_PEER`] by default, after a burst of
//!   [`SETUP_BURST_SECONDS`] seconds' worth; see [`bound_peer_setups`]): a
//!   peer that opens connections faster (a client the server keeps ending
//!   for rapid reset, which reconnects at once) waits for its next one to
//!   be served; at most [`HELD_PER_PEER`] of its connections wait, the rest
//!   are closed at once.

use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Calls per window over which a connection is judged.
pub const WINDOW: u32 = 64;
/// The share of a window's calls that must be refused for a pause. (A
/// paused tenant's bucket refills during the pause: its next window admits
/// a burst, so this is well under 100.)
pub const SHED_REFUSED_PERCENT: u32 = 75;
/// A window with fewer refused than this share ends the pauses; one in
/// between neither pauses the connection nor forgets its pauses.
pub const WELL_BEHAVED_PERCENT: u32 = 50;
/// Refusals a second on one connection past which it is shed whether or
/// not the process is short of CPU (at about 20 us each, 2% of a core).
pub const SHED_REFUSALS_PER_SECOND: u32 = 1000;
/// The first pause of a connection judged to be flooding.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A tenant's refusals past a burst are answered one per this interval
/// (all its connections together; an anonymous caller's per shed
/// connection): [`SHED_REFUSALS_PER_SECOND`].
pub const REFUSAL_PACE: Duration = Duration::from_millis(1);
/// Refusals of one tenant answered at once, however close together,
/// before the pace applies.
pub const REFUSAL_BURST: u32 = 64;
/// The longest a refusal waits to be answered; one that would wait longer
/// is answered at once (the pauses bound what such a client sends).
pub const MAX_REFUSAL_WAIT: Duration = Duration::from_secs(1);
/// Refusals waiting to be answered, the whole process: past it, they are
/// answered at once (a waiting refusal holds its stream's state).
pub const MAX_WAITING_REFUSALS: usize = 16_384;
/// How long a connection that carried two identities' admitted calls one
/// after the other counts as a gateway's (never paused).
pub const GATEWAY_MEMORY: Duration = Duration::from_secs(2);
/// New connections per second one peer address may open, after a burst.
pub const SETUPS_PER_SECOND_PER_PEER: u32 = 100;
/// The burst of new connections a peer address may open at once (as a
/// multiple of the rate).
pub const SETUP_BURST_SECONDS: u32 = 2;
/// Connections of one peer address held back at once; more are closed.
pub const HELD_PER_PEER: u32 = 64;
/// Connections held back at once, all peers together.
const HELD_IN_ALL: usize = 4096;

/// The identity of unauthenticated callers (public RPCs, refused tokens):
/// on one connection they are one identity.
pub const ANONYMOUS: u64 = 1;
const NONE: u64 = 0;
const MIXED: u64 = u64::MAX;

/// Nanoseconds since the process's first use of it (never 0).
fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_nanos(1));
    epoch.elapsed().as_nanos() as u64
}

/// One accepted connection's standing, shared by its IO (which pauses
/// reading) and its calls (which report their outcome).
#[derive(Debug)]
pub struct Connection {
    calls: AtomicU32,
    refused: AtomicU32,
    refused_by: AtomicU64,
    admitted_by: AtomicU64,
    /// The longest pause the window's refusals allow (ns).
    cap: AtomicU64,
    /// Pauses in a row (0: not paused).
    level: AtomicU32,
    /// Read nothing before this instant ([`now_nanos`]; 0: no pause).
    pause_until: AtomicU64,
    /// The current pause's length (ns): a refusal after it ends starts the
    /// next one at once.
    pause_len: AtomicU64,
    /// When the last pause was set by a window ([`now_nanos`]).
    judged_at: AtomicU64,
    /// The identity of the last admitted call.
    last_admitted: AtomicU64,
    /// When two identities' calls were last admitted one after the other
    /// ([`now_nanos`]; 0: never): a gateway.
    mixed_at: AtomicU64,
    /// Pauses so far.
    pauses: AtomicU64,
    /// When the current window began ([`now_nanos`]).
    window_started: AtomicU64,
    /// The next free slot of an anonymous caller's paced refusals
    /// ([`now_nanos`]).
    refusal_slot: AtomicU64,
}

/// The next free slot of each identity's paced refusals ([`now_nanos`]).
static PACERS: std::sync::LazyLock<std::sync::Mutex<HashMap<u64, u64>>> = std::sync::LazyLock::new(Default::default);
/// Tenants paced at once (those whose pace has caught up are forgotten).
const PACED_TENANTS: usize = 4096;
/// When [`PACERS`] was last swept ([`now_nanos`]).
static PACERS_SWEPT: AtomicU64 = AtomicU64::new(0);
/// Refusals waiting now (every [`Paced`] not yet dropped).
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A refusal's wait before it is answered ([`Connection::refused`]); it
/// counts among the waiting ([`MAX_WAITING_REFUSALS`]) until dropped.
#[derive(Debug)]
pub struct Paced {
    wait: Duration,
}

impl Paced {
    /// How long it waits.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Waits it out.
    pub async fn done(self) {
        tokio::time::sleep(self.wait).await;
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Relaxed);
    }
}

impl Connection {
    /// The connection `request` came on, when it was accepted by
    /// [`incoming`].
    pub fn of<B>(request: &http::Request<B>) -> Option<&Arc<Connection>> {
        request.extensions().get::<ConnectionInfo>().map(|i| &i.connection)
    }

    /// An identity for [`Connection::admitted`] and [`Connection::refused`]:
    /// a tenant id's (or any caller key's) hash, never [`ANONYMOUS`].
    pub fn identity(key: &str) -> u64 {
        use std::hash::BuildHasher;
        static HASHER: OnceLock<std::hash::RandomState> = OnceLock::new();
        HASHER.get_or_init(std::hash::RandomState::new).hash_one(key).clamp(ANONYMOUS + 1, MIXED - 1)
    }

    /// A call of `identity` on this connection was admitted.
    pub fn admitted(&self, identity: u64) {
        note(&self.admitted_by, identity);
        let last = self.last_admitted.load(Relaxed);
        if last != identity {
            self.last_admitted.store(identity, Relaxed);
            if last != NONE {
                self.mixed_at.store(now_nanos(), Relaxed);
            }
        }
        self.count();
    }

    /// Whether two identities' calls were admitted on this connection in
    /// the last [`GATEWAY_MEMORY`]: a gateway's, never paused.
    fn gateway(&self, now: u64) -> bool {
        let at = self.mixed_at.load(Relaxed);
        at != 0 && now.saturating_sub(at) < GATEWAY_MEMORY.as_nanos() as u64
    }

    /// A call of `identity` on this connection was refused; pausing the
    /// connection for up to `cap` costs the caller nothing it would have
    /// been admitted (half its limit's refill time). `Some`: the refusal
    /// is to wait that long before it is answered ([`Connection::pace`]).
    pub fn refused(&self, identity: u64, cap: Duration) -> Option<Paced> {
        self.wasted(identity, cap);
        self.count();
        self.pace(identity)
    }

    /// The wait of a refusal of `identity`: past a burst of
    /// [`REFUSAL_BURST`], one per [`REFUSAL_PACE`] per tenant, over every
    /// connection (gateways included: a wait is a refusal of that tenant's
    /// call, nobody else's); an unauthenticated caller's only while this
    /// connection is shed, and per connection (they are many callers to
    /// the process).
    fn pace(&self, identity: u64) -> Option<Paced> {
        let now = now_nanos();
        if identity == ANONYMOUS && (!self.shedding() || self.gateway(now)) {
            return None;
        }
        if WAITING.load(Relaxed) >= MAX_WAITING_REFUSALS {
            return None;
        }
        let (pace, max) = (REFUSAL_PACE.as_nanos() as u64, MAX_REFUSAL_WAIT.as_nanos() as u64);
        let burst = pace * u64::from(REFUSAL_BURST);
        // The generic cell rate algorithm: `due` is when the next refusal
        // would be answered without a burst; it may be `burst` ahead.
        // `next`: the pace after this refusal, or `None` past the longest
        // wait (answered at once, the pace unchanged).
        let wait = |due: u64| due.max(now).saturating_sub(now + burst);
        let next = |due: u64| (wait(due) <= max).then(|| due.max(now) + pace);
        let due = if identity == ANONYMOUS {
            self.refusal_slot.fetch_update(Relaxed, Relaxed, next).ok()?
        } else {
            let mut pacers = PACERS.lock().expect("pacers lock");
            if pacers.len() >= PACED_TENANTS && !pacers.contains_key(&identity) {
                // Forget the tenants whose pace has caught up, at most
                // every 100 ms (a scan of them all); a new one past that
                // is not paced.
                let swept = PACERS_SWEPT.load(Relaxed);
                if now.saturating_sub(swept) >= 100_000_000 {
                    PACERS_SWEPT.store(now, Relaxed);
                    pacers.retain(|_, due| *due > now);
                }
                if pacers.len() >= PACED_TENANTS {
                    return None;
                }
            }
            let due = pacers.entry(identity).or_insert(0);
            std::mem::replace(due, next(*due)?)
        };
        let wait = wait(due);
        (wait > 0).then(|| {
            WAITING.fetch_add(1, Relaxed);
            Paced { wait: Duration::from_nanos(wait) }
        })
    }

    /// A call of `identity` admitted on this connection (and counted by
    /// [`Connection::admitted`]) was reset by its client before its answer:
    /// work for nothing, counted as refused.
    pub fn abandoned(&self, identity: u64, cap: Duration) {
        self.wasted(identity, cap);
    }

    fn wasted(&self, identity: u64, cap: Duration) {
        note(&self.refused_by, identity);
        self.refused.fetch_add(1, Relaxed);
        self.cap.fetch_min(cap.min(MAX_PAUSE).as_nanos() as u64, Relaxed);
        // Being shed: the first refusal read after a pause starts the next
        // (a connection with few calls in flight would otherwise send a
        // whole window between pauses).
        if self.shedding() {
            let now = now_nanos();
            let len = self.pause_len.load(Relaxed);
            if len > 0 && now >= self.pause_until.load(Relaxed) && !self.gateway(now) {
                self.pause_until.store(now.saturating_add(len.min(cap.as_nanos() as u64)), Relaxed);
            }
        }
    }

    /// How many times this connection has been paused.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Relaxed)
    }

    fn count(&self) {
        if self.calls.fetch_add(1, Relaxed) + 1 >= WINDOW {
            self.judge();
        }
    }

    /// The window is full: pause the connection, or end its pauses.
    fn judge(&self) {
        let calls = self.calls.swap(0, Relaxed);
        if calls < WINDOW {
            return; // another call judged this window
        }
        let refused = self.refused.swap(0, Relaxed);
        let refused_by = self.refused_by.swap(NONE, Relaxed);
        let admitted_by = self.admitted_by.swap(NONE, Relaxed);
        let cap = self.cap.swap(u64::MAX, Relaxed);
        let one_identity =
            refused_by != NONE && refused_by != MIXED && (admitted_by == NONE || admitted_by == refused_by);
        let percent = u64::from(refused) * 100 / u64::from(calls);
        let now = now_nanos();
        let started = self.window_started.swap(now, Relaxed);
        if !one_identity || percent < u64::from(WELL_BEHAVED_PERCENT) || self.gateway(now) {
            self.level.store(0, Relaxed);
            self.pause_len.store(0, Relaxed);
            return;
        }
        if percent < u64::from(SHED_REFUSED_PERCENT) {
            return;
        }
        // Shedding starts once the process is short of CPU, or once the
        // connection's refusals come faster than SHED_REFUSALS_PER_SECOND:
        // until then refusing call by call costs little, and a pause only
        // bunches what an open-loop client sends. Once started it goes on
        // while the connection floods.
        let fast = u64::from(refused) * 1_000_000_000
            >= u64::from(SHED_REFUSALS_PER_SECOND) * now.saturating_sub(started).max(1);
        if self.level.load(Relaxed) == 0 && !fast && !crate::load::short_of_cpu() {
            return;
        }
        // One step up per pause: the windows read while one is being set
        // (before it, or just after a refusal renewed it) are covered.
        if now.saturating_sub(self.judged_at.load(Relaxed)) < self.pause_len.load(Relaxed) {
            return;
        }
        self.judged_at.store(now, Relaxed);
        let level = (self.level.load(Relaxed) + 1).min(16);
        self.level.store(level, Relaxed);
        let pause = (FIRST_PAUSE.as_nanos() as u64).saturating_mul(1 << (level - 1)).min(cap);
        self.pause_len.store(pause, Relaxed);
        self.pause_until.store(now.saturating_add(pause), Relaxed);
        if self.pauses.fetch_add(1, Relaxed) == 0 {
            tracing::warn!(
                refused,
                calls,
                anonymous = refused_by == ANONYMOUS,
                "a connection's calls are nearly all refused: reading from it is paused while that lasts"
            );
        }
    }

    /// Whether the connection is being shed (paused, or read in small
    /// steps between pauses).
    fn shedding(&self) -> bool {
        self.level.load(Relaxed) > 0
    }

    /// The instant reading may resume, if the connection is paused now.
    fn paused_until(&self) -> Option<u64> {
        let until = self.pause_until.load(Relaxed);
        (until != 0 && now_nanos() < until).then_some(until)
    }
}

impl Default for Connection {
    fn default() -> Self {
        Self {
            calls: AtomicU32::new(0),
            refused: AtomicU32::new(0),
            refused_by: AtomicU64::new(NONE),
            admitted_by: AtomicU64::new(NONE),
            cap: AtomicU64::new(u64::MAX),
            level: AtomicU32::new(0),
            pause_until: AtomicU64::new(0),
            pause_len: AtomicU64::new(0),
            judged_at: AtomicU64::new(0),
            last_admitted: AtomicU64::new(NONE),
            mixed_at: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            window_started: AtomicU64::new(now_nanos()),
            refusal_slot: AtomicU64::new(0),
        }
    }
}

/// Records `identity` in `slot`: the first one seen, or [`MIXED`].
fn note(slot: &AtomicU64, identity: u64) {
    let seen = slot.load(Relaxed);
    if seen == identity || seen == MIXED {
        return;
    }
    if seen != NONE || slot.compare_exchange(NONE, identity, Relaxed, Relaxed).is_err_and(|now| now != identity) {
        slot.store(MIXED, Relaxed);
    }
}

/// What a call knows of its connection (a request extension): its
/// addresses, and its [`Connection`].
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub connection: Arc<Connection>,
}

/// An accepted connection: reads pause while its [`Connection`] says so.
#[derive(Debug)]
pub struct ShedIo {
    stream: TcpStream,
    info: ConnectionInfo,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the last read of a shed connection yielded instead.
    yielded: bool,
}

/// What a shed connection's read takes at a time (about ten small calls).
const SHED_READ_BYTES: usize = 2048;

impl ShedIo {
    pub fn new(stream: TcpStream) -> Self {
        let tcp = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: stream.peer_addr().ok() };
        Self { stream, info: ConnectionInfo { tcp, connection: Arc::default() }, sleep: None, yielded: false }
    }

    /// The socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The connection's standing.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.info.connection
    }
}

impl Connected for ShedIo {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for ShedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(until) = self.info.connection.paused_until() {
            let deadline = tokio::time::Instant::now() + Duration::from_nanos(until.saturating_sub(now_nanos()));
            let sleep = match &mut self.sleep {
                Some(sleep) => {
                    sleep.as_mut().reset(deadline);
                    sleep
                }
                none => none.insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        if !self.info.connection.shedding() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        // Between pauses, what was sent meanwhile is read a little at a
        // time, every other step yielding to the rest of the process: a
        // paused connection's backlog is not one burst that everyone else's
        // calls wait behind.
        self.yielded = !self.yielded;
        if self.yielded {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut step = [0u8; SHED_READ_BYTES];
        let limit = buf.remaining().min(SHED_READ_BYTES);
        let mut small = ReadBuf::new(&mut step[..limit]);
        let read = Pin::new(&mut self.stream).poll_read(cx, &mut small);
        if let Poll::Ready(Ok(())) = read {
            buf.put_slice(small.filled());
        }
        read
    }
}

impl AsyncWrite for ShedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

use std::future::Future as _;

/// A peer's connection setups: a token bucket, and how many of its
/// connections are held back now.
#[derive(Debug)]
struct Setups {
    tokens: f64,
    at: Instant,
    held: u32,
}

/// A connection held back until `at`.
struct Held {
    at: Instant,
    stream: TcpStream,
    ip: IpAddr,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at) // earliest first in a max-heap
    }
}

/// The connections a listener accepts (`TCP_NODELAY` on, see
/// [`crate::runtime::incoming`]), each with its [`Connection`], at most
/// [`SETUPS_PER_SECOND_PER_PEER`] per peer address after a burst.
pub struct Incoming {
    listener: TcpListener,
    setups: HashMap<IpAddr, Setups>,
    held: BinaryHeap<Held>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// None: no bound.
    rate: Option<f64>,
    burst: f64,
    logged: Option<Instant>,
}

/// The process's bound on connection setups per peer (0: none).
static SETUP_RATE: AtomicU32 = AtomicU32::new(SETUPS_PER_SECOND_PER_PEER);

/// Bounds each peer address to `per_second` new connections a second
/// (after a burst of [`SETUP_BURST_SECONDS`] seconds' worth) on the
/// listeners [`incoming`] makes from now on; 0: no bound. The process's
/// `TENANTMESH_PEER_CONNECTIONS_PER_SECOND`, set when its authenticator
/// is configured (`Authenticator::with_admission`).
pub fn bound_peer_setups(per_second: u32) {
    SETUP_RATE.store(per_second, Relaxed);
}

/// [`Incoming`] on `listener`, with the process's bound on setups.
pub fn incoming(listener: TcpListener) -> Incoming {
    let rate = SETUP_RATE.load(Relaxed);
    Incoming::with_rate(listener, rate, rate.saturating_mul(SETUP_BURST_SECONDS))
}

impl Incoming {
    /// At most `rate` new connections per second per peer address, after
    /// `burst` (0: no bound).
    pub fn with_rate(listener: TcpListener, rate: u32, burst: u32) -> Self {
        Self {
            listener,
            setups: HashMap::new(),
            held: BinaryHeap::new(),
            timer: None,
            rate: (rate > 0).then_some(f64::from(rate)),
            burst: f64::from(burst.max(1)),
            logged: None,
        }
    }

    /// When `ip`'s new connection may be served: now (`None`), later, or
    /// never (`Some(None)`: too many of its connections wait already).
    fn admit(&mut self, ip: IpAddr, now: Instant) -> Option<Option<Instant>> {
        let rate = self.rate?;
        if self.setups.len() >= 4096 {
            let burst = self.burst;
            self.setups.retain(|_, s| s.held > 0 || s.tokens + now.duration_since(s.at).as_secs_f64() * rate < burst);
        }
        let burst = self.burst;
        let s = self.setups.entry(ip).or_insert(Setups { tokens: burst, at: now, held: 0 });
        s.tokens = (s.tokens + now.duration_since(s.at).as_secs_f64() * rate).min(burst);
        s.at = now;
        if s.tokens >= 1.0 && s.held == 0 {
            s.tokens -= 1.0;
            return None;
        }
        if s.held >= HELD_PER_PEER || self.held.len() >= HELD_IN_ALL {
            return Some(None);
        }
        // Served in turn: after the ones already waiting.
        s.tokens -= 1.0;
        s.held += 1;
        Some(Some(now + Duration::from_secs_f64((-s.tokens).max(0.0) / rate)))
    }

    fn accepted(stream: TcpStream) -> ShedIo {
        // Best effort: a socket that refuses it still works.
        let _ = stream.set_nodelay(true);
        ShedIo::new(stream)
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<ShedIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let now = Instant::now();
            if this.held.peek().is_some_and(|h| h.at <= now) {
                let held = this.held.pop().expect("peeked");
                if let Some(s) = this.setups.get_mut(&held.ip) {
                    s.held = s.held.saturating_sub(1);
                }
                return Poll::Ready(Some(Ok(Self::accepted(held.stream))));
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, addr))) => match this.admit(addr.ip(), now) {
                    None => return Poll::Ready(Some(Ok(Self::accepted(stream)))),
                    Some(at) => {
                        if this.logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                            this.logged = Some(now);
                            tracing::warn!(
                                peer = %addr.ip(),
                                per_second = this.rate.unwrap_or_default(),
                                "a peer opens connections faster than a peer may: its next ones wait{} (logged once in 10 s)",
                                if at.is_none() { ", and are closed when too many wait" } else { "" }
                            );
                        }
                        if let Some(at) = at {
                            this.held.push(Held { at, stream, ip: addr.ip() });
                        }
                        // A connection not held is dropped: closed.
                    }
                },
                // An accept error (out of descriptors, a connection reset
                // before it was accepted) is the server's to log and go on.
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {
                    let Some(next) = this.held.peek().map(|h| h.at) else { return Poll::Pending };
                    let timer = match &mut this.timer {
                        Some(t) => {
                            t.as_mut().reset(next.into());
                            t
                        }
                        none => none.insert(Box::pin(tokio::time::sleep_until(next.into()))),
                    };
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection of a process short of CPU (pauses start only then).
    fn connection() -> Connection {
        overload(crate::load::Overload::On);
        Connection::default()
    }

    fn overload(mode: crate::load::Overload) {
        crate::load::configure(crate::load::OverloadSettings { mode, ..Default::default() });
    }

    /// While the process has CPU to spare, a connection whose calls are
    /// refused slower than SHED_REFUSALS_PER_SECOND is not paused (its
    /// calls are refused one by one); faster, or once the process is short
    /// of CPU, the next window pauses it.
    #[test]
    fn pauses_start_when_refusals_are_fast_or_the_process_is_short_of_cpu() {
        let flooder = Connection::identity("acme");
        let slow = Duration::from_secs(2) / SHED_REFUSALS_PER_SECOND;
        let c = connection();
        overload(crate::load::Overload::Off);
        for _ in 0..WINDOW * 2 {
            c.refused(flooder, MAX_PAUSE);
            std::thread::sleep(slow);
        }
        assert_eq!(c.pauses(), 0, "refused at under 500 a second");
        for _ in 0..WINDOW {
            c.refused(flooder, MAX_PAUSE);
        }
        assert_eq!(c.pauses(), 1, "a window refused at once");
        let c = connection();
        overload(crate::load::Overload::Off);
        for _ in 0..WINDOW * 2 {
            c.refused(flooder, MAX_PAUSE);
            std::thread::sleep(slow);
        }
        assert_eq!(c.pauses(), 0);
        overload(crate::load::Overload::On);
        for _ in 0..WINDOW {
            c.refused(flooder, MAX_PAUSE);
            std::thread::sleep(slow);
        }
        assert_eq!(c.pauses(), 1, "slow refusals, short of CPU");
    }

    /// The waits of `n` refusals of `identity` on `c` (zero: answered at once).
    fn waits(c: &Connection, identity: u64, n: usize) -> Vec<Duration> {
        (0..n).map(|_| c.refused(identity, MAX_PAUSE).map_or(Duration::ZERO, |p| p.wait())).collect()
    }

    /// A tenant's refusals past a burst are answered one per REFUSAL_PACE
    /// over all of its connections, gateways' too, none more than
    /// MAX_REFUSAL_WAIT later; an anonymous caller's per connection, and
    /// only once that connection is shed.
    #[test]
    fn refusals_past_a_burst_are_paced() {
        let flooder = Connection::identity("paced");
        let c = connection();
        assert!(waits(&c, flooder, REFUSAL_BURST as usize).iter().all(Duration::is_zero), "the burst");
        let w = waits(&c, flooder, 11);
        assert!(w[10] > Duration::from_millis(5) && w[10] <= REFUSAL_PACE * 11, "one a millisecond: {w:?}");
        // The same tenant on a second connection waits behind the first's.
        let d = connection();
        let _ = waits(&d, flooder, WINDOW as usize);
        assert!(d.refused(flooder, MAX_PAUSE).is_some_and(|p| p.wait() > w[10]));
        // Never more than MAX_REFUSAL_WAIT: past it, answered at once.
        let w = waits(&c, flooder, 1500);
        assert!(w.iter().all(|w| *w <= MAX_REFUSAL_WAIT));
        assert!(w[1400..].iter().all(Duration::is_zero), "a second's worth waits, the rest is answered");
        // On a gateway too.
        let (gateway, other) = (connection(), Connection::identity("paced-other"));
        let tenant = Connection::identity("paced-on-a-gateway");
        gateway.admitted(other);
        gateway.admitted(tenant);
        let w = waits(&gateway, tenant, REFUSAL_BURST as usize + 20);
        assert!(!gateway.shedding() && w[REFUSAL_BURST as usize + 19] > Duration::from_millis(10), "{w:?}");
        // Anonymous callers: each shed connection on its own, no other.
        assert!(waits(&gateway, ANONYMOUS, 200).iter().all(Duration::is_zero), "not shed");
        let (a, b) = (connection(), connection());
        let _ = (waits(&a, ANONYMOUS, WINDOW as usize + 200), waits(&b, ANONYMOUS, WINDOW as usize));
        let (on_a, on_b) = (waits(&a, ANONYMOUS, 1)[0], waits(&b, ANONYMOUS, 1)[0]);
        assert!(on_a > Duration::from_millis(50) && on_b < on_a / 2, "{on_a:?} {on_b:?}");
    }

    /// However many tenants flood at once, at most MAX_WAITING_REFUSALS
    /// refusals wait in the process; past it they are answered at once,
    /// and waiting resumes as the waiting ones are answered.
    #[test]
    fn waiting_refusals_are_bounded_in_the_process() {
        let c = connection();
        let mut waiting = Vec::new();
        for t in 0..24 {
            let tenant = Connection::identity(&format!("waiting-{t}"));
            waiting.extend((0..1200).filter_map(|_| c.refused(tenant, MAX_PAUSE)));
        }
        assert_eq!(waiting.len(), MAX_WAITING_REFUSALS, "24 tenants x ~1,000 would wait");
        let late = Connection::identity("waiting-late");
        let past_burst = REFUSAL_BURST as usize + 5;
        assert!(waits(&c, late, past_burst).iter().all(Duration::is_zero), "the process's bound");
        waiting.truncate(MAX_WAITING_REFUSALS - 1);
        assert!(waits(&c, late, past_burst).iter().any(|w| !w.is_zero()), "room again");
    }

    /// A window of one identity's refusals pauses the connection, for no
    /// longer than the refusals' cap; a well-behaved window ends it.
    #[test]
    fn one_identitys_refusals_pause_a_connection() {
        let c = connection();
        let flooder = Connection::identity("acme");
        for _ in 0..WINDOW - 4 {
            c.refused(flooder, Duration::from_millis(5));
        }
        for _ in 0..4 {
            c.admitted(flooder);
        }
        assert_eq!(c.pauses(), 1);
        let until = c.paused_until().expect("paused");
        assert!(until - now_nanos() <= 5_000_000, "capped at the refill time");
        // A window of admitted calls: no pause after it.
        std::thread::sleep(Duration::from_millis(6));
        for _ in 0..WINDOW {
            c.admitted(flooder);
        }
        assert_eq!(c.pauses(), 1);
        assert_eq!(c.level.load(Relaxed), 0);
    }

    /// A gateway: another tenant's admitted calls on the connection keep it
    /// read, however many of one tenant's calls are refused; so do
    /// refusals of several identities, and a window mostly admitted.
    #[test]
    fn gateways_and_mixed_windows_are_not_paused() {
        let (flooder, other) = (Connection::identity("acme"), Connection::identity("bolt"));
        let c = connection();
        for i in 0..WINDOW * 10 {
            if i % 50 == 0 {
                c.admitted(other);
            } else {
                c.refused(flooder, MAX_PAUSE);
            }
        }
        assert_eq!(c.pauses(), 0, "a gateway");
        // Another tenant's calls a small share of the connection's (one in
        // a thousand): still a gateway.
        let c = connection();
        for i in 0..WINDOW * 40 {
            if i % 1000 == 999 {
                c.admitted(other);
            } else if i % 10 == 0 {
                c.admitted(flooder);
            } else {
                c.refused(flooder, MAX_PAUSE);
            }
        }
        assert!(c.pauses() <= 1, "a gateway (paused only before the other tenant's first call)");
        assert_eq!(c.level.load(Relaxed), 0, "no longer shed once it is seen to be a gateway");
        let c = connection();
        for i in 0..WINDOW * 10 {
            c.refused(if i % 2 == 0 { flooder } else { other }, MAX_PAUSE);
        }
        assert_eq!(c.pauses(), 0, "two refused identities");
        let c = connection();
        for i in 0..WINDOW * 10 {
            if i % 5 == 0 {
                c.refused(flooder, MAX_PAUSE);
            } else {
                c.admitted(flooder);
            }
        }
        assert_eq!(c.pauses(), 0, "80% admitted");
    }

    /// Calls admitted and then reset by their client before the answer
    /// (rapid reset) count as refused: such a connection is paused too.
    #[test]
    fn abandoned_calls_pause_a_connection() {
        let c = connection();
        let resetter = Connection::identity("acme");
        for _ in 0..WINDOW {
            c.admitted(resetter);
            c.abandoned(resetter, MAX_PAUSE);
        }
        assert_eq!(c.pauses(), 1);
        let c = connection();
        for i in 0..WINDOW {
            c.admitted(resetter);
            if i % 10 == 0 {
                c.abandoned(resetter, MAX_PAUSE);
            }
        }
        assert_eq!(c.pauses(), 0, "a client that gives up on a call in ten is not paused");
    }

    /// Pauses double while the flood goes on, up to the cap.
    #[test]
    fn pauses_double_up_to_the_cap() {
        let c = connection();
        let mut pauses = Vec::new();
        for _ in 0..5 {
            for _ in 0..WINDOW {
                c.refused(ANONYMOUS, Duration::from_millis(50));
            }
            let until = c.paused_until().expect("paused");
            pauses.push((until - now_nanos()).div_ceil(1_000_000));
            std::thread::sleep(Duration::from_nanos(until - now_nanos() + 100_000));
        }
        assert_eq!(pauses, [10, 20, 40, 50, 50]);
        // A window between well-behaved and flooding (its tenant's bucket
        // refilled during the pause): no pause, none forgotten.
        for i in 0..WINDOW {
            if i % 5 < 3 {
                c.refused(ANONYMOUS, Duration::from_millis(50));
            } else {
                c.admitted(ANONYMOUS);
            }
        }
        assert_eq!((c.pauses(), c.level.load(Relaxed)), (5, 5));
    }

    /// A paused connection's reads wait; its writes do not.
    #[tokio::test]
    async fn a_paused_connection_is_not_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut io = ShedIo::new(server);
        io.connection().pause_until.store(now_nanos() + 200_000_000, Relaxed);
        client.write_all(b"hello").await.unwrap();
        io.write_all(b"answer").await.unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).await.unwrap();
        let started = Instant::now();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150), "read during the pause");
        assert_eq!(&got, b"hello");
    }

    /// A peer past its burst of setups waits for its next connection; past
    /// the held bound its connections are closed; another peer is not held.
    #[test]
    fn setups_per_peer_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let _guard = rt.enter();
        let mut incoming = Incoming::with_rate(listener, 10, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        assert_eq!(incoming.admit(a, now), None);
        assert_eq!(incoming.admit(a, now), None);
        let later = incoming.admit(a, now).expect("held").expect("not closed");
        assert!(later > now && later <= now + Duration::from_millis(101), "{:?}", later - now);
        let next = incoming.admit(a, now).expect("held").expect("not closed");
        assert!(next > later, "in turn");
        assert_eq!(incoming.admit(b, now), None, "another peer");
        incoming.setups.get_mut(&a).unwrap().held = HELD_PER_PEER;
        assert_eq!(incoming.admit(a, now), Some(None), "too many wait: closed");
    }
}
