//! The embedded backend: one redb file, committed durably (fsync) on every
//! write, so an acknowledged write survives a crash.
//!
//! Reads run on the calling task: a redb read transaction over pages in
//! memory takes microseconds, far less than a hop to the blocking pool
//! and back (two thread wake-ups). Writes, which wait for the disk, run
//! on the blocking pool.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Condition, Item, Page, Query, Result, StorageError, Table, Write, check_key, check_transaction};

/// Key `(pk, sk)`; value: 8-byte big-endian version followed by the data.
const ITEMS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("items");

/// A [`Table`] stored in a redb file.
#[derive(Clone)]
pub struct EmbeddedTable {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedTable").finish_non_exhaustive()
    }
}

fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn encode(version: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + data.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn decode(pk: &str, sk: &str, raw: &[u8]) -> Result<Item> {
    if raw.len() < 8 {
        return Err(StorageError::Backend(format!("corrupt value for ({pk}, {sk})")));
    }
    let (v, data) = raw.split_at(8);
    Ok(Item {
        pk: pk.to_owned(),
        sk: sk.to_owned(),
        version: u64::from_be_bytes(v.try_into().expect("8 bytes")),
        data: data.to_vec(),
    })
}

fn version_of(raw: &[u8]) -> Option<u64> {
    raw.get(..8).map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
}

impl EmbeddedTable {
    /// Opens (or creates) the table file at `path`, creating parent folders.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(backend)?;
        }
        let db = Database::create(path)
            .map_err(|e| StorageError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ITEMS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// [`EmbeddedTable::open`] as a shared [`DynTable`](crate::DynTable).
    pub fn open_shared(path: impl AsRef<Path>) -> Result<crate::DynTable> {
        Ok(Arc::new(Self::open(path)?))
    }

    /// The table at `path`, shared by everyone in this process who opens
    /// it this way while one handle is alive (a redb file can be open once
    /// per process: a silo data-service instance and the shared one both
    /// reach a dedicated table, in `tenantmesh up`).
    pub fn open_process_shared(path: impl AsRef<Path>) -> Result<crate::DynTable> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock, Weak};
        static OPEN: OnceLock<Mutex<HashMap<std::path::PathBuf, Weak<Database>>>> = OnceLock::new();
        let path = path.as_ref();
        let key = std::path::absolute(path).map_err(backend)?;
        let mut open = OPEN.get_or_init(Default::default).lock().expect("open tables lock");
        if let Some(db) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(Arc::new(Self { db }));
        }
        open.retain(|_, db| db.strong_count() > 0);
        let table = Self::open(path)?;
        open.insert(key, Arc::downgrade(&table.db));
        Ok(Arc::new(table))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StorageError::Backend(format!("storage task failed: {e}")))?
    }
}

#[async_trait]
impl Table for EmbeddedTable {
    async fn restore(&self, item: Item) -> Result<()> {
        check_key(&item.pk, &item.sk)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(ITEMS).map_err(backend)?;
                table
                    .insert((item.pk.as_str(), item.sk.as_str()), encode(item.version, &item.data).as_slice())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        check_key(pk, sk)?;
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ITEMS).map_err(backend)?;
        match table.get((pk, sk)).map_err(backend)? {
            Some(v) => Ok(Some(decode(pk, sk, v.value())?)),
            None => Ok(None),
        }
    }

    async fn put(&self, pk: &str, sk: &str, data: Vec<u8>, condition: Condition) -> Result<Item> {
        check_key(pk, sk)?;
        let (pk, sk) = (pk.to_owned(), sk.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let version = {
                let mut table = txn.open_table(ITEMS).map_err(backend)?;
                let current =
                    table.get((pk.as_str(), sk.as_str())).map_err(backend)?.and_then(|v| version_of(v.value()));
                if !condition.holds(current) {
                    return Err(StorageError::ConditionFailed { index: 0, current });
                }
                let version = current.unwrap_or(0) + 1;
                table.insert((pk.as_str(), sk.as_str()), encode(version, &data).as_slice()).map_err(backend)?;
                version
            };
            txn.commit().map_err(backend)?;
            Ok(Item { pk, sk, version, data })
        })
        .await
    }

    async fn delete(&self, pk: &str, sk: &str, condition: Condition) -> Result<Option<u64>> {
        check_key(pk, sk)?;
        let (pk, sk) = (pk.to_owned(), sk.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let current = {
                let mut table = txn.open_table(ITEMS).map_err(backend)?;
                let current =
                    table.get((pk.as_str(), sk.as_str())).map_err(backend)?.and_then(|v| version_of(v.value()));
                if !condition.holds(current) {
                    return Err(StorageError::ConditionFailed { index: 0, current });
                }
                if current.is_some() {
                    table.remove((pk.as_str(), sk.as_str())).map_err(backend)?;
                }
                current
            };
            txn.commit().map_err(backend)?;
            Ok(current)
        })
        .await
    }

    async fn query(&self, query: Query) -> Result<Page> {
        if query.pk.is_empty() {
            return Err(StorageError::Invalid("pk must not be empty".into()));
        }
        let limit = query.limit.max(1);
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ITEMS).map_err(backend)?;
        let pk = query.pk.as_str();
        let start = match &query.start_after {
            Some(after) if after.as_str() >= query.sk_prefix.as_str() => Bound::Excluded((pk, after.as_str())),
            _ => Bound::Included((pk, query.sk_prefix.as_str())),
        };
        let mut items = Vec::new();
        let mut more = false;
        for entry in table.range::<(&str, &str)>((start, Bound::Unbounded)).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            let (kpk, ksk) = k.value();
            if kpk != pk || !ksk.starts_with(query.sk_prefix.as_str()) {
                break;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(decode(kpk, ksk, v.value())?);
        }
        let last_evaluated = if more { items.last().map(|i: &Item| i.sk.clone()) } else { None };
        Ok(Page { items, last_evaluated })
    }

    async fn transact_write(&self, writes: Vec<Write>) -> Result<()> {
        check_transaction(&writes)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(ITEMS).map_err(backend)?;
                for (index, w) in writes.iter().enumerate() {
                    let (pk, sk) = w.key();
                    let current = table.get((pk, sk)).map_err(backend)?.and_then(|v| version_of(v.value()));
                    let condition = match w {
                        Write::Put { condition, .. }
                        | Write::Delete { condition, .. }
                        | Write::Check { condition, .. } => *condition,
                    };
                    if !condition.holds(current) {
                        // Dropping the uncommitted transaction discards every write.
                        return Err(StorageError::ConditionFailed { index, current });
                    }
                    match w {
                        Write::Put { data, .. } => {
                            let version = current.unwrap_or(0) + 1;
                            table.insert((pk, sk), encode(version, data).as_slice()).map_err(backend)?;
                        }
                        Write::Delete { .. } => {
                            table.remove((pk, sk)).map_err(backend)?;
                        }
                        Write::Check { .. } => {}
                    }
                }
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the backend-agnostic contract suite on a fresh embedded table.
    #[tokio::test]
    async fn embedded_backend_meets_the_table_contract() {
        let dir = tempfile::tempdir().unwrap();
        let table = EmbeddedTable::open(dir.path().join("t.redb")).unwrap();
        crate::contract::run_all(&table).await;
    }

    /// Acknowledged writes survive closing and reopening the file.
    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        {
            let table = EmbeddedTable::open(&path).unwrap();
            table.put("a", "x", b"1".to_vec(), Condition::None).await.unwrap();
            table.put("a", "x", b"2".to_vec(), Condition::Version(1)).await.unwrap();
        }
        let table = EmbeddedTable::open(&path).unwrap();
        let item = table.get("a", "x").await.unwrap().unwrap();
        assert_eq!((item.version, item.data.as_slice()), (2, b"2".as_slice()));
    }
}
