//! Recording this node's settled spend, exactly once and across crashes:
//!
//! 1. **As a call settles**, before its caller is answered, it is appended to the spend log
//!    ([`SpendLog`], a plain write), which a crash of the process cannot lose.
//! 2. **Within milliseconds**, the journal writer takes what has settled into a journal entry
//!    (sled, flushed) under a spend sequence, and empties the log once an entry accounts for
//!    every call in it.
//! 3. **Every second**, the journaled entries go to Raft
//!    as one `RecordSpend` under the newest entry's sequence; once it is applied, the journal
//!    records how many calls the state accounts for, and drops the entries.
//! 4. **After a restart**, journal entries the state does not show are recorded one by one
//!    under their own sequences (a duplicate is refused), and calls the log holds beyond every
//!    entry and the state are counted again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skein_control::ControlPlane;
use skein_core::accounting::{JournalEntry, Ledger};
use skein_types::control::{Command, Nanos, Outcome, SpendItem};

use crate::spend_log::SpendLog;

/// How often settled spend is recorded in Raft.
pub const SPEND_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A journal entry as stored (its sequence is the key).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSpend {
    items: Vec<SpendItem>,
    amounts: Vec<(String, Nanos)>,
    #[serde(default)]
    through: u64,
}

/// This node's spend recording.
pub struct Spend {
    control: ControlPlane,
    ledger: Arc<Ledger>,
    log: Arc<SpendLog>,
    settled: Arc<tokio::sync::Notify>,
}

impl Spend {
    /// Open the log in `data_dir`, put back what a crash left unrecorded, and hook the log
    /// into every settlement.
    pub fn open(control: ControlPlane, ledger: Arc<Ledger>, data_dir: &Path) -> Spend {
        let log = Arc::new(SpendLog::open(&data_dir.join("spend.log")));
        let spend = Spend {
            control,
            ledger,
            log,
            settled: Arc::new(tokio::sync::Notify::new()),
        };
        spend.restore();
        let (log, settled) = (spend.log.clone(), spend.settled.clone());
        spend.ledger.on_settled(move |call| {
            log.append(call);
            settled.notify_one();
        });
        // Whatever was put back is journaled (and the log emptied) by the writer's first turn.
        spend.settled.notify_one();
        spend
    }

    fn applied_seq(&self) -> u64 {
        self.control
            .state()
            .spend_seqs
            .get(&self.control.id())
            .copied()
            .unwrap_or(0)
    }

    /// Put back the journal entries the replicated state does not show, and the logged calls
    /// no entry and no applied batch accounts for.
    fn restore(&self) {
        let journal = self.control.spend_journal();
        let applied = self.applied_seq();
        let entries = match journal.entries() {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(%error, "cannot read the spend journal");
                Vec::new()
            }
        };
        let mut covered = journal.covered();
        let mut restored = Vec::new();
        for (seq, bytes) in entries {
            let stored = match serde_json::from_slice::<StoredSpend>(&bytes) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::error!(seq, %error, "an unreadable spend journal entry");
                    continue;
                }
            };
            covered = covered.max(stored.through);
            if seq > applied {
                restored.push(JournalEntry {
                    seq,
                    items: stored.items,
                    amounts: stored.amounts,
                    through: stored.through,
                });
            }
        }
        if let Err(error) = journal.remove_through(applied) {
            tracing::warn!(%error, "cannot prune the spend journal");
        }
        let (calls, last) = self.log.unaccounted(covered);
        let requests: u64 = restored
            .iter()
            .flat_map(|entry| entry.items.iter())
            .map(|item| item.requests)
            .sum::<u64>()
            + calls.len() as u64;
        if requests > 0 {
            tracing::info!(
                entries = restored.len(),
                logged_calls = calls.len(),
                requests,
                "spend settled before the last stop and not yet recorded: recording it now"
            );
        }
        self.ledger.restore(restored);
        self.ledger.resettle(calls, covered.max(last));
    }

    /// Journal what settles, as it settles (one write at a time: what settles during a write
    /// goes into the next).
    pub async fn journal_continuously(self: Arc<Self>) {
        loop {
            self.settled.notified().await;
            self.write_journal().await;
        }
    }

    /// Move what has settled into journal entries and write them; empty the log once an
    /// entry on disk accounts for all of it.
    async fn write_journal(&self) {
        while let Some(entry) = self
            .ledger
            .take_journal_entry(skein_types::now_ms(), self.applied_seq())
        {
            let through = entry.through;
            let stored = StoredSpend {
                items: entry.items,
                amounts: entry.amounts,
                through,
            };
            let written = match serde_json::to_vec(&stored) {
                Ok(bytes) => self.control.spend_journal().append(entry.seq, &bytes).await,
                Err(error) => Err(error.to_string()),
            };
            match written {
                Ok(()) => self.log.covered(through),
                Err(error) => {
                    tracing::error!(%error, seq = entry.seq, "cannot write the spend journal")
                }
            }
        }
    }

    /// Record settled spend in Raft every `interval` (a lease's room does not depend on it:
    /// recorded or not, what a node spent counts against its lease).
    pub async fn flush_every(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.flush().await;
        }
    }

    /// Journal what has settled, then propose it: entries put back after a restart one by
    /// one, then the rest as one `RecordSpend`. A batch stays pending (and is retried with the
    /// same sequence) until it is known applied.
    pub async fn flush(&self) {
        self.write_journal().await;
        while self.ledger.has_restored() {
            if !self.flush_one_batch().await {
                return;
            }
        }
        self.flush_one_batch().await;
    }

    /// Propose one batch; whether it is known applied (or there was nothing to propose).
    async fn flush_one_batch(&self) -> bool {
        let control = &self.control;
        let Some(batch) = self
            .ledger
            .take_batch(skein_types::now_ms(), self.applied_seq())
        else {
            return true;
        };
        let command = Command::RecordSpend {
            node: control.id(),
            seq: batch.seq,
            items: batch.items,
        };
        match control.propose("spend", command).await {
            Ok(response) => match response.outcome {
                Outcome::Applied | Outcome::Duplicate => {
                    self.ledger.batch_applied(batch.seq);
                    let journal = control.spend_journal();
                    // First what the state now accounts for, then the entries go.
                    let pruned = journal
                        .set_covered(batch.through)
                        .and_then(|()| journal.remove_through(batch.seq));
                    if let Err(error) = pruned {
                        tracing::warn!(%error, "cannot prune the spend journal");
                    }
                    self.log.covered(batch.through);
                    true
                }
                other => {
                    tracing::error!(?other, "a spend batch was refused");
                    false
                }
            },
            Err(error) => {
                tracing::warn!(%error, seq = batch.seq, "spend not recorded yet; retrying");
                false
            }
        }
    }
}
