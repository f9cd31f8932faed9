//! Request (RPM), token (TPM) and concurrency (max-parallel) limits of virtual keys, teams and
//! customers, enforced for the whole cluster while every node admits on its own.
//!
//! # How a limit is split
//!
//! Each limit is a *pool* counted in fixed one-minute windows aligned to the wall clock. In a
//! window, node `i` may admit up to its **allowance**:
//!
//! ```text
//! allowance_i = base_i + Σ_j given_j→i − Σ_j given_i→j
//! ```
//!
//! - `base_i` is an equal share of the limit among the window's *sharing set*: the nodes that
//!   started before the window began, as seen during it (the remainder goes to the lowest
//!   node ids). The set only grows within a window, so a node that dies keeps its share (and
//!   takes it with it). A node that started during the window has no base in it, only what
//!   others give it. In a cluster's first window the set is every live node, counted as at
//!   least the expected cluster size, so a node that has not met the others yet takes no more
//!   than its expected share.
//! - `given_i→j` is what node `i` has handed to node `j` in this window. Only the giver writes
//!   it, and the giver subtracts it at once, so the sum of all allowances never exceeds the
//!   limit: a gift that has not reached its receiver yet is allowance nobody can use, never
//!   allowance two nodes can use.
//!
//! Nodes gossip, per pool, their window, use, unmet demand (`want`) and spare allowance
//! (`free`), and their cumulative gifts. A node with spare allowance gives part of it to the
//! nodes that want more, in proportion to its share of the cluster's spare allowance, and net
//! of gifts that are still on their way. Demand is the rate of units offered (admitted or
//! refused) over the last two seconds, projected to the end of the window, so a node keeps
//! what its own traffic will need.
//!
//! # Bound
//!
//! While nodes agree on the window's sharing set, the requests admitted in a window never
//! exceed the limit, whatever dies or is cut off (the cluster admits less, never more). When
//! they disagree (a partition that heals brings in a node some never saw this window, or a
//! node restarted within a window under the same id is credited its previous run's gifts), the
//! excess is at most one node's base share in that window. Tokens are admitted on the prompt
//! estimate and counted exactly when the answer is in, so a token limit can be exceeded by the
//! output of the calls in flight when it fills.
//!
//! Concurrency pools work the same way, except that use is the number of calls in flight and
//! is not reset when a window ends, and gifts are not either (calls in flight keep their
//! slots); slots given to a node that is no longer live come back to the giver.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// The length of a rate-limit window.
pub const WINDOW_MS: u64 = 60_000;
/// Demand is measured over this many buckets of [`DEMAND_BUCKET_MS`].
const DEMAND_BUCKETS: usize = 20;
const DEMAND_BUCKET_MS: u64 = 100;
/// A report is republished at least this often, so that its gossip TTL never runs out while it
/// is current.
const REFRESH_MS: u64 = 10_000;

/// Who a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Key,
    Team,
    Customer,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Requests per minute.
    Requests,
    /// Tokens (input + output) per minute.
    Tokens,
    /// Calls in flight.
    Parallel,
}

/// One limited quantity: a scope, an id in it, and what is counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId {
    pub scope: Scope,
    /// Shared, so that holding a pool's id (in a ticket, in the pool map) costs no copy.
    pub id: Arc<str>,
    pub kind: Kind,
}

impl PoolId {
    pub fn new(scope: Scope, id: impl Into<Arc<str>>, kind: Kind) -> PoolId {
        PoolId {
            scope,
            id: id.into(),
            kind,
        }
    }

    /// The name in gossip: `k/r/<id>` (scope, kind, then the id, which may contain `/`).
    pub fn name(&self) -> String {
        let scope = match self.scope {
            Scope::Key => 'k',
            Scope::Team => 't',
            Scope::Customer => 'c',
        };
        let kind = match self.kind {
            Kind::Requests => 'r',
            Kind::Tokens => 't',
            Kind::Parallel => 'p',
        };
        format!("{scope}/{kind}/{}", self.id)
    }

    pub fn parse(name: &str) -> Option<PoolId> {
        let mut parts = name.splitn(3, '/');
        let scope = match parts.next()? {
            "k" => Scope::Key,
            "t" => Scope::Team,
            "c" => Scope::Customer,
            _ => return None,
        };
        let kind = match parts.next()? {
            "r" => Kind::Requests,
            "t" => Kind::Tokens,
            "p" => Kind::Parallel,
            _ => return None,
        };
        let id = parts.next()?;
        (!id.is_empty()).then(|| PoolId::new(scope, id, kind))
    }
}

/// What one node says about one pool, in gossip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolReport {
    /// The limit, as the reporting node has it from the replicated config.
    pub limit: u64,
    pub window: u64,
    /// Units this node admitted in the window (calls in flight for a concurrency pool).
    pub used: u64,
    /// Allowance this node would use beyond what it has.
    pub want: u64,
    /// Allowance this node will not need.
    pub free: u64,
    /// Cumulative gifts in this window, by receiving node.
    pub given: BTreeMap<u64, u64>,
    /// Gifts this node has counted, by giving node.
    pub seen: BTreeMap<u64, u64>,
    /// Changes every [`REFRESH_MS`] so the gossip entry is refreshed before its TTL.
    pub stamp: u64,
}

impl PoolReport {
    /// `limit window used want free stamp g<node>=<n>,… s<node>=<n>,…`
    pub fn encode(&self) -> String {
        fn map(prefix: char, map: &BTreeMap<u64, u64>) -> String {
            let entries: Vec<String> = map
                .iter()
                .map(|(node, amount)| format!("{node}={amount}"))
                .collect();
            format!("{prefix}{}", entries.join(","))
        }
        format!(
            "{} {} {} {} {} {} {} {}",
            self.limit,
            self.window,
            self.used,
            self.want,
            self.free,
            self.stamp,
            map('g', &self.given),
            map('s', &self.seen)
        )
    }

    pub fn decode(text: &str) -> Option<PoolReport> {
        fn map(prefix: char, text: &str) -> Option<BTreeMap<u64, u64>> {
            let body = text.strip_prefix(prefix)?;
            let mut map = BTreeMap::new();
            for entry in body.split(',').filter(|entry| !entry.is_empty()) {
                let (node, amount) = entry.split_once('=')?;
                map.insert(node.parse().ok()?, amount.parse().ok()?);
            }
            Some(map)
        }
        let mut parts = text.split(' ');
        let mut number = || parts.next()?.parse::<u64>().ok();
        let limit = number()?;
        let window = number()?;
        let used = number()?;
        let want = number()?;
        let free = number()?;
        let stamp = number()?;
        let given = map('g', parts.next()?)?;
        let seen = map('s', parts.next()?)?;
        Some(PoolReport {
            limit,
            window,
            used,
            want,
            free,
            given,
            seen,
            stamp,
        })
    }
}

/// A live cluster member, as the limiter needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub node_id: u64,
    /// Wall-clock ms the node (its current incarnation) started.
    pub started_ms: u64,
}

/// One limit a request is subject to.
#[derive(Debug, Clone)]
pub struct Ask {
    pub pool: PoolId,
    pub limit: u64,
    /// Units the request takes: 1 for requests and concurrency, the estimated prompt for tokens.
    pub cost: u64,
}

/// A pool's state for the client, as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub kind: Kind,
    pub limit: u64,
    /// What the cluster has left (as far as this node has heard).
    pub remaining: u64,
    /// Until the window resets.
    pub reset_ms: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub pool: PoolId,
    pub status: PoolStatus,
    /// When to try again: the end of the window if the cluster has nothing left, else a
    /// second (another node holds what is left and will give this one part of it).
    pub retry_after_ms: u64,
    /// Every pool the request was checked against, for the response headers.
    pub statuses: Vec<PoolStatus>,
    /// The request alone needs more than the whole limit: it will never be admitted.
    pub too_large: bool,
}

/// Offered units per 100 ms bucket over the last two seconds.
#[derive(Debug, Clone, Default)]
struct DemandMeter {
    buckets: [u64; DEMAND_BUCKETS],
    /// The bucket index (`now / DEMAND_BUCKET_MS`) of the newest bucket.
    head: u64,
}

impl DemandMeter {
    fn advance(&mut self, now_ms: u64) {
        let bucket = now_ms / DEMAND_BUCKET_MS;
        if bucket <= self.head {
            return;
        }
        let steps = (bucket - self.head).min(DEMAND_BUCKETS as u64);
        for step in 1..=steps {
            self.buckets[((self.head + step) % DEMAND_BUCKETS as u64) as usize] = 0;
        }
        self.head = bucket;
    }

    fn record(&mut self, now_ms: u64, units: u64) {
        self.advance(now_ms);
        let slot = (self.head % DEMAND_BUCKETS as u64) as usize;
        self.buckets[slot] = self.buckets[slot].saturating_add(units);
    }

    /// Units offered over the last two seconds.
    fn recent(&mut self, now_ms: u64) -> u64 {
        self.advance(now_ms);
        self.buckets.iter().sum()
    }
}

#[derive(Debug)]
struct Pool {
    limit: u64,
    window: u64,
    used: u64,
    given: BTreeMap<u64, u64>,
    demand: DemandMeter,
    /// Refused units over the last two seconds (for concurrency pools' demand).
    refused: DemandMeter,
    touched_ms: u64,
    /// Cached from the cluster view (refreshed when the view or the window changes): this
    /// node's base share, gifts received and the other nodes' use.
    base: u64,
    received: u64,
    others_used: u64,
    /// The view version and window the cache is for.
    cached: Option<(u64, u64)>,
}

impl Pool {
    fn new(limit: u64, window: u64, now_ms: u64) -> Pool {
        Pool {
            limit,
            window,
            used: 0,
            given: BTreeMap::new(),
            demand: DemandMeter::default(),
            refused: DemandMeter::default(),
            touched_ms: now_ms,
            base: 0,
            received: 0,
            others_used: 0,
            cached: None,
        }
    }
}

/// The nodes that share the limits' base in one window. It only grows during the window: a
/// node that dies keeps its share (and takes it with it) until the window ends, so the
/// survivors never split what it may already have used.
#[derive(Debug, Default, Clone)]
struct Sharing {
    window: u64,
    nodes: BTreeSet<u64>,
    /// Built before any node that started before the window was seen (a cluster's first
    /// window): the split assumes at least the expected cluster size.
    cold: bool,
    /// The view version it was last updated at.
    version: u64,
}

#[derive(Debug, Default)]
struct Inner {
    me: u64,
    /// How many nodes the cluster is expected to have (its Raft voters): until the others are
    /// seen, a node takes no more than this share.
    expected_nodes: u64,
    sharing: Option<Sharing>,
    /// Live members, this node included once it is known.
    members: Vec<Member>,
    /// Live peers' reports, by pool.
    peers: HashMap<PoolId, Vec<(u64, PoolReport)>>,
    pools: HashMap<PoolId, Pool>,
    /// Bumped whenever members or reports change.
    view_version: u64,
}

/// This node's side of every cluster-wide limit.
pub struct Limiter {
    inner: Mutex<Inner>,
    /// Wall-clock ms (replaceable in tests).
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::with_clock(skein_types::now_ms)
    }
}

fn window_of(now_ms: u64) -> u64 {
    now_ms / WINDOW_MS
}

impl Inner {
    /// Roll a pool into the current window: a rate pool starts from zero, every pool's gifts
    /// start over.
    fn roll(pool: &mut Pool, kind: Kind, now_ms: u64) {
        let window = window_of(now_ms);
        // Only forward: a clock read just before a window began must not undo it.
        if window > pool.window {
            pool.window = window;
            if kind != Kind::Parallel {
                // Calls in flight keep the slots they were given; rates start over.
                pool.given.clear();
                pool.used = 0;
            }
        }
    }

    /// Bring the window's sharing set up to date with the current view: add the members
    /// that started before the window began (or, in a cluster's first window, every live
    /// member). Nobody is removed before the window ends.
    fn update_sharing(&mut self, window: u64) {
        let version = self.view_version;
        if let Some(sharing) = &self.sharing
            && sharing.window == window
            && sharing.version == version
        {
            return;
        }
        let window_start = window.saturating_mul(WINDOW_MS);
        let mut sharing = match self.sharing.take() {
            Some(sharing) if sharing.window == window => sharing,
            _ => Sharing {
                window,
                nodes: BTreeSet::new(),
                cold: false,
                version,
            },
        };
        sharing.version = version;
        if self.members.is_empty() {
            // Gossip off or not started: this node alone, unless it expects company.
            sharing.nodes.insert(self.me);
            sharing.cold = self.expected_nodes > 1;
        } else {
            let established: Vec<u64> = self
                .members
                .iter()
                .filter(|member| member.started_ms < window_start)
                .map(|member| member.node_id)
                .collect();
            if established.is_empty() {
                sharing.cold = true;
                sharing
                    .nodes
                    .extend(self.members.iter().map(|member| member.node_id));
            } else {
                sharing.nodes.extend(established);
            }
        }
        self.sharing = Some(sharing);
    }

    /// This node's base share of `limit` in `window` (the sharing set must be up to date).
    fn base(&self, limit: u64, window: u64) -> u64 {
        let Some(sharing) = self
            .sharing
            .as_ref()
            .filter(|sharing| sharing.window == window)
        else {
            return 0;
        };
        let Some(rank) = sharing.nodes.iter().position(|node| *node == self.me) else {
            // Started during this window, after others: only gifts.
            return 0;
        };
        let mut count = sharing.nodes.len() as u64;
        if sharing.cold {
            count = count.max(self.expected_nodes);
        }
        let count = count.max(1);
        limit / count + u64::from((rank as u64) < limit % count)
    }

    /// Gifts to this node in `window` (any window for concurrency, whose gifts persist), by
    /// giver. A gift larger than the limit is not believed.
    fn received(&self, pool: &PoolId, window: u64, limit: u64) -> BTreeMap<u64, u64> {
        let mut received = BTreeMap::new();
        if let Some(reports) = self.peers.get(pool) {
            for (node, report) in reports {
                if (pool.kind == Kind::Parallel || report.window == window)
                    && let Some(amount) = report.given.get(&self.me)
                {
                    received.insert(*node, (*amount).min(limit));
                }
            }
        }
        received
    }

    /// Bring a pool's cached view up to date (after a view change or a new window).
    fn refresh(&mut self, id: &PoolId) {
        let Some(pool) = self.pools.get(id) else {
            return;
        };
        let key = (self.view_version, pool.window);
        if pool.cached == Some(key) {
            return;
        }
        let (limit, window) = (pool.limit, pool.window);
        self.update_sharing(window);
        let base = self.base(limit, window);
        let received = self
            .received(id, window, limit)
            .values()
            .fold(0u64, |sum, amount| sum.saturating_add(*amount));
        let others_used: u64 = self
            .peers
            .get(id)
            .map(|reports| {
                reports
                    .iter()
                    .filter(|(_, report)| id.kind == Kind::Parallel || report.window == window)
                    .fold(0u64, |sum, (_, report)| {
                        sum.saturating_add(report.used.min(limit))
                    })
            })
            .unwrap_or(0);
        if let Some(pool) = self.pools.get_mut(id) {
            pool.base = base;
            pool.received = received;
            pool.others_used = others_used;
            pool.cached = Some(key);
        }
    }

    /// What this node may admit in the pool's window (the cache must be fresh).
    fn allowance(pool: &Pool) -> u64 {
        let given = pool
            .given
            .values()
            .fold(0u64, |sum, amount| sum.saturating_add(*amount));
        pool.base
            .saturating_add(pool.received)
            .saturating_sub(given)
    }

    fn status(id: &PoolId, pool: &Pool, now_ms: u64) -> PoolStatus {
        PoolStatus {
            kind: id.kind,
            limit: pool.limit,
            remaining: pool
                .limit
                .saturating_sub(pool.used.saturating_add(pool.others_used)),
            reset_ms: if id.kind == Kind::Parallel {
                0
            } else {
                (pool.window + 1) * WINDOW_MS - now_ms.min((pool.window + 1) * WINDOW_MS)
            },
        }
    }

    /// What this node expects to need until the window ends, from its recent demand.
    fn need(id: &PoolId, pool: &mut Pool, now_ms: u64) -> u64 {
        let need = if id.kind == Kind::Parallel {
            pool.used + pool.refused.recent(now_ms)
        } else {
            let recent = pool.demand.recent(now_ms);
            let left_ms = (pool.window + 1) * WINDOW_MS - now_ms.min((pool.window + 1) * WINDOW_MS);
            let span = DEMAND_BUCKETS as u64 * DEMAND_BUCKET_MS;
            pool.used + recent.saturating_mul(left_ms).div_ceil(span)
        };
        need.min(pool.limit)
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// A limiter that reads the time from `clock` (wall-clock ms).
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> Limiter {
        Limiter {
            inner: Mutex::default(),
            clock: Box::new(clock),
        }
    }

    /// The limiter's clock.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node's id (as in its members list).
    pub fn set_node_id(&self, node_id: u64) {
        self.lock().me = node_id;
    }

    /// How many nodes the cluster should have (its Raft voters). Until a node sees nodes
    /// that started before the current window, it takes no more than `1/expected` of a limit.
    pub fn set_expected_nodes(&self, nodes: u64) {
        let mut inner = self.lock();
        inner.expected_nodes = nodes;
        inner.view_version += 1;
    }

    /// Admit a request against every limit in `asks`, or against none: a request refused by
    /// one limit takes nothing from the others.
    pub fn admit(
        self: &Arc<Self>,
        asks: &[Ask],
        now_ms: u64,
    ) -> Result<(Ticket, Vec<PoolStatus>), Box<Refusal>> {
        // A request larger than a whole limit can never be admitted: say so at once, and do
        // not let it pull the cluster's spare allowance towards this node.
        if let Some(ask) = asks.iter().find(|ask| ask.cost > ask.limit) {
            let window_end = (window_of(now_ms) + 1).saturating_mul(WINDOW_MS);
            let status = PoolStatus {
                kind: ask.pool.kind,
                limit: ask.limit,
                remaining: 0,
                reset_ms: window_end.saturating_sub(now_ms),
            };
            return Err(Box::new(Refusal {
                pool: ask.pool.clone(),
                status,
                retry_after_ms: status.reset_ms.max(1000),
                statuses: vec![status],
                too_large: true,
            }));
        }
        let mut inner = self.lock();
        let window = window_of(now_ms);
        let view_version = inner.view_version;
        // One pass: bring each pool up to date and check it.
        let mut refused: Option<usize> = None;
        let mut statuses = Vec::with_capacity(asks.len());
        for (index, ask) in asks.iter().enumerate() {
            let stale = match inner.pools.get_mut(&ask.pool) {
                Some(pool) => {
                    if pool.limit != ask.limit {
                        pool.limit = ask.limit;
                        pool.cached = None;
                    }
                    pool.touched_ms = now_ms;
                    Inner::roll(pool, ask.pool.kind, now_ms);
                    pool.demand.record(now_ms, ask.cost);
                    pool.cached != Some((view_version, pool.window))
                }
                None => {
                    let mut pool = Pool::new(ask.limit, window, now_ms);
                    pool.demand.record(now_ms, ask.cost);
                    inner.pools.insert(ask.pool.clone(), pool);
                    true
                }
            };
            if stale {
                inner.refresh(&ask.pool);
            }
            if let Some(pool) = inner.pools.get(&ask.pool) {
                if refused.is_none() && pool.used.saturating_add(ask.cost) > Inner::allowance(pool)
                {
                    refused = Some(index);
                }
                statuses.push(Inner::status(&ask.pool, pool, now_ms));
            }
        }
        if let Some(index) = refused {
            let ask = &asks[index];
            let id = ask.pool.clone();
            let status = match inner.pools.get_mut(&id) {
                Some(pool) => {
                    pool.refused.record(now_ms, ask.cost.max(1));
                    Inner::status(&id, pool, now_ms)
                }
                None => PoolStatus {
                    kind: id.kind,
                    limit: ask.limit,
                    remaining: 0,
                    reset_ms: 0,
                },
            };
            let retry_after_ms = if status.remaining > 0 || id.kind == Kind::Parallel {
                1000
            } else {
                status.reset_ms.max(1)
            };
            return Err(Box::new(Refusal {
                pool: id,
                status,
                retry_after_ms,
                statuses,
                too_large: false,
            }));
        }
        let mut held = Vec::with_capacity(asks.len());
        for (ask, status) in asks.iter().zip(statuses.iter_mut()) {
            if let Some(pool) = inner.pools.get_mut(&ask.pool) {
                pool.used = pool.used.saturating_add(ask.cost);
                status.remaining = status.remaining.saturating_sub(ask.cost);
                held.push((ask.pool.clone(), ask.cost));
            }
        }
        let ticket = Ticket {
            limiter: Arc::clone(self),
            window,
            held,
            done: false,
        };
        Ok((ticket, statuses))
    }

    /// Give back what a ticket holds: calls in flight always; tokens replaced by `tokens`
    /// (the real count) when given; requests only when the call is cancelled (`cancel`).
    fn release(&self, ticket: &Ticket, tokens: Option<u64>, cancel: bool) {
        let mut inner = self.lock();
        let now_ms = self.now_ms();
        for (id, cost) in &ticket.held {
            let Some(pool) = inner.pools.get_mut(id) else {
                continue;
            };
            Inner::roll(pool, id.kind, now_ms);
            let same_window = pool.window == ticket.window;
            match id.kind {
                Kind::Parallel => pool.used = pool.used.saturating_sub(*cost),
                Kind::Requests if cancel && same_window => {
                    pool.used = pool.used.saturating_sub(*cost);
                }
                Kind::Requests => {}
                Kind::Tokens => {
                    let actual = if cancel { 0 } else { tokens.unwrap_or(0) };
                    if same_window {
                        pool.used = pool.used.saturating_sub(*cost).saturating_add(actual);
                    } else {
                        // The estimate counted in the window before; the rest counts now.
                        pool.used = pool.used.saturating_add(actual.saturating_sub(*cost));
                    }
                }
            }
        }
    }

    /// Take in the cluster's view (live members and their reports: `(node, pool name, value)`),
    /// then hand spare allowance to the nodes that want it. Returns this node's reports to
    /// publish: `(pool name, value)`.
    pub fn exchange(
        &self,
        members: Vec<Member>,
        reports: Vec<(u64, String, String)>,
        now_ms: u64,
    ) -> Vec<(String, String)> {
        // Decode outside the lock: the request path shares it.
        let me = self.lock().me;
        let mut peers: HashMap<PoolId, Vec<(u64, PoolReport)>> = HashMap::new();
        for (node, name, value) in reports {
            if node == me {
                continue;
            }
            if let (Some(id), Some(report)) = (PoolId::parse(&name), PoolReport::decode(&value)) {
                peers.entry(id).or_default().push((node, report));
            }
        }
        let live: BTreeSet<u64> = members.iter().map(|member| member.node_id).collect();
        let mut inner = self.lock();
        inner.members = members;
        let window = window_of(now_ms);
        // A pool another node wants more of may be one this node has never used: it still
        // holds a base share of it to give.
        for (id, reports) in &peers {
            if let Some((_, report)) = reports
                .iter()
                .find(|(_, report)| report.window == window && report.want > 0)
            {
                inner
                    .pools
                    .entry(id.clone())
                    .or_insert_with(|| Pool::new(report.limit, window, now_ms))
                    .touched_ms = now_ms;
            }
        }
        inner.peers = peers;
        inner.view_version += 1;
        // Every member seen during the window shares it, whether or not it has used a limit.
        inner.update_sharing(window);
        let ids: Vec<PoolId> = inner.pools.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(pool) = inner.pools.get_mut(&id) {
                Inner::roll(pool, id.kind, now_ms);
            }
            inner.refresh(&id);
            let Some(mut pool) = inner.pools.remove(&id) else {
                continue;
            };
            if id.kind == Kind::Parallel && !live.is_empty() {
                // Slots given to a node that is gone come back (its calls are gone with it).
                pool.given.retain(|node, _| live.contains(node));
            }
            let idle = now_ms.saturating_sub(pool.touched_ms) > 2 * WINDOW_MS;
            if idle && pool.used == 0 && pool.given.is_empty() {
                continue;
            }
            let allowance = Inner::allowance(&pool);
            let need = Inner::need(&id, &mut pool, now_ms);
            let mut free = allowance.saturating_sub(need.max(pool.used));
            let want = need.saturating_sub(allowance);
            // Hand spare allowance to the nodes that want more.
            if free > 0
                && let Some(reports) = inner.peers.get(&id)
            {
                let current: Vec<&(u64, PoolReport)> = reports
                    .iter()
                    .filter(|(_, report)| report.window == window)
                    .collect();
                let cluster_free: u64 = current
                    .iter()
                    .filter(|(_, report)| report.want == 0)
                    .fold(free, |sum, (_, report)| {
                        sum.saturating_add(report.free.min(pool.limit))
                    });
                for (node, report) in &current {
                    if report.want == 0 || free == 0 {
                        continue;
                    }
                    // Gifts to this node it has not counted yet, from anyone.
                    let mut in_transit = pool
                        .given
                        .get(node)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(report.seen.get(&me).copied().unwrap_or(0));
                    for (giver, other) in &current {
                        if giver == node {
                            continue;
                        }
                        in_transit = in_transit.saturating_add(
                            other
                                .given
                                .get(node)
                                .copied()
                                .unwrap_or(0)
                                .saturating_sub(report.seen.get(giver).copied().unwrap_or(0)),
                        );
                    }
                    let wanted = report.want.min(pool.limit).saturating_sub(in_transit);
                    if wanted == 0 {
                        continue;
                    }
                    let share =
                        (wanted as u128 * free as u128).div_ceil(cluster_free.max(1) as u128);
                    let gift = (share as u64).min(wanted).min(free);
                    let given = pool.given.entry(*node).or_insert(0);
                    *given = given.saturating_add(gift);
                    pool.touched_ms = now_ms;
                    free -= gift;
                }
            }
            let report = PoolReport {
                limit: pool.limit,
                window: pool.window,
                used: pool.used,
                want,
                free,
                given: pool.given.clone(),
                seen: inner.received(&id, pool.window, pool.limit),
                stamp: now_ms / REFRESH_MS,
            };
            out.push((id.name(), report.encode()));
            inner.pools.insert(id, pool);
        }
        out
    }

    /// The status of a pool as the cluster sees it (for tests and diagnostics).
    pub fn status(&self, id: &PoolId, now_ms: u64) -> Option<PoolStatus> {
        let inner = self.lock();
        let pool = inner.pools.get(id)?;
        Some(Inner::status(id, pool, now_ms))
    }
}

/// What an admitted request holds; dropping it gives back its concurrency slots and replaces
/// its token estimate with nothing (the call produced no tokens).
pub struct Ticket {
    limiter: Arc<Limiter>,
    window: u64,
    held: Vec<(PoolId, u64)>,
    done: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("window", &self.window)
            .field("held", &self.held)
            .finish()
    }
}

impl Ticket {
    /// The call is over and used `tokens` (input + output).
    pub fn settle(mut self, tokens: u64) {
        self.done = true;
        self.limiter.release(&self, Some(tokens), false);
    }

    /// The call never went out (refused by something else): it counts for nothing.
    pub fn cancel(mut self) {
        self.done = true;
        self.limiter.release(&self, None, true);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.release(self, Some(0), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Nodes that exchange reports every tick, each seeing the others' reports of the tick
    /// before (about one gossip hop late).
    struct Sim {
        clock: Arc<AtomicU64>,
        nodes: Vec<Arc<Limiter>>,
        published: Vec<Vec<(String, String)>>,
        tick_ms: u64,
    }

    impl Sim {
        fn new(count: u64, start_ms: u64) -> Sim {
            let mut sim = Sim::before_any_exchange(count, start_ms);
            sim.exchange();
            sim
        }

        /// Nodes that have not yet heard from each other.
        fn before_any_exchange(count: u64, start_ms: u64) -> Sim {
            let clock = Arc::new(AtomicU64::new(start_ms));
            let nodes = (1..=count)
                .map(|id| {
                    let clock = clock.clone();
                    let limiter =
                        Arc::new(Limiter::with_clock(move || clock.load(Ordering::SeqCst)));
                    limiter.set_node_id(id);
                    limiter
                })
                .collect();
            Sim {
                clock,
                nodes,
                published: vec![Vec::new(); count as usize],
                tick_ms: 100,
            }
        }

        fn now(&self) -> u64 {
            self.clock.load(Ordering::SeqCst)
        }

        fn members(&self) -> Vec<Member> {
            (1..=self.nodes.len() as u64)
                .map(|node_id| Member {
                    node_id,
                    started_ms: 0,
                })
                .collect()
        }

        fn exchange(&mut self) {
            let all: Vec<usize> = (0..self.nodes.len()).collect();
            self.exchange_among(&all);
        }

        /// One exchange among the nodes at `live` (the others are gone): each sees the live
        /// members and the reports they published last time.
        fn exchange_among(&mut self, live: &[usize]) {
            let reports: Vec<(u64, String, String)> = live
                .iter()
                .flat_map(|index| {
                    self.published[*index]
                        .iter()
                        .map(move |(name, value)| (*index as u64 + 1, name.clone(), value.clone()))
                })
                .collect();
            let now = self.now();
            let members: Vec<Member> = self
                .members()
                .into_iter()
                .filter(|member| live.contains(&(member.node_id as usize - 1)))
                .collect();
            for index in live {
                self.published[*index] =
                    self.nodes[*index].exchange(members.clone(), reports.clone(), now);
            }
        }

        fn tick(&mut self) {
            self.clock.fetch_add(self.tick_ms, Ordering::SeqCst);
            self.exchange();
        }

        /// Offer `count` requests to node `index`; how many were admitted.
        fn offer(&self, index: usize, count: u64, limit: u64) -> u64 {
            let pool = PoolId::new(Scope::Key, "k1", Kind::Requests);
            let mut admitted = 0;
            for _ in 0..count {
                let ask = Ask {
                    pool: pool.clone(),
                    limit,
                    cost: 1,
                };
                if let Ok((ticket, _)) = self.nodes[index].admit(&[ask], self.now()) {
                    ticket.settle(0);
                    admitted += 1;
                }
            }
            admitted
        }
    }

    const START: u64 = 1_000 * WINDOW_MS;

    /// Admit one request that must be admitted.
    fn take(node: &Arc<Limiter>, ask: &Ask, now_ms: u64) -> Ticket {
        node.admit(std::slice::from_ref(ask), now_ms)
            .expect("admitted")
            .0
    }

    #[test]
    fn pool_names_and_reports_round_trip() {
        let id = PoolId::new(Scope::Team, "team/a b", Kind::Tokens);
        assert_eq!(PoolId::parse(&id.name()), Some(id));
        assert_eq!(PoolId::parse("x/r/a"), None);
        assert_eq!(PoolId::parse("k/r/"), None);
        let report = PoolReport {
            limit: 10,
            window: 7,
            used: 3,
            want: 2,
            free: 0,
            given: BTreeMap::from([(2, 5), (3, 1)]),
            seen: BTreeMap::from([(1, 4)]),
            stamp: 9,
        };
        assert_eq!(PoolReport::decode(&report.encode()), Some(report.clone()));
        let empty = PoolReport::default();
        assert_eq!(PoolReport::decode(&empty.encode()), Some(empty));
        assert_eq!(PoolReport::decode("1 2 3"), None);
        assert_eq!(PoolReport::decode("1 2 3 4 5 6 gx=1 s"), None);
    }

    #[test]
    fn a_single_node_admits_the_limit_then_refuses_until_the_window_ends() {
        let sim = Sim::new(1, START + 10_000);
        assert_eq!(sim.offer(0, 15, 10), 10);
        let ask = Ask {
            pool: PoolId::new(Scope::Key, "k1", Kind::Requests),
            limit: 10,
            cost: 1,
        };
        let refusal = sim.nodes[0]
            .admit(std::slice::from_ref(&ask), sim.now())
            .expect_err("refused");
        assert_eq!(refusal.status.remaining, 0);
        assert_eq!(refusal.status.limit, 10);
        assert_eq!(refusal.retry_after_ms, 50_000);
        // The next window starts from zero.
        sim.clock.store(START + WINDOW_MS, Ordering::SeqCst);
        let (_ticket, statuses) = sim.nodes[0].admit(&[ask], sim.now()).expect("value");
        assert_eq!(statuses[0].remaining, 9);
        assert_eq!(statuses[0].reset_ms, WINDOW_MS);
    }

    #[test]
    fn a_request_refused_by_one_limit_takes_nothing_from_the_others() {
        let sim = Sim::new(1, START);
        let key = Ask {
            pool: PoolId::new(Scope::Key, "k1", Kind::Requests),
            limit: 100,
            cost: 1,
        };
        let team = Ask {
            pool: PoolId::new(Scope::Team, "t1", Kind::Requests),
            limit: 1,
            cost: 1,
        };
        let node = &sim.nodes[0];
        let (ticket, _) = node
            .admit(&[key.clone(), team.clone()], sim.now())
            .expect("value");
        ticket.settle(0);
        let refusal = node
            .admit(&[key.clone(), team], sim.now())
            .expect_err("refused");
        assert_eq!(refusal.pool.scope, Scope::Team);
        assert_eq!(
            node.status(&key.pool, sim.now()).expect("value").remaining,
            99
        );
        // A cancelled request gives its count back.
        let ticket = take(node, &key, sim.now());
        ticket.cancel();
        assert_eq!(
            node.status(&key.pool, sim.now()).expect("value").remaining,
            99
        );
    }

    #[test]
    fn tokens_are_admitted_on_the_estimate_and_counted_exactly() {
        let sim = Sim::new(1, START);
        let node = &sim.nodes[0];
        let ask = Ask {
            pool: PoolId::new(Scope::Key, "k1", Kind::Tokens),
            limit: 1000,
            cost: 100,
        };
        let (ticket, statuses) = node
            .admit(std::slice::from_ref(&ask), sim.now())
            .expect("value");
        assert_eq!(statuses[0].remaining, 900);
        ticket.settle(700);
        assert_eq!(
            node.status(&ask.pool, sim.now()).expect("value").remaining,
            300
        );
        // A call that produced nothing (it failed) counts nothing.
        let ticket = take(node, &ask, sim.now());
        drop(ticket);
        assert_eq!(
            node.status(&ask.pool, sim.now()).expect("value").remaining,
            300
        );
        let big = Ask { cost: 400, ..ask };
        assert!(node.admit(&[big], sim.now()).is_err());
    }

    #[test]
    fn concurrency_slots_come_back_when_calls_end() {
        let sim = Sim::new(1, START);
        let node = &sim.nodes[0];
        let ask = Ask {
            pool: PoolId::new(Scope::Customer, "c1", Kind::Parallel),
            limit: 2,
            cost: 1,
        };
        let first = take(node, &ask, sim.now());
        let second = take(node, &ask, sim.now());
        let refusal = node
            .admit(std::slice::from_ref(&ask), sim.now())
            .expect_err("refused");
        assert_eq!(refusal.retry_after_ms, 1000);
        drop(first);
        let third = take(node, &ask, sim.now());
        // In flight carries over into the next window.
        sim.clock.store(START + WINDOW_MS, Ordering::SeqCst);
        assert!(node.admit(std::slice::from_ref(&ask), sim.now()).is_err());
        second.settle(10);
        third.settle(10);
        assert!(node.admit(&[ask], sim.now()).is_ok());
    }

    /// At most the limit, and at least 95% of it.
    fn assert_within_limit(admitted: u64, limit: u64) {
        assert!(admitted <= limit, "admitted {admitted} of {limit}");
        assert!(
            admitted * 100 >= limit * 95,
            "admitted {admitted} of {limit}"
        );
    }

    /// Run a minute in which `offered(tick)` gives each node's requests for that tick.
    fn run_window(sim: &mut Sim, limit: u64, offered: impl Fn(u64) -> [u64; 3]) -> u64 {
        let mut admitted = 0;
        let ticks = WINDOW_MS / sim.tick_ms;
        for tick in 0..ticks - 1 {
            for (index, count) in offered(tick).into_iter().enumerate() {
                admitted += sim.offer(index, count, limit);
            }
            sim.tick();
        }
        eprintln!("admitted {admitted} of {limit}");
        admitted
    }

    #[test]
    fn three_nodes_with_even_demand_admit_the_limit_between_them() {
        let mut sim = Sim::new(3, START);
        let limit = 300;
        // 3L over the minute, evenly: 900 / 600 ticks, in bursts.
        let admitted = run_window(&mut sim, limit, |tick| {
            let n = u64::from(tick % 2 == 0);
            [n, n, n]
        });
        assert_within_limit(admitted, limit);
    }

    #[test]
    fn demand_moving_from_one_node_to_another_keeps_the_cluster_at_the_limit() {
        let mut sim = Sim::new(3, START);
        let limit = 300;
        // 3L: all on node 1 for half the window, then all on node 2.
        let admitted = run_window(&mut sim, limit, |tick| {
            if tick < 300 { [3, 0, 0] } else { [0, 3, 0] }
        });
        assert_within_limit(admitted, limit);
    }

    #[test]
    fn slow_demand_moving_between_nodes_still_gets_the_limit() {
        let mut sim = Sim::new(3, START);
        let limit = 300;
        // Just over L in all: the allowance must follow the traffic to be used.
        let admitted = run_window(&mut sim, limit, |tick| match tick {
            0..=199 => [1, 0, 0],
            200..=399 => [0, 1, 0],
            _ => [0, 0, 1],
        });
        assert_within_limit(admitted, limit);
    }

    #[test]
    fn uneven_demand_is_served_where_it_is() {
        let mut sim = Sim::new(3, START);
        let limit = 600;
        // Node 1 offers 1200, node 2 about 300, node 3 nothing.
        let admitted = run_window(&mut sim, limit, |tick| [2, u64::from(tick % 2 == 0), 0]);
        assert_within_limit(admitted, limit);
    }

    #[test]
    fn a_node_that_joins_mid_window_has_no_base_and_the_limit_holds() {
        let sim = Sim::before_any_exchange(3, START + 30_000);
        // Node 3 started during this window; 1 and 2 before it.
        let members = vec![
            Member {
                node_id: 1,
                started_ms: 0,
            },
            Member {
                node_id: 2,
                started_ms: 0,
            },
            Member {
                node_id: 3,
                started_ms: START + 20_000,
            },
        ];
        for node in &sim.nodes {
            node.exchange(members.clone(), Vec::new(), sim.now());
        }
        assert_eq!(sim.offer(2, 1, 10), 0);
        assert_eq!(sim.offer(0, 10, 10), 5);
    }

    #[test]
    fn a_node_that_dies_mid_window_keeps_its_share_until_the_window_ends() {
        let mut sim = Sim::new(3, START + 1_000);
        let limit = 30;
        // Node 3 uses its whole share, then dies.
        assert_eq!(sim.offer(2, 10, limit), 10);
        sim.tick();
        for _ in 0..20 {
            sim.clock.fetch_add(100, Ordering::SeqCst);
            sim.exchange_among(&[0, 1]);
        }
        // The survivors still split only their own two thirds.
        let admitted = sim.offer(0, 50, limit) + sim.offer(1, 50, limit);
        assert_eq!(admitted, 20);
        // In the next window the two of them share the whole limit.
        sim.clock.store(START + WINDOW_MS + 1_000, Ordering::SeqCst);
        sim.exchange_among(&[0, 1]);
        assert_eq!(sim.offer(0, 50, limit) + sim.offer(1, 50, limit), 30);
    }

    #[test]
    fn a_node_that_has_not_met_its_cluster_yet_takes_only_its_expected_share() {
        let clock = Arc::new(AtomicU64::new(START + 5_000));
        let node = {
            let clock = clock.clone();
            Arc::new(Limiter::with_clock(move || clock.load(Ordering::SeqCst)))
        };
        node.set_node_id(1);
        node.set_expected_nodes(3);
        // Just started: it sees only itself.
        node.exchange(
            vec![Member {
                node_id: 1,
                started_ms: START + 4_000,
            }],
            Vec::new(),
            START + 5_000,
        );
        let ask = Ask {
            pool: PoolId::new(Scope::Key, "k1", Kind::Requests),
            limit: 30,
            cost: 1,
        };
        let admitted = (0..30)
            .filter(|_| {
                node.admit(std::slice::from_ref(&ask), START + 5_000)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 10);
        // A node alone by configuration takes the whole limit.
        let alone = Arc::new(Limiter::new());
        alone.set_node_id(1);
        let now = alone.now_ms();
        let admitted = (0..30)
            .filter(|_| alone.admit(std::slice::from_ref(&ask), now).is_ok())
            .count();
        assert_eq!(admitted, 30);
    }

    #[test]
    fn slots_given_for_calls_in_flight_stay_given_across_windows() {
        let mut sim = Sim::new(2, START + 1_000);
        let pool = PoolId::new(Scope::Key, "k1", Kind::Parallel);
        let ask = Ask {
            pool: pool.clone(),
            limit: 10,
            cost: 1,
        };
        // Node 1 wants more than its 5 slots; node 2 gives it its spare ones.
        let mut held = Vec::new();
        for _ in 0..30 {
            if let Ok((ticket, _)) = sim.nodes[0].admit(std::slice::from_ref(&ask), sim.now()) {
                held.push(ticket);
            }
            sim.tick();
        }
        assert!(held.len() > 5, "node 1 got gifts: {}", held.len());
        // A new window: node 1's calls are still in flight, so node 2 must not get its slots
        // back.
        sim.clock.store(START + WINDOW_MS + 1_000, Ordering::SeqCst);
        sim.tick();
        sim.tick();
        let mut more = 0;
        for _ in 0..10 {
            if let Ok((ticket, _)) = sim.nodes[1].admit(std::slice::from_ref(&ask), sim.now()) {
                held.push(ticket);
                more += 1;
            }
        }
        assert!(
            held.len() <= 10,
            "{} in flight, {more} on node 2",
            held.len()
        );
    }

    #[test]
    fn a_request_larger_than_the_limit_is_refused_for_good_and_a_late_clock_undoes_nothing() {
        let sim = Sim::new(1, START + 1_000);
        let node = &sim.nodes[0];
        let huge = Ask {
            pool: PoolId::new(Scope::Key, "k1", Kind::Tokens),
            limit: 100,
            cost: 500,
        };
        let refusal = node
            .admit(std::slice::from_ref(&huge), sim.now())
            .expect_err("refused");
        assert!(refusal.too_large);
        assert_eq!(refusal.retry_after_ms, WINDOW_MS - 1_000);
        // Requests in the new window, then one whose clock was read before it began.
        let ask = Ask {
            pool: PoolId::new(Scope::Key, "k2", Kind::Requests),
            limit: 2,
            cost: 1,
        };
        let next = START + WINDOW_MS + 10;
        assert!(node.admit(std::slice::from_ref(&ask), next).is_ok());
        assert!(node.admit(std::slice::from_ref(&ask), next).is_ok());
        assert!(node.admit(std::slice::from_ref(&ask), next - 20).is_err());
        assert!(node.admit(std::slice::from_ref(&ask), next).is_err());
    }
}
