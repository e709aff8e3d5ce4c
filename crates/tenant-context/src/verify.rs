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
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
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
        })?;
        let claims = data.claims;
        if crate::validate_tenant_id(&claims.tenant_id).is_err() || claims.roles.is_empty() {
            return Err(VerifyError::Claims);
        }
        Ok(claims)
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
    state: Mutex<JwksState>,
}

#[derive(Default)]
struct JwksState {
    keys: HashMap<String, DecodingKey>,
    last_refresh: Option<Instant>,
}

impl JwksCache {
    pub fn new(auth: Channel) -> Self {
        Self {
            client: AuthClient::new(auth),
            min_refresh_interval: Duration::from_secs(2),
            state: Mutex::new(JwksState::default()),
        }
    }
}

#[async_trait]
impl KeySource for JwksCache {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        let mut state = self.state.lock().await;
        if let Some(k) = state.keys.get(kid) {
            return Ok(Some(k.clone()));
        }
        if state.last_refresh.is_some_and(|t| t.elapsed() < self.min_refresh_interval) {
            return Ok(None);
        }
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
        state.keys = resp.keys.iter().filter_map(|jwk| Some((jwk.kid.clone(), decoding_key(jwk)?))).collect();
        state.last_refresh = Some(Instant::now());
        tracing::debug!(keys = state.keys.len(), "jwks refreshed");
        Ok(state.keys.get(kid).cloned())
    }
}
