//! The auth table does not grow without bound: refresh tokens, their
//! families and login-failure records are purged once expired (a revoked
//! family at once), on the backend `TENANTMESH_TEST_STORAGE` names. The
//! mesh makes the records through its RPCs; the sweep then runs on its
//! stopped table with the clock moved on.

use std::time::Duration;

use tenantmesh_proto::auth::v1::{LoginRequest, RefreshRequest, RevokeRequest};
use tenantmesh_storage::{DynTable, Query};
use tenantmesh_test_support::*;
use tonic::Code;

/// The tenant's records in the auth table, by kind.
async fn kinds(store: &DynTable, tenant: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let mut start_after = None;
    loop {
        let q = Query { pk: tenant.into(), sk_prefix: String::new(), start_after, limit: 1000 };
        let page = store.query(q).await.unwrap();
        for item in &page.items {
            *out.entry(item.sk.split('#').next().unwrap().to_owned()).or_default() += 1;
        }
        match page.last_evaluated {
            Some(sk) => start_after = Some(sk),
            None => return out,
        }
    }
}

fn count(kinds: &std::collections::BTreeMap<String, usize>, kind: &str) -> usize {
    kinds.get(kind).copied().unwrap_or(0)
}

#[tokio::test]
async fn expired_and_revoked_auth_records_are_purged() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("purge")).await;
    let login = || LoginRequest {
        tenant_id: t.tenant_id.clone(),
        email: t.admin_email.clone(),
        password: t.admin_password.clone(),
    };
    // Three sessions: one refreshed twice, one logged out.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(mesh.auth().login(login()).await.unwrap().into_inner().refresh_token);
    }
    for _ in 0..2 {
        let req = RefreshRequest { refresh_token: sessions[0].clone() };
        sessions[0] = mesh.auth().refresh(req).await.unwrap().into_inner().refresh_token;
    }
    mesh.auth().revoke(RevokeRequest { refresh_token: sessions[1].clone() }).await.unwrap();
    // Guesses at emails that do not exist.
    for i in 0..4 {
        let req =
            LoginRequest { email: format!("nobody{i}@example.com"), password: "wrong-password-1".into(), ..login() };
        let refused = mesh.auth().login(req).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    let state = mesh.stop().await;
    let window = Duration::from_secs(
        state.env_var("TENANTMESH_LOGIN_MAX_LOCKOUT_SECS").and_then(|v| v.parse().ok()).unwrap_or(900),
    )
    .max(Duration::from_secs(60));
    let store = state.table("auth").await;
    let before = kinds(&store, &t.tenant_id).await;
    // Four sessions (the one `onboard` logged in with too); the refreshed
    // family keeps its live and its last spent token.
    assert_eq!(
        (count(&before, "family"), count(&before, "refresh"), count(&before, "login"), count(&before, "login-client")),
        (4, 5, 4, 4),
        "{before:?}"
    );
    let users = count(&before, "user");
    assert!(users >= 1, "{before:?}");

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Sweeps until caught up with `at` (a sweep does at most a week).
    let sweep = |at: i64| {
        let store = store.clone();
        async move {
            let mut deleted = 0;
            loop {
                let swept = tenantmesh_auth::expiry::sweep(&store, at, window).await.unwrap();
                deleted += swept.deleted;
                if swept.buckets == 0 {
                    return deleted;
                }
            }
        }
    };
    // Nothing has expired yet.
    assert_eq!(sweep(now).await, 0);
    assert_eq!(kinds(&store, &t.tenant_id).await, before);
    // Once the lockout window and the hour it ends in are over: the
    // revoked family and the failure records are gone, the live sessions stay.
    let bucket = tenantmesh_auth::expiry::BUCKET_SECS;
    // (The sweep is of the whole table: the platform admin's sessions too.)
    let purged = sweep(now + window.as_secs() as i64 + 2 * bucket).await;
    assert!(purged >= 9, "the revoked family and 8 failure records: {purged}");
    let k = kinds(&store, &t.tenant_id).await;
    assert_eq!(
        (count(&k, "family"), count(&k, "refresh"), count(&k, "login"), count(&k, "login-client")),
        (3, 5, 0, 0),
        "{k:?}"
    );
    // Past the refresh tokens' lifetime: tokens and families are gone; the users stay.
    assert!(sweep(now + 31 * 24 * 3600).await >= 3 + 5);
    let k = kinds(&store, &t.tenant_id).await;
    assert_eq!((count(&k, "family"), count(&k, "refresh"), count(&k, "user")), (0, 0, users), "{k:?}");
}
