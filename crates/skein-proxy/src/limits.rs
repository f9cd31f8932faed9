//! Rate limits on the request path: the RPM, TPM and max-parallel limits of the caller's key,
//! its team and the team's customer, admitted against this node's share of each cluster-wide
//! limit (see `skein_core::limits`), and the `x-ratelimit-*` headers that describe them.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use skein_core::limits::{Ask, Kind, PoolId, PoolStatus, Scope, Ticket};
use skein_types::ErrorCode;
use skein_types::control::{ControlState, Limits};

use crate::error::ApiError;
use crate::state::AppState;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const LIMIT_PARALLEL: HeaderName = HeaderName::from_static("x-skein-ratelimit-limit-parallel");
const REMAINING_PARALLEL: HeaderName =
    HeaderName::from_static("x-skein-ratelimit-remaining-parallel");

/// The headers that describe a caller's limits.
#[derive(Debug, Clone, Default)]
pub struct RateHeaders(Vec<(HeaderName, HeaderValue)>);

impl RateHeaders {
    /// For every kind of limit, the tightest one (least remaining) the request was checked
    /// against.
    pub fn from_statuses(statuses: &[PoolStatus]) -> RateHeaders {
        let mut headers = Vec::new();
        for kind in [Kind::Requests, Kind::Tokens, Kind::Parallel] {
            let Some(tightest) = statuses
                .iter()
                .filter(|status| status.kind == kind)
                .min_by_key(|status| status.remaining)
            else {
                continue;
            };
            let (limit, remaining, reset) = match kind {
                Kind::Requests => (LIMIT_REQUESTS, REMAINING_REQUESTS, Some(RESET_REQUESTS)),
                Kind::Tokens => (LIMIT_TOKENS, REMAINING_TOKENS, Some(RESET_TOKENS)),
                Kind::Parallel => (LIMIT_PARALLEL, REMAINING_PARALLEL, None),
            };
            headers.push((limit, HeaderValue::from(tightest.limit)));
            headers.push((remaining, HeaderValue::from(tightest.remaining)));
            if let Some(reset) = reset
                && let Ok(value) = HeaderValue::from_str(&format_reset(tightest.reset_ms))
            {
                headers.push((reset, value));
            }
        }
        RateHeaders(headers)
    }

    /// Add the headers to a response (room is made first, so the map grows once).
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.reserve(self.0.len());
        for (name, value) in self.0 {
            headers.insert(name, value);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A duration the way OpenAI writes its reset headers: `20ms`, `1.5s`, `1m0s`.
pub fn format_reset(ms: u64) -> String {
    use std::fmt::Write;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (minutes, rest) = (ms / 60_000, ms % 60_000);
    let mut text = String::with_capacity(12);
    if minutes > 0 {
        let _ = write!(text, "{minutes}m");
    }
    let (seconds, millis) = (rest / 1000, rest % 1000);
    let _ = write!(text, "{seconds}");
    if millis > 0 {
        let fraction = format!("{millis:03}");
        let _ = write!(text, ".{}", fraction.trim_end_matches('0'));
    }
    text.push('s');
    text
}

/// The limits a call by `key_id` is subject to, with its estimated prompt tokens.
fn asks(state: &ControlState, key_id: &str, estimated_tokens: u64) -> Vec<Ask> {
    let mut asks = Vec::new();
    let mut add = |scope: Scope, id: &str, limits: &Limits| {
        if limits.rpm.is_none() && limits.tpm.is_none() && limits.max_parallel.is_none() {
            return;
        }
        // One shared id for the scope's pools.
        let id: std::sync::Arc<str> = std::sync::Arc::from(id);
        if let Some(rpm) = limits.rpm {
            asks.push(Ask {
                pool: PoolId::new(scope, id.clone(), Kind::Requests),
                limit: rpm,
                cost: 1,
            });
        }
        if let Some(tpm) = limits.tpm {
            asks.push(Ask {
                pool: PoolId::new(scope, id.clone(), Kind::Tokens),
                limit: tpm,
                cost: estimated_tokens,
            });
        }
        if let Some(parallel) = limits.max_parallel {
            asks.push(Ask {
                pool: PoolId::new(scope, id.clone(), Kind::Parallel),
                limit: u64::from(parallel),
                cost: 1,
            });
        }
    };
    let Some(key) = state.keys.get(key_id) else {
        return asks;
    };
    add(Scope::Key, &key.id, &key.limits);
    if let Some(team) = key.team.as_ref().and_then(|team| state.teams.get(team)) {
        add(Scope::Team, &team.id, &team.limits);
        if let Some(customer) = team
            .customer
            .as_ref()
            .and_then(|customer| state.customers.get(customer))
        {
            add(Scope::Customer, &customer.id, &customer.limits);
        }
    }
    asks
}

/// Admit a call by `key_id` against its limits. `Ok((None, _))` when it has none.
pub fn admit(
    app: &AppState,
    state: &ControlState,
    key_id: &str,
    estimated_tokens: u64,
) -> Result<(Option<Ticket>, RateHeaders), ApiError> {
    let asks = asks(state, key_id, estimated_tokens);
    if asks.is_empty() {
        return Ok((None, RateHeaders::default()));
    }
    let now = app.limiter.now_ms();
    match app.limiter.admit(&asks, now) {
        Ok((ticket, statuses)) => Ok((Some(ticket), RateHeaders::from_statuses(&statuses))),
        Err(refusal) => {
            app.metrics
                .rate_limited
                .get_or_create(&crate::metrics::LimitLabels {
                    scope: match refusal.pool.scope {
                        Scope::Key => "key",
                        Scope::Team => "team",
                        Scope::Customer => "customer",
                    },
                    kind: match refusal.pool.kind {
                        Kind::Requests => "requests",
                        Kind::Tokens => "tokens",
                        Kind::Parallel => "parallel",
                    },
                })
                .inc();
            let (scope, what) = (
                match refusal.pool.scope {
                    Scope::Key => "key",
                    Scope::Team => "team",
                    Scope::Customer => "customer",
                },
                match refusal.pool.kind {
                    Kind::Requests => "requests per minute",
                    Kind::Tokens => "tokens per minute",
                    Kind::Parallel => "requests in flight",
                },
            );
            let mut message = format!(
                "rate limit reached for {scope} `{}`: {} {what}",
                refusal.pool.id, refusal.status.limit
            );
            if refusal.too_large && refusal.pool.kind != Kind::Tokens {
                message = format!(
                    "{scope} `{}` is allowed no {what} (its limit is 0)",
                    refusal.pool.id
                );
            } else if refusal.too_large {
                message = format!(
                    "request too large for {scope} `{}`: it needs about {estimated_tokens} tokens, \
                     more than the whole limit of {} {what}",
                    refusal.pool.id, refusal.status.limit
                );
            } else if refusal.pool.kind != Kind::Parallel {
                message.push_str(&format!(
                    ", {} left in the cluster this minute; the window resets in {}",
                    refusal.status.remaining,
                    format_reset(refusal.status.reset_ms)
                ));
            }
            Err(ApiError::new(ErrorCode::RateLimited, message)
                .with_detail_code("rate_limit_exceeded")
                .with_retry_after(refusal.retry_after_ms.div_ceil(1000).max(1))
                .with_headers(RateHeaders::from_statuses(&refusal.statuses)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(format_reset(0), "0ms");
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(1500), "1.5s");
        assert_eq!(format_reset(59_999), "59.999s");
        assert_eq!(format_reset(60_000), "1m0s");
    }

    #[test]
    fn headers_describe_the_tightest_limit_of_each_kind() {
        let statuses = [
            PoolStatus {
                kind: Kind::Requests,
                limit: 100,
                remaining: 40,
                reset_ms: 2500,
            },
            PoolStatus {
                kind: Kind::Requests,
                limit: 50,
                remaining: 10,
                reset_ms: 2500,
            },
            PoolStatus {
                kind: Kind::Tokens,
                limit: 1000,
                remaining: 900,
                reset_ms: 100,
            },
        ];
        let mut map = HeaderMap::new();
        RateHeaders::from_statuses(&statuses).apply(&mut map);
        assert_eq!(map["x-ratelimit-limit-requests"], "50");
        assert_eq!(map["x-ratelimit-remaining-requests"], "10");
        assert_eq!(map["x-ratelimit-reset-requests"], "2.5s");
        assert_eq!(map["x-ratelimit-remaining-tokens"], "900");
        assert_eq!(map["x-ratelimit-reset-tokens"], "100ms");
        assert!(map.get("x-skein-ratelimit-limit-parallel").is_none());
    }
}
