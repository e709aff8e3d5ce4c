//! Refresh tokens: opaque `<tenant id>.<random>` strings (the tenant names
//! the partition), stored only as a SHA-256 hash. Each login starts a
//! family; each use spends the token and issues its successor in one
//! transaction; presenting a spent token again — a sign it was stolen —
//! revokes the whole family. A family keeps its live token and the one
//! spent last (enough to catch the reuse of a stolen token: the thief's
//! use or the owner's, whichever comes second, finds it spent); older
//! spent tokens are deleted as the family rotates, so refreshing, however
//! often, does not grow the store. An older token presented again is
//! simply unknown. Expired tokens and families, and revoked families, are
//! purged by the sweeper ([`crate::expiry`]).

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, StorageError, Write};

use crate::error::AuthError;
use crate::secrets::{random_token, sha256_hex};
use tenantmesh_service::clock::now_secs;

/// How long a refresh token lives.
pub const REFRESH_TTL_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefreshRecord {
    pub user_id: String,
    pub email: String,
    pub family: String,
    pub expire_time: i64,
    pub spent: bool,
    /// The key of the token this one succeeded (deleted when this one is
    /// spent in turn).
    #[serde(default)]
    pub previous: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Family {
    revoked: bool,
    /// When its newest token expires (Unix seconds); a revoked family
    /// expires at once.
    #[serde(default)]
    expire_time: i64,
}

pub(crate) const TOKEN_PREFIX: &str = "refresh#";
pub(crate) const FAMILY_PREFIX: &str = "family#";

fn token_sk(token: &str) -> String {
    format!("{TOKEN_PREFIX}{}", sha256_hex(token.as_bytes()))
}

fn family_sk(family: &str) -> String {
    format!("{FAMILY_PREFIX}{family}")
}

/// When the token or family record `sk` holding `data` expires.
pub(crate) fn expires_at(sk: &str, data: &[u8]) -> Option<i64> {
    if sk.starts_with(FAMILY_PREFIX) {
        serde_json::from_slice::<Family>(data).ok().map(|f| f.expire_time)
    } else {
        serde_json::from_slice::<RefreshRecord>(data).ok().map(|r| r.expire_time)
    }
}

/// The tenant a refresh token belongs to, if it is well formed.
pub(crate) fn tenant_of(token: &str) -> Option<&str> {
    let (tenant, secret) = token.split_once('.')?;
    (tenantmesh_service::validate_tenant_id(tenant).is_ok() && secret.len() >= 32).then_some(tenant)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, AuthError> {
    serde_json::to_vec(v).map_err(|e| AuthError::Internal(e.to_string()))
}

fn parse<'a, T: Deserialize<'a>>(data: &'a [u8]) -> Result<T, AuthError> {
    serde_json::from_slice(data).map_err(|e| AuthError::Corrupt(format!("refresh record: {e}")))
}

/// Starts a family for a fresh login and returns its first token.
pub(crate) async fn start_family(
    store: &DynTable,
    tenant: &str,
    user_id: &str,
    email: &str,
) -> Result<String, AuthError> {
    let family = random_token(16);
    let token = format!("{tenant}.{}", random_token(32));
    let expire_time = now_secs() + REFRESH_TTL_SECS;
    let record = RefreshRecord {
        user_id: user_id.into(),
        email: email.into(),
        family: family.clone(),
        expire_time,
        spent: false,
        previous: String::new(),
    };
    store
        .transact_write(vec![
            Write::Put {
                pk: tenant.into(),
                sk: family_sk(&family),
                data: json(&Family { revoked: false, expire_time })?,
                condition: Condition::NotExists,
            },
            Write::Put {
                pk: tenant.into(),
                sk: token_sk(&token),
                data: json(&record)?,
                condition: Condition::NotExists,
            },
            crate::expiry_index::entry(tenant, &family_sk(&family), expire_time),
            crate::expiry_index::entry(tenant, &token_sk(&token), expire_time),
        ])
        .await?;
    Ok(token)
}

/// Revokes the family of `record` (`why`, for the audit log); it expires
/// at once, so the sweeper purges it within about a minute (its tokens,
/// unusable now, at their expiry). The revocation and its audit event
/// (`session.revoke`, by the token's user) are one transaction; a family
/// revoked already changes no more, and records nothing.
async fn revoke_family(store: &DynTable, tenant: &str, record: &RefreshRecord, why: &str) -> Result<(), AuthError> {
    use tenantmesh_service::audit::{AppendError, Caller};
    let sk = family_sk(&record.family);
    let log = crate::service::audit_log(store);
    // A rotation racing this may move the family's version: read again.
    for _ in 0..4 {
        let now = now_secs();
        let condition = match store.get(tenant, &sk).await? {
            Some(item) if parse::<Family>(&item.data)?.revoked => return Ok(()),
            Some(item) => Condition::Version(item.version),
            None => Condition::NotExists,
        };
        let writes = vec![
            Write::Put {
                pk: tenant.into(),
                sk: sk.clone(),
                data: json(&Family { revoked: true, expire_time: now })?,
                condition,
            },
            crate::expiry_index::entry(tenant, &sk, now),
        ];
        let who = Caller {
            actor: tenantmesh_proto::audit::v1::Actor {
                subject: record.user_id.clone(),
                tenant_id: tenant.to_owned(),
                roles: Vec::new(),
            },
            trace_id: tenantmesh_telemetry::current_trace_id().unwrap_or_default(),
            ..Default::default()
        };
        let mut event = who.event(tenant, "session.revoke", format!("user/{}", record.email));
        event.before = "signed in".into();
        event.after = format!("signed out: {why}");
        match log.commit(writes, event).await {
            Ok(_) => return Ok(()),
            Err(AppendError::Change { .. }) => continue,
            Err(AppendError::Store(e)) => return Err(e.into()),
        }
    }
    Err(AuthError::ConcurrentChange)
}

/// A refresh token found live, with the versions its rotation must see.
pub(crate) struct Live {
    pub tenant: String,
    pub record: RefreshRecord,
    version: u64,
    family_version: u64,
}

/// The live record of `token` (unspent, unexpired, family not revoked);
/// a spent one revokes its family. Any failure is `InvalidCredentials`.
pub(crate) async fn live(store: &DynTable, token: &str) -> Result<Live, AuthError> {
    let tenant = tenant_of(token).ok_or(AuthError::InvalidCredentials)?.to_owned();
    let item = store.get(&tenant, &token_sk(token)).await?.ok_or(AuthError::InvalidCredentials)?;
    let record: RefreshRecord = parse(&item.data)?;
    let family = store.get(&tenant, &family_sk(&record.family)).await?.ok_or(AuthError::InvalidCredentials)?;
    if parse::<Family>(&family.data)?.revoked {
        return Err(AuthError::InvalidCredentials);
    }
    if record.spent {
        tracing::warn!(
            security_event = "refresh_token_reuse",
            user_id = %record.user_id,
            "a spent refresh token was presented again; revoking its family"
        );
        revoke_family(store, &tenant, &record, "a spent refresh token was presented again").await?;
        return Err(AuthError::InvalidCredentials);
    }
    if record.expire_time <= now_secs() {
        return Err(AuthError::InvalidCredentials);
    }
    Ok(Live { tenant, record, version: item.version, family_version: family.version })
}

/// Spends `token` (found `live`) and returns its successor, atomically
/// with the reads `live` made; a concurrent use of the same token counts as
/// reuse.
pub(crate) async fn rotate(store: &DynTable, token: &str, live: Live) -> Result<String, AuthError> {
    let Live { tenant, record, version, family_version } = live;
    let next = format!("{tenant}.{}", random_token(32));
    let spent = RefreshRecord { spent: true, ..record.clone() };
    let expire_time = now_secs() + REFRESH_TTL_SECS;
    let successor = RefreshRecord { expire_time, previous: token_sk(token), ..record.clone() };
    let mut writes = vec![
        Write::Put {
            pk: tenant.clone(),
            sk: token_sk(token),
            data: json(&spent)?,
            condition: Condition::Version(version),
        },
        Write::Put {
            pk: tenant.clone(),
            sk: token_sk(&next),
            data: json(&successor)?,
            condition: Condition::NotExists,
        },
        // The family lives as long as its newest token (the sweeper finds
        // it extended at its first entry, and looks again later).
        Write::Put {
            pk: tenant.clone(),
            sk: family_sk(&record.family),
            data: json(&Family { revoked: false, expire_time })?,
            condition: Condition::Version(family_version),
        },
        crate::expiry_index::entry(&tenant, &token_sk(&next), expire_time),
    ];
    // The token spent before this one goes: this one, spent now, takes its
    // place as the family's reuse tripwire.
    if !record.previous.is_empty() {
        writes.push(Write::Delete { pk: tenant.clone(), sk: record.previous.clone(), condition: Condition::None });
    }
    match store.transact_write(writes).await {
        Ok(()) => Ok(next),
        Err(StorageError::ConditionFailed { index: 0, .. }) => {
            tracing::warn!(security_event = "refresh_token_reuse", user_id = %record.user_id, "concurrent refresh; revoking family");
            revoke_family(store, &tenant, &record, "the same refresh token was used twice at once").await?;
            Err(AuthError::InvalidCredentials)
        }
        Err(StorageError::ConditionFailed { .. }) => Err(AuthError::InvalidCredentials),
        Err(e) => Err(e.into()),
    }
}

/// Revokes the family of `token`, if it is one of ours.
pub(crate) async fn revoke(store: &DynTable, token: &str) -> Result<(), AuthError> {
    let Some(tenant) = tenant_of(token) else { return Ok(()) };
    let Some(item) = store.get(tenant, &token_sk(token)).await? else { return Ok(()) };
    let record: RefreshRecord = parse(&item.data)?;
    revoke_family(store, tenant, &record, "the session was revoked").await
}

/// Revokes a family from a record already read (the user is gone).
pub(crate) async fn revoke_record(store: &DynTable, tenant: &str, record: &RefreshRecord) -> Result<(), AuthError> {
    revoke_family(store, tenant, record, "the user is disabled or deleted").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantmesh_storage::Query;

    async fn refresh_records(store: &DynTable) -> usize {
        let q = Query { pk: "acme".into(), sk_prefix: "refresh#".into(), start_after: None, limit: 1000 };
        store.query(q).await.unwrap().items.len()
    }

    /// Rotating a family many times keeps two records (the live token and
    /// the one spent last); the last spent one presented again revokes the
    /// family, an older one is merely unknown.
    #[tokio::test]
    async fn rotation_keeps_the_store_bounded_and_the_tripwire() {
        let dir = tempfile::tempdir().unwrap();
        let store = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("auth.redb")).unwrap();
        let mut tokens = vec![start_family(&store, "acme", "u1", "a@acme.example").await.unwrap()];
        for _ in 0..20 {
            let current = tokens.last().unwrap().clone();
            let found = live(&store, &current).await.unwrap();
            tokens.push(rotate(&store, &current, found).await.unwrap());
        }
        assert_eq!(refresh_records(&store).await, 2);
        // An old token: unknown, the family untouched.
        assert!(matches!(live(&store, &tokens[3]).await, Err(AuthError::InvalidCredentials)));
        live(&store, tokens.last().unwrap()).await.unwrap();
        // The last spent one: reuse, the family revoked.
        assert!(matches!(live(&store, &tokens[tokens.len() - 2]).await, Err(AuthError::InvalidCredentials)));
        assert!(matches!(live(&store, tokens.last().unwrap()).await, Err(AuthError::InvalidCredentials)));
    }
}
