//! The mock server: listener, shared state, request recording, faults and latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Latency settings.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Before the first byte of every answer.
    pub latency: Duration,
    /// Between stream events (and added per piece to non-stream answers).
    pub token_latency: Duration,
    /// Record requests (turn off for benchmarks so memory stays flat).
    pub record: bool,
}

/// A fault switched on for one API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status; `retry_after` seconds go in `Retry-After` (429 mostly).
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Never answer.
    Hang,
    /// Answer normally, this many milliseconds late.
    Slow { ms: u64 },
}

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HashMap<String, String>,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// The API key the request carried, from whichever header its protocol uses.
    pub api_key: Option<String>,
}

pub(crate) struct MockState {
    pub(crate) options: MockOptions,
    requests: Mutex<Vec<RecordedRequest>>,
    key_faults: Mutex<HashMap<String, Fault>>,
    /// Per-key request quotas: `(limit, used)`. A key with a quota gets `x-ratelimit-*`
    /// headers on every answer and a 429 once it is used up.
    key_quotas: Mutex<HashMap<String, (u64, u64)>>,
}

/// A running mock server. Dropping it stops the server.
pub struct MockServer {
    address: SocketAddr,
    state: Arc<MockState>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockServer {
    /// Start on `127.0.0.1`, on a port the system picks.
    pub async fn start(options: MockOptions) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        MockServer::start_on(listener, options)
    }

    /// Start on a listener the caller bound.
    pub fn start_on(listener: TcpListener, options: MockOptions) -> std::io::Result<MockServer> {
        let address = listener.local_addr()?;
        let state = Arc::new(MockState {
            options,
            requests: Mutex::new(Vec::new()),
            key_faults: Mutex::new(HashMap::new()),
            key_quotas: Mutex::new(HashMap::new()),
        });
        let app = router(state.clone());
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let listener = listener.tap_io(|stream| {
            let _ = stream.set_nodelay(true);
        });
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = shutdown_signal.await;
            });
            if let Err(error) = serve.await {
                eprintln!("skein-mock: server error: {error}");
            }
        });
        Ok(MockServer {
            address,
            state,
            shutdown: Some(shutdown),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .map(|requests| requests.clone())
            .unwrap_or_default()
    }

    /// Forget recorded requests.
    pub fn clear_requests(&self) {
        if let Ok(mut requests) = self.state.requests.lock() {
            requests.clear();
        }
    }

    /// Switch a fault on (`Some`) or off (`None`) for one API key.
    pub fn set_key_fault(&self, key: &str, fault: Option<Fault>) {
        if let Ok(mut faults) = self.state.key_faults.lock() {
            match fault {
                Some(fault) => faults.insert(key.to_owned(), fault),
                None => faults.remove(key),
            };
        }
    }
}

impl MockServer {
    /// Give `key` a quota of `limit` requests (from now; `None` removes it). Answers to the
    /// key carry `x-ratelimit-limit-requests` and `x-ratelimit-remaining-requests`, and once
    /// the quota is used up the key gets 429 with `retry-after: 60`.
    pub fn set_key_quota(&self, key: &str, limit: Option<u64>) {
        if let Ok(mut quotas) = self.state.key_quotas.lock() {
            match limit {
                Some(limit) => quotas.insert(key.to_owned(), (limit, 0)),
                None => quotas.remove(key),
            };
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/responses", post(openai_responses))
        .route("/openai/responses", post(openai_responses))
        .route("/v1/models", get(openai_models))
        .route("/openai/deployments/{deployment}/{*operation}", post(azure))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/messages/count_tokens", post(anthropic_count_tokens))
        .route("/v1beta/models/{*call}", post(gemini_call))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            quota_headers,
        ))
        .with_state(state)
}

/// Adds the quota headers of the request's key, if it has a quota.
async fn quota_headers(
    State(state): State<Arc<MockState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let key = api_key(request.headers());
    let mut response = next.run(request).await;
    let quota = key.and_then(|key| {
        state
            .key_quotas
            .lock()
            .ok()
            .and_then(|quotas| quotas.get(&key).copied())
    });
    if let Some((limit, used)) = quota {
        let headers = response.headers_mut();
        headers.insert("x-ratelimit-limit-requests", limit.into());
        headers.insert(
            "x-ratelimit-remaining-requests",
            limit.saturating_sub(used).into(),
        );
    }
    response
}

/// What every handler does first: record, check faults, wait the latency.
pub(crate) struct Incoming {
    pub(crate) body: Value,
    pub(crate) model: String,
}

pub(crate) enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
}

async fn intake(
    state: &MockState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    flavor: Flavor,
) -> Result<Incoming, Response> {
    intake_with_model(state, method, uri, headers, body, flavor, None).await
}

/// [`intake`] for protocols that name the model in the path (Gemini).
async fn intake_with_model(
    state: &MockState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    flavor: Flavor,
    path_model: Option<&str>,
) -> Result<Incoming, Response> {
    let body_json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let api_key = api_key(headers);
    if state.options.record {
        let recorded = RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        value.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            body: body_json.clone(),
            api_key: api_key.clone(),
        };
        if let Ok(mut requests) = state.requests.lock() {
            requests.push(recorded);
        }
    }
    if body_json.is_null() {
        return Err(error_response(
            &flavor,
            400,
            "invalid_request_error",
            "body is not JSON",
            None,
        ));
    }
    let model = match path_model {
        Some(model) => model.to_owned(),
        None => body_json
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    };

    let mut key_fault = match &api_key {
        Some(key) => key_fault(state, key),
        None => None,
    };
    if key_fault.is_none()
        && let Some(key) = &api_key
        && let Ok(mut quotas) = state.key_quotas.lock()
        && let Some((limit, used)) = quotas.get_mut(key)
    {
        if *used >= *limit {
            key_fault = Some(Fault::Status {
                status: 429,
                retry_after: Some(60),
            });
        } else {
            *used += 1;
        }
    }
    let model_fault = model_fault(&model);
    let mut extra_latency = Duration::ZERO;
    if let Some(Fault::Slow { ms }) = key_fault {
        extra_latency = Duration::from_millis(ms);
        key_fault = None;
    }
    match key_fault.or(model_fault) {
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
            return Err(error_response(&flavor, 504, "timeout", "mock hung", None));
        }
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            let kind = match status {
                429 => "rate_limit_error",
                401 => "authentication_error",
                400..=499 => "invalid_request_error",
                _ => "server_error",
            };
            let message = format!("mock fault {status} for model {model}");
            return Err(error_response(&flavor, status, kind, &message, retry_after));
        }
        Some(Fault::Slow { .. }) | None => {}
    }
    let mut latency = state.options.latency + extra_latency;
    if let Some(extra) = model
        .strip_prefix("mock-slow-")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        latency += Duration::from_millis(extra);
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    Ok(Incoming {
        body: body_json,
        model,
    })
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        return Some(value.trim_start_matches("Bearer ").to_owned());
    }
    for name in ["x-api-key", "api-key", "x-goog-api-key"] {
        if let Some(value) = headers.get(name).and_then(|value| value.to_str().ok()) {
            return Some(value.to_owned());
        }
    }
    None
}

fn key_fault(state: &MockState, key: &str) -> Option<Fault> {
    if let Some(fault) = state
        .key_faults
        .lock()
        .ok()
        .and_then(|faults| faults.get(key).cloned())
    {
        return Some(fault);
    }
    if key.starts_with("fail-429") {
        return Some(Fault::Status {
            status: 429,
            retry_after: Some(1),
        });
    }
    if key.starts_with("fail-500") {
        return Some(Fault::Status {
            status: 500,
            retry_after: None,
        });
    }
    if key.starts_with("fail-401") {
        return Some(Fault::Status {
            status: 401,
            retry_after: None,
        });
    }
    None
}

fn model_fault(model: &str) -> Option<Fault> {
    match model {
        "mock-429" => Some(Fault::Status {
            status: 429,
            retry_after: Some(1),
        }),
        "mock-500" => Some(Fault::Status {
            status: 500,
            retry_after: None,
        }),
        "mock-400" => Some(Fault::Status {
            status: 400,
            retry_after: None,
        }),
        "mock-timeout" => Some(Fault::Hang),
        _ => None,
    }
}

pub(crate) fn error_response(
    flavor: &Flavor,
    status: u16,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let body = match flavor {
        Flavor::OpenAi => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
        Flavor::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
        Flavor::Gemini => {
            json!({"error": {"code": status, "message": message, "status": kind.to_ascii_uppercase()}})
        }
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after
        && let Ok(value) = header::HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// A JSON answer after the per-piece latency of `pieces` pieces.
pub(crate) async fn json_answer(state: &MockState, pieces: usize, body: Value) -> Response {
    let total = state.options.token_latency * u32::try_from(pieces).unwrap_or(u32::MAX);
    if !total.is_zero() {
        tokio::time::sleep(total).await;
    }
    axum::Json(body).into_response()
}

/// An SSE answer: events spaced by the token latency (with no token latency, the whole
/// stream goes out in one write, as a burst from a real provider would); `cut_after` drops
/// the connection after that many events.
pub(crate) fn sse_answer(
    state: &MockState,
    events: Vec<String>,
    cut_after: Option<usize>,
) -> Response {
    let token_latency = state.options.token_latency;
    let pieces: Vec<(usize, String)> = if token_latency.is_zero() && cut_after.is_none() {
        vec![(0, events.concat())]
    } else {
        events.into_iter().enumerate().collect()
    };
    let stream = futures_util::stream::iter(pieces).then(move |(index, event)| async move {
        if index > 0 && !token_latency.is_zero() {
            tokio::time::sleep(token_latency).await;
        }
        if cut_after.is_some_and(|cut| index >= cut) {
            if index > 0 {
                // Let the events before the cut reach the client before the drop.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return Err(std::io::Error::other("mock stream cut"));
        }
        Ok::<Bytes, std::io::Error>(Bytes::from(event))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn openai_responses(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match intake(&state, &method, &uri, &headers, &body, Flavor::OpenAi).await {
        Ok(incoming) => crate::openai::responses(&state, incoming).await,
        Err(response) => response,
    }
}

/// Models that refuse more output tokens than they can produce, as OpenAI's do.
const OUTPUT_LIMITS: &[(&str, u64)] = &[("gpt-4o-mini", 16_384), ("gpt-4o", 16_384)];

/// The refusal of a request that asks `model` for more output tokens than it has.
fn over_output_limit(incoming: &Incoming) -> Option<String> {
    let (_, limit) = OUTPUT_LIMITS
        .iter()
        .find(|(model, _)| *model == incoming.model)?;
    let asked = ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|name| incoming.body[*name].as_u64())?;
    (asked > *limit).then(|| {
        format!(
            "max_tokens is too large: {asked}. This model supports at most {limit} completion tokens, whereas you provided {asked}."
        )
    })
}

async fn openai_chat(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match intake(&state, &method, &uri, &headers, &body, Flavor::OpenAi).await {
        Ok(incoming) => match over_output_limit(&incoming) {
            Some(message) => error_response(
                &Flavor::OpenAi,
                400,
                "invalid_request_error",
                &message,
                None,
            ),
            None => crate::openai::chat(&state, incoming).await,
        },
        Err(response) => response,
    }
}

async fn openai_completions(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match intake(&state, &method, &uri, &headers, &body, Flavor::OpenAi).await {
        Ok(incoming) => crate::openai::completions(&state, incoming).await,
        Err(response) => response,
    }
}

async fn openai_embeddings(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match intake(&state, &method, &uri, &headers, &body, Flavor::OpenAi).await {
        Ok(incoming) => crate::openai::embeddings(incoming),
        Err(response) => response,
    }
}

async fn azure(
    State(state): State<Arc<MockState>>,
    Path((deployment, operation)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !query.contains_key("api-version") {
        return error_response(
            &Flavor::OpenAi,
            400,
            "invalid_request_error",
            "missing api-version",
            None,
        );
    }
    let mut incoming = match intake(&state, &method, &uri, &headers, &body, Flavor::OpenAi).await {
        Ok(incoming) => incoming,
        Err(response) => return response,
    };
    incoming.model = deployment;
    match operation.as_str() {
        "chat/completions" => crate::openai::chat(&state, incoming).await,
        "completions" => crate::openai::completions(&state, incoming).await,
        "embeddings" => crate::openai::embeddings(incoming),
        _ => not_found().await,
    }
}

async fn openai_models() -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "mock"}]
    }))
    .into_response()
}

async fn anthropic_messages(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !headers.contains_key("anthropic-version") {
        return error_response(
            &Flavor::Anthropic,
            400,
            "invalid_request_error",
            "anthropic-version header is required",
            None,
        );
    }
    match intake(&state, &method, &uri, &headers, &body, Flavor::Anthropic).await {
        Ok(incoming) => crate::anthropic::messages(&state, incoming).await,
        Err(response) => response,
    }
}

async fn anthropic_count_tokens(
    State(state): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match intake(&state, &method, &uri, &headers, &body, Flavor::Anthropic).await {
        Ok(incoming) => crate::anthropic::count_message_tokens(incoming),
        Err(response) => response,
    }
}

async fn gemini_call(
    State(state): State<Arc<MockState>>,
    Path(call): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((model, operation)) = call.split_once(':') else {
        return error_response(
            &Flavor::Gemini,
            404,
            "not_found",
            "expected models/{model}:{operation}",
            None,
        );
    };
    let (model, operation) = (model.to_owned(), operation.to_owned());
    let mut incoming = match intake_with_model(
        &state,
        &method,
        &uri,
        &headers,
        &body,
        Flavor::Gemini,
        Some(&model),
    )
    .await
    {
        Ok(incoming) => incoming,
        Err(response) => return response,
    };
    incoming.model = model;
    match operation.as_str() {
        "generateContent" => crate::gemini::generate(&state, incoming, false).await,
        "streamGenerateContent" => crate::gemini::generate(&state, incoming, true).await,
        "batchEmbedContents" => crate::gemini::embed(incoming),
        _ => error_response(
            &Flavor::Gemini,
            404,
            "not_found",
            "unknown Gemini operation",
            None,
        ),
    }
}

async fn not_found() -> Response {
    error_response(
        &Flavor::OpenAi,
        404,
        "invalid_request_error",
        "unknown mock route",
        None,
    )
}
