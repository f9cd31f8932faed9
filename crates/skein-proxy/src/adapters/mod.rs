//! One adapter per provider wire protocol: everything Skein knows about talking to it — the
//! URL of each endpoint, the headers it needs besides the key's own, how a client's request
//! becomes its request, and how its answer becomes the client's. Adding a provider means a
//! file here (plus its fixtures) and one arm in [`for_protocol`].

mod anthropic;
mod azure;
mod gemini;
mod openai;

use skein_core::Candidate;
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
