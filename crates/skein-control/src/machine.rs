//! The state machine: the [`ControlState`] in memory, published as an immutable `Arc` after
//! every applied batch, and persisted through snapshot files (JSON lines, one per entity). On
//! open, the last snapshot is loaded and openraft re-applies the committed log after it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use skein_types::control::{Command, ControlState, Outcome};
use tokio::io::{AsyncRead, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::history::{History, SpendRecord};
use crate::{Node, NodeId, TypeConfig};

/// Which snapshot file is current (`StoredMeta`).
const META: &[u8] = b"snapshot_file";
/// Where an earlier version kept its whole-state snapshot.
const LEGACY: &[u8] = b"snapshot";

/// What applying one log entry returns to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The config version the entry produced (its log index).
    pub version: u64,
    pub outcome: Outcome,
}

/// What an applied batch held, for its timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// At least one spend record.
    Spend,
    /// Config changes and Raft's own entries only.
    Config,
}

/// Told how long each applied batch took.
pub type ApplyObserver = Box<dyn Fn(BatchKind, std::time::Duration) + Send + Sync>;

/// The published view of the state machine: what the proxy and the admin API read.
pub struct Published {
    state: ArcSwap<ControlState>,
    version: watch::Sender<u64>,
    observer: std::sync::OnceLock<ApplyObserver>,
}

impl Published {
    fn new(state: Arc<ControlState>) -> Published {
        let version = state.version;
        Published {
            state: ArcSwap::new(state),
            version: watch::channel(version).0,
            observer: std::sync::OnceLock::new(),
        }
    }

    /// The current state: an immutable snapshot, read without locks.
    pub fn load(&self) -> Arc<ControlState> {
        self.state.load_full()
    }

    /// Be told how long each applied batch takes (set once; later calls are ignored).
    pub fn observe_apply(&self, observer: ApplyObserver) {
        let _ = self.observer.set(observer);
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

/// Where the current snapshot is: its metadata and its file in the snapshot directory.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    meta: SnapshotMeta<NodeId, Node>,
    file: String,
}

/// A snapshot's metadata and the state read from it.
type Loaded = (SnapshotMeta<NodeId, Node>, ControlState);

/// A snapshot of an earlier version, stored whole in sled (read once, on upgrade).
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The Raft state machine over [`ControlState`]. Snapshots are files of JSON lines (one per
/// entity) in a directory of their own, written and read as streams in blocking threads, so
/// neither side holds the serialized state whole and the proxy's threads never wait on them;
/// sled holds only which file is current.
pub struct StateMachine {
    tree: sled::Tree,
    db: sled::Db,
    dir: PathBuf,
    state: Arc<ControlState>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    published: Arc<Published>,
    snapshot_count: u64,
    history: Arc<History>,
    /// The file the snapshot being received is written to.
    receiving: Option<PathBuf>,
}

fn read_error(error: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, error).into()
}

impl StateMachine {
    /// Open the state machine in `db` with its snapshot files in `dir`, starting from its last
    /// snapshot; applied spend goes to `history` as well.
    pub fn open(
        db: &sled::Db,
        dir: PathBuf,
        history: Arc<History>,
    ) -> Result<StateMachine, StorageError<NodeId>> {
        let tree = db
            .open_tree("state_machine")
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        std::fs::create_dir_all(&dir).map_err(|e| read_error(&e))?;
        let mut machine = StateMachine {
            tree,
            db: db.clone(),
            dir,
            state: Arc::new(ControlState::default()),
            last_applied: None,
            membership: StoredMembership::default(),
            published: Arc::new(Published::new(Arc::new(ControlState::default()))),
            snapshot_count: 0,
            history,
            receiving: None,
        };
        let loaded = match machine.read_meta()? {
            Some(stored) => {
                let file = std::fs::File::open(machine.dir.join(&stored.file))
                    .map_err(|e| read_error(&e))?;
                let state = ControlState::read_snapshot(&mut std::io::BufReader::new(file))
                    .map_err(|e| read_error(&e))?;
                Some((stored.meta, state))
            }
            None => machine.read_legacy()?,
        };
        if let Some((meta, mut state)) = loaded {
            let legacy = state.take_legacy_usage();
            let index = meta.last_log_id.map_or(0, |log_id| log_id.index);
            machine
                .history
                .import_legacy(&legacy, index)
                .map_err(|e| StorageIOError::read_state_machine(&e))?;
            machine.last_applied = meta.last_log_id;
            machine.membership = meta.last_membership.clone();
            machine.state = Arc::new(state);
            machine.published.publish(machine.state.clone());
        }
        machine.remove_stale_files();
        Ok(machine)
    }

    /// The view the rest of the node reads.
    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    fn read_meta(&self) -> Result<Option<StoredMeta>, StorageError<NodeId>> {
        let Some(bytes) = self.tree.get(META).map_err(|e| read_error(&e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| read_error(&e))
    }

    /// The whole-state snapshot an earlier version kept in sled, if there is one.
    fn read_legacy(&self) -> Result<Option<Loaded>, StorageError<NodeId>> {
        let Some(bytes) = self.tree.get(LEGACY).map_err(|e| read_error(&e))? else {
            return Ok(None);
        };
        let stored: LegacySnapshot = serde_json::from_slice(&bytes).map_err(|e| read_error(&e))?;
        let state: ControlState =
            serde_json::from_slice(&stored.data).map_err(|e| read_error(&e))?;
        Ok(Some((stored.meta, state)))
    }

    /// Delete snapshot files that are not the current one (left by a crash or replaced).
    fn remove_stale_files(&self) {
        let current = self.read_meta().ok().flatten().map(|stored| stored.file);
        remove_other_files(&self.dir, current.as_deref());
    }
}

fn remove_other_files(dir: &Path, keep: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if keep.is_some_and(|keep| name == keep) {
            continue;
        }
        if let Err(error) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %entry.path().display(), %error, "could not remove an old snapshot file");
        }
    }
}

/// The file name of a snapshot: its id, with anything but letters, digits, `-` and `_`
/// replaced (the id of a received snapshot comes from the leader).
fn file_name(meta: &SnapshotMeta<NodeId, Node>) -> String {
    let id: String = meta
        .snapshot_id
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("snapshot-{id}.jsonl")
}

/// Lower the current thread's CPU priority to `nice` (for good: for threads that only do
/// background work); whether it took.
pub(crate) fn lower_this_thread(nice: i32) -> bool {
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice).is_ok()
}

/// Runs the current thread at the lowest CPU priority (nice 19) until dropped: building or
/// reading a large snapshot takes seconds of CPU that the proxy's threads, and the other nodes
/// on the same machine, should get first. Blocking-pool threads are reused, so it is undone.
struct LowPriority {
    thread: Option<rustix::process::Pid>,
    before: i32,
}

impl LowPriority {
    fn enter() -> LowPriority {
        let thread = rustix::thread::gettid();
        let before = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
        LowPriority {
            thread: lower_this_thread(19).then_some(thread),
            before,
        }
    }
}

impl Drop for LowPriority {
    fn drop(&mut self) {
        if let Some(thread) = self.thread {
            // Raising a priority back needs privileges an unprivileged process lacks; such a
            // thread then stays low, which only slows later blocking work a little.
            let _ = rustix::process::setpriority_process(Some(thread), self.before);
        }
    }
}

fn temp_name() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        bytes = u64::from(std::process::id()).to_le_bytes();
    }
    format!("incoming-{:016x}.tmp", u64::from_le_bytes(bytes))
}

/// Write `write` into a temporary file in `dir`, sync it and move it to `name`.
fn write_file(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let temp = dir.join(temp_name());
    let result = (|| {
        let file = std::fs::File::create(&temp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        write(&mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()?;
        std::fs::rename(&temp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Make `stored` the current snapshot unless the current one covers more of the log (snapshots
/// are built in a task of their own, so an older build may finish after a newer install), and
/// delete the files of the others.
async fn store_meta(
    tree: &sled::Tree,
    db: &sled::Db,
    dir: &Path,
    stored: &StoredMeta,
) -> Result<(), StorageError<NodeId>> {
    let signature = Some(stored.meta.signature());
    let write_error = |e: &dyn std::error::Error| -> StorageError<NodeId> {
        StorageIOError::write_snapshot(signature.clone(), AnyError::error(e.to_string())).into()
    };
    let bytes = serde_json::to_vec(stored).map_err(|e| write_error(&e))?;
    let newer = |old: Option<&[u8]>| -> bool {
        #[derive(Deserialize)]
        struct MetaOnly {
            meta: SnapshotMeta<NodeId, Node>,
        }
        old.and_then(|old| serde_json::from_slice::<MetaOnly>(old).ok())
            .is_none_or(|old| stored.meta.last_log_id >= old.meta.last_log_id)
    };
    let previous = tree
        .fetch_and_update(META, |old| {
            if newer(old) {
                Some(bytes.clone())
            } else {
                old.map(<[u8]>::to_vec)
            }
        })
        .map_err(|e| write_error(&e))?;
    tree.remove(LEGACY).map_err(|e| write_error(&e))?;
    db.flush_async().await.map_err(|e| write_error(&e))?;
    let current = if newer(previous.as_deref()) {
        stored.file.clone()
    } else {
        previous
            .and_then(|old| serde_json::from_slice::<StoredMeta>(&old).ok())
            .map_or_else(|| stored.file.clone(), |old| old.file)
    };
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || remove_other_files(&dir, Some(&current))).await;
    Ok(())
}

/// Builds a snapshot from the state as it was when the builder was made (a clone that shares
/// the maps: applying goes on meanwhile without changing what is written).
pub struct SnapshotBuilder {
    tree: sled::Tree,
    db: sled::Db,
    dir: PathBuf,
    state: Arc<ControlState>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot_id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        };
        let signature = Some(meta.signature());
        let stored = StoredMeta {
            file: file_name(&meta),
            meta,
        };
        let (dir, file, state) = (self.dir.clone(), stored.file.clone(), self.state.clone());
        tokio::task::spawn_blocking(move || {
            let _low = LowPriority::enter();
            write_file(&dir, &file, |out| state.write_snapshot(out))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?
        .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        let opened = tokio::fs::File::open(self.dir.join(&stored.file))
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        store_meta(&self.tree, &self.db, &self.dir, &stored).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(SnapshotFile::new(opened)),
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
        let started = std::time::Instant::now();
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
        let kind = if spend.is_empty() {
            BatchKind::Config
        } else {
            BatchKind::Spend
        };
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
        if let Some(observer) = self.published.observer.get() {
            observer(kind, started.elapsed());
        }
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
            dir: self.dir.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshot_id: format!("{last}-{}", self.snapshot_count),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotFile>, StorageError<NodeId>> {
        if let Some(abandoned) = self.receiving.take() {
            let _ = tokio::fs::remove_file(abandoned).await;
        }
        let path = self.dir.join(temp_name());
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.receiving = Some(path);
        Ok(Box::new(SnapshotFile::new(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError<NodeId>> {
        let signature = Some(meta.signature());
        let failed = |e: &dyn std::error::Error| -> StorageError<NodeId> {
            StorageIOError::read_snapshot(signature.clone(), AnyError::error(e.to_string())).into()
        };
        let mut received = *snapshot;
        received.flush().await.map_err(|e| failed(&e))?;
        received
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| failed(&e))?;
        let mut received = received.into_std().await;
        let stored = StoredMeta {
            file: file_name(meta),
            meta: meta.clone(),
        };
        // The file received through `begin_receiving_snapshot` becomes the snapshot's own (a
        // rename); any other (one being read by a send elsewhere) is copied. Then the state is
        // read from it, line by line.
        let (dir, file) = (self.dir.clone(), stored.file.clone());
        let receiving = self.receiving.take();
        let state = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let _low = LowPriority::enter();
            let ours = match (&receiving, received.metadata()) {
                (Some(path), Ok(open)) => std::fs::metadata(path)
                    .is_ok_and(|named| named.ino() == open.ino() && named.dev() == open.dev()),
                _ => false,
            };
            match receiving {
                Some(path) if ours => {
                    received.sync_all()?;
                    std::fs::rename(&path, dir.join(&file))?;
                    std::fs::File::open(&dir)?.sync_all()?;
                }
                receiving => {
                    write_file(&dir, &file, |out| {
                        std::io::copy(&mut received, out).map(|_| ())
                    })?;
                    if let Some(path) = receiving {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            let copy = std::fs::File::open(dir.join(&file))?;
            ControlState::read_snapshot(&mut std::io::BufReader::with_capacity(1 << 20, copy))
        })
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
        store_meta(&self.tree, &self.db, &self.dir, &stored).await?;
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
        let Some(stored) = self.read_meta()? else {
            return Ok(None);
        };
        let file = tokio::fs::File::open(self.dir.join(&stored.file))
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(SnapshotFile::new(file)),
        }))
    }
}

/// A snapshot file whose reads, writes and seeks (a blocking call each, as `tokio::fs::File`
/// makes them) run on the snapshot runtime's own blocking thread, at the lowest CPU priority,
/// instead of the node's blocking pool: sending a large snapshot to a learner then takes what
/// CPU the proxy leaves.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
}

impl SnapshotFile {
    pub fn new(file: tokio::fs::File) -> SnapshotFile {
        SnapshotFile { file }
    }

    /// The file, for the blocking work that follows an install.
    pub async fn into_std(self) -> std::fs::File {
        self.file.into_std().await
    }
}

/// Run `poll` with the snapshot runtime as the current one (so that the file's blocking calls
/// go to its pool), if there is one.
fn on_snapshot_runtime<T>(poll: impl FnOnce() -> T) -> T {
    let _entered = crate::network::snapshot_runtime().map(|runtime| runtime.enter());
    poll()
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).poll_read(cx, buf))
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).poll_shutdown(cx))
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(
        self: std::pin::Pin<&mut Self>,
        position: std::io::SeekFrom,
    ) -> std::io::Result<()> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).start_seek(position))
    }

    fn poll_complete(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<u64>> {
        let file = &mut self.get_mut().file;
        on_snapshot_runtime(|| std::pin::Pin::new(file).poll_complete(cx))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::UsageQuery;

    /// A node upgraded from the version that kept one whole-state snapshot in sled, usage
    /// inside it, starts from that snapshot and moves the usage into its history, once.
    #[test]
    fn a_snapshot_of_the_earlier_format_is_read_and_its_usage_moves_to_the_history() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path().join("raft")).expect("sled");
        let day = 1_795_305_600_000u64;
        let totals = serde_json::json!({"requests": 2, "input_tokens": 10, "output_tokens": 5, "cost_nanos": 100});
        let old_state = serde_json::json!({
            "version": 7,
            "bootstrapped": true,
            "routing_version": 2,
            "server": skein_types::config::ServerSpec::default(),
            "providers": {}, "routes": {},
            "keys": {"k1": {"id": "k1", "name": "k1", "hash": "a".repeat(64), "prefix": "sk-skein-ab"}},
            "key_hashes": {"a".repeat(64): "k1"},
            "teams": {}, "customers": {}, "budgets": {}, "ledgers": {}, "prices": {},
            "spend_seqs": {"1": 3},
            "usage": {"k1": {"m": totals}},
            "daily_usage": {"k1": [[day, {"m": totals}]]},
            "audit": [],
            "cluster": {"id": "c", "target_voters": 1, "incarnations": {}}
        });
        let meta = SnapshotMeta::<NodeId, Node> {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 7)),
            last_membership: StoredMembership::default(),
            snapshot_id: "old".to_owned(),
        };
        let data = serde_json::to_vec(&old_state).expect("state");
        let stored = serde_json::json!({"meta": meta, "data": data});
        db.open_tree("state_machine")
            .expect("tree")
            .insert(LEGACY, serde_json::to_vec(&stored).expect("stored"))
            .expect("insert");

        let history = Arc::new(History::open(&db, 400).expect("history"));
        let machine =
            StateMachine::open(&db, dir.path().join("snapshots"), history.clone()).expect("open");
        let state = machine.published().load();
        assert_eq!(state.version, 7);
        assert_eq!(state.spend_seqs.get(&1), Some(&3));
        assert!(state.key_by_hash(&"a".repeat(64)).is_some());
        assert!(state.indexes_consistent());
        assert_eq!(history.applied().expect("applied"), 7);
        let lifetime = history
            .query(&UsageQuery::default(), |_| true)
            .expect("lifetime");
        assert_eq!(lifetime[&("k1".into(), "m".into())].cost_nanos, 100);
        let that_day = UsageQuery {
            since_ms: day,
            until_ms: day + 86_400_000,
            ..UsageQuery::default()
        };
        let daily = history.query(&that_day, |_| true).expect("daily");
        assert_eq!(daily[&("k1".into(), "m".into())].requests, 2);

        // Opening again (a restart before any new snapshot) imports nothing twice.
        drop(machine);
        let again =
            StateMachine::open(&db, dir.path().join("snapshots"), history.clone()).expect("reopen");
        assert_eq!(again.published().load().version, 7);
        let lifetime = history
            .query(&UsageQuery::default(), |_| true)
            .expect("lifetime");
        assert_eq!(lifetime[&("k1".into(), "m".into())].requests, 2);
    }
}
