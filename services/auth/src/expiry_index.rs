//! The expiry index of the auth table: an entry per record that expires,
//! in the partition of the hour it expires in, written in the record's own
//! transaction (see [`crate::expiry`], which sweeps it).

use tenantmesh_storage::{Condition, DynTable, StorageError, Write};

/// Width of one expiry bucket: a record is purged within this long after
/// it expires (an empty bucket costs the sweeper one query).
pub const BUCKET_SECS: i64 = 3600;

pub(crate) fn bucket(at_secs: i64) -> i64 {
    at_secs.div_euclid(BUCKET_SECS)
}

pub(crate) fn index_pk(bucket: i64) -> String {
    format!("expiry#{bucket}")
}

/// The index entry that has the sweeper look at `(tenant, sk)` once
/// `at_secs` has passed: a write for the record's own transaction.
pub(crate) fn entry(tenant: &str, sk: &str, at_secs: i64) -> Write {
    let (pk, sk) = entry_key(tenant, sk, at_secs);
    Write::Put { pk, sk, data: Vec::new(), condition: Condition::None }
}

pub(crate) fn entry_key(tenant: &str, sk: &str, at_secs: i64) -> (String, String) {
    (index_pk(bucket(at_secs)), format!("{tenant}#{sk}"))
}

pub(crate) async fn put_entry(store: &DynTable, tenant: &str, sk: &str, at_secs: i64) -> Result<(), StorageError> {
    let (pk, sk) = entry_key(tenant, sk, at_secs);
    store.put(&pk, &sk, Vec::new(), Condition::None).await.map(drop)
}
