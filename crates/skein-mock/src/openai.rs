//! OpenAI-shaped answers: chat completions (with tools), completions and embeddings.

use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use crate::server::{Incoming, MockState, json_answer, sse_answer};
use crate::text::{collect_text, count_tokens, reply_text, stream_pieces};
use crate::tools::{Choice, Offered, decide};

/// What the assistant does in this turn.
enum Turn {
    Text(String),
    /// Call these tools (name, arguments JSON text).
    Tools(Vec<(String, String)>),
}

fn last_user_text(messages: &Value) -> String {
    let mut text = String::new();
    if let Some(last) = messages.as_array().and_then(|messages| {
        messages
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
    }) {
        collect_text(&last["content"], &mut text);
    }
    text.trim().to_owned()
}

fn decide_turn(body: &Value, model: &str) -> Turn {
    let messages = &body["messages"];
    let last_role = messages
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["role"].as_str())
        .unwrap_or("user");
    let offered: Vec<Offered> = body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|tool| {
                    Some(Offered {
                        name: tool["function"]["name"].as_str()?.to_owned(),
                        schema: tool["function"]["parameters"].clone(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let choice = match &body["tool_choice"] {
        Value::String(mode) if mode == "none" => Choice::None,
        Value::String(mode) if mode == "required" => Choice::Required,
        Value::Object(_) => match body["tool_choice"]["function"]["name"].as_str() {
            Some(name) => Choice::Named(name.to_owned()),
            None => Choice::Required,
        },
        _ => Choice::Auto,
    };
    if last_role != "tool" {
        let parallel = body["parallel_tool_calls"] != Value::Bool(false);
        let calls = decide(
            &offered,
            &choice,
            &last_user_text(messages),
            model,
            parallel,
        );
        if !calls.is_empty() {
            return Turn::Tools(
                calls
                    .into_iter()
                    .map(|(name, arguments)| (name, arguments.to_string()))
                    .collect(),
            );
        }
    }
    if body["response_format"]["type"] == "json_schema"
        || body["response_format"]["type"] == "json_object"
    {
        return Turn::Text("{\"mock\":true}".to_owned());
    }
    let mut text = reply_text(model, &last_user_text(messages));
    if let Some(stop) = body["stop"].as_str().or_else(|| body["stop"][0].as_str())
        && let Some(cut) = text.find(stop)
    {
        text.truncate(cut);
    }
    Turn::Text(text)
}

fn prompt_tokens(body: &Value) -> u64 {
    let mut text = String::new();
    collect_text(&body["messages"], &mut text);
    collect_text(&body["prompt"], &mut text);
    count_tokens(&text) + 3
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}
    })
}

/// A chat answer before it is sent: whole (with its number of pieces, for token latency), or
/// as stream events (and where to cut the stream, for the fault models).
pub(crate) enum ChatAnswer {
    Whole(Value, usize),
    Stream(Vec<String>, Option<usize>),
}

pub(crate) async fn chat(state: &MockState, incoming: Incoming) -> Response {
    match chat_answer(incoming) {
        ChatAnswer::Whole(answer, pieces) => json_answer(state, pieces, answer).await,
        ChatAnswer::Stream(events, cut_after) => sse_answer(state, events, cut_after),
    }
}

pub(crate) fn chat_answer(incoming: Incoming) -> ChatAnswer {
    let Incoming { body, model } = incoming;
    let choices = body["n"].as_u64().unwrap_or(1).clamp(1, 8);
    let mut turn = decide_turn(&body, &model);
    // An output limit ends a text answer early, as a model's answer ends at its limit.
    let mut text_finish = "stop";
    if let Turn::Text(text) = &mut turn
        && let Some(limit) = body["max_completion_tokens"]
            .as_u64()
            .or_else(|| body["max_tokens"].as_u64())
        && count_tokens(text) > limit
    {
        let words: Vec<&str> = text.split(' ').collect();
        let mut kept = words.len();
        while kept > 1 && count_tokens(&words[..kept].join(" ")) > limit {
            kept -= 1;
        }
        *text = words[..kept].join(" ");
        if count_tokens(text) > limit {
            *text = text.chars().take((limit as usize) * 4).collect();
        }
        text_finish = "length";
    }
    let prompt = prompt_tokens(&body);
    let id = format!("chatcmpl-mock-{}", fastrand_id());
    let stream = body["stream"] == Value::Bool(true);
    if !stream {
        let (message, finish, completion, pieces) = match &turn {
            Turn::Text(text) => (
                json!({"role": "assistant", "content": text, "refusal": null}),
                text_finish,
                count_tokens(text),
                stream_pieces(text).len(),
            ),
            Turn::Tools(calls) => {
                let tool_calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(index, (name, arguments))| {
                        json!({"id": format!("call_mock_{index}"), "type": "function", "function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
                let completion = calls
                    .iter()
                    .map(|(_, arguments)| count_tokens(arguments))
                    .sum();
                (
                    json!({"role": "assistant", "content": null, "tool_calls": tool_calls}),
                    "tool_calls",
                    completion,
                    calls.len(),
                )
            }
        };
        let logprobs = if body["logprobs"] == Value::Bool(true) {
            json!({"content": []})
        } else {
            Value::Null
        };
        let choices: Vec<Value> = (0..choices)
            .map(|index| json!({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}))
            .collect();
        let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            "usage": usage_json(prompt, completion * choices.len() as u64),
        });
        return ChatAnswer::Whole(answer, pieces);
    }

    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let chunk = |choices: Value, usage: Value| -> String {
        let mut chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "system_fingerprint": "fp_mock", "choices": choices
        });
        if include_usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    let mut events = Vec::new();
    let mut completion = 0;
    for index in 0..choices {
        events.push(chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]), Value::Null));
    }
    let finish = match &turn {
        Turn::Text(text) => {
            completion = count_tokens(text);
            for piece in stream_pieces(text) {
                for index in 0..choices {
                    events.push(chunk(json!([{"index": index, "delta": {"content": piece}, "finish_reason": null}]), Value::Null));
                }
            }
            text_finish
        }
        Turn::Tools(calls) => {
            for (call_index, (name, arguments)) in calls.iter().enumerate() {
                completion += count_tokens(arguments);
                let start = json!([{"index": 0, "delta": {"tool_calls": [{"index": call_index, "id": format!("call_mock_{call_index}"), "type": "function", "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}]);
                events.push(chunk(start, Value::Null));
                let middle = arguments.len() / 2;
                for part in [&arguments[..middle], &arguments[middle..]] {
                    let delta = json!([{"index": 0, "delta": {"tool_calls": [{"index": call_index, "function": {"arguments": part}}]}, "finish_reason": null}]);
                    events.push(chunk(delta, Value::Null));
                }
            }
            "tool_calls"
        }
    };
    for index in 0..choices {
        events.push(chunk(
            json!([{"index": index, "delta": {}, "finish_reason": finish}]),
            Value::Null,
        ));
    }
    if include_usage {
        events.push(chunk(json!([]), usage_json(prompt, completion * choices)));
    }
    events.push("data: [DONE]\n\n".to_owned());
    let cut_after = match model.as_str() {
        "mock-stream-cut" => Some(3),
        "mock-empty-stream" => Some(0),
        _ => None,
    };
    ChatAnswer::Stream(events, cut_after)
}

pub(crate) async fn completions(state: &MockState, incoming: Incoming) -> Response {
    let Incoming { body, model } = incoming;
    let mut prompt_text = String::new();
    collect_text(&body["prompt"], &mut prompt_text);
    let text = reply_text(&model, prompt_text.trim());
    let prompt = prompt_tokens(&body);
    let completion = count_tokens(&text);
    let id = format!("cmpl-mock-{}", fastrand_id());
    if body["stream"] != Value::Bool(true) {
        let answer = json!({
            "id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage_json(prompt, completion),
        });
        return json_answer(state, stream_pieces(&text).len(), answer).await;
    }
    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let mut events: Vec<String> = stream_pieces(&text)
        .into_iter()
        .map(|piece| {
            let chunk = json!({"id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
                "choices": [{"text": piece, "index": 0, "logprobs": null, "finish_reason": null}]});
            format!("data: {chunk}\n\n")
        })
        .collect();
    let last = json!({"id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
        "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}]});
    events.push(format!("data: {last}\n\n"));
    if include_usage {
        let usage = json!({"id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [], "usage": usage_json(prompt, completion)});
        events.push(format!("data: {usage}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    sse_answer(state, events, None)
}

pub(crate) fn embeddings(incoming: Incoming) -> Response {
    let Incoming { body, model } = incoming;
    let inputs: Vec<String> = match &body["input"] {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    };
    let dimensions =
        usize::try_from(body["dimensions"].as_u64().unwrap_or(8).clamp(1, 4096)).unwrap_or(8);
    let base64 = body["encoding_format"] == "base64";
    let mut prompt = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt += count_tokens(input);
            let seed = input.bytes().fold(7u32, |hash, byte| {
                hash.wrapping_mul(31).wrapping_add(u32::from(byte))
            });
            let vector: Vec<f32> = (0..dimensions)
                .map(|position| ((seed.wrapping_add(position as u32) % 1000) as f32) / 1000.0)
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    axum::Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}
    }))
    .into_response()
}

/// A short random id.
pub(crate) fn fastrand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `POST /v1/responses`: the Responses API, answered by the chat logic (the request and the
/// answer go through Skein's own Responses translations, so the mock speaks what they speak;
/// the real clients in the end-to-end tests judge both).
pub(crate) async fn responses(state: &MockState, incoming: Incoming) -> Response {
    use skein_providers::StreamTranslator;
    use skein_providers::responses::{
        ChatTarget, ChatToResponsesStream, Echo, request_to_chat, response_from_chat,
    };
    let Incoming { body, model } = incoming;
    let text = body.to_string();
    let translated = skein_providers::RawObject::parse(text.as_bytes())
        .map_err(|error| skein_providers::TranslateError::client(error.to_string()))
        .and_then(|request| {
            let target = ChatTarget {
                model: &model,
                ..ChatTarget::default()
            };
            request_to_chat(&request, &[], target)?.tree()
        });
    let chat = match translated {
        Ok(chat) => chat,
        Err(error) => {
            let answer = json!({"error": {"message": error.message(), "type": "invalid_request_error", "param": null, "code": null}});
            return (axum::http::StatusCode::BAD_REQUEST, axum::Json(answer)).into_response();
        }
    };
    let echo = Echo::from_request(
        &body,
        format!("resp_mock{}", fastrand_id()),
        &model,
        1_700_000_000,
    );
    match chat_answer(Incoming { body: chat, model }) {
        ChatAnswer::Whole(answer, pieces) => {
            let bytes = answer.to_string();
            match response_from_chat(bytes.as_bytes(), &echo) {
                Ok((response, _)) => {
                    let response = serde_json::from_slice(&response).unwrap_or_default();
                    json_answer(state, pieces, response).await
                }
                Err(error) => (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    error.message().to_owned(),
                )
                    .into_response(),
            }
        }
        ChatAnswer::Stream(events, cut_after) => {
            let mut translator = ChatToResponsesStream::new(echo);
            let mut out_events = Vec::new();
            let mut cut = None;
            for (index, event) in events.iter().enumerate() {
                if cut_after == Some(index) {
                    cut = Some(out_events.len());
                }
                let data = event.trim_start_matches("data: ").trim_end();
                let mut out = Vec::new();
                if translator.on_event("", data, &mut out).is_err() {
                    continue;
                }
                for event in out {
                    let mut bytes = Vec::new();
                    event.write_to(&mut bytes);
                    out_events.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
            sse_answer(state, out_events, cut)
        }
    }
}
