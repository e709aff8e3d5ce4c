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

/// The embedded backend: one shared table, every call policy-checked.
pub struct EmbeddedStores {
    pub table: DynTable,
    pub placement: Placement,
}

#[async_trait]
impl TenantStores for EmbeddedStores {
    async fn store_for(&self, tenant_id: &str) -> Result<DynTable, PolicyError> {
        Ok(Arc::new(ScopedTable::new(self.table.clone(), tenant_id, &self.placement)?))
    }
}

/// DynamoDB: one client per tenant (bounded cache), built on vended
/// credentials and guarded.
pub struct DynamoStores {
    aws: AwsSettings,
    vendor: Arc<CredentialVendor>,
    placement: Placement,
    capacity: usize,
    clients: Mutex<HashMap<String, DynTable>>,
}

impl DynamoStores {
    pub fn new(aws: AwsSettings, vendor: Arc<CredentialVendor>, placement: Placement, capacity: usize) -> Self {
        Self { aws, vendor, placement, capacity: capacity.max(1), clients: Mutex::new(HashMap::new()) }
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
        if let Some(t) = self.clients.lock().expect("clients lock").get(tenant_id) {
            return Ok(t.clone());
        }
        let table = self.build(tenant_id)?;
        let mut clients = self.clients.lock().expect("clients lock");
        if clients.len() >= self.capacity {
            // Bounded: forget one client; its tenant's next request rebuilds
            // it (the vendor's credential cache still saves the STS call).
            if let Some(k) = clients.keys().next().cloned() {
                clients.remove(&k);
            }
        }
        Ok(clients.entry(tenant_id.to_owned()).or_insert(table).clone())
    }
}
