//! Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`, `batchEmbedContents`),
//! translated from and to OpenAI's chat and embeddings shapes.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::error::TranslateError;
use crate::openai::ChunkWriter;
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

/// The path of a Gemini call below the base URL.
pub fn path(model: &str, stream: bool) -> String {
    if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    }
}

/// The path of a Gemini embeddings call.
pub fn embed_path(model: &str) -> String {
    format!("/v1beta/models/{model}:batchEmbedContents")
}

/// Translate an OpenAI chat request into a Gemini `generateContent` request.
pub fn request_from_openai(request: &Value) -> Result<Value, TranslateError> {
    request_from_openai_text(request).map_err(TranslateError::Client)
}

/// Translate an OpenAI chat request into a Gemini `generateContent` request.
fn request_from_openai_text(request: &Value) -> Result<Value, String> {
    let object = request
        .as_object()
        .ok_or("the request must be a JSON object")?;
    let empty = Vec::new();
    let mut system_parts = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // Gemini answers a function call by name; OpenAI by call id.
    let mut names_by_call_id: HashMap<String, String> = HashMap::new();
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
            "system" | "developer" => system_parts.extend(parts_of(&message["content"], index)?),
            "user" => push_content(&mut contents, "user", parts_of(&message["content"], index)?),
            "assistant" => {
                let mut parts = parts_of(&message["content"], index)?;
                for call in message["tool_calls"].as_array().unwrap_or(&empty) {
                    let name = call["function"]["name"].as_str().unwrap_or("").to_owned();
                    if let Some(id) = call["id"].as_str() {
                        names_by_call_id.insert(id.to_owned(), name.clone());
                    }
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    let args: Value = serde_json::from_str(if arguments.trim().is_empty() {
                        "{}"
                    } else {
                        arguments
                    })
                    .map_err(|_| {
                        format!("messages[{index}].tool_calls arguments are not valid JSON")
                    })?;
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                push_content(&mut contents, "model", parts);
            }
            "tool" | "function" => {
                let call_id = message["tool_call_id"].as_str().unwrap_or("");
                let name = names_by_call_id
                    .get(call_id)
                    .cloned()
                    .or_else(|| message["name"].as_str().map(str::to_owned))
                    .ok_or_else(|| {
                        format!(
                            "messages[{index}] answers a tool call that no earlier message made"
                        )
                    })?;
                let text = match &message["content"] {
                    Value::String(text) => text.clone(),
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|part| part["text"].as_str())
                        .collect::<Vec<_>>()
                        .join(""),
                    _ => String::new(),
                };
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(object)) => Value::Object(object),
                    _ => json!({"content": text}),
                };
                push_content(
                    &mut contents,
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            other => return Err(format!("messages[{index}].role `{other}` is not supported")),
        }
    }
    if contents.is_empty() {
        return Err("`messages` must contain at least one user or assistant message".to_owned());
    }
    let mut output = Map::new();
    output.insert("contents".to_owned(), Value::Array(contents));
    if !system_parts.is_empty() {
        output.insert(
            "systemInstruction".to_owned(),
            json!({"parts": system_parts}),
        );
    }
    let mut generation = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(value) = object.get(from).filter(|value| !value.is_null()) {
            generation.insert(to.to_owned(), value.clone());
        }
    }
    if let Some(max) = object
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| object.get("max_tokens").and_then(Value::as_u64))
    {
        generation.insert("maxOutputTokens".to_owned(), json!(max));
    }
    if let Some(n) = object.get("n").and_then(Value::as_u64).filter(|n| *n > 1) {
        generation.insert("candidateCount".to_owned(), json!(n));
    }
    match object.get("stop") {
        Some(Value::String(stop)) => {
            generation.insert("stopSequences".to_owned(), json!([stop]));
        }
        Some(Value::Array(stops)) if !stops.is_empty() => {
            generation.insert("stopSequences".to_owned(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(format) = object.get("response_format") {
        match format["type"].as_str() {
            Some("json_schema") => {
                generation.insert("responseMimeType".to_owned(), json!("application/json"));
                if let Some(schema) = format["json_schema"].get("schema") {
                    generation.insert("responseJsonSchema".to_owned(), schema.clone());
                }
            }
            Some("json_object") => {
                generation.insert("responseMimeType".to_owned(), json!("application/json"));
            }
            _ => {}
        }
    }
    if let Some(effort) = object.get("reasoning_effort").and_then(Value::as_str) {
        let budget = match effort {
            "minimal" => 0,
            "low" => 1024,
            "medium" => 8192,
            _ => 24576,
        };
        generation.insert(
            "thinkingConfig".to_owned(),
            json!({"thinkingBudget": budget, "includeThoughts": true}),
        );
    }
    if !generation.is_empty() {
        output.insert("generationConfig".to_owned(), Value::Object(generation));
    }
    if let Some(tools) = object
        .get("tools")
        .and_then(Value::as_array)
        .filter(|tools| !tools.is_empty())
    {
        let mut declarations = Vec::new();
        for tool in tools {
            let function = &tool["function"];
            let name = function["name"]
                .as_str()
                .ok_or("every tool needs function.name")?;
            let mut declaration = json!({"name": name});
            if let Some(description) = function["description"].as_str() {
                declaration["description"] = json!(description);
            }
            if let Some(parameters) = function
                .get("parameters")
                .filter(|parameters| !parameters.is_null())
            {
                declaration["parametersJsonSchema"] = parameters.clone();
            }
            declarations.push(declaration);
        }
        output.insert(
            "tools".to_owned(),
            json!([{"functionDeclarations": declarations}]),
        );
        let config = match object.get("tool_choice") {
            Some(Value::String(choice)) if choice == "none" => json!({"mode": "NONE"}),
            Some(Value::String(choice)) if choice == "required" => json!({"mode": "ANY"}),
            Some(Value::Object(choice)) => match choice
                .get("function")
                .and_then(|function| function["name"].as_str())
            {
                Some(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
                None => json!({"mode": "AUTO"}),
            },
            _ => json!({"mode": "AUTO"}),
        };
        output.insert(
            "toolConfig".to_owned(),
            json!({"functionCallingConfig": config}),
        );
    }
    // OpenAI chat's `web_search_options` (a Responses `web_search` tool): grounding with
    // Google Search, which Gemini runs itself.
    if object.contains_key("web_search_options") {
        let search = json!({"google_search": {}});
        match output.get_mut("tools").and_then(Value::as_array_mut) {
            Some(tools) => tools.push(search),
            None => {
                output.insert("tools".to_owned(), json!([search]));
            }
        }
    }
    Ok(Value::Object(output))
}

fn push_content(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut()
        && last["role"] == role
        && let Some(existing) = last["parts"].as_array_mut()
    {
        existing.extend(parts);
        return;
    }
    contents.push(json!({"role": role, "parts": parts}));
}

fn parts_of(content: &Value, index: usize) -> Result<Vec<Value>, String> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![json!({"text": text})]
        }),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                match item["type"].as_str() {
                    Some("text") => parts.push(json!({"text": item["text"]})),
                    Some("image_url") => {
                        let url = item["image_url"]["url"]
                            .as_str()
                            .or(item["image_url"].as_str())
                            .unwrap_or("");
                        if let Some(rest) = url.strip_prefix("data:") {
                            let (mime, data) = rest.split_once(";base64,").ok_or_else(|| {
                                format!("messages[{index}] has an unreadable data URL")
                            })?;
                            parts.push(json!({"inlineData": {"mimeType": mime, "data": data}}));
                        } else {
                            parts.push(
                                json!({"fileData": {"mimeType": guess_mime(url), "fileUri": url}}),
                            );
                        }
                    }
                    Some("input_audio") => {
                        let format = item["input_audio"]["format"].as_str().unwrap_or("wav");
                        parts.push(json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": item["input_audio"]["data"]}}));
                    }
                    _ => {}
                }
            }
            Ok(parts)
        }
        _ => Err(format!(
            "messages[{index}].content must be a string or an array of parts"
        )),
    }
}

fn guess_mime(url: &str) -> &'static str {
    let lower = url.to_ascii_lowercase();
    if lower.ends_with(".png") {
        "image/png"
    } else if lower.ends_with(".webp") {
        "image/webp"
    } else if lower.ends_with(".gif") {
        "image/gif"
    } else if lower.ends_with(".pdf") {
        "application/pdf"
    } else {
        "image/jpeg"
    }
}

/// Map Gemini's finish reason to OpenAI's.
pub fn finish_reason(reason: &str, called_tools: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

/// Usage from Gemini's `usageMetadata`.
pub fn usage_of(metadata: &Value) -> Usage {
    let count = |field: &str| metadata[field].as_u64().unwrap_or(0);
    let thoughts = count("thoughtsTokenCount");
    Usage {
        input_tokens: count("promptTokenCount"),
        output_tokens: count("candidatesTokenCount") + thoughts,
        cached_input_tokens: count("cachedContentTokenCount"),
        cache_write_tokens: 0,
        reasoning_tokens: thoughts,
    }
}

/// Translate a Gemini `generateContent` response into an OpenAI chat completion.
pub fn response_to_openai(
    body: &[u8],
    model: &str,
    created: u64,
) -> Result<(Value, Usage), TranslateError> {
    response_to_openai_text(body, model, created).map_err(TranslateError::Upstream)
}

/// Translate a Gemini `generateContent` response into an OpenAI chat completion.
fn response_to_openai_text(
    body: &[u8],
    model: &str,
    created: u64,
) -> Result<(Value, Usage), String> {
    let response: Value = serde_json::from_slice(body)
        .map_err(|error| format!("the provider's answer is not JSON: {error}"))?;
    let usage = usage_of(&response["usageMetadata"]);
    let empty = Vec::new();
    let mut choices = Vec::new();
    for (position, candidate) in response["candidates"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let mut text = String::new();
        let mut thoughts = String::new();
        let mut tool_calls = Vec::new();
        for part in candidate["content"]["parts"].as_array().unwrap_or(&empty) {
            if let Some(call) = part.get("functionCall") {
                tool_calls.push(json!({
                    "id": call["id"].as_str().map(str::to_owned).unwrap_or_else(|| format!("call_{}", tool_calls.len())),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("args").cloned().unwrap_or_else(|| json!({})).to_string()},
                }));
            } else if let Some(part_text) = part["text"].as_str() {
                if part["thought"] == Value::Bool(true) {
                    thoughts.push_str(part_text);
                } else {
                    text.push_str(part_text);
                }
            }
        }
        let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) }, "refusal": null});
        let called_tools = !tool_calls.is_empty();
        if called_tools {
            message["tool_calls"] = Value::Array(tool_calls);
        }
        if !thoughts.is_empty() {
            message["reasoning_content"] = Value::String(thoughts);
        }
        let index = candidate["index"].as_u64().unwrap_or(position as u64);
        let finish = finish_reason(
            candidate["finishReason"].as_str().unwrap_or("STOP"),
            called_tools,
        );
        choices.push(
            json!({"index": index, "message": message, "finish_reason": finish, "logprobs": null}),
        );
    }
    if choices.is_empty() {
        if let Some(reason) = response["promptFeedback"]["blockReason"].as_str() {
            return Err(format!("the provider blocked the prompt ({reason})"));
        }
        return Err("the provider's answer has no candidates".to_owned());
    }
    let answer = json!({
        "id": format!("chatcmpl-{}", response["responseId"].as_str().unwrap_or("gemini")),
        "object": "chat.completion",
        "created": created,
        "model": response["modelVersion"].as_str().unwrap_or(model),
        "choices": choices,
        "usage": crate::openai::usage_json(&usage),
    });
    Ok((answer, usage))
}

/// Translates Gemini stream events (each a partial `GenerateContentResponse`) into OpenAI
/// chat chunks. Gemini sends no end marker; the stream's end closes it.
#[derive(Debug)]
pub struct GeminiToOpenAiStream {
    writer: ChunkWriter,
    started: bool,
    tool_calls: usize,
    finish: Option<&'static str>,
    usage: Usage,
    completed: bool,
}

impl GeminiToOpenAiStream {
    pub fn new(client_wants_usage: bool, model: &str, created: u64) -> GeminiToOpenAiStream {
        GeminiToOpenAiStream {
            writer: ChunkWriter {
                id: "chatcmpl-gemini".to_owned(),
                model: model.to_owned(),
                created,
                client_wants_usage,
            },
            started: false,
            tool_calls: 0,
            finish: None,
            usage: Usage::default(),
            completed: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> OutEvent {
        self.writer.chunk(delta, finish)
    }
}

impl StreamTranslator for GeminiToOpenAiStream {
    fn on_event(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        let response: Value = serde_json::from_str(data)
            .map_err(|error| TranslateError::upstream(format!("invalid event JSON: {error}")))?;
        if let Some(error) = response.get("error") {
            let message = error["message"]
                .as_str()
                .unwrap_or("the provider reported an error");
            out.push(OutEvent::data(json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": error["status"]}}).to_string()));
            self.completed = true;
            return Ok(());
        }
        if !self.started {
            self.started = true;
            if let Some(id) = response["responseId"].as_str() {
                self.writer.id = format!("chatcmpl-{id}");
            }
            if let Some(version) = response["modelVersion"].as_str() {
                self.writer.model = version.to_owned();
            }
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        if response.get("usageMetadata").is_some() {
            self.usage.merge_max(&usage_of(&response["usageMetadata"]));
        }
        let candidate = &response["candidates"][0];
        for part in candidate["content"]["parts"]
            .as_array()
            .unwrap_or(&Vec::new())
        {
            if let Some(call) = part.get("functionCall") {
                let index = self.tool_calls;
                self.tool_calls += 1;
                let id = call["id"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("call_{index}"));
                let arguments = call
                    .get("args")
                    .cloned()
                    .unwrap_or_else(|| json!({}))
                    .to_string();
                out.push(self.chunk(json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": call["name"], "arguments": arguments}}]}), None));
            } else if let Some(text) = part["text"].as_str().filter(|text| !text.is_empty()) {
                if part["thought"] == Value::Bool(true) {
                    out.push(self.chunk(json!({"reasoning_content": text}), None));
                } else {
                    out.push(self.chunk(json!({"content": text}), None));
                }
            }
        }
        if let Some(reason) = candidate["finishReason"].as_str() {
            self.finish = Some(finish_reason(reason, self.tool_calls > 0));
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<OutEvent>) {
        if self.completed || !self.started {
            return;
        }
        if let Some(finish) = self.finish {
            self.writer.close(finish, &self.usage, out);
            self.completed = true;
        }
    }

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.completed
    }
}

/// Translate an OpenAI embeddings request into a Gemini `batchEmbedContents` request.
pub fn embeddings_request_from_openai(
    request: &Value,
    model: &str,
) -> Result<Value, TranslateError> {
    embeddings_request_from_openai_text(request, model).map_err(TranslateError::Client)
}

/// Translate an OpenAI embeddings request into a Gemini `batchEmbedContents` request.
fn embeddings_request_from_openai_text(request: &Value, model: &str) -> Result<Value, String> {
    let inputs: Vec<String> = match &request["input"] {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return Err(
                "`input` must be a string or an array of strings for Gemini embeddings".to_owned(),
            );
        }
    };
    let requests: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let mut entry =
                json!({"model": format!("models/{model}"), "content": {"parts": [{"text": text}]}});
            if let Some(dimensions) = request["dimensions"].as_u64() {
                entry["outputDimensionality"] = json!(dimensions);
            }
            entry
        })
        .collect();
    Ok(json!({"requests": requests}))
}

/// Translate a Gemini `batchEmbedContents` response into OpenAI's embeddings list.
pub fn embeddings_response_to_openai(
    body: &[u8],
    model: &str,
    base64: bool,
) -> Result<(Value, Usage), TranslateError> {
    embeddings_response_to_openai_text(body, model, base64).map_err(TranslateError::Upstream)
}

/// Translate a Gemini `batchEmbedContents` response into OpenAI's embeddings list.
/// `base64` answers in the base64 encoding the OpenAI SDKs ask for by default.
fn embeddings_response_to_openai_text(
    body: &[u8],
    model: &str,
    base64: bool,
) -> Result<(Value, Usage), String> {
    use base64::Engine;
    let response: Value = serde_json::from_slice(body)
        .map_err(|error| format!("the provider's answer is not JSON: {error}"))?;
    let embeddings = response["embeddings"]
        .as_array()
        .ok_or("the provider's answer has no embeddings")?;
    let mut data = Vec::new();
    for (index, embedding) in embeddings.iter().enumerate() {
        let values: Vec<f32> = embedding["values"]
            .as_array()
            .ok_or("an embedding has no values")?
            .iter()
            .map(|value| value.as_f64().unwrap_or(0.0) as f32)
            .collect();
        let encoded = if base64 {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(values)
        };
        data.push(json!({"object": "embedding", "index": index, "embedding": encoded}));
    }
    let answer = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}});
    Ok((answer, Usage::default()))
}
