//! Anthropic's Messages API: an Anthropic client's requests pass through with `model`
//! rewritten and its `anthropic-version` and `anthropic-beta` headers kept; OpenAI clients'
//! requests are translated from chat.

use axum::http::{HeaderName, HeaderValue};
use bytes::Bytes;
use skein_core::{Candidate, Secret};
use skein_providers::{StreamTranslator, TranslateError, Usage, anthropic};

use super::ProviderAdapter;
use crate::error::ApiError;
use crate::inbound::{Api, Call, unsupported, untranslatable};
use crate::translate::{ResponseTranslation, unix_now};
use crate::upstream::{PreparedRequest, upstream_uri};

pub struct Anthropic;

impl ProviderAdapter for Anthropic {
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError> {
        match call.api {
            Api::Messages => native(call, candidate, "/v1/messages"),
            Api::CountTokens => native(call, candidate, "/v1/messages/count_tokens"),
            Api::ChatCompletions | Api::Responses => {
                let chat = call.chat(candidate, false, true)?;
                let mut translated =
                    anthropic::request_from_openai(&chat, &candidate.deployment.model)
                        .map_err(untranslatable)?;
                super::clamp_tree(
                    &mut translated,
                    call.output_limit(candidate),
                    &["max_tokens"],
                );
                request(
                    call,
                    candidate,
                    "/v1/messages",
                    crate::translate::json_bytes(&translated),
                    false,
                )
            }
            Api::Completions | Api::Embeddings => Err(unsupported(candidate, call.api.label())),
        }
    }

    /// Anthropic takes the key in `x-api-key`.
    fn auth_header(&self, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
        super::secret_header(
            HeaderName::from_static("x-api-key"),
            secret.expose().to_owned(),
        )
    }

    fn translation(&self, call: &Call<'_>, _candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        match call.api {
            Api::Messages | Api::CountTokens => Box::new(Native),
            _ => call.after_chat(
                Box::new(ToChat {
                    client_wants_usage: call.chat_usage(),
                }),
                true,
            ),
        }
    }
}

/// The client's own Anthropic request, with the deployment's model.
fn native(
    call: &Call<'_>,
    candidate: &Candidate,
    path: &'static str,
) -> Result<PreparedRequest, ApiError> {
    let model_json = serde_json::to_string(&candidate.deployment.model).unwrap_or_default();
    let mut body = Vec::with_capacity(call.bytes.len() + 32);
    let limit = call.output_limit(candidate);
    let mut clamped = super::clamped(&call.request, limit, &["max_tokens"]);
    if call.output_cap.is_some()
        && let Some(limit) = limit
    {
        // The client set no limit (Anthropic requires one): the one its budget hold pays for.
        clamped.push(("max_tokens", limit.to_string()));
    }
    let mut replacements: Vec<(&str, &str)> = vec![("model", &model_json)];
    replacements.extend(clamped.iter().map(|(name, value)| (*name, value.as_str())));
    call.request.write_with(&replacements, &mut body);
    request(call, candidate, path, Bytes::from(body), true)
}

/// An Anthropic upstream request; an Anthropic client's `anthropic-version` and
/// `anthropic-beta` are kept (`client_headers`).
fn request(
    call: &Call<'_>,
    candidate: &Candidate,
    path: &'static str,
    body: Bytes,
    client_headers: bool,
) -> Result<PreparedRequest, ApiError> {
    let header = |name: &str| client_headers.then(|| call.headers.get(name)).flatten();
    let version = header("anthropic-version")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(anthropic::DEFAULT_ANTHROPIC_VERSION));
    let mut headers = vec![(HeaderName::from_static("anthropic-version"), version)];
    if let Some(beta) = header("anthropic-beta") {
        headers.push((HeaderName::from_static("anthropic-beta"), beta.clone()));
    }
    let base = &candidate.deployment.provider.base_url;
    let uri = match call.query.filter(|_| client_headers) {
        // The client's query (Claude Code's `?beta=true`) goes on with its own request.
        Some(query) => format!("{base}{path}?{query}").parse().map_err(|_| {
            crate::error::ApiError::invalid("the request's query string is not valid")
        })?,
        None => upstream_uri(candidate, path, || format!("{base}{path}"))?,
    };
    Ok(PreparedRequest { uri, body, headers })
}

/// An Anthropic answer to an Anthropic client: passed through, usage read on the way.
struct Native;

impl ResponseTranslation for Native {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let usage = anthropic::response_usage(&body);
        Ok((body, usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(anthropic::AnthropicPassthroughStream::new())
    }
}

/// An Anthropic answer read into OpenAI chat.
struct ToChat {
    client_wants_usage: bool,
}

impl ResponseTranslation for ToChat {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (answer, usage) = anthropic::response_to_openai(&body, unix_now())?;
        Ok((crate::translate::json_bytes(&answer), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(anthropic::AnthropicToOpenAiStream::new(
            self.client_wants_usage,
            unix_now(),
        ))
    }
}
