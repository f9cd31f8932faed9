//! Skein's control plane: a Raft group (openraft 0.9) whose log and snapshots live in sled, and
//! whose state machine is the [`ControlState`] of `skein-types`.
//!
//! - [`store::LogStore`] and [`machine::StateMachine`] implement openraft's storage-v2 traits;
//!   openraft's compliance suite runs against them (`tests/suite.rs`).
//! - [`network`] carries Raft RPCs over gRPC (`skein.raft.v1`), one cached channel per peer.
//! - [`ControlPlane`] is what the node uses: open it, serve its Raft service, propose commands
//!   from any node (writes are forwarded to the leader), and read the applied state as an
//!   immutable snapshot without locks or awaits.
//!
//! All openraft-specific code lives in this crate, so a move to openraft 0.10 stays contained.

// openraft's storage traits return its `StorageError`, which is large; helpers that feed those
// traits return it too.
#![allow(clippy::result_large_err)]

pub mod history;
pub mod identity;
pub mod journal;
pub mod machine;
pub mod network;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use skein_proto::raft::v1::RaftMessage;
use skein_proto::raft::v1::raft_client::RaftClient;
use skein_types::control::{Command, ControlState, Proposal};
use tokio::sync::watch;

pub use history::{History, UsageQuery};
pub use identity::{Identity, Refusal};
pub use journal::SpendJournal;
pub use machine::{ApplyResponse, Published};
pub use network::{Channels, Network, RaftService};

/// A node's id in the Raft group.
pub type NodeId = u64;
/// What the group knows of a node: its gRPC address.
pub type Node = BasicNode;

openraft::declare_raft_types!(
    /// Skein's Raft types: proposals in, apply responses out.
    pub TypeConfig:
        D = Proposal,
        R = ApplyResponse,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = crate::machine::SnapshotFile,
);

/// sled's page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// Build a snapshot once the log has grown by `after_logs` entries, or by an eighth of the
/// entities the state holds if that is more: building one costs in proportion to the state, so
/// spacing them in proportion keeps its cost per applied entry flat (a million keys: every
/// 125,000 entries, about 2 s of one core in a low-priority thread).
async fn snapshot_when_due(raft: Raft<TypeConfig>, published: Arc<Published>, after_logs: u64) {
    let mut versions = published.subscribe();
    let mut asked_at = 0u64;
    while versions.changed().await.is_ok() {
        let applied = *versions.borrow_and_update();
        let state = published.load();
        let entities = (state.keys.len()
            + state.teams.len()
            + state.customers.len()
            + state.budgets.len()
            + state.routes.len()
            + state.providers.len()) as u64;
        let due = after_logs.max(entities / 8);
        let last = raft
            .metrics()
            .borrow()
            .snapshot
            .map_or(0, |log_id| log_id.index);
        // Asked for one that has not been built yet: wait for it (or for twice the spacing).
        let pending = asked_at > last && applied < asked_at.saturating_add(due);
        if applied.saturating_sub(last) >= due && !pending {
            asked_at = applied;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// How long a request that needs the leader waits for one to be known.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Settings of the control plane.
#[derive(Clone)]
pub struct ControlOptions {
    pub node_id: NodeId,
    /// The gRPC address other nodes reach this one at (`host:port`).
    pub advertise_addr: String,
    /// sled lives in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many new log entries.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind the last snapshot (for followers that lag a little).
    pub keep_logs: u64,
    /// TLS towards peers (when the gRPC port speaks TLS).
    pub peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The cluster's admin token: sent with every Raft RPC, and required on incoming ones.
    pub token: Option<String>,
    /// UTC days of daily usage history kept (lifetime totals are kept regardless).
    pub usage_retention_days: u64,
}

impl ControlOptions {
    /// Defaults for a node: a dead leader is replaced in about 1–2 s, a snapshot every 5000
    /// entries.
    pub fn new(node_id: NodeId, advertise_addr: String, data_dir: PathBuf) -> ControlOptions {
        ControlOptions {
            node_id,
            advertise_addr,
            data_dir,
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_after_logs: 5000,
            keep_logs: 1000,
            peer_tls: None,
            token: None,
            usage_retention_days: skein_types::control::DAILY_HISTORY as u64,
        }
    }
}

/// Why a control-plane call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    /// No leader could be reached in time, or the cluster has no quorum.
    #[error("the control plane is unavailable: {0}")]
    Unavailable(String),
    /// The request was sent to a node that is not (or no longer) the leader.
    #[error("this node is not the leader")]
    NotLeader,
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A request only the leader can serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LeaderRequest {
    Write(Box<Proposal>),
    AddLearner {
        id: NodeId,
        addr: String,
        /// The joining node's incarnation: refused if the cluster knows the id by another.
        #[serde(default)]
        incarnation: Option<u64>,
    },
    /// Make the given nodes the voters (they must be members already).
    ChangeVoters {
        voters: BTreeSet<NodeId>,
    },
    RemoveNode {
        id: NodeId,
    },
}

/// A [`LeaderRequest`] sent to another node: to the leader (`relay` off), or to any member
/// that passes it on to the leader (`relay` on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forwarded {
    pub request: LeaderRequest,
    pub relay: bool,
}

/// The leader's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderReply {
    Applied(ApplyResponse),
    /// A membership change, committed at this log index.
    Membership {
        version: u64,
    },
}

/// What a node says of itself when asked (`Hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    pub incarnation: u64,
    /// The cluster it belongs to, once it knows.
    pub cluster_id: Option<String>,
    /// Whether it is in a group (initialized, or added by a leader).
    pub member: bool,
    /// The leader it knows of, and that leader's address.
    pub leader: Option<NodeId>,
    pub leader_addr: Option<String>,
    /// The last log index it has applied.
    pub applied: u64,
    /// The members of its group, as it knows them.
    #[serde(default)]
    pub members: Vec<NodeId>,
}

/// One node's handle on the control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft<TypeConfig>,
    published: Arc<Published>,
    channels: Channels,
    committed: Arc<AtomicU64>,
    identity: Arc<Identity>,
    journal: SpendJournal,
    history: Arc<History>,
}

impl ControlPlane {
    /// Open the node's storage and start its Raft node. The node takes part in no group until
    /// [`ControlPlane::initialize`] or a leader adds it.
    pub async fn open(options: ControlOptions) -> Result<ControlPlane, ControlError> {
        let path = options.data_dir.join("raft");
        // sled's page cache defaults to 1 GiB, which the Raft log's appends would fill; the
        // working set (the log's tail, the history of the current day) is far smaller.
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|error| {
                ControlError::Internal(format!("opening {}: {error}", path.display()))
            })?;
        let identity = Arc::new(Identity::open(&db, options.node_id).map_err(internal)?);
        let journal = SpendJournal::open(&db).map_err(internal)?;
        let log = store::LogStore::open(&db).map_err(internal)?;
        let committed = log.committed_index();
        let history = Arc::new(History::open(&db, options.usage_retention_days).map_err(internal)?);
        let machine =
            machine::StateMachine::open(&db, options.data_dir.join("snapshots"), history.clone())
                .map_err(internal)?;
        let published = machine.published();
        identity.attach(published.clone());
        let config = openraft::Config {
            cluster_name: "skein".to_owned(),
            heartbeat_interval: options.heartbeat_ms,
            election_timeout_min: options.election_timeout_min_ms,
            election_timeout_max: options.election_timeout_max_ms,
            // Snapshots are triggered by `snapshot_when_due`, after a number of entries that
            // grows with the state (a snapshot costs what the state holds).
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: options.keep_logs,
            // The last chunk of a snapshot is answered once the snapshot is installed, which
            // for a million keys takes seconds, not the default 200 ms.
            install_snapshot_timeout: 60_000,
            // An append must arrive within a heartbeat interval: keep them small for a
            // follower that is behind (bulk writes are staged in parts of 1,000 entities).
            max_payload_entries: 16,
            // Chunks of 1 MiB: the leader encodes and sends each on the runtime its proxy runs
            // on, so a chunk is a short burst of work between requests, not a long one.
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|error| ControlError::InvalidArgument(error.to_string()))?;
        let channels = Channels::new(
            options.peer_tls.clone(),
            options.token.clone(),
            identity.clone(),
        );
        let network = Network {
            channels: channels.clone(),
        };
        let raft = Raft::new(options.node_id, Arc::new(config), network, log, machine)
            .await
            .map_err(internal)?;
        tokio::spawn(snapshot_when_due(
            raft.clone(),
            published.clone(),
            options.snapshot_after_logs.max(1),
        ));
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                id: options.node_id,
                raft,
                published,
                channels,
                committed,
                identity,
                journal,
                history,
            }),
        })
    }

    /// The published view of the state machine.
    pub fn published(&self) -> &Published {
        &self.inner.published
    }

    /// This node's usage history (derived from the spend it applied).
    pub fn history(&self) -> &History {
        &self.inner.history
    }

    /// This node's spend journal.
    pub fn spend_journal(&self) -> &SpendJournal {
        &self.inner.journal
    }

    /// This node's identity: incarnation, cluster id, refused messages.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Whether this node is in a group: it was initialized, or a leader added it.
    pub fn is_member(&self) -> bool {
        self.metrics()
            .membership_config
            .membership()
            .get_node(&self.inner.id)
            .is_some()
    }

    /// Whether the Raft core is still running (it stops on a fatal error).
    pub fn is_running(&self) -> bool {
        let metrics = self.metrics();
        metrics.running_state.is_ok() && metrics.state != ServerState::Shutdown
    }

    /// What this node says of itself to a `Hello`.
    pub fn hello(&self) -> Hello {
        let metrics = self.metrics();
        let leader_addr = metrics.current_leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| node.addr.clone())
        });
        Hello {
            node_id: self.inner.id,
            incarnation: self.inner.identity.incarnation(),
            cluster_id: self
                .inner
                .identity
                .cluster_id()
                .map(|id| id.as_str().to_owned()),
            member: metrics
                .membership_config
                .membership()
                .get_node(&self.inner.id)
                .is_some(),
            leader: metrics.current_leader,
            leader_addr,
            applied: metrics.last_applied.map_or(0, |id| id.index),
            members: metrics
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
        }
    }

    /// Ask the node at `addr` who it is.
    pub async fn hello_to(&self, addr: &str) -> Result<Hello, ControlError> {
        let channel = self
            .inner
            .channels
            .get(addr)
            .map_err(|error| ControlError::Unavailable(error.to_string()))?;
        let request = self.inner.channels.request(
            RaftMessage {
                payload: Vec::new(),
                data: Vec::new(),
            },
            None,
        );
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            RaftClient::new(channel).hello(request),
        )
        .await
        .map_err(|_| ControlError::Timeout(format!("no answer from {addr}")))?
        .map_err(|status| {
            ControlError::Unavailable(format!("asking {addr}: {}", status.message()))
        })?;
        serde_json::from_slice(&reply.into_inner().payload).map_err(internal)
    }

    /// The cached channel to a peer's gRPC port (`host:port`).
    pub fn peer_channel(&self, addr: &str) -> Result<tonic::transport::Channel, ControlError> {
        self.inner
            .channels
            .get(addr)
            .map_err(|error| ControlError::Unavailable(error.to_string()))
    }

    /// A request to a peer, carrying the cluster token and this node's identity (addressed to
    /// `target` when known), as every internal RPC does.
    pub fn peer_request<T>(&self, message: T, target: Option<NodeId>) -> tonic::Request<T> {
        self.inner.channels.request(message, target)
    }

    /// The members of the group (voters and learners) with their gRPC addresses.
    pub fn members(&self) -> Vec<(NodeId, String)> {
        // Read in place: the whole metrics would be cloned for a list of a few nodes.
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The openraft handle (for metrics and the Raft service).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// The tonic service that serves Raft RPCs and forwarded requests for this node.
    pub fn service(&self) -> skein_proto::raft::v1::raft_server::RaftServer<RaftService> {
        RaftService::new(self.clone()).into_server()
    }

    /// The applied state: an immutable snapshot, read without locks or awaits.
    pub fn state(&self) -> Arc<ControlState> {
        self.inner.published.load()
    }

    /// Watch the applied config version.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.inner.published.subscribe()
    }

    /// The last committed log index this node knows of.
    pub fn committed_index(&self) -> u64 {
        self.inner.committed.load(Ordering::Relaxed)
    }

    /// The current Raft metrics of this node.
    pub fn metrics(&self) -> RaftMetrics<NodeId, Node> {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Form a group of `voters` (id → gRPC address). Every voter may call this with the same
    /// set, at the same time: a node that is already initialized (or has learned of a leader)
    /// ignores it.
    pub async fn initialize(&self, voters: BTreeMap<NodeId, String>) -> Result<(), ControlError> {
        let members: BTreeMap<NodeId, Node> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        let alone = members.len() == 1 && members.contains_key(&self.inner.id);
        match self.inner.raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(error) => return Err(ControlError::Internal(error.to_string())),
        }
        if alone && self.metrics().current_leader.is_none() {
            // A group of one need not wait out an election timeout to lead itself.
            self.inner.raft.trigger().elect().await.map_err(internal)?;
        }
        Ok(())
    }

    /// Wait until this node has applied `version` (read-your-writes on any node).
    pub async fn wait_for_version(
        &self,
        version: u64,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let mut versions = self.versions();
        let reached =
            tokio::time::timeout(timeout, versions.wait_for(|applied| *applied >= version))
                .await
                .map(|result| result.is_ok());
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(ControlError::Unavailable(
                "the node is shutting down".to_owned(),
            )),
            Err(_) => Err(ControlError::Timeout(format!(
                "this node has not applied config version {version} yet (it is at {})",
                self.state().version
            ))),
        }
    }

    /// Propose a command from `actor`, through the leader wherever it is, and wait until it is
    /// applied here too.
    pub async fn propose(
        &self,
        actor: &str,
        command: Command,
    ) -> Result<ApplyResponse, ControlError> {
        self.propose_with(actor, command, false).await
    }

    /// [`ControlPlane::propose`] a put that must not overwrite an existing entity (a create;
    /// refused at apply with `AlreadyExists`).
    pub async fn propose_create(
        &self,
        actor: &str,
        command: Command,
    ) -> Result<ApplyResponse, ControlError> {
        self.propose_with(actor, command, true).await
    }

    /// [`ControlPlane::propose`] a command that may safely be applied twice (a lease grant
    /// or return): a leader that does not answer within `attempt` is asked again, or its
    /// successor, rather than waited for until the deadline (a leader cut off from the
    /// network never answers; the group elects another within a couple of seconds).
    pub async fn propose_retrying(
        &self,
        actor: &str,
        command: Command,
        attempt: Duration,
    ) -> Result<ApplyResponse, ControlError> {
        self.propose_inner(actor, command, false, Some(attempt))
            .await
    }

    async fn propose_with(
        &self,
        actor: &str,
        command: Command,
        create_only: bool,
    ) -> Result<ApplyResponse, ControlError> {
        self.propose_inner(actor, command, create_only, None).await
    }

    async fn propose_inner(
        &self,
        actor: &str,
        command: Command,
        create_only: bool,
        attempt: Option<Duration>,
    ) -> Result<ApplyResponse, ControlError> {
        let proposal = Proposal {
            actor: actor.to_owned(),
            at_ms: skein_types::now_ms(),
            command,
            create_only,
        };
        match self
            .to_leader_with(LeaderRequest::Write(Box::new(proposal)), attempt)
            .await?
        {
            LeaderReply::Applied(response) => {
                self.wait_for_version(response.version, LEADER_WAIT).await?;
                Ok(response)
            }
            LeaderReply::Membership { .. } => Err(ControlError::Internal(
                "the leader answered a write with a membership change".to_owned(),
            )),
        }
    }

    /// Send a request to the leader (this node or another), retrying while the leader changes.
    pub async fn to_leader(&self, request: LeaderRequest) -> Result<LeaderReply, ControlError> {
        self.to_leader_with(request, None).await
    }

    /// [`ControlPlane::to_leader`]; with `attempt`, a forward that gets no answer within it is
    /// tried again (the request must be safe to apply twice).
    async fn to_leader_with(
        &self,
        request: LeaderRequest,
        attempt: Option<Duration>,
    ) -> Result<LeaderReply, ControlError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut last_error = ControlError::Unavailable("no leader is known".to_owned());
        while Instant::now() < deadline {
            let metrics = self.metrics();
            let left = deadline.saturating_duration_since(Instant::now());
            let late = || {
                ControlError::Timeout(
                    "no answer from the leader in time; the change may or may not be applied"
                        .to_owned(),
                )
            };
            match metrics.current_leader {
                Some(leader) if leader == self.inner.id => {
                    match tokio::time::timeout(left, self.handle_as_leader(request.clone())).await {
                        Err(_) => return Err(late()),
                        Ok(Err(ControlError::NotLeader)) => last_error = ControlError::NotLeader,
                        Ok(other) => return other,
                    }
                }
                Some(leader) => {
                    let addr = metrics
                        .membership_config
                        .membership()
                        .get_node(&leader)
                        .map(|node| node.addr.clone());
                    match addr {
                        Some(addr) => match tokio::time::timeout(
                            attempt.map_or(left, |attempt| attempt.min(left)),
                            self.forward_to(&addr, &request, false),
                        )
                        .await
                        {
                            Err(_) if attempt.is_some() => {
                                last_error = ControlError::Unavailable(format!(
                                    "the leader, node {leader}, did not answer in time"
                                ));
                            }
                            Err(_) => return Err(late()),
                            Ok(Err(
                                error @ (ControlError::NotLeader | ControlError::Unavailable(_)),
                            )) => {
                                // Retried: a write that did reach a leader before it went away
                                // may then be refused as a duplicate, which callers check.
                                last_error = error;
                            }
                            Ok(other) => return other,
                        },
                        None => {
                            last_error = ControlError::Unavailable(format!(
                                "the leader, node {leader}, has no known address"
                            ));
                        }
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(match last_error {
            ControlError::NotLeader => {
                ControlError::Unavailable("the leader keeps changing".to_owned())
            }
            other => other,
        })
    }

    /// Send a request to the member at `addr`. With `relay`, that member passes it on to the
    /// leader (used to join a cluster through any member); without, it must be the leader.
    pub async fn forward_to(
        &self,
        addr: &str,
        request: &LeaderRequest,
        relay: bool,
    ) -> Result<LeaderReply, ControlError> {
        let forwarded = Forwarded {
            request: request.clone(),
            relay,
        };
        self.send_forwarded(addr, &forwarded).await
    }

    async fn send_forwarded(
        &self,
        addr: &str,
        forwarded: &Forwarded,
    ) -> Result<LeaderReply, ControlError> {
        let channel = self
            .inner
            .channels
            .get(addr)
            .map_err(|error| ControlError::Unavailable(error.to_string()))?;
        let payload = serde_json::to_vec(forwarded).map_err(internal)?;
        let reply = RaftClient::new(channel)
            .forward(self.inner.channels.request(
                RaftMessage {
                    payload,
                    data: Vec::new(),
                },
                None,
            ))
            .await
            .map_err(|status| {
                ControlError::Unavailable(format!("forwarding to {addr}: {}", status.message()))
            })?;
        serde_json::from_slice::<Result<LeaderReply, ControlError>>(&reply.into_inner().payload)
            .map_err(internal)?
    }

    /// Serve a forwarded request: on this node if `relay` is off, else through the leader.
    pub async fn handle_forwarded(
        &self,
        forwarded: Forwarded,
    ) -> Result<LeaderReply, ControlError> {
        if forwarded.relay {
            self.to_leader(forwarded.request).await
        } else {
            self.handle_as_leader(forwarded.request).await
        }
    }

    /// Serve a request that needs the leader, on this node. Answers `NotLeader` if this node
    /// is not the leader (the caller then finds the leader again).
    pub async fn handle_as_leader(
        &self,
        request: LeaderRequest,
    ) -> Result<LeaderReply, ControlError> {
        let raft = &self.inner.raft;
        let result = match request {
            LeaderRequest::Write(mut proposal) => {
                // The leader's clock, not the proposer's: leases lapse by the state's clock,
                // which a node with a clock far ahead must not be able to move.
                proposal.at_ms = skein_types::now_ms();
                return raft
                    .client_write(*proposal)
                    .await
                    .map(|response| LeaderReply::Applied(response.data))
                    .map_err(write_error);
            }
            LeaderRequest::AddLearner {
                id,
                addr,
                incarnation,
            } => {
                if let Some(incarnation) = incarnation {
                    // Known first, so a node that lost its data cannot take the old one's place.
                    let registered = self
                        .write_here(Command::RegisterNode {
                            node: id,
                            incarnation,
                        })
                        .await?;
                    if let skein_types::control::Outcome::Rejected(rejection) = registered.outcome {
                        return Err(ControlError::InvalidArgument(rejection.message));
                    }
                }
                raft.add_learner(id, BasicNode { addr }, true).await
            }
            LeaderRequest::ChangeVoters { voters } => {
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                    .await
            }
            LeaderRequest::RemoveNode { id } => {
                let metrics = self.metrics();
                let membership = metrics.membership_config.membership();
                if membership.voter_ids().any(|voter| voter == id) {
                    let voters: BTreeSet<NodeId> = membership
                        .voter_ids()
                        .filter(|voter| *voter != id)
                        .collect();
                    raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                        .await
                        .map_err(write_error)?;
                }
                let removed = raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await;
                if removed.is_ok() {
                    // The id may rejoin, with new storage.
                    self.write_here(Command::ForgetNode { node: id }).await?;
                }
                removed
            }
        };
        result
            .map(|response| LeaderReply::Membership {
                version: response.log_id.index,
            })
            .map_err(write_error)
    }

    /// Write a command on this node, which must be the leader.
    async fn write_here(&self, command: Command) -> Result<ApplyResponse, ControlError> {
        let proposal = Proposal {
            actor: "cluster".to_owned(),
            at_ms: skein_types::now_ms(),
            command,
            create_only: false,
        };
        self.inner
            .raft
            .client_write(proposal)
            .await
            .map(|response| response.data)
            .map_err(write_error)
    }

    /// This node's Raft role, as status reports spell it.
    pub fn role(&self) -> &'static str {
        match self.metrics().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }

    /// Whether this node is the leader right now.
    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// Ask this node to build a snapshot now; returns the log index it covers once built.
    pub async fn snapshot(&self) -> Result<u64, ControlError> {
        let applied = self.metrics().last_applied.map(|id| id.index).unwrap_or(0);
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(internal)?;
        let metrics = self
            .inner
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |metrics| metrics.snapshot.is_some_and(|id| id.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|error| ControlError::Timeout(error.to_string()))?;
        Ok(metrics.snapshot.map(|id| id.index).unwrap_or(0))
    }

    /// Stop the Raft node and release its storage.
    pub async fn shutdown(&self) {
        if let Err(error) = self.inner.raft.shutdown().await {
            tracing::warn!(%error, "the Raft node did not shut down cleanly");
        }
    }
}

fn write_error(error: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> ControlError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ControlError::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            ControlError::InvalidArgument(error.to_string())
        }
        RaftError::Fatal(error) => ControlError::Unavailable(error.to_string()),
    }
}

fn internal(error: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(error.to_string())
}
