//! A Skein node: loads the config (a file, or providers discovered from the environment),
//! resolves credentials, and serves the proxy API and the admin gRPC API. The `skein` binary is a thin CLI over this
//! crate, and tests start nodes in-process through [`start_node`].

pub mod admin;
pub mod cli;
pub mod env;
pub mod idempotency;
pub mod leases;
pub mod load;
pub mod membership;
pub mod node;
pub mod responses;
pub mod spend;
pub mod spend_log;
pub mod tls;
pub mod typed;

pub use env::{Environment, MapEnvironment, ProcessEnvironment};
pub use load::{ConfigSource, discover_providers, load_config, parse_config_text};
pub use node::{ClusterOptions, NodeOptions, RunningNode, start_node};
