//! Anthropic's Messages API, in both directions:
//! - OpenAI chat clients reaching Anthropic upstreams ([`request_from_openai`],
//!   [`response_to_openai`], [`AnthropicToOpenAiStream`]);
//! - Anthropic clients reaching OpenAI-shaped upstreams ([`request_to_openai`],
//!   [`response_from_openai`], [`OpenAiToAnthropicStream`]);
//! - Anthropic clients reaching Anthropic upstreams, passed through with usage read on the way
//!   ([`AnthropicPassthroughStream`]).
//!
//! Tool calls, tool results, images, thinking, stop reasons and usage (cache reads and writes
//! included) are carried across; what one side cannot express is said in an error rather than
//! dropped silently.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::TranslateError;
use crate::openai::ChunkWriter;
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

/// The `anthropic-version` sent when the client gave none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic requires `max_tokens`; this is used when an OpenAI client sent none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's `usage` object.
#[derive(Debug, Default, Deserialize)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Anthropic counts cached input apart from `input_tokens`; Skein's input includes it.
    pub fn to_usage(&self) -> Usage {
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0) + cache_read + cache_write,
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: cache_read,
            cache_write_tokens: cache_write,
            reasoning_tokens: 0,
        }
    }
}

fn usage_of(value: &Value) -> Usage {
    AnthropicUsage::deserialize(value)
        .map(|usage| usage.to_usage())
        .unwrap_or_default()
}

/// The usage of a `message_delta` event. It is cumulative; when it leaves out the input
/// figures, those of `message_start` (`input`) stand.
fn delta_usage(value: &Value, input: &AnthropicUsage) -> Usage {
    let mut usage = AnthropicUsage::deserialize(value).unwrap_or_default();
    if usage.input_tokens.is_none() {
        usage.input_tokens = input.input_tokens;
        usage.cache_read_input_tokens = input.cache_read_input_tokens;
        usage.cache_creation_input_tokens = input.cache_creation_input_tokens;
    }
    usage.to_usage()
}

/// Usage of a non-streaming Messages response.
pub fn response_usage(body: &[u8]) -> Usage {
    serde_json::from_slice::<Value>(body)
        .map(|value| usage_of(&value["usage"]))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat request → Anthropic Messages request

/// Translate an OpenAI chat request into an Anthropic Messages request for `model`.
pub fn request_from_openai(request: &Value, model: &str) -> Result<Value, TranslateError> {
    request_from_openai_text(request, model).map_err(TranslateError::Client)
}

/// Translate an OpenAI chat request into an Anthropic Messages request for `model`.
fn request_from_openai_text(request: &Value, model: &str) -> Result<Value, String> {
    let object = request
        .as_object()
        .ok_or("the request must be a JSON object")?;
    if object
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        return Err("`n` greater than 1 is not supported by Anthropic models".to_owned());
    }
    let mut system_parts: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let empty = Vec::new();
    for (index, message) in object
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let role = message["role"]
            .as_str()
            .ok_or_else(|| format!("messages[{index}].role is missing"))?;
        match role {
            "system" | "developer" => {
                for block in content_blocks(&message["content"], index)? {
                    if block["type"] == "text" {
                        system_parts.push(json!({"type": "text", "text": block["text"]}));
                    }
                }
            }
            "user" => push_message(
                &mut messages,
                "user",
                content_blocks(&message["content"], index)?,
            ),
            "assistant" => {
                let mut blocks = Vec::new();
                // `reasoning_content` is not sent back: Anthropic rejects thinking blocks
                // without the signature only Anthropic can make.
                if !message["content"].is_null() {
                    blocks.extend(content_blocks(&message["content"], index)?);
                }
                for call in message["tool_calls"].as_array().unwrap_or(&empty) {
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    let input: Value = serde_json::from_str(if arguments.trim().is_empty() {
                        "{}"
                    } else {
                        arguments
                    })
                    .map_err(|_| {
                        format!("messages[{index}].tool_calls arguments are not valid JSON")
                    })?;
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": input,
                    }));
                }
                push_message(&mut messages, "assistant", blocks);
            }
            "tool" | "function" => {
                let mut text = String::new();
                match &message["content"] {
                    Value::String(content) => text.push_str(content),
                    Value::Array(parts) => {
                        for part in parts {
                            if let Some(part_text) = part["text"].as_str() {
                                text.push_str(part_text);
                            }
                        }
                    }
                    _ => {}
                }
                let block = json!({
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"].as_str().or(message["name"].as_str()).unwrap_or(""),
                    "content": text,
                });
                push_message(&mut messages, "user", vec![block]);
            }
            other => return Err(format!("messages[{index}].role `{other}` is not supported")),
        }
    }
    if messages.is_empty() {
        return Err("`messages` must contain at least one user or assistant message".to_owned());
    }

    let mut output = Map::new();
    output.insert("model".to_owned(), Value::String(model.to_owned()));
    output.insert("messages".to_owned(), Value::Array(messages));
    let max_tokens = object
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| object.get("max_tokens").and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    output.insert("max_tokens".to_owned(), json!(max_tokens));

    if let Some(format) = object.get("response_format") {
        if let Some(schema) = format
            .get("json_schema")
            .and_then(|schema| schema.get("schema"))
        {
            system_parts.push(json!({"type": "text", "text": format!("Answer with only a JSON value that matches this JSON schema, no other text: {schema}")}));
        } else if format["type"] == "json_object" {
            system_parts.push(
                json!({"type": "text", "text": "Answer with only a JSON object, no other text."}),
            );
        }
    }
    if !system_parts.is_empty() {
        output.insert("system".to_owned(), Value::Array(system_parts));
    }
    for field in ["temperature", "top_p", "stream"] {
        if let Some(value) = object.get(field).filter(|value| !value.is_null()) {
            output.insert(field.to_owned(), value.clone());
        }
    }
    match object.get("stop") {
        Some(Value::String(stop)) => {
            output.insert("stop_sequences".to_owned(), json!([stop]));
        }
        Some(Value::Array(stops)) if !stops.is_empty() => {
            output.insert("stop_sequences".to_owned(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(user) = object.get("user").and_then(Value::as_str) {
        output.insert("metadata".to_owned(), json!({"user_id": user}));
    }
    if let Some(tools) = object
        .get("tools")
        .and_then(Value::as_array)
        .filter(|tools| !tools.is_empty())
    {
        let mut translated = Vec::new();
        for tool in tools {
            let function = &tool["function"];
            let name = function["name"]
                .as_str()
                .ok_or("every tool needs function.name")?;
            let mut entry = json!({"name": name, "input_schema": function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
            if let Some(description) = function["description"].as_str() {
                entry["description"] = json!(description);
            }
            translated.push(entry);
        }
        output.insert("tools".to_owned(), Value::Array(translated));
        let mut choice = match object.get("tool_choice") {
            Some(Value::String(choice)) if choice == "none" => json!({"type": "none"}),
            Some(Value::String(choice)) if choice == "required" => json!({"type": "any"}),
            Some(Value::Object(choice)) => match choice
                .get("function")
                .and_then(|function| function["name"].as_str())
            {
                Some(name) => json!({"type": "tool", "name": name}),
                None => json!({"type": "auto"}),
            },
            _ => json!({"type": "auto"}),
        };
        if object.get("parallel_tool_calls") == Some(&Value::Bool(false))
            && choice["type"] != "none"
        {
            choice["disable_parallel_tool_use"] = Value::Bool(true);
        }
        output.insert("tool_choice".to_owned(), choice);
    }
    if let Some(effort) = object.get("reasoning_effort").and_then(Value::as_str) {
        let budget: u64 = match effort {
            "minimal" | "low" => 1024,
            "medium" => 4096,
            _ => 16384,
        };
        if max_tokens > budget {
            output.insert(
                "thinking".to_owned(),
                json!({"type": "enabled", "budget_tokens": budget}),
            );
        }
    }
    // OpenAI chat's `web_search_options` (a Responses `web_search` tool): Anthropic's own web
    // search, which Anthropic runs itself.
    if object.contains_key("web_search_options") {
        let search = json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 5});
        match output.get_mut("tools").and_then(Value::as_array_mut) {
            Some(tools) => tools.push(search),
            None => {
                output.insert("tools".to_owned(), json!([search]));
            }
        }
    }
    Ok(Value::Object(output))
}

/// Anthropic wants alternating turns; consecutive messages of one role are merged.
fn push_message(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut()
        && last["role"] == role
        && let Some(content) = last["content"].as_array_mut()
    {
        // Tool results must come first in a user turn.
        let (results, others): (Vec<Value>, Vec<Value>) = blocks
            .into_iter()
            .partition(|block| block["type"] == "tool_result");
        let existing_results = content
            .iter()
            .take_while(|block| block["type"] == "tool_result")
            .count();
        for (offset, block) in results.into_iter().enumerate() {
            content.insert(existing_results + offset, block);
        }
        content.extend(others);
        return;
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// OpenAI message content (a string or parts) as Anthropic content blocks.
fn content_blocks(content: &Value, index: usize) -> Result<Vec<Value>, String> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![json!({"type": "text", "text": text})]
        }),
        Value::Array(parts) => {
            let mut blocks = Vec::new();
            for part in parts {
                match part["type"].as_str() {
                    Some("text") => blocks.push(json!({"type": "text", "text": part["text"]})),
                    Some("image_url") => {
                        let url = part["image_url"]["url"]
                            .as_str()
                            .or(part["image_url"].as_str())
                            .unwrap_or("");
                        blocks.push(image_block(url).ok_or_else(|| {
                            format!("messages[{index}] has an image URL that cannot be read")
                        })?);
                    }
                    Some("input_audio") | Some("file") => {
                        return Err(format!(
                            "messages[{index}] has a {} part, which Anthropic models do not take",
                            part["type"].as_str().unwrap_or("")
                        ));
                    }
                    _ => {}
                }
            }
            Ok(blocks)
        }
        _ => Err(format!(
            "messages[{index}].content must be a string or an array of parts"
        )),
    }
}

fn image_block(url: &str) -> Option<Value> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,")?;
        return Some(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Some(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages response → OpenAI chat response

/// Map Anthropic's stop reason to OpenAI's finish reason.
pub fn finish_reason_from_stop(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Translate an Anthropic Messages response into an OpenAI chat completion.
pub fn response_to_openai(body: &[u8], created: u64) -> Result<(Value, Usage), TranslateError> {
    response_to_openai_text(body, created).map_err(TranslateError::Upstream)
}

/// Translate an Anthropic Messages response into an OpenAI chat completion.
fn response_to_openai_text(body: &[u8], created: u64) -> Result<(Value, Usage), String> {
    let response: Value = serde_json::from_slice(body)
        .map_err(|error| format!("the provider's answer is not JSON: {error}"))?;
    let mut text = String::new();
    let mut thinking = String::new();
    let mut tool_calls = Vec::new();
    for block in response["content"]
        .as_array()
        .ok_or("the provider's answer has no content")?
    {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            Some("thinking") => thinking.push_str(block["thinking"].as_str().unwrap_or("")),
            Some("tool_use") => tool_calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let usage = usage_of(&response["usage"]);
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) }, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    if !thinking.is_empty() {
        message["reasoning_content"] = Value::String(thinking);
    }
    let finish = finish_reason_from_stop(response["stop_reason"].as_str().unwrap_or("end_turn"));
    let answer = json!({
        "id": format!("chatcmpl-{}", response["id"].as_str().unwrap_or("anthropic")),
        "object": "chat.completion",
        "created": created,
        "model": response["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
        "usage": crate::openai::usage_json(&usage),
    });
    Ok((answer, usage))
}

// ---------------------------------------------------------------------------------------------
// Anthropic stream → OpenAI chunks

/// Translates Anthropic stream events into OpenAI chat chunks.
#[derive(Debug)]
pub struct AnthropicToOpenAiStream {
    writer: ChunkWriter,
    usage: Usage,
    input: AnthropicUsage,
    /// Block index → OpenAI tool call index, for tool_use blocks.
    tool_indexes: Vec<(u64, usize)>,
    finish_reason: Option<&'static str>,
    completed: bool,
}

impl AnthropicToOpenAiStream {
    pub fn new(client_wants_usage: bool, created: u64) -> AnthropicToOpenAiStream {
        AnthropicToOpenAiStream {
            writer: ChunkWriter {
                id: "chatcmpl-anthropic".to_owned(),
                model: String::new(),
                created,
                client_wants_usage,
            },
            usage: Usage::default(),
            input: AnthropicUsage::default(),
            tool_indexes: Vec::new(),
            finish_reason: None,
            completed: false,
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> OutEvent {
        self.writer.chunk(delta, finish_reason)
    }
}

impl StreamTranslator for AnthropicToOpenAiStream {
    fn on_event(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        let event: Value = serde_json::from_str(data)
            .map_err(|error| TranslateError::upstream(format!("invalid event JSON: {error}")))?;
        match event["type"].as_str().unwrap_or("") {
            "message_start" => {
                let message = &event["message"];
                if let Some(id) = message["id"].as_str() {
                    self.writer.id = format!("chatcmpl-{id}");
                }
                self.writer.model = message["model"].as_str().unwrap_or("").to_owned();
                self.input = AnthropicUsage::deserialize(&message["usage"]).unwrap_or_default();
                self.usage.merge_max(&self.input.to_usage());
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            "content_block_start" => {
                let block = &event["content_block"];
                if block["type"] == "tool_use" {
                    let block_index = event["index"].as_u64().unwrap_or(0);
                    let tool_index = self.tool_indexes.len();
                    self.tool_indexes.push((block_index, tool_index));
                    out.push(self.chunk(
                        json!({"tool_calls": [{"index": tool_index, "id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": ""}}]}),
                        None,
                    ));
                } else if block["type"] == "text"
                    && block["text"].as_str().is_some_and(|text| !text.is_empty())
                {
                    out.push(self.chunk(json!({"content": block["text"]}), None));
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                match delta["type"].as_str().unwrap_or("") {
                    "text_delta" => out.push(self.chunk(json!({"content": delta["text"]}), None)),
                    "thinking_delta" => {
                        out.push(self.chunk(json!({"reasoning_content": delta["thinking"]}), None))
                    }
                    "input_json_delta"
                        if delta["partial_json"].as_str().is_some_and(str::is_empty) => {}
                    "input_json_delta" => {
                        let block_index = event["index"].as_u64().unwrap_or(0);
                        let tool_index = self
                            .tool_indexes
                            .iter()
                            .find(|(block, _)| *block == block_index)
                            .map(|(_, tool)| *tool)
                            .ok_or_else(|| {
                                TranslateError::upstream(
                                    "input_json_delta for a block that is not a tool_use",
                                )
                            })?;
                        out.push(self.chunk(json!({"tool_calls": [{"index": tool_index, "function": {"arguments": delta["partial_json"]}}]}), None));
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(stop_reason) = event["delta"]["stop_reason"].as_str() {
                    self.finish_reason = Some(finish_reason_from_stop(stop_reason));
                }
                self.usage
                    .merge_max(&delta_usage(&event["usage"], &self.input));
            }
            "message_stop" => {
                self.completed = true;
                self.writer
                    .close(self.finish_reason.unwrap_or("stop"), &self.usage, out);
            }
            "error" => {
                let message = event["error"]["message"]
                    .as_str()
                    .unwrap_or("the provider reported an error");
                out.push(OutEvent::data(json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": event["error"]["type"]}}).to_string()));
                self.completed = true;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<OutEvent>) {}

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.completed
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages request → OpenAI chat request

/// Translate an Anthropic Messages request into an OpenAI chat request for `model`
/// (`max_completion_tokens` as for [`request_to_openai_text`]).
pub fn request_to_openai(
    request: &Value,
    model: &str,
    max_completion_tokens: bool,
) -> Result<Value, TranslateError> {
    request_to_openai_text(request, model, max_completion_tokens).map_err(TranslateError::Client)
}

/// Translate an Anthropic Messages request into an OpenAI chat request for `model`.
/// `max_completion_tokens` selects that member (OpenAI and Azure) over `max_tokens` (the
/// OpenAI-compatible family).
fn request_to_openai_text(
    request: &Value,
    model: &str,
    max_completion_tokens: bool,
) -> Result<Value, String> {
    let object = request
        .as_object()
        .ok_or("the request must be a JSON object")?;
    let mut messages = Vec::new();
    match object.get("system") {
        Some(Value::String(system)) => messages.push(json!({"role": "system", "content": system})),
        Some(Value::Array(blocks)) => {
            let text: Vec<&str> = blocks
                .iter()
                .filter_map(|block| block["text"].as_str())
                .collect();
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text.join("\n")}));
            }
        }
        _ => {}
    }
    let input_messages = object
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is required")?;
    for (index, message) in input_messages.iter().enumerate() {
        let role = message["role"]
            .as_str()
            .ok_or_else(|| format!("messages[{index}].role is missing"))?;
        let blocks: Vec<Value> = match &message["content"] {
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) => blocks.clone(),
            _ => {
                return Err(format!(
                    "messages[{index}].content must be a string or an array of blocks"
                ));
            }
        };
        match role {
            "user" => {
                let mut parts = Vec::new();
                for block in &blocks {
                    match block["type"].as_str().unwrap_or("") {
                        "tool_result" => {
                            let content = match &block["content"] {
                                Value::String(text) => text.clone(),
                                Value::Array(items) => items
                                    .iter()
                                    .filter_map(|item| item["text"].as_str())
                                    .collect::<Vec<_>>()
                                    .join("\n"),
                                _ => String::new(),
                            };
                            let content = if block["is_error"] == Value::Bool(true) {
                                format!("Error: {content}")
                            } else {
                                content
                            };
                            messages.push(json!({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}));
                        }
                        "text" => parts.push(json!({"type": "text", "text": block["text"]})),
                        "image" => {
                            let source = &block["source"];
                            let url = match source["type"].as_str() {
                                Some("base64") => format!(
                                    "data:{};base64,{}",
                                    source["media_type"].as_str().unwrap_or("image/png"),
                                    source["data"].as_str().unwrap_or("")
                                ),
                                Some("url") => source["url"].as_str().unwrap_or("").to_owned(),
                                _ => {
                                    return Err(format!(
                                        "messages[{index}] has an image source this provider cannot take"
                                    ));
                                }
                            };
                            parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                        "document" => {
                            return Err(format!(
                                "messages[{index}] has a document block, which this provider does not take"
                            ));
                        }
                        _ => {}
                    }
                }
                if !parts.is_empty() {
                    let only_text = parts.iter().all(|part| part["type"] == "text");
                    let content = if only_text && parts.len() == 1 {
                        parts[0]["text"].clone()
                    } else {
                        Value::Array(parts)
                    };
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            "assistant" => {
                let mut text = String::new();
                let mut tool_calls = Vec::new();
                for block in &blocks {
                    match block["type"].as_str().unwrap_or("") {
                        "text" => text.push_str(block["text"].as_str().unwrap_or("")),
                        "tool_use" => tool_calls.push(json!({
                            "id": block["id"], "type": "function",
                            "function": {"name": block["name"], "arguments": block["input"].to_string()},
                        })),
                        _ => {}
                    }
                }
                let mut assistant = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
                if !tool_calls.is_empty() {
                    assistant["tool_calls"] = Value::Array(tool_calls);
                }
                messages.push(assistant);
            }
            // Claude Code sends system turns among the messages (reminders mid-conversation).
            "system" => {
                let text: Vec<&str> = blocks
                    .iter()
                    .filter_map(|block| block["text"].as_str())
                    .collect();
                messages.push(json!({"role": "system", "content": text.join("\n")}));
            }
            other => return Err(format!("messages[{index}].role `{other}` is not supported")),
        }
    }
    let mut output = Map::new();
    output.insert("model".to_owned(), Value::String(model.to_owned()));
    output.insert("messages".to_owned(), Value::Array(messages));
    if let Some(max_tokens) = object.get("max_tokens").and_then(Value::as_u64) {
        let field = if max_completion_tokens {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        output.insert(field.to_owned(), json!(max_tokens));
    }
    for field in ["temperature", "top_p"] {
        if let Some(value) = object.get(field).filter(|value| !value.is_null()) {
            output.insert(field.to_owned(), value.clone());
        }
    }
    if let Some(stops) = object
        .get("stop_sequences")
        .and_then(Value::as_array)
        .filter(|stops| !stops.is_empty())
    {
        output.insert("stop".to_owned(), Value::Array(stops.clone()));
    }
    if object.get("stream") == Some(&Value::Bool(true)) {
        output.insert("stream".to_owned(), Value::Bool(true));
        output.insert("stream_options".to_owned(), json!({"include_usage": true}));
    }
    if let Some(user) = object
        .get("metadata")
        .and_then(|metadata| metadata["user_id"].as_str())
    {
        output.insert("user".to_owned(), json!(user));
    }
    if let Some(tools) = object
        .get("tools")
        .and_then(Value::as_array)
        .filter(|tools| !tools.is_empty())
    {
        let mut translated = Vec::new();
        for tool in tools {
            let Some(name) = tool["name"].as_str() else {
                continue;
            };
            if tool.get("input_schema").is_none() {
                // A server tool (web search, code execution…) has no OpenAI equivalent.
                return Err(format!(
                    "tool `{name}` is an Anthropic server tool, which this provider cannot run"
                ));
            }
            let mut function = json!({"name": name, "parameters": tool["input_schema"]});
            if let Some(description) = tool["description"].as_str() {
                function["description"] = json!(description);
            }
            translated.push(json!({"type": "function", "function": function}));
        }
        output.insert("tools".to_owned(), Value::Array(translated));
        let choice = &object.get("tool_choice").cloned().unwrap_or(Value::Null);
        let translated_choice = match choice["type"].as_str() {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => json!("auto"),
        };
        output.insert("tool_choice".to_owned(), translated_choice);
        if choice["disable_parallel_tool_use"] == Value::Bool(true) {
            output.insert("parallel_tool_calls".to_owned(), Value::Bool(false));
        }
    }
    Ok(Value::Object(output))
}

/// Map OpenAI's finish reason to Anthropic's stop reason.
pub fn stop_reason_from_finish(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

fn anthropic_usage_json(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.input_tokens.saturating_sub(usage.cached_input_tokens),
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// Translate an OpenAI chat completion into an Anthropic Messages response.
pub fn response_from_openai(
    body: &[u8],
    requested_model: &str,
) -> Result<(Value, Usage), TranslateError> {
    response_from_openai_text(body, requested_model).map_err(TranslateError::Upstream)
}

/// Translate an OpenAI chat completion into an Anthropic Messages response.
fn response_from_openai_text(body: &[u8], requested_model: &str) -> Result<(Value, Usage), String> {
    let response: Value = serde_json::from_slice(body)
        .map_err(|error| format!("the provider's answer is not JSON: {error}"))?;
    let choice = &response["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(reasoning) = message["reasoning_content"]
        .as_str()
        .filter(|text| !text.is_empty())
    {
        content.push(json!({"type": "thinking", "thinking": reasoning, "signature": ""}));
    }
    if let Some(text) = message["content"].as_str().filter(|text| !text.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().unwrap_or(&Vec::new()) {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    let usage = crate::openai::response_usage(body);
    let stop_reason = stop_reason_from_finish(choice["finish_reason"].as_str().unwrap_or("stop"));
    let answer = json!({
        "id": format!("msg_{}", response["id"].as_str().unwrap_or("openai")),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": anthropic_usage_json(&usage),
    });
    Ok((answer, usage))
}

// ---------------------------------------------------------------------------------------------
// OpenAI chunks → Anthropic stream

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text,
    Thinking,
    Tool(u64),
}

/// Translates OpenAI chat chunks into Anthropic stream events, block by block.
#[derive(Debug)]
pub struct OpenAiToAnthropicStream {
    model: String,
    started: bool,
    next_block: u64,
    open: Option<(OpenBlock, u64)>,
    stop_reason: Option<&'static str>,
    usage: Usage,
    completed: bool,
}

impl OpenAiToAnthropicStream {
    pub fn new(requested_model: &str) -> OpenAiToAnthropicStream {
        OpenAiToAnthropicStream {
            model: requested_model.to_owned(),
            started: false,
            next_block: 0,
            open: None,
            stop_reason: None,
            usage: Usage::default(),
            completed: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<OutEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({"type": "message_start", "message": {
            "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }});
        out.push(OutEvent::named("message_start", message.to_string()));
        out.push(OutEvent::named("ping", json!({"type": "ping"}).to_string()));
    }

    fn close_block(&mut self, out: &mut Vec<OutEvent>) {
        if let Some((_, index)) = self.open.take() {
            out.push(OutEvent::named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}).to_string(),
            ));
        }
    }

    /// Make sure a block of this kind is open; returns its index.
    fn ensure_block(&mut self, kind: OpenBlock, start: Value, out: &mut Vec<OutEvent>) -> u64 {
        if let Some((open_kind, index)) = self.open
            && open_kind == kind
        {
            return index;
        }
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((kind, index));
        out.push(OutEvent::named(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start})
                .to_string(),
        ));
        index
    }

    fn end(&mut self, out: &mut Vec<OutEvent>) {
        if self.completed {
            return;
        }
        self.start("openai", out);
        self.close_block(out);
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": anthropic_usage_json(&self.usage),
        });
        out.push(OutEvent::named("message_delta", delta.to_string()));
        out.push(OutEvent::named(
            "message_stop",
            json!({"type": "message_stop"}).to_string(),
        ));
        self.completed = true;
    }
}

impl StreamTranslator for OpenAiToAnthropicStream {
    fn on_event(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        if data.trim() == "[DONE]" {
            self.end(out);
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|error| TranslateError::upstream(format!("invalid chunk JSON: {error}")))?;
        if let Some(error) = chunk.get("error") {
            let message = error["message"]
                .as_str()
                .unwrap_or("the provider reported an error");
            out.push(OutEvent::named(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": message}})
                    .to_string(),
            ));
            self.completed = true;
            return Ok(());
        }
        self.start(chunk["id"].as_str().unwrap_or("openai"), out);
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object())
            && let Ok(parsed) = crate::openai::OpenAiUsage::deserialize(usage)
        {
            self.usage.merge_max(&Usage::from(&parsed));
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return Ok(());
        };
        let delta = &choice["delta"];
        if let Some(reasoning) = delta["reasoning_content"]
            .as_str()
            .or(delta["reasoning"].as_str())
            .filter(|text| !text.is_empty())
        {
            let index = self.ensure_block(
                OpenBlock::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            out.push(OutEvent::named("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": reasoning}}).to_string()));
        }
        if let Some(text) = delta["content"].as_str().filter(|text| !text.is_empty()) {
            let index =
                self.ensure_block(OpenBlock::Text, json!({"type": "text", "text": ""}), out);
            out.push(OutEvent::named("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}).to_string()));
        }
        for call in delta["tool_calls"].as_array().unwrap_or(&Vec::new()) {
            let tool_index = call["index"].as_u64().unwrap_or(0);
            let is_new =
                !matches!(self.open, Some((OpenBlock::Tool(open), _)) if open == tool_index);
            if is_new {
                let start = json!({"type": "tool_use", "id": call["id"].as_str().unwrap_or(""), "name": call["function"]["name"].as_str().unwrap_or(""), "input": {}});
                self.close_block(out);
                self.ensure_block(OpenBlock::Tool(tool_index), start, out);
            }
            let block_index = self.open.map(|(_, index)| index).unwrap_or(0);
            if let Some(arguments) = call["function"]["arguments"]
                .as_str()
                .filter(|text| !text.is_empty())
            {
                out.push(OutEvent::named("content_block_delta", json!({"type": "content_block_delta", "index": block_index, "delta": {"type": "input_json_delta", "partial_json": arguments}}).to_string()));
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.stop_reason = Some(stop_reason_from_finish(finish));
            self.close_block(out);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<OutEvent>) {
        // Some servers end without [DONE]; a finish reason is enough to close cleanly.
        if self.stop_reason.is_some() {
            self.end(out);
        }
    }

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.completed
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic stream passed through to an Anthropic client

/// Forwards Anthropic events as they are, reading usage from `message_start` and
/// `message_delta`.
#[derive(Debug, Default)]
pub struct AnthropicPassthroughStream {
    input: AnthropicUsage,
    usage: Usage,
    completed: bool,
}

impl AnthropicPassthroughStream {
    pub fn new() -> AnthropicPassthroughStream {
        AnthropicPassthroughStream::default()
    }
}

impl StreamTranslator for AnthropicPassthroughStream {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        let name = if event.is_empty() || event == "message" {
            // Anthropic always names events; fall back to the payload's type.
            serde_json::from_str::<Value>(data)
                .ok()
                .and_then(|value| value["type"].as_str().map(str::to_owned))
                .unwrap_or_default()
        } else {
            event.to_owned()
        };
        match name.as_str() {
            "message_start" => {
                if let Ok(value) = serde_json::from_str::<Value>(data) {
                    self.input =
                        AnthropicUsage::deserialize(&value["message"]["usage"]).unwrap_or_default();
                    self.usage.merge_max(&self.input.to_usage());
                }
            }
            "message_delta" => {
                if let Ok(value) = serde_json::from_str::<Value>(data) {
                    self.usage
                        .merge_max(&delta_usage(&value["usage"], &self.input));
                }
            }
            "message_stop" | "error" => self.completed = true,
            _ => {}
        }
        let event_name = if name.is_empty() {
            None
        } else {
            Some(name.into())
        };
        out.push(OutEvent {
            event: event_name,
            data: data.to_owned(),
        });
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<OutEvent>) {}

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.completed
    }
}
