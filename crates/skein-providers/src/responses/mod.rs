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

use std::borrow::Cow;

use serde_json::{Map, Value, json};

mod native;
mod stream;
mod wire;

pub use native::{PassthroughStream, built_in_tools, expanded_input, rename_response};
pub use stream::ChatToResponsesStream;

use crate::error::TranslateError;
use crate::raw::RawObject;
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
/// client asked for, and the request's settings (OpenAI echoes them in each response), written
/// as JSON once, when the call begins.
#[derive(Debug, Clone)]
pub struct Echo {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    /// The echoed settings as JSON members (`"instructions":null,"metadata":{},…`).
    settings: String,
    previous_response_id: Option<String>,
    /// Names of the request's custom (freeform) tools, whose calls are `custom_tool_call`s.
    custom_tools: Vec<String>,
    /// Tools offered inside a `namespace` tool: (tool, namespace). Their calls name it.
    namespaces: Vec<(String, String)>,
    /// The built-in tools offered (by type), which only OpenAI runs.
    built_in: Vec<String>,
}

/// The members of a request that a response echoes, with their JSON when absent.
const ECHOED: &[(&str, &str)] = &[
    ("instructions", "null"),
    ("max_output_tokens", "null"),
    ("metadata", "{}"),
    ("parallel_tool_calls", "true"),
    ("previous_response_id", "null"),
    ("prompt_cache_key", "null"),
    ("reasoning", r#"{"effort":null,"summary":null}"#),
    ("service_tier", r#""default""#),
    ("store", "true"),
    ("temperature", "1.0"),
    ("text", r#"{"format":{"type":"text"}}"#),
    ("tool_choice", r#""auto""#),
    ("tools", "[]"),
    ("top_p", "1.0"),
    ("truncation", r#""disabled""#),
    ("user", "null"),
];

/// How a response ended, for its object: `status`, and why when it did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending<'a> {
    pub status: &'a str,
    /// `incomplete_details.reason`.
    pub incomplete: Option<&'a str>,
    /// `error.message` (a failed response).
    pub error: Option<&'a str>,
}

impl Ending<'static> {
    pub const IN_PROGRESS: Ending<'static> = Ending {
        status: "in_progress",
        incomplete: None,
        error: None,
    };

    /// The ending a chat finish reason means.
    pub fn of_finish_reason(finish_reason: Option<&str>) -> Ending<'static> {
        let incomplete = match finish_reason {
            Some("length") => Some("max_output_tokens"),
            Some("content_filter") => Some("content_filter"),
            _ => None,
        };
        Ending {
            status: if incomplete.is_some() {
                "incomplete"
            } else {
                "completed"
            },
            incomplete,
            error: None,
        }
    }
}

impl Echo {
    /// Read what to echo from a request tree.
    pub fn from_request(request: &Value, id: String, model: &str, created_at: u64) -> Echo {
        Echo::build(
            |name| match request.get(name) {
                Some(Value::Null) | None => None,
                Some(value) => Some(Cow::Owned(value.to_string())),
            },
            request.get("tools"),
            request["previous_response_id"].as_str().map(str::to_owned),
            id,
            model,
            created_at,
        )
    }

    /// Read what to echo from a request's members as they were sent (only its tools, when it
    /// has some, are read into a tree).
    pub fn from_raw(
        request: &RawObject<'_>,
        id: String,
        model: &str,
        created_at: u64,
    ) -> Result<Echo, TranslateError> {
        let tools = member_tree(request, "tools").map_err(TranslateError::Client)?;
        let previous = request
            .get_str("previous_response_id")
            .map_err(TranslateError::Client)?
            .map(Cow::into_owned);
        Ok(Echo::build(
            |name| member(request, name).map(Cow::Borrowed),
            tools.as_ref(),
            previous,
            id,
            model,
            created_at,
        ))
    }

    fn build<'a>(
        member: impl Fn(&str) -> Option<Cow<'a, str>>,
        tools: Option<&Value>,
        previous_response_id: Option<String>,
        id: String,
        model: &str,
        created_at: u64,
    ) -> Echo {
        let mut settings = String::with_capacity(512);
        for (index, (name, default)) in ECHOED.iter().enumerate() {
            if index > 0 {
                settings.push(',');
            }
            settings.push('"');
            settings.push_str(name);
            settings.push_str("\":");
            match member(name) {
                Some(value) => settings.push_str(&value),
                None => settings.push_str(default),
            }
        }
        let mut custom_tools = Vec::new();
        let mut namespaces = Vec::new();
        for tool in tools.and_then(Value::as_array).into_iter().flatten() {
            let inner: Vec<&Value> = if tool["type"] == "namespace" {
                tool["tools"].as_array().into_iter().flatten().collect()
            } else {
                vec![tool]
            };
            for member in inner {
                let Some(name) = member["name"].as_str() else {
                    continue;
                };
                if member["type"] == "custom" && !custom_tools.iter().any(|seen| seen == name) {
                    custom_tools.push(name.to_owned());
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
            previous_response_id,
            custom_tools,
            namespaces,
            built_in: native::built_in_of(tools),
        }
    }

    /// Write a response object that ended so, with `output` and `usage` (null while in
    /// progress).
    pub(crate) fn write_response(
        &self,
        out: &mut Vec<u8>,
        ending: Ending<'_>,
        output: &wire::Items,
        usage: Option<&Usage>,
    ) {
        out.extend_from_slice(b"{\"id\":");
        wire::write_str(out, &self.id);
        out.extend_from_slice(b",\"object\":\"response\",\"created_at\":");
        wire::write_u64(out, self.created_at);
        out.extend_from_slice(b",\"status\":");
        wire::write_str(out, ending.status);
        out.extend_from_slice(b",\"background\":false,\"error\":");
        match ending.error {
            Some(message) => {
                out.extend_from_slice(b"{\"code\":\"server_error\",\"message\":");
                wire::write_str(out, message);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"incomplete_details\":");
        match ending.incomplete {
            Some(reason) => {
                out.extend_from_slice(b"{\"reason\":");
                wire::write_str(out, reason);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"model\":");
        wire::write_str(out, &self.model);
        out.extend_from_slice(b",\"output\":");
        output.write_array(out);
        out.push(b',');
        out.extend_from_slice(self.settings.as_bytes());
        out.extend_from_slice(b",\"usage\":");
        match usage {
            Some(usage) => wire::write_usage(out, usage),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// The `previous_response_id` the request named.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.previous_response_id.as_deref()
    }

    /// The built-in tools the request offers (by type), which only OpenAI runs.
    pub fn built_in_tools(&self) -> &[String] {
        &self.built_in
    }

    fn is_custom(&self, tool: &str) -> bool {
        self.custom_tools.iter().any(|name| name == tool)
    }

    /// The namespace a tool was offered in, if any.
    fn namespace_of(&self, tool: &str) -> Option<&str> {
        self.namespaces
            .iter()
            .find(|(name, _)| name == tool)
            .map(|(_, namespace)| namespace.as_str())
    }

    /// An item id derived from the response id (`msg_…`, `fc_…`), unique within the response.
    fn item_id(&self, prefix: &str, index: usize) -> String {
        let stem = self.id.strip_prefix("resp_").unwrap_or(&self.id);
        let mut id = String::with_capacity(prefix.len() + 1 + stem.len() + 2);
        id.push_str(prefix);
        id.push('_');
        id.push_str(stem);
        if index > 0xff {
            return format!("{prefix}_{stem}{index:02x}");
        }
        skein_types::push_hex(&mut id, index as u64, 2);
        id
    }

    /// A tool call as an output item: `custom_tool_call` for a custom tool (its `input` then
    /// the freeform text it was called with), with its tool's namespace when it has one.
    fn call_item<'a>(
        &'a self,
        id: &'a str,
        status: &'a str,
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
        custom_input: &'a str,
    ) -> wire::Item<'a> {
        let namespace = self.namespace_of(name);
        if self.is_custom(name) {
            wire::Item::CustomToolCall {
                id,
                status,
                call_id,
                name,
                input: custom_input,
                namespace,
            }
        } else {
            wire::Item::FunctionCall {
                id,
                status,
                call_id,
                name,
                arguments,
                namespace,
            }
        }
    }
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
    items_of(&request["input"], id_stem)
}

/// [`input_items`] of a request read member by member (only its `input` is read into a tree).
pub fn input_items_raw(
    request: &RawObject<'_>,
    id_stem: &str,
) -> Result<Vec<Value>, TranslateError> {
    let input = member_tree(request, "input").map_err(TranslateError::Client)?;
    items_of(input.as_ref().unwrap_or(&Value::Null), id_stem)
}

fn items_of(input: &Value, id_stem: &str) -> Result<Vec<Value>, TranslateError> {
    let mut items = match input {
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
    /// The chat request's JSON.
    pub body: Vec<u8>,
    /// Built-in tools left out, by type.
    pub dropped: Vec<String>,
}

impl ChatRequest {
    /// The request as a JSON tree (for translations that go on from chat).
    pub fn tree(&self) -> Result<Value, TranslateError> {
        serde_json::from_slice(&self.body).map_err(|error| {
            TranslateError::client(format!("the translated request is not JSON: {error}"))
        })
    }
}

/// What a chat request for one target needs besides the Responses request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatTarget<'a> {
    /// The model the chat request names.
    pub model: &'a str,
    /// `max_completion_tokens` (OpenAI and Azure) rather than `max_tokens`.
    pub max_completion_tokens: bool,
    /// The target runs a web search of its own (Anthropic, Gemini): a `web_search` tool then
    /// becomes chat's `web_search_options`, which their translations turn into their own
    /// search tool; otherwise it is left out (and named in [`ChatRequest::dropped`]).
    pub web_search: bool,
    /// The most output tokens the model can produce: a larger `max_output_tokens` is lowered
    /// to it.
    pub output_limit: Option<u64>,
    /// Write `output_limit` as the limit when the request sets none.
    pub fill_limit: bool,
}

/// Translate a Responses request into an OpenAI chat request for `target`. `history` holds
/// the items of the conversation before it (from `previous_response_id`), oldest first.
///
/// The chat JSON is written from the request's members as they were sent: text (the
/// instructions, a string `input`, sampling settings) is copied without being decoded and
/// encoded again, and only the members that must be reshaped (input items, tools) are read
/// into trees.
pub fn request_to_chat(
    request: &RawObject<'_>,
    history: &[Value],
    target: ChatTarget<'_>,
) -> Result<ChatRequest, TranslateError> {
    request_to_chat_text(request, history, target).map_err(TranslateError::Client)
}

/// A member's JSON, unless it is absent or `null`.
fn member<'a>(request: &RawObject<'a>, name: &str) -> Option<&'a str> {
    request
        .get(name)
        .map(|value| value.get())
        .filter(|text| *text != "null")
}

/// A member read as a tree, unless it is absent or `null`.
fn member_tree(request: &RawObject<'_>, name: &str) -> Result<Option<Value>, String> {
    member(request, name)
        .map(|text| serde_json::from_str(text).map_err(|error| format!("`{name}`: {error}")))
        .transpose()
}

fn request_to_chat_text(
    request: &RawObject<'_>,
    history: &[Value],
    target: ChatTarget<'_>,
) -> Result<ChatRequest, String> {
    let mut out = Vec::with_capacity(256 + request.json_len());
    out.extend_from_slice(b"{\"model\":");
    wire::write_str(&mut out, target.model);
    out.extend_from_slice(b",\"messages\":[");
    let mut written = 0usize;
    match member(request, "instructions") {
        None | Some("\"\"") => {}
        Some(text) if text.starts_with('"') => {
            out.extend_from_slice(b"{\"role\":\"system\",\"content\":");
            out.extend_from_slice(text.as_bytes());
            out.push(b'}');
            written += 1;
        }
        Some(_) => return Err("`instructions` must be a string".to_owned()),
    }
    // History and input items become messages as trees (calls of one turn merge into one
    // assistant message); a string `input` is copied as it came.
    let mut messages: Vec<Value> = Vec::new();
    for (index, item) in history.iter().enumerate() {
        push_item(&mut messages, item, index)?;
    }
    let mut user_text = None;
    match member(request, "input") {
        None => {}
        Some(text) if text.starts_with('"') => user_text = Some(text),
        Some(text) if text.starts_with('[') => {
            let items: Vec<Value> = serde_json::from_str(text)
                .map_err(|error| format!("`input` is not a list of items: {error}"))?;
            for (offset, item) in items.iter().enumerate() {
                let index = history.len() + offset;
                if !item.is_object() {
                    return Err(format!("input[{offset}] must be an object"));
                }
                push_item(&mut messages, item, index)?;
            }
        }
        Some(_) => return Err("`input` must be a string or an array of input items".to_owned()),
    }
    for message in &messages {
        if written > 0 {
            out.push(b',');
        }
        wire::write_json(&mut out, message);
        written += 1;
    }
    if let Some(text) = user_text {
        if written > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"role\":\"user\",\"content\":");
        out.extend_from_slice(text.as_bytes());
        out.push(b'}');
        written += 1;
    }
    if written == 0 {
        return Err("`input` is required".to_owned());
    }
    out.push(b']');
    let mut dropped = Vec::new();
    if let Some(tools) = member_tree(request, "tools")? {
        let tools = tools.as_array().ok_or("`tools` must be an array")?;
        let mut functions = Vec::new();
        let mut web_search_options = None;
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
                kind if target.web_search && kind.starts_with("web_search") => {
                    let mut options = Map::new();
                    if let Some(size) = tool.get("search_context_size") {
                        options.insert("search_context_size".to_owned(), size.clone());
                    }
                    web_search_options = Some(Value::Object(options));
                }
                kind if BUILT_IN_TOOLS.contains(&kind) => {
                    if !dropped.iter().any(|seen: &String| seen == kind) {
                        dropped.push(kind.to_owned());
                    }
                }
                other => return Err(format!("tools[{index}].type `{other}` is not supported")),
            }
        }
        if let Some(options) = web_search_options {
            out.extend_from_slice(b",\"web_search_options\":");
            wire::write_json(&mut out, &options);
        }
        if !functions.is_empty() {
            out.extend_from_slice(b",\"tools\":");
            wire::write_json(&mut out, &functions);
            if let Some(choice) = member_tree(request, "tool_choice")? {
                out.extend_from_slice(b",\"tool_choice\":");
                wire::write_json(&mut out, &tool_choice(&choice)?);
            }
            if let Some(parallel) =
                member(request, "parallel_tool_calls").filter(|v| matches!(*v, "true" | "false"))
            {
                out.extend_from_slice(b",\"parallel_tool_calls\":");
                out.extend_from_slice(parallel.as_bytes());
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
        if let Some(value) = member(request, name) {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(value.as_bytes());
        }
    }
    let asked = match member(request, "max_output_tokens") {
        Some(limit) => Some(
            limit
                .parse::<u64>()
                .map_err(|_| "`max_output_tokens` must be a positive integer")?,
        ),
        None => target.output_limit.filter(|_| target.fill_limit),
    };
    if let Some(limit) = asked {
        let limit = target.output_limit.map_or(limit, |most| limit.min(most));
        out.extend_from_slice(if target.max_completion_tokens {
            b",\"max_completion_tokens\":"
        } else {
            b",\"max_tokens\":"
        });
        wire::write_u64(&mut out, limit);
    }
    if let Some(reasoning) = member_tree(request, "reasoning")?
        && let Some(effort) = reasoning["effort"]
            .as_str()
            .filter(|effort| *effort != "none")
    {
        out.extend_from_slice(b",\"reasoning_effort\":");
        wire::write_str(&mut out, effort);
    }
    if let Some(text) = member_tree(request, "text")? {
        let format = &text["format"];
        match format["type"].as_str() {
            _ if format.is_null() => {}
            Some("text") | None => {}
            Some("json_object") => {
                out.extend_from_slice(b",\"response_format\":{\"type\":\"json_object\"}");
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
                out.extend_from_slice(b",\"response_format\":");
                wire::write_json(
                    &mut out,
                    &json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            Some(other) => return Err(format!("text.format.type `{other}` is not supported")),
        }
    }
    if member(request, "stream") == Some("true") {
        out.extend_from_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    }
    out.push(b'}');
    Ok(ChatRequest { body: out, dropped })
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

/// Translate an OpenAI chat completion into a response object's JSON. The answer is read
/// into borrowed structs and the response written straight from them: no JSON tree is built.
pub fn response_from_chat(body: &[u8], echo: &Echo) -> Result<(Vec<u8>, Usage), TranslateError> {
    let (choice, usage) = wire::read_answer::<wire::Choice<'_>>(body).map_err(|error| {
        TranslateError::upstream(format!(
            "the provider's answer is not a chat completion: {error}"
        ))
    })?;
    let Some(choice) = choice else {
        return Err(TranslateError::upstream(
            "the provider's answer has no choices",
        ));
    };
    let usage = usage.unwrap_or_default();
    let empty = wire::Message::default();
    let message = choice.message.as_ref().unwrap_or(&empty);
    // The items hold about what the answer's message does, plus their ids.
    let mut output = wire::Items::with_capacity(body.len() + 128);
    if let Some(reasoning) = message.reasoning() {
        let id = echo.item_id("rs", output.len());
        output.push(&wire::Item::Reasoning {
            id: &id,
            summary: &[wire::Part::SummaryText { text: reasoning }],
        });
    }
    let joined;
    let text = match &message.content {
        wire::Content::Text(text) => text.as_ref(),
        wire::Content::Parts(parts) => {
            joined = joined_text(parts);
            joined.as_str()
        }
        wire::Content::None => "",
    };
    let part = match message.refusal.non_empty() {
        Some(refusal) => Some(wire::Part::Refusal { refusal }),
        None if !text.is_empty() => Some(wire::Part::output_text(text)),
        None => None,
    };
    if let Some(part) = part {
        let id = echo.item_id("msg", output.len());
        output.push(&wire::Item::Message {
            id: &id,
            status: "completed",
            role: "assistant",
            content: std::slice::from_ref(&part),
        });
    }
    for call in message.tool_calls.iter().flatten() {
        let name = call.name().unwrap_or("");
        let arguments = call.arguments().unwrap_or("{}");
        let prefix = if echo.is_custom(name) { "ctc" } else { "fc" };
        let id = echo.item_id(prefix, output.len());
        let input = if prefix == "ctc" {
            custom_input(arguments)
        } else {
            Cow::Borrowed("")
        };
        output.push(&echo.call_item(
            &id,
            "completed",
            call.id.as_str().unwrap_or(""),
            name,
            arguments,
            &input,
        ));
    }
    let ending = Ending::of_finish_reason(choice.finish_reason.as_str());
    let mut response = Vec::with_capacity(1024 + body.len());
    echo.write_response(&mut response, ending, &output, Some(&usage));
    Ok((response, usage))
}

/// The freeform input of a custom tool's call, from the `{"input": …}` arguments it was
/// called with (the arguments as they are if they are not that).
fn custom_input(arguments: &str) -> Cow<'_, str> {
    #[derive(serde::Deserialize)]
    struct Arguments<'a> {
        #[serde(borrow)]
        input: wire::Text<'a>,
    }
    if !arguments.trim_start().starts_with('{') {
        return Cow::Borrowed(arguments);
    }
    match serde_json::from_str::<Arguments<'_>>(arguments) {
        Ok(Arguments {
            input: wire::Text(Some(input)),
        }) => input,
        _ => Cow::Borrowed(arguments),
    }
}
