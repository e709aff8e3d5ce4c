//! External identity providers: a tenant bound to an OIDC provider accepts
//! that provider's tokens — for itself only. The provider's JWKS is served
//! over HTTP on loopback by this test (counting fetches), its keys are
//! ES256 as Cognito-style providers use.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tenantmesh_proto::data::v1::{GetItemRequest, PutItemRequest};
use tenantmesh_proto::registry::v1::{IdentityProvider, SetIdentityProviderRequest};
use tenantmesh_test_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A fake provider: an ES256 key and a JWKS endpoint.
struct Idp {
    issuer: String,
    jwks_url: String,
    key: EncodingKey,
    fetches: Arc<AtomicUsize>,
}

fn es256_key() -> (EncodingKey, Value) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                     "y": URL_SAFE_NO_PAD.encode(&point[33..65]), "kid": "idp-key-1", "alg": "ES256", "use": "sig"});
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

async fn start_idp() -> Idp {
    let (key, jwk) = es256_key();
    let body = json!({"keys": [jwk]}).to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (body, counter) = (body.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                counter.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    Idp { issuer: format!("http://{addr}"), jwks_url: format!("http://{addr}/.well-known/jwks.json"), key, fetches }
}

impl Idp {
    fn binding(&self) -> IdentityProvider {
        IdentityProvider {
            issuer: self.issuer.clone(),
            jwks_url: self.jwks_url.clone(),
            audience: "app-client".into(),
            tenant_claim: "custom:tenant_id".into(),
        }
    }

    fn claims(&self, tenant: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": self.issuer, "aud": "app-client", "sub": "user-42", "custom:tenant_id": tenant,
               "exp": now + 600, "iat": now, "token_use": "id"})
    }

    fn token(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

fn as_tenant<T>(msg: T, token: &str, tenant: Option<&str>) -> tonic::Request<T> {
    let mut req = authed(msg, token);
    if let Some(t) = tenant {
        req.metadata_mut().insert("x-tenant-id", t.parse().unwrap());
    }
    req
}

/// A user of acme's provider reads and writes acme's items (as a tenant
/// user); its token is refused for any other tenant, without naming the
/// tenant, with a wrong audience, after expiry, or once the binding is
/// removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_tenants_provider_work_for_that_tenant_only() {
    let mesh = TestMesh::start().await;
    let idp = start_idp().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let globex = mesh.onboard(&unique_tenant("globex")).await;
    let admin = mesh.admin_token().await;
    let bind = |tenant: &str, p: Option<IdentityProvider>| SetIdentityProviderRequest {
        tenant_id: tenant.into(),
        identity_provider: p,
    };
    let bound = mesh
        .registry()
        .set_identity_provider(authed(bind(&acme.tenant_id, Some(idp.binding())), &admin))
        .await
        .unwrap();
    assert_eq!(bound.into_inner().tenant.unwrap().identity_provider, Some(idp.binding()));

    let token = idp.token(&idp.claims(&acme.tenant_id), "idp-key-1");
    let put = PutItemRequest {
        collection: "c".into(),
        id: "from-idp".into(),
        attributes: Some(attrs(&[("by", "idp")])),
        expected_version: None,
    };
    mesh.data().put_item(as_tenant(put, &token, Some(&acme.tenant_id))).await.unwrap();
    // It landed in acme's partition: acme's own admin sees it.
    let get = || GetItemRequest { collection: "c".into(), id: "from-idp".into() };
    mesh.data().get_item(authed(get(), &acme.token)).await.unwrap();
    // External users are tenant users: no user management.
    let list = tenantmesh_proto::auth::v1::ListUsersRequest { tenant_id: acme.tenant_id.clone(), ..Default::default() };
    let denied = mesh.auth().list_users(as_tenant(list, &token, Some(&acme.tenant_id))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let code = |r: Result<tonic::Response<_>, tonic::Status>| r.unwrap_err().code();
    // Tenant A's provider presented for tenant B, either way round.
    assert_eq!(
        code(mesh.data().get_item(as_tenant(get(), &token, Some(&globex.tenant_id))).await),
        Code::Unauthenticated
    );
    let for_globex = idp.token(&idp.claims(&globex.tenant_id), "idp-key-1");
    assert_eq!(
        code(mesh.data().get_item(as_tenant(get(), &for_globex, Some(&globex.tenant_id))).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(mesh.data().get_item(as_tenant(get(), &for_globex, Some(&acme.tenant_id))).await),
        Code::Unauthenticated
    );
    // Without naming the tenant, with a wrong audience, expired, or another key.
    assert_eq!(code(mesh.data().get_item(as_tenant(get(), &token, None)).await), Code::Unauthenticated);
    let mut wrong_aud = idp.claims(&acme.tenant_id);
    wrong_aud["aud"] = json!("other-app");
    let mut expired = idp.claims(&acme.tenant_id);
    expired["exp"] = json!(jsonwebtoken::get_current_timestamp() - 3600);
    let (other_key, _) = es256_key();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("idp-key-1".into());
    let forged = jsonwebtoken::encode(&header, &idp.claims(&acme.tenant_id), &other_key).unwrap();
    for (name, t) in
        [("aud", idp.token(&wrong_aud, "idp-key-1")), ("exp", idp.token(&expired, "idp-key-1")), ("forged", forged)]
    {
        assert_eq!(
            code(mesh.data().get_item(as_tenant(get(), &t, Some(&acme.tenant_id))).await),
            Code::Unauthenticated,
            "{name}"
        );
    }

    // A flood of unknown kids does not hammer the provider's JWKS endpoint.
    let before = idp.fetches.load(Ordering::SeqCst);
    for i in 0..30 {
        let junk = idp.token(&idp.claims(&acme.tenant_id), &format!("junk-{i}"));
        assert_eq!(
            code(mesh.data().get_item(as_tenant(get(), &junk, Some(&acme.tenant_id))).await),
            Code::Unauthenticated
        );
    }
    let fetched = idp.fetches.load(Ordering::SeqCst) - before;
    assert!(fetched <= 6, "30 junk kids caused {fetched} JWKS fetches");

    // Unbinding stops the provider's tokens.
    mesh.registry().set_identity_provider(authed(bind(&acme.tenant_id, None), &admin)).await.unwrap();
    eventually(std::time::Duration::from_secs(5), || {
        let mut data = mesh.data();
        let req = as_tenant(get(), &token, Some(&acme.tenant_id));
        async move { matches!(data.get_item(req).await, Err(s) if s.code() == Code::Unauthenticated) }
    })
    .await;
    mesh.shutdown().await;
}

/// Binding requests are validated field by field and restricted to
/// platform callers; the platform tenant cannot be bound.
#[tokio::test]
async fn binding_rules() {
    let mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let admin = mesh.admin_token().await;
    let ok = IdentityProvider {
        issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Example".into(),
        jwks_url: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Example/.well-known/jwks.json".into(),
        audience: "app-client".into(),
        tenant_claim: "custom:tenant_id".into(),
    };
    let req = |tenant: &str, p: IdentityProvider| SetIdentityProviderRequest {
        tenant_id: tenant.into(),
        identity_provider: Some(p),
    };
    let mut reg = mesh.registry();
    reg.set_identity_provider(authed(req(&acme.tenant_id, ok.clone()), &admin)).await.unwrap();
    let cases: Vec<(&str, IdentityProvider)> = vec![
        ("identity_provider.jwks_url", IdentityProvider { jwks_url: "http://idp.example/jwks".into(), ..ok.clone() }),
        ("identity_provider.issuer", IdentityProvider { issuer: "tenantmesh-auth".into(), ..ok.clone() }),
        ("identity_provider.issuer", IdentityProvider { issuer: String::new(), ..ok.clone() }),
        ("identity_provider.audience", IdentityProvider { audience: String::new(), ..ok.clone() }),
        ("identity_provider.tenant_claim", IdentityProvider { tenant_claim: String::new(), ..ok.clone() }),
    ];
    for (field, p) in cases {
        expect_invalid(reg.set_identity_provider(authed(req(&acme.tenant_id, p), &admin)).await, field);
    }
    expect_code(reg.set_identity_provider(authed(req("platform", ok.clone()), &admin)).await, Code::FailedPrecondition);
    expect_code(
        reg.set_identity_provider(authed(req(&acme.tenant_id, ok.clone()), &acme.token)).await,
        Code::PermissionDenied,
    );
    expect_code(reg.set_identity_provider(authed(req(&unique_tenant("ghost"), ok), &admin)).await, Code::NotFound);
    mesh.shutdown().await;
}

/// Without the operator's `TENANTMESH_JWKS_ALLOW_PRIVATE`, a provider's
/// JWKS URL may not point at loopback, private or link-local addresses
/// (the cloud metadata service included): refused when bound, and refused
/// at fetch time for a binding made while it was allowed (nothing is
/// fetched from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_urls_on_private_networks_are_refused() {
    let mesh = TestMesh::start().await;
    let idp = start_idp().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let admin = mesh.admin_token().await;
    let bind = |p: IdentityProvider| SetIdentityProviderRequest {
        tenant_id: acme.tenant_id.clone(),
        identity_provider: Some(p),
    };
    // Allowed here (the test meshes allow loopback): bound, and it works.
    mesh.registry().set_identity_provider(authed(bind(idp.binding()), &admin)).await.unwrap();
    let token = idp.token(&idp.claims(&acme.tenant_id), "idp-key-1");
    let get = || GetItemRequest { collection: "c".into(), id: "x".into() };
    expect_code(mesh.data().get_item(as_tenant(get(), &token, Some(&acme.tenant_id))).await, Code::NotFound);

    let mut state = mesh.stop().await;
    state.set_env("TENANTMESH_JWKS_ALLOW_PRIVATE", Some("false"));
    let mesh = TestMesh::start_on(state).await;
    let admin = mesh.admin_token().await;
    for url in [
        idp.jwks_url.clone(),
        "https://127.0.0.1/jwks".into(),
        "https://169.254.169.254/latest/meta-data/iam".into(),
        "https://10.0.0.8/jwks".into(),
        "https://[::1]/jwks".into(),
        "https://localhost/jwks".into(),
    ] {
        let p = IdentityProvider { jwks_url: url.clone(), ..idp.binding() };
        let refused = mesh.registry().set_identity_provider(authed(bind(p), &admin)).await;
        expect_invalid(refused, "identity_provider.jwks_url");
    }
    let fetched = idp.fetches.load(Ordering::SeqCst);
    let refused = mesh.data().get_item(as_tenant(get(), &token, Some(&acme.tenant_id))).await.unwrap_err();
    assert!(matches!(refused.code(), Code::Unavailable | Code::Unauthenticated), "{refused:?}");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), fetched, "the private provider was fetched");
    mesh.shutdown().await;
}
