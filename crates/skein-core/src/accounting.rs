//! Money counted once and enforced everywhere, on one node's side:
//!
//! 1. Before a call, [`Ledger::reserve`] checks every hard budget of the key, its team and its
//!    customer, and holds the call's worst-case cost. Remaining budget is the replicated spend
//!    subtracted from the limit, minus what this node has settled but not yet recorded in Raft,
//!    minus its open reservations. On top of that, a node may only have `1/N` of the
//!    replicated remaining budget unrecorded or held at any time (`N` nodes in the cluster):
//!    the nodes' unrecorded spend then adds up to at most what remains, whatever the others
//!    do, and the overshoot is bounded by how far behind a node's *replicated* view is, plus
//!    one reservation per other node (a node holding nothing may always take one call the
//!    remainder covers; see the README). The share only binds when a budget is nearly spent relative to a node's
//!    spend per flush interval; then the node asks for an early flush.
//! 2. After the call, [`Reservation::settle`] replaces the hold with the real cost. A
//!    reservation dropped unsettled (a failed call) releases its hold; one settled from a
//!    stream's drop counts the tokens delivered before a client disconnected.
//! 3. Settled spend is taken out in small [`JournalEntry`]s as it settles, which the node
//!    writes to a local journal on disk at once, so that a crash of the process loses none
//!    of it; after a restart the entries the replicated state does not show are put back
//!    ([`Ledger::restore`]) and recorded under their own sequences.
//! 4. Every second the node takes a [`SpendBatch`] and proposes it as
//!    `RecordSpend{node, seq, items}`; the state machine applies each `(node, seq)` once, so
//!    a batch retried after a leader change is never counted twice. Only once it is applied
//!    does the node stop counting the batch locally.
//!
//! No I/O here: the node drives the flushing, the proxy the reservations.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use skein_types::control::{ControlState, Nanos, Price, SpendItem};

/// Output tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// A refused reservation: the budget that cannot cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    pub budget_id: String,
    pub limit_nanos: Nanos,
    pub remaining_nanos: Nanos,
    pub needed_nanos: Nanos,
    /// The budget has room, but not within this node's share of it until its recent spend
    /// is recorded (about a second): worth retrying.
    pub share_only: bool,
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
    /// A reservation hit the node's share: record spend now rather than at the next tick.
    flush_wanted: bool,
}

type SettledHook = Box<dyn Fn(&Settled<'_>) + Send + Sync>;

/// A settled call read back after a restart: its spend, and its amount per budget.
pub type SettledCall = (SpendItem, Vec<(String, Nanos)>);

/// This node's spend that the replicated state does not show yet.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    /// Told when a reservation asks for an early flush, so that the task recording spend need
    /// not poll for it.
    flush_waker: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Told of every call as it settles (the node appends it to its log, then wakes the
    /// journal writer).
    settled_hook: std::sync::OnceLock<SettledHook>,
}

impl Inner {
    /// What this node holds or has not yet seen recorded, against `budget_id`.
    fn local(&self, budget_id: &str) -> Nanos {
        let in_flight = self
            .in_flight
            .as_ref()
            .and_then(|(_, amounts)| amounts.get(budget_id).copied())
            .unwrap_or(0);
        let recorded: Nanos = self
            .recorded
            .iter()
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

    /// Forget recorded batches that `state` shows.
    fn prune(&mut self, state: &ControlState) {
        let shown = state.spend_seqs.get(&self.node).copied().unwrap_or(0);
        self.recorded.retain(|(seq, _)| *seq > shown);
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

    /// Call `wake` whenever a reservation asks for an early flush (see
    /// [`Ledger::take_flush_wanted`]). Set once, by the task that records spend; later calls
    /// are ignored.
    pub fn on_flush_wanted(&self, wake: impl Fn() + Send + Sync + 'static) {
        let _ = self.flush_waker.set(Box::new(wake));
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Hold `amount` against every hard budget of `key_id`, or say which budget cannot
    /// cover it. Budgets whose scope has no budget at all are unlimited.
    pub fn reserve(
        self: &Arc<Self>,
        state: &ControlState,
        key_id: &str,
        amount: Nanos,
        now_ms: u64,
        nodes: u64,
    ) -> Result<Reservation, BudgetExceeded> {
        let budgets = state.budgets_of_key(key_id);
        let mut inner = self.lock();
        inner.prune(state);
        let mut held = Vec::new();
        for budget in &budgets {
            if !budget.hard {
                continue;
            }
            let local = inner.local(&budget.id);
            let replicated_remaining = budget
                .limit_nanos
                .saturating_sub(state.budget_spent(&budget.id, now_ms));
            let remaining = replicated_remaining.saturating_sub(local);
            // A node with nothing pending may always take one call the remainder covers, so a
            // remainder smaller than N reservations is still usable (at the price of at most
            // one reservation per other node of overshoot).
            let share = (replicated_remaining / nodes.max(1)).max(amount.max(1));
            let needed = amount.max(1);
            if remaining < needed || local.saturating_add(needed) > share {
                let share_only = remaining >= needed;
                if share_only {
                    inner.flush_wanted = true;
                    if let Some(wake) = self.flush_waker.get() {
                        wake();
                    }
                }
                return Err(BudgetExceeded {
                    budget_id: budget.id.clone(),
                    limit_nanos: budget.limit_nanos,
                    remaining_nanos: remaining,
                    needed_nanos: amount,
                    share_only,
                });
            }
            held.push(budget.id.clone());
        }
        for budget in &held {
            *inner.reserved.entry(budget.clone()).or_default() += amount;
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

    /// Whether a reservation asked for an early flush (clears the request).
    pub fn take_flush_wanted(&self) -> bool {
        std::mem::take(&mut self.lock().flush_wanted)
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
        inner.prune(state);
        inner.local(budget_id)
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
        Budget, BudgetPeriod, Command, Limits, Proposal, Scope, VirtualKey,
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
        state
    }

    #[test]
    fn reservations_hold_settle_and_flush_once() {
        let state = state_with_budget(1_000);
        let ledger = Ledger::new();
        let first = ledger.reserve(&state, "k", 600, 0, 1).expect("fits");
        assert!(ledger.reserve(&state, "k", 600, 0, 1).is_err(), "held");
        first.settle("m", 10, 5, 300);
        assert_eq!(ledger.pending(&state, "b"), 300);
        let second = ledger.reserve(&state, "k", 600, 0, 1).expect("fits again");
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
                .reserve(&state, "k", cost, 0, 1)
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
            .reserve(&state, "k", 10, 0, 1)
            .expect("fits")
            .settle("m", 1, 1, 10);
        // The clock says 5 ms, but the state already applied a much later sequence.
        let batch = ledger.take_batch(5, 1_000_000).expect("batch");
        assert!(batch.seq > 1_000_000);
    }

    #[test]
    fn each_of_n_nodes_may_hold_a_share_of_what_remains() {
        let state = state_with_budget(900);
        let ledger = Ledger::new();
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        {
            let woken = woken.clone();
            ledger.on_flush_wanted(move || {
                woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // Three nodes: this one may have 300 unrecorded or held.
        let held = ledger
            .reserve(&state, "k", 200, 0, 3)
            .expect("within the share");
        let refused = ledger
            .reserve(&state, "k", 200, 0, 3)
            .err()
            .expect("beyond the share");
        assert!(refused.share_only, "the budget itself has room");
        assert_eq!(
            woken.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the recording task is told at once"
        );
        assert!(ledger.take_flush_wanted());
        assert!(!ledger.take_flush_wanted());
        drop(held);
        let exhausted = ledger
            .reserve(&state, "k", 1_000, 0, 1)
            .err()
            .expect("too big");
        assert!(!exhausted.share_only);
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
