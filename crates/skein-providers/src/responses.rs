//! OpenAI's Responses API (`POST /v1/responses`), as spoken by Codex CLI, the OpenAI Agents
//! SDK, the Vercel AI SDK and `client.responses.create`. To OpenAI and Azure it passes through;
//! to every other provider it goes through OpenAI chat, the common language: a request becomes
//! a chat request ([`request_to_chat`]), a chat answer becomes a response
//! ([`response_from_chat`], [`ChatToResponsesStream`]).
//!
//! What chat cannot carry is said, not lost silently: built-in tools (`web_search`,
//! `file_search`…) are left out of a translated request and named in [`ChatRequest::dropped`]
//! (the proxy says so in a response header); custom tools (Codex's freeform `apply_patch`)
//! become function tools taking one `input` string, and their calls come back as
//! `custom_tool_call` items.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use crate::error::TranslateError;
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

/// The built-in tool types of the Responses API, which only OpenAI runs.
const BUILT_IN_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "web_search_2025_08_26",
    "file_search",
    "code_interpreter",
    "image_generation",
    "computer_use_preview",
    "computer_use",
    "local_shell",
    "mcp",
];

/// Output items of built-in tools, which a translated request cannot send back.
const BUILT_IN_ITEMS: &[&str] = &[
    "web_search_call",
    "file_search_call",
    "code_interpreter_call",
    "image_generation_call",
    "computer_call",
    "computer_call_output",
    "local_shell_call",
    "local_shell_call_output",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
];

// ---------------------------------------------------------------------------------------------
// What a response echoes of its request

/// The facts of one call that every response object and event repeats: its id, the model the
/// client asked for, and the request's settings (OpenAI echoes them in each response).
#[derive(Debug, Clone)]
pub struct Echo {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    /// Settings echoed as they were sent.
    settings: Map<String, Value>,
    /// Names of the request's custom (freeform) tools, whose calls are `custom_tool_call`s.
    custom_tools: HashSet<String>,
    /// Tools offered inside a `namespace` tool: (tool, namespace). Their calls name it.
    namespaces: Vec<(String, String)>,
}

/// A member's default, when the request leaves it out.
type Default = fn() -> Value;

/// The members of a request that a response echoes, with their default when absent.
const ECHOED: &[(&str, Default)] = &[
    ("instructions", || Value::Null),
    ("max_output_tokens", || Value::Null),
    ("metadata", || json!({})),
    ("parallel_tool_calls", || Value::Bool(true)),
    ("previous_response_id", || Value::Null),
    ("prompt_cache_key", || Value::Null),
    ("reasoning", || json!({"effort": null, "summary": null})),
    ("service_tier", || json!("default")),
    ("store", || Value::Bool(true)),
    ("temperature", || json!(1.0)),
    ("text", || json!({"format": {"type": "text"}})),
    ("tool_choice", || json!("auto")),
    ("tools", || json!([])),
    ("top_p", || json!(1.0)),
    ("truncation", || json!("disabled")),
    ("user", || Value::Null),
];

impl Echo {
    /// Read what to echo from a request.
    pub fn from_request(request: &Value, id: String, model: &str, created_at: u64) -> Echo {
        let mut settings = Map::new();
        for (name, default) in ECHOED {
            let value = match request.get(*name) {
                Some(Value::Null) | None => default(),
                Some(value) => value.clone(),
            };
            settings.insert((*name).to_owned(), value);
        }
        let mut custom_tools = HashSet::new();
        let mut namespaces = Vec::new();
        for tool in request["tools"].as_array().into_iter().flatten() {
            let inner: Vec<&Value> = if tool["type"] == "namespace" {
                tool["tools"].as_array().into_iter().flatten().collect()
            } else {
                vec![tool]
            };
            for member in inner {
                let Some(name) = member["name"].as_str() else {
                    continue;
                };
                if member["type"] == "custom" {
                    custom_tools.insert(name.to_owned());
                }
                if tool["type"] == "namespace"
                    && let Some(namespace) = tool["name"].as_str()
                {
                    namespaces.push((name.to_owned(), namespace.to_owned()));
                }
            }
        }
        Echo {
            id,
            model: model.to_owned(),
            created_at,
            settings,
            custom_tools,
            namespaces,
        }
    }

    /// A response object in `status`, with `output` and `usage` (null while in progress).
    pub fn response(&self, status: &str, output: Vec<Value>, usage: Option<&Usage>) -> Value {
        let mut response = Map::new();
        response.insert("id".to_owned(), json!(self.id));
        response.insert("object".to_owned(), json!("response"));
        response.insert("created_at".to_owned(), json!(self.created_at));
        response.insert("status".to_owned(), json!(status));
        response.insert("background".to_owned(), json!(false));
        response.insert("error".to_owned(), Value::Null);
        response.insert("incomplete_details".to_owned(), Value::Null);
        response.insert("model".to_owned(), json!(self.model));
        response.insert("output".to_owned(), Value::Array(output));
        for (name, value) in &self.settings {
            response.insert(name.clone(), value.clone());
        }
        response.insert(
            "usage".to_owned(),
            usage.map(usage_json).unwrap_or(Value::Null),
        );
        Value::Object(response)
    }

    /// The `previous_response_id` the request named.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.settings
            .get("previous_response_id")
            .and_then(Value::as_str)
    }

    /// The namespace a tool was offered in, if any.
    fn namespace_of(&self, tool: &str) -> Option<&str> {
        self.namespaces
            .iter()
            .find(|(name, _)| name == tool)
            .map(|(_, namespace)| namespace.as_str())
    }

    /// A call item with the namespace of its tool, when it has one.
    fn with_namespace(&self, mut item: Value) -> Value {
        if let Some(namespace) = item["name"]
            .as_str()
            .and_then(|name| self.namespace_of(name))
        {
            item["namespace"] = json!(namespace);
        }
        item
    }

    /// An item id derived from the response id (`msg_…`, `fc_…`), unique within the response.
    fn item_id(&self, prefix: &str, index: usize) -> String {
        let stem = self.id.strip_prefix("resp_").unwrap_or(&self.id);
        format!("{prefix}_{stem}{index:02x}")
    }
}

/// The Responses API's `usage` object.
pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    })
}

/// Read a Responses `usage` object.
pub fn usage_of(usage: &Value) -> Usage {
    let number = |value: &Value| value.as_u64().unwrap_or(0);
    Usage {
        input_tokens: number(&usage["input_tokens"]),
        output_tokens: number(&usage["output_tokens"]),
        cached_input_tokens: number(&usage["input_tokens_details"]["cached_tokens"]),
        cache_write_tokens: 0,
        reasoning_tokens: number(&usage["output_tokens_details"]["reasoning_tokens"]),
    }
}

// ---------------------------------------------------------------------------------------------
// Input items

/// The request's `input` as a list of items (a string is one user message), each with an id.
pub fn input_items(request: &Value, id_stem: &str) -> Result<Vec<Value>, TranslateError> {
    let mut items = match &request["input"] {
        Value::Null => Vec::new(),
        Value::String(text) => vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        })],
        Value::Array(items) => items.clone(),
        _ => {
            return Err(TranslateError::client(
                "`input` must be a string or an array of input items",
            ));
        }
    };
    for (index, item) in items.iter_mut().enumerate() {
        let Some(object) = item.as_object_mut() else {
            return Err(TranslateError::client(format!(
                "input[{index}] must be an object"
            )));
        };
        if !object.contains_key("type") && object.contains_key("role") {
            object.insert("type".to_owned(), json!("message"));
        }
        if let Some(Value::String(text)) = object.get("content")
            && object.get("type") == Some(&json!("message"))
        {
            let part = if object.get("role") == Some(&json!("assistant")) {
                "output_text"
            } else {
                "input_text"
            };
            let text = text.clone();
            object.insert("content".to_owned(), json!([{"type": part, "text": text}]));
        }
        if !object.contains_key("id") {
            object.insert("id".to_owned(), json!(format!("in_{id_stem}{index:02x}")));
        }
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------------
// Responses request → OpenAI chat request

/// A chat request translated from a Responses request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub body: Value,
    /// Built-in tools left out, by type.
    pub dropped: Vec<String>,
}

/// Translate a Responses request into an OpenAI chat request for `model`. `history` holds the
/// items of the conversation before it (from `previous_response_id`), oldest first.
/// `max_completion_tokens` selects that member (OpenAI and Azure) over `max_tokens`.
/// `web_search` says the target runs a web search of its own (Anthropic, Gemini): a
/// `web_search` tool then becomes chat's `web_search_options`, which their translations turn
/// into their own search tool; otherwise it is left out (and named in `dropped`).
pub fn request_to_chat(
    request: &Value,
    history: &[Value],
    model: &str,
    max_completion_tokens: bool,
    web_search: bool,
) -> Result<ChatRequest, TranslateError> {
    request_to_chat_text(request, history, model, max_completion_tokens, web_search)
        .map_err(TranslateError::Client)
}

fn request_to_chat_text(
    request: &Value,
    history: &[Value],
    model: &str,
    max_completion_tokens: bool,
    web_search: bool,
) -> Result<ChatRequest, String> {
    let object = request
        .as_object()
        .ok_or("the request must be a JSON object")?;
    let mut messages: Vec<Value> = Vec::new();
    match object.get("instructions") {
        Some(Value::String(instructions)) if !instructions.is_empty() => {
            messages.push(json!({"role": "system", "content": instructions}));
        }
        Some(Value::String(_)) | Some(Value::Null) | None => {}
        Some(_) => return Err("`instructions` must be a string".to_owned()),
    }
    let input = input_items(request, "").map_err(|error| error.message().to_owned())?;
    for (index, item) in history.iter().chain(input.iter()).enumerate() {
        push_item(&mut messages, item, index)?;
    }
    if messages.is_empty() {
        return Err("`input` is required".to_owned());
    }
    let mut output = Map::new();
    output.insert("model".to_owned(), json!(model));
    output.insert("messages".to_owned(), Value::Array(messages));
    let mut dropped = Vec::new();
    if let Some(tools) = object.get("tools") {
        let tools = tools.as_array().ok_or("`tools` must be an array")?;
        let mut functions = Vec::new();
        for (index, tool) in tools.iter().enumerate() {
            match tool["type"].as_str().unwrap_or("function") {
                "function" => functions.push(function_tool(tool, index)?),
                "custom" => functions.push(custom_tool(tool, index)?),
                // A group of tools (Codex's sub-agent tools): its tools, each on its own.
                "namespace" => {
                    for inner in tool["tools"].as_array().into_iter().flatten() {
                        match inner["type"].as_str().unwrap_or("function") {
                            "custom" => functions.push(custom_tool(inner, index)?),
                            _ => functions.push(function_tool(inner, index)?),
                        }
                    }
                }
                kind if web_search && kind.starts_with("web_search") => {
                    let mut options = Map::new();
                    if let Some(size) = tool.get("search_context_size") {
                        options.insert("search_context_size".to_owned(), size.clone());
                    }
                    output.insert("web_search_options".to_owned(), Value::Object(options));
                }
                kind if BUILT_IN_TOOLS.contains(&kind) => {
                    if !dropped.iter().any(|seen: &String| seen == kind) {
                        dropped.push(kind.to_owned());
                    }
                }
                other => return Err(format!("tools[{index}].type `{other}` is not supported")),
            }
        }
        if !functions.is_empty() {
            output.insert("tools".to_owned(), Value::Array(functions));
            if let Some(choice) = object.get("tool_choice") {
                output.insert("tool_choice".to_owned(), tool_choice(choice)?);
            }
            if let Some(parallel) = object.get("parallel_tool_calls").filter(|v| v.is_boolean()) {
                output.insert("parallel_tool_calls".to_owned(), parallel.clone());
            }
        }
    }
    for name in [
        "temperature",
        "top_p",
        "user",
        "prompt_cache_key",
        "safety_identifier",
    ] {
        if let Some(value) = object.get(name).filter(|value| !value.is_null()) {
            output.insert(name.to_owned(), value.clone());
        }
    }
    if let Some(limit) = object.get("max_output_tokens").filter(|v| !v.is_null()) {
        let limit = limit
            .as_u64()
            .ok_or("`max_output_tokens` must be a positive integer")?;
        let name = if max_completion_tokens {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        output.insert(name.to_owned(), json!(limit));
    }
    if let Some(effort) = object
        .get("reasoning")
        .and_then(|reasoning| reasoning["effort"].as_str())
        .filter(|effort| *effort != "none")
    {
        output.insert("reasoning_effort".to_owned(), json!(effort));
    }
    if let Some(format) = object.get("text").map(|text| &text["format"])
        && !format.is_null()
    {
        match format["type"].as_str() {
            Some("text") | None => {}
            Some("json_object") => {
                output.insert("response_format".to_owned(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let mut schema = Map::new();
                schema.insert(
                    "name".to_owned(),
                    format.get("name").cloned().unwrap_or(json!("response")),
                );
                for member in ["schema", "strict", "description"] {
                    if let Some(value) = format.get(member) {
                        schema.insert(member.to_owned(), value.clone());
                    }
                }
                output.insert(
                    "response_format".to_owned(),
                    json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            Some(other) => return Err(format!("text.format.type `{other}` is not supported")),
        }
    }
    if object.get("stream") == Some(&Value::Bool(true)) {
        output.insert("stream".to_owned(), Value::Bool(true));
        output.insert("stream_options".to_owned(), json!({"include_usage": true}));
    }
    Ok(ChatRequest {
        body: Value::Object(output),
        dropped,
    })
}

/// The text of content parts (or a string), joined.
fn joined_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str().or(part["refusal"].as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Chat content for a message's parts: a string when it is all text, else parts.
fn chat_content(content: &Value, index: usize) -> Result<Value, String> {
    let parts = match content {
        Value::String(text) => return Ok(json!(text)),
        Value::Array(parts) => parts,
        Value::Null => return Ok(json!("")),
        _ => {
            return Err(format!(
                "input[{index}].content must be a string or an array"
            ));
        }
    };
    let mut out = Vec::new();
    let mut only_text = true;
    for part in parts {
        match part["type"].as_str().unwrap_or("") {
            "input_text" | "output_text" | "text" | "summary_text" => {
                out.push(json!({"type": "text", "text": part["text"].as_str().unwrap_or("")}));
            }
            "refusal" => {
                out.push(json!({"type": "text", "text": part["refusal"].as_str().unwrap_or("")}))
            }
            "input_image" => {
                only_text = false;
                let url = part["image_url"]
                    .as_str()
                    .ok_or_else(|| format!("input[{index}]: only images given by `image_url` can be translated (not `file_id`)"))?;
                let mut image = json!({"url": url});
                if let Some(detail) = part["detail"].as_str() {
                    image["detail"] = json!(detail);
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            other => {
                return Err(format!(
                    "input[{index}]: content parts of type `{other}` cannot be translated for this provider"
                ));
            }
        }
    }
    if only_text {
        let text: Vec<&str> = out
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect();
        Ok(json!(text.join("")))
    } else {
        Ok(Value::Array(out))
    }
}

/// Append one input item to the chat messages.
fn push_item(messages: &mut Vec<Value>, item: &Value, index: usize) -> Result<(), String> {
    let kind = item["type"].as_str().unwrap_or("message");
    match kind {
        "message" => {
            let role = match item["role"].as_str() {
                Some("developer") | Some("system") => "system",
                Some("user") => "user",
                Some("assistant") => "assistant",
                Some(other) => {
                    return Err(format!("input[{index}].role `{other}` is not supported"));
                }
                None => return Err(format!("input[{index}].role is missing")),
            };
            let content = chat_content(&item["content"], index)?;
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" | "custom_tool_call" => {
            let call_id = item["call_id"]
                .as_str()
                .ok_or_else(|| format!("input[{index}].call_id is missing"))?;
            let name = item["name"]
                .as_str()
                .ok_or_else(|| format!("input[{index}].name is missing"))?;
            let arguments = if kind == "custom_tool_call" {
                json!({"input": item["input"].as_str().unwrap_or("")}).to_string()
            } else {
                match &item["arguments"] {
                    Value::String(arguments) => arguments.clone(),
                    Value::Null => "{}".to_owned(),
                    other => other.to_string(),
                }
            };
            let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
            // Calls of one turn go into one assistant message, after its text if it has any.
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" => {
                    match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => last["tool_calls"] = json!([call]),
                    }
                }
                _ => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" | "custom_tool_call_output" => {
            let call_id = item["call_id"]
                .as_str()
                .ok_or_else(|| format!("input[{index}].call_id is missing"))?;
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": joined_text(&item["output"])}));
        }
        // Reasoning only the model that made it can read again (its summary is not a turn).
        "reasoning" => {}
        kind if BUILT_IN_ITEMS.contains(&kind) => {}
        "item_reference" => {
            return Err(format!(
                "input[{index}]: `item_reference` items cannot be resolved for this provider; send the item itself"
            ));
        }
        other => return Err(format!("input[{index}].type `{other}` is not supported")),
    }
    Ok(())
}

fn function_tool(tool: &Value, index: usize) -> Result<Value, String> {
    let name = tool["name"]
        .as_str()
        .ok_or_else(|| format!("tools[{index}].name is missing"))?;
    let mut function = json!({"name": name});
    if let Some(description) = tool["description"].as_str() {
        function["description"] = json!(description);
    }
    function["parameters"] = match &tool["parameters"] {
        Value::Null => json!({"type": "object", "properties": {}}),
        parameters => parameters.clone(),
    };
    if let Some(strict) = tool["strict"].as_bool() {
        function["strict"] = json!(strict);
    }
    Ok(json!({"type": "function", "function": function}))
}

/// A custom (freeform) tool as a function taking its input as one string.
fn custom_tool(tool: &Value, index: usize) -> Result<Value, String> {
    let name = tool["name"]
        .as_str()
        .ok_or_else(|| format!("tools[{index}].name is missing"))?;
    let mut input = "The tool's input, as free text.".to_owned();
    let format = &tool["format"];
    if format["type"] == "grammar"
        && let Some(definition) = format["definition"].as_str()
    {
        let syntax = format["syntax"].as_str().unwrap_or("lark");
        input = format!(
            "The tool's input, as free text that must follow this {syntax} grammar:\n{definition}"
        );
    }
    let mut function = json!({
        "name": name,
        "parameters": {
            "type": "object",
            "properties": {"input": {"type": "string", "description": input}},
            "required": ["input"],
            "additionalProperties": false,
        },
    });
    if let Some(description) = tool["description"].as_str() {
        function["description"] = json!(description);
    }
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(choice: &Value) -> Result<Value, String> {
    Ok(match choice {
        Value::String(mode) => json!(mode),
        Value::Object(object) => match object.get("type").and_then(Value::as_str) {
            Some("function") | Some("custom") => {
                let name = object
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("tool_choice.name is missing")?;
                json!({"type": "function", "function": {"name": name}})
            }
            Some("allowed_tools") => json!(object.get("mode").cloned().unwrap_or(json!("auto"))),
            // A built-in tool was asked for; it was left out, so the model chooses.
            _ => json!("auto"),
        },
        _ => return Err("`tool_choice` must be a string or an object".to_owned()),
    })
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat answer → Responses answer

/// A finish reason's `status` and `incomplete_details`.
fn status_of(finish_reason: Option<&str>) -> (&'static str, Value) {
    match finish_reason {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// Translate an OpenAI chat completion into a response.
pub fn response_from_chat(body: &[u8], echo: &Echo) -> Result<(Value, Usage), TranslateError> {
    let completion: Value = serde_json::from_slice(body).map_err(|error| {
        TranslateError::upstream(format!("the provider's answer is not JSON: {error}"))
    })?;
    let choice = &completion["choices"][0];
    if choice.is_null() {
        return Err(TranslateError::upstream(
            "the provider's answer has no choices",
        ));
    }
    let message = &choice["message"];
    let usage = completion
        .get("usage")
        .and_then(|usage| serde_json::from_value::<crate::openai::OpenAiUsage>(usage.clone()).ok())
        .map(|usage| Usage::from(&usage))
        .unwrap_or_default();
    let mut output = Vec::new();
    let reasoning = message["reasoning_content"]
        .as_str()
        .or(message["reasoning"].as_str())
        .unwrap_or("");
    if !reasoning.is_empty() {
        output.push(json!({
            "type": "reasoning", "id": echo.item_id("rs", output.len()),
            "summary": [{"type": "summary_text", "text": reasoning}],
        }));
    }
    let text = match &message["content"] {
        Value::String(text) => text.clone(),
        other => joined_text(other),
    };
    if let Some(refusal) = message["refusal"].as_str().filter(|text| !text.is_empty()) {
        output.push(json!({
            "type": "message", "id": echo.item_id("msg", output.len()), "status": "completed",
            "role": "assistant", "content": [{"type": "refusal", "refusal": refusal}],
        }));
    } else if !text.is_empty() {
        output.push(json!({
            "type": "message", "id": echo.item_id("msg", output.len()), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }));
    }
    if let Some(calls) = message["tool_calls"].as_array() {
        for call in calls {
            let name = call["function"]["name"].as_str().unwrap_or("");
            let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
            let call_id = call["id"].as_str().unwrap_or("");
            output.push(tool_call_item(echo, output.len(), call_id, name, arguments));
        }
    }
    let (status, incomplete) = status_of(choice["finish_reason"].as_str());
    let mut response = echo.response(status, output, Some(&usage));
    response["incomplete_details"] = incomplete;
    Ok((response, usage))
}

/// A finished tool call as an output item: `custom_tool_call` for a custom tool.
fn tool_call_item(echo: &Echo, index: usize, call_id: &str, name: &str, arguments: &str) -> Value {
    echo.with_namespace(plain_call_item(echo, index, call_id, name, arguments))
}

fn plain_call_item(echo: &Echo, index: usize, call_id: &str, name: &str, arguments: &str) -> Value {
    if echo.custom_tools.contains(name) {
        json!({
            "type": "custom_tool_call", "id": echo.item_id("ctc", index), "status": "completed",
            "call_id": call_id, "name": name, "input": custom_input(arguments),
        })
    } else {
        json!({
            "type": "function_call", "id": echo.item_id("fc", index), "status": "completed",
            "call_id": call_id, "name": name, "arguments": arguments,
        })
    }
}

/// The freeform input of a custom tool's call, from the `{"input": …}` arguments it was
/// called with (the arguments as they are if they are not that).
fn custom_input(arguments: &str) -> String {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .and_then(|value| value["input"].as_str().map(str::to_owned))
        .unwrap_or_else(|| arguments.to_owned())
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat stream → Responses stream

/// The item being streamed.
#[derive(Debug)]
enum Open {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        chat_index: u64,
    },
}

/// Turns OpenAI chat chunks into the Responses API's events, numbered as OpenAI numbers them
/// (`sequence_number` from 0), with `response.completed` (or `response.incomplete`) carrying
/// the whole response and its usage.
pub struct ChatToResponsesStream {
    echo: Echo,
    sequence: u64,
    started: bool,
    open: Option<Open>,
    output: Vec<Value>,
    finish_reason: Option<String>,
    usage: Usage,
    done: bool,
    result: Option<Value>,
}

impl ChatToResponsesStream {
    pub fn new(echo: Echo) -> ChatToResponsesStream {
        ChatToResponsesStream {
            echo,
            sequence: 0,
            started: false,
            open: None,
            output: Vec::new(),
            finish_reason: None,
            usage: Usage::default(),
            done: false,
            result: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<OutEvent>, kind: &'static str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        // `to_string` of a `Value` goes through `Display`, several times slower.
        out.push(OutEvent::named(
            kind,
            serde_json::to_string(&data).unwrap_or_default(),
        ));
    }

    fn start(&mut self, out: &mut Vec<OutEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self.echo.response("in_progress", Vec::new(), None);
        self.emit(
            out,
            "response.created",
            json!({"response": response.clone()}),
        );
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    fn output_index(&self) -> usize {
        self.output.len()
    }

    /// Close the open item, if any, with its `*.done` events.
    fn close(&mut self, out: &mut Vec<OutEvent>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.output_index();
        let item = match open {
            Open::Reasoning { id, text } => {
                let part = json!({"type": "summary_text", "text": text});
                self.emit(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                self.emit(
                    out,
                    "response.reasoning_summary_part.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                json!({"type": "reasoning", "id": id, "summary": [part]})
            }
            Open::Message { id, text } => {
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                json!({"type": "message", "id": id, "status": "completed", "role": "assistant", "content": [part]})
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                if self.echo.custom_tools.contains(&name) {
                    let input = custom_input(&arguments);
                    self.emit(
                        out,
                        "response.custom_tool_call_input.delta",
                        json!({"item_id": id, "output_index": index, "delta": input}),
                    );
                    self.emit(
                        out,
                        "response.custom_tool_call_input.done",
                        json!({"item_id": id, "output_index": index, "input": input}),
                    );
                    json!({"type": "custom_tool_call", "id": id, "status": "completed", "call_id": call_id, "name": name, "input": input})
                } else {
                    self.emit(out, "response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}));
                    json!({"type": "function_call", "id": id, "status": "completed", "call_id": call_id, "name": name, "arguments": arguments})
                }
            }
        };
        let item = self.echo.with_namespace(item);
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item.clone()}),
        );
        self.output.push(item);
    }

    fn reasoning(&mut self, delta: &str, out: &mut Vec<OutEvent>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close(out);
            let index = self.output_index();
            let id = self.echo.item_id("rs", index);
            self.emit(out, "response.output_item.added", json!({"output_index": index, "item": {"type": "reasoning", "id": id, "summary": []}}));
            self.emit(out, "response.reasoning_summary_part.added", json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}));
            self.open = Some(Open::Reasoning {
                id,
                text: String::new(),
            });
        }
        let index = self.output_index();
        if let Some(Open::Reasoning { id, text }) = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            self.emit(
                out,
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": delta}),
            );
        }
    }

    fn text(&mut self, delta: &str, out: &mut Vec<OutEvent>) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let index = self.output_index();
            let id = self.echo.item_id("msg", index);
            self.emit(out, "response.output_item.added", json!({"output_index": index, "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
            self.emit(out, "response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
            self.open = Some(Open::Message {
                id,
                text: String::new(),
            });
        }
        let index = self.output_index();
        if let Some(Open::Message { id, text }) = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            self.emit(out, "response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}));
        }
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<OutEvent>) {
        let chat_index = call["index"].as_u64().unwrap_or(0);
        let same =
            matches!(&self.open, Some(Open::Call { chat_index: open, .. }) if *open == chat_index);
        if !same {
            self.close(out);
            let index = self.output_index();
            let name = call["function"]["name"].as_str().unwrap_or("").to_owned();
            let call_id = call["id"].as_str().unwrap_or("").to_owned();
            let item = if self.echo.custom_tools.contains(&name) {
                let id = self.echo.item_id("ctc", index);
                json!({"type": "custom_tool_call", "id": id, "status": "in_progress", "call_id": call_id, "name": name, "input": ""})
            } else {
                let id = self.echo.item_id("fc", index);
                json!({"type": "function_call", "id": id, "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""})
            };
            let item = self.echo.with_namespace(item);
            let id = item["id"].as_str().unwrap_or("").to_owned();
            self.emit(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.open = Some(Open::Call {
                id,
                call_id,
                name,
                arguments: String::new(),
                chat_index,
            });
        }
        let index = self.output_index();
        let delta = call["function"]["arguments"].as_str().unwrap_or("");
        let custom = matches!(&self.open, Some(Open::Call { name, .. }) if self.echo.custom_tools.contains(name));
        if let Some(Open::Call { id, arguments, .. }) = &mut self.open
            && !delta.is_empty()
        {
            arguments.push_str(delta);
            let id = id.clone();
            // A custom tool's input is only known whole (it arrives inside JSON arguments).
            if !custom {
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": index, "delta": delta}),
                );
            }
        }
    }

    /// The end: every item closed, then `response.completed` or `response.incomplete`.
    fn end(&mut self, out: &mut Vec<OutEvent>) {
        if self.done {
            return;
        }
        self.start(out);
        self.close(out);
        self.done = true;
        let (status, incomplete) = status_of(self.finish_reason.as_deref());
        let mut response = self
            .echo
            .response(status, self.output.clone(), Some(&self.usage));
        response["incomplete_details"] = incomplete;
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.emit(out, kind, json!({"response": response.clone()}));
        self.result = Some(response);
    }
}

impl StreamTranslator for ChatToResponsesStream {
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
        self.start(out);
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object())
            && let Ok(usage) = serde_json::from_value::<crate::openai::OpenAiUsage>(usage.clone())
        {
            self.usage.merge_max(&Usage::from(&usage));
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
            self.reasoning(reasoning, out);
        }
        if let Some(text) = delta["content"].as_str().filter(|text| !text.is_empty()) {
            self.text(text, out);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for call in calls {
                self.tool_call(call, out);
            }
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_owned());
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<OutEvent>) {
        // An upstream that said why it finished but not `[DONE]` still finished.
        if self.finish_reason.is_some() {
            self.end(out);
        }
    }

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.done
    }

    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<OutEvent>) -> bool {
        if self.done {
            return false;
        }
        self.start(out);
        self.done = true;
        self.emit(
            out,
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        let mut response = self
            .echo
            .response("failed", self.output.clone(), Some(&self.usage));
        response["error"] = json!({"code": "server_error", "message": message});
        self.emit(out, "response.failed", json!({"response": response}));
        true
    }

    fn take_result(&mut self) -> Option<Value> {
        self.result.take()
    }
}

// ---------------------------------------------------------------------------------------------
// Native: a Responses upstream answering a Responses client

/// Put Skein's response id on a response object from the upstream; read its usage.
pub fn rename_response(response: &mut Value, id: &str, previous: Option<&str>) -> Usage {
    if let Some(object) = response.as_object_mut() {
        object.insert("id".to_owned(), json!(id));
        // The upstream was sent the whole conversation, not the id; the client named one.
        if let Some(previous) = previous {
            object.insert("previous_response_id".to_owned(), json!(previous));
        }
    }
    usage_of(&response["usage"])
}

/// Passes a Responses stream through, with the response's id replaced by Skein's in the
/// events that carry the whole response (`response.created`, `…completed`, …); reads usage
/// and the final response from its terminal event.
pub struct PassthroughStream {
    id: String,
    usage: Usage,
    done: bool,
    result: Option<Value>,
    previous: Option<String>,
}

impl PassthroughStream {
    pub fn new(id: String, previous: Option<String>) -> PassthroughStream {
        PassthroughStream {
            id,
            previous,
            usage: Usage::default(),
            done: false,
            result: None,
        }
    }
}

impl StreamTranslator for PassthroughStream {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        self.on_owned_event(event, data.to_owned(), out)
    }

    fn on_owned_event(
        &mut self,
        event: &str,
        data: String,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        let name = if event.is_empty() || event == "message" {
            None
        } else {
            Some(event.to_owned())
        };
        // Only the events that carry the whole response need reading; deltas pass as they are.
        if !data.contains("\"response\"") {
            out.push(OutEvent {
                event: name.map(Into::into),
                data,
            });
            return Ok(());
        }
        let mut value: Value = serde_json::from_str(&data)
            .map_err(|error| TranslateError::upstream(format!("invalid event JSON: {error}")))?;
        let kind = value["type"].as_str().unwrap_or("").to_owned();
        if let Some(response) = value.get_mut("response") {
            let usage = rename_response(response, &self.id, self.previous.as_deref());
            if matches!(
                kind.as_str(),
                "response.completed" | "response.incomplete" | "response.failed"
            ) {
                self.usage.merge_max(&usage);
                self.done = true;
                if kind != "response.failed" {
                    self.result = Some(response.clone());
                }
            }
        }
        out.push(OutEvent {
            event: Some(name.unwrap_or(kind).into()),
            data: value.to_string(),
        });
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<OutEvent>) {}

    fn usage(&self) -> Usage {
        self.usage
    }

    fn completed(&self) -> bool {
        self.done
    }

    fn take_result(&mut self) -> Option<Value> {
        self.result.take()
    }
}

/// The `input` for a Responses upstream that did not keep the conversation: the items before
/// (without their ids, which only the provider that made them knows, and without reasoning
/// that carries nothing to send back), then the request's own input.
pub fn expanded_input(history: &[Value], request: &Value) -> Value {
    let mut items: Vec<Value> = history
        .iter()
        .filter(|item| item["type"] != "reasoning" || item.get("encrypted_content").is_some())
        .map(|item| {
            let mut item = item.clone();
            if let Some(object) = item.as_object_mut() {
                object.remove("id");
            }
            item
        })
        .collect();
    match &request["input"] {
        Value::String(text) => items.push(json!({"role": "user", "content": text})),
        Value::Array(own) => items.extend(own.iter().cloned()),
        _ => {}
    }
    Value::Array(items)
}

/// The built-in tools a request offers (by type), which only OpenAI runs.
pub fn built_in_tools(request: &Value) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for tool in request["tools"].as_array().into_iter().flatten() {
        if let Some(kind) = tool["type"].as_str()
            && BUILT_IN_TOOLS.contains(&kind)
            && !found.iter().any(|seen| seen == kind)
        {
            found.push(kind.to_owned());
        }
    }
    found
}
