//! The last steps of a request: the attempt loop's outcome turned into the client's
//! response (translated by the serving adapter), usage settled against the caller's hold,
//! headers naming what served it, and the request's metrics and access log line.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use skein_core::{Candidate, RouteRuntime};
use skein_types::ErrorCode;

use crate::dispatch::{Failed, ServedBody};
use crate::error::ApiError;
use crate::intake::{REQUEST_ID, RequestContext};
use crate::metrics::{EndpointLabels, RequestLabels, RouteLabels};
use crate::relay::{count_key_tokens, stream_response};
use crate::responses::Keep;
use crate::spend::Hold;
use crate::state::AppState;
use crate::translate::ResponseTranslation;

const SKEIN_PROVIDER: HeaderName = HeaderName::from_static("x-skein-provider");
const SKEIN_DEPLOYMENT: HeaderName = HeaderName::from_static("x-skein-deployment");
const SKEIN_ROUTE: HeaderName = HeaderName::from_static("x-skein-route");
pub(crate) const SKEIN_ATTEMPTS: HeaderName = HeaderName::from_static("x-skein-attempts");

/// Room for the headers of a served response (ours and the caller's rate-limit headers), so
/// the map is allocated once.
pub(crate) const RESPONSE_HEADERS: usize = 16;

/// Turn the attempt loop's outcome into the client's response, with the caller's rate-limit
/// headers.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn respond(
    state: &Arc<AppState>,
    context: RequestContext,
    model: &str,
    requested_route: &RouteRuntime,
    served: Result<crate::dispatch::Served, Box<Failed>>,
    hold: Option<Hold>,
    keep: Option<Keep>,
    translation_for: impl Fn(&Candidate) -> Box<dyn ResponseTranslation>,
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
        keep,
        translation_for,
    )
    .await;
    if let Some(rate_headers) = rate_headers {
        rate_headers.apply(response.headers_mut());
    }
    response
}

#[allow(clippy::too_many_arguments)]
async fn respond_with(
    state: &Arc<AppState>,
    context: RequestContext,
    model: &str,
    requested_route: &RouteRuntime,
    served: Result<crate::dispatch::Served, Box<Failed>>,
    hold: Option<Hold>,
    keep: Option<Keep>,
    translation_for: impl Fn(&Candidate) -> Box<dyn ResponseTranslation>,
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
    let note = translation.note();
    let mut response = match served.body {
        ServedBody::Unary(body) => match translation.unary(body) {
            Ok((body, usage)) => {
                state.metrics.record_usage(&provider, &usage);
                count_key_tokens(&served.candidate, &usage);
                if let Some(hold) = hold {
                    hold.settle(&served.candidate, &usage);
                }
                if let Some(keep) = keep
                    && let Ok(answer) =
                        serde_json::from_slice::<Box<serde_json::value::RawValue>>(&body)
                {
                    // Boxed: a rare path, kept out of every request's future.
                    Box::pin(keep.keep(answer)).await;
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
            keep,
        ),
    };
    if let Some((name, value)) = note {
        response.headers_mut().insert(name, value);
    }
    response
}

/// Count a request served by a fallback route (another route than the one asked for).
pub(crate) fn count_fallback(
    state: &AppState,
    requested_route: &RouteRuntime,
    candidate: &Candidate,
) {
    if candidate.route.name != requested_route.name {
        state
            .metrics
            .fallbacks
            .get_or_create(&RouteLabels {
                route: requested_route.name.clone(),
            })
            .inc();
    }
}

pub(crate) fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// The headers of an answer `candidate` served, whole (with its `content_length`) or streamed
/// (`None`): its deployment's template, cloned (content type, provider, deployment, route,
/// and placeholders for the length, the request id and the attempts, so filling the clone
/// does not grow it), then this request's length, id and attempts.
pub(crate) fn served_headers(
    context: &RequestContext,
    candidate: &Candidate,
    attempts: u32,
    content_length: Option<usize>,
) -> HeaderMap {
    let templates = candidate.deployment.response_headers.get_or_init(|| {
        let template = |stream: bool| {
            let mut headers = HeaderMap::with_capacity(RESPONSE_HEADERS);
            if stream {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            } else {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                // Set here, so the router does not add it to a map the clone left no room in.
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            headers.insert(REQUEST_ID, HeaderValue::from_static(""));
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
            headers.insert(SKEIN_ATTEMPTS, HeaderValue::from_static("1"));
            headers
        };
        [template(false), template(true)]
    });
    let mut headers = templates[usize::from(content_length.is_none())].clone();
    if let Some(length) = content_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    match HeaderValue::from_str(&context.request_id) {
        Ok(value) => {
            headers.insert(REQUEST_ID, value);
        }
        Err(_) => {
            headers.remove(REQUEST_ID);
        }
    }
    if attempts != 1 {
        headers.insert(SKEIN_ATTEMPTS, attempts_header(attempts));
    }
    headers
}

/// `x-skein-attempts`: a static value for the usual small counts.
pub(crate) fn attempts_header(attempts: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(attempts as usize) {
        Some(digits) => HeaderValue::from_static(digits),
        None => HeaderValue::from(attempts),
    }
}

pub(crate) fn record_request(
    state: &AppState,
    context: &RequestContext,
    route: Arc<str>,
    provider: Arc<str>,
    status: u16,
    waited: Duration,
) {
    let metrics = &state.metrics;
    let elapsed = context.started.elapsed();
    if status == 200 {
        let served = metrics.served(context.endpoint, &route, &provider);
        served.requests_ok.inc();
        served.request_duration.observe(elapsed.as_secs_f64());
        served
            .gateway_overhead
            .observe(elapsed.saturating_sub(waited).as_secs_f64());
        return;
    }
    metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: context.endpoint,
            route,
            provider,
            status,
        })
        .inc();
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

pub(crate) fn finish_error_with_wait(
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
    count_fallback(state, requested_route, candidate);
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
    let headers = served_headers(context, candidate, attempts, Some(body.len()));
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = headers;
    response
}
