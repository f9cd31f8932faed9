//! `Idempotency-Key`s across the cluster: each key is owned by one member, the first by
//! rendezvous hashing of the key over the group's members, and kept in that node's memory
//! (`skein_proxy::idempotency::MemoryStore`). Any node that gets a request with the key asks
//! the owner first (over the internal gRPC port, `skein.idempotency.v1.IdempotencyPeer`), so
//! a retry sent to another node finds the first attempt running (409) or its answer.
//!
//! - **Owner down.** A member that does not answer within [`PEER_TIMEOUT`] is passed over for
//!   the next in rank, so keys keep working while a node is down. What the owner held is
//!   lost with it: a retry of a request whose first attempt's owner died may run again.
//! - **Claims.** A claim names its owner, so the attempt reports to that node when it ends;
//!   a claim whose node died lapses after the request timeout (plus a minute).

use std::sync::Arc;
use std::time::Duration;

use skein_control::{ControlPlane, NodeId};
use skein_proto::idempotency::v1::claim_reply::State;
use skein_proto::idempotency::v1::idempotency_peer_client::IdempotencyPeerClient;
use skein_proto::idempotency::v1::idempotency_peer_server::{
    IdempotencyPeer, IdempotencyPeerServer,
};
use skein_proto::idempotency::v1::{
    Answer as WireAnswer, ClaimReply, ClaimRequest, CompleteReply, CompleteRequest, ReleaseReply,
    ReleaseRequest,
};
use skein_proxy::idempotency::{Answer, Claim, ClaimError, IdempotencyStore, MemoryStore};
use tonic::{Request, Response, Status};

/// How long an owner has to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// The rendezvous rank of `node` for `key`: the highest owns it.
fn rank(key: &str, node: NodeId) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes().chain(node.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV-1a spreads its last bytes poorly: finish with a mix.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

fn to_wire(answer: Answer) -> WireAnswer {
    WireAnswer {
        status: u32::from(answer.status),
        content_type: answer.content_type,
        body: answer.body.to_vec(),
        dropped: answer.dropped,
    }
}

fn from_wire(answer: WireAnswer) -> Answer {
    Answer {
        status: u16::try_from(answer.status).unwrap_or(500),
        content_type: answer.content_type,
        body: answer.body.into(),
        dropped: answer.dropped,
    }
}

/// The cluster's keys, as this node sees them.
pub struct ClusterIdempotency {
    local: Arc<MemoryStore>,
    control: ControlPlane,
}

impl ClusterIdempotency {
    pub fn new(local: Arc<MemoryStore>, control: ControlPlane) -> ClusterIdempotency {
        ClusterIdempotency { local, control }
    }

    /// The members, the owner of `key` first.
    fn ranked(&self, key: &str) -> Vec<(NodeId, String)> {
        let mut members = self.control.members();
        if members.is_empty() {
            members.push((self.control.id(), String::new()));
        }
        members.sort_by_key(|(node, _)| std::cmp::Reverse(rank(key, *node)));
        members
    }

    fn client(
        &self,
        addr: &str,
    ) -> Result<IdempotencyPeerClient<tonic::transport::Channel>, String> {
        self.control
            .peer_channel(addr)
            .map(|channel| {
                IdempotencyPeerClient::new(channel)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20)
            })
            .map_err(|error| error.to_string())
    }

    fn address_of(&self, node: NodeId) -> Option<String> {
        self.control
            .members()
            .into_iter()
            .find(|(member, _)| *member == node)
            .map(|(_, addr)| addr)
    }
}

/// A claim's token names its owner: `<owner>:<token>`.
fn split_token(token: &str) -> Option<(NodeId, &str)> {
    let (owner, token) = token.split_once(':')?;
    Some((owner.parse().ok()?, token))
}

#[async_trait::async_trait]
impl IdempotencyStore for ClusterIdempotency {
    async fn claim(
        &self,
        key: &str,
        fingerprint: [u8; 32],
        running_ms: u64,
    ) -> Result<Claim, ClaimError> {
        let mut last_error = String::from("no member answered");
        for (node, addr) in self.ranked(key) {
            let claim = if node == self.control.id() {
                Ok(self
                    .local
                    .claim_at(key, fingerprint, running_ms, skein_types::now_ms()))
            } else {
                let request = self.control.peer_request(
                    ClaimRequest {
                        key: key.to_owned(),
                        fingerprint: fingerprint.to_vec(),
                        running_ms,
                    },
                    Some(node),
                );
                match self.client(&addr) {
                    Ok(mut client) => {
                        match tokio::time::timeout(PEER_TIMEOUT, client.claim(request)).await {
                            Ok(Ok(reply)) => Ok(claim_of(reply.into_inner())),
                            Ok(Err(status)) => Err(status.message().to_owned()),
                            Err(_) => Err(format!("node {node} did not answer in time")),
                        }
                    }
                    Err(error) => Err(error),
                }
            };
            match claim {
                Ok(Claim::Claimed(token)) => return Ok(Claim::Claimed(format!("{node}:{token}"))),
                Ok(other) => return Ok(other),
                Err(error) => {
                    tracing::debug!(node, %error, "an idempotency key's owner did not answer; asking the next");
                    last_error = error;
                }
            }
        }
        Err(ClaimError(last_error))
    }

    async fn complete(&self, key: &str, token: &str, answer: Answer, window_ms: u64) {
        let Some((owner, token)) = split_token(token) else {
            return;
        };
        if owner == self.control.id() {
            self.local
                .complete_at(key, token, answer, window_ms, skein_types::now_ms());
            return;
        }
        let Some(addr) = self.address_of(owner) else {
            return;
        };
        let request = self.control.peer_request(
            CompleteRequest {
                key: key.to_owned(),
                token: token.to_owned(),
                answer: Some(to_wire(answer)),
                window_ms,
            },
            Some(owner),
        );
        let Ok(mut client) = self.client(&addr) else {
            return;
        };
        let error = match tokio::time::timeout(PEER_TIMEOUT, client.complete(request)).await {
            Ok(Ok(_)) => return,
            Ok(Err(status)) => status.message().to_owned(),
            Err(_) => "no answer in time".to_owned(),
        };
        tracing::warn!(owner, %error, "an idempotency key's answer was not kept by its owner");
    }

    async fn release(&self, key: &str, token: &str) {
        let Some((owner, token)) = split_token(token) else {
            return;
        };
        if owner == self.control.id() {
            self.local.release_now(key, token);
            return;
        }
        let Some(addr) = self.address_of(owner) else {
            return;
        };
        let request = self.control.peer_request(
            ReleaseRequest {
                key: key.to_owned(),
                token: token.to_owned(),
            },
            Some(owner),
        );
        if let Ok(mut client) = self.client(&addr) {
            let _ = tokio::time::timeout(PEER_TIMEOUT, client.release(request)).await;
        }
    }
}

fn claim_of(reply: ClaimReply) -> Claim {
    match reply.state() {
        State::Claimed => Claim::Claimed(reply.token),
        State::Running => Claim::Running,
        State::Done => Claim::Done(from_wire(reply.answer.unwrap_or_default())),
        State::Mismatch => Claim::Mismatch,
    }
}

/// The `skein.idempotency.v1.IdempotencyPeer` service: the keys this node owns. Only members
/// of this cluster are admitted.
pub struct PeerService {
    local: Arc<MemoryStore>,
    control: ControlPlane,
}

impl PeerService {
    pub fn new(
        local: Arc<MemoryStore>,
        control: ControlPlane,
    ) -> IdempotencyPeerServer<PeerService> {
        IdempotencyPeerServer::new(PeerService { local, control })
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.control
            .identity()
            .admit(request.metadata(), false)
            .map_err(|refused| Status::failed_precondition(refused.message))
    }
}

#[tonic::async_trait]
impl IdempotencyPeer for PeerService {
    async fn claim(&self, request: Request<ClaimRequest>) -> Result<Response<ClaimReply>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        let fingerprint: [u8; 32] = request
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("fingerprint: 32 bytes"))?;
        let claim = self.local.claim_at(
            &request.key,
            fingerprint,
            request.running_ms,
            skein_types::now_ms(),
        );
        let mut reply = ClaimReply::default();
        match claim {
            Claim::Claimed(token) => {
                reply.set_state(State::Claimed);
                reply.token = token;
            }
            Claim::Running => reply.set_state(State::Running),
            Claim::Done(answer) => {
                reply.set_state(State::Done);
                reply.answer = Some(to_wire(answer));
            }
            Claim::Mismatch => reply.set_state(State::Mismatch),
        }
        Ok(Response::new(reply))
    }

    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteReply>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        self.local.complete_at(
            &request.key,
            &request.token,
            from_wire(request.answer.unwrap_or_default()),
            request.window_ms,
            skein_types::now_ms(),
        );
        Ok(Response::new(CompleteReply {}))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        self.local.release_now(&request.key, &request.token);
        Ok(Response::new(ReleaseReply {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_the_members_and_a_token_names_its_owner() {
        let mut owners = [0u32; 3];
        for n in 0..3000 {
            let key = format!("key-{n}\u{0}retry-{n}");
            let owner = (1..=3u64).max_by_key(|node| rank(&key, *node)).unwrap_or(1);
            owners[(owner - 1) as usize] += 1;
        }
        for count in owners {
            assert!((800..1200).contains(&count), "{owners:?}");
        }
        assert_eq!(split_token("7:abc"), Some((7, "abc")));
        assert_eq!(split_token("abc"), None);
    }
}
