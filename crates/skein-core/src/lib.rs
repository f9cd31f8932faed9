//! The proxy's decisions, without any I/O: the runtime view of a validated config (secrets
//! resolved, headers prebuilt), the route table, load balancing, the per-key circuit breaker,
//! and the attempt plan that orders keys, deployments and fallbacks for one request.
//!
//! Must not open sockets, touch storage or depend on the HTTP server or client: everything here
//! is testable with plain values and a clock passed in.

pub mod accounting;
pub mod auth;
pub mod balance;
pub mod health;
pub mod limits;
pub mod plan;
pub mod runtime;
pub mod secret;
pub mod shared;

pub use health::{Admission, FailureKind, KeyHealth};
pub use plan::{AttemptPlan, Candidate, NextAttempt};
pub use runtime::{
    DeploymentRuntime, KeyRuntime, ModelEntry, ProviderRuntime, ResolveError, RouteRuntime,
    RuntimeConfig,
};
pub use secret::Secret;
