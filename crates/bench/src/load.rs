//! The load generator: gRPC calls on real HTTP/2 connections, in a closed
//! loop (a fixed number of calls in flight, as fast as they complete: the
//! throughput figure) or an open loop (calls sent at a constant arrival
//! rate whatever the answers do, latency measured from the *intended* send
//! time, so queueing delay is counted instead of hidden).
//!
//! Calls go straight onto `h2` (the HTTP/2 implementation under tonic)
//! with request bodies encoded once by prost, and the answer's
//! `grpc-status` is read from its headers or trailers: a client that costs
//! the machine a few microseconds a call, so the server's cost is what the
//! figures show (a tonic client costs several times the bare server).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::HeaderValue;
use serde::Serialize;
use tonic::Code;

/// One call: given a connection and a sequence number, send a request and
/// report its status code.
pub type CallFn = Arc<dyn Fn(Conn, u64) -> Pin<Box<dyn Future<Output = Code> + Send>> + Send + Sync>;

/// One HTTP/2 connection.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
}

/// A unary gRPC method and the request headers every call carries.
#[derive(Clone)]
pub struct Method {
    path: http::uri::PathAndQuery,
    authorization: Option<HeaderValue>,
}

impl Method {
    /// `path` is `/package.Service/Method`; `token` empty: no authorization header.
    pub fn new(path: &'static str, token: &str) -> Self {
        Method {
            path: http::uri::PathAndQuery::from_static(path),
            authorization: (!token.is_empty())
                .then(|| HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii token")),
        }
    }

    /// Sends `message` (already gRPC-framed) on `conn`; the status code of the answer.
    pub async fn call(&self, conn: Conn, body: Bytes) -> Code {
        match tokio::time::timeout(Duration::from_secs(10), self.exchange(conn, body)).await {
            Ok(code) => code,
            Err(_) => Code::DeadlineExceeded,
        }
    }

    async fn exchange(&self, conn: Conn, body: Bytes) -> Code {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(conn.authority.clone())
            .path_and_query(self.path.clone())
            .build()
            .expect("uri");
        let mut req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .expect("request");
        if let Some(a) = &self.authorization {
            req.headers_mut().insert(http::header::AUTHORIZATION, a.clone());
        }
        let Ok(mut send) = conn.send.ready().await else { return Code::Unavailable };
        let Ok((response, mut stream)) = send.send_request(req, false) else { return Code::Unavailable };
        if stream.send_data(body, true).is_err() {
            return Code::Unavailable;
        }
        let Ok(response) = response.await else { return Code::Unavailable };
        if let Some(code) = grpc_status(response.headers()) {
            return code; // trailers-only answer
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let Ok(chunk) = chunk else { return Code::Unavailable };
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        match body.trailers().await {
            Ok(Some(trailers)) => grpc_status(&trailers).unwrap_or(Code::Unknown),
            _ => Code::Unknown,
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// A message as a gRPC frame: flag byte, length, bytes.
pub fn frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed.into()
}

/// Latency histograms are in microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// `n` separate HTTP/2 connections to `url` (`http://host:port`).
pub async fn connect(url: &str, n: usize) -> Result<Vec<Conn>, String> {
    connect_with(url, n, false).await
}

/// [`connect`]; `pings`: the client sends an HTTP/2 PING every 15 ms, as
/// gRPC C-core and grpc-go clients ping after answers (BDP probes). A
/// server that answers a ping (a small write) and then a call within the
/// client's delayed-ACK window holds the answer, when Nagle's algorithm is
/// on, until that ACK comes (up to 40 ms; here until the next ping).
pub async fn connect_with(url: &str, n: usize, pings: bool) -> Result<Vec<Conn>, String> {
    let authority: http::uri::Authority =
        url.trim_start_matches("http://").parse().map_err(|e| format!("{url}: {e}"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp =
            tokio::net::TcpStream::connect(authority.as_str()).await.map_err(|e| format!("connect {url}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 22)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("http/2 handshake with {url}: {e}"))?;
        if pings && let Some(mut ping_pong) = connection.ping_pong() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    if ping_pong.ping(h2::Ping::opaque()).await.is_err() {
                        break;
                    }
                }
            });
        }
        tokio::spawn(async move {
            let _ = connection.await;
        });
        out.push(Conn { send, authority: authority.clone() });
    }
    Ok(out)
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Stats {
    pub ok: u64,
    /// Failed calls by status code.
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful calls, microseconds.
    pub latency: Histogram<u64>,
    /// The measured window.
    pub window: Duration,
    /// Open loop: calls that were due but could not even be started.
    pub late_starts: u64,
    /// Every call that completed, warm-up included.
    pub all_calls: u64,
}

impl Stats {
    fn empty() -> Self {
        Stats {
            ok: 0,
            errors: BTreeMap::new(),
            latency: histogram(),
            window: Duration::ZERO,
            late_starts: 0,
            all_calls: 0,
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.latency.add(&other.latency).expect("same histogram bounds");
        self.late_starts += other.late_starts;
        self.all_calls += other.all_calls;
    }

    fn record(&mut self, code: Code, micros: u64) {
        if code == Code::Ok {
            self.ok += 1;
            let _ = self.latency.record(micros.max(1));
        } else {
            *self.errors.entry(format!("{code:?}")).or_default() += 1;
        }
    }

    /// Stats of latencies measured elsewhere (all successful).
    pub fn from_latencies(latencies: &[Duration]) -> Self {
        let mut s = Stats::empty();
        for l in latencies {
            s.record(Code::Ok, l.as_micros() as u64);
        }
        s.all_calls = s.ok;
        s
    }

    /// Successful calls per second over the window.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of latency, milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Share of successful calls at or above `ms` milliseconds.
    pub fn share_at_least_ms(&self, ms: f64) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        let at = (ms * 1000.0) as u64;
        let below: u64 =
            self.latency.iter_recorded().filter(|v| v.value_iterated_to() < at).map(|v| v.count_at_value()).sum();
        1.0 - below as f64 / self.ok as f64
    }

    pub fn summary(&self) -> Summary {
        Summary {
            ok: self.ok,
            errors: self.errors.clone(),
            window_s: self.window.as_secs_f64(),
            throughput: self.throughput(),
            p50_ms: self.quantile_ms(0.5),
            p90_ms: self.quantile_ms(0.9),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.latency.max() as f64 / 1000.0,
            mean_ms: self.latency.mean() / 1000.0,
            late_starts: self.late_starts,
        }
    }
}

/// The figures of a [`Stats`], as written to results files.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub window_s: f64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub late_starts: u64,
}

/// Closed loop: `streams` calls in flight on each of `channels`, each
/// sending its next call as soon as the last one answers. Calls that start
/// in the warm-up or end after the window are not counted.
pub async fn closed_loop(
    channels: &[Conn],
    streams: usize,
    warmup: Duration,
    duration: Duration,
    call: CallFn,
) -> Stats {
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        for s in 0..streams {
            let (channel, call) = (channel.clone(), call.clone());
            let mut seq = ((c * streams + s) as u64) << 32;
            tasks.push(tokio::spawn(async move {
                let mut stats = Stats::empty();
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let code = call(channel.clone(), seq).await;
                    seq += 1;
                    stats.all_calls += 1;
                    let t1 = Instant::now();
                    if t0 >= measure_from && t1 <= end {
                        stats.record(code, (t1 - t0).as_micros() as u64);
                    }
                }
                stats
            }));
        }
    }
    let mut total = Stats::empty();
    for t in tasks {
        if let Ok(s) = t.await {
            total.merge(&s);
        }
    }
    total.window = duration;
    total
}

/// One open-loop client: its connection and its constant rate.
#[derive(Clone)]
pub struct OpenClient {
    pub channel: Conn,
    pub rate_per_s: f64,
    pub call: CallFn,
}

/// Open loop: every client sends at its own constant rate for `warmup +
/// duration`, whatever the server does; each call's latency runs from the
/// time it was due. A dedicated thread keeps the schedule (tokio's timer
/// has millisecond granularity; a thread sleeping to the deadline is
/// accurate to tens of microseconds), and at most `max_in_flight` calls
/// wait at once (more are counted as `late_starts`, never silently
/// dropped). Returns one [`Stats`] per client.
pub async fn open_loop(
    clients: Vec<OpenClient>,
    warmup: Duration,
    duration: Duration,
    max_in_flight: usize,
) -> Vec<Stats> {
    let handle = tokio::runtime::Handle::current();
    let n = clients.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Code, u64, bool)>();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let scheduler = {
        let in_flight = in_flight.clone();
        std::thread::spawn(move || {
            let start = Instant::now() + Duration::from_millis(20);
            let measure_from = start + warmup;
            let end = measure_from + duration;
            // Each client starts at a different phase of its period.
            let mut next: Vec<Instant> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| start + Duration::from_secs_f64((i as f64 / n as f64) / c.rate_per_s.max(1e-9)))
                .collect();
            let mut sent = vec![0u64; n];
            let mut late = vec![0u64; n];
            loop {
                let (i, due) = next.iter().copied().enumerate().min_by_key(|(_, t)| *t).expect("clients");
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let client = &clients[i];
                let measured = due >= measure_from;
                if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= max_in_flight {
                    if measured {
                        late[i] += 1;
                    }
                } else {
                    in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (tx, in_flight, fut) =
                        (tx.clone(), in_flight.clone(), (client.call)(client.channel.clone(), sent[i]));
                    handle.spawn(async move {
                        let code = fut.await;
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = tx.send((i, code, due.elapsed().as_micros() as u64, measured));
                    });
                }
                sent[i] += 1;
                next[i] = start + Duration::from_secs_f64((sent[i] as f64 + i as f64 / n as f64) / client.rate_per_s);
            }
            late
        })
    };
    let mut stats: Vec<Stats> = (0..n).map(|_| Stats::empty()).collect();
    let late = tokio::task::spawn_blocking(move || scheduler.join().expect("scheduler thread")).await.expect("join");
    // Every call holds a sender: the channel closes when the last one answers
    // (calls time out on their own, see [`connect`]).
    while let Some((i, code, micros, measured)) = rx.recv().await {
        stats[i].all_calls += 1;
        if measured {
            stats[i].record(code, micros);
        }
    }
    for (s, l) in stats.iter_mut().zip(late) {
        s.late_starts = l;
        s.window = duration;
    }
    stats
}

/// Merges per-client stats.
pub fn merged(stats: &[Stats]) -> Stats {
    let mut total = Stats::empty();
    for s in stats {
        total.merge(s);
    }
    total.window = stats.first().map(|s| s.window).unwrap_or_default();
    total
}
