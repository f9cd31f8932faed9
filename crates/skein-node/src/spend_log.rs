//! The node's log of settled calls: one line per call, appended (a plain `write`, no fsync)
//! when the call settles, before the caller is answered. The write reaches the kernel at
//! once, so a crash of the process (`kill -9`) cannot lose it; a power cut can lose what the
//! kernel had not written out. The spend journal (sled, flushed) takes over within
//! milliseconds: once a journal entry accounts for every call the log holds, the log is
//! emptied. After a restart, the calls the log holds beyond what the journal and the
//! replicated state account for are counted again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use skein_core::accounting::{Settled, SettledCall};
use skein_types::control::{Nanos, SpendItem};

/// One settled call, as a line of the log.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    /// The number of calls settled on this node, this one included.
    n: u64,
    k: String,
    m: String,
    i: u64,
    o: u64,
    c: Nanos,
    /// The budgets the cost counts against.
    #[serde(default)]
    b: Vec<String>,
}

struct Open {
    file: File,
    /// The last call appended since the log was last emptied.
    last: u64,
    failed: bool,
}

/// The log file.
pub struct SpendLog {
    path: PathBuf,
    open: Mutex<Option<Open>>,
}

impl SpendLog {
    /// Open (or create) the log at `path`.
    pub fn open(path: &Path) -> SpendLog {
        let last = read_lines(path)
            .iter()
            .map(|line| line.n)
            .max()
            .unwrap_or(0);
        let file = OpenOptions::new().create(true).append(true).open(path);
        let open = match file {
            Ok(file) => Some(Open {
                file,
                last,
                failed: false,
            }),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot open the spend log: spend settled in the last moment before a crash may be lost");
                None
            }
        };
        SpendLog {
            path: path.to_owned(),
            open: Mutex::new(open),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        match self.open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Append a settled call.
    pub fn append(&self, settled: &Settled<'_>) {
        let line = Line {
            n: settled.call,
            k: settled.key_id.to_owned(),
            m: settled.model.to_owned(),
            i: settled.input_tokens,
            o: settled.output_tokens,
            c: settled.cost,
            b: settled.budgets.to_vec(),
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        let mut guard = self.lock();
        let Some(open) = guard.as_mut() else {
            return;
        };
        match open.file.write_all(&bytes) {
            Ok(()) => open.last = open.last.max(settled.call),
            Err(error) => {
                if !open.failed {
                    tracing::error!(path = %self.path.display(), %error, "cannot append to the spend log");
                }
                open.failed = true;
            }
        }
    }

    /// Empty the log if `through` accounts for every call in it (a journal entry covering
    /// them is on disk).
    pub fn covered(&self, through: u64) {
        let mut guard = self.lock();
        if let Some(open) = guard.as_mut()
            && open.last <= through
            && open.last > 0
        {
            if let Err(error) = open.file.set_len(0) {
                tracing::warn!(%error, "cannot empty the spend log");
            } else {
                open.last = 0;
            }
        }
    }

    /// The calls after `covered` in the log (of an earlier run), as spend items with their
    /// budget amounts, and the last call's number.
    pub fn unaccounted(&self, covered: u64) -> (Vec<SettledCall>, u64) {
        let mut calls = Vec::new();
        let mut last = 0;
        for line in read_lines(&self.path) {
            last = last.max(line.n);
            if line.n <= covered {
                continue;
            }
            let amounts = line
                .b
                .iter()
                .map(|budget| (budget.clone(), line.c))
                .collect();
            calls.push((
                SpendItem {
                    key_id: line.k,
                    model: line.m,
                    requests: 1,
                    input_tokens: line.i,
                    output_tokens: line.o,
                    cost_nanos: line.c,
                },
                amounts,
            ));
        }
        (calls, last)
    }
}

/// The whole lines of the log; a line cut by a crash is not a settled call.
fn read_lines(path: &Path) -> Vec<Line> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|text| serde_json::from_str::<Line>(&text).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(call: u64) -> Settled<'static> {
        Settled {
            call,
            key_id: "k",
            model: "p/m",
            input_tokens: 3,
            output_tokens: 4,
            cost: 10,
            budgets: &[],
        }
    }

    #[test]
    fn calls_after_the_covered_one_are_read_back_and_a_covered_log_is_emptied() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("spend.log");
        let log = SpendLog::open(&path);
        for call in 1..=4 {
            log.append(&settled(call));
        }
        // A line cut short by a crash.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(b"{\"n\":5,\"k\"")
            .expect("write");
        let (calls, last) = SpendLog::open(&path).unaccounted(2);
        assert_eq!(last, 4);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].0.cost_nanos, 10);
        log.covered(3);
        assert!(
            std::fs::metadata(&path).expect("meta").len() > 0,
            "call 4 is not covered"
        );
        log.covered(4);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        log.append(&settled(5));
        assert_eq!(SpendLog::open(&path).unaccounted(4).0.len(), 1);
    }
}
