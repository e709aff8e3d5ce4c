//! Ed25519 signing keys: generated on first start, persisted in the store,
//! published through the JWKS and used for verification locally.

use std::sync::RwLock;

use async_trait::async_trait;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};
use tenantmesh_proto::auth::v1::Jwk;
use tenantmesh_storage::{Condition, DynTable, Query};
use tenantmesh_tenant_context::verify::{KeySource, VerifyError};

use crate::AuthError;

/// Partition of the signing keys (sort key: kid).
const KEYS_PK: &str = "_signing_keys";

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 v2 document, base64url.
    pkcs8: String,
    /// Public key, base64url (the JWK `x`).
    x: String,
    create_time: i64,
}

struct KeyEntry {
    kid: String,
    x: String,
    create_time: i64,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The auth service's signing keys; the newest signs.
pub struct SigningKeys {
    keys: RwLock<Vec<KeyEntry>>,
}

fn corrupt(e: impl std::fmt::Display) -> AuthError {
    AuthError::Corrupt(format!("signing key: {e}"))
}

impl SigningKeys {
    /// Loads the persisted keys, generating the first one if there is none.
    pub async fn load_or_create(store: &DynTable) -> Result<Self, AuthError> {
        let mut keys = Self::load(store).await?;
        if keys.is_empty() {
            Self::generate(store).await?;
            keys = Self::load(store).await?;
        }
        keys.sort_by(|a, b| (a.create_time, &a.kid).cmp(&(b.create_time, &b.kid)));
        Ok(Self { keys: RwLock::new(keys) })
    }

    async fn load(store: &DynTable) -> Result<Vec<KeyEntry>, AuthError> {
        let mut out = Vec::new();
        let mut start_after = None;
        loop {
            let page =
                store.query(Query { pk: KEYS_PK.into(), sk_prefix: String::new(), start_after, limit: 100 }).await?;
            for item in page.items {
                let k: StoredKey = serde_json::from_slice(&item.data).map_err(corrupt)?;
                let der = URL_SAFE_NO_PAD.decode(&k.pkcs8).map_err(corrupt)?;
                out.push(KeyEntry {
                    encoding: EncodingKey::from_ed_der(&der),
                    decoding: DecodingKey::from_ed_components(&k.x).map_err(corrupt)?,
                    kid: k.kid,
                    x: k.x,
                    create_time: k.create_time,
                });
            }
            match page.last_evaluated {
                Some(sk) => start_after = Some(sk),
                None => return Ok(out),
            }
        }
    }

    async fn generate(store: &DynTable) -> Result<(), AuthError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(corrupt)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(corrupt)?;
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let kid = crate::random_token(12);
        let stored = StoredKey {
            kid: kid.clone(),
            pkcs8: URL_SAFE_NO_PAD.encode(pkcs8.as_ref()),
            x,
            create_time: crate::now_secs(),
        };
        let data = serde_json::to_vec(&stored).map_err(corrupt)?;
        store.put(KEYS_PK, &kid, data, Condition::NotExists).await?;
        tracing::info!(kid = %kid, "generated a new Ed25519 signing key");
        Ok(())
    }

    /// The kid and key that sign new tokens.
    pub fn signer(&self) -> (String, EncodingKey) {
        let keys = self.keys.read().expect("keys lock");
        let k = keys.last().expect("at least one signing key");
        (k.kid.clone(), k.encoding.clone())
    }

    /// Every published key as a JWK.
    pub fn jwks(&self) -> Vec<Jwk> {
        self.keys
            .read()
            .expect("keys lock")
            .iter()
            .map(|k| Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: k.x.clone(),
                kid: k.kid.clone(),
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect()
    }
}

#[async_trait]
impl KeySource for SigningKeys {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        Ok(self.keys.read().expect("keys lock").iter().find(|k| k.kid == kid).map(|k| k.decoding.clone()))
    }
}
