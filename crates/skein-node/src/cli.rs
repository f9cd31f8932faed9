//! The admin command line: `skein key|team|customer|budget|provider|route|price|usage|cluster|
//! config …`, each a call to the admin gRPC API of any node. Endpoint and token come from
//! flags or `SKEIN_ENDPOINT` / `SKEIN_ADMIN_TOKEN`; output is a table or JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    AddLearnerRequest, ClusterStatusRequest, CreateKeyRequest, CreateKeyResponse,
    CreateKeysRequest, DeleteRequest, ExportConfigRequest, GetRequest, ImportConfigRequest,
    KeyRequest, Kind, ListRequest, NodeRequest, Resource, TargetVotersRequest,
    TriggerSnapshotRequest, UsageRequest, WriteRequest,
};
use tonic::transport::Channel;

/// How to reach a node's admin API.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// The node's admin gRPC endpoint (any node of a cluster).
    #[arg(
        long,
        env = "SKEIN_ENDPOINT",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub endpoint: String,
    /// The admin token.
    #[arg(long, env = "SKEIN_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, env = "SKEIN_OUTPUT", value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// The CA to verify the node's TLS certificate with (PEM); implies TLS.
    #[arg(long, env = "SKEIN_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), for nodes that require mutual TLS.
    #[arg(long, env = "SKEIN_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SKEIN_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Connection {
    fn tls(&self) -> bool {
        self.tls_ca.is_some() || self.endpoint.starts_with("https://")
    }

    /// A channel to `endpoint` (`http(s)://host:port`), with this connection's TLS settings.
    async fn channel(&self, endpoint: &str) -> anyhow::Result<Channel> {
        let mut uri = endpoint.to_owned();
        if self.tls() && uri.starts_with("http://") {
            uri = uri.replacen("http://", "https://", 1);
        }
        let mut builder = tonic::transport::Endpoint::from_shared(uri.clone())
            .with_context(|| format!("{uri} is not a valid endpoint"))?;
        if self.tls() {
            let identity = match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                _ => None,
            };
            builder = builder
                .tls_config(crate::tls::client_tls(self.tls_ca.as_ref(), identity)?)
                .context("TLS settings")?;
        }
        builder
            .connect()
            .await
            .with_context(|| format!("connecting to the admin API at {uri}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Operations on an entity kept as JSON (teams, customers, budgets, providers, routes,
/// prices).
#[derive(Debug, Subcommand)]
pub enum EntityCommand {
    /// List every entity (all pages).
    List,
    /// Show one entity.
    Get {
        id: String,
    },
    /// Create from JSON (`--json '{…}'` or `--file path`).
    Create(JsonInput),
    /// Change fields: the JSON names the entity and the fields to replace.
    Update(JsonInput),
    Delete {
        id: String,
    },
}

/// `skein budget …`: the entity operations, and its status.
#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    #[command(flatten)]
    Entity(EntityCommand),
    /// Spend against the limit in the current period, and the nodes' leases on it.
    Status { id: String },
}

/// Run a budget command.
pub async fn budget(connection: &Connection, command: BudgetCommand) -> anyhow::Result<()> {
    let id = match command {
        BudgetCommand::Entity(command) => return entity(connection, Kind::Budget, command).await,
        BudgetCommand::Status { id } => id,
    };
    let mut client = connect(connection).await?;
    let status = client
        .get_budget_status(request(
            connection,
            skein_proto::admin::v1::BudgetStatusRequest { id, min_version: 0 },
        )?)
        .await
        .map_err(failed)?
        .into_inner();
    let usd = |nanos: u64| nanos as f64 / 1e9;
    match connection.output {
        Output::Json => {
            let leases: Vec<Value> = status
                .leases
                .iter()
                .map(|lease| {
                    json!({"node_id": lease.node_id, "granted_nanos": lease.granted_nanos,
                        "used_nanos": lease.used_nanos, "outstanding_nanos": lease.outstanding_nanos,
                        "until_ms": lease.until_ms, "lapsed": lease.lapsed})
                })
                .collect();
            println!(
                "{}",
                json!({"id": status.id, "hard": status.hard, "limit_nanos": status.limit_nanos,
                    "spent_nanos": status.spent_nanos, "leased_nanos": status.leased_nanos,
                    "free_nanos": status.free_nanos, "leases": leases, "version": status.version})
            );
        }
        Output::Table => {
            println!(
                "budget {} ({}): spent {:.6} of {:.6} USD, {:.6} leased to nodes, {:.6} free",
                status.id,
                if status.hard { "hard" } else { "soft" },
                usd(status.spent_nanos),
                usd(status.limit_nanos),
                usd(status.leased_nanos),
                usd(status.free_nanos)
            );
            if !status.leases.is_empty() {
                println!(
                    "{:<8} {:>14} {:>14} {:>14}  UNTIL",
                    "NODE", "GRANTED", "USED", "HELD"
                );
                for lease in &status.leases {
                    println!(
                        "{:<8} {:>14.6} {:>14.6} {:>14.6}  {}{}",
                        lease.node_id,
                        usd(lease.granted_nanos),
                        usd(lease.used_nanos),
                        usd(lease.outstanding_nanos),
                        lease.until_ms,
                        if lease.lapsed { " (lapsed)" } else { "" }
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct JsonInput {
    /// The entity as JSON.
    #[arg(long, conflicts_with = "file")]
    pub json: Option<String>,
    /// A file holding the entity as JSON or YAML.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

impl JsonInput {
    fn read(&self) -> anyhow::Result<String> {
        match (&self.json, &self.file) {
            (Some(json), _) => Ok(json.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                // YAML is a superset of JSON: read either, send JSON.
                let value: Value = serde_norway::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?;
                Ok(value.to_string())
            }
            (None, None) => anyhow::bail!("give the entity with --json or --file"),
        }
    }
}

/// `skein key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key; its secret is printed once and stored nowhere.
    Create {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        team: Option<String>,
        /// A model (route or provider/model) the key may call; repeat for more. None: all.
        #[arg(long = "model")]
        models: Vec<String>,
        #[arg(long)]
        rpm: Option<u64>,
        #[arg(long)]
        tpm: Option<u64>,
        #[arg(long)]
        max_parallel: Option<u32>,
        /// Expire after this long (`30d`, `12h`).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Create many keys in one atomic write (all or none); prints each id and secret once.
    CreateMany {
        /// How many keys (1 to 100,000).
        #[arg(long)]
        count: usize,
        /// Ids are this prefix and a number from 1 (`ci-1`, `ci-2`, …); random when not given.
        #[arg(long)]
        id_prefix: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long = "model")]
        models: Vec<String>,
        #[arg(long)]
        rpm: Option<u64>,
        #[arg(long)]
        tpm: Option<u64>,
    },
    List,
    Get {
        id: String,
    },
    /// Change fields of a key (JSON naming the key's `id`).
    Update(JsonInput),
    /// Give the key a new secret (printed once); the old one stops working.
    Rotate {
        id: String,
    },
    Revoke {
        id: String,
    },
    Delete {
        id: String,
    },
}

/// `skein cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Raft role, term, log indexes and members, as this node sees them, and each member's own
    /// indexes.
    Status,
    /// Add a node as a learner (it then replicates and serves traffic).
    AddLearner {
        #[arg(long)]
        id: u64,
        /// The node's gRPC address, `host:port`.
        #[arg(long)]
        addr: String,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a node from the group (before it goes for good, e.g. before scaling down).
    Remove { id: u64 },
    /// How many voters the leader keeps (odd): it promotes caught-up learners up to this.
    TargetVoters { voters: u64 },
    /// Build a snapshot (and compact the log) on this node now.
    Snapshot,
}

/// `skein config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the whole configuration as YAML.
    Export,
    /// Replace the whole configuration with a YAML export, atomically.
    Import { file: PathBuf },
}

/// `skein usage …`
#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub team: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Spend over this period back from now (`7d`, `24h`); all time without it.
    #[arg(long)]
    pub since: Option<String>,
}

async fn connect(connection: &Connection) -> anyhow::Result<AdminClient<Channel>> {
    Ok(
        AdminClient::new(connection.channel(&connection.endpoint).await?)
            .max_decoding_message_size(crate::admin::ADMIN_MESSAGE_LIMIT)
            .max_encoding_message_size(crate::admin::ADMIN_MESSAGE_LIMIT),
    )
}

fn request<T>(connection: &Connection, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = &connection.token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the admin token is not a valid header value")?,
        );
    }
    Ok(request)
}

fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn parse_json(resource: &Resource) -> Value {
    serde_json::from_str(&resource.json).unwrap_or(Value::String(resource.json.clone()))
}

async fn list_all(
    client: &mut AdminClient<Channel>,
    connection: &Connection,
    kind: Kind,
) -> anyhow::Result<Vec<Resource>> {
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(request(
                connection,
                ListRequest {
                    kind: kind as i32,
                    page_size: 1000,
                    page_token: token,
                    min_version: 0,
                },
            )?)
            .await
            .map_err(failed)?
            .into_inner();
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok(items);
        }
        token = page.next_page_token;
    }
}

fn print_resources(output: Output, resources: &[Resource]) {
    match output {
        Output::Json => {
            let values: Vec<Value> = resources.iter().map(parse_json).collect();
            println!("{}", Value::Array(values));
        }
        Output::Table => {
            let width = resources
                .iter()
                .map(|resource| resource.id.len())
                .max()
                .unwrap_or(2)
                .max(2);
            println!("{:width$}  DETAILS", "ID");
            for resource in resources {
                let mut details = parse_json(resource);
                if let Some(object) = details.as_object_mut() {
                    for id_field in ["id", "name", "hash"] {
                        if object.get(id_field).and_then(Value::as_str) == Some(&resource.id)
                            || id_field == "hash"
                        {
                            object.remove(id_field);
                        }
                    }
                }
                println!("{:width$}  {details}", resource.id);
            }
        }
    }
}

fn print_written(output: Output, version: u64) {
    match output {
        Output::Json => println!("{}", json!({"version": version})),
        Output::Table => println!("done (config version {version})"),
    }
}

fn print_secret(output: Output, created: &CreateKeyResponse) {
    let key = created.key.as_ref().map(parse_json).unwrap_or(Value::Null);
    match output {
        Output::Json => println!(
            "{}",
            json!({"secret": created.secret, "key": key, "version": created.version})
        ),
        Output::Table => {
            println!("secret: {}", created.secret);
            println!("(shown once: it is stored only as a hash)");
            println!("key:    {key}");
        }
    }
}

/// Run an entity command on `kind`.
pub async fn entity(
    connection: &Connection,
    kind: Kind,
    command: EntityCommand,
) -> anyhow::Result<()> {
    let mut client = connect(connection).await?;
    match command {
        EntityCommand::List => {
            let items = list_all(&mut client, connection, kind).await?;
            print_resources(connection.output, &items);
        }
        EntityCommand::Get { id } => {
            let found = client
                .get(request(
                    connection,
                    GetRequest {
                        kind: kind as i32,
                        id,
                        min_version: 0,
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            print_resources(
                connection.output,
                &found.resource.into_iter().collect::<Vec<_>>(),
            );
        }
        EntityCommand::Create(input) => {
            let entity = crate::typed::entity_of(kind, &input.read()?).map_err(failed)?;
            let written = client
                .create(request(
                    connection,
                    WriteRequest {
                        kind: kind as i32,
                        json: String::new(),
                        entity: Some(entity),
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            print_written(connection.output, written.version);
        }
        EntityCommand::Update(input) => {
            // The fields given, over the entity as it is; sent whole, typed.
            let patch = input.read()?;
            let field = crate::admin::id_field(kind);
            let id = serde_json::from_str::<Value>(&patch)
                .ok()
                .and_then(|value| value[field].as_str().map(str::to_owned))
                .ok_or_else(|| anyhow::anyhow!("the JSON must name the entity in `{field}`"))?;
            let current = client
                .get(request(
                    connection,
                    GetRequest {
                        kind: kind as i32,
                        id,
                        min_version: 0,
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner()
                .resource
                .map(|resource| resource.json)
                .unwrap_or_default();
            let merged = crate::admin::merge(&current, &patch).map_err(failed)?;
            let entity = crate::typed::entity_of(kind, &merged).map_err(failed)?;
            let written = client
                .update(request(
                    connection,
                    WriteRequest {
                        kind: kind as i32,
                        json: String::new(),
                        entity: Some(entity),
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            print_written(connection.output, written.version);
        }
        EntityCommand::Delete { id } => {
            let written = client
                .delete(request(
                    connection,
                    DeleteRequest {
                        kind: kind as i32,
                        id,
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            print_written(connection.output, written.version);
        }
    }
    Ok(())
}

/// Run `skein key …`.
pub async fn key(connection: &Connection, command: KeyCommand) -> anyhow::Result<()> {
    let mut client = connect(connection).await?;
    match command {
        KeyCommand::Create {
            id,
            name,
            owner,
            team,
            models,
            rpm,
            tpm,
            max_parallel,
            expires_in,
        } => {
            let expires_at_ms = match expires_in {
                Some(text) => {
                    let millis = skein_types::duration::parse_millis(&text)
                        .map_err(|error| anyhow::anyhow!("--expires-in: {error}"))?;
                    skein_types::now_ms().saturating_add(millis)
                }
                None => 0,
            };
            let created = client
                .create_key(request(
                    connection,
                    CreateKeyRequest {
                        id: id.unwrap_or_default(),
                        name: name.unwrap_or_default(),
                        owner: owner.unwrap_or_default(),
                        team: team.unwrap_or_default(),
                        models,
                        rpm: rpm.unwrap_or(0),
                        tpm: tpm.unwrap_or(0),
                        max_parallel: max_parallel.unwrap_or(0),
                        expires_at_ms,
                        metadata: Default::default(),
                    },
                )?)
                .await
                .map_err(failed)?
                .into_inner();
            print_secret(connection.output, &created);
        }
        KeyCommand::CreateMany {
            count,
            id_prefix,
            team,
            models,
            rpm,
            tpm,
        } => {
            let keys = (1..=count)
                .map(|n| CreateKeyRequest {
                    id: id_prefix
                        .as_ref()
                        .map(|prefix| format!("{prefix}{n}"))
                        .unwrap_or_default(),
                    team: team.clone().unwrap_or_default(),
                    models: models.clone(),
                    rpm: rpm.unwrap_or(0),
                    tpm: tpm.unwrap_or(0),
                    ..CreateKeyRequest::default()
                })
                .collect();
            let created = client
                .create_keys(request(connection, CreateKeysRequest { keys })?)
                .await
                .map_err(failed)?
                .into_inner();
            match connection.output {
                Output::Json => {
                    let keys: Vec<Value> = created
                        .keys
                        .iter()
                        .map(|key| json!({"id": key.id, "secret": key.secret}))
                        .collect();
                    println!("{}", json!({"keys": keys, "version": created.version}));
                }
                Output::Table => {
                    for key in &created.keys {
                        println!("{}  {}", key.id, key.secret);
                    }
                    println!(
                        "{} keys created (config version {}); the secrets are shown once",
                        created.keys.len(),
                        created.version
                    );
                }
            }
        }
        KeyCommand::Rotate { id } => {
            let created = client
                .rotate_key(request(connection, KeyRequest { id })?)
                .await
                .map_err(failed)?
                .into_inner();
            print_secret(connection.output, &created);
        }
        KeyCommand::Revoke { id } => {
            let written = client
                .revoke_key(request(connection, KeyRequest { id })?)
                .await
                .map_err(failed)?
                .into_inner();
            print_written(connection.output, written.version);
        }
        KeyCommand::List => return entity(connection, Kind::Key, EntityCommand::List).await,
        KeyCommand::Get { id } => {
            return entity(connection, Kind::Key, EntityCommand::Get { id }).await;
        }
        KeyCommand::Update(input) => {
            return entity(connection, Kind::Key, EntityCommand::Update(input)).await;
        }
        KeyCommand::Delete { id } => {
            return entity(connection, Kind::Key, EntityCommand::Delete { id }).await;
        }
    }
    Ok(())
}

/// Run `skein usage`.
pub async fn usage(connection: &Connection, args: UsageArgs) -> anyhow::Result<()> {
    let mut client = connect(connection).await?;
    let since_ms = match &args.since {
        Some(text) => {
            let millis = skein_types::duration::parse_millis(text)
                .map_err(|error| anyhow::anyhow!("--since: {error}"))?;
            skein_types::now_ms().saturating_sub(millis)
        }
        None => 0,
    };
    let usage = client
        .get_usage(request(
            connection,
            UsageRequest {
                key_id: args.key.unwrap_or_default(),
                team: args.team.unwrap_or_default(),
                model: args.model.unwrap_or_default(),
                since_ms,
                until_ms: 0,
                min_version: 0,
            },
        )?)
        .await
        .map_err(failed)?
        .into_inner();
    let usd = |nanos: u64| nanos as f64 / 1e9;
    match connection.output {
        Output::Json => {
            let rows: Vec<Value> = usage
                .rows
                .iter()
                .map(|row| {
                    json!({"key": row.key_id, "model": row.model, "requests": row.requests,
                        "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                        "cost_nanos": row.cost_nanos})
                })
                .collect();
            println!(
                "{}",
                json!({"rows": rows, "cost_in_period_nanos": usage.cost_in_period_nanos, "version": usage.version})
            );
        }
        Output::Table => {
            println!(
                "{:24} {:32} {:>9} {:>12} {:>12} {:>12}",
                "KEY", "MODEL", "REQUESTS", "INPUT", "OUTPUT", "COST (USD)"
            );
            for row in &usage.rows {
                println!(
                    "{:24} {:32} {:>9} {:>12} {:>12} {:>12.6}",
                    row.key_id,
                    row.model,
                    row.requests,
                    row.input_tokens,
                    row.output_tokens,
                    usd(row.cost_nanos)
                );
            }
            println!(
                "spend in the period: {:.6} USD",
                usd(usage.cost_in_period_nanos)
            );
        }
    }
    Ok(())
}

/// Run `skein cluster …`.
pub async fn cluster(connection: &Connection, command: ClusterCommand) -> anyhow::Result<()> {
    let mut client = connect(connection).await?;
    let version = match command {
        ClusterCommand::Status => return cluster_status(connection, &mut client).await,
        ClusterCommand::AddLearner { id, addr } => {
            client
                .add_learner(request(connection, AddLearnerRequest { id, addr })?)
                .await
        }
        ClusterCommand::Promote { id } => {
            client
                .promote_voter(request(connection, NodeRequest { id })?)
                .await
        }
        ClusterCommand::Remove { id } => {
            client
                .remove_node(request(connection, NodeRequest { id })?)
                .await
        }
        ClusterCommand::TargetVoters { voters } => {
            client
                .set_target_voters(request(connection, TargetVotersRequest { voters })?)
                .await
        }
        ClusterCommand::Snapshot => {
            let built = client
                .trigger_snapshot(request(connection, TriggerSnapshotRequest {})?)
                .await
                .map_err(failed)?
                .into_inner();
            match connection.output {
                Output::Json => println!("{}", json!({"snapshot_index": built.index})),
                Output::Table => println!("snapshot built at log index {}", built.index),
            }
            return Ok(());
        }
    }
    .map_err(failed)?
    .into_inner()
    .version;
    print_written(connection.output, version);
    Ok(())
}

async fn cluster_status(
    connection: &Connection,
    client: &mut AdminClient<Channel>,
) -> anyhow::Result<()> {
    let status = client
        .cluster_status(request(connection, ClusterStatusRequest {})?)
        .await
        .map_err(failed)?
        .into_inner();
    // Ask every member for its own view. A member that does not answer within two seconds
    // (down, or cut off by a partition) is shown as unreachable.
    let mut views = BTreeMap::new();
    for member in &status.members {
        let ask = async {
            let channel = connection
                .channel(&format!("http://{}", member.addr))
                .await
                .ok()?;
            AdminClient::new(channel)
                .cluster_status(request(connection, ClusterStatusRequest {}).ok()?)
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        let view = tokio::time::timeout(std::time::Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten();
        views.insert(member.id, view);
    }
    match connection.output {
        Output::Json => {
            let members: Vec<Value> = status
                .members
                .iter()
                .map(|member| {
                    let view = views.get(&member.id).cloned().flatten();
                    json!({
                        "id": member.id, "addr": member.addr, "voter": member.voter,
                        "reachable": view.is_some(),
                        "role": view.as_ref().map(|v| v.role.clone()),
                        "term": view.as_ref().map(|v| v.term),
                        "commit_index": view.as_ref().map(|v| v.commit_index),
                        "applied_index": view.as_ref().map(|v| v.applied_index),
                        "snapshot_index": view.as_ref().map(|v| v.snapshot_index),
                    })
                })
                .collect();
            let gossip: Vec<Value> = status
                .gossip
                .iter()
                .map(|member| {
                    json!({
                        "gossip_addr": member.gossip_addr, "live": member.live,
                        "node_id": member.node_id, "ready": member.ready,
                        "version": member.version, "raft_role": member.raft_role,
                        "applied_index": member.applied_index,
                        "http_addr": member.http_addr, "grpc_addr": member.grpc_addr,
                    })
                })
                .collect();
            println!(
                "{}",
                json!({"node_id": status.node_id, "cluster_id": status.cluster_id, "target_voters": status.target_voters, "leader_id": status.leader_id, "term": status.term, "members": members, "gossip": gossip})
            );
        }
        Output::Table => {
            println!(
                "cluster {}; asked node {} ({}); leader: node {}; term {}; target voters {}",
                if status.cluster_id.is_empty() {
                    "(no id yet)"
                } else {
                    &status.cluster_id
                },
                status.node_id,
                status.role,
                status.leader_id,
                status.term,
                status.target_voters
            );
            println!(
                "{:>4}  {:22} {:7} {:9} {:>6} {:>8} {:>8} {:>9}",
                "ID", "ADDRESS", "MEMBER", "ROLE", "TERM", "COMMIT", "APPLIED", "SNAPSHOT"
            );
            for member in &status.members {
                let kind = if member.voter { "voter" } else { "learner" };
                match views.get(&member.id).cloned().flatten() {
                    Some(view) => println!(
                        "{:>4}  {:22} {:7} {:9} {:>6} {:>8} {:>8} {:>9}",
                        member.id,
                        member.addr,
                        kind,
                        view.role,
                        view.term,
                        view.commit_index,
                        view.applied_index,
                        view.snapshot_index
                    ),
                    None => println!(
                        "{:>4}  {:22} {:7} unreachable",
                        member.id, member.addr, kind
                    ),
                }
            }
            if !status.gossip.is_empty() {
                println!("gossip, as node {} sees it:", status.node_id);
                println!(
                    "{:>4}  {:22} {:5} {:5} {:9} {:>8} {:8}",
                    "ID", "GOSSIP ADDRESS", "LIVE", "READY", "ROLE", "APPLIED", "VERSION"
                );
                for member in &status.gossip {
                    println!(
                        "{:>4}  {:22} {:5} {:5} {:9} {:>8} {:8}",
                        member.node_id,
                        member.gossip_addr,
                        if member.live { "yes" } else { "DEAD" },
                        member.ready,
                        member.raft_role,
                        member.applied_index,
                        member.version
                    );
                }
            }
        }
    }
    Ok(())
}

/// Run `skein config …`.
pub async fn config(connection: &Connection, command: ConfigCommand) -> anyhow::Result<()> {
    let mut client = connect(connection).await?;
    match command {
        ConfigCommand::Export => {
            let exported = client
                .export_config(request(connection, ExportConfigRequest { min_version: 0 })?)
                .await
                .map_err(failed)?
                .into_inner();
            print!("{}", exported.yaml);
        }
        ConfigCommand::Import { file } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let written = client
                .import_config(request(connection, ImportConfigRequest { yaml })?)
                .await
                .map_err(failed)?
                .into_inner();
            print_written(connection.output, written.version);
        }
    }
    Ok(())
}
