//! Ed25519 signing keys: generated on first start, persisted in the store,
//! published through the JWKS and used for verification locally.
//!
//! Rotation: a new key is stored with an activation time a publish delay
//! ahead, so it is in the JWKS before it signs anything; the newest active
//! key signs; an older key stays published until its successor has been
//! signing longer than an access token lives, then it is deleted.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tenantmesh_proto::audit::v1::AuditEvent;
use tenantmesh_service::audit::{AppendError, AuditLog};
use tenantmesh_storage::Write;

use async_trait::async_trait;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};
use tenantmesh_proto::auth::v1::Jwk;
use tenantmesh_storage::{Condition, DynTable, Pages};
use tenantmesh_tenant_context::verify::{KeySource, VerifyError};

use crate::error::AuthError;

/// Partition of the signing keys (sort key: kid).
const KEYS_PK: &str = "_signing_keys";

/// Clock skew allowed for tokens, on top of their lifetime, before a
/// retired key is deleted.
const RETIRE_MARGIN_SECS: i64 = 60;

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 v2 document, base64url.
    pkcs8: String,
    /// Public key, base64url (the JWK `x`).
    x: String,
    create_time: i64,
    /// When the key starts signing (keys from before rotation existed: at creation).
    #[serde(default)]
    active_time: Option<i64>,
}

struct KeyEntry {
    kid: String,
    x: String,
    active_time: i64,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The auth service's signing keys (see the module docs).
pub struct SigningKeys {
    keys: RwLock<Vec<KeyEntry>>,
    /// Bumped whenever the set of keys changes (verifiers forget the
    /// tokens they remembered under the old set).
    generation: AtomicU64,
}

fn corrupt(e: impl std::fmt::Display) -> AuthError {
    AuthError::Corrupt(format!("signing key: {e}"))
}

impl SigningKeys {
    /// Loads the persisted keys, generating the first one if there is none.
    pub async fn load_or_create(store: &DynTable) -> Result<Self, AuthError> {
        let mut keys = load(store).await?;
        if keys.is_empty() {
            generate(store, tenantmesh_service::clock::now_secs(), None).await?;
            keys = load(store).await?;
        }
        Ok(Self { keys: RwLock::new(keys), generation: AtomicU64::new(0) })
    }

    /// Re-reads the keys from the store (another replica may have rotated).
    pub async fn reload(&self, store: &DynTable) -> Result<(), AuthError> {
        let keys = load(store).await?;
        if !keys.is_empty() {
            let mut current = self.keys.write().expect("keys lock");
            let same = current.len() == keys.len() && current.iter().zip(&keys).all(|(a, b)| a.kid == b.kid);
            *current = keys;
            if !same {
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Adds a key that signs from `publish_delay` on, and deletes keys no
    /// unexpired token can carry any more. Returns the new kid and when it
    /// becomes active.
    ///
    /// With `audit`, the new key and the audit event (its `after` set to
    /// the new kid here) are written in one transaction.
    pub async fn rotate(
        &self,
        store: &DynTable,
        publish_delay: Duration,
        token_ttl: Duration,
        audit: Option<(&AuditLog, AuditEvent)>,
    ) -> Result<(String, i64), AuthError> {
        let now = tenantmesh_service::clock::now_secs();
        let active_time = now + publish_delay.as_secs() as i64;
        let kid = generate(store, active_time, audit).await?;
        let keys = load(store).await?;
        // Key i is retired once key i+1 has signed for longer than a token lives.
        for pair in keys.windows(2) {
            let successor_since = pair[1].active_time;
            if successor_since <= now && now - successor_since > token_ttl.as_secs() as i64 + RETIRE_MARGIN_SECS {
                store.delete(KEYS_PK, &pair[0].kid, Condition::None).await?;
                tracing::info!(kid = %pair[0].kid, "retired a signing key");
            }
        }
        self.reload(store).await?;
        tracing::info!(kid = %kid, active_time, "rotated the signing key");
        Ok((kid, active_time))
    }

    /// The kid and key that sign new tokens: the newest active key.
    pub fn signer(&self) -> (String, EncodingKey) {
        let keys = self.keys.read().expect("keys lock");
        let now = tenantmesh_service::clock::now_secs();
        let k = keys.iter().rev().find(|k| k.active_time <= now).or_else(|| keys.first()).expect("a signing key");
        (k.kid.clone(), k.encoding.clone())
    }

    /// Kids of every published key, oldest first.
    pub fn kids(&self) -> Vec<String> {
        self.keys.read().expect("keys lock").iter().map(|k| k.kid.clone()).collect()
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

/// Every stored key, in activation order.
async fn load(store: &DynTable) -> Result<Vec<KeyEntry>, AuthError> {
    let mut out = Vec::new();
    let mut pages = Pages::new(store.as_ref(), KEYS_PK, "", 100);
    while let Some(items) = pages.next().await? {
        for item in items {
            let k: StoredKey = serde_json::from_slice(&item.data).map_err(corrupt)?;
            let der = URL_SAFE_NO_PAD.decode(&k.pkcs8).map_err(corrupt)?;
            out.push(KeyEntry {
                encoding: EncodingKey::from_ed_der(&der),
                decoding: DecodingKey::from_ed_components(&k.x).map_err(corrupt)?,
                active_time: k.active_time.unwrap_or(k.create_time),
                kid: k.kid,
                x: k.x,
            });
        }
    }
    out.sort_by(|a, b| (a.active_time, &a.kid).cmp(&(b.active_time, &b.kid)));
    Ok(out)
}

async fn generate(
    store: &DynTable,
    active_time: i64,
    audit: Option<(&AuditLog, AuditEvent)>,
) -> Result<String, AuthError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(corrupt)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(corrupt)?;
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let kid = crate::secrets::random_token(12);
    let stored = StoredKey {
        kid: kid.clone(),
        pkcs8: URL_SAFE_NO_PAD.encode(pkcs8.as_ref()),
        x,
        create_time: tenantmesh_service::clock::now_secs(),
        active_time: Some(active_time),
    };
    let data = serde_json::to_vec(&stored).map_err(corrupt)?;
    match audit {
        Some((log, mut event)) => {
            event.after = format!("kid {kid}, signing from {active_time}");
            let write = Write::Put { pk: KEYS_PK.into(), sk: kid.clone(), data, condition: Condition::NotExists };
            log.commit(vec![write], event).await.map_err(|e| match e {
                AppendError::Change { source, .. } | AppendError::Store(source) => AuthError::from(source),
            })?;
        }
        None => {
            store.put(KEYS_PK, &kid, data, Condition::NotExists).await?;
        }
    }
    tracing::info!(kid = %kid, "generated a new Ed25519 signing key");
    Ok(kid)
}

#[async_trait]
impl KeySource for SigningKeys {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, VerifyError> {
        Ok(self.keys.read().expect("keys lock").iter().find(|k| k.kid == kid).map(|k| k.decoding.clone()))
    }
}
