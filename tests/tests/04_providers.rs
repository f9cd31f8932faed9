//! Gemini, Azure OpenAI and the OpenAI-compatible family, against the mock provider's
//! implementations of their wire formats.

use base64::Engine;
use serde_json::{Value, json};
use skein_mock::MockServer;
use skein_node::MapEnvironment;
use skein_tests::{Gateway, start_mock};

async fn setup() -> (MockServer, Gateway) {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        r#"
version: 1
providers:
  - name: gem
    kind: gemini
    base_url: {url}
    keys: [{{key: env:GEMINI}}]
  - name: az
    kind: azure
    base_url: {url}
    api_version: "2024-10-21"
    keys: [{{key: env:AZURE}}]
  - name: groq
    kind: groq
    base_url: {url}/v1
    keys: [{{key: env:GROQ}}]
  - name: local
    kind: vllm
    base_url: {url}/v1
routes:
  - name: gem-chat
    deployments: [{{provider: gem, model: gemini-upstream}}]
  - name: gem-embed
    deployments: [{{provider: gem, model: embedding-upstream}}]
  - name: azure-chat
    deployments: [{{provider: az, model: my-deployment}}]
"#,
        url = mock.url()
    );
    let env = MapEnvironment::from_pairs([
        ("GEMINI", "gem-key"),
        ("AZURE", "az-key"),
        ("GROQ", "groq-key"),
    ]);
    (mock, Gateway::start(&config, env).await.expect("gateway"))
}

#[tokio::test]
async fn gemini_chat_translates_both_ways() {
    let (mock, gateway) = setup().await;
    let request = json!({
        "model": "gem-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
        ],
        "max_tokens": 64, "temperature": 0.5, "stop": ["END"],
    });
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-provider"], "gem");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Mock reply from gemini-upstream: what is this"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["prompt_tokens"].as_u64().expect("usage") > 0);

    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-upstream:generateContent");
    assert_eq!(sent.headers["x-goog-api-key"], "gem-key");
    assert_eq!(
        sent.body["systemInstruction"]["parts"][0]["text"],
        "Be brief."
    );
    assert_eq!(
        sent.body["contents"][0]["parts"][1]["inlineData"],
        json!({"mimeType": "image/png", "data": "iVBOR"})
    );
    assert_eq!(
        sent.body["generationConfig"],
        json!({"maxOutputTokens": 64, "temperature": 0.5, "stopSequences": ["END"]})
    );
}

#[tokio::test]
async fn gemini_tools_and_streams() {
    let (mock, gateway) = setup().await;
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]);
    let request = json!({"model": "gem-chat", "tools": tools, "tool_choice": "required", "messages": [{"role": "user", "content": "x [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}]});
    let (status, _, body) = gateway
        .post_json("/v1/chat/completions", &request)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        mock.requests()[0].body["toolConfig"]["functionCallingConfig"]["mode"],
        "ANY"
    );

    // The tool result goes back as a functionResponse named after the call.
    let follow_up = json!({"model": "gem-chat", "tools": tools, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "{\"sky\":\"clear\"}"}
    ]});
    let (status, _, body) = gateway
        .post_json("/v1/chat/completions", &follow_up)
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    let sent = &mock.requests()[1].body;
    assert_eq!(
        sent["contents"][1]["parts"][0]["functionCall"],
        json!({"name": "get_weather", "args": {"city": "Paris"}})
    );
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"],
        json!({"name": "get_weather", "response": {"sky": "clear"}})
    );

    let stream = json!({"model": "gem-chat", "stream": true, "stream_options": {"include_usage": true}, "reasoning_effort": "low", "messages": [{"role": "user", "content": "hello"}]});
    let (status, _, events) = gateway
        .post_stream("/v1/chat/completions", &stream)
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(
        mock.requests()[2].path,
        "/v1beta/models/gemini-upstream:streamGenerateContent"
    );
    assert_eq!(mock.requests()[2].query.as_deref(), Some("alt=sse"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).expect("json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Mock reply from gemini-upstream: hello");
    let reasoning: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "Thinking it over.");
    let usage = &chunks.last().expect("usage")["usage"];
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 4);
}

#[tokio::test]
async fn gemini_embeddings_in_both_encodings() {
    let (mock, gateway) = setup().await;
    let (status, _, body) = gateway
        .post_json(
            "/v1/embeddings",
            &json!({"model": "gem-embed", "input": ["a", "b"], "dimensions": 3}),
        )
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"][1]["embedding"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(
        mock.requests()[0].path,
        "/v1beta/models/embedding-upstream:batchEmbedContents"
    );
    let (_, _, body) = gateway
        .post_json("/v1/embeddings", &json!({"model": "gem-embed", "input": "a", "dimensions": 3, "encoding_format": "base64"}))
        .await
        .expect("call");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().expect("base64"))
        .expect("decode");
    assert_eq!(bytes.len(), 3 * 4);
}

#[tokio::test]
async fn anthropic_client_on_a_gemini_upstream_streams_tool_use() {
    let (_mock, gateway) = setup().await;
    let request = json!({
        "model": "gem-chat", "max_tokens": 100, "stream": true,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "weather? [[call get_weather {\"call\":0,\"city\":\"Paris\"}]] [[call get_time {\"call\":1,\"city\":\"Paris\"}]]"}],
    });
    let response = gateway.post("/v1/messages", &request).await.expect("call");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let events: Vec<Value> = skein_tests::sse_data(&text)
        .iter()
        .map(|data| serde_json::from_str(data).expect("json"))
        .collect();
    let types: Vec<&str> = events
        .iter()
        .filter_map(|event| event["type"].as_str())
        .collect();
    assert_eq!(types.first(), Some(&"message_start"));
    assert_eq!(types.last(), Some(&"message_stop"));
    let tool_start = events
        .iter()
        .find(|event| event["type"] == "content_block_start")
        .expect("a block");
    assert_eq!(tool_start["content_block"]["type"], "tool_use");
    assert_eq!(tool_start["content_block"]["name"], "get_weather");
    let stop = events
        .iter()
        .find(|event| event["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(stop["delta"]["stop_reason"], "tool_use");
    assert!(stop["usage"]["input_tokens"].as_u64().expect("usage") > 0);
}

#[tokio::test]
async fn azure_uses_deployments_api_version_and_api_key() {
    let (mock, gateway) = setup().await;
    let (status, _, body) = gateway
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "azure-chat", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    let sent = &mock.requests()[0];
    assert_eq!(
        sent.path,
        "/openai/deployments/my-deployment/chat/completions"
    );
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(sent.headers["api-key"], "az-key");
    assert!(!sent.headers.contains_key("authorization"));
}

#[tokio::test]
async fn the_openai_compatible_family_uses_bearer_keys_and_keyless_local_servers() {
    let (mock, gateway) = setup().await;
    for model in ["groq/llama-3.3-70b-versatile", "local/qwen2.5"] {
        let (status, _, body) = gateway
            .post_json(
                "/v1/chat/completions",
                &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .expect("call");
        assert_eq!(status, 200, "{body}");
    }
    let sent = mock.requests();
    assert_eq!(sent[0].headers["authorization"], "Bearer groq-key");
    assert_eq!(sent[0].body["model"], "llama-3.3-70b-versatile");
    assert!(
        !sent[1].headers.contains_key("authorization"),
        "vLLM without a key sends none"
    );
}
