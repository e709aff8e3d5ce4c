//! Signed webhooks: a JSON POST whose receiver can tell it came from the
//! mesh and was not replayed, in the Stripe scheme.
//!
//! Each POST carries
//! - `Tenantmesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//!   `"<t>.<body>"` with the endpoint's secret: the receiver recomputes it
//!   ([`verify`]) and refuses a timestamp too far from its clock (a replay);
//! - `Idempotency-Key: <id>`: the same on every retry of one delivery, so
//!   a receiver that already handled it answers 2xx and does nothing.
//!
//! Any 2xx is delivered; anything else (or no answer within the timeout)
//! is retried by the caller with backoff ([`backoff`]).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "tenantmesh-signature";
/// The idempotency header.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// The shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An endpoint and its signing secret.
#[derive(Clone)]
pub struct Webhook {
    url: http::Uri,
    secret: std::sync::Arc<[u8]>,
    client: HttpsClient,
    timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Webhook").field("url", &self.url).finish()
    }
}

/// The HMAC-SHA256 of `"<t>.<body>"` under `secret`, in hex.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.sign().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of [`SIGNATURE_HEADER`] for `body` sent at `t`.
pub fn signature_header(secret: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

/// Whether `header` (a [`SIGNATURE_HEADER`] value) signs `body` under
/// `secret`, with a timestamp within `tolerance` of `now` (Unix seconds).
/// Compared in constant time.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance: Duration) -> bool {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if now.abs_diff(t) > tolerance.as_secs() {
        return false;
    }
    let expected = sign(secret, t, body);
    signatures
        .iter()
        .any(|s| aws_lc_rs::constant_time::verify_slices_are_equal(s.as_bytes(), expected.as_bytes()).is_ok())
}

/// How long to wait before attempt `attempt` (1 = the first retry):
/// doubling from 1 s up to `max`, less up to a quarter at random so that
/// replicas retrying together spread out.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let full = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(20)).min(max);
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(attempt);
    let jitter = random % (full.as_millis() as u64 / 4 + 1);
    full - Duration::from_millis(jitter)
}

/// Why a delivery did not land.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the endpoint answered {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

impl Webhook {
    /// A webhook to `url` (http or https) signed with `secret` (at least
    /// [`MIN_SECRET_LEN`] bytes). The URL is the operator's own setting:
    /// private and loopback hosts are allowed.
    pub fn new(url: &str, secret: &[u8]) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!("{url:?} must be an http:// or https:// URL with a host"));
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!("the signing secret must be at least {MIN_SECRET_LEN} bytes"));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = crate::external::https(http, "webhooks");
        Ok(Self {
            url: uri,
            secret: secret.into(),
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout: Duration::from_secs(10),
        })
    }

    /// Where it posts.
    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// POSTs `body` (JSON) once, signed now, with `id` as its
    /// idempotency key.
    pub async fn post(&self, id: &str, body: &[u8]) -> Result<(), DeliveryError> {
        let t = tenantmesh_service::clock::now_secs();
        let request = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "tenantmesh-webhook/1")
            .header(SIGNATURE_HEADER, signature_header(&self.secret, t, body))
            .header(IDEMPOTENCY_HEADER, id)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| DeliveryError::Transport(e.to_string()))?;
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await.map_err(|e| DeliveryError::Transport(e.to_string()))?;
            let status = response.status();
            // Read (and drop) the answer so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            Ok::<_, DeliveryError>(status)
        })
        .await
        .map_err(|_| DeliveryError::Timeout(self.timeout))??;
        if answer.is_success() { Ok(()) } else { Err(DeliveryError::Status(answer.as_u16())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_changes_and_replays() {
        let secret = b"0123456789abcdef-secret";
        let body = br#"{"id":"x"}"#;
        let header = signature_header(secret, 1_000, body);
        let tol = Duration::from_secs(300);
        assert!(verify(secret, &header, body, 1_100, tol));
        assert!(!verify(secret, &header, br#"{"id":"y"}"#, 1_100, tol), "another body");
        assert!(!verify(b"another-secret-of-16", &header, body, 1_100, tol), "another secret");
        assert!(!verify(secret, &header, body, 1_400, tol), "too old: a replay");
        assert!(!verify(secret, &header.replace("t=1000", "t=1100"), body, 1_100, tol), "another time");
        assert!(!verify(secret, "v1=abc", body, 1_100, tol), "no time");
        // A known vector: HMAC-SHA256("key", "1.body").
        assert_eq!(sign(b"key", 1, b"body"), "91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5");
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let max = Duration::from_secs(60);
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (40, 60)] {
            let d = backoff(attempt, max);
            let full = Duration::from_secs(full);
            assert!(d <= full && d >= full * 3 / 4, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn bad_endpoints_are_refused() {
        assert!(Webhook::new("ftp://x/y", b"0123456789abcdef").is_err());
        assert!(Webhook::new("not a url", b"0123456789abcdef").is_err());
        assert!(Webhook::new("http://127.0.0.1:1/hook", b"short").is_err());
        let hook = Webhook::new("http://127.0.0.1:1/hook", b"0123456789abcdef").unwrap();
        assert!(!format!("{hook:?}").contains("0123"), "the secret is never printed");
    }
}
