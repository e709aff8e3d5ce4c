//! The storage contract, unchanged, on both backends (DynamoDB on the moto
//! emulator), and runtime isolation on the DynamoDB path: a tenant's
//! guarded client refuses another tenant's keys before anything is sent.

use std::sync::Arc;

use tenantmesh_isolation::aws::AwsSettings;
use tenantmesh_isolation::vend::CredentialVendor;
use tenantmesh_isolation::{DynamoStores, Placement};
use tenantmesh_storage::{Condition, DynamoTable, EmbeddedTable, Query, StorageError, Table, Write, contract};
use tenantmesh_test_support::moto::Moto;

/// The embedded backend meets the storage contract.
#[tokio::test]
async fn embedded_backend_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract::run_all(&EmbeddedTable::open(dir.path().join("c.redb")).unwrap()).await;
}

/// The DynamoDB backend meets the same contract, on the emulator.
#[tokio::test]
async fn dynamodb_backend_meets_the_contract() {
    let moto = Moto::start();
    let aws = AwsSettings::from_env(&moto.env()).await;
    DynamoTable::ensure_table(&aws.dynamodb(), "contract").await.unwrap();
    contract::run_all(&DynamoTable::new(aws.dynamodb(), "contract")).await;
}

fn denied<T: std::fmt::Debug>(r: Result<T, StorageError>) {
    assert!(matches!(r, Err(StorageError::AccessDenied { ref key, .. }) if key == "globex"), "{r:?}");
}

/// A tenant's scoped DynamoDB client, asked for another tenant's key (as a
/// bug above it would), is refused by the guard for every kind of call;
/// the emulator — which enforces no policy — never sees the request.
#[tokio::test]
async fn guard_refuses_another_tenants_key_on_dynamodb() {
    let moto = Moto::start();
    let aws = AwsSettings::from_env(&moto.env()).await;
    DynamoTable::ensure_table(&aws.dynamodb(), "pool").await.unwrap();
    let service = DynamoTable::new(aws.dynamodb(), "pool");
    service.put("globex", "notes#1", b"secret".to_vec(), Condition::None).await.unwrap();

    let vendor = Arc::new(CredentialVendor::new(aws.sts(), "arn:aws:iam::123456789012:role/tenant-access", 100));
    let stores = DynamoStores::new(aws.clone(), vendor, Placement::new("us-east-1", "123456789012", "pool"), 100);
    let acme = stores.build("acme", "pool").unwrap();

    denied(acme.get("globex", "notes#1").await);
    denied(acme.put("globex", "notes#1", b"overwrite".to_vec(), Condition::None).await);
    denied(acme.delete("globex", "notes#1", Condition::None).await);
    denied(acme.query(Query { pk: "globex".into(), sk_prefix: String::new(), start_after: None, limit: 10 }).await);
    denied(
        acme.transact_write(vec![
            Write::Put { pk: "acme".into(), sk: "a".into(), data: vec![], condition: Condition::None },
            Write::Delete { pk: "globex".into(), sk: "notes#1".into(), condition: Condition::None },
        ])
        .await,
    );
    let kept = service.get("globex", "notes#1").await.unwrap().unwrap();
    assert_eq!((kept.version, kept.data.as_slice()), (1, b"secret".as_slice()));
    assert!(service.get("acme", "a").await.unwrap().is_none(), "a refused transaction applied a write");

    // The tenant's own partition works through the same client.
    acme.put("acme", "notes#1", b"mine".to_vec(), Condition::NotExists).await.unwrap();
    let page = acme.query(Query { pk: "acme".into(), sk_prefix: "notes#".into(), start_after: None, limit: 10 }).await;
    assert_eq!(page.unwrap().items.len(), 1);
}

/// The DynamoDB provisioner creates a tenant's dedicated table once, tagged
/// with the tenant and tier, point-in-time recovery on, ACTIVE; a tenant's
/// client for it cannot reach another table; dropping it is idempotent.
#[tokio::test]
async fn dynamodb_provisioner_is_idempotent_and_tags_the_table() {
    use tenantmesh_isolation::TenantStores;
    let moto = Moto::start();
    let aws = AwsSettings::from_env(&moto.env()).await;
    let client = aws.dynamodb();
    DynamoTable::ensure_table(&client, "pool").await.unwrap();
    let vendor = Arc::new(CredentialVendor::new(aws.sts(), "arn:aws:iam::123456789012:role/tenant-access", 100));
    let stores = DynamoStores::new(aws.clone(), vendor, Placement::new("us-east-1", "123456789012", "pool"), 100);
    let table = "tm-tenant-acme-bridge";
    assert!(stores.provision("acme", table, "premium").await.unwrap());
    assert!(!stores.provision("acme", table, "premium").await.unwrap(), "second provisioning created a table");
    let names = client.list_tables().send().await.unwrap().table_names().to_vec();
    assert_eq!(names.iter().filter(|n| n.as_str() == table).count(), 1, "{names:?}");
    let described = client.describe_table().table_name(table).send().await.unwrap();
    let arn = described.table().and_then(|t| t.table_arn()).unwrap().to_owned();
    let tags = client.list_tags_of_resource().resource_arn(&arn).send().await.unwrap();
    let tags: Vec<(String, String)> = tags.tags().iter().map(|t| (t.key().to_owned(), t.value().to_owned())).collect();
    assert!(tags.contains(&("tenantId".into(), "acme".into())) && tags.contains(&("tier".into(), "premium".into())));
    let backups = client.describe_continuous_backups().table_name(table).send().await.unwrap();
    let pitr = backups
        .continuous_backups_description()
        .and_then(|d| d.point_in_time_recovery_description())
        .and_then(|p| p.point_in_time_recovery_status())
        .map(|s| s.as_str().to_owned());
    assert_eq!(pitr.as_deref(), Some("ENABLED"));

    let own = stores.store_for("acme", table).await.unwrap();
    own.put("acme", "notes#1", b"x".to_vec(), Condition::None).await.unwrap();
    denied(own.put("globex", "notes#1", b"x".to_vec(), Condition::None).await);
    assert!(stores.drop_table(table).await.unwrap());
    assert!(!stores.drop_table(table).await.unwrap());
    let names = client.list_tables().send().await.unwrap().table_names().to_vec();
    assert!(!names.iter().any(|n| n == table), "{names:?}");
}

/// AWS out of reach is a backend failure (UNAVAILABLE to clients, after the
/// SDK's retries), never an internal error or a hang.
#[tokio::test]
async fn unreachable_dynamodb_is_a_backend_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env: std::collections::HashMap<String, String> = [
        ("AWS_ENDPOINT_URL_DYNAMODB", format!("http://127.0.0.1:{dead}")),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "x".into()),
        ("AWS_SECRET_ACCESS_KEY", "x".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let aws = AwsSettings::from_env(&env).await;
    let table = DynamoTable::new(aws.dynamodb(), "t");
    let err = table.get("acme", "x").await.unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
}
