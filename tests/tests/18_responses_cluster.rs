//! A conversation through the Responses API across a three-node cluster of real `skein`
//! processes: turn 1 on node A, turn 2 (streamed, on another provider) on node B with
//! `previous_response_id`, then node A is killed with `kill -9` and turn 3 goes to node C. The
//! conversation survives because every stored response has a copy on a second node.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skein_proto::admin::v1::CreateKeyRequest;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_tests::process::Spawned;
use skein_tests::{authorized, binary, free_port, start_mock};

const TOKEN: &str = "responses-cluster-token";

struct Node {
    grpc: String,
    http: String,
    process: Option<Spawned>,
}

fn start_nodes(config: &PathBuf, data: &std::path::Path) -> Vec<Node> {
    let grpc: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port().expect("port")))
        .collect();
    let voters = grpc
        .iter()
        .enumerate()
        .map(|(index, addr)| format!("{}={addr}", index + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = grpc
        .iter()
        .enumerate()
        .map(|(index, addr)| {
            let mut command = Command::new(binary("skein").expect("binary"));
            command
                .args(["serve", "--config"])
                .arg(config)
                .arg("--data-dir")
                .arg(data.join(format!("node-{}", index + 1)))
                .args(["--node-id", &(index + 1).to_string()])
                .args(["--voters", &voters])
                .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", addr])
                .args(["--gossip-addr", "off"])
                .args(["--log-format", "json", "--admin-token", TOKEN])
                .env("UPSTREAM_KEY", "upstream-secret")
                .env("SKEIN_LOG", "info,openraft=error")
                .env_remove("SKEIN_CONFIG");
            Node {
                grpc: addr.clone(),
                http: String::new(),
                process: Some(Spawned::start(&mut command)),
            }
        })
        .collect();
    for node in &mut nodes {
        node.http = node
            .process
            .as_ref()
            .expect("running")
            .serving_url(Duration::from_secs(30));
    }
    nodes
}

async fn respond(
    client: &reqwest::Client,
    node: &Node,
    secret: &str,
    body: &Value,
) -> (u16, String) {
    let response = client
        .post(format!("{}/v1/responses", node.http))
        .bearer_auth(secret)
        .timeout(Duration::from_secs(10))
        .json(body)
        .send()
        .await
        .expect("call");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The text the model was given, across every item of the request's input.
fn texts(input: &Value) -> String {
    let mut all = String::new();
    for item in input.as_array().into_iter().flatten() {
        match &item["content"] {
            Value::String(text) => all.push_str(text),
            Value::Array(parts) => {
                for part in parts {
                    all.push_str(part["text"].as_str().unwrap_or(""));
                }
            }
            _ => {}
        }
        all.push('|');
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_moves_across_nodes_and_survives_a_kill_9() {
    let mock = start_mock().await.expect("mock");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("skein.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\nproviders:\n  - name: openai\n    kind: openai\n    base_url: {url}/v1\n    keys: [{{key: env:UPSTREAM_KEY}}]\n  - name: claude\n    kind: anthropic\n    base_url: {url}\n    keys: [{{key: env:UPSTREAM_KEY}}]\nroutes:\n  - name: native\n    deployments: [{{provider: openai, model: gpt-upstream}}]\n  - name: claude\n    deployments: [{{provider: claude, model: claude-upstream}}]\n",
            url = mock.url()
        ),
    )
    .expect("config");
    let mut nodes = start_nodes(&config, dir.path());
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    // Two keys, made on node A; wait until every node knows them (and its peers).
    let mut admin = AdminClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", nodes[0].grpc))
            .expect("uri")
            .connect_lazy(),
    );
    let mut secrets = Vec::new();
    for id in ["owner", "stranger"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let created = loop {
            match admin
                .create_key(authorized(
                    TOKEN,
                    CreateKeyRequest {
                        id: id.to_owned(),
                        ..Default::default()
                    },
                ))
                .await
            {
                Ok(created) => break created.into_inner(),
                Err(status) => {
                    assert!(Instant::now() < deadline, "no key: {status}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        secrets.push(created.secret);
    }
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) = respond(
                &client,
                node,
                &secrets[1],
                &json!({"model": "native", "input": "ping", "store": false}),
            )
            .await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never took the key: {status}",
                node.http
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let secret = &secrets[0];

    // Turn 1 on node A (OpenAI, natively).
    let (status, body) = respond(
        &client,
        &nodes[0],
        secret,
        &json!({"model": "native", "input": "turn one: the sky is green"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first: Value = serde_json::from_str(&body).expect("json");
    let first_id = first["id"].as_str().expect("id").to_owned();

    // Turn 2 on node B, streamed, on another provider (Anthropic, translated).
    let response = client
        .post(format!("{}/v1/responses", nodes[1].http))
        .bearer_auth(secret)
        .json(&json!({"model": "claude", "input": "turn two: what colour is the sky?", "previous_response_id": first_id, "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let completed = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|event| event["type"] == "response.completed")
        .unwrap_or_else(|| panic!("no response.completed in {text}"));
    let second_id = completed["response"]["id"].as_str().expect("id").to_owned();
    let to_claude = mock
        .requests()
        .into_iter()
        .rfind(|request| request.path == "/v1/messages")
        .expect("anthropic call");
    let sent = serde_json::to_string(&to_claude.body["messages"]).expect("json");
    assert!(
        sent.contains("the sky is green") && sent.contains("turn two"),
        "{sent}"
    );

    // Node A dies; turn 3 on node C still has the whole conversation.
    if let Some(mut process) = nodes[0].process.take() {
        process.kill9();
    }
    mock.clear_requests();
    let (status, body) = respond(
        &client,
        &nodes[2],
        secret,
        &json!({"model": "native", "input": "turn three", "previous_response_id": second_id}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let to_openai = mock
        .requests()
        .into_iter()
        .find(|request| request.path == "/v1/responses")
        .expect("openai call");
    let all = texts(&to_openai.body["input"]);
    assert!(
        all.contains("turn one") && all.contains("turn two") && all.contains("turn three"),
        "{all}"
    );
    assert!(
        all.contains("Mock reply from gpt-upstream: turn one"),
        "{all}"
    );
    assert!(all.contains("Mock reply from claude-upstream"), "{all}");

    // Turn 1, served by the dead node, is still read from its copy; never by another key.
    for node in &nodes[1..] {
        let read = client
            .get(format!("{}/v1/responses/{first_id}", node.http))
            .bearer_auth(secret)
            .send()
            .await
            .expect("get");
        assert_eq!(read.status(), 200, "on {}", node.http);
        let read: Value = read.json().await.expect("json");
        assert_eq!(read, first);
        let foreign = client
            .get(format!("{}/v1/responses/{first_id}", node.http))
            .bearer_auth(&secrets[1])
            .send()
            .await
            .expect("get");
        assert_eq!(foreign.status(), 404);
    }
    let metrics = client
        .get(format!("{}/metrics", nodes[2].http))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("skein_responses_stored "), "{metrics}");
}
