//! Tokens from a tenant's external OIDC identity provider (Cognito, Auth0,
//! Okta): verified against the provider bound to the tenant the caller
//! names — its issuer, its published keys, its audience — and accepted only
//! if the provider's signed tenant claim names that same tenant.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tenantmesh_proto::registry::v1::IdentityProvider;
use tokio::sync::Mutex;

use crate::verify::VerifyError;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>>;

/// Algorithms accepted from external providers (never `none` or HMAC).
const ALLOWED: [Algorithm; 4] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA, Algorithm::PS256];

/// The claims read from an external token.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    pub subject: String,
    pub tenant_id: String,
}

struct CachedSet {
    fetched: Instant,
    /// Whether the last fetch worked (else `keys` are the ones before it).
    ok: bool,
    keys: HashMap<String, (DecodingKey, Algorithm)>,
}

/// Verifies external tokens; JWKS per URL cached, refreshed on an unknown
/// `kid` at most every `min_refresh_interval`, one fetch at a time.
pub struct ExternalVerifier {
    client: HttpsClient,
    min_refresh_interval: Duration,
    /// Known key sets per URL: read without waiting for a fetch in flight.
    sets: std::sync::RwLock<HashMap<String, CachedSet>>,
    /// Held for the whole fetch, so one runs at a time.
    fetching: Mutex<()>,
}

impl std::fmt::Debug for ExternalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalVerifier").finish_non_exhaustive()
    }
}

impl Default for ExternalVerifier {
    fn default() -> Self {
        Self::new()
    }
}

fn default_alg(params: &AlgorithmParameters) -> Option<Algorithm> {
    match params {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Some(Algorithm::ES256),
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// Whether `url` may serve a JWKS: https, or http on loopback only.
pub fn jwks_url_allowed(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host =
        host.rsplit_once(':').map_or(host, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { host });
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

impl ExternalVerifier {
    pub fn new() -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
            .map(|b| b.https_or_http().enable_http1().build())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no native root certificates; external identity providers over https will fail");
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build()
            });
        Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            min_refresh_interval: Duration::from_secs(2),
            sets: std::sync::RwLock::new(HashMap::new()),
            fetching: Mutex::new(()),
        }
    }

    async fn fetch(&self, url: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, VerifyError> {
        let unavailable = |e: String| {
            tracing::warn!(jwks_url = url, error = %e, "external jwks fetch failed");
            VerifyError::KeysUnavailable(e)
        };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| unavailable(e.to_string()))?;
        let fetch = self.client.get(uri);
        let resp = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("http status {}", resp.status())));
        }
        let body = resp.into_body().collect().await.map_err(|e| unavailable(e.to_string()))?.to_bytes();
        if body.len() > 1 << 20 {
            return Err(unavailable("jwks larger than 1 MiB".into()));
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| unavailable(format!("not a JWKS: {e}")))?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let alg = match jwk.common.key_algorithm {
                    Some(a) => a.to_string().parse::<Algorithm>().ok()?,
                    None => default_alg(&jwk.algorithm)?,
                };
                ALLOWED.contains(&alg).then_some(())?;
                Some((kid, (DecodingKey::from_jwk(jwk).ok()?, alg)))
            })
            .collect())
    }

    /// `Some(answer)` when the cache decides: the key; or, fetched too
    /// recently to fetch again, no key (or unavailable if that fetch failed).
    #[allow(clippy::type_complexity)]
    fn cached(&self, url: &str, kid: &str) -> Option<Result<Option<(DecodingKey, Algorithm)>, VerifyError>> {
        let sets = self.sets.read().expect("jwks lock");
        let set = sets.get(url)?;
        match set.keys.get(kid) {
            Some(k) => Some(Ok(Some(k.clone()))),
            None if set.fetched.elapsed() < self.min_refresh_interval => Some(if set.ok {
                Ok(None)
            } else {
                Err(VerifyError::KeysUnavailable("identity provider unreachable".into()))
            }),
            None => None,
        }
    }

    async fn key(&self, url: &str, kid: &str) -> Result<Option<(DecodingKey, Algorithm)>, VerifyError> {
        if let Some(answer) = self.cached(url, kid) {
            return answer;
        }
        let _fetching = self.fetching.lock().await;
        if let Some(answer) = self.cached(url, kid) {
            return answer;
        }
        let fetched = self.fetch(url).await;
        // A failed fetch counts too: an unreachable provider is not retried per request.
        let keys = match &fetched {
            Ok(keys) => keys.clone(),
            Err(_) => self.sets.read().expect("jwks lock").get(url).map(|s| s.keys.clone()).unwrap_or_default(),
        };
        let found = keys.get(kid).cloned();
        let ok = fetched.is_ok();
        self.sets.write().expect("jwks lock").insert(url.to_owned(), CachedSet { fetched: Instant::now(), ok, keys });
        fetched.map(|_| found)
    }

    /// Verifies `token` against `provider` and requires its tenant claim to
    /// be `tenant_id`.
    pub async fn verify(
        &self,
        token: &str,
        provider: &IdentityProvider,
        tenant_id: &str,
    ) -> Result<ExternalIdentity, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if !ALLOWED.contains(&header.alg) {
            return Err(VerifyError::Algorithm);
        }
        let kid = header.kid.ok_or(VerifyError::MissingKid)?;
        let (key, alg) = self.key(&provider.jwks_url, &kid).await?.ok_or(VerifyError::UnknownKey)?;
        if alg != header.alg {
            return Err(VerifyError::Algorithm);
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[&provider.issuer]);
        v.set_audience(&[&provider.audience]);
        v.validate_nbf = true;
        v.leeway = 30;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(crate::verify::map_jwt_error)?;
        let claimed = data.claims.get(&provider.tenant_claim).and_then(|v| v.as_str()).ok_or(VerifyError::Claims)?;
        if claimed != tenant_id {
            tracing::warn!(
                security_event = "external_tenant_mismatch",
                claimed_tenant = claimed,
                requested_tenant = tenant_id,
                "external token names another tenant"
            );
            return Err(VerifyError::Claims);
        }
        let subject = data.claims.get("sub").and_then(|v| v.as_str()).ok_or(VerifyError::Claims)?;
        Ok(ExternalIdentity { subject: format!("ext:{subject}"), tenant_id: tenant_id.to_owned() })
    }
}

#[cfg(test)]
mod tests {
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
        let verifier = ExternalVerifier::new();
        for attempt in 0..3 {
            let r = verifier.verify(&token, &provider, "acme").await;
            assert!(matches!(r, Err(VerifyError::KeysUnavailable(_))), "attempt {attempt}: {r:?}");
        }
    }

    #[test]
    fn jwks_urls_must_be_https_or_loopback() {
        for ok in ["https://idp.example/jwks", "http://127.0.0.1:8080/jwks", "http://localhost/x", "http://[::1]:9/k"] {
            assert!(jwks_url_allowed(ok), "{ok}");
        }
        for bad in
            ["http://idp.example/jwks", "ftp://x", "", "http://127.0.0.1.evil.example/jwks", "file:///etc/passwd"]
        {
            assert!(!jwks_url_allowed(bad), "{bad}");
        }
    }
}
