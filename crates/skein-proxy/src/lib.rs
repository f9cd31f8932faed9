//! The proxy API: an axum router serving OpenAI- and Anthropic-compatible endpoints, the
//! upstream HTTP client, the attempt loop (retries, key rotation, fallbacks, circuit breaking),
//! SSE streaming, OpenAI-shaped errors and Prometheus metrics.
//!
//! Reads configuration only through an immutable [`skein_core::RuntimeConfig`] snapshot
//! swapped atomically; must never wait on storage, Raft or gossip on the request path.

pub mod adapters;
pub mod app;
pub mod auth;
pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod health;
pub mod idempotency;
pub mod inbound;
pub mod intake;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod relay;
pub mod respond;
pub mod responses;
pub mod spend;
pub mod state;
pub mod translate;
pub mod upstream;

pub use app::{AppState, ProxyOptions, direct, ops_router, router};
pub use error::ApiError;
pub use metrics::Metrics;
