//! Calling an upstream: the request an adapter prepared, built with the key's and the
//! provider's headers, and what came back read into a classified outcome that the attempt
//! loop acts on.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use skein_core::{Candidate, FailureKind};
use skein_providers::upstream_error_message;
use skein_types::ErrorCode;

use crate::error::ApiError;

/// A request ready to send to one candidate.
#[derive(Debug)]
pub struct PreparedRequest {
    pub uri: Uri,
    pub body: Bytes,
    /// Protocol-specific headers (e.g. `anthropic-version`), on top of the provider's own.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

/// The URI `url` builds for a candidate, built once per deployment and `purpose` (`url` must
/// give the same answer for the same deployment and purpose).
pub fn upstream_uri(
    candidate: &Candidate,
    purpose: &'static str,
    url: impl FnOnce() -> String,
) -> Result<Uri, ApiError> {
    candidate.deployment.uris.get_or_build(purpose, || {
        let url = url();
        url.parse::<Uri>().map_err(|_| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "provider {} has an invalid URL: {url}",
                    candidate.deployment.provider.name
                ),
            )
        })
    })
}

/// Build the upstream request for a candidate.
pub fn build_request(
    candidate: &Candidate,
    prepared: PreparedRequest,
) -> hyper::Request<Full<Bytes>> {
    let provider = &candidate.deployment.provider;
    let mut request = hyper::Request::new(Full::new(prepared.body));
    *request.method_mut() = hyper::Method::POST;
    *request.uri_mut() = prepared.uri;
    let headers = request.headers_mut();
    headers.reserve(4 + provider.headers.len() + prepared.headers.len());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("skein/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some((name, value)) = crate::adapters::auth_header(candidate) {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &provider.headers {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in prepared.headers {
        headers.insert(name, value);
    }
    request
}

/// Why an attempt failed, and what that means for retries and the key's health.
#[derive(Debug)]
pub struct AttemptFailure {
    /// Another attempt (another key, deployment or fallback) may succeed.
    pub retryable: bool,
    /// What the key's circuit breaker should record, if anything.
    pub breaker: Option<FailureKind>,
    /// What the client gets if this is the last failure.
    pub error: ApiError,
    /// Low-cardinality outcome label for metrics.
    pub outcome: &'static str,
}

/// Read `retry-after-ms` (OpenAI) or `retry-after` (seconds) into milliseconds.
pub fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    if let Some(millis) = headers
        .get("retry-after-ms")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        && millis.is_finite()
        && millis >= 0.0
    {
        return Some(millis.ceil() as u64);
    }
    let seconds = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()?;
    if seconds.is_finite() && seconds >= 0.0 {
        Some((seconds * 1000.0).ceil() as u64)
    } else {
        None
    }
}

/// Classify a non-success upstream answer.
pub fn classify_status(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
) -> AttemptFailure {
    let upstream_message = upstream_error_message(body)
        .map(|message| truncate(&message, 500))
        .unwrap_or_else(|| format!("status {}", status.as_u16()));
    let code = status.as_u16();
    match code {
        429 => {
            let retry_after = retry_after_ms(headers);
            let mut error = ApiError::new(
                ErrorCode::RateLimited,
                format!("provider {provider} is rate limiting: {upstream_message}"),
            )
            .with_detail_code("upstream_rate_limited");
            if let Some(millis) = retry_after {
                error = error.with_retry_after(millis.div_ceil(1000).max(1));
            }
            AttemptFailure {
                retryable: true,
                breaker: Some(FailureKind::RateLimited {
                    retry_after_ms: retry_after,
                }),
                error,
                outcome: "rate_limited",
            }
        }
        401 | 403 => AttemptFailure {
            // The provider rejected *our* key: another key may work, and the client is not at
            // fault, so it is reported as a bad gateway.
            retryable: true,
            breaker: Some(FailureKind::Transient),
            error: ApiError::new(
                ErrorCode::UpstreamError,
                format!("provider {provider} rejected its API key: {upstream_message}"),
            )
            .with_detail_code("upstream_auth_failed"),
            outcome: "auth_failed",
        },
        408 | 500..=599 => AttemptFailure {
            retryable: true,
            breaker: Some(FailureKind::Transient),
            error: ApiError::new(
                ErrorCode::UpstreamError,
                format!("provider {provider} failed with status {code}: {upstream_message}"),
            )
            .with_detail_code("upstream_error"),
            outcome: "server_error",
        },
        _ => AttemptFailure {
            // The request itself is wrong: retrying cannot help; pass the upstream's verdict on.
            retryable: false,
            breaker: None,
            error: ApiError::new(ErrorCode::InvalidRequest, upstream_message)
                .with_status(code)
                .with_detail_code("upstream_rejected_request"),
            outcome: "client_error",
        },
    }
}

/// Classify a transport failure (connection refused, reset, body cut).
pub fn classify_transport(provider: &str, connect_failed: bool) -> AttemptFailure {
    let what = if connect_failed {
        "could not connect to"
    } else {
        "lost the connection to"
    };
    AttemptFailure {
        retryable: true,
        breaker: Some(FailureKind::Transient),
        error: ApiError::new(
            ErrorCode::UpstreamError,
            format!("{what} provider {provider}"),
        )
        .with_detail_code("upstream_unreachable"),
        outcome: "connection_error",
    }
}

/// An attempt that ran out of time.
pub fn classify_timeout(provider: &str, timeout: Duration) -> AttemptFailure {
    AttemptFailure {
        retryable: true,
        breaker: Some(FailureKind::Transient),
        error: ApiError::new(
            ErrorCode::Timeout,
            format!(
                "provider {provider} did not answer within {} ms",
                timeout.as_millis()
            ),
        )
        .with_detail_code("upstream_timeout"),
        outcome: "timeout",
    }
}

/// A stream that ended or broke before its first event.
pub fn classify_empty_stream(provider: &str) -> AttemptFailure {
    AttemptFailure {
        retryable: true,
        breaker: Some(FailureKind::Transient),
        error: ApiError::new(
            ErrorCode::UpstreamError,
            format!("provider {provider} closed the stream before sending anything"),
        )
        .with_detail_code("upstream_stream_empty"),
        outcome: "empty_stream",
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_retry_after_in_both_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after_ms(&headers), Some(2_000));
        headers.insert("retry-after-ms", HeaderValue::from_static("150.5"));
        assert_eq!(retry_after_ms(&headers), Some(151));
        let mut dated = HeaderMap::new();
        dated.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after_ms(&dated), None);
    }

    #[test]
    fn client_errors_are_not_retried_and_keep_their_status() {
        let body = Bytes::from_static(br#"{"error":{"message":"bad tool schema"}}"#);
        let failure = classify_status(
            "openai",
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            &body,
        );
        assert!(!failure.retryable);
        assert_eq!(failure.error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(failure.error.message, "bad tool schema");
        let failure = classify_status(
            "openai",
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            &Bytes::new(),
        );
        assert!(failure.retryable);
        assert_eq!(failure.error.status(), StatusCode::BAD_GATEWAY);
    }
}
