//! One adapter per provider wire protocol: everything Skein knows about talking to it — the
//! URL of each endpoint, the header that carries a key and the others it needs, how a
//! client's request becomes its request, and how its answer becomes the client's. Adding a
//! provider means a file here (plus its fixtures) and one arm in [`for_protocol`].

mod anthropic;
mod azure;
mod gemini;
mod openai;

use axum::http::{HeaderName, HeaderValue};
use skein_core::{Candidate, Secret};
use skein_types::WireProtocol;

use crate::error::ApiError;
use crate::inbound::Call;
use crate::translate::ResponseTranslation;
use crate::upstream::PreparedRequest;

/// How to talk to one kind of upstream.
pub trait ProviderAdapter: Sync {
    /// The upstream request for `call` on `candidate`: URL, body in the provider's wire
    /// format, and the protocol's own headers.
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError>;

    /// How the provider's answer to `call` becomes the client's.
    fn translation(&self, call: &Call<'_>, candidate: &Candidate) -> Box<dyn ResponseTranslation>;

    /// The header that carries a key's secret to the provider (made once per key, on its first
    /// use; see [`auth_header`]).
    fn auth_header(&self, secret: &Secret) -> Option<(HeaderName, HeaderValue)>;
}

/// A header carrying a secret, marked sensitive (left out of any debug output of the
/// request); `None` when the text is no header value (the config refused such a secret).
pub(crate) fn secret_header(name: HeaderName, value: String) -> Option<(HeaderName, HeaderValue)> {
    let mut value = HeaderValue::try_from(value).ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// The auth header of the candidate's key, as its provider's adapter writes it.
pub fn auth_header(candidate: &Candidate) -> Option<&(HeaderName, HeaderValue)> {
    let key = candidate.key();
    key.auth_header
        .get_or_init(|| {
            key.secret
                .as_ref()
                .and_then(|secret| for_candidate(candidate).auth_header(secret))
        })
        .as_ref()
}

/// The adapter of a wire protocol.
pub fn for_protocol(protocol: WireProtocol) -> &'static dyn ProviderAdapter {
    match protocol {
        WireProtocol::OpenAi => &openai::OpenAi,
        WireProtocol::Azure => &azure::Azure,
        WireProtocol::Anthropic => &anthropic::Anthropic,
        WireProtocol::Gemini => &gemini::Gemini,
    }
}

/// The members that bound a request's output tokens, in every wire format Skein writes.
pub const LIMIT_MEMBERS: &[&str] = &["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Replacements that bring each of `members` above `limit` down to it, for a request passed
/// through as it came (nothing without a limit, the usual case).
pub fn clamped(
    request: &skein_providers::RawObject<'_>,
    limit: Option<u64>,
    members: &[&'static str],
) -> Vec<(&'static str, String)> {
    let Some(limit) = limit else {
        return Vec::new();
    };
    members
        .iter()
        .filter(|name| {
            request
                .get_as::<u64>(name)
                .ok()
                .flatten()
                .is_some_and(|asked| asked > limit)
        })
        .map(|name| (*name, limit.to_string()))
        .collect()
}

/// Bring each of `members` of a translated request above `limit` down to it.
pub fn clamp_tree(body: &mut serde_json::Value, limit: Option<u64>, members: &[&str]) {
    let Some(limit) = limit else {
        return;
    };
    for name in members {
        if let Some(value) = body.get_mut(*name)
            && value.as_u64().is_some_and(|asked| asked > limit)
        {
            *value = serde_json::Value::from(limit);
        }
    }
}

/// The adapter of a candidate's provider.
pub fn for_candidate(candidate: &Candidate) -> &'static dyn ProviderAdapter {
    for_protocol(candidate.deployment.provider.protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_carries_the_key_in_its_own_sensitive_header() {
        let secret = Secret::new("sk-test");
        for (protocol, name, value) in [
            (WireProtocol::OpenAi, "authorization", "Bearer sk-test"),
            (WireProtocol::Azure, "api-key", "sk-test"),
            (WireProtocol::Anthropic, "x-api-key", "sk-test"),
            (WireProtocol::Gemini, "x-goog-api-key", "sk-test"),
        ] {
            let (header, written) = for_protocol(protocol)
                .auth_header(&secret)
                .expect("a header");
            assert_eq!(header.as_str(), name, "{protocol:?}");
            assert_eq!(written, value, "{protocol:?}");
            assert!(written.is_sensitive(), "{protocol:?}");
        }
        assert!(
            for_protocol(WireProtocol::OpenAi)
                .auth_header(&Secret::new("bad\nkey"))
                .is_none()
        );
    }
}
