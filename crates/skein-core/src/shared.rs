//! What nodes tell each other about upstreams (soft state, carried by gossip): per provider
//! key its cooldown, its use this minute and the upstream's last `x-ratelimit-*` figures; per
//! deployment (provider and model) its error rate and latency. This module holds the values,
//! their wire form and the merge rules; it does no I/O.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use http::HeaderMap;

/// An error rate that forgets: each attempt moves it a fifth of the way towards 0 (success)
/// or 1 (failure), and it halves every [`DecayingRate::HALF_LIFE_MS`] without attempts, so a
/// deployment that stopped failing (and gets little traffic because of it) recovers.
#[derive(Debug, Default)]
pub struct DecayingRate {
    /// The rate as of the last attempt, and when that was (`None` before any attempt).
    inner: Mutex<(f64, Option<Instant>)>,
}

impl DecayingRate {
    pub const HALF_LIFE_MS: f64 = 5_000.0;

    fn lock(&self) -> std::sync::MutexGuard<'_, (f64, Option<Instant>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn decayed((value, since): (f64, Option<Instant>), now: Instant) -> f64 {
        let Some(since) = since else {
            return value;
        };
        let elapsed = now.saturating_duration_since(since).as_secs_f64() * 1000.0;
        value * 0.5f64.powf(elapsed / Self::HALF_LIFE_MS)
    }

    pub fn record_at(&self, failed: bool, now: Instant) {
        let mut inner = self.lock();
        let current = Self::decayed(*inner, now);
        let target = if failed { 1.0 } else { 0.0 };
        *inner = (current + (target - current) / 5.0, Some(now));
    }

    pub fn record(&self, failed: bool) {
        self.record_at(failed, Instant::now());
    }

    pub fn value_at(&self, now: Instant) -> f64 {
        Self::decayed(*self.lock(), now)
    }

    pub fn value(&self) -> f64 {
        self.value_at(Instant::now())
    }

    /// Whether an attempt was recorded within `ms`.
    pub fn active_within(&self, ms: u64) -> bool {
        self.lock()
            .1
            .is_some_and(|at| at.elapsed().as_millis() < u128::from(ms))
    }

    pub fn inherit(&self, previous: &DecayingRate) {
        let value = *previous.lock();
        *self.lock() = value;
    }
}

/// The other nodes' view of a deployment, merged: their mean error rate and latency.
#[derive(Debug, Default)]
pub struct RemoteDeploymentView {
    error_ppm: AtomicU32,
    latency_us: AtomicU64,
    /// How many nodes reported (0: no one else uses it).
    nodes: AtomicU32,
}

impl RemoteDeploymentView {
    pub fn set(&self, reports: &[DeploymentReport]) {
        let count = reports.len() as u64;
        if count == 0 {
            self.nodes.store(0, Ordering::Relaxed);
            return;
        }
        let error: u64 = reports.iter().map(|r| u64::from(r.error_ppm)).sum();
        let timed: Vec<u64> = reports
            .iter()
            .map(|r| r.latency_us)
            .filter(|l| *l > 0)
            .collect();
        let latency = if timed.is_empty() {
            0
        } else {
            timed.iter().fold(0u64, |sum, l| sum.saturating_add(*l)) / timed.len() as u64
        };
        self.error_ppm
            .store((error / count) as u32, Ordering::Relaxed);
        self.latency_us.store(latency, Ordering::Relaxed);
        self.nodes.store(count as u32, Ordering::Relaxed);
    }

    /// `(mean error rate, mean latency µs (0 unknown), nodes)`.
    pub fn get(&self) -> (f64, u64, u32) {
        (
            f64::from(self.error_ppm.load(Ordering::Relaxed)) / 1e6,
            self.latency_us.load(Ordering::Relaxed),
            self.nodes.load(Ordering::Relaxed),
        )
    }
}

/// One node's report on a deployment: `error_ppm latency_us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeploymentReport {
    pub error_ppm: u32,
    pub latency_us: u64,
}

impl DeploymentReport {
    pub fn encode(&self) -> String {
        format!("{} {}", self.error_ppm, self.latency_us)
    }

    pub fn decode(text: &str) -> Option<DeploymentReport> {
        // Later fields (a refresh stamp) are ignored.
        let mut parts = text.split(' ');
        let (error, latency) = (parts.next()?, parts.next()?);
        Some(DeploymentReport {
            error_ppm: error.parse::<u32>().ok()?.min(1_000_000),
            // At most an hour: a bogus figure cannot overflow a sum.
            latency_us: latency.parse::<u64>().ok()?.min(3_600_000_000),
        })
    }
}

/// What an upstream said about a key's quota in its `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaObservation {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// Wall-clock ms when it was seen.
    pub at_ms: u64,
}

/// How long an upstream's quota figures are trusted (they change with every request).
pub const QUOTA_FRESH_MS: u64 = 10_000;
/// A key with less than this share of its quota left is tried after the others.
pub const QUOTA_TIGHT_FRACTION: f64 = 0.1;

impl QuotaObservation {
    /// Read OpenAI's (`x-ratelimit-*-requests/tokens`) and Anthropic's
    /// (`anthropic-ratelimit-*`) headers; `None` when there are none. The clock is read only
    /// when there are.
    pub fn from_headers(
        headers: &HeaderMap,
        now_ms: impl FnOnce() -> u64,
    ) -> Option<QuotaObservation> {
        let mut observation = QuotaObservation {
            limit_requests: None,
            remaining_requests: None,
            limit_tokens: None,
            remaining_tokens: None,
            at_ms: 0,
        };
        // One pass over the headers (a response has a handful to a few dozen), rather than a
        // hashed lookup of each of the eight names.
        for (name, value) in headers {
            let field = match name.as_str() {
                "x-ratelimit-limit-requests" | "anthropic-ratelimit-requests-limit" => {
                    &mut observation.limit_requests
                }
                "x-ratelimit-remaining-requests" | "anthropic-ratelimit-requests-remaining" => {
                    &mut observation.remaining_requests
                }
                "x-ratelimit-limit-tokens" | "anthropic-ratelimit-tokens-limit" => {
                    &mut observation.limit_tokens
                }
                "x-ratelimit-remaining-tokens" | "anthropic-ratelimit-tokens-remaining" => {
                    &mut observation.remaining_tokens
                }
                _ => continue,
            };
            if field.is_none() {
                *field = value
                    .to_str()
                    .ok()
                    .and_then(|value| value.trim().parse::<u64>().ok());
            }
        }
        if observation.remaining_requests.is_none() && observation.remaining_tokens.is_none() {
            return None;
        }
        observation.at_ms = now_ms();
        Some(observation)
    }

    /// Whether, as of this observation, the key is nearly out of quota.
    pub fn tight(&self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.at_ms) > QUOTA_FRESH_MS {
            return false;
        }
        let low = |remaining: Option<u64>, limit: Option<u64>| match (remaining, limit) {
            (Some(0), _) => true,
            (Some(remaining), Some(limit)) if limit > 0 => {
                (remaining as f64) < limit as f64 * QUOTA_TIGHT_FRACTION
            }
            _ => false,
        };
        low(self.remaining_requests, self.limit_requests)
            || low(self.remaining_tokens, self.limit_tokens)
    }
}

/// A provider key's use this minute and its freshest quota figures, local and remote.
#[derive(Debug, Default)]
pub struct KeyQuota {
    inner: Mutex<KeyQuotaInner>,
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyQuotaInner {
    /// The minute (`wall ms / 60 000`) the counts below are for.
    window: u64,
    requests: u64,
    tokens: u64,
    /// Other nodes' use of the key in the same minute.
    remote_requests: u64,
    remote_tokens: u64,
    /// The freshest upstream figures any node saw.
    observed: Option<QuotaObservation>,
}

impl KeyQuotaInner {
    fn roll(&mut self, now_ms: u64) {
        let window = now_ms / 60_000;
        // Only forward: a clock read before the minute began must not wipe it.
        if window > self.window {
            *self = KeyQuotaInner {
                window,
                observed: self.observed,
                ..KeyQuotaInner::default()
            };
        }
    }
}

impl KeyQuota {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeyQuotaInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request went to the key (tokens are added when known).
    pub fn count(&self, requests: u64, tokens: u64, now_ms: u64) {
        let mut inner = self.lock();
        inner.roll(now_ms);
        inner.requests += requests;
        inner.tokens += tokens;
    }

    /// The upstream's figures, if fresher than what is known. A time in the future (another
    /// node's clock running ahead) counts as now.
    pub fn observe(&self, mut observation: QuotaObservation) {
        observation.at_ms = observation.at_ms.min(skein_types::now_ms());
        let mut inner = self.lock();
        if inner
            .observed
            .is_none_or(|known| known.at_ms <= observation.at_ms)
        {
            inner.observed = Some(observation);
        }
    }

    /// Other nodes' use this minute.
    pub fn set_remote(&self, window: u64, requests: u64, tokens: u64, now_ms: u64) {
        let mut inner = self.lock();
        inner.roll(now_ms);
        if window == inner.window {
            inner.remote_requests = requests;
            inner.remote_tokens = tokens;
        }
    }

    /// Whether the key is nearly out of quota for the cluster: by the upstream's freshest
    /// figures, or by the cluster's use this minute against the configured `rpm`/`tpm`.
    pub fn tight(&self, rpm: Option<u64>, tpm: Option<u64>, now_ms: u64) -> bool {
        let mut inner = self.lock();
        inner.roll(now_ms);
        if inner.observed.is_some_and(|seen| seen.tight(now_ms)) {
            return true;
        }
        let near = |used: u64, limit: Option<u64>| {
            limit.is_some_and(|limit| used as f64 >= limit as f64 * (1.0 - QUOTA_TIGHT_FRACTION))
        };
        near(inner.requests.saturating_add(inner.remote_requests), rpm)
            || near(inner.tokens.saturating_add(inner.remote_tokens), tpm)
    }

    /// This node's report on the key.
    pub fn report(&self, cooldown_until_wall_ms: u64, now_ms: u64) -> KeyReport {
        let mut inner = self.lock();
        inner.roll(now_ms);
        KeyReport {
            cooldown_until_ms: cooldown_until_wall_ms,
            window: inner.window,
            requests: inner.requests,
            tokens: inner.tokens,
            observed: inner.observed,
        }
    }

    pub fn inherit(&self, previous: &KeyQuota) {
        *self.lock() = *previous.lock();
    }
}

/// One node's report on a provider key, in gossip:
/// `cooldown_until window requests tokens [at limit_req rem_req limit_tok rem_tok]`
/// (`-` for a figure the upstream did not send).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Wall-clock ms until which the node keeps the key cooled down (0: healthy).
    pub cooldown_until_ms: u64,
    pub window: u64,
    pub requests: u64,
    pub tokens: u64,
    pub observed: Option<QuotaObservation>,
}

impl KeyReport {
    pub fn encode(&self) -> String {
        let mut text = format!(
            "{} {} {} {}",
            self.cooldown_until_ms, self.window, self.requests, self.tokens
        );
        if let Some(seen) = &self.observed {
            let figure = |value: Option<u64>| value.map_or("-".to_owned(), |v| v.to_string());
            text.push_str(&format!(
                " {} {} {} {} {}",
                seen.at_ms,
                figure(seen.limit_requests),
                figure(seen.remaining_requests),
                figure(seen.limit_tokens),
                figure(seen.remaining_tokens)
            ));
        }
        text
    }

    pub fn decode(text: &str) -> Option<KeyReport> {
        let parts: Vec<&str> = text.split(' ').collect();
        let number = |index: usize| parts.get(index)?.parse::<u64>().ok();
        let figure = |index: usize| -> Option<Option<u64>> {
            match *parts.get(index)? {
                "-" => Some(None),
                value => Some(Some(value.parse().ok()?)),
            }
        };
        let observed = if parts.len() >= 9 {
            Some(QuotaObservation {
                at_ms: number(4)?,
                limit_requests: figure(5)?,
                remaining_requests: figure(6)?,
                limit_tokens: figure(7)?,
                remaining_tokens: figure(8)?,
            })
        } else {
            None
        };
        Some(KeyReport {
            cooldown_until_ms: number(0)?,
            window: number(1)?,
            requests: number(2)?,
            tokens: number(3)?,
            observed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reports_round_trip() {
        let report = KeyReport {
            cooldown_until_ms: 5,
            window: 6,
            requests: 7,
            tokens: 8,
            observed: Some(QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(3),
                limit_tokens: None,
                remaining_tokens: Some(9),
                at_ms: 11,
            }),
        };
        assert_eq!(KeyReport::decode(&report.encode()), Some(report));
        let bare = KeyReport::default();
        assert_eq!(KeyReport::decode(&bare.encode()), Some(bare));
        assert_eq!(KeyReport::decode("1 2"), None);
        let deployment = DeploymentReport {
            error_ppm: 250_000,
            latency_us: 1200,
        };
        assert_eq!(
            DeploymentReport::decode(&deployment.encode()),
            Some(deployment)
        );
        assert_eq!(DeploymentReport::decode("x 1"), None);
    }

    #[test]
    fn error_rates_rise_with_failures_and_fade_without_attempts() {
        let rate = DecayingRate::default();
        let start = Instant::now();
        for _ in 0..10 {
            rate.record_at(true, start);
        }
        let high = rate.value_at(start);
        assert!(high > 0.85, "{high}");
        let later = rate.value_at(start + Duration::from_secs(10));
        assert!((later - high / 4.0).abs() < 0.01, "{later}");
        rate.record_at(false, start + Duration::from_secs(10));
        assert!(rate.value_at(start + Duration::from_secs(10)) < later);
    }

    #[test]
    fn quota_is_tight_by_headers_or_by_the_clusters_use() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-limit-requests", "100".parse().expect("value"));
        headers.insert(
            "x-ratelimit-remaining-requests",
            "9".parse().expect("value"),
        );
        let seen = QuotaObservation::from_headers(&headers, || 1_000).expect("value");
        assert!(seen.tight(1_000));
        // Old figures are not trusted.
        assert!(!seen.tight(1_000 + QUOTA_FRESH_MS + 1));
        headers.insert(
            "x-ratelimit-remaining-requests",
            "50".parse().expect("value"),
        );
        assert!(
            !QuotaObservation::from_headers(&headers, || 1_000)
                .expect("value")
                .tight(1_000)
        );
        assert_eq!(
            QuotaObservation::from_headers(&HeaderMap::new(), || 0),
            None
        );
        let mut anthropic = HeaderMap::new();
        anthropic.insert("content-type", "application/json".parse().expect("value"));
        anthropic.insert(
            "anthropic-ratelimit-tokens-limit",
            "1000".parse().expect("value"),
        );
        anthropic.insert(
            "anthropic-ratelimit-tokens-remaining",
            " 10 ".parse().expect("value"),
        );
        let seen = QuotaObservation::from_headers(&anthropic, || 5).expect("value");
        assert_eq!(
            (
                seen.limit_tokens,
                seen.remaining_tokens,
                seen.remaining_requests
            ),
            (Some(1000), Some(10), None)
        );
        assert!(seen.tight(5));

        let quota = KeyQuota::default();
        let now = 120_000;
        quota.count(50, 0, now);
        assert!(!quota.tight(Some(100), None, now));
        // Other nodes used 46 more this minute: 96 of 100.
        quota.set_remote(2, 46, 0, now);
        assert!(quota.tight(Some(100), None, now));
        // A new minute starts from nothing.
        assert!(!quota.tight(Some(100), None, now + 60_000));
    }
}
