//! The table API: items, conditions, writes, queries, errors and the
//! [`Table`] trait both backends implement.

use std::sync::Arc;

use async_trait::async_trait;

/// One stored item: `(pk, sk)` is its key, `version` counts its writes
/// (1 on creation) and `data` is the caller's encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub pk: String,
    pub sk: String,
    pub version: u64,
    pub data: Vec<u8>,
}

/// A precondition on the current state of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Always holds.
    None,
    /// The item must not exist.
    NotExists,
    /// The item must exist.
    Exists,
    /// The item must exist with exactly this version; `Version(0)` means
    /// it must not exist.
    Version(u64),
}

impl Condition {
    pub(crate) fn holds(self, current: Option<u64>) -> bool {
        match (self, current) {
            (Condition::None, _) => true,
            (Condition::NotExists, c) => c.is_none(),
            (Condition::Exists, c) => c.is_some(),
            (Condition::Version(0), c) => c.is_none(),
            (Condition::Version(v), c) => c == Some(v),
        }
    }
}

/// One write inside [`Table::transact_write`].
#[derive(Debug, Clone)]
pub enum Write {
    Put {
        pk: String,
        sk: String,
        data: Vec<u8>,
        condition: Condition,
    },
    Delete {
        pk: String,
        sk: String,
        condition: Condition,
    },
    /// Writes nothing; fails the transaction if the condition does not hold.
    Check {
        pk: String,
        sk: String,
        condition: Condition,
    },
}

impl Write {
    pub(crate) fn key(&self) -> (&str, &str) {
        match self {
            Write::Put { pk, sk, .. } | Write::Delete { pk, sk, .. } | Write::Check { pk, sk, .. } => (pk, sk),
        }
    }
}

/// A query over one partition: items whose sort key starts with
/// `sk_prefix`, in sort-key order, strictly after `start_after` if set.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub pk: String,
    pub sk_prefix: String,
    pub start_after: Option<String>,
    /// At most this many items (at least 1), and at most about
    /// [`MAX_PAGE_BYTES`] of them.
    pub limit: usize,
}

/// A query page stops once its items reach this many bytes (the item that
/// crosses it included), as DynamoDB's Query does at 1 MB: the work and the
/// reply of one call stay bounded whatever the items' sizes.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// One page of a [`Query`].
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<Item>,
    /// The sort key to continue after when more items may follow.
    pub last_evaluated: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A write's condition did not hold; nothing was written.
    #[error("condition failed (current version: {current:?})")]
    ConditionFailed {
        /// Which write of a transaction failed (0 for single writes).
        index: usize,
        current: Option<u64>,
    },
    /// The caller's isolation policy refuses this call (another tenant's key).
    #[error("access denied: {action} on partition {key:?}")]
    AccessDenied { action: String, key: String },
    /// Invalid use of the API (empty key, duplicate key in a transaction).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no such table: {0}")]
    NoSuchTable(String),
    /// A fenced write found its partition's fence raised (see
    /// [`Table::put_fenced`]); nothing was written.
    #[error("the partition is fenced: its writes go elsewhere now")]
    Fenced,
    /// The backend failed (I/O, corruption); the operation may not have applied.
    #[error("storage backend failed: {0}")]
    Backend(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A table of items addressed by partition key and sort key.
#[async_trait]
pub trait Table: Send + Sync + 'static {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>>;

    /// Writes `data` under `(pk, sk)` if `condition` holds and returns the
    /// stored item with its new version.
    async fn put(&self, pk: &str, sk: &str, data: Vec<u8>, condition: Condition) -> Result<Item>;

    /// Deletes `(pk, sk)` if `condition` holds; returns the deleted item's
    /// version, or `None` if there was none.
    async fn delete(&self, pk: &str, sk: &str, condition: Condition) -> Result<Option<u64>>;

    async fn query(&self, query: Query) -> Result<Page>;

    /// Applies all writes atomically, or none if any condition fails.
    async fn transact_write(&self, writes: Vec<Write>) -> Result<()>;

    /// Writes `item` as it is, version included, replacing any item under
    /// its key: how a copy of a table keeps its items' versions. Idempotent.
    async fn restore(&self, item: Item) -> Result<()>;

    /// [`Table::put`], provided the fence item `(pk, fence_sk)` does not
    /// exist; if it does, nothing is written and the answer is
    /// [`StorageError::Fenced`]. The check and the write are one atomic
    /// step, so a write either lands before the fence is raised or not at
    /// all: what a workflow that raises the fence and then copies the
    /// partition relies on.
    ///
    /// With `undo_sk`, the same atomic step also writes, under `(pk,
    /// undo_sk)`, the item's [`BeforeImage`]: what it was just before this
    /// write (an undo record; the caller makes `undo_sk` unique).
    ///
    /// The answer says what the write replaced ([`Fenced`]), so a caller
    /// can count the bytes it added without reading the item again.
    ///
    /// This default is a transaction (a check and a write, and the undo
    /// record) conditioned on the item's version, read first when
    /// `condition` names none or the before-image is needed.
    async fn put_fenced(
        &self,
        pk: &str,
        sk: &str,
        data: Vec<u8>,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        loop {
            let (expected, read, undo, previous_bytes) = fenced_read(self, pk, sk, condition, undo_sk).await?;
            let mut writes = vec![
                Write::Check { pk: pk.into(), sk: fence_sk.into(), condition: Condition::NotExists },
                Write::Put {
                    pk: pk.into(),
                    sk: sk.into(),
                    data: data.clone(),
                    condition: Condition::Version(expected),
                },
            ];
            let undo_bytes = undo_len(&undo);
            writes.extend(undo);
            match fenced_outcome(self.transact_write(writes).await, read) {
                Some(Ok(())) => {
                    return Ok(Fenced {
                        version: expected + 1,
                        previous_version: expected,
                        previous_bytes,
                        undo_bytes,
                    });
                }
                Some(Err(e)) => return Err(e),
                None => continue,
            }
        }
    }

    /// [`Table::delete`], provided the fence item `(pk, fence_sk)` does not
    /// exist, with an undo record when it deletes something and `undo_sk`
    /// is set (see [`Table::put_fenced`]).
    async fn delete_fenced(
        &self,
        pk: &str,
        sk: &str,
        condition: Condition,
        fence_sk: &str,
        undo_sk: Option<&str>,
    ) -> Result<Fenced> {
        loop {
            let (expected, read, undo, previous_bytes) = fenced_read(self, pk, sk, condition, undo_sk).await?;
            let fence = Write::Check { pk: pk.into(), sk: fence_sk.into(), condition: Condition::NotExists };
            let (writes, undo_bytes) = if expected == 0 {
                (vec![fence, Write::Check { pk: pk.into(), sk: sk.into(), condition: Condition::NotExists }], 0)
            } else {
                let delete = Write::Delete { pk: pk.into(), sk: sk.into(), condition: Condition::Version(expected) };
                let undo_bytes = undo_len(&undo);
                let mut w = vec![fence, delete];
                w.extend(undo);
                (w, undo_bytes)
            };
            match fenced_outcome(self.transact_write(writes).await, read) {
                Some(Ok(())) => {
                    return Ok(Fenced { version: 0, previous_version: expected, previous_bytes, undo_bytes });
                }
                Some(Err(e)) => return Err(e),
                None => continue,
            }
        }
    }
}

/// What a fenced write did ([`Table::put_fenced`], [`Table::delete_fenced`]):
/// enough for a caller to account for the bytes it added and removed
/// without reading the item again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fenced {
    /// The item's version after the write: 0 after a delete.
    pub version: u64,
    /// The version the write replaced or deleted: 0 if there was none.
    pub previous_version: u64,
    /// The bytes of the item replaced or deleted. Known when an undo
    /// record was written (the item was read); 0 otherwise.
    pub previous_bytes: u64,
    /// The bytes of the undo record written: 0 without one.
    pub undo_bytes: u64,
}

pub(crate) fn undo_len(undo: &Option<Write>) -> u64 {
    match undo {
        Some(Write::Put { data, .. }) => data.len() as u64,
        _ => 0,
    }
}

/// An item as it was just before a write: what an undo record holds.
/// `version` 0: it did not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeforeImage {
    pub sk: String,
    pub version: u64,
    pub data: Vec<u8>,
}

impl BeforeImage {
    /// The before-image of `(_, sk)` when it is `item`.
    pub fn of(sk: &str, item: Option<&Item>) -> Self {
        match item {
            Some(i) => BeforeImage { sk: sk.to_owned(), version: i.version, data: i.data.clone() },
            None => BeforeImage { sk: sk.to_owned(), version: 0, data: Vec::new() },
        }
    }

    /// `version` (8 bytes LE), the sort key's length (4 bytes LE), the
    /// sort key, the item's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.sk.len() + self.data.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.sk.len() as u32).to_le_bytes());
        out.extend_from_slice(self.sk.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || StorageError::Backend("an undo record is damaged".into());
        let version = u64::from_le_bytes(bytes.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        let len = u32::from_le_bytes(bytes.get(8..12).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let sk = std::str::from_utf8(bytes.get(12..12 + len).ok_or_else(bad)?).map_err(|_| bad())?.to_owned();
        Ok(BeforeImage { sk, version, data: bytes[12 + len..].to_vec() })
    }
}

/// What a fenced write of `(pk, sk)` under `condition` expects: the
/// version (0: absent), whether it was read rather than given (a read one
/// that changes before the write is read again), and with `undo_sk` the
/// undo record to write with it (which needs the item read) and the bytes
/// of the item it replaces.
async fn fenced_read<T: Table + ?Sized>(
    table: &T,
    pk: &str,
    sk: &str,
    condition: Condition,
    undo_sk: Option<&str>,
) -> Result<(u64, bool, Option<Write>, u64)> {
    let Some(undo_sk) = undo_sk else {
        let (expected, read) = expected_version(table, pk, sk, condition).await?;
        return Ok((expected, read, None, 0));
    };
    let current = table.get(pk, sk).await?;
    let version = current.as_ref().map(|i| i.version);
    if !condition.holds(version) {
        return Err(StorageError::ConditionFailed { index: 0, current: version });
    }
    // Unique by the caller's choice of key; no condition, so a retry after
    // a concurrent change of the item writes it again.
    let undo = Write::Put {
        pk: pk.into(),
        sk: undo_sk.into(),
        data: BeforeImage::of(sk, current.as_ref()).encode(),
        condition: Condition::None,
    };
    let previous_bytes = current.as_ref().map_or(0, |i| i.data.len() as u64);
    Ok((version.unwrap_or(0), true, Some(undo), previous_bytes))
}

/// The version a fenced write of `(pk, sk)` under `condition` expects (0:
/// absent), and whether it was read rather than given (a read one that
/// changes before the write is read again).
async fn expected_version<T: Table + ?Sized>(
    table: &T,
    pk: &str,
    sk: &str,
    condition: Condition,
) -> Result<(u64, bool)> {
    Ok(match condition {
        Condition::Version(v) => (v, false),
        Condition::NotExists => (0, false),
        Condition::None | Condition::Exists => {
            let current = table.get(pk, sk).await?.map(|i| i.version);
            if condition == Condition::Exists && current.is_none() {
                return Err(StorageError::ConditionFailed { index: 0, current: None });
            }
            (current.unwrap_or(0), true)
        }
    })
}

/// What a fenced write's transaction means: the fence (write 0) is
/// [`StorageError::Fenced`]; the item's condition (write 1) is the caller's
/// failed condition, or, when the version was only read (`read`), `None`:
/// try again.
pub(crate) fn fenced_outcome(outcome: Result<()>, read: bool) -> Option<Result<()>> {
    match outcome {
        Ok(()) => Some(Ok(())),
        Err(StorageError::ConditionFailed { index: 0, .. }) => Some(Err(StorageError::Fenced)),
        Err(StorageError::ConditionFailed { .. }) if read => None,
        Err(StorageError::ConditionFailed { current, .. }) => {
            Some(Err(StorageError::ConditionFailed { index: 0, current }))
        }
        Err(e) => Some(Err(e)),
    }
}

pub type DynTable = Arc<dyn Table>;

/// Every key valid, and none touched twice (DynamoDB refuses that too).
pub(crate) fn check_transaction(writes: &[Write]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for w in writes {
        let (pk, sk) = w.key();
        check_key(pk, sk)?;
        if !seen.insert((pk, sk)) {
            return Err(StorageError::Invalid(format!("transaction touches ({pk}, {sk}) twice")));
        }
    }
    Ok(())
}

pub(crate) fn check_key(pk: &str, sk: &str) -> Result<()> {
    if pk.is_empty() || sk.is_empty() {
        return Err(StorageError::Invalid("pk and sk must not be empty".into()));
    }
    Ok(())
}
