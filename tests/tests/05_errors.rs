//! Bad input and failing upstreams: every error is OpenAI-shaped (Anthropic-shaped on
//! `/v1/messages`) with the right status; nothing panics.

use serde_json::{Value, json};
use skein_node::MapEnvironment;
use skein_tests::{Gateway, start_mock};

async fn setup(extra_server: &str) -> (skein_mock::MockServer, Gateway) {
    let mock = start_mock().await.expect("mock");
    // A port nothing listens on: bind, read, release.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = format!(
        r#"
version: 1
server:
  max_body_bytes: 2048
{extra_server}
providers:
  - name: mock
    kind: openai_compatible
    base_url: {url}/v1
    keys: [{{key: env:KEY}}]
  - name: nowhere
    kind: openai_compatible
    base_url: http://{closed}/v1
    keys: [{{key: env:KEY}}]
  - name: gm
    kind: gemini
    base_url: {url}
    keys: [{{key: env:KEY}}]
routes:
  - name: ok
    deployments: [{{provider: mock, model: fine}}]
  - name: unreachable
    retry: {{max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms}}
    deployments: [{{provider: nowhere, model: fine}}]
  - name: hangs
    deployments: [{{provider: mock, model: mock-timeout}}]
"#,
        url = mock.url()
    );
    let gateway = Gateway::start(
        &config,
        MapEnvironment::from_pairs([("KEY", "sk-secret-value")]),
    )
    .await
    .expect("gateway");
    (mock, gateway)
}

async fn raw(gateway: &Gateway, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let response = gateway
        .client
        .request(method, format!("{}{path}", gateway.url))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("text");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")),
    )
}

fn assert_openai_error(body: &Value, kind: &str) {
    let error = &body["error"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_requests_get_precise_400s() {
    let (_mock, gateway) = setup("").await;
    let post = reqwest::Method::POST;
    let (status, body) = raw(
        &gateway,
        post.clone(),
        "/v1/chat/completions",
        "{\n  \"model\": \"ok\",\n  \"messages\": [,]\n}",
    )
    .await;
    assert_eq!(status, 400);
    assert_openai_error(&body, "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("line 3 column"),
        "{body}"
    );

    let (status, body) = raw(&gateway, post.clone(), "/v1/chat/completions", "[1, 2]").await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "the request body must be a JSON object"
    );

    let (status, body) = raw(
        &gateway,
        post.clone(),
        "/v1/chat/completions",
        r#"{"messages": []}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("model"))
    );

    let (status, body) = raw(
        &gateway,
        post.clone(),
        "/v1/chat/completions",
        r#"{"model": 42}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (400, Some("`model` must be a string"))
    );

    let (status, body) = raw(
        &gateway,
        post.clone(),
        "/v1/chat/completions",
        r#"{"model": "ok", "stream": "yes"}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (400, Some("`stream` must be a boolean"))
    );

    let (status, body) = raw(&gateway, post.clone(), "/v1/chat/completions", "").await;
    assert_eq!(status, 400);
    assert_openai_error(&body, "invalid_request_error");

    let (status, body) = raw(&gateway, post.clone(), "/v1/messages", "{oops").await;
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (mock, gateway) = setup("").await;
    let big = json!({"model": "ok", "messages": [{"role": "user", "content": "x".repeat(4096)}]})
        .to_string();
    let (status, body) = raw(
        &gateway,
        reqwest::Method::POST,
        "/v1/chat/completions",
        &big,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large");
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn unknown_paths_methods_and_models() {
    let (_mock, gateway) = setup("").await;
    let (status, body) = raw(&gateway, reqwest::Method::POST, "/v1/nothing-here", "{}").await;
    assert_eq!(status, 404);
    assert_openai_error(&body, "invalid_request_error");
    let (status, body) = raw(&gateway, reqwest::Method::GET, "/v1/chat/completions", "").await;
    assert_eq!(status, 405);
    assert_openai_error(&body, "invalid_request_error");
    let (status, body) = raw(
        &gateway,
        reqwest::Method::POST,
        "/v1/chat/completions",
        r#"{"model": "gpt-nope", "messages": []}"#,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("gpt-nope") && message.contains("ok") && message.contains("unreachable"),
        "{message}"
    );
}

#[tokio::test]
async fn a_model_name_cannot_reach_into_another_upstream_path() {
    let (mock, gateway) = setup("").await;
    for model in ["gm/../../v1beta/files", "gm/a b", "gm/.."] {
        let request =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let (status, body) = raw(
            &gateway,
            reqwest::Method::POST,
            "/v1/chat/completions",
            &request.to_string(),
        )
        .await;
        assert_eq!(status, 400, "{model}: {body}");
        assert_openai_error(&body, "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_model_name", "{model}");
        assert_eq!(body["error"]["param"], "model");
    }
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn unreachable_upstreams_and_deadlines() {
    let (_mock, gateway) = setup("  request_timeout: 400ms").await;
    let (status, body) = raw(
        &gateway,
        reqwest::Method::POST,
        "/v1/chat/completions",
        r#"{"model": "unreachable", "messages": []}"#,
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(
        !body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("sk-secret-value")
    );

    let started = std::time::Instant::now();
    let (status, body) = raw(
        &gateway,
        reqwest::Method::POST,
        "/v1/chat/completions",
        r#"{"model": "hangs", "messages": []}"#,
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["type"], "upstream_error");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}
