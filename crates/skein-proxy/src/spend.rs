//! Budgets on the request path: hold a call's worst-case cost before dispatching it, settle
//! the real cost from its usage afterwards (streams included, also when the client leaves).
//! Reads the control-state snapshot and the node's in-memory ledger only.

use std::sync::Arc;

use skein_core::accounting::{
    BudgetExceeded, DEFAULT_MAX_OUTPUT_TOKENS, Reservation, Shortfall, cost, estimate_input_tokens,
    price_of,
};
use skein_core::limits::Ticket;
use skein_core::{Candidate, RouteRuntime};
use skein_providers::Usage;
use skein_providers::raw::RawObject;
use skein_types::ErrorCode;
use skein_types::control::{ControlState, Nanos, Price};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::RateHeaders;
use crate::state::{AppState, GrantError};

/// A call's hold on its key's budgets.
pub struct Hold {
    reservation: Reservation,
    state: Arc<ControlState>,
    requested: String,
    /// The input tokens estimated from the request size.
    pub estimated_input_tokens: u64,
    /// What the call holds of its rate limits (given back or settled with the hold).
    ticket: Option<Ticket>,
    /// The caller's rate-limit headers, as of admission.
    pub rate_headers: RateHeaders,
    /// The output tokens the call was held for, when it set no limit of its own and a hard
    /// budget applies: its upstream request is limited to them.
    pub output_cap: Option<u64>,
}

impl Hold {
    /// Settle with the usage of the deployment that served the call.
    pub fn settle(mut self, candidate: &Candidate, usage: &Usage) {
        let tokens = usage.input_tokens.saturating_add(usage.output_tokens);
        if let Some(ticket) = self.ticket.take() {
            ticket.settle(tokens);
        }
        let provider = &candidate.deployment.provider.name;
        let model = &candidate.deployment.model;
        let cost_nanos = price_of(&self.state, &self.requested, provider, model)
            .map(|price| {
                cost(
                    &price,
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.output_tokens,
                )
            })
            .unwrap_or(0);
        self.reservation.settle(
            &format!("{provider}/{model}"),
            usage.input_tokens,
            usage.output_tokens,
            cost_nanos,
        );
    }
}

/// Output tokens a call without its own limit is held for at the least: below this, the
/// budget is treated as spent for it.
pub const MIN_OUTPUT_TOKENS: u64 = 16;

/// A reservation waits at most this long for a lease: long enough for the group to elect a
/// new leader (a second or two) when the one it asks has died or been cut off.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Grants asked for one call at the most (each after something changed).
const LEASE_ROUNDS: usize = 6;

/// Hold the worst-case cost of a call by `caller` (none in open mode: nothing to hold). A
/// call with its own output limit holds its worst case; one without holds up to
/// [`DEFAULT_MAX_OUTPUT_TOKENS`] of output, less when the budget covers less, and its
/// upstream request is then limited to the output held ([`Hold::output_cap`]), so that its
/// cost never exceeds what was held: the answer ends as a model's answer ends at its limit
/// (`finish_reason: "length"`, `stop_reason: "max_tokens"`), with its usage.
pub async fn reserve(
    app: &AppState,
    caller: Option<&Caller>,
    requested: &str,
    routes: &[Arc<RouteRuntime>],
    request: &RawObject<'_>,
    body_len: usize,
    has_output: bool,
) -> Result<Option<Hold>, ApiError> {
    let Some(caller) = caller else {
        return Ok(None);
    };
    let input = estimate_input_tokens(body_len);
    // The newest snapshot, not the one authentication saw before the body was read: spend
    // recorded meanwhile must count.
    let mut state = app.control();
    let (ticket, rate_headers) = crate::limits::admit(app, &state, &caller.key_id, input)?;
    let result = hold(
        app, &mut state, caller, requested, routes, request, input, has_output,
    )
    .await;
    match result {
        Ok((reservation, output_cap)) => Ok(Some(Hold {
            reservation,
            state,
            requested: requested.to_owned(),
            estimated_input_tokens: input,
            ticket,
            rate_headers,
            output_cap,
        })),
        Err(error) => {
            if let Some(ticket) = ticket {
                ticket.cancel();
            }
            Err(error.with_headers(rate_headers))
        }
    }
}

/// The reservation of [`reserve`], asking for leases as needed; and the output cap.
#[allow(clippy::too_many_arguments)]
async fn hold(
    app: &AppState,
    state: &mut Arc<ControlState>,
    caller: &Caller,
    requested: &str,
    routes: &[Arc<RouteRuntime>],
    request: &RawObject<'_>,
    input: u64,
    has_output: bool,
) -> Result<(Reservation, Option<u64>), ApiError> {
    // The worst case only matters to a hard budget; most keys have none.
    if !state.has_hard_budget(&caller.key_id) {
        return app
            .ledger
            .reserve(state, &caller.key_id, 0, skein_types::now_ms())
            .map(|reservation| (reservation, None))
            .map_err(|shortfall| match shortfall {
                Shortfall::Exceeded(exceeded) => budget_error(&exceeded),
                Shortfall::Lease(_) => ApiError::new(ErrorCode::Internal, "no budget to lease"),
            });
    }
    let asked = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|name| request.get_as::<u64>(name).ok().flatten());
    let prices: Vec<Price> = routes
        .iter()
        .flat_map(|route| route.deployments.iter())
        .filter_map(|deployment| {
            price_of(
                state,
                requested,
                &deployment.provider.name,
                &deployment.model,
            )
        })
        .collect();
    let worst = |output: u64| {
        prices
            .iter()
            .map(|price| cost(price, input, 0, output))
            .max()
            .unwrap_or(0)
    };
    let capped = asked.is_none() && has_output;
    let most = worst(asked.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS));
    let least = if capped {
        worst(MIN_OUTPUT_TOKENS)
    } else {
        most
    };
    for _ in 0..LEASE_ROUNDS {
        let shortfall = match app.ledger.reserve_up_to(
            state,
            &caller.key_id,
            least,
            most,
            skein_types::now_ms(),
        ) {
            Ok(reservation) => {
                let cap = capped.then(|| output_cap(&prices, input, reservation.amount()));
                return Ok((reservation, cap));
            }
            Err(shortfall) => shortfall,
        };
        let asks = match shortfall {
            Shortfall::Exceeded(exceeded) => return Err(budget_error(&exceeded)),
            Shortfall::Lease(asks) => asks,
        };
        let Some(broker) = app.lease_broker() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "budgets cannot be enforced on this node: it grants no leases",
            ));
        };
        // Boxed: waiting for a grant is rare, and its timer would grow every call's future.
        let granted = Box::pin(tokio::time::timeout(
            LEASE_WAIT,
            broker.grant(asks, state.version),
        ))
        .await;
        match granted {
            Ok(Ok(())) => *state = app.control(),
            Ok(Err(GrantError::Exhausted(message))) => {
                return Err(ApiError::new(ErrorCode::RateLimited, message)
                    .with_detail_code("insufficient_quota"));
            }
            Ok(Err(GrantError::LeasedElsewhere(message))) => {
                return Err(leased_elsewhere(&message));
            }
            Ok(Err(GrantError::Unavailable(message))) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "this node holds too little of the budget for this request and cannot \
                         reach the cluster's leader for more: {message}"
                    ),
                )
                .with_detail_code("budget_lease_unavailable")
                .with_retry_after(1));
            }
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "this node holds too little of the budget for this request and no grant \
                     came in time",
                )
                .with_detail_code("budget_lease_unavailable")
                .with_retry_after(1));
            }
        }
    }
    Err(leased_elsewhere(
        "the budget's leases kept changing while this request waited for one",
    ))
}

/// The output tokens `held` pays for on the dearest deployment, after the prompt; at most
/// the default a call without a limit is held for.
fn output_cap(prices: &[Price], input: u64, held: Nanos) -> u64 {
    prices
        .iter()
        .filter(|price| price.output_nanos_per_token > 0)
        .map(|price| held.saturating_sub(cost(price, input, 0, 0)) / price.output_nanos_per_token)
        .min()
        .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
        .clamp(1, DEFAULT_MAX_OUTPUT_TOKENS)
}

fn leased_elsewhere(message: &str) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!(
            "the budget is nearly spent and what is left is held by other nodes for now; retry \
             in a second ({message})"
        ),
    )
    .with_detail_code("budget_leased_elsewhere")
    .with_retry_after(1)
}

fn budget_error(exceeded: &BudgetExceeded) -> ApiError {
    if exceeded.leased_elsewhere {
        return leased_elsewhere(&exceeded.budget_id);
    }
    ApiError::new(
        ErrorCode::RateLimited,
        format!(
            "budget `{}` is exhausted: {} of {} USD left, this request may cost up to {} USD",
            exceeded.budget_id,
            usd(exceeded.remaining_nanos),
            usd(exceeded.limit_nanos),
            usd(exceeded.needed_nanos)
        ),
    )
    .with_detail_code("insufficient_quota")
}

fn usd(nanos: u64) -> String {
    format!("{:.6}", nanos as f64 / 1e9)
}
