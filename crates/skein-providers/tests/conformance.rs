//! One conformance table for every translator: each fixture under `tests/fixtures/<provider>/`
//! names a translator of [`TABLE`], gives its input (JSON, or recorded SSE text for streams)
//! and the expected output (or an expected error). The same table drives a property test that
//! feeds every translator arbitrary input and asserts it never panics.
//!
//! `UPDATE_FIXTURES=1 cargo test -p skein-providers --test conformance` rewrites `expected`
//! from the current output (review the diff before committing it).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{Value, json};
use skein_providers::anthropic::{
    self, AnthropicPassthroughStream, AnthropicToOpenAiStream, OpenAiToAnthropicStream,
};
use skein_providers::gemini::{self, GeminiToOpenAiStream};
use skein_providers::openai::{self, PassthroughStream};
use skein_providers::responses;
use skein_providers::{ChainedStream, RawObject, StreamTranslator, TranslateError};

type Run = fn(&Value) -> Result<Value, TranslateError>;

/// Every translator, by the name fixtures use.
const TABLE: &[(&str, Run)] = &[
    ("openai/request_passthrough", openai_request_passthrough),
    ("openai/response_usage", |input| {
        Ok(json!(openai::response_usage(input.to_string().as_bytes())))
    }),
    ("openai/stream_passthrough", |input| {
        run_stream(Box::new(PassthroughStream::new(false)), input)
    }),
    ("openai/stream_passthrough_with_usage", |input| {
        run_stream(Box::new(PassthroughStream::new(true)), input)
    }),
    ("anthropic/request_from_openai", |input| {
        anthropic::request_from_openai(input, "claude-upstream")
    }),
    ("anthropic/response_to_openai", |input| {
        pair(anthropic::response_to_openai(
            input.to_string().as_bytes(),
            0,
        ))
    }),
    ("anthropic/stream_to_openai", |input| {
        run_stream(Box::new(AnthropicToOpenAiStream::new(true, 0)), input)
    }),
    ("anthropic/request_to_openai", |input| {
        anthropic::request_to_openai(input, "gpt-upstream", true)
    }),
    ("anthropic/response_from_openai", |input| {
        pair(anthropic::response_from_openai(
            input.to_string().as_bytes(),
            "alias",
        ))
    }),
    ("anthropic/stream_from_openai", |input| {
        run_stream(Box::new(OpenAiToAnthropicStream::new("alias")), input)
    }),
    ("anthropic/stream_passthrough", |input| {
        run_stream(Box::new(AnthropicPassthroughStream::new()), input)
    }),
    ("gemini/request_from_openai", gemini::request_from_openai),
    ("gemini/response_to_openai", |input| {
        pair(gemini::response_to_openai(
            input.to_string().as_bytes(),
            "gemini-upstream",
            0,
        ))
    }),
    ("gemini/stream_to_openai", |input| {
        run_stream(
            Box::new(GeminiToOpenAiStream::new(true, "gemini-upstream", 0)),
            input,
        )
    }),
    ("gemini/stream_to_anthropic", |input| {
        let chained = ChainedStream::new(
            Box::new(GeminiToOpenAiStream::new(true, "gemini-upstream", 0)),
            Box::new(OpenAiToAnthropicStream::new("alias")),
        );
        run_stream(Box::new(chained), input)
    }),
    ("gemini/embeddings_request_from_openai", |input| {
        gemini::embeddings_request_from_openai(input, "embedder")
    }),
    ("gemini/embeddings_response_to_openai", |input| {
        pair(gemini::embeddings_response_to_openai(
            input.to_string().as_bytes(),
            "embedder",
            false,
        ))
    }),
    ("responses/request_to_chat", |input| {
        let history = input["history"].as_array().cloned().unwrap_or_default();
        let web_search = input["web_search"].as_bool().unwrap_or(false);
        let text = input["request"].to_string();
        let request = RawObject::parse(text.as_bytes())
            .map_err(|error| TranslateError::client(error.to_string()))?;
        let target = responses::ChatTarget {
            model: "chat-upstream",
            max_completion_tokens: true,
            web_search,
            output_limit: None,
            fill_limit: false,
        };
        let chat = responses::request_to_chat(&request, &history, target)?;
        let body: Value = serde_json::from_slice(&chat.body).expect("a chat request is JSON");
        Ok(json!({"body": body, "dropped": chat.dropped}))
    }),
    ("responses/response_from_chat", |input| {
        pair(
            responses::response_from_chat(
                input["answer"].to_string().as_bytes(),
                &echo(&input["request"]),
            )
            .map(|(answer, usage)| {
                let answer: Value = serde_json::from_slice(&answer).expect("a response is JSON");
                (answer, usage)
            }),
        )
    }),
    ("responses/stream_from_chat", |input| {
        let translator = responses::ChatToResponsesStream::new(echo(&input["request"]));
        run_stream(Box::new(translator), &input["events"])
    }),
    ("responses/stream_passthrough", |input| {
        run_stream(
            Box::new(responses::PassthroughStream::new(
                "resp_skein".to_owned(),
                None,
            )),
            input,
        )
    }),
    ("responses/input_items", |input| {
        responses::input_items(input, "stem").map(Value::Array)
    }),
];

/// What a response echoes of `request`, with a fixed id and time.
fn echo(request: &Value) -> responses::Echo {
    responses::Echo::from_request(request, "resp_fixture".to_owned(), "alias", 0)
}

fn openai_request_passthrough(input: &Value) -> Result<Value, TranslateError> {
    let text = input.to_string();
    let request = RawObject::parse(text.as_bytes())
        .map_err(|error| TranslateError::client(error.to_string()))?;
    let shape = openai::stream_shape(&request).map_err(TranslateError::Client)?;
    let body = openai::passthrough_body(&request, "upstream-model", shape);
    serde_json::from_slice(&body).map_err(|error| TranslateError::client(error.to_string()))
}

fn pair(
    result: Result<(Value, skein_providers::Usage), TranslateError>,
) -> Result<Value, TranslateError> {
    result.map(|(answer, usage)| json!({"answer": answer, "usage": usage}))
}

/// Feed recorded SSE text (or an array of `{event, data}`) through a stream translator; the
/// output lists the client's events, the usage and whether the stream completed.
fn run_stream(
    mut translator: Box<dyn StreamTranslator>,
    input: &Value,
) -> Result<Value, TranslateError> {
    let events: Vec<(String, String)> = match input {
        Value::String(text) => parse_sse(text),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                (
                    item["event"].as_str().unwrap_or("").to_owned(),
                    item["data"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| item["data"].to_string()),
                )
            })
            .collect(),
        _ => {
            return Err(TranslateError::client(
                "stream input must be SSE text or an array of events",
            ));
        }
    };
    let mut out = Vec::new();
    for (event, data) in &events {
        translator.on_event(event, data, &mut out)?;
    }
    translator.finish(&mut out);
    let rendered: Vec<Value> = out
        .iter()
        .map(|event| {
            let data = serde_json::from_str::<Value>(&event.data)
                .unwrap_or_else(|_| Value::String(event.data.clone()));
            match &event.event {
                Some(name) => json!({"event": name, "data": data}),
                None => json!({"data": data}),
            }
        })
        .collect();
    Ok(
        json!({"events": rendered, "usage": translator.usage(), "completed": translator.completed()}),
    )
}

fn parse_sse(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let mut event = String::new();
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            if !data.is_empty() {
                events.push((std::mem::take(&mut event), data.join("\n")));
                data.clear();
            }
            event.clear();
        } else if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_owned();
        } else if let Some(payload) = line.strip_prefix("data:") {
            data.push(payload.strip_prefix(' ').unwrap_or(payload));
        }
    }
    if !data.is_empty() {
        events.push((event, data.join("\n")));
    }
    events
}

fn fixture_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut files = Vec::new();
    for provider in std::fs::read_dir(&root).expect("fixtures dir") {
        let provider = provider.expect("entry").path();
        for file in std::fs::read_dir(&provider).expect("provider dir") {
            let path = file.expect("entry").path();
            if path
                .extension()
                .is_some_and(|extension| extension == "json")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_fixture_matches() {
    let update = std::env::var("UPDATE_FIXTURES").is_ok();
    let mut failures = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for path in fixture_files() {
        let text = std::fs::read_to_string(&path).expect("read fixture");
        let mut fixture: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let name = fixture["translator"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no translator", path.display()))
            .to_owned();
        let run = TABLE
            .iter()
            .find(|(entry, _)| *entry == name)
            .map(|(_, run)| *run)
            .unwrap_or_else(|| panic!("{}: unknown translator {name}", path.display()));
        used.insert(name.clone());
        let result = run(&fixture["input"]);
        if let Some(expected_error) = fixture["expected_error"].as_str() {
            match result {
                // A request that cannot be translated is the client's fault; an answer or an
                // event that cannot be read is the upstream's.
                Err(error)
                    if error.message().contains(expected_error)
                        && error.is_client()
                            == (name.contains("request") || name.contains("input_items")) => {}
                other => failures.push(format!(
                    "{}: expected an error containing {expected_error:?}, got {other:?}",
                    path.display()
                )),
            }
            continue;
        }
        match result {
            Ok(output) if update => {
                fixture["expected"] = output;
                let pretty = serde_json::to_string_pretty(&fixture).expect("serialize") + "\n";
                std::fs::write(&path, pretty).expect("write fixture");
            }
            Ok(output) if output == fixture["expected"] => {}
            Ok(output) => failures.push(format!(
                "{}: output differs\nexpected: {}\nactual:   {}",
                path.display(),
                serde_json::to_string_pretty(&fixture["expected"]).unwrap_or_default(),
                serde_json::to_string_pretty(&output).unwrap_or_default()
            )),
            Err(message) => failures.push(format!("{}: failed: {message}", path.display())),
        }
    }
    let unused: Vec<&str> = TABLE
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !used.contains(*name))
        .collect();
    assert!(
        unused.is_empty(),
        "translators without a fixture: {unused:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|number| json!(number)),
        "[a-z_ ]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("tool"),
            Just("system"),
            Just("text"),
            Just("tool_use"),
            Just("image_url"),
            Just("function"),
            Just("[DONE]")
        ]
        .prop_map(|text| Value::String(text.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            Just("model"),
            Just("messages"),
            Just("role"),
            Just("content"),
            Just("type"),
            Just("text"),
            Just("tool_calls"),
            Just("function"),
            Just("arguments"),
            Just("name"),
            Just("tools"),
            Just("tool_choice"),
            Just("stream"),
            Just("choices"),
            Just("delta"),
            Just("usage"),
            Just("candidates"),
            Just("parts"),
            Just("index"),
            Just("input"),
            Just("system"),
            Just("stop"),
            Just("max_tokens"),
            Just("content_block"),
            Just("message"),
            Just("functionCall"),
            Just("image_url"),
            Just("url"),
            Just("source"),
            Just("finish_reason"),
            Just("embeddings"),
            Just("values"),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((keys, inner), 0..6).prop_map(|members| {
                Value::Object(
                    members
                        .into_iter()
                        .map(|(key, value)| (key.to_owned(), value))
                        .collect(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_translator_panics_on_arbitrary_json(input in arbitrary_json()) {
        for (_, run) in TABLE {
            let _ = run(&input);
            // Streams also get the value as a list of events.
            let _ = run(&json!([{"event": "message_start", "data": input.to_string()}, {"data": input.to_string()}]));
        }
    }

    #[test]
    fn no_translator_panics_on_arbitrary_sse_text(text in "(event: [a-z_]{0,14}\n)?(data: .{0,60}\n\n){0,4}") {
        for (_, run) in TABLE {
            let _ = run(&Value::String(text.clone()));
        }
    }
}

/// A chat completion (or, with `delta`, a chunk) whose members have arbitrary values: what
/// the Responses readers, which read typed structs rather than trees, must take without
/// panicking or writing invalid JSON.
fn chat_shaped(message_key: &'static str) -> impl Strategy<Value = Value> {
    let text_like = prop_oneof![
        Just(Value::Null),
        ".{0,12}".prop_map(Value::String),
        arbitrary_json(),
    ];
    let call = (text_like.clone(), text_like.clone(), text_like.clone(), arbitrary_json())
        .prop_map(|(id, name, arguments, index)| {
            json!({"id": id, "index": index, "function": {"name": name, "arguments": arguments}})
        });
    let message = (
        text_like.clone(),
        text_like.clone(),
        text_like.clone(),
        prop_oneof![
            Just(Value::Null),
            prop::collection::vec(call, 0..3).prop_map(Value::Array)
        ],
    )
        .prop_map(|(content, reasoning, refusal, tool_calls)| {
            json!({"content": content, "reasoning_content": reasoning, "refusal": refusal, "tool_calls": tool_calls})
        });
    let usage = prop_oneof![
        Just(Value::Null),
        arbitrary_json(),
        (0u64..1000, 0u64..1000).prop_map(
            |(prompt, completion)| json!({"prompt_tokens": prompt, "completion_tokens": completion})
        ),
    ];
    (message, text_like, usage).prop_map(move |(message, finish_reason, usage)| {
        let mut choice = json!({"finish_reason": finish_reason});
        choice[message_key] = message;
        json!({"choices": [choice], "usage": usage})
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn responses_are_valid_json_from_any_chat_answer(
        answer in chat_shaped("message"),
        tools in arbitrary_json(),
    ) {
        let echo = echo(&json!({"tools": tools, "instructions": "be brief"}));
        if let Ok((response, _)) = responses::response_from_chat(answer.to_string().as_bytes(), &echo) {
            let response: Value = serde_json::from_slice(&response).expect("a response is JSON");
            prop_assert_eq!(&response["id"], "resp_fixture");
            prop_assert_eq!(&response["instructions"], "be brief");
            prop_assert!(response["output"].is_array());
        }
    }

    #[test]
    fn response_events_are_valid_json_from_any_chat_chunks(
        chunks in prop::collection::vec(chat_shaped("delta"), 0..4),
    ) {
        let mut translator = responses::ChatToResponsesStream::new(echo(&json!({})));
        let mut out = Vec::new();
        for chunk in &chunks {
            let _ = translator.on_event("", &chunk.to_string(), &mut out);
        }
        let _ = translator.on_event("", "[DONE]", &mut out);
        translator.finish(&mut out);
        for (index, event) in out.iter().enumerate() {
            let data: Value = serde_json::from_str(&event.data).expect("an event is JSON");
            prop_assert_eq!(&data["sequence_number"], index);
            prop_assert_eq!(data["type"].as_str(), event.event.as_deref());
        }
        if let Some(result) = translator.take_result() {
            let response: Value = serde_json::from_str(result.get()).expect("the response is JSON");
            prop_assert_eq!(&response["id"], "resp_fixture");
        }
    }
}
