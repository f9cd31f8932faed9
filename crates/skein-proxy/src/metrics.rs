//! Prometheus metrics, all named `skein_*`. Labels are low-cardinality: endpoint, route,
//! provider, status and outcome (never a key, a user or a request id).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// `spend` for a batch that holds a spend record, `config` for the others.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub port: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub port: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub provider: Arc<str>,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: Arc<str>,
    /// `input`, `output`, `cached_input`, `reasoning`
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `key`, `team` or `customer`
    pub scope: &'static str,
    /// `requests`, `tokens` or `parallel`
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<EndpointLabels, Histogram>,
    pub gateway_overhead: Family<EndpointLabels, Histogram>,
    pub upstream_duration: Family<ProviderLabels, Histogram>,
    pub time_to_first_token: Family<ProviderLabels, Histogram>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub fallbacks: Family<RouteLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub in_flight: Gauge,
    pub stream_interruptions: Family<ProviderLabels, Counter>,
    pub gossip_messages: Family<DirectionLabels, Counter>,
    pub gossip_bytes: Family<DirectionLabels, Counter>,
    pub gossip_live_nodes: Gauge,
    /// Internal messages refused: another cluster, another node, a stale incarnation.
    pub cluster_refused: Family<ReasonLabels, Counter>,
    /// 1 while this node's Raft core runs, 0 once it stopped.
    pub raft_running: Gauge,
    /// How long the state machine took to apply a batch of committed entries.
    pub raft_apply: Family<ApplyLabels, Histogram, fn() -> Histogram>,
    /// Open client connections, by port (proxy, grpc).
    pub connections_open: Family<PortLabels, Gauge>,
    /// Connections and requests shed: over the connection cap, idle, slow headers or body.
    pub connections_shed: Family<ShedLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Stored Responses API answers on this node, and their bytes.
    pub responses_stored: Gauge,
    pub responses_stored_bytes: Gauge,
    /// Stored responses dropped to keep under the size bound (expiry is not counted).
    pub responses_evicted: Counter,
    /// Stored responses whose copy could not be written to any other node.
    pub responses_unreplicated: Counter,
    /// The handles a served request updates, looked up once per route and provider.
    served: HandleCache<ServedMetrics>,
    providers: HandleCache<ProviderMetrics>,
}

/// The metrics of the requests one endpoint serves from one route through one provider with
/// status 200: resolved from their families once, then shared (a family's lookup hashes
/// every label with SipHash under its lock, about 300 instructions, several times a request).
pub struct ServedMetrics {
    pub requests_ok: Counter,
    pub request_duration: Histogram,
    pub gateway_overhead: Histogram,
}

/// The metrics of one provider's successful attempts and tokens.
pub struct ProviderMetrics {
    pub attempts_success: Counter,
    pub upstream_duration: Histogram,
    pub time_to_first_token: Histogram,
    /// `input`, `output`, `cached_input`, `reasoning`, as [`TOKEN_KINDS`].
    tokens: [Counter; 4],
}

const TOKEN_KINDS: [&str; 4] = ["input", "output", "cached_input", "reasoning"];

/// Handles keyed by the addresses and lengths of the label strings they were made for. The
/// entry keeps those strings (`Arc`s) alive, so an address cannot be reused by another string
/// while its entry exists. Config reloads make new strings; past `CAPACITY` entries the cache
/// starts over (the handles stay in their families, so no count is lost).
struct HandleCache<V> {
    entries: RwLock<HashMap<[usize; 6], CacheEntry<V>, foldhash::fast::RandomState>>,
}

struct CacheEntry<V> {
    handles: Arc<V>,
    _pinned: [Option<Arc<str>>; 2],
}

impl<V> HandleCache<V> {
    const CAPACITY: usize = 4096;

    fn new() -> Self {
        HandleCache {
            entries: RwLock::new(HashMap::default()),
        }
    }

    fn get_or_make(
        &self,
        key: [usize; 6],
        pinned: [Option<&Arc<str>>; 2],
        make: impl FnOnce() -> V,
    ) -> Arc<V> {
        if let Some(entry) = self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return entry.handles.clone();
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= Self::CAPACITY {
            entries.clear();
        }
        entries
            .entry(key)
            .or_insert_with(|| CacheEntry {
                handles: Arc::new(make()),
                _pinned: pinned.map(|text| text.cloned()),
            })
            .handles
            .clone()
    }
}

fn address(text: &str) -> [usize; 2] {
    [text.as_ptr() as usize, text.len()]
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

fn overhead_histogram() -> Histogram {
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
        0.05, 0.1,
    ])
}

fn apply_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("skein");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxy requests by endpoint, route, provider and status",
            requests.clone(),
        );
        let request_duration = Family::<EndpointLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to full response (to the first byte for streams)",
            request_duration.clone(),
        );
        let gateway_overhead = Family::<EndpointLabels, Histogram>::new_with_constructor(
            overhead_histogram as fn() -> Histogram,
        );
        registry.register(
            "gateway_overhead_seconds",
            "Time spent in Skein itself, upstream time and backoff excluded",
            gateway_overhead.clone(),
        );
        let upstream_duration = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream time per successful attempt (to the first event for streams)",
            upstream_duration.clone(),
        );
        let time_to_first_token = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to the first streamed event sent to the client",
            time_to_first_token.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts by provider and outcome",
            attempts.clone(),
        );
        let fallbacks = Family::<RouteLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests served by a route other than the one asked for",
            fallbacks.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens by provider and kind", tokens.clone());
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Proxy requests being served",
            in_flight.clone(),
        );
        let stream_interruptions = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "stream_interruptions",
            "Streams that broke after their first byte reached the client",
            stream_interruptions.clone(),
        );
        let rate_limited = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a cluster-wide RPM, TPM or max-parallel limit",
            rate_limited.clone(),
        );
        let gossip_messages = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "gossip_messages",
            "Gossip messages sent and received",
            gossip_messages.clone(),
        );
        let gossip_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "gossip_bytes",
            "Gossip bytes sent and received",
            gossip_bytes.clone(),
        );
        let gossip_live_nodes = Gauge::default();
        registry.register(
            "gossip_live_nodes",
            "Nodes this node's gossip sees live, itself included",
            gossip_live_nodes.clone(),
        );
        let cluster_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cluster_messages_refused",
            "Raft and internal messages refused: from another cluster, for another node, or from or for a stale incarnation",
            cluster_refused.clone(),
        );
        let raft_running = Gauge::default();
        registry.register(
            "raft_running",
            "1 while this node's Raft core runs, 0 once it has stopped",
            raft_running.clone(),
        );
        let raft_apply: Family<ApplyLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(apply_histogram);
        registry.register(
            "raft_apply_seconds",
            "Time the state machine took to apply a batch of committed entries (spend: a batch with a spend record)",
            raft_apply.clone(),
        );
        let connections_open = Family::<PortLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Open client connections, by port",
            connections_open.clone(),
        );
        let connections_shed = Family::<ShedLabels, Counter>::default();
        registry.register(
            "connections_shed",
            "Client connections closed or refused, and requests cut, to shed hostile or idle clients: over the connection cap (per node or per client address), idle too long, headers or body too slow",
            connections_shed.clone(),
        );
        let responses_stored = Gauge::default();
        registry.register(
            "responses_stored",
            "Responses API answers stored on this node (its own and replicas)",
            responses_stored.clone(),
        );
        let responses_stored_bytes = Gauge::default();
        registry.register(
            "responses_stored_bytes",
            "Bytes of the Responses API answers stored on this node",
            responses_stored_bytes.clone(),
        );
        let responses_evicted = Counter::default();
        registry.register(
            "responses_evicted",
            "Stored responses dropped before their expiry to stay within the size bound",
            responses_evicted.clone(),
        );
        let responses_unreplicated = Counter::default();
        registry.register(
            "responses_unreplicated",
            "Stored responses that no other node took a copy of (they live on one node only)",
            responses_unreplicated.clone(),
        );
        Metrics {
            served: HandleCache::new(),
            providers: HandleCache::new(),
            responses_stored,
            responses_stored_bytes,
            responses_evicted,
            responses_unreplicated,
            connections_open,
            connections_shed,
            cluster_refused,
            raft_running,
            raft_apply,
            registry,
            requests,
            request_duration,
            gateway_overhead,
            upstream_duration,
            time_to_first_token,
            attempts,
            fallbacks,
            tokens,
            in_flight,
            stream_interruptions,
            gossip_messages,
            gossip_bytes,
            gossip_live_nodes,
            rate_limited,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut output = String::new();
        if prometheus_client::encoding::text::encode(&mut output, &self.registry).is_err() {
            output.clear();
        }
        output
    }

    /// Count tokens of a finished call.
    pub fn record_usage(&self, provider: &Arc<str>, usage: &skein_providers::Usage) {
        let handles = self.provider(provider);
        for (counter, count) in handles.tokens.iter().zip([
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.reasoning_tokens,
        ]) {
            if count > 0 {
                counter.inc_by(count);
            }
        }
    }

    /// The handles of requests served with status 200 by `route` through `provider`.
    pub fn served(
        &self,
        endpoint: &'static str,
        route: &Arc<str>,
        provider: &Arc<str>,
    ) -> Arc<ServedMetrics> {
        let [endpoint_at, endpoint_len] = address(endpoint);
        let [route_at, route_len] = address(route);
        let [provider_at, provider_len] = address(provider);
        self.served.get_or_make(
            [
                endpoint_at,
                endpoint_len,
                route_at,
                route_len,
                provider_at,
                provider_len,
            ],
            [Some(route), Some(provider)],
            || {
                let labels = EndpointLabels { endpoint };
                ServedMetrics {
                    requests_ok: self
                        .requests
                        .get_or_create(&RequestLabels {
                            endpoint,
                            route: route.clone(),
                            provider: provider.clone(),
                            status: 200,
                        })
                        .clone(),
                    request_duration: self.request_duration.get_or_create(&labels).clone(),
                    gateway_overhead: self.gateway_overhead.get_or_create(&labels).clone(),
                }
            },
        )
    }

    /// The handles of one provider's successful attempts and tokens.
    pub fn provider(&self, provider: &Arc<str>) -> Arc<ProviderMetrics> {
        let [at, len] = address(provider);
        self.providers
            .get_or_make([at, len, 0, 0, 0, 0], [Some(provider), None], || {
                let labels = ProviderLabels {
                    provider: provider.clone(),
                };
                ProviderMetrics {
                    attempts_success: self
                        .attempts
                        .get_or_create(&AttemptLabels {
                            provider: provider.clone(),
                            outcome: "success",
                        })
                        .clone(),
                    upstream_duration: self.upstream_duration.get_or_create(&labels).clone(),
                    time_to_first_token: self.time_to_first_token.get_or_create(&labels).clone(),
                    tokens: TOKEN_KINDS.map(|kind| {
                        self.tokens
                            .get_or_create(&TokenLabels {
                                provider: provider.clone(),
                                kind,
                            })
                            .clone()
                    }),
                }
            })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
