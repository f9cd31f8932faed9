//! The inbound APIs a client can call, and what each needs apart from the others: how its
//! request reads (stream or not), how it becomes OpenAI chat for an upstream that does not
//! speak it, and how an OpenAI chat answer becomes its own shape again.
//!
//! OpenAI chat is the common language: an adapter that does not speak the client's API
//! natively takes the request as chat ([`Call::chat`]) and gives its answer as chat
//! ([`Call::after_chat`]).

use std::borrow::Cow;
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde_json::Value;
use skein_core::Candidate;
use skein_providers::openai::{PassthroughStream, StreamShape};
use skein_providers::{RawObject, StreamTranslator, TranslateError, Usage};
use skein_providers::{anthropic, openai, responses};

use crate::error::{ApiError, ErrorShape};
use crate::translate::{ResponseTranslation, Then};

/// What the client called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions` (legacy text completions)
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/messages` (Anthropic)
    Messages,
    /// `POST /v1/messages/count_tokens` (Anthropic)
    CountTokens,
    /// `POST /v1/responses` (OpenAI's Responses API)
    Responses,
}

impl Api {
    /// Low-cardinality label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Messages => "messages",
            Api::CountTokens => "count_tokens",
            Api::Responses => "responses",
        }
    }

    /// The shape of the errors the client expects.
    pub fn error_shape(self) -> ErrorShape {
        match self {
            Api::Messages | Api::CountTokens => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }

    /// Path below an OpenAI-style base URL (`…/v1`), for the APIs OpenAI speaks.
    pub fn openai_path(self) -> Option<&'static str> {
        match self {
            Api::ChatCompletions => Some("/chat/completions"),
            Api::Completions => Some("/completions"),
            Api::Embeddings => Some("/embeddings"),
            Api::Responses => Some("/responses"),
            Api::Messages | Api::CountTokens => None,
        }
    }

    /// Whether a call holds budget and counts against token limits (counting tokens is free).
    pub fn reserves(self) -> bool {
        !matches!(self, Api::CountTokens)
    }

    /// Read what the request says about streaming, and check what this API requires.
    pub fn stream_shape(self, request: &RawObject<'_>) -> Result<StreamShape, ApiError> {
        const NO_STREAM: StreamShape = StreamShape {
            stream: false,
            client_wants_usage: false,
        };
        match self {
            Api::ChatCompletions | Api::Completions => {
                openai::stream_shape(request).map_err(ApiError::invalid)
            }
            Api::Embeddings | Api::CountTokens => Ok(NO_STREAM),
            Api::Messages => {
                let stream = request.get_bool("stream").map_err(ApiError::invalid)?;
                if request.get("messages").is_none() {
                    return Err(ApiError::invalid("`messages` is required").with_param("messages"));
                }
                Ok(StreamShape {
                    stream,
                    client_wants_usage: false,
                })
            }
            Api::Responses => {
                let stream = request.get_bool("stream").map_err(ApiError::invalid)?;
                if request.get("input").is_none() && request.get("previous_response_id").is_none() {
                    return Err(ApiError::invalid("`input` is required").with_param("input"));
                }
                Ok(StreamShape {
                    stream,
                    client_wants_usage: false,
                })
            }
        }
    }
}

/// One client call as every step and adapter sees it.
pub struct Call<'a> {
    pub api: Api,
    /// The request body, read lazily member by member.
    pub request: RawObject<'a>,
    pub bytes: &'a Bytes,
    /// The client's headers (for the ones passed on, such as `anthropic-beta`).
    pub headers: &'a HeaderMap,
    /// The query string of the client's URL (`beta=true`), passed on by native adapters.
    pub query: Option<&'a str>,
    /// The model the client asked for.
    pub requested_model: &'a str,
    pub shape: StreamShape,
    /// The request as a JSON tree, built once on first use (by a translation).
    tree: OnceLock<Result<Value, String>>,
    /// For the Responses API: the response's id, what it echoes, and the conversation before.
    pub responses: Option<Box<ResponsesCall>>,
    /// The output tokens the call's budget hold pays for, when the client set no limit of its
    /// own: every upstream request carries it as its output limit.
    pub output_cap: Option<u64>,
}

/// What a Responses call carries besides its body.
pub struct ResponsesCall {
    pub echo: std::sync::Arc<responses::Echo>,
    /// The items of the conversation before this turn (from `previous_response_id`).
    pub history: Vec<Value>,
    /// Built-in tools a translated request leaves out.
    pub dropped: Vec<String>,
}

impl<'a> Call<'a> {
    pub fn new(
        api: Api,
        request: RawObject<'a>,
        bytes: &'a Bytes,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
        requested_model: &'a str,
        shape: StreamShape,
    ) -> Call<'a> {
        Call {
            api,
            request,
            bytes,
            headers,
            query,
            requested_model,
            shape,
            tree: OnceLock::new(),
            responses: None,
            output_cap: None,
        }
    }

    /// The most output tokens `candidate` may produce for this call: the deployment's limit,
    /// and what the call's budget hold pays for.
    pub fn output_limit(&self, candidate: &Candidate) -> Option<u64> {
        match (candidate.deployment.max_output_tokens, self.output_cap) {
            (Some(most), Some(cap)) => Some(most.min(cap)),
            (most, cap) => most.or(cap),
        }
    }

    /// The request as a JSON tree.
    pub fn tree(&self) -> Result<&Value, ApiError> {
        self.tree
            .get_or_init(|| {
                serde_json::from_slice::<Value>(self.bytes).map_err(|error| error.to_string())
            })
            .as_ref()
            .map_err(|message| ApiError::invalid(message.clone()))
    }

    /// The request in OpenAI chat form, for `candidate` (whose model it names, with
    /// `max_completion_tokens` rather than `max_tokens` when the upstream wants that, and a
    /// Responses `web_search` tool as `web_search_options` when it runs a search of its own).
    pub fn chat(
        &self,
        candidate: &Candidate,
        max_completion_tokens: bool,
        web_search: bool,
    ) -> Result<Cow<'_, Value>, ApiError> {
        let mut chat = self.chat_unlimited(candidate, max_completion_tokens, web_search)?;
        if let Some(cap) = self.output_cap
            && !crate::adapters::LIMIT_MEMBERS
                .iter()
                .any(|name| chat.get(*name).is_some_and(|value| !value.is_null()))
            && let Some(object) = chat.to_mut().as_object_mut()
        {
            let name = if max_completion_tokens {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            object.insert(name.to_owned(), Value::from(cap));
        }
        Ok(chat)
    }

    /// [`Call::chat`] before the budget's output cap.
    fn chat_unlimited(
        &self,
        candidate: &Candidate,
        max_completion_tokens: bool,
        web_search: bool,
    ) -> Result<Cow<'_, Value>, ApiError> {
        let model = &candidate.deployment.model;
        match self.api {
            Api::ChatCompletions => self.tree().map(Cow::Borrowed),
            Api::Messages => {
                anthropic::request_to_openai(self.tree()?, model, max_completion_tokens)
                    .map(Cow::Owned)
                    .map_err(untranslatable)
            }
            Api::Responses => self
                .responses_chat(candidate, max_completion_tokens, web_search, None)?
                .tree()
                .map(Cow::Owned)
                .map_err(untranslatable),
            Api::Completions | Api::Embeddings | Api::CountTokens => {
                Err(unsupported(candidate, self.api.label()))
            }
        }
    }

    /// The request in OpenAI chat form, as the JSON to send `candidate` (an OpenAI-shaped
    /// upstream): [`Call::chat`] with a `max_tokens` above the deployment's limit lowered to
    /// it. A Responses request is written straight from its members, without a tree.
    pub fn chat_body(
        &self,
        candidate: &Candidate,
        max_completion_tokens: bool,
    ) -> Result<Bytes, ApiError> {
        let limit = self.output_limit(candidate);
        if self.api == Api::Responses {
            return self
                .responses_chat(candidate, max_completion_tokens, false, limit)
                .map(|chat| Bytes::from(chat.body));
        }
        let mut chat = self.chat(candidate, max_completion_tokens, false)?;
        if let Some(limit) = limit
            && crate::adapters::LIMIT_MEMBERS
                .iter()
                .any(|name| chat.get(*name).and_then(Value::as_u64) > Some(limit))
        {
            crate::adapters::clamp_tree(chat.to_mut(), Some(limit), crate::adapters::LIMIT_MEMBERS);
        }
        Ok(crate::translate::json_bytes(&chat))
    }

    /// A Responses request as chat, for `candidate`.
    fn responses_chat(
        &self,
        candidate: &Candidate,
        max_completion_tokens: bool,
        web_search: bool,
        output_limit: Option<u64>,
    ) -> Result<responses::ChatRequest, ApiError> {
        let history = self
            .responses
            .as_ref()
            .map(|call| call.history.as_slice())
            .unwrap_or_default();
        let target = responses::ChatTarget {
            model: &candidate.deployment.model,
            max_completion_tokens,
            web_search,
            output_limit,
            fill_limit: self.output_cap.is_some(),
        };
        responses::request_to_chat(&self.request, history, target).map_err(untranslatable)
    }

    /// Whether a reader into OpenAI chat must emit usage in its stream: the client asked for
    /// it, or a writer after it needs it.
    pub fn chat_usage(&self) -> bool {
        match self.api {
            Api::ChatCompletions | Api::Completions => self.shape.client_wants_usage,
            _ => true,
        }
    }

    /// The client's translation when the upstream's answer has been read into OpenAI chat by
    /// `reader` (`web_search`: the upstream ran the request's web search itself).
    pub fn after_chat(
        &self,
        reader: Box<dyn ResponseTranslation>,
        web_search: bool,
    ) -> Box<dyn ResponseTranslation> {
        match self.chat_writer(web_search) {
            None => reader,
            Some(writer) => Box::new(Then {
                first: reader,
                second: writer,
            }),
        }
    }

    /// The client's translation when the upstream answered in OpenAI chat itself.
    pub fn from_openai_chat(&self) -> Box<dyn ResponseTranslation> {
        self.chat_writer(false).unwrap_or_else(|| {
            Box::new(OpenAiPassthrough {
                client_wants_usage: self.shape.client_wants_usage,
            })
        })
    }

    /// What writes the client's shape from OpenAI chat (none for a chat client).
    fn chat_writer(&self, web_search: bool) -> Option<Box<dyn ResponseTranslation>> {
        match self.api {
            Api::Messages => Some(Box::new(ChatToMessages {
                requested_model: self.requested_model.to_owned(),
            })),
            Api::Responses => self.responses.as_ref().map(|call| {
                let dropped: Vec<&str> = call
                    .dropped
                    .iter()
                    .map(String::as_str)
                    .filter(|kind| !(web_search && kind.starts_with("web_search")))
                    .collect();
                Box::new(ChatToResponses {
                    echo: std::sync::Arc::clone(&call.echo),
                    dropped: dropped.join(","),
                }) as Box<dyn ResponseTranslation>
            }),
            Api::ChatCompletions | Api::Completions | Api::Embeddings | Api::CountTokens => None,
        }
    }
}

/// An answer in the client's own OpenAI API: passed through, usage read on the way.
pub struct OpenAiPassthrough {
    pub client_wants_usage: bool,
}

impl ResponseTranslation for OpenAiPassthrough {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let usage = openai::response_usage(&body);
        Ok((body, usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(PassthroughStream::new(self.client_wants_usage))
    }
}

/// OpenAI chat → the Anthropic Messages answer an Anthropic client expects.
struct ChatToMessages {
    requested_model: String,
}

impl ResponseTranslation for ChatToMessages {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (answer, usage) = anthropic::response_from_openai(&body, &self.requested_model)?;
        Ok((crate::translate::json_bytes(&answer), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(anthropic::OpenAiToAnthropicStream::new(
            &self.requested_model,
        ))
    }
}

/// OpenAI chat → a Responses API answer.
struct ChatToResponses {
    echo: std::sync::Arc<responses::Echo>,
    /// Built-in tools the translated request left out, comma-separated.
    dropped: String,
}

impl ResponseTranslation for ChatToResponses {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (answer, usage) = responses::response_from_chat(&body, &self.echo)?;
        Ok((Bytes::from(answer), usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(responses::ChatToResponsesStream::new(
            std::sync::Arc::clone(&self.echo),
        ))
    }

    fn note(&self) -> Option<(HeaderName, HeaderValue)> {
        if self.dropped.is_empty() {
            return None;
        }
        let value = HeaderValue::from_str(&self.dropped).ok()?;
        Some((HeaderName::from_static("x-skein-dropped-tools"), value))
    }
}

/// A request that cannot be translated: the client's fault.
pub fn untranslatable(error: TranslateError) -> ApiError {
    ApiError::invalid(error.message().to_owned()).with_detail_code("untranslatable_request")
}

/// A provider that cannot serve what the client called.
pub fn unsupported(candidate: &Candidate, what: &str) -> ApiError {
    let provider = &candidate.deployment.provider;
    ApiError::invalid(format!(
        "provider {} ({}) cannot serve {what}",
        provider.name,
        provider.kind.as_str()
    ))
    .with_detail_code("unsupported_provider")
}
