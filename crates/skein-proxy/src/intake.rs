//! The first steps of every request: its context (request id, clock, in-flight count), its
//! body read within the size limit and the body timeouts, and its `model` parsed, checked
//! against the caller's allowed models and resolved to routes.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName};
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use skein_core::{ResolveError, RouteRuntime, RuntimeConfig};
use skein_providers::RawObject;
use skein_types::ErrorCode;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorShape};
use crate::state::AppState;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
    mint_request_id(fastrand::u64(..), fastrand::u32(..))
}

/// `req_` and 24 lowercase hex digits (written by hand: `format!` took about 1% of a request).
fn mint_request_id(high: u64, low: u32) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req_000000000000000000000000";
    let digits = (0..16)
        .map(|place| (high >> (60 - 4 * place)) & 15)
        .chain((0..8).map(|place| u64::from(low >> (28 - 4 * place)) & 15));
    for (slot, digit) in id[4..].iter_mut().zip(digits) {
        *slot = HEX[digit as usize];
    }
    std::str::from_utf8(&id)
        .map(str::to_owned)
        .unwrap_or_default()
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

/// A request body read as a JSON object, with its model resolved to routes.
pub(crate) struct Parsed<'a> {
    pub request: RawObject<'a>,
    pub model: Cow<'a, str>,
    /// The routes to try (the attempt plan takes them), the one asked for first.
    pub routes: Vec<Arc<RouteRuntime>>,
    /// The route asked for, kept for the response once the plan has taken `routes`.
    pub requested_route: Arc<RouteRuntime>,
}

/// Parse the body, read its `model` and resolve it. The error carries the model when known.
pub(crate) fn parse_request<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_request_ids_are_req_and_24_hex_digits() {
        assert_eq!(
            mint_request_id(0x0123_4567_89ab_cdef, 0xfedc_ba98),
            "req_0123456789abcdeffedcba98"
        );
        assert_eq!(mint_request_id(0, 0), "req_000000000000000000000000");
        assert_eq!(
            mint_request_id(u64::MAX, u32::MAX),
            "req_ffffffffffffffffffffffff"
        );
    }
}
