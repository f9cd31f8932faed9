//! Money counted once and enforced everywhere, on one node's side:
//!
//! 1. **Escrow leases.** A node spends a hard budget only from a lease: money granted to it
//!    through Raft ([`Command::GrantLeases`](skein_types::control::Command)), which no other
//!    node can be granted until this node's spend is recorded against it or it gives the rest
//!    back. Before a call, [`Ledger::reserve`] holds the call's worst-case cost against the
//!    leases of every hard budget of the key, its team and its customer at once: what a
//!    lease has left is its grant, less the spend the state has recorded against it, less
//!    what this node has settled but not yet recorded, less its open reservations. When a
//!    lease is short, the reservation says what to ask for ([`Shortfall::Lease`]) and the
//!    node asks the leader for all of it in one command; the nodes' spend can never add up
//!    to more than the limit, on any number of nodes, partitioned or not. A lease running
//!    low or near its end is renewed in the background, and one not used for a while is
//!    given back.
//! 2. After the call, [`Reservation::settle`] replaces the hold with the real cost. A
//!    reservation dropped unsettled (a failed call) releases its hold; one settled from a
//!    stream's drop counts the tokens delivered before a client disconnected.
//! 3. Settled spend is taken out in small [`JournalEntry`]s as it settles, which the node
//!    writes to a local journal on disk at once, so that a crash of the process loses none
//!    of it; after a restart the entries the replicated state does not show are put back
//!    ([`Ledger::restore`]) and recorded under their own sequences.
//! 4. Every second the node takes a [`SpendBatch`] and proposes it as
//!    `RecordSpend{node, seq, items}`; the state machine applies each `(node, seq)` once, so
//!    a batch retried after a leader change is never counted twice, and counts it against
//!    the node's leases in the same step. Only once it is applied does the node stop
//!    counting the batch locally.
//!
//! No I/O here: the node drives the flushing and the grants, the proxy the reservations.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use skein_types::control::{
    ControlState, LEASE_TTL_MS, LeaseAsk, LeaseReturn, Nanos, Price, SpendItem,
};

/// Output tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// A refused reservation: the budget that cannot cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    pub budget_id: String,
    pub limit_nanos: Nanos,
    pub remaining_nanos: Nanos,
    pub needed_nanos: Nanos,
    /// The budget has room, but it is held in other nodes' leases until they spend it or
    /// give it back: worth retrying in a moment.
    pub leased_elsewhere: bool,
}

/// Why a reservation could not be made here and now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// A budget cannot cover the call.
    Exceeded(BudgetExceeded),
    /// This node's leases do not cover the call: ask for these (in one command), then try
    /// again.
    Lease(Vec<LeaseAsk>),
}

/// A lease ask is for at least this many of the call's worst-case cost, so that the calls
/// after it need no grant of their own.
pub const LEASE_CALLS: u64 = 16;

/// A lease not reserved from for this long is given back.
pub const LEASE_IDLE_MS: u64 = 10_000;

/// Recorded batches kept after the state shows them (batches go about once a second: any
/// snapshot a request still reads shows all but the last few).
const RECORDED_KEPT: usize = 32;

/// This node's use of its lease on one budget.
#[derive(Debug, Default, Clone)]
struct LeaseUse {
    /// When a reservation last held against it (this node's clock).
    last_use_ms: u64,
    /// Reserved against it in the current and the previous demand window.
    window_start_ms: u64,
    this_window: Nanos,
    last_window: Nanos,
    /// A renewal to ask for in the background, if any: (need, want).
    renew: Option<Nanos>,
    /// Part of the lease is being given back: nothing is reserved from it until the state
    /// shows the return (what is kept was counted when the return was proposed).
    returning: bool,
    /// The version that applied the last return: an older snapshot still shows the lease
    /// as it was before, and must not be reserved from.
    returned_at: u64,
}

/// Demand is measured over windows of this length; a lease is sized for about two of them.
const DEMAND_WINDOW_MS: u64 = 5_000;

impl LeaseUse {
    fn count(&mut self, now_ms: u64, amount: Nanos) {
        if now_ms >= self.window_start_ms.saturating_add(DEMAND_WINDOW_MS) {
            self.last_window =
                if now_ms >= self.window_start_ms.saturating_add(2 * DEMAND_WINDOW_MS) {
                    0
                } else {
                    self.this_window
                };
            self.this_window = 0;
            self.window_start_ms = now_ms;
        }
        self.this_window = self.this_window.saturating_add(amount);
        self.last_use_ms = now_ms;
    }

    /// What to hold for the next few seconds: about two windows of demand.
    fn want(&self, amount: Nanos) -> Nanos {
        amount
            .saturating_mul(LEASE_CALLS)
            .max(self.this_window.max(self.last_window).saturating_mul(2))
    }
}

/// The work on leases the node should do now (see [`Ledger::lease_work`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LeaseWork {
    /// Leases to renew or top up before they run out.
    pub renew: Vec<LeaseAsk>,
    /// Leases not used for a while, to give back.
    pub give_back: Vec<LeaseReturn>,
}

/// A batch of settled spend to record in Raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendBatch {
    pub seq: u64,
    pub items: Vec<SpendItem>,
    /// The number of calls settled on this node that this batch (with the ones before it)
    /// accounts for.
    pub through: u64,
}

/// One settled call, as the node's settle hook sees it (to append it to its log at once).
#[derive(Debug)]
pub struct Settled<'a> {
    /// The number of calls settled on this node, this one included.
    pub call: u64,
    pub key_id: &'a str,
    pub model: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Nanos,
    /// The budgets the cost counts against.
    pub budgets: &'a [String],
}

/// Settled spend, taken out of the ledger to be written to the node's journal; it is recorded
/// in Raft as part of a later batch whose sequence is at least its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: u64,
    pub items: Vec<SpendItem>,
    /// The spend per budget it counts against.
    pub amounts: Vec<(String, Nanos)>,
    /// The number of calls settled on this node that it (with the entries before it)
    /// accounts for.
    pub through: u64,
}

#[derive(Default)]
struct Inner {
    /// Open reservations per budget.
    reserved: HashMap<String, Nanos>,
    /// Settled, not yet taken into a batch, per budget.
    unflushed: HashMap<String, Nanos>,
    /// Settled, not yet taken into a batch, per key and model.
    items: BTreeMap<(String, String), SpendItem>,
    /// Settled spend taken into journal entries, not yet into a batch.
    journaled: Vec<JournalEntry>,
    /// Journal entries put back after a restart: each is recorded alone, under its own
    /// sequence, before any newer spend (the state may already have applied some of them:
    /// alone, those are refused as duplicates).
    restored: std::collections::VecDeque<JournalEntry>,
    /// The batch proposed and not yet known applied, with its per-budget amounts.
    in_flight: Option<(SpendBatch, HashMap<String, Nanos>)>,
    /// Batches known applied, counted here until the state a reservation is checked against
    /// shows them (the proxy's snapshot may trail the apply by a moment).
    recorded: Vec<(u64, HashMap<String, Nanos>)>,
    last_seq: u64,
    /// Calls settled on this node (across restarts).
    settled_calls: u64,
    /// This node's id, as `RecordSpend` names it.
    node: u64,
    /// This node's use of each budget's lease.
    leases: HashMap<String, LeaseUse>,
}

type SettledHook = Box<dyn Fn(&Settled<'_>) + Send + Sync>;

/// A settled call read back after a restart: its spend, and its amount per budget.
pub type SettledCall = (SpendItem, Vec<(String, Nanos)>);

/// This node's spend that the replicated state does not show yet.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    /// Told of every call as it settles (the node appends it to its log, then wakes the
    /// journal writer).
    settled_hook: std::sync::OnceLock<SettledHook>,
}

impl Inner {
    /// What this node holds or has not yet seen recorded, against `budget_id`, as a state
    /// that shows this node's batches through `shown` sees it.
    fn local(&self, budget_id: &str, shown: u64) -> Nanos {
        let in_flight = self
            .in_flight
            .as_ref()
            .and_then(|(_, amounts)| amounts.get(budget_id).copied())
            .unwrap_or(0);
        let recorded: Nanos = self
            .recorded
            .iter()
            .filter(|(seq, _)| *seq > shown)
            .filter_map(|(_, amounts)| amounts.get(budget_id).copied())
            .sum();
        let journaled: Nanos = self
            .journaled
            .iter()
            .chain(self.restored.iter())
            .flat_map(|entry| entry.amounts.iter())
            .filter(|(budget, _)| budget == budget_id)
            .map(|(_, amount)| *amount)
            .sum();
        self.reserved.get(budget_id).copied().unwrap_or(0)
            + self.unflushed.get(budget_id).copied().unwrap_or(0)
            + journaled
            + in_flight
            + recorded
    }

    /// The next sequence. Sequences grow across restarts too: they start from the clock, and
    /// never at or below what the state last applied for this node (a clock that went back,
    /// or a reused node id, must not turn new spend into "duplicates").
    fn next_seq(&mut self, now_ms: u64, applied_seq: u64) -> u64 {
        let seq = now_ms
            .saturating_mul(1024)
            .max(self.last_seq + 1)
            .max(applied_seq + 1);
        self.last_seq = seq;
        seq
    }

    /// Move what has settled into a journal entry.
    fn journal(&mut self, now_ms: u64, applied_seq: u64) -> Option<JournalEntry> {
        if self.items.is_empty() {
            return None;
        }
        let seq = self.next_seq(now_ms, applied_seq);
        let items: Vec<SpendItem> = std::mem::take(&mut self.items).into_values().collect();
        let mut amounts: Vec<(String, Nanos)> =
            std::mem::take(&mut self.unflushed).into_iter().collect();
        amounts.sort();
        let entry = JournalEntry {
            seq,
            items,
            amounts,
            through: self.settled_calls,
        };
        self.journaled.push(entry.clone());
        Some(entry)
    }

    /// Forget recorded batches that `state` shows, but the last [`RECORDED_KEPT`] of them:
    /// a reservation checked against a snapshot a little older than `state` (taken by a
    /// request just before) must still count them. The sequence `state` shows.
    fn prune(&mut self, state: &ControlState) -> u64 {
        let shown = state.spend_seqs.get(&self.node).copied().unwrap_or(0);
        let visible = self
            .recorded
            .iter()
            .filter(|(seq, _)| *seq <= shown)
            .count();
        if visible > RECORDED_KEPT {
            let mut drop = visible - RECORDED_KEPT;
            self.recorded.retain(|(seq, _)| {
                let gone = drop > 0 && *seq <= shown;
                drop -= usize::from(gone);
                !gone
            });
        }
        shown
    }
}

impl Ledger {
    pub fn new() -> Arc<Ledger> {
        Arc::new(Ledger::default())
    }

    /// Set this node's id (spend batches are recorded under it).
    pub fn set_node(&self, node: u64) {
        self.lock().node = node;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Hold `amount` against the leases of every hard budget of `key_id` (see
    /// [`Ledger::reserve_up_to`]).
    pub fn reserve(
        self: &Arc<Self>,
        state: &ControlState,
        key_id: &str,
        amount: Nanos,
        now_ms: u64,
    ) -> Result<Reservation, Shortfall> {
        self.reserve_up_to(state, key_id, amount, amount, now_ms)
    }

    /// Hold as much as the leases of every hard budget of `key_id` (its team's, its
    /// customer's) cover between `least` and `most`, at once on all of them; or say which
    /// budget cannot cover `least`, or what to ask for. Budgets whose scope has none are
    /// unlimited. A call that sets its own output limit holds its worst case (`least ==
    /// most`); one that does not holds what the budget allows up to a default, and the
    /// caller limits its output to what was held ([`Reservation::amount`]).
    pub fn reserve_up_to(
        self: &Arc<Self>,
        state: &ControlState,
        key_id: &str,
        least: Nanos,
        most: Nanos,
        now_ms: u64,
    ) -> Result<Reservation, Shortfall> {
        let budgets = state.budgets_of_key(key_id);
        let least = least.max(1);
        let most = most.max(least);
        let mut inner = self.lock();
        let shown = inner.prune(state);
        let node = inner.node;
        let mut covered = most;
        let mut asks = Vec::new();
        for budget in &budgets {
            if !budget.hard {
                continue;
            }
            let local = inner.local(&budget.id, shown);
            // Hopeless whatever a grant could give: refuse without asking.
            let unrecorded_room = budget
                .limit_nanos
                .saturating_sub(state.budget_spent(&budget.id, now_ms))
                .saturating_sub(local);
            if unrecorded_room < least {
                return Err(Shortfall::Exceeded(BudgetExceeded {
                    budget_id: budget.id.clone(),
                    limit_nanos: budget.limit_nanos,
                    remaining_nanos: unrecorded_room,
                    needed_nanos: least,
                    leased_elsewhere: false,
                }));
            }
            let lease = state.lease(&budget.id, node);
            let outstanding = lease.map_or(0, |lease| lease.outstanding());
            let usage = inner.leases.entry(budget.id.clone()).or_default();
            let usable = lease.is_some_and(|lease| now_ms < lease.until_ms)
                && !usage.returning
                && state.version >= usage.returned_at;
            let left = if usable {
                outstanding.saturating_sub(local)
            } else {
                0
            };
            if left < least {
                // What the lease lacks for the call (its outstanding part counts again once
                // a grant renews it), and enough for the calls after it.
                let need = least
                    .saturating_add(local)
                    .saturating_sub(outstanding)
                    .max(1);
                asks.push(LeaseAsk {
                    budget: budget.id.clone(),
                    need,
                    want: usage.want(most).max(need),
                });
                continue;
            }
            covered = covered.min(left);
        }
        if !asks.is_empty() {
            // Renew the leases that did cover the call in the same command.
            for budget in &budgets {
                if budget.hard && !asks.iter().any(|ask| ask.budget == budget.id) {
                    let want = inner
                        .leases
                        .get(&budget.id)
                        .map_or(most, |usage| usage.want(most));
                    asks.push(LeaseAsk {
                        budget: budget.id.clone(),
                        need: 0,
                        want,
                    });
                }
            }
            return Err(Shortfall::Lease(asks));
        }
        let amount = covered;
        let mut held = Vec::new();
        for budget in &budgets {
            if !budget.hard {
                continue;
            }
            *inner.reserved.entry(budget.id.clone()).or_default() += amount;
            let lease = state.lease(&budget.id, node);
            let local = inner.local(&budget.id, shown);
            let usage = inner.leases.entry(budget.id.clone()).or_default();
            usage.count(now_ms, amount);
            // Running low, or near its end: renew in the background before calls must wait.
            if let Some(lease) = lease {
                let left = lease.outstanding().saturating_sub(local);
                let want = usage.want(most);
                let ending = lease.until_ms < now_ms.saturating_add(LEASE_TTL_MS / 2);
                if left < want / 2 || ending {
                    usage.renew = Some(want.saturating_sub(left));
                }
            }
            held.push(budget.id.clone());
        }
        // Spend counts against soft budgets too, once settled.
        let counted = budgets.iter().map(|budget| budget.id.clone()).collect();
        Ok(Reservation {
            ledger: self.clone(),
            key_id: key_id.to_owned(),
            held,
            counted,
            amount,
            done: false,
        })
    }

    /// What to do about leases now: renewals the reservations asked for, and leases of this
    /// node not reserved from for [`LEASE_IDLE_MS`], to give back (keeping what this node
    /// has not yet seen recorded or still holds).
    pub fn lease_work(&self, state: &ControlState, now_ms: u64) -> LeaseWork {
        let mut inner = self.lock();
        let shown = inner.prune(state);
        let node = inner.node;
        let mut work = LeaseWork::default();
        let budgets: Vec<String> = inner.leases.keys().cloned().collect();
        for budget in budgets {
            let held = state.lease(&budget, node).map(|lease| lease.granted_nanos);
            let local = inner.local(&budget, shown);
            let Some(usage) = inner.leases.get_mut(&budget) else {
                continue;
            };
            let idle = usage.last_use_ms.saturating_add(LEASE_IDLE_MS) < now_ms;
            if idle {
                usage.renew = None;
                if let Some(granted) = held
                    && !usage.returning
                {
                    usage.returning = true;
                    work.give_back.push(LeaseReturn {
                        budget: budget.clone(),
                        keep: local,
                        granted: Some(granted),
                    });
                }
                continue;
            }
            if let Some(want) = usage.renew.take() {
                work.renew.push(LeaseAsk {
                    budget,
                    need: 0,
                    want,
                });
            }
        }
        work
    }

    /// Give back this node's leases on `budgets` (all of them: `None`), keeping what it has
    /// not yet seen recorded or still holds: the returns to propose. Nothing is reserved
    /// from those leases until [`Ledger::returned`] says the state shows the returns, so
    /// what is kept stays enough.
    pub fn give_back(&self, state: &ControlState, budgets: Option<&[String]>) -> Vec<LeaseReturn> {
        let mut inner = self.lock();
        let shown = inner.prune(state);
        let node = inner.node;
        let chosen: Vec<String> = match budgets {
            Some(budgets) => budgets.to_vec(),
            None => inner.leases.keys().cloned().collect(),
        };
        let mut returns = Vec::new();
        for budget in chosen {
            let Some(granted) = state.lease(&budget, node).map(|lease| lease.granted_nanos) else {
                continue;
            };
            let keep = inner.local(&budget, shown);
            let usage = inner.leases.entry(budget.clone()).or_default();
            if usage.returning {
                continue;
            }
            usage.returning = true;
            returns.push(LeaseReturn {
                budget,
                keep,
                granted: Some(granted),
            });
        }
        returns
    }

    /// The returns of [`Ledger::give_back`] (or [`LeaseWork::give_back`]) were applied at
    /// `version`: the leases may be reserved from again, in snapshots at that version or
    /// later. With `None` the proposal's fate is unknown (it may still commit): nothing is
    /// reserved from those leases until a later grant ([`Ledger::granted`]), after which a
    /// late return is ignored by the state (it names the grant it saw).
    pub fn returned(&self, returns: &[LeaseReturn], version: Option<u64>) {
        let mut inner = self.lock();
        for returned in returns {
            if let Some(usage) = inner.leases.get_mut(&returned.budget) {
                usage.returning = false;
                usage.returned_at = match version {
                    Some(version) if usage.returned_at != u64::MAX => {
                        usage.returned_at.max(version)
                    }
                    Some(_) => usage.returned_at,
                    None => u64::MAX,
                };
            }
        }
    }

    /// A grant on `budgets` was applied at `version`: leases held back after a return of
    /// unknown fate may be reserved from again, in snapshots at that version or later.
    pub fn granted(&self, budgets: &[String], version: u64) {
        let mut inner = self.lock();
        for budget in budgets {
            if let Some(usage) = inner.leases.get_mut(budget)
                && usage.returned_at == u64::MAX
            {
                usage.returned_at = version;
            }
        }
    }

    /// This node's id (leases and spend batches are under it).
    pub fn node(&self) -> u64 {
        self.lock().node
    }

    /// Call `hook` with every call as it settles, before the caller answers (for the node's
    /// log, and to wake the journal writer). Set once.
    pub fn on_settled(&self, hook: impl Fn(&Settled<'_>) + Send + Sync + 'static) {
        let _ = self.settled_hook.set(Box::new(hook));
    }

    /// Count again calls that settled before a restart and were in no journal entry (read
    /// back from the node's log); `through`: the last of them.
    pub fn resettle(&self, calls: Vec<SettledCall>, through: u64) {
        let mut inner = self.lock();
        for (call, amounts) in calls {
            for (budget, amount) in amounts {
                *inner.unflushed.entry(budget).or_default() += amount;
            }
            let item = inner
                .items
                .entry((call.key_id.clone(), call.model.clone()))
                .or_insert_with(|| SpendItem {
                    requests: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    cost_nanos: 0,
                    ..call.clone()
                });
            item.requests += call.requests;
            item.input_tokens += call.input_tokens;
            item.output_tokens += call.output_tokens;
            item.cost_nanos += call.cost_nanos;
        }
        inner.settled_calls = inner.settled_calls.max(through);
    }

    /// Take what has settled since the last entry, to write to the journal. `None` when
    /// nothing has.
    pub fn take_journal_entry(&self, now_ms: u64, applied_seq: u64) -> Option<JournalEntry> {
        self.lock().journal(now_ms, applied_seq)
    }

    /// Put back journal entries found after a restart (those the state does not show).
    pub fn restore(&self, mut entries: Vec<JournalEntry>) {
        let mut inner = self.lock();
        entries.sort_by_key(|entry| entry.seq);
        for entry in entries {
            inner.last_seq = inner.last_seq.max(entry.seq);
            inner.settled_calls = inner.settled_calls.max(entry.through);
            inner.restored.push_back(entry);
        }
    }

    /// Whether journal entries put back after a restart are still to be recorded (the node
    /// records them one after another, without waiting for the next interval).
    pub fn has_restored(&self) -> bool {
        !self.lock().restored.is_empty()
    }

    /// Take the spend to record: the batch still in flight (a retry, same sequence), or a new
    /// one of every journal entry and everything settled since, under the sequence of its
    /// newest entry. `None` when there is nothing to record.
    pub fn take_batch(&self, now_ms: u64, applied_seq: u64) -> Option<SpendBatch> {
        let mut inner = self.lock();
        if let Some((batch, _)) = &inner.in_flight {
            return Some(batch.clone());
        }
        inner.journal(now_ms, applied_seq);
        let entries = match inner.restored.pop_front() {
            Some(restored) => vec![restored],
            None => std::mem::take(&mut inner.journaled),
        };
        let last = entries.last()?;
        let (seq, through) = (last.seq, last.through);
        let mut items: BTreeMap<(String, String), SpendItem> = BTreeMap::new();
        let mut amounts: HashMap<String, Nanos> = HashMap::new();
        for entry in entries {
            for item in entry.items {
                match items.entry((item.key_id.clone(), item.model.clone())) {
                    std::collections::btree_map::Entry::Vacant(vacant) => {
                        vacant.insert(item);
                    }
                    std::collections::btree_map::Entry::Occupied(mut occupied) => {
                        let merged = occupied.get_mut();
                        merged.requests += item.requests;
                        merged.input_tokens += item.input_tokens;
                        merged.output_tokens += item.output_tokens;
                        merged.cost_nanos += item.cost_nanos;
                    }
                }
            }
            for (budget, amount) in entry.amounts {
                *amounts.entry(budget).or_default() += amount;
            }
        }
        let batch = SpendBatch {
            seq,
            items: items.into_values().collect(),
            through,
        };
        inner.in_flight = Some((batch.clone(), amounts));
        Some(batch)
    }

    /// The batch `seq` is applied (or was a duplicate): the replicated state counts it now.
    pub fn batch_applied(&self, seq: u64) {
        let mut inner = self.lock();
        if inner
            .in_flight
            .as_ref()
            .is_some_and(|(batch, _)| batch.seq == seq)
            && let Some((batch, amounts)) = inner.in_flight.take()
        {
            inner.recorded.push((batch.seq, amounts));
        }
    }

    /// What this node holds or has not yet seen recorded in `state`, per budget.
    pub fn pending(&self, state: &ControlState, budget_id: &str) -> Nanos {
        let mut inner = self.lock();
        let shown = inner.prune(state);
        inner.local(budget_id, shown)
    }
}

/// A hold on budgets for one call. Settle it with the real usage; dropping it unsettled
/// releases the hold.
pub struct Reservation {
    ledger: Arc<Ledger>,
    key_id: String,
    held: Vec<String>,
    counted: Vec<String>,
    amount: Nanos,
    done: bool,
}

impl Reservation {
    /// Replace the hold with the real cost of the call.
    pub fn settle(mut self, model: &str, input_tokens: u64, output_tokens: u64, cost: Nanos) {
        self.finish(Some((model, input_tokens, output_tokens, cost)));
    }

    /// The amount held.
    pub fn amount(&self) -> Nanos {
        self.amount
    }

    fn finish(&mut self, usage: Option<(&str, u64, u64, Nanos)>) {
        if self.done {
            return;
        }
        self.done = true;
        let mut inner = self.ledger.lock();
        for budget in &self.held {
            if let Some(reserved) = inner.reserved.get_mut(budget) {
                *reserved = reserved.saturating_sub(self.amount);
                if *reserved == 0 {
                    inner.reserved.remove(budget);
                }
            }
        }
        let Some((model, input_tokens, output_tokens, cost)) = usage else {
            return;
        };
        for budget in &self.counted {
            *inner.unflushed.entry(budget.clone()).or_default() += cost;
        }
        let item = inner
            .items
            .entry((self.key_id.clone(), model.to_owned()))
            .or_insert_with(|| SpendItem {
                key_id: self.key_id.clone(),
                model: model.to_owned(),
                requests: 0,
                input_tokens: 0,
                output_tokens: 0,
                cost_nanos: 0,
            });
        item.requests += 1;
        item.input_tokens += input_tokens;
        item.output_tokens += output_tokens;
        item.cost_nanos += cost;
        inner.settled_calls += 1;
        let call = inner.settled_calls;
        drop(inner);
        if let Some(hook) = self.ledger.settled_hook.get() {
            hook(&Settled {
                call,
                key_id: &self.key_id,
                model,
                input_tokens,
                output_tokens,
                cost,
                budgets: &self.counted,
            });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Built-in prices (nano-dollars per token: input, output), for well-known models. Operators
/// override or add prices through the control plane.
const BUILT_IN_PRICES: &[(&str, Nanos, Nanos)] = &[
    ("gpt-4o", 2_500, 10_000),
    ("gpt-4o-mini", 150, 600),
    ("gpt-4.1", 2_000, 8_000),
    ("gpt-4.1-mini", 400, 1_600),
    ("gpt-4.1-nano", 100, 400),
    ("o3", 2_000, 8_000),
    ("o4-mini", 1_100, 4_400),
    ("text-embedding-3-small", 20, 0),
    ("text-embedding-3-large", 130, 0),
    ("claude-sonnet-4-5", 3_000, 15_000),
    ("claude-opus-4-1", 15_000, 75_000),
    ("claude-haiku-4-5", 1_000, 5_000),
    ("gemini-2.5-pro", 1_250, 10_000),
    ("gemini-2.5-flash", 300, 2_500),
];

/// The price of a call: an override for the name the client asked for, then for
/// `provider/model`, then for the upstream model, then the built-in table. `None` if unknown
/// (such calls cost nothing).
pub fn price_of(
    state: &ControlState,
    requested: &str,
    provider: &str,
    model: &str,
) -> Option<Price> {
    for name in [
        requested.to_owned(),
        format!("{provider}/{model}"),
        model.to_owned(),
    ] {
        if let Some(price) = state.prices.get(&name) {
            return Some(price.clone());
        }
    }
    BUILT_IN_PRICES
        .iter()
        .find(|(name, _, _)| *name == model)
        .map(|(name, input, output)| Price {
            model: (*name).to_owned(),
            input_nanos_per_token: *input,
            output_nanos_per_token: *output,
            cached_input_nanos_per_token: None,
        })
}

/// The cost of `input` and `output` tokens, `cached` of the input served from cache.
pub fn cost(price: &Price, input: u64, cached: u64, output: u64) -> Nanos {
    let cached = cached.min(input);
    let cached_price = price
        .cached_input_nanos_per_token
        .unwrap_or(price.input_nanos_per_token);
    (input - cached)
        .saturating_mul(price.input_nanos_per_token)
        .saturating_add(cached.saturating_mul(cached_price))
        .saturating_add(output.saturating_mul(price.output_nanos_per_token))
}

/// Worst-case input tokens of a request body: about one token per three bytes (English text
/// averages four; JSON framing and other scripts run denser).
pub fn estimate_input_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_types::control::{
        Budget, BudgetPeriod, Command, Limits, Outcome, Proposal, Scope, VirtualKey,
    };

    fn state_with_budget(limit: Nanos) -> ControlState {
        let mut state = ControlState::default();
        let proposal = |command| Proposal {
            actor: "test".into(),
            at_ms: 0,
            command,
            create_only: false,
        };
        state.apply(
            1,
            &proposal(Command::CreateKey {
                key: VirtualKey {
                    id: "k".into(),
                    name: "k".into(),
                    hash: "a".repeat(64),
                    prefix: "sk".into(),
                    owner: None,
                    team: None,
                    models: vec![],
                    limits: Limits::default(),
                    expires_at_ms: None,
                    revoked: false,
                    metadata: Default::default(),
                    created_at_ms: 0,
                    updated_at_ms: 0,
                },
            }),
        );
        state.apply(
            2,
            &proposal(Command::PutBudget {
                budget: Budget {
                    id: "b".into(),
                    scope: Scope::Key("k".into()),
                    limit_nanos: limit,
                    period: BudgetPeriod::Lifetime,
                    hard: true,
                },
            }),
        );
        // This node (0) holds the whole budget as its lease.
        grant(&mut state, 3, 0, limit);
        state
    }

    fn grant(state: &mut ControlState, version: u64, node: u64, amount: Nanos) -> Outcome {
        state.apply(
            version,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::GrantLeases {
                    node,
                    asks: vec![LeaseAsk {
                        budget: "b".into(),
                        need: amount,
                        want: amount,
                    }],
                },
                create_only: false,
            },
        )
    }

    #[test]
    fn reservations_hold_settle_and_flush_once() {
        let state = state_with_budget(1_000);
        let ledger = Ledger::new();
        let first = ledger.reserve(&state, "k", 600, 0).expect("fits");
        assert!(ledger.reserve(&state, "k", 600, 0).is_err(), "held");
        first.settle("m", 10, 5, 300);
        assert_eq!(ledger.pending(&state, "b"), 300);
        let second = ledger.reserve(&state, "k", 600, 0).expect("fits again");
        drop(second);
        assert_eq!(
            ledger.pending(&state, "b"),
            300,
            "a dropped hold is released"
        );

        let batch = ledger.take_batch(5, 0).expect("batch");
        assert_eq!(batch.items.len(), 1);
        assert_eq!(batch.items[0].cost_nanos, 300);
        assert_eq!(
            ledger.take_batch(6, 0),
            Some(batch.clone()),
            "retried as is"
        );
        assert_eq!(ledger.pending(&state, "b"), 300, "counted until applied");
        ledger.batch_applied(batch.seq);
        assert_eq!(
            ledger.pending(&state, "b"),
            300,
            "counted until the state shows it"
        );
        let mut applied = state.clone();
        applied.apply(
            9,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::RecordSpend {
                    node: 0,
                    seq: batch.seq,
                    items: Vec::new(),
                },
                create_only: false,
            },
        );
        assert_eq!(ledger.pending(&applied, "b"), 0);
        assert_eq!(ledger.take_batch(7, 0), None);
    }

    #[test]
    fn journal_entries_are_recorded_once_in_the_next_batch_and_survive_a_restart() {
        let state = state_with_budget(1_000);
        let ledger = Ledger::new();
        let settle = |ledger: &Arc<Ledger>, cost| {
            ledger
                .reserve(&state, "k", cost, 0)
                .expect("fits")
                .settle("m", 1, 1, cost);
        };
        settle(&ledger, 10);
        settle(&ledger, 20);
        let first = ledger.take_journal_entry(1, 0).expect("entry");
        assert_eq!(first.items[0].requests, 2);
        assert_eq!(first.amounts, vec![("b".to_owned(), 30)]);
        assert_eq!(ledger.take_journal_entry(2, 0), None, "nothing new settled");
        settle(&ledger, 5);
        let second = ledger.take_journal_entry(3, 0).expect("entry");
        assert!(second.seq > first.seq);
        // Journaled spend still counts against the budget on this node.
        assert_eq!(ledger.pending(&state, "b"), 35);
        let batch = ledger.take_batch(4, 0).expect("batch");
        assert_eq!(
            batch.seq, second.seq,
            "the batch carries its newest entry's sequence"
        );
        assert_eq!(batch.items.len(), 1);
        assert_eq!(batch.items[0].requests, 3);
        assert_eq!(batch.items[0].cost_nanos, 35);
        assert_eq!(ledger.pending(&state, "b"), 35);

        // A restarted node puts back the entries its state does not show; each is recorded
        // alone under its own sequence, and new spend comes after them.
        let restarted = Ledger::new();
        restarted.restore(vec![second.clone(), first.clone()]);
        assert_eq!(restarted.pending(&state, "b"), 35);
        settle(&restarted, 1);
        for expected in [&first, &second] {
            let replayed = restarted.take_batch(0, 0).expect("batch");
            assert_eq!(replayed.seq, expected.seq);
            assert_eq!(replayed.items, expected.items);
            restarted.batch_applied(replayed.seq);
        }
        let newer = restarted.take_batch(0, 0).expect("batch");
        assert!(
            newer.seq > second.seq,
            "new spend after the restored entries"
        );
        assert_eq!(newer.items[0].requests, 1);
    }

    #[test]
    fn sequences_stay_above_what_the_state_applied() {
        let state = state_with_budget(1_000);
        let ledger = Ledger::new();
        ledger
            .reserve(&state, "k", 10, 0)
            .expect("fits")
            .settle("m", 1, 1, 10);
        // The clock says 5 ms, but the state already applied a much later sequence.
        let batch = ledger.take_batch(5, 1_000_000).expect("batch");
        assert!(batch.seq > 1_000_000);
    }

    #[test]
    fn a_node_spends_only_its_lease_and_asks_for_more_for_the_whole_hierarchy() {
        let mut state = state_with_budget(0);
        // A budget of 900 with no lease yet for this node.
        state.apply(
            10,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::PutBudget {
                    budget: Budget {
                        id: "b".into(),
                        scope: Scope::Key("k".into()),
                        limit_nanos: 900,
                        period: BudgetPeriod::Lifetime,
                        hard: true,
                    },
                },
                create_only: false,
            },
        );
        let ledger = Ledger::new();
        let Err(Shortfall::Lease(asks)) = ledger.reserve(&state, "k", 200, 0) else {
            panic!("no lease yet: ask for one");
        };
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].need, 200);
        assert_eq!(asks[0].want, 200 * LEASE_CALLS);
        // Another node holds 600 of it: 300 is left to grant, and this node gets half of
        // what is free beyond its need... at most what is free.
        assert_eq!(grant(&mut state, 11, 7, 600), Outcome::Applied);
        state.apply(
            12,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::GrantLeases {
                    node: 0,
                    asks: asks.clone(),
                },
                create_only: false,
            },
        );
        let lease = state.lease("b", 0).expect("granted").clone();
        assert_eq!(
            lease.granted_nanos, 200,
            "half of the 300 free, at least the need"
        );
        let held = ledger
            .reserve(&state, "k", 200, 0)
            .expect("within the lease");
        let Err(Shortfall::Lease(more)) = ledger.reserve(&state, "k", 200, 0) else {
            panic!("the lease is in use");
        };
        // 100 free, 600 with node 7: the need cannot be granted.
        let refused = state.clone().apply(
            13,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::GrantLeases {
                    node: 0,
                    asks: more,
                },
                create_only: false,
            },
        );
        let Outcome::Rejected(rejection) = refused else {
            panic!("granted beyond the limit: {refused:?}");
        };
        assert_eq!(rejection.field.as_deref(), Some("leased"));
        // Less than the need, up to the default: what the lease covers.
        drop(held);
        let capped = ledger
            .reserve_up_to(&state, "k", 50, 1_000, 0)
            .expect("covered in part");
        assert_eq!(capped.amount(), 200);
        // After its end the lease covers nothing until it is renewed.
        drop(capped);
        assert!(matches!(
            ledger.reserve(&state, "k", 10, lease.until_ms),
            Err(Shortfall::Lease(_))
        ));
        // Asking for more than the limit less the spend is refused without a grant.
        assert!(matches!(
            ledger.reserve(&state, "k", 1_000, 0),
            Err(Shortfall::Exceeded(BudgetExceeded {
                leased_elsewhere: false,
                ..
            }))
        ));
    }

    #[test]
    fn idle_leases_are_given_back_keeping_what_is_unrecorded() {
        let state = state_with_budget(1_000);
        let ledger = Ledger::new();
        ledger
            .reserve(&state, "k", 100, 0)
            .expect("fits")
            .settle("m", 1, 1, 40);
        assert!(ledger.lease_work(&state, 1_000).give_back.is_empty());
        let work = ledger.lease_work(&state, LEASE_IDLE_MS + 1);
        assert_eq!(
            work.give_back,
            vec![LeaseReturn {
                budget: "b".into(),
                keep: 40,
                granted: Some(1_000),
            }]
        );
        // Until the return is applied, nothing is reserved from the lease, nor given back
        // twice.
        assert!(matches!(
            ledger.reserve(&state, "k", 10, LEASE_IDLE_MS + 2),
            Err(Shortfall::Lease(_))
        ));
        assert!(ledger.give_back(&state, None).is_empty());
        ledger.returned(&work.give_back, Some(state.version + 1));
        // A snapshot from before the return still shows the lease whole: not reserved from.
        assert!(matches!(
            ledger.reserve(&state, "k", 10, LEASE_IDLE_MS + 2),
            Err(Shortfall::Lease(_))
        ));
        assert_eq!(
            ledger.give_back(&state, Some(&["b".to_owned()])),
            vec![LeaseReturn {
                budget: "b".into(),
                keep: 40,
                granted: Some(1_000),
            }]
        );
    }

    #[test]
    fn costs_use_overrides_then_the_built_in_table() {
        let mut state = ControlState::default();
        assert_eq!(price_of(&state, "alias", "p", "unknown-model"), None);
        let builtin = price_of(&state, "alias", "openai", "gpt-4o").expect("built in");
        assert_eq!(cost(&builtin, 1_000, 0, 100), 2_500_000 + 1_000_000);
        state.apply(
            1,
            &Proposal {
                actor: "test".into(),
                at_ms: 0,
                command: Command::PutPrice {
                    price: Price {
                        model: "alias".into(),
                        input_nanos_per_token: 1,
                        output_nanos_per_token: 2,
                        cached_input_nanos_per_token: Some(0),
                    },
                },
                create_only: false,
            },
        );
        let overridden = price_of(&state, "alias", "openai", "gpt-4o").expect("override");
        assert_eq!(cost(&overridden, 100, 40, 10), 60 + 20);
    }
}
