//! Three (and four) real `skein` processes on loopback forming a Raft group: writes on any node
//! reach every node, keys work and are revoked everywhere, the group survives `kill -9` of its
//! leader and of all its nodes, and a node that missed compacted history catches up from a
//! snapshot.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    ClusterMember, ClusterStatusRequest, ClusterStatusResponse, CreateKeyRequest,
    CreateKeysRequest, GetRequest, KeyRequest, Kind, ListRequest, NodeRequest,
    TriggerSnapshotRequest, UsageRequest,
};
use skein_tests::process::{Spawned, run_cli};
use skein_tests::{binary, free_port, start_mock};
use tonic::transport::Channel;

const TOKEN: &str = "cluster-admin-token";

struct Node {
    id: u64,
    grpc: String,
    gossip: String,
    data: PathBuf,
    process: Option<Spawned>,
    http: String,
}

struct Cluster {
    nodes: Vec<Node>,
    voters: String,
    config: PathBuf,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Cluster {
    /// `voters` nodes forming the group, plus `learners` that join through the first node.
    fn start(mock_url: &str, voters: u64, learners: u64, extra: &[&str]) -> Cluster {
        let config = format!(
            "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {mock_url}/v1\n    keys: [{{key: env:UPSTREAM_KEY}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n"
        );
        Cluster::start_config(&config, voters, learners, extra)
    }

    /// Like [`Cluster::start`] with a config of one's own (keys may use `env:UPSTREAM_KEY`,
    /// `env:KEY_A` = `key-a` and `env:KEY_B` = `key-b`).
    fn start_config(config_text: &str, voters: u64, learners: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("skein.yaml");
        std::fs::write(&config, config_text).expect("config");
        let nodes: Vec<Node> = (1..=voters + learners)
            .map(|id| Node {
                id,
                grpc: format!("127.0.0.1:{}", free_port().expect("port")),
                gossip: format!("127.0.0.1:{}", free_port().expect("port")),
                data: dir.path().join(format!("node-{id}")),
                process: None,
                http: String::new(),
            })
            .collect();
        let voter_list = nodes
            .iter()
            .take(voters as usize)
            .map(|node| format!("{}={}", node.id, node.grpc))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            nodes,
            voters: voter_list,
            config,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            _dir: dir,
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        };
        for index in 0..voters as usize {
            cluster.spawn(index);
        }
        for index in 0..voters as usize {
            cluster.await_serving(index);
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let peers = self.nodes[0].grpc.clone();
        let seeds = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, node)| node.gossip.clone())
            .collect::<Vec<_>>()
            .join(",");
        let node = &mut self.nodes[index];
        let mut command = Command::new(binary("skein").expect("binary"));
        command
            .args(["serve", "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&node.data)
            .args(["--node-id", &node.id.to_string()])
            .args(["--voters", &self.voters])
            .args(["--peers", &peers])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", &node.grpc])
            .args(["--gossip-addr", &node.gossip, "--gossip-seeds", &seeds])
            .args(["--log-format", "json", "--admin-token", TOKEN])
            .args(&self.extra)
            .env("UPSTREAM_KEY", "upstream-secret")
            .env("KEY_A", "key-a")
            .env("KEY_B", "key-b")
            .env("SKEIN_LOG", "info,openraft=error")
            .env_remove("SKEIN_CONFIG");
        node.process = Some(Spawned::start(&mut command));
    }

    fn await_serving(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.http = node
            .process
            .as_ref()
            .expect("running")
            .serving_url(Duration::from_secs(30));
    }

    fn restart(&mut self, index: usize) {
        self.spawn(index);
        self.await_serving(index);
    }

    fn kill9(&mut self, index: usize) {
        if let Some(mut process) = self.nodes[index].process.take() {
            process.kill9();
        }
    }

    async fn admin(&self, index: usize) -> AdminClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.nodes[index].grpc))
            .expect("uri")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        AdminClient::new(channel)
    }

    async fn status(&self, index: usize) -> Option<ClusterStatusResponse> {
        self.admin(index)
            .await
            .cluster_status(authorized(ClusterStatusRequest {}))
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// The index of the node every live node agrees is the leader.
    async fn leader(&self, live: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for &index in live {
                if let Some(status) = self.status(index).await {
                    leaders.push(status.leader_id);
                }
            }
            if leaders.len() == live.len()
                && leaders[0] != 0
                && leaders.iter().all(|leader| *leader == leaders[0])
                && let Some(index) = self.nodes.iter().position(|n| n.id == leaders[0])
                && live.contains(&index)
            {
                return index;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {live:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn chat(&self, index: usize, secret: &str) -> u16 {
        self.chat_code(index, secret).await.0
    }

    /// A chat call's status and error code (empty on success).
    async fn chat_code(&self, index: usize, secret: &str) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.nodes[index].http))
            .bearer_auth(secret)
            .timeout(Duration::from_secs(5))
            .json(&json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await;
        let Ok(response) = response else {
            return (0, String::new());
        };
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (status, code)
    }

    /// Wait until every node in `nodes` sees all of them live in gossip.
    async fn all_live_in_gossip(&self, nodes: &[usize]) {
        everywhere(nodes, Duration::from_secs(10), |i| async move {
            self.status(i).await.is_some_and(|status| {
                status
                    .gossip
                    .iter()
                    .filter(|m| m.live && m.node_id != 0)
                    .count()
                    == nodes.len()
            })
        })
        .await;
    }

    async fn has_key(&self, index: usize, id: &str) -> bool {
        self.admin(index)
            .await
            .get(authorized(GetRequest {
                kind: Kind::Key as i32,
                id: id.to_owned(),
                min_version: 0,
            }))
            .await
            .is_ok()
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    skein_tests::authorized(TOKEN, message)
}

async fn create_key(client: &mut AdminClient<Channel>, id: &str) -> (String, u64) {
    let created = client
        .create_key(authorized(CreateKeyRequest {
            id: id.to_owned(),
            name: id.to_owned(),
            ..Default::default()
        }))
        .await
        .expect("create key")
        .into_inner();
    (created.secret, created.version)
}

/// Poll `check` on every node in `nodes` until all pass; the time it took.
async fn everywhere<F, Fut>(nodes: &[usize], timeout: Duration, mut check: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let mut pending: Vec<usize> = nodes.to_vec();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for index in pending {
            if !check(index).await {
                still.push(index);
            }
        }
        pending = still;
        assert!(
            started.elapsed() < timeout,
            "nodes {pending:?} did not converge within {timeout:?}"
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_keys_work_everywhere_and_the_group_survives_kill_9() {
    let mock = start_mock().await.expect("mock");
    let mut cluster = Cluster::start(&mock.url(), 3, 0, &[]);
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(15)).await;
    let followers: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();

    // Gossip: every node sees the three, live, with what they published.
    everywhere(&all, Duration::from_secs(10), |i| {
        let cluster = &cluster;
        async move {
            cluster.status(i).await.is_some_and(|status| {
                status.gossip.len() == 3
                    && status
                        .gossip
                        .iter()
                        .all(|member| member.live && member.ready && member.node_id > 0)
            })
        }
    })
    .await;

    // Gossip has metrics.
    everywhere(&[0], Duration::from_secs(5), |i| {
        let cluster = &cluster;
        async move {
            let text = cluster
                .client
                .get(format!("{}/metrics", cluster.nodes[i].http))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            text.contains("skein_gossip_live_nodes 3")
                && text.contains("skein_gossip_messages_total{direction=\"sent\"}")
                && text.contains("skein_gossip_bytes_total{direction=\"received\"}")
        }
    })
    .await;

    // Raft RPCs need the cluster's token too: a stranger cannot vote or append.
    let mut stranger = skein_proto::raft::v1::raft_client::RaftClient::connect(format!(
        "http://{}",
        cluster.nodes[leader].grpc
    ))
    .await
    .expect("connect");
    let refused = stranger
        .vote(skein_proto::raft::v1::RaftMessage {
            payload: b"{}".to_vec(),
            data: Vec::new(),
        })
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // A key created on a follower is visible on every node within a second, and works on
    // another node's proxy.
    let (a, c) = (followers[0], followers[1]);
    let mut admin_a = cluster.admin(a).await;
    let (secret, version) = create_key(&mut admin_a, "k1").await;
    let took = everywhere(&all, Duration::from_secs(1), |i| cluster.has_key(i, "k1")).await;
    println!("key visible on all nodes after {took:?}");
    // Read-your-writes: a read at the write's version on another node waits for it.
    cluster
        .admin(c)
        .await
        .get(authorized(GetRequest {
            kind: Kind::Key as i32,
            id: "k1".to_owned(),
            min_version: version,
        }))
        .await
        .expect("read at version");
    let took = everywhere(&all, Duration::from_secs(1), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;
    println!("key accepted by every proxy after {took:?}");

    // Revoked on one node (another follower), refused by every node within a second.
    cluster
        .admin(c)
        .await
        .revoke_key(authorized(KeyRequest {
            id: "k1".to_owned(),
        }))
        .await
        .expect("revoke");
    let took = everywhere(&all, Duration::from_secs(1), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 401 }
    })
    .await;
    println!("revoked key refused by every proxy after {took:?}");

    // kill -9 the leader: the others elect a new one and take writes within 3 s, and their
    // proxies keep answering meanwhile.
    let mut admin_c = cluster.admin(c).await;
    let (traffic_secret, _) = create_key(&mut admin_c, "k2").await;
    everywhere(&all, Duration::from_secs(2), |i| {
        let secret = traffic_secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;
    cluster.kill9(leader);
    let killed_at = Instant::now();
    let survivors = followers.clone();
    // Proxy traffic to the survivors all through the failover (bounded in count and time).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let client = cluster.client.clone();
        let urls: Vec<String> = survivors
            .iter()
            .map(|&i| cluster.nodes[i].http.clone())
            .collect();
        let secret = traffic_secret.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for round in 0..500 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let url = &urls[round % urls.len()];
                let status = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&secret)
                    .timeout(Duration::from_secs(5))
                    .json(
                        &json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}),
                    )
                    .send()
                    .await
                    .map(|response| response.status().as_u16())
                    .unwrap_or(0);
                results.push(status);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            results
        })
    };
    let mut write_done = None;
    let mut attempt = 0usize;
    while write_done.is_none() {
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no write succeeded after the leader died"
        );
        attempt += 1;
        let mut admin = cluster.admin(survivors[attempt % 2]).await;
        let written = tokio::time::timeout(
            Duration::from_millis(500),
            admin.create(authorized(skein_tests::typed_write(
                Kind::Team,
                json!({"id": "after-failover", "name": "written after the leader died"}),
            ))),
        )
        .await;
        match written {
            Ok(Ok(_)) => write_done = Some(killed_at.elapsed()),
            Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
                write_done = Some(killed_at.elapsed());
            }
            _ => {}
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = traffic.await.expect("traffic task");
    let proxy_calls = statuses.len();
    let proxy_failures: Vec<u16> = statuses
        .into_iter()
        .filter(|status| *status != 200)
        .collect();
    let write_after = write_done.expect("write");
    println!(
        "writes accepted {write_after:?} after kill -9 of the leader; {proxy_calls} proxy calls meanwhile"
    );
    assert!(
        write_after < Duration::from_secs(3),
        "writes resumed only after {write_after:?}"
    );
    assert!(
        proxy_failures.is_empty(),
        "proxy calls failed during the failover: {proxy_failures:?}"
    );
    // Gossip marks the killed node dead.
    let dead_id = cluster.nodes[leader].id;
    let took = everywhere(&survivors, Duration::from_secs(15), |i| {
        let cluster = &cluster;
        async move {
            cluster.status(i).await.is_some_and(|status| {
                status
                    .gossip
                    .iter()
                    .any(|member| member.node_id == dead_id && !member.live)
            })
        }
    })
    .await;
    println!(
        "gossip marked the killed leader dead {:?} after the kill",
        killed_at.elapsed().max(took)
    );

    // kill -9 every node, restart them all: nothing committed is lost.
    for index in all {
        cluster.kill9(index);
    }
    for index in all {
        cluster.spawn(index);
    }
    for index in all {
        cluster.await_serving(index);
    }
    cluster.leader(&all, Duration::from_secs(15)).await;
    for id in ["k1", "k2"] {
        everywhere(&all, Duration::from_secs(5), |i| cluster.has_key(i, id)).await;
    }
    let teams = cluster
        .admin(0)
        .await
        .list(authorized(ListRequest {
            kind: Kind::Team as i32,
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert!(teams.items.iter().any(|team| team.id == "after-failover"));
    everywhere(&all, Duration::from_secs(5), |i| {
        let cluster = &cluster;
        let (revoked, live) = (secret.clone(), traffic_secret.clone());
        async move { cluster.chat(i, &revoked).await == 401 && cluster.chat(i, &live).await == 200 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_and_a_new_learner_catch_up_from_a_snapshot() {
    let mock = start_mock().await.expect("mock");
    // Snapshot every 20 entries and keep 5 behind it, so history is compacted quickly.
    let mut cluster = Cluster::start(
        &mock.url(),
        3,
        1,
        &["--raft-snapshot-after-logs", "20", "--raft-keep-logs", "5"],
    );
    let voters = [0, 1, 2];
    let leader = cluster.leader(&voters, Duration::from_secs(15)).await;
    let lagging = voters
        .iter()
        .copied()
        .find(|i| *i != leader)
        .expect("follower");
    cluster.kill9(lagging);

    let mut admin = cluster.admin(leader).await;
    for index in 0..60 {
        admin
            .create(authorized(skein_tests::typed_write(
                Kind::Team,
                json!({"id": format!("t{index:02}"), "name": "team"}),
            )))
            .await
            .expect("write while a node is down");
    }
    let status = cluster.status(leader).await.expect("status");
    assert!(
        status.snapshot_index > 20,
        "the leader compacted its log: {status:?}"
    );

    // The lagging voter comes back; a new node joins as a learner through node 1.
    cluster.restart(lagging);
    cluster.restart(3);
    let teams_on = |index: usize| {
        let cluster = &cluster;
        async move {
            cluster
                .admin(index)
                .await
                .list(authorized(ListRequest {
                    kind: Kind::Team as i32,
                    page_size: 1000,
                    ..Default::default()
                }))
                .await
                .map(|list| list.into_inner().items.len())
                .unwrap_or(0)
                == 60
        }
    };
    everywhere(&[lagging, 3], Duration::from_secs(15), teams_on).await;
    for index in [lagging, 3] {
        let status = cluster.status(index).await.expect("status");
        assert!(
            status.snapshot_index > 0,
            "node {} caught up from a snapshot: {status:?}",
            index + 1
        );
    }
    let learner = cluster.status(3).await.expect("status");
    assert_eq!(learner.role, "learner");
    let member = cluster
        .status(leader)
        .await
        .expect("status")
        .members
        .into_iter()
        .find(|member| member.id == 4)
        .expect("the learner is a member");
    assert!(!member.voter);

    // The learner serves traffic like a voter: a key created on the leader works on it.
    let (secret, _) = create_key(&mut admin, "learner-key").await;
    everywhere(&[3], Duration::from_secs(2), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;

    // Membership through the admin API of a follower: promote the learner, then remove it;
    // and a snapshot on demand.
    let follower = voters
        .iter()
        .copied()
        .find(|i| *i != leader)
        .expect("follower");
    let mut follower_admin = cluster.admin(follower).await;
    follower_admin
        .promote_voter(authorized(NodeRequest { id: 4 }))
        .await
        .expect("promote");
    let is_voter = |members: &[ClusterMember]| {
        members
            .iter()
            .find(|member| member.id == 4)
            .map(|member| member.voter)
    };
    let status = cluster.status(leader).await.expect("status");
    assert_eq!(is_voter(&status.members), Some(true), "{status:?}");
    follower_admin
        .remove_node(authorized(NodeRequest { id: 4 }))
        .await
        .expect("remove");
    let status = cluster.status(leader).await.expect("status");
    assert_eq!(is_voter(&status.members), None, "{status:?}");
    let snapshot = follower_admin
        .trigger_snapshot(authorized(TriggerSnapshotRequest {}))
        .await
        .expect("snapshot")
        .into_inner();
    assert!(
        snapshot.index >= status.applied_index.min(60),
        "{snapshot:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_from_a_large_snapshot_while_the_others_serve() {
    let mock = start_mock().await.expect("mock");
    // A snapshot purges the log behind it (but 5 entries): a new node must be sent the snapshot.
    let mut cluster = Cluster::start(&mock.url(), 3, 1, &["--raft-keep-logs", "5"]);
    let voters = [0, 1, 2];
    let leader = cluster.leader(&voters, Duration::from_secs(15)).await;
    let mut admin = cluster
        .admin(leader)
        .await
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let mut last_secret = String::new();
    for batch in 0..10 {
        let keys = (0..10_000)
            .map(|n| CreateKeyRequest {
                id: format!("many-{batch}-{n}"),
                ..Default::default()
            })
            .collect();
        let created = admin
            .create_keys(authorized(CreateKeysRequest { keys }))
            .await
            .expect("bulk create")
            .into_inner();
        last_secret = created.keys.last().expect("created").secret.clone();
    }
    let snapshot = admin
        .trigger_snapshot(authorized(TriggerSnapshotRequest {}))
        .await
        .expect("snapshot")
        .into_inner();
    let (secret, _) = create_key(&mut admin, "served").await;
    let serving = voters
        .iter()
        .copied()
        .find(|i| *i != leader)
        .expect("follower");
    everywhere(&[serving], Duration::from_secs(5), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;

    // The learner joins and is sent the 100,000-key snapshot while a follower serves calls.
    let joined = Instant::now();
    cluster.restart(3);
    let mut served = 0;
    let mut failed = Vec::new();
    let caught_up = loop {
        for _ in 0..5 {
            match cluster.chat(serving, &secret).await {
                200 => served += 1,
                status => failed.push(status),
            }
        }
        if let Some(status) = cluster.status(3).await
            && status.snapshot_index >= snapshot.index
            && cluster.has_key(3, "many-9-9999").await
        {
            break joined.elapsed();
        }
        assert!(
            joined.elapsed() < Duration::from_secs(120),
            "the learner did not catch up: {:?}",
            cluster.status(3).await
        );
    };
    println!(
        "a learner caught up from a snapshot of 100,000 keys in {caught_up:?}; the follower served {served} calls meanwhile"
    );
    assert!(failed.is_empty(), "calls failed meanwhile: {failed:?}");
    assert!(served > 0);
    // It serves the keys it was sent, and says its usage history starts where it joined.
    everywhere(&[3], Duration::from_secs(5), |i| {
        let secret = last_secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;
    let usage = cluster
        .admin(3)
        .await
        .get_usage(authorized(UsageRequest::default()))
        .await
        .expect("usage")
        .into_inner();
    assert!(usage.complete_from_ms > 0, "{usage:?}");
}

/// Total recorded cost and requests of a key, as node `index` has applied it.
async fn recorded(cluster: &Cluster, index: usize, key_id: &str) -> (u64, u64) {
    let usage = cluster
        .admin(index)
        .await
        .get_usage(authorized(UsageRequest {
            key_id: key_id.to_owned(),
            ..Default::default()
        }))
        .await
        .map(tonic::Response::into_inner)
        .unwrap_or_default();
    (
        usage.rows.iter().map(|row| row.cost_nanos).sum(),
        usage.rows.iter().map(|row| row.requests).sum(),
    )
}

/// Poll the recorded usage of `key_id` on node `index` until `done` holds (10 s at most).
async fn poll_recorded(
    cluster: &Cluster,
    index: usize,
    key_id: &str,
    done: impl Fn((u64, u64)) -> bool,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let figures = recorded(cluster, index, key_id).await;
        if done(figures) {
            return figures;
        }
        assert!(
            Instant::now() < deadline,
            "usage of {key_id} stuck at {figures:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a request of the overshoot runs sets its output limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// `max_tokens: 16`.
    MaxTokens,
    /// None: the reservation uses a default and caps the upstream request to what it holds;
    /// every other request streams.
    Unset,
}

/// One answer of an overshoot run: status, error code, and whether the answer ended at its
/// output limit (`finish_reason: "length"`).
async fn spend_once(
    cluster: &Cluster,
    node: usize,
    secret: &str,
    limit: Limit,
    stream: bool,
) -> (u16, String, bool) {
    let body = match limit {
        Limit::MaxTokens => {
            json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
        }
        // The mock echoes the prompt: about 27 tokens of answer, more than a nearly spent
        // budget may hold for.
        Limit::Unset => {
            json!({"model": "alpha", "stream": stream, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "tell me everything about the escrow of budgets across the nodes of a cluster please"}]})
        }
    };
    let response = cluster
        .client
        .post(format!("{}/v1/chat/completions", cluster.nodes[node].http))
        .bearer_auth(secret)
        .timeout(Duration::from_secs(5))
        .json(&body)
        .send()
        .await;
    let Ok(response) = response else {
        return (0, String::new(), false);
    };
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    if status == 200 {
        let length = text.contains("\"finish_reason\":\"length\"");
        if stream {
            assert!(
                text.trim_end().ends_with("data: [DONE]"),
                "a stream ends properly: {text}"
            );
            assert!(
                text.contains("\"usage\":{"),
                "a stream carries its usage: {text}"
            );
        }
        return (status, String::new(), length);
    }
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, false)
}

/// One overshoot run: a fresh key with a budget worth `worth` calls of `unit_cost`, spent by
/// 6 clients (2 per node) as fast as they can. (limit, spent, answers, answers cut at their
/// limit).
async fn overshoot_run(
    cluster: &std::sync::Arc<Cluster>,
    admin: &mut AdminClient<Channel>,
    leader: usize,
    run: usize,
    limit_kind: Limit,
    budget_nanos: u64,
) -> (u64, u64, u64, u64) {
    let key = format!("run-{run}");
    let (secret, _) = create_key(admin, &key).await;
    let version = admin
        .create(authorized(skein_tests::typed_write(Kind::Budget, json!({"id": format!("{key}-budget"), "scope": {"kind": "key", "id": key}, "limit_nanos": budget_nanos, "period": "lifetime"}))))
        .await
        .expect("budget")
        .into_inner()
        .version;
    for index in [0, 1, 2] {
        cluster
            .admin(index)
            .await
            .get(authorized(GetRequest {
                kind: Kind::Budget as i32,
                id: format!("{key}-budget"),
                min_version: version,
            }))
            .await
            .expect("budget on every node");
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..6 {
        let cluster = cluster.clone();
        let secret = secret.clone();
        workers.push(tokio::spawn(async move {
            let node = worker % 3;
            let stream = limit_kind == Limit::Unset && worker % 2 == 1;
            let (mut accepted, mut cut, mut refused_in_a_row) = (0u64, 0u64, 0u32);
            // Bounded: at most 2000 calls or 20 s per worker; stops once the budget is refused
            // as exhausted 5 times in a row.
            for _ in 0..2000 {
                if started.elapsed() > Duration::from_secs(20) || refused_in_a_row >= 5 {
                    break;
                }
                match spend_once(&cluster, node, &secret, limit_kind, stream).await {
                    (200, _, length) => {
                        accepted += 1;
                        cut += u64::from(length);
                        refused_in_a_row = 0;
                    }
                    (429, code, _) if code == "budget_leased_elsewhere" => {
                        // What is left is held by other nodes for now: back off a little.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    (429, code, _) if code == "insufficient_quota" => refused_in_a_row += 1,
                    other => panic!("unexpected answer {other:?}"),
                }
            }
            (accepted, cut)
        }));
    }
    let (mut accepted, mut cut) = (0, 0);
    for worker in workers {
        let (answers, ended) = worker.await.expect("worker");
        accepted += answers;
        cut += ended;
    }
    // Wait until every accepted request is recorded.
    let (spent, requests) =
        poll_recorded(cluster, leader, &key, |(_, requests)| requests >= accepted).await;
    assert_eq!(requests, accepted, "every accepted request recorded once");
    (budget_nanos, spent, accepted, cut)
}

/// The escrow bound, measured as issue 3 measured the share rule it replaces: 3 nodes,
/// 6 concurrent clients, a small budget spent much faster than a spend flush, over 20 runs
/// with `max_tokens` set and 20 without (half of those streamed): the spend never exceeds the
/// budget in any run. (`SKEIN_OVERSHOOT_RUNS` sets the number of runs of each kind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_overshoot_across_three_nodes_under_concurrent_load() {
    let mock = start_mock().await.expect("mock");
    let cluster = std::sync::Arc::new(Cluster::start(&mock.url(), 3, 0, &[]));
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(15)).await;
    let mut admin = cluster.admin(leader).await;
    admin
        .create(authorized(skein_tests::typed_write(Kind::Price, json!({"model": "alpha", "input_nanos_per_token": 1000, "output_nanos_per_token": 1000}))))
        .await
        .expect("price");
    // Calibrate: the cost of one request.
    let (probe, _) = create_key(&mut admin, "probe").await;
    everywhere(&[0], Duration::from_secs(2), |i| {
        let probe = probe.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &probe).await == 200 }
    })
    .await;
    let unit = poll_recorded(&cluster, leader, "probe", |(_, requests)| requests >= 1).await;
    let unit_cost = unit.0 / unit.1;
    assert!(unit_cost > 0);
    let runs: usize = std::env::var("SKEIN_OVERSHOOT_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(20);
    let mut table = Vec::new();
    let mut worst = [0f64; 2];
    for run in 0..2 * runs {
        let kind = if run < runs {
            Limit::MaxTokens
        } else {
            Limit::Unset
        };
        // 60 calls' worth with max_tokens; without, calls cost about four times more.
        let budget = 60 * unit_cost * if kind == Limit::MaxTokens { 1 } else { 4 };
        let started = Instant::now();
        let (limit, spent, answers, cut) =
            overshoot_run(&cluster, &mut admin, leader, run, kind, budget).await;
        let ratio = spent as f64 / limit as f64;
        let slot = usize::from(kind == Limit::Unset);
        worst[slot] = worst[slot].max(ratio);
        table.push(format!(
            "run {run:>2} {kind:?}: spent {spent} of {limit} n$ = {ratio:.4}x over {answers} answers ({cut} ended at their limit) in {:?}",
            started.elapsed()
        ));
        assert!(
            spent <= limit,
            "run {run} ({kind:?}) spent {spent} of a {limit} n$ budget"
        );
        assert!(
            spent >= limit * 8 / 10,
            "run {run} ({kind:?}): the budget was used: {spent} of {limit}"
        );
    }
    println!("{}", table.join("\n"));
    println!(
        "worst run: {:.4}x with max_tokens, {:.4}x without, over {runs} runs each",
        worst[0], worst[1]
    );
}

/// A CA, a certificate for the nodes (127.0.0.1 and localhost) and one for a client, as PEM
/// files in `dir`.
fn write_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "skein test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    for (name, names) in [
        ("node", vec!["localhost".to_owned(), "127.0.0.1".to_owned()]),
        ("client", vec!["skein-cli".to_owned()]),
    ] {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    }
}

/// Run the CLI; (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend(["--token", TOKEN]);
    run_cli(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_and_the_admin_api_run_over_mutual_tls() {
    let mock = start_mock().await.expect("mock");
    let certs = tempfile::tempdir().expect("dir");
    write_certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let (ca, node_cert, node_key) = (path("ca.pem"), path("node.pem"), path("node.key"));
    let (client_cert, client_key) = (path("client.pem"), path("client.key"));
    let cluster = Cluster::start(
        &mock.url(),
        3,
        0,
        &[
            "--grpc-tls-cert",
            &node_cert,
            "--grpc-tls-key",
            &node_key,
            "--grpc-tls-ca",
            &ca,
            "--grpc-tls-require-client-cert",
        ],
    );
    let endpoint = |index: usize| format!("https://{}", cluster.nodes[index].grpc);
    let tls = [
        "--tls-ca",
        ca.as_str(),
        "--tls-cert",
        client_cert.as_str(),
        "--tls-key",
        client_key.as_str(),
    ];

    // The group forms over mTLS: a leader, and every member answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["cluster", "status", "--output", "json", "--endpoint"];
        let first = endpoint(0);
        args.push(&first);
        args.extend(tls);
        let (ok, out, err) = cli(&args);
        if ok {
            let status: serde_json::Value = serde_json::from_str(&out).expect("json");
            let members = status["members"].as_array().cloned().unwrap_or_default();
            if status["leader_id"].as_u64().unwrap_or(0) != 0
                && members.len() == 3
                && members.iter().all(|member| member["reachable"] == true)
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no TLS cluster formed: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A key created through node 2 works on node 3's proxy.
    let second = endpoint(1);
    let mut args = vec![
        "key",
        "create",
        "--id",
        "tls-key",
        "--output",
        "json",
        "--endpoint",
        &second,
    ];
    args.extend(tls);
    let (ok, out, err) = cli(&args);
    assert!(ok, "{err}");
    let secret = serde_json::from_str::<serde_json::Value>(&out).expect("json")["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    everywhere(&[2], Duration::from_secs(2), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;

    // Without a client certificate, or without TLS, the port refuses.
    let third = endpoint(2);
    let (ok, _, err) = cli(&["team", "list", "--endpoint", &third, "--tls-ca", &ca]);
    assert!(!ok, "a client without a certificate was served: {err}");
    let plain = format!("http://{}", cluster.nodes[2].grpc);
    let (ok, _, err) = cli(&["team", "list", "--endpoint", &plain]);
    assert!(!ok, "a plaintext client was served: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rate_limited_on_one_node_cools_down_on_every_node() {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:KEY_A, name: a}}, {{key: env:KEY_B, name: b}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n",
        mock.url()
    );
    let cluster = Cluster::start_config(&config, 3, 0, &[]);
    let all = [0, 1, 2];
    cluster.leader(&all, Duration::from_secs(15)).await;
    // Measure in steady state: every node's failure detector has seen the others live.
    cluster.all_live_in_gossip(&all).await;
    let (secret, _) = create_key(&mut cluster.admin(0).await, "health").await;
    everywhere(&all, Duration::from_secs(5), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;

    // Key a answers 429 for 30 s. Node 1 finds out; nodes 2 and 3 learn it over gossip.
    mock.set_key_fault(
        "key-a",
        Some(skein_mock::Fault::Status {
            status: 429,
            retry_after: Some(30),
        }),
    );
    let key_a_calls = || {
        mock.requests()
            .iter()
            .filter(|request| request.api_key.as_deref() == Some("key-a"))
            .count()
    };
    let before = key_a_calls();
    for _ in 0..200 {
        if key_a_calls() > before {
            break;
        }
        assert_eq!(cluster.chat(0, &secret).await, 200, "served by key b");
    }
    let learned_at = Instant::now();
    assert!(key_a_calls() > before, "node 1 tried key a");
    let cooling = |index: usize| {
        let cluster = &cluster;
        async move {
            let status = cluster
                .admin(index)
                .await
                .get_status(authorized(skein_proto::admin::v1::GetStatusRequest {}))
                .await
                .expect("status")
                .into_inner();
            status.providers[0]
                .keys
                .iter()
                .any(|key| key.name == "a" && key.cooling_down_ms > 20_000)
        }
    };
    let took = everywhere(&[1, 2], Duration::from_secs(3), cooling).await;
    println!(
        "key a cooled down on the other nodes {:?} after node 1 saw its 429 (gossip interval 200 ms)",
        learned_at.elapsed().min(took + Duration::from_millis(1))
    );
    // The time from node 1's failed attempt to nodes 2 and 3 cooling the key, from their logs
    // (one machine, one clock): seconds of the day of a log line's timestamp.
    let log_seconds = |index: usize, needle: &str| -> f64 {
        let process = cluster.nodes[index].process.as_ref().expect("running");
        let line = process
            .wait_for(needle, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("no `{needle}` in node {}'s log", index + 1));
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let stamp = parsed["timestamp"].as_str().expect("timestamp");
        let time = stamp
            .split_once('T')
            .map(|(_, time)| time.trim_end_matches('Z'))
            .expect("rfc 3339");
        let parts: Vec<f64> = time
            .split(':')
            .map(|part| part.parse().expect("number"))
            .collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    };
    let failed = log_seconds(0, "upstream attempt failed");
    let slowest = (1..3)
        .map(|index| log_seconds(index, "another node saw it fail") - failed)
        .fold(0.0, f64::max);
    println!(
        "key a cooled on the other nodes {:.0} ms after node 1's 429, by their logs (target: one gossip interval + 100 ms = 300 ms)",
        slowest * 1000.0
    );
    assert!(
        slowest < 0.3,
        "{slowest} s: over one gossip interval + 100 ms"
    );
    // Nodes 2 and 3 never send to key a.
    let after = key_a_calls();
    for round in 0..40 {
        assert_eq!(cluster.chat(1 + round % 2, &secret).await, 200);
    }
    assert_eq!(
        key_a_calls(),
        after,
        "another node still sent to the cooled key"
    );
}

/// If less than `needed` is left of the current one-minute rate-limit window, wait for the
/// next one, so that a measurement falls in one window. (A wait for the wall clock, not for
/// another process.)
async fn within_one_window(needed: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let left = 60_000 - now % 60_000;
    if left < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 50)).await;
    }
}

/// One paced chat call every `gap` to the node `target(i)` picks, `count` calls in all: how
/// many were admitted, and the headers of the first admitted and the first refused answer.
async fn offer(
    cluster: &Cluster,
    secret: &str,
    count: usize,
    gap: Duration,
    target: impl Fn(usize) -> usize,
) -> (
    u64,
    Option<reqwest::header::HeaderMap>,
    Option<reqwest::header::HeaderMap>,
) {
    let started = Instant::now();
    let mut admitted = 0;
    let (mut ok_headers, mut refused_headers) = (None, None);
    for i in 0..count {
        let due = started + gap * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let response = cluster
            .client
            .post(format!(
                "{}/v1/chat/completions",
                cluster.nodes[target(i)].http
            ))
            .bearer_auth(secret)
            .timeout(Duration::from_secs(5))
            .json(&json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("answer");
        match response.status().as_u16() {
            200 => {
                admitted += 1;
                ok_headers.get_or_insert_with(|| response.headers().clone());
            }
            429 => {
                refused_headers.get_or_insert_with(|| response.headers().clone());
            }
            other => panic!("unexpected status {other}: {:?}", response.text().await),
        }
    }
    (admitted, ok_headers, refused_headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_per_minute_limit_holds_for_the_whole_cluster() {
    let mock = start_mock().await.expect("mock");
    let cluster = Cluster::start(&mock.url(), 3, 0, &[]);
    let all = [0, 1, 2];
    cluster.leader(&all, Duration::from_secs(15)).await;
    // Every node sees all three in gossip before the measurement.
    cluster.all_live_in_gossip(&all).await;
    const LIMIT: u64 = 150;
    let limited_key = |id: &'static str| {
        let cluster = &cluster;
        async move {
            let created = cluster
                .admin(0)
                .await
                .create_key(authorized(CreateKeyRequest {
                    id: id.to_owned(),
                    name: id.to_owned(),
                    rpm: LIMIT,
                    ..Default::default()
                }))
                .await
                .expect("create key")
                .into_inner();
            everywhere(&all, Duration::from_secs(5), |i| {
                let cluster = &cluster;
                async move { cluster.has_key(i, id).await }
            })
            .await;
            created.secret
        }
    };
    let within =
        |admitted: u64| admitted <= LIMIT + LIMIT * 2 / 100 && admitted * 100 >= LIMIT * 95;

    // (a) 3L offered evenly over the three nodes, in about 6 s.
    let secret = limited_key("even").await;
    within_one_window(Duration::from_secs(15)).await;
    let (admitted, ok, refused) = offer(
        &cluster,
        &secret,
        3 * LIMIT as usize,
        Duration::from_millis(13),
        |i| i % 3,
    )
    .await;
    println!(
        "evenly over 3 nodes: {admitted} admitted of {} offered, limit {LIMIT}",
        3 * LIMIT
    );
    assert!(within(admitted), "admitted {admitted}, limit {LIMIT}");
    let ok = ok.expect("some admitted");
    assert_eq!(ok["x-ratelimit-limit-requests"], LIMIT.to_string().as_str());
    let remaining: u64 = ok["x-ratelimit-remaining-requests"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(remaining < LIMIT, "{remaining}");
    assert!(ok.contains_key("x-ratelimit-reset-requests"));
    let refused = refused.expect("some refused");
    let retry_after: u64 = refused["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        refused["x-ratelimit-limit-requests"],
        LIMIT.to_string().as_str()
    );

    // (b) 3L offered, all to node 1 for the first half, then all to node 2.
    let secret = limited_key("moving").await;
    within_one_window(Duration::from_secs(15)).await;
    let half = 3 * LIMIT as usize / 2;
    let (admitted, _, refused) = offer(
        &cluster,
        &secret,
        3 * LIMIT as usize,
        Duration::from_millis(13),
        |i| usize::from(i >= half),
    )
    .await;
    println!(
        "all to node 1, then node 2: {admitted} admitted of {} offered, limit {LIMIT}",
        3 * LIMIT
    );
    assert!(within(admitted), "admitted {admitted}, limit {LIMIT}");
    // Once the cluster has used it all, the refusal says so and waits for the window.
    let refused = refused.expect("some refused");
    assert!(refused.contains_key("x-ratelimit-reset-requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_key_near_the_end_of_its_quota_is_spared_by_every_node() {
    let mock = start_mock().await.expect("mock");
    // Key a: 100 requests at the provider, told in its x-ratelimit headers. Key b: no quota.
    mock.set_key_quota("key-a", Some(100));
    let config = format!(
        "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:KEY_A, name: a}}, {{key: env:KEY_B, name: b}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n",
        mock.url()
    );
    let cluster = Cluster::start_config(&config, 3, 0, &[]);
    let all = [0, 1, 2];
    cluster.leader(&all, Duration::from_secs(15)).await;
    let (secret, _) = create_key(&mut cluster.admin(0).await, "quota").await;
    everywhere(&all, Duration::from_secs(5), |i| {
        let secret = secret.clone();
        let cluster = &cluster;
        async move { cluster.chat(i, &secret).await == 200 }
    })
    .await;
    // 300 calls at 40/s over the three nodes: half would go to key a if no node knew.
    let started = Instant::now();
    for i in 0..300u32 {
        tokio::time::sleep_until((started + Duration::from_millis(25) * i).into()).await;
        assert_eq!(cluster.chat(i as usize % 3, &secret).await, 200);
    }
    let calls = |key: &str| {
        mock.requests()
            .iter()
            .filter(|request| request.api_key.as_deref() == Some(key))
            .count()
    };
    let (a, b) = (calls("key-a"), calls("key-b"));
    println!("key a (quota 100) got {a} calls, key b {b}");
    // Key a was used until near its end, and never past it (no 429 from the provider).
    assert!(a >= 80, "key a was avoided too early: {a}");
    assert!(a <= 100, "key a was sent past its quota: {a}");
}

/// A call with an `Idempotency-Key` through node `index`: status, body, and whether it was a
/// replay of the first attempt.
async fn idempotent_call(
    cluster: &Cluster,
    index: usize,
    secret: &str,
    key: &str,
    body: &serde_json::Value,
) -> (u16, String, bool) {
    let response = cluster
        .client
        .post(format!("{}/v1/chat/completions", cluster.nodes[index].http))
        .bearer_auth(secret)
        .header("idempotency-key", key)
        .timeout(Duration::from_secs(10))
        .json(body)
        .send()
        .await
        .expect("call");
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, response.text().await.expect("body"), replayed)
}

/// A request retried with the same `Idempotency-Key` on every node of the cluster runs once
/// upstream, is charged once, and every retry gets the first answer byte for byte (streams
/// too); a retry while the first attempt runs gets 409, the key reused for another request
/// 422, and a failed first attempt leaves the key free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_across_nodes_run_once_and_are_charged_once() {
    let mock = start_mock().await.expect("mock");
    let cluster = std::sync::Arc::new(Cluster::start(&mock.url(), 3, 0, &[]));
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(15)).await;
    let mut admin = cluster.admin(leader).await;
    let (secret, version) = create_key(&mut admin, "retrying").await;
    for (kind, json) in [
        (
            Kind::Price,
            json!({"model": "alpha", "input_nanos_per_token": 1000, "output_nanos_per_token": 1000}),
        ),
        (
            Kind::Route,
            json!({"name": "slow", "deployments": [{"provider": "p", "model": "mock-slow-1500"}]}),
        ),
        (
            Kind::Route,
            json!({"name": "broken", "deployments": [{"provider": "p", "model": "mock-500"}]}),
        ),
    ] {
        admin
            .create(authorized(skein_tests::typed_write(kind, json)))
            .await
            .expect("write");
    }
    everywhere(&all, Duration::from_secs(10), |i| {
        let cluster = &cluster;
        async move { cluster.has_key(i, "retrying").await }
    })
    .await;
    let _ = version;
    // Every node serves the slow route before the test relies on it.
    let routes_ready = |i: usize| {
        let cluster = &cluster;
        let secret = secret.clone();
        async move {
            let models = match cluster
                .client
                .get(format!("{}/v1/models", cluster.nodes[i].http))
                .bearer_auth(&secret)
                .send()
                .await
            {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            models.contains("\"slow\"") && models.contains("\"broken\"")
        }
    };
    everywhere(&all, Duration::from_secs(10), routes_ready).await;
    mock.clear_requests();

    // Once on node 1, then retried on every node: one upstream call, the same answer.
    let body = json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "charge me once"}]});
    let (status, first, replayed) = idempotent_call(&cluster, 0, &secret, "order-1", &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(!replayed);
    for index in [1, 2, 0, 2] {
        let (status, again, replayed) =
            idempotent_call(&cluster, index, &secret, "order-1", &body).await;
        assert_eq!(status, 200);
        assert!(replayed, "node {index} replays the first answer");
        assert_eq!(
            again, first,
            "node {index} gives the first answer byte for byte"
        );
    }
    // The same key with another request is refused; another key runs.
    let other = json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "something else"}]});
    let (status, refused, _) = idempotent_call(&cluster, 1, &secret, "order-1", &other).await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused.contains("idempotency_key_reused"), "{refused}");
    let (status, _, replayed) = idempotent_call(&cluster, 1, &secret, "order-2", &other).await;
    assert_eq!((status, replayed), (200, false));
    // A streamed answer is replayed as the same stream.
    let streamed = json!({"model": "alpha", "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "stream once"}]});
    let (status, stream, _) = idempotent_call(&cluster, 2, &secret, "order-3", &streamed).await;
    assert_eq!(status, 200);
    assert!(stream.contains("data: [DONE]"), "{stream}");
    let (status, again, replayed) =
        idempotent_call(&cluster, 0, &secret, "order-3", &streamed).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(again, stream);
    let upstream_calls = mock
        .requests()
        .iter()
        .filter(|request| request.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(upstream_calls, 3, "one upstream call per key");

    // While the first attempt runs, a retry on another node is told to wait.
    let slow = json!({"model": "slow", "max_tokens": 16, "messages": [{"role": "user", "content": "take your time"}]});
    let running = {
        let cluster = cluster.clone();
        let secret = secret.clone();
        let slow = slow.clone();
        tokio::spawn(async move { idempotent_call(&cluster, 0, &secret, "order-4", &slow).await })
    };
    // Once the upstream has the first attempt, a retry on another node gets 409.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mock
        .requests()
        .iter()
        .any(|request| request.body["model"] == "mock-slow-1500")
    {
        assert!(
            Instant::now() < deadline,
            "the slow call never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body, _) = idempotent_call(&cluster, 1, &secret, "order-4", &slow).await;
    let conflict = (status, body);
    assert_eq!(conflict.0, 409, "{}", conflict.1);
    assert!(
        conflict.1.contains("idempotency_key_in_use"),
        "{}",
        conflict.1
    );
    let (status, first_slow, _) = running.await.expect("first attempt");
    assert_eq!(status, 200);
    let (status, again, replayed) = idempotent_call(&cluster, 2, &secret, "order-4", &slow).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(again, first_slow);

    // A failed first attempt keeps nothing: the retry runs.
    let broken = json!({"model": "broken", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]});
    let (status, _, _) = idempotent_call(&cluster, 0, &secret, "order-5", &broken).await;
    assert!(status >= 500, "the broken route fails: {status}");
    let (status, _, replayed) = idempotent_call(&cluster, 1, &secret, "order-5", &broken).await;
    assert!(status >= 500 && !replayed, "the retry ran again: {status}");

    // Charged once: four keys answered (order-1 to order-4), four requests recorded; the
    // failed ones charged nothing.
    let (_, requests) =
        poll_recorded(&cluster, leader, "retrying", |(_, requests)| requests >= 4).await;
    assert_eq!(requests, 4, "each key charged once");
}
