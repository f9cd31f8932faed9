//! OpenAI and the OpenAI-compatible family (Mistral, Groq, DeepSeek, vLLM, Ollama…): the
//! client's OpenAI requests pass through with only `model` (and `stream_options`) rewritten;
//! an Anthropic client's request is translated into chat. The Responses API passes through to
//! OpenAI itself (and Azure); the compatible family, which mostly lacks it, gets chat.

use axum::http::{HeaderName, HeaderValue};
use bytes::Bytes;
use skein_core::{Candidate, Secret};
use skein_providers::raw::to_json_text;
use skein_providers::{StreamTranslator, TranslateError, Usage, openai, responses};
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

    /// OpenAI and the compatible family take a bearer token.
    fn auth_header(&self, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
        super::secret_header(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {}", secret.expose()),
        )
    }

    fn translation(&self, call: &Call<'_>, candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        translation(call, candidate)
    }
}

/// Whether `candidate` speaks the client's API itself.
fn native(call: &Call<'_>, candidate: &Candidate) -> bool {
    match call.api {
        Api::ChatCompletions | Api::Completions | Api::Embeddings => true,
        Api::Responses => matches!(
            candidate.deployment.provider.kind,
            ProviderKind::OpenAi | ProviderKind::Azure
        ),
        Api::Messages | Api::CountTokens => false,
    }
}

/// An OpenAI-shaped request (for OpenAI and Azure, which differ only in their URLs).
pub(super) fn prepare(
    call: &Call<'_>,
    candidate: &Candidate,
    url: impl Fn(&'static str) -> String,
) -> Result<PreparedRequest, ApiError> {
    if call.api == Api::CountTokens {
        return Err(crate::inbound::unsupported(candidate, "count_tokens"));
    }
    if native(call, candidate)
        && let Some(path) = call.api.openai_path()
    {
        let limit = call.output_limit(candidate);
        let body = if call.api == Api::Responses {
            responses_body(call, &candidate.deployment.model, limit)?
        } else {
            let mut clamped = super::clamped(&call.request, limit, super::LIMIT_MEMBERS);
            if call.output_cap.is_some()
                && let Some(limit) = limit
            {
                // The client set no limit: the one its budget hold pays for.
                let member = match (call.api, candidate.deployment.provider.kind) {
                    (Api::ChatCompletions, ProviderKind::OpenAi | ProviderKind::Azure) => {
                        "max_completion_tokens"
                    }
                    _ => "max_tokens",
                };
                clamped.push((member, limit.to_string()));
            }
            let extra: Vec<(&str, &str)> = clamped
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            openai::passthrough_body_with(
                &call.request,
                &candidate.deployment.model,
                call.shape,
                &extra,
            )
        };
        return Ok(PreparedRequest {
            uri: upstream_uri(candidate, call.api.label(), || url(path))?,
            body: Bytes::from(body),
            headers: Vec::new(),
        });
    }
    let provider = &candidate.deployment.provider;
    let max_completion_tokens = matches!(provider.kind, ProviderKind::OpenAi | ProviderKind::Azure);
    let body = call.chat_body(candidate, max_completion_tokens)?;
    let path = "/chat/completions";
    Ok(PreparedRequest {
        uri: upstream_uri(candidate, Api::ChatCompletions.label(), || url(path))?,
        body,
        headers: Vec::new(),
    })
}

/// A Responses request for a Responses upstream: the deployment's model, and the conversation
/// Skein keeps in `input` in place of `previous_response_id` (the upstream need not have it:
/// the turn before may have been served by another provider). Every other member is copied
/// byte for byte.
fn responses_body(call: &Call<'_>, model: &str, limit: Option<u64>) -> Result<Vec<u8>, ApiError> {
    let model_json = to_json_text(&model);
    let mut clamped = super::clamped(&call.request, limit, &["max_output_tokens"]);
    if call.output_cap.is_some()
        && let Some(limit) = limit
    {
        // The client set no limit: the one its budget hold pays for.
        clamped.push(("max_output_tokens", limit.to_string()));
    }
    let mut body = Vec::with_capacity(call.bytes.len() + 32);
    let history = call
        .responses
        .as_ref()
        .map(|responses| responses.history.as_slice())
        .unwrap_or_default();
    let mut replacements: Vec<(&str, &str)> = vec![("model", &model_json)];
    replacements.extend(clamped.iter().map(|(name, value)| (*name, value.as_str())));
    let input_json;
    if !history.is_empty() {
        let input = responses::expanded_input(history, call.tree()?);
        input_json = to_json_text(&input);
        replacements.push(("input", &input_json));
        replacements.push(("previous_response_id", "null"));
    }
    call.request.write_with(&replacements, &mut body);
    Ok(body)
}

/// How an OpenAI-shaped answer becomes the client's.
pub(super) fn translation(call: &Call<'_>, candidate: &Candidate) -> Box<dyn ResponseTranslation> {
    match (&call.responses, native(call, candidate)) {
        (Some(responses), true) => Box::new(NativeResponses {
            id: responses.echo.id.clone(),
            previous: responses.echo.previous_response_id().map(str::to_owned),
        }),
        _ => call.from_openai_chat(),
    }
}

/// A Responses answer from a Responses upstream: passed through with Skein's response id.
struct NativeResponses {
    id: String,
    /// The client's `previous_response_id`, put back on the answer.
    previous: Option<String>,
}

impl ResponseTranslation for NativeResponses {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let mut response: serde_json::Value = serde_json::from_slice(&body).map_err(|error| {
            TranslateError::upstream(format!("the provider's answer is not JSON: {error}"))
        })?;
        let usage = responses::rename_response(&mut response, &self.id, self.previous.as_deref());
        Ok((crate::translate::json_bytes(&response), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(responses::PassthroughStream::new(
            self.id.clone(),
            self.previous.clone(),
        ))
    }
}
