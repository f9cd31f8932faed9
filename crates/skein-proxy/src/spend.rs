//! Budgets on the request path: hold a call's worst-case cost before dispatching it, settle
//! the real cost from its usage afterwards (streams included, also when the client leaves).
//! Reads the control-state snapshot and the node's in-memory ledger only.

use std::sync::Arc;

use skein_core::accounting::{
    BudgetExceeded, DEFAULT_MAX_OUTPUT_TOKENS, Reservation, cost, estimate_input_tokens, price_of,
};
use skein_core::limits::Ticket;
use skein_core::{Candidate, RouteRuntime};
use skein_providers::Usage;
use skein_providers::raw::RawObject;
use skein_types::ErrorCode;
use skein_types::control::ControlState;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::RateHeaders;
use crate::state::AppState;

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

/// Hold the worst-case cost of a call by `caller` (none in open mode: nothing to hold).
pub fn reserve(
    app: &AppState,
    caller: Option<&Caller>,
    requested: &str,
    routes: &[Arc<RouteRuntime>],
    request: &RawObject<'_>,
    body_len: usize,
) -> Result<Option<Hold>, ApiError> {
    let Some(caller) = caller else {
        return Ok(None);
    };
    let input = estimate_input_tokens(body_len);
    // The newest snapshot, not the one authentication saw before the body was read: spend
    // recorded meanwhile must count.
    let fresh = app.control();
    let state = &fresh;
    let (ticket, rate_headers) = crate::limits::admit(app, state, &caller.key_id, input)?;
    // The worst case only matters to a hard budget; most keys have none.
    let worst = if state.has_hard_budget(&caller.key_id) {
        let max_output = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|name| request.get_as::<u64>(name).ok().flatten())
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        routes
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
            .map(|price| cost(&price, input, 0, max_output))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let nodes = app.cluster_size();
    match app
        .ledger
        .reserve(state, &caller.key_id, worst, skein_types::now_ms(), nodes)
    {
        Ok(reservation) => Ok(Some(Hold {
            reservation,
            state: state.clone(),
            requested: requested.to_owned(),
            estimated_input_tokens: input,
            ticket,
            rate_headers,
        })),
        Err(exceeded) => {
            if let Some(ticket) = ticket {
                ticket.cancel();
            }
            Err(budget_error(&exceeded).with_headers(rate_headers))
        }
    }
}

fn budget_error(exceeded: &BudgetExceeded) -> ApiError {
    if exceeded.share_only {
        ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "budget `{}` is nearly spent: this node's share of what remains is in use until \
                 its recent spend is recorded; retry in a second",
                exceeded.budget_id
            ),
        )
        .with_detail_code("budget_share_exhausted")
        .with_retry_after(1)
    } else {
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
}

fn usd(nanos: u64) -> String {
    format!("{:.6}", nanos as f64 / 1e9)
}
