//! The one pipeline every inbound API goes through (chat, completions, embeddings, messages,
//! count_tokens, responses). Its steps, in order:
//!
//! 1. **intake** — the request's context: its `x-request-id` (the client's if sane, else one
//!    minted), the clock of its deadline, the in-flight gauge ([`crate::intake`]);
//! 2. **auth** — the caller's virtual key, before any of the body is read
//!    ([`crate::auth::authenticate`]);
//! 3. **read** — the body, refused past `server.max_body_bytes` (413) or when it arrives too
//!    slowly (408) ([`crate::intake::read_body`]);
//! 4. **policy** — the body parsed (400 naming the position), its `model` checked against the
//!    key's allowed models (403) and resolved to routes (404 listing the known models), then
//!    what the API itself requires ([`crate::inbound::Api::stream_shape`]);
//! 5. **limits and reservation** — the caller's RPM/TPM/parallel limits admitted and the
//!    worst-case cost held against its budgets (429) ([`crate::spend::reserve`]);
//! 6. **dispatch** — the attempt loop over keys, deployments and fallbacks, each attempt's
//!    request built by the candidate's provider adapter ([`crate::adapters`],
//!    [`crate::dispatch`]);
//! 7. **relay** — the answer translated by that adapter into the client's API, whole or
//!    streamed event by event ([`crate::respond`], [`crate::relay`]);
//! 8. **settle** — the usage the upstream reported (or an estimate, if the client left)
//!    charged against the hold, a Responses answer stored before the client sees its end
//!    ([`crate::responses`]), metrics and the access log line written ([`crate::spend`]).
//!
//! The Responses API adds one step between 4 and 5: its response id is minted and the
//! conversation named by `previous_response_id` fetched ([`crate::responses::open`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use skein_core::Candidate;

use crate::adapters;
use crate::auth::authenticate;
use crate::dispatch::{Mode, dispatch};
use crate::inbound::{Api, Call};
use crate::intake::{Parsed, RequestContext, parse_request, read_body};
use crate::respond::{finish_error, respond};
use crate::spend::reserve;
use crate::state::AppState;

/// Serve one call of `api`. The handlers take the whole request and split it, rather than
/// axum's `HeaderMap` extractor, which copies the headers.
pub async fn serve(state: Arc<AppState>, api: Api, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    // Only the query is kept (rarely there): the whole URI would grow every request's future.
    let query: Option<Box<str>> = parts.uri.query().map(Box::from);
    // 1. intake
    let context = RequestContext::new(&state, &headers, api.label(), api.error_shape());
    // 2. auth
    let caller = match authenticate(&state, &headers) {
        Ok(caller) => caller,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    // 3. read
    let snapshot = state.config.load_full();
    let bytes = match read_body(&state, body, snapshot.server.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(error) => return finish_error(&state, &context, None, None, error),
    };
    // 4. policy
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
    let shape = match api.stream_shape(&request) {
        Ok(shape) => shape,
        Err(error) => return finish_error(&state, &context, Some(&model), None, error),
    };
    let mut call = Call::new(
        api,
        request,
        &bytes,
        &headers,
        query.as_deref(),
        &model,
        shape,
    );
    // An `Idempotency-Key` seen before: its first attempt's answer (or 409 while it runs).
    let idempotent = match crate::idempotency::begin(
        &state,
        caller.as_ref().map(|caller| caller.key_id.as_str()),
        &headers,
        api.label(),
        &bytes,
        snapshot.server.idempotency_window_ms,
        snapshot.server.request_timeout_ms.saturating_add(60_000),
    )
    .await
    {
        crate::idempotency::Begin::None => None,
        crate::idempotency::Begin::Run(pending) => Some(pending),
        crate::idempotency::Begin::Answer(Ok(response)) => return response,
        crate::idempotency::Begin::Answer(Err(error)) => {
            return finish_error(&state, &context, Some(&model), None, error);
        }
    };
    // The Responses API: its id, and the conversation before it.
    let keep = if api == Api::Responses {
        // Boxed: a rare path, kept out of every request's future.
        match Box::pin(crate::responses::open(&state, &mut call, caller.as_ref())).await {
            Ok(keep) => keep,
            Err(error) => return finish_error(&state, &context, Some(&model), None, error),
        }
    } else {
        None
    };
    // 5. limits and reservation
    let hold = if api.reserves() {
        match reserve(
            &state,
            caller.as_ref(),
            &model,
            &routes,
            &call.request,
            bytes.len(),
            api != Api::Embeddings,
        )
        .await
        {
            Ok(hold) => {
                call.output_cap = hold.as_ref().and_then(|hold| hold.output_cap);
                hold
            }
            Err(error) => return finish_error(&state, &context, Some(&model), None, error),
        }
    } else {
        None
    };
    // 6. dispatch
    let prepare =
        |candidate: &Candidate| adapters::for_candidate(candidate).prepare(&call, candidate);
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
    // 7. relay and 8. settle
    let response = respond(
        &state,
        context,
        &model,
        &requested_route,
        served,
        hold,
        keep,
        |candidate: &Candidate| adapters::for_candidate(candidate).translation(&call, candidate),
    )
    .await;
    match idempotent {
        Some(pending) => pending.finish(response),
        None => response,
    }
}
