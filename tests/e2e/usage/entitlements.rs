//! What a tier's plan includes (`[tier.entitlements]` in the tiers file),
//! enforced where each feature is used: a tier without `restore`, `export`
//! or `external_idp` is refused those (PERMISSION_DENIED, `ErrorInfo`
//! naming the feature), and one with `max_users` (`max_items`) stops creating users (items) there
//! (RESOURCE_EXHAUSTED, `QuotaFailure`); another tier is untouched; the
//! operator's overrides for one tenant take effect in every service at
//! once, and `GetEntitlements` says what the tenant has and uses.

use tenantmesh_proto::auth::v1::{CreateUserRequest, EntitlementSource, GetEntitlementsRequest, Role};
use tenantmesh_proto::onboarding::v1::{RestoreTarget, RestoreTenantRequest};
use tenantmesh_proto::registry::v1::{
    EntitlementOverride, IdentityProvider, SetEntitlementOverrideRequest, SetIdentityProviderRequest,
};
use tenantmesh_test_support::*;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn each_feature_is_enforced_where_it_is_used() {
    let tiers = std::fs::read_to_string(test_tiers_file()).unwrap();
    let standard = tiers.find("[[tier]]\nname = \"standard\"").unwrap();
    let plan =
        "[tier.entitlements]\nrestore = false\nexport = false\nexternal_idp = false\nmax_users = 2\nmax_items = 2\n\n";
    let tiers = format!("{}{plan}{}", &tiers[..standard], &tiers[standard..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiers.toml");
    std::fs::write(&path, tiers).unwrap();
    let mesh =
        TestMesh::start_with_env(TestBackend::from_env(), &[("TENANTMESH_TIERS_FILE", path.to_str().unwrap())]).await;
    let admin = mesh.admin_token().await;
    let basic = mesh.onboard_on(&unique_tenant("plan-basic"), "basic").await;
    let standard = mesh.onboard(&unique_tenant("plan-standard")).await;

    let feature = |s: &tonic::Status| s.get_error_details().error_info().map(|i| i.metadata["feature"].clone());
    // Users: its admin and one more; a third is refused, with the quota named.
    let user = |tenant: &TestTenant, n: u32| CreateUserRequest {
        tenant_id: tenant.tenant_id.clone(),
        email: format!("user{n}@{}.example", tenant.tenant_id),
        password: "a-user-password-123".into(),
        roles: vec![Role::TenantUser as i32],
        ..Default::default()
    };
    mesh.auth().create_user(authed(user(&basic, 1), &basic.token)).await.unwrap();
    let full =
        expect_code(mesh.auth().create_user(authed(user(&basic, 2), &basic.token)).await, Code::ResourceExhausted);
    assert_eq!(feature(&full).as_deref(), Some("max_users"), "{full:?}");
    let quota = full.get_error_details().quota_failure().cloned().unwrap();
    assert_eq!(quota.violations[0].subject, format!("tenant:{}", basic.tenant_id));
    // The platform admin is held to the plan too.
    expect_code(mesh.auth().create_user(authed(user(&basic, 3), &admin)).await, Code::ResourceExhausted);
    // Another tier's plan: no cap.
    for n in 1..=3 {
        mesh.auth().create_user(authed(user(&standard, n), &standard.token)).await.unwrap();
    }

    // Items: two; a third new one is refused, naming the feature; an
    // overwrite is not; the other tier writes on.
    for id in ["a", "b", "a"] {
        mesh.data().put_item(authed(put_v(id, "v"), &basic.token)).await.unwrap();
    }
    let full = expect_code(mesh.data().put_item(authed(put_v("c", "v"), &basic.token)).await, Code::ResourceExhausted);
    assert_eq!(feature(&full).as_deref(), Some("max_items"), "{full:?}");
    assert_eq!(full.get_error_details().quota_failure().unwrap().violations[0].description, "max_items 2");
    for id in ["a", "b", "c"] {
        mesh.data().put_item(authed(put_v(id, "v"), &standard.token)).await.unwrap();
    }

    // Restores and exports: refused on basic, for the operator as well.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let restore = |tenant: &str, target: RestoreTarget| RestoreTenantRequest {
        tenant_id: tenant.into(),
        point_in_time: Some(prost_types::Timestamp { seconds: now - 1, nanos: 0 }),
        target: target as i32,
    };
    for target in [RestoreTarget::InPlace, RestoreTarget::Export] {
        let refused = mesh.onboarding().restore_tenant(authed(restore(&basic.tenant_id, target), &admin)).await;
        let refused = expect_code(refused, Code::PermissionDenied);
        assert_eq!(feature(&refused).as_deref(), Some("restore"), "{refused:?}");
    }
    // Its own identity provider: refused on basic.
    let idp = IdentityProvider {
        issuer: "https://idp.example/pool".into(),
        jwks_url: "https://idp.example/pool/.well-known/jwks.json".into(),
        audience: "app-client".into(),
        tenant_claim: "custom:tenant_id".into(),
    };
    let bind = SetIdentityProviderRequest { tenant_id: basic.tenant_id.clone(), identity_provider: Some(idp.clone()) };
    let refused =
        expect_code(mesh.registry().set_identity_provider(authed(bind, &admin)).await, Code::PermissionDenied);
    assert_eq!(feature(&refused).as_deref(), Some("external_idp"), "{refused:?}");
    let bind = SetIdentityProviderRequest { tenant_id: standard.tenant_id.clone(), identity_provider: Some(idp) };
    mesh.registry().set_identity_provider(authed(bind, &admin)).await.unwrap();

    // The operator's overrides for the basic tenant: they take effect at
    // once in every service (the registry's watch), without a restart.
    let set = |feature: &str, granted: Option<bool>, limit: Option<u64>| SetEntitlementOverrideRequest {
        tenant_id: basic.tenant_id.clone(),
        r#override: Some(EntitlementOverride { feature: feature.into(), granted, limit, hard: None }),
        clear: false,
    };
    for o in [
        set("max_users", None, Some(3)),
        set("restore", Some(true), None),
        set("export", Some(true), None),
        set("max_items", None, Some(3)),
    ] {
        mesh.registry().set_entitlement_override(authed(o, &admin)).await.unwrap();
    }
    eventually(std::time::Duration::from_secs(10), || {
        let (mut auth, req) = (mesh.auth(), authed(user(&basic, 2), &basic.token));
        async move { auth.create_user(req).await.is_ok() }
    })
    .await;
    expect_code(mesh.auth().create_user(authed(user(&basic, 3), &basic.token)).await, Code::ResourceExhausted);
    eventually(std::time::Duration::from_secs(10), || {
        let (mut data, req) = (mesh.data(), authed(put_v("c", "v"), &basic.token));
        async move { data.put_item(req).await.is_ok() }
    })
    .await;
    let listed = GetEntitlementsRequest { tenant_id: basic.tenant_id.clone() };
    let listed = mesh.auth().get_entitlements(authed(listed, &basic.token)).await.unwrap().into_inner().entitlements;
    let users = listed.iter().find(|e| e.feature == "max_users").unwrap();
    assert_eq!((users.granted, users.limit, users.used), (false, Some(3), Some(3)), "full: {users:?}");
    assert_eq!(users.source(), EntitlementSource::Override);
    let items = listed.iter().find(|e| e.feature == "max_items").unwrap();
    assert_eq!((items.limit, items.source()), (Some(3), EntitlementSource::Override), "{items:?}");
    let idp = listed.iter().find(|e| e.feature == "external_idp").unwrap();
    assert_eq!((idp.granted, idp.source()), (false, EntitlementSource::Tier));
    // A restore into an export is now the tenant's to have.
    let id = mesh.onboarding().restore_tenant(authed(restore(&basic.tenant_id, RestoreTarget::Export), &admin)).await;
    let id = id.unwrap().into_inner().workflow_id;
    mesh.wait_workflow(&id).await;
}
