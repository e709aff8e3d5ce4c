//! Contract tests of `tenantmesh.auth.v1.Auth`: login, users, JWKS and
//! service tokens, with their error paths.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tenantmesh_proto::auth::v1::*;
use tenantmesh_tenant_context::Claims;
use tenantmesh_test_support::*;
use tonic::Code;

fn login(tenant: &str, email: &str, password: &str) -> LoginRequest {
    LoginRequest { tenant_id: tenant.into(), email: email.into(), password: password.into() }
}

fn new_user(tenant: &str, email: &str, roles: &[Role]) -> CreateUserRequest {
    CreateUserRequest {
        tenant_id: tenant.into(),
        email: email.into(),
        password: "a-long-password".into(),
        roles: roles.iter().map(|r| *r as i32).collect(),
        password_hash: String::new(),
    }
}

/// Login returns an EdDSA token that verifies against the published JWKS
/// and carries the tenant, subject and roles.
#[tokio::test]
async fn login_token_verifies_against_jwks() {
    let mesh = TestMesh::start().await;
    let mut auth = mesh.auth();
    let resp = auth.login(login("platform", ADMIN_EMAIL, ADMIN_PASSWORD)).await.unwrap().into_inner();
    assert_eq!((resp.expires_in, resp.token_type.as_str()), (900, "Bearer"));
    assert!(resp.refresh_token.len() >= 32);

    let jwks = auth.get_jwks(GetJwksRequest {}).await.unwrap().into_inner();
    assert_eq!(jwks.keys.len(), 1);
    let jwk = &jwks.keys[0];
    assert_eq!(
        (jwk.kty.as_str(), jwk.crv.as_str(), jwk.alg.as_str(), jwk.r#use.as_str()),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    let doc: serde_json::Value = serde_json::from_str(&jwks.jwks_json).unwrap();
    assert_eq!(doc["keys"][0]["kid"], jwk.kid.as_str());

    let header = jsonwebtoken::decode_header(&resp.access_token).unwrap();
    assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::EdDSA, Some(jwk.kid.as_str())));
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&["tenantmesh"]);
    v.set_issuer(&["tenantmesh-auth"]);
    let key = DecodingKey::from_ed_components(&jwk.x).unwrap();
    let claims = jsonwebtoken::decode::<Claims>(&resp.access_token, &key, &v).unwrap().claims;
    assert_eq!(claims.tenant_id, "platform");
    assert_eq!(claims.roles, vec![tenantmesh_tenant_context::Role::PlatformAdmin]);
    assert_eq!(claims.exp - claims.iat, 900);
    mesh.shutdown().await;
}

/// A wrong password, an unknown user and a user of another tenant all get
/// the same UNAUTHENTICATED answer; malformed input is INVALID_ARGUMENT.
#[tokio::test]
async fn login_failures_look_alike() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("acme")).await;
    let mut auth = mesh.auth();
    let wrong = expect_code(auth.login(login("platform", ADMIN_EMAIL, "wrong-password")).await, Code::Unauthenticated);
    let unknown =
        expect_code(auth.login(login("platform", "nobody@x.io", ADMIN_PASSWORD)).await, Code::Unauthenticated);
    let other_tenant =
        expect_code(auth.login(login(&t.tenant_id, ADMIN_EMAIL, ADMIN_PASSWORD)).await, Code::Unauthenticated);
    assert_eq!(wrong.message(), unknown.message());
    assert_eq!(wrong.message(), other_tenant.message());
    // Emails are case-insensitive.
    auth.login(login(&t.tenant_id, &t.admin_email.to_uppercase(), &t.admin_password)).await.unwrap();
    expect_invalid(auth.login(login("Bad Tenant", "a@b.c", "x")).await, "tenant_id");
    expect_invalid(auth.login(login("platform", "", "x")).await, "email");
    expect_invalid(auth.login(login("platform", "a@b.c", "")).await, "password");
    mesh.shutdown().await;
}

/// Users are created by platform admins anywhere and by tenant admins in
/// their own tenant only; new users can log in with their roles.
#[tokio::test]
async fn create_user_rules() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let admin = mesh.admin_token().await;
    let mut auth = mesh.auth();

    let u = auth.create_user(authed(new_user(&a.tenant_id, "Bob@Acme.example", &[]), &a.token)).await.unwrap();
    let u = u.into_inner().user.unwrap();
    assert_eq!((u.email.as_str(), u.roles.as_slice()), ("bob@acme.example", &[Role::TenantUser as i32][..]));
    mesh.login(&a.tenant_id, "bob@acme.example", "a-long-password").await.unwrap();
    expect_code(
        auth.create_user(authed(new_user(&a.tenant_id, "bob@acme.example", &[]), &a.token)).await,
        Code::AlreadyExists,
    );

    auth.create_user(authed(new_user(&b.tenant_id, "carol@globex.example", &[Role::TenantAdmin]), &admin))
        .await
        .unwrap();
    expect_code(
        auth.create_user(authed(new_user(&b.tenant_id, "eve@x.io", &[]), &a.token)).await,
        Code::PermissionDenied,
    );
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    expect_code(auth.create_user(authed(new_user(&a.tenant_id, "x@x.io", &[]), &user)).await, Code::PermissionDenied);
    expect_code(auth.create_user(new_user(&a.tenant_id, "x@x.io", &[])).await, Code::Unauthenticated);
    expect_code(
        auth.create_user(authed(new_user(&unique_tenant("ghost"), "x@x.io", &[]), &admin)).await,
        Code::NotFound,
    );

    let mut short = new_user(&a.tenant_id, "s@x.io", &[]);
    short.password = "short".into();
    expect_invalid(auth.create_user(authed(short, &a.token)).await, "password");
    expect_invalid(auth.create_user(authed(new_user(&a.tenant_id, "not-an-email", &[]), &a.token)).await, "email");
    expect_invalid(
        auth.create_user(authed(new_user(&a.tenant_id, "p@x.io", &[Role::PlatformAdmin]), &a.token)).await,
        "roles[0]",
    );
    expect_invalid(
        auth.create_user(authed(new_user(&a.tenant_id, "p@x.io", &[Role::Service]), &admin)).await,
        "roles[0]",
    );
    let mut hashed = new_user(&a.tenant_id, "h@x.io", &[]);
    hashed.password.clear();
    hashed.password_hash =
        tenantmesh_credentials::password::hash("a-long-password", tenantmesh_credentials::HashParams::default())
            .unwrap();
    expect_code(auth.create_user(authed(hashed.clone(), &admin)).await, Code::PermissionDenied);
    let service = mesh.service_token().await;
    auth.create_user(authed(hashed, &service)).await.unwrap();
    mesh.login(&a.tenant_id, "h@x.io", "a-long-password").await.unwrap();
    mesh.shutdown().await;
}

/// Service tokens need the configured client credentials.
#[tokio::test]
async fn service_tokens_need_credentials() {
    let mesh = TestMesh::start().await;
    let mut auth = mesh.auth();
    let req = |id: &str, secret: &str| IssueServiceTokenRequest { client_id: id.into(), client_secret: secret.into() };
    expect_code(auth.issue_service_token(req(TEST_CLIENT_ID, "wrong-secret-0123456789")).await, Code::Unauthenticated);
    expect_code(auth.issue_service_token(req("nobody", TEST_CLIENT_SECRET)).await, Code::Unauthenticated);
    expect_invalid(auth.issue_service_token(req("", "")).await, "client_id");
    // A client id is bounded before anything is logged of it (1 MiB from anyone, else).
    let huge = "x".repeat(1 << 20);
    let s = expect_invalid(auth.issue_service_token(req(&huge, TEST_CLIENT_SECRET)).await, "client_id");
    assert!(s.message().len() < 1024, "the answer repeats the id: {} bytes", s.message().len());
    expect_invalid(auth.issue_service_token(req(TEST_CLIENT_ID, &huge)).await, "client_secret");
    expect_invalid(auth.issue_service_token(req("Bad Id!", TEST_CLIENT_SECRET)).await, "client_id");
    let token = auth.issue_service_token(req(TEST_CLIENT_ID, TEST_CLIENT_SECRET)).await.unwrap().into_inner();
    let claims = jsonwebtoken::dangerous::insecure_decode::<Claims>(&token.access_token).unwrap().claims;
    assert_eq!(claims.roles, vec![tenantmesh_tenant_context::Role::Service]);
    assert_eq!(claims.sub, format!("service:{TEST_CLIENT_ID}"));
    // The token carries its declaration's scopes; one declared without any carries none.
    assert_eq!(claims.scopes, tenantmesh_tenant_context::Scope::ALL.to_vec());
    let bare = auth.issue_service_token(req("tests-no-scope", TEST_CLIENT_SECRET)).await.unwrap().into_inner();
    let claims = jsonwebtoken::dangerous::insecure_decode::<Claims>(&bare.access_token).unwrap().claims;
    assert!(claims.scopes.is_empty() && claims.tenants.is_none(), "{claims:?}");
    mesh.shutdown().await;
}

/// The first five failed logins of a (tenant, email) are free; the sixth
/// locks it: RESOURCE_EXHAUSTED with RetryInfo, even with the right
/// password, and alike for an email that does not exist. Other users are
/// unaffected, and once the lockout has passed the right password works
/// and the count starts afresh.
#[tokio::test]
async fn repeated_failures_lock_the_login_with_retry_info() {
    use tonic_types::StatusExt;
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("locked")).await;
    let mut auth = mesh.auth();
    for email in [t.admin_email.as_str(), "nobody@locked.example"] {
        for attempt in 1..=6 {
            let s = expect_code(auth.login(login(&t.tenant_id, email, "wrong-password")).await, Code::Unauthenticated);
            assert_eq!(s.message(), "invalid credentials", "{email} attempt {attempt}");
        }
        let locked =
            expect_code(auth.login(login(&t.tenant_id, email, &t.admin_password)).await, Code::ResourceExhausted);
        let delay = locked.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
        assert_eq!(delay, std::time::Duration::from_secs(1), "{email}");
    }
    // Another user of the same tenant is not locked.
    mesh.user_token(&t, &[Role::TenantUser]).await;

    eventually(std::time::Duration::from_secs(5), || {
        let mut auth = mesh.auth();
        let req = login(&t.tenant_id, &t.admin_email, &t.admin_password);
        async move { auth.login(req).await.is_ok() }
    })
    .await;
    expect_code(auth.login(login(&t.tenant_id, &t.admin_email, "wrong-password")).await, Code::Unauthenticated);
    auth.login(login(&t.tenant_id, &t.admin_email, &t.admin_password)).await.unwrap();
    mesh.shutdown().await;
}

/// A login client from the loopback address `ip` (127.0.0.0/8 all reach
/// the mesh on 127.0.0.1): another client address as the auth service sees it.
fn auth_from(
    mesh: &TestMesh,
    ip: &str,
) -> tenantmesh_proto::auth::v1::auth_client::AuthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.addrs.auth))
        .unwrap()
        .local_address(Some(ip.parse().unwrap()))
        .connect_lazy();
    tenantmesh_proto::auth::v1::auth_client::AuthClient::new(channel)
}

/// 30 wrong passwords sent at once for one account: each attempt is
/// counted before its password is checked, so at most the five free
/// attempts and the one that locks are checked (UNAUTHENTICATED); the rest
/// are refused without a check (it used to check all 30). The owner, from
/// another address, still gets in afterwards.
#[tokio::test]
async fn a_parallel_guessing_burst_gets_only_the_free_attempts() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("burst")).await;
    let guesses: Vec<_> = (0..30)
        .map(|i| {
            let mut auth = auth_from(&mesh, "127.0.0.2");
            let req = login(&t.tenant_id, &t.admin_email, &format!("wrong-password-{i}"));
            tokio::spawn(async move { auth.login(req).await })
        })
        .collect();
    let (mut checked, mut refused) = (0, 0);
    for c in guesses {
        match c.await.unwrap() {
            Err(s) if s.code() == Code::Unauthenticated => checked += 1,
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            // The emulator now and then fails one of 30 simultaneous
            // conditional writes: that attempt is refused unchecked too.
            Err(s) if s.code() == Code::Unavailable => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    // The bound is exact on the embedded store. moto (the DynamoDB pass)
    // checks a condition and writes without a lock, so two of 30
    // simultaneous conditional writes now and then both land: allow it two
    // (DynamoDB's conditional writes are atomic; CI saw 7 once).
    let allowed = match mesh.backend() {
        TestBackend::Embedded => 6,
        TestBackend::DynamoDb => 8,
    };
    assert!(checked <= allowed, "{checked} passwords checked, {refused} refused");
    assert_eq!(checked + refused, 30);
    // The owner, elsewhere, gets in (retrying UNAVAILABLE, as a client
    // does: the emulator's occasional failed write, above).
    let mut answer = Err(tonic::Status::unavailable("not tried"));
    for _ in 0..3 {
        let right = login(&t.tenant_id, &t.admin_email, &t.admin_password);
        answer = auth_from(&mesh, "127.0.0.3").login(right).await;
        if !answer.as_ref().is_err_and(|s| s.code() == Code::Unavailable) {
            break;
        }
    }
    answer.expect("the owner, elsewhere, is not locked out");
    mesh.shutdown().await;
}

/// Failures lock the client address that made them, not the account's
/// owner elsewhere: an attacker at 127.0.0.2 locks itself out while the
/// owner at 127.0.0.3 logs in. Spread over many addresses, guesses hit the
/// account's own (higher) ceiling, which locks every address.
#[tokio::test]
async fn an_attacker_cannot_lock_the_owner_out_from_elsewhere() {
    let settings = [("TENANTMESH_LOGIN_ACCOUNT_FREE_ATTEMPTS", "12")];
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &settings).await;
    let t = mesh.onboard(&unique_tenant("victim")).await;
    let mut attacker = auth_from(&mesh, "127.0.0.2");
    for _ in 0..6 {
        let wrong = login(&t.tenant_id, &t.admin_email, "wrong-password");
        expect_code(attacker.login(wrong).await, Code::Unauthenticated);
    }
    let right = || login(&t.tenant_id, &t.admin_email, &t.admin_password);
    expect_code(attacker.login(right()).await, Code::ResourceExhausted);
    auth_from(&mesh, "127.0.0.3").login(right()).await.expect("the owner, elsewhere, is not locked out");

    // The owner's login cleared the account's count; 12 more failures from
    // three addresses (none past its own free five) and the 13th locks the account.
    for ip in ["127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        let mut from = auth_from(&mesh, ip);
        for _ in 0..4 {
            expect_code(from.login(login(&t.tenant_id, &t.admin_email, "wrong-password")).await, Code::Unauthenticated);
        }
    }
    let mut last = auth_from(&mesh, "127.0.0.7");
    expect_code(last.login(login(&t.tenant_id, &t.admin_email, "wrong-password")).await, Code::Unauthenticated);
    expect_code(auth_from(&mesh, "127.0.0.3").login(right()).await, Code::ResourceExhausted);
    mesh.shutdown().await;
}

async fn login_pair(mesh: &TestMesh, tenant: &str, email: &str, password: &str) -> (String, String) {
    let r = mesh.auth().login(login(tenant, email, password)).await.unwrap().into_inner();
    (r.access_token, r.refresh_token)
}

fn refresh(token: &str) -> RefreshRequest {
    RefreshRequest { refresh_token: token.into() }
}

/// Each refresh spends its token and issues a working successor; presenting
/// a spent token again revokes the whole family, so even the newest token
/// of that family stops working. A new login starts a new family.
#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("refresh")).await;
    let mut auth = mesh.auth();
    let (_, r1) = login_pair(&mesh, &t.tenant_id, &t.admin_email, &t.admin_password).await;
    assert!(r1.starts_with(&format!("{}.", t.tenant_id)));
    let next = auth.refresh(refresh(&r1)).await.unwrap().into_inner();
    assert_ne!(next.refresh_token, r1);
    assert_eq!(next.expires_in, 900);
    // The new access token works.
    let get = tenantmesh_proto::data::v1::GetItemRequest { collection: "c".into(), id: "1".into() };
    expect_code(mesh.data().get_item(authed(get, &next.access_token)).await, Code::NotFound);

    expect_code(auth.refresh(refresh(&r1)).await, Code::Unauthenticated);
    expect_code(auth.refresh(refresh(&next.refresh_token)).await, Code::Unauthenticated);

    let (_, fresh) = login_pair(&mesh, &t.tenant_id, &t.admin_email, &t.admin_password).await;
    auth.refresh(refresh(&fresh)).await.unwrap();
    for bad in ["", "no-dot", "acme.short", &format!("{}.{}", t.tenant_id, "x".repeat(43))] {
        let s = auth.refresh(refresh(bad)).await.unwrap_err();
        assert!(matches!(s.code(), Code::Unauthenticated | Code::InvalidArgument), "{bad:?}: {s:?}");
    }
    mesh.shutdown().await;
}

/// Revoke ends a family at once and always succeeds.
#[tokio::test]
async fn revoke_ends_the_family() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("revoke")).await;
    let mut auth = mesh.auth();
    let (_, r1) = login_pair(&mesh, &t.tenant_id, &t.admin_email, &t.admin_password).await;
    let r2 = auth.refresh(refresh(&r1)).await.unwrap().into_inner().refresh_token;
    auth.revoke(RevokeRequest { refresh_token: r2.clone() }).await.unwrap();
    expect_code(auth.refresh(refresh(&r2)).await, Code::Unauthenticated);
    auth.revoke(RevokeRequest { refresh_token: "garbage".into() }).await.unwrap();
    auth.revoke(RevokeRequest { refresh_token: r2 }).await.unwrap();
    mesh.shutdown().await;
}

/// Disabling or deleting a user stops its refresh tokens at once, and a
/// user re-created under the same email does not inherit them.
#[tokio::test]
async fn disabled_or_deleted_users_cannot_refresh() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("lifecycle")).await;
    let mut auth = mesh.auth();
    for (email, action) in [("dis@lifecycle.example", "disable"), ("del@lifecycle.example", "delete")] {
        auth.create_user(authed(new_user(&t.tenant_id, email, &[]), &t.token)).await.unwrap();
        let (_, r) = login_pair(&mesh, &t.tenant_id, email, "a-long-password").await;
        let target = |tenant: &str| (tenant.to_owned(), email.to_owned());
        let (tenant_id, email_s) = target(&t.tenant_id);
        if action == "disable" {
            let out = auth
                .disable_user(authed(DisableUserRequest { tenant_id, email: email_s }, &t.token))
                .await
                .unwrap()
                .into_inner();
            assert!(out.user.unwrap().disabled);
            expect_code(auth.login(login(&t.tenant_id, email, "a-long-password")).await, Code::Unauthenticated);
        } else {
            auth.delete_user(authed(DeleteUserRequest { tenant_id, email: email_s }, &t.token)).await.unwrap();
            auth.create_user(authed(new_user(&t.tenant_id, email, &[]), &t.token)).await.unwrap();
        }
        expect_code(auth.refresh(refresh(&r)).await, Code::Unauthenticated);
    }
    mesh.shutdown().await;
}

/// Tenant admins list, disable and delete users of their own tenant only;
/// nobody disables or deletes themselves; bad input names the field.
#[tokio::test]
async fn user_management_rules() {
    let mesh = TestMesh::start().await;
    let a = mesh.onboard(&unique_tenant("acme")).await;
    let b = mesh.onboard(&unique_tenant("globex")).await;
    let mut auth = mesh.auth();
    for i in 0..3 {
        auth.create_user(authed(new_user(&a.tenant_id, &format!("u{i}@acme.example"), &[]), &a.token)).await.unwrap();
    }
    let list = |tenant: &str, size: i32, token: &str| {
        authed(ListUsersRequest { tenant_id: tenant.into(), page_size: size, page_token: token.into() }, "")
    };
    let mut emails = Vec::new();
    let mut page_token = String::new();
    loop {
        let mut req = list(&a.tenant_id, 2, &page_token);
        req.metadata_mut().insert("authorization", format!("Bearer {}", a.token).parse().unwrap());
        let page = auth.list_users(req).await.unwrap().into_inner();
        emails.extend(page.users.iter().map(|u| u.email.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(emails.len(), 4, "{emails:?}");
    assert!(emails.windows(2).all(|w| w[0] < w[1]), "sorted: {emails:?}");

    let as_a = |tenant: &str, email: &str| DisableUserRequest { tenant_id: tenant.into(), email: email.into() };
    expect_code(auth.disable_user(authed(as_a(&b.tenant_id, &b.admin_email), &a.token)).await, Code::PermissionDenied);
    expect_code(
        auth.disable_user(authed(as_a(&a.tenant_id, &a.admin_email), &a.token)).await,
        Code::FailedPrecondition,
    );
    expect_code(
        auth.delete_user(authed(
            DeleteUserRequest { tenant_id: a.tenant_id.clone(), email: "ghost@acme.example".into() },
            &a.token,
        ))
        .await,
        Code::NotFound,
    );
    expect_invalid(auth.disable_user(authed(as_a(&a.tenant_id, "not-an-email"), &a.token)).await, "email");
    let mut bad_page = list(&a.tenant_id, 2, "junk");
    bad_page.metadata_mut().insert("authorization", format!("Bearer {}", a.token).parse().unwrap());
    expect_invalid(auth.list_users(bad_page).await, "page_token");
    let mut other = list(&b.tenant_id, 0, "");
    other.metadata_mut().insert("authorization", format!("Bearer {}", a.token).parse().unwrap());
    expect_code(auth.list_users(other).await, Code::PermissionDenied);
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    expect_code(auth.disable_user(authed(as_a(&a.tenant_id, "u0@acme.example"), &user)).await, Code::PermissionDenied);
    // The platform admin manages any tenant's users.
    let admin = mesh.admin_token().await;
    auth.disable_user(authed(as_a(&b.tenant_id, &b.admin_email), &admin)).await.unwrap();
    mesh.shutdown().await;
}

/// Regression: a tenant's admin can manage users right after onboarding.
/// (Auth once cached the tenant's PROVISIONING status from onboarding's own
/// CreateUser call and refused the new admin for a whole cache TTL.)
#[tokio::test]
async fn new_tenant_admin_is_not_refused_right_after_onboarding() {
    let mesh = TestMesh::start().await;
    let t = mesh.onboard(&unique_tenant("fresh")).await;
    mesh.auth().create_user(authed(new_user(&t.tenant_id, "first@fresh.example", &[]), &t.token)).await.unwrap();
    mesh.shutdown().await;
}

/// Key rotation: the new key is in the JWKS at once but signs only after
/// the publish delay; tokens signed by the old key keep working; the
/// signing key changes once the delay has passed. The delay (3 s) is longer
/// than validators' JWKS refresh interval (2 s), as it must be: with a
/// shorter one a validator that fetched the keys just before the rotation
/// would not fetch again in time for the first token of the new key.
#[tokio::test]
async fn rotated_keys_are_published_before_they_sign() {
    let mesh = TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_KEY_PUBLISH_DELAY_SECS", "3")]).await;
    let admin = mesh.admin_token().await;
    let old_kid = jsonwebtoken::decode_header(&admin).unwrap().kid.unwrap();
    let mut auth = mesh.auth();
    let t = mesh.onboard(&unique_tenant("rotate")).await;
    expect_code(auth.rotate_signing_key(authed(RotateSigningKeyRequest {}, &t.token)).await, Code::PermissionDenied);

    let rotated = auth.rotate_signing_key(authed(RotateSigningKeyRequest {}, &admin)).await.unwrap().into_inner();
    assert_ne!(rotated.kid, old_kid);
    assert_eq!(rotated.published_kids, vec![old_kid.clone(), rotated.kid.clone()]);
    let jwks: Vec<String> =
        auth.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().keys.into_iter().map(|k| k.kid).collect();
    assert!(jwks.contains(&rotated.kid) && jwks.contains(&old_kid), "{jwks:?}");

    // Within the delay the old key still signs.
    let soon = mesh.admin_token().await;
    let now = jsonwebtoken::get_current_timestamp() as i64;
    if now < rotated.active_time {
        assert_eq!(jsonwebtoken::decode_header(&soon).unwrap().kid.unwrap(), old_kid);
    }
    eventually(std::time::Duration::from_secs(10), || async {
        let token = mesh.admin_token().await;
        jsonwebtoken::decode_header(&token).unwrap().kid.as_deref() == Some(rotated.kid.as_str())
    })
    .await;
    // Tokens from before the rotation, and after it, are accepted everywhere.
    let get = || tenantmesh_proto::data::v1::GetItemRequest { collection: "c".into(), id: "1".into() };
    expect_code(mesh.data().get_item(authed(get(), &t.token)).await, Code::NotFound);
    let fresh = mesh.login(&t.tenant_id, &t.admin_email, &t.admin_password).await.unwrap();
    assert_eq!(jsonwebtoken::decode_header(&fresh).unwrap().kid.unwrap(), rotated.kid);
    expect_code(mesh.data().get_item(authed(get(), &fresh)).await, Code::NotFound);
    mesh.shutdown().await;
}

/// Every RPC of the auth service has a test here.
#[test]
fn every_rpc_has_a_contract_test() {
    tenantmesh_test_support::assert_contract_covers(include_str!("contract.rs"), &["tenantmesh.auth.v1.Auth"]);
}

/// GetEntitlements: a tenant's users read their own tenant's plan (the
/// built-in tiers include everything, uncapped), with how many users it
/// has; another tenant's is refused, bad input names its field, and the
/// platform has no plan.
#[tokio::test]
async fn entitlements_are_read_by_the_tenants_own_users() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin_token().await;
    let a = mesh.onboard(&unique_tenant("plan")).await;
    let b = mesh.onboard(&unique_tenant("other")).await;
    let user = mesh.user_token(&a, &[Role::TenantUser]).await;
    let mut auth = mesh.auth();
    let get = |tenant: &str| GetEntitlementsRequest { tenant_id: tenant.into() };
    let listed = auth.get_entitlements(authed(get(&a.tenant_id), &user)).await.unwrap().into_inner().entitlements;
    let by: std::collections::HashMap<&str, &Entitlement> = listed.iter().map(|e| (e.feature.as_str(), e)).collect();
    for feature in ["restore", "export", "external_idp"] {
        let e = by[feature];
        assert!(e.granted && e.kind() == EntitlementKind::Boolean && e.source() == EntitlementSource::Tier, "{e:?}");
    }
    let users = by["max_users"];
    assert_eq!((users.granted, users.limit, users.used), (true, None, Some(2)), "its admin and one user: {users:?}");
    assert_eq!(by["history_days"].limit, Some(7), "standard keeps 7 days");
    assert_eq!(
        auth.get_entitlements(authed(get(&a.tenant_id), &admin)).await.unwrap().into_inner().entitlements,
        listed
    );
    expect_code(auth.get_entitlements(authed(get(&b.tenant_id), &user)).await, Code::PermissionDenied);
    expect_invalid(auth.get_entitlements(authed(get("Not A Tenant"), &admin)).await, "tenant_id");
    expect_code(auth.get_entitlements(authed(get("platform"), &admin)).await, Code::FailedPrecondition);
}
