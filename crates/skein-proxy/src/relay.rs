//! The SSE relay: moves a served stream's events from the upstream to the client through its
//! translator, a burst of events per write, and settles the call's usage when it is dropped —
//! at the end of the stream, or when the client leaves in the middle.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use skein_core::{Candidate, RouteRuntime};
use skein_providers::StreamTranslator;
use skein_types::ErrorCode;

use crate::dispatch::EventStream;
use crate::error::{ApiError, ErrorShape};
use crate::intake::RequestContext;
use crate::metrics::ProviderLabels;
use crate::respond::{count_fallback, record_request, served_headers};
use crate::responses::Keep;
use crate::spend::Hold;
use crate::state::AppState;

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
    keep: Option<Keep>,
) -> Response {
    count_fallback(state, requested_route, &candidate);
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
        .provider(&provider)
        .time_to_first_token
        .observe(context.started.elapsed().as_secs_f64());
    let mut response = Response::new(Body::empty());
    *response.headers_mut() = served_headers(&context, &candidate, attempts, None);
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
        keep,
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
    /// Where a Responses answer is stored once whole, before its last events go out.
    keep: Option<Keep>,
    /// Events written to the client (estimates output tokens when the upstream's usage never
    /// arrived because the client left first).
    events_out: u64,
    _in_flight: skein_core::runtime::InFlightGuard,
}

impl StreamRelay {
    /// The next piece of the client's body: waits for one upstream event, then takes every
    /// event already buffered, so a burst becomes one write instead of one write per event.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.read_chunk().await;
        if self.keep.is_some()
            && let Some(result) = self.translator.take_result()
            && let Some(keep) = self.keep.take()
        {
            keep.keep(result).await;
        }
        chunk
    }

    async fn read_chunk(&mut self) -> Option<Bytes> {
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
                        // A client API with its own failure events (Responses) gets them.
                        self.translator.fail(
                            "upstream_stream_ended",
                            "the provider's stream ended before the answer was complete",
                            &mut out,
                        );
                    }
                    return self.emit(&out);
                }
                Some(Err(error)) => {
                    let message = error.to_string();
                    self.finished = true;
                    self.interrupted(&message);
                    let text = format!("the provider's stream broke: {message}");
                    if self
                        .translator
                        .fail("upstream_stream_interrupted", &text, &mut out)
                    {
                        return self.emit(&out);
                    }
                    let error = ApiError::new(ErrorCode::UpstreamError, text)
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
pub(crate) fn count_key_tokens(candidate: &Candidate, usage: &skein_providers::Usage) {
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
    let mut bytes = Vec::with_capacity(events.iter().map(|event| event.wire_len()).sum());
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
