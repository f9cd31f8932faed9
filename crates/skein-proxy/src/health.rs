//! What the probes report: `/health/live` (the node works: its Raft core runs),
//! `/health/startup` (it has caught up with the cluster once) and `/health/ready` (it can serve
//! policy: caught up, not draining, and it sees a leader or saw one within the lease).
//!
//! A node that loses quorum keeps proxying from its last applied config; it stays ready for the
//! lease after it last saw a leader, then readiness turns off so that load balancers prefer
//! nodes of the majority. The node task that watches Raft sets these; read without locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The node's health, as the probes see it.
#[derive(Debug)]
pub struct NodeHealth {
    draining: AtomicBool,
    caught_up: AtomicBool,
    has_leader: AtomicBool,
    /// When a leader was last seen (ms since the epoch); 0: never.
    leader_seen_ms: AtomicU64,
    lease_ms: AtomicU64,
    raft_stopped: AtomicBool,
}

/// Why a probe fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Draining,
    CatchingUp,
    NoLeader,
    RaftStopped,
}

impl NotReady {
    pub fn label(self) -> &'static str {
        match self {
            NotReady::Draining => "draining",
            NotReady::CatchingUp => "catching_up",
            NotReady::NoLeader => "no_leader",
            NotReady::RaftStopped => "raft_stopped",
        }
    }
}

impl Default for NodeHealth {
    /// Healthy: a proxy without a control plane (unit tests) is ready at once; a node calls
    /// [`NodeHealth::joining`] before it starts.
    fn default() -> NodeHealth {
        NodeHealth {
            draining: AtomicBool::new(false),
            caught_up: AtomicBool::new(true),
            has_leader: AtomicBool::new(true),
            leader_seen_ms: AtomicU64::new(0),
            lease_ms: AtomicU64::new(u64::MAX),
            raft_stopped: AtomicBool::new(false),
        }
    }
}

impl NodeHealth {
    /// A node that has yet to catch up with its cluster, ready while it has seen a leader
    /// within `lease_ms`.
    pub fn joining(&self, lease_ms: u64) {
        self.caught_up.store(false, Ordering::Relaxed);
        self.has_leader.store(false, Ordering::Relaxed);
        self.lease_ms.store(lease_ms, Ordering::Relaxed);
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Relaxed);
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Whether a leader is known now (`now_ms`: the wall clock).
    pub fn set_leader(&self, known: bool, now_ms: u64) {
        self.has_leader.store(known, Ordering::Relaxed);
        if known {
            self.leader_seen_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn set_raft_stopped(&self) {
        self.raft_stopped.store(true, Ordering::Relaxed);
    }

    /// `/health/live`.
    pub fn live(&self) -> Result<(), NotReady> {
        if self.raft_stopped.load(Ordering::Relaxed) {
            return Err(NotReady::RaftStopped);
        }
        Ok(())
    }

    /// `/health/startup`.
    pub fn started(&self) -> Result<(), NotReady> {
        self.live()?;
        if !self.is_caught_up() {
            return Err(NotReady::CatchingUp);
        }
        Ok(())
    }

    /// `/health/ready`.
    pub fn ready(&self, now_ms: u64) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NotReady::Draining);
        }
        self.started()?;
        if self.has_leader.load(Ordering::Relaxed) {
            return Ok(());
        }
        let seen = self.leader_seen_ms.load(Ordering::Relaxed);
        let lease = self.lease_ms.load(Ordering::Relaxed);
        if seen > 0 && now_ms.saturating_sub(seen) < lease {
            return Ok(());
        }
        Err(NotReady::NoLeader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joining_node_is_ready_once_caught_up_and_while_its_lease_lasts() {
        let health = NodeHealth::default();
        assert_eq!(health.ready(1_000), Ok(()));
        health.joining(30_000);
        assert_eq!(health.started(), Err(NotReady::CatchingUp));
        assert_eq!(health.ready(1_000), Err(NotReady::CatchingUp));
        health.set_caught_up();
        assert_eq!(
            health.ready(1_000),
            Err(NotReady::NoLeader),
            "never saw a leader"
        );
        health.set_leader(true, 1_000);
        assert_eq!(health.ready(1_000), Ok(()));
        // The leader is gone: ready through the lease, then not.
        health.set_leader(false, 5_000);
        assert_eq!(health.ready(30_999), Ok(()));
        assert_eq!(health.ready(31_000), Err(NotReady::NoLeader));
        assert_eq!(health.started(), Ok(()), "startup stays passed");
        health.set_draining(true);
        assert_eq!(health.ready(1_000), Err(NotReady::Draining));
        health.set_raft_stopped();
        assert_eq!(health.live(), Err(NotReady::RaftStopped));
    }
}
