//! The embedded table's writer thread: writes waiting when a commit
//! starts are committed together, in one redb write transaction and one
//! fsync (see [`super`]).

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{Database, ReadableTable};

use super::{ITEMS, MAX_GROUP, MAX_GROUP_BYTES, WriterHandle, backend, decode, encode, version_of};
use crate::table::{Condition, Fenced, Item, Result, StorageError, Write};

/// A write waiting for the writer thread.
pub(super) enum Op {
    /// `fence`: a sort key in `pk` that must not exist; `undo`: where in
    /// `pk` to write the item's before-image.
    Put {
        pk: String,
        sk: String,
        data: Vec<u8>,
        condition: Condition,
        fence: Option<String>,
        undo: Option<String>,
    },
    Delete {
        pk: String,
        sk: String,
        condition: Condition,
        fence: Option<String>,
        undo: Option<String>,
    },
    Transact(Vec<Write>),
    Restore(Item),
}

/// What a write returns once committed: a put its item, and for puts and
/// deletes what they replaced (see [`Fenced`]; its `version` is unused).
pub(super) enum Done {
    Put(Item, Fenced),
    Delete(Fenced),
    Unit,
}

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<Done>>,
}

impl Op {
    pub(super) fn bytes(&self) -> usize {
        match self {
            Op::Put { data, .. } => data.len(),
            Op::Restore(item) => item.data.len(),
            Op::Transact(writes) => {
                writes.iter().map(|w| if let Write::Put { data, .. } = w { data.len() } else { 0 }).sum()
            }
            Op::Delete { .. } => 0,
        }
    }

    /// Applies the write in `table` (within the group's transaction). A
    /// refused condition writes nothing and fails this write only; any
    /// other error fails the whole group.
    pub(super) fn apply(self, table: &mut redb::Table<(&str, &str), &[u8]>) -> Result<Result<Done>> {
        let current = |table: &redb::Table<(&str, &str), &[u8]>, pk: &str, sk: &str| -> Result<Option<u64>> {
            Ok(table.get((pk, sk)).map_err(backend)?.and_then(|v| version_of(v.value())))
        };
        let fenced = |table: &redb::Table<(&str, &str), &[u8]>, pk: &str, fence: &Option<String>| -> Result<bool> {
            Ok(match fence {
                Some(f) => table.get((pk, f.as_str())).map_err(backend)?.is_some(),
                None => false,
            })
        };
        // The item's before-image, written under `undo` in `pk`: the bytes
        // of the item and of the record.
        let log =
            |table: &mut redb::Table<(&str, &str), &[u8]>, pk: &str, sk: &str, undo: &str| -> Result<(u64, u64)> {
                let before = match table.get((pk, sk)).map_err(backend)? {
                    Some(raw) => Some(decode(pk, sk, raw.value())?),
                    None => None,
                };
                let image = crate::table::BeforeImage::of(sk, before.as_ref()).encode();
                table.insert((pk, undo), encode(1, &image).as_slice()).map_err(backend)?;
                Ok((before.map_or(0, |b| b.data.len() as u64), image.len() as u64))
            };
        Ok(match self {
            Op::Put { pk, sk, data, condition, fence, undo } => {
                if fenced(table, &pk, &fence)? {
                    return Ok(Err(StorageError::Fenced));
                }
                let current = current(table, &pk, &sk)?;
                if !condition.holds(current) {
                    return Ok(Err(StorageError::ConditionFailed { index: 0, current }));
                }
                let (previous_bytes, undo_bytes) = match &undo {
                    Some(undo) => log(table, &pk, &sk, undo)?,
                    None => (0, 0),
                };
                let previous_version = current.unwrap_or(0);
                let version = previous_version + 1;
                table.insert((pk.as_str(), sk.as_str()), encode(version, &data).as_slice()).map_err(backend)?;
                let fenced = Fenced { version, previous_version, previous_bytes, undo_bytes };
                Ok(Done::Put(Item { pk, sk, version, data }, fenced))
            }
            Op::Delete { pk, sk, condition, fence, undo } => {
                if fenced(table, &pk, &fence)? {
                    return Ok(Err(StorageError::Fenced));
                }
                let current = current(table, &pk, &sk)?;
                if !condition.holds(current) {
                    return Ok(Err(StorageError::ConditionFailed { index: 0, current }));
                }
                let (previous_bytes, undo_bytes) = match (&undo, current) {
                    (Some(undo), Some(_)) => log(table, &pk, &sk, undo)?,
                    _ => (0, 0),
                };
                if current.is_some() {
                    table.remove((pk.as_str(), sk.as_str())).map_err(backend)?;
                }
                let previous_version = current.unwrap_or(0);
                Ok(Done::Delete(Fenced { version: 0, previous_version, previous_bytes, undo_bytes }))
            }
            Op::Transact(writes) => {
                // Every condition first, then every write: all or nothing.
                let mut versions = Vec::with_capacity(writes.len());
                for (index, w) in writes.iter().enumerate() {
                    let (pk, sk) = w.key();
                    let current = current(table, pk, sk)?;
                    let condition = match w {
                        Write::Put { condition, .. }
                        | Write::Delete { condition, .. }
                        | Write::Check { condition, .. } => *condition,
                    };
                    if !condition.holds(current) {
                        return Ok(Err(StorageError::ConditionFailed { index, current }));
                    }
                    versions.push(current);
                }
                for (w, current) in writes.iter().zip(versions) {
                    match w {
                        Write::Put { pk, sk, data, .. } => {
                            let version = current.unwrap_or(0) + 1;
                            table
                                .insert((pk.as_str(), sk.as_str()), encode(version, data).as_slice())
                                .map_err(backend)?;
                        }
                        Write::Delete { pk, sk, .. } => {
                            table.remove((pk.as_str(), sk.as_str())).map_err(backend)?;
                        }
                        Write::Check { .. } => {}
                    }
                }
                Ok(Done::Unit)
            }
            Op::Restore(item) => {
                table
                    .insert((item.pk.as_str(), item.sk.as_str()), encode(item.version, &item.data).as_slice())
                    .map_err(backend)?;
                Ok(Done::Unit)
            }
        })
    }
}

/// Commits `group` in one write transaction; every job gets its answer
/// once the transaction is on disk (or the error that kept it off).
pub(super) fn commit_group(db: &Database, group: Vec<Job>) {
    let mut replies = Vec::with_capacity(group.len());
    let outcome = (|| {
        let txn = db.begin_write().map_err(backend)?;
        let mut answers = Vec::with_capacity(group.len());
        {
            let mut table = txn.open_table(ITEMS).map_err(backend)?;
            for job in group {
                replies.push(job.reply);
                answers.push(job.op.apply(&mut table)?);
            }
        }
        // Dropping the uncommitted transaction on an error above discards it all.
        txn.commit().map_err(backend)?;
        Ok::<_, StorageError>(answers)
    })();
    match outcome {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = replies.len(), "a group of writes failed; none applied");
            for reply in replies {
                let _ = reply.send(Err(StorageError::Backend(e.to_string())));
            }
        }
    }
}

/// The writer thread: commits groups of waiting writes until no one can
/// send any more, or it has been idle for [`WRITER_IDLE`].
pub(super) fn writer(db: Arc<Database>, jobs: Receiver<Job>, slot: Arc<Mutex<Option<WriterHandle>>>, idle: Duration) {
    loop {
        let first = match jobs.recv_timeout(idle) {
            Ok(job) => job,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                // Retire under the slot's lock, so no write is sent to a
                // writer that is leaving; a write sent before it is done.
                let mut slot = slot.lock().expect("writer slot");
                match jobs.try_recv() {
                    Ok(job) => {
                        drop(slot);
                        commit_group(&db, vec![job]);
                        continue;
                    }
                    Err(_) => {
                        // Let go of the file before anyone can see the slot empty.
                        drop(db);
                        // Detaches this thread's own handle.
                        drop(slot.take());
                        return;
                    }
                }
            }
        };
        let mut bytes = first.op.bytes();
        let mut group = vec![first];
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match jobs.try_recv() {
                Ok(job) => {
                    bytes += job.op.bytes();
                    group.push(job);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        commit_group(&db, group);
    }
}
