//! When the mock calls a tool, and with what. It calls one only when asked, so that an agent
//! driven against it can finish a turn:
//! - a directive in the last user text: `[[call NAME]]`, or `[[call NAME {"arg": …}]]` with the
//!   arguments to use (several directives make parallel calls);
//! - a tool choice that forces a call (`required`/`any`, or a named tool);
//! - a model whose name contains `tools` (`mock-tools`): the first offered tool.
//!
//! Arguments not given are made from the tool's JSON schema, so they validate against it. No
//! call is made while answering a tool result.

use serde_json::{Map, Value, json};

/// A tool the request offers: its name and the JSON schema of its arguments.
pub(crate) struct Offered {
    pub(crate) name: String,
    pub(crate) schema: Value,
}

/// What the request's tool choice says.
pub(crate) enum Choice {
    Auto,
    None,
    /// Some tool must be called.
    Required,
    /// This tool must be called.
    Named(String),
}

/// The calls to make (name, arguments), in order.
pub(crate) fn decide(
    offered: &[Offered],
    choice: &Choice,
    last_user_text: &str,
    model: &str,
    parallel: bool,
) -> Vec<(String, Value)> {
    if offered.is_empty() || matches!(choice, Choice::None) {
        return Vec::new();
    }
    let find = |name: &str| offered.iter().find(|tool| tool.name == name);
    let mut calls: Vec<(String, Value)> = directives(last_user_text)
        .into_iter()
        .filter_map(|(name, arguments)| {
            let tool = find(&name)?;
            Some((name, arguments.unwrap_or_else(|| instance(&tool.schema))))
        })
        .collect();
    if calls.is_empty() {
        let forced = match choice {
            Choice::Named(name) => find(name),
            Choice::Required => offered.first(),
            Choice::Auto if model.contains("tools") => offered.first(),
            Choice::Auto | Choice::None => None,
        };
        if let Some(tool) = forced {
            calls.push((tool.name.clone(), instance(&tool.schema)));
        }
    }
    if !parallel {
        calls.truncate(1);
    }
    calls
}

/// The `[[call NAME ARGS?]]` directives in a text.
fn directives(text: &str) -> Vec<(String, Option<Value>)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("[[call ") {
        let after = &rest[start + 7..];
        let Some(end) = after.find("]]") else {
            break;
        };
        let inner = after[..end].trim();
        let (name, arguments) = match inner.split_once(char::is_whitespace) {
            Some((name, arguments)) => (name, serde_json::from_str(arguments.trim()).ok()),
            None => (inner, None),
        };
        if !name.is_empty() {
            found.push((name.to_owned(), arguments));
        }
        rest = &after[end + 2..];
    }
    found
}

/// A value that validates against `schema` (the common JSON Schema keywords).
pub(crate) fn instance(schema: &Value) -> Value {
    if let Some(value) = schema.get("const").or(schema.get("default")) {
        return value.clone();
    }
    if let Some(first) = schema["enum"].get(0) {
        return first.clone();
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema[combinator].get(0) {
            return instance(first);
        }
    }
    let kind = match &schema["type"] {
        Value::String(kind) => kind.as_str(),
        Value::Array(kinds) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|kind| *kind != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "object",
    };
    match kind {
        "string" => json!("mock"),
        "integer" => json!(schema["minimum"].as_i64().unwrap_or(1)),
        "number" => json!(schema["minimum"].as_f64().unwrap_or(1.0)),
        "boolean" => json!(false),
        "null" => Value::Null,
        "array" => {
            let count = schema["minItems"].as_u64().unwrap_or(1).max(1);
            let item = instance(&schema["items"]);
            Value::Array((0..count).map(|_| item.clone()).collect())
        }
        _ => {
            let mut object = Map::new();
            let properties = schema["properties"].as_object();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|names| names.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(properties) = properties {
                for (name, property) in properties {
                    if required.is_empty() || required.contains(&name.as_str()) {
                        object.insert(name.clone(), instance(property));
                    }
                }
            }
            Value::Object(object)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, schema: Value) -> Offered {
        Offered {
            name: name.to_owned(),
            schema,
        }
    }

    #[test]
    fn calls_only_when_asked() {
        let offered = [
            tool(
                "get_weather",
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            ),
            tool(
                "shell",
                json!({"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}, "timeout_ms": {"type": "number"}}, "required": ["command"]}),
            ),
        ];
        assert!(decide(&offered, &Choice::Auto, "weather?", "mock", true).is_empty());
        let calls = decide(
            &offered,
            &Choice::Auto,
            r#"run [[call shell {"command": ["echo", "hi"]}]] and [[call get_weather]]"#,
            "mock",
            true,
        );
        assert_eq!(
            calls,
            vec![
                ("shell".to_owned(), json!({"command": ["echo", "hi"]})),
                ("get_weather".to_owned(), json!({"city": "mock"})),
            ]
        );
        let forced = decide(&offered, &Choice::Named("shell".into()), "x", "mock", true);
        assert_eq!(
            forced,
            vec![("shell".to_owned(), json!({"command": ["mock"]}))]
        );
        let by_model = decide(&offered, &Choice::Auto, "x", "mock-tools", true);
        assert_eq!(by_model[0].0, "get_weather");
        assert!(decide(&offered, &Choice::None, "[[call shell]]", "mock", true).is_empty());
    }
}
