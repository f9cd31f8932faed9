//! Durations in config files: either whole milliseconds (`1500`) or a humantime string
//! (`"1.5s"`, `"2m"`). Stored as milliseconds so the model stays plain data.

use serde::{Deserialize, Deserializer, Serializer};

/// Deserialize a millisecond count from an integer or a humantime string.
pub fn deserialize_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Millis(millis) => Ok(millis),
        Raw::Text(text) => parse_millis(&text).map_err(serde::de::Error::custom),
    }
}

/// Same as [`deserialize_millis`] for an optional field.
pub fn deserialize_opt_millis<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    deserialize_millis(deserializer).map(Some)
}

/// Serialize milliseconds as a humantime string so a dumped config reads like a written one.
pub fn serialize_millis<S: Serializer>(millis: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    let text = humantime::format_duration(std::time::Duration::from_millis(*millis)).to_string();
    serializer.serialize_str(&text)
}

/// Parse `"250ms"`, `"30s"`, `"1m 30s"` into milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|error| format!("invalid duration {text:?}: {error}"))?;
    u64::try_from(duration.as_millis()).map_err(|_| format!("duration {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_and_integers() {
        assert_eq!(parse_millis("250ms"), Ok(250));
        assert_eq!(parse_millis("1m 30s"), Ok(90_000));
        assert!(parse_millis("soon").is_err());
    }
}
