//! OpenAI chat stream → Responses stream.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::wire::{self, Item, Items, Members, Part};
use super::{Echo, Ending, custom_input};
use crate::error::TranslateError;
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

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
        custom: bool,
    },
}

/// Turns OpenAI chat chunks into the Responses API's events, numbered as OpenAI numbers them
/// (`sequence_number` from 0), with `response.completed` (or `response.incomplete`) carrying
/// the whole response and its usage. Chunks are read into borrowed structs and events written
/// from structs: no JSON tree is built.
pub struct ChatToResponsesStream {
    echo: Arc<Echo>,
    sequence: u64,
    started: bool,
    open: Option<Open>,
    output: Items,
    finish_reason: Option<String>,
    usage: Usage,
    done: bool,
    /// The final response object's JSON, once there is one.
    result: Option<Vec<u8>>,
    /// The bytes of the last response object written, its items left out (sizes the next).
    response_len: usize,
}

/// Push the event `kind` with the members `members` writes, numbered `sequence` (then counted
/// on).
fn push_event(
    sequence: &mut u64,
    out: &mut Vec<OutEvent>,
    kind: &'static str,
    members: impl FnOnce(&mut Members<'_>),
) {
    let data = wire::event(kind, *sequence, members);
    *sequence += 1;
    out.push(OutEvent::named(kind, wire::into_text(data)));
}

impl ChatToResponsesStream {
    pub fn new(echo: impl Into<Arc<Echo>>) -> ChatToResponsesStream {
        ChatToResponsesStream {
            echo: echo.into(),
            sequence: 0,
            started: false,
            open: None,
            output: Items::default(),
            finish_reason: None,
            usage: Usage::default(),
            done: false,
            result: None,
            response_len: 768,
        }
    }

    fn emit(
        &mut self,
        out: &mut Vec<OutEvent>,
        kind: &'static str,
        members: impl FnOnce(&mut Members<'_>),
    ) {
        push_event(&mut self.sequence, out, kind, members);
    }

    /// An event carrying the whole response, which ended so; returns the response's JSON
    /// when `keep` says it is wanted (the last one). The response is written into the event
    /// itself, which is sized from the last one written: no buffer grows on the way.
    fn emit_response(
        &mut self,
        out: &mut Vec<OutEvent>,
        kind: &'static str,
        ending: Ending<'_>,
        usage: Option<&Usage>,
        keep: bool,
    ) -> Option<Vec<u8>> {
        let mut data = Vec::with_capacity(self.response_len + self.output.json_len() + 256);
        wire::write_event_head(&mut data, kind, self.sequence);
        self.sequence += 1;
        data.extend_from_slice(b",\"response\":");
        let start = data.len();
        self.echo
            .write_response(&mut data, ending, &self.output, usage);
        let end = data.len();
        self.response_len = (end - start).saturating_sub(self.output.json_len());
        let response = keep.then(|| data[start..end].to_vec());
        data.push(b'}');
        out.push(OutEvent::named(kind, wire::into_text(data)));
        response
    }

    fn start(&mut self, out: &mut Vec<OutEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        self.emit_response(out, "response.created", Ending::IN_PROGRESS, None, false);
        self.emit_response(
            out,
            "response.in_progress",
            Ending::IN_PROGRESS,
            None,
            false,
        );
    }

    /// Close the open item, if any, with its `*.done` events.
    fn close(&mut self, out: &mut Vec<OutEvent>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.output.len();
        let echo = Arc::clone(&self.echo);
        let item_done = |this: &mut Self, out: &mut Vec<OutEvent>, item: &Item<'_>| {
            this.emit(out, "response.output_item.done", |members| {
                members
                    .number("output_index", index as u64)
                    .item("item", item);
            });
            this.output.push(item);
        };
        match &open {
            Open::Reasoning { id, text } => {
                let part = Part::SummaryText { text };
                self.emit(out, "response.reasoning_summary_text.done", |members| {
                    members
                        .str("item_id", id)
                        .number("output_index", index as u64)
                        .number("summary_index", 0)
                        .str("text", text);
                });
                self.emit(out, "response.reasoning_summary_part.done", |members| {
                    members
                        .str("item_id", id)
                        .number("output_index", index as u64)
                        .number("summary_index", 0)
                        .part("part", &part);
                });
                let summary = [part];
                item_done(
                    self,
                    out,
                    &Item::Reasoning {
                        id,
                        summary: &summary,
                    },
                );
            }
            Open::Message { id, text } => {
                let part = Part::output_text(text);
                self.emit(out, "response.output_text.done", |members| {
                    members
                        .str("item_id", id)
                        .number("output_index", index as u64)
                        .number("content_index", 0)
                        .str("text", text)
                        .raw("logprobs", "[]");
                });
                self.emit(out, "response.content_part.done", |members| {
                    members
                        .str("item_id", id)
                        .number("output_index", index as u64)
                        .number("content_index", 0)
                        .part("part", &part);
                });
                let content = [part];
                item_done(
                    self,
                    out,
                    &Item::Message {
                        id,
                        status: "completed",
                        role: "assistant",
                        content: &content,
                    },
                );
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
                custom,
                ..
            } => {
                let input = if *custom {
                    let input = custom_input(arguments);
                    self.emit(out, "response.custom_tool_call_input.delta", |members| {
                        members
                            .str("item_id", id)
                            .number("output_index", index as u64)
                            .str("delta", &input);
                    });
                    self.emit(out, "response.custom_tool_call_input.done", |members| {
                        members
                            .str("item_id", id)
                            .number("output_index", index as u64)
                            .str("input", &input);
                    });
                    input
                } else {
                    self.emit(out, "response.function_call_arguments.done", |members| {
                        members
                            .str("item_id", id)
                            .number("output_index", index as u64)
                            .str("name", name)
                            .str("arguments", arguments);
                    });
                    Cow::Borrowed("")
                };
                let item = echo.call_item(id, "completed", call_id, name, arguments, &input);
                item_done(self, out, &item);
            }
        }
    }

    fn reasoning(&mut self, delta: &str, out: &mut Vec<OutEvent>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close(out);
            let index = self.output.len();
            let id = self.echo.item_id("rs", index);
            self.emit(out, "response.output_item.added", |members| {
                members.number("output_index", index as u64).item(
                    "item",
                    &Item::Reasoning {
                        id: &id,
                        summary: &[],
                    },
                );
            });
            self.emit(out, "response.reasoning_summary_part.added", |members| {
                members
                    .str("item_id", &id)
                    .number("output_index", index as u64)
                    .number("summary_index", 0)
                    .part("part", &Part::SummaryText { text: "" });
            });
            self.open = Some(Open::Reasoning {
                id,
                text: String::new(),
            });
        }
        let index = self.output.len();
        if let Some(Open::Reasoning { id, mut text }) = self.open.take() {
            text.push_str(delta);
            self.emit(out, "response.reasoning_summary_text.delta", |members| {
                members
                    .str("item_id", &id)
                    .number("output_index", index as u64)
                    .number("summary_index", 0)
                    .str("delta", delta);
            });
            self.open = Some(Open::Reasoning { id, text });
        }
    }

    fn text(&mut self, delta: &str, out: &mut Vec<OutEvent>) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let index = self.output.len();
            let id = self.echo.item_id("msg", index);
            self.emit(out, "response.output_item.added", |members| {
                members.number("output_index", index as u64).item(
                    "item",
                    &Item::Message {
                        id: &id,
                        status: "in_progress",
                        role: "assistant",
                        content: &[],
                    },
                );
            });
            self.emit(out, "response.content_part.added", |members| {
                members
                    .str("item_id", &id)
                    .number("output_index", index as u64)
                    .number("content_index", 0)
                    .part("part", &Part::output_text(""));
            });
            self.open = Some(Open::Message {
                id,
                // Most answers fit, so the deltas are gathered without growing it.
                text: String::with_capacity(512),
            });
        }
        let index = self.output.len();
        if let Some(Open::Message { id, mut text }) = self.open.take() {
            text.push_str(delta);
            self.emit(out, "response.output_text.delta", |members| {
                members
                    .str("item_id", &id)
                    .number("output_index", index as u64)
                    .number("content_index", 0)
                    .str("delta", delta)
                    .raw("logprobs", "[]");
            });
            self.open = Some(Open::Message { id, text });
        }
    }

    fn tool_call(&mut self, call: &wire::ToolCall<'_>, out: &mut Vec<OutEvent>) {
        let chat_index = call.index.unwrap_or(0);
        let same =
            matches!(&self.open, Some(Open::Call { chat_index: open, .. }) if *open == chat_index);
        if !same {
            self.close(out);
            let index = self.output.len();
            let name = call.name().unwrap_or("").to_owned();
            let call_id = call.id.as_str().unwrap_or("").to_owned();
            let custom = self.echo.is_custom(&name);
            let id = self.echo.item_id(if custom { "ctc" } else { "fc" }, index);
            let echo = Arc::clone(&self.echo);
            let item = echo.call_item(&id, "in_progress", &call_id, &name, "", "");
            self.emit(out, "response.output_item.added", |members| {
                members
                    .number("output_index", index as u64)
                    .item("item", &item);
            });
            self.open = Some(Open::Call {
                id,
                call_id,
                name,
                arguments: String::new(),
                chat_index,
                custom,
            });
        }
        let index = self.output.len();
        let delta = call.arguments().unwrap_or("");
        if delta.is_empty() {
            return;
        }
        if let Some(Open::Call {
            id,
            arguments,
            custom,
            ..
        }) = &mut self.open
        {
            arguments.push_str(delta);
            // A custom tool's input is only known whole (it arrives inside JSON arguments).
            if !*custom {
                push_event(
                    &mut self.sequence,
                    out,
                    "response.function_call_arguments.delta",
                    |members| {
                        members
                            .str("item_id", id)
                            .number("output_index", index as u64)
                            .str("delta", delta);
                    },
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
        let ending = Ending::of_finish_reason(self.finish_reason.as_deref());
        let kind = if ending.status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        let usage = self.usage;
        self.result = self.emit_response(out, kind, ending, Some(&usage), true);
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
        let (choice, usage) = wire::read_answer::<wire::ChunkChoice<'_>>(data)
            .map_err(|error| TranslateError::upstream(format!("invalid chunk JSON: {error}")))?;
        self.start(out);
        if let Some(usage) = usage {
            self.usage.merge_max(&usage);
        }
        let Some(choice) = choice else {
            return Ok(());
        };
        if let Some(delta) = &choice.delta {
            if let Some(reasoning) = delta.reasoning() {
                self.reasoning(reasoning, out);
            }
            if let wire::Content::Text(text) = &delta.content
                && !text.is_empty()
            {
                self.text(text, out);
            }
            for call in delta.tool_calls.iter().flatten() {
                self.tool_call(call, out);
            }
        }
        if let Some(reason) = choice.finish_reason.as_str() {
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
        self.emit(out, "error", |members| {
            members
                .str("code", code)
                .str("message", message)
                .raw("param", "null");
        });
        let ending = Ending {
            status: "failed",
            incomplete: None,
            error: Some(message),
        };
        let usage = self.usage;
        self.emit_response(out, "response.failed", ending, Some(&usage), false);
        true
    }

    fn take_result(&mut self) -> Option<Box<RawValue>> {
        let response = self.result.take()?;
        RawValue::from_string(wire::into_text(response)).ok()
    }
}
