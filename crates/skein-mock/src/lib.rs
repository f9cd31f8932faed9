//! A mock LLM provider for tests and benchmarks: a real HTTP server that speaks the OpenAI,
//! Anthropic and Gemini shapes, with fixed and per-token latency, streaming, faults chosen by model
//! name or switched per API key at run time, and a record of every request for assertions.
//!
//! Faults by model name (the model the upstream is asked for):
//! - `mock-429`: 429 with `Retry-After: 1`; `mock-500`: 500; `mock-400`: 400 (client error)
//! - `mock-timeout`: never answers (until the client gives up)
//! - `mock-stream-cut`: streams a few chunks, then drops the connection
//! - `mock-empty-stream`: answers 200 to a stream and closes before the first event
//! - `mock-slow-<ms>`: adds `<ms>` of latency before answering
//!
//! Tools are called only when asked (see `tools.rs`): `[[call NAME]]` or
//! `[[call NAME {"arg": …}]]` in the last user text, a tool choice that forces a call, or a
//! model whose name contains `tools`; arguments not given are made from the tool's schema.
//!
//! Faults by key: an API key starting with `fail-429`, `fail-500` or `fail-401` always gets
//! that status; [`MockServer::set_key_fault`] switches a fault on or off for one key.

mod anthropic;
mod gemini;
mod openai;
mod server;
mod text;
mod tools;

pub use server::{Fault, MockOptions, MockServer, RecordedRequest};
