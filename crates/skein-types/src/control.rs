//! The replicated control state: everything the Raft group agrees on, and the commands that
//! change it.
//!
//! [`ControlState::apply`] is deterministic: every id and timestamp travels inside the command,
//! so every node that applies the same log reaches the same state. Commands are checked with
//! [`ControlState::check`] before they are proposed; apply runs the same check again (a racing
//! write may have changed the state in between) and turns a failed check into a rejected
//! outcome, never into a storage error.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use imbl::{OrdMap, OrdSet, Vector};

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
    /// The escrow leases on this budget, by node (hard budgets only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<u64, Lease>,
}

/// A node's escrow on one hard budget: money it was granted through Raft and may spend on its
/// own, without asking anyone, until `until_ms`. What is granted and not yet recorded as that
/// node's spend (`granted − used`) is held: no other node can be granted it. So the nodes'
/// spend can never add up to more than the limit, however many there are and whoever is cut
/// off from whom: a node spends only what it holds.
///
/// A lease ends when its node gives it back ([`Command::ReturnLeases`]), or lapses
/// [`LEASE_GRACE_MS`] after `until_ms` by the state's clock if the node stopped renewing it
/// (it died, or is cut off from the leader): its rest is then free again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Everything granted to the node on this budget since the lease began.
    pub granted_nanos: Nanos,
    /// The node's spend recorded against the budget since the lease began.
    pub used_nanos: Nanos,
    /// The node reserves from the lease only before this (its own clock).
    pub until_ms: u64,
}

impl Lease {
    /// What the lease still holds back from the other nodes.
    pub fn outstanding(&self) -> Nanos {
        self.granted_nanos.saturating_sub(self.used_nanos)
    }

    /// Whether the lease has lapsed as of the state's clock `clock_ms`.
    pub fn lapsed(&self, clock_ms: u64) -> bool {
        self.until_ms.saturating_add(LEASE_GRACE_MS) < clock_ms
    }
}

/// How long a grant or renewal lets a node reserve from its lease.
pub const LEASE_TTL_MS: u64 = 30_000;

/// How long after its end a lease that was not given back still holds its rest: the spend a
/// node made under it (calls still streaming, a flush that could not reach the leader) has
/// this long to be recorded. A node cut off for longer may bring back spend that others were
/// granted meanwhile; the README states that bound.
pub const LEASE_GRACE_MS: u64 = 120_000;

/// A node's ask for (more of) a lease on one budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAsk {
    pub budget: String,
    /// The least that helps (the call waiting for it); refused, with the whole command, when
    /// the budget cannot spare it.
    pub need: Nanos,
    /// What the node would like to hold (at least `need`), for its next calls.
    pub want: Nanos,
}

/// A lease given back, keeping what the node still has unrecorded or reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReturn {
    pub budget: String,
    pub keep: Nanos,
    /// The lease's grant as the node saw it when it gave the lease back: a return that
    /// reaches the log after a later grant (it was proposed, timed out, and committed late)
    /// is then ignored, rather than taking back what the node was granted since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Nanos>,
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
    /// Create many keys at once: all of them, or none (at most [`STAGE_PART_MAX`]; more are
    /// staged).
    CreateKeys {
        keys: Vec<VirtualKey>,
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
    /// Grant (or add to, and renew) `node`'s leases on the given hard budgets, all of them or
    /// none: the budgets of a key, its team and its customer move together.
    GrantLeases {
        node: u64,
        asks: Vec<LeaseAsk>,
    },
    /// `node` gives back what it will not spend of its leases.
    ReturnLeases {
        node: u64,
        leases: Vec<LeaseReturn>,
    },
    /// Replace the whole configuration (not spend or usage) atomically.
    Import {
        config: ConfigExport,
    },
    /// One part of a bulk write too large for one log entry: kept aside, invisible, until
    /// [`Command::CommitStage`] applies all the parts at once (or dropped after
    /// [`STAGE_TTL_MS`]). Replicating many small entries keeps each append quick.
    Stage {
        stage: String,
        part: ConfigExport,
    },
    /// Apply a staged bulk write atomically: all of it, or (refused) none of it. `parts`
    /// must be the number of parts staged, so a lost part refuses the commit.
    CommitStage {
        stage: String,
        parts: u64,
        mode: StageMode,
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
            Command::CreateKeys { .. } => "create_keys",
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
            Command::GrantLeases { .. } => "grant_leases",
            Command::ReturnLeases { .. } => "return_leases",
            Command::Import { .. } => "import",
            Command::Stage { .. } => "stage",
            Command::CommitStage {
                mode: StageMode::Import,
                ..
            } => "import",
            Command::CommitStage {
                mode: StageMode::CreateKeys,
                ..
            } => "create_keys",
            Command::InitCluster { .. } => "init_cluster",
            Command::RegisterNode { .. } => "register_node",
            Command::ForgetNode { .. } => "forget_node",
            Command::SetTargetVoters { .. } => "set_target_voters",
        }
    }

    /// What the command changes, for the audit trail.
    pub fn target(&self) -> String {
        match self {
            Command::Bootstrap { .. }
            | Command::Import { .. }
            | Command::CommitStage {
                mode: StageMode::Import,
                ..
            } => "config".to_owned(),
            Command::Stage { stage, .. }
            | Command::CommitStage {
                stage,
                mode: StageMode::CreateKeys,
                ..
            } => format!("stage/{stage}"),
            Command::PutProvider { provider } => format!("provider/{}", provider.name),
            Command::DeleteProvider { name } => format!("provider/{name}"),
            Command::PutRoute { route } => format!("route/{}", route.name),
            Command::DeleteRoute { name } => format!("route/{name}"),
            Command::CreateKey { key } | Command::UpdateKey { key } => format!("key/{}", key.id),
            Command::CreateKeys { keys } => match (keys.first(), keys.len()) {
                (Some(first), 1) => format!("key/{}", first.id),
                (Some(first), count) => format!("key/{} (+{} more)", first.id, count - 1),
                (None, _) => "keys".to_owned(),
            },
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
            Command::GrantLeases { node, .. } | Command::ReturnLeases { node, .. } => {
                format!("node/{node}/leases")
            }
            Command::InitCluster { .. } | Command::SetTargetVoters { .. } => "cluster".to_owned(),
            Command::RegisterNode { node, .. } | Command::ForgetNode { node } => {
                format!("node/{node}")
            }
        }
    }
}

/// What a staged bulk write does when it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageMode {
    /// Create the staged keys (as [`Command::CreateKeys`]).
    CreateKeys,
    /// Replace the configuration with the staged one (as [`Command::Import`]).
    Import,
}

/// A bulk write being staged: when it began and its parts so far, merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Staged {
    pub started_ms: u64,
    pub parts: u64,
    pub config: ConfigExport,
}

/// How long a staged bulk write waits for its commit.
pub const STAGE_TTL_MS: u64 = 10 * 60 * 1000;

/// The most entities one staged part may carry.
pub const STAGE_PART_MAX: usize = 5_000;

/// The most entities a staged bulk write may gather.
pub const STAGE_MAX: usize = 1_000_000;

impl ConfigExport {
    /// How many entities the export holds.
    pub fn len(&self) -> usize {
        self.providers.len()
            + self.routes.len()
            + self.keys.len()
            + self.teams.len()
            + self.customers.len()
            + self.budgets.len()
            + self.prices.len()
    }

    /// Whether it holds no entity.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Split into parts of at most `per_part` entities; the first carries the server settings.
    pub fn split(self, per_part: usize) -> Vec<ConfigExport> {
        let per_part = per_part.max(1);
        let mut parts = vec![ConfigExport {
            server: self.server,
            ..ConfigExport::default()
        }];
        fn spread<T>(
            parts: &mut Vec<ConfigExport>,
            per_part: usize,
            items: Vec<T>,
            field: fn(&mut ConfigExport) -> &mut Vec<T>,
        ) {
            for item in items {
                let full = parts.last().is_none_or(|part| part.len() >= per_part);
                if full {
                    parts.push(ConfigExport::default());
                }
                if let Some(part) = parts.last_mut() {
                    field(part).push(item);
                }
            }
        }
        spread(&mut parts, per_part, self.providers, |p| &mut p.providers);
        spread(&mut parts, per_part, self.routes, |p| &mut p.routes);
        spread(&mut parts, per_part, self.customers, |p| &mut p.customers);
        spread(&mut parts, per_part, self.teams, |p| &mut p.teams);
        spread(&mut parts, per_part, self.keys, |p| &mut p.keys);
        spread(&mut parts, per_part, self.budgets, |p| &mut p.budgets);
        spread(&mut parts, per_part, self.prices, |p| &mut p.prices);
        parts
    }

    fn absorb(&mut self, part: &ConfigExport) {
        self.providers.extend(part.providers.iter().cloned());
        self.routes.extend(part.routes.iter().cloned());
        self.customers.extend(part.customers.iter().cloned());
        self.teams.extend(part.teams.iter().cloned());
        self.keys.extend(part.keys.iter().cloned());
        self.budgets.extend(part.budgets.iter().cloned());
        self.prices.extend(part.prices.iter().cloned());
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

/// A map of the replicated state: a persistent B-tree from `imbl`, so a published snapshot and
/// the next version share every node a change did not touch (a clone is a reference count, a
/// change copies one root-to-leaf path).
pub type StateMap<K, V> = OrdMap<K, V>;

/// Everything the Raft group agrees on, as the snapshot stores it. Read it through
/// [`ControlState`] (which derefs to it): the state keeps indexes over these maps that a
/// change must move with them, so only [`ControlState::apply`] changes them.
///
/// Entities are behind `Arc`s: a changed path of the tree copies pointers, not keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlData {
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
    pub providers: StateMap<String, ProviderSpec>,
    pub routes: StateMap<String, RouteSpec>,
    pub keys: StateMap<String, Arc<VirtualKey>>,
    pub teams: StateMap<String, Arc<Team>>,
    pub customers: StateMap<String, Arc<Customer>>,
    pub budgets: StateMap<String, Arc<Budget>>,
    pub ledgers: StateMap<String, Arc<BudgetLedger>>,
    pub prices: StateMap<String, Price>,
    /// Last applied spend sequence per node.
    pub spend_seqs: BTreeMap<u64, u64>,
    /// The latest proposal time applied (ms since the epoch): the clock leases lapse by.
    #[serde(default)]
    pub clock_ms: u64,
    /// The last [`AUDIT_CAPACITY`] operator changes, oldest first.
    pub audit: Vector<AuditEntry>,
    /// Who the cluster is: its id, how many voters it keeps, its members' incarnations.
    #[serde(default)]
    pub cluster: ClusterIdentity,
    /// Bulk writes being staged, by stage id.
    #[serde(default)]
    pub staged: StateMap<String, Arc<Staged>>,
    /// Usage totals as snapshots before usage history moved out of the state held them: read
    /// once, handed to the history store, never written again.
    #[serde(default, rename = "usage", skip_serializing)]
    legacy_usage: BTreeMap<String, BTreeMap<String, UsageTotals>>,
    #[serde(default, rename = "daily_usage", skip_serializing)]
    legacy_daily_usage: BTreeMap<String, VecDeque<DailyUsage>>,
}

/// Usage that a snapshot of an earlier version carried: lifetime totals by key and model, and
/// per-key daily totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LegacyUsage {
    pub totals: BTreeMap<String, BTreeMap<String, UsageTotals>>,
    pub daily: BTreeMap<String, VecDeque<DailyUsage>>,
}

/// Indexes derived from [`ControlData`], never serialized: rebuilt when a state is loaded and
/// moved by every change, so that no check or lookup scans a whole map.
#[derive(Debug, Clone, Default, PartialEq)]
struct Index {
    /// The SHA-256 of each key's secret (as bytes, not hex) → the key, for authentication.
    key_hashes: OrdMap<[u8; 32], Arc<VirtualKey>>,
    /// Team id → how many keys it has.
    team_keys: OrdMap<String, u64>,
    /// Customer id → how many teams it has.
    customer_teams: OrdMap<String, u64>,
    /// `(scope, budget id)` for every budget.
    scope_budgets: OrdSet<(Scope, String)>,
}

/// A hex SHA-256 as its 32 bytes (`None` when it is not one).
fn hash_bytes(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

/// Count one more (or one fewer) under `id`; a count that reaches zero is removed.
fn count(counts: &mut OrdMap<String, u64>, id: &str, more: bool) {
    if more {
        *counts.entry(id.to_owned()).or_default() += 1;
    } else if let Some(n) = counts.get_mut(id) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(id);
        }
    }
}

impl Index {
    fn build(data: &ControlData) -> Index {
        let mut index = Index::default();
        for key in data.keys.values() {
            if let Some(hash) = hash_bytes(&key.hash) {
                index.key_hashes.insert(hash, key.clone());
            }
            if let Some(team) = &key.team {
                count(&mut index.team_keys, team, true);
            }
        }
        for team in data.teams.values() {
            if let Some(customer) = &team.customer {
                count(&mut index.customer_teams, customer, true);
            }
        }
        for budget in data.budgets.values() {
            index
                .scope_budgets
                .insert((budget.scope.clone(), budget.id.clone()));
        }
        index
    }
}

/// The members of `set` whose first element is `head`, in order of the second.
fn members<'a, H: Ord + Clone>(
    set: &'a OrdSet<(H, String)>,
    head: &'a H,
) -> impl Iterator<Item = &'a String> + 'a {
    set.range((head.clone(), String::new())..)
        .take_while(move |(first, _)| first == head)
        .map(|(_, second)| second)
}

/// Everything the Raft group agrees on: the [`ControlData`] (which it derefs to) and indexes
/// over it. Cloning it is cheap and shares every map; the state machine publishes one clone
/// per applied batch and changes the next.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    data: ControlData,
    index: Index,
}

impl std::ops::Deref for ControlState {
    type Target = ControlData;

    fn deref(&self) -> &ControlData {
        &self.data
    }
}

impl PartialEq for ControlState {
    fn eq(&self, other: &ControlState) -> bool {
        self.data == other.data
    }
}

impl Serialize for ControlState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.data.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ControlState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ControlData::deserialize(deserializer).map(ControlState::from_data)
    }
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

/// How many days of usage history a node keeps unless told otherwise.
pub const DAILY_HISTORY: usize = 400;

/// The most keys one bulk create may carry.
pub const MAX_BULK_KEYS: usize = 100_000;

#[cfg(test)]
const DAY_MS: u64 = 86_400_000;

impl ControlState {
    /// A state over `data`, its indexes built.
    pub fn from_data(data: ControlData) -> ControlState {
        let index = Index::build(&data);
        ControlState { data, index }
    }

    /// The replicated data, without the indexes.
    pub fn into_data(self) -> ControlData {
        self.data
    }

    /// Take the usage an earlier version's snapshot carried (empty for current snapshots).
    pub fn take_legacy_usage(&mut self) -> LegacyUsage {
        LegacyUsage {
            totals: std::mem::take(&mut self.data.legacy_usage),
            daily: std::mem::take(&mut self.data.legacy_daily_usage),
        }
    }

    /// Whether the indexes agree with the data (what a rebuild would make). For tests.
    pub fn indexes_consistent(&self) -> bool {
        self.index == Index::build(&self.data)
    }

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
        hash_bytes(hash)
            .and_then(|bytes| self.index.key_hashes.get(&bytes))
            .map(Arc::as_ref)
    }

    /// Whether a key has this secret hash.
    pub fn hash_taken(&self, hash: &str) -> bool {
        hash_bytes(hash).is_some_and(|bytes| self.index.key_hashes.contains_key(&bytes))
    }

    /// How many keys a team has.
    pub fn keys_in_team(&self, team: &str) -> u64 {
        self.index.team_keys.get(team).copied().unwrap_or(0)
    }

    /// The ids of the budgets on a scope, in order.
    pub fn budgets_on<'a>(&'a self, scope: &'a Scope) -> impl Iterator<Item = &'a String> + 'a {
        members(&self.index.scope_budgets, scope)
    }

    /// The budgets a key's spend counts against: its own, its team's, its customer's.
    pub fn budgets_of_key(&self, key_id: &str) -> Vec<&Budget> {
        let mut found = Vec::new();
        if self.budgets.is_empty() {
            return found;
        }
        for scope in self.scopes_of(key_id) {
            for id in members(&self.index.scope_budgets, &scope) {
                if let Some(budget) = self.budgets.get(id) {
                    found.push(budget.as_ref());
                }
            }
        }
        found
    }

    /// The configuration part of the state, for export.
    pub fn export(&self) -> ConfigExport {
        ConfigExport {
            server: self.server.clone(),
            providers: self.providers.values().cloned().collect(),
            routes: self.routes.values().cloned().collect(),
            keys: self.keys.values().map(|key| key.as_ref().clone()).collect(),
            teams: self
                .teams
                .values()
                .map(|team| team.as_ref().clone())
                .collect(),
            customers: self
                .customers
                .values()
                .map(|customer| customer.as_ref().clone())
                .collect(),
            budgets: self
                .budgets
                .values()
                .map(|budget| budget.as_ref().clone())
                .collect(),
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
                if self.hash_taken(&key.hash) {
                    return Err(Rejection::new(
                        RejectCode::AlreadyExists,
                        Some("key.hash"),
                        "a key with this secret already exists",
                    ));
                }
                Ok(())
            }
            Command::CreateKeys { keys } => self.check_new_keys(keys, STAGE_PART_MAX),
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
                if self.hash_taken(hash) {
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
                let keys = self.keys_in_team(id);
                if keys > 0 {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("team `{id}` still has {keys} key(s)"),
                    ));
                }
                Ok(())
            }
            Command::PutCustomer { customer } => check_id("customer.id", &customer.id),
            Command::DeleteCustomer { id } => {
                if !self.customers.contains_key(id) {
                    return Err(Rejection::not_found("customer", id));
                }
                if let Some(teams) = self.index.customer_teams.get(id) {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("customer `{id}` still has {teams} team(s)"),
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
            | Command::ReturnLeases { .. }
            | Command::InitCluster { .. }
            | Command::ForgetNode { .. } => Ok(()),
            Command::GrantLeases { node, asks } => self.check_grant(*node, asks),
            Command::Import { config } => check_import(config),
            Command::Stage { stage, part } => {
                check_id("stage", stage)?;
                if part.len() > STAGE_PART_MAX {
                    return Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        Some("part"),
                        format!("at most {STAGE_PART_MAX} entities per part"),
                    ));
                }
                let gathered = self
                    .staged
                    .get(stage)
                    .map_or(0, |staged| staged.config.len());
                if gathered + part.len() > STAGE_MAX {
                    return Err(Rejection::new(
                        RejectCode::InvalidArgument,
                        None,
                        format!("a bulk write holds at most {STAGE_MAX} entities"),
                    ));
                }
                Ok(())
            }
            Command::CommitStage { stage, parts, mode } => {
                let Some(staged) = self.staged.get(stage) else {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!("bulk write `{stage}` is not staged (or expired)"),
                    ));
                };
                if staged.parts != *parts {
                    return Err(Rejection::new(
                        RejectCode::FailedPrecondition,
                        None,
                        format!(
                            "bulk write `{stage}` has {} parts staged, not {parts}",
                            staged.parts
                        ),
                    ));
                }
                match mode {
                    StageMode::Import => check_import(&staged.config),
                    StageMode::CreateKeys => {
                        self.check_new_keys(&staged.config.keys, MAX_BULK_KEYS)
                    }
                }
            }
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

    /// Check a bulk create: every key valid and new, no id or secret twice in the batch.
    fn check_new_keys(&self, keys: &[VirtualKey], most: usize) -> Result<(), Rejection> {
        if keys.is_empty() || keys.len() > most {
            return Err(Rejection::new(
                RejectCode::InvalidArgument,
                Some("keys"),
                format!("must hold 1 to {most} keys (got {})", keys.len()),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut hashes = BTreeSet::new();
        for (position, key) in keys.iter().enumerate() {
            let at = |rejection: Rejection| Rejection {
                field: rejection
                    .field
                    .map(|field| field.replacen("key.", &format!("keys[{position}]."), 1)),
                ..rejection
            };
            self.check(&Command::CreateKey { key: key.clone() })
                .map_err(at)?;
            if !ids.insert(key.id.as_str()) {
                return Err(at(Rejection::new(
                    RejectCode::AlreadyExists,
                    Some("key.id"),
                    format!("key `{}` is in the batch twice", key.id),
                )));
            }
            if !hashes.insert(key.hash.as_str()) {
                return Err(at(Rejection::new(
                    RejectCode::AlreadyExists,
                    Some("key.hash"),
                    "a secret is in the batch twice",
                )));
            }
        }
        Ok(())
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

    /// Move to log index `version` for an entry that changes nothing (blank, membership).
    pub fn advance(&mut self, version: u64) -> Outcome {
        self.data.version = version;
        Outcome::Applied
    }

    /// Apply one proposal at log index `version`. Deterministic; never fails.
    pub fn apply(&mut self, version: u64, proposal: &Proposal) -> Outcome {
        self.data.version = version;
        // Leases lapse by this clock: it never goes back, whoever proposes.
        self.data.clock_ms = self.data.clock_ms.max(proposal.at_ms);
        let command = &proposal.command;
        if !self.staged.is_empty() {
            let expired: Vec<String> = self
                .staged
                .iter()
                .filter(|(_, staged)| {
                    staged.started_ms.saturating_add(STAGE_TTL_MS) < proposal.at_ms
                })
                .map(|(stage, _)| stage.clone())
                .collect();
            for stage in expired {
                self.data.staged.remove(&stage);
            }
        }
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
        match command {
            Command::Bootstrap { config } => {
                // What an operator wrote before the bootstrap landed is kept.
                self.data.bootstrapped = true;
                self.data.server = config.server.clone();
                for provider in &config.providers {
                    if !self.providers.contains_key(&provider.name) {
                        self.data
                            .providers
                            .insert(provider.name.clone(), provider.clone());
                    }
                }
                for route in &config.routes {
                    if !self.routes.contains_key(&route.name) {
                        self.data.routes.insert(route.name.clone(), route.clone());
                    }
                }
            }
            Command::PutProvider { provider } => {
                self.data
                    .providers
                    .insert(provider.name.clone(), provider.clone());
            }
            Command::DeleteProvider { name } => {
                self.data.providers.remove(name);
            }
            Command::PutRoute { route } => {
                self.data.routes.insert(route.name.clone(), route.clone());
            }
            Command::DeleteRoute { name } => {
                self.data.routes.remove(name);
            }
            Command::CreateKey { key } => self.create_key(key, at_ms),
            Command::CreateKeys { keys } => {
                for key in keys {
                    self.create_key(key, at_ms);
                }
            }
            Command::UpdateKey { key } => {
                let mut key = key.clone();
                if let Some(existing) = self.keys.get(&key.id) {
                    key.created_at_ms = existing.created_at_ms;
                    key.prefix = existing.prefix.clone();
                }
                key.updated_at_ms = at_ms;
                self.put_key(key);
            }
            Command::RotateKey { id, hash, prefix } => {
                if let Some(existing) = self.keys.get(id) {
                    let mut key = existing.as_ref().clone();
                    key.hash = hash.clone();
                    key.prefix = prefix.clone();
                    key.updated_at_ms = at_ms;
                    self.put_key(key);
                }
            }
            Command::RevokeKey { id } => {
                if let Some(existing) = self.keys.get(id) {
                    let mut key = existing.as_ref().clone();
                    key.revoked = true;
                    key.updated_at_ms = at_ms;
                    self.put_key(key);
                }
            }
            Command::DeleteKey { id } => {
                if let Some(key) = self.data.keys.remove(id) {
                    self.unindex_key(&key);
                }
                self.remove_budgets_of(&Scope::Key(id.clone()));
            }
            Command::PutTeam { team } => self.put_team(team.clone()),
            Command::DeleteTeam { id } => {
                if let Some(team) = self.data.teams.remove(id)
                    && let Some(customer) = &team.customer
                {
                    count(&mut self.index.customer_teams, customer, false);
                }
                self.remove_budgets_of(&Scope::Team(id.clone()));
            }
            Command::PutCustomer { customer } => {
                self.data
                    .customers
                    .insert(customer.id.clone(), Arc::new(customer.clone()));
            }
            Command::DeleteCustomer { id } => {
                self.data.customers.remove(id);
                self.remove_budgets_of(&Scope::Customer(id.clone()));
            }
            Command::PutBudget { budget } => {
                let existing = self.budgets.get(&budget.id).cloned();
                if existing
                    .as_ref()
                    .is_none_or(|existing| existing.period != budget.period)
                {
                    let mut ledger = BudgetLedger::default();
                    if let BudgetPeriod::Calendar { unit, time_zone } = &budget.period {
                        ledger.period_start_ms = period_start(at_ms, *unit, time_zone);
                    }
                    self.data
                        .ledgers
                        .insert(budget.id.clone(), Arc::new(ledger));
                }
                if let Some(existing) = existing {
                    self.index
                        .scope_budgets
                        .remove(&(existing.scope.clone(), existing.id.clone()));
                }
                self.index
                    .scope_budgets
                    .insert((budget.scope.clone(), budget.id.clone()));
                self.data
                    .budgets
                    .insert(budget.id.clone(), Arc::new(budget.clone()));
            }
            Command::DeleteBudget { id } => self.remove_budget(id),
            Command::PutPrice { price } => {
                self.data.prices.insert(price.model.clone(), price.clone());
            }
            Command::DeletePrice { model } => {
                self.data.prices.remove(model);
            }
            Command::RecordSpend { node, seq, items } => {
                self.data.spend_seqs.insert(*node, *seq);
                for item in items {
                    self.record_spend(at_ms, *node, item);
                }
            }
            Command::GrantLeases { node, asks } => self.grant_leases(*node, asks),
            Command::ReturnLeases { node, leases } => {
                for returned in leases {
                    let Some(ledger) = self.data.ledgers.get_mut(&returned.budget) else {
                        continue;
                    };
                    if !ledger.leases.contains_key(node) {
                        continue;
                    }
                    if returned.granted.is_some_and(|seen| {
                        ledger
                            .leases
                            .get(node)
                            .is_some_and(|lease| lease.granted_nanos != seen)
                    }) {
                        continue;
                    }
                    let ledger = Arc::make_mut(ledger);
                    if let Some(lease) = ledger.leases.get_mut(node) {
                        lease.granted_nanos = lease
                            .granted_nanos
                            .min(lease.used_nanos.saturating_add(returned.keep));
                        if returned.keep == 0 {
                            ledger.leases.remove(node);
                        }
                    }
                }
            }
            Command::Import { config } => self.import(config),
            Command::Stage { stage, part } => {
                let staged =
                    Arc::make_mut(self.data.staged.entry(stage.clone()).or_insert_with(|| {
                        Arc::new(Staged {
                            started_ms: at_ms,
                            parts: 0,
                            config: ConfigExport {
                                server: part.server.clone(),
                                ..ConfigExport::default()
                            },
                        })
                    }));
                staged.parts += 1;
                staged.config.absorb(part);
            }
            Command::CommitStage { stage, mode, .. } => {
                if let Some(staged) = self.data.staged.remove(stage) {
                    match mode {
                        StageMode::Import => self.import(&staged.config),
                        StageMode::CreateKeys => {
                            for key in &staged.config.keys {
                                self.create_key(key, at_ms);
                            }
                        }
                    }
                }
            }
            Command::InitCluster {
                cluster_id,
                target_voters,
            } => {
                self.data.cluster.id = cluster_id.clone();
                if self.cluster.target_voters == 0 {
                    self.data.cluster.target_voters = (*target_voters).max(1);
                }
            }
            Command::RegisterNode { node, incarnation } => {
                self.data.cluster.incarnations.insert(*node, *incarnation);
            }
            Command::ForgetNode { node } => {
                self.data.cluster.incarnations.remove(node);
                // A node removed from the group spends nothing more: its leases go.
                let held: Vec<String> = self
                    .ledgers
                    .iter()
                    .filter(|(_, ledger)| ledger.leases.contains_key(node))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in held {
                    if let Some(ledger) = self.data.ledgers.get_mut(&id) {
                        Arc::make_mut(ledger).leases.remove(node);
                    }
                }
            }
            Command::SetTargetVoters { voters } => {
                self.data.cluster.target_voters = *voters;
            }
        }
        if matches!(
            command,
            Command::Bootstrap { .. }
                | Command::Import { .. }
                | Command::CommitStage {
                    mode: StageMode::Import,
                    ..
                }
                | Command::PutProvider { .. }
                | Command::DeleteProvider { .. }
                | Command::PutRoute { .. }
                | Command::DeleteRoute { .. }
        ) {
            self.data.routing_version = version;
        }
        // Spend and the cluster's own bookkeeping (its id, members' incarnations) are not
        // operators' changes: they stay out of the audit trail and the watch stream.
        if !matches!(
            command,
            Command::RecordSpend { .. }
                | Command::GrantLeases { .. }
                | Command::ReturnLeases { .. }
                | Command::Stage { .. }
                | Command::InitCluster { .. }
                | Command::RegisterNode { .. }
                | Command::ForgetNode { .. }
        ) {
            if self.audit.len() >= AUDIT_CAPACITY {
                self.data.audit.pop_front();
            }
            self.data.audit.push_back(AuditEntry {
                version,
                at_ms,
                actor: proposal.actor.clone(),
                action: command.action().to_owned(),
                target: command.target(),
            });
        }
        Outcome::Applied
    }

    fn create_key(&mut self, key: &VirtualKey, at_ms: u64) {
        let mut key = key.clone();
        key.created_at_ms = at_ms;
        key.updated_at_ms = at_ms;
        self.put_key(key);
    }

    /// Store a key, moving the indexes with it (the hash index points at the new version).
    fn put_key(&mut self, key: VirtualKey) {
        let key = Arc::new(key);
        if let Some(old) = self.data.keys.insert(key.id.clone(), key.clone()) {
            self.unindex_key(&old);
        }
        if let Some(hash) = hash_bytes(&key.hash) {
            self.index.key_hashes.insert(hash, key.clone());
        }
        if let Some(team) = &key.team {
            count(&mut self.index.team_keys, team, true);
        }
    }

    /// Take a key that was replaced or removed out of the indexes.
    fn unindex_key(&mut self, old: &VirtualKey) {
        if let Some(hash) = hash_bytes(&old.hash)
            && self
                .index
                .key_hashes
                .get(&hash)
                .is_some_and(|indexed| indexed.id == old.id)
        {
            self.index.key_hashes.remove(&hash);
        }
        if let Some(team) = &old.team {
            count(&mut self.index.team_keys, team, false);
        }
    }

    fn put_team(&mut self, team: Team) {
        let team = Arc::new(team);
        if let Some(old) = self.data.teams.insert(team.id.clone(), team.clone())
            && let Some(customer) = &old.customer
        {
            count(&mut self.index.customer_teams, customer, false);
        }
        if let Some(customer) = &team.customer {
            count(&mut self.index.customer_teams, customer, true);
        }
    }

    fn remove_budget(&mut self, id: &str) {
        if let Some(budget) = self.data.budgets.remove(id) {
            self.index
                .scope_budgets
                .remove(&(budget.scope.clone(), budget.id.clone()));
        }
        self.data.ledgers.remove(id);
    }

    fn remove_budgets_of(&mut self, scope: &Scope) {
        let ids: Vec<String> = self.budgets_on(scope).cloned().collect();
        for id in ids {
            self.remove_budget(&id);
        }
    }

    /// Replace the configuration (not spend, usage or the audit trail) with `config`.
    fn import(&mut self, config: &ConfigExport) {
        let data = &mut self.data;
        data.bootstrapped = true;
        data.server = config.server.clone();
        data.providers = by_name(&config.providers, |p| p.name.clone());
        data.routes = by_name(&config.routes, |r| r.name.clone());
        data.keys = by_name(&config.keys, |k| k.id.clone())
            .into_iter()
            .map(|(id, key)| (id, Arc::new(key)))
            .collect();
        data.teams = by_name(&config.teams, |t| t.id.clone())
            .into_iter()
            .map(|(id, team)| (id, Arc::new(team)))
            .collect();
        data.customers = by_name(&config.customers, |c| c.id.clone())
            .into_iter()
            .map(|(id, customer)| (id, Arc::new(customer)))
            .collect();
        data.prices = by_name(&config.prices, |p| p.model.clone());
        let budgets: StateMap<String, Arc<Budget>> = by_name(&config.budgets, |b| b.id.clone())
            .into_iter()
            .map(|(id, budget)| (id, Arc::new(budget)))
            .collect();
        let ledgers: StateMap<String, Arc<BudgetLedger>> = budgets
            .keys()
            .map(|id| {
                let ledger = data.ledgers.get(id).cloned().unwrap_or_default();
                (id.clone(), ledger)
            })
            .collect();
        data.ledgers = ledgers;
        data.budgets = budgets;
        self.index = Index::build(&self.data);
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

    /// Whether a hard budget applies to the key (directly, or through its team or customer).
    pub fn has_hard_budget(&self, key_id: &str) -> bool {
        self.budgets_of_key(key_id).iter().any(|budget| budget.hard)
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

    /// Count settled spend against the key's budgets (usage history is kept outside the
    /// state, by the node's history store).
    fn record_spend(&mut self, at_ms: u64, node: u64, item: &SpendItem) {
        let budgets: Vec<(String, BudgetPeriod)> = self
            .budgets_of_key(&item.key_id)
            .into_iter()
            .map(|budget| (budget.id.clone(), budget.period.clone()))
            .collect();
        for (id, period) in budgets {
            let ledger = Arc::make_mut(self.data.ledgers.entry(id).or_default());
            ledger.roll(&period, at_ms);
            if let Some(lease) = ledger.leases.get_mut(&node) {
                lease.used_nanos = lease.used_nanos.saturating_add(item.cost_nanos);
            }
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

    /// `node`'s lease on `budget_id`, if it holds one.
    pub fn lease(&self, budget_id: &str, node: u64) -> Option<&Lease> {
        self.ledgers.get(budget_id)?.leases.get(&node)
    }

    /// What `node` could still be granted on `budget_id` as of the state's clock: the limit,
    /// less the spend recorded, less what every lease (its own too) holds. Also what the other
    /// nodes' leases hold.
    pub fn lease_room(&self, budget_id: &str, node: u64) -> LeaseRoom {
        let Some(budget) = self.budgets.get(budget_id) else {
            return LeaseRoom::default();
        };
        let clock = self.clock_ms;
        let spent = self.budget_spent(budget_id, clock);
        let (mut own, mut others) = (0, 0);
        if let Some(ledger) = self.ledgers.get(budget_id) {
            for (holder, lease) in &ledger.leases {
                if lease.lapsed(clock) {
                    continue;
                }
                if *holder == node {
                    own = lease.outstanding();
                } else {
                    others = Nanos::saturating_add(others, lease.outstanding());
                }
            }
        }
        LeaseRoom {
            free: budget
                .limit_nanos
                .saturating_sub(spent)
                .saturating_sub(others)
                .saturating_sub(own),
            held_elsewhere: others,
        }
    }

    fn check_grant(&self, node: u64, asks: &[LeaseAsk]) -> Result<(), Rejection> {
        for ask in asks {
            let Some(budget) = self.budgets.get(&ask.budget) else {
                return Err(Rejection::not_found("budget", &ask.budget));
            };
            if !budget.hard {
                return Err(Rejection::new(
                    RejectCode::InvalidArgument,
                    Some("budget"),
                    format!("budget `{}` is soft: it has no leases", ask.budget),
                ));
            }
            let room = self.lease_room(&ask.budget, node);
            if room.free < ask.need {
                // The field says why: the budget is spent, or what is left is leased to others.
                let (field, why) = if room.free.saturating_add(room.held_elsewhere) < ask.need {
                    ("exhausted", "is exhausted")
                } else {
                    ("leased", "is held in other nodes' leases")
                };
                return Err(Rejection::new(
                    RejectCode::FailedPrecondition,
                    Some(field),
                    format!(
                        "budget `{}` cannot spare {} n$: what is left {why} ({} n$ free, {} n$ \
                         leased to other nodes)",
                        ask.budget, ask.need, room.free, room.held_elsewhere
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Grant each ask (checked): at least its need, at most its want, and never more than half
    /// of what is free beyond the need, so one busy node cannot strand the rest of a budget.
    fn grant_leases(&mut self, node: u64, asks: &[LeaseAsk]) {
        let clock = self.clock_ms;
        for ask in asks {
            let room = self.lease_room(&ask.budget, node);
            let give = ask
                .want
                .max(ask.need)
                .min(ask.need.max(room.free / 2))
                .min(room.free);
            let period = match self.budgets.get(&ask.budget) {
                Some(budget) => budget.period.clone(),
                None => continue,
            };
            let ledger = Arc::make_mut(self.data.ledgers.entry(ask.budget.clone()).or_default());
            ledger.roll(&period, clock);
            ledger.leases.retain(|_, lease| !lease.lapsed(clock));
            let lease = ledger.leases.entry(node).or_default();
            lease.granted_nanos = lease.granted_nanos.saturating_add(give);
            lease.until_ms = clock.saturating_add(LEASE_TTL_MS);
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

/// What a node could be granted on a budget, and what other nodes' leases hold of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseRoom {
    pub free: Nanos,
    pub held_elsewhere: Nanos,
}

/// The snapshot file format this version writes and reads.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The first line of a snapshot file: everything that is not a map entry.
#[derive(Serialize)]
struct HeaderRef<'a> {
    format: u32,
    version: u64,
    bootstrapped: bool,
    routing_version: u64,
    server: &'a ServerSpec,
    spend_seqs: &'a BTreeMap<u64, u64>,
    clock_ms: u64,
    cluster: &'a ClusterIdentity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: u32,
    version: u64,
    bootstrapped: bool,
    routing_version: u64,
    server: ServerSpec,
    spend_seqs: BTreeMap<u64, u64>,
    #[serde(default)]
    clock_ms: u64,
    cluster: ClusterIdentity,
}

/// One line of a snapshot file, as written (borrowing from the state).
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum LineRef<'a> {
    Header(HeaderRef<'a>),
    Provider(&'a ProviderSpec),
    Route(&'a RouteSpec),
    Key(&'a VirtualKey),
    Team(&'a Team),
    Customer(&'a Customer),
    Budget(&'a Budget),
    Ledger(&'a str, &'a BudgetLedger),
    Price(&'a Price),
    Audit(&'a AuditEntry),
    Staged(&'a str, &'a Staged),
}

/// One line of a snapshot file, as read.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header(Header),
    Provider(ProviderSpec),
    Route(RouteSpec),
    Key(VirtualKey),
    Team(Team),
    Customer(Customer),
    Budget(Budget),
    Ledger(String, BudgetLedger),
    Price(Price),
    Audit(AuditEntry),
    Staged(String, Staged),
}

impl ControlState {
    /// Write the state as a snapshot file: a header line, then one JSON line per entity, so
    /// that writing and reading it stream (neither side holds the serialized state whole).
    /// Indexes, secret hashes → ids included, are derived on reading.
    pub fn write_snapshot(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let data = &self.data;
        let mut line = |entry: LineRef<'_>| -> std::io::Result<()> {
            serde_json::to_writer(&mut *out, &entry)?;
            out.write_all(b"\n")
        };
        line(LineRef::Header(HeaderRef {
            format: SNAPSHOT_FORMAT,
            version: data.version,
            bootstrapped: data.bootstrapped,
            routing_version: data.routing_version,
            server: &data.server,
            spend_seqs: &data.spend_seqs,
            clock_ms: data.clock_ms,
            cluster: &data.cluster,
        }))?;
        for provider in data.providers.values() {
            line(LineRef::Provider(provider))?;
        }
        for route in data.routes.values() {
            line(LineRef::Route(route))?;
        }
        for customer in data.customers.values() {
            line(LineRef::Customer(customer))?;
        }
        for team in data.teams.values() {
            line(LineRef::Team(team))?;
        }
        for key in data.keys.values() {
            line(LineRef::Key(key))?;
        }
        for budget in data.budgets.values() {
            line(LineRef::Budget(budget))?;
        }
        for (id, ledger) in &data.ledgers {
            line(LineRef::Ledger(id, ledger))?;
        }
        for price in data.prices.values() {
            line(LineRef::Price(price))?;
        }
        for entry in &data.audit {
            line(LineRef::Audit(entry))?;
        }
        for (stage, staged) in &data.staged {
            line(LineRef::Staged(stage, staged))?;
        }
        Ok(())
    }

    /// Read a snapshot file written by [`ControlState::write_snapshot`], line by line.
    pub fn read_snapshot(input: &mut impl std::io::BufRead) -> std::io::Result<ControlState> {
        let invalid = |number: usize, message: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("snapshot line {number}: {message}"),
            )
        };
        let mut data = ControlData::default();
        let mut text = String::new();
        let mut number = 0;
        loop {
            text.clear();
            if input.read_line(&mut text)? == 0 {
                break;
            }
            number += 1;
            if text.trim().is_empty() {
                continue;
            }
            let line: Line =
                serde_json::from_str(&text).map_err(|error| invalid(number, error.to_string()))?;
            match line {
                Line::Header(header) if number == 1 => {
                    if header.format != SNAPSHOT_FORMAT {
                        return Err(invalid(
                            number,
                            format!(
                                "format {} (this version reads {SNAPSHOT_FORMAT})",
                                header.format
                            ),
                        ));
                    }
                    data.version = header.version;
                    data.bootstrapped = header.bootstrapped;
                    data.routing_version = header.routing_version;
                    data.server = header.server;
                    data.spend_seqs = header.spend_seqs;
                    data.clock_ms = header.clock_ms;
                    data.cluster = header.cluster;
                }
                _ if number == 1 => {
                    return Err(invalid(number, "the first line is not the header".into()));
                }
                Line::Header(_) => return Err(invalid(number, "a second header".into())),
                Line::Provider(provider) => {
                    data.providers.insert(provider.name.clone(), provider);
                }
                Line::Route(route) => {
                    data.routes.insert(route.name.clone(), route);
                }
                Line::Key(key) => {
                    data.keys.insert(key.id.clone(), Arc::new(key));
                }
                Line::Team(team) => {
                    data.teams.insert(team.id.clone(), Arc::new(team));
                }
                Line::Customer(customer) => {
                    data.customers
                        .insert(customer.id.clone(), Arc::new(customer));
                }
                Line::Budget(budget) => {
                    data.budgets.insert(budget.id.clone(), Arc::new(budget));
                }
                Line::Ledger(id, ledger) => {
                    data.ledgers.insert(id, Arc::new(ledger));
                }
                Line::Price(price) => {
                    data.prices.insert(price.model.clone(), price);
                }
                Line::Audit(entry) => data.audit.push_back(entry),
                Line::Staged(stage, staged) => {
                    data.staged.insert(stage, Arc::new(staged));
                }
            }
        }
        if number == 0 {
            return Err(invalid(0, "the snapshot is empty".into()));
        }
        Ok(ControlState::from_data(data))
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

fn by_name<T: Clone>(items: &[T], name: impl Fn(&T) -> String) -> StateMap<String, T> {
    items
        .iter()
        .map(|item| (name(item), item.clone()))
        .collect()
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
            .data
            .customers
            .insert(customer.id.clone(), Arc::new(customer.clone()));
    }
    for team in &config.teams {
        state.check(&Command::PutTeam { team: team.clone() })?;
        state.put_team(team.clone());
    }
    for key in &config.keys {
        state.check(&Command::CreateKey { key: key.clone() })?;
        state.create_key(key, 0);
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
    fn a_grant_moves_the_key_team_and_customer_budgets_together_or_not_at_all() {
        let mut state = ControlState::default();
        let budget = |id: &str, scope: Scope, limit_nanos: Nanos| Command::PutBudget {
            budget: Budget {
                id: id.to_owned(),
                scope,
                limit_nanos,
                period: BudgetPeriod::Lifetime,
                hard: true,
            },
        };
        let commands = vec![
            Command::PutCustomer {
                customer: Customer {
                    id: "c".into(),
                    name: "c".into(),
                    limits: Limits::default(),
                    metadata: BTreeMap::new(),
                },
            },
            Command::PutTeam {
                team: Team {
                    id: "t".into(),
                    name: "t".into(),
                    customer: Some("c".into()),
                    models: vec![],
                    limits: Limits::default(),
                    metadata: BTreeMap::new(),
                },
            },
            Command::CreateKey {
                key: VirtualKey {
                    team: Some("t".into()),
                    ..key("k", 'a')
                },
            },
            budget("kb", Scope::Key("k".into()), 1_000),
            budget("tb", Scope::Team("t".into()), 100),
            budget("cb", Scope::Customer("c".into()), 10_000),
        ];
        for (index, command) in commands.into_iter().enumerate() {
            assert_eq!(
                state.apply(index as u64 + 1, &proposal(command)),
                Outcome::Applied
            );
        }
        let ask = |need: Nanos| Command::GrantLeases {
            node: 1,
            asks: ["kb", "tb", "cb"]
                .iter()
                .map(|budget| LeaseAsk {
                    budget: (*budget).to_owned(),
                    need,
                    want: need,
                })
                .collect(),
        };
        // The team's budget cannot spare 200: nothing is granted, on any level.
        let Outcome::Rejected(rejection) = state.apply(10, &proposal(ask(200))) else {
            panic!("granted past the team's budget");
        };
        assert_eq!(rejection.field.as_deref(), Some("exhausted"));
        for budget in ["kb", "tb", "cb"] {
            assert!(state.lease(budget, 1).is_none(), "{budget} moved alone");
        }
        // 50 fits every level: all three leases move in the one command.
        assert_eq!(state.apply(11, &proposal(ask(50))), Outcome::Applied);
        for budget in ["kb", "tb", "cb"] {
            assert_eq!(
                state.lease(budget, 1).map(|lease| lease.granted_nanos),
                Some(50),
                "{budget}"
            );
        }
        // Spend recorded once counts against every level's lease and ledger.
        state.apply(
            12,
            &proposal(Command::RecordSpend {
                node: 1,
                seq: 1,
                items: vec![SpendItem {
                    key_id: "k".into(),
                    model: "m".into(),
                    requests: 1,
                    input_tokens: 1,
                    output_tokens: 1,
                    cost_nanos: 30,
                }],
            }),
        );
        for budget in ["kb", "tb", "cb"] {
            assert_eq!(state.budget_spent(budget, 1_700_000_000_000), 30);
            assert_eq!(state.lease(budget, 1).map(Lease::outstanding), Some(20));
        }
        // A return proposed before a later grant, committed after it, takes nothing back.
        let give_back = |granted| Command::ReturnLeases {
            node: 1,
            leases: vec![LeaseReturn {
                budget: "kb".into(),
                keep: 0,
                granted: Some(granted),
            }],
        };
        assert_eq!(state.apply(13, &proposal(ask(50))), Outcome::Applied);
        assert_eq!(state.apply(14, &proposal(give_back(50))), Outcome::Applied);
        assert_eq!(
            state.lease("kb", 1).map(|lease| lease.granted_nanos),
            Some(100)
        );
        // One that saw the grant as it is returns it.
        assert_eq!(state.apply(15, &proposal(give_back(100))), Outcome::Applied);
        assert!(state.lease("kb", 1).is_none());
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

    #[test]
    fn a_bulk_create_writes_every_key_or_none() {
        let mut state = ControlState::default();
        state.apply(
            1,
            &proposal(Command::CreateKey {
                key: key("k0", 'a'),
            }),
        );
        let clash = Command::CreateKeys {
            keys: vec![key("k1", 'b'), key("k0", 'c')],
        };
        let Outcome::Rejected(rejection) = state.apply(2, &proposal(clash)) else {
            panic!("an existing id refuses the batch");
        };
        assert_eq!(rejection.field.as_deref(), Some("keys[1].id"));
        assert!(!state.keys.contains_key("k1"), "nothing of it was written");
        let twice = Command::CreateKeys {
            keys: vec![key("k1", 'b'), key("k2", 'b')],
        };
        let Outcome::Rejected(rejection) = state.apply(3, &proposal(twice)) else {
            panic!("a secret twice refuses the batch");
        };
        assert_eq!(rejection.field.as_deref(), Some("keys[1].hash"));
        let keys: Vec<VirtualKey> = (1..=500)
            .map(|n| VirtualKey {
                hash: format!("{n:064x}"),
                ..key(&format!("bulk-{n}"), 'a')
            })
            .collect();
        assert_eq!(
            state.apply(4, &proposal(Command::CreateKeys { keys })),
            Outcome::Applied
        );
        assert_eq!(state.keys.len(), 501);
        assert_eq!(
            state
                .key_by_hash(&format!("{:064x}", 250))
                .map(|k| k.id.as_str()),
            Some("bulk-250")
        );
        assert_eq!(
            state.audit.back().map(|e| e.target.as_str()),
            Some("key/bulk-1 (+499 more)")
        );
    }

    #[test]
    fn a_staged_bulk_write_applies_whole_on_commit_and_expires_otherwise() {
        let mut state = ControlState::default();
        let keys: Vec<VirtualKey> = (0..12)
            .map(|n| VirtualKey {
                hash: format!("{n:064x}"),
                ..key(&format!("staged-{n}"), 'a')
            })
            .collect();
        let parts = ConfigExport {
            keys,
            ..ConfigExport::default()
        }
        .split(5);
        assert_eq!(
            parts.len(),
            3,
            "5 keys (with the server settings), 5, then 2"
        );
        for (n, part) in parts.iter().enumerate() {
            let stage = Command::Stage {
                stage: "s1".into(),
                part: part.clone(),
            };
            assert_eq!(
                state.apply(n as u64 + 1, &proposal(stage)),
                Outcome::Applied
            );
        }
        assert!(
            state.keys.is_empty(),
            "nothing is visible before the commit"
        );
        let commit = |parts| Command::CommitStage {
            stage: "s1".into(),
            parts,
            mode: StageMode::CreateKeys,
        };
        assert!(matches!(
            state.apply(10, &proposal(commit(2))),
            Outcome::Rejected(Rejection {
                code: RejectCode::FailedPrecondition,
                ..
            })
        ));
        assert_eq!(state.apply(11, &proposal(commit(3))), Outcome::Applied);
        assert_eq!(state.keys.len(), 12);
        assert!(state.staged.is_empty());
        assert_eq!(
            state.audit.back().map(|e| e.action.as_str()),
            Some("create_keys")
        );

        // A stage never committed is dropped once it is older than the TTL.
        let stage = Command::Stage {
            stage: "s2".into(),
            part: parts[1].clone(),
        };
        state.apply(12, &proposal(stage));
        assert_eq!(state.staged.len(), 1);
        let later = Proposal {
            at_ms: 1_700_000_000_000 + STAGE_TTL_MS + 1,
            ..proposal(Command::DeleteKey {
                id: "staged-0".into(),
            })
        };
        state.apply(13, &later);
        assert!(state.staged.is_empty());
    }

    #[test]
    fn deletes_are_refused_while_something_still_refers_to_the_entity() {
        let mut state = ControlState::default();
        let customer = Customer {
            id: "c".into(),
            name: "c".into(),
            limits: Limits::default(),
            metadata: BTreeMap::new(),
        };
        let team = Team {
            id: "t".into(),
            name: "t".into(),
            customer: Some("c".into()),
            models: vec![],
            limits: Limits::default(),
            metadata: BTreeMap::new(),
        };
        state.apply(1, &proposal(Command::PutCustomer { customer }));
        state.apply(2, &proposal(Command::PutTeam { team: team.clone() }));
        let member = VirtualKey {
            team: Some("t".into()),
            ..key("k", 'a')
        };
        state.apply(
            3,
            &proposal(Command::CreateKey {
                key: member.clone(),
            }),
        );
        let refused = |state: &mut ControlState, version, command| {
            matches!(
                state.apply(version, &proposal(command)),
                Outcome::Rejected(Rejection {
                    code: RejectCode::FailedPrecondition,
                    ..
                })
            )
        };
        assert!(refused(
            &mut state,
            4,
            Command::DeleteTeam { id: "t".into() }
        ));
        assert!(refused(
            &mut state,
            5,
            Command::DeleteCustomer { id: "c".into() }
        ));
        // Moving the key out of the team frees the team; moving the team frees the customer.
        let moved = VirtualKey {
            team: None,
            ..member
        };
        assert_eq!(
            state.apply(6, &proposal(Command::UpdateKey { key: moved })),
            Outcome::Applied
        );
        let alone = Team {
            customer: None,
            ..team
        };
        assert_eq!(
            state.apply(7, &proposal(Command::PutTeam { team: alone })),
            Outcome::Applied
        );
        assert_eq!(
            state.apply(8, &proposal(Command::DeleteCustomer { id: "c".into() })),
            Outcome::Applied
        );
        assert_eq!(
            state.apply(9, &proposal(Command::DeleteTeam { id: "t".into() })),
            Outcome::Applied
        );
        assert!(state.indexes_consistent());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn id(prefix: &'static str, count: u8) -> impl Strategy<Value = String> {
            (0..count).prop_map(move |n| format!("{prefix}{n}"))
        }

        fn hash() -> impl Strategy<Value = String> {
            (0u8..8).prop_map(|n| format!("{n:x}").repeat(64))
        }

        fn scope() -> impl Strategy<Value = Scope> {
            prop_oneof![
                id("k", 6).prop_map(Scope::Key),
                id("t", 3).prop_map(Scope::Team),
                id("c", 2).prop_map(Scope::Customer),
            ]
        }

        fn period() -> impl Strategy<Value = BudgetPeriod> {
            prop_oneof![
                Just(BudgetPeriod::Lifetime),
                Just(BudgetPeriod::Rolling {
                    window_ms: 3_600_000
                }),
                Just(BudgetPeriod::Calendar {
                    unit: CalendarUnit::Day,
                    time_zone: "Europe/Paris".into()
                }),
            ]
        }

        fn virtual_key() -> impl Strategy<Value = VirtualKey> {
            (id("k", 6), hash(), proptest::option::of(id("t", 3))).prop_map(|(id, hash, team)| {
                VirtualKey {
                    hash,
                    team,
                    ..key(&id, 'a')
                }
            })
        }

        fn command() -> impl Strategy<Value = Command> {
            prop_oneof![
                virtual_key().prop_map(|key| Command::CreateKey { key }),
                proptest::collection::vec(virtual_key(), 1..4)
                    .prop_map(|keys| Command::CreateKeys { keys }),
                virtual_key().prop_map(|key| Command::UpdateKey { key }),
                (id("k", 6), hash()).prop_map(|(id, hash)| Command::RotateKey {
                    id,
                    hash,
                    prefix: "sk-new".into()
                }),
                id("k", 6).prop_map(|id| Command::RevokeKey { id }),
                id("k", 6).prop_map(|id| Command::DeleteKey { id }),
                (id("t", 3), proptest::option::of(id("c", 2))).prop_map(|(id, customer)| {
                    Command::PutTeam {
                        team: Team {
                            name: id.clone(),
                            id,
                            customer,
                            models: vec![],
                            limits: Limits::default(),
                            metadata: BTreeMap::new(),
                        },
                    }
                }),
                id("t", 3).prop_map(|id| Command::DeleteTeam { id }),
                id("c", 2).prop_map(|id| Command::PutCustomer {
                    customer: Customer {
                        name: id.clone(),
                        id,
                        limits: Limits::default(),
                        metadata: BTreeMap::new(),
                    }
                }),
                id("c", 2).prop_map(|id| Command::DeleteCustomer { id }),
                (id("b", 4), scope(), period(), any::<bool>()).prop_map(
                    |(id, scope, period, hard)| Command::PutBudget {
                        budget: Budget {
                            id,
                            scope,
                            limit_nanos: 1_000,
                            period,
                            hard,
                        },
                    }
                ),
                id("b", 4).prop_map(|id| Command::DeleteBudget { id }),
                (id("s", 2), proptest::collection::vec(virtual_key(), 1..3)).prop_map(
                    |(stage, keys)| Command::Stage {
                        stage,
                        part: ConfigExport {
                            keys,
                            ..ConfigExport::default()
                        },
                    }
                ),
                (id("s", 2), 1u64..3).prop_map(|(stage, parts)| Command::CommitStage {
                    stage,
                    parts,
                    mode: StageMode::CreateKeys,
                }),
                (
                    0u64..3,
                    0u64..6,
                    proptest::collection::vec((id("k", 6), 0u64..500), 0..4)
                )
                    .prop_map(|(node, seq, items)| Command::RecordSpend {
                        node,
                        seq,
                        items: items
                            .into_iter()
                            .map(|(key_id, cost_nanos)| SpendItem {
                                key_id,
                                model: "m".into(),
                                requests: 1,
                                input_tokens: 1,
                                output_tokens: 1,
                                cost_nanos,
                            })
                            .collect(),
                    }),
                (
                    0u64..3,
                    proptest::collection::vec((id("b", 4), 0u64..400, 0u64..800), 1..3)
                )
                    .prop_map(|(node, asks)| Command::GrantLeases {
                        node,
                        asks: asks
                            .into_iter()
                            .map(|(budget, need, want)| LeaseAsk { budget, need, want })
                            .collect(),
                    }),
                (0u64..3, id("b", 4), 0u64..300).prop_map(|(node, budget, keep)| {
                    Command::ReturnLeases {
                        node,
                        leases: vec![LeaseReturn {
                            budget,
                            keep,
                            granted: None,
                        }],
                    }
                }),
                (0u64..3).prop_map(|node| Command::ForgetNode { node }),
            ]
        }

        /// One step of nodes sharing one budget through leases.
        #[derive(Debug, Clone)]
        enum Step {
            /// Node asks for a grant.
            Ask { node: u64, need: Nanos, want: Nanos },
            /// Node spends from what its lease has left, as a reservation would allow.
            Spend { node: u64, amount: Nanos },
            /// Node's unrecorded spend is recorded.
            Record { node: u64 },
            /// Node gives back what it will not spend.
            Return { node: u64 },
            /// Time passes.
            Wait { ms: u64 },
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (0u64..3, 0u64..300, 0u64..2_000).prop_map(|(node, need, want)| Step::Ask {
                    node,
                    need,
                    want
                }),
                (0u64..3, 1u64..300).prop_map(|(node, amount)| Step::Spend { node, amount }),
                (0u64..3).prop_map(|node| Step::Record { node }),
                (0u64..3).prop_map(|node| Step::Return { node }),
                prop_oneof![
                    1u64..5_000,
                    Just(LEASE_TTL_MS),
                    Just(LEASE_GRACE_MS + LEASE_TTL_MS)
                ]
                .prop_map(|ms| Step::Wait { ms }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Nodes that spend only what their leases have left never spend more than the
            /// limit between them, whatever the grants, returns, records and their order;
            /// after every grant, the spend recorded and every live lease's rest fit in the
            /// limit. The one way past it: a lease that lapsed while its node still had
            /// spend unrecorded (a node cut off for longer than the grace).
            #[test]
            fn leases_never_let_the_nodes_spend_more_than_the_limit(
                limit in 1u64..5_000,
                steps in proptest::collection::vec(step(), 1..80),
            ) {
                let mut state = ControlState::default();
                let mut at_ms = 1_795_305_600_000;
                let mut version = 0;
                let mut apply = |state: &mut ControlState, at_ms: u64, command: Command| {
                    version += 1;
                    state.apply(version, &Proposal { at_ms, ..proposal(command) })
                };
                apply(&mut state, at_ms, Command::CreateKey { key: key("k", 'a') });
                apply(&mut state, at_ms, Command::PutBudget {
                    budget: Budget {
                        id: "b".into(),
                        scope: Scope::Key("k".into()),
                        limit_nanos: limit,
                        period: BudgetPeriod::Lifetime,
                        hard: true,
                    },
                });
                let mut unrecorded = [0u64; 3];
                let mut seqs = [0u64; 3];
                let mut lapsed_unrecorded: Nanos = 0;
                // Per node: its unrecorded spend already counted as lapsed.
                let mut counted = [0u64; 3];
                for step in steps {
                    match step {
                        Step::Ask { node, need, want } => {
                            let outcome = apply(&mut state, at_ms, Command::GrantLeases {
                                node,
                                asks: vec![LeaseAsk { budget: "b".into(), need, want }],
                            });
                            let room = state.lease_room("b", node);
                            if outcome == Outcome::Applied && lapsed_unrecorded == 0 {
                                let lease = state.lease("b", node).expect("granted");
                                prop_assert!(lease.granted_nanos >= lease.used_nanos);
                            }
                            let held: Nanos = state.ledgers["b"]
                                .leases
                                .values()
                                .filter(|lease| !lease.lapsed(state.clock_ms))
                                .map(Lease::outstanding)
                                .sum();
                            prop_assert!(
                                state.budget_spent("b", at_ms) + held <= limit + lapsed_unrecorded,
                                "spent {} + held {held} > limit {limit}",
                                state.budget_spent("b", at_ms)
                            );
                            prop_assert!(room.free + room.held_elsewhere <= limit);
                        }
                        Step::Spend { node, amount } => {
                            let Some(lease) = state.lease("b", node) else { continue };
                            let left = lease.outstanding().saturating_sub(unrecorded[node as usize]);
                            if at_ms < lease.until_ms && amount <= left {
                                unrecorded[node as usize] += amount;
                            }
                        }
                        Step::Record { node } => {
                            let amount = std::mem::take(&mut unrecorded[node as usize]);
                            counted[node as usize] = 0;
                            seqs[node as usize] += 1;
                            apply(&mut state, at_ms, Command::RecordSpend {
                                node,
                                seq: seqs[node as usize],
                                items: vec![SpendItem {
                                    key_id: "k".into(),
                                    model: "m".into(),
                                    requests: 1,
                                    input_tokens: 1,
                                    output_tokens: 1,
                                    cost_nanos: amount,
                                }],
                            });
                        }
                        Step::Return { node } => {
                            let granted = state.lease("b", node).map(|lease| lease.granted_nanos);
                            apply(&mut state, at_ms, Command::ReturnLeases {
                                node,
                                leases: vec![LeaseReturn {
                                    budget: "b".into(),
                                    keep: unrecorded[node as usize],
                                    granted,
                                }],
                            });
                        }
                        Step::Wait { ms } => {
                            at_ms += ms;
                            // A lease that lapses with spend unrecorded: the one stated way
                            // past the limit.
                            for node in 0..3u64 {
                                if let Some(lease) = state.lease("b", node)
                                    && lease.until_ms.saturating_add(LEASE_GRACE_MS) < at_ms
                                {
                                    let index = node as usize;
                                    lapsed_unrecorded +=
                                        unrecorded[index].saturating_sub(counted[index]);
                                    counted[index] = counted[index].max(unrecorded[index]);
                                }
                            }
                        }
                    }
                    let total = state.budget_spent("b", at_ms) + unrecorded.iter().sum::<u64>();
                    prop_assert!(
                        total <= limit + lapsed_unrecorded,
                        "the nodes spent {total} of a {limit} budget"
                    );
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the commands, the indexes match a rebuild, a published clone never
            /// sees a later change, and the state survives its snapshot form unchanged.
            #[test]
            fn apply_keeps_indexes_snapshots_and_restores_consistent(
                commands in proptest::collection::vec((command(), 0u64..3 * DAY_MS), 1..60),
                import_at in proptest::option::of(0usize..60),
            ) {
                let mut state = ControlState::default();
                let mut at_ms = 1_795_305_600_000;
                for (position, (command, step)) in commands.into_iter().enumerate() {
                    at_ms += step;
                    let published = state.clone();
                    let published_json = serde_json::to_string(&published).expect("json");
                    let version = position as u64 + 1;
                    let written = Proposal { at_ms, ..proposal(command) };
                    state.apply(version, &written);
                    prop_assert!(state.indexes_consistent());
                    prop_assert_eq!(
                        serde_json::to_string(&published).expect("json"),
                        published_json,
                        "a published state changed under its readers"
                    );
                    for key in state.keys.values() {
                        prop_assert_eq!(
                            state.key_by_hash(&key.hash).map(|found| &found.id),
                            Some(&key.id)
                        );
                        for budget in state.budgets_of_key(&key.id) {
                            prop_assert!(state.scopes_of(&key.id).contains(&budget.scope));
                        }
                    }
                    prop_assert_eq!(state.index.key_hashes.len(), state.keys.len());
                    if import_at == Some(position) {
                        let export = state.export();
                        let mut imported = state.clone();
                        imported.apply(version, &Proposal {
                            at_ms,
                            ..proposal(Command::Import { config: export })
                        });
                        prop_assert!(imported.indexes_consistent());
                        prop_assert_eq!(imported.export(), state.export());
                    }
                }
                let json = serde_json::to_vec(&state).expect("snapshot");
                let restored: ControlState = serde_json::from_slice(&json).expect("restore");
                prop_assert!(restored.indexes_consistent());
                prop_assert_eq!(&restored, &state);
                prop_assert_eq!(serde_json::to_vec(&restored).expect("again"), json);
                // The streamed snapshot file, too.
                let mut file = Vec::new();
                state.write_snapshot(&mut file).expect("write");
                let read = ControlState::read_snapshot(&mut file.as_slice()).expect("read");
                prop_assert!(read.indexes_consistent());
                prop_assert_eq!(&read, &state);
                let mut again = Vec::new();
                read.write_snapshot(&mut again).expect("write again");
                prop_assert_eq!(again, file);
            }
        }
    }
}
