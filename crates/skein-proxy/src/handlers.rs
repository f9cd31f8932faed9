//! HTTP handlers: the inference endpoints (each a call into [`crate::pipeline::serve`]),
//! the model list, the probes, `/metrics` and the fallbacks for unknown paths and methods.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use skein_types::ErrorCode;

use crate::auth::authenticate;
use crate::error::ApiError;
use crate::inbound::Api;
use crate::pipeline::serve;
use crate::state::AppState;

/// `POST` of an inference endpoint (see [`crate::app::INFERENCE`]): the whole request, to
/// the pipeline.
pub async fn inference(state: Arc<AppState>, api: Api, request: Request) -> Response {
    serve(state, api, request).await
}

/// `GET /v1/models`: the routes the caller may use, in OpenAI's shape, or in Anthropic's when
/// asked with Anthropic's `anthropic-version` header (as Claude Code and the Anthropic SDKs
/// do).
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let anthropic = headers.contains_key("anthropic-version");
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => {
            let shape = if anthropic {
                crate::error::ErrorShape::Anthropic
            } else {
                crate::error::ErrorShape::OpenAi
            };
            return error.with_shape(shape).into_response();
        }
    };
    let snapshot = state.config.load();
    let allowed = snapshot.models.iter().filter(|entry| {
        caller
            .as_ref()
            .is_none_or(|caller| caller.allows_model(&entry.id))
    });
    if anthropic {
        let data: Vec<serde_json::Value> = allowed
            .map(|entry| json!({"type": "model", "id": entry.id, "display_name": entry.id, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        let first = data.first().map(|model| model["id"].clone());
        let last = data.last().map(|model| model["id"].clone());
        return axum::Json(
            json!({"data": data, "has_more": false, "first_id": first, "last_id": last}),
        )
        .into_response();
    }
    let data: Vec<serde_json::Value> = allowed
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
    fn future_size<H, A, B, C, F>(_: &H) -> usize
    where
        H: Fn(A, B, C) -> F,
    {
        std::mem::size_of::<F>()
    }

    /// Every request's future is allocated and moved on each request, so it is kept small:
    /// rare paths (opening an upstream connection) are boxed rather than nested in it.
    #[test]
    fn request_futures_stay_small() {
        let sizes = [
            ("serve", future_size(&serve)),
            ("inference", future_size(&inference)),
        ];
        for (name, size) in sizes {
            assert!(size <= 4096, "the future of {name} is {size} bytes");
        }
    }
}
