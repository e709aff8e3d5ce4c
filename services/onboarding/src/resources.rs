//! The resources created for one tenant alone — dedicated tables, silo
//! instances, exports — each with the `tenantId` and `tier` tags it carries
//! from its creation (on DynamoDB the table itself is tagged too), for cost
//! attribution: `ListTenantResources`.
//!
//! The ledger is kept in the onboarding store (`pk = resources#<tenant>`,
//! `sk = <kind>#<name>#<life>`), written by the very steps that create
//! and remove the resources: a table is recorded before it is created (so
//! a crash in between leaves it listed, never existing unlisted), a silo
//! instance as it is provisioned, an export once it is complete; a removed
//! resource keeps its record with the time of its removal, so the cost of
//! the hours it was held can be told afterwards. Both writes are
//! idempotent, like the steps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantmesh_storage::{Condition, DynTable, Pages, StorageError};

/// A dedicated table (a DynamoDB table, or a redb file on the embedded store).
pub const TABLE: &str = "table";
/// A silo tenant's data-service instance (its endpoint).
pub const SILO_INSTANCE: &str = "silo_instance";
/// An export of the tenant's items, by an offboarding or a restore into an
/// export (its path): kept, and billed by the byte-hour, for its tier's
/// `export_retention_days`, then deleted.
pub const EXPORT: &str = "export";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    /// Unix seconds.
    pub create_time: i64,
    /// When it was removed (Unix seconds); `None` while it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_time: Option<i64>,
    /// Its size in bytes, where it has one (an export).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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

fn invalid(e: serde_json::Error) -> StorageError {
    StorageError::Invalid(format!("resource ledger: {e}"))
}

impl Ledger {
    pub fn new(store: DynTable) -> Self {
        Self { store }
    }

    /// The records of `tenant`'s resource `kind`/`name` (one per life of
    /// a name: a table made again after it was dropped is a new record),
    /// with their versions.
    async fn lives(&self, tenant: &str, kind: &str, name: &str) -> Result<Vec<(String, u64, Resource)>, StorageError> {
        let prefix = format!("{kind}#{name}#");
        let mut out = Vec::new();
        self.scan(tenant, &prefix, |sk, version, r| {
            if r.name == name {
                out.push((sk.to_owned(), version, r));
            }
        })
        .await?;
        Ok(out)
    }

    async fn scan(
        &self,
        tenant: &str,
        prefix: &str,
        mut each: impl FnMut(&str, u64, Resource),
    ) -> Result<(), StorageError> {
        let mut pages = Pages::new(self.store.as_ref(), pk(tenant), prefix, 1000);
        while let Some(items) = pages.next().await? {
            for item in &items {
                each(&item.sk, item.version, serde_json::from_slice(&item.data).map_err(invalid)?);
            }
        }
        Ok(())
    }

    /// Records a resource of `tenant`, unless it is recorded as existing
    /// already (a step run again).
    pub async fn add(&self, tenant: &str, kind: &str, name: &str, tier: &str) -> Result<(), StorageError> {
        self.add_sized(tenant, kind, name, tier, 0).await
    }

    /// [`Ledger::add`], with the resource's size in bytes.
    pub async fn add_sized(
        &self,
        tenant: &str,
        kind: &str,
        name: &str,
        tier: &str,
        bytes: u64,
    ) -> Result<(), StorageError> {
        let lives = self.lives(tenant, kind, name).await?;
        if lives.iter().any(|(_, _, r)| r.remove_time.is_none()) {
            return Ok(());
        }
        let r = Resource {
            kind: kind.into(),
            name: name.into(),
            tags: tags(tenant, tier),
            create_time: tenantmesh_service::clock::now_secs(),
            remove_time: None,
            bytes,
        };
        let data = serde_json::to_vec(&r).map_err(invalid)?;
        // The name's lives are numbered: the n-th is `<kind>#<name>#<n>`.
        let sk = format!("{kind}#{name}#{:06}", lives.len());
        match self.store.put(&pk(tenant), &sk, data, Condition::NotExists).await {
            Ok(_) | Err(StorageError::ConditionFailed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Records that a resource was removed (kept, with its dates, for
    /// the cost of the hours it was held).
    pub async fn remove(&self, tenant: &str, kind: &str, name: &str) -> Result<(), StorageError> {
        for (sk, version, mut r) in self.lives(tenant, kind, name).await? {
            if r.remove_time.is_none() {
                r.remove_time = Some(tenantmesh_service::clock::now_secs());
                let data = serde_json::to_vec(&r).map_err(invalid)?;
                self.store.put(&pk(tenant), &sk, data, Condition::Version(version)).await?;
            }
        }
        Ok(())
    }

    /// `tenant`'s resources, by kind and name: those that exist, and with
    /// `removed` those removed too.
    pub async fn list(&self, tenant: &str, removed: bool) -> Result<Vec<Resource>, StorageError> {
        let mut out = Vec::new();
        self.scan(tenant, "", |_, _, r| {
            if removed || r.remove_time.is_none() {
                out.push(r);
            }
        })
        .await?;
        Ok(out)
    }
}

/// Deletes `tenant`'s exports kept longer than their tier's
/// `export_retention_days` (the `tier` tag they were made with; a tier no
/// longer in the file keeps the default 7 days) as of `now`, and records
/// each removal: how many. An export file already gone is only recorded.
pub async fn expire_exports(
    ledger: &Ledger,
    tiers: &tenantmesh_service::tiers::Tiers,
    tenant: &str,
    now: i64,
) -> Result<usize, StorageError> {
    const DEFAULT_RETENTION_SECS: i64 = 7 * 86_400;
    let mut removed = 0;
    for r in ledger.list(tenant, false).await?.into_iter().filter(|r| r.kind == EXPORT) {
        let retention = r
            .tags
            .get("tier")
            .and_then(|t| tiers.get(t))
            .map_or(DEFAULT_RETENTION_SECS, tenantmesh_service::tiers::Tier::export_retention_secs);
        if r.create_time.saturating_add(retention) > now {
            continue;
        }
        match std::fs::remove_file(&r.name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::Backend(format!("export {}: {e}", r.name))),
        }
        ledger.remove(tenant, EXPORT, &r.name).await?;
        tracing::info!(target_tenant = %tenant, bytes = r.bytes, kept_secs = now - r.create_time, "export deleted after its retention");
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recorded_once_removed_once_and_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("o.redb")).unwrap());
        ledger.add("acme", TABLE, "tenantmesh-tenant-acme", "premium").await.unwrap();
        ledger.add("acme", TABLE, "tenantmesh-tenant-acme", "premium").await.unwrap();
        ledger.add("acme", SILO_INSTANCE, "http://127.0.0.1:1", "premium").await.unwrap();
        ledger.add("bolt", EXPORT, "exports/bolt.jsonl", "basic").await.unwrap();
        let acme = ledger.list("acme", false).await.unwrap();
        assert_eq!(acme.len(), 2);
        assert_eq!(acme[1].kind, TABLE);
        assert_eq!(acme[1].tags, tags("acme", "premium"));
        ledger.remove("acme", TABLE, "tenantmesh-tenant-acme").await.unwrap();
        ledger.remove("acme", TABLE, "tenantmesh-tenant-acme").await.unwrap();
        let acme = ledger.list("acme", false).await.unwrap();
        assert_eq!(acme.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), [SILO_INSTANCE]);
        let all = ledger.list("acme", true).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|r| r.kind == TABLE && r.remove_time.is_some()));
        // The same table made again is a second life of the name.
        ledger.add("acme", TABLE, "tenantmesh-tenant-acme", "enterprise").await.unwrap();
        assert_eq!(ledger.list("acme", true).await.unwrap().len(), 3);
        assert_eq!(ledger.list("acme", false).await.unwrap().len(), 2);
        assert_eq!(ledger.list("bolt", false).await.unwrap()[0].tags["tenantId"], "bolt");
    }

    /// An export is kept for its tier's export_retention_days, then its
    /// file is deleted and its record marked removed (once); a file
    /// already gone is only recorded.
    #[tokio::test]
    async fn exports_are_deleted_after_their_retention() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(tenantmesh_storage::EmbeddedTable::open_shared(dir.path().join("o.redb")).unwrap());
        let tiers = tenantmesh_service::tiers::Tiers::default();
        let kept = dir.path().join("acme-at-1.jsonl");
        std::fs::write(&kept, "{}\n").unwrap();
        let path = kept.display().to_string();
        ledger.add_sized("acme", EXPORT, &path, "premium", 3).await.unwrap();
        ledger.add_sized("acme", EXPORT, "/gone/acme.jsonl", "basic", 9).await.unwrap();
        let now = tenantmesh_service::clock::now_secs();
        assert_eq!(expire_exports(&ledger, &tiers, "acme", now).await.unwrap(), 0);
        let week = 7 * 86_400;
        assert_eq!(expire_exports(&ledger, &tiers, "acme", now + week + 1).await.unwrap(), 2);
        assert!(!kept.exists(), "the export file is deleted");
        assert!(ledger.list("acme", false).await.unwrap().is_empty());
        let removed = ledger.list("acme", true).await.unwrap();
        assert!(removed.iter().all(|r| r.remove_time.is_some()) && removed.len() == 2, "{removed:?}");
        assert_eq!(removed.iter().map(|r| r.bytes).sum::<u64>(), 12, "sizes are kept for the bill");
        assert_eq!(expire_exports(&ledger, &tiers, "acme", now + week + 2).await.unwrap(), 0, "once");
    }
}
