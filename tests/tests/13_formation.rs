//! How a cluster forms and grows in join-or-form mode (`--bootstrap-node`), the mode the Helm
//! chart runs: every node starts with the same arguments whatever the replica count, only the
//! bootstrap node may form a cluster, the others join as learners, and the leader promotes
//! learners up to the target voter count. Scaling 1 → 3 → 5 → 3 and 0 → 3 must give one
//! cluster; a node whose data was lost must not take its old place; a node of another cluster
//! is refused; a node without quorum stops saying ready but keeps serving.
//!
//! `--peers` lists the nodes that exist at each step, as the chart's headless Service name
//! resolves to the pods that exist.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{ClusterStatusRequest, ClusterStatusResponse, CreateKeyRequest};
use skein_tests::process::{Spawned, run_cli};
use skein_tests::{binary, free_port, metric_value, start_mock, wait_until};
use tonic::transport::Channel;

const TOKEN: &str = "formation-token";

struct Node {
    id: u64,
    grpc: String,
    data: PathBuf,
    process: Option<Spawned>,
    http: String,
}

struct Cluster {
    nodes: Vec<Node>,
    config: PathBuf,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Cluster {
    fn new(mock_url: &str, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("skein.yaml");
        std::fs::write(
            &config,
            format!(
                "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {mock_url}/v1\n    keys: [{{key: env:UPSTREAM_KEY}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n"
            ),
        )
        .expect("config");
        Cluster {
            nodes: Vec::new(),
            config,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            dir,
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    /// Make nodes up to `count` (not started).
    fn grow_to(&mut self, count: u64) {
        while (self.nodes.len() as u64) < count {
            let id = self.nodes.len() as u64 + 1;
            self.nodes.push(Node {
                id,
                grpc: format!("127.0.0.1:{}", free_port().expect("port")),
                data: self.dir.path().join(format!("node-{id}")),
                process: None,
                http: String::new(),
            });
        }
    }

    /// Start node `index` with `--peers` naming the first `existing` nodes.
    fn spawn(&mut self, index: usize, existing: usize) {
        let peers = self.nodes[..existing]
            .iter()
            .map(|node| node.grpc.clone())
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
            .args(["--bootstrap-node", "1", "--target-voters", "3"])
            .args(["--peers", &peers])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", &node.grpc])
            .args(["--gossip-addr", "off"])
            .args(["--log-format", "json", "--admin-token", TOKEN])
            .args(&self.extra)
            .env("UPSTREAM_KEY", "upstream-secret")
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

    /// Start nodes `range` with the first `existing` as peers, and wait until they serve.
    fn start(&mut self, range: std::ops::Range<usize>, existing: usize) {
        for index in range.clone() {
            self.spawn(index, existing);
        }
        for index in range {
            self.await_serving(index);
        }
    }

    fn kill9(&mut self, index: usize) {
        if let Some(mut process) = self.nodes[index].process.take() {
            process.kill9();
        }
    }

    fn admin(&self, index: usize) -> AdminClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.nodes[index].grpc))
            .expect("uri")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        AdminClient::new(channel)
    }

    async fn status(&self, index: usize) -> Option<ClusterStatusResponse> {
        self.admin(index)
            .cluster_status(authorized(ClusterStatusRequest {}))
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// Wait until every node in `live` reports the same cluster id, `voters` voters and
    /// `members` members, with a leader; returns the cluster id.
    async fn converged(&self, live: &[usize], voters: usize, members: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = Vec::new();
        let done = loop {
            last.clear();
            for &index in live {
                last.push(self.status(index).await);
            }
            let agreed = match last.first() {
                Some(Some(first)) => {
                    !first.cluster_id.is_empty()
                        && last.iter().all(|status| {
                            status.as_ref().is_some_and(|status| {
                                status.cluster_id == first.cluster_id
                                    && status.leader_id != 0
                                    && status.leader_id == first.leader_id
                                    && status.members.len() == members
                                    && status.members.iter().filter(|m| m.voter).count() == voters
                            })
                        })
                }
                _ => false,
            };
            if agreed || std::time::Instant::now() > deadline {
                break agreed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            done,
            "nodes {live:?} did not converge on one cluster of {voters} voters and {members} members: {last:#?}"
        );
        self.status(live[0]).await.expect("status").cluster_id
    }

    async fn get(&self, index: usize, path: &str) -> (u16, String) {
        match self
            .client
            .get(format!("{}{path}", self.nodes[index].http))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(response) => (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    async fn chat(&self, index: usize, secret: &str) -> u16 {
        self.client
            .post(format!("{}/v1/chat/completions", self.nodes[index].http))
            .bearer_auth(secret)
            .timeout(Duration::from_secs(5))
            .json(&json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .map(|response| response.status().as_u16())
            .unwrap_or(0)
    }

    fn cli(&self, index: usize, args: &[&str]) -> (bool, String, String) {
        let endpoint = format!("http://{}", self.nodes[index].grpc);
        let mut full = args.to_vec();
        full.extend_from_slice(&["--endpoint", &endpoint, "--token", TOKEN]);
        run_cli(&full)
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    skein_tests::authorized(TOKEN, message)
}

async fn create_key(cluster: &Cluster, index: usize, id: &str) -> String {
    cluster
        .admin(index)
        .create_key(authorized(CreateKeyRequest {
            id: id.to_owned(),
            name: id.to_owned(),
            ..Default::default()
        }))
        .await
        .expect("create key")
        .into_inner()
        .secret
}

async fn serves_everywhere(cluster: &Cluster, live: &[usize], secret: &str) {
    for &index in live {
        let ok = wait_until(Duration::from_secs(10), || async move {
            cluster.chat(index, secret).await == 200
        })
        .await;
        assert!(ok, "node {} does not serve the key", index + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_one_three_five_three_keeps_one_cluster() {
    let mock = start_mock().await.expect("mock");
    let mut cluster = Cluster::new(&mock.url(), &[]);

    // One node: it forms the cluster alone.
    cluster.grow_to(1);
    cluster.start(0..1, 1);
    let id = cluster.converged(&[0], 1, 1).await;
    let first_key = create_key(&cluster, 0, "before-scaling").await;

    // 1 → 3: the new nodes join as learners and both are promoted together.
    cluster.grow_to(3);
    cluster.start(1..3, 3);
    assert_eq!(cluster.converged(&[0, 1, 2], 3, 3).await, id);
    serves_everywhere(&cluster, &[0, 1, 2], &first_key).await;

    // 3 → 5: two more learners; the target stays three voters.
    cluster.grow_to(5);
    cluster.start(3..5, 5);
    assert_eq!(cluster.converged(&[0, 1, 2, 3, 4], 3, 5).await, id);
    let second_key = create_key(&cluster, 4, "at-five").await;
    serves_everywhere(&cluster, &[0, 1, 2, 3, 4], &second_key).await;

    // 5 → 3: the operator removes the two nodes first, then they stop.
    for id in ["5", "4"] {
        let (ok, out, err) = cluster.cli(1, &["cluster", "remove", id]);
        assert!(ok, "remove {id}: {out} {err}");
    }
    cluster.kill9(4);
    cluster.kill9(3);
    assert_eq!(cluster.converged(&[0, 1, 2], 3, 3).await, id);
    let third_key = create_key(&cluster, 2, "after-scaling-down").await;
    serves_everywhere(&cluster, &[0, 1, 2], &third_key).await;
    serves_everywhere(&cluster, &[0, 1, 2], &first_key).await;

    // A larger target, set through the admin API, promotes the learners it needs.
    cluster.start(3..5, 5);
    assert_eq!(cluster.converged(&[0, 1, 2, 3, 4], 3, 5).await, id);
    let (ok, out, err) = cluster.cli(0, &["cluster", "target-voters", "5"]);
    assert!(ok, "target-voters: {out} {err}");
    assert_eq!(cluster.converged(&[0, 1, 2, 3, 4], 5, 5).await, id);
    let (ok, _, err) = cluster.cli(0, &["cluster", "target-voters", "4"]);
    assert!(
        !ok && err.contains("odd"),
        "an even target is refused: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_started_at_once_form_one_cluster() {
    let mock = start_mock().await.expect("mock");
    let mut cluster = Cluster::new(&mock.url(), &[]);
    cluster.grow_to(3);
    // 0 → 3: every node starts at the same time, each seeing all three.
    cluster.start(0..3, 3);
    cluster.converged(&[0, 1, 2], 3, 3).await;
    let secret = create_key(&cluster, 1, "k").await;
    serves_everywhere(&cluster, &[0, 1, 2], &secret).await;
    for index in 0..3 {
        let (status, body) = cluster.get(index, "/health/startup").await;
        assert_eq!(status, 200, "node {}: {body}", index + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_does_not_take_its_old_place() {
    let mock = start_mock().await.expect("mock");
    let mut cluster = Cluster::new(&mock.url(), &[]);
    cluster.grow_to(3);
    cluster.start(0..3, 3);
    let id = cluster.converged(&[0, 1, 2], 3, 3).await;
    let secret = create_key(&cluster, 0, "k").await;

    // Node 1, the bootstrap node, loses its disk. It finds the cluster instead of forming a
    // new one, and the cluster refuses it until the operator removes the old node 1.
    cluster.kill9(0);
    std::fs::remove_dir_all(&cluster.nodes[0].data).expect("wipe");
    cluster.spawn(0, 3);
    cluster.await_serving(0);
    let process = cluster.nodes[0].process.as_ref().expect("running");
    assert!(
        process
            .wait_for("knows node 1 as incarnation", Duration::from_secs(20))
            .is_some(),
        "the wiped node is told why it cannot join:\n{}",
        process.output()
    );
    let status = cluster.status(0).await.expect("status");
    assert_ne!(status.role, "leader", "{status:?}");
    assert!(status.members.is_empty(), "not a member yet: {status:?}");
    let (ready, _) = cluster.get(0, "/health/ready").await;
    assert_eq!(ready, 503, "not ready before it joined");

    let (ok, out, err) = cluster.cli(1, &["cluster", "remove", "1"]);
    assert!(ok, "remove: {out} {err}");
    // It joins as a learner and is promoted back: one cluster of three.
    assert_eq!(cluster.converged(&[0, 1, 2], 3, 3).await, id);
    serves_everywhere(&cluster, &[0], &secret).await;
    let ready = wait_until(Duration::from_secs(10), || async {
        cluster.get(0, "/health/ready").await.0 == 200
    })
    .await;
    assert!(ready, "ready once caught up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused() {
    let mock = start_mock().await.expect("mock");
    let mut first = Cluster::new(&mock.url(), &[]);
    first.grow_to(1);
    first.start(0..1, 1);
    let first_id = first.converged(&[0], 1, 1).await;
    let mut second = Cluster::new(&mock.url(), &[]);
    second.grow_to(1);
    second.start(0..1, 1);
    let second_id = second.converged(&[0], 1, 1).await;
    assert_ne!(first_id, second_id);
    let secret = create_key(&second, 0, "second-only").await;

    // The first cluster is told (wrongly) that the second's node is its node 2: its leader
    // sends it Raft messages, which are refused, and counted.
    let addr = second.nodes[0].grpc.clone();
    let adding = tokio::spawn({
        let mut admin = first.admin(0);
        async move {
            admin
                .add_learner(authorized(skein_proto::admin::v1::AddLearnerRequest {
                    id: 2,
                    addr,
                }))
                .await
        }
    });
    let refused = wait_until(Duration::from_secs(15), || async {
        let (_, metrics) = second.get(0, "/metrics").await;
        metric_value(
            &metrics,
            "skein_cluster_messages_refused_total",
            &["reason=\"other_cluster\""],
        )
        .is_some_and(|count| count > 0.0)
    })
    .await;
    adding.abort();
    assert!(
        refused,
        "the second cluster's node refused the first cluster's messages"
    );
    // Its state is its own.
    let status = second.status(0).await.expect("status");
    assert_eq!(status.cluster_id, second_id);
    assert_eq!(status.members.len(), 1, "{status:?}");
    serves_everywhere(&second, &[0], &secret).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_quorum_keeps_serving_but_stops_saying_ready() {
    let mock = start_mock().await.expect("mock");
    let mut cluster = Cluster::new(&mock.url(), &["--ready-lease-secs", "2"]);
    cluster.grow_to(3);
    cluster.start(0..3, 3);
    cluster.converged(&[0, 1, 2], 3, 3).await;
    let secret = create_key(&cluster, 0, "k").await;
    serves_everywhere(&cluster, &[0, 1, 2], &secret).await;
    assert_eq!(cluster.get(2, "/health/ready").await.0, 200);

    cluster.kill9(0);
    cluster.kill9(1);
    let not_ready = wait_until(Duration::from_secs(20), || async {
        cluster.get(2, "/health/ready").await.0 == 503
    })
    .await;
    assert!(
        not_ready,
        "a node alone without a leader stops saying ready"
    );
    let (_, body) = cluster.get(2, "/health/ready").await;
    assert!(body.contains("no_leader"), "{body}");
    assert_eq!(cluster.get(2, "/health/live").await.0, 200, "still live");
    assert_eq!(
        cluster.chat(2, &secret).await,
        200,
        "still proxies from its last applied config"
    );
}
