//! The OpenAI-compatible API over a real socket, against the mock provider.

use serde_json::{Value, json};
use skein_node::MapEnvironment;
use skein_tests::{Gateway, metric_value, start_mock};

fn config(mock_url: &str) -> String {
    format!(
        r#"
version: 1
providers:
  - name: mock
    kind: openai_compatible
    base_url: {mock_url}/v1
    keys: [{{key: env:MOCK_KEY}}]
    models: [mock-gpt]
routes:
  - name: smart
    deployments:
      - {{provider: mock, model: upstream-smart}}
  - name: embed
    deployments:
      - {{provider: mock, model: upstream-embed}}
"#
    )
}

async fn setup() -> (skein_mock::MockServer, Gateway) {
    let mock = start_mock().await.expect("mock");
    let gateway = Gateway::start(
        &config(&mock.url()),
        MapEnvironment::from_pairs([("MOCK_KEY", "sk-mock-1")]),
    )
    .await
    .expect("gateway");
    (mock, gateway)
}

#[tokio::test]
async fn chat_passthrough_rewrites_only_the_model_and_keeps_unknown_fields() {
    let (mock, gateway) = setup().await;
    let request = json!({
        "model": "smart",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "n": 2, "stop": ["\n\n"], "seed": 42, "logprobs": true, "top_logprobs": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "x_vendor_extension": {"keep": [1, 2.50, "three"]},
    });
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["choices"][0]["message"]["content"], "{\"mock\":true}");
    assert_eq!(headers["x-skein-provider"], "mock");
    assert_eq!(headers["x-skein-deployment"], "mock/upstream-smart");
    assert_eq!(headers["x-skein-attempts"], "1");
    assert!(
        headers["x-request-id"]
            .to_str()
            .expect("ascii")
            .starts_with("req_")
    );

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    let sent = &recorded[0].body;
    assert_eq!(sent["model"], "upstream-smart");
    assert_eq!(sent["x_vendor_extension"], request["x_vendor_extension"]);
    for field in [
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "response_format",
        "messages",
    ] {
        assert_eq!(
            sent[field], request[field],
            "{field} must pass through untouched"
        );
    }
    assert_eq!(recorded[0].api_key.as_deref(), Some("sk-mock-1"));
    assert_eq!(recorded[0].path, "/v1/chat/completions");
}

#[tokio::test]
async fn streaming_captures_usage_but_only_shows_it_when_asked() {
    let (mock, gateway) = setup().await;
    let request =
        json!({"model": "smart", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, events) = gateway
        .post_stream("/v1/chat/completions", &request)
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).expect("json"))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|chunk| !chunk["choices"].as_array().expect("choices").is_empty()),
        "no usage-only chunk for a client that did not ask"
    );
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Mock reply from upstream-smart: hi");
    // The upstream was asked for usage anyway.
    assert_eq!(
        mock.requests()[0].body["stream_options"]["include_usage"],
        true
    );

    let asked = json!({"model": "smart", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]});
    let (_, _, events) = gateway
        .post_stream("/v1/chat/completions", &asked)
        .await
        .expect("stream");
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).expect("json");
    assert!(
        usage_chunk["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage")
            > 0
    );

    // Usage of both streams was counted.
    let metrics = gateway.metrics().await.expect("metrics");
    let output = metric_value(
        &metrics,
        "skein_tokens_total",
        &["provider=\"mock\"", "kind=\"output\""],
    )
    .expect("tokens metric");
    assert!(output >= 2.0 * 9.0, "{metrics}");
}

#[tokio::test]
async fn streaming_tool_calls_pass_through_in_order() {
    let (_mock, gateway) = setup().await;
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]);
    let request = json!({"model": "smart", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "weather? [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}]});
    let (status, _, events) = gateway
        .post_stream("/v1/chat/completions", &request)
        .await
        .expect("stream");
    assert_eq!(status, 200);
    let mut arguments = [String::new(), String::new()];
    let mut names = vec![String::new(), String::new()];
    let mut finish = None;
    for data in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).expect("json");
        if let Some(calls) = chunk["choices"][0]["delta"]["tool_calls"].as_array() {
            for call in calls {
                let index = call["index"].as_u64().expect("index") as usize;
                if let Some(name) = call["function"]["name"].as_str() {
                    names[index].push_str(name);
                }
                arguments[index].push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    assert_eq!(names, vec!["get_weather", "get_time"]);
    for (index, text) in arguments.iter().enumerate() {
        let parsed: Value = serde_json::from_str(text).expect("arguments are whole JSON");
        assert_eq!(parsed["call"], index);
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
}

#[tokio::test]
async fn embeddings_completions_and_models() {
    let (mock, gateway) = setup().await;
    let (status, _, body) = gateway
        .post_json(
            "/v1/embeddings",
            &json!({"model": "embed", "input": ["a", "b"], "dimensions": 4}),
        )
        .await
        .expect("embeddings");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        body["data"][0]["embedding"].as_array().map(Vec::len),
        Some(4)
    );
    assert_eq!(mock.requests()[0].body["model"], "upstream-embed");

    let (status, _, body) = gateway
        .post_json(
            "/v1/completions",
            &json!({"model": "smart", "prompt": "Say hi"}),
        )
        .await
        .expect("completions");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");

    let (status, _, events) = gateway
        .post_stream(
            "/v1/completions",
            &json!({"model": "smart", "prompt": "Say hi", "stream": true}),
        )
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let models: Value = gateway
        .client
        .get(format!("{}/v1/models", gateway.url))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|model| model["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["embed", "mock/mock-gpt", "smart"]);
}

#[tokio::test]
async fn provider_slash_model_goes_straight_to_the_provider_and_request_ids_are_kept() {
    let (mock, gateway) = setup().await;
    let response = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .header("x-request-id", "client-id-123")
        .json(&json!({"model": "mock/some-exotic-model", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-id-123");
    assert_eq!(mock.requests()[0].body["model"], "some-exotic-model");
}

#[tokio::test]
async fn metrics_and_health() {
    let (_mock, gateway) = setup().await;
    gateway
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "smart", "messages": []}),
        )
        .await
        .expect("call");
    let metrics = gateway.metrics().await.expect("metrics");
    for name in [
        "skein_requests_total",
        "skein_request_duration_seconds_bucket",
        "skein_gateway_overhead_seconds_bucket",
        "skein_upstream_duration_seconds_bucket",
        "skein_upstream_attempts_total",
        "skein_requests_in_flight",
        "skein_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert_eq!(
        metric_value(
            &metrics,
            "skein_requests_total",
            &["route=\"smart\"", "status=\"200\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let live = gateway
        .client
        .get(format!("{}/health/live", gateway.url))
        .send()
        .await
        .expect("live");
    assert_eq!(live.status(), 200);
    let ready = gateway
        .client
        .get(format!("{}/health/ready", gateway.url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 200);
}
