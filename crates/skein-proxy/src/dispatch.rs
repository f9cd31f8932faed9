//! The attempt loop of one request: walk the [`AttemptPlan`], call each candidate with its
//! own timeout inside the overall deadline, feed the result to the key's circuit breaker, and
//! stop at the first success or at an error that another attempt cannot fix.
//!
//! A stream counts as successful only once its first event arrived: a stream that fails before
//! that is retried elsewhere, so the client never sees a half-started answer from a failed
//! attempt.

use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyDataStream, BodyExt};
use skein_core::shared::QuotaObservation;
use skein_core::{AttemptPlan, Candidate, NextAttempt, RouteRuntime};
use skein_types::ErrorCode;
use sse_core::{MessageEvent, SseDecoder, SseEvent, SseStream, SseStreamError};

use crate::error::ApiError;
use crate::metrics::AttemptLabels;
use crate::state::AppState;
use crate::upstream::{
    AttemptFailure, PreparedRequest, build_request, classify_empty_stream, classify_status,
    classify_timeout, classify_transport,
};

/// One upstream SSE event: its `event:` name (`message` when it has none) and its data.
pub type Event = MessageEvent;

/// Why an upstream stream could not be read on: the connection broke, or one event was larger
/// than [`MAX_EVENT_BYTES`].
pub type EventError = SseStreamError<hyper::Error>;

/// Upstream SSE events after the first.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, EventError>> + Send>>;

/// The largest upstream event accepted (its data, name or id), so that a runaway upstream
/// cannot grow one event without bound. Streamed images and audio come in events of a few MiB.
const MAX_EVENT_BYTES: usize = 64 << 20;

/// The events of an upstream body, parsed as they arrive. Each event's data is moved, not
/// copied, into the [`Event`] (one allocation per event). `retry:` lines, which only tell a
/// browser when to reconnect, are dropped.
struct UpstreamEvents<S: futures_util::TryStream>(SseStream<S>);

impl<S> UpstreamEvents<S>
where
    S: futures_util::TryStream,
{
    fn new(body: S) -> UpstreamEvents<S> {
        UpstreamEvents::with_limit(body, MAX_EVENT_BYTES)
    }

    fn with_limit(body: S, limit: usize) -> UpstreamEvents<S> {
        let limit = NonZeroUsize::new(limit).unwrap_or(NonZeroUsize::MIN);
        let mut events = SseStream::with_decoder(SseDecoder::with_limit(limit));
        events.attach(body);
        UpstreamEvents(events)
    }
}

impl<S> Stream for UpstreamEvents<S>
where
    S: futures_util::TryStream + Unpin,
    S::Ok: bytes::Buf,
{
    type Item = Result<Event, SseStreamError<S::Error>>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(self.0.poll_next_unpin(context)) {
                Some(Ok(SseEvent::Retry(_))) => continue,
                Some(Ok(SseEvent::Message(event))) => return Poll::Ready(Some(Ok(event))),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Whether the client asked for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unary,
    Stream,
}

/// What a successful attempt produced.
pub enum ServedBody {
    Unary(Bytes),
    Stream { first: Event, rest: EventStream },
}

/// The successful attempt and what it took to get there.
pub struct Served {
    pub candidate: Candidate,
    pub attempts: u32,
    /// Time spent waiting on upstreams and in backoff, to tell gateway overhead apart.
    pub waited: Duration,
    pub body: ServedBody,
}

/// A failed request, with what it took.
pub struct Failed {
    pub error: ApiError,
    pub attempts: u32,
    pub waited: Duration,
    /// The provider of the last attempt, for metrics.
    pub provider: Option<Arc<str>>,
}

/// Run the attempt loop. `prepare` builds the upstream request for a candidate (URL, body in
/// the candidate's protocol).
pub async fn dispatch(
    state: &AppState,
    routes: Vec<Arc<RouteRuntime>>,
    mode: Mode,
    request_id: &str,
    deadline: Instant,
    prepare: &(dyn Fn(&Candidate) -> Result<PreparedRequest, ApiError> + Sync),
) -> Result<Served, Box<Failed>> {
    let mut plan = AttemptPlan::new(routes);
    let mut last_failure: Option<AttemptFailure> = None;
    let mut last_provider: Option<Arc<str>> = None;
    let mut waited = Duration::ZERO;
    let fail = |error: ApiError, attempts: u32, waited: Duration, provider: Option<Arc<str>>| {
        Err(Box::new(Failed {
            error,
            attempts,
            waited,
            provider,
        }))
    };
    loop {
        let (candidate, wait) = match plan.next(state.clock_ms()) {
            NextAttempt::Try { candidate, wait } => (candidate, wait),
            NextAttempt::Exhausted { retry_after_ms } => {
                let error = match last_failure {
                    Some(failure) => failure.error,
                    None => {
                        let seconds = retry_after_ms.unwrap_or(1_000).div_ceil(1_000).max(1);
                        ApiError::new(
                            ErrorCode::Unavailable,
                            format!("every deployment is cooling down; retry in {seconds} s"),
                        )
                        .with_detail_code("no_deployment_available")
                        .with_retry_after(seconds)
                    }
                };
                return fail(error, plan.attempts, waited, last_provider);
            }
        };
        let provider_name = candidate.deployment.provider.name.clone();
        if !wait.is_zero() {
            if Instant::now() + wait >= deadline {
                if candidate.probe {
                    candidate.key().health.release_probe();
                }
                let error = last_failure
                    .map(|failure| failure.error)
                    .unwrap_or_else(deadline_error);
                return fail(error, plan.attempts, waited, last_provider);
            }
            tokio::time::sleep(wait).await;
            waited += wait;
        }
        let prepared = match prepare(&candidate) {
            Ok(prepared) => prepared,
            Err(error) => {
                if candidate.probe {
                    candidate.key().health.release_probe();
                }
                return fail(error, plan.attempts, waited, Some(provider_name));
            }
        };
        // One clock read for the attempt's start, its timeout and its deadline.
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        let attempt_timeout =
            Duration::from_millis(candidate.route.attempt_timeout_ms).min(remaining);
        let in_flight = candidate.deployment.enter();
        let attempt_deadline = tokio::time::Instant::from_std(started + attempt_timeout);
        let outcome = match tokio::time::timeout_at(
            attempt_deadline,
            attempt(state, &candidate, prepared, mode),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_elapsed) => Err(classify_timeout(&provider_name, attempt_timeout)),
        };
        drop(in_flight);
        let upstream_time = started.elapsed();
        waited += upstream_time;
        match outcome {
            Ok(body) => {
                candidate.key().health.record_success();
                candidate.deployment.errors.record(false);
                candidate
                    .deployment
                    .observe_latency(u64::try_from(upstream_time.as_micros()).unwrap_or(u64::MAX));
                let handles = state.metrics.provider(&provider_name);
                handles.attempts_success.inc();
                handles
                    .upstream_duration
                    .observe(upstream_time.as_secs_f64());
                return Ok(Served {
                    candidate,
                    attempts: plan.attempts,
                    waited,
                    body,
                });
            }
            Err(failure) => {
                state
                    .metrics
                    .attempts
                    .get_or_create(&AttemptLabels {
                        provider: provider_name.clone(),
                        outcome: failure.outcome,
                    })
                    .inc();
                let key = candidate.key();
                candidate
                    .deployment
                    .errors
                    .record(failure.breaker.is_some());
                let cooldown_until = match failure.breaker {
                    Some(kind) => key.health.record_failure(
                        kind,
                        &candidate.deployment.provider.breaker,
                        state.clock_ms(),
                    ),
                    None => {
                        // The upstream judged the request, so the key itself works.
                        key.health.record_success();
                        None
                    }
                };
                if cooldown_until.is_some() {
                    state.health_changed.notify_one();
                }
                tracing::warn!(
                    request_id,
                    provider = %provider_name,
                    key = %key.name,
                    model = %candidate.deployment.model,
                    outcome = failure.outcome,
                    retryable = failure.retryable,
                    cooling_down_ms = cooldown_until.map(|until| until.saturating_sub(state.clock_ms())),
                    error = %failure.error.message,
                    "upstream attempt failed"
                );
                last_provider = Some(provider_name);
                if !failure.retryable {
                    return fail(failure.error, plan.attempts, waited, last_provider);
                }
                last_failure = Some(failure);
                if Instant::now() >= deadline {
                    let error = last_failure
                        .map(|failure| failure.error)
                        .unwrap_or_else(deadline_error);
                    return fail(error, plan.attempts, waited, last_provider);
                }
            }
        }
    }
}

fn deadline_error() -> ApiError {
    ApiError::new(
        ErrorCode::Timeout,
        "the request deadline passed before any provider answered",
    )
    .with_detail_code("deadline_exceeded")
}

/// Events taken ahead of the client's first write, at most.
const READ_AHEAD_EVENTS: usize = 256;

/// Take the events that have already arrived after the first one, and say whether the stream
/// has ended. A fast upstream's whole stream, end included, then reaches the client in one
/// write: without this, the end of the body would follow in a write of its own. (Each poll
/// drives the upstream connection too, so what has reached its socket is read here.)
fn read_ahead<S>(events: &mut S) -> (Vec<S::Item>, bool)
where
    S: Stream + Unpin,
{
    use futures_util::FutureExt;
    // Most streams' events after the first, in one allocation.
    let mut ready = Vec::with_capacity(16);
    while ready.len() < READ_AHEAD_EVENTS {
        match events.next().now_or_never() {
            Some(Some(item)) => ready.push(item),
            Some(None) => return (ready, true),
            None => break,
        }
    }
    (ready, false)
}

/// One upstream attempt, up to the full body (unary) or the first event (stream).
async fn attempt(
    state: &AppState,
    candidate: &Candidate,
    prepared: PreparedRequest,
    mode: Mode,
) -> Result<ServedBody, AttemptFailure> {
    let provider = &candidate.deployment.provider.name;
    let request = build_request(candidate, prepared);
    let key = candidate.key();
    key.quota.count(1, 0, skein_types::now_ms());
    let response = state
        .client
        .send(request)
        .await
        .map_err(|error| classify_transport(provider, error.is_connect()))?;
    if let Some(seen) = QuotaObservation::from_headers(response.headers(), skein_types::now_ms) {
        key.quota.observe(seen);
    }
    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        return Err(classify_status(provider, status, &headers, &body));
    }
    match mode {
        Mode::Unary => {
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| classify_transport(provider, false))?
                .to_bytes();
            Ok(ServedBody::Unary(body))
        }
        Mode::Stream => {
            let mut events = UpstreamEvents::new(BodyDataStream::new(response.into_body())).fuse();
            match events.next().await {
                Some(Ok(first)) => {
                    let (ready, ended) = read_ahead(&mut events);
                    let ready = futures_util::stream::iter(ready);
                    let rest: EventStream = if ended {
                        Box::pin(ready)
                    } else {
                        Box::pin(ready.chain(events))
                    };
                    Ok(ServedBody::Stream { first, rest })
                }
                Some(Err(_)) | None => Err(classify_empty_stream(provider)),
            }
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn chunks(
        parts: &[&'static str],
    ) -> impl futures_util::TryStream<Ok = Bytes, Error = std::io::Error> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|part| Ok::<_, std::io::Error>(Bytes::from_static(part.as_bytes())))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn parses_events_across_chunks_and_drops_retry_lines() {
        let body = chunks(&[
            ": keep-alive\n\nretry: 30",
            "00\n\nevent: message_start\r\ndata: {\"a\"",
            ":1}\r\n\r\ndata: one\ndata: two\n",
            "\ndata: [DONE]\n\n",
        ]);
        let events: Vec<_> = UpstreamEvents::new(body).collect().await;
        let events: Vec<(String, String)> = events
            .into_iter()
            .map(|event| {
                let event = event.expect("event");
                (event.event.into_owned(), event.data)
            })
            .collect();
        assert_eq!(
            events,
            [
                ("message_start".to_owned(), r#"{"a":1}"#.to_owned()),
                ("message".to_owned(), "one\ntwo".to_owned()),
                ("message".to_owned(), "[DONE]".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn an_event_over_the_limit_is_an_error() {
        let body = chunks(&["data: 0123456789abcdef\n\n"]);
        let mut events = UpstreamEvents::with_limit(body, 8);
        assert!(matches!(
            events.next().await,
            Some(Err(SseStreamError::PayloadTooLarge(_)))
        ));
    }

    #[test]
    fn takes_what_has_arrived_and_sees_the_end() {
        let mut ended = futures_util::stream::iter([1, 2, 3]).fuse();
        assert_eq!(read_ahead(&mut ended), (vec![1, 2, 3], true));

        let mut open = futures_util::stream::iter([1, 2]).chain(futures_util::stream::pending());
        assert_eq!(read_ahead(&mut open), (vec![1, 2], false));

        let mut long = futures_util::stream::iter(0..1000);
        let (ready, ended) = read_ahead(&mut long);
        assert_eq!((ready.len(), ended), (READ_AHEAD_EVENTS, false));
    }
}
