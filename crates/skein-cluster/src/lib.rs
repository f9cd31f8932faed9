//! Gossip membership on chitchat 0.13: each node publishes what it is (id, addresses, version,
//! readiness, Raft role, applied config index) in its own key space, and reads everyone's.
//!
//! Gossip carries only soft state: it is lost on a full restart by design, and converges within
//! about one gossip interval. Key names are constants in [`keys`]; values are read and written
//! through [`NodeInfo`], never by hand.
//!
//! This is the first step of the cluster layer: membership. Provider-key health and rate-limit
//! counters come next, through the same typed accessors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, ProtocolVersion,
    spawn_chitchat,
};

/// Every gossip key Skein uses. A node writes only its own; readers go through [`NodeInfo`].
pub mod keys {
    /// The node's Raft id.
    pub const NODE_ID: &str = "node:id";
    /// The proxy API address (`host:port`).
    pub const HTTP_ADDR: &str = "node:http";
    /// The admin/Raft gRPC address (`host:port`).
    pub const GRPC_ADDR: &str = "node:grpc";
    /// The Skein version.
    pub const VERSION: &str = "node:version";
    /// `true` while the node serves traffic; `false` from the start of a shutdown.
    pub const READY: &str = "node:ready";
    /// `leader`, `follower`, `candidate` or `learner`.
    pub const RAFT_ROLE: &str = "raft:role";
    /// The config version (Raft log index) the node has applied.
    pub const APPLIED_INDEX: &str = "raft:applied";
    /// `health:<provider>/<key name>` → the publishing node's report on a provider key: the
    /// wall-clock ms until which it keeps the key cooled down (after a 429 or repeated
    /// failures), its use of the key this minute, and the upstream's last `x-ratelimit-*`
    /// figures (`skein_core::shared::KeyReport`).
    pub const HEALTH_PREFIX: &str = "health:";
    /// `deployment:<provider>/<model>` → the publishing node's error rate and latency EWMA
    /// for that deployment (`skein_core::shared::DeploymentReport`), while it uses it.
    pub const DEPLOYMENT_PREFIX: &str = "deployment:";
    /// `limit:<pool>` → the publishing node's report on one cluster-wide rate limit (its
    /// use, demand and gifts in the current window; see `skein_core::limits`).
    pub const LIMIT_PREFIX: &str = "limit:";
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: u64,
    pub http_addr: String,
    pub grpc_addr: String,
    pub version: String,
    pub ready: bool,
    pub raft_role: String,
    pub applied_index: u64,
}

impl NodeInfo {
    fn key_values(&self) -> Vec<(String, String)> {
        vec![
            (keys::NODE_ID.to_owned(), self.node_id.to_string()),
            (keys::HTTP_ADDR.to_owned(), self.http_addr.clone()),
            (keys::GRPC_ADDR.to_owned(), self.grpc_addr.clone()),
            (keys::VERSION.to_owned(), self.version.clone()),
            (keys::READY.to_owned(), self.ready.to_string()),
            (keys::RAFT_ROLE.to_owned(), self.raft_role.clone()),
            (
                keys::APPLIED_INDEX.to_owned(),
                self.applied_index.to_string(),
            ),
        ]
    }

    /// Read a node's published info; `None` until it has published all of it.
    pub fn from_state(state: &NodeState) -> Option<NodeInfo> {
        Some(NodeInfo {
            node_id: state.get(keys::NODE_ID)?.parse().ok()?,
            http_addr: state.get(keys::HTTP_ADDR)?.to_owned(),
            grpc_addr: state.get(keys::GRPC_ADDR)?.to_owned(),
            version: state.get(keys::VERSION)?.to_owned(),
            ready: state.get(keys::READY)? == "true",
            raft_role: state.get(keys::RAFT_ROLE)?.to_owned(),
            applied_index: state.get(keys::APPLIED_INDEX)?.parse().ok()?,
        })
    }
}

/// Gossip settings.
#[derive(Debug, Clone)]
pub struct GossipOptions {
    /// Nodes of different clusters ignore each other.
    pub cluster_id: String,
    /// The UDP address to listen on.
    pub listen_addr: SocketAddr,
    /// The address peers reach this node at (the listen address unless behind NAT).
    pub advertise_addr: SocketAddr,
    /// `host:port` of other nodes; names are re-resolved, so a Kubernetes headless Service
    /// works as the only seed.
    pub seeds: Vec<String>,
    pub interval: Duration,
    /// How long without news before a node is declared dead (roughly; phi-accrual).
    pub failure_detector: FailureDetectorConfig,
}

impl GossipOptions {
    /// Defaults: a 200 ms interval, and a failure detector that declares a silent node dead
    /// in about 4 s (phi-accrual with threshold 8: about 18 intervals).
    pub fn new(listen_addr: SocketAddr, seeds: Vec<String>) -> GossipOptions {
        GossipOptions {
            cluster_id: "skein".to_owned(),
            listen_addr,
            advertise_addr: listen_addr,
            seeds,
            interval: Duration::from_millis(200),
            failure_detector: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(2),
                initial_interval: Duration::from_millis(200),
                dead_node_grace_period: Duration::from_secs(3600),
            },
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub gossip_addr: SocketAddr,
    /// When this incarnation of the node started (wall-clock ms; its gossip generation).
    pub started_ms: u64,
    pub live: bool,
    /// `None` while the node has not published its info yet.
    pub info: Option<NodeInfo>,
}

/// Gossip traffic of this node, counted at the transport.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// A transport that counts what passes through another one.
pub struct CountingTransport<T> {
    inner: T,
    stats: Arc<GossipStats>,
}

impl<T: Transport> CountingTransport<T> {
    pub fn new(inner: T) -> CountingTransport<T> {
        CountingTransport {
            inner,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }
}

#[async_trait::async_trait]
impl<T: Transport> Transport for CountingTransport<T> {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket {
            inner: self.inner.open(listen_addr).await?,
            stats: self.stats.clone(),
        }))
    }
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    stats: Arc<GossipStats>,
}

#[async_trait::async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: chitchat::ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let outcome = self.inner.send(to, envelope).await?;
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(outcome.num_bytes_sent as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(outcome.num_bytes_received as u64, Ordering::Relaxed);
        Ok(outcome)
    }
}

/// This node's gossip agent.
pub struct Gossip {
    handle: ChitchatHandle,
}

impl Gossip {
    /// Start gossiping as `info` over `transport` (UDP in production, channels in tests).
    /// A restarted node gets a new generation (its start time), as chitchat requires.
    pub async fn start(
        options: GossipOptions,
        info: &NodeInfo,
        transport: &dyn Transport,
    ) -> anyhow::Result<Gossip> {
        let generation = skein_types::now_ms();
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                format!("node-{}", info.node_id),
                generation,
                options.advertise_addr,
            ),
            cluster_id: options.cluster_id,
            gossip_interval: options.interval,
            listen_addr: options.listen_addr,
            seed_nodes: options.seeds,
            failure_detector_config: options.failure_detector,
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(config, info.key_values(), transport)
            .await
            .context("starting gossip")?;
        Ok(Gossip { handle })
    }

    /// Publish a new version of this node's info.
    pub async fn publish(&self, info: &NodeInfo) {
        let chitchat = self.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (key, value) in info.key_values() {
            state.set(key, value);
        }
    }

    /// Publish soft-state entries (full gossip key, value), each with a TTL so that entries
    /// this node stops refreshing disappear on their own. Unchanged values are left alone.
    pub async fn publish_entries(&self, entries: &[(String, String)]) {
        let chitchat = self.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (key, value) in entries {
            state.set_with_ttl(key, value);
        }
    }

    /// Start a gossip round with every live peer now, rather than at the next interval (for
    /// news that should not wait, such as a key that just started cooling down).
    pub async fn gossip_now(&self) {
        let peers: Vec<SocketAddr> = {
            let chitchat = self.handle.chitchat();
            let chitchat = chitchat.lock().await;
            let me = chitchat.self_chitchat_id().clone();
            chitchat
                .live_nodes()
                .filter(|id| **id != me)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        for peer in peers {
            let _ = self.handle.gossip(peer);
        }
    }

    /// Call `callback(name after the prefix, value)` whenever any node's entry under `prefix`
    /// changes here (as gossip delivers it), until the returned handle is dropped.
    pub async fn subscribe(
        &self,
        prefix: &str,
        callback: impl Fn(&str, &str) + Send + Sync + 'static,
    ) -> chitchat::ListenerHandle {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        chitchat.subscribe_event(prefix, move |event| callback(event.key, event.value))
    }

    /// The entries under `prefix` that the other live nodes publish: `(name after the
    /// prefix, value)`.
    pub async fn remote_entries(&self, prefix: &str) -> Vec<(String, String)> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let me = chitchat.self_chitchat_id().clone();
        let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
        let mut entries = Vec::new();
        for id in live.iter().filter(|id| **id != me) {
            let Some(state) = chitchat.node_state(id) else {
                continue;
            };
            for (key, value) in state.key_values() {
                if let Some(name) = key.strip_prefix(prefix) {
                    entries.push((name.to_owned(), value.to_owned()));
                }
            }
        }
        entries
    }

    /// Publish this node's rate-limit reports: `(pool name, report)`, under
    /// [`keys::LIMIT_PREFIX`] (read back by [`Gossip::limit_view`]).
    pub async fn publish_limits(&self, reports: &[(String, String)]) {
        let entries: Vec<(String, String)> = reports
            .iter()
            .map(|(pool, report)| (format!("{}{pool}", keys::LIMIT_PREFIX), report.clone()))
            .collect();
        self.publish_entries(&entries).await;
    }

    /// The live members that have published their id, `(node id, started ms)`, and the
    /// rate-limit reports of the other live ones, `(node id, pool name, report)`.
    pub async fn limit_view(&self) -> (Vec<(u64, u64)>, Vec<(u64, String, String)>) {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let me = chitchat.self_chitchat_id().clone();
        let mut members = Vec::new();
        let mut reports = Vec::new();
        let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
        for id in &live {
            let Some(state) = chitchat.node_state(id) else {
                continue;
            };
            let Some(node_id) = state
                .get(keys::NODE_ID)
                .and_then(|value| value.parse::<u64>().ok())
            else {
                continue;
            };
            members.push((node_id, id.generation_id));
            if *id == me {
                continue;
            }
            for (key, value) in state.key_values() {
                if let Some(pool) = key.strip_prefix(keys::LIMIT_PREFIX) {
                    reports.push((node_id, pool.to_owned(), value.to_owned()));
                }
            }
        }
        (members, reports)
    }

    /// Every node this one knows of, live or dead, itself included.
    pub async fn members(&self) -> Vec<Member> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
        chitchat
            .node_states()
            .iter()
            .map(|(id, state)| Member {
                gossip_addr: id.gossip_advertise_addr,
                started_ms: id.generation_id,
                live: live.contains(id),
                info: NodeInfo::from_state(state),
            })
            .collect()
    }

    /// Stop gossiping. Peers see the node go silent; publish `ready: false` first.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.handle.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::transport::ChannelTransport;

    fn info(node_id: u64) -> NodeInfo {
        NodeInfo {
            node_id,
            http_addr: format!("127.0.0.1:{}", 8000 + node_id),
            grpc_addr: format!("127.0.0.1:{}", 9000 + node_id),
            version: "test".to_owned(),
            ready: true,
            raft_role: "follower".to_owned(),
            applied_index: 0,
        }
    }

    fn options(port: u16, seeds: &[u16]) -> GossipOptions {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut options = GossipOptions::new(
            addr,
            seeds
                .iter()
                .map(|seed| format!("127.0.0.1:{seed}"))
                .collect(),
        );
        options.interval = Duration::from_millis(50);
        options.failure_detector.initial_interval = Duration::from_millis(50);
        options.failure_detector.max_interval = Duration::from_millis(500);
        options
    }

    /// Poll `check` every 20 ms for up to `timeout`.
    async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn nodes_find_each_other_share_updates_and_see_a_silent_node_die() {
        let transport = CountingTransport::new(ChannelTransport::with_mtu(65_507));
        let stats = transport.stats();
        let ports = [20_001u16, 20_002, 20_003];
        let mut nodes = Vec::new();
        for (index, port) in ports.iter().enumerate() {
            let seeds: Vec<u16> = ports.iter().copied().filter(|p| p != port).collect();
            let node = Gossip::start(options(*port, &seeds), &info(index as u64 + 1), &transport)
                .await
                .expect("start");
            nodes.push(node);
        }

        // Everyone sees everyone, live and with their info.
        for node in &nodes {
            let all_live = eventually(Duration::from_secs(5), || async {
                let members = node.members().await;
                members.len() == 3
                    && members
                        .iter()
                        .all(|member| member.live && member.info.is_some())
            })
            .await;
            assert!(all_live, "{:?}", node.members().await);
        }

        // An update on node 1 reaches node 3.
        let mut updated = info(1);
        updated.raft_role = "leader".to_owned();
        updated.applied_index = 42;
        nodes[0].publish(&updated).await;
        let seen = eventually(Duration::from_secs(5), || async {
            nodes[2]
                .members()
                .await
                .iter()
                .any(|member| member.info.as_ref() == Some(&updated))
        })
        .await;
        assert!(seen, "{:?}", nodes[2].members().await);

        // Traffic was counted.
        assert!(stats.messages_sent.load(Ordering::Relaxed) > 0);
        assert!(stats.bytes_received.load(Ordering::Relaxed) > 0);

        // Node 2 goes silent: the others mark it dead.
        let silent = nodes.remove(1);
        silent.shutdown().await.expect("shutdown");
        for node in &nodes {
            let dead = eventually(Duration::from_secs(10), || async {
                node.members().await.iter().any(|member| {
                    !member.live && member.info.as_ref().is_some_and(|info| info.node_id == 2)
                })
            })
            .await;
            assert!(dead, "{:?}", node.members().await);
        }
    }

    #[tokio::test]
    async fn a_host_name_is_enough_as_the_only_seed() {
        // Nodes 2 and 3 know only a name (as with a Kubernetes headless Service); it is
        // resolved (to the loopback addresses), and through node 1 they find each other.
        let transport = ChannelTransport::with_mtu(65_507);
        let ports = [20_011u16, 20_012, 20_013];
        let mut nodes = Vec::new();
        for (index, port) in ports.iter().enumerate() {
            let mut options = options(*port, &[]);
            if index > 0 {
                options.seeds = vec![format!("localhost:{}", ports[0])];
            }
            nodes.push(
                Gossip::start(options, &info(index as u64 + 1), &transport)
                    .await
                    .expect("start"),
            );
        }
        for node in &nodes {
            let all_live = eventually(Duration::from_secs(10), || async {
                let members = node.members().await;
                members.len() == 3 && members.iter().all(|member| member.live)
            })
            .await;
            assert!(all_live, "{:?}", node.members().await);
        }
    }
}
