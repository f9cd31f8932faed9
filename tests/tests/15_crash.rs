//! Spend that survives `kill -9`: a node killed right after answering records, once it is
//! back, every request it answered, and none twice.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{CreateKeyRequest, UsageRequest};
use skein_tests::process::Spawned;
use skein_tests::{authorized, binary, free_port, start_mock, wait_until};
use tonic::transport::Channel;

const TOKEN: &str = "crash-token";

struct Node {
    dir: tempfile::TempDir,
    grpc: String,
    mock_url: String,
}

impl Node {
    fn spawn(&self) -> (Spawned, String) {
        let config = self.dir.path().join("skein.yaml");
        std::fs::write(
            &config,
            format!(
                "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:UPSTREAM_KEY}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n",
                self.mock_url
            ),
        )
        .expect("config");
        let mut command = Command::new(binary("skein").expect("binary"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", &self.grpc])
            .args([
                "--gossip-addr",
                "off",
                "--log-format",
                "json",
                "--admin-token",
                TOKEN,
            ])
            .env("UPSTREAM_KEY", "upstream-secret")
            .env_remove("SKEIN_CONFIG");
        let process = Spawned::start(&mut command);
        let url = process.serving_url(Duration::from_secs(30));
        (process, url)
    }

    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(
            Channel::from_shared(format!("http://{}", self.grpc))
                .expect("uri")
                .timeout(Duration::from_secs(10))
                .connect_lazy(),
        )
    }

    async fn recorded_requests(&self, key_id: &str) -> u64 {
        self.admin()
            .get_usage(authorized(
                TOKEN,
                UsageRequest {
                    key_id: key_id.to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .map(|usage| usage.into_inner().rows.iter().map(|row| row.requests).sum())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_settled_before_a_kill_9_is_recorded_once_after_the_restart() {
    let mock = start_mock().await.expect("mock");
    let node = Node {
        dir: tempfile::tempdir().expect("dir"),
        grpc: format!("127.0.0.1:{}", free_port().expect("port")),
        mock_url: mock.url(),
    };
    let (mut process, mut url) = node.spawn();
    let created = wait_until(Duration::from_secs(10), || async {
        node.admin()
            .create_key(authorized(
                TOKEN,
                CreateKeyRequest {
                    id: "crash".to_owned(),
                    name: "crash".to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .is_ok()
    })
    .await;
    assert!(created, "key created");
    let Some(secret) = node
        .admin()
        .rotate_key(authorized(
            TOKEN,
            skein_proto::admin::v1::KeyRequest {
                id: "crash".to_owned(),
            },
        ))
        .await
        .ok()
        .map(|rotated| rotated.into_inner().secret)
    else {
        panic!("a secret for the key");
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut answered = 0u64;
    for round in 0..3 {
        for _ in 0..25 {
            let status = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&secret)
                .json(&json!({"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .map(|response| response.status().as_u16())
                .unwrap_or(0);
            assert_eq!(status, 200, "round {round}");
            answered += 1;
        }
        // The crash comes right after the last answer: every answered call was settled, and
        // logged, before it was answered.
        process.kill9();
        (process, url) = node.spawn();
        let recorded = wait_until(Duration::from_secs(15), || async {
            node.recorded_requests("crash").await >= answered
        })
        .await;
        assert!(
            recorded,
            "round {round}: {answered} answered, {} recorded\n{}",
            node.recorded_requests("crash").await,
            process.output()
        );
    }
    // Nothing is counted twice, even after further flushes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(node.recorded_requests("crash").await, answered);
    drop(process);
}
