//! The Raft log in sled: entries keyed by big-endian index in one tree, the vote, the committed
//! id and the last purged id in another. `append` reports an entry durable only after sled has
//! flushed it to disk.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The sled-backed Raft log. Cheap to clone: clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// Open (or create) the log in `db`.
    pub fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        let meta = db.open_tree("raft_meta")?;
        let committed = meta
            .get(COMMITTED)?
            .and_then(|bytes| serde_json::from_slice::<Option<LogId<NodeId>>>(&bytes).ok())
            .flatten()
            .map_or(0, |id| id.index);
        Ok(LogStore {
            db: db.clone(),
            logs: db.open_tree("raft_log")?,
            meta,
            committed: Arc::new(AtomicU64::new(committed)),
        })
    }

    /// The last committed log index this node knows of (for status reports).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        error: fn(&AnyError) -> StorageIOError<NodeId>,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let Some(bytes) = self.meta.get(key).map_err(|e| error(&AnyError::new(&e)))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| error(&AnyError::new(&e)).into())
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        error: fn(&AnyError) -> StorageIOError<NodeId>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(value).map_err(|e| error(&AnyError::new(&e)))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| error(&AnyError::new(&e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| error(&AnyError::new(&e)))?;
        Ok(())
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let Some((_, bytes)) = self.logs.last().map_err(read_logs)? else {
            return Ok(None);
        };
        let entry: Entry<TypeConfig> = serde_json::from_slice(&bytes).map_err(read_logs)?;
        Ok(Some(entry.log_id))
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_logs(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&error).into()
}

fn write_logs(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&error).into()
}

fn vote_error(error: &AnyError) -> StorageIOError<NodeId> {
    StorageIOError::new(ErrorSubject::Vote, ErrorVerb::Write, error.clone())
}

fn logs_error(error: &AnyError) -> StorageIOError<NodeId> {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, error.clone())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(index) => Bound::Included(index_key(*index)),
            Bound::Excluded(index) => Bound::Excluded(index_key(*index)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(index) => Bound::Included(index_key(*index)),
            Bound::Excluded(index) => Bound::Excluded(index_key(*index)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.logs.range::<[u8; 8], _>((start, end)) {
            let (_, bytes) = item.map_err(read_logs)?;
            entries.push(serde_json::from_slice(&bytes).map_err(read_logs)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(LAST_PURGED, logs_error)?;
        // After a crash in the middle of a purge, entries at or below the purge point may
        // remain: the last log id is never below it.
        let last_log_id = self.last_entry_id()?.max(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_meta(VOTE, vote, vote_error).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.read_meta(VOTE, vote_error)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not flushed on its own: losing it only means re-learning it from the leader.
        self.committed
            .store(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        let bytes = serde_json::to_vec(&committed).map_err(write_logs)?;
        self.meta.insert(COMMITTED, bytes).map_err(write_logs)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED, logs_error)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_logs)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(write_logs)?;
        let flushed = self.db.flush_async().await;
        match flushed {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                callback.log_io_completed(Err(std::io::Error::other(message)));
                Err(write_logs(error))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(write_logs)?;
            batch.remove(key);
        }
        self.logs.apply_batch(batch).map_err(write_logs)?;
        self.db.flush_async().await.map_err(write_logs)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.write_meta(LAST_PURGED, &log_id, logs_error).await?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(write_logs)?;
            batch.remove(key);
        }
        self.logs.apply_batch(batch).map_err(write_logs)?;
        Ok(())
    }
}
