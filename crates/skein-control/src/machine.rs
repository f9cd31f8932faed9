//! The state machine: the [`ControlState`] in memory, published as an immutable `Arc` after
//! every applied batch, and persisted through snapshots kept in sled. On open, the last snapshot
//! is loaded and openraft re-applies the committed log after it.

use std::io::Cursor;
use std::sync::Arc;

use arc_swap::ArcSwap;
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use skein_types::control::{Command, ControlState, Outcome};
use tokio::sync::watch;

use crate::history::{History, SpendRecord};
use crate::{Node, NodeId, TypeConfig};

const SNAPSHOT: &[u8] = b"snapshot";

/// What applying one log entry returns to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The config version the entry produced (its log index).
    pub version: u64,
    pub outcome: Outcome,
}

/// The published view of the state machine: what the proxy and the admin API read.
pub struct Published {
    state: ArcSwap<ControlState>,
    version: watch::Sender<u64>,
}

impl Published {
    fn new(state: Arc<ControlState>) -> Published {
        let version = state.version;
        Published {
            state: ArcSwap::new(state),
            version: watch::channel(version).0,
        }
    }

    /// The current state: an immutable snapshot, read without locks.
    pub fn load(&self) -> Arc<ControlState> {
        self.state.load_full()
    }

    /// Watch the applied config version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn publish(&self, state: Arc<ControlState>) {
        let version = state.version;
        self.state.store(state);
        self.version.send_replace(version);
    }
}

/// A snapshot as stored in sled: its metadata and the serialized state.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The Raft state machine over [`ControlState`].
pub struct StateMachine {
    tree: sled::Tree,
    db: sled::Db,
    state: Arc<ControlState>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    published: Arc<Published>,
    snapshot_count: u64,
    history: Arc<History>,
}

impl StateMachine {
    /// Open the state machine in `db`, starting from its last snapshot; applied spend goes to
    /// `history` as well.
    pub fn open(
        db: &sled::Db,
        history: Arc<History>,
    ) -> Result<StateMachine, StorageError<NodeId>> {
        let tree = db
            .open_tree("state_machine")
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let mut machine = StateMachine {
            tree,
            db: db.clone(),
            state: Arc::new(ControlState::default()),
            last_applied: None,
            membership: StoredMembership::default(),
            published: Arc::new(Published::new(Arc::new(ControlState::default()))),
            snapshot_count: 0,
            history,
        };
        if let Some(stored) = machine.read_snapshot()? {
            let mut state: ControlState = serde_json::from_slice(&stored.data)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            let legacy = state.take_legacy_usage();
            let index = stored.meta.last_log_id.map_or(0, |log_id| log_id.index);
            machine
                .history
                .import_legacy(&legacy, index)
                .map_err(|e| StorageIOError::read_state_machine(&e))?;
            machine.last_applied = stored.meta.last_log_id;
            machine.membership = stored.meta.last_membership.clone();
            machine.state = Arc::new(state);
            machine.published.publish(machine.state.clone());
        }
        Ok(machine)
    }

    /// The view the rest of the node reads.
    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        let Some(bytes) = self
            .tree
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

async fn store_snapshot(
    tree: &sled::Tree,
    db: &sled::Db,
    stored: &StoredSnapshot,
) -> Result<(), StorageError<NodeId>> {
    let signature = Some(stored.meta.signature());
    let bytes = serde_json::to_vec(stored)
        .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
    // Snapshots are built in a task of their own, so an older build may finish after a newer
    // snapshot was installed: keep whichever covers more of the log.
    let newer = |old: Option<&[u8]>| -> bool {
        #[derive(Deserialize)]
        struct MetaOnly {
            meta: SnapshotMeta<NodeId, Node>,
        }
        old.and_then(|old| serde_json::from_slice::<MetaOnly>(old).ok())
            .is_none_or(|old| stored.meta.last_log_id >= old.meta.last_log_id)
    };
    tree.fetch_and_update(SNAPSHOT, |old| {
        if newer(old) {
            Some(bytes.clone())
        } else {
            old.map(<[u8]>::to_vec)
        }
    })
    .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
    db.flush_async()
        .await
        .map_err(|e| StorageIOError::write_snapshot(signature, &e))?;
    Ok(())
}

/// Builds a snapshot from the state as it was when the builder was made.
pub struct SnapshotBuilder {
    tree: sled::Tree,
    db: sled::Db,
    state: Arc<ControlState>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot_id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = serde_json::to_vec(self.state.as_ref())
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        };
        let stored = StoredSnapshot { meta, data };
        store_snapshot(&self.tree, &self.db, &stored).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        // A clone of the published state shares all its maps: the changes below copy only the
        // paths they touch.
        let state = Arc::make_mut(&mut self.state);
        let mut spend = Vec::new();
        for entry in entries {
            let version = entry.log_id.index;
            self.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => state.advance(version),
                EntryPayload::Normal(proposal) => {
                    let outcome = state.apply(version, &proposal);
                    if outcome == Outcome::Applied
                        && let Command::RecordSpend { items, .. } = proposal.command
                    {
                        spend.push((version, proposal.at_ms, items));
                    }
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    state.advance(version)
                }
            };
            responses.push(ApplyResponse { version, outcome });
        }
        if !spend.is_empty() {
            let records: Vec<SpendRecord<'_>> = spend
                .iter()
                .map(|(index, at_ms, items)| SpendRecord {
                    index: *index,
                    at_ms: *at_ms,
                    items,
                })
                .collect();
            self.history
                .record(&records)
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        self.published.publish(self.state.clone());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_count += 1;
        let last = self
            .last_applied
            .map(|log_id| format!("{}-{}", log_id.leader_id, log_id.index))
            .unwrap_or_else(|| "empty".to_owned());
        SnapshotBuilder {
            tree: self.tree.clone(),
            db: self.db.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshot_id: format!("{last}-{}", self.snapshot_count),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: ControlState = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        store_snapshot(&self.tree, &self.db, &stored).await?;
        let index = meta.last_log_id.map_or(0, |log_id| log_id.index);
        self.history
            .skip_to(index, now_ms())
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.state = Arc::new(state);
        self.published.publish(self.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.read_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}
