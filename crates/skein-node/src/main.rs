//! `skein`: the gateway node and its command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use skein_node::cli;
use skein_node::load::build_runtime;
use skein_node::node::ClusterOptions;
use skein_node::node::bind_listener;
use skein_node::{ConfigSource, NodeOptions, ProcessEnvironment, load_config, start_node};
use tracing_subscriber::EnvFilter;

/// Skein, an LLM gateway.
#[derive(Debug, Parser)]
#[command(name = "skein", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: cli::Connection,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Check a config file and print what it declares, without serving.
    Check(CheckArgs),
    /// Show what a running node serves and the state of its provider keys (admin gRPC API).
    Status(StatusArgs),
    /// Virtual keys: create (the secret is shown once), list, get, update, rotate, revoke,
    /// delete.
    #[command(subcommand)]
    Key(cli::KeyCommand),
    /// Teams (keys belong to a team, teams to a customer).
    #[command(subcommand)]
    Team(cli::EntityCommand),
    /// Customers.
    #[command(subcommand)]
    Customer(cli::EntityCommand),
    /// Budgets on keys, teams and customers, and their status (spend, the nodes' leases).
    #[command(subcommand)]
    Budget(cli::BudgetCommand),
    /// Upstream providers.
    #[command(subcommand)]
    Provider(cli::EntityCommand),
    /// Model routes.
    #[command(subcommand)]
    Route(cli::EntityCommand),
    /// Model price overrides.
    #[command(subcommand)]
    Price(cli::EntityCommand),
    /// Recorded usage and spend.
    Usage(cli::UsageArgs),
    /// Raft membership and status.
    #[command(subcommand)]
    Cluster(cli::ClusterCommand),
    /// Export or import the whole configuration.
    #[command(subcommand)]
    Config(cli::ConfigCommand),
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The node's admin gRPC address.
    #[arg(
        long,
        env = "SKEIN_ADMIN_ADDR",
        default_value = "http://127.0.0.1:8081"
    )]
    addr: String,
    /// The admin token.
    #[arg(long, env = "SKEIN_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The config file (YAML). Without one, providers come from OPENAI_API_KEY and friends.
    #[arg(long, env = "SKEIN_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the proxy API.
    #[arg(long, env = "SKEIN_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: String,
    /// Address of the admin gRPC API (internal; do not expose publicly).
    #[arg(long, env = "SKEIN_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    grpc_addr: String,
    /// Log format.
    #[arg(long, env = "SKEIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads of the async runtime (default: one per core).
    #[arg(long, env = "SKEIN_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Seconds to wait for requests in flight on shutdown.
    #[arg(long, env = "SKEIN_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Where the node keeps its Raft log and snapshots (sled).
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = "./skein-data")]
    data_dir: PathBuf,
    /// This node's id in the cluster (above zero), or `ordinal`: one more than the number
    /// that ends the host name (`skein-0` is 1, `skein-2` is 3), as in a StatefulSet.
    #[arg(long, env = "SKEIN_NODE_ID", default_value = "1")]
    node_id: String,
    /// The Raft voters, as `id=host:port` gRPC addresses separated by commas. Every voter may
    /// start with the same list at the same time. Empty: this node alone.
    #[arg(long, env = "SKEIN_VOTERS", default_value = "")]
    voters: String,
    /// gRPC addresses (`host:port`, comma-separated) of members to join through, for a node
    /// that is not a voter: it joins as a learner. A name may resolve to several addresses (a
    /// Kubernetes headless Service): each is asked.
    #[arg(long, env = "SKEIN_PEERS", default_value = "")]
    peers: String,
    /// Join-or-form mode (instead of --voters): the node with this id forms a new cluster of
    /// one voter, but only once every address --peers resolves to has answered and none is in
    /// a cluster; every other node (and that one, when it finds a cluster) joins through
    /// --peers as a learner. The leader then promotes learners up to --target-voters.
    #[arg(long, env = "SKEIN_BOOTSTRAP_NODE", conflicts_with = "voters")]
    bootstrap_node: Option<String>,
    /// How many voters the cluster keeps (odd), recorded when the cluster is first formed:
    /// the leader promotes caught-up learners to the largest odd number of voters up to it.
    /// Later changes go through `skein cluster target-voters`. Default: 3 with
    /// --bootstrap-node, else the number of --voters.
    #[arg(long, env = "SKEIN_TARGET_VOTERS")]
    target_voters: Option<u64>,
    /// Seconds a node that sees no Raft leader stays ready (it keeps proxying from its last
    /// applied config either way).
    #[arg(long, env = "SKEIN_READY_LEASE_SECS", default_value_t = 30)]
    ready_lease_secs: u64,
    /// Also serve `/metrics` on the proxy port (it is always served on the gRPC port).
    #[arg(long, env = "SKEIN_METRICS_ON_PROXY_PORT", default_value_t = true, action = clap::ArgAction::Set)]
    metrics_on_proxy_port: bool,
    /// Open connections on the proxy port at most; at the cap the longest idle one is closed
    /// to make room. 0: three quarters of what the open-file limit leaves, at most 10000.
    #[arg(long, env = "SKEIN_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Open connections per client address on the proxy port at most (0: no such cap).
    #[arg(long, env = "SKEIN_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 0)]
    max_connections_per_client: usize,
    /// Open connections on the gRPC port at most (0: an eighth of what the open-file limit
    /// leaves, at most 1000).
    #[arg(long, env = "SKEIN_MAX_GRPC_CONNECTIONS", default_value_t = 0)]
    max_grpc_connections: usize,
    /// Seconds a client has to send a request's headers (and finish a TLS handshake).
    #[arg(long, env = "SKEIN_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    header_read_timeout_secs: u64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, env = "SKEIN_IDLE_TIMEOUT_SECS", default_value_t = 75)]
    idle_timeout_secs: u64,
    /// Seconds a request body may pause between two chunks (408 past it).
    #[arg(long, env = "SKEIN_BODY_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    body_idle_timeout_secs: u64,
    /// Seconds a request body has to arrive whole (408 past it).
    #[arg(long, env = "SKEIN_BODY_TIMEOUT_SECS", default_value_t = 300)]
    body_timeout_secs: u64,
    /// Seconds a stored Responses API answer is kept (for `previous_response_id` and
    /// `GET /v1/responses/{id}`); 30 days by default, as OpenAI keeps them.
    #[arg(long, env = "SKEIN_RESPONSES_TTL_SECS", default_value_t = 30 * 24 * 3_600)]
    responses_ttl_secs: u64,
    /// Bytes of stored responses this node keeps at most (its own and other nodes' copies);
    /// past it the soonest to expire go first.
    #[arg(long, env = "SKEIN_RESPONSES_MAX_BYTES", default_value_t = 1 << 30)]
    responses_max_bytes: u64,
    /// The gRPC address other nodes reach this one at (default: the gRPC listener's address).
    #[arg(long, env = "SKEIN_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// The admin API token. With one set, proxy calls also need a virtual key.
    #[arg(long, env = "SKEIN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The gossip (UDP) address; `off` to run without gossip.
    #[arg(long, env = "SKEIN_GOSSIP_ADDR", default_value = "0.0.0.0:8082")]
    gossip_addr: String,
    /// The gossip address other nodes reach this one at (default: --gossip-addr).
    #[arg(long, env = "SKEIN_GOSSIP_ADVERTISE_ADDR")]
    gossip_advertise_addr: Option<std::net::SocketAddr>,
    /// Gossip seeds, `host:port` separated by commas (a Kubernetes headless Service name
    /// works: it is re-resolved).
    #[arg(long, env = "SKEIN_GOSSIP_SEEDS", default_value = "")]
    gossip_seeds: String,
    /// Build a Raft snapshot (and compact the log) after this many new entries.
    #[arg(
        long,
        env = "SKEIN_RAFT_SNAPSHOT_AFTER_LOGS",
        default_value_t = 5000,
        hide = true
    )]
    raft_snapshot_after_logs: u64,
    /// Log entries kept behind the last snapshot.
    #[arg(
        long,
        env = "SKEIN_RAFT_KEEP_LOGS",
        default_value_t = 1000,
        hide = true
    )]
    raft_keep_logs: u64,
    /// UTC days of daily usage history each node keeps (all-time totals are kept regardless).
    #[arg(long, env = "SKEIN_USAGE_RETENTION_DAYS", default_value_t = 400)]
    usage_retention_days: u64,
    /// Serve the gRPC port (admin API and Raft) over TLS with this certificate chain (PEM).
    #[arg(long, env = "SKEIN_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    grpc_tls_cert: Option<PathBuf>,
    /// The private key of --grpc-tls-cert (PEM).
    #[arg(long, env = "SKEIN_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// The CA that signed the nodes' certificates (PEM): peers are verified against it.
    #[arg(long, env = "SKEIN_GRPC_TLS_CA")]
    grpc_tls_ca: Option<PathBuf>,
    /// Mutual TLS: clients (peers and the CLI) must present a certificate signed by
    /// --grpc-tls-ca.
    #[arg(long, env = "SKEIN_GRPC_TLS_REQUIRE_CLIENT_CERT")]
    grpc_tls_require_client_cert: bool,
    /// A file holding the admin API token (instead of --admin-token).
    #[arg(long, env = "SKEIN_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The config file to check.
    #[arg(long, env = "SKEIN_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            // One worker thread: a current-thread runtime (no work stealing, no cross-thread
            // wake-ups). In the benchmark's medians over repeated runs it added less latency
            // than a one-worker multi-thread runtime (benches/README.md).
            let mut builder = match args.worker_threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                _ => tokio::runtime::Builder::new_multi_thread(),
            };
            builder.enable_all();
            if let Some(threads) = args.worker_threads.filter(|threads| *threads > 1) {
                builder.worker_threads(threads);
            }
            let runtime = builder.build().context("starting the runtime")?;
            runtime.block_on(serve(*args))
        }
        Command::Check(args) => check(args),
        admin => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(run_admin(&cli.connection, admin))
        }
    }
}

async fn run_admin(connection: &cli::Connection, command: Command) -> anyhow::Result<()> {
    use skein_proto::admin::v1::Kind;
    match command {
        Command::Status(args) => status(args).await,
        Command::Key(command) => cli::key(connection, command).await,
        Command::Team(command) => cli::entity(connection, Kind::Team, command).await,
        Command::Customer(command) => cli::entity(connection, Kind::Customer, command).await,
        Command::Budget(command) => cli::budget(connection, command).await,
        Command::Provider(command) => cli::entity(connection, Kind::Provider, command).await,
        Command::Route(command) => cli::entity(connection, Kind::Route, command).await,
        Command::Price(command) => cli::entity(connection, Kind::Price, command).await,
        Command::Usage(args) => cli::usage(connection, args).await,
        Command::Cluster(command) => cli::cluster(connection, command).await,
        Command::Config(command) => cli::config(connection, command).await,
        Command::Serve(_) | Command::Check(_) => Ok(()),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SKEIN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let env = ProcessEnvironment;
    let (validated, source) = load_config(args.config.as_deref(), &env)?;
    // Fail early on credentials this node cannot resolve.
    build_runtime(&validated, &env)?;
    let listener = bind_listener(&args.http_addr)
        .await
        .with_context(|| format!("binding the proxy address {}", args.http_addr))?;
    let admin_token = match (&args.admin_token, &args.admin_token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    }
    .filter(|token| !token.is_empty());
    let mut cluster = ClusterOptions::single(args.data_dir.clone());
    cluster.node_id = node_id(&args.node_id)?;
    cluster.voters = parse_voters(&args.voters)?;
    cluster.peers = split_list(&args.peers);
    cluster.bootstrap_node = match &args.bootstrap_node {
        Some(text) => Some(node_id(text).context("--bootstrap-node")?),
        None => None,
    };
    if let Some(target) = args.target_voters
        && (target == 0 || target.is_multiple_of(2))
    {
        anyhow::bail!("--target-voters must be an odd number, at least 1 (got {target})");
    }
    cluster.target_voters = args.target_voters;
    cluster.ready_lease = std::time::Duration::from_secs(args.ready_lease_secs);
    cluster.advertise_addr = args.advertise_addr.clone();
    cluster.snapshot_after_logs = args.raft_snapshot_after_logs.max(1);
    cluster.keep_logs = args.raft_keep_logs;
    cluster.usage_retention_days = args.usage_retention_days.max(1);
    if cluster.node_id == 0 {
        anyhow::bail!("--node-id must be above zero");
    }
    let options = NodeOptions {
        proxy: skein_proxy::ProxyOptions {
            metrics_on_proxy_port: args.metrics_on_proxy_port,
            body_idle_timeout: std::time::Duration::from_secs(args.body_idle_timeout_secs.max(1)),
            body_timeout: std::time::Duration::from_secs(args.body_timeout_secs.max(1)),
            ..Default::default()
        },
        proxy_listener: {
            let mut listener = skein_proxy::listener::ListenerOptions::new("proxy");
            listener.max_connections = args.max_connections;
            listener.max_connections_per_client = args.max_connections_per_client;
            listener.header_read_timeout =
                std::time::Duration::from_secs(args.header_read_timeout_secs.max(1));
            listener.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs.max(1));
            listener
        },
        grpc_listener: {
            let mut listener = skein_node::node::grpc_listener_defaults();
            if args.max_grpc_connections > 0 {
                listener.max_connections = args.max_grpc_connections;
            }
            listener.header_read_timeout =
                std::time::Duration::from_secs(args.header_read_timeout_secs.max(1));
            listener.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs.max(1));
            listener
        },
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_secs),
        responses_ttl: std::time::Duration::from_secs(args.responses_ttl_secs.max(1)),
        responses_max_bytes: args.responses_max_bytes,
        cluster,
        admin_token,
        sync_env_providers: source == ConfigSource::Environment,
        gossip: if args.gossip_addr == "off" {
            None
        } else {
            Some(skein_node::node::GossipSettings {
                listen_addr: args.gossip_addr.parse().with_context(|| {
                    format!("--gossip-addr {} is not ip:port", args.gossip_addr)
                })?,
                advertise_addr: args.gossip_advertise_addr,
                seeds: split_list(&args.gossip_seeds),
            })
        },
        grpc_tls: match (&args.grpc_tls_cert, &args.grpc_tls_key) {
            (Some(cert), Some(key)) => Some(skein_node::tls::GrpcTls {
                cert: cert.clone(),
                key: key.clone(),
                ca: args.grpc_tls_ca.clone(),
                require_client_cert: args.grpc_tls_require_client_cert,
            }),
            _ => None,
        },
    };
    let grpc_listener = bind_listener(&args.grpc_addr)
        .await
        .with_context(|| format!("binding the admin gRPC address {}", args.grpc_addr))?;
    let node = start_node(
        listener,
        grpc_listener,
        validated.clone(),
        std::sync::Arc::new(env),
        options,
    )
    .await?;

    let config = validated.config();
    let source_text = match &source {
        ConfigSource::File(path) => format!("file {}", path.display()),
        ConfigSource::Environment => "environment variables (no config file)".to_owned(),
    };
    tracing::info!(
        http = %format!("http://{}", node.http_addr),
        grpc = %format!("{}://{}", if args.grpc_tls_cert.is_some() { "https" } else { "http" }, node.grpc_addr),
        node_id = node.control.id(),
        data_dir = %args.data_dir.display(),
        config = %source_text,
        version = env!("CARGO_PKG_VERSION"),
        "skein is serving the proxy API"
    );
    for provider in &config.providers {
        tracing::info!(
            provider = %provider.name,
            kind = provider.kind.as_str(),
            base_url = provider.base_url.as_deref().or(provider.kind.default_base_url()).unwrap_or(""),
            keys = provider.keys.len(),
            "provider"
        );
    }
    for route in &config.routes {
        let deployments: Vec<String> = route
            .deployments
            .iter()
            .map(|d| format!("{}/{}", d.provider, d.model))
            .collect();
        tracing::info!(route = %route.name, strategy = route.strategy.label(), deployments = %deployments.join(","), fallbacks = %route.fallbacks.join(","), "route");
    }
    if config.providers.is_empty() {
        tracing::warn!(
            "no providers configured: set OPENAI_API_KEY (or another provider's key) or pass --config"
        );
    }
    if !node.state.auth_required() {
        tracing::warn!(
            "no virtual keys exist and no admin token is set: the proxy is OPEN to anyone who can reach {} (local single-user mode)",
            node.http_addr
        );
    }

    wait_for_signal().await;
    tracing::info!("shutting down: not ready, draining requests in flight");
    node.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    use skein_proto::admin::v1::GetStatusRequest;
    use skein_proto::admin::v1::admin_client::AdminClient;
    let mut client = AdminClient::connect(args.addr.clone())
        .await
        .with_context(|| format!("connecting to the admin API at {}", args.addr))?;
    let mut request = tonic::Request::new(GetStatusRequest {});
    if let Some(token) = &args.token
        && let Ok(value) = format!("Bearer {}", token.trim()).parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    let status = client
        .get_status(request)
        .await
        .context("GetStatus")?
        .into_inner();
    println!(
        "skein {} at http://{} ({}), up {} s",
        status.version,
        status.http_addr,
        if status.ready { "ready" } else { "not ready" },
        status.uptime_ms / 1000
    );
    for provider in &status.providers {
        println!(
            "provider {} ({}) {}",
            provider.name, provider.kind, provider.base_url
        );
        for key in &provider.keys {
            let state = if key.cooling_down_ms > 0 {
                format!("cooling down for {} ms", key.cooling_down_ms)
            } else {
                "in rotation".to_owned()
            };
            println!("  key {} weight {}: {state}", key.name, key.weight);
        }
    }
    println!("routes: {}", status.routes.join(", "));
    Ok(())
}

/// `--node-id`: a number, or `ordinal` (from the host name's trailing number, plus one).
fn node_id(value: &str) -> anyhow::Result<u64> {
    if value != "ordinal" {
        return value
            .parse()
            .with_context(|| format!("--node-id: `{value}` is neither a number nor `ordinal`"));
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|host| host.trim().to_owned())
        })
        .context("--node-id ordinal: the host name is unknown")?;
    ordinal_id(&host)
}

fn ordinal_id(host: &str) -> anyhow::Result<u64> {
    let short = host.split('.').next().unwrap_or(host);
    let ordinal: u64 = short
        .rsplit_once('-')
        .and_then(|(_, number)| number.parse().ok())
        .with_context(|| {
            format!("--node-id ordinal: the host name `{host}` does not end in `-<number>`")
        })?;
    Ok(ordinal + 1)
}

/// Parse `1=host:port,2=host:port`.
fn parse_voters(text: &str) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut voters = std::collections::BTreeMap::new();
    for item in split_list(text) {
        let Some((id, addr)) = item.split_once('=') else {
            anyhow::bail!("--voters: `{item}` is not `id=host:port`");
        };
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--voters: `{id}` is not a node id"))?;
        if id == 0 || addr.trim().is_empty() {
            anyhow::bail!("--voters: `{item}` needs an id above zero and an address");
        }
        voters.insert(id, addr.trim().to_owned());
    }
    Ok(voters)
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let env = ProcessEnvironment;
    let (validated, _) = load_config(Some(&args.config), &env)?;
    let config = validated.config();
    println!(
        "{}: valid (version {})",
        args.config.display(),
        config.version
    );
    println!(
        "providers: {}",
        config
            .providers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "routes: {}",
        config
            .routes
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    build_runtime(&validated, &env)?;
    println!("credentials: all resolved");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_come_from_numbers_or_statefulset_ordinals() {
        assert_eq!(node_id("7").expect("id"), 7);
        assert!(node_id("seven").is_err());
        assert_eq!(ordinal_id("skein-0").expect("id"), 1);
        assert_eq!(
            ordinal_id("my-release-skein-2.skein-headless").expect("id"),
            3
        );
        assert!(ordinal_id("skein").is_err());
        assert!(ordinal_id("skein-x").is_err());
    }
}
