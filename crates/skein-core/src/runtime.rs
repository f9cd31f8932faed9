//! The runtime view of a validated config: what the request path reads. Built once per config
//! change and shared behind an `Arc`; nothing in it is locked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use http::{HeaderName, HeaderValue, Uri};
use skein_types::config::DEFAULT_ATTEMPT_TIMEOUT_MS;
use skein_types::{
    BreakerSpec, ConfigError, CredentialRef, ProviderKind, RetrySpec, ServerSpec, Strategy,
    ValidatedConfig, WireProtocol, is_path_segment,
};

use crate::health::KeyHealth;
use crate::secret::Secret;
use crate::shared::{DecayingRate, KeyQuota, RemoteDeploymentView};

/// Everything the proxy needs to route a request.
#[derive(Debug)]
pub struct RuntimeConfig {
    pub server: ServerSpec,
    providers: HashMap<String, Arc<ProviderRuntime>>,
    routes: HashMap<String, Arc<RouteRuntime>>,
    /// Routes made for `provider/model` and well-known model names, kept so that each such
    /// name is built once (and its deployment keeps its statistics) rather than per request.
    implicit_routes: RwLock<HashMap<String, Arc<RouteRuntime>>>,
    /// What `/v1/models` lists, sorted.
    pub models: Vec<ModelEntry>,
}

/// At most this many implicit routes are kept; names past it (clients can send any name) are
/// built per request, as before there was a cache.
const MAX_IMPLICIT_ROUTES: usize = 1024;

/// One line of `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    pub owned_by: String,
}

/// A provider with its keys resolved.
#[derive(Debug)]
pub struct ProviderRuntime {
    /// Shared, not copied, by the metric labels and logs of every request.
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub protocol: WireProtocol,
    /// No trailing slash.
    pub base_url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub keys: Vec<KeyRuntime>,
    pub api_version: Option<String>,
    pub breaker: BreakerSpec,
}

/// One key of a provider.
#[derive(Debug)]
pub struct KeyRuntime {
    pub name: String,
    pub weight: u32,
    /// The key's secret; `None` for keyless local servers.
    pub secret: Option<Secret>,
    /// The header that carries the secret, as the provider's adapter writes it (marked
    /// sensitive), made on the key's first use.
    pub auth_header: OnceLock<Option<(HeaderName, HeaderValue)>>,
    pub health: KeyHealth,
    /// The upstream's quota for the key, when configured.
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// Use of the key this minute (this node's and the cluster's) and the upstream's figures.
    pub quota: KeyQuota,
}

impl KeyRuntime {
    /// Whether the key is nearly out of upstream quota, cluster-wide.
    pub fn quota_tight(&self, now_wall_ms: u64) -> bool {
        self.quota.tight(self.rpm, self.tpm, now_wall_ms)
    }
}

/// A route with its deployments and policies.
#[derive(Debug)]
pub struct RouteRuntime {
    /// Shared, not copied, by the metric labels of every request.
    pub name: Arc<str>,
    /// The name as a response header value, built once (`None` if it cannot be one).
    pub name_header: Option<HeaderValue>,
    pub strategy: Strategy,
    pub deployments: Vec<Arc<DeploymentRuntime>>,
    pub fallbacks: Vec<String>,
    pub attempt_timeout_ms: u64,
    pub retry: RetrySpec,
    round_robin: AtomicUsize,
}

/// A provider and model a route can be served by, with live statistics.
#[derive(Debug)]
pub struct DeploymentRuntime {
    pub provider: Arc<ProviderRuntime>,
    pub model: String,
    pub weight: u32,
    /// The provider's name and `provider/model` as response header values, built once
    /// (`None` if they cannot be one).
    pub provider_header: Option<HeaderValue>,
    pub deployment_header: Option<HeaderValue>,
    /// The upstream URIs this deployment was called at, built on first use.
    pub uris: UriCache,
    /// The headers of the answers it serves (unary, streamed), built by the proxy on first
    /// use and cloned for each answer. A deployment belongs to one route, so the route's
    /// header can be among them.
    pub response_headers: std::sync::OnceLock<[http::HeaderMap; 2]>,
    /// The most output tokens the model can produce (from the config, else the model
    /// catalog): requests asking for more are clamped.
    pub max_output_tokens: Option<u64>,
    in_flight: AtomicU32,
    /// Latency EWMA in microseconds; 0 until the first success.
    latency_ewma_us: AtomicU64,
    /// This node's error rate of attempts on the deployment.
    pub errors: DecayingRate,
    /// The other nodes' error rate and latency for the same provider and model.
    pub remote: RemoteDeploymentView,
}

/// Why a model name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// No route of that name and no `provider/model` match; carries what exists.
    UnknownModel { known: Vec<String> },
    /// A `provider/model` or well-known name for a provider whose request paths carry the
    /// model (Azure, Gemini), that cannot be one path segment.
    UnusableModel { provider: String },
}

impl RuntimeConfig {
    /// Carry what `previous` learned into this config, for what both have: the health of each
    /// key (same provider, same key name, same credential) and the latency EWMA of each
    /// deployment (same route, provider and model). A config change then does not forget
    /// that a key is cooling down.
    pub fn inherit_from(&self, previous: &RuntimeConfig) {
        for (name, provider) in &self.providers {
            let Some(old) = previous.providers.get(name) else {
                continue;
            };
            for key in &provider.keys {
                if let Some(old_key) = old.keys.iter().find(|old_key| {
                    old_key.name == key.name
                        && old_key.secret.as_ref().map(Secret::expose)
                            == key.secret.as_ref().map(Secret::expose)
                }) {
                    key.health.inherit(&old_key.health);
                    key.quota.inherit(&old_key.quota);
                }
            }
        }
        for (name, route) in &self.routes {
            let Some(old) = previous.routes.get(name) else {
                continue;
            };
            for deployment in &route.deployments {
                if let Some(old_deployment) = old.deployments.iter().find(|d| {
                    d.provider.name == deployment.provider.name && d.model == deployment.model
                }) {
                    deployment
                        .latency_ewma_us
                        .store(old_deployment.latency_ewma_us(), Ordering::Relaxed);
                    deployment.errors.inherit(&old_deployment.errors);
                }
            }
        }
    }

    /// Resolve every credential and prebuild headers. `resolve` reads a credential reference.
    pub fn build(
        validated: &ValidatedConfig,
        resolve: &dyn Fn(&CredentialRef) -> Result<String, String>,
    ) -> Result<RuntimeConfig, Vec<ConfigError>> {
        let config = validated.config();
        let mut errors = Vec::new();
        let mut providers = HashMap::new();
        for (index, spec) in config.providers.iter().enumerate() {
            let path = format!("providers[{index}]");
            let protocol = spec.kind.wire_protocol();
            let base_url = spec
                .base_url
                .as_deref()
                .or(spec.kind.default_base_url())
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_owned();
            let mut headers = Vec::new();
            for (name, value) in &spec.headers {
                match (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::try_from(value.as_str()),
                ) {
                    (Ok(name), Ok(value)) => headers.push((name, value)),
                    _ => errors.push(ConfigError {
                        path: format!("{path}.headers"),
                        message: format!("header {name:?} has an invalid name or value"),
                    }),
                }
            }
            let mut keys = Vec::new();
            for (key_index, key_spec) in spec.keys.iter().enumerate() {
                let key_path = format!("{path}.keys[{key_index}].key");
                let secret = match resolve(&key_spec.key) {
                    Ok(value) => Secret::new(value),
                    Err(message) => {
                        errors.push(ConfigError {
                            path: key_path,
                            message,
                        });
                        continue;
                    }
                };
                // Every provider's header carries the secret as it is (after `Bearer ` for
                // some): a secret that is no header value is refused here, whatever adapter
                // writes the header later.
                if HeaderValue::from_str(secret.expose()).is_err() {
                    errors.push(ConfigError {
                        path: key_path,
                        message: format!(
                            "the secret behind {} is not a valid header value",
                            key_spec.key
                        ),
                    });
                    continue;
                }
                keys.push(KeyRuntime {
                    name: key_spec
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("key-{key_index}")),
                    weight: key_spec.weight,
                    secret: Some(secret),
                    auth_header: OnceLock::new(),
                    health: KeyHealth::default(),
                    rpm: key_spec.rpm,
                    tpm: key_spec.tpm,
                    quota: KeyQuota::default(),
                });
            }
            if keys.is_empty() {
                // Keyless local servers (or every key failed to resolve, already reported).
                keys.push(KeyRuntime {
                    name: "none".to_owned(),
                    weight: 1,
                    secret: None,
                    auth_header: OnceLock::new(),
                    health: KeyHealth::default(),
                    rpm: None,
                    tpm: None,
                    quota: KeyQuota::default(),
                });
            }
            let provider = ProviderRuntime {
                name: Arc::from(spec.name.as_str()),
                kind: spec.kind,
                protocol,
                base_url,
                headers,
                keys,
                api_version: spec.api_version.clone(),
                breaker: spec.circuit_breaker.clone(),
            };
            providers.insert(spec.name.clone(), Arc::new(provider));
        }

        let mut routes = HashMap::new();
        for spec in &config.routes {
            let mut deployments = Vec::new();
            for deployment in &spec.deployments {
                if let Some(provider) = providers.get(&deployment.provider) {
                    let mut runtime = DeploymentRuntime::new(
                        provider.clone(),
                        deployment.model.clone(),
                        deployment.weight,
                    );
                    if deployment.max_output_tokens.is_some() {
                        runtime.max_output_tokens = deployment.max_output_tokens;
                    }
                    deployments.push(Arc::new(runtime));
                }
            }
            let route = RouteRuntime {
                name: Arc::from(spec.name.as_str()),
                name_header: header_value(&spec.name),
                strategy: spec.strategy,
                deployments,
                fallbacks: spec.fallbacks.clone(),
                attempt_timeout_ms: spec
                    .attempt_timeout_ms
                    .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT_MS),
                retry: spec.retry.clone(),
                round_robin: AtomicUsize::new(0),
            };
            routes.insert(spec.name.clone(), Arc::new(route));
        }

        if !errors.is_empty() {
            return Err(errors);
        }

        let mut models: Vec<ModelEntry> = config
            .routes
            .iter()
            .map(|route| ModelEntry {
                id: route.name.clone(),
                owned_by: "skein".to_owned(),
            })
            .collect();
        for provider in &config.providers {
            for model in &provider.models {
                models.push(ModelEntry {
                    id: format!("{}/{model}", provider.name),
                    owned_by: provider.name.clone(),
                });
            }
        }
        models.sort_by(|left, right| left.id.cmp(&right.id));
        models.dedup_by(|left, right| left.id == right.id);

        Ok(RuntimeConfig {
            server: config.server.clone(),
            providers,
            routes,
            implicit_routes: RwLock::default(),
            models,
        })
    }

    /// The routes to try for a model name, the asked-for one first, then its fallbacks
    /// (breadth first, each route once).
    pub fn resolve(&self, model: &str) -> Result<Vec<Arc<RouteRuntime>>, ResolveError> {
        let first = match self.routes.get(model) {
            Some(route) => route.clone(),
            None => match self.implicit_route(model)? {
                Some(route) => return Ok(vec![route]),
                None => {
                    return Err(ResolveError::UnknownModel {
                        known: self.models.iter().map(|entry| entry.id.clone()).collect(),
                    });
                }
            },
        };
        let mut chain = vec![first];
        let mut index = 0;
        while index < chain.len() && chain.len() < 16 {
            let route = chain[index].clone();
            for name in &route.fallbacks {
                if chain.iter().any(|route| *route.name == **name) {
                    continue;
                }
                if let Some(route) = self.routes.get(name) {
                    chain.push(route.clone());
                }
            }
            index += 1;
        }
        Ok(chain)
    }

    /// The route for a name that is not a configured route: `provider/model` or a well-known
    /// model name. Built on first use and kept (up to [`MAX_IMPLICIT_ROUTES`]).
    fn implicit_route(&self, model: &str) -> Result<Option<Arc<RouteRuntime>>, ResolveError> {
        let full = {
            let kept = self
                .implicit_routes
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(route) = kept.get(model) {
                return Ok(Some(route.clone()));
            }
            kept.len() >= MAX_IMPLICIT_ROUTES
        };
        let Some(route) = self
            .direct_route(model)
            .or_else(|| self.inferred_route(model))
        else {
            return Ok(None);
        };
        // The client chose this name: it must not reach into another path of the upstream.
        for deployment in &route.deployments {
            if deployment.provider.kind.model_in_path() && !is_path_segment(&deployment.model) {
                return Err(ResolveError::UnusableModel {
                    provider: deployment.provider.name.to_string(),
                });
            }
        }
        if full {
            return Ok(Some(route));
        }
        let mut kept = self
            .implicit_routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = kept.get(model) {
            return Ok(Some(existing.clone()));
        }
        if kept.len() < MAX_IMPLICIT_ROUTES {
            kept.insert(model.to_owned(), route.clone());
        }
        Ok(Some(route))
    }

    /// `provider/model` straight to that provider, with default policies.
    fn direct_route(&self, model: &str) -> Option<Arc<RouteRuntime>> {
        let (provider_name, upstream_model) = model.split_once('/')?;
        let provider = self.providers.get(provider_name)?;
        if upstream_model.is_empty() {
            return None;
        }
        Some(single_deployment_route(
            model,
            provider.clone(),
            upstream_model,
        ))
    }

    /// A bare, well-known model name (`gpt-4o`, `claude-sonnet-4-5`…) goes to the one
    /// configured provider of the kind that makes it, so unchanged clients work with no routes.
    fn inferred_route(&self, model: &str) -> Option<Arc<RouteRuntime>> {
        let kind = infer_kind(model)?;
        let mut matching = self
            .providers
            .values()
            .filter(|provider| provider.kind == kind);
        let provider = matching.next()?;
        if matching.next().is_some() {
            // Ambiguous: more than one provider of that kind; the user must say which.
            return None;
        }
        Some(single_deployment_route(model, provider.clone(), model))
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderRuntime>> {
        self.providers.get(name)
    }

    /// Every provider, for status and metrics.
    pub fn providers(&self) -> impl Iterator<Item = &Arc<ProviderRuntime>> {
        self.providers.values()
    }

    /// Every route.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteRuntime>> {
        self.routes.values()
    }
}

/// A deployment's upstream URIs, each under the name of what it is for (`chat_completions`,
/// `/v1/messages`…): a handful at most. A URI is built and parsed once, then cloned, which
/// shares its bytes; the request path then neither formats nor parses a URL.
#[derive(Debug, Default)]
pub struct UriCache(RwLock<Vec<(&'static str, Uri)>>);

impl UriCache {
    /// The URI for `purpose`, from `build` the first time. A URI that does not parse is not
    /// kept, and its error is returned.
    pub fn get_or_build<E>(
        &self,
        purpose: &'static str,
        build: impl FnOnce() -> Result<Uri, E>,
    ) -> Result<Uri, E> {
        {
            let built = self
                .0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((_, uri)) = built.iter().find(|(name, _)| *name == purpose) {
                return Ok(uri.clone());
            }
        }
        let uri = build()?;
        let mut built = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !built.iter().any(|(name, _)| *name == purpose) {
            built.push((purpose, uri.clone()));
        }
        Ok(uri)
    }
}

/// `text` as a header value, if it can be one.
fn header_value(text: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(text).ok()
}

/// A route of one deployment with default policies, for `provider/model` and inferred names.
fn single_deployment_route(
    name: &str,
    provider: Arc<ProviderRuntime>,
    upstream_model: &str,
) -> Arc<RouteRuntime> {
    let deployment = DeploymentRuntime::new(provider, upstream_model.to_owned(), 1);
    Arc::new(RouteRuntime {
        name: Arc::from(name),
        name_header: header_value(name),
        strategy: Strategy::Ordered,
        deployments: vec![Arc::new(deployment)],
        fallbacks: Vec::new(),
        attempt_timeout_ms: DEFAULT_ATTEMPT_TIMEOUT_MS,
        retry: RetrySpec::default(),
        round_robin: AtomicUsize::new(0),
    })
}

/// The provider kind that makes a well-known model, from its name.
pub fn infer_kind(model: &str) -> Option<ProviderKind> {
    let name = model.to_ascii_lowercase();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|prefix| name.starts_with(prefix));
    if starts(&[
        "gpt-",
        "chatgpt-",
        "o1",
        "o3",
        "o4",
        "text-embedding-",
        "davinci",
        "babbage",
        "omni-moderation",
        "codex-",
    ]) {
        Some(ProviderKind::OpenAi)
    } else if starts(&["claude-"]) {
        Some(ProviderKind::Anthropic)
    } else if starts(&["gemini-", "gemma-"]) {
        Some(ProviderKind::Gemini)
    } else if starts(&[
        "mistral-",
        "codestral-",
        "ministral-",
        "pixtral-",
        "magistral-",
        "devstral-",
        "open-mistral",
    ]) {
        Some(ProviderKind::Mistral)
    } else if starts(&["grok-"]) {
        Some(ProviderKind::Xai)
    } else if starts(&["deepseek-"]) {
        Some(ProviderKind::DeepSeek)
    } else {
        None
    }
}

impl RouteRuntime {
    /// Next round-robin turn.
    pub fn next_turn(&self) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed)
    }
}

impl DeploymentRuntime {
    pub fn new(provider: Arc<ProviderRuntime>, model: String, weight: u32) -> DeploymentRuntime {
        DeploymentRuntime {
            provider_header: header_value(&provider.name),
            deployment_header: header_value(&format!("{}/{model}", provider.name)),
            uris: UriCache::default(),
            response_headers: std::sync::OnceLock::new(),
            max_output_tokens: skein_types::catalog::max_output_tokens(&model),
            provider,
            model,
            weight,
            in_flight: AtomicU32::new(0),
            latency_ewma_us: AtomicU64::new(0),
            errors: DecayingRate::default(),
            remote: RemoteDeploymentView::default(),
        }
    }

    /// Requests to this deployment in flight on this node.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count a request in; the guard counts it out when dropped.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            deployment: self.clone(),
        }
    }

    /// Latency EWMA in microseconds, 0 when unknown.
    pub fn latency_ewma_us(&self) -> u64 {
        self.latency_ewma_us.load(Ordering::Relaxed)
    }

    /// The cluster's error rate: this node's (when it used the deployment lately) and the
    /// other nodes', averaged per node.
    pub fn cluster_error_rate(&self) -> f64 {
        let (remote, _, nodes) = self.remote.get();
        let local_active = self.errors.active_within(60_000);
        match (local_active, nodes) {
            (_, 0) => self.errors.value(),
            (false, _) => remote,
            (true, nodes) => {
                (self.errors.value() + remote * f64::from(nodes)) / (f64::from(nodes) + 1.0)
            }
        }
    }

    /// The cluster's latency EWMA (µs, 0 unknown), averaged over the nodes that measured it.
    pub fn cluster_latency_us(&self) -> u64 {
        let local = self.latency_ewma_us();
        let (_, remote, nodes) = self.remote.get();
        match (local, remote) {
            (0, remote) => remote,
            (local, 0) => local,
            (local, remote) => (local + remote * u64::from(nodes)) / (u64::from(nodes) + 1),
        }
    }

    /// Fold one observed latency into the EWMA (weight 1/5 for the new sample).
    pub fn observe_latency(&self, micros: u64) {
        let sample = micros.max(1);
        let _ = self
            .latency_ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                if old == 0 {
                    Some(sample)
                } else {
                    Some((old * 4 + sample) / 5)
                }
            });
    }
}

/// Holds one in-flight slot of a deployment.
#[derive(Debug)]
pub struct InFlightGuard {
    deployment: Arc<DeploymentRuntime>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_is_built_once_per_purpose_and_a_bad_one_is_not_kept() {
        let cache = UriCache::default();
        let mut builds = 0;
        for _ in 0..3 {
            let uri = cache
                .get_or_build("chat", || {
                    builds += 1;
                    "http://127.0.0.1:9/v1/chat/completions".parse::<Uri>()
                })
                .expect("valid");
            assert_eq!(uri.path(), "/v1/chat/completions");
        }
        assert_eq!(builds, 1);
        let other = cache
            .get_or_build("embeddings", || {
                "http://127.0.0.1:9/v1/embeddings".parse::<Uri>()
            })
            .expect("valid");
        assert_eq!(other.path(), "/v1/embeddings");

        for _ in 0..2 {
            assert!(
                cache
                    .get_or_build("bad", || "http://a b/".parse::<Uri>())
                    .is_err()
            );
        }
        let fixed = cache
            .get_or_build("bad", || "http://127.0.0.1:9/ok".parse::<Uri>())
            .expect("valid");
        assert_eq!(fixed.path(), "/ok");
    }
}
