//! Where a node keeps Responses API answers: in its own embedded store (sled, in
//! `<data_dir>/responses`), with a copy on one other member of the group, so that a response
//! survives the loss of any one node and every node can read it.
//!
//! - **Placement.** A response id names its two homes: `resp_` + 24 random hex digits + the
//!   serving node's id + the replica's id (16 hex digits each). The replica is the member that
//!   ranks first for the id by rendezvous hashing (the serving node left out). Nothing is
//!   looked up to find a response: any node reads the id.
//! - **Writes.** The serving node stores the response, then puts the copy on the replica (on
//!   the next-ranked members if that one does not answer), before the client sees the end of
//!   the answer. A copy no member took is counted (`skein_responses_unreplicated_total`).
//! - **Reads.** This node's store, then the two homes, then (if both are gone) every other
//!   member.
//! - **Consistency.** A response is written once and never changed, so a read sees it whole or
//!   not at all. A delete removes it from both homes; a home that is down while it is deleted
//!   keeps its copy until it expires.
//! - **Bounds.** Each response expires after `--responses-ttl` (30 days by default, as OpenAI
//!   keeps them); each node keeps at most `--responses-max-bytes` and drops the oldest to stay
//!   within it (`skein_responses_evicted_total`). What a node holds is in
//!   `skein_responses_stored` and `skein_responses_stored_bytes`.
//!
//! The control plane's replicated state holds none of this: it holds config and budgets, and
//! response bodies would make its snapshots grow without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use skein_control::{ControlPlane, NodeId};
use skein_proto::responses::v1::response_peer_client::ResponsePeerClient;
use skein_proto::responses::v1::response_peer_server::{ResponsePeer, ResponsePeerServer};
use skein_proto::responses::v1::{DeleteReply, GetReply, PutRecord, PutReply, RecordKey};
use skein_proxy::Metrics;
use skein_proxy::responses::{ResponseStore, StoreError, StoredResponse};
use tonic::{Request, Response, Status};

/// How long a peer has to answer a store RPC.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often expired responses are swept away.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// One node's own store of responses (its own and the copies it keeps for others).
pub struct LocalStore {
    records: sled::Tree,
    /// `expires_at_ms` (big-endian) + id → (): the sweep and the eviction order.
    expiry: sled::Tree,
    bytes: AtomicU64,
    count: AtomicU64,
    max_bytes: u64,
    metrics: Option<StoreMetrics>,
}

/// The store's figures in the node's metrics.
struct StoreMetrics {
    stored: Gauge,
    bytes: Gauge,
    evicted: Counter,
}

fn expiry_key(expires_at_ms: u64, id: &str) -> Vec<u8> {
    let mut key = expires_at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn encode(record: &StoredResponse) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|error| StoreError(format!("unencodable response: {error}")))
}

fn storage(error: sled::Error) -> StoreError {
    StoreError(format!("the response store failed: {error}"))
}

impl LocalStore {
    /// Open (or create) the store in `dir`, keeping at most `max_bytes`.
    pub fn open(dir: &std::path::Path, max_bytes: u64) -> anyhow::Result<LocalStore> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let records = db.open_tree("records")?;
        let expiry = db.open_tree("expiry")?;
        let mut bytes = 0;
        let mut count = 0;
        for entry in records.iter() {
            let (_, value) = entry?;
            bytes += value.len() as u64;
            count += 1;
        }
        Ok(LocalStore {
            records,
            expiry,
            bytes: AtomicU64::new(bytes),
            count: AtomicU64::new(count),
            max_bytes,
            metrics: None,
        })
    }

    /// Report sizes in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> LocalStore {
        self.metrics = Some(StoreMetrics {
            stored: metrics.responses_stored.clone(),
            bytes: metrics.responses_stored_bytes.clone(),
            evicted: metrics.responses_evicted.clone(),
        });
        self.publish();
        self
    }

    fn publish(&self) {
        if let Some(metrics) = &self.metrics {
            metrics
                .stored
                .set(i64::try_from(self.count.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            metrics
                .bytes
                .set(i64::try_from(self.bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
    }

    /// Keep a record (its JSON), replacing one with the same id.
    pub fn put(&self, record: &StoredResponse) -> Result<(), StoreError> {
        self.put_encoded(record, &encode(record)?)
    }

    /// [`put`](Self::put) with the record's JSON already made (it is sent to a peer too).
    pub fn put_encoded(&self, record: &StoredResponse, encoded: &[u8]) -> Result<(), StoreError> {
        let length = encoded.len() as u64;
        // A record put again (a replica's copy retried) replaces the old one.
        if let Some(old) = self
            .records
            .insert(record.id.as_bytes(), encoded)
            .map_err(storage)?
        {
            self.bytes.fetch_sub(
                (old.len() as u64).min(self.bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            self.count.fetch_sub(1, Ordering::Relaxed);
            if let Ok(old) = serde_json::from_slice::<StoredResponse>(&old) {
                self.expiry
                    .remove(expiry_key(old.expires_at_ms, &old.id))
                    .map_err(storage)?;
            }
        }
        self.expiry
            .insert(expiry_key(record.expires_at_ms, &record.id), &[])
            .map_err(storage)?;
        self.bytes.fetch_add(length, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.evict()?;
        self.publish();
        Ok(())
    }

    /// The record `id`, unless it expired.
    pub fn get(&self, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let Some(value) = self.records.get(id.as_bytes()).map_err(storage)? else {
            return Ok(None);
        };
        let record: StoredResponse = serde_json::from_slice(&value)
            .map_err(|error| StoreError(format!("a stored response is unreadable: {error}")))?;
        Ok((record.expires_at_ms > skein_types::now_ms()).then_some(record))
    }

    /// Forget `id`; whether it was here.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let Some(old) = self.records.remove(id.as_bytes()).map_err(storage)? else {
            return Ok(false);
        };
        self.bytes.fetch_sub(
            (old.len() as u64).min(self.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Ok(record) = serde_json::from_slice::<StoredResponse>(&old) {
            self.expiry
                .remove(expiry_key(record.expires_at_ms, id))
                .map_err(storage)?;
        }
        self.publish();
        Ok(true)
    }

    /// Drop the soonest-expiring records while over the size bound.
    fn evict(&self) -> Result<(), StoreError> {
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes {
            let Some((key, _)) = self.expiry.first().map_err(storage)? else {
                break;
            };
            let id = String::from_utf8_lossy(&key[8..]).into_owned();
            self.expiry.remove(&key).map_err(storage)?;
            if self.remove(&id)?
                && let Some(metrics) = &self.metrics
            {
                metrics.evicted.inc();
            }
        }
        Ok(())
    }

    /// Remove every record that has expired; how many.
    pub fn sweep(&self) -> Result<usize, StoreError> {
        let now = skein_types::now_ms();
        let mut removed = 0;
        let expired: Vec<sled::IVec> = self
            .expiry
            .range(..now.to_be_bytes().to_vec())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        for key in expired {
            let id = String::from_utf8_lossy(&key[8..]).into_owned();
            self.expiry.remove(&key).map_err(storage)?;
            if self.remove(&id)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The rendezvous rank of `node` for a response's random part: the highest ranks first.
fn rank(random: &str, node: NodeId) -> u64 {
    // FNV-1a over the random part and the node id: cheap, and evenly spread for random input.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in random.bytes().chain(node.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The serving node and the replica a response id names.
fn homes(id: &str) -> Option<(NodeId, NodeId)> {
    let hex = id.strip_prefix("resp_")?;
    if hex.len() != 56 {
        return None;
    }
    let owner = u64::from_str_radix(&hex[24..40], 16).ok()?;
    let replica = u64::from_str_radix(&hex[40..56], 16).ok()?;
    Some((owner, replica))
}

/// The cluster's store, as this node sees it.
pub struct ClusterStore {
    local: Arc<LocalStore>,
    control: ControlPlane,
    ttl_ms: u64,
    /// Responses no other node took a copy of.
    unreplicated: Counter,
}

impl ClusterStore {
    pub fn new(
        local: Arc<LocalStore>,
        control: ControlPlane,
        ttl: Duration,
        metrics: &Metrics,
    ) -> ClusterStore {
        ClusterStore {
            local,
            control,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            unreplicated: metrics.responses_unreplicated.clone(),
        }
    }

    /// The other members, best-ranked for `random` first.
    fn ranked_peers(&self, random: &str) -> Vec<(NodeId, String)> {
        let me = self.control.id();
        let mut peers: Vec<(NodeId, String)> = self
            .control
            .members()
            .into_iter()
            .filter(|(id, _)| *id != me)
            .collect();
        peers.sort_by_key(|(id, _)| std::cmp::Reverse(rank(random, *id)));
        peers
    }

    fn address_of(&self, node: NodeId) -> Option<String> {
        self.control
            .members()
            .into_iter()
            .find(|(id, _)| *id == node)
            .map(|(_, addr)| addr)
    }

    fn client(
        &self,
        addr: &str,
    ) -> Result<ResponsePeerClient<tonic::transport::Channel>, StoreError> {
        self.control
            .peer_channel(addr)
            .map(ResponsePeerClient::new)
            .map_err(|error| StoreError(error.to_string()))
    }

    async fn put_on(&self, node: NodeId, addr: &str, record: &[u8]) -> Result<(), StoreError> {
        let mut client = self.client(addr)?;
        let request = self.control.peer_request(
            PutRecord {
                record: record.to_vec(),
            },
            Some(node),
        );
        match tokio::time::timeout(PEER_TIMEOUT, client.put(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(StoreError(status.message().to_owned())),
            Err(_) => Err(StoreError(format!("node {node} did not answer"))),
        }
    }

    async fn get_from(&self, node: NodeId, addr: &str, id: &str) -> Option<StoredResponse> {
        let mut client = self.client(addr).ok()?;
        let request = self
            .control
            .peer_request(RecordKey { id: id.to_owned() }, Some(node));
        let reply = tokio::time::timeout(PEER_TIMEOUT, client.get(request))
            .await
            .ok()?
            .ok()?
            .into_inner();
        if !reply.found {
            return None;
        }
        serde_json::from_slice(&reply.record).ok()
    }

    async fn delete_on(&self, node: NodeId, addr: &str, id: &str) -> bool {
        let Ok(mut client) = self.client(addr) else {
            return false;
        };
        let request = self
            .control
            .peer_request(RecordKey { id: id.to_owned() }, Some(node));
        matches!(
            tokio::time::timeout(PEER_TIMEOUT, client.delete(request)).await,
            Ok(Ok(reply)) if reply.get_ref().deleted
        )
    }
}

#[tonic::async_trait]
impl ResponseStore for ClusterStore {
    fn new_id(&self) -> String {
        let mut id = String::with_capacity(5 + 24 + 32);
        id.push_str("resp_");
        let (high, low) = random_pair();
        skein_types::push_hex(&mut id, high, 16);
        skein_types::push_hex(&mut id, low, 8);
        let me = self.control.id();
        let replica = self
            .ranked_peers(&id[5..])
            .first()
            .map(|(id, _)| *id)
            .unwrap_or(me);
        skein_types::push_hex(&mut id, me, 16);
        skein_types::push_hex(&mut id, replica, 16);
        id
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    async fn put(&self, record: StoredResponse) -> Result<(), StoreError> {
        let encoded = encode(&record)?;
        self.local.put_encoded(&record, &encoded)?;
        let random = record
            .id
            .strip_prefix("resp_")
            .map(|hex| hex.get(..24).unwrap_or(hex))
            .unwrap_or(&record.id)
            .to_owned();
        let peers = self.ranked_peers(&random);
        if peers.is_empty() {
            return Ok(());
        }
        for (node, addr) in peers.iter().take(3) {
            match self.put_on(*node, addr, &encoded).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(response_id = %record.id, node, %error, "could not put a response's copy on a peer");
                }
            }
        }
        self.unreplicated.inc();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        if let Some(record) = self.local.get(id)? {
            return Ok(Some(record));
        }
        let me = self.control.id();
        let mut asked = vec![me];
        if let Some((owner, replica)) = homes(id) {
            for node in [owner, replica] {
                if asked.contains(&node) {
                    continue;
                }
                asked.push(node);
                if let Some(addr) = self.address_of(node)
                    && let Some(record) = self.get_from(node, &addr, id).await
                {
                    return Ok(Some(record));
                }
            }
        }
        // Both homes gone (or the copy went elsewhere): ask everyone else.
        for (node, addr) in self.control.members() {
            if asked.contains(&node) {
                continue;
            }
            if let Some(record) = self.get_from(node, &addr, id).await {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut deleted = self.local.remove(id)?;
        let me = self.control.id();
        for (node, addr) in self.control.members() {
            if node != me && self.delete_on(node, &addr, id).await {
                deleted = true;
            }
        }
        Ok(deleted)
    }
}

/// The random part of a response id. Its secrecy guards nothing (a response is only shown
/// to the key that made it), so a fast generator seeded per thread does: ids need only be
/// unlikely to collide, and are made on every request.
fn random_pair() -> (u64, u64) {
    (fastrand::u64(..), fastrand::u64(..))
}

/// The `skein.responses.v1.ResponsePeer` service: other nodes' copies, kept in this node's
/// store. Only members of this cluster are admitted.
pub struct PeerService {
    local: Arc<LocalStore>,
    control: ControlPlane,
}

impl PeerService {
    pub fn new(local: Arc<LocalStore>, control: ControlPlane) -> ResponsePeerServer<PeerService> {
        ResponsePeerServer::new(PeerService { local, control })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.control
            .identity()
            .admit(request.metadata(), false)
            .map_err(|refused| Status::failed_precondition(refused.message))
    }
}

fn internal(error: StoreError) -> Status {
    Status::internal(error.0)
}

#[tonic::async_trait]
impl ResponsePeer for PeerService {
    async fn put(&self, request: Request<PutRecord>) -> Result<Response<PutReply>, Status> {
        self.admit(&request)?;
        let record: StoredResponse = serde_json::from_slice(&request.into_inner().record)
            .map_err(|error| Status::invalid_argument(format!("unreadable record: {error}")))?;
        self.local.put(&record).map_err(internal)?;
        Ok(Response::new(PutReply {}))
    }

    async fn get(&self, request: Request<RecordKey>) -> Result<Response<GetReply>, Status> {
        self.admit(&request)?;
        let id = request.into_inner().id;
        let reply = match self.local.get(&id).map_err(internal)? {
            Some(record) => GetReply {
                found: true,
                record: serde_json::to_vec(&record)
                    .map_err(|error| Status::internal(error.to_string()))?,
            },
            None => GetReply {
                found: false,
                record: Vec::new(),
            },
        };
        Ok(Response::new(reply))
    }

    async fn delete(&self, request: Request<RecordKey>) -> Result<Response<DeleteReply>, Status> {
        self.admit(&request)?;
        let deleted = self
            .local
            .remove(&request.into_inner().id)
            .map_err(internal)?;
        Ok(Response::new(DeleteReply { deleted }))
    }
}

/// Sweep expired responses every [`SWEEP_INTERVAL`].
pub async fn sweep_continuously(local: Arc<LocalStore>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        ticker.tick().await;
        let store = local.clone();
        match tokio::task::spawn_blocking(move || store.sweep()).await {
            Ok(Ok(removed)) if removed > 0 => {
                tracing::debug!(removed, "swept expired responses");
            }
            Ok(Err(error)) => tracing::warn!(%error, "could not sweep expired responses"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str, expires_at_ms: u64, size: usize) -> StoredResponse {
        StoredResponse {
            id: id.to_owned(),
            key_id: None,
            team_id: None,
            expires_at_ms,
            previous_response_id: None,
            input: vec![json!({"type": "message", "content": "x".repeat(size)})],
            response: serde_json::value::to_raw_value(&json!({"id": id})).expect("JSON"),
        }
    }

    #[test]
    fn keeps_expires_evicts_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let later = skein_types::now_ms() + 60_000;
        let store = LocalStore::open(dir.path(), 10_000).expect("open");
        store.put(&record("resp_a", later, 3_000)).expect("put");
        store.put(&record("resp_b", later + 1, 3_000)).expect("put");
        assert!(store.get("resp_a").expect("get").is_some());
        // Past the size bound, the soonest to expire goes first.
        store.put(&record("resp_c", later + 2, 5_000)).expect("put");
        assert!(store.get("resp_a").expect("get").is_none());
        assert!(store.get("resp_c").expect("get").is_some());
        assert!(store.bytes() <= 10_000, "{}", store.bytes());
        // Expired records are not read, and the sweep removes them.
        store.put(&record("resp_old", 1, 10)).expect("put");
        assert!(store.get("resp_old").expect("get").is_none());
        assert_eq!(store.sweep().expect("sweep"), 1);
        let bytes = store.bytes();
        drop(store);
        let reopened = LocalStore::open(dir.path(), 10_000).expect("reopen");
        assert_eq!(reopened.bytes(), bytes);
        assert!(reopened.get("resp_c").expect("get").is_some());
        assert!(reopened.remove("resp_c").expect("remove"));
        assert!(reopened.get("resp_c").expect("get").is_none());
    }

    #[test]
    fn an_id_names_its_homes() {
        let id = format!("resp_{}{:016x}{:016x}", "ab".repeat(12), 3u64, 7u64);
        assert_eq!(homes(&id), Some((3, 7)));
        assert_eq!(homes("resp_mock1"), None);
        // Ranks differ by node, so copies spread over the members.
        let firsts: std::collections::BTreeSet<u64> = (0..64)
            .map(|seed| {
                let random = format!("{seed:024x}");
                (1..=3u64)
                    .max_by_key(|node| rank(&random, *node))
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(firsts.len(), 3);
    }
}
