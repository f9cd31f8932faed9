//! A JSON object read without building a tree: each member's value stays the exact bytes the
//! client sent. Passthrough to an OpenAI-compatible upstream rewrites one or two members and
//! copies the rest untouched, so unknown fields reach the upstream as they were sent.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The members of a JSON object, in order, values unparsed.
#[derive(Debug)]
pub struct RawObject<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// The text the object was parsed from, when [`RawObject::parse`] read it: rewriting a
    /// member then splices the new value into it instead of writing every member again.
    source: Option<&'a [u8]>,
}

/// Why a body is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawParseError {
    pub message: String,
    /// 1-based line and column, when the JSON itself is malformed.
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for RawParseError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(formatter, "{}", self.message)
        } else {
            write!(
                formatter,
                "invalid JSON at line {} column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

impl<'a> RawObject<'a> {
    /// Read a request body that must be a JSON object.
    pub fn parse(body: &'a [u8]) -> Result<RawObject<'a>, RawParseError> {
        let parsed = serde_json::from_slice::<RawObject<'a>>(body).map(|mut object| {
            object.source = Some(body);
            object
        });
        parsed.map_err(|error| {
            let message = error.to_string();
            // serde_json appends " at line L column C"; keep only the reason.
            let reason = match message.rfind(" at line ") {
                Some(cut) => message[..cut].to_owned(),
                None => message,
            };
            if error.is_data() && reason.starts_with("invalid type") {
                RawParseError {
                    message: "the request body must be a JSON object".to_owned(),
                    line: 0,
                    column: 0,
                }
            } else if error.is_data() {
                RawParseError {
                    message: reason,
                    line: 0,
                    column: 0,
                }
            } else {
                RawParseError {
                    message: reason,
                    line: error.line(),
                    column: error.column(),
                }
            }
        })
    }

    /// The raw value of a member.
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| *value)
    }

    /// A member that must be a string; `Err` names the member when it is something else.
    pub fn get_str(&self, key: &str) -> Result<Option<Cow<'a, str>>, String> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        if raw.get() == "null" {
            return Ok(None);
        }
        serde_json::from_str::<Text<'a>>(raw.get())
            .map(|text| Some(text.0))
            .map_err(|_| format!("`{key}` must be a string"))
    }

    /// A member that must be a boolean (absent or null is `false`).
    pub fn get_bool(&self, key: &str) -> Result<bool, String> {
        match self.get(key).map(RawValue::get) {
            None | Some("null") | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(format!("`{key}` must be a boolean")),
        }
    }

    /// Decode a member into a typed value.
    pub fn get_as<T: Deserialize<'a>>(&self, key: &str) -> Result<Option<T>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|error| format!("`{key}` is invalid: {error}")),
        }
    }

    /// About how long the object's JSON is (its members' names and values), for sizing a copy.
    pub fn json_len(&self) -> usize {
        self.members
            .iter()
            .map(|(name, value)| name.len() + value.get().len() + 4)
            .sum()
    }

    /// Member names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(name, _)| name.as_ref())
    }

    /// Write the object back, replacing (or appending) the given members. Replacement values
    /// are already-serialized JSON.
    pub fn write_with(&self, replacements: &[(&str, &str)], output: &mut Vec<u8>) {
        if let Some(source) = self.source
            && self.splice(source, replacements, output)
        {
            return;
        }
        self.rebuild(replacements, output);
    }

    /// [`RawObject::write_with`] on the text the object was parsed from: the bytes between
    /// replaced values are copied as they are (members, whitespace and all), and appended
    /// members go before the closing brace. `false` (with `output` untouched) if a value does
    /// not lie in `source`, which does not happen for an object [`RawObject::parse`] read.
    fn splice(&self, source: &[u8], replacements: &[(&str, &str)], output: &mut Vec<u8>) -> bool {
        let base = source.as_ptr() as usize;
        let span = |value: &RawValue| {
            let start = (value.get().as_ptr() as usize).checked_sub(base)?;
            let end = start.checked_add(value.get().len())?;
            (end <= source.len()).then_some((start, end))
        };
        // The closing brace: serde allows only whitespace after it.
        let Some(close) = source.iter().rposition(|byte| *byte == b'}') else {
            return false;
        };
        let mut cuts: [(usize, usize, &str); 4] = [(0, 0, ""); 4];
        let mut used = 0;
        for (key, value) in &self.members {
            let Some((_, replacement)) = replacements.iter().find(|(name, _)| name == key) else {
                continue;
            };
            match span(value) {
                Some((start, end)) if used < cuts.len() && end <= close => {
                    cuts[used] = (start, end, replacement);
                    used += 1;
                }
                _ => return false,
            }
        }
        let added: usize = replacements
            .iter()
            .map(|(key, value)| key.len() + value.len() + 4)
            .sum();
        output.reserve(source.len() + added);
        let mut cursor = 0;
        for (start, end, replacement) in &cuts[..used] {
            output.extend_from_slice(&source[cursor..*start]);
            output.extend_from_slice(replacement.as_bytes());
            cursor = *end;
        }
        output.extend_from_slice(&source[cursor..close]);
        let mut first = self.members.is_empty();
        self.write_added(replacements, &mut first, output);
        output.extend_from_slice(&source[close..]);
        true
    }

    /// [`RawObject::write_with`] member by member, for an object without its source text.
    fn rebuild(&self, replacements: &[(&str, &str)], output: &mut Vec<u8>) {
        let members: usize = self
            .members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let added: usize = replacements
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum();
        output.reserve(members + added + 2);
        output.push(b'{');
        let mut first = true;
        for (key, value) in &self.members {
            let value = match replacements.iter().find(|(name, _)| name == key) {
                Some((_, replacement)) => replacement,
                None => value.get(),
            };
            write_member(key, value, &mut first, output);
        }
        self.write_added(replacements, &mut first, output);
        output.push(b'}');
    }

    /// The replacements the object has no member for, as members.
    fn write_added(&self, replacements: &[(&str, &str)], first: &mut bool, output: &mut Vec<u8>) {
        for (key, replacement) in replacements {
            if self.get(key).is_none() {
                write_member(key, replacement, first, output);
            }
        }
    }
}

/// `"key":value`, after a comma unless it is the `first` member.
fn write_member(key: &str, value: &str, first: &mut bool, output: &mut Vec<u8>) {
    if !*first {
        output.push(b',');
    }
    *first = false;
    write_json_string(key, output);
    output.push(b':');
    output.extend_from_slice(value.as_bytes());
}

fn write_json_string(text: &str, output: &mut Vec<u8>) {
    // Serializing a &str into a Vec cannot fail.
    if serde_json::to_writer(&mut *output, text).is_err() {
        output.extend_from_slice(b"\"\"");
    }
}

/// A JSON string, borrowed from the body unless it has escapes to undo (serde's `Cow` alone
/// always copies).
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = RawObject<'a>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members: Vec<(Cow<'a, str>, &'a RawValue)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if members.iter().any(|(name, _)| *name == key) {
                        return Err(de::Error::custom(format!("duplicate member `{key}`")));
                    }
                    members.push((key, value));
                }
                Ok(RawObject {
                    members,
                    source: None,
                })
            }
        }

        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// Serialize a value as JSON text for [`RawObject::write_with`].
pub fn to_json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_one_member_and_keeps_the_rest_byte_for_byte() {
        let body = br#"{"model":"alias","x_custom":{"a":[1, 2.50]},"stream":true}"#;
        let object = RawObject::parse(body).expect("parse");
        assert_eq!(
            object.get_str("model").expect("str").as_deref(),
            Some("alias")
        );
        assert!(object.get_bool("stream").expect("bool"));
        let mut output = Vec::new();
        object.write_with(&[("model", "\"gpt-4o\""), ("extra", "1")], &mut output);
        assert_eq!(
            std::str::from_utf8(&output).expect("utf8"),
            r#"{"model":"gpt-4o","x_custom":{"a":[1, 2.50]},"stream":true,"extra":1}"#
        );
    }

    #[test]
    fn reports_the_position_of_bad_json() {
        let error = RawObject::parse(b"{\n \"model\": gpt}").expect_err("bad");
        assert_eq!(error.line, 2);
        assert!(error.to_string().contains("line 2 column"), "{error}");
    }

    #[test]
    fn rejects_non_objects_and_duplicates() {
        assert!(RawObject::parse(b"[1,2]").is_err());
        assert!(RawObject::parse(br#"{"a":1,"a":2}"#).is_err());
        let object = RawObject::parse(br#"{"stream":"yes","model":5}"#).expect("parse");
        assert!(object.get_bool("stream").is_err());
        assert!(object.get_str("model").is_err());
    }

    #[test]
    fn strings_are_borrowed_unless_they_have_escapes() {
        let object =
            RawObject::parse(br#"{"model":"gpt-4o","name":"a\"b","x\ty":1}"#).expect("parse");
        assert!(matches!(
            object.get_str("model"),
            Ok(Some(Cow::Borrowed("gpt-4o")))
        ));
        assert!(matches!(object.get_str("name"), Ok(Some(Cow::Owned(name))) if name == "a\"b"));
        assert!(object.get("x\ty").is_some());
        assert!(matches!(object.members[0].0, Cow::Borrowed("model")));
    }

    #[test]
    fn escaped_keys_round_trip() {
        let object = RawObject::parse(br#"{"a\"b":1}"#).expect("parse");
        let mut output = Vec::new();
        object.write_with(&[], &mut output);
        assert_eq!(output, br#"{"a\"b":1}"#);
    }

    #[test]
    fn splicing_keeps_the_clients_layout() {
        let body = b"{\n  \"model\" : \"alias\",\n  \"messages\": [ ]\n}\n";
        let object = RawObject::parse(body).expect("parse");
        let mut output = Vec::new();
        object.write_with(
            &[("model", "\"gpt-4o\""), ("stream_options", "{}")],
            &mut output,
        );
        assert_eq!(
            std::str::from_utf8(&output).expect("utf8"),
            "{\n  \"model\" : \"gpt-4o\",\n  \"messages\": [ ]\n,\"stream_options\":{}}\n"
        );
        let empty = RawObject::parse(b" { } ").expect("parse");
        let mut output = Vec::new();
        empty.write_with(&[("a", "1"), ("b", "2")], &mut output);
        assert_eq!(output, b" { \"a\":1,\"b\":2} ");
    }

    /// JSON text for an object of `members`, with `pad` (whitespace) around every token.
    fn object_text(members: &[(String, serde_json::Value)], pad: &str) -> String {
        let mut text = format!("{pad}{{{pad}");
        for (index, (key, value)) in members.iter().enumerate() {
            if index > 0 {
                text.push_str(&format!("{pad},{pad}"));
            }
            let value = if index % 2 == 0 {
                serde_json::to_string_pretty(value).expect("json")
            } else {
                serde_json::to_string(value).expect("json")
            };
            text.push_str(&format!(
                "{}{pad}:{pad}{value}",
                serde_json::to_string(key).expect("json")
            ));
        }
        text.push_str(&format!("{pad}}}{pad}"));
        text
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[a-z\\\\\"\\u{e9} {}]{0,6}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z}\\\"]{1,4}", inner, 0..4)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Splicing into the source and writing every member again give the same JSON.
        #[test]
        fn splicing_agrees_with_rebuilding(
            members in proptest::collection::btree_map("[a-z_\\\"}]{1,8}", json_value(), 0..6),
            pad in "[ \t\n\r]{0,2}",
            replace in proptest::collection::vec(("[a-z_]{1,3}", json_value()), 0..4),
        ) {
            let members: Vec<(String, serde_json::Value)> = members.into_iter().collect();
            let text = object_text(&members, &pad);
            let object = RawObject::parse(text.as_bytes()).expect("parse");
            let mut seen = std::collections::HashSet::new();
            let replacements: Vec<(String, String)> = replace
                .into_iter()
                .filter(|(key, _)| seen.insert(key.clone()))
                .map(|(key, value)| (key, serde_json::to_string(&value).expect("json")))
                .collect();
            let replacements: Vec<(&str, &str)> = replacements
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            let mut spliced = Vec::new();
            object.write_with(&replacements, &mut spliced);
            let mut rebuilt = Vec::new();
            object.rebuild(&replacements, &mut rebuilt);
            let spliced: serde_json::Value = serde_json::from_slice(&spliced).expect("spliced is JSON");
            let rebuilt: serde_json::Value = serde_json::from_slice(&rebuilt).expect("rebuilt is JSON");
            proptest::prop_assert_eq!(spliced, rebuilt);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(object) = RawObject::parse(&bytes) {
                let _ = object.get_str("model");
                let _ = object.get_bool("stream");
                let mut output = Vec::new();
                object.write_with(&[("model", "\"m\"")], &mut output);
                proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&output).is_ok());
            }
        }
    }
}
