//! Wire formats of the upstream providers and pure functions that translate between them and
//! the OpenAI shape Skein uses as its common language. One file per provider; no I/O here, so
//! every translation is tested with fixtures.
//!
//! Must not depend on tokio, axum, reqwest or anything that opens a socket.

pub mod anthropic;
pub mod error;
pub mod gemini;
pub mod openai;
pub mod raw;
pub mod responses;
pub mod sse;
pub mod usage;

pub use error::{TranslateError, UpstreamErrorBody, upstream_error_message};
pub use raw::{RawObject, RawParseError};
pub use sse::{ChainedStream, OutEvent, StreamTranslator};
pub use usage::Usage;
