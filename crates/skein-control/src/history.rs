//! Usage history, kept out of the replicated state: each node derives it from the spend
//! batches it applies and keeps it in a sled tree of its own, indexed for the usage queries and
//! pruned by age. The snapshot Raft ships carries live config and budget ledgers only, so it
//! stays proportional to the config however long the cluster has been spending.
//!
//! Layout of the tree (`key` ids never hold a NUL: they are checked on write):
//! - `t` key `\0` model → lifetime totals of a key and model;
//! - `y` day (8 bytes, big-endian UTC day start in ms) key `\0` model → that day's totals;
//! - `m:applied` → the log index of the last spend batch recorded (re-applying the log after a
//!   restart skips what is already here, so every batch counts once);
//! - `m:from` → the time from which this node's history is complete (0: since the cluster
//!   began; later when the node caught up from a snapshot and missed the batches before it).
//!
//! Totals are four little-endian `u64`s: requests, input tokens, output tokens, cost in nanos.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use skein_types::control::{LegacyUsage, SpendItem, UsageTotals};

const DAY_MS: u64 = 86_400_000;
const APPLIED: &[u8] = b"m:applied";
const FROM: &[u8] = b"m:from";
const TOTALS: u8 = b't';
const DAYS: u8 = b'y';

/// One applied spend batch, as the state machine hands it over.
pub struct SpendRecord<'a> {
    /// The batch's log index.
    pub index: u64,
    /// When it was proposed (the proposer's clock, as in the log).
    pub at_ms: u64,
    pub items: &'a [SpendItem],
}

/// What a usage query selects. Empty strings and zero times mean "any".
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub key_id: String,
    pub model: String,
    /// All time when both are zero; otherwise whole UTC days, from the one that holds
    /// `since_ms` up to (not including) the one that starts at or after `until_ms`.
    pub since_ms: u64,
    pub until_ms: u64,
}

/// The node's usage history store.
pub struct History {
    tree: sled::Tree,
    retention_days: u64,
    /// Days before this one have been pruned (in memory: after a restart the first batch
    /// prunes again, which finds nothing or what the retention dropped meanwhile).
    pruned_before: AtomicU64,
}

impl History {
    /// Open the history in `db`, keeping `retention_days` UTC days of daily totals
    /// (lifetime totals are kept for as long as the key has history).
    pub fn open(db: &sled::Db, retention_days: u64) -> sled::Result<History> {
        Ok(History {
            tree: db.open_tree("usage_history")?,
            retention_days: retention_days.max(1),
            pruned_before: AtomicU64::new(0),
        })
    }

    fn meta(&self, name: &[u8]) -> sled::Result<u64> {
        Ok(self.tree.get(name)?.map_or(0, |bytes| decode_u64(&bytes)))
    }

    /// The log index of the last spend batch recorded.
    pub fn applied(&self) -> sled::Result<u64> {
        self.meta(APPLIED)
    }

    /// From when this node's history is complete (ms; 0 means since the cluster began).
    pub fn complete_from_ms(&self) -> sled::Result<u64> {
        self.meta(FROM)
    }

    /// How many days of daily totals are kept.
    pub fn retention_days(&self) -> u64 {
        self.retention_days
    }

    /// Record applied spend batches (in log order), skipping those already recorded. One
    /// atomic sled batch: the totals, the day rows, the pruning and the new watermark.
    pub fn record(&self, records: &[SpendRecord<'_>]) -> sled::Result<()> {
        let applied = self.applied()?;
        let mut deltas: BTreeMap<Vec<u8>, UsageTotals> = BTreeMap::new();
        let mut last = applied;
        let mut newest_day = 0;
        for record in records.iter().filter(|record| record.index > applied) {
            last = last.max(record.index);
            let day = record.at_ms - record.at_ms % DAY_MS;
            newest_day = newest_day.max(day);
            for item in record.items {
                if item.key_id.contains('\0') {
                    continue;
                }
                deltas
                    .entry(totals_key(&item.key_id, &item.model))
                    .or_default()
                    .add(item);
                deltas
                    .entry(day_key(day, &item.key_id, &item.model))
                    .or_default()
                    .add(item);
            }
        }
        if last == applied {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, delta) in deltas {
            let mut totals = self
                .tree
                .get(&key)?
                .map(|bytes| decode_totals(&bytes))
                .unwrap_or_default();
            totals.merge(&delta);
            batch.insert(key, encode_totals(&totals).to_vec());
        }
        let cutoff = newest_day.saturating_sub((self.retention_days - 1) * DAY_MS);
        if cutoff > self.pruned_before.load(Ordering::Relaxed) {
            let end = [&[DAYS][..], &cutoff.to_be_bytes()].concat();
            for entry in self.tree.range(vec![DAYS]..end) {
                let (key, _) = entry?;
                batch.remove(key);
            }
        }
        batch.insert(APPLIED, last.to_le_bytes().to_vec());
        self.tree.apply_batch(batch)?;
        self.pruned_before.fetch_max(cutoff, Ordering::Relaxed);
        Ok(())
    }

    /// The state moved to a snapshot at `index`: the batches before it that were never
    /// recorded here are missing, so the history is complete only from `now_ms` on.
    pub fn skip_to(&self, index: u64, now_ms: u64) -> sled::Result<()> {
        if index <= self.applied()? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, index.to_le_bytes().to_vec());
        batch.insert(FROM, now_ms.to_le_bytes().to_vec());
        self.tree.apply_batch(batch)
    }

    /// Take in the usage a snapshot of an earlier version carried, once (when this history
    /// has recorded nothing yet).
    pub fn import_legacy(&self, legacy: &LegacyUsage, index: u64) -> sled::Result<()> {
        if legacy.totals.is_empty() && legacy.daily.is_empty() {
            return Ok(());
        }
        if self.applied()? > 0 {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key_id, models) in &legacy.totals {
            for (model, totals) in models {
                batch.insert(totals_key(key_id, model), encode_totals(totals).to_vec());
            }
        }
        for (key_id, days) in &legacy.daily {
            for (day, models) in days {
                for (model, totals) in models {
                    batch.insert(day_key(*day, key_id, model), encode_totals(totals).to_vec());
                }
            }
        }
        batch.insert(APPLIED, index.to_le_bytes().to_vec());
        self.tree.apply_batch(batch)
    }

    /// Usage by `(key id, model)` for the query; `keep_key` filters keys further (by team).
    pub fn query(
        &self,
        query: &UsageQuery,
        keep_key: impl Fn(&str) -> bool,
    ) -> sled::Result<BTreeMap<(String, String), UsageTotals>> {
        let mut found: BTreeMap<(String, String), UsageTotals> = BTreeMap::new();
        let mut add = |key_id: &str, model: &str, bytes: &[u8]| {
            if (query.model.is_empty() || query.model == model)
                && (query.key_id.is_empty() || query.key_id == key_id)
                && keep_key(key_id)
            {
                found
                    .entry((key_id.to_owned(), model.to_owned()))
                    .or_default()
                    .merge(&decode_totals(bytes));
            }
        };
        if query.since_ms == 0 && query.until_ms == 0 {
            let mut prefix = vec![TOTALS];
            if !query.key_id.is_empty() {
                prefix.extend_from_slice(query.key_id.as_bytes());
                prefix.push(0);
            }
            for entry in self.tree.scan_prefix(prefix) {
                let (key, value) = entry?;
                if let Some((key_id, model)) = split_key_model(&key[1..]) {
                    add(key_id, model, &value);
                }
            }
            return Ok(found);
        }
        let first_day = query.since_ms - query.since_ms % DAY_MS;
        let until = if query.until_ms == 0 {
            u64::MAX
        } else {
            query.until_ms
        };
        if until <= first_day {
            return Ok(found);
        }
        let start = [&[DAYS][..], &first_day.to_be_bytes()].concat();
        let rows: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if query.key_id.is_empty() {
                // Every row of the days in range (the `y` rows are ordered by day first).
                let end = [&[DAYS][..], &until.to_be_bytes()].concat();
                Box::new(self.tree.range(start..end))
            } else {
                // One prefix per day that has rows: jump from day to day.
                Box::new(self.days_of_key(first_day, until, &query.key_id))
            };
        for entry in rows {
            let (key, value) = entry?;
            if key.len() < 9 {
                continue;
            }
            if let Some((key_id, model)) = split_key_model(&key[9..]) {
                add(key_id, model, &value);
            }
        }
        Ok(found)
    }

    /// The day rows of one key from `first_day` to before `until`.
    fn days_of_key(
        &self,
        first_day: u64,
        until: u64,
        key_id: &str,
    ) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + use<> {
        let tree = self.tree.clone();
        let key_id = key_id.as_bytes().to_vec();
        let mut day = first_day;
        let mut current: Option<sled::Iter> = None;
        std::iter::from_fn(move || {
            loop {
                if let Some(rows) = current.as_mut() {
                    if let Some(row) = rows.next() {
                        return Some(row);
                    }
                    current = None;
                    day = day.checked_add(DAY_MS)?;
                }
                // The next day at or after `day` that has any row.
                let start = [&[DAYS][..], &day.to_be_bytes()].concat();
                let next = match tree.range(start..).next()? {
                    Ok((key, _)) => key,
                    Err(error) => return Some(Err(error)),
                };
                if next.first() != Some(&DAYS) || next.len() < 9 {
                    return None;
                }
                day = decode_be(&next[1..9]);
                if day >= until {
                    return None;
                }
                let mut prefix = [&[DAYS][..], &day.to_be_bytes()].concat();
                prefix.extend_from_slice(&key_id);
                prefix.push(0);
                current = Some(tree.scan_prefix(prefix));
            }
        })
    }
}

fn totals_key(key_id: &str, model: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + key_id.len() + model.len());
    key.push(TOTALS);
    key.extend_from_slice(key_id.as_bytes());
    key.push(0);
    key.extend_from_slice(model.as_bytes());
    key
}

fn day_key(day: u64, key_id: &str, model: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(10 + key_id.len() + model.len());
    key.push(DAYS);
    key.extend_from_slice(&day.to_be_bytes());
    key.extend_from_slice(key_id.as_bytes());
    key.push(0);
    key.extend_from_slice(model.as_bytes());
    key
}

fn split_key_model(bytes: &[u8]) -> Option<(&str, &str)> {
    let split = bytes.iter().position(|byte| *byte == 0)?;
    let key_id = std::str::from_utf8(&bytes[..split]).ok()?;
    let model = std::str::from_utf8(&bytes[split + 1..]).ok()?;
    Some((key_id, model))
}

fn encode_totals(totals: &UsageTotals) -> [u8; 32] {
    let mut bytes = [0; 32];
    for (slot, value) in bytes.chunks_exact_mut(8).zip([
        totals.requests,
        totals.input_tokens,
        totals.output_tokens,
        totals.cost_nanos,
    ]) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

fn decode_totals(bytes: &[u8]) -> UsageTotals {
    let field = |at: usize| bytes.get(at * 8..at * 8 + 8).map_or(0, decode_u64);
    UsageTotals {
        requests: field(0),
        input_tokens: field(1),
        output_tokens: field(2),
        cost_nanos: field(3),
    }
}

/// The first 8 bytes of `bytes`, zero-padded.
fn word(bytes: &[u8]) -> [u8; 8] {
    let mut word = [0; 8];
    let len = bytes.len().min(8);
    word[..len].copy_from_slice(&bytes[..len]);
    word
}

fn decode_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(word(bytes))
}

fn decode_be(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(word(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key_id: &str, model: &str, cost: u64) -> SpendItem {
        SpendItem {
            key_id: key_id.to_owned(),
            model: model.to_owned(),
            requests: 1,
            input_tokens: 10,
            output_tokens: 5,
            cost_nanos: cost,
        }
    }

    fn open(retention_days: u64) -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled");
        let history = History::open(&db, retention_days).expect("history");
        (dir, history)
    }

    const DAY0: u64 = 1_795_305_600_000; // 2026-11-22T00:00Z

    #[test]
    fn batches_count_once_and_are_found_by_key_model_and_day() {
        let (_dir, history) = open(400);
        let first = [item("k1", "m1", 100), item("k2", "m1", 7)];
        let second = [item("k1", "m1", 50), item("k1", "m2", 1)];
        let records = [
            SpendRecord {
                index: 3,
                at_ms: DAY0 + 5,
                items: &first,
            },
            SpendRecord {
                index: 4,
                at_ms: DAY0 + DAY_MS + 5,
                items: &second,
            },
        ];
        history.record(&records).expect("record");
        // A restart re-applies the log after the snapshot: nothing counts twice.
        history.record(&records).expect("again");
        assert_eq!(history.applied().expect("applied"), 4);

        let all = history
            .query(&UsageQuery::default(), |_| true)
            .expect("all");
        assert_eq!(all[&("k1".into(), "m1".into())].cost_nanos, 150);
        assert_eq!(all[&("k1".into(), "m1".into())].requests, 2);
        assert_eq!(all[&("k2".into(), "m1".into())].cost_nanos, 7);
        assert_eq!(all.len(), 3);

        let day_two = UsageQuery {
            since_ms: DAY0 + DAY_MS + 1_000,
            ..UsageQuery::default()
        };
        let found = history.query(&day_two, |_| true).expect("day two");
        assert_eq!(found.len(), 2);
        assert_eq!(found[&("k1".into(), "m1".into())].cost_nanos, 50);

        let one_key = UsageQuery {
            key_id: "k1".into(),
            since_ms: DAY0,
            until_ms: DAY0 + 2 * DAY_MS,
            ..UsageQuery::default()
        };
        let found = history.query(&one_key, |_| true).expect("one key");
        assert_eq!(found[&("k1".into(), "m1".into())].cost_nanos, 150);
        assert_eq!(found[&("k1".into(), "m2".into())].cost_nanos, 1);
        assert_eq!(found.len(), 2);

        let first_day_only = UsageQuery {
            key_id: "k1".into(),
            since_ms: DAY0,
            until_ms: DAY0 + DAY_MS,
            model: "m1".into(),
        };
        let found = history.query(&first_day_only, |_| true).expect("first day");
        assert_eq!(found[&("k1".into(), "m1".into())].cost_nanos, 100);
        assert_eq!(found.len(), 1);

        let filtered = history
            .query(&UsageQuery::default(), |key| key == "k2")
            .expect("filtered");
        assert_eq!(filtered.len(), 1);
    }

    #[test]
    fn days_older_than_the_retention_are_pruned() {
        let (_dir, history) = open(2);
        let spend = [item("k", "m", 1)];
        for day in 0..5u64 {
            history
                .record(&[SpendRecord {
                    index: day + 1,
                    at_ms: DAY0 + day * DAY_MS,
                    items: &spend,
                }])
                .expect("record");
        }
        let since_start = UsageQuery {
            since_ms: DAY0,
            ..UsageQuery::default()
        };
        let kept = history.query(&since_start, |_| true).expect("kept");
        assert_eq!(kept[&("k".into(), "m".into())].requests, 2, "two days kept");
        let lifetime = history
            .query(&UsageQuery::default(), |_| true)
            .expect("lifetime");
        assert_eq!(lifetime[&("k".into(), "m".into())].requests, 5);
    }

    #[test]
    fn a_snapshot_jump_marks_where_the_history_is_complete_from() {
        let (_dir, history) = open(400);
        assert_eq!(history.complete_from_ms().expect("from"), 0);
        history.skip_to(10, DAY0).expect("skip");
        assert_eq!(history.complete_from_ms().expect("from"), DAY0);
        let spend = [item("k", "m", 1)];
        history
            .record(&[SpendRecord {
                index: 9,
                at_ms: DAY0,
                items: &spend,
            }])
            .expect("record");
        assert!(
            history
                .query(&UsageQuery::default(), |_| true)
                .expect("all")
                .is_empty(),
            "a batch inside the snapshot is not recorded again"
        );
    }
}
