//! The Responses API (`POST /v1/responses`): natively to an OpenAI upstream, translated to
//! Anthropic, Gemini and an OpenAI-compatible chat upstream; streamed and not; tools, custom
//! tools, built-in tools; stored responses bound to their key, chained with
//! `previous_response_id`, read, listed and deleted.

use serde_json::{Value, json};
use skein_mock::MockServer;
use skein_node::MapEnvironment;
use skein_proto::admin::v1::CreateKeyRequest;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_tests::{Gateway, authorized, named_events, start_mock};

const TOKEN: &str = "responses-admin-token";

fn config(url: &str) -> String {
    format!(
        r#"
version: 1
providers:
  - name: openai
    kind: openai
    base_url: {url}/v1
    keys: [{{key: env:OPENAI_KEY}}]
  - name: compat
    kind: openai_compatible
    base_url: {url}/v1
    keys: [{{key: env:OPENAI_KEY}}]
  - name: claude
    kind: anthropic
    base_url: {url}
    keys: [{{key: env:ANTHROPIC_KEY}}]
  - name: gem
    kind: gemini
    base_url: {url}
    keys: [{{key: env:GEMINI_KEY}}]
routes:
  - name: native
    deployments: [{{provider: openai, model: gpt-upstream}}]
  - name: chat
    deployments: [{{provider: compat, model: chat-upstream}}]
  - name: claude
    deployments: [{{provider: claude, model: claude-upstream}}]
  - name: gemini
    deployments: [{{provider: gem, model: gemini-upstream}}]
  - name: cut
    deployments: [{{provider: claude, model: mock-stream-cut}}]
  - name: fallback
    deployments: [{{provider: openai, model: mock-500}}]
    fallbacks: [claude]
"#
    )
}

fn env() -> MapEnvironment {
    MapEnvironment::from_pairs([
        ("OPENAI_KEY", "oai-key"),
        ("ANTHROPIC_KEY", "ant-key"),
        ("GEMINI_KEY", "gem-key"),
    ])
}

async fn setup() -> (MockServer, Gateway) {
    let mock = start_mock().await.expect("mock");
    let gateway = Gateway::start(&config(&mock.url()), env())
        .await
        .expect("gateway");
    (mock, gateway)
}

async fn create(
    gateway: &Gateway,
    key: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = gateway
        .client
        .post(format!("{}/v1/responses", gateway.url))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("call");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

async fn stream(
    gateway: &Gateway,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Vec<(String, Value)>) {
    let response = gateway
        .client
        .post(format!("{}/v1/responses", gateway.url))
        .json(body)
        .send()
        .await
        .expect("call");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    (status, headers, named_events(&text))
}

async fn get(gateway: &Gateway, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = gateway.client.get(format!("{}{path}", gateway.url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("call");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The output text of a response object.
fn output_text(response: &Value) -> String {
    let mut text = String::new();
    for item in response["output"].as_array().into_iter().flatten() {
        for part in item["content"].as_array().into_iter().flatten() {
            if part["type"] == "output_text" {
                text.push_str(part["text"].as_str().unwrap_or(""));
            }
        }
    }
    text
}

/// Every stream's shape: numbered from 0 without gaps, names matching payload types, created
/// and in_progress first, one terminal event last.
fn assert_well_formed(events: &[(String, Value)]) {
    for (index, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], index, "{events:?}");
        assert_eq!(data["type"], name.as_str(), "{events:?}");
    }
    assert_eq!(events[0].0, "response.created");
    assert_eq!(events[1].0, "response.in_progress");
    let last = &events[events.len() - 1].0;
    assert!(
        [
            "response.completed",
            "response.incomplete",
            "response.failed"
        ]
        .contains(&last.as_str()),
        "{last}"
    );
}

#[tokio::test]
async fn native_passthrough_keeps_the_upstream_answer_with_skein_s_id() {
    let (mock, gateway) = setup().await;
    let (status, headers, body) = create(
        &gateway,
        None,
        &json!({"model": "native", "input": "hello there", "instructions": "Be brief.", "metadata": {"k": "v"}, "unknown_field": 7}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-provider"], "openai");
    let id = body["id"].as_str().expect("id");
    assert!(
        id.starts_with("resp_") && !id.starts_with("resp_mock"),
        "{id}"
    );
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(
        output_text(&body),
        "Mock reply from gpt-upstream: hello there"
    );
    assert!(body["usage"]["input_tokens"].as_u64().expect("usage") > 0);
    // Sent to the upstream's Responses endpoint as it came, with the deployment's model.
    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1/responses");
    assert_eq!(sent.body["model"], "gpt-upstream");
    assert_eq!(sent.body["unknown_field"], 7);
    assert_eq!(sent.body["input"], "hello there");

    // Stored: read back, chained, listed.
    let (status, stored) = get(&gateway, None, &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(stored, body);
    mock.clear_requests();
    let (status, _, second) = create(
        &gateway,
        None,
        &json!({"model": "native", "input": "and again", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    // The upstream gets the whole conversation, not an id it never saw.
    let sent = &mock.requests()[0].body;
    assert_eq!(sent["previous_response_id"], Value::Null);
    let input = sent["input"].as_array().expect("input");
    assert_eq!(input.len(), 3, "{input:?}");
    assert_eq!(input[0]["content"][0]["text"], "hello there");
    assert_eq!(input[1]["role"], "assistant");
    assert_eq!(input[2]["content"], "and again");
    assert!(input.iter().all(|item| item.get("id").is_none()));
    let second_id = second["id"].as_str().expect("id");
    let (status, items) = get(
        &gateway,
        None,
        &format!("/v1/responses/{second_id}/input_items?order=asc"),
    )
    .await;
    assert_eq!(status, 200, "{items}");
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"].as_array().map(Vec::len), Some(3));

    // Streamed natively: the upstream's events, with Skein's id in the ones carrying the
    // response.
    let (status, _, events) = stream(
        &gateway,
        &json!({"model": "native", "input": "stream it", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_well_formed(&events);
    let created_id = events[0].1["response"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let completed = &events[events.len() - 1].1["response"];
    assert_eq!(completed["id"], created_id.as_str());
    assert!(!created_id.starts_with("resp_mock"));
    assert_eq!(
        output_text(completed),
        "Mock reply from gpt-upstream: stream it"
    );
    let (status, stored) = get(&gateway, None, &format!("/v1/responses/{created_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(&stored, completed);

    // Deleted: gone; an unknown id is a 404 in OpenAI's shape.
    let deleted = gateway
        .client
        .delete(format!("{}/v1/responses/{id}", gateway.url))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 200);
    let deleted: Value = deleted.json().await.expect("json");
    assert_eq!(deleted["deleted"], true);
    let (status, missing) = get(&gateway, None, &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["type"], "invalid_request_error");
    // A chain through a deleted response is refused, naming the parameter.
    let (status, _, refused) = create(
        &gateway,
        None,
        &json!({"model": "native", "input": "x", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "previous_response_id");
    assert_eq!(refused["error"]["code"], "previous_response_not_found");
}

#[tokio::test]
async fn translated_to_anthropic_with_tools_custom_tools_and_a_built_in_tool() {
    let (mock, gateway) = setup().await;
    let tools = json!([
        {"type": "function", "name": "shell", "description": "run a command", "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"]}},
        {"type": "custom", "name": "apply_patch", "description": "edit files", "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}},
        {"type": "web_search"},
        {"type": "code_interpreter", "container": {"type": "auto"}}
    ]);
    let request = json!({
        "model": "claude", "instructions": "You are a coding agent.", "tools": tools,
        "max_output_tokens": 300, "reasoning": {"effort": "low"},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "[[call shell {\"command\": [\"ls\"]}]] [[call apply_patch {\"input\": \"*** Begin Patch\"}]]"}]}],
    });
    let (status, headers, body) = create(&gateway, None, &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-provider"], "claude");
    // Anthropic runs a web search of its own; it has no code interpreter to offer.
    assert_eq!(headers["x-skein-dropped-tools"], "code_interpreter");
    assert!(output_text(&body).is_empty() || output_text(&body).contains("searched the web"));
    let output = body["output"].as_array().expect("output");
    let calls: Vec<&Value> = output
        .iter()
        .filter(|item| item["type"] != "reasoning")
        .collect();
    assert_eq!(calls[0]["type"], "function_call", "{output:?}");
    assert_eq!(calls[0]["name"], "shell");
    assert_eq!(
        serde_json::from_str::<Value>(calls[0]["arguments"].as_str().expect("args")).expect("json"),
        json!({"command": ["ls"]})
    );
    assert_eq!(calls[1]["type"], "custom_tool_call");
    assert_eq!(calls[1]["name"], "apply_patch");
    assert_eq!(calls[1]["input"], "*** Begin Patch");
    // The upstream got Anthropic's shape: system, tools (the custom one as a function with
    // one string input; web_search left out), thinking from the reasoning effort.
    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["system"][0]["text"], "You are a coding agent.");
    let names: Vec<&str> = sent.body["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|tool| tool["name"].as_str())
        .collect();
    assert_eq!(names, ["shell", "apply_patch", "web_search"]);
    assert_eq!(sent.body["tools"][2]["type"], "web_search_20250305");
    assert_eq!(
        sent.body["tools"][1]["input_schema"]["required"],
        json!(["input"])
    );
    assert_eq!(sent.body["max_tokens"], 300);

    // The tool results go back; the model answers with text that has seen them.
    let shell_call = calls[0]["call_id"].as_str().expect("call id");
    let patch_call = calls[1]["call_id"].as_str().expect("call id");
    let mut input = request["input"].as_array().expect("input").clone();
    input.extend(output.iter().cloned());
    input.push(
        json!({"type": "function_call_output", "call_id": shell_call, "output": "README.md"}),
    );
    input.push(
        json!({"type": "custom_tool_call_output", "call_id": patch_call, "output": "patched"}),
    );
    let follow_up = json!({"model": "claude", "tools": tools, "input": input, "stream": true});
    mock.clear_requests();
    let (status, _, events) = stream(&gateway, &follow_up).await;
    assert_eq!(status, 200);
    assert_well_formed(&events);
    let completed = &events[events.len() - 1];
    assert_eq!(completed.0, "response.completed");
    let text = output_text(&completed.1["response"]);
    assert!(
        text.contains("README.md") && text.contains("patched"),
        "{text}"
    );
    assert!(
        completed.1["response"]["usage"]["output_tokens"]
            .as_u64()
            .expect("usage")
            > 0
    );
    let sent = &mock.requests()[0].body;
    let results: Vec<&Value> = sent["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .flat_map(|message| message["content"].as_array().into_iter().flatten())
        .filter(|block| block["type"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 2, "{sent}");
    // Deltas arrive as text deltas between their part's added and done events.
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    let first_delta = names
        .iter()
        .position(|name| *name == "response.output_text.delta")
        .expect("delta");
    let added = names
        .iter()
        .position(|name| *name == "response.content_part.added")
        .expect("added");
    let done = names
        .iter()
        .position(|name| *name == "response.output_text.done")
        .expect("done");
    assert!(added < first_delta && first_delta < done, "{names:?}");
}

#[tokio::test]
async fn a_web_search_tool_runs_where_the_provider_has_one_and_is_named_where_not() {
    let (mock, gateway) = setup().await;
    let request =
        |model: &str| json!({"model": model, "input": "news?", "tools": [{"type": "web_search"}]});
    // Gemini grounds with Google Search.
    let (status, headers, body) = create(&gateway, None, &request("gemini")).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("x-skein-dropped-tools").is_none());
    assert!(
        output_text(&body).starts_with("[searched the web]"),
        "{body}"
    );
    let sent = mock
        .requests()
        .into_iter()
        .find(|request| request.path.contains("gemini-upstream"))
        .expect("gemini call");
    assert!(
        sent.body["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .any(|tool| tool.get("google_search").is_some())
    );
    // Anthropic runs its own web search tool.
    let (status, headers, body) = create(&gateway, None, &request("claude")).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("x-skein-dropped-tools").is_none());
    assert!(
        output_text(&body).starts_with("[searched the web]"),
        "{body}"
    );
    // An OpenAI-compatible chat upstream has none: the tool is left out, and the header says so.
    mock.clear_requests();
    let (status, headers, body) = create(&gateway, None, &request("chat")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-dropped-tools"], "web_search");
    let sent = &mock.requests()[0].body;
    assert!(
        sent.get("tools").is_none() && sent.get("web_search_options").is_none(),
        "{sent}"
    );
    // OpenAI itself gets the tool as it was sent.
    mock.clear_requests();
    let (status, headers, _) = create(&gateway, None, &request("native")).await;
    assert_eq!(status, 200);
    assert!(headers.get("x-skein-dropped-tools").is_none());
    assert_eq!(
        mock.requests()[0].body["tools"],
        json!([{"type": "web_search"}])
    );
}

#[tokio::test]
async fn streamed_tool_calls_translated_from_chat_carry_argument_deltas() {
    let (_mock, gateway) = setup().await;
    let request = json!({
        "model": "chat", "stream": true,
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "input": "[[call get_weather {\"city\": \"Paris\"}]]",
    });
    let (status, _, events) = stream(&gateway, &request).await;
    assert_eq!(status, 200);
    assert_well_formed(&events);
    let mut arguments = String::new();
    for (name, data) in &events {
        if name == "response.function_call_arguments.delta" {
            arguments.push_str(data["delta"].as_str().expect("delta"));
        }
    }
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("json"),
        json!({"city": "Paris"})
    );
    let done = events
        .iter()
        .find(|(name, _)| name == "response.function_call_arguments.done")
        .expect("done");
    assert_eq!(done.1["arguments"], arguments.as_str());
    let item = &events[events.len() - 1].1["response"]["output"][0];
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["status"], "completed");
}

#[tokio::test]
async fn gemini_and_chat_upstreams_answer_and_usage_is_counted() {
    let (mock, gateway) = setup().await;
    for (route, upstream) in [("gemini", "gemini-upstream"), ("chat", "chat-upstream")] {
        let (status, _, body) = create(&gateway, None, &json!({"model": route, "input": "hi", "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}}})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], route);
        assert_eq!(output_text(&body), "{\"mock\":true}", "{route}: {body}");
        assert!(body["usage"]["total_tokens"].as_u64().expect("usage") > 0);
        let _ = upstream;
    }
    let chat_request = mock
        .requests()
        .into_iter()
        .find(|request| request.path == "/v1/chat/completions")
        .expect("chat");
    assert_eq!(chat_request.body["response_format"]["type"], "json_schema");
    assert_eq!(
        chat_request.body["response_format"]["json_schema"]["name"],
        "answer"
    );
    let metrics = gateway.metrics().await.expect("metrics");
    assert!(metrics.contains("endpoint=\"responses\""), "{metrics}");
}

#[tokio::test]
async fn a_stream_cut_short_ends_with_response_failed_and_a_fallback_still_answers() {
    let (_mock, gateway) = setup().await;
    let (status, _, events) = stream(
        &gateway,
        &json!({"model": "cut", "input": "a long answer please", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_well_formed(&events);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        &names[names.len() - 2..],
        ["error", "response.failed"],
        "{names:?}"
    );
    assert_eq!(events[events.len() - 1].1["response"]["status"], "failed");

    // The native deployment fails with 500; the fallback (Anthropic) answers, translated.
    let (status, headers, body) =
        create(&gateway, None, &json!({"model": "fallback", "input": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-provider"], "claude");
    assert_eq!(output_text(&body), "Mock reply from claude-upstream: hi");
    // A WebSocket attempt on `GET /v1/responses` is refused at once, so a client falls back
    // to HTTP without waiting.
    let started = std::time::Instant::now();
    let upgrade = gateway
        .client
        .get(format!("{}/v1/responses", gateway.url))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("get");
    assert_eq!(upgrade.status(), 405);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // Errors are OpenAI-shaped.
    let (status, _, body) = create(&gateway, None, &json!({"model": "native", "input": 5})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _, body) = create(&gateway, None, &json!({"model": "native"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "input");
}

#[tokio::test]
async fn a_stored_response_is_visible_only_to_the_key_that_made_it() {
    let mock = start_mock().await.expect("mock");
    let gateway = Gateway::start_with(&config(&mock.url()), env(), |options| {
        options.admin_token = Some(TOKEN.to_owned());
    })
    .await
    .expect("gateway");
    let mut admin = AdminClient::connect(format!("http://{}", gateway.node.grpc_addr))
        .await
        .expect("admin");
    let mut secrets = Vec::new();
    for id in ["alice", "bob"] {
        let created = admin
            .create_key(authorized(
                TOKEN,
                CreateKeyRequest {
                    id: id.to_owned(),
                    ..Default::default()
                },
            ))
            .await
            .expect("key")
            .into_inner();
        secrets.push(created.secret);
    }
    let (status, _, body) = create(
        &gateway,
        Some(&secrets[0]),
        &json!({"model": "claude", "input": "mine"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id");
    let (status, _) = get(&gateway, Some(&secrets[0]), &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200);
    let (status, other) = get(&gateway, Some(&secrets[1]), &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 404, "{other}");
    let (status, _, chained) = create(
        &gateway,
        Some(&secrets[1]),
        &json!({"model": "claude", "input": "steal", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 400, "{chained}");
    let (status, _) = get(&gateway, None, &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 401);
    // `store: false` keeps nothing.
    let (status, _, body) = create(
        &gateway,
        Some(&secrets[0]),
        &json!({"model": "claude", "input": "forget", "store": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get(
        &gateway,
        Some(&secrets[0]),
        &format!("/v1/responses/{}", body["id"].as_str().expect("id")),
    )
    .await;
    assert_eq!(status, 404);
}
