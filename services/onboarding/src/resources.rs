//! The resources created for one tenant alone — dedicated tables, silo
//! instances, exports — each with the `tenantId` and `tier` tags it carries
//! from its creation (on DynamoDB the table itself is tagged too), for cost
//! attribution: `ListTenantResources`.
//!
//! The ledger is kept in the onboarding store (`pk = resources#<tenant>`,
//! `sk = <kind>#<name>`), written by the very steps that create and remove
//! the resources: a resource is recorded before it is created (so a crash
//! in between leaves it listed, never running unlisted) and forgotten once
//! it is removed. Both writes are idempotent, like the steps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, Query, StorageError};

/// A dedicated table (a DynamoDB table, or a redb file on the embedded store).
pub const TABLE: &str = "table";
/// A silo tenant's data-service instance (its endpoint).
pub const SILO_INSTANCE: &str = "silo_instance";
/// An offboarding's export of the tenant's items (its path).
pub const EXPORT: &str = "export";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    /// Unix seconds.
    pub create_time: i64,
}

fn pk(tenant: &str) -> String {
    format!("resources#{tenant}")
}

/// The tags every resource of `tenant` on `tier` carries.
pub fn tags(tenant: &str, tier: &str) -> BTreeMap<String, String> {
    [("tenantId".to_owned(), tenant.to_owned()), ("tier".to_owned(), tier.to_owned())].into()
}

pub struct Ledger {
    store: DynTable,
}

impl Ledger {
    pub fn new(store: DynTable) -> Self {
        Self { store }
    }

    /// Records a resource of `tenant` (kept as first recorded when it is
    /// there already).
    pub async fn add(&self, tenant: &str, kind: &str, name: &str, tier: &str) -> Result<(), StorageError> {
        let r =
            Resource { kind: kind.into(), name: name.into(), tags: tags(tenant, tier), create_time: crate::now_secs() };
        let data = serde_json::to_vec(&r).map_err(|e| StorageError::Invalid(e.to_string()))?;
        match self.store.put(&pk(tenant), &format!("{kind}#{name}"), data, Condition::NotExists).await {
            Ok(_) | Err(StorageError::ConditionFailed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Forgets a resource that was removed.
    pub async fn remove(&self, tenant: &str, kind: &str, name: &str) -> Result<(), StorageError> {
        self.store.delete(&pk(tenant), &format!("{kind}#{name}"), Condition::None).await.map(drop)
    }

    /// Every resource of `tenant`, by kind and name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Resource>, StorageError> {
        let (mut out, mut start_after) = (Vec::new(), None);
        loop {
            let q = Query { pk: pk(tenant), sk_prefix: String::new(), start_after, limit: 1000 };
            let page = self.store.query(q).await?;
            for item in &page.items {
                out.push(serde_json::from_slice(&item.data).map_err(|e| StorageError::Invalid(e.to_string()))?);
            }
            match page.last_evaluated {
                Some(sk) => start_after = Some(sk),
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recorded_once_forgotten_once_and_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("o.redb")).unwrap());
        ledger.add("acme", TABLE, "tenantmesh-tenant-acme", "premium").await.unwrap();
        ledger.add("acme", TABLE, "tenantmesh-tenant-acme", "premium").await.unwrap();
        ledger.add("acme", SILO_INSTANCE, "http://127.0.0.1:1", "premium").await.unwrap();
        ledger.add("bolt", EXPORT, "exports/bolt.jsonl", "basic").await.unwrap();
        let acme = ledger.list("acme").await.unwrap();
        assert_eq!(acme.len(), 2);
        assert_eq!(acme[1].kind, TABLE);
        assert_eq!(acme[1].tags, tags("acme", "premium"));
        ledger.remove("acme", TABLE, "tenantmesh-tenant-acme").await.unwrap();
        ledger.remove("acme", TABLE, "tenantmesh-tenant-acme").await.unwrap();
        let acme = ledger.list("acme").await.unwrap();
        assert_eq!(acme.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), [SILO_INSTANCE]);
        assert_eq!(ledger.list("bolt").await.unwrap()[0].tags["tenantId"], "bolt");
    }
}
