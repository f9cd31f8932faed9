//! The replicated control state: everything the Raft group agrees on, and the commands that
//! change it.
//!
//! [`ControlState::apply`] is deterministic: every id and timestamp travels inside the command,
//! so every node that applies the same log reaches the same state. Commands are checked with
//! [`ControlState::check`] before they are proposed; apply runs the same check again (a racing
//! write may have changed the state in between) and turns a failed check into a rejected
//! outcome, never into a storage error.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::{ProviderSpec, RouteSpec, ServerSpec, SkeinConfig};
use crate::validate::ValidatedConfig;

/// Money in nano-dollars (10⁻⁹ USD). Never floating point.
pub type Nanos = u64;

/// How many audit entries the state keeps (oldest dropped first).
pub const AUDIT_CAPACITY: usize = 1000;

/// Request limits of a key, team or customer. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
}

/// A virtual key. The secret itself is never stored: only its hash and a display prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualKey {
    pub id: String,
    pub name: String,
    /// Lower-case hex SHA-256 of the secret.
    pub hash: String,
    /// The first characters of the secret, for display (`sk-skein-ab12…`).
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Models (route names or `provider/model`) this key may call; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub created_at_ms: u64,
    #[serde(default)]
    pub updated_at_ms: u64,
}

impl VirtualKey {
    /// Whether the key may be used at `now_ms`.
    pub fn is_active(&self, now_ms: u64) -> bool {
        !self.revoked && self.expires_at_ms.is_none_or(|expiry| now_ms < expiry)
    }

    /// Whether the key may call `model` (a route name or `provider/model`).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|allowed| allowed == model)
    }
}

/// A team: keys belong to at most one team, teams to at most one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Team {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A customer: the top of the key → team → customer hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What a budget applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum Scope {
    Key(String),
    Team(String),
    Customer(String),
}

/// A calendar unit for budget periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarUnit {
    Day,
    Week,
    Month,
}

/// When a budget's spend starts again from zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BudgetPeriod {
    /// Resets at each calendar boundary (midnight; weeks start on Monday) in an IANA time
    /// zone, daylight saving included.
    Calendar {
        unit: CalendarUnit,
        #[serde(default = "default_time_zone")]
        time_zone: String,
    },
    /// Spend over the last `window_ms` milliseconds.
    Rolling { window_ms: u64 },
    /// Never resets.
    Lifetime,
}

/// A spending limit on a key, team or customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub id: String,
    pub scope: Scope,
    pub limit_nanos: Nanos,
    pub period: BudgetPeriod,
    /// A hard budget refuses requests once spent; a soft one only reports.
    #[serde(default = "default_true")]
    pub hard: bool,
}

fn default_true() -> bool {
    true
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// A model's price, overriding the built-in table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// A route name, `provider/model`, or an upstream model name.
    pub model: String,
    pub input_nanos_per_token: Nanos,
    pub output_nanos_per_token: Nanos,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_nanos_per_token: Option<Nanos>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The config version (Raft log index) of the change.
    pub version: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
}

/// Settled usage of one key and model, as a node batches it into Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendItem {
    pub key_id: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nanos: Nanos,
}

/// The spend recorded against one budget in its current period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLedger {
    /// Start of the current calendar period (calendar budgets).
    pub period_start_ms: u64,
    /// Spend in the current period (calendar and lifetime budgets).
    pub spent_nanos: Nanos,
    /// `(bucket start, spend)` pairs, oldest first (rolling budgets).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub buckets: VecDeque<(u64, Nanos)>,
}

/// Usage totals for one key and model (over all time, or one day).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nanos: Nanos,
}

impl UsageTotals {
    /// Add one spend item.
    pub fn add(&mut self, item: &SpendItem) {
        self.requests = self.requests.saturating_add(item.requests);
        self.input_tokens = self.input_tokens.saturating_add(item.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(item.output_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(item.cost_nanos);
    }

    /// Add other totals.
    pub fn merge(&mut self, other: &UsageTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(other.cost_nanos);
    }
}

/// A change to the control state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// Apply the node's config file once, into an empty state (the first leader proposes it).
    Bootstrap {
        config: SkeinConfig,
    },
    PutProvider {
        provider: ProviderSpec,
    },
    DeleteProvider {
        name: String,
    },
    PutRoute {
        route: RouteSpec,
    },
    DeleteRoute {
        name: String,
    },
    CreateKey {
        key: VirtualKey,
    },
    UpdateKey {
        key: VirtualKey,
    },
    RotateKey {
        id: String,
        hash: String,
        prefix: String,
    },
    RevokeKey {
        id: String,
    },
    DeleteKey {
        id: String,
    },
    PutTeam {
        team: Team,
    },
    DeleteTeam {
        id: String,
    },
    PutCustomer {
        customer: Customer,
    },
    DeleteCustomer {
        id: String,
    },
    PutBudget {
        budget: Budget,
    },
    DeleteBudget {
        id: String,
    },
    PutPrice {
        price: Price,
    },
    DeletePrice {
        model: String,
    },
    /// Settled spend from one node; applied once per `(node, seq)`.
    RecordSpend {
        node: u64,
        seq: u64,
        items: Vec<SpendItem>,
    },
    /// Replace the whole configuration (not spend or usage) atomically.
    Import {
        config: ConfigExport,
    },
    /// Give the cluster its identity, once: the first leader proposes it. Later ones are
    /// no-ops (`AlreadyBootstrapped`).
    InitCluster {
        cluster_id: String,
        target_voters: u64,
    },
    /// Record the incarnation (the random id a node's storage was created with) of a member.
    /// Refused when the node id is registered with another incarnation: that node's data was
    /// lost or it is another node with the same id, and it must not take the old one's place.
    RegisterNode {
        node: u64,
        incarnation: u64,
    },
    /// Forget a member's incarnation (after the node was removed from the group).
    ForgetNode {
        node: u64,
    },
    /// How many voters the leader keeps, promoting caught-up learners (odd, at least 1).
    SetTargetVoters {
        voters: u64,
    },
}

impl Command {
    /// A short verb for the audit trail.
    pub fn action(&self) -> &'static str {
        match self {
            Command::Bootstrap { .. } => "bootstrap",
            Command::PutProvider { .. } => "put_provider",
            Command::DeleteProvider { .. } => "delete_provider",
            Command::PutRoute { .. } => "put_route",
            Command::DeleteRoute { .. } => "delete_route",
            Command::CreateKey { .. } => "create_key",
            Command::UpdateKey { .. } => "update_key",
            Command::RotateKey { .. } => "rotate_key",
            Command::RevokeKey { .. } => "revoke_key",
            Command::DeleteKey { .. } => "delete_key",
            Command::PutTeam { .. } => "put_team",
            Command::DeleteTeam { .. } => "delete_team",
            Command::PutCustomer { .. } => "put_customer",
            Command::DeleteCustomer { .. } => "delete_customer",
            Command::PutBudget { .. } => "put_budget",
            Command::DeleteBudget { .. } => "delete_budget",
            Command::PutPrice { .. } => "put_price",
            Command::DeletePrice { .. } => "delete_price",
            Command::RecordSpend { .. } => "record_spend",
            Command::Import { .. } => "import",
            Command::InitCluster { .. } => "init_cluster",
            Command::RegisterNode { .. } => "register_node",
            Command::ForgetNode { .. } => "forget_node",
            Command::SetTargetVoters { .. } => "set_target_voters",
        }
    }

    /// What the command changes, for the audit trail.
    pub fn target(&self) -> String {
        match self {
            Command::Bootstrap { .. } | Command::Import { .. } => "config".to_owned(),
            Command::PutProvider { provider } => format!("provider/{}", provider.name),
            Command::DeleteProvider { name } => format!("provider/{name}"),
            Command::PutRoute { route } => format!("route/{}", route.name),
            Command::DeleteRoute { name } => format!("route/{name}"),
            Command::CreateKey { key } | Command::UpdateKey { key } => format!("key/{}", key.id),
            Command::RotateKey { id, .. }
            | Command::RevokeKey { id }
            | Command::DeleteKey { id } => format!("key/{id}"),
            Command::PutTeam { team } => format!("team/{}", team.id),
            Command::DeleteTeam { id } => format!("team/{id}"),
            Command::PutCustomer { customer } => format!("customer/{}", customer.id),
            Command::DeleteCustomer { id } => format!("customer/{id}"),
            Command::PutBudget { budget } => format!("budget/{}", budget.id),
            Command::DeleteBudget { id } => format!("budget/{id}"),
            Command::PutPrice { price } => format!("price/{}", price.model),
            Command::DeletePrice { model } => format!("price/{model}"),
            Command::RecordSpend { node, seq, .. } => format!("node/{node}/spend/{seq}"),
            Command::InitCluster { .. } | Command::SetTargetVoters { .. } => "cluster".to_owned(),
            Command::RegisterNode { node, .. } | Command::ForgetNode { node } => {
                format!("node/{node}")
            }
        }
    }
}

/// A command with who proposed it and when (the proposer's clock, carried in the log so apply
/// is deterministic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub actor: String,
    pub at_ms: u64,
    pub command: Command,
    /// Refuse a put whose entity already exists (a create), checked at apply so two racing
    /// creates cannot both succeed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_only: bool,
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
}

/// A refused command: the code and a message naming the field or entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    /// The field at fault, when there is one (`route.deployments[0].provider`).
    pub field: Option<String>,
    pub message: String,
}

impl Rejection {
    fn new(code: RejectCode, field: Option<&str>, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }

    fn not_found(what: &str, id: &str) -> Rejection {
        Rejection::new(
            RejectCode::NotFound,
            None,
            format!("{what} `{id}` does not exist"),
        )
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(formatter, "{field}: {}", self.message),
            None => formatter.write_str(&self.message),
        }
    }
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied,
    /// A `RecordSpend` whose `(node, seq)` was already applied.
    Duplicate,
    /// A bootstrap into a state that already has config (a no-op, by design).
    AlreadyBootstrapped,
    Rejected(Rejection),
}

/// The whole configuration, as exported and imported (no spend, usage or audit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigExport {
    #[serde(default)]
    pub server: ServerSpec,
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub keys: Vec<VirtualKey>,
    #[serde(default)]
    pub teams: Vec<Team>,
    #[serde(default)]
    pub customers: Vec<Customer>,
    #[serde(default)]
    pub budgets: Vec<Budget>,
    #[serde(default)]
    pub prices: Vec<Price>,
}

/// Everything the Raft group agrees on. The state machine's snapshot is this value serialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    /// The config version: the log index of the last applied entry.
    pub version: u64,
    /// Whether a bootstrap or an import has been applied: from then on the replicated routing
    /// config is the one every node serves.
    pub bootstrapped: bool,
    /// The config version of the last change to providers, routes or server settings: nodes
    /// rebuild their routing only when it moves, not on every applied spend batch.
    #[serde(default)]
    pub routing_version: u64,
    pub server: ServerSpec,
    pub providers: BTreeMap<String, ProviderSpec>,
    pub routes: BTreeMap<String, RouteSpec>,
    pub keys: BTreeMap<String, VirtualKey>,
    /// Secret hash → key id.
    pub key_hashes: BTreeMap<String, String>,
    pub teams: BTreeMap<String, Team>,
    pub customers: BTreeMap<String, Customer>,
    pub budgets: BTreeMap<String, Budget>,
    pub ledgers: BTreeMap<String, BudgetLedger>,
    pub prices: BTreeMap<String, Price>,
    /// Last applied spend sequence per node.
    pub spend_seqs: BTreeMap<u64, u64>,
    /// Usage per key id, then model.
    pub usage: BTreeMap<String, BTreeMap<String, UsageTotals>>,
    /// Usage per key id and UTC day, then model: `(day start ms, totals by model)`, oldest
    /// first, for period queries.
    pub daily_usage: BTreeMap<String, VecDeque<DailyUsage>>,
    pub audit: VecDeque<AuditEntry>,
    /// Who the cluster is: its id, how many voters it keeps, its members' incarnations.
    #[serde(default)]
    pub cluster: ClusterIdentity,
}

/// The identity of a cluster, replicated like the rest of the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    /// Made once, when the cluster first has a leader; empty before.
    #[serde(default)]
    pub id: String,
    /// How many voters the leader keeps (it promotes caught-up learners up to it).
    #[serde(default)]
    pub target_voters: u64,
    /// Node id → the incarnation of the storage it runs with.
    #[serde(default)]
    pub incarnations: BTreeMap<u64, u64>,
}

/// One UTC day of a key's usage: the day's start (ms) and totals by model.
pub type DailyUsage = (u64, BTreeMap<String, UsageTotals>);

/// How many days of per-key daily usage the state keeps.
pub const DAILY_HISTORY: usize = 400;

const DAY_MS: u64 = 86_400_000;

impl ControlState {
    /// The routing part of the state as a config the proxy can load.
    pub fn routing_config(&self) -> SkeinConfig {
        SkeinConfig {
            version: crate::config::CONFIG_VERSION,
            server: self.server.clone(),
            providers: self.providers.values().cloned().collect(),
            routes: self.routes.values().cloned().collect(),
        }
    }

    /// The key a secret hash belongs to.
    pub fn key_by_hash(&self, hash: &str) -> Option<&VirtualKey> {
        self.key_hashes.get(hash).and_then(|id| self.keys.get(id))
    }

    /// The configuration part of the state, for export.
    pub fn export(&self) -> ConfigExport {
        ConfigExport {
            server: self.server.clone(),
            providers: self.providers.values().cloned().collect(),
            routes: self.routes.values().cloned().collect(),
            keys: self.keys.values().cloned().collect(),
            teams: self.teams.values().cloned().collect(),
            customers: self.customers.values().cloned().collect(),
            budgets: self.budgets.values().cloned().collect(),
            prices: self.prices.values().cloned().collect(),
        }
    }

    /// Check a command against the current state without changing it.
    pub fn check(&self, command: &Command) -> Result<(), Rejection> {
        match command {
            Command::Bootstrap { config } => validate_routing(config.clone()),
            Command::PutProvider { provider } => {
                let mut config = self.routing_config();
                config
                    .providers
                    .retain(|existing| existing.name != provider.name);
                config.providers.push(provider.clone());
                validate_routing(config).map_err(|rejection| rename_field(rejection, "provider"))
            }
            Command::DeleteProvider { name } => {
                if !self.providers.contains_key(name) {
                    return Err(Rejection::not_found("provider", name));
                }
                if let Some(route) = self
                    .routes
                    .values()
                    .find(|route| route.deployments.iter().any(|d| &d.provider == name))
                {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("provider `{name}` is used by route `{}`", route.name),
                    ));
                }
                Ok(())
            }
            Command::PutRoute { route } => {
                let mut config = self.routing_config();
                config.routes.retain(|existing| existing.name != route.name);
                config.routes.push(route.clone());
                validate_routing(config).map_err(|rejection| rename_field(rejection, "route"))
            }
            Command::DeleteRoute { name } => {
                if !self.routes.contains_key(name) {
                    return Err(Rejection::not_found("route", name));
                }
                if let Some(route) = self
                    .routes
                    .values()
                    .find(|route| route.fallbacks.iter().any(|fallback| fallback == name))
                {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("route `{name}` is a fallback of route `{}`", route.name),
                    ));
                }
                Ok(())
            }
            Command::CreateKey { key } => {
                self.check_key(key)?;
                if self.keys.contains_key(&key.id) {
                    return Err(Rejection::new(
                        RejectCode::AlreadyExists,
                        Some("key.id"),
                        format!("key `{}` already exists", key.id),
                    ));
                }
                if self.key_hashes.contains_key(&key.hash) {
                    return Err(Rejection::new(
                        RejectCode::AlreadyExists,
                        Some("key.hash"),
                        "a key with this secret already exists",
                    ));
                }
                Ok(())
            }
            Command::UpdateKey { key } => {
                self.check_key(key)?;
                match self.keys.get(&key.id) {
                    None => Err(Rejection::not_found("key", &key.id)),
                    Some(existing) if existing.hash != key.hash => Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        Some("key.hash"),
                        "an update cannot change the secret; rotate the key instead",
                    )),
                    Some(_) => Ok(()),
                }
            }
            Command::RotateKey { id, hash, .. } => {
                if !self.keys.contains_key(id) {
                    return Err(Rejection::not_found("key", id));
                }
                check_hash(hash)?;
                if self.key_hashes.contains_key(hash) {
                    return Err(Rejection::new(
                        RejectCode::AlreadyExists,
                        Some("hash"),
                        "a key with this secret already exists",
                    ));
                }
                Ok(())
            }
            Command::RevokeKey { id } | Command::DeleteKey { id } => {
                if self.keys.contains_key(id) {
                    Ok(())
                } else {
                    Err(Rejection::not_found("key", id))
                }
            }
            Command::PutTeam { team } => {
                check_id("team.id", &team.id)?;
                if let Some(customer) = &team.customer
                    && !self.customers.contains_key(customer)
                {
                    return Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        Some("team.customer"),
                        format!("customer `{customer}` does not exist"),
                    ));
                }
                Ok(())
            }
            Command::DeleteTeam { id } => {
                if !self.teams.contains_key(id) {
                    return Err(Rejection::not_found("team", id));
                }
                if let Some(key) = self
                    .keys
                    .values()
                    .find(|key| key.team.as_deref() == Some(id))
                {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("team `{id}` still has key `{}`", key.id),
                    ));
                }
                Ok(())
            }
            Command::PutCustomer { customer } => check_id("customer.id", &customer.id),
            Command::DeleteCustomer { id } => {
                if !self.customers.contains_key(id) {
                    return Err(Rejection::not_found("customer", id));
                }
                if let Some(team) = self
                    .teams
                    .values()
                    .find(|team| team.customer.as_deref() == Some(id))
                {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("customer `{id}` still has team `{}`", team.id),
                    ));
                }
                Ok(())
            }
            Command::PutBudget { budget } => self.check_budget(budget),
            Command::DeleteBudget { id } => {
                if self.budgets.contains_key(id) {
                    Ok(())
                } else {
                    Err(Rejection::not_found("budget", id))
                }
            }
            Command::PutPrice { price } => {
                if price.model.is_empty() {
                    return Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        Some("price.model"),
                        "must not be empty",
                    ));
                }
                Ok(())
            }
            Command::DeletePrice { model } => {
                if self.prices.contains_key(model) {
                    Ok(())
                } else {
                    Err(Rejection::not_found("price", model))
                }
            }
            Command::RecordSpend { .. }
            | Command::InitCluster { .. }
            | Command::ForgetNode { .. } => Ok(()),
            Command::Import { config } => check_import(config),
            Command::RegisterNode { node, incarnation } => {
                match self.cluster.incarnations.get(node) {
                    Some(known) if known != incarnation => Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!(
                            "node {node} is a member with another incarnation ({known:016x}, \
                             not {incarnation:016x}): its data was lost, or another node has its \
                             id; remove it from the cluster first (`skein cluster remove {node}`)"
                        ),
                    )),
                    _ => Ok(()),
                }
            }
            Command::SetTargetVoters { voters } => {
                if *voters == 0 || voters.is_multiple_of(2) {
                    Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        Some("voters"),
                        format!("must be an odd number, at least 1 (got {voters})"),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    fn check_key(&self, key: &VirtualKey) -> Result<(), Rejection> {
        check_id("key.id", &key.id)?;
        check_hash(&key.hash)?;
        if key.name.is_empty() {
            return Err(Rejection::new(
                RejectCode::InvalidArgument,
                Some("key.name"),
                "must not be empty",
            ));
        }
        if let Some(team) = &key.team
            && !self.teams.contains_key(team)
        {
            return Err(Rejection::new(
                RejectCode::InvalidArgument,
                Some("key.team"),
                format!("team `{team}` does not exist"),
            ));
        }
        Ok(())
    }

    fn check_budget(&self, budget: &Budget) -> Result<(), Rejection> {
        check_id("budget.id", &budget.id)?;
        let exists = match &budget.scope {
            Scope::Key(id) => self.keys.contains_key(id),
            Scope::Team(id) => self.teams.contains_key(id),
            Scope::Customer(id) => self.customers.contains_key(id),
        };
        if !exists {
            return Err(Rejection::new(
                RejectCode::InvalidArgument,
                Some("budget.scope"),
                format!("{:?} does not exist", budget.scope),
            ));
        }
        match &budget.period {
            BudgetPeriod::Rolling { window_ms } if *window_ms < 60_000 => Err(Rejection::new(
                RejectCode::InvalidArgument,
                Some("budget.period.window_ms"),
                "a rolling window must be at least one minute",
            )),
            BudgetPeriod::Calendar { time_zone, .. }
                if jiff::tz::TimeZone::get(time_zone).is_err() =>
            {
                Err(Rejection::new(
                    RejectCode::InvalidArgument,
                    Some("budget.period.time_zone"),
                    format!("`{time_zone}` is not an IANA time zone (like `Europe/Paris`)"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Apply one proposal at log index `version`. Deterministic; never fails.
    pub fn apply(&mut self, version: u64, proposal: &Proposal) -> Outcome {
        self.version = version;
        let command = &proposal.command;
        if let Command::Bootstrap { .. } = command
            && self.bootstrapped
        {
            return Outcome::AlreadyBootstrapped;
        }
        if let Command::RecordSpend { node, seq, .. } = command
            && self.spend_seqs.get(node).is_some_and(|last| seq <= last)
        {
            return Outcome::Duplicate;
        }
        if let Command::InitCluster { .. } = command
            && !self.cluster.id.is_empty()
        {
            return Outcome::AlreadyBootstrapped;
        }
        if let Err(rejection) = self.check(command) {
            return Outcome::Rejected(rejection);
        }
        if proposal.create_only
            && let Some((what, id)) = self.existing_target(command)
        {
            return Outcome::Rejected(Rejection::new(
                RejectCode::AlreadyExists,
                None,
                format!("{what} `{id}` already exists"),
            ));
        }
        let at_ms = proposal.at_ms;
        match command.clone() {
            Command::Bootstrap { config } => {
                // What an operator wrote before the bootstrap landed is kept.
                self.bootstrapped = true;
                self.server = config.server;
                for provider in config.providers {
                    self.providers
                        .entry(provider.name.clone())
                        .or_insert(provider);
                }
                for route in config.routes {
                    self.routes.entry(route.name.clone()).or_insert(route);
                }
            }
            Command::PutProvider { provider } => {
                self.providers.insert(provider.name.clone(), provider);
            }
            Command::DeleteProvider { name } => {
                self.providers.remove(&name);
            }
            Command::PutRoute { route } => {
                self.routes.insert(route.name.clone(), route);
            }
            Command::DeleteRoute { name } => {
                self.routes.remove(&name);
            }
            Command::CreateKey { mut key } => {
                key.created_at_ms = at_ms;
                key.updated_at_ms = at_ms;
                self.key_hashes.insert(key.hash.clone(), key.id.clone());
                self.keys.insert(key.id.clone(), key);
            }
            Command::UpdateKey { mut key } => {
                if let Some(existing) = self.keys.get(&key.id) {
                    key.created_at_ms = existing.created_at_ms;
                    key.prefix = existing.prefix.clone();
                }
                key.updated_at_ms = at_ms;
                self.keys.insert(key.id.clone(), key);
            }
            Command::RotateKey { id, hash, prefix } => {
                if let Some(key) = self.keys.get_mut(&id) {
                    self.key_hashes.remove(&key.hash);
                    key.hash = hash.clone();
                    key.prefix = prefix;
                    key.updated_at_ms = at_ms;
                    self.key_hashes.insert(hash, id);
                }
            }
            Command::RevokeKey { id } => {
                if let Some(key) = self.keys.get_mut(&id) {
                    key.revoked = true;
                    key.updated_at_ms = at_ms;
                }
            }
            Command::DeleteKey { id } => {
                if let Some(key) = self.keys.remove(&id) {
                    self.key_hashes.remove(&key.hash);
                }
                let orphaned: Vec<String> = self
                    .budgets
                    .values()
                    .filter(|budget| budget.scope == Scope::Key(id.clone()))
                    .map(|budget| budget.id.clone())
                    .collect();
                for budget in orphaned {
                    self.budgets.remove(&budget);
                    self.ledgers.remove(&budget);
                }
            }
            Command::PutTeam { team } => {
                self.teams.insert(team.id.clone(), team);
            }
            Command::DeleteTeam { id } => {
                self.teams.remove(&id);
                self.remove_budgets_of(&Scope::Team(id));
            }
            Command::PutCustomer { customer } => {
                self.customers.insert(customer.id.clone(), customer);
            }
            Command::DeleteCustomer { id } => {
                self.customers.remove(&id);
                self.remove_budgets_of(&Scope::Customer(id));
            }
            Command::PutBudget { budget } => {
                let changed_period = self
                    .budgets
                    .get(&budget.id)
                    .is_none_or(|existing| existing.period != budget.period);
                if changed_period {
                    let mut ledger = BudgetLedger::default();
                    if let BudgetPeriod::Calendar { unit, time_zone } = &budget.period {
                        ledger.period_start_ms = period_start(at_ms, *unit, time_zone);
                    }
                    self.ledgers.insert(budget.id.clone(), ledger);
                }
                self.budgets.insert(budget.id.clone(), budget);
            }
            Command::DeleteBudget { id } => {
                self.budgets.remove(&id);
                self.ledgers.remove(&id);
            }
            Command::PutPrice { price } => {
                self.prices.insert(price.model.clone(), price);
            }
            Command::DeletePrice { model } => {
                self.prices.remove(&model);
            }
            Command::RecordSpend { node, seq, items } => {
                self.spend_seqs.insert(node, seq);
                for item in &items {
                    self.record_spend(at_ms, item);
                }
            }
            Command::Import { config } => {
                self.bootstrapped = true;
                self.server = config.server;
                self.providers = by_name(config.providers, |p| p.name.clone());
                self.routes = by_name(config.routes, |r| r.name.clone());
                self.key_hashes = config
                    .keys
                    .iter()
                    .map(|key| (key.hash.clone(), key.id.clone()))
                    .collect();
                self.keys = by_name(config.keys, |k| k.id.clone());
                self.teams = by_name(config.teams, |t| t.id.clone());
                self.customers = by_name(config.customers, |c| c.id.clone());
                self.prices = by_name(config.prices, |p| p.model.clone());
                let budgets = by_name(config.budgets, |b| b.id.clone());
                self.ledgers.retain(|id, _| budgets.contains_key(id));
                for budget in budgets.values() {
                    self.ledgers.entry(budget.id.clone()).or_default();
                }
                self.budgets = budgets;
            }
            Command::InitCluster {
                cluster_id,
                target_voters,
            } => {
                self.cluster.id = cluster_id;
                if self.cluster.target_voters == 0 {
                    self.cluster.target_voters = target_voters.max(1);
                }
            }
            Command::RegisterNode { node, incarnation } => {
                self.cluster.incarnations.insert(node, incarnation);
            }
            Command::ForgetNode { node } => {
                self.cluster.incarnations.remove(&node);
            }
            Command::SetTargetVoters { voters } => {
                self.cluster.target_voters = voters;
            }
        }
        if matches!(
            command,
            Command::Bootstrap { .. }
                | Command::Import { .. }
                | Command::PutProvider { .. }
                | Command::DeleteProvider { .. }
                | Command::PutRoute { .. }
                | Command::DeleteRoute { .. }
        ) {
            self.routing_version = version;
        }
        // Spend and the cluster's own bookkeeping (its id, members' incarnations) are not
        // operators' changes: they stay out of the audit trail and the watch stream.
        if !matches!(
            command,
            Command::RecordSpend { .. }
                | Command::InitCluster { .. }
                | Command::RegisterNode { .. }
                | Command::ForgetNode { .. }
        ) {
            if self.audit.len() >= AUDIT_CAPACITY {
                self.audit.pop_front();
            }
            self.audit.push_back(AuditEntry {
                version,
                at_ms,
                actor: proposal.actor.clone(),
                action: command.action().to_owned(),
                target: command.target(),
            });
        }
        Outcome::Applied
    }

    /// The entity a put command would overwrite, if it exists.
    fn existing_target(&self, command: &Command) -> Option<(&'static str, String)> {
        let (what, id, exists) = match command {
            Command::PutProvider { provider } => (
                "provider",
                &provider.name,
                self.providers.contains_key(&provider.name),
            ),
            Command::PutRoute { route } => {
                ("route", &route.name, self.routes.contains_key(&route.name))
            }
            Command::PutTeam { team } => ("team", &team.id, self.teams.contains_key(&team.id)),
            Command::PutCustomer { customer } => (
                "customer",
                &customer.id,
                self.customers.contains_key(&customer.id),
            ),
            Command::PutBudget { budget } => {
                ("budget", &budget.id, self.budgets.contains_key(&budget.id))
            }
            Command::PutPrice { price } => (
                "price",
                &price.model,
                self.prices.contains_key(&price.model),
            ),
            _ => return None,
        };
        exists.then(|| (what, id.clone()))
    }

    fn remove_budgets_of(&mut self, scope: &Scope) {
        let ids: Vec<String> = self
            .budgets
            .values()
            .filter(|budget| &budget.scope == scope)
            .map(|budget| budget.id.clone())
            .collect();
        for id in ids {
            self.budgets.remove(&id);
            self.ledgers.remove(&id);
        }
    }

    /// Whether a hard budget applies to the key (directly, or through its team or customer).
    pub fn has_hard_budget(&self, key_id: &str) -> bool {
        if self.budgets.is_empty() {
            return false;
        }
        let scopes = self.scopes_of(key_id);
        self.budgets
            .values()
            .any(|budget| budget.hard && scopes.contains(&budget.scope))
    }

    /// The scopes a key's spend counts against: the key, its team, the team's customer.
    pub fn scopes_of(&self, key_id: &str) -> Vec<Scope> {
        let mut scopes = vec![Scope::Key(key_id.to_owned())];
        let team = self
            .keys
            .get(key_id)
            .and_then(|key| key.team.as_ref())
            .and_then(|team| self.teams.get(team));
        if let Some(team) = team {
            scopes.push(Scope::Team(team.id.clone()));
            if let Some(customer) = &team.customer {
                scopes.push(Scope::Customer(customer.clone()));
            }
        }
        scopes
    }

    fn record_spend(&mut self, at_ms: u64, item: &SpendItem) {
        let totals = self
            .usage
            .entry(item.key_id.clone())
            .or_default()
            .entry(item.model.clone())
            .or_default();
        totals.add(item);

        let day = at_ms - at_ms % DAY_MS;
        let series = self.daily_usage.entry(item.key_id.clone()).or_default();
        if series.back().is_none_or(|(start, _)| *start != day) {
            series.push_back((day, BTreeMap::new()));
            if series.len() > DAILY_HISTORY {
                series.pop_front();
            }
        }
        if let Some((_, models)) = series.back_mut() {
            models.entry(item.model.clone()).or_default().add(item);
        }

        let scopes = self.scopes_of(&item.key_id);
        let budget_ids: Vec<String> = self
            .budgets
            .values()
            .filter(|budget| scopes.contains(&budget.scope))
            .map(|budget| budget.id.clone())
            .collect();
        for id in budget_ids {
            let Some(budget) = self.budgets.get(&id) else {
                continue;
            };
            let period = budget.period.clone();
            let ledger = self.ledgers.entry(id).or_default();
            ledger.roll(&period, at_ms);
            match period {
                BudgetPeriod::Rolling { window_ms } => {
                    let width = bucket_width(window_ms);
                    let bucket = at_ms - at_ms % width;
                    match ledger.buckets.back_mut() {
                        Some((start, cost)) if *start == bucket => {
                            *cost = cost.saturating_add(item.cost_nanos);
                        }
                        _ => ledger.buckets.push_back((bucket, item.cost_nanos)),
                    }
                }
                _ => ledger.spent_nanos = ledger.spent_nanos.saturating_add(item.cost_nanos),
            }
        }
    }

    /// Spend of a budget in its period as of `now_ms` (replicated spend only).
    pub fn budget_spent(&self, budget_id: &str, now_ms: u64) -> Nanos {
        let (Some(budget), Some(ledger)) =
            (self.budgets.get(budget_id), self.ledgers.get(budget_id))
        else {
            return 0;
        };
        ledger.spent_at(&budget.period, now_ms)
    }
}

impl BudgetLedger {
    /// Move the ledger to the period that contains `now_ms`.
    fn roll(&mut self, period: &BudgetPeriod, now_ms: u64) {
        match period {
            BudgetPeriod::Calendar { unit, time_zone } => {
                let start = period_start(now_ms, *unit, time_zone);
                if start > self.period_start_ms {
                    self.period_start_ms = start;
                    self.spent_nanos = 0;
                }
            }
            BudgetPeriod::Rolling { window_ms } => {
                let window_ms = *window_ms;
                let horizon = now_ms.saturating_sub(window_ms);
                while self
                    .buckets
                    .front()
                    .is_some_and(|(start, _)| start + bucket_width(window_ms) <= horizon)
                {
                    self.buckets.pop_front();
                }
            }
            BudgetPeriod::Lifetime => {}
        }
    }

    /// Spend in the period that contains `now_ms`.
    pub fn spent_at(&self, period: &BudgetPeriod, now_ms: u64) -> Nanos {
        match period {
            BudgetPeriod::Calendar { unit, time_zone } => {
                if period_start(now_ms, *unit, time_zone) > self.period_start_ms {
                    0
                } else {
                    self.spent_nanos
                }
            }
            BudgetPeriod::Rolling { window_ms } => {
                let horizon = now_ms.saturating_sub(*window_ms);
                let width = bucket_width(*window_ms);
                self.buckets
                    .iter()
                    .filter(|(start, _)| start + width > horizon)
                    .map(|(_, cost)| *cost)
                    .fold(0, Nanos::saturating_add)
            }
            BudgetPeriod::Lifetime => self.spent_nanos,
        }
    }
}

/// Rolling windows are counted in 60 buckets (at least a minute each).
fn bucket_width(window_ms: u64) -> u64 {
    (window_ms / 60).max(60_000)
}

/// The start (ms since the epoch) of the calendar period containing `at_ms`: midnight in
/// `time_zone` of that day, of that week's Monday, or of that month's first day. The time-zone
/// database is built into the binary, so every node of a version computes the same periods.
/// An unknown zone (refused when the budget is written) counts as UTC.
pub fn period_start(at_ms: u64, unit: CalendarUnit, time_zone: &str) -> u64 {
    let zone = jiff::tz::TimeZone::get(time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
    let millis = i64::try_from(at_ms).unwrap_or(i64::MAX);
    let Ok(instant) = jiff::Timestamp::from_millisecond(millis) else {
        return 0;
    };
    let local = instant.to_zoned(zone);
    let start = match unit {
        CalendarUnit::Day => local.start_of_day(),
        CalendarUnit::Week => {
            let back = i64::from(local.weekday().to_monday_zero_offset());
            local
                .start_of_day()
                .and_then(|day| day.checked_sub(jiff::Span::new().days(back)))
                .and_then(|monday| monday.start_of_day())
        }
        CalendarUnit::Month => local
            .first_of_month()
            .and_then(|first| first.start_of_day()),
    };
    start
        .ok()
        .and_then(|start| u64::try_from(start.timestamp().as_millisecond()).ok())
        .unwrap_or(0)
}

fn by_name<T>(items: Vec<T>, name: impl Fn(&T) -> String) -> BTreeMap<String, T> {
    items.into_iter().map(|item| (name(&item), item)).collect()
}

fn validate_routing(config: SkeinConfig) -> Result<(), Rejection> {
    match ValidatedConfig::validate(config) {
        Ok(_) => Ok(()),
        Err(errors) => {
            let first = errors.first();
            Err(Rejection {
                code: RejectCode::InvalidArgument,
                field: first.map(|error| error.path.clone()),
                message: errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        }
    }
}

/// Errors of a single-entity put are reported against `providers[3].…`; name the entity instead.
fn rename_field(mut rejection: Rejection, entity: &str) -> Rejection {
    if let Some(field) = &rejection.field
        && let Some(bracket) = field.find("].")
    {
        rejection.field = Some(format!("{entity}.{}", &field[bracket + 2..]));
    }
    rejection
}

fn check_import(config: &ConfigExport) -> Result<(), Rejection> {
    let mut state = ControlState::default();
    validate_routing(SkeinConfig {
        version: crate::config::CONFIG_VERSION,
        server: config.server.clone(),
        providers: config.providers.clone(),
        routes: config.routes.clone(),
    })?;
    for customer in &config.customers {
        state.check(&Command::PutCustomer {
            customer: customer.clone(),
        })?;
        state
            .customers
            .insert(customer.id.clone(), customer.clone());
    }
    for team in &config.teams {
        state.check(&Command::PutTeam { team: team.clone() })?;
        state.teams.insert(team.id.clone(), team.clone());
    }
    for key in &config.keys {
        state.check(&Command::CreateKey { key: key.clone() })?;
        state.key_hashes.insert(key.hash.clone(), key.id.clone());
        state.keys.insert(key.id.clone(), key.clone());
    }
    for budget in &config.budgets {
        state.check(&Command::PutBudget {
            budget: budget.clone(),
        })?;
    }
    Ok(())
}

fn check_id(field: &str, id: &str) -> Result<(), Rejection> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectCode::InvalidArgument,
            Some(field),
            "must be 1–128 characters of letters, digits, `-`, `_` or `.`",
        ))
    }
}

fn check_hash(hash: &str) -> Result<(), Rejection> {
    if hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectCode::InvalidArgument,
            Some("key.hash"),
            "must be a hex SHA-256",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(command: Command) -> Proposal {
        Proposal {
            actor: "test".to_owned(),
            at_ms: 1_700_000_000_000,
            command,
            create_only: false,
        }
    }

    #[test]
    fn a_create_only_put_refuses_an_existing_entity() {
        let mut state = ControlState::default();
        let team = |name: &str| Command::PutTeam {
            team: Team {
                id: "t".into(),
                name: name.into(),
                customer: None,
                models: vec![],
                limits: Limits::default(),
                metadata: BTreeMap::new(),
            },
        };
        let create = |command| Proposal {
            create_only: true,
            ..proposal(command)
        };
        assert_eq!(state.apply(1, &create(team("first"))), Outcome::Applied);
        assert!(matches!(
            state.apply(2, &create(team("second"))),
            Outcome::Rejected(Rejection {
                code: RejectCode::AlreadyExists,
                ..
            })
        ));
        assert_eq!(state.teams["t"].name, "first");
        assert_eq!(state.apply(3, &proposal(team("third"))), Outcome::Applied);
        assert_eq!(state.teams["t"].name, "third");
    }

    fn key(id: &str, hash_byte: char) -> VirtualKey {
        VirtualKey {
            id: id.to_owned(),
            name: id.to_owned(),
            hash: hash_byte.to_string().repeat(64),
            prefix: "sk-skein-ab".to_owned(),
            owner: None,
            team: None,
            models: Vec::new(),
            limits: Limits::default(),
            expires_at_ms: None,
            revoked: false,
            metadata: BTreeMap::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn keys_are_created_found_by_hash_revoked_and_deleted() {
        let mut state = ControlState::default();
        assert_eq!(
            state.apply(
                1,
                &proposal(Command::CreateKey {
                    key: key("k1", 'a')
                })
            ),
            Outcome::Applied
        );
        let found = state.key_by_hash(&"a".repeat(64)).expect("found");
        assert_eq!(found.created_at_ms, 1_700_000_000_000);
        assert!(matches!(
            state.apply(
                2,
                &proposal(Command::CreateKey {
                    key: key("k1", 'b')
                })
            ),
            Outcome::Rejected(Rejection {
                code: RejectCode::AlreadyExists,
                ..
            })
        ));
        state.apply(3, &proposal(Command::RevokeKey { id: "k1".into() }));
        assert!(!state.keys["k1"].is_active(0));
        state.apply(4, &proposal(Command::DeleteKey { id: "k1".into() }));
        assert!(state.key_by_hash(&"a".repeat(64)).is_none());
        assert_eq!(state.version, 4);
        assert_eq!(state.audit.len(), 3, "the rejected create is not audited");
    }

    #[test]
    fn spend_is_applied_once_per_node_and_sequence() {
        let mut state = ControlState::default();
        state.apply(
            1,
            &proposal(Command::CreateKey {
                key: key("k1", 'a'),
            }),
        );
        state.apply(
            2,
            &proposal(Command::PutBudget {
                budget: Budget {
                    id: "b1".into(),
                    scope: Scope::Key("k1".into()),
                    limit_nanos: 1_000,
                    period: BudgetPeriod::Lifetime,
                    hard: true,
                },
            }),
        );
        let spend = |seq| Command::RecordSpend {
            node: 7,
            seq,
            items: vec![SpendItem {
                key_id: "k1".into(),
                model: "m".into(),
                requests: 1,
                input_tokens: 10,
                output_tokens: 5,
                cost_nanos: 100,
            }],
        };
        let routing_version = state.routing_version;
        assert_eq!(state.apply(3, &proposal(spend(1))), Outcome::Applied);
        assert_eq!(
            state.routing_version, routing_version,
            "spend does not touch routing"
        );
        assert_eq!(state.apply(4, &proposal(spend(1))), Outcome::Duplicate);
        assert_eq!(state.apply(5, &proposal(spend(2))), Outcome::Applied);
        assert_eq!(state.budget_spent("b1", 0), 200);
        assert_eq!(state.usage["k1"]["m"].requests, 2);
    }

    #[test]
    fn calendar_periods_start_at_local_midnight() {
        // 2026-11-22T10:00:00Z is a Sunday.
        let at = 1_795_341_600_000;
        assert_eq!(
            period_start(at, CalendarUnit::Day, "UTC"),
            1_795_305_600_000
        );
        // Monday 2026-11-16T00:00Z.
        assert_eq!(
            period_start(at, CalendarUnit::Week, "UTC"),
            1_795_305_600_000 - 6 * DAY_MS
        );
        // 2026-11-01T00:00Z.
        assert_eq!(
            period_start(at, CalendarUnit::Month, "UTC"),
            1_793_491_200_000
        );
        // In Honolulu (UTC-10) that instant is local midnight, 2026-11-22T00:00-10:00.
        assert_eq!(
            period_start(at, CalendarUnit::Day, "Pacific/Honolulu"),
            1_795_341_600_000
        );
        // Daylight saving: 2026-03-29 in Paris has 23 hours; the day starts at 00:00+01:00,
        // 2026-03-28T23:00Z, and the next at 00:00+02:00, 2026-03-29T22:00Z.
        let noon_paris = 1_774_778_400_000; // 2026-03-29T10:00Z
        assert_eq!(
            period_start(noon_paris, CalendarUnit::Day, "Europe/Paris"),
            1_774_738_800_000
        );
        assert_eq!(
            period_start(
                noon_paris + 13 * 3_600_000,
                CalendarUnit::Day,
                "Europe/Paris"
            ),
            1_774_821_600_000
        );
    }

    #[test]
    fn budgets_read_as_the_readme_writes_them() {
        let budget: Budget = serde_json::from_str(
            r#"{"id": "ci-daily", "scope": {"kind": "key", "id": "k"}, "limit_nanos": 5000000000, "period": {"calendar": {"unit": "day"}}}"#,
        )
        .expect("calendar budget");
        assert_eq!(
            budget.period,
            BudgetPeriod::Calendar {
                unit: CalendarUnit::Day,
                time_zone: "UTC".to_owned()
            }
        );
        assert!(budget.hard);
        let rolling: BudgetPeriod =
            serde_json::from_str(r#"{"rolling": {"window_ms": 3600000}}"#).expect("rolling");
        assert_eq!(
            rolling,
            BudgetPeriod::Rolling {
                window_ms: 3_600_000
            }
        );
    }

    #[test]
    fn rolling_budgets_forget_old_spend() {
        let mut ledger = BudgetLedger::default();
        let period = BudgetPeriod::Rolling {
            window_ms: 3_600_000,
        };
        ledger.buckets.push_back((0, 50));
        ledger.buckets.push_back((1_800_000, 70));
        assert_eq!(ledger.spent_at(&period, 3_000_000), 120);
        assert_eq!(ledger.spent_at(&period, 3_700_000), 70);
        ledger.roll(&period, 3_700_000);
        assert_eq!(ledger.buckets.len(), 1);
    }

    #[test]
    fn a_route_must_name_an_existing_provider() {
        let state = ControlState::default();
        let route: RouteSpec = serde_json::from_value(serde_json::json!({
            "name": "r", "deployments": [{"provider": "nope", "model": "m"}]
        }))
        .expect("route");
        let rejection = state
            .check(&Command::PutRoute { route })
            .expect_err("rejected");
        assert_eq!(rejection.code, RejectCode::InvalidArgument);
        assert_eq!(
            rejection.field.as_deref(),
            Some("route.deployments[0].provider")
        );
    }
}
