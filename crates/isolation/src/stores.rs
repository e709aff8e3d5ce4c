//! A tenant's view of the data store, on either backend: on the embedded
//! store a [`ScopedTable`]; on DynamoDB a client whose credentials were
//! vended for the tenant's session policy and whose every request passes
//! the [`PolicyGuard`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tenantmesh_storage::{DynTable, DynamoTable, EmbeddedTable, StorageError};

use crate::aws::AwsSettings;
use crate::guard::PolicyGuard;
use crate::policy::{Placement, PolicyError, render, tenant_policy};
use crate::scoped::ScopedTable;
use crate::vend::{CredentialVendor, TenantCredentials};

/// Hands out tenant-confined tables, in the pooled table or a tenant's
/// dedicated one, and provisions and drops dedicated tables.
#[async_trait]
pub trait TenantStores: Send + Sync + 'static {
    /// `tenant_id`'s view of `table` (the pooled table or its dedicated one).
    async fn store_for(&self, tenant_id: &str, table: &str) -> Result<DynTable, PolicyError>;

    /// The pooled table's name.
    fn pooled_table(&self) -> &str;

    /// Creates the dedicated `table` of `tenant_id` (tagged with the tenant
    /// and `tier`); `Ok(false)` when it already existed.
    async fn provision(&self, tenant_id: &str, table: &str, tier: &str) -> Result<bool, StorageError>;

    /// Deletes the dedicated `table`; `Ok(false)` when it did not exist.
    async fn drop_table(&self, table: &str) -> Result<bool, StorageError>;
}

/// The dedicated table of a tenant under an isolation model (`bridge`,
/// `silo`): `<prefix>tenant-<tenant id>-<model>`.
pub fn dedicated_table(prefix: &str, tenant_id: &str, model: &str) -> String {
    format!("{prefix}tenant-{tenant_id}-{model}")
}

/// Whether `table` may hold `tenant_id`'s items: the pooled table or one of
/// the tenant's own dedicated tables (never another service's table).
pub fn table_allowed(stores: &dyn TenantStores, prefix: &str, tenant_id: &str, table: &str) -> bool {
    table == stores.pooled_table() || ["bridge", "silo"].iter().any(|m| table == dedicated_table(prefix, tenant_id, m))
}

/// Where a tenant's items live, as its placement says: the one reading of
/// a placement (`table`, `endpoint`; empty when unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location<'a> {
    /// At its own data-service instance (a silo tenant), in `table` there.
    Silo { endpoint: &'a str, table: &'a str },
    /// In `table` here: the pooled table or one of its dedicated tables.
    Here { table: &'a str },
}

/// Where `tenant_id`'s items live, from its placement's `table` and
/// `endpoint`: a table here must be one that may hold them
/// ([`table_allowed`]), else `None`. A silo instance's table is judged by
/// that instance.
pub fn locate<'a>(
    stores: &'a dyn TenantStores,
    prefix: &str,
    tenant_id: &str,
    table: &'a str,
    endpoint: &'a str,
) -> Option<Location<'a>> {
    let table = if table.is_empty() { stores.pooled_table() } else { table };
    if !endpoint.is_empty() {
        return Some(Location::Silo { endpoint, table });
    }
    table_allowed(stores, prefix, tenant_id, table).then_some(Location::Here { table })
}

/// Tenant stores built once and kept, for up to `capacity` tenants; a
/// tenant forgotten when full is rebuilt on its next request. Looked up
/// by borrowed names: a request allocates nothing here.
struct TenantCache {
    capacity: usize,
    /// tenant -> its views, one per table (a tenant uses one or two).
    tables: Mutex<HashMap<String, Vec<(String, DynTable)>>>,
}

impl TenantCache {
    fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), tables: Mutex::new(HashMap::new()) }
    }

    fn get_or_build(
        &self,
        tenant_id: &str,
        table: &str,
        build: impl FnOnce() -> Result<DynTable, PolicyError>,
    ) -> Result<DynTable, PolicyError> {
        let cached = |tables: &HashMap<String, Vec<(String, DynTable)>>| {
            tables.get(tenant_id)?.iter().find(|(t, _)| t == table).map(|(_, s)| s.clone())
        };
        if let Some(t) = cached(&self.tables.lock().expect("tenant cache lock")) {
            return Ok(t);
        }
        let built = build()?;
        let mut tables = self.tables.lock().expect("tenant cache lock");
        if let Some(t) = cached(&tables) {
            return Ok(t);
        }
        if tables.len() >= self.capacity
            && !tables.contains_key(tenant_id)
            && let Some(k) = tables.keys().next().cloned()
        {
            tables.remove(&k);
        }
        tables.entry(tenant_id.to_owned()).or_default().push((table.to_owned(), built.clone()));
        Ok(built)
    }

    /// Forgets every view of `table`.
    fn forget_table(&self, table: &str) {
        let mut tables = self.tables.lock().expect("tenant cache lock");
        tables.retain(|_, views| {
            views.retain(|(t, _)| t != table);
            !views.is_empty()
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tables.lock().expect("tenant cache lock").len()
    }
}

/// The embedded backend: the pooled table plus one redb file per dedicated
/// table under `<dir>`, every call policy-checked.
pub struct EmbeddedStores {
    pooled: DynTable,
    pooled_name: String,
    /// Shared by every pool tenant's view.
    pooled_placement: Arc<Placement>,
    /// Where dedicated tables live (`<data dir>/tables/<table>.redb`).
    dir: PathBuf,
    cache: TenantCache,
}

impl EmbeddedStores {
    /// `capacity` bounds how many tenants' scoped views are kept.
    pub fn new(pooled: DynTable, pooled_name: &str, dir: PathBuf, capacity: usize) -> Self {
        Self {
            pooled,
            pooled_name: pooled_name.to_owned(),
            pooled_placement: Arc::new(local_placement(pooled_name)),
            dir,
            cache: TenantCache::new(capacity),
        }
    }

    fn path(&self, table: &str) -> Result<PathBuf, StorageError> {
        // No leading dot either: such files are provisioning's temporaries.
        if !crate::policy::valid_table_name(table) || table.starts_with('.') {
            return Err(StorageError::Invalid(format!("table name {table:?}")));
        }
        Ok(self.dir.join(format!("{table}.redb")))
    }
}

fn local_placement(table: &str) -> Placement {
    Placement::new("local", "000000000000", table)
}

#[async_trait]
impl TenantStores for EmbeddedStores {
    async fn store_for(&self, tenant_id: &str, table: &str) -> Result<DynTable, PolicyError> {
        self.cache.get_or_build(tenant_id, table, || {
            let (inner, placement) = if table == self.pooled_name {
                (self.pooled.clone(), self.pooled_placement.clone())
            } else {
                let path = self.path(table).map_err(|_| PolicyError::InvalidTable(table.to_owned()))?;
                if !path.exists() {
                    // Never create a dedicated table by using it: that is provisioning's job.
                    return Err(PolicyError::NoSuchTable(table.to_owned()));
                }
                let inner = EmbeddedTable::open_process_shared(&path)
                    .map_err(|_| PolicyError::NoSuchTable(table.to_owned()))?;
                (inner, Arc::new(local_placement(table)))
            };
            Ok(Arc::new(ScopedTable::new(inner, tenant_id, placement)?) as DynTable)
        })
    }

    fn pooled_table(&self) -> &str {
        &self.pooled_name
    }

    async fn provision(&self, tenant_id: &str, table: &str, tier: &str) -> Result<bool, StorageError> {
        let path = self.path(table)?;
        if path.exists() {
            return Ok(false);
        }
        tenantmesh_storage::files::private_dir(&self.dir).map_err(|e| StorageError::Backend(e.to_string()))?;
        // Created under a temporary name and renamed: a crash leaves no half-made table.
        let tmp = self.dir.join(format!(".{table}.{}.tmp", std::process::id()));
        drop(EmbeddedTable::open(&tmp)?);
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::Backend(e.to_string()))?;
        tracing::info!(table, tenant_id, tier, "provisioned a dedicated embedded table");
        Ok(true)
    }

    async fn drop_table(&self, table: &str) -> Result<bool, StorageError> {
        let path = self.path(table)?;
        self.cache.forget_table(table);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(table, "dropped a dedicated embedded table");
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StorageError::Backend(e.to_string())),
        }
    }
}

/// DynamoDB: one client per (tenant, table) (bounded cache), built on
/// vended credentials and guarded.
pub struct DynamoStores {
    aws: AwsSettings,
    vendor: Arc<CredentialVendor>,
    region: String,
    account: String,
    pooled_name: String,
    /// One client per (tenant, table); the vendor's credential cache still
    /// saves the STS call when a forgotten client is rebuilt.
    clients: TenantCache,
}

impl DynamoStores {
    pub fn new(aws: AwsSettings, vendor: Arc<CredentialVendor>, pooled: Placement, capacity: usize) -> Self {
        Self {
            aws,
            vendor,
            region: pooled.region,
            account: pooled.account,
            pooled_name: pooled.table,
            clients: TenantCache::new(capacity),
        }
    }

    /// A tenant's table without the client cache (tests use it to aim a
    /// scoped client at any key).
    pub fn build(&self, tenant_id: &str, table: &str) -> Result<DynTable, PolicyError> {
        let placement = Placement::new(&self.region, &self.account, table);
        let policy = Arc::new(tenant_policy(tenant_id, &placement)?);
        let credentials = TenantCredentials {
            vendor: self.vendor.clone(),
            tenant_id: tenant_id.to_owned(),
            policy: Arc::from(render(&policy)?),
        };
        let guard = PolicyGuard::new(tenant_id, policy, placement.clone());
        let config = self.aws.dynamodb_config().credentials_provider(credentials).interceptor(guard).build();
        Ok(Arc::new(DynamoTable::new(aws_sdk_dynamodb::Client::from_conf(config), &placement.table)))
    }
}

#[async_trait]
impl TenantStores for DynamoStores {
    async fn store_for(&self, tenant_id: &str, table: &str) -> Result<DynTable, PolicyError> {
        self.clients.get_or_build(tenant_id, table, || self.build(tenant_id, table))
    }

    fn pooled_table(&self) -> &str {
        &self.pooled_name
    }

    async fn provision(&self, tenant_id: &str, table: &str, tier: &str) -> Result<bool, StorageError> {
        let tags = [("tenantId", tenant_id), ("tier", tier)];
        DynamoTable::provision_table(&self.aws.dynamodb(), table, &tags).await
    }

    async fn drop_table(&self, table: &str) -> Result<bool, StorageError> {
        self.clients.forget_table(table);
        DynamoTable::drop_table(&self.aws.dynamodb(), table).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tenant's view is built once, the cache stays bounded, and
    /// dedicated tables exist only once provisioned.
    #[tokio::test]
    async fn tenant_views_are_built_once_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("t.redb")).unwrap();
        let stores = EmbeddedStores::new(table, "data", dir.path().join("tables"), 2);
        let a1 = stores.store_for("acme", "data").await.unwrap();
        let a2 = stores.store_for("acme", "data").await.unwrap();
        assert!(Arc::ptr_eq(&a1, &a2), "rebuilt on the second request");
        for t in ["globex", "initech", "umbrella"] {
            stores.store_for(t, "data").await.unwrap();
        }
        assert!(stores.cache.len() <= 2);
        assert!(matches!(stores.store_for("Bad*", "data").await, Err(PolicyError::UnsafeTenantId(_))));

        let own = dedicated_table("tm-", "acme", "bridge");
        assert!(matches!(stores.store_for("acme", &own).await, Err(PolicyError::NoSuchTable(_))));
        assert!(stores.provision("acme", &own, "premium").await.unwrap());
        assert!(!stores.provision("acme", &own, "premium").await.unwrap(), "provisioned twice");
        let t = stores.store_for("acme", &own).await.unwrap();
        t.put("acme", "notes#1", b"x".to_vec(), tenantmesh_storage::Condition::None).await.unwrap();
        // Policy-confined in the dedicated table too.
        let err = t.put("globex", "notes#1", b"x".to_vec(), tenantmesh_storage::Condition::None).await.unwrap_err();
        assert!(matches!(err, StorageError::AccessDenied { .. }), "{err:?}");
        assert!(stores.drop_table(&own).await.unwrap());
        assert!(!stores.drop_table(&own).await.unwrap());
        assert!(matches!(stores.store_for("acme", &own).await, Err(PolicyError::NoSuchTable(_))));
        assert!(stores.provision("acme", "../etc", "premium").await.is_err());
    }

    /// A placement read one way everywhere: no table is the pooled one, an
    /// endpoint is a silo instance, and a table here must be the tenant's.
    #[test]
    fn placements_locate_the_tenants_items() {
        let dir = tempfile::tempdir().unwrap();
        let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("t.redb")).unwrap();
        let stores = EmbeddedStores::new(table, "data", dir.path().join("tables"), 2);
        let own = dedicated_table("tm-", "acme", "silo");
        assert_eq!(locate(&stores, "tm-", "acme", "", ""), Some(Location::Here { table: "data" }));
        assert_eq!(locate(&stores, "tm-", "acme", &own, ""), Some(Location::Here { table: &own }));
        assert_eq!(
            locate(&stores, "tm-", "acme", &own, "http://acme:1"),
            Some(Location::Silo { endpoint: "http://acme:1", table: &own })
        );
        let theirs = dedicated_table("tm-", "globex", "silo");
        assert_eq!(locate(&stores, "tm-", "acme", &theirs, ""), None, "another tenant's table");
        assert_eq!(locate(&stores, "tm-", "acme", "tm-auth", ""), None, "another service's table");
    }
}
