//! A flood of tokens with unknown `kid`s cannot hammer the auth service:
//! validators refresh the JWKS on an unknown kid at most once per interval.
//! Needs a process of its own (nextest gives one per test): it reads a
//! process-wide counter.

use jsonwebtoken::{Algorithm, Header};
use serde_json::json;
use tenantmesh_proto::data::v1::GetItemRequest;
use tenantmesh_test_support::*;
use tonic::Code;

/// 100 requests with distinct junk kids (properly signed, so only the kid
/// is wrong) are all UNAUTHENTICATED and cost the auth service at most a
/// handful of JWKS requests.
#[tokio::test]
async fn junk_kids_do_not_hammer_the_auth_service() {
    let mut mesh = TestMesh::start().await;
    let acme = mesh.onboard(&unique_tenant("acme")).await;
    let (_, key) = mesh.signing_key().await;
    // Warm the data service's key cache with a valid token.
    let get = || GetItemRequest { collection: "c".into(), id: "1".into() };
    expect_code(mesh.data().get_item(authed(get(), &acme.token)).await, Code::NotFound);

    let before = tenantmesh_auth::jwks_requests();
    let now = jsonwebtoken::get_current_timestamp();
    for i in 0..100 {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(format!("junk-{i}"));
        let claims = json!({"iss": "tenantmesh-auth", "aud": "tenantmesh", "sub": "x", "tenant_id": acme.tenant_id,
                            "roles": ["tenant_admin"], "exp": now + 600, "nbf": now, "iat": now, "jti": "j"});
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        expect_code(mesh.data().get_item(authed(get(), &token)).await, Code::Unauthenticated);
    }
    let requests = tenantmesh_auth::jwks_requests() - before;
    assert!(requests <= 5, "100 junk kids caused {requests} JWKS requests");
    mesh.shutdown().await;
}
