//! OpenAI's API, spoken by OpenAI, Azure OpenAI and the OpenAI-compatible family. Requests from
//! OpenAI clients pass through with only `model` (and `stream_options`, so usage is always
//! captured) rewritten.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::TranslateError;
use crate::raw::{RawObject, to_json_text};
use crate::sse::{OutEvent, StreamTranslator};
use crate::usage::Usage;

/// OpenAI's `usage` object (chat, completions and embeddings).
#[derive(Debug, Default, Deserialize)]
pub struct OpenAiUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CompletionTokensDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl From<&OpenAiUsage> for Usage {
    fn from(usage: &OpenAiUsage) -> Usage {
        Usage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cached_input_tokens: usage
                .prompt_tokens_details
                .as_ref()
                .and_then(|details| details.cached_tokens)
                .unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: usage
                .completion_tokens_details
                .as_ref()
                .and_then(|details| details.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// What a passthrough request needs to know about the client's stream options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamShape {
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
}

/// Read `stream` and `stream_options.include_usage` from a request.
pub fn stream_shape(request: &RawObject<'_>) -> Result<StreamShape, String> {
    let stream = request.get_bool("stream")?;
    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
    }
    let options: Option<StreamOptions> = request.get_as("stream_options")?;
    let client_wants_usage = options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    Ok(StreamShape {
        stream,
        client_wants_usage,
    })
}

/// Build the body for an OpenAI-shaped upstream: the deployment's model name, and
/// `stream_options.include_usage` forced on for streams so usage is always captured. Every
/// other member is copied byte for byte.
pub fn passthrough_body(
    request: &RawObject<'_>,
    upstream_model: &str,
    shape: StreamShape,
) -> Vec<u8> {
    passthrough_body_with(request, upstream_model, shape, &[])
}

/// [`passthrough_body`] with more members replaced (or added): `extra`, as JSON text.
pub fn passthrough_body_with(
    request: &RawObject<'_>,
    upstream_model: &str,
    shape: StreamShape,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let model_json = to_json_text(&upstream_model);
    let stream_options_json = if !shape.stream || shape.client_wants_usage {
        None
    } else if request.get("stream_options").is_none() {
        Some(Cow::Borrowed(r#"{"include_usage":true}"#))
    } else {
        let mut options = request
            .get_as::<serde_json::Map<String, serde_json::Value>>("stream_options")
            .ok()
            .flatten()
            .unwrap_or_default();
        options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
        Some(Cow::Owned(to_json_text(&options)))
    };
    let replacements = [
        ("model", model_json.as_str()),
        (
            "stream_options",
            stream_options_json.as_deref().unwrap_or(""),
        ),
    ];
    let used = if stream_options_json.is_some() { 2 } else { 1 };
    let mut body = Vec::new();
    if extra.is_empty() {
        request.write_with(&replacements[..used], &mut body);
    } else {
        let mut all = replacements[..used].to_vec();
        all.extend_from_slice(extra);
        request.write_with(&all, &mut body);
    }
    body
}

/// The name of the `usage` member, quoted, as searched for in bodies and stream events.
const USAGE_MEMBER: &[u8] = b"\"usage\"";

/// Usage from a non-streaming response body (chat, completions or embeddings).
///
/// The top-level `usage` member is found without parsing the whole answer: inside a JSON
/// string a quote is always escaped, so `"usage"` followed by `:` can only be a member name.
/// OpenAI-shaped answers put it last, so the search runs from the end.
pub fn response_usage(body: &[u8]) -> Usage {
    static FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(USAGE_MEMBER));
    static FORWARD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(USAGE_MEMBER));
    // The reverse search runs a byte at a time; the forward one is vectorised. The member is
    // near the end, so the last match in the last `TAIL` bytes is searched for first.
    const TAIL: usize = 512;
    let mut end = body.len();
    while let Some(found) = match FORWARD
        .find_iter(&body[end.saturating_sub(TAIL)..end])
        .last()
    {
        Some(at) => Some(end.saturating_sub(TAIL) + at),
        None if end <= TAIL => None,
        // Nothing in the tail: the rest, from the end (a match across the tail's start
        // included).
        None => FINDER.rfind(&body[..end - TAIL + USAGE_MEMBER.len() - 1]),
    } {
        let mut at = found + USAGE_MEMBER.len();
        skip_whitespace(body, &mut at);
        if body.get(at) == Some(&b':') {
            let value = &body[at + 1..];
            return scan_usage(value).unwrap_or_else(|| parse_usage(value));
        }
        end = found;
    }
    Usage::default()
}

/// The `usage` value at the start of `value`, read by serde (what [`scan_usage`] stands in for).
fn parse_usage(value: &[u8]) -> Usage {
    let mut deserializer = serde_json::Deserializer::from_slice(value);
    match Option::<OpenAiUsage>::deserialize(&mut deserializer) {
        Ok(Some(usage)) => Usage::from(&usage),
        _ => Usage::default(),
    }
}

fn skip_whitespace(text: &[u8], at: &mut usize) {
    while matches!(text.get(*at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *at += 1;
    }
}

/// The `usage` object read without serde, for the shape upstreams write: members whose values
/// are integers or objects of integers. Anything else (`null`, a string, a float, a negative
/// or oversized number, deeper nesting, a repeated member, an escape in a name) gives `None`,
/// and [`parse_usage`] reads it instead, so the result is always what serde would give.
/// About a sixth of serde's instructions on a usual `usage` object.
fn scan_usage(text: &[u8]) -> Option<Usage> {
    let mut at = 0;
    skip_whitespace(text, &mut at);
    if text.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    let mut usage = Usage::default();
    let mut seen = 0u8;
    scan_usage_object(text, &mut at, None, &mut usage, &mut seen)?;
    Some(usage)
}

/// The member names [`scan_usage_object`] tells apart, each compared once, by length first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UsageName {
    PromptTokens,
    CompletionTokens,
    PromptDetails,
    CompletionDetails,
    CachedTokens,
    ReasoningTokens,
    Other,
}

impl UsageName {
    fn of(name: &[u8]) -> UsageName {
        // Fixed-length compares, inlined (a slice pattern calls `bcmp` per arm).
        fn is<const N: usize>(name: &[u8], expected: &[u8; N]) -> bool {
            <&[u8; N]>::try_from(name).is_ok_and(|name| name == expected)
        }
        match name.len() {
            13 if is(name, b"prompt_tokens") => UsageName::PromptTokens,
            13 if is(name, b"cached_tokens") => UsageName::CachedTokens,
            16 if is(name, b"reasoning_tokens") => UsageName::ReasoningTokens,
            17 if is(name, b"completion_tokens") => UsageName::CompletionTokens,
            21 if is(name, b"prompt_tokens_details") => UsageName::PromptDetails,
            25 if is(name, b"completion_tokens_details") => UsageName::CompletionDetails,
            _ => UsageName::Other,
        }
    }
}

/// One object of the `usage` value, from after its `{` to after its `}`. `parent` is the
/// member name of a nested object (`None` for the top level).
fn scan_usage_object(
    text: &[u8],
    at: &mut usize,
    parent: Option<UsageName>,
    usage: &mut Usage,
    seen: &mut u8,
) -> Option<()> {
    skip_whitespace(text, at);
    if text.get(*at) == Some(&b'}') {
        *at += 1;
        return Some(());
    }
    loop {
        skip_whitespace(text, at);
        if text.get(*at) != Some(&b'"') {
            return None;
        }
        let start = *at + 1;
        let end = start + memchr::memchr2(b'"', b'\\', text.get(start..)?)?;
        if text[end] != b'"' {
            return None;
        }
        let name = UsageName::of(&text[start..end]);
        *at = end + 1;
        skip_whitespace(text, at);
        if text.get(*at) != Some(&b':') {
            return None;
        }
        *at += 1;
        skip_whitespace(text, at);
        match (text.get(*at)?, parent) {
            (b'0'..=b'9', _) => {
                let number = scan_integer(text, at)?;
                // The members serde reads, one bit each: a second one is serde's error.
                let slot = match (parent, name) {
                    (None, UsageName::PromptTokens) => Some((0, &mut usage.input_tokens)),
                    (None, UsageName::CompletionTokens) => Some((1, &mut usage.output_tokens)),
                    (Some(UsageName::PromptDetails), UsageName::CachedTokens) => {
                        Some((2, &mut usage.cached_input_tokens))
                    }
                    (Some(UsageName::CompletionDetails), UsageName::ReasoningTokens) => {
                        Some((3, &mut usage.reasoning_tokens))
                    }
                    (None, UsageName::PromptDetails | UsageName::CompletionDetails) => {
                        return None;
                    }
                    _ => None,
                };
                if let Some((bit, field)) = slot {
                    if *seen & (1 << bit) != 0 {
                        return None;
                    }
                    *seen |= 1 << bit;
                    *field = number;
                }
            }
            (b'{', None) => {
                let bit = match name {
                    UsageName::PromptDetails => Some(4),
                    UsageName::CompletionDetails => Some(5),
                    UsageName::PromptTokens | UsageName::CompletionTokens => return None,
                    _ => None,
                };
                if let Some(bit) = bit {
                    if *seen & (1 << bit) != 0 {
                        return None;
                    }
                    *seen |= 1 << bit;
                }
                *at += 1;
                scan_usage_object(text, at, Some(name), usage, seen)?;
            }
            _ => return None,
        }
        skip_whitespace(text, at);
        match text.get(*at)? {
            b',' => *at += 1,
            b'}' => {
                *at += 1;
                return Some(());
            }
            _ => return None,
        }
    }
}

/// A JSON integer that fits a `u64`, as serde reads one (no sign, no leading zero, no fraction
/// or exponent after it).
fn scan_integer(text: &[u8], at: &mut usize) -> Option<u64> {
    let start = *at;
    let mut number: u64 = 0;
    while let Some(digit @ b'0'..=b'9') = text.get(*at) {
        number = number
            .checked_mul(10)?
            .checked_add(u64::from(digit - b'0'))?;
        *at += 1;
    }
    let digits = *at - start;
    if (digits > 1 && text[start] == b'0') || matches!(text.get(*at), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some(number)
}

/// OpenAI's `usage` object for a [`Usage`].
pub fn usage_json(usage: &Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    })
}

/// Writes the OpenAI chat chunks of a stream translated from another provider.
#[derive(Debug)]
pub struct ChunkWriter {
    pub id: String,
    pub model: String,
    pub created: u64,
    /// The client asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
}

impl ChunkWriter {
    /// One chunk with a delta for choice 0.
    pub fn chunk(&self, delta: serde_json::Value, finish_reason: Option<&str>) -> OutEvent {
        let mut chunk = serde_json::json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}],
        });
        if self.client_wants_usage {
            chunk["usage"] = serde_json::Value::Null;
        }
        OutEvent::data(chunk.to_string())
    }

    /// The end of a stream: the finish chunk, the usage chunk when the client asked, `[DONE]`.
    pub fn close(&self, finish_reason: &str, usage: &Usage, out: &mut Vec<OutEvent>) {
        out.push(self.chunk(serde_json::json!({}), Some(finish_reason)));
        if self.client_wants_usage {
            let chunk = serde_json::json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(usage),
            });
            out.push(OutEvent::data(chunk.to_string()));
        }
        out.push(OutEvent::data("[DONE]".to_owned()));
    }
}

/// Whether a chunk has `"usage": {` (not `"usage": null`), without parsing it.
fn carries_usage_object(data: &str) -> bool {
    let mut rest = data;
    while let Some(found) = memchr::memmem::find(rest.as_bytes(), USAGE_MEMBER) {
        let after = rest[found + 7..].trim_start();
        if let Some(value) = after.strip_prefix(':')
            && value.trim_start().starts_with('{')
        {
            return true;
        }
        rest = &rest[found + 7..];
    }
    false
}

/// Passes an OpenAI stream through, reading usage on the way and hiding the usage-only chunk
/// from clients that did not ask for it.
#[derive(Debug)]
pub struct PassthroughStream {
    client_wants_usage: bool,
    usage: Usage,
    completed: bool,
}

impl PassthroughStream {
    pub fn new(client_wants_usage: bool) -> PassthroughStream {
        PassthroughStream {
            client_wants_usage,
            usage: Usage::default(),
            completed: false,
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
        _event: &str,
        data: String,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        if data.trim() == "[DONE]" {
            self.completed = true;
            let done = if data == "[DONE]" {
                data
            } else {
                "[DONE]".to_owned()
            };
            out.push(OutEvent::data(done));
            return Ok(());
        }
        #[derive(Deserialize)]
        struct ChunkView<'a> {
            #[serde(default)]
            usage: Option<OpenAiUsage>,
            #[serde(default, borrow)]
            choices: Option<&'a RawValue>,
        }
        let mut forward = true;
        // Only a chunk whose usage is an object needs parsing; the rest pass as they are.
        if carries_usage_object(&data)
            && let Ok(view) = serde_json::from_str::<ChunkView<'_>>(&data)
            && let Some(usage) = &view.usage
        {
            self.usage.merge_max(&Usage::from(usage));
            let no_choices = view.choices.is_none_or(|raw| raw.get().trim() == "[]");
            if no_choices && !self.client_wants_usage {
                forward = false;
            }
        }
        if forward {
            out.push(OutEvent::data(data));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON value that may appear in or around a `usage` object: integers (some out of
    /// range), `null`, strings, floats, negatives, and objects of those.
    fn usage_value(depth: u32) -> proptest::prelude::BoxedStrategy<String> {
        use proptest::prelude::*;
        let odd = prop_oneof![
            Just("18446744073709551616".to_owned()),
            Just("null".to_owned()),
            Just("\"a\\\"b\"".to_owned()),
            Just("1.5".to_owned()),
            Just("-3".to_owned()),
            Just("012".to_owned()),
            Just("2e3".to_owned()),
        ];
        // Mostly integers, so that whole objects of them (what the scanner reads) are common.
        let leaf = prop_oneof![30 => any::<u32>().prop_map(|n| n.to_string()), 1 => odd];
        if depth == 0 {
            return leaf.boxed();
        }
        let names = prop_oneof![
            Just("prompt_tokens"),
            Just("completion_tokens"),
            Just("total_tokens"),
            Just("prompt_tokens_details"),
            Just("completion_tokens_details"),
            Just("cached_tokens"),
            Just("reasoning_tokens"),
            Just("audio_tokens"),
        ];
        let member = (
            names,
            usage_value(depth - 1),
            prop_oneof![Just(""), Just(" "), Just("\n  ")],
        );
        prop_oneof![
            1 => leaf,
            2 => proptest::collection::vec(member, 0..6).prop_map(|members| {
                let inner: Vec<String> = members
                    .into_iter()
                    .map(|(name, value, space)| format!("{space}\"{name}\":{space}{value}"))
                    .collect();
                format!("{{{}}}", inner.join(","))
            }),
        ]
        .boxed()
    }

    proptest::proptest! {
        /// The hand scanner gives what serde gives, whatever the `usage` value holds.
        #[test]
        fn the_usage_scanner_agrees_with_serde(usage in usage_value(2), tail in "[,}\\] a\"]{0,4}", pad in 0usize..1200) {
            let prefix = "{\"id\":\"x\",\"usage\":";
            // Padded past the tail the search looks at first, with a decoy name in it.
            let padding = " ".repeat(pad);
            let body = format!("{prefix} {usage}{tail}{padding}\"usage\"]");
            let value = &body.as_bytes()[prefix.len()..];
            let expected = parse_usage(value);
            if let Some(scanned) = scan_usage(value) {
                proptest::prop_assert_eq!(scanned, expected);
            }
            proptest::prop_assert_eq!(response_usage(body.as_bytes()), expected);
        }
    }

    #[test]
    fn the_usage_scanner_reads_what_upstreams_write() {
        let body = br#"{"id":"c","choices":[{"message":{"content":"\"usage\": {\"prompt_tokens\": 99}"}}],"usage":{"prompt_tokens":12,"completion_tokens":75,"total_tokens":87,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":4,"audio_tokens":0,"accepted_prediction_tokens":0}},"service_tier":"default"}"#;
        let start = memchr::memmem::rfind(body, USAGE_MEMBER).expect("usage") + 8;
        let expected = Usage {
            input_tokens: 12,
            output_tokens: 75,
            cached_input_tokens: 3,
            reasoning_tokens: 4,
            ..Usage::default()
        };
        assert_eq!(scan_usage(&body[start..]), Some(expected));
        assert_eq!(response_usage(body), expected);
        // What the scanner leaves to serde, serde reads.
        let spaced = br#"{"usage" : { "prompt_tokens" : 1 , "completion_tokens" : 2, "x": "s" }}"#;
        assert_eq!(scan_usage(&spaced[10..]), None);
        assert_eq!(response_usage(spaced).output_tokens, 2);
        assert_eq!(response_usage(br#"{"usage":null}"#), Usage::default());
        assert_eq!(
            response_usage(br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#),
            Usage::default()
        );
    }

    #[test]
    fn forces_usage_on_streams_and_keeps_other_options() {
        let body = br#"{"model":"a","stream":true,"stream_options":{"x":1},"seed":7}"#;
        let request = RawObject::parse(body).expect("parse");
        let shape = stream_shape(&request).expect("shape");
        assert_eq!(
            shape,
            StreamShape {
                stream: true,
                client_wants_usage: false
            }
        );
        let out = passthrough_body(&request, "gpt-4o", shape);
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["model"], "gpt-4o");
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["stream_options"]["x"], 1);
        assert_eq!(value["seed"], 7);
    }

    #[test]
    fn hides_the_usage_chunk_only_from_clients_that_did_not_ask() {
        let usage_chunk = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":3}}}"#;
        for wants in [false, true] {
            let mut stream = PassthroughStream::new(wants);
            let mut out = Vec::new();
            stream
                .on_event(
                    "",
                    r#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
                    &mut out,
                )
                .expect("ok");
            stream.on_event("", usage_chunk, &mut out).expect("ok");
            stream.on_event("", "[DONE]", &mut out).expect("ok");
            assert_eq!(out.len(), if wants { 3 } else { 2 });
            assert!(stream.completed());
            assert_eq!(
                stream.usage(),
                Usage {
                    input_tokens: 5,
                    output_tokens: 7,
                    cached_input_tokens: 2,
                    cache_write_tokens: 0,
                    reasoning_tokens: 3
                }
            );
        }
    }

    #[test]
    fn spots_usage_objects_without_parsing() {
        assert!(carries_usage_object(
            r#"{"choices":[],"usage": {"prompt_tokens":1}}"#
        ));
        assert!(!carries_usage_object(r#"{"choices":[],"usage":null}"#));
        assert!(!carries_usage_object(r#"{"content":"the \"usage\" word"}"#));
    }

    #[test]
    fn reads_the_top_level_usage_member_only() {
        let body = br#"{"choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 99} trick"}}],"usage": {"prompt_tokens":4,"completion_tokens":2}}"#;
        assert_eq!(response_usage(body).input_tokens, 4);
        assert_eq!(response_usage(br#"{"usage":null}"#), Usage::default());
        assert_eq!(response_usage(b"\xff\xfe"), Usage::default());
    }

    #[test]
    fn reads_usage_from_responses() {
        let body = br#"{"object":"list","data":[],"usage":{"prompt_tokens":9,"total_tokens":9}}"#;
        assert_eq!(response_usage(body).input_tokens, 9);
        assert_eq!(response_usage(b"not json"), Usage::default());
    }
}
