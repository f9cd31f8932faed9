//! HTTP handlers: read and check the request, dispatch it, shape the response.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;
use serde_json::json;
use skein_core::{Candidate, ResolveError, RouteRuntime, RuntimeConfig};
use skein_providers::openai::{self, StreamShape};
use skein_providers::{Endpoint, RawObject, StreamTranslator};
use skein_providers::{anthropic, gemini};
use skein_types::{ErrorCode, ProviderKind, WireProtocol};
use std::sync::OnceLock;

use crate::app::AppState;
use crate::auth::{Caller, authenticate};
use crate::dispatch::{EventStream, Failed, Mode, ServedBody, dispatch};
use crate::error::{ApiError, ErrorShape};
use crate::metrics::{EndpointLabels, ProviderLabels, RequestLabels, RouteLabels};
use crate::spend::{Hold, reserve};
use crate::translate::Translation;
use crate::upstream::{PreparedRequest, openai_uri, upstream_uri};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const SKEIN_PROVIDER: HeaderName = HeaderName::from_static("x-skein-provider");
const SKEIN_DEPLOYMENT: HeaderName = HeaderName::from_static("x-skein-deployment");
const SKEIN_ROUTE: HeaderName = HeaderName::from_static("x-skein-route");
const SKEIN_ATTEMPTS: HeaderName = HeaderName::from_static("x-skein-attempts");

/// Room for the headers of a served response (ours and the caller's rate-limit headers), so
/// the map is allocated once.
const RESPONSE_HEADERS: usize = 16;

/// Per-request facts every step needs.
pub(crate) struct RequestContext {
    pub request_id: String,
    pub started: Instant,
    pub endpoint: &'static str,
    pub shape: ErrorShape,
    _in_flight: InFlight,
}

/// Counts a request in the in-flight gauge while alive.
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestContext {
    pub(crate) fn new(
        state: &AppState,
        headers: &HeaderMap,
        endpoint: &'static str,
        shape: ErrorShape,
    ) -> RequestContext {
        state.metrics.in_flight.inc();
        RequestContext {
            request_id: request_id(headers),
            started: Instant::now(),
            endpoint,
            shape,
            _in_flight: InFlight(state.metrics.in_flight.clone()),
        }
    }
}

/// Take the client's `x-request-id` if it is sane, else mint one.
fn request_id(headers: &HeaderMap) -> String {
    if let Some(value) = headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        && !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|byte| byte.is_ascii_graphic())
    {
        return value.to_owned();
    }
    let mut minted = String::with_capacity(28);
    // Writing to a String cannot fail.
    let _ = write!(
        minted,
        "req_{:016x}{:08x}",
        fastrand::u64(..),
        fastrand::u32(..)
    );
    minted
}

/// Read the body up to the configured limit, within the body timeouts: at most
/// `body_idle_timeout` between two chunks and `body_timeout` in all (408 past either).
pub(crate) async fn read_body(state: &AppState, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    // A body declared larger than the limit (`content-length`) is refused before any of it is
    // read: nothing waits for a terabyte that may never come.
    let declared = http_body::Body::size_hint(&body).lower();
    if declared > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body ({declared} bytes declared) is larger than the limit of {limit} bytes"
            ),
        )
        .with_detail_code("request_too_large"));
    }
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .with_detail_code("request_too_large")
    };
    let mut body = body;
    let mut collected = Collected::default();
    // A body that is already here whole (the usual case) needs no timer.
    loop {
        match futures_util::FutureExt::now_or_never(http_body_util::BodyExt::frame(&mut body)) {
            Some(None) => return Ok(collected.finish()),
            Some(Some(frame)) => collected
                .push(frame, limit)
                .map_err(|error| error.unwrap_or_else(too_large))?,
            None => break,
        }
    }
    let (idle, total) = state.body_timeouts();
    let started = tokio::time::Instant::now();
    let deadline = started + total;
    let timer = tokio::time::sleep_until(deadline.min(started + idle));
    tokio::pin!(timer);
    loop {
        let frame = tokio::select! {
            biased;
            frame = http_body_util::BodyExt::frame(&mut body) => frame,
            () = &mut timer => {
                state.metrics.connections_shed.get_or_create(&crate::metrics::ShedLabels {
                    port: "proxy",
                    reason: "body_timeout",
                }).inc();
                let length = collected.length;
                tracing::warn!(received = length, "cut a request whose body arrived too slowly");
                return Err(ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body arrived too slowly ({length} bytes received; at most {} s between chunks, {} s in all)",
                        idle.as_secs(),
                        total.as_secs()
                    ),
                )
                .with_detail_code("request_timeout"));
            }
        };
        let Some(frame) = frame else {
            break;
        };
        collected
            .push(frame, limit)
            .map_err(|error| error.unwrap_or_else(too_large))?;
        let now = tokio::time::Instant::now();
        timer.as_mut().reset(deadline.min(now + idle));
    }
    Ok(collected.finish())
}

/// A request body being read: its first chunk as it came (no copy for a body in one chunk),
/// then everything joined.
#[derive(Default)]
struct Collected {
    first: Option<Bytes>,
    joined: Option<bytes::BytesMut>,
    length: u64,
}

impl Collected {
    /// Take a frame: `Err(None)` when the body passes `limit`, `Err(Some(_))` when it broke.
    fn push(
        &mut self,
        frame: Result<http_body::Frame<Bytes>, axum::Error>,
        limit: u64,
    ) -> Result<(), Option<ApiError>> {
        let frame = frame.map_err(|error| {
            Some(ApiError::invalid(format!(
                "could not read the request body: {error}"
            )))
        })?;
        let Ok(data) = frame.into_data() else {
            return Ok(());
        };
        self.length = self.length.saturating_add(data.len() as u64);
        if self.length > limit {
            return Err(None);
        }
        match (&self.first, &mut self.joined) {
            (None, _) => self.first = Some(data),
            (Some(head), None) => {
                let mut joined = bytes::BytesMut::with_capacity(head.len() + data.len());
                joined.extend_from_slice(head);
                joined.extend_from_slice(&data);
                self.joined = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
        Ok(())
    }

    fn finish(self) -> Bytes {
        match (self.first, self.joined) {
            (_, Some(joined)) => joined.freeze(),
            (Some(head), None) => head,
            (None, None) => Bytes::new(),
        }
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    openai_endpoint(state, Endpoint::ChatCompletions, parts.headers, body).await
}

pub async fn completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    openai_endpoint(state, Endpoint::Completions, parts.headers, body).await
}

pub async fn embeddings(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    openai_endpoint(state, Endpoint::Embeddings, parts.headers, body).await
}

/// Every OpenAI-shaped endpoint: parse, resolve, dispatch, respond. The handlers take the whole
/// request and split it, rather than axum's `HeaderMap` extractor, which copies the headers.
async fn openai_endpoint(
    state: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let context = RequestContext::new(&state, &headers, endpoint.label(), ErrorShape::OpenAi);
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let snapshot = state.config.load_full();
    let bytes = match read_body(&state, body, snapshot.server.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let Parsed {
        request,
        model,
        routes,
        requested_route,
    } = match parse_request(&snapshot, &bytes, caller.as_ref()) {
        Ok(parsed) => parsed,
        Err((error, model)) => {
            return finish_error(&state, &context, model.as_deref(), None, error);
        }
    };
    let shape = if endpoint.can_stream() {
        match openai::stream_shape(&request) {
            Ok(shape) => shape,
            Err(message) => {
                return finish_error(
                    &state,
                    &context,
                    Some(&model),
                    None,
                    ApiError::invalid(message),
                );
            }
        }
    } else {
        StreamShape {
            stream: false,
            client_wants_usage: false,
        }
    };
    // The full tree is only built when a candidate needs a translated request.
    let tree: OnceLock<Result<Value, String>> = OnceLock::new();
    let prepare = |candidate: &Candidate| -> Result<PreparedRequest, ApiError> {
        let provider = &candidate.deployment.provider;
        match (provider.protocol, endpoint) {
            (WireProtocol::OpenAi | WireProtocol::Azure, _) => Ok(PreparedRequest {
                uri: openai_uri(candidate, endpoint)?,
                body: Bytes::from(openai::passthrough_body(
                    &request,
                    &candidate.deployment.model,
                    shape,
                )),
                headers: Vec::new(),
            }),
            (WireProtocol::Anthropic, Endpoint::ChatCompletions) => {
                let parsed = tree
                    .get_or_init(|| {
                        serde_json::from_slice::<Value>(&bytes).map_err(|error| error.to_string())
                    })
                    .as_ref()
                    .map_err(|message| ApiError::invalid(message.clone()))?;
                let translated =
                    anthropic::request_from_openai(parsed, &candidate.deployment.model).map_err(
                        |message| {
                            ApiError::invalid(message).with_detail_code("untranslatable_request")
                        },
                    )?;
                anthropic_request(
                    candidate,
                    "/v1/messages",
                    translated.to_string(),
                    &HeaderMap::new(),
                )
            }
            (WireProtocol::Gemini, Endpoint::ChatCompletions) => {
                let parsed = parsed_tree(&tree, &bytes)?;
                let translated = gemini::request_from_openai(parsed).map_err(untranslatable)?;
                Ok(PreparedRequest {
                    uri: gemini_uri(candidate, shape.stream)?,
                    body: Bytes::from(translated.to_string()),
                    headers: Vec::new(),
                })
            }
            (WireProtocol::Gemini, Endpoint::Embeddings) => {
                let parsed = parsed_tree(&tree, &bytes)?;
                let translated =
                    gemini::embeddings_request_from_openai(parsed, &candidate.deployment.model)
                        .map_err(untranslatable)?;
                let uri = upstream_uri(candidate, "gemini_embed", || {
                    let path = gemini::embed_path(&candidate.deployment.model);
                    format!("{}{path}", candidate.deployment.provider.base_url)
                })?;
                Ok(PreparedRequest {
                    uri,
                    body: Bytes::from(translated.to_string()),
                    headers: Vec::new(),
                })
            }
            _ => Err(unsupported(candidate, endpoint.label())),
        }
    };
    let hold = match reserve(
        &state,
        caller.as_ref(),
        &model,
        &routes,
        &request,
        bytes.len(),
    ) {
        Ok(hold) => hold,
        Err(error) => return finish_error(&state, &context, Some(&model), None, error),
    };
    let deadline = context.started + Duration::from_millis(snapshot.server.request_timeout_ms);
    let mode = if shape.stream {
        Mode::Stream
    } else {
        Mode::Unary
    };
    let served = dispatch(
        &state,
        routes,
        mode,
        &context.request_id,
        deadline,
        &prepare,
    )
    .await;
    let base64_embeddings = request
        .get_str("encoding_format")
        .ok()
        .flatten()
        .is_some_and(|format| format == "base64");
    let translation_for = |candidate: &Candidate| {
        let client_wants_usage = shape.client_wants_usage;
        let model = || candidate.deployment.model.clone();
        match (candidate.deployment.provider.protocol, endpoint) {
            (WireProtocol::Anthropic, _) => Translation::AnthropicToOpenAi { client_wants_usage },
            (WireProtocol::Gemini, Endpoint::Embeddings) => Translation::GeminiEmbeddingsToOpenAi {
                model: model(),
                base64: base64_embeddings,
            },
            (WireProtocol::Gemini, _) => Translation::GeminiToOpenAi {
                client_wants_usage,
                model: model(),
            },
            _ => Translation::OpenAiPassthrough { client_wants_usage },
        }
    };
    respond(
        &state,
        context,
        &model,
        &requested_route,
        served,
        hold,
        translation_for,
    )
}

/// `POST /v1/messages`: the Anthropic Messages API, to Anthropic upstreams natively and to
/// OpenAI-shaped upstreams by translation.
pub async fn messages(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let context = RequestContext::new(&state, &headers, "messages", ErrorShape::Anthropic);
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let snapshot = state.config.load_full();
    let bytes = match read_body(&state, body, snapshot.server.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let Parsed {
        request,
        model,
        routes,
        requested_route,
    } = match parse_request(&snapshot, &bytes, caller.as_ref()) {
        Ok(parsed) => parsed,
        Err((error, model)) => {
            return finish_error(&state, &context, model.as_deref(), None, error);
        }
    };
    let stream = match request.get_bool("stream") {
        Ok(stream) => stream,
        Err(message) => {
            return finish_error(
                &state,
                &context,
                Some(&model),
                None,
                ApiError::invalid(message),
            );
        }
    };
    if request.get("messages").is_none() {
        let error = ApiError::invalid("`messages` is required").with_param("messages");
        return finish_error(&state, &context, Some(&model), None, error);
    }
    let tree: OnceLock<Result<Value, String>> = OnceLock::new();
    let prepare = |candidate: &Candidate| -> Result<PreparedRequest, ApiError> {
        let provider = &candidate.deployment.provider;
        match provider.protocol {
            WireProtocol::Anthropic => {
                let model_json =
                    serde_json::to_string(&candidate.deployment.model).unwrap_or_default();
                let mut body = Vec::with_capacity(bytes.len() + 32);
                request.write_with(&[("model", &model_json)], &mut body);
                anthropic_request_bytes(candidate, "/v1/messages", Bytes::from(body), &headers)
            }
            WireProtocol::OpenAi | WireProtocol::Azure => {
                let parsed = tree
                    .get_or_init(|| {
                        serde_json::from_slice::<Value>(&bytes).map_err(|error| error.to_string())
                    })
                    .as_ref()
                    .map_err(|message| ApiError::invalid(message.clone()))?;
                let uses_max_completion_tokens =
                    matches!(provider.kind, ProviderKind::OpenAi | ProviderKind::Azure);
                let translated = anthropic::request_to_openai(
                    parsed,
                    &candidate.deployment.model,
                    uses_max_completion_tokens,
                )
                .map_err(|message| {
                    ApiError::invalid(message).with_detail_code("untranslatable_request")
                })?;
                Ok(PreparedRequest {
                    uri: openai_uri(candidate, Endpoint::ChatCompletions)?,
                    body: Bytes::from(translated.to_string()),
                    headers: Vec::new(),
                })
            }
            WireProtocol::Gemini => {
                let parsed = parsed_tree(&tree, &bytes)?;
                let as_openai =
                    anthropic::request_to_openai(parsed, &candidate.deployment.model, false)
                        .map_err(untranslatable)?;
                let translated = gemini::request_from_openai(&as_openai).map_err(untranslatable)?;
                Ok(PreparedRequest {
                    uri: gemini_uri(candidate, stream)?,
                    body: Bytes::from(translated.to_string()),
                    headers: Vec::new(),
                })
            }
        }
    };
    let hold = match reserve(
        &state,
        caller.as_ref(),
        &model,
        &routes,
        &request,
        bytes.len(),
    ) {
        Ok(hold) => hold,
        Err(error) => return finish_error(&state, &context, Some(&model), None, error),
    };
    let deadline = context.started + Duration::from_millis(snapshot.server.request_timeout_ms);
    let mode = if stream { Mode::Stream } else { Mode::Unary };
    let served = dispatch(
        &state,
        routes,
        mode,
        &context.request_id,
        deadline,
        &prepare,
    )
    .await;
    let translation_for = |candidate: &Candidate| match candidate.deployment.provider.protocol {
        WireProtocol::Anthropic => Translation::AnthropicPassthrough,
        WireProtocol::Gemini => Translation::GeminiToAnthropic {
            requested_model: model.to_string(),
            model: candidate.deployment.model.clone(),
        },
        _ => Translation::OpenAiToAnthropic {
            requested_model: model.to_string(),
        },
    };
    respond(
        &state,
        context,
        &model,
        &requested_route,
        served,
        hold,
        translation_for,
    )
}

/// `POST /v1/messages/count_tokens`, where the upstream supports it (Anthropic).
pub async fn count_tokens(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let context = RequestContext::new(&state, &headers, "count_tokens", ErrorShape::Anthropic);
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let snapshot = state.config.load_full();
    let bytes = match read_body(&state, body, snapshot.server.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    let Parsed {
        request,
        model,
        routes,
        requested_route,
    } = match parse_request(&snapshot, &bytes, caller.as_ref()) {
        Ok(parsed) => parsed,
        Err((error, model)) => {
            return finish_error(&state, &context, model.as_deref(), None, error);
        }
    };
    let prepare = |candidate: &Candidate| -> Result<PreparedRequest, ApiError> {
        if candidate.deployment.provider.protocol != WireProtocol::Anthropic {
            return Err(unsupported(candidate, "count_tokens"));
        }
        let model_json = serde_json::to_string(&candidate.deployment.model).unwrap_or_default();
        let mut body = Vec::with_capacity(bytes.len() + 32);
        request.write_with(&[("model", &model_json)], &mut body);
        anthropic_request_bytes(
            candidate,
            "/v1/messages/count_tokens",
            Bytes::from(body),
            &headers,
        )
    };
    let deadline = context.started + Duration::from_millis(snapshot.server.request_timeout_ms);
    let served = dispatch(
        &state,
        routes,
        Mode::Unary,
        &context.request_id,
        deadline,
        &prepare,
    )
    .await;
    // The answer is `{"input_tokens": N}`, passed through as it is.
    respond(
        &state,
        context,
        &model,
        &requested_route,
        served,
        None,
        |_| Translation::OpenAiPassthrough {
            client_wants_usage: false,
        },
    )
}

/// The request as a JSON tree, built once on first use.
fn parsed_tree<'a>(
    tree: &'a OnceLock<Result<Value, String>>,
    bytes: &[u8],
) -> Result<&'a Value, ApiError> {
    tree.get_or_init(|| serde_json::from_slice::<Value>(bytes).map_err(|error| error.to_string()))
        .as_ref()
        .map_err(|message| ApiError::invalid(message.clone()))
}

fn untranslatable(message: String) -> ApiError {
    ApiError::invalid(message).with_detail_code("untranslatable_request")
}

/// A request body read as a JSON object, with its model resolved to routes.
struct Parsed<'a> {
    request: RawObject<'a>,
    model: Cow<'a, str>,
    /// The routes to try (the attempt plan takes them), the one asked for first.
    routes: Vec<Arc<RouteRuntime>>,
    /// The route asked for, kept for the response once the plan has taken `routes`.
    requested_route: Arc<RouteRuntime>,
}

/// Parse the body, read its `model` and resolve it. The error carries the model when known.
fn parse_request<'a>(
    snapshot: &RuntimeConfig,
    bytes: &'a [u8],
    caller: Option<&Caller>,
) -> Result<Parsed<'a>, (ApiError, Option<String>)> {
    let request = RawObject::parse(bytes).map_err(|error| {
        (
            ApiError::invalid(error.to_string()).with_detail_code("invalid_json"),
            None,
        )
    })?;
    let model = required_model(&request).map_err(|error| (error, None))?;
    if let Some(caller) = caller
        && !caller.allows_model(&model)
    {
        let error = ApiError::new(
            ErrorCode::PermissionDenied,
            format!("this API key is not allowed to use model `{model}`"),
        )
        .with_param("model")
        .with_detail_code("model_not_allowed");
        return Err((error, Some(model.into_owned())));
    }
    match snapshot.resolve(&model) {
        Ok(routes) => match routes.first().cloned() {
            Some(requested_route) => Ok(Parsed {
                request,
                model,
                routes,
                requested_route,
            }),
            None => Err((
                unknown_model(&model, ResolveError::UnknownModel { known: Vec::new() }),
                Some(model.into_owned()),
            )),
        },
        Err(error) => Err((unknown_model(&model, error), Some(model.into_owned()))),
    }
}

/// The `model` member, required and non-empty.
fn required_model<'a>(request: &RawObject<'a>) -> Result<Cow<'a, str>, ApiError> {
    match request.get_str("model") {
        Ok(Some(model)) if !model.is_empty() => Ok(model),
        Ok(_) => Err(ApiError::invalid("you must provide a model parameter")
            .with_param("model")
            .with_detail_code("missing_model")),
        Err(message) => Err(ApiError::invalid(message).with_param("model")),
    }
}

fn unsupported(candidate: &Candidate, what: &str) -> ApiError {
    let provider = &candidate.deployment.provider;
    ApiError::invalid(format!(
        "provider {} ({}) cannot serve {what}",
        provider.name,
        provider.kind.as_str()
    ))
    .with_detail_code("unsupported_provider")
}

/// Gemini's generate (or stream) URI for a candidate.
fn gemini_uri(candidate: &Candidate, stream: bool) -> Result<axum::http::Uri, ApiError> {
    let purpose = if stream {
        "gemini_stream"
    } else {
        "gemini_generate"
    };
    upstream_uri(candidate, purpose, || {
        let path = gemini::path(&candidate.deployment.model, stream);
        format!("{}{path}", candidate.deployment.provider.base_url)
    })
}

fn anthropic_request(
    candidate: &Candidate,
    path: &'static str,
    body: String,
    client_headers: &HeaderMap,
) -> Result<PreparedRequest, ApiError> {
    anthropic_request_bytes(candidate, path, Bytes::from(body), client_headers)
}

/// An Anthropic upstream request: the client's `anthropic-version` and `anthropic-beta` kept.
fn anthropic_request_bytes(
    candidate: &Candidate,
    path: &'static str,
    body: Bytes,
    client_headers: &HeaderMap,
) -> Result<PreparedRequest, ApiError> {
    let version = client_headers
        .get("anthropic-version")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(anthropic::DEFAULT_ANTHROPIC_VERSION));
    let mut headers = vec![(HeaderName::from_static("anthropic-version"), version)];
    if let Some(beta) = client_headers.get("anthropic-beta") {
        headers.push((HeaderName::from_static("anthropic-beta"), beta.clone()));
    }
    let uri = upstream_uri(candidate, path, || {
        format!("{}{path}", candidate.deployment.provider.base_url)
    })?;
    Ok(PreparedRequest { uri, body, headers })
}

/// Turn the attempt loop's outcome into the client's response, with the caller's rate-limit
/// headers.
fn respond(
    state: &Arc<AppState>,
    context: RequestContext,
    model: &str,
    requested_route: &RouteRuntime,
    served: Result<crate::dispatch::Served, Box<Failed>>,
    hold: Option<Hold>,
    translation_for: impl Fn(&Candidate) -> Translation,
) -> Response {
    let mut hold = hold;
    let rate_headers = hold
        .as_mut()
        .map(|hold| std::mem::take(&mut hold.rate_headers));
    let mut response = respond_with(
        state,
        context,
        model,
        requested_route,
        served,
        hold,
        translation_for,
    );
    if let Some(rate_headers) = rate_headers {
        rate_headers.apply(response.headers_mut());
    }
    response
}

fn respond_with(
    state: &Arc<AppState>,
    context: RequestContext,
    model: &str,
    requested_route: &RouteRuntime,
    served: Result<crate::dispatch::Served, Box<Failed>>,
    hold: Option<Hold>,
    translation_for: impl Fn(&Candidate) -> Translation,
) -> Response {
    let served = match served {
        Ok(served) => served,
        Err(failed) => {
            let Failed {
                error,
                attempts,
                waited,
                provider,
            } = *failed;
            let mut response = finish_error_with_wait(
                state,
                &context,
                Some(model),
                provider.as_ref(),
                error,
                waited,
            );
            response
                .headers_mut()
                .insert(SKEIN_ATTEMPTS, attempts_header(attempts));
            return response;
        }
    };
    let translation = translation_for(&served.candidate);
    let provider = served.candidate.deployment.provider.name.clone();
    match served.body {
        ServedBody::Unary(body) => match translation.unary(body) {
            Ok((body, usage)) => {
                state.metrics.record_usage(&provider, &usage);
                count_key_tokens(&served.candidate, &usage);
                if let Some(hold) = hold {
                    hold.settle(&served.candidate, &usage);
                }
                finish_unary(
                    state,
                    &context,
                    requested_route,
                    &served.candidate,
                    served.attempts,
                    served.waited,
                    body,
                )
            }
            Err(message) => {
                // The provider answered (and charges for it): count the estimated prompt.
                if let Some(hold) = hold {
                    let estimate = skein_providers::Usage {
                        input_tokens: hold.estimated_input_tokens,
                        ..Default::default()
                    };
                    hold.settle(&served.candidate, &estimate);
                }
                let error = ApiError::new(
                    ErrorCode::UpstreamError,
                    format!("could not read the answer of provider {provider}: {message}"),
                )
                .with_detail_code("untranslatable_response");
                finish_error_with_wait(
                    state,
                    &context,
                    Some(model),
                    Some(&provider),
                    error,
                    served.waited,
                )
            }
        },
        ServedBody::Stream { first, rest } => stream_response(
            state,
            context,
            requested_route,
            served.candidate,
            served.attempts,
            served.waited,
            first,
            rest,
            translation.stream(),
            hold,
        ),
    }
}

fn unknown_model(model: &str, error: ResolveError) -> ApiError {
    let known = match error {
        ResolveError::UnknownModel { known } => known,
        ResolveError::UnusableModel { provider } => {
            return ApiError::invalid(format!(
                "the model `{model}` cannot be sent to provider {provider}: its name goes into \
                 the request path, so it may only hold letters, digits and -._~!$&'()*+,;=:@"
            ))
            .with_param("model")
            .with_detail_code("invalid_model_name");
        }
    };
    let listed = if known.is_empty() {
        "no models are configured".to_owned()
    } else {
        let shown: Vec<&str> = known.iter().take(50).map(String::as_str).collect();
        format!("available models: {}", shown.join(", "))
    };
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "the model `{model}` does not exist on this gateway; {listed} (or use provider/model)"
        ),
    )
    .with_param("model")
    .with_detail_code("model_not_found")
}

fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn served_headers(
    headers: &mut HeaderMap,
    context: &RequestContext,
    candidate: &Candidate,
    attempts: u32,
) {
    insert_header(headers, REQUEST_ID, &context.request_id);
    // Built once per deployment: cloning them shares their bytes.
    let deployment = &candidate.deployment;
    for (name, value) in [
        (SKEIN_PROVIDER, &deployment.provider_header),
        (SKEIN_DEPLOYMENT, &deployment.deployment_header),
        (SKEIN_ROUTE, &candidate.route.name_header),
    ] {
        if let Some(value) = value {
            headers.insert(name, value.clone());
        }
    }
    headers.insert(SKEIN_ATTEMPTS, attempts_header(attempts));
}

/// `x-skein-attempts`: a static value for the usual small counts.
fn attempts_header(attempts: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(attempts as usize) {
        Some(digits) => HeaderValue::from_static(digits),
        None => HeaderValue::from(attempts),
    }
}

fn record_request(
    state: &AppState,
    context: &RequestContext,
    route: Arc<str>,
    provider: Arc<str>,
    status: u16,
    waited: Duration,
) {
    let metrics = &state.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: context.endpoint,
            route,
            provider,
            status,
        })
        .inc();
    let elapsed = context.started.elapsed();
    let endpoint = EndpointLabels {
        endpoint: context.endpoint,
    };
    metrics
        .request_duration
        .get_or_create(&endpoint)
        .observe(elapsed.as_secs_f64());
    metrics
        .gateway_overhead
        .get_or_create(&endpoint)
        .observe(elapsed.saturating_sub(waited).as_secs_f64());
}

pub(crate) fn finish_error(
    state: &AppState,
    context: &RequestContext,
    model: Option<&str>,
    provider: Option<&Arc<str>>,
    error: ApiError,
) -> Response {
    finish_error_with_wait(state, context, model, provider, error, Duration::ZERO)
}

fn finish_error_with_wait(
    state: &AppState,
    context: &RequestContext,
    model: Option<&str>,
    provider: Option<&Arc<str>>,
    error: ApiError,
    waited: Duration,
) -> Response {
    let error = error.with_shape(context.shape);
    let status = error.status().as_u16();
    record_request(
        state,
        context,
        Arc::from(model.unwrap_or("")),
        provider.cloned().unwrap_or_else(|| Arc::from("")),
        status,
        waited,
    );
    tracing::info!(
        target: "skein::access",
        request_id = %context.request_id,
        endpoint = context.endpoint,
        model = model.unwrap_or(""),
        status,
        error = %error.message,
        duration_ms = context.started.elapsed().as_millis() as u64,
        "request failed"
    );
    let mut response = error.into_response();
    insert_header(response.headers_mut(), REQUEST_ID, &context.request_id);
    response
}

pub(crate) fn finish_unary(
    state: &AppState,
    context: &RequestContext,
    requested_route: &RouteRuntime,
    candidate: &Candidate,
    attempts: u32,
    waited: Duration,
    body: Bytes,
) -> Response {
    if candidate.route.name != requested_route.name {
        state
            .metrics
            .fallbacks
            .get_or_create(&RouteLabels {
                route: requested_route.name.clone(),
            })
            .inc();
    }
    record_request(
        state,
        context,
        requested_route.name.clone(),
        candidate.deployment.provider.name.clone(),
        200,
        waited,
    );
    tracing::info!(
        target: "skein::access",
        request_id = %context.request_id,
        endpoint = context.endpoint,
        route = %requested_route.name,
        provider = %candidate.deployment.provider.name,
        model = %candidate.deployment.model,
        attempts,
        status = 200,
        duration_ms = context.started.elapsed().as_millis() as u64,
        "request served"
    );
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = HeaderMap::with_capacity(RESPONSE_HEADERS);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    served_headers(headers, context, candidate, attempts);
    response
}

/// Stream the upstream's events to the client through `translator`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stream_response(
    state: &Arc<AppState>,
    context: RequestContext,
    requested_route: &RouteRuntime,
    candidate: Candidate,
    attempts: u32,
    waited: Duration,
    first: crate::dispatch::Event,
    rest: EventStream,
    translator: Box<dyn StreamTranslator>,
    hold: Option<Hold>,
) -> Response {
    if candidate.route.name != requested_route.name {
        state
            .metrics
            .fallbacks
            .get_or_create(&RouteLabels {
                route: requested_route.name.clone(),
            })
            .inc();
    }
    record_request(
        state,
        &context,
        requested_route.name.clone(),
        candidate.deployment.provider.name.clone(),
        200,
        waited,
    );
    let provider = candidate.deployment.provider.name.clone();
    state
        .metrics
        .time_to_first_token
        .get_or_create(&ProviderLabels {
            provider: provider.clone(),
        })
        .observe(context.started.elapsed().as_secs_f64());
    let mut response = Response::new(Body::empty());
    *response.headers_mut() = HeaderMap::with_capacity(RESPONSE_HEADERS);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    served_headers(headers, &context, &candidate, attempts);
    let guard = candidate.deployment.enter();
    let relay = StreamRelay {
        state: state.clone(),
        first: Some(first),
        rest,
        translator,
        provider,
        finished: false,
        context,
        candidate,
        hold,
        events_out: 0,
        _in_flight: guard,
    };
    let body = futures_util::stream::unfold(relay, |mut relay| async move {
        let chunk = relay.next_chunk().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(chunk), relay))
    });
    *response.body_mut() = Body::from_stream(body);
    response
}

/// At most this many events are written to the client in one piece.
const MAX_EVENTS_PER_WRITE: usize = 64;

/// Moves events from the upstream to the client; accounts usage when dropped, so a client
/// that disconnects mid-stream is still counted.
struct StreamRelay {
    state: Arc<AppState>,
    first: Option<crate::dispatch::Event>,
    rest: EventStream,
    translator: Box<dyn StreamTranslator>,
    provider: Arc<str>,
    finished: bool,
    context: RequestContext,
    candidate: Candidate,
    /// Settled on drop with the usage streamed so far.
    hold: Option<Hold>,
    /// Events written to the client (estimates output tokens when the upstream's usage never
    /// arrived because the client left first).
    events_out: u64,
    _in_flight: skein_core::runtime::InFlightGuard,
}

impl StreamRelay {
    /// The next piece of the client's body: waits for one upstream event, then takes every
    /// event already buffered, so a burst becomes one write instead of one write per event.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        use futures_util::{FutureExt, StreamExt};
        if self.finished {
            return None;
        }
        let mut out = Vec::with_capacity(16);
        loop {
            let next = match self.first.take() {
                Some(event) => Some(Ok(event)),
                None if out.is_empty() => self.rest.next().await,
                None if out.len() >= MAX_EVENTS_PER_WRITE => return self.emit(&out),
                None => match self.rest.next().now_or_never() {
                    Some(next) => next,
                    None => return self.emit(&out),
                },
            };
            match next {
                Some(Ok(event)) => {
                    if let Err(message) =
                        self.translator
                            .on_owned_event(&event.event, event.data, &mut out)
                    {
                        tracing::warn!(request_id = %self.context.request_id, provider = %self.provider, error = %message, "untranslatable upstream event");
                    }
                }
                None => {
                    self.finished = true;
                    self.translator.finish(&mut out);
                    if !self.translator.completed() {
                        self.interrupted("the upstream stream ended early");
                    }
                    return self.emit(&out);
                }
                Some(Err(error)) => {
                    let message = error.to_string();
                    self.finished = true;
                    self.interrupted(&message);
                    let error = ApiError::new(
                        ErrorCode::UpstreamError,
                        format!("the provider's stream broke: {message}"),
                    )
                    .with_detail_code("upstream_stream_interrupted")
                    .with_shape(self.context.shape);
                    let mut bytes = self
                        .emit(&out)
                        .map(|bytes| bytes.to_vec())
                        .unwrap_or_default();
                    match self.context.shape {
                        ErrorShape::OpenAi => bytes
                            .extend_from_slice(format!("data: {}\n\n", error.body()).as_bytes()),
                        ErrorShape::Anthropic => bytes.extend_from_slice(
                            format!("event: error\ndata: {}\n\n", error.body()).as_bytes(),
                        ),
                    }
                    return Some(Bytes::from(bytes));
                }
            }
        }
    }

    /// Encode events for the client, counting them.
    fn emit(&mut self, events: &[skein_providers::OutEvent]) -> Option<Bytes> {
        self.events_out += events.len() as u64;
        encode_events(events)
    }

    fn interrupted(&self, message: &str) {
        self.state
            .metrics
            .stream_interruptions
            .get_or_create(&ProviderLabels {
                provider: self.provider.clone(),
            })
            .inc();
        tracing::warn!(request_id = %self.context.request_id, provider = %self.provider, error = %message, "stream interrupted after its first byte");
    }
}

/// Count a call's tokens against its provider key's use this minute (quota awareness).
fn count_key_tokens(candidate: &Candidate, usage: &skein_providers::Usage) {
    let tokens = usage.input_tokens.saturating_add(usage.output_tokens);
    if tokens > 0 {
        candidate
            .key()
            .quota
            .count(0, tokens, skein_types::now_ms());
    }
}

fn encode_events(events: &[skein_providers::OutEvent]) -> Option<Bytes> {
    if events.is_empty() {
        return Some(Bytes::new());
    }
    let mut bytes = Vec::with_capacity(events.iter().map(|event| event.data.len() + 16).sum());
    for event in events {
        event.write_to(&mut bytes);
    }
    Some(Bytes::from(bytes))
}

impl Drop for StreamRelay {
    fn drop(&mut self) {
        let usage = self.translator.usage();
        self.state.metrics.record_usage(&self.provider, &usage);
        count_key_tokens(&self.candidate, &usage);
        if let Some(hold) = self.hold.take() {
            let mut charged = usage;
            if charged.input_tokens == 0 && charged.output_tokens == 0 {
                // The usage event comes last; a client that left early never let it arrive.
                // Charge the estimated prompt and about one token per event delivered.
                charged.input_tokens = hold.estimated_input_tokens;
                charged.output_tokens = self.events_out;
            }
            hold.settle(&self.candidate, &charged);
        }
        let client_left = !self.finished;
        tracing::info!(
            target: "skein::access",
            request_id = %self.context.request_id,
            endpoint = self.context.endpoint,
            route = %self.candidate.route.name,
            provider = %self.provider,
            model = %self.candidate.deployment.model,
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            client_disconnected = client_left,
            duration_ms = self.context.started.elapsed().as_millis() as u64,
            "stream finished"
        );
    }
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let snapshot = state.config.load();
    let data: Vec<serde_json::Value> = snapshot
        .models
        .iter()
        .filter(|entry| caller.as_ref().is_none_or(|caller| caller.allows_model(&entry.id)))
        .map(|entry| json!({"id": entry.id, "object": "model", "created": 0, "owned_by": entry.owned_by}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// A probe's answer: 200 with `ok`, or 503 with `not_ok` and the reason.
fn probe(
    result: Result<(), crate::health::NotReady>,
    ok: &'static str,
    not_ok: &'static str,
) -> Response {
    match result {
        Ok(()) => axum::Json(json!({"status": ok})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": not_ok, "reason": reason.label()})),
        )
            .into_response(),
    }
}

pub async fn live(State(state): State<Arc<AppState>>) -> Response {
    probe(state.health.live(), "live", "not_live")
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    probe(
        state.health.ready(skein_types::now_ms()),
        "ready",
        "not_ready",
    )
}

pub async fn startup(State(state): State<Arc<AppState>>) -> Response {
    probe(state.health.started(), "started", "starting")
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut response = state.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no such endpoint: {}", uri.path()),
    )
    .with_detail_code("unknown_url")
    .into_response()
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::invalid(format!("method {method} is not allowed on {}", uri.path()))
        .with_status(405)
        .with_detail_code("method_not_allowed")
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `handler` returns, without calling it.
    fn future_size<H, A, B, C, D, F>(_: &H) -> usize
    where
        H: Fn(A, B, C, D) -> F,
    {
        std::mem::size_of::<F>()
    }

    /// The same for an axum handler's two extractors.
    fn handler_size<H, A, B, F>(_: &H) -> usize
    where
        H: Fn(A, B) -> F,
    {
        std::mem::size_of::<F>()
    }

    /// Every request's future is allocated and moved on each request, so it is kept small:
    /// rare paths (opening an upstream connection) are boxed rather than nested in it.
    #[test]
    fn request_futures_stay_small() {
        let sizes = [
            ("openai_endpoint", future_size(&openai_endpoint)),
            ("messages", handler_size(&messages)),
            ("count_tokens", handler_size(&count_tokens)),
        ];
        for (name, size) in sizes {
            assert!(size <= 4096, "the future of {name} is {size} bytes");
        }
    }
}
