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

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector<PublicResolver>>, Empty<bytes::Bytes>>;

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
/// `kid` at most every `min_refresh_interval`, and whenever the known keys
/// are older than `max_key_age` (so a key the provider retired stops
/// verifying within that, whatever kids tokens name; if the provider
/// cannot be reached then, the known keys stand), one fetch per URL at a
/// time, each bounded in time and size.
pub struct ExternalVerifier {
    /// Built on the first fetch (see [`ExternalVerifier::client`]).
    client: std::sync::OnceLock<HttpsClient>,
    min_refresh_interval: Duration,
    max_key_age: Duration,
    /// Known key sets per URL: read without waiting for a fetch in flight.
    sets: std::sync::RwLock<HashMap<String, CachedSet>>,
    /// One lock per provider URL, held for its fetch: one fetch of a
    /// provider at a time, and a slow provider never delays another.
    fetching: std::sync::Mutex<HashMap<String, std::sync::Arc<Mutex<()>>>>,
    /// The whole fetch (connect, headers and body) must end within this.
    fetch_timeout: Duration,
    /// Whether loopback and private hosts may serve a JWKS.
    allow_private: bool,
}

/// The largest JWKS read; a longer body is refused as it streams in.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long a provider's keys are trusted before they are fetched again.
pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(300);

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

/// Whether `ip` is an address the mesh's own network can reach but the
/// internet cannot: loopback, private, link-local (cloud metadata at
/// 169.254.169.254), unique-local, unspecified, multicast, documentation.
pub fn is_private(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // Shared address space (carrier-grade NAT), 100.64.0.0/10.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
                // "This network", 0.0.0.0/8.
                || v4.octets()[0] == 0
                // Benchmarking, 198.18.0.0/15.
                || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18)
                // Reserved, 240.0.0.0/4.
                || v4.octets()[0] >= 240
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // IPv4 within IPv6: mapped (::ffff:a.b.c.d), NAT64
            // (64:ff9b::a.b.c.d and 64:ff9b:1::/48), 6to4 (2002:ab:cd::):
            // judged by the IPv4 address they reach.
            let embedded = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            let v4 = match s {
                _ if v6.to_ipv4_mapped().is_some() => v6.to_ipv4_mapped(),
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(embedded(hi, lo)),
                [0x64, 0xff9b, 1, ..] => Some(embedded(s[6], s[7])),
                [0x2002, hi, lo, ..] => Some(embedded(hi, lo)),
                _ => None,
            };
            match v4 {
                Some(v4) => is_private(IpAddr::V4(v4)),
                None => {
                    v6.is_loopback()
                        || v6.is_unspecified()
                        || v6.is_multicast()
                        || (s[0] & 0xfe00) == 0xfc00 // unique local
                        || (s[0] & 0xffc0) == 0xfe80 // link local
                        || s[0] == 0x2001 && s[1] == 0x0db8 // documentation
                }
            }
        }
    }
}

/// Why `url` may not serve a tenant's JWKS, if it may not: it must be
/// `https://` and name a public host; with `allow_private` (an operator's
/// setting, for development and tests), hosts on loopback or private
/// networks are allowed too, and those alone over `http://`. (A host name is checked again when it
/// is resolved, see [`ExternalVerifier`].)
pub fn jwks_url_refusal(url: &str, allow_private: bool) -> Option<&'static str> {
    let Ok(uri) = url.parse::<http::Uri>() else { return Some("must be a URL") };
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Some("must be an https:// URL"),
    };
    let Some(host) = uri.host() else { return Some("must name a host") };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let private = match literal.parse::<std::net::IpAddr>() {
        Ok(ip) => is_private(ip),
        Err(_) => {
            let host = host.to_ascii_lowercase();
            host == "localhost" || host.ends_with(".localhost") || !host.contains('.')
        }
    };
    if private && !allow_private {
        return Some("must name a public host (not loopback, private or link-local)");
    }
    if !https && !private {
        return Some("must be an https:// URL");
    }
    None
}

/// Resolves host names for JWKS fetches, refusing every address that is
/// not public unless allowed: a provider's URL cannot be pointed (or its
/// DNS rebound) at the mesh's own network or the cloud metadata service.
#[derive(Clone, Debug)]
struct PublicResolver {
    allow_private: bool,
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PublicResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = crate::context::BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<_> = addrs.iter().copied().filter(|a| allow_private || !is_private(a.ip())).collect();
            if public.is_empty() && !addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to loopback, private or link-local addresses"),
                ));
            }
            Ok(public.into_iter())
        })
    }
}

/// `connector` with TLS for https URLs (plain http passes through), the
/// host's root certificates trusted; without any, https fails (`what`
/// names who would, in the warning).
pub(crate) fn https<C>(connector: C, what: &str) -> hyper_rustls::HttpsConnector<C> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b.https_or_http().enable_http1().wrap_connector(connector),
        Err(e) => {
            tracing::warn!(error = %e, "no native root certificates; {what} over https will fail");
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector)
        }
    }
}

impl ExternalVerifier {
    /// A verifier that fetches JWKS from public hosts only.
    pub fn new() -> Self {
        Self::with_private_hosts(false)
    }

    /// A verifier that, with `allow_private`, also fetches from loopback
    /// and private hosts (development and tests:
    /// `TENANTMESH_JWKS_ALLOW_PRIVATE`).
    pub fn with_private_hosts(allow_private: bool) -> Self {
        Self {
            client: std::sync::OnceLock::new(),
            min_refresh_interval: Duration::from_secs(2),
            max_key_age: DEFAULT_MAX_KEY_AGE,
            sets: std::sync::RwLock::new(HashMap::new()),
            fetching: std::sync::Mutex::new(HashMap::new()),
            fetch_timeout: Duration::from_secs(5),
            allow_private,
        }
    }

    /// The HTTPS client, built (root certificates loaded) on the first
    /// fetch: most meshes never bind an external provider, and every
    /// service builds a verifier at start-up.
    fn client(&self) -> &HttpsClient {
        self.client.get_or_init(|| {
            let mut http = HttpConnector::new_with_resolver(PublicResolver { allow_private: self.allow_private });
            http.enforce_http(false);
            Client::builder(TokioExecutor::new()).build(https(http, "external identity providers"))
        })
    }

    /// Sets the time a whole JWKS fetch may take (default 5 s).
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Sets how long known keys are trusted before they are fetched again
    /// (default [`DEFAULT_MAX_KEY_AGE`]).
    pub fn with_max_key_age(mut self, age: Duration) -> Self {
        self.max_key_age = age;
        self.min_refresh_interval = self.min_refresh_interval.min(age);
        self
    }

    async fn fetch(&self, url: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, VerifyError> {
        let unavailable = |e: String| {
            tracing::warn!(jwks_url = url, error = %e, "external jwks fetch failed");
            VerifyError::KeysUnavailable(e)
        };
        // Checked again at every fetch: an address literal is never resolved.
        if let Some(why) = jwks_url_refusal(url, self.allow_private) {
            return Err(unavailable(format!("jwks_url {why}")));
        }
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| unavailable(e.to_string()))?;
        let fetch = async {
            let resp = self.client().get(uri).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("http status {}", resp.status()));
            }
            // Refused as it streams in past the cap, never buffered whole.
            let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
            match body.collect().await {
                Ok(b) => Ok(b.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(format!("jwks larger than {MAX_JWKS_BYTES} bytes"))
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let body = tokio::time::timeout(self.fetch_timeout, fetch)
            .await
            .map_err(|_| unavailable(format!("no complete answer within {:?}", self.fetch_timeout)))?
            .map_err(unavailable)?;
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
        // Keys are trusted for their age; after a failed fetch the known
        // ones stand until the next try.
        let fresh = set.fetched.elapsed() < if set.ok { self.max_key_age } else { self.min_refresh_interval };
        match set.keys.get(kid) {
            Some(k) if fresh => Some(Ok(Some(k.clone()))),
            // Known but old: fetched again (a retired key goes).
            Some(_) => None,
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
        let lock = self.fetching.lock().expect("fetch locks").entry(url.to_owned()).or_default().clone();
        let _fetching = lock.lock().await;
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
        match (fetched, found) {
            // The provider is unreachable: the keys it published last stand.
            (Err(_), Some(k)) => Ok(Some(k)),
            (fetched, found) => fetched.map(|_| found),
        }
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
mod tests;
