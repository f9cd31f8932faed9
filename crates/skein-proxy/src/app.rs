//! The proxy router: which path goes to which inbound API of [`crate::pipeline`].

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::Method;
use axum::routing::{get, post};

use crate::inbound::Api;
use crate::listener::{Direct, DirectFuture};

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
/// The inference endpoints of [`router`] as [`Direct`] routes: a `POST` to one of them is
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
        let served: DirectFuture = Box::pin(crate::pipeline::serve(state.clone(), api, request));
        Ok(served)
    })
}

/// The API a [`direct`] route serves, by method and path.
fn direct_api(method: &Method, path: &str) -> Option<Api> {
    if method != Method::POST {
        return None;
    }
    Some(match path {
        "/v1/chat/completions" | "/chat/completions" => Api::ChatCompletions,
        "/v1/responses" | "/responses" => Api::Responses,
        "/v1/messages" => Api::Messages,
        "/v1/completions" | "/completions" => Api::Completions,
        "/v1/embeddings" | "/embeddings" => Api::Embeddings,
        "/v1/messages/count_tokens" => Api::CountTokens,
        _ => return None,
    })
}

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

    /// Every path the direct routes take is one of the router's, served by the same API.
    #[test]
    fn the_direct_routes_are_the_routers_inference_endpoints() {
        let app = include_str!("app.rs");
        for (path, handler) in [
            ("/v1/chat/completions", "chat_completions"),
            ("/chat/completions", "chat_completions"),
            ("/v1/responses", "responses"),
            ("/responses", "responses"),
            ("/v1/messages", "messages"),
            ("/v1/completions", "completions"),
            ("/completions", "completions"),
            ("/v1/embeddings", "embeddings"),
            ("/embeddings", "embeddings"),
            ("/v1/messages/count_tokens", "count_tokens"),
        ] {
            let route = format!(".route(\"{path}\", post(handlers::{handler}))");
            assert!(app.contains(&route), "the router has {route}");
            let api = direct_api(&Method::POST, path).expect("a direct route");
            let handlers = include_str!("handlers.rs");
            let body = format!("pub async fn {handler}(");
            let at = handlers.find(&body).expect("the handler");
            let serves = format!("serve(state, Api::{api:?}, request)");
            assert!(
                handlers[at..]
                    .lines()
                    .nth(1)
                    .is_some_and(|line| line.contains(&serves)),
                "{handler} serves {api:?}"
            );
            assert!(
                direct_api(&Method::GET, path).is_none(),
                "GET {path} goes to the router"
            );
        }
        assert!(direct_api(&Method::POST, "/v1/chat/completions/").is_none());
        assert!(direct_api(&Method::POST, "/v1/models").is_none());
    }
}
