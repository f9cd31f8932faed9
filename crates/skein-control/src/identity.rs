//! Who a node is and which cluster it belongs to, and the check every internal RPC passes.
//!
//! - A node's **incarnation** is a random id made when its storage is first created: a node
//!   that lost its data comes back with a new one, so the cluster can tell it from the node
//!   that had the id before.
//! - The **cluster id** is made once, by the cluster's first leader, and replicated. A node
//!   learns it from the replicated state, or from the first Raft message a leader sends it, and
//!   keeps it in its storage.
//! - Every Raft RPC and forwarded request carries both (gRPC metadata), and the node it is
//!   addressed to. A node refuses a message from another cluster, one meant for another node or
//!   another incarnation of itself, and one from a sender whose incarnation the cluster does not
//!   know it by, with a log line and a count by reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use tonic::metadata::MetadataMap;

use crate::NodeId;
use crate::machine::Published;

const INCARNATION: &[u8] = b"incarnation";
const CLUSTER_ID: &[u8] = b"cluster_id";

/// gRPC metadata names.
pub const CLUSTER_HEADER: &str = "x-skein-cluster";
pub const FROM_HEADER: &str = "x-skein-from";
pub const TO_HEADER: &str = "x-skein-to";

/// Why an internal message was refused (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// From a node of another cluster.
    OtherCluster,
    /// Addressed to another node id (an address now used by another node).
    OtherNode,
    /// Addressed to an earlier incarnation of this node (this node's data is new).
    StaleTarget,
    /// From a node whose incarnation is not the one the cluster knows it by.
    StaleSender,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::OtherCluster,
        Refusal::OtherNode,
        Refusal::StaleTarget,
        Refusal::StaleSender,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::OtherCluster => "other_cluster",
            Refusal::OtherNode => "other_node",
            Refusal::StaleTarget => "stale_target",
            Refusal::StaleSender => "stale_sender",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::OtherCluster => 0,
            Refusal::OtherNode => 1,
            Refusal::StaleTarget => 2,
            Refusal::StaleSender => 3,
        }
    }
}

/// A refused message: why, and a sentence for the log and the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub message: String,
}

/// This node's identity, shared by the network client and the Raft service.
pub struct Identity {
    node_id: NodeId,
    incarnation: u64,
    cluster_id: ArcSwapOption<String>,
    tree: sled::Tree,
    published: OnceLock<Arc<Published>>,
    refused: [AtomicU64; 4],
    /// When each reason was last logged (ms since the epoch), so a peer that retries every
    /// heartbeat does not flood the log.
    logged_ms: [AtomicU64; 4],
}

impl Identity {
    /// Open (or create) the identity kept in `db`.
    pub fn open(db: &sled::Db, node_id: NodeId) -> Result<Identity, String> {
        let tree = db
            .open_tree("node_identity")
            .map_err(|error| error.to_string())?;
        let incarnation = match tree.get(INCARNATION).map_err(|error| error.to_string())? {
            Some(bytes) => {
                let array: [u8; 8] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| "the stored incarnation is corrupt".to_owned())?;
                u64::from_be_bytes(array)
            }
            None => {
                let fresh = getrandom::u64().map_err(|error| format!("no randomness: {error}"))?;
                tree.insert(INCARNATION, &fresh.to_be_bytes())
                    .map_err(|error| error.to_string())?;
                tree.flush().map_err(|error| error.to_string())?;
                fresh
            }
        };
        let cluster_id = tree
            .get(CLUSTER_ID)
            .map_err(|error| error.to_string())?
            .map(|bytes| Arc::new(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Identity {
            node_id,
            incarnation,
            cluster_id: ArcSwapOption::new(cluster_id),
            tree,
            published: OnceLock::new(),
            refused: Default::default(),
            logged_ms: Default::default(),
        })
    }

    pub(crate) fn attach(&self, published: Arc<Published>) {
        let _ = self.published.set(published);
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The cluster this node belongs to, once known.
    pub fn cluster_id(&self) -> Option<Arc<String>> {
        if let Some(known) = self.cluster_id.load_full() {
            return Some(known);
        }
        let replicated = self.published.get()?.load().cluster.id.clone();
        if replicated.is_empty() {
            return None;
        }
        self.adopt(&replicated);
        self.cluster_id.load_full()
    }

    /// Take `cluster_id` as this node's cluster (kept in storage), if it has none yet.
    pub fn adopt(&self, cluster_id: &str) {
        if self.cluster_id.load().is_some() || cluster_id.is_empty() {
            return;
        }
        self.cluster_id.store(Some(Arc::new(cluster_id.to_owned())));
        if let Err(error) = self
            .tree
            .insert(CLUSTER_ID, cluster_id.as_bytes())
            .and_then(|_| self.tree.flush())
        {
            tracing::error!(%error, "could not store the cluster id");
        }
        tracing::info!(cluster_id, "this node belongs to cluster {cluster_id}");
    }

    /// The incarnation the cluster knows `node` by, if any.
    fn known_incarnation(&self, node: NodeId) -> Option<u64> {
        self.published
            .get()?
            .load()
            .cluster
            .incarnations
            .get(&node)
            .copied()
    }

    /// Stamp an outgoing message: this cluster, this node and incarnation, and the node it is
    /// for (and the incarnation the cluster knows it by), when known.
    pub fn stamp(&self, metadata: &mut MetadataMap, target: Option<NodeId>) {
        if let Some(cluster) = self.cluster_id()
            && let Ok(value) = cluster.parse()
        {
            metadata.insert(CLUSTER_HEADER, value);
        }
        if let Ok(value) = format!("{}.{:016x}", self.node_id, self.incarnation).parse() {
            metadata.insert(FROM_HEADER, value);
        }
        if let Some(target) = target {
            let text = match self.known_incarnation(target) {
                Some(incarnation) => format!("{target}.{incarnation:016x}"),
                None => target.to_string(),
            };
            if let Ok(value) = text.parse() {
                metadata.insert(TO_HEADER, value);
            }
        }
    }

    /// Check an incoming message. With `adopt`, a node that has no cluster id yet takes the
    /// sender's (Raft messages from a leader that added this node).
    pub fn admit(&self, metadata: &MetadataMap, adopt: bool) -> Result<(), Refused> {
        let header = |name: &str| metadata.get(name).and_then(|value| value.to_str().ok());
        let mut adopted = None;
        if let Some(theirs) = header(CLUSTER_HEADER) {
            match self.cluster_id() {
                Some(mine) if mine.as_str() != theirs => {
                    return Err(self.refuse(
                        Refusal::OtherCluster,
                        format!(
                            "refused a message from cluster {theirs}: node {} belongs to cluster {mine}",
                            self.node_id
                        ),
                    ));
                }
                Some(_) => {}
                None if adopt => adopted = Some(theirs),
                None => {}
            }
        }
        if let Some(to) = header(TO_HEADER) {
            let (id, incarnation) = parse_stamp(to);
            if id != Some(self.node_id) {
                return Err(self.refuse(
                    Refusal::OtherNode,
                    format!(
                        "refused a message for node {to}: this is node {}",
                        self.node_id
                    ),
                ));
            }
            if let Some(incarnation) = incarnation
                && incarnation != self.incarnation
            {
                return Err(self.refuse(
                    Refusal::StaleTarget,
                    format!(
                        "refused a message for node {} incarnation {incarnation:016x}: this node \
                         is incarnation {:016x} (its data is new); remove node {} from the \
                         cluster and it rejoins",
                        self.node_id, self.incarnation, self.node_id
                    ),
                ));
            }
        }
        if let Some(from) = header(FROM_HEADER)
            && let (Some(sender), Some(incarnation)) = parse_stamp(from)
            && let Some(known) = self.known_incarnation(sender)
            && known != incarnation
        {
            return Err(self.refuse(
                Refusal::StaleSender,
                format!(
                    "refused a message from node {sender} incarnation {incarnation:016x}: the \
                     cluster knows node {sender} as incarnation {known:016x}"
                ),
            ));
        }
        if let Some(cluster_id) = adopted {
            self.adopt(cluster_id);
        }
        Ok(())
    }

    fn refuse(&self, reason: Refusal, message: String) -> Refused {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
        let now = skein_types::now_ms();
        let last = self.logged_ms[reason.index()].load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 5_000 {
            self.logged_ms[reason.index()].store(now, Ordering::Relaxed);
            tracing::warn!(reason = reason.label(), "{message}");
        }
        Refused { reason, message }
    }

    /// Messages refused so far, by reason.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }
}

/// A new cluster id: 128 random bits in hex.
pub fn new_cluster_id() -> Result<String, String> {
    let high = getrandom::u64().map_err(|error| format!("no randomness: {error}"))?;
    let low = getrandom::u64().map_err(|error| format!("no randomness: {error}"))?;
    Ok(format!("{high:016x}{low:016x}"))
}

/// `id` or `id.incarnation-hex`.
fn parse_stamp(text: &str) -> (Option<NodeId>, Option<u64>) {
    match text.split_once('.') {
        Some((id, incarnation)) => (id.parse().ok(), u64::from_str_radix(incarnation, 16).ok()),
        None => (text.parse().ok(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(node_id: NodeId) -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let identity = Identity::open(&db, node_id).expect("identity");
        (dir, identity)
    }

    fn stamped(from: &Identity, target: Option<NodeId>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        from.stamp(&mut metadata, target);
        metadata
    }

    #[test]
    fn the_incarnation_and_cluster_id_survive_a_reopen_and_are_new_for_new_storage() {
        let dir = tempfile::tempdir().expect("dir");
        let (first, cluster) = {
            let db = sled::Config::new().path(dir.path()).open().expect("sled");
            let identity = Identity::open(&db, 1).expect("identity");
            identity.adopt("c-1");
            (identity.incarnation(), identity.cluster_id())
        };
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let reopened = Identity::open(&db, 1).expect("identity");
        assert_eq!(reopened.incarnation(), first);
        assert_eq!(reopened.cluster_id(), cluster);
        let (_other_dir, other) = identity(1);
        assert_ne!(other.incarnation(), first);
        assert_eq!(other.cluster_id(), None);
    }

    #[test]
    fn messages_from_another_cluster_or_for_another_node_are_refused() {
        let (_a, one) = identity(1);
        let (_b, two) = identity(2);
        one.adopt("cluster-a");
        // A node with no cluster yet takes the leader's.
        assert_eq!(two.admit(&stamped(&one, Some(2)), true), Ok(()));
        assert_eq!(
            two.cluster_id().as_deref().map(String::as_str),
            Some("cluster-a")
        );

        let (_c, stranger) = identity(3);
        stranger.adopt("cluster-b");
        let refused = two
            .admit(&stamped(&stranger, Some(2)), true)
            .expect_err("another cluster");
        assert_eq!(refused.reason, Refusal::OtherCluster);
        assert!(refused.message.contains("cluster-b"), "{}", refused.message);
        assert_eq!(two.refused(Refusal::OtherCluster), 1);

        let refused = two
            .admit(&stamped(&one, Some(3)), true)
            .expect_err("another node");
        assert_eq!(refused.reason, Refusal::OtherNode);
        // A message that names no target (a forwarded request) passes.
        assert_eq!(two.admit(&stamped(&one, None), false), Ok(()));
    }

    #[test]
    fn stamps_parse_back() {
        assert_eq!(parse_stamp("3"), (Some(3), None));
        assert_eq!(parse_stamp("3.00000000000000ff"), (Some(3), Some(255)));
        assert_eq!(parse_stamp("x.zz"), (None, None));
    }
}
