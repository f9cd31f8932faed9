//! Deterministic text and token counts.

use serde_json::Value;

/// A rough token count: one per four characters, at least one per non-empty text.
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        0
    } else {
        (text.chars().count() as u64).div_ceil(4)
    }
}

/// All text inside a JSON value (message contents, tool results…), for token counting.
pub fn collect_text(value: &Value, output: &mut String) {
    match value {
        Value::String(text) => {
            output.push_str(text);
            output.push(' ');
        }
        Value::Array(items) => items.iter().for_each(|item| collect_text(item, output)),
        // Every member may hold text (content, text, input, arguments, nested blocks).
        Value::Object(map) => {
            for (key, item) in map {
                let metadata = matches!(
                    key.as_str(),
                    "type"
                        | "role"
                        | "id"
                        | "tool_use_id"
                        | "tool_call_id"
                        | "cache_control"
                        | "media_type"
                        | "signature"
                        | "detail"
                        | "image_url"
                        | "source"
                        | "inlineData"
                        | "fileData"
                        | "input_audio"
                );
                if !metadata {
                    collect_text(item, output);
                }
            }
        }
        _ => {}
    }
}

/// The reply the mock gives: it names the model and echoes the start of the last user text.
pub fn reply_text(model: &str, last_user_text: &str) -> String {
    let echo: String = last_user_text.chars().take(80).collect();
    format!("Mock reply from {model}: {echo}")
}

/// Split a reply into stream pieces: one word each, the space kept in front.
pub fn stream_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    for (index, word) in text.split(' ').enumerate() {
        if index == 0 {
            pieces.push(word.to_owned());
        } else {
            pieces.push(format!(" {word}"));
        }
    }
    pieces
}
