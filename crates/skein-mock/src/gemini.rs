//! Gemini answers: `generateContent`, `streamGenerateContent?alt=sse` and `batchEmbedContents`.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::openai::fastrand_id;
use crate::server::{Incoming, MockState, json_answer, sse_answer};
use crate::text::{collect_text, count_tokens, reply_text, stream_pieces};
use crate::tools::{Choice, Offered, decide};

fn last_user_text(body: &Value) -> String {
    let mut text = String::new();
    if let Some(last) = body["contents"].as_array().and_then(|contents| {
        contents
            .iter()
            .rev()
            .find(|content| content["role"] == "user")
    }) {
        collect_text(&last["parts"], &mut text);
    }
    text.trim().to_owned()
}

fn answering_function(body: &Value) -> bool {
    body["contents"]
        .as_array()
        .and_then(|contents| contents.last())
        .and_then(|content| content["parts"].as_array())
        .is_some_and(|parts| {
            parts
                .iter()
                .any(|part| part.get("functionResponse").is_some())
        })
}

pub(crate) async fn generate(state: &MockState, incoming: Incoming, stream: bool) -> Response {
    let Incoming { body, model } = incoming;
    let mut prompt_text = String::new();
    collect_text(&body["contents"], &mut prompt_text);
    collect_text(&body["systemInstruction"], &mut prompt_text);
    let prompt = count_tokens(&prompt_text) + 3;
    let offered: Vec<Offered> = body["tools"][0]["functionDeclarations"]
        .as_array()
        .map(|declarations| {
            declarations
                .iter()
                .filter_map(|declaration| {
                    Some(Offered {
                        name: declaration["name"].as_str()?.to_owned(),
                        schema: declaration["parameters"].clone(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let config = &body["toolConfig"]["functionCallingConfig"];
    let choice = match config["mode"].as_str().unwrap_or("AUTO") {
        "NONE" => Choice::None,
        "ANY" => match config["allowedFunctionNames"][0].as_str() {
            Some(name) => Choice::Named(name.to_owned()),
            None => Choice::Required,
        },
        _ => Choice::Auto,
    };
    let thoughts =
        body["generationConfig"]["thinkingConfig"]["includeThoughts"] == Value::Bool(true);
    let response_id = format!("gemini-mock-{}", fastrand_id());

    let mut parts: Vec<Value> = Vec::new();
    if thoughts {
        parts.push(json!({"text": "Thinking it over.", "thought": true}));
    }
    let calls = if answering_function(&body) {
        Vec::new()
    } else {
        decide(&offered, &choice, &last_user_text(&body), &model, true)
    };
    let text = if !calls.is_empty() {
        for (name, args) in &calls {
            parts.push(json!({"functionCall": {"name": name, "args": args}}));
        }
        String::new()
    } else if body["generationConfig"]["responseMimeType"] == "application/json" {
        "{\"mock\":true}".to_owned()
    } else {
        let searched = body["tools"]
            .as_array()
            .is_some_and(|tools| tools.iter().any(|tool| tool.get("google_search").is_some()));
        let text = reply_text(&model, &last_user_text(&body));
        if searched {
            format!("[searched the web] {text}")
        } else {
            text
        }
    };
    let output = count_tokens(&text) + if calls.is_empty() { 0 } else { 8 };
    let thought_tokens = if thoughts { 4 } else { 0 };
    let usage = json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "thoughtsTokenCount": thought_tokens,
        "totalTokenCount": prompt + output + thought_tokens,
    });
    if !stream {
        if !text.is_empty() {
            parts.push(json!({"text": text}));
        }
        let answer = json!({
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        });
        return json_answer(state, 1, answer).await;
    }
    let event = |parts: Value, finish: Option<&str>, usage: Option<&Value>| {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        let mut response =
            json!({"candidates": [candidate], "modelVersion": model, "responseId": response_id});
        if let Some(usage) = usage {
            response["usageMetadata"] = usage.clone();
        }
        format!("data: {response}\r\n\r\n")
    };
    let mut events = Vec::new();
    if !calls.is_empty() || text.is_empty() {
        events.push(event(Value::Array(parts), Some("STOP"), Some(&usage)));
    } else {
        if thoughts {
            events.push(event(json!([parts[0]]), None, None));
        }
        let pieces = stream_pieces(&text);
        let last = pieces.len() - 1;
        for (index, piece) in pieces.into_iter().enumerate() {
            if index == last {
                events.push(event(json!([{"text": piece}]), Some("STOP"), Some(&usage)));
            } else {
                events.push(event(json!([{"text": piece}]), None, None));
            }
        }
    }
    let cut_after = match model.as_str() {
        "mock-stream-cut" => Some(2),
        "mock-empty-stream" => Some(0),
        _ => None,
    };
    sse_answer(state, events, cut_after)
}

pub(crate) fn embed(incoming: Incoming) -> Response {
    let requests = incoming.body["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let embeddings: Vec<Value> = requests
        .iter()
        .map(|request| {
            let dimensions = request["outputDimensionality"]
                .as_u64()
                .unwrap_or(8)
                .clamp(1, 4096);
            let mut text = String::new();
            collect_text(&request["content"], &mut text);
            let seed = text.bytes().fold(7u64, |hash, byte| {
                hash.wrapping_mul(31).wrapping_add(u64::from(byte))
            });
            let values: Vec<f64> = (0..dimensions)
                .map(|position| ((seed.wrapping_add(position) % 1000) as f64) / 1000.0)
                .collect();
            json!({"values": values})
        })
        .collect();
    axum::Json(json!({"embeddings": embeddings})).into_response()
}
