//! Errors as clients expect them: OpenAI's `{"error":{"message","type","param","code"}}`, or
//! Anthropic's `{"type":"error","error":{"type","message"}}` on `/v1/messages`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use skein_types::ErrorCode;

/// Which error shape the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
}

/// An error to send to the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The request member at fault, if any.
    pub param: Option<&'static str>,
    /// A machine-readable code (`model_not_found`…).
    pub detail_code: Option<&'static str>,
    /// Status to report instead of the code's default (an upstream 4xx passed through).
    pub status_override: Option<u16>,
    pub retry_after_secs: Option<u64>,
    pub shape: ErrorShape,
    /// Rate-limit headers to send with the error.
    pub rate_headers: Option<Box<crate::limits::RateHeaders>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            param: None,
            detail_code: None,
            status_override: None,
            retry_after_secs: None,
            shape: ErrorShape::OpenAi,
            rate_headers: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn with_param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    pub fn with_detail_code(mut self, detail_code: &'static str) -> ApiError {
        self.detail_code = Some(detail_code);
        self
    }

    pub fn with_status(mut self, status: u16) -> ApiError {
        self.status_override = Some(status);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_secs = Some(seconds);
        self
    }

    pub fn with_headers(mut self, headers: crate::limits::RateHeaders) -> ApiError {
        self.rate_headers = (!headers.is_empty()).then(|| Box::new(headers));
        self
    }

    pub fn with_shape(mut self, shape: ErrorShape) -> ApiError {
        self.shape = shape;
        self
    }

    pub fn status(&self) -> StatusCode {
        let status = self.status_override.unwrap_or(self.code.http_status());
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The JSON body in the client's shape.
    pub fn body(&self) -> serde_json::Value {
        match self.shape {
            ErrorShape::OpenAi => json!({
                "error": {
                    "message": self.message,
                    // OpenAI reports an exhausted budget with its own type.
                    "type": match self.detail_code {
                        Some("insufficient_quota") => "insufficient_quota",
                        _ => self.code.openai_type(),
                    },
                    "param": self.param,
                    "code": self.detail_code.unwrap_or(self.code.label()),
                }
            }),
            ErrorShape::Anthropic => json!({
                "type": "error",
                "error": {"type": self.code.anthropic_type(), "message": self.message}
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if let Some(headers) = self.rate_headers {
            headers.apply(response.headers_mut());
        }
        response.extensions_mut().insert(self.code);
        response
    }
}
