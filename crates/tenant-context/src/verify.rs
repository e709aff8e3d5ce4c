//! JWT verification: EdDSA only, a `kid` that names a published key, and
//! `exp` / `nbf` / `iss` / `aud` checked. Keys come from a [`KeySource`]:
//! the auth service's own key store, or [`JwksCache`] over gRPC for every
//! other service.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tenantmesh_proto::auth::v1::{GetJwksRequest, Jwk, auth_client::AuthClient};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::Claims;

/// Why a token was refused. Every variant becomes UNAUTHENTICATED.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    Algorithm,
    #[error("token has no key id")]
    MissingKid,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issuer not accepted")]
    Issuer,
    #[error("token audience not accepted")]
    Audience,
    #[error("invalid token signature")]
    Signature,
    #[error("invalid token claims")]
    Claims,
    #[error("token keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// Where verification keys come from.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// The public key with this `kid`, if it is (now) published.
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError>;
}

/// Verifies access tokens.
pub struct TokenVerifier {
    keys: Arc<dyn KeySource>,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// The issuer of tokens this verifier accepts.
    pub fn issuer(&self) -> &str {
        self.validation.iss.as_ref().and_then(|s| s.iter().next()).map(String::as_str).unwrap_or_default()
    }

    pub fn new(keys: Arc<dyn KeySource>, issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Self { keys, validation }
    }

    /// Verifies `token` and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        // The allow-list: only EdDSA. This refuses `none` and HS256 signed
        // with a public key before any key is looked at.
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::Algorithm);
        }
        let kid = header.kid.ok_or(VerifyError::MissingKid)?;
        let key = self.keys.key(&kid).await?.ok_or(VerifyError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(map_jwt_error)?;
        let claims = data.claims;
        if crate::validate_tenant_id(&claims.tenant_id).is_err() || claims.roles.is_empty() {
            return Err(VerifyError::Claims);
        }
        // Cross-tenant roles exist only in the platform tenant.
        let platform_role = claims.roles.iter().any(|r| matches!(r, crate::Role::PlatformAdmin | crate::Role::Service));
        if platform_role && claims.tenant_id != crate::PLATFORM_TENANT {
            return Err(VerifyError::Claims);
        }
        Ok(claims)
    }
}

/// The refusal for a failed `jsonwebtoken::decode`.
pub(crate) fn map_jwt_error(e: jsonwebtoken::errors::Error) -> VerifyError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => VerifyError::Expired,
        K::ImmatureSignature => VerifyError::NotYetValid,
        K::InvalidIssuer => VerifyError::Issuer,
        K::InvalidAudience => VerifyError::Audience,
        K::InvalidSignature => VerifyError::Signature,
        K::InvalidAlgorithm => VerifyError::Algorithm,
        K::Json(_) | K::MissingRequiredClaim(_) => VerifyError::Claims,
        _ => VerifyError::Malformed,
    }
}

/// Turns a published JWK into a verification key; only Ed25519 keys count.
pub fn decoding_key(jwk: &Jwk) -> Option<DecodingKey> {
    if jwk.kty != "OKP" || jwk.crv != "Ed25519" || (!jwk.alg.is_empty() && jwk.alg != "EdDSA") {
        return None;
    }
    DecodingKey::from_ed_components(&jwk.x).ok()
}

/// The auth service's JWKS, fetched over gRPC and cached. An unknown `kid`
/// triggers a refresh, at most once per `min_refresh_interval`, with one
/// fetch in flight however many requests wait for it.
pub struct JwksCache {
    client: AuthClient<Channel>,
    min_refresh_interval: Duration,
    /// Known keys: read without waiting for a refresh in flight.
    keys: std::sync::RwLock<HashMap<String, DecodingKey>>,
    /// Held for the whole refresh, so one runs at a time; records when the
    /// last one started and whether it worked.
    refresh: Mutex<Option<(Instant, bool)>>,
}

impl JwksCache {
    pub fn new(auth: Channel) -> Self {
        Self {
            client: AuthClient::new(auth),
            min_refresh_interval: Duration::from_secs(2),
            keys: std::sync::RwLock::new(HashMap::new()),
            refresh: Mutex::new(None),
        }
    }
}

#[async_trait]
impl KeySource for JwksCache {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        let known =
            |keys: &std::sync::RwLock<HashMap<String, DecodingKey>>| keys.read().expect("jwks lock").get(kid).cloned();
        if let Some(k) = known(&self.keys) {
            return Ok(Some(k));
        }
        let mut last_refresh = self.refresh.lock().await;
        // A refresh that finished while we waited may have brought the key.
        if let Some(k) = known(&self.keys) {
            return Ok(Some(k));
        }
        match *last_refresh {
            // Refreshed a moment ago: the kid is unknown (or the auth service down).
            Some((at, ok)) if at.elapsed() < self.min_refresh_interval => {
                return if ok {
                    Ok(None)
                } else {
                    Err(VerifyError::KeysUnavailable("auth service unreachable".into()))
                };
            }
            _ => {}
        }
        *last_refresh = Some((Instant::now(), false));
        let resp = self
            .client
            .clone()
            .get_jwks(GetJwksRequest {})
            .await
            .map_err(|e| {
                tracing::warn!(error = %e.message(), code = ?e.code(), "jwks refresh failed");
                VerifyError::KeysUnavailable(e.message().to_owned())
            })?
            .into_inner();
        let keys: HashMap<String, DecodingKey> =
            resp.keys.iter().filter_map(|jwk| Some((jwk.kid.clone(), decoding_key(jwk)?))).collect();
        tracing::debug!(keys = keys.len(), "jwks refreshed");
        let found = keys.get(kid).cloned();
        *self.keys.write().expect("jwks lock") = keys;
        *last_refresh = Some((Instant::now(), true));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};

    struct OneKey {
        kid: String,
        key: DecodingKey,
    }

    #[async_trait]
    impl KeySource for OneKey {
        async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
            Ok((kid == self.kid).then(|| self.key.clone()))
        }
    }

    fn keypair() -> (EncodingKey, DecodingKey) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        (EncodingKey::from_ed_der(pkcs8.as_ref()), DecodingKey::from_ed_components(&x).unwrap())
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(tenant: &str, roles: Vec<Role>) -> Claims {
        Claims {
            iss: "iss".into(),
            aud: "aud".into(),
            sub: "user-1".into(),
            tenant_id: tenant.into(),
            roles,
            exp: now() + 600,
            nbf: now(),
            iat: now(),
            jti: "j".into(),
        }
    }

    fn sign(claims: &Claims, key: &EncodingKey, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn setup() -> (TokenVerifier, EncodingKey) {
        let (enc, dec) = keypair();
        let verifier = TokenVerifier::new(Arc::new(OneKey { kid: "k1".into(), key: dec }), "iss", "aud");
        (verifier, enc)
    }

    /// An unreachable auth service makes keys unavailable (UNAVAILABLE to
    /// callers) on every attempt, including those inside the rate-limit
    /// window: never "unknown key" (UNAUTHENTICATED) for a valid token.
    #[tokio::test]
    async fn an_unreachable_auth_service_is_unavailable_not_unknown() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cache = JwksCache::new(crate::client::channel(&format!("http://127.0.0.1:{dead}")).unwrap());
        for attempt in 0..3 {
            let r = cache.key("k1").await;
            assert!(matches!(r, Err(VerifyError::KeysUnavailable(_))), "attempt {attempt}: {r:?}");
        }
    }

    #[tokio::test]
    async fn a_valid_token_verifies() {
        let (v, key) = setup();
        let c = claims("acme", vec![Role::TenantAdmin]);
        assert_eq!(v.verify(&sign(&c, &key, Some("k1"))).await.unwrap(), c);
    }

    #[tokio::test]
    async fn claim_checks_refuse() {
        let (v, key) = setup();
        type Case = (fn(&mut Claims), fn(&VerifyError) -> bool);
        let cases: Vec<Case> = vec![
            (|c| c.exp = now() - 3600, |e| matches!(e, VerifyError::Expired)),
            (|c| c.nbf = now() + 3600, |e| matches!(e, VerifyError::NotYetValid)),
            (|c| c.iss = "other".into(), |e| matches!(e, VerifyError::Issuer)),
            (|c| c.aud = "other".into(), |e| matches!(e, VerifyError::Audience)),
            (|c| c.tenant_id = "Bad Tenant".into(), |e| matches!(e, VerifyError::Claims)),
            (|c| c.roles.clear(), |e| matches!(e, VerifyError::Claims)),
            (|c| c.roles = vec![Role::PlatformAdmin], |e| matches!(e, VerifyError::Claims)),
            (|c| c.roles = vec![Role::Service], |e| matches!(e, VerifyError::Claims)),
        ];
        for (i, (mutate, expected)) in cases.into_iter().enumerate() {
            let mut c = claims("acme", vec![Role::TenantUser]);
            mutate(&mut c);
            let err = v.verify(&sign(&c, &key, Some("k1"))).await.unwrap_err();
            assert!(expected(&err), "case {i}: {err:?}");
        }
        // The platform tenant may hold platform roles.
        v.verify(&sign(&claims("platform", vec![Role::PlatformAdmin]), &key, Some("k1"))).await.unwrap();
    }

    #[tokio::test]
    async fn keys_algorithms_and_signatures_are_enforced() {
        let (v, key) = setup();
        let c = claims("acme", vec![Role::TenantUser]);
        assert!(matches!(v.verify(&sign(&c, &key, None)).await, Err(VerifyError::MissingKid)));
        assert!(matches!(v.verify(&sign(&c, &key, Some("k2"))).await, Err(VerifyError::UnknownKey)));
        let (other, _) = keypair();
        assert!(matches!(v.verify(&sign(&c, &other, Some("k1"))).await, Err(VerifyError::Signature)));

        // A tampered payload under the original signature.
        let token = sign(&c, &key, Some("k1"));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = claims("globex", vec![Role::TenantUser]);
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert!(matches!(v.verify(&tampered).await, Err(VerifyError::Signature)));

        // HS256 and `none` are refused by the allow-list before any key is used.
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some("k1".into());
        let hs_token = jsonwebtoken::encode(&hs, &c, &EncodingKey::from_secret(b"public key bytes")).unwrap();
        assert!(matches!(v.verify(&hs_token).await, Err(VerifyError::Algorithm)));
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#), parts[1]);
        assert!(v.verify(&none).await.is_err());
        assert!(matches!(v.verify("garbage").await, Err(VerifyError::Malformed)));
    }
}
