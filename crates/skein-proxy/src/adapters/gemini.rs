//! Google Gemini: `generateContent` and `streamGenerateContent` for chat (every client's
//! request translated from OpenAI chat), `batchEmbedContents` for embeddings.

use axum::http::{HeaderName, HeaderValue};
use bytes::Bytes;
use skein_core::{Candidate, Secret};
use skein_providers::gemini::{self, GeminiToOpenAiStream};
use skein_providers::openai::PassthroughStream;
use skein_providers::{StreamTranslator, TranslateError, Usage};

use super::ProviderAdapter;
use crate::error::ApiError;
use crate::inbound::{Api, Call, unsupported, untranslatable};
use crate::translate::{ResponseTranslation, unix_now};
use crate::upstream::{PreparedRequest, upstream_uri};

pub struct Gemini;

impl ProviderAdapter for Gemini {
    fn prepare(&self, call: &Call<'_>, candidate: &Candidate) -> Result<PreparedRequest, ApiError> {
        let model = &candidate.deployment.model;
        let base_url = &candidate.deployment.provider.base_url;
        match call.api {
            Api::Embeddings => {
                let translated = gemini::embeddings_request_from_openai(call.tree()?, model)
                    .map_err(untranslatable)?;
                let uri = upstream_uri(candidate, "gemini_embed", || {
                    format!("{base_url}{}", gemini::embed_path(model))
                })?;
                Ok(PreparedRequest {
                    uri,
                    body: crate::translate::json_bytes(&translated),
                    headers: Vec::new(),
                })
            }
            Api::Completions | Api::CountTokens => Err(unsupported(candidate, call.api.label())),
            Api::ChatCompletions | Api::Messages | Api::Responses => {
                let chat = call.chat(candidate, false, true)?;
                let mut translated = gemini::request_from_openai(&chat).map_err(untranslatable)?;
                if let Some(config) = translated.get_mut("generationConfig") {
                    super::clamp_tree(config, call.output_limit(candidate), &["maxOutputTokens"]);
                }
                let stream = call.shape.stream;
                let purpose = if stream {
                    "gemini_stream"
                } else {
                    "gemini_generate"
                };
                let uri = upstream_uri(candidate, purpose, || {
                    format!("{base_url}{}", gemini::path(model, stream))
                })?;
                Ok(PreparedRequest {
                    uri,
                    body: crate::translate::json_bytes(&translated),
                    headers: Vec::new(),
                })
            }
        }
    }

    /// Gemini takes the key in `x-goog-api-key`.
    fn auth_header(&self, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
        super::secret_header(
            HeaderName::from_static("x-goog-api-key"),
            secret.expose().to_owned(),
        )
    }

    fn translation(&self, call: &Call<'_>, candidate: &Candidate) -> Box<dyn ResponseTranslation> {
        let model = candidate.deployment.model.clone();
        match call.api {
            Api::Embeddings => {
                let base64 = call
                    .request
                    .get_str("encoding_format")
                    .ok()
                    .flatten()
                    .is_some_and(|format| format == "base64");
                Box::new(Embeddings { model, base64 })
            }
            _ => call.after_chat(
                Box::new(ToChat {
                    client_wants_usage: call.chat_usage(),
                    model,
                }),
                true,
            ),
        }
    }
}

/// A Gemini answer read into OpenAI chat.
struct ToChat {
    client_wants_usage: bool,
    model: String,
}

impl ResponseTranslation for ToChat {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (answer, usage) = gemini::response_to_openai(&body, &self.model, unix_now())?;
        Ok((crate::translate::json_bytes(&answer), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(GeminiToOpenAiStream::new(
            self.client_wants_usage,
            &self.model,
            unix_now(),
        ))
    }
}

/// Gemini embeddings read into OpenAI's embeddings list.
struct Embeddings {
    model: String,
    base64: bool,
}

impl ResponseTranslation for Embeddings {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (answer, usage) =
            gemini::embeddings_response_to_openai(&body, &self.model, self.base64)?;
        Ok((crate::translate::json_bytes(&answer), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        // Embeddings never stream; a passthrough keeps the type total.
        Box::new(PassthroughStream::new(false))
    }
}
