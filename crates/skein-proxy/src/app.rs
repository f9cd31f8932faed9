//! The proxy router: which path goes to which inbound API of [`crate::pipeline`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::routing::{get, post};

use crate::inbound::Api;
use crate::listener::{Direct, DirectFuture};

use crate::handlers;
pub use crate::state::{AppState, ProxyOptions};

/// The proxy router. Each request goes through, in order:
/// 1. axum's routing (unknown paths and methods get OpenAI-shaped 404/405 errors); a `POST`
///    to one of the [`INFERENCE`] endpoints skips it when the listener has [`direct`] routes;
/// 2. the handler, which reads the body up to `server.max_body_bytes` (413 beyond), takes or
///    mints an `x-request-id`, and parses the body (400 naming the position);
/// 3. the route table of the current config snapshot (404 listing known models);
/// 4. the attempt loop ([`crate::dispatch`]): keys, deployments and fallbacks with per-attempt
///    timeouts, backoff and circuit breaking, inside the overall deadline;
/// 5. the response, passed through or translated, streamed event by event, with `x-skein-*`
///    headers naming the provider, deployment and attempts, and metrics recorded at the end.
pub fn router(state: Arc<AppState>) -> Router {
    let metrics_here = state.metrics_on_proxy_port;
    let mut router = Router::new();
    for &(path, api) in INFERENCE {
        router = router.route(
            path,
            post(
                move |State(state): State<Arc<AppState>>, request: Request| {
                    handlers::inference(state, api, request)
                },
            ),
        );
    }
    let router = router
        .route(
            "/v1/responses/{id}",
            get(crate::responses::get_response).delete(crate::responses::delete_response),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(crate::responses::input_items),
        )
        .route("/v1/models", get(handlers::models))
        .route("/models", get(handlers::models))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/health/startup", get(handlers::startup));
    let router = if metrics_here {
        router.route("/metrics", get(handlers::metrics))
    } else {
        router
    };
    router
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}

/// The inference endpoints: `POST` paths, and the API each serves. [`router`] routes them,
/// and [`direct`] serves them without the router.
pub const INFERENCE: &[(&str, Api)] = &[
    ("/v1/chat/completions", Api::ChatCompletions),
    ("/chat/completions", Api::ChatCompletions),
    // OpenAI's Responses API, to OpenAI and Azure natively and to every other provider
    // through chat.
    ("/v1/responses", Api::Responses),
    ("/responses", Api::Responses),
    // Anthropic's Messages API, to Anthropic natively and to OpenAI-shaped upstreams by
    // translation.
    ("/v1/messages", Api::Messages),
    ("/v1/completions", Api::Completions),
    ("/completions", Api::Completions),
    ("/v1/embeddings", Api::Embeddings),
    ("/embeddings", Api::Embeddings),
    // Where the upstream supports it (Anthropic).
    ("/v1/messages/count_tokens", Api::CountTokens),
];

/// The [`INFERENCE`] endpoints as [`Direct`] routes: a `POST` to one of them is
/// served without the router's lookup, URL parameters and boxed service (about 1.5k
/// instructions of a chat request). Any other request, another method on the same path
/// included (answered 405), goes to the router, which has the same endpoints.
// The request goes back by value when it is not a direct route: moved either way, not copied
// more for being in an `Err`.
#[allow(clippy::result_large_err)]
pub fn direct(state: Arc<AppState>) -> Direct {
    Arc::new(move |request: Request| {
        let Some(api) = direct_api(request.method(), request.uri().path()) else {
            return Err(request);
        };
        let served: DirectFuture = Box::pin(handlers::inference(state.clone(), api, request));
        Ok(served)
    })
}

/// The API a [`direct`] route serves, by method and path.
fn direct_api(method: &Method, path: &str) -> Option<Api> {
    if method != Method::POST {
        return None;
    }
    INFERENCE
        .iter()
        .find(|(inference, _)| *inference == path)
        .map(|&(_, api)| api)
}

/// The probes and `/metrics`, for the internal (gRPC) port.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/health/startup", get(handlers::startup))
        .route("/metrics", get(handlers::metrics))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_to_an_inference_endpoint_is_a_direct_route() {
        for &(path, api) in INFERENCE {
            assert_eq!(direct_api(&Method::POST, path), Some(api), "POST {path}");
            assert_eq!(
                direct_api(&Method::GET, path),
                None,
                "GET {path} goes to the router"
            );
        }
        assert_eq!(
            direct_api(&Method::POST, "/v1/chat/completions"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(direct_api(&Method::POST, "/v1/chat/completions/"), None);
        assert_eq!(direct_api(&Method::POST, "/v1/models"), None);
    }
}
