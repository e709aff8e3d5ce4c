//! A tenant's view of the data store, on either backend: on the embedded
//! store a [`ScopedTable`]; on DynamoDB a client whose credentials were
//! vended for the tenant's session policy and whose every request passes
//! the [`PolicyGuard`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tenantmesh_storage::{DynTable, DynamoTable};

use crate::aws::AwsSettings;
use crate::guard::PolicyGuard;
use crate::policy::{Placement, PolicyError, render, tenant_policy};
use crate::scoped::ScopedTable;
use crate::vend::{CredentialVendor, TenantCredentials};

/// Hands out tenant-confined tables.
#[async_trait]
pub trait TenantStores: Send + Sync + 'static {
    async fn store_for(&self, tenant_id: &str) -> Result<DynTable, PolicyError>;
}

/// Tenant stores built once and kept, up to `capacity` tenants; a tenant
/// forgotten when full is rebuilt on its next request.
struct TenantCache {
    capacity: usize,
    tables: Mutex<HashMap<String, DynTable>>,
}

impl TenantCache {
    fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), tables: Mutex::new(HashMap::new()) }
    }

    fn get_or_build(
        &self,
        tenant_id: &str,
        build: impl FnOnce() -> Result<DynTable, PolicyError>,
    ) -> Result<DynTable, PolicyError> {
        if let Some(t) = self.tables.lock().expect("tenant cache lock").get(tenant_id) {
            return Ok(t.clone());
        }
        let table = build()?;
        let mut tables = self.tables.lock().expect("tenant cache lock");
        if tables.len() >= self.capacity
            && let Some(k) = tables.keys().next().cloned()
        {
            tables.remove(&k);
        }
        Ok(tables.entry(tenant_id.to_owned()).or_insert(table).clone())
    }
}

/// The embedded backend: one shared table, every call policy-checked.
pub struct EmbeddedStores {
    table: DynTable,
    placement: Placement,
    cache: TenantCache,
}

impl EmbeddedStores {
    /// `capacity` bounds how many tenants' scoped views are kept.
    pub fn new(table: DynTable, placement: Placement, capacity: usize) -> Self {
        Self { table, placement, cache: TenantCache::new(capacity) }
    }
}

#[async_trait]
impl TenantStores for EmbeddedStores {
    async fn store_for(&self, tenant_id: &str) -> Result<DynTable, PolicyError> {
        self.cache.get_or_build(tenant_id, || {
            Ok(Arc::new(ScopedTable::new(self.table.clone(), tenant_id, &self.placement)?) as DynTable)
        })
    }
}

/// DynamoDB: one client per tenant (bounded cache), built on vended
/// credentials and guarded.
pub struct DynamoStores {
    aws: AwsSettings,
    vendor: Arc<CredentialVendor>,
    placement: Placement,
    /// One client per tenant; the vendor's credential cache still saves the
    /// STS call when a forgotten tenant's client is rebuilt.
    clients: TenantCache,
}

impl DynamoStores {
    pub fn new(aws: AwsSettings, vendor: Arc<CredentialVendor>, placement: Placement, capacity: usize) -> Self {
        Self { aws, vendor, placement, clients: TenantCache::new(capacity) }
    }

    /// A tenant's table without the client cache (tests use it to aim a
    /// scoped client at any key).
    pub fn build(&self, tenant_id: &str) -> Result<DynTable, PolicyError> {
        let policy = Arc::new(tenant_policy(tenant_id, &self.placement)?);
        let credentials = TenantCredentials {
            vendor: self.vendor.clone(),
            tenant_id: tenant_id.to_owned(),
            policy: Arc::from(render(&policy)?),
        };
        let guard = PolicyGuard::new(tenant_id, policy, self.placement.clone());
        let config = self.aws.dynamodb_config().credentials_provider(credentials).interceptor(guard).build();
        Ok(Arc::new(DynamoTable::new(aws_sdk_dynamodb::Client::from_conf(config), &self.placement.table)))
    }
}

#[async_trait]
impl TenantStores for DynamoStores {
    async fn store_for(&self, tenant_id: &str) -> Result<DynTable, PolicyError> {
        self.clients.get_or_build(tenant_id, || self.build(tenant_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tenant's view is built once, and the cache stays bounded.
    #[tokio::test]
    async fn tenant_views_are_built_once_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let table = tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("t.redb")).unwrap();
        let stores = EmbeddedStores::new(table, Placement::new("local", "000000000000", "data"), 2);
        let a1 = stores.store_for("acme").await.unwrap();
        let a2 = stores.store_for("acme").await.unwrap();
        assert!(Arc::ptr_eq(&a1, &a2), "rebuilt on the second request");
        for t in ["globex", "initech", "umbrella"] {
            stores.store_for(t).await.unwrap();
        }
        assert!(stores.cache.tables.lock().unwrap().len() <= 2);
        assert!(matches!(stores.store_for("Bad*").await, Err(PolicyError::UnsafeTenantId(_))));
    }
}
