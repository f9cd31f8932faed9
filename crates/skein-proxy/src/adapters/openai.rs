//! OpenAI and the OpenAI-compatible family (Mistral, Groq, DeepSeek, vLLM, Ollama…): the
//! client's OpenAI requests pass through with only `model` (and `stream_options`) rewritten;
//! an Anthropic client's request is translated into chat.

use bytes::Bytes;
use skein_core::Candidate;
use skein_providers::openai;
use skein_types::ProviderKind;

use super::ProviderAdapter;
use crate::error::ApiError;
use crate::inbound::{Api, Call};
use crate::translate::ResponseTranslation;
use crate::upstream::{PreparedRequest, upstream_uri};

pub struct OpenAi;

impl ProviderAdapter for OpenAi {
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError> {
        prepare(call, candidate, |path| {
            format!("{}{path}", candidate.deployment.provider.base_url)
        })
    }

    fn translation(&self, call: &Call<'_>, _candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        call.from_openai_chat()
    }
}

/// An OpenAI-shaped request (for OpenAI and Azure, which differ only in their URLs).
pub(super) fn prepare(
    call: &Call<'_>,
    candidate: &Candidate,
    url: impl Fn(&'static str) -> String,
) -> Result<PreparedRequest, ApiError> {
    match call.api.openai_path() {
        Some(path) => Ok(PreparedRequest {
            uri: upstream_uri(candidate, call.api.label(), || url(path))?,
            body: Bytes::from(openai::passthrough_body(
                &call.request,
                &candidate.deployment.model,
                call.shape,
            )),
            headers: Vec::new(),
        }),
        None => {
            if call.api == Api::CountTokens {
                return Err(crate::inbound::unsupported(candidate, "count_tokens"));
            }
            let provider = &candidate.deployment.provider;
            let max_completion_tokens =
                matches!(provider.kind, ProviderKind::OpenAi | ProviderKind::Azure);
            let chat = call.chat(candidate, max_completion_tokens)?;
            let path = "/chat/completions";
            Ok(PreparedRequest {
                uri: upstream_uri(candidate, Api::ChatCompletions.label(), || url(path))?,
                body: Bytes::from(chat.to_string()),
                headers: Vec::new(),
            })
        }
    }
}
