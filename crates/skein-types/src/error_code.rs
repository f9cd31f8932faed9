//! The small error vocabulary shared by every boundary. Each code has one HTTP status and one
//! OpenAI-style `type`, so the proxy, and later the admin API, report the same thing the same way.

/// What went wrong, independent of which boundary reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request could not be parsed or is semantically invalid (400).
    InvalidRequest,
    /// Missing or unknown credentials (401).
    Unauthenticated,
    /// Credentials are valid but not allowed to do this (403).
    PermissionDenied,
    /// No such route, model or path (404).
    NotFound,
    /// The request body is larger than the configured limit (413).
    PayloadTooLarge,
    /// The client sent its request body too slowly (408).
    RequestTimeout,
    /// A rate limit was hit (429).
    RateLimited,
    /// The request conflicts with another in progress (409: an `Idempotency-Key` in use).
    Conflict,
    /// Well-formed, but cannot be processed as sent (422: an `Idempotency-Key` reused for
    /// another request).
    Unprocessable,
    /// The upstream answered with an error we pass on (502).
    UpstreamError,
    /// Every candidate deployment is cooling down or unavailable (503).
    Unavailable,
    /// The upstream or the overall deadline timed out (504).
    Timeout,
    /// A bug or an unexpected state inside Skein (500).
    Internal,
}

impl ErrorCode {
    /// The HTTP status code for this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::RateLimited => 429,
            ErrorCode::Conflict => 409,
            ErrorCode::Unprocessable => 422,
            ErrorCode::UpstreamError => 502,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
        }
    }

    /// The OpenAI-style `error.type` string.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::NotFound
            | ErrorCode::PayloadTooLarge
            | ErrorCode::RequestTimeout
            | ErrorCode::Conflict
            | ErrorCode::Unprocessable => "invalid_request_error",
            ErrorCode::Unauthenticated => "authentication_error",
            ErrorCode::PermissionDenied => "permission_error",
            ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::UpstreamError | ErrorCode::Unavailable | ErrorCode::Timeout => {
                "upstream_error"
            }
            ErrorCode::Internal => "server_error",
        }
    }

    /// The Anthropic-style `error.type` string.
    pub fn anthropic_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::PayloadTooLarge
            | ErrorCode::RequestTimeout
            | ErrorCode::Conflict
            | ErrorCode::Unprocessable => "invalid_request_error",
            ErrorCode::NotFound => "not_found_error",
            ErrorCode::Unauthenticated => "authentication_error",
            ErrorCode::PermissionDenied => "permission_error",
            ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::Unavailable => "overloaded_error",
            ErrorCode::UpstreamError | ErrorCode::Timeout | ErrorCode::Internal => "api_error",
        }
    }

    /// A low-cardinality label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unprocessable => "unprocessable",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}
