//! The attack suite: forged, altered, stale and misdirected credentials
//! against the running mesh, each refused with its exact status code, by
//! the mesh's own services and by an application service built on the
//! app crate (the example `orders`) alike. Tokens that must get past the
//! signature check are minted with the mesh's real signing key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tenantmesh_proto::auth::v1::CreateUserRequest;
use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_proto::onboarding::v1::GetOnboardingStatusRequest;
use tenantmesh_proto::registry::v1::{GetTenantRequest, SetTenantStatusRequest, TenantStatus};
use tenantmesh_test_support::*;
use tonic::Code;

struct Fixture {
    mesh: TestMesh,
    orders: crate::orders_contract::Running,
    kid: String,
    key: EncodingKey,
    acme: TestTenant,
    globex: TestTenant,
}

async fn fixture() -> Fixture {
    let mut mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let globex = mesh.onboard(&unique_tenant("globex")).await;
    // (Reading the key restarts the mesh on new ports: the service comes after.)
    let (kid, key) = mesh.signing_key().await;
    let orders = crate::orders_contract::start(&mesh).await;
    Fixture { mesh, orders, kid, key, acme, globex }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(tenant: &str) -> Value {
    json!({
        "iss": "tenantmesh-auth", "aud": "tenantmesh", "sub": "attacker", "tenant_id": tenant,
        "roles": ["tenant_admin"], "exp": now() + 600, "nbf": now(), "iat": now(), "jti": "j",
    })
}

fn mint(kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// The statuses of a data read and an order read with `token`.
async fn probe(f: &Fixture, token: &str) -> (Code, Code) {
    let get = GetItemRequest { collection: "notes".into(), id: "n1".into() };
    let data = f.mesh.data().get_item(authed(get, token)).await.map_or_else(|s| s.code(), |_| Code::Ok);
    let order = tenantmesh_orders::proto::GetOrderRequest { order_id: "o1".into() };
    let orders = f.orders.client.clone().get_order(authed(order, token)).await.map_or_else(|s| s.code(), |_| Code::Ok);
    (data, orders)
}

/// Forged and altered tokens are UNAUTHENTICATED; a correctly minted one
/// (the control) gets through to NOT_FOUND, so each refusal is the check
/// under test and not a broken minting.
#[tokio::test]
async fn forged_and_altered_tokens_are_unauthenticated() {
    let f = Box::pin(fixture()).await;
    let tenant = f.acme.tenant_id.as_str();
    let control = probe(&f, &mint(&f.kid, &f.key, &claims(tenant))).await;
    assert_eq!(control, (Code::NotFound, Code::NotFound), "control");

    let with = |k: &str, v: Value| {
        let mut c = claims(tenant);
        c[k] = v;
        mint(&f.kid, &f.key, &c)
    };
    let without = |k: &str| {
        let mut c = claims(tenant);
        c.as_object_mut().unwrap().remove(k);
        mint(&f.kid, &f.key, &c)
    };
    let valid = mint(&f.kid, &f.key, &claims(tenant));
    let parts: Vec<&str> = valid.split('.').collect();

    // The public key, as published, used as an HMAC secret.
    let jwks = f.mesh.auth().get_jwks(tenantmesh_proto::auth::v1::GetJwksRequest {}).await.unwrap().into_inner();
    let public = URL_SAFE_NO_PAD.decode(&jwks.keys[0].x).unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(f.kid.clone());
    let hs256 = jsonwebtoken::encode(&hs, &claims(tenant), &EncodingKey::from_secret(&public)).unwrap();

    let other_key = {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        EncodingKey::from_ed_der(pkcs8.as_ref())
    };

    let cases: Vec<(&str, String)> = vec![
        ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": f.kid})), parts[1])),
        ("HS256 with the public key as secret", hs256),
        ("unknown kid", mint("no-such-kid", &f.key, &claims(tenant))),
        ("another key under the real kid", mint(&f.kid, &other_key, &claims(tenant))),
        ("tampered payload", format!("{}.{}.{}", parts[0], b64(&claims(&f.globex.tenant_id)), parts[2])),
        ("expired", with("exp", json!(now() - 3600))),
        ("not yet valid", with("nbf", json!(now() + 3600))),
        ("wrong iss", with("iss", json!("evil-issuer"))),
        ("wrong aud", with("aud", json!("someone-else"))),
        ("missing tenant claim", without("tenant_id")),
        ("tenant id outside the pattern", with("tenant_id", json!("ACME*"))),
        ("platform role in a tenant token", with("roles", json!(["platform_admin"]))),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in cases {
        assert_eq!(probe(&f, &token).await, (Code::Unauthenticated, Code::Unauthenticated), "{name}");
    }
    f.mesh.shutdown().await;
}

/// A suspended tenant's still-unexpired token is refused everywhere.
#[tokio::test]
async fn suspended_tenant_tokens_are_refused() {
    let f = Box::pin(fixture()).await;
    let admin = f.mesh.admin_token().await;
    let suspend =
        SetTenantStatusRequest { tenant_id: f.globex.tenant_id.clone(), status: TenantStatus::Suspended as i32 };
    f.mesh.registry().set_tenant_status(authed(suspend, &admin)).await.unwrap();
    eventually(std::time::Duration::from_secs(5), || async {
        probe(&f, &f.globex.token).await == (Code::PermissionDenied, Code::PermissionDenied)
    })
    .await;
    let own = GetTenantRequest { tenant_id: f.globex.tenant_id.clone() };
    let s = f.mesh.registry().get_tenant(authed(own, &f.globex.token)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(probe(&f, &f.acme.token).await, (Code::NotFound, Code::NotFound), "other tenants are unaffected");
    f.mesh.shutdown().await;
}

/// `x-tenant-id` naming another tenant is PERMISSION_DENIED on every
/// service, and so is a request body naming another tenant on every RPC
/// that takes a tenant id.
#[tokio::test]
async fn other_tenants_named_in_headers_or_bodies_are_refused() {
    let f = Box::pin(fixture()).await;
    let (a, b) = (&f.acme, &f.globex.tenant_id);
    fn spoofed<T>(mut req: tonic::Request<T>, tenant: &str) -> tonic::Request<T> {
        req.metadata_mut().insert("x-tenant-id", tenant.parse().unwrap());
        req
    }
    let get_tenant = |t: &str| GetTenantRequest { tenant_id: t.into() };
    let status = |t: &str| GetOnboardingStatusRequest { tenant_id: t.into() };
    let user = |t: &str| CreateUserRequest {
        tenant_id: t.into(),
        email: "x@example.com".into(),
        password: "a-long-password".into(),
        roles: vec![],
        password_hash: String::new(),
    };
    let data = GetItemRequest { collection: "notes".into(), id: "n1".into() };

    let header_cases = [
        (
            "registry",
            f.mesh.registry().get_tenant(spoofed(authed(get_tenant(&a.tenant_id), &a.token), b)).await.map(drop),
        ),
        ("auth", f.mesh.auth().create_user(spoofed(authed(user(&a.tenant_id), &a.token), b)).await.map(drop)),
        (
            "onboarding",
            f.mesh
                .onboarding()
                .get_onboarding_status(spoofed(authed(status(&a.tenant_id), &a.token), b))
                .await
                .map(drop),
        ),
        ("data", f.mesh.data().get_item(spoofed(authed(data, &a.token), b)).await.map(drop)),
        (
            "orders",
            f.orders
                .client
                .clone()
                .get_order(spoofed(
                    authed(tenantmesh_orders::proto::GetOrderRequest { order_id: "o1".into() }, &a.token),
                    b,
                ))
                .await
                .map(drop),
        ),
    ];
    for (service, outcome) in header_cases {
        assert_eq!(outcome.unwrap_err().code(), Code::PermissionDenied, "x-tenant-id spoofing on {service}");
    }
    use tenantmesh_proto::auth::v1::{DeleteUserRequest, DisableUserRequest, ListUsersRequest};
    use tenantmesh_proto::onboarding::v1::RegisterTenantRequest;
    use tenantmesh_proto::registry::v1::{
        CreateTenantRequest, IdentityProvider, SetIdentityProviderRequest, UpdateTenantRequest,
    };
    let email = f.globex.admin_email.clone();
    let (mut reg, mut auth, mut onb) = (f.mesh.registry(), f.mesh.auth(), f.mesh.onboarding());
    let admin = f.mesh.admin_token().await;
    let before = reg.get_tenant(authed(get_tenant(b), &admin)).await.unwrap().into_inner().tenant.unwrap();
    let idp = IdentityProvider {
        issuer: "https://idp.example".into(),
        jwks_url: "https://idp.example/jwks".into(),
        audience: "a".into(),
        tenant_claim: "t".into(),
    };
    let body_cases = [
        ("GetTenant", reg.get_tenant(authed(get_tenant(b), &a.token)).await.map(drop)),
        (
            "CreateTenant",
            reg.create_tenant(authed(
                CreateTenantRequest {
                    tenant_id: b.clone(),
                    name: "x".into(),
                    tier: "basic".into(),
                    ..Default::default()
                },
                &a.token,
            ))
            .await
            .map(drop),
        ),
        (
            "UpdateTenant",
            reg.update_tenant(authed(
                UpdateTenantRequest { tenant_id: b.clone(), name: "pwned".into(), ..Default::default() },
                &a.token,
            ))
            .await
            .map(drop),
        ),
        (
            "SetTenantStatus",
            reg.set_tenant_status(authed(
                SetTenantStatusRequest { tenant_id: b.clone(), status: TenantStatus::Suspended as i32 },
                &a.token,
            ))
            .await
            .map(drop),
        ),
        (
            "SetIdentityProvider",
            reg.set_identity_provider(authed(
                SetIdentityProviderRequest { tenant_id: b.clone(), identity_provider: Some(idp) },
                &a.token,
            ))
            .await
            .map(drop),
        ),
        ("CreateUser", auth.create_user(authed(user(b), &a.token)).await.map(drop)),
        (
            "ListUsers",
            auth.list_users(authed(ListUsersRequest { tenant_id: b.clone(), ..Default::default() }, &a.token))
                .await
                .map(drop),
        ),
        (
            "DisableUser",
            auth.disable_user(authed(DisableUserRequest { tenant_id: b.clone(), email: email.clone() }, &a.token))
                .await
                .map(drop),
        ),
        (
            "DeleteUser",
            auth.delete_user(authed(DeleteUserRequest { tenant_id: b.clone(), email }, &a.token)).await.map(drop),
        ),
        ("GetOnboardingStatus", onb.get_onboarding_status(authed(status(b), &a.token)).await.map(drop)),
        (
            "RegisterTenant",
            onb.register_tenant(authed(RegisterTenantRequest { tenant_id: b.clone(), ..Default::default() }, &a.token))
                .await
                .map(drop),
        ),
    ];
    for (rpc, outcome) in body_cases {
        assert_eq!(outcome.unwrap_err().code(), Code::PermissionDenied, "{rpc} naming another tenant");
    }
    // Nothing of globex changed.
    let after = reg.get_tenant(authed(get_tenant(b), &admin)).await.unwrap().into_inner().tenant.unwrap();
    assert_eq!(after, before);
    f.mesh.login(b, &f.globex.admin_email, &f.globex.admin_password).await.unwrap();
    f.mesh.shutdown().await;
}

/// Oversized and malformed metadata is refused cleanly, never reaching a
/// handler: a 64 KB `authorization` header is over the 16 KiB header list
/// the server advertises, so the client refuses to send it
/// (RESOURCE_EXHAUSTED); a 12 KB one reaches the layer and is
/// UNAUTHENTICATED, as is a non-UTF-8 one; a non-ASCII `x-tenant-id` is
/// INVALID_ARGUMENT.
#[tokio::test]
async fn hostile_metadata_is_refused() {
    use tower::ServiceExt as _;
    let f = Box::pin(fixture()).await;
    let huge = format!("Bearer {}", "a".repeat(64 * 1024));
    let large = format!("Bearer {}", "a".repeat(12 * 1024));
    let raw = |name: &'static str, value: Vec<u8>| {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", f.mesh.addrs.data)).unwrap().connect_lazy();
        let svc = channel.map_request(move |mut req: http::Request<tonic::body::Body>| {
            req.headers_mut().insert(name, http::HeaderValue::from_bytes(&value).unwrap());
            req
        });
        tenantmesh_proto::data::v1::data_client::DataClient::new(svc)
    };
    let get = || GetItemRequest { collection: "notes".into(), id: "n1".into() };
    let code = |r: Result<tonic::Response<_>, tonic::Status>| r.unwrap_err().code();

    assert_eq!(code(raw("authorization", huge.into_bytes()).get_item(get()).await), Code::ResourceExhausted, "64 KB");
    assert_eq!(code(raw("authorization", large.into_bytes()).get_item(get()).await), Code::Unauthenticated, "12 KB");
    assert_eq!(code(raw("authorization", b"Bearer \xff\xfe".to_vec()).get_item(get()).await), Code::Unauthenticated);
    let mut tenant_header = raw("x-tenant-id", b"acme\xff".to_vec());
    assert_eq!(code(tenant_header.get_item(authed(get(), &f.acme.token)).await), Code::InvalidArgument);
    f.mesh.shutdown().await;
}
