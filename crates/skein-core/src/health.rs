//! Per-key health on this node: a circuit breaker with cooldown and a half-open probe.
//!
//! All state is atomics so the request path takes no lock. Times are milliseconds on a
//! monotonic clock chosen by the caller (`now_ms`), which keeps the logic testable.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use skein_types::BreakerSpec;

/// Whether a key may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Healthy: use it.
    Open,
    /// The cooldown is over and this caller holds the single probe: its result decides.
    Probe,
    /// Cooling down until this time (ms), or waiting on another request's probe.
    CoolingUntil(u64),
}

/// What kind of failure an attempt had, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 429: cool down at once, for `retry_after_ms` if the upstream said.
    RateLimited { retry_after_ms: Option<u64> },
    /// 5xx, timeout or connection error: counts towards tripping.
    Transient,
}

/// Circuit breaker state for one provider key.
#[derive(Debug, Default)]
pub struct KeyHealth {
    consecutive_failures: AtomicU32,
    /// How many times the breaker tripped in a row (doubles the cooldown).
    trips: AtomicU32,
    /// 0 when not cooling down.
    cooldown_until_ms: AtomicU64,
    probe_in_flight: AtomicBool,
}

impl KeyHealth {
    /// Take over another key's state (the same key in a rebuilt config). A probe in flight
    /// is not carried: the new config's key may be probed afresh.
    pub fn inherit(&self, previous: &KeyHealth) {
        self.consecutive_failures.store(
            previous.consecutive_failures.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.trips
            .store(previous.trips.load(Ordering::Relaxed), Ordering::Relaxed);
        self.cooldown_until_ms.store(
            previous.cooldown_until_ms.load(Ordering::Acquire),
            Ordering::Release,
        );
    }

    /// May a request use this key now?
    pub fn admit(&self, now_ms: u64) -> Admission {
        let until = self.cooldown_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Open;
        }
        if now_ms < until {
            return Admission::CoolingUntil(until);
        }
        // Cooldown over: exactly one caller gets to probe.
        match self.probe_in_flight.compare_exchange(
            false,
            true,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Admission::Probe,
            // Another probe is out; look again shortly.
            Err(_) => Admission::CoolingUntil(now_ms + 100),
        }
    }

    /// The key answered well.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.cooldown_until_ms.load(Ordering::Acquire) != 0 {
            self.trips.store(0, Ordering::Relaxed);
            self.cooldown_until_ms.store(0, Ordering::Release);
        }
        self.probe_in_flight.store(false, Ordering::Release);
    }

    /// The key failed. Returns the new cooldown end if the key is now cooling down.
    pub fn record_failure(
        &self,
        kind: FailureKind,
        policy: &BreakerSpec,
        now_ms: u64,
    ) -> Option<u64> {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let was_probe = self.probe_in_flight.swap(false, Ordering::AcqRel);
        let cooldown_ms = match kind {
            FailureKind::RateLimited {
                retry_after_ms: Some(retry_after),
            } => retry_after.min(policy.max_cooldown_ms).max(1),
            FailureKind::RateLimited {
                retry_after_ms: None,
            } => self.next_trip_cooldown(policy),
            FailureKind::Transient if was_probe || failures >= policy.after_failures => {
                self.next_trip_cooldown(policy)
            }
            FailureKind::Transient => return None,
        };
        let until = now_ms + cooldown_ms;
        // Never shorten a cooldown already in force.
        let previous = self.cooldown_until_ms.fetch_max(until, Ordering::AcqRel);
        Some(previous.max(until))
    }

    fn next_trip_cooldown(&self, policy: &BreakerSpec) -> u64 {
        let trips = self.trips.fetch_add(1, Ordering::Relaxed).min(16);
        policy
            .cooldown_ms
            .saturating_mul(1u64 << trips)
            .min(policy.max_cooldown_ms)
    }

    /// Give back a probe that was never sent (the request ended before using the key).
    pub fn release_probe(&self) {
        self.probe_in_flight.store(false, Ordering::Release);
    }

    /// Cool the key down until `until_ms` (this node's clock) because another node saw it
    /// fail; never shortens a cooldown in force, and leaves the failure counts alone.
    pub fn impose_cooldown(&self, until_ms: u64) {
        self.cooldown_until_ms.fetch_max(until_ms, Ordering::AcqRel);
    }

    /// When the key's cooldown ends (0 when healthy), for metrics and status.
    pub fn cooldown_until_ms(&self) -> u64 {
        self.cooldown_until_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerSpec {
        BreakerSpec {
            after_failures: 2,
            cooldown_ms: 1_000,
            max_cooldown_ms: 3_000,
        }
    }

    #[test]
    fn trips_after_consecutive_failures_then_probes_once() {
        let health = KeyHealth::default();
        assert_eq!(
            health.record_failure(FailureKind::Transient, &policy(), 0),
            None
        );
        assert_eq!(health.admit(0), Admission::Open);
        assert_eq!(
            health.record_failure(FailureKind::Transient, &policy(), 10),
            Some(1_010)
        );
        assert_eq!(health.admit(500), Admission::CoolingUntil(1_010));
        assert_eq!(health.admit(1_010), Admission::Probe);
        assert!(matches!(health.admit(1_011), Admission::CoolingUntil(_)));
        // The probe fails: cooldown doubles.
        assert_eq!(
            health.record_failure(FailureKind::Transient, &policy(), 1_020),
            Some(3_020)
        );
        assert_eq!(health.admit(3_020), Admission::Probe);
        health.record_success();
        assert_eq!(health.admit(3_021), Admission::Open);
        assert_eq!(health.cooldown_until_ms(), 0);
    }

    #[test]
    fn rate_limits_cool_down_at_once_for_retry_after_capped() {
        let health = KeyHealth::default();
        let until = health.record_failure(
            FailureKind::RateLimited {
                retry_after_ms: Some(2_000),
            },
            &policy(),
            0,
        );
        assert_eq!(until, Some(2_000));
        // A shorter one later does not shorten it.
        let until = health.record_failure(
            FailureKind::RateLimited {
                retry_after_ms: Some(10),
            },
            &policy(),
            5,
        );
        assert_eq!(until, Some(2_000));
        let capped = KeyHealth::default().record_failure(
            FailureKind::RateLimited {
                retry_after_ms: Some(999_999),
            },
            &policy(),
            0,
        );
        assert_eq!(capped, Some(3_000));
    }
}
