//! The configuration model. Plain data with serde, so the same types are read from a file today
//! and replicated through the control plane later. Everything here is *unvalidated*; use
//! [`crate::ValidatedConfig`] to get a config the rest of Skein can trust.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::{deserialize_millis, deserialize_opt_millis, serialize_millis};
use crate::provider_kind::ProviderKind;

/// The config file format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// A whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkeinConfig {
    /// Must be [`CONFIG_VERSION`].
    pub version: u32,
    #[serde(default)]
    pub server: ServerSpec,
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// Node-local proxy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Overall deadline for one request, all attempts included (to the first byte when
    /// streaming).
    #[serde(
        default = "default_request_timeout",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "request_timeout"
    )]
    pub request_timeout_ms: u64,
    /// How long a request's `Idempotency-Key` keeps its first answer for retries.
    #[serde(
        default = "default_idempotency_window",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "idempotency_window"
    )]
    pub idempotency_window_ms: u64,
}

fn default_idempotency_window() -> u64 {
    24 * 60 * 60 * 1000
}

fn default_max_body_bytes() -> u64 {
    32 * 1024 * 1024
}

fn default_request_timeout() -> u64 {
    600_000
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            max_body_bytes: default_max_body_bytes(),
            request_timeout_ms: default_request_timeout(),
            idempotency_window_ms: default_idempotency_window(),
        }
    }
}

/// An upstream provider: where it is, how to talk to it, and its keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// Unique name, used in routes and in `provider/model` names.
    pub name: String,
    pub kind: ProviderKind,
    /// Overrides the kind's default base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Extra headers sent with every upstream request (not for secrets: use `keys`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// One or more API keys; requests are spread over them by weight.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Azure OpenAI `api-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Models this provider serves, listed by `/v1/models` (any model may still be asked for
    /// as `provider/model`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// When a key of this provider is taken out of rotation, and for how long.
    #[serde(default)]
    pub circuit_breaker: BreakerSpec,
}

/// A key that keeps failing cools down, then gets one probe request (half-open) before it is
/// trusted again. A 429 cools the key down at once, for the upstream's `Retry-After` if given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Consecutive 5xx, timeouts or connection errors that trip the breaker.
    #[serde(default = "default_after_failures")]
    pub after_failures: u32,
    /// First cooldown; doubles each time a probe fails.
    #[serde(
        default = "default_cooldown",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "cooldown"
    )]
    pub cooldown_ms: u64,
    #[serde(
        default = "default_max_cooldown",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "max_cooldown"
    )]
    pub max_cooldown_ms: u64,
}

fn default_after_failures() -> u32 {
    3
}

fn default_cooldown() -> u64 {
    5_000
}

fn default_max_cooldown() -> u64 {
    60_000
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            after_failures: default_after_failures(),
            cooldown_ms: default_cooldown(),
            max_cooldown_ms: default_max_cooldown(),
        }
    }
}

/// One API key of a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// A reference to the secret: `env:NAME` or `file:/path`.
    pub key: CredentialRef,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A display name for logs and metrics; defaults to `key-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The upstream's requests-per-minute quota for this key, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// The upstream's tokens-per-minute quota for this key, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
}

fn default_weight() -> u32 {
    1
}

/// Where a secret lives. Config holds the reference, never the value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum CredentialRef {
    /// Read from an environment variable at start.
    Env(String),
    /// Read from a file at start (trailing newline trimmed).
    File(String),
}

impl fmt::Debug for CredentialRef {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{self}")
    }
}

impl fmt::Display for CredentialRef {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialRef::Env(name) => write!(formatter, "env:{name}"),
            CredentialRef::File(path) => write!(formatter, "file:{path}"),
        }
    }
}

impl std::str::FromStr for CredentialRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(name) = text.strip_prefix("env:") {
            if name.is_empty() {
                return Err("`env:` needs a variable name".to_owned());
            }
            return Ok(CredentialRef::Env(name.to_owned()));
        }
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err("`file:` needs a path".to_owned());
            }
            return Ok(CredentialRef::File(path.to_owned()));
        }
        Err(
            "a key must be a reference, `env:NAME` or `file:/path`, never the secret itself"
                .to_owned(),
        )
    }
}

impl Serialize for CredentialRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CredentialRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A model alias clients ask for, and where it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The model name clients send.
    pub name: String,
    /// How to pick among `deployments`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Where the alias can be served, in order of preference for `strategy: ordered`.
    pub deployments: Vec<DeploymentSpec>,
    /// Other routes to try, in order, once every deployment of this one failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    /// Timeout of one upstream attempt (to the first byte when streaming).
    #[serde(
        default,
        deserialize_with = "deserialize_opt_millis",
        skip_serializing_if = "Option::is_none",
        rename = "timeout"
    )]
    pub attempt_timeout_ms: Option<u64>,
    #[serde(default)]
    pub retry: RetrySpec,
}

/// One place a route can be served: a provider and the provider's model name (the Azure
/// deployment name for Azure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    pub provider: String,
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The most output tokens the model can produce: a request asking for more is clamped
    /// to it. Defaults to what the model catalog knows of the model (none: not clamped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
}

/// How a route spreads requests over its deployments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random, proportional to weight times cluster-wide health: the error rate and latency
    /// every node observes, and the upstream quota left. The default.
    #[default]
    Adaptive,
    /// Random, proportional to weight.
    Weighted,
    /// In turn.
    RoundRobin,
    /// The deployment with the fewest requests in flight on this node.
    LeastInflight,
    /// The deployment with the lowest latency EWMA.
    LowestLatency,
    /// Always in the order written; later ones only on failure.
    Ordered,
}

impl Strategy {
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Adaptive => "adaptive",
            Strategy::Weighted => "weighted",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastInflight => "least_inflight",
            Strategy::LowestLatency => "lowest_latency",
            Strategy::Ordered => "ordered",
        }
    }
}

/// Retries within a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts over all deployments and keys of the route, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(
        default = "default_initial_backoff",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "initial_backoff"
    )]
    pub initial_backoff_ms: u64,
    #[serde(
        default = "default_max_backoff",
        deserialize_with = "deserialize_millis",
        serialize_with = "serialize_millis",
        rename = "max_backoff"
    )]
    pub max_backoff_ms: u64,
}

fn default_max_attempts() -> u32 {
    3
}

fn default_initial_backoff() -> u64 {
    100
}

fn default_max_backoff() -> u64 {
    5_000
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
        }
    }
}

/// The default per-attempt timeout when a route sets none.
pub const DEFAULT_ATTEMPT_TIMEOUT_MS: u64 = 120_000;

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
version: 1
server:
  max_body_bytes: 1048576
  request_timeout: 30s
providers:
  - name: openai
    kind: openai
    keys:
      - key: env:OPENAI_API_KEY
        weight: 2
      - key: file:/run/secrets/openai
routes:
  - name: smart
    strategy: lowest_latency
    timeout: 10s
    deployments:
      - provider: openai
        model: gpt-4o
    fallbacks: [cheap]
    retry: { max_attempts: 4, initial_backoff: 50ms, max_backoff: 2s }
"#;

    #[test]
    fn parses_a_full_config() {
        let config: SkeinConfig = serde_norway::from_str(EXAMPLE).expect("parse");
        assert_eq!(config.server.request_timeout_ms, 30_000);
        assert_eq!(config.providers[0].keys[0].weight, 2);
        assert_eq!(
            config.providers[0].keys[1].key,
            CredentialRef::File("/run/secrets/openai".to_owned())
        );
        assert_eq!(config.routes[0].attempt_timeout_ms, Some(10_000));
        assert_eq!(config.routes[0].retry.max_backoff_ms, 2_000);
        assert_eq!(config.routes[0].strategy, Strategy::LowestLatency);
    }

    #[test]
    fn rejects_unknown_keys_with_the_line() {
        let text = "version: 1\nproviders:\n  - name: a\n    kind: openai\n    colour: red\n";
        let error = serde_norway::from_str::<SkeinConfig>(text).expect_err("must fail");
        let message = error.to_string();
        assert!(message.contains("colour"), "{message}");
        assert!(message.contains("line 5"), "{message}");
    }

    #[test]
    fn rejects_literal_secrets() {
        let text =
            "version: 1\nproviders:\n  - name: a\n    kind: openai\n    keys: [{key: sk-123}]\n";
        let error = serde_norway::from_str::<SkeinConfig>(text).expect_err("must fail");
        assert!(error.to_string().contains("never the secret"), "{error}");
    }

    #[test]
    fn round_trips_through_json() {
        let config: SkeinConfig = serde_norway::from_str(EXAMPLE).expect("parse");
        let json = serde_json::to_string(&config).expect("serialize");
        let back: SkeinConfig = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(config, back);
    }
}
