//! Anthropic Messages answers: text, tool use and thinking blocks, streamed with every event
//! type Anthropic sends (`message_start`, `content_block_*`, `ping`, `message_delta`,
//! `message_stop`).

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::openai::fastrand_id;
use crate::server::{Incoming, MockState, json_answer, sse_answer};
use crate::text::{collect_text, count_tokens, reply_text, stream_pieces};
use crate::tools::{Choice, Offered, decide};

enum Block {
    Thinking(String),
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

fn input_tokens(body: &Value) -> u64 {
    let mut text = String::new();
    collect_text(&body["system"], &mut text);
    collect_text(&body["messages"], &mut text);
    count_tokens(&text) + 3
}

fn last_user_text(body: &Value) -> String {
    let mut text = String::new();
    if let Some(last) = body["messages"].as_array().and_then(|messages| {
        messages
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
    }) {
        collect_text(&last["content"], &mut text);
    }
    text.trim().to_owned()
}

/// Whether the last user turn carries tool results (then the mock answers with text).
fn answering_tool_result(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["content"].as_array())
        .is_some_and(|blocks| blocks.iter().any(|block| block["type"] == "tool_result"))
}

fn decide_blocks(body: &Value, model: &str) -> (Vec<Block>, &'static str) {
    let mut blocks = Vec::new();
    if body["thinking"]["type"] == "enabled" {
        blocks.push(Block::Thinking(
            "Let me think about this step by step.".to_owned(),
        ));
    }
    let offered: Vec<Offered> = body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|tool| {
                    Some(Offered {
                        name: tool["name"].as_str()?.to_owned(),
                        schema: tool["input_schema"].clone(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let choice = match body["tool_choice"]["type"].as_str() {
        Some("none") => Choice::None,
        Some("any") => Choice::Required,
        Some("tool") => Choice::Named(
            body["tool_choice"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        ),
        _ => Choice::Auto,
    };
    if !answering_tool_result(body) {
        let parallel = body["tool_choice"]["disable_parallel_tool_use"] != Value::Bool(true);
        let calls = decide(&offered, &choice, &last_user_text(body), model, parallel);
        if !calls.is_empty() {
            for (index, (name, input)) in calls.into_iter().enumerate() {
                blocks.push(Block::ToolUse {
                    id: format!("toolu_mock_{index}"),
                    name,
                    input,
                });
            }
            return (blocks, "tool_use");
        }
    }
    let mut text = reply_text(model, &last_user_text(body));
    // Anthropic's own web search, when offered, "runs" and says so.
    if body["tools"].as_array().is_some_and(|tools| {
        tools.iter().any(|tool| {
            tool["type"]
                .as_str()
                .is_some_and(|kind| kind.starts_with("web_search_"))
        })
    }) {
        text = format!("[searched the web] {text}");
    }
    let mut stop_reason = "end_turn";
    if let Some(max_tokens) = body["max_tokens"].as_u64() {
        let words: Vec<&str> = text.split(' ').collect();
        if count_tokens(&text) > max_tokens && (max_tokens as usize) < words.len() {
            text = words[..max_tokens.max(1) as usize].join(" ");
            stop_reason = "max_tokens";
        }
    }
    blocks.push(Block::Text(text));
    (blocks, stop_reason)
}

fn output_tokens(blocks: &[Block]) -> u64 {
    blocks
        .iter()
        .map(|block| match block {
            Block::Thinking(text) | Block::Text(text) => count_tokens(text),
            Block::ToolUse { input, .. } => count_tokens(&input.to_string()),
        })
        .sum()
}

pub(crate) async fn messages(state: &MockState, incoming: Incoming) -> Response {
    let Incoming { body, model } = incoming;
    let (blocks, stop_reason) = decide_blocks(&body, &model);
    let input = input_tokens(&body);
    let output = output_tokens(&blocks);
    let id = format!("msg_mock_{}", fastrand_id());
    let usage = json!({"input_tokens": input, "output_tokens": output, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    if body["stream"] != Value::Bool(true) {
        let content: Vec<Value> = blocks
            .iter()
            .map(|block| match block {
                Block::Thinking(text) => {
                    json!({"type": "thinking", "thinking": text, "signature": "mock-signature"})
                }
                Block::Text(text) => json!({"type": "text", "text": text}),
                Block::ToolUse { id, name, input } => {
                    json!({"type": "tool_use", "id": id, "name": name, "input": input})
                }
            })
            .collect();
        let answer = json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
        });
        return json_answer(state, blocks.len(), answer).await;
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        }}),
    )];
    for (index, block) in blocks.iter().enumerate() {
        match block {
            Block::Thinking(text) => {
                events.push(event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})));
                for piece in stream_pieces(text) {
                    events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": piece}})));
                }
                events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": "mock-signature"}})));
            }
            Block::Text(text) => {
                events.push(event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
                if index == 0 {
                    events.push(event("ping", json!({"type": "ping"})));
                }
                for piece in stream_pieces(text) {
                    events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}})));
                }
            }
            Block::ToolUse { id, name, input } => {
                events.push(event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}})));
                let arguments = input.to_string();
                let middle = arguments.len() / 2;
                for part in [&arguments[..middle], &arguments[middle..]] {
                    events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": part}})));
                }
            }
        }
        events.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    let cut_after = match model.as_str() {
        "mock-stream-cut" => Some(3),
        "mock-empty-stream" => Some(0),
        _ => None,
    };
    sse_answer(state, events, cut_after)
}

pub(crate) fn count_message_tokens(incoming: Incoming) -> Response {
    axum::Json(json!({"input_tokens": input_tokens(&incoming.body)})).into_response()
}
