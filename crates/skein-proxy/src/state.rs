//! The proxy's shared state: what every request reads (config and control snapshots, the
//! upstream pool, metrics, the ledger and limiter). The router lives in [`crate::app`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::HttpConnector;
use skein_core::RuntimeConfig;
use skein_core::accounting::Ledger;
use skein_core::limits::Limiter;
use skein_types::control::ControlState;

use crate::health::NodeHealth;
use crate::metrics::Metrics;
use crate::pool::UpstreamPool;
use crate::responses::ResponseStore;

/// Settings of the proxy that are not part of the replicated config.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Pool idle timeout of upstream connections.
    pub upstream_idle_timeout: Duration,
    /// Connect timeout of upstream connections.
    pub upstream_connect_timeout: Duration,
    /// Serve `/metrics` on the proxy port too (it is always on the internal gRPC port).
    pub metrics_on_proxy_port: bool,
    /// A request body may pause at most this long between two chunks.
    pub body_idle_timeout: Duration,
    /// A request body must arrive whole within this.
    pub body_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            upstream_idle_timeout: Duration::from_secs(90),
            upstream_connect_timeout: Duration::from_secs(10),
            metrics_on_proxy_port: true,
            body_idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(300),
        }
    }
}

/// Grants budget leases to this node through the replicated state (the node's control plane
/// implements it; see `skein_core::accounting`).
#[async_trait::async_trait]
pub trait LeaseBroker: Send + Sync {
    /// Ask for `asks` in one command. `Ok` once the proxy's control state shows the grant
    /// (or something else changed since `seen_version`: the caller tries again first).
    async fn grant(
        &self,
        asks: Vec<skein_types::control::LeaseAsk>,
        seen_version: u64,
    ) -> Result<(), GrantError>;
}

/// Why a lease was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// The budget is spent.
    Exhausted(String),
    /// What is left is held in other nodes' leases for now.
    LeasedElsewhere(String),
    /// No leader could be reached in time (this node may be cut off from the majority).
    Unavailable(String),
}

/// What every handler shares. The config is an immutable snapshot swapped whole.
pub struct AppState {
    pub config: ArcSwap<RuntimeConfig>,
    /// The replicated control state (virtual keys, teams, budgets), swapped after each apply.
    control: ArcSwap<ControlState>,
    /// The version of `control`, for those waiting for a change to show.
    control_version: tokio::sync::watch::Sender<u64>,
    /// Grants budget leases (set by the node).
    leases: std::sync::OnceLock<Arc<dyn LeaseBroker>>,
    /// Whether proxy calls need a virtual key: some key exists, or an admin token is set.
    auth_required: AtomicBool,
    /// Nodes in the cluster (each may hold a share of a budget's remainder).
    cluster_size: AtomicU64,
    pub client: Arc<UpstreamPool>,
    pub metrics: Metrics,
    /// This node's spend not yet recorded in the replicated state, and open reservations.
    pub ledger: Arc<Ledger>,
    /// This node's side of the cluster-wide RPM/TPM/max-parallel limits.
    pub limiter: Arc<Limiter>,
    /// Woken when a provider key starts cooling down here, so the cluster hears of it at
    /// once rather than at the next periodic report.
    pub health_changed: tokio::sync::Notify,
    started: Instant,
    /// What the probes report.
    pub health: NodeHealth,
    pub(crate) metrics_on_proxy_port: bool,
    /// Where Responses API answers are kept (in memory until the node sets its store).
    responses: std::sync::RwLock<Arc<dyn ResponseStore>>,
    /// Where `Idempotency-Key`s are kept (in memory until the node sets the cluster's).
    idempotency: std::sync::RwLock<Arc<dyn crate::idempotency::IdempotencyStore>>,
    body_timeouts: (Duration, Duration),
}

impl AppState {
    pub fn new(config: RuntimeConfig, options: &ProxyOptions) -> Result<AppState, String> {
        Ok(AppState {
            config: ArcSwap::from_pointee(config),
            control: ArcSwap::from_pointee(ControlState::default()),
            control_version: tokio::sync::watch::Sender::new(0),
            leases: std::sync::OnceLock::new(),
            auth_required: AtomicBool::new(false),
            cluster_size: AtomicU64::new(1),
            client: upstream_client(options)?,
            metrics: Metrics::new(),
            ledger: Ledger::new(),
            limiter: Arc::new(Limiter::new()),
            health_changed: tokio::sync::Notify::new(),
            started: Instant::now(),
            health: NodeHealth::default(),
            metrics_on_proxy_port: options.metrics_on_proxy_port,
            responses: std::sync::RwLock::new(Arc::new(crate::responses::MemoryStore::default())),
            idempotency: std::sync::RwLock::new(Arc::new(
                crate::idempotency::MemoryStore::default(),
            )),
            body_timeouts: (options.body_idle_timeout, options.body_timeout),
        })
    }

    /// The control state the proxy enforces.
    pub fn control(&self) -> Arc<ControlState> {
        self.control.load_full()
    }

    /// Whether proxy calls need a virtual key.
    pub fn auth_required(&self) -> bool {
        self.auth_required.load(Ordering::Relaxed)
    }

    /// Swap in a newly applied control state. `admin_token` says whether the node has one
    /// (which closes the proxy even before the first virtual key exists).
    pub fn set_control(&self, state: Arc<ControlState>, admin_token: bool) {
        self.auth_required
            .store(admin_token || !state.keys.is_empty(), Ordering::Relaxed);
        let version = state.version;
        self.control.store(state);
        self.control_version.send_replace(version);
    }

    /// Wait (up to `timeout`) until the control state the proxy enforces is at `version` or
    /// later; whether it is.
    pub async fn wait_for_control(&self, version: u64, timeout: Duration) -> bool {
        let mut versions = self.control_version.subscribe();
        tokio::time::timeout(timeout, versions.wait_for(|seen| *seen >= version))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Set what grants budget leases (once; later calls are ignored).
    pub fn set_lease_broker(&self, broker: Arc<dyn LeaseBroker>) {
        let _ = self.leases.set(broker);
    }

    /// What grants budget leases, if the node set one.
    pub fn lease_broker(&self) -> Option<&Arc<dyn LeaseBroker>> {
        self.leases.get()
    }

    /// Nodes in the cluster.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size.load(Ordering::Relaxed).max(1)
    }

    /// Record the number of nodes in the cluster.
    pub fn set_cluster_size(&self, nodes: u64) {
        self.cluster_size.store(nodes.max(1), Ordering::Relaxed);
    }

    /// Milliseconds since this node started: the clock of circuit breakers.
    pub fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a request body may pause between chunks, and take in all.
    pub fn body_timeouts(&self) -> (Duration, Duration) {
        self.body_timeouts
    }

    /// Where Responses API answers are kept.
    pub fn responses(&self) -> Arc<dyn ResponseStore> {
        self.responses
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keep Responses API answers in `store` from now on.
    pub fn set_response_store(&self, store: Arc<dyn ResponseStore>) {
        *self
            .responses
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = store;
    }

    /// Where `Idempotency-Key`s are kept.
    pub fn idempotency(&self) -> Arc<dyn crate::idempotency::IdempotencyStore> {
        self.idempotency
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keep `Idempotency-Key`s in `store` from now on.
    pub fn set_idempotency_store(&self, store: Arc<dyn crate::idempotency::IdempotencyStore>) {
        *self
            .idempotency
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = store;
    }

    /// Whether `/health/ready` says ready.
    pub fn is_ready(&self) -> bool {
        self.health.ready(skein_types::now_ms()).is_ok()
    }

    /// Mark the node not ready (before shutdown) or ready again.
    pub fn set_ready(&self, ready: bool) {
        self.health.set_draining(!ready);
    }
}

/// Upstream connections: kept alive and pooled per host, TLS through rustls with the
/// platform's certificate verifier, plain HTTP for local servers.
fn upstream_client(options: &ProxyOptions) -> Result<Arc<UpstreamPool>, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.upstream_connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .try_with_platform_verifier()
        .map_err(|error| format!("cannot set up TLS certificate verification: {error}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // Idle connections kept per upstream host: enough for steady high concurrency, few enough
    // that a burst's connections (and their buffers) are not all kept for good.
    Ok(Arc::new(UpstreamPool::new(
        https,
        256,
        options.upstream_idle_timeout,
    )))
}
