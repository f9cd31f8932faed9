//! The Anthropic Messages API in both directions, and OpenAI clients on Anthropic upstreams.

use serde_json::{Value, json};
use skein_mock::MockServer;
use skein_node::MapEnvironment;
use skein_tests::{Gateway, metric_value, named_events, start_mock};

async fn setup() -> (MockServer, Gateway) {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        r#"
version: 1
providers:
  - name: claude
    kind: anthropic
    base_url: {url}
    keys: [{{key: env:ANTHROPIC_KEY}}]
  - name: oai
    kind: openai_compatible
    base_url: {url}/v1
    keys: [{{key: env:OPENAI_KEY}}]
routes:
  - name: claude-route
    deployments: [{{provider: claude, model: claude-upstream}}]
  - name: oai-route
    deployments: [{{provider: oai, model: gpt-upstream}}]
"#,
        url = mock.url()
    );
    let env = MapEnvironment::from_pairs([("ANTHROPIC_KEY", "ant-key"), ("OPENAI_KEY", "oai-key")]);
    let gateway = Gateway::start(&config, env).await.expect("gateway");
    (mock, gateway)
}

fn tools_openai() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ])
}

fn tools_anthropic() -> Value {
    json!([
        {"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object"}}
    ])
}

#[tokio::test]
async fn openai_client_on_an_anthropic_upstream() {
    let (mock, gateway) = setup().await;
    let request = json!({
        "model": "claude-route",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather in Paris? [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}
        ],
        "tools": tools_openai(),
        "tool_choice": "required",
        "stop": "END",
        "temperature": 0.2,
    });
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-provider"], "claude");
    let message = &body["choices"][0]["message"];
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(message["tool_calls"][1]["function"]["name"], "get_time");
    let arguments: Value = serde_json::from_str(
        message["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .expect("string"),
    )
    .expect("json");
    assert_eq!(arguments["city"], "Paris");
    assert!(body["usage"]["prompt_tokens"].as_u64().expect("usage") > 0);

    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.api_key.as_deref(), Some("ant-key"));
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.body["model"], "claude-upstream");
    assert_eq!(sent.body["system"][0]["text"], "Be brief.");
    assert_eq!(sent.body["max_tokens"], 4096);
    assert_eq!(sent.body["stop_sequences"], json!(["END"]));
    assert_eq!(sent.body["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        sent.body["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "weather in Paris? [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}]}])
    );
}

#[tokio::test]
async fn openai_stream_from_an_anthropic_upstream() {
    let (_mock, gateway) = setup().await;
    let request = json!({
        "model": "claude-route", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "tell me"}],
    });
    let (status, _, events) = gateway
        .post_stream("/v1/chat/completions", &request)
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).expect("json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Mock reply from claude-upstream: tell me");
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, vec!["stop"]);
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert!(
        usage["prompt_tokens"].as_u64().expect("prompt") > 0
            && usage["completion_tokens"].as_u64().expect("completion") > 0
    );

    // Tool use streamed: ids and names first, then the arguments in pieces.
    let request = json!({"model": "claude-route", "stream": true, "tools": tools_openai(), "messages": [{"role": "user", "content": "x [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}]});
    let (_, _, events) = gateway
        .post_stream("/v1/chat/completions", &request)
        .await
        .expect("stream");
    let mut arguments = [String::new(), String::new()];
    for data in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).expect("json");
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .unwrap_or(&Vec::new())
        {
            arguments[call["index"].as_u64().expect("index") as usize]
                .push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    for (index, text) in arguments.iter().enumerate() {
        assert_eq!(
            serde_json::from_str::<Value>(text).expect("whole JSON")["call"],
            index
        );
    }
}

#[tokio::test]
async fn anthropic_client_on_an_anthropic_upstream_passes_through() {
    let (mock, gateway) = setup().await;
    let request = json!({
        "model": "claude-route", "max_tokens": 100, "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": tools_anthropic(),
        "messages": [{"role": "user", "content": "weather? [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}],
    });
    let response = gateway
        .client
        .post(format!("{}/v1/messages", gateway.url))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "interleaved-thinking-2025-05-14")
        .json(&request)
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 200);
    let events = named_events(&response.text().await.expect("body"));
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "event names match payload types"
        );
    }
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|(_, data)| data["delta"]["type"].as_str())
        .collect();
    assert!(
        deltas.contains(&"thinking_delta")
            && deltas.contains(&"signature_delta")
            && deltas.contains(&"input_json_delta"),
        "{deltas:?}"
    );
    let sent = &mock.requests()[0];
    assert_eq!(sent.body["model"], "claude-upstream");
    assert_eq!(sent.body["thinking"], request["thinking"]);
    assert_eq!(
        sent.headers["anthropic-beta"],
        "interleaved-thinking-2025-05-14"
    );
    let metrics = gateway.metrics().await.expect("metrics");
    assert!(
        metric_value(
            &metrics,
            "skein_tokens_total",
            &["provider=\"claude\"", "kind=\"output\""]
        )
        .expect("tokens")
            > 0.0
    );
}

#[tokio::test]
async fn anthropic_client_on_an_openai_upstream() {
    let (mock, gateway) = setup().await;
    let request = json!({
        "model": "oai-route", "max_tokens": 200, "system": "Be brief.",
        "tools": tools_anthropic(), "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}
        ],
    });
    let (status, _, body) = gateway
        .post_json("/v1/messages", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "message");
    assert_eq!(body["model"], "oai-route");
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(
        body["content"][0]["text"],
        "Mock reply from gpt-upstream: weather?"
    );
    assert!(body["usage"]["input_tokens"].as_u64().expect("usage") > 0);

    let sent = &mock.requests()[0].body;
    assert_eq!(sent["model"], "gpt-upstream");
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        sent["messages"][2]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        sent["messages"][3],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
    );
    assert_eq!(sent["messages"].as_array().map(Vec::len), Some(4));
    assert_eq!(sent["parallel_tool_calls"], false);
    assert_eq!(sent["max_tokens"], 200);

    // Streaming tool use, translated from OpenAI chunks to Anthropic events.
    let request = json!({"model": "oai-route", "max_tokens": 50, "stream": true, "tools": tools_anthropic(), "messages": [{"role": "user", "content": "x [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}]});
    let response = gateway.post("/v1/messages", &request).await.expect("call");
    assert_eq!(response.status(), 200);
    let events = named_events(&response.text().await.expect("body"));
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(&names[..2], &["message_start", "ping"]);
    assert_eq!(
        &names[names.len() - 2..],
        &["message_delta", "message_stop"]
    );
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "content_block_start")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["content_block"]["name"], "get_weather");
    assert_eq!(starts[1]["index"], 1);
    let mut json_parts = String::new();
    for (_, data) in &events {
        if data["index"] == 0 && data["delta"]["type"] == "input_json_delta" {
            json_parts.push_str(data["delta"]["partial_json"].as_str().expect("partial"));
        }
    }
    assert_eq!(
        serde_json::from_str::<Value>(&json_parts).expect("json"),
        json!({"call": 0, "city": "Paris"})
    );
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert!(delta["usage"]["output_tokens"].as_u64().expect("usage") > 0);
    let opens = names
        .iter()
        .filter(|name| **name == "content_block_start")
        .count();
    let closes = names
        .iter()
        .filter(|name| **name == "content_block_stop")
        .count();
    assert_eq!(opens, closes);
}

#[tokio::test]
async fn count_tokens_and_anthropic_shaped_errors() {
    let (_mock, gateway) = setup().await;
    let request = json!({"model": "claude-route", "messages": [{"role": "user", "content": "count these words please"}]});
    let (status, _, body) = gateway
        .post_json("/v1/messages/count_tokens", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert!(body["input_tokens"].as_u64().expect("count") > 0);

    let (status, _, body) = gateway
        .post_json(
            "/v1/messages/count_tokens",
            &json!({"model": "oai-route", "messages": []}),
        )
        .await
        .expect("call");
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, _, body) = gateway
        .post_json(
            "/v1/messages",
            &json!({"model": "nope", "max_tokens": 5, "messages": []}),
        )
        .await
        .expect("call");
    assert_eq!(status, 404);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("claude-route")
    );

    let (status, _, body) = gateway.post_json("/v1/messages", &json!({"model": "claude/mock-500", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})).await.expect("call");
    assert_eq!(status, 502);
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_broken_anthropic_stream_ends_with_an_error_event() {
    let (_mock, gateway) = setup().await;
    // Anthropic upstream, passed through: the mock cuts the stream after three events.
    let request = json!({"model": "claude/mock-stream-cut", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let response = gateway.post("/v1/messages", &request).await.expect("call");
    assert_eq!(response.status(), 200);
    let events = named_events(&response.text().await.expect("body"));
    assert_eq!(
        events.first().map(|(name, _)| name.as_str()),
        Some("message_start")
    );
    let (name, data) = events.last().expect("events");
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!events.iter().any(|(name, _)| name == "message_stop"));

    // OpenAI-shaped upstream, translated: same ending.
    let request = json!({"model": "oai/mock-stream-cut", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let response = gateway.post("/v1/messages", &request).await.expect("call");
    let events = named_events(&response.text().await.expect("body"));
    assert_eq!(events.last().map(|(name, _)| name.as_str()), Some("error"));
}

/// What Claude Code needs of a gateway: its `?beta=true` query kept on the native path, a
/// `max_tokens` above what the target model can produce clamped to the model's limit (Claude
/// Code asks every model for 32000; gpt-4o-mini refuses more than 16384), system turns among
/// the messages, and `/v1/models` in Anthropic's shape.
#[tokio::test]
async fn claude_code_fidelity_query_clamp_system_turns_and_models() {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        r#"
version: 1
providers:
  - name: claude
    kind: anthropic
    base_url: {url}
    keys: [{{key: env:ANTHROPIC_KEY}}]
  - name: oai
    kind: openai
    base_url: {url}/v1
    keys: [{{key: env:OPENAI_KEY}}]
routes:
  - name: claude-route
    deployments: [{{provider: claude, model: claude-3-5-haiku-20241022}}]
  - name: mini
    deployments: [{{provider: oai, model: gpt-4o-mini}}]
  - name: mini-unclamped
    deployments: [{{provider: oai, model: gpt-4o-mini, max_output_tokens: 100000}}]
"#,
        url = mock.url()
    );
    let env = MapEnvironment::from_pairs([("ANTHROPIC_KEY", "ant-key"), ("OPENAI_KEY", "oai-key")]);
    let gateway = Gateway::start(&config, env).await.expect("gateway");
    let body = json!({"model": "claude-route", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]});
    let response = gateway
        .client
        .post(format!("{}/v1/messages?beta=true", gateway.url))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 200);
    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.query.as_deref(), Some("beta=true"));
    // claude-3-5-haiku produces at most 8192 tokens: clamped on the native path too.
    assert_eq!(sent.body["max_tokens"], 8192);

    // Translated to an OpenAI model, with a system turn among the messages.
    mock.clear_requests();
    let body = json!({"model": "mini", "max_tokens": 32000, "system": "Be brief.", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
        {"role": "user", "content": "again"}
    ]});
    let (status, _, answer) = gateway
        .post_json("/v1/messages", &body)
        .await
        .expect("call");
    assert_eq!(status, 200, "{answer}");
    let sent = &mock.requests()[0].body;
    assert_eq!(sent["max_completion_tokens"], 16384);
    assert_eq!(
        sent["messages"][2],
        json!({"role": "system", "content": "reminder"})
    );
    // Without the clamp the upstream refuses, as OpenAI does.
    let body = json!({"model": "mini-unclamped", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, refused) = gateway
        .post_json("/v1/messages", &body)
        .await
        .expect("call");
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["type"], "error");

    // `/v1/models` answers in Anthropic's shape to Anthropic's headers, OpenAI's otherwise.
    let models: Value = gateway
        .client
        .get(format!("{}/v1/models", gateway.url))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["has_more"], false);
    assert_eq!(models["data"][0]["type"], "model");
    assert!(models["data"][0]["display_name"].is_string());
    assert!(models["first_id"].is_string());
    let models: Value = gateway
        .client
        .get(format!("{}/v1/models", gateway.url))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
}
