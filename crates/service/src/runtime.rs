//! Serving a tenantmesh service: a layer (the tenant-context layer, in the
//! services) in front of the service, gRPC health and reflection beside it,
//! every connection with `TCP_NODELAY`, and a graceful shutdown (health
//! NOT_SERVING, in-flight calls drained within a grace period).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::Layer;

/// The largest header list a server accepts (advertised in HTTP/2
/// SETTINGS, so compliant clients refuse to send more). Tokens are capped
/// lower still by the tenant-context layer.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// HTTP/2 streams one connection may have open at once (advertised in
/// SETTINGS; a compliant client queues the rest). tonic's default is no
/// bound, so one connection could hold any number of calls in flight.
/// High enough that a gateway multiplexing many tenants' calls on one
/// connection (an application calling the data service) is never held by
/// it, and that a burst a client sends before it has read the server's
/// SETTINGS (which it may) is rarely over it: streams over it are refused
/// (REFUSED_STREAM, safe to retry) and count as local resets (below).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;

/// Streams a connection's server side may reset for the peer's protocol
/// errors (and refuse, over [`MAX_STREAMS_PER_CONNECTION`]) before it ends
/// the connection with GOAWAY ENHANCE_YOUR_CALM. hyper's default, which
/// tonic 0.14 replaces with no limit unless it is set: without one, a peer
/// can make the server reset streams whose handlers keep running
/// (MadeYouReset, CVE-2025-8671). A refused call (admission, policy) is
/// answered, not reset, so it never counts.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Streams the peer opened and reset before they were accepted that a
/// connection tolerates at once before GOAWAY (rapid reset,
/// CVE-2023-44487): h2's default, set here so it is one.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` (and, when given, the [`crate::backup`] service
/// beside it: every service process can be backed up while it runs)
/// behind `layer` on `listener` until `shutdown` completes, then drains
/// in-flight calls for at most `grace`. (An idle HTTP/2 client connection
/// can hold hyper's graceful shutdown open, hyperium/hyper#4170: the grace
/// period bounds it.)
pub async fn serve<S, L>(
    listener: TcpListener,
    service: S,
    backup: Option<tenantmesh_proto::backup::v1::backup_server::BackupServer<crate::backup::BackupService>>,
    layer: L,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = std::convert::Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    L: Layer<Routes> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<Body>>>::Future: Send + 'static,
{
    match backup {
        Some(backup) => {
            let routes = Routes::new(service).add_service(backup);
            serve_routes(listener, routes, &[S::NAME, crate::backup::NAME], &[], layer, grace, shutdown).await
        }
        None => serve_routes(listener, Routes::new(service), &[S::NAME], &[], layer, grace, shutdown).await,
    }
}

/// [`serve`] for several services on one listener; `names` are theirs,
/// for health and reflection, which also describes the messages of the
/// encoded descriptor sets in `descriptors` (services whose protos are not
/// the mesh's).
pub async fn serve_routes<L>(
    listener: TcpListener,
    routes: Routes,
    names: &[&str],
    descriptors: &[&'static [u8]],
    layer: L,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    L: Layer<Routes> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<Body>>>::Future: Send + 'static,
{
    // Whether the process is short of CPU (one probe per process).
    crate::load::start();
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in names {
        reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    // Reflection lists only what this server serves, not every contract.
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tenantmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so clients can decode BadRequest & co.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for set in descriptors {
            b = b.register_encoded_file_descriptor_set(set);
        }
        for name in names {
            b = b.with_service_name(*name);
        }
        b
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let addr = listener.local_addr().ok();
    let service = names.first().copied().unwrap_or_default();
    tracing::info!(service, addr = ?addr, "serving");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let routes = routes.add_service(health).add_service(reflection_v1).add_service(reflection_v1alpha);
    let server = Server::builder()
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .layer(PeerLayer)
        .layer(layer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = shutdown => {}
    }
    tracing::info!(service, "shutting down: draining in-flight calls");
    for name in names {
        reporter.set_service_status(name, ServingStatus::NotServing).await;
    }
    reporter.set_service_status("", ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => {
            tracing::warn!(service, grace = ?grace, "in-flight calls outlived the grace period");
            Ok(())
        }
    }
}

/// Ends a service's background tasks when it stops serving: each is
/// aborted *and awaited*, so whatever it holds (the service's store among
/// it) is dropped when this returns. An aborted task's future is otherwise
/// dropped later, on some worker: an embedded store opened again at once in
/// the same process (a restart of `tenantmesh up`, a test mesh) would find
/// its file still locked.
pub async fn end_tasks<T>(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>) {
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
}

/// The call's `grpc-timeout` (for example `250m`, `5S`), if it has a valid one.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    // ASCII digits only (`u64::from_str` would take a leading `+` too).
    if !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The largest gRPC message a service decodes or encodes, set explicitly on
/// every server and client (tonic encodes without a limit by default).
/// Replies are bounded well under it: a query page stops at about 1 MiB
/// (`tenantmesh_storage::MAX_PAGE_BYTES`), an item at 400 KiB.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// A generated gRPC client or server with both of its message limits at
/// [`runtime::MAX_MESSAGE_BYTES`](crate::runtime::MAX_MESSAGE_BYTES):
/// `tenantmesh_service::sized!(DataClient::new(channel))`.
#[macro_export]
macro_rules! sized {
    ($grpc:expr) => {
        $grpc
            .max_decoding_message_size($crate::runtime::MAX_MESSAGE_BYTES)
            .max_encoding_message_size($crate::runtime::MAX_MESSAGE_BYTES)
    };
}

/// The connections `listener` accepts, with `TCP_NODELAY` on, each with
/// its standing and at most so many per peer and second (see
/// [`crate::connection`]). tonic's `Server::tcp_nodelay` does not apply
/// to a listener handed in, and with Nagle's algorithm on, an answer
/// written right after a small write (a PING ack, which gRPC C-core and
/// grpc-go clients ask for after every call) waits for the client's
/// delayed ACK: 40 ms.
pub fn incoming(listener: TcpListener) -> crate::connection::Incoming {
    crate::connection::incoming(listener)
}

/// Puts each call's [`tonic::transport::server::TcpConnectInfo`] beside its
/// [`ConnectionInfo`](crate::connection::ConnectionInfo), so that
/// `tonic::Request::remote_addr` works as with tonic's own listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerLayer;

impl<S> Layer<S> for PeerLayer {
    type Service = PeerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerService(inner)
    }
}

/// See [`PeerLayer`].
#[derive(Clone, Debug)]
pub struct PeerService<S>(S);

impl<S, B> tower::Service<http::Request<B>> for PeerService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(info) = req.extensions().get::<crate::connection::ConnectionInfo>() {
            let tcp = info.tcp.clone();
            req.extensions_mut().insert(tcp);
        }
        self.0.call(req)
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// A service process's exit: on an error, one line on stderr naming the
/// process, the error and its causes (`tenantmesh-data: TENANTMESH_LIMITS:
/// "x": use on or off`), never a `Debug` dump, and a failure status.
pub fn exit_status(
    process: &str,
    result: Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{process}: {}", error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `e` and its sources, joined by `: `.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod grpc_timeout_tests {
    use super::grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("250m"), Some(Duration::from_millis(250)));
        assert_eq!(h("5S"), Some(Duration::from_secs(5)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("100u"), Some(Duration::from_micros(100)));
        for bad in ["", "m", "5x", "-5m", "+5m", "1234567890S"] {
            assert_eq!(h(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn errors_are_one_line_with_their_causes() {
        let config = crate::config::ConfigError { var: "TENANTMESH_LIMITS", message: "\"x\": use on or off".into() };
        assert_eq!(super::error_chain(&config), "TENANTMESH_LIMITS: \"x\": use on or off");
        let io = std::io::Error::other(config);
        assert_eq!(super::error_chain(&io), "TENANTMESH_LIMITS: \"x\": use on or off");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn headers(v: &str) -> http::HeaderMap {
            let mut h = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(v) {
                h.insert("grpc-timeout", v);
            }
            h
        }

        proptest! {
            /// Every well-formed `grpc-timeout` (1 to 8 digits and a unit)
            /// is read as its duration.
            #[test]
            fn well_formed_timeouts_are_read(
                n in 0u64..100_000_000,
                unit in prop::sample::select(vec!['H', 'M', 'S', 'm', 'u', 'n']),
            ) {
                let expected = match unit {
                    'H' => Duration::from_secs(n * 3600),
                    'M' => Duration::from_secs(n * 60),
                    'S' => Duration::from_secs(n),
                    'm' => Duration::from_millis(n),
                    'u' => Duration::from_micros(n),
                    _ => Duration::from_nanos(n),
                };
                prop_assert_eq!(grpc_timeout(&headers(&format!("{n}{unit}"))), Some(expected));
            }

            /// Anything else is no deadline, never a panic.
            #[test]
            fn malformed_timeouts_are_ignored(v in ".{0,12}") {
                let well_formed = v.len() >= 2
                    && v.len() <= 9
                    && v.is_char_boundary(v.len() - 1)
                    && v[..v.len() - 1].bytes().all(|b| b.is_ascii_digit())
                    && "HMSmun".contains(&v[v.len() - 1..]);
                if !well_formed {
                    prop_assert_eq!(grpc_timeout(&headers(&v)), None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_stream::StreamExt as _;

    /// Every accepted connection has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.stream().nodelay().unwrap(), "accepted socket keeps Nagle on");
    }
}

/// The sending half of a server stream whose client must keep reading:
/// a message that waits longer than `stall` for room (the client stopped
/// reading) ends the stream with DEADLINE_EXCEEDED, so nothing is held for
/// a client that is gone without saying so. One place of the channel is
/// kept for that last word.
pub struct StreamSender<T> {
    tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    last_word: Option<tokio::sync::mpsc::OwnedPermit<Result<T, tonic::Status>>>,
    stall: std::time::Duration,
}

/// A server stream of at most `capacity` messages waiting, and its sender
/// (see [`StreamSender`]).
pub fn stream<T: Send + 'static>(
    capacity: usize,
    stall: std::time::Duration,
) -> (StreamSender<T>, tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1) + 1);
    let last_word = tx.clone().try_reserve_owned().ok();
    (StreamSender { tx, last_word, stall }, tokio_stream::wrappers::ReceiverStream::new(rx))
}

impl<T: Send + 'static> StreamSender<T> {
    /// Sends `message`: `false` once the stream is over (the client went
    /// away, or stopped reading for the stall time: then it ends with an
    /// error).
    pub async fn send(&mut self, message: T) -> bool {
        match tokio::time::timeout(self.stall, self.tx.send(Ok(message))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    stall_ms = self.stall.as_millis() as u64,
                    "a stream's client stopped reading; ending it"
                );
                let secs = self.stall.as_secs_f64();
                self.fail(tonic::Status::deadline_exceeded(format!(
                    "the client read nothing of the stream for {secs} s; it was ended"
                )));
                false
            }
        }
    }

    /// Ends the stream with `status`, after what the client has not read yet.
    pub fn fail(&mut self, status: tonic::Status) {
        if let Some(permit) = self.last_word.take() {
            permit.send(Err(status));
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    /// A client that reads gets every message; one that stops reading has
    /// its stream ended with DEADLINE_EXCEEDED after what it had not read.
    #[tokio::test]
    async fn a_stream_ends_when_its_client_stops_reading() {
        let (mut tx, mut rx) = stream::<u32>(2, std::time::Duration::from_millis(50));
        let sender = tenantmesh_telemetry::spawn(async move {
            let mut sent = 0;
            while tx.send(sent).await {
                sent += 1;
            }
            sent
        });
        // Nothing is read: the sender fills the channel and gives up.
        let sent = sender.await.unwrap();
        assert_eq!(sent, 2, "two messages wait; one place is kept for the last word");
        let mut got = Vec::new();
        while let Some(m) = rx.next().await {
            got.push(m);
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[..2].iter().map(|m| *m.as_ref().unwrap()).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(got[2].as_ref().unwrap_err().code(), tonic::Code::DeadlineExceeded);
    }
}
