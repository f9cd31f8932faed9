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

/// The adapter of a candidate's provider.
pub fn for_candidate(candidate: &Candidate) -> &'static dyn ProviderAdapter {
    for_protocol(candidate.deployment.provider.protocol)
}
