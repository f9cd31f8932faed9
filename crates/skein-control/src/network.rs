//! Raft RPCs over gRPC (`skein.raft.v1`): a client with one cached channel per peer, and the
//! service that hands incoming RPCs to the local Raft node. Payloads are openraft's own types
//! as JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skein_proto::raft::v1::RaftMessage;
use skein_proto::raft::v1::raft_client::RaftClient;
use skein_proto::raft::v1::raft_server;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::identity::Identity;
use crate::{ControlPlane, Forwarded, Node, NodeId, TypeConfig};

/// The runtime snapshot chunks are sent on, and whose blocking thread reads and writes
/// snapshot files: one thread of each at the lowest CPU priority, apart from the proxy's
/// (`None` if it could not be started: chunks then go on the caller's runtime).
pub(crate) fn snapshot_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(1)
                .thread_name("skein-snapshot-send")
                .on_thread_start(|| {
                    crate::machine::lower_this_thread(19);
                })
                .enable_all()
                .build()
                .map_err(|error| tracing::warn!(%error, "no runtime for snapshot sends"))
                .ok()
        })
        .as_ref()
}

/// Connection timeout for a peer's channel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Channels to peers, one per address, shared by every Raft client and the write forwarder.
#[derive(Clone)]
pub struct Channels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Channels for sending snapshots, their connections on the snapshot runtime.
    snapshot_channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// TLS towards peers, when the gRPC port speaks it.
    tls: Option<ClientTlsConfig>,
    /// The cluster's admin token, sent with every Raft RPC when set.
    token: Option<Arc<str>>,
    /// Stamps every message with this node's cluster, id and incarnation.
    identity: Arc<Identity>,
}

impl Channels {
    pub fn new(
        tls: Option<ClientTlsConfig>,
        token: Option<String>,
        identity: Arc<Identity>,
    ) -> Channels {
        Channels {
            channels: Arc::default(),
            snapshot_channels: Arc::default(),
            tls,
            token: token.map(Arc::from),
            identity,
        }
    }

    /// A request carrying the cluster token (when there is one) and this node's identity,
    /// addressed to `target` when the caller knows which node it is for.
    pub fn request<T>(&self, message: T, target: Option<NodeId>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        self.identity.stamp(request.metadata_mut(), target);
        request
    }

    /// The cached channel to `addr` (`host:port`), created lazily on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.cached(&self.channels, addr)
    }

    /// A channel to `addr` whose connection tasks run on `runtime`.
    fn get_on(
        &self,
        addr: &str,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<Channel, tonic::transport::Error> {
        let _entered = runtime.enter();
        self.cached(&self.snapshot_channels, addr)
    }

    fn cached(
        &self,
        cache: &Mutex<HashMap<String, Channel>>,
        addr: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut channels = match cache.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// Makes a Raft client per peer.
#[derive(Clone)]
pub struct Network {
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            target,
            node: node.clone(),
            channel: self.channels.get(&node.addr).map_err(|e| e.to_string()),
            channels: self.channels.clone(),
        }
    }
}

/// The Raft client of one peer.
pub struct PeerClient {
    target: NodeId,
    node: Node,
    channel: Result<Channel, String>,
    channels: Channels,
}

/// The most bytes of entries (as JSON) one append carries, beyond its first entry.
const APPEND_BUDGET: usize = 256 << 10;

/// The length of a value's JSON, without keeping it.
fn json_size(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// The largest Raft message (an append of a bulk write, a snapshot chunk).
const MESSAGE_LIMIT: usize = 256 << 20;

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        kind: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        match self.call_with(kind, request, Vec::new(), option).await {
            Ok(reply) => reply,
            Err(status) => Err(status_error(&status)),
        }
    }

    /// Send `request` (as JSON) with `data` beside it; a gRPC failure comes back as the
    /// status, for the caller to tell an older peer (`Unimplemented`) from a network error.
    async fn call_with<Req, Resp, E>(
        &self,
        kind: Rpc,
        request: &Req,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<RpcResult<Resp, E>, Status>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        Ok(self
            .exchange(kind, request, data, option)
            .await?
            .and_then(|payload: Vec<u8>| {
                let result: Result<Resp, RaftError<NodeId, E>> =
                    serde_json::from_slice(&payload)
                        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                result.map_err(|error| {
                    RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        self.node.clone(),
                        error,
                    ))
                })
            }))
    }

    async fn exchange<Req: Serialize, E: std::error::Error>(
        &self,
        kind: Rpc,
        request: &Req,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<RpcResult<Vec<u8>, E>, Status> {
        // Snapshot chunks are encoded and sent on a runtime of their own, over a connection of
        // their own, so that sending a large snapshot does not hold up the proxy's threads.
        let sender = match kind {
            Rpc::InstallSnapshotChunk | Rpc::InstallSnapshot => snapshot_runtime(),
            Rpc::AppendEntries | Rpc::Vote => None,
        };
        let channel = match sender {
            Some(runtime) => self
                .channels
                .get_on(&self.node.addr, runtime)
                .map_err(|error| error.to_string()),
            None => self.channel.clone(),
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(message) => {
                return Ok(Err(RPCError::Unreachable(Unreachable::new(
                    &AnyError::error(message),
                ))));
            }
        };
        let payload = match serde_json::to_vec(request) {
            Ok(payload) => payload,
            Err(e) => return Ok(Err(RPCError::Network(NetworkError::new(&e)))),
        };
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MESSAGE_LIMIT)
            .max_encoding_message_size(MESSAGE_LIMIT);
        let message = self
            .channels
            .request(RaftMessage { payload, data }, Some(self.target));
        let ttl = option.hard_ttl();
        let call = async move {
            match kind {
                Rpc::AppendEntries => client.append_entries(message).await,
                Rpc::Vote => client.vote(message).await,
                Rpc::InstallSnapshot => client.install_snapshot(message).await,
                Rpc::InstallSnapshotChunk => client.install_snapshot_chunk(message).await,
            }
        };
        let call = async move {
            match sender {
                Some(runtime) => {
                    // Stop the send if the caller gives up on it (its timeout).
                    struct AbortOnDrop(tokio::task::AbortHandle);
                    impl Drop for AbortOnDrop {
                        fn drop(&mut self) {
                            self.0.abort();
                        }
                    }
                    let task = runtime.spawn(call);
                    let _abort = AbortOnDrop(task.abort_handle());
                    match task.await {
                        Ok(reply) => reply,
                        Err(error) => Err(Status::internal(format!("snapshot send: {error}"))),
                    }
                }
                None => call.await,
            }
        };
        match tokio::time::timeout(ttl, call).await {
            Err(_) => Ok(Err(RPCError::Timeout(Timeout {
                action: kind.action(),
                id: 0,
                target: self.target,
                timeout: ttl,
            }))),
            Ok(Err(status)) => Err(status),
            Ok(Ok(reply)) => Ok(Ok(reply.into_inner().payload)),
        }
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    InstallSnapshotChunk,
}

impl Rpc {
    fn action(self) -> openraft::RPCTypes {
        match self {
            Rpc::AppendEntries => openraft::RPCTypes::AppendEntries,
            Rpc::Vote => openraft::RPCTypes::Vote,
            Rpc::InstallSnapshot | Rpc::InstallSnapshotChunk => openraft::RPCTypes::InstallSnapshot,
        }
    }
}

/// A gRPC failure as openraft sees it: a peer that cannot be reached, or that refuses this
/// node's messages (another cluster, another incarnation), is `Unreachable` (openraft backs
/// off), anything else a network error.
fn status_error<E: std::error::Error>(
    status: &Status,
) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    let error = AnyError::error(format!("{}: {}", status.code(), status.message()));
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::FailedPrecondition => {
            RPCError::Unreachable(Unreachable::new(&error))
        }
        _ => RPCError::Network(NetworkError::new(&error)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        // openraft gives an append one heartbeat interval: send at most APPEND_BUDGET bytes of
        // entries (at least one) and report the rest as not sent yet, so a follower that is
        // behind a run of bulk-write parts catches up in steps that each arrive in time.
        let mut rpc = rpc;
        let mut budget = APPEND_BUDGET;
        let mut keep = 0;
        for entry in &rpc.entries {
            let size = json_size(entry);
            if keep > 0 && size > budget {
                break;
            }
            budget = budget.saturating_sub(size);
            keep += 1;
        }
        let partial = keep < rpc.entries.len();
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|entry| entry.log_id);
        let response = self.call(Rpc::AppendEntries, &rpc, &option).await?;
        Ok(match response {
            AppendEntriesResponse::Success if partial => {
                AppendEntriesResponse::PartialSuccess(last)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        // The chunk's bytes travel as bytes, beside the JSON of the rest; a peer of an earlier
        // version, which does not know that call, is sent them inside the JSON.
        let mut rpc = rpc;
        let data = std::mem::take(&mut rpc.data);
        match self
            .call_with(Rpc::InstallSnapshotChunk, &rpc, data.clone(), &option)
            .await
        {
            Ok(reply) => reply,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                rpc.data = data;
                self.call(Rpc::InstallSnapshot, &rpc, &option).await
            }
            Err(status) => Err(status_error(&status)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The `skein.raft.v1.Raft` service: hands RPCs to the local Raft node.
pub struct RaftService {
    raft: Raft<TypeConfig>,
    control: ControlPlane,
}

impl RaftService {
    pub fn new(control: ControlPlane) -> RaftService {
        RaftService {
            raft: control.raft().clone(),
            control,
        }
    }

    /// The tonic server for this service (without a token check: see
    /// [`crate::ControlPlane::service`]).
    pub fn into_server(self) -> raft_server::RaftServer<RaftService> {
        raft_server::RaftServer::new(self)
            .max_decoding_message_size(MESSAGE_LIMIT)
            .max_encoding_message_size(MESSAGE_LIMIT)
    }
}

impl RaftService {
    /// Refuse a message from another cluster, or for another node or incarnation.
    fn admit<T>(&self, request: &Request<T>, adopt: bool) -> Result<(), Status> {
        self.control
            .identity()
            .admit(request.metadata(), adopt)
            .map_err(|refused| Status::failed_precondition(refused.message))
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftMessage>) -> Result<T, Status> {
    serde_json::from_slice(&request.into_inner().payload)
        .map_err(|error| Status::invalid_argument(format!("undecodable Raft message: {error}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    serde_json::to_vec(value)
        .map(|payload| {
            Response::new(RaftMessage {
                payload,
                data: Vec::new(),
            })
        })
        .map_err(|error| Status::internal(format!("unencodable Raft reply: {error}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request, true)?;
        let request: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(request).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request, true)?;
        let request: VoteRequest<NodeId> = decode(request)?;
        encode(&self.raft.vote(request).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request, true)?;
        let request: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.install_snapshot(request).await)
    }

    async fn install_snapshot_chunk(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request, true)?;
        let message = request.into_inner();
        let mut request: InstallSnapshotRequest<TypeConfig> =
            serde_json::from_slice(&message.payload).map_err(|error| {
                Status::invalid_argument(format!("undecodable Raft message: {error}"))
            })?;
        request.data = message.data;
        encode(&self.raft.install_snapshot(request).await)
    }

    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request, false)?;
        let forwarded: Forwarded = decode(request)?;
        encode(&self.control.handle_forwarded(forwarded).await)
    }

    async fn hello(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        encode(&self.control.hello())
    }
}
