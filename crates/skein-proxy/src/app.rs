//! The proxy router: which path goes to which inbound API of [`crate::pipeline`].

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::handlers;
pub use crate::state::{AppState, ProxyOptions};

/// The proxy router. Each request goes through, in order:
/// 1. axum's routing (unknown paths and methods get OpenAI-shaped 404/405 errors);
/// 2. the handler, which reads the body up to `server.max_body_bytes` (413 beyond), takes or
///    mints an `x-request-id`, and parses the body (400 naming the position);
/// 3. the route table of the current config snapshot (404 listing known models);
/// 4. the attempt loop ([`crate::dispatch`]): keys, deployments and fallbacks with per-attempt
///    timeouts, backoff and circuit breaking, inside the overall deadline;
/// 5. the response, passed through or translated, streamed event by event, with `x-skein-*`
///    headers naming the provider, deployment and attempts, and metrics recorded at the end.
pub fn router(state: Arc<AppState>) -> Router {
    let metrics_here = state.metrics_on_proxy_port;
    let router = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/completions", post(handlers::completions))
        .route("/v1/embeddings", post(handlers::embeddings))
        .route("/embeddings", post(handlers::embeddings))
        .route("/v1/messages", post(handlers::messages))
        .route("/v1/messages/count_tokens", post(handlers::count_tokens))
        .route("/v1/responses", post(handlers::responses))
        .route("/responses", post(handlers::responses))
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

/// The probes and `/metrics`, for the internal (gRPC) port.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/health/startup", get(handlers::startup))
        .route("/metrics", get(handlers::metrics))
        .with_state(state)
}
