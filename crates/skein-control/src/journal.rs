//! The node's spend journal: settled spend written to local disk as it settles (a sled tree
//! next to the Raft log), before it is recorded in Raft. Entries are keyed by their spend
//! sequence; the node removes them once the replicated state shows that sequence, and puts
//! back those it does not show after a restart. An entry left behind by a crash between the
//! Raft apply and its removal is harmless: its sequence is at or below what the state applied,
//! so it is dropped (and a re-proposed one is refused as a duplicate).

/// The key of the covered-calls mark (entries have 8-byte keys).
const COVERED: &[u8] = b"covered";

/// The journal. Cheap to clone.
#[derive(Clone)]
pub struct SpendJournal {
    db: sled::Db,
    tree: sled::Tree,
}

impl SpendJournal {
    pub(crate) fn open(db: &sled::Db) -> Result<SpendJournal, String> {
        Ok(SpendJournal {
            db: db.clone(),
            tree: db
                .open_tree("spend_journal")
                .map_err(|error| error.to_string())?,
        })
    }

    /// Write an entry and wait until it is on disk.
    pub async fn append(&self, seq: u64, entry: &[u8]) -> Result<(), String> {
        self.tree
            .insert(seq.to_be_bytes(), entry)
            .map_err(|error| error.to_string())?;
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<(u64, Vec<u8>)>, String> {
        let mut entries = Vec::new();
        for row in self.tree.iter() {
            let (key, value) = row.map_err(|error| error.to_string())?;
            let Ok(bytes) = <[u8; 8]>::try_from(key.as_ref()) else {
                continue;
            };
            entries.push((u64::from_be_bytes(bytes), value.to_vec()));
        }
        Ok(entries)
    }

    /// Record that the replicated state accounts for the first `calls` calls settled on this
    /// node (the batches applied so far), before their entries are removed.
    pub fn set_covered(&self, calls: u64) -> Result<(), String> {
        let calls = calls.max(self.covered());
        self.tree
            .insert(COVERED, &calls.to_be_bytes())
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    /// What [`SpendJournal::set_covered`] last recorded.
    pub fn covered(&self) -> u64 {
        self.tree
            .get(COVERED)
            .ok()
            .flatten()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Remove the entries up to and including `seq` (recorded in Raft).
    pub fn remove_through(&self, seq: u64) -> Result<(), String> {
        for row in self.tree.range(..=seq.to_be_bytes()) {
            let (key, _) = row.map_err(|error| error.to_string())?;
            self.tree.remove(key).map_err(|error| error.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_survive_a_reopen_and_are_removed_through_a_sequence() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let db = sled::Config::new().path(dir.path()).open().expect("sled");
            let journal = SpendJournal::open(&db).expect("journal");
            for seq in [5u64, 300, 70_000] {
                journal
                    .append(seq, format!("e{seq}").as_bytes())
                    .await
                    .expect("append");
            }
        }
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let journal = SpendJournal::open(&db).expect("journal");
        let seqs: Vec<u64> = journal
            .entries()
            .expect("entries")
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(seqs, vec![5, 300, 70_000]);
        journal.remove_through(300).expect("remove");
        let left = journal.entries().expect("entries");
        assert_eq!(left, vec![(70_000, b"e70000".to_vec())]);
    }
}
