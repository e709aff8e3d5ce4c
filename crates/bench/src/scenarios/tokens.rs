//! Token verification, cold (an Ed25519 signature check and the claims)
//! against cached (a SHA-256 of the token and a lookup), in process.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use jsonwebtoken::DecodingKey;
use serde_json::json;
use tenantmesh_tenant_context::verify::{KeySource, TokenVerifier, VerifyError};
use tenantmesh_tenant_context::{Claims, Role};

use super::{Ctx, median, progress};
use crate::report::{Figure, ScenarioResult, Target};

struct OneKey(DecodingKey);

#[async_trait]
impl KeySource for OneKey {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        Ok((kid == "k1").then(|| self.0.clone()))
    }
}

/// Nanoseconds per call of `f`, the median of `rounds` rounds of `n` calls.
async fn time<F, Fut>(rounds: usize, n: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut per = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..n {
            f().await;
        }
        per.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    median(per)
}

pub async fn token_verification(ctx: &Ctx) -> Result<ScenarioResult, String> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
    let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine as _;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let decoding = DecodingKey::from_ed_components(&x).map_err(|e| e.to_string())?;
    let encoding = jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref());
    let now = jsonwebtoken::get_current_timestamp();
    // A token shaped like the auth service's (same claims, similar length).
    let claims = Claims {
        iss: tenantmesh_service::config::DEFAULT_ISSUER.into(),
        aud: tenantmesh_service::config::DEFAULT_AUDIENCE.into(),
        sub: uuid::Uuid::new_v4().to_string(),
        tenant_id: "acme-corporation".into(),
        roles: vec![Role::TenantAdmin],
        exp: now + 900,
        nbf: now,
        iat: now,
        jti: uuid::Uuid::new_v4().simple().to_string(),
        scopes: Vec::new(),
        tenants: None,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| e.to_string())?;
    let verifier = TokenVerifier::new(Arc::new(OneKey(decoding)), &claims.iss, &claims.aud);
    let (rounds, n) = ctx.pick((7, 20_000), (3, 2_000));
    let cold = time(rounds, n / 10, || async {
        verifier.verify_uncached(&token).await.expect("verifies");
    })
    .await;
    verifier.verify(&token).await.map_err(|e| e.to_string())?;
    let cached = time(rounds, n, || async {
        verifier.verify(&token).await.expect("verifies");
    })
    .await;
    progress(format!("  cold {cold:.0} ns, cached {cached:.0} ns ({} byte token)", token.len()));
    let mut r = ctx.result(
        "token_verification",
        "Token verification, cold vs cached",
        format!(
            "In process, one thread: `TokenVerifier::verify_uncached` (EdDSA signature and claims) vs `verify` of a \
             token verified before (SHA-256 of the {}-byte token and a lookup), median of {rounds} rounds.",
            token.len()
        ),
    );
    r.figures.push(Figure::new("cached token check", "us", cached / 1000.0).target(Target::AtMost(5.0)));
    r.figures.push(Figure::new("cold token check (Ed25519)", "us", cold / 1000.0));
    r.details = json!({"cold_ns": cold, "cached_ns": cached, "token_bytes": token.len()});
    Ok(r)
}
