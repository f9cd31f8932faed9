//! Starting and stopping a node: its control plane (Raft over sled), its listeners, and the
//! tasks that keep the proxy's config snapshot in step with the replicated state.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skein_cluster::{CountingTransport, Gossip, GossipOptions, GossipStats, NodeInfo};
use skein_control::{ControlOptions, ControlPlane, NodeId};
use skein_proxy::{AppState, ProxyOptions};
use skein_types::control::{Command, Outcome};
use skein_types::{SkeinConfig, ValidatedConfig};

use crate::admin::AdminService;
use crate::env::Environment;
use crate::load::build_runtime;
use crate::tls::GrpcTls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Node settings that are not part of the config file.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub proxy: ProxyOptions,
    /// How long shutdown waits for requests in flight (streams included).
    pub drain_timeout: Duration,
    pub cluster: ClusterOptions,
    /// The admin API token. With one set, the proxy also requires a virtual key.
    pub admin_token: Option<String>,
    /// The bootstrap config's providers come from environment variables (no config file):
    /// on every start, providers whose variables changed are updated in the replicated config,
    /// so a changed `OPENAI_BASE_URL` takes effect as it would without a control plane.
    pub sync_env_providers: bool,
    /// TLS (or mutual TLS) on the gRPC port.
    pub grpc_tls: Option<GrpcTls>,
    /// Gossip membership (UDP); `None` for a node that does not gossip.
    pub gossip: Option<GossipSettings>,
    /// Connection limits and timeouts of the proxy port and of the gRPC port.
    pub proxy_listener: skein_proxy::listener::ListenerOptions,
    pub grpc_listener: skein_proxy::listener::ListenerOptions,
    /// How long a stored Responses API answer is kept.
    pub responses_ttl: Duration,
    /// The most bytes of stored responses this node keeps (the oldest go first).
    pub responses_max_bytes: u64,
}

/// Where this node gossips, and with whom.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    pub listen_addr: SocketAddr,
    /// The address peers reach this node at; the listen address by default.
    pub advertise_addr: Option<SocketAddr>,
    /// `host:port` of other nodes (names are re-resolved).
    pub seeds: Vec<String>,
}

/// Where this node's Raft state lives and which group it belongs to.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub node_id: NodeId,
    /// sled lives under `<data_dir>/raft`.
    pub data_dir: PathBuf,
    /// The voters (id → gRPC address). Empty: this node alone.
    pub voters: BTreeMap<NodeId, String>,
    /// gRPC addresses of members to join through, for a node outside the voter set. A name
    /// may resolve to several addresses (a headless Service): each is asked.
    pub peers: Vec<String>,
    /// Join-or-form mode (instead of a static voter list): the node with this id forms a new
    /// cluster of one voter when every address `peers` resolves to has answered and none is
    /// in a cluster; every other node, and that one when it finds a cluster, joins as a
    /// learner.
    pub bootstrap_node: Option<NodeId>,
    /// How many voters the cluster keeps, recorded when it is formed: the leader promotes
    /// caught-up learners up to it. `None`: the number of static voters (1 alone).
    pub target_voters: Option<u64>,
    /// How long a node that sees no leader stays ready.
    pub ready_lease: Duration,
    /// The gRPC address other nodes reach this one at; defaults to the gRPC listener's.
    pub advertise_addr: Option<String>,
    /// Raft timing and log compaction.
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_after_logs: u64,
    pub keep_logs: u64,
    /// UTC days of daily usage history the node keeps.
    pub usage_retention_days: u64,
}

impl ClusterOptions {
    /// A single node with its data in `data_dir`.
    pub fn single(data_dir: PathBuf) -> ClusterOptions {
        let defaults = ControlOptions::new(1, String::new(), data_dir.clone());
        ClusterOptions {
            node_id: 1,
            data_dir,
            voters: BTreeMap::new(),
            peers: Vec::new(),
            bootstrap_node: None,
            target_voters: None,
            ready_lease: Duration::from_secs(30),
            advertise_addr: None,
            heartbeat_ms: defaults.heartbeat_ms,
            election_timeout_min_ms: defaults.election_timeout_min_ms,
            election_timeout_max_ms: defaults.election_timeout_max_ms,
            snapshot_after_logs: defaults.snapshot_after_logs,
            keep_logs: defaults.keep_logs,
            usage_retention_days: defaults.usage_retention_days,
        }
    }
}

impl NodeOptions {
    /// Defaults, with the node's data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> NodeOptions {
        NodeOptions {
            proxy: ProxyOptions::default(),
            drain_timeout: Duration::from_secs(30),
            cluster: ClusterOptions::single(data_dir),
            admin_token: None,
            sync_env_providers: false,
            grpc_tls: None,
            gossip: None,
            proxy_listener: skein_proxy::listener::ListenerOptions::new("proxy"),
            grpc_listener: grpc_listener_defaults(),
            responses_ttl: Duration::from_secs(30 * 24 * 3_600),
            responses_max_bytes: 1 << 30,
        }
    }
}

/// A node serving on its listeners.
pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub state: Arc<AppState>,
    pub control: ControlPlane,
    pub gossip: Option<Arc<Gossip>>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
    spend: Arc<crate::spend::Spend>,
    leases: Arc<crate::leases::Leases>,
}

/// Start a node: open its control plane, serve the proxy on `http_listener` and the admin API
/// and Raft on `grpc_listener` (both bound by the caller, port 0 in tests), join or form the
/// Raft group, and propose `bootstrap` (the config file, or the providers found in the
/// environment) once; the first bootstrap the group applies wins, later ones are no-ops.
pub async fn start_node(
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    bootstrap: ValidatedConfig,
    env: Arc<dyn Environment>,
    options: NodeOptions,
) -> anyhow::Result<RunningNode> {
    let http_addr = http_listener
        .local_addr()
        .context("reading the HTTP listener address")?;
    let grpc_addr = grpc_listener
        .local_addr()
        .context("reading the gRPC listener address")?;
    let cluster = &options.cluster;
    let advertise = cluster
        .advertise_addr
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    std::fs::create_dir_all(&cluster.data_dir)
        .with_context(|| format!("creating the data directory {}", cluster.data_dir.display()))?;
    let control = ControlPlane::open(ControlOptions {
        node_id: cluster.node_id,
        advertise_addr: advertise.clone(),
        data_dir: cluster.data_dir.clone(),
        heartbeat_ms: cluster.heartbeat_ms,
        election_timeout_min_ms: cluster.election_timeout_min_ms,
        election_timeout_max_ms: cluster.election_timeout_max_ms,
        snapshot_after_logs: cluster.snapshot_after_logs,
        keep_logs: cluster.keep_logs,
        peer_tls: match &options.grpc_tls {
            Some(tls) => Some(tls.peer_client()?),
            None => None,
        },
        token: options.admin_token.clone(),
        usage_retention_days: cluster.usage_retention_days,
    })
    .await
    .map_err(|error| anyhow::anyhow!("opening the control plane: {error}"))?;

    // Serve what the group has applied if it has any config, else the bootstrap config until
    // the group applies one.
    let replicated = control.state();
    let initial = if replicated.bootstrapped {
        ValidatedConfig::validate(replicated.routing_config())
            .map_err(|errors| anyhow::anyhow!("the replicated config is not valid: {errors:?}"))?
    } else {
        bootstrap.clone()
    };
    let runtime = build_runtime(&initial, env.as_ref())?;
    let state = Arc::new(
        AppState::new(runtime, &options.proxy)
            .map_err(|error| anyhow::anyhow!("building the upstream HTTP client: {error}"))?,
    );
    state.set_control(replicated, options.admin_token.is_some());
    let apply_times = state.metrics.raft_apply.clone();
    control
        .published()
        .observe_apply(Box::new(move |kind, took| {
            let kind = match kind {
                skein_control::machine::BatchKind::Spend => "spend",
                skein_control::machine::BatchKind::Config => "config",
            };
            apply_times
                .get_or_create(&skein_proxy::metrics::ApplyLabels { kind })
                .observe(took.as_secs_f64());
        }));
    state
        .health
        .joining(u64::try_from(cluster.ready_lease.as_millis()).unwrap_or(u64::MAX));
    state.ledger.set_node(cluster.node_id);
    let spend = Arc::new(crate::spend::Spend::open(
        control.clone(),
        state.ledger.clone(),
        &cluster.data_dir,
    ));
    let leases = crate::leases::Leases::new(control.clone(), state.clone());
    state.set_lease_broker(leases.clone());
    state.limiter.set_node_id(cluster.node_id);
    // Until it has seen the others, a node of an N-voter cluster takes at most 1/N of a limit.
    state
        .limiter
        .set_expected_nodes(cluster.voters.len().max(1) as u64);

    let app = skein_proxy::listener::Routes {
        router: skein_proxy::router(state.clone()),
        direct: Some(skein_proxy::direct(state.clone())),
    };
    let (shutdown, shutdown_signal) = watch::channel(false);
    let server = spawn_listener(
        http_listener,
        app,
        skein_proxy::listener::Plain,
        options.proxy_listener.clone(),
        state.clone(),
        shutdown_signal.clone(),
    );
    let mut gossip_stats = None;
    let gossip = match &options.gossip {
        Some(settings) => {
            let mut gossip_options =
                GossipOptions::new(settings.listen_addr, settings.seeds.clone());
            if let Some(advertise) = settings.advertise_addr {
                gossip_options.advertise_addr = advertise;
            }
            let info = node_info(&control, &state, http_addr, &advertise);
            let transport = CountingTransport::new(chitchat::transport::UdpTransport);
            gossip_stats = Some(transport.stats());
            Some(Arc::new(
                Gossip::start(gossip_options, &info, &transport).await?,
            ))
        }
        None => None,
    };
    // Responses API answers: kept here and on one other member (see `responses.rs`).
    let responses = Arc::new(
        crate::responses::LocalStore::open(
            &cluster.data_dir.join("responses"),
            options.responses_max_bytes,
        )
        .context("opening the response store")?
        .with_metrics(&state.metrics),
    );
    state.set_response_store(Arc::new(crate::responses::ClusterStore::new(
        responses.clone(),
        control.clone(),
        options.responses_ttl,
        &state.metrics,
    )));
    // Idempotency keys: each owned by one member (see `idempotency.rs`).
    let idempotency = Arc::new(skein_proxy::idempotency::MemoryStore::default());
    state.set_idempotency_store(Arc::new(crate::idempotency::ClusterIdempotency::new(
        idempotency.clone(),
        control.clone(),
    )));
    let router = AdminService::new(
        state.clone(),
        control.clone(),
        http_addr,
        options.admin_token.clone(),
        gossip.clone(),
    )
    .into_router_with(
        Some(crate::responses::PeerService::new(
            responses.clone(),
            control.clone(),
        )),
        Some(crate::idempotency::PeerService::new(
            idempotency.clone(),
            control.clone(),
        )),
    )
    .merge(skein_proxy::ops_router(state.clone()));
    let grpc_options = options.grpc_listener.clone();
    let admin = match &options.grpc_tls {
        Some(tls) => spawn_listener(
            grpc_listener,
            router,
            crate::tls::TlsHandshake(tls.acceptor()?),
            grpc_options,
            state.clone(),
            shutdown_signal,
        ),
        None => spawn_listener(
            grpc_listener,
            router,
            skein_proxy::listener::Plain,
            grpc_options,
            state.clone(),
            shutdown_signal,
        ),
    };

    let mut tasks = vec![tokio::spawn(follow_config(
        control.clone(),
        state.clone(),
        env,
        options.admin_token.is_some(),
        normalized(initial.into_inner()),
    ))];
    let has_state = control
        .raft()
        .is_initialized()
        .await
        .map_err(|error| anyhow::anyhow!("reading the Raft state: {error}"))?;
    let initial_target = match cluster.bootstrap_node {
        Some(bootstrap) => {
            // A node with state joins again only if it was removed (scaled down, then up
            // with its old volume); only a node without state may form a cluster.
            tasks.push(tokio::spawn(crate::membership::rejoin_if_outside(
                control.clone(),
                advertise.clone(),
                cluster.peers.clone(),
                has_state,
                bootstrap == cluster.node_id && !has_state,
            )));
            cluster.target_voters.unwrap_or(3)
        }
        None => {
            let voters = if cluster.voters.is_empty() {
                BTreeMap::from([(cluster.node_id, advertise.clone())])
            } else {
                cluster.voters.clone()
            };
            let target = cluster.target_voters.unwrap_or(voters.len() as u64);
            if voters.contains_key(&cluster.node_id) {
                control
                    .initialize(voters)
                    .await
                    .map_err(|error| anyhow::anyhow!("initializing the Raft group: {error}"))?;
            } else {
                tasks.push(tokio::spawn(join_as_learner(
                    control.clone(),
                    advertise.clone(),
                    cluster.peers.clone(),
                )));
            }
            target
        }
    };
    tasks.push(tokio::spawn(crate::membership::tend_cluster(
        control.clone(),
        initial_target,
    )));
    tasks.push(tokio::spawn(crate::membership::watch_health(
        control.clone(),
        state.clone(),
    )));
    // A node alone (the single-node default) leads at once: say it serves only once its
    // probes say ready, so that nothing sees a fresh node refuse readiness.
    if cluster.bootstrap_node.is_none()
        && (cluster.voters.is_empty()
            || (cluster.voters.len() == 1 && cluster.voters.contains_key(&cluster.node_id)))
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !state.is_ready() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if let Some(gossip) = &gossip {
        tasks.push(tokio::spawn(share_key_health(
            gossip.clone(),
            state.clone(),
        )));
        tasks.push(tokio::spawn(share_limits(gossip.clone(), state.clone())));
    } else {
        tasks.push(tokio::spawn(prune_limits(state.clone())));
    }
    if let (Some(gossip), Some(stats)) = (&gossip, gossip_stats) {
        tasks.push(tokio::spawn(publish_node_info(
            gossip.clone(),
            control.clone(),
            state.clone(),
            http_addr,
            advertise.clone(),
            stats,
        )));
    }
    tasks.push(tokio::spawn(crate::responses::sweep_continuously(
        responses,
    )));
    tasks.push(tokio::spawn(spend.clone().journal_continuously()));
    tasks.push(tokio::spawn(
        spend
            .clone()
            .flush_every(crate::spend::SPEND_FLUSH_INTERVAL),
    ));
    tasks.push(tokio::spawn(leases.clone().tend()));
    tasks.push(tokio::spawn(propose_bootstrap(
        control.clone(),
        bootstrap.into_inner(),
        options.sync_env_providers,
    )));

    Ok(RunningNode {
        http_addr,
        grpc_addr,
        state,
        control,
        gossip,
        shutdown,
        server,
        admin,
        tasks,
        drain_timeout: options.drain_timeout,
        spend,
        leases,
    })
}

/// Serve `routes` on `listener` (see [`skein_proxy::listener`]) until `signal`.
fn spawn_listener<H: skein_proxy::listener::Handshake>(
    listener: TcpListener,
    routes: impl Into<skein_proxy::listener::Routes>,
    handshake: H,
    options: skein_proxy::listener::ListenerOptions,
    state: Arc<AppState>,
    signal: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let routes = routes.into();
    tokio::spawn(async move {
        skein_proxy::listener::serve(listener, routes, handshake, options, &state.metrics, signal)
            .await
    })
}

/// Keep the proxy's snapshots in step with the applied state: the control state on every
/// change, the routing config (with credentials resolved on this node) when it changed.
async fn follow_config(
    control: ControlPlane,
    app: Arc<AppState>,
    env: Arc<dyn Environment>,
    admin_token: bool,
    serving: SkeinConfig,
) {
    let mut versions = control.versions();
    let mut routing = serving;
    let mut routing_version = None;
    loop {
        let state = control.state();
        if state.bootstrapped && routing_version != Some(state.routing_version) {
            routing_version = Some(state.routing_version);
            let current = normalized(state.routing_config());
            if routing != current {
                let built = ValidatedConfig::validate(current.clone())
                    .map_err(|errors| anyhow::anyhow!("{errors:?}"))
                    .and_then(|validated| build_runtime(&validated, env.as_ref()));
                match built {
                    Ok(runtime) => {
                        runtime.inherit_from(&app.config.load());
                        app.config.store(Arc::new(runtime));
                        tracing::info!(version = state.version, "serving the replicated config");
                    }
                    Err(error) => tracing::error!(
                        version = state.version,
                        %error,
                        "cannot serve the replicated config on this node; keeping the previous one"
                    ),
                }
                routing = current;
            }
        }
        app.set_control(state, admin_token);
        let members = control
            .metrics()
            .membership_config
            .membership()
            .nodes()
            .count();
        app.set_cluster_size(members as u64);
        if versions.changed().await.is_err() {
            return;
        }
    }
}

/// What this node publishes about itself over gossip.
fn node_info(
    control: &ControlPlane,
    app: &AppState,
    http_addr: SocketAddr,
    grpc_addr: &str,
) -> NodeInfo {
    let role = control.role();
    NodeInfo {
        node_id: control.id(),
        http_addr: http_addr.to_string(),
        grpc_addr: grpc_addr.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ready: app.is_ready(),
        raft_role: role.to_owned(),
        applied_index: control.state().version,
    }
}

/// Keep this node's gossiped info current (chitchat only sends what changed), and the
/// gossip metrics.
async fn publish_node_info(
    gossip: Arc<Gossip>,
    control: ControlPlane,
    app: Arc<AppState>,
    http_addr: SocketAddr,
    grpc_addr: String,
    stats: Arc<GossipStats>,
) {
    use skein_proxy::metrics::DirectionLabels;
    use std::sync::atomic::Ordering;
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counted = [0u64; 4];
    loop {
        ticks.tick().await;
        gossip
            .publish(&node_info(&control, &app, http_addr, &grpc_addr))
            .await;
        let metrics = &app.metrics;
        let now = [
            stats.messages_sent.load(Ordering::Relaxed),
            stats.messages_received.load(Ordering::Relaxed),
            stats.bytes_sent.load(Ordering::Relaxed),
            stats.bytes_received.load(Ordering::Relaxed),
        ];
        for (index, (family, direction)) in [
            (&metrics.gossip_messages, "sent"),
            (&metrics.gossip_messages, "received"),
            (&metrics.gossip_bytes, "sent"),
            (&metrics.gossip_bytes, "received"),
        ]
        .into_iter()
        .enumerate()
        {
            family
                .get_or_create(&DirectionLabels { direction })
                .inc_by(now[index].saturating_sub(counted[index]));
        }
        counted = now;
        let live = gossip.members().await.iter().filter(|m| m.live).count();
        metrics.gossip_live_nodes.set(live as i64);
    }
}

/// Share provider-key cooldowns with the other nodes and take theirs, ten times a second: one
/// 429 on one node cools the key down everywhere within about a gossip interval.
async fn share_key_health(gossip: Arc<Gossip>, app: Arc<AppState>) {
    use skein_cluster::keys::{DEPLOYMENT_PREFIX, HEALTH_PREFIX};
    use skein_core::shared::{DeploymentReport, KeyReport};
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A cooldown, here or on another node, is shared at once; the rest every 100 ms.
    let remote_cooldown = Arc::new(tokio::sync::Notify::new());
    let _subscription = {
        let remote_cooldown = remote_cooldown.clone();
        gossip
            .subscribe(HEALTH_PREFIX, move |_, value| {
                let cooling = KeyReport::decode(value)
                    .is_some_and(|report| report.cooldown_until_ms > skein_types::now_ms());
                if cooling {
                    remote_cooldown.notify_one();
                }
            })
            .await
    };
    loop {
        let local_news = tokio::select! {
            _ = ticks.tick() => false,
            () = app.health_changed.notified() => true,
            () = remote_cooldown.notified() => false,
        };
        let config = app.config.load();
        let (local_now, wall_now) = (app.clock_ms(), skein_types::now_ms());
        let window = wall_now / 60_000;
        let mut mine = Vec::new();
        for provider in config.providers() {
            for key in &provider.keys {
                let until = key.health.cooldown_until_ms();
                let until_wall = if until > local_now {
                    wall_now + (until - local_now)
                } else {
                    0
                };
                let report = key.quota.report(until_wall, wall_now);
                if until_wall > 0
                    || report.requests > 0
                    || report.observed.is_some_and(|seen| {
                        wall_now.saturating_sub(seen.at_ms) < skein_core::shared::QUOTA_FRESH_MS
                    })
                {
                    mine.push((
                        format!("{HEALTH_PREFIX}{}/{}", provider.name, key.name),
                        report.encode(),
                    ));
                }
            }
        }
        let mut seen_deployments = std::collections::HashSet::new();
        for route in config.routes() {
            for deployment in &route.deployments {
                let name = format!("{}/{}", deployment.provider.name, deployment.model);
                if deployment.errors.active_within(60_000) && seen_deployments.insert(name.clone())
                {
                    let report = DeploymentReport {
                        error_ppm: (deployment.errors.value() * 1e6) as u32,
                        latency_us: deployment.latency_ewma_us(),
                    };
                    mine.push((
                        format!("{DEPLOYMENT_PREFIX}{name}"),
                        format!("{} {}", report.encode(), wall_now / 10_000),
                    ));
                }
            }
        }
        gossip.publish_entries(&mine).await;
        if local_news {
            gossip.gossip_now().await;
        }

        // Keys: the longest cooldown any node imposes, the cluster's use this minute, the
        // freshest upstream figures.
        let mut use_by_key: HashMap<String, (u64, u64)> = HashMap::new();
        for (name, value) in gossip.remote_entries(HEALTH_PREFIX).await {
            let Some(report) = KeyReport::decode(&value) else {
                continue;
            };
            let Some((provider_name, key_name)) = name.split_once('/') else {
                continue;
            };
            let Some(key) = config
                .provider(provider_name)
                .and_then(|provider| provider.keys.iter().find(|key| key.name == key_name))
            else {
                continue;
            };
            if report.cooldown_until_ms > wall_now {
                let until = local_now + (report.cooldown_until_ms - wall_now);
                // Tolerate clock jitter: only a cooldown that ends noticeably later is news.
                if until > key.health.cooldown_until_ms() + 1_000 {
                    tracing::info!(
                        provider = provider_name,
                        key = key_name,
                        cooling_down_ms = report.cooldown_until_ms - wall_now,
                        "cooling a provider key down: another node saw it fail"
                    );
                }
                key.health.impose_cooldown(until);
            }
            if let Some(seen) = report.observed {
                key.quota.observe(seen);
            }
            if report.window == window {
                let entry = use_by_key.entry(name).or_default();
                entry.0 = entry.0.saturating_add(report.requests);
                entry.1 = entry.1.saturating_add(report.tokens);
            }
        }
        for provider in config.providers() {
            for key in &provider.keys {
                let (requests, tokens) = use_by_key
                    .get(&format!("{}/{}", provider.name, key.name))
                    .copied()
                    .unwrap_or_default();
                key.quota.set_remote(window, requests, tokens, wall_now);
            }
        }

        // Deployments: the other nodes' error rates and latencies.
        let mut by_deployment: HashMap<String, Vec<DeploymentReport>> = HashMap::new();
        for (name, value) in gossip.remote_entries(DEPLOYMENT_PREFIX).await {
            if let Some(report) = DeploymentReport::decode(&value) {
                by_deployment.entry(name).or_default().push(report);
            }
        }
        for route in config.routes() {
            for deployment in &route.deployments {
                let name = format!("{}/{}", deployment.provider.name, deployment.model);
                deployment
                    .remote
                    .set(by_deployment.get(&name).map_or(&[][..], Vec::as_slice));
            }
        }
    }
}

/// Exchange rate-limit reports with the cluster every 100 ms: read the live members and
/// their reports, let the limiter hand spare allowance to the nodes that want it, publish.
async fn share_limits(gossip: Arc<Gossip>, app: Arc<AppState>) {
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live = std::collections::BTreeSet::new();
    loop {
        ticks.tick().await;
        let (members, reports) = gossip.limit_view().await;
        // Say when a node comes or goes (what `skein cluster status` shows).
        let now_live: std::collections::BTreeSet<u64> =
            members.iter().map(|(node_id, _)| *node_id).collect();
        for gone in live.difference(&now_live) {
            tracing::warn!(
                node_id = gone,
                "gossip: node is no longer live (down or cut off)"
            );
        }
        for joined in now_live.difference(&live) {
            tracing::info!(node_id = joined, "gossip: node is live");
        }
        live = now_live;
        let members = members
            .into_iter()
            .map(|(node_id, started_ms)| skein_core::limits::Member {
                node_id,
                started_ms,
            })
            .collect();
        let now = app.limiter.now_ms();
        let mine = app.limiter.exchange(members, reports, now);
        if !mine.is_empty() {
            gossip.publish_limits(&mine).await;
        }
    }
}

/// Without gossip the node is alone: forget idle rate-limit pools now and then.
async fn prune_limits(app: Arc<AppState>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticks.tick().await;
        let now = app.limiter.now_ms();
        app.limiter.exchange(Vec::new(), Vec::new(), now);
    }
}

/// A config with providers and routes in name order, for comparing configs.
fn normalized(mut config: SkeinConfig) -> SkeinConfig {
    config.providers.sort_by(|a, b| a.name.cmp(&b.name));
    config.routes.sort_by(|a, b| a.name.cmp(&b.name));
    config
}

/// Propose the bootstrap config until the group answers (the first leader may take a moment).
/// With `sync_providers`, also bring the replicated providers in line with the bootstrap's.
async fn propose_bootstrap(control: ControlPlane, config: SkeinConfig, sync_providers: bool) {
    let mut commands = Vec::new();
    if !control.state().bootstrapped {
        commands.push(Command::Bootstrap {
            config: config.clone(),
        });
    }
    if sync_providers {
        commands.extend(
            config
                .providers
                .iter()
                .map(|provider| Command::PutProvider {
                    provider: provider.clone(),
                }),
        );
    }
    for command in commands {
        if let Command::PutProvider { provider } = &command
            && control.state().providers.get(&provider.name) == Some(provider)
        {
            continue;
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match control.propose("bootstrap", command.clone()).await {
                Ok(response) => {
                    match response.outcome {
                        Outcome::Applied => tracing::info!(
                            version = response.version,
                            change = %command.target(),
                            "bootstrap config applied"
                        ),
                        Outcome::AlreadyBootstrapped => tracing::info!(
                            "the cluster already has a config; this node's bootstrap config is not applied"
                        ),
                        other => {
                            tracing::error!(?other, change = %command.target(), "the bootstrap config was refused")
                        }
                    }
                    break;
                }
                Err(error) if attempts < 300 => {
                    tracing::debug!(%error, "bootstrap not proposed yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    tracing::error!(%error, "gave up proposing the bootstrap config");
                    return;
                }
            }
        }
    }
}

/// Ask the members in `peers` to add this node as a learner, until one of them does.
async fn join_as_learner(control: ControlPlane, advertise: String, peers: Vec<String>) {
    let request = skein_control::LeaderRequest::AddLearner {
        id: control.id(),
        addr: advertise,
        incarnation: Some(control.identity().incarnation()),
    };
    loop {
        if control
            .metrics()
            .membership_config
            .membership()
            .get_node(&control.id())
            .is_some()
        {
            return;
        }
        for peer in &peers {
            match control.forward_to(peer, &request, true).await {
                Ok(_) => {
                    tracing::info!(%peer, "joined the cluster as a learner");
                    return;
                }
                Err(error) => tracing::debug!(%peer, %error, "join attempt failed"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl RunningNode {
    /// Say not ready, stop accepting, wait for requests in flight up to the drain timeout, and
    /// stop the Raft node.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state.set_ready(false);
        if let Some(gossip) = &self.gossip {
            // Tell the others first, so they stop counting on this node.
            let mut info = node_info(
                &self.control,
                &self.state,
                self.http_addr,
                &self.grpc_addr.to_string(),
            );
            info.ready = false;
            gossip.publish(&info).await;
        }
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(self.drain_timeout, self.server).await {
            Ok(joined) => joined.context("server task")?.context("HTTP server")?,
            Err(_) => tracing::warn!(
                timeout_s = self.drain_timeout.as_secs(),
                "requests still in flight after the drain timeout; stopping anyway"
            ),
        }
        // Admin calls are short; a second is plenty.
        if let Ok(joined) = tokio::time::timeout(Duration::from_secs(1), self.admin).await {
            joined.context("admin task")?.context("admin gRPC server")?;
        }
        for task in self.tasks {
            task.abort();
        }
        // Record what the drained requests spent (bounded: the group may be gone).
        let _ = tokio::time::timeout(Duration::from_secs(3), self.spend.flush()).await;
        // Then what this node will not spend of its budget leases goes back to the others.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.leases.give_back_all()).await;
        self.control.shutdown().await;
        if let Some(gossip) = self.gossip
            && let Ok(gossip) = Arc::try_unwrap(gossip)
            && let Err(error) = gossip.shutdown().await
        {
            tracing::debug!(%error, "gossip did not stop cleanly");
        }
        Ok(())
    }
}

/// The gRPC port's defaults: a smaller cap than the proxy's (operators and peers only).
pub fn grpc_listener_defaults() -> skein_proxy::listener::ListenerOptions {
    let mut options = skein_proxy::listener::ListenerOptions::new("grpc");
    options.max_connections = skein_proxy::listener::default_connection_cap(0.125, 1_000);
    options
}

/// Bind a TCP listener with a deep accept queue: bursts of new connections (thousands of
/// clients reconnecting, or an open-loop load) must not overflow the kernel's default and
/// turn into one-second SYN retransmissions.
pub async fn bind_listener(address: &str) -> anyhow::Result<TcpListener> {
    let mut last_error = None;
    for resolved in tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
    {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved) {
            Ok(()) => return Ok(socket.listen(LISTEN_BACKLOG)?),
            Err(error) => last_error = Some(error),
        }
    }
    match last_error {
        Some(error) => Err(error).with_context(|| format!("binding {address}")),
        None => anyhow::bail!("{address} resolved to no address"),
    }
}

/// The accept queue length asked for (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;
