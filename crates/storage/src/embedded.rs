//! The embedded backend: one redb file, committed durably (fsync) before a
//! write is acknowledged, so an acknowledged write survives a crash.
//!
//! Reads run on the calling task: a redb read transaction over pages in
//! memory takes microseconds, far less than a hop to the blocking pool
//! and back (two thread wake-ups).
//!
//! Writes go to the table's writer thread, which commits them in groups:
//! every write waiting when a commit starts joins it, each applied (or
//! refused by its own condition) in arrival order in one redb write
//! transaction, then one fsync for all, then every caller gets its answer.
//! The promise is unchanged (acknowledged means on disk) while many
//! concurrent writers share one disk flush. The writer thread exits after
//! a while without writes and is started again by the next one.

use std::ops::Bound;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

mod writer;

use writer::{Done, Job, Op, writer};

use crate::table::{
    Condition, Fenced, Item, Page, Query, Result, StorageError, Table, Write, check_key, check_transaction,
};

/// Key `(pk, sk)`; value: 8-byte big-endian version followed by the data.
const ITEMS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("items");

/// At most this many writes, or this many bytes of them, per commit.
const MAX_GROUP: usize = 1024;
const MAX_GROUP_BYTES: usize = 16 << 20;
/// A writer thread with nothing to do for this long exits.
const WRITER_IDLE: Duration = Duration::from_secs(10);

/// A [`Table`] stored in a redb file.
#[derive(Clone)]
pub struct EmbeddedTable {
    shared: Arc<Shared>,
}

/// One open redb file and its writer.
struct Shared {
    db: Arc<Database>,
    writer: Arc<Mutex<Option<WriterHandle>>>,
    /// How long the writer thread waits for work before it exits.
    idle: Duration,
}

struct WriterHandle {
    jobs: Sender<Job>,
    thread: std::thread::JoinHandle<()>,
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

impl Shared {
    async fn submit(&self, op: Op) -> Result<Done> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut job = Job { op, reply };
        {
            let mut slot = self.writer.lock().expect("writer slot");
            loop {
                let handle = match slot.as_ref() {
                    Some(h) => h,
                    None => {
                        let (tx, rx) = std::sync::mpsc::channel();
                        let (db, writer_slot, idle) = (self.db.clone(), self.writer.clone(), self.idle);
                        let thread = std::thread::Builder::new()
                            .name("redb-writer".into())
                            .spawn(move || writer(db, rx, writer_slot, idle))
                            .map_err(|e| StorageError::Backend(format!("cannot start the writer: {e}")))?;
                        slot.insert(WriterHandle { jobs: tx, thread })
                    }
                };
                match handle.jobs.send(job) {
                    Ok(()) => break,
                    // The writer stopped (it cannot have retired: that takes this lock).
                    Err(std::sync::mpsc::SendError(j)) => {
                        job = j;
                        *slot = None;
                    }
                }
            }
        }
        answer.await.map_err(|_| StorageError::Backend("the storage writer stopped".into()))?
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue ends the writer; joining it means the file is
        // closed when the last handle is gone (it may be opened again at once).
        let handle = self.writer.lock().map(|mut s| s.take()).unwrap_or(None);
        if let Some(WriterHandle { jobs, thread }) = handle {
            drop(jobs);
            let _ = thread.join();
        }
    }
}

impl EmbeddedTable {
    /// Opens (or creates) the table file at `path`, creating parent folders.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::files::private_dir(parent)
                .map_err(|e| StorageError::Backend(format!("{}: {e}", parent.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StorageError::Backend(format!("cannot open {}: {e}", path.display())))?;
        // Tenants' items: the owner's alone, whatever the umask.
        crate::files::private(path).map_err(|e| StorageError::Backend(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ITEMS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self::from_db(db))
    }

    fn from_db(db: Database) -> Self {
        Self { shared: Arc::new(Shared { db: Arc::new(db), writer: Default::default(), idle: WRITER_IDLE }) }
    }

    /// [`EmbeddedTable::open`] as a shared [`DynTable`](crate::table::DynTable),
    /// recorded for [`EmbeddedTable::open_existing`].
    pub fn open_shared(path: impl AsRef<Path>) -> Result<crate::table::DynTable> {
        Ok(Arc::new(Self::open_in_process(path.as_ref())?))
    }

    /// The table at `path`, shared by everyone in this process who opens
    /// it this way while one handle is alive (a redb file can be open once
    /// per process: a silo data-service instance and the shared one both
    /// reach a dedicated table, in `tenantmesh up`).
    pub fn open_process_shared(path: impl AsRef<Path>) -> Result<crate::table::DynTable> {
        Ok(Arc::new(Self::open_in_process(path.as_ref())?))
    }

    /// The open handle of `path` in this process, else a new one (recorded).
    fn open_in_process(path: &Path) -> Result<Self> {
        let table = Self::in_process(path, |p| Self::open(p).map(Some))?;
        Ok(table.expect("open creates the table"))
    }

    /// The table at `path` through the handle this process has open, else
    /// opened (and recorded) if the file exists; `None` if it does not (a
    /// dropped table is never created again by looking at it). For a backup
    /// of a running process's stores.
    pub fn open_existing(path: &Path) -> Result<Option<Self>> {
        Self::in_process(path, |p| match Database::open(p) {
            Ok(db) => Ok(Some(Self::from_db(db))),
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(StorageError::Backend(format!("cannot open {}: {e}", p.display()))),
        })
    }

    /// The handle this process has open on `path`, else what `opener`
    /// opens, recorded for the next caller.
    fn in_process(path: &Path, opener: impl FnOnce(&Path) -> Result<Option<Self>>) -> Result<Option<Self>> {
        let key = std::path::absolute(path).map_err(backend)?;
        let mut open = open_tables().lock().expect("open tables lock");
        if let Some(shared) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(Some(Self { shared }));
        }
        let Some(table) = opener(path)? else { return Ok(None) };
        open.retain(|_, s| s.strong_count() > 0);
        open.insert(key, Arc::downgrade(&table.shared));
        Ok(Some(table))
    }

    /// Copies every item, as of one read snapshot, into a new table file at
    /// `dest` (which must not exist), synced to disk. Blocking: call it
    /// from a blocking thread. Writers go on meanwhile.
    pub fn snapshot_to(&self, dest: &Path) -> Result<()> {
        let read = self.shared.db.begin_read().map_err(backend)?;
        let items = read.open_table(ITEMS).map_err(backend)?;
        if dest.exists() {
            return Err(StorageError::Backend(format!("{} exists", dest.display())));
        }
        if let Some(parent) = dest.parent() {
            crate::files::private_dir(parent).map_err(backend)?;
        }
        let copy = Database::create(dest).map_err(|e| StorageError::Backend(format!("{}: {e}", dest.display())))?;
        crate::files::private(dest).map_err(backend)?;
        let txn = copy.begin_write().map_err(backend)?;
        {
            let mut out = txn.open_table(ITEMS).map_err(backend)?;
            for entry in items.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let (pk, sk) = key.value();
                out.insert((pk, sk), value.value()).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }
}

/// Every table opened in this process through [`EmbeddedTable::open_in_process`].
fn open_tables() -> &'static Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Weak<Shared>>> {
    static OPEN: std::sync::OnceLock<Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Weak<Shared>>>> =
        std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

impl EmbeddedTable {
    async fn put_with(
        &self,
        pk: &str,
        sk: &str,
        data: Vec<u8>,
        condition: Condition,
        fence: Option<&str>,
        undo: Option<&str>,
    ) -> Result<(Item, Fenced)> {
        check_key(pk, sk)?;
        let (fence, undo) = (fence.map(str::to_owned), undo.map(str::to_owned));
        let op = Op::Put { pk: pk.to_owned(), sk: sk.to_owned(), data, condition, fence, undo };
        match self.shared.submit(op).await? {
            Done::Put(item, fenced) => Ok((item, fenced)),
            _ => unreachable!("a put answers with its item"),
        }
    }

    async fn delete_with(
        &self,
        pk: &str,
        sk: &str,
        condition: Condition,
        fence: Option<&str>,
        undo: Option<&str>,
    ) -> Result<Fenced> {
        check_key(pk, sk)?;
        let (fence, undo) = (fence.map(str::to_owned), undo.map(str::to_owned));
        let op = Op::Delete { pk: pk.to_owned(), sk: sk.to_owned(), condition, fence, undo };
        match self.shared.submit(op).await? {
            Done::Delete(fenced) => Ok(fenced),
            _ => unreachable!("a delete answers with the deleted version"),
        }
    }
}

#[async_trait]
impl Table for EmbeddedTable {
    async fn restore(&self, item: Item) -> Result<()> {
        check_key(&item.pk, &item.sk)?;
        self.shared.submit(Op::Restore(item)).await.map(drop)
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        check_key(pk, sk)?;
        let txn = self.shared.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ITEMS).map_err(backend)?;
        match table.get((pk, sk)).map_err(backend)? {
            Some(v) => Ok(Some(decode(pk, sk, v.value())?)),
            None => Ok(None),
        }
    }

    async fn put(&self, pk: &str, sk: &str, data: Vec<u8>, condition: Condition) -> Result<Item> {
        Ok(self.put_with(pk, sk, data, condition, None, None).await?.0)
    }

    async fn delete(&self, pk: &str, sk: &str, condition: Condition) -> Result<Option<u64>> {
        let done = self.delete_with(pk, sk, condition, None, None).await?;
        Ok((done.previous_version > 0).then_some(done.previous_version))
    }

    /// One write (in the writer's group transaction) checks the fence,
    /// writes the undo record and the item, as a plain put.
    async fn put_fenced(
        &self,
        pk: &str,
        sk: &str,
        data: Vec<u8>,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        check_key(pk, fence_sk)?;
        if let Some(undo_sk) = undo_sk {
            check_key(pk, undo_sk)?;
        }
        Ok(self.put_with(pk, sk, data, condition, Some(fence_sk), undo_sk).await?.1)
    }

    async fn delete_fenced(
        &self,
        pk: &str,
        sk: &str,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        check_key(pk, fence_sk)?;
        if let Some(undo_sk) = undo_sk {
            check_key(pk, undo_sk)?;
        }
        self.delete_with(pk, sk, condition, Some(fence_sk), undo_sk).await
    }

    async fn query(&self, query: Query) -> Result<Page> {
        if query.pk.is_empty() {
            return Err(StorageError::Invalid("pk must not be empty".into()));
        }
        let limit = query.limit.max(1);
        let txn = self.shared.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ITEMS).map_err(backend)?;
        let pk = query.pk.as_str();
        let start = match &query.start_after {
            Some(after) if after.as_str() >= query.sk_prefix.as_str() => Bound::Excluded((pk, after.as_str())),
            _ => Bound::Included((pk, query.sk_prefix.as_str())),
        };
        let mut items = Vec::new();
        let (mut more, mut bytes) = (false, 0);
        for entry in table.range::<(&str, &str)>((start, Bound::Unbounded)).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            let (kpk, ksk) = k.value();
            if kpk != pk || !ksk.starts_with(query.sk_prefix.as_str()) {
                break;
            }
            if items.len() == limit || bytes >= crate::table::MAX_PAGE_BYTES {
                more = true;
                break;
            }
            let value = v.value();
            bytes += kpk.len() + ksk.len() + value.len();
            items.push(decode(kpk, ksk, value)?);
        }
        let last_evaluated = if more { items.last().map(|i: &Item| i.sk.clone()) } else { None };
        Ok(Page { items, last_evaluated })
    }

    async fn transact_write(&self, writes: Vec<Write>) -> Result<()> {
        check_transaction(&writes)?;
        self.shared.submit(Op::Transact(writes)).await.map(drop)
    }
}

#[cfg(test)]
mod tests;
