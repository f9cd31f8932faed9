//! Reading the error an upstream sent back, whatever its shape.

use serde::Deserialize;

/// Why a translation failed, and whose fault it is: the client's request could not be expressed
/// in the upstream's API (answered as a 400), or the upstream's answer could not be read
/// (answered as a 502; the call still cost something).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TranslateError {
    /// The client's request cannot be translated.
    Client(String),
    /// The upstream's answer (or one of its events) cannot be read.
    Upstream(String),
}

impl TranslateError {
    pub fn client(message: impl Into<String>) -> TranslateError {
        TranslateError::Client(message.into())
    }

    pub fn upstream(message: impl Into<String>) -> TranslateError {
        TranslateError::Upstream(message.into())
    }

    /// The human message.
    pub fn message(&self) -> &str {
        match self {
            TranslateError::Client(message) | TranslateError::Upstream(message) => message,
        }
    }

    /// Whether the client was at fault.
    pub fn is_client(&self) -> bool {
        matches!(self, TranslateError::Client(_))
    }
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.message())
    }
}

impl std::error::Error for TranslateError {}

/// The error body shapes providers use: OpenAI, Anthropic and Gemini all nest an object with a
/// `message` under `error`; some OpenAI-compatible servers put a plain string there.
#[derive(Debug, Deserialize)]
pub struct UpstreamErrorBody {
    pub error: UpstreamErrorDetail,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UpstreamErrorDetail {
    Object {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    },
    Text(String),
}

/// The human message in an upstream error body, if one can be found.
pub fn upstream_error_message(body: &[u8]) -> Option<String> {
    if let Ok(parsed) = serde_json::from_slice::<UpstreamErrorBody>(body) {
        return match parsed.error {
            UpstreamErrorDetail::Object {
                message: Some(message),
                ..
            } => Some(message),
            UpstreamErrorDetail::Object {
                message: None,
                kind,
            } => kind,
            UpstreamErrorDetail::Text(text) => Some(text),
        };
    }
    // Some servers send a bare `{"message": "…"}` or `{"detail": "…"}`.
    #[derive(Deserialize)]
    struct Flat {
        message: Option<String>,
        detail: Option<String>,
    }
    let flat = serde_json::from_slice::<Flat>(body).ok()?;
    flat.message.or(flat.detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_shape() {
        let openai = br#"{"error":{"message":"Rate limit reached","type":"requests","code":null}}"#;
        assert_eq!(
            upstream_error_message(openai).as_deref(),
            Some("Rate limit reached")
        );
        let anthropic =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            upstream_error_message(anthropic).as_deref(),
            Some("Overloaded")
        );
        let gemini =
            br#"{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            upstream_error_message(gemini).as_deref(),
            Some("API key not valid")
        );
        assert_eq!(
            upstream_error_message(br#"{"error":"boom"}"#).as_deref(),
            Some("boom")
        );
        assert_eq!(
            upstream_error_message(br#"{"detail":"nope"}"#).as_deref(),
            Some("nope")
        );
        assert_eq!(upstream_error_message(b"<html>"), None);
    }
}
