//! Unit tests of [`super`].

use super::*;

/// An unreachable provider is unavailable on every attempt, not "unknown key".
#[tokio::test]
async fn an_unreachable_provider_is_unavailable() {
    use base64::Engine as _;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let provider = IdentityProvider {
        issuer: "https://idp.example".into(),
        jwks_url: format!("http://127.0.0.1:{dead}/jwks"),
        audience: "a".into(),
        tenant_claim: "t".into(),
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!("{}.{}.{}", b64(r#"{"alg":"ES256","kid":"k1"}"#), b64("{}"), b64("sig"));
    let verifier = ExternalVerifier::with_private_hosts(true);
    for attempt in 0..3 {
        let r = verifier.verify(&token, &provider, "acme").await;
        assert!(matches!(r, Err(VerifyError::KeysUnavailable(_))), "attempt {attempt}: {r:?}");
    }
}

#[test]
fn jwks_urls_must_be_https_on_public_hosts() {
    for ok in [
        "https://idp.example/jwks",
        "https://8.8.8.8/jwks",
        "https://[2001:4860::8888]/k",
        "https://[64:ff9b::808:808]/jwks",
        "https://[2002:808:808::1]/jwks",
        "https://198.20.0.1/jwks",
    ] {
        assert_eq!(jwks_url_refusal(ok, false), None, "{ok}");
    }
    for bad in [
        "http://idp.example/jwks",
        "ftp://x",
        "",
        "file:///etc/passwd",
        "https://127.0.0.1/jwks",
        "https://localhost/jwks",
        "https://169.254.169.254/latest/meta-data",
        "https://10.1.2.3/jwks",
        "https://192.168.0.1/jwks",
        "https://[::1]/jwks",
        "https://[fd00::1]/jwks",
        "https://[::ffff:127.0.0.1]/jwks",
        "https://metadata/computeMetadata",
        // IPv4 reached through IPv6 translation, and the reserved ranges.
        "https://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "https://[64:ff9b:1::7f00:1]/jwks",
        "https://[2002:a9fe:a9fe::1]/jwks",
        "https://[2002:7f00:1::]/jwks",
        "https://0.1.2.3/jwks",
        "https://198.18.0.1/jwks",
        "https://198.19.255.1/jwks",
        "https://240.0.0.1/jwks",
        "https://255.255.255.254/jwks",
        "https://[2001:db8::1]/jwks",
    ] {
        assert!(jwks_url_refusal(bad, false).is_some(), "{bad}");
    }
    // An operator's setting allows private hosts (and http to them
    // alone), for development.
    assert_eq!(jwks_url_refusal("http://127.0.0.1:8080/jwks", true), None);
    assert_eq!(jwks_url_refusal("https://10.1.2.3/jwks", true), None);
    assert!(jwks_url_refusal("http://idp.example/jwks", true).is_some());
    assert!(jwks_url_refusal("ftp://127.0.0.1/jwks", true).is_some());
}

/// A host name that resolves to loopback is refused when it is resolved
/// (a rebinding attack), not only when the URL is checked.
#[tokio::test]
async fn names_resolving_to_private_addresses_are_not_fetched() {
    use tower::Service as _;
    let name: hyper_util::client::legacy::connect::dns::Name = "localhost".parse().unwrap();
    let refused = PublicResolver { allow_private: false }.call(name.clone()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied, "{refused}");
    assert!(PublicResolver { allow_private: true }.call(name).await.unwrap().next().is_some());
}

/// Serves one kind of JWKS answer on loopback, to every connection.
async fn serve(answer: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n";
                match answer {
                    // Headers at once, then a byte every 100 ms, forever.
                    "slow" => {
                        let _ = conn.write_all(format!("{head}content-length: 1000000\r\n\r\n").as_bytes()).await;
                        while conn.write_all(b" ").await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    // An endless body, as fast as it is read.
                    "huge" => {
                        let _ = conn.write_all(format!("{head}transfer-encoding: chunked\r\n\r\n").as_bytes()).await;
                        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                        while conn.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                    _ => {
                        let body = r#"{"keys":[]}"#;
                        let reply = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
                        let _ = conn.write_all(reply.as_bytes()).await;
                    }
                }
            });
        }
    });
    url
}

fn provider(jwks_url: String) -> IdentityProvider {
    IdentityProvider { issuer: "https://idp.example".into(), jwks_url, audience: "a".into(), tenant_claim: "t".into() }
}

fn token() -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.{}", b64(r#"{"alg":"ES256","kid":"k1"}"#), b64("{}"), b64("sig"))
}

/// A provider that answers slowly or without end is unavailable once the
/// fetch's time or size bound is reached, and meanwhile another
/// provider's fetch goes through: the lock is per provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_huge_providers_are_bounded_and_do_not_block_others() {
    let verifier =
        std::sync::Arc::new(ExternalVerifier::with_private_hosts(true).with_fetch_timeout(Duration::from_millis(1500)));
    let (slow, huge, good) = (serve("slow").await, serve("huge").await, serve("good").await);
    let guard = Duration::from_secs(30); // a hang fails the test instead of stalling it

    let v = verifier.clone();
    let slow_fetch = tokio::spawn(async move { v.verify(&token(), &provider(slow), "acme").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = tokio::time::timeout(guard, verifier.verify(&token(), &provider(good), "acme")).await.unwrap();
    assert!(!matches!(r, Err(VerifyError::KeysUnavailable(_))), "the good provider: {r:?}");
    assert!(!slow_fetch.is_finished(), "the slow provider's fetch held up the good one");
    let r = tokio::time::timeout(guard, slow_fetch).await.unwrap().unwrap();
    assert!(matches!(&r, Err(VerifyError::KeysUnavailable(m)) if m.contains("within")), "{r:?}");

    let r = tokio::time::timeout(guard, verifier.verify(&token(), &provider(huge), "acme")).await.unwrap();
    assert!(matches!(&r, Err(VerifyError::KeysUnavailable(m)) if m.contains("larger")), "{r:?}");
}

/// An ES256 key pair: the signing key and its public JWK under `kid`.
fn es256(kid: &str) -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine as _;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    });
    (jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

/// Serves on loopback whatever JWKS `body` holds at the time of each request.
async fn serve_changing(body: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    url
}

/// A key the provider retired stops verifying once the known keys are
/// older than their trusted age, though tokens keep naming its kid.
#[tokio::test]
async fn a_retired_key_stops_verifying_within_the_key_age() {
    let (key, jwk) = es256("k1");
    let body = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!({"keys": [jwk]}).to_string()));
    let p = provider(serve_changing(body.clone()).await);
    let claims = serde_json::json!({
        "iss": p.issuer, "aud": p.audience, "sub": "u1", "t": "acme",
        "exp": jsonwebtoken::get_current_timestamp() + 600,
    });
    let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let verifier = ExternalVerifier::with_private_hosts(true).with_max_key_age(Duration::from_millis(300));
    verifier.verify(&token, &p, "acme").await.expect("the published key verifies");
    // Retired: the provider publishes another key only.
    let (_, other) = es256("k2");
    *body.lock().unwrap() = serde_json::json!({"keys": [other]}).to_string();
    verifier.verify(&token, &p, "acme").await.expect("still trusted within its age");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = verifier.verify(&token, &p, "acme").await;
    assert!(matches!(r, Err(VerifyError::UnknownKey)), "a retired key verified: {r:?}");
}
