//! Unit tests of [`super`].

use super::*;
use crate::identity::Role;
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
        scopes: Vec::new(),
        tenants: None,
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

/// A caller that goes away while the keys are being fetched (its stream
/// reset) leaves nothing behind: the next caller fetches and is served,
/// rather than told the auth service is unreachable.
#[tokio::test]
async fn a_cancelled_fetch_is_not_a_failed_one() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let cache = JwksCache::from_fn(Box::new(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if n == 0 {
                // The first fetch never finishes: its caller gives up.
                std::future::pending::<()>().await;
            }
            Ok(vec![Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
                kid: "k1".into(),
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            }])
        })
    }));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), cache.key("k1")).await;
    assert!(gave_up.is_err(), "the first caller waited on a fetch that never ends");
    let key = cache.key("k1").await;
    assert!(matches!(key, Ok(Some(_))), "the next caller is served: {key:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A key retired from the JWKS leaves the cache once the set is older
/// than its maximum age, and so do the tokens it signed; while the auth
/// service is down, the known keys stand.
#[tokio::test]
async fn retired_keys_leave_the_cache() {
    let published: Arc<std::sync::Mutex<Result<Vec<Jwk>, tonic::Status>>> =
        Arc::new(std::sync::Mutex::new(Ok(Vec::new())));
    let jwk = |kid: &str, x: &str| Jwk {
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: x.into(),
        kid: kid.into(),
        alg: "EdDSA".into(),
        r#use: "sig".into(),
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let signer = EncodingKey::from_ed_der(pkcs8.as_ref());
    *published.lock().unwrap() = Ok(vec![jwk("k1", &x)]);
    let source = published.clone();
    let mut cache = JwksCache::from_fn(Box::new(move || {
        let answer = source.lock().unwrap().clone();
        Box::pin(async move { answer })
    }));
    cache.max_age = Duration::from_millis(100);
    let verifier = TokenVerifier::new(Arc::new(cache), "iss", "aud");
    let token = sign(&claims("acme", vec![Role::TenantUser]), &signer, Some("k1"));
    verifier.verify(&token).await.unwrap();

    // The auth service is down: the known key stands, and remembered
    // tokens are trusted again until the next try.
    *published.lock().unwrap() = Err(tonic::Status::unavailable("down"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    verifier.verify(&token).await.unwrap();
    assert!(verifier.remembered(&token).is_some());

    // Retired: the remembered token is not trusted once the set is
    // stale, and verified again it is refused.
    *published.lock().unwrap() = Ok(Vec::new());
    tokio::time::sleep(Duration::from_millis(150) + Duration::from_secs(2)).await;
    assert!(verifier.remembered(&token).is_none());
    assert!(matches!(verifier.verify(&token).await, Err(VerifyError::UnknownKey)));
}

#[tokio::test]
async fn a_valid_token_verifies() {
    let (v, key) = setup();
    let c = claims("acme", vec![Role::TenantAdmin]);
    assert_eq!(*v.verify(&sign(&c, &key, Some("k1"))).await.unwrap(), Verified::from(c));
}

/// Keys that can be retired, counting how often they are asked for.
struct Rotating {
    keys: std::sync::Mutex<HashMap<String, DecodingKey>>,
    generation: AtomicU64,
    lookups: AtomicU64,
}

#[async_trait]
impl KeySource for Rotating {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        Ok(self.keys.lock().unwrap().get(kid).cloned())
    }
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

fn rotating() -> (Arc<Rotating>, TokenVerifier, EncodingKey) {
    let (enc, dec) = keypair();
    let keys = Arc::new(Rotating {
        keys: std::sync::Mutex::new([("k1".to_owned(), dec)].into()),
        generation: AtomicU64::new(0),
        lookups: AtomicU64::new(0),
    });
    let verifier = TokenVerifier::new(keys.clone(), "iss", "aud");
    (keys, verifier, enc)
}

/// A token verified once is served from memory: no key lookup, no
/// signature check; the same verdict.
#[tokio::test]
async fn a_verified_token_is_remembered() {
    let (keys, v, key) = rotating();
    let token = sign(&claims("acme", vec![Role::TenantUser]), &key, Some("k1"));
    let first = v.verify(&token).await.unwrap();
    for _ in 0..10 {
        assert_eq!(v.verify(&token).await.unwrap(), first);
    }
    assert_eq!(keys.lookups.load(Ordering::SeqCst), 1, "verified again instead of remembered");
    assert_eq!(v.cached_tokens(), 1);
}

/// Remembering a token never lets a different one through: altered
/// payloads and signatures of a remembered token are still refused.
#[tokio::test]
async fn a_remembered_token_vouches_for_no_other() {
    let (_, v, key) = rotating();
    let token = sign(&claims("acme", vec![Role::TenantUser]), &key, Some("k1"));
    v.verify(&token).await.unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let forged = claims("globex", vec![Role::TenantAdmin]);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert!(matches!(v.verify(&tampered).await, Err(VerifyError::Signature)));
    let mut sig = parts[2].to_owned();
    sig.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
    let bad_sig = format!("{}.{}.{sig}", parts[0], parts[1]);
    assert!(v.verify(&bad_sig).await.is_err());
}

/// When its key leaves the published set, a remembered token is refused
/// exactly as an unremembered one would be.
#[tokio::test]
async fn a_retired_key_takes_its_remembered_tokens_along() {
    let (keys, v, key) = rotating();
    let token = sign(&claims("acme", vec![Role::TenantUser]), &key, Some("k1"));
    v.verify(&token).await.unwrap();
    keys.keys.lock().unwrap().clear();
    keys.generation.fetch_add(1, Ordering::SeqCst);
    assert!(matches!(v.verify(&token).await, Err(VerifyError::UnknownKey)));
    assert_eq!(v.cached_tokens(), 0);
}

/// A remembered token stops being served once `exp` (plus the leeway a
/// full verification allows) has passed, and then gets the full
/// verification's answer.
#[tokio::test]
async fn a_remembered_token_expires_with_the_token() {
    let (_, v, key) = rotating();
    // Inside the 30 s leeway: valid now, remembered.
    let mut c = claims("acme", vec![Role::TenantUser]);
    c.exp = now() - 20;
    let token = sign(&c, &key, Some("k1"));
    v.verify(&token).await.unwrap();
    let d = TokenDigest::of(&token);
    assert!(v.cache.get(&d, 0, c.exp).is_some(), "still valid at its exp");
    assert!(v.cache.get(&d, 0, c.exp + 1).is_none(), "served past its exp + leeway");
    // Forgotten once expired; a token past the leeway is refused in full.
    assert_eq!(v.cached_tokens(), 0);
    c.exp = now() - 60;
    assert!(matches!(v.verify(&sign(&c, &key, Some("k1"))).await, Err(VerifyError::Expired)));
}

/// However many distinct tokens arrive, the memory holds a bounded number.
#[tokio::test]
async fn the_token_cache_is_bounded() {
    let (_, v, key) = rotating();
    let v = v.with_cache_capacity(64);
    for i in 0..1000 {
        let mut c = claims("acme", vec![Role::TenantUser]);
        c.jti = format!("t{i}");
        v.verify(&sign(&c, &key, Some("k1"))).await.unwrap();
        assert!(v.cached_tokens() <= 64, "{} tokens remembered", v.cached_tokens());
    }
    assert!(v.cached_tokens() > 0);
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
        // Scopes and confinement are a service identity's only.
        (|c| c.scopes = vec![crate::identity::Scope::Lifecycle], |e| matches!(e, VerifyError::Claims)),
        (|c| c.tenants = Some(vec!["acme".into()]), |e| matches!(e, VerifyError::Claims)),
        // Lifetimes over a day, with or without an honest `iat`.
        (|c| c.exp = now() + 2 * 86_400, |e| matches!(e, VerifyError::Claims)),
        (|c| c.iat = now() - 86_400, |e| matches!(e, VerifyError::Claims)),
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

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No string is accepted as a token unless it is one: garbage,
        /// three base64 parts of anything, or a real token with one
        /// byte changed is refused, never a panic.
        #[test]
        fn only_real_tokens_verify(
            garbage in ".{0,200}",
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 3),
            flip in any::<prop::sample::Index>(),
        ) {
            use base64::Engine as _;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (v, key) = setup();
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let forged = parts.iter().map(|p| b64(p)).collect::<Vec<_>>().join(".");
            let real = sign(&claims("acme", vec![Role::TenantUser]), &key, Some("k1"));
            let mut tampered = real.clone().into_bytes();
            let i = flip.index(tampered.len());
            tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(tampered).unwrap();
            rt.block_on(async {
                for token in [&garbage, &forged] {
                    prop_assert!(v.verify(token).await.is_err());
                }
                // Refused, unless the change fell in a last character's
                // spare bits and every part decodes as before.
                let decoded = |t: &str| {
                    t.split('.')
                        .map(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
                        .collect::<Vec<_>>()
                };
                if decoded(&tampered) != decoded(&real) {
                    prop_assert!(v.verify(&tampered).await.is_err());
                }
                prop_assert!(v.verify(&real).await.is_ok());
                Ok(())
            })?;
        }
    }
}
