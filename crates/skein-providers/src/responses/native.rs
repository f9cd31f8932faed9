//! Native: a Responses upstream answering a Responses client.

use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{BUILT_IN_TOOLS, usage_of};
use crate::error::TranslateError;
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

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

    fn take_result(&mut self) -> Option<Box<RawValue>> {
        serde_json::value::to_raw_value(&self.result.take()?).ok()
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
    built_in_of(request.get("tools"))
}

/// The built-in tools among `tools` (a request's `tools` member), by type.
pub(super) fn built_in_of(tools: Option<&Value>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for tool in tools.and_then(Value::as_array).into_iter().flatten() {
        if let Some(kind) = tool["type"].as_str()
            && BUILT_IN_TOOLS.contains(&kind)
            && !found.iter().any(|seen| seen == kind)
        {
            found.push(kind.to_owned());
        }
    }
    found
}
