//! The DynamoDB and STS endpoints going dark under a running mesh (a proxy
//! in front of the emulator stops answering: connections accepted and held,
//! as a partitioned network does): calls end UNAVAILABLE within a bounded
//! time, nothing is half-written, and the mesh recovers by itself when the
//! endpoint answers again; with only STS dark, tenants whose credentials
//! are cached go on working. Always on the emulator, so it runs in the
//! embedded pass only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_test_support::*;
use tonic::Code;

/// A TCP proxy to `upstream` that can go dark: while dark it accepts
/// connections and never answers, and the connections it was forwarding
/// are cut.
struct Proxy {
    url: String,
    dark: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (dark, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(tokio::sync::Notify::new()));
        let (is_dark, cuts) = (dark.clone(), cut.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                if is_dark.load(Ordering::SeqCst) {
                    held.push(conn);
                    continue;
                }
                let (upstream, cuts) = (upstream.clone(), cuts.clone());
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                        () = cuts.notified() => {}
                    }
                });
            }
        });
        Proxy { url, dark, cut }
    }

    fn go_dark(&self) {
        self.dark.store(true, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn come_back(&self) {
        self.dark.store(false, Ordering::SeqCst);
    }
}

fn within<T>(message: T, token: &str, timeout: Duration) -> tonic::Request<T> {
    let mut req = authed(message, token);
    req.set_timeout(timeout);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dark_dynamodb_and_sts_endpoints_are_unavailable_then_recovered() {
    let mut state = MeshState::new(TestBackend::DynamoDb);
    let moto = state.env_var("AWS_ENDPOINT_URL_DYNAMODB").unwrap().to_owned();
    let (dynamodb, sts) = (Proxy::start(&moto).await, Proxy::start(&moto).await);
    state.set_env("AWS_ENDPOINT_URL_DYNAMODB", Some(&dynamodb.url));
    state.set_env("AWS_ENDPOINT_URL_STS", Some(&sts.url));
    for (k, v) in [("TENANTMESH_AWS_ATTEMPT_TIMEOUT_MS", "400"), ("TENANTMESH_AWS_TIMEOUT_MS", "1500")] {
        state.set_env(k, Some(v));
    }
    let mesh = TestMesh::start_on(state).await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    mesh.data().put_item(authed(put_v("before", "before"), &acme.token)).await.unwrap();

    // STS dark: acme's credentials are cached, its calls go on.
    sts.go_dark();
    mesh.data().put_item(authed(put_v("sts-dark", "sts-dark"), &acme.token)).await.unwrap();
    sts.come_back();

    // DynamoDB dark: every call ends UNAVAILABLE, in bounded time.
    dynamodb.go_dark();
    for id in ["dark-1", "dark-2"] {
        let started = Instant::now();
        let s = mesh.data().put_item(within(put_v(id, id), &acme.token, Duration::from_secs(10))).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
        let get = GetItemRequest { collection: "c".into(), id: "before".into() };
        let s = mesh.data().get_item(within(get, &acme.token, Duration::from_secs(10))).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    }

    // Back: the mesh recovers without a restart; what was acknowledged is
    // there, what was refused is absent or whole.
    dynamodb.come_back();
    eventually(Duration::from_secs(20), || {
        let (mut data, token) = (mesh.data(), acme.token.clone());
        async move { data.put_item(authed(put_v("after", "after"), &token)).await.is_ok() }
    })
    .await;
    for id in ["before", "sts-dark", "after"] {
        let get = GetItemRequest { collection: "c".into(), id: id.into() };
        mesh.data().get_item(authed(get, &acme.token)).await.unwrap_or_else(|s| panic!("{id}: {s:?}"));
    }
    for id in ["dark-1", "dark-2"] {
        let get = GetItemRequest { collection: "c".into(), id: id.into() };
        match mesh.data().get_item(authed(get, &acme.token)).await {
            Ok(r) => assert!(r.into_inner().item.unwrap().attributes.is_some(), "{id} half-written"),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{id}: {s:?}"),
        }
    }
    mesh.shutdown().await;
}
