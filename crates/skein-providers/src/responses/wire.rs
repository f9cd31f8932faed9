//! The JSON a translated Responses answer is read from and written to, without building a
//! `serde_json::Value` tree on the way: OpenAI chat answers and chunks are read into borrowed
//! structs, and the Responses objects (items, the response, events) are written from structs
//! straight into bytes. A response's echoed settings are written once per call (see
//! [`super::Echo`]) and copied into every response object after.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::usage::Usage;

// ---------------------------------------------------------------------------------------------
// Reading OpenAI chat

/// A member read as text when it is a string. Anything else (null, a number, an object) is
/// tolerated and reads as no text, as the tree-walking translations read it: an upstream's odd
/// member is not worth failing an answer for.
#[derive(Debug, Default)]
pub(crate) struct Text<'a>(pub Option<Cow<'a, str>>);

impl Text<'_> {
    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The text, when there is some.
    pub fn non_empty(&self) -> Option<&str> {
        self.as_str().filter(|text| !text.is_empty())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text<'a>, D::Error> {
        deserializer.deserialize_any(Lenient::<Text<'a>>(PhantomData))
    }
}

/// A message's `content`: text, or content parts (joined as text where read).
#[derive(Debug, Default)]
pub(crate) enum Content<'a> {
    #[default]
    None,
    Text(Cow<'a, str>),
    Parts(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Content<'a>, D::Error> {
        deserializer.deserialize_any(Lenient::<Content<'a>>(PhantomData))
    }
}

/// What [`Lenient`] builds: text from a string, and whatever else the type keeps of the rest.
trait FromLenient<'a>: Sized {
    fn text(text: Cow<'a, str>) -> Self;
    fn nothing() -> Self;
    fn parts<'de, A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        skip_seq(seq).map(|()| Self::nothing())
    }
}

impl<'a> FromLenient<'a> for Text<'a> {
    fn text(text: Cow<'a, str>) -> Text<'a> {
        Text(Some(text))
    }
    fn nothing() -> Text<'a> {
        Text(None)
    }
}

impl<'a> FromLenient<'a> for Content<'a> {
    fn text(text: Cow<'a, str>) -> Content<'a> {
        Content::Text(text)
    }
    fn nothing() -> Content<'a> {
        Content::None
    }
    fn parts<'de, A: SeqAccess<'de>>(seq: A) -> Result<Content<'a>, A::Error> {
        let parts = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Content::Parts(parts))
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

struct Lenient<T>(PhantomData<T>);

impl<'de: 'a, 'a, T: FromLenient<'a>> Visitor<'de> for Lenient<T> {
    type Value = T;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<T, E> {
        Ok(T::text(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        Ok(T::text(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<T, E> {
        Ok(T::text(Cow::Owned(text)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::nothing())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::parts(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(T::nothing())
    }
}

/// An OpenAI chat completion or stream chunk, as far as a response needs it: its first choice
/// (`C`: [`Choice`] or [`ChunkChoice`]; a response has one, and the others are skipped unread)
/// and its `usage`, read as `U`: typed at once ([`OpenAiUsage`]), or kept raw when that failed
/// (see [`read_answer`]).
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de>, U: Deserialize<'de> + Default"))]
struct Answer<C, U> {
    #[serde(default = "none")]
    choices: Option<First<C>>,
    #[serde(default)]
    usage: U,
}

/// The first element of an array, the rest skipped (no `Vec` is made for one choice).
#[derive(Debug)]
struct First<C>(Option<C>);

impl<'de, C: Deserialize<'de>> Deserialize<'de> for First<C> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<First<C>, D::Error> {
        struct FirstVisitor<C>(PhantomData<C>);
        impl<'de, C: Deserialize<'de>> Visitor<'de> for FirstVisitor<C> {
            type Value = First<C>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<C>, A::Error> {
                let first = seq.next_element::<C>()?;
                skip_seq(seq)?;
                Ok(First(first))
            }
        }
        deserializer.deserialize_seq(FirstVisitor(PhantomData))
    }
}

fn none<T>() -> Option<T> {
    None
}

type OpenAiUsage = crate::openai::OpenAiUsage;

/// JSON text to read from: bytes (checked for UTF-8 as they are read) or a `str` (already
/// checked, so its strings are borrowed without a second look).
pub(crate) trait Input<'a>: Copy {
    fn read<T: Deserialize<'a>>(self) -> serde_json::Result<T>;
}

impl<'a> Input<'a> for &'a [u8] {
    fn read<T: Deserialize<'a>>(self) -> serde_json::Result<T> {
        serde_json::from_slice(self)
    }
}

impl<'a> Input<'a> for &'a str {
    fn read<T: Deserialize<'a>>(self) -> serde_json::Result<T> {
        serde_json::from_str(self)
    }
}

/// Read a completion (or chunk): its first choice and its usage, in one pass; an odd `usage`
/// (a member of the wrong type) costs a second pass that reads it leniently, rather than
/// failing the answer. `None` for a missing, null or empty `choices`.
pub(crate) fn read_answer<'a, C: Deserialize<'a>>(
    body: impl Input<'a>,
) -> Result<(Option<C>, Option<Usage>), serde_json::Error> {
    match body.read::<Answer<C, Option<OpenAiUsage>>>() {
        Ok(answer) => Ok((
            answer.choices.and_then(|first| first.0),
            answer.usage.map(|usage| Usage::from(&usage)),
        )),
        Err(_) => {
            let answer: Answer<C, Option<&RawValue>> = body.read()?;
            Ok((
                answer.choices.and_then(|first| first.0),
                chat_usage(answer.usage),
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Choice<'a> {
    #[serde(borrow, default)]
    pub message: Option<Message<'a>>,
    #[serde(borrow, default)]
    pub finish_reason: Text<'a>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Message<'a> {
    #[serde(borrow, default)]
    pub content: Content<'a>,
    #[serde(borrow, default)]
    pub reasoning_content: Text<'a>,
    #[serde(borrow, default)]
    pub reasoning: Text<'a>,
    #[serde(borrow, default)]
    pub refusal: Text<'a>,
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
}

impl Message<'_> {
    /// Its reasoning, under either name upstreams give it.
    pub fn reasoning(&self) -> Option<&str> {
        self.reasoning_content
            .non_empty()
            .or(self.reasoning.non_empty())
    }
}

/// A tool call, whole (in a completion) or in pieces (in a chunk's delta).
#[derive(Debug, Deserialize)]
pub(crate) struct ToolCall<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(borrow, default)]
    pub id: Text<'a>,
    #[serde(borrow, default)]
    pub function: Option<Function<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Function<'a> {
    #[serde(borrow, default)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub arguments: Text<'a>,
}

impl ToolCall<'_> {
    pub fn name(&self) -> Option<&str> {
        self.function
            .as_ref()
            .and_then(|function| function.name.as_str())
    }
    pub fn arguments(&self) -> Option<&str> {
        self.function
            .as_ref()
            .and_then(|function| function.arguments.as_str())
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    pub delta: Option<Message<'a>>,
    #[serde(borrow, default)]
    pub finish_reason: Text<'a>,
}

/// An OpenAI `usage` object, read where it is one (an odd one counts as none).
pub(crate) fn chat_usage(usage: Option<&RawValue>) -> Option<Usage> {
    let usage = usage.filter(|usage| usage.get().starts_with('{'))?;
    serde_json::from_str::<OpenAiUsage>(usage.get())
        .ok()
        .map(|usage| Usage::from(&usage))
}

// ---------------------------------------------------------------------------------------------
// Writing the Responses API

/// A content part of an output item.
// Written by hand (`write_to`); what serde writes is the reference the tests hold it to.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Part<'a> {
    SummaryText {
        text: &'a str,
    },
    OutputText {
        text: &'a str,
        annotations: [(); 0],
        logprobs: [(); 0],
    },
    Refusal {
        refusal: &'a str,
    },
}

impl<'a> Part<'a> {
    pub fn output_text(text: &'a str) -> Part<'a> {
        Part::OutputText {
            text,
            annotations: [],
            logprobs: [],
        }
    }
}

/// An output item.
// Written by hand (`write_to`); what serde writes is the reference the tests hold it to.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Item<'a> {
    Reasoning {
        id: &'a str,
        summary: &'a [Part<'a>],
    },
    Message {
        id: &'a str,
        status: &'a str,
        role: &'static str,
        content: &'a [Part<'a>],
    },
    FunctionCall {
        id: &'a str,
        status: &'a str,
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<&'a str>,
    },
    CustomToolCall {
        id: &'a str,
        status: &'a str,
        call_id: &'a str,
        name: &'a str,
        input: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<&'a str>,
    },
}

impl Part<'_> {
    /// Write the part's JSON: what its `Serialize` writes, without serde's visit of each field.
    fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Part::SummaryText { text } => {
                out.extend_from_slice(b"{\"type\":\"summary_text\",\"text\":");
                write_str(out, text);
                out.push(b'}');
            }
            Part::OutputText { text, .. } => {
                out.extend_from_slice(b"{\"type\":\"output_text\",\"text\":");
                write_str(out, text);
                out.extend_from_slice(b",\"annotations\":[],\"logprobs\":[]}");
            }
            Part::Refusal { refusal } => {
                out.extend_from_slice(b"{\"type\":\"refusal\",\"refusal\":");
                write_str(out, refusal);
                out.push(b'}');
            }
        }
    }
}

fn write_parts(out: &mut Vec<u8>, parts: &[Part<'_>]) {
    out.push(b'[');
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        part.write_to(out);
    }
    out.push(b']');
}

impl Item<'_> {
    /// Write the item's JSON: what its `Serialize` writes (a test holds them equal), without
    /// serde's visit of each field. A unary response is written this way.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let member = |out: &mut Vec<u8>, name: &[u8], value: &str| {
            out.extend_from_slice(name);
            write_str(out, value);
        };
        match self {
            Item::Reasoning { id, summary } => {
                member(out, b"{\"type\":\"reasoning\",\"id\":", id);
                out.extend_from_slice(b",\"summary\":");
                write_parts(out, summary);
            }
            Item::Message {
                id,
                status,
                role,
                content,
            } => {
                member(out, b"{\"type\":\"message\",\"id\":", id);
                member(out, b",\"status\":", status);
                member(out, b",\"role\":", role);
                out.extend_from_slice(b",\"content\":");
                write_parts(out, content);
            }
            Item::FunctionCall {
                id,
                status,
                call_id,
                name,
                arguments,
                namespace,
            } => {
                let call = [
                    ("call_id", *call_id),
                    ("name", *name),
                    ("arguments", *arguments),
                ];
                write_call(out, b"function_call", id, status, &call, *namespace);
            }
            Item::CustomToolCall {
                id,
                status,
                call_id,
                name,
                input,
                namespace,
            } => {
                let call = [("call_id", *call_id), ("name", *name), ("input", *input)];
                write_call(out, b"custom_tool_call", id, status, &call, *namespace);
            }
        }
        out.push(b'}');
    }
}

/// A tool call item's members after `type`, `id` and `status` (the two kinds differ in one).
fn write_call(
    out: &mut Vec<u8>,
    kind: &[u8],
    id: &str,
    status: &str,
    members: &[(&str, &str)],
    namespace: Option<&str>,
) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind);
    out.extend_from_slice(b"\",\"id\":");
    write_str(out, id);
    out.extend_from_slice(b",\"status\":");
    write_str(out, status);
    for (name, value) in members
        .iter()
        .copied()
        .chain(namespace.map(|ns| ("namespace", ns)))
    {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        write_str(out, value);
    }
}

/// A response's output items, written as they are made.
#[derive(Debug, Default, Clone)]
pub(crate) struct Items {
    /// The items' JSON, comma-separated.
    json: Vec<u8>,
    count: usize,
}

impl Items {
    /// Room for about `bytes` of items' JSON, so that writing them does not grow it step by step.
    pub fn with_capacity(bytes: usize) -> Items {
        Items {
            json: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// The bytes of their JSON.
    pub fn json_len(&self) -> usize {
        self.json.len()
    }

    pub fn push(&mut self, item: &Item<'_>) {
        if self.count > 0 {
            self.json.push(b',');
        }
        item.write_to(&mut self.json);
        self.count += 1;
    }

    /// Write them as a JSON array.
    pub fn write_array(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(&self.json);
        out.push(b']');
    }
}

/// Write the Responses API's `usage` object.
pub(crate) fn write_usage(out: &mut Vec<u8>, usage: &Usage) {
    let mut number = |name: &[u8], value: u64| {
        out.extend_from_slice(name);
        write_u64(out, value);
    };
    number(b"{\"input_tokens\":", usage.input_tokens);
    number(
        b",\"input_tokens_details\":{\"cached_tokens\":",
        usage.cached_input_tokens,
    );
    number(b"},\"output_tokens\":", usage.output_tokens);
    number(
        b",\"output_tokens_details\":{\"reasoning_tokens\":",
        usage.reasoning_tokens,
    );
    number(
        b"},\"total_tokens\":",
        usage.input_tokens + usage.output_tokens,
    );
    out.push(b'}');
}

/// Write `value`'s JSON to `out`. Writing to a `Vec` fails only for a map with keys that are
/// not strings, which none of these types has.
pub(crate) fn write_json(out: &mut Vec<u8>, value: &impl Serialize) {
    if let Err(error) = serde_json::to_writer(&mut *out, value) {
        debug_assert!(false, "unwritable JSON: {error}");
    }
}

/// Write a JSON string: copied as it is when nothing in it needs escaping (the ids and names
/// Skein writes on every response, and most text), else through `serde_json`.
pub(crate) fn write_str(out: &mut Vec<u8>, text: &str) {
    if needs_escape(text.as_bytes()) {
        write_json(out, &text);
    } else {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// Whether a JSON string of `bytes` needs an escape: a quote, a backslash or a control
/// character (what `serde_json` escapes; other bytes, UTF-8 included, are written as they are).
/// Eight bytes are looked at in one step: a word has a byte below `n` exactly when
/// `(word - n·0x01…) & !word & 0x80…` is not zero, and a byte equal to `c` when `word ^ c·0x01…`
/// has a byte below 1.
pub(crate) fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let Ok(array) = <[u8; 8]>::try_from(chunk) else {
            return true;
        };
        let word = u64::from_le_bytes(array);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        if below(word, 0x20) | below(quote, 1) | below(backslash, 1) != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&byte| byte < 0x20 || byte == b'"' || byte == b'\\')
}

/// Write a number.
pub(crate) fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// The members of an event after its `type` and `sequence_number`, written one by one (in
/// the order OpenAI sends them). Names are Skein's own and need no escaping.
pub(crate) struct Members<'a>(&'a mut Vec<u8>);

impl Members<'_> {
    fn name(&mut self, name: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        self.name(name);
        write_str(self.0, value);
        self
    }

    pub fn number(&mut self, name: &str, value: u64) -> &mut Self {
        self.name(name);
        write_u64(self.0, value);
        self
    }

    /// A member whose value is JSON already.
    pub fn raw(&mut self, name: &str, json: &str) -> &mut Self {
        self.name(name);
        self.0.extend_from_slice(json.as_bytes());
        self
    }

    pub fn item(&mut self, name: &str, item: &Item<'_>) -> &mut Self {
        self.name(name);
        item.write_to(self.0);
        self
    }

    pub fn part(&mut self, name: &str, part: &Part<'_>) -> &mut Self {
        self.name(name);
        part.write_to(self.0);
        self
    }
}

/// The `data:` of an event: `{"type":kind,"sequence_number":n,…}` with the members `members`
/// writes.
pub(crate) fn event(kind: &str, sequence: u64, members: impl FnOnce(&mut Members<'_>)) -> Vec<u8> {
    let mut data = Vec::with_capacity(256);
    write_event_head(&mut data, kind, sequence);
    members(&mut Members(&mut data));
    data.push(b'}');
    data
}

/// `{"type":"kind","sequence_number":n`, written to `out` (the rest of the event is the
/// caller's).
pub(crate) fn write_event_head(out: &mut Vec<u8>, kind: &str, sequence: u64) {
    out.extend_from_slice(b"{\"type\":");
    write_str(out, kind);
    out.extend_from_slice(b",\"sequence_number\":");
    write_u64(out, sequence);
}

/// Bytes written by `serde_json` (and literals) as the `String` an event carries.
pub(crate) fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text with the bytes that matter at every offset of an eight-byte word.
    fn tricky_text() -> impl Strategy<Value = String> {
        prop_oneof!["[a\"\\\\\u{1}\u{1f} \u{7f}é\n]{0,40}", any::<String>(),]
    }

    proptest! {
        #[test]
        fn needs_escape_is_what_serde_escapes(text in tricky_text()) {
            let written = serde_json::to_string(&text).expect("a string serializes");
            prop_assert_eq!(needs_escape(text.as_bytes()), written.len() != text.len() + 2);
            let mut out = Vec::new();
            write_str(&mut out, &text);
            prop_assert_eq!(out, written.into_bytes());
        }

        #[test]
        fn items_are_written_as_serde_writes_them(
            id in tricky_text(),
            text in tricky_text(),
            name in tricky_text(),
            namespace in proptest::option::of(tricky_text()),
        ) {
            let parts = [Part::output_text(&text), Part::Refusal { refusal: &name }];
            let summary = [Part::SummaryText { text: &text }];
            let items = [
                Item::Reasoning { id: &id, summary: &summary },
                Item::Message { id: &id, status: "completed", role: "assistant", content: &parts },
                Item::FunctionCall {
                    id: &id,
                    status: "in_progress",
                    call_id: &name,
                    name: &name,
                    arguments: &text,
                    namespace: namespace.as_deref(),
                },
                Item::CustomToolCall {
                    id: &id,
                    status: "completed",
                    call_id: &id,
                    name: &name,
                    input: &text,
                    namespace: namespace.as_deref(),
                },
            ];
            for item in &items {
                let mut out = Vec::new();
                item.write_to(&mut out);
                prop_assert_eq!(out, serde_json::to_vec(item).expect("an item serializes"));
            }
        }
    }

    #[test]
    fn the_first_choice_is_read_and_the_rest_skipped() {
        let body = r#"{"id":"x","choices":[{"finish_reason":"stop"},{"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let (choice, usage) = read_answer::<Choice<'_>>(body).expect("an answer");
        assert_eq!(
            choice.expect("a choice").finish_reason.as_str(),
            Some("stop")
        );
        assert_eq!(usage.expect("usage").output_tokens, 4);
        let (bytes_choice, _) = read_answer::<Choice<'_>>(body.as_bytes()).expect("an answer");
        assert!(bytes_choice.is_some());
        for body in [r#"{"choices":[]}"#, r#"{"choices":null}"#, r#"{}"#] {
            let (choice, usage) = read_answer::<Choice<'_>>(body).expect("an answer");
            assert!(choice.is_none() && usage.is_none(), "{body}");
        }
        assert!(read_answer::<Choice<'_>>(r#"{"choices":{"a":1}}"#).is_err());
        // An odd usage is read leniently, not fatally.
        let (choice, usage) =
            read_answer::<Choice<'_>>(r#"{"choices":[{}],"usage":"odd"}"#).expect("an answer");
        assert!(choice.is_some() && usage.is_none());
    }

    #[test]
    fn text_is_read_leniently() {
        #[derive(Deserialize)]
        struct Holder<'a> {
            #[serde(borrow)]
            a: Text<'a>,
            #[serde(borrow)]
            b: Text<'a>,
            #[serde(borrow)]
            c: Text<'a>,
            #[serde(borrow)]
            d: Content<'a>,
        }
        let holder: Holder<'_> = serde_json::from_str(
            r#"{"a": "plain", "b": {"nested": [1, 2]}, "c": "esc\"aped", "d": [{"type": "text", "text": "x"}]}"#,
        )
        .expect("JSON");
        assert!(matches!(holder.a.0, Some(Cow::Borrowed("plain"))));
        assert_eq!(holder.b.as_str(), None);
        assert_eq!(holder.c.as_str(), Some("esc\"aped"));
        assert!(matches!(holder.d, Content::Parts(Value::Array(ref parts)) if parts.len() == 1));
    }

    #[test]
    fn events_are_written_member_by_member() {
        let with_members = event("response.output_text.delta", 7, |members| {
            members
                .str("delta", "h\"i")
                .number("output_index", 3)
                .raw("logprobs", "[]")
                .part("part", &Part::output_text("x"));
        });
        let parsed: Value = serde_json::from_slice(&with_members).expect("JSON");
        assert_eq!(
            parsed,
            serde_json::json!({
                "type": "response.output_text.delta", "sequence_number": 7, "delta": "h\"i",
                "output_index": 3, "logprobs": [],
                "part": {"type": "output_text", "text": "x", "annotations": [], "logprobs": []},
            })
        );
        let empty = event("ping", 0, |_| {});
        let parsed: Value = serde_json::from_slice(&empty).expect("JSON");
        assert_eq!(
            parsed,
            serde_json::json!({"type": "ping", "sequence_number": 0})
        );
    }
}
