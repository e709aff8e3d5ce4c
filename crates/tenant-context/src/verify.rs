//! JWT verification: EdDSA only, a `kid` that names a published key, and
//! `exp` / `nbf` / `iss` / `aud` checked. Keys come from a [`KeySource`]:
//! the auth service's own key store, or [`JwksCache`] over gRPC for every
//! other service.
//!
//! A verified token is remembered (keyed by its SHA-256, never by anything
//! a caller could choose to collide) until its `exp` or until the set of
//! published keys changes, so a caller's next requests cost a hash and a
//! lookup instead of an Ed25519 verification. The verdict is the one a full
//! verification would give at that instant: the same expiry (leeway
//! included), and a retired key takes its tokens with it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tenantmesh_proto::auth::v1::{GetJwksRequest, Jwk, auth_client::AuthClient};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::identity::{Claims, Role};

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

/// The longest lifetime (`exp` after `iat`, or after now) a token may have.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

/// Where verification keys come from.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// The public key with this `kid`, if it is (now) published.
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError>;

    /// Changes whenever the set of published keys changes (a key added or
    /// retired): verified tokens remembered under an older generation are
    /// verified again.
    fn generation(&self) -> u64 {
        0
    }

    /// Whether the keys as known at `now_ms` (wall-clock ms) may still be
    /// trusted without asking the source again; remembered tokens are
    /// verified in full (refreshing the keys) once they may not.
    fn fresh(&self, _now_ms: u64) -> bool {
        true
    }
}

/// What a verified access token says, shared by every request that
/// presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub tenant_id: Arc<str>,
    pub subject: Arc<str>,
    pub roles: Arc<[Role]>,
    /// Seconds since the epoch.
    pub exp: u64,
    /// A service identity's grant (its scopes and tenants).
    pub grant: Option<Arc<crate::identity::Grant>>,
}

impl Verified {
    /// The scopes a service identity was granted (none for users).
    pub fn scopes(&self) -> &[crate::identity::Scope] {
        self.grant.as_ref().map_or(&[], |g| g.scopes.as_slice())
    }
}

impl From<Claims> for Verified {
    fn from(c: Claims) -> Self {
        let service = c.roles.contains(&Role::Service);
        let grant = service.then(|| Arc::new(crate::identity::Grant { scopes: c.scopes, tenants: c.tenants }));
        Verified { tenant_id: c.tenant_id.into(), subject: c.sub.into(), roles: c.roles.into(), exp: c.exp, grant }
    }
}

/// How many verified tokens a verifier remembers by default.
pub const DEFAULT_TOKEN_CACHE_CAPACITY: usize = 100_000;

/// Verifies access tokens.
pub struct TokenVerifier {
    keys: Arc<dyn KeySource>,
    validation: Validation,
    cache: VerifiedCache,
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
        Self { keys, validation, cache: VerifiedCache::new(DEFAULT_TOKEN_CACHE_CAPACITY) }
    }

    /// Remembers at most `capacity` verified tokens (0: none).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = VerifiedCache::new(capacity);
        self
    }

    /// Verifies `token`: from memory when this verifier verified it before,
    /// it has not expired and the published keys have not changed since.
    pub async fn verify(&self, token: &str) -> Result<Arc<Verified>, VerifyError> {
        let digest = TokenDigest::of(token);
        // Read before verifying: a key retired meanwhile makes the entry stale at once.
        let generation = self.keys.generation();
        if let Some(v) = self.lookup(&digest, generation) {
            return Ok(v);
        }
        let verified = Arc::new(Verified::from(self.verify_uncached(token).await?));
        self.cache.insert(digest, verified.clone(), generation);
        Ok(verified)
    }

    /// `token`'s remembered verdict, if it is remembered and still holds
    /// (no key lookup, no signature check).
    pub fn remembered(&self, token: &str) -> Option<Arc<Verified>> {
        self.lookup(&TokenDigest::of(token), self.keys.generation())
    }

    fn lookup(&self, digest: &TokenDigest, generation: u64) -> Option<Arc<Verified>> {
        let now = tenantmesh_service::clock::since_epoch();
        if !self.keys.fresh(now.as_millis() as u64) {
            return None;
        }
        self.cache.get(digest, generation, now.as_secs().saturating_sub(self.validation.leeway))
    }

    /// How many verified tokens are remembered now.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Verifies `token` in full (signature included), remembering nothing.
    pub async fn verify_uncached(&self, token: &str) -> Result<Claims, VerifyError> {
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
        if tenantmesh_service::validate_tenant_id(&claims.tenant_id).is_err() || claims.roles.is_empty() {
            return Err(VerifyError::Claims);
        }
        // However it was signed, a token lives at most a day (the auth
        // service's own ceiling): a leaked long-lived token is refused.
        let now = jsonwebtoken::get_current_timestamp();
        if claims.exp.saturating_sub(claims.iat.min(now)) > MAX_TOKEN_LIFETIME_SECS + self.validation.leeway {
            return Err(VerifyError::Claims);
        }
        // Cross-tenant roles exist only in the platform tenant.
        let platform_role = claims
            .roles
            .iter()
            .any(|r| matches!(r, crate::identity::Role::PlatformAdmin | crate::identity::Role::Service));
        if platform_role && claims.tenant_id != crate::identity::PLATFORM_TENANT {
            return Err(VerifyError::Claims);
        }
        // Scopes and tenant confinement belong to service identities only.
        let granted = !claims.scopes.is_empty() || claims.tenants.is_some();
        let bad_tenant = claims.tenants.iter().flatten().any(|t| tenantmesh_service::validate_tenant_id(t).is_err());
        if (granted && !claims.roles.contains(&crate::identity::Role::Service)) || bad_tenant {
            return Err(VerifyError::Claims);
        }
        Ok(claims)
    }
}

/// The SHA-256 of a token: the key it is remembered under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &str) -> Self {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        TokenDigest(d.as_ref().try_into().expect("sha-256 is 32 bytes"))
    }
}

/// Keys are SHA-256 digests, uniformly distributed already: their first
/// eight bytes are the hash.
#[derive(Default, Clone, Copy)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= u64::from(*b) << (8 * i);
        }
    }
}

impl BuildHasher for DigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

struct Remembered {
    verified: Arc<Verified>,
    generation: u64,
}

const SHARDS: usize = 16;

/// Verified tokens by digest, in shards so concurrent requests rarely meet
/// on a lock. Each shard holds at most `capacity / SHARDS` tokens: when
/// full, expired ones go first, and if none had expired the shard starts
/// over (its tokens are verified again on their next use).
struct VerifiedCache {
    shards: Vec<std::sync::Mutex<HashMap<TokenDigest, Remembered, DigestHasher>>>,
    per_shard: usize,
    len: AtomicU64,
}

impl VerifiedCache {
    fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            len: AtomicU64::new(0),
        }
    }

    fn shard(&self, d: &TokenDigest) -> std::sync::MutexGuard<'_, HashMap<TokenDigest, Remembered, DigestHasher>> {
        self.shards[usize::from(d.0[31]) % SHARDS].lock().expect("token cache lock")
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed) as usize
    }

    /// The remembered verdict, if it still holds: same key generation and
    /// `exp` not before `expired_before` (now minus the leeway).
    fn get(&self, d: &TokenDigest, generation: u64, expired_before: u64) -> Option<Arc<Verified>> {
        let mut shard = self.shard(d);
        let r = shard.get(d)?;
        if r.generation == generation && r.verified.exp >= expired_before {
            return Some(r.verified.clone());
        }
        shard.remove(d);
        self.len.fetch_sub(1, Ordering::Relaxed);
        None
    }

    fn insert(&self, d: TokenDigest, verified: Arc<Verified>, generation: u64) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&d);
        if shard.len() >= self.per_shard && !shard.contains_key(&d) {
            let before = shard.len();
            let now = jsonwebtoken::get_current_timestamp();
            shard.retain(|_, r| r.verified.exp >= now);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
            self.len.fetch_sub((before - shard.len()) as u64, Ordering::Relaxed);
        }
        if shard.insert(d, Remembered { verified, generation }).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
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

/// Fetches the published keys (the auth service's `GetJwks`).
type FetchJwks = Box<dyn Fn() -> crate::context::BoxFuture<Result<Vec<Jwk>, tonic::Status>> + Send + Sync>;

/// How long a fetched key set is used before it is fetched again: a key
/// retired from the JWKS leaves every validator within this (and, through
/// the key generation, every token it signed leaves the verified cache).
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(30);

/// The auth service's JWKS, fetched over gRPC and cached. An unknown `kid`
/// triggers a refresh, at most once per `min_refresh_interval`, with one
/// fetch in flight however many requests wait for it. A set older than
/// [`JWKS_MAX_AGE`] is fetched again by the first request that finds it
/// so (the others go on with the set they have), so retired keys leave.
pub struct JwksCache {
    fetch: FetchJwks,
    min_refresh_interval: Duration,
    max_age: Duration,
    /// Known keys: read without waiting for a refresh in flight.
    keys: std::sync::RwLock<HashMap<String, DecodingKey>>,
    /// Until when the known keys are trusted without a refresh (wall-clock
    /// ms; 0: never fetched): a fetch plus `max_age`, or, when a refresh of
    /// stale keys fails (the auth service down), a try again in
    /// `min_refresh_interval` while the known keys stand.
    fresh_until_ms: AtomicU64,
    /// Held for the whole refresh, so one runs at a time; records when the
    /// last one started and whether it worked.
    refresh: Mutex<Option<(Instant, bool)>>,
    /// Bumped when a refresh changes the set of keys.
    generation: AtomicU64,
}

impl JwksCache {
    pub fn new(auth: Channel) -> Self {
        let client = tenantmesh_service::sized!(AuthClient::new(auth));
        Self::from_fn(Box::new(move || {
            let mut client = client.clone();
            Box::pin(async move { Ok(client.get_jwks(GetJwksRequest {}).await?.into_inner().keys) })
        }))
    }

    fn from_fn(fetch: FetchJwks) -> Self {
        Self {
            fetch,
            min_refresh_interval: Duration::from_secs(2),
            max_age: JWKS_MAX_AGE,
            keys: std::sync::RwLock::new(HashMap::new()),
            fresh_until_ms: AtomicU64::new(0),
            refresh: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    fn known(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().expect("jwks lock").get(kid).cloned()
    }

    fn stale(&self) -> bool {
        !self.fresh(wall_ms())
    }

    /// Fetches the keys and replaces the known ones (the refresh lock held).
    ///
    /// Cancel-safe: a caller that goes away mid-fetch (its client reset the
    /// stream, or gave up) leaves no failure behind. Noting the attempt
    /// before its outcome would have made every caller for the next
    /// `min_refresh_interval` UNAVAILABLE ("auth service unreachable") on
    /// the word of one cancelled call: with a cold cache, one reset stream
    /// took every new token's verification down for two seconds.
    async fn refresh(&self, last_refresh: &mut Option<(Instant, bool)>) -> Result<(), VerifyError> {
        let jwks = (self.fetch)().await.map_err(|e| {
            *last_refresh = Some((Instant::now(), false));
            tracing::warn!(error = %e.message(), code = ?e.code(), "jwks refresh failed");
            if self.fresh_until_ms.load(Ordering::Relaxed) != 0 {
                let retry = wall_ms() + self.min_refresh_interval.as_millis() as u64;
                self.fresh_until_ms.store(retry, Ordering::Relaxed);
            }
            VerifyError::KeysUnavailable(e.message().to_owned())
        })?;
        let keys: HashMap<String, DecodingKey> =
            jwks.iter().filter_map(|jwk| Some((jwk.kid.clone(), decoding_key(jwk)?))).collect();
        tracing::debug!(keys = keys.len(), "jwks refreshed");
        {
            let mut known = self.keys.write().expect("jwks lock");
            let same = known.len() == keys.len() && keys.keys().all(|k| known.contains_key(k));
            *known = keys;
            if !same {
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.fresh_until_ms.store(wall_ms() + self.max_age.as_millis() as u64, Ordering::Relaxed);
        *last_refresh = Some((Instant::now(), true));
        Ok(())
    }
}

fn wall_ms() -> u64 {
    tenantmesh_service::clock::now_ms().max(0) as u64
}

#[async_trait]
impl KeySource for JwksCache {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn fresh(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms.load(Ordering::Relaxed)
    }

    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        if let Some(k) = self.known(kid) {
            if !self.stale() {
                return Ok(Some(k));
            }
            // Old: fetch again if nobody is; meanwhile (or if the auth
            // service is down) the known set stands.
            if let Ok(mut last_refresh) = self.refresh.try_lock()
                && self.stale()
                && self.refresh(&mut last_refresh).await.is_ok()
            {
                return Ok(self.known(kid));
            }
            return Ok(Some(k));
        }
        let mut last_refresh = self.refresh.lock().await;
        // A refresh that finished while we waited may have brought the key.
        if let Some(k) = self.known(kid) {
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
        self.refresh(&mut last_refresh).await?;
        Ok(self.known(kid))
    }
}

#[cfg(test)]
mod tests;
