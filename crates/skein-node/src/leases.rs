//! This node's budget leases: granted through Raft when a reservation finds its lease short
//! (one command for every budget of the key, its team and its customer), renewed in the
//! background before they run out, given back when idle and when the node stops.
//!
//! Grants are asked for one at a time: calls that wait for a lease at the same moment find,
//! once their turn comes, that the state changed, and try their reservation again against the
//! grant the first one got (sized for several calls) before asking themselves.

use std::sync::Arc;
use std::time::Duration;

use skein_control::ControlPlane;
use skein_core::accounting::Ledger;
use skein_proxy::AppState;
use skein_proxy::state::{GrantError, LeaseBroker};
use skein_types::control::{Command, LeaseAsk, Outcome};

/// How often the background work (renewals, idle leases given back) runs.
const LEASE_TICK: Duration = Duration::from_millis(500);

/// How long a lease proposal waits for one leader before asking again (grants and returns
/// are safe to apply twice: a return names the grant it saw).
const ATTEMPT_WAIT: Duration = Duration::from_millis(800);

/// How long a grant waits for the proxy's state to show it.
const SHOW_WAIT: Duration = Duration::from_secs(2);

/// How long a background renewal or return may take (it holds the turn that calls waiting for
/// a lease need; while the group has no leader a proposal would otherwise wait for one).
const BACKGROUND_WAIT: Duration = Duration::from_secs(3);

/// Grants, renews and gives back this node's leases.
pub struct Leases {
    control: ControlPlane,
    app: Arc<AppState>,
    ledger: Arc<Ledger>,
    /// One grant at a time.
    turn: tokio::sync::Mutex<()>,
}

impl Leases {
    pub fn new(control: ControlPlane, app: Arc<AppState>) -> Arc<Leases> {
        let ledger = app.ledger.clone();
        Arc::new(Leases {
            control,
            app,
            ledger,
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// Propose `command`; the version it was applied at, or why not.
    async fn propose(&self, command: Command) -> Result<u64, GrantError> {
        match self
            .control
            .propose_retrying("leases", command, ATTEMPT_WAIT)
            .await
        {
            Ok(response) => match response.outcome {
                Outcome::Applied => Ok(response.version),
                Outcome::Rejected(rejection) => Err(match rejection.field.as_deref() {
                    Some("leased") => GrantError::LeasedElsewhere(rejection.message),
                    _ => GrantError::Exhausted(rejection.message),
                }),
                other => Err(GrantError::Unavailable(format!("{other:?}"))),
            },
            Err(error) => Err(GrantError::Unavailable(error.to_string())),
        }
    }

    /// Renew the leases reservations found running low or near their end, and give back the
    /// ones not used for a while, every [`LEASE_TICK`].
    pub async fn tend(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(LEASE_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let work = self
                .ledger
                .lease_work(&self.app.control(), skein_types::now_ms());
            if !work.renew.is_empty() {
                let _turn = self.turn.lock().await;
                let node = self.ledger.node();
                let renewed_budgets: Vec<String> =
                    work.renew.iter().map(|ask| ask.budget.clone()).collect();
                let renewed = tokio::time::timeout(
                    BACKGROUND_WAIT,
                    self.propose(Command::GrantLeases {
                        node,
                        asks: work.renew,
                    }),
                )
                .await;
                match renewed {
                    Ok(Ok(version)) => {
                        self.app.wait_for_control(version, SHOW_WAIT).await;
                        self.ledger.granted(&renewed_budgets, version);
                    }
                    Ok(Err(error)) => tracing::debug!(?error, "a lease was not renewed"),
                    Err(_) => tracing::debug!("a lease renewal found no leader in time"),
                }
            }
            if !work.give_back.is_empty() {
                let _turn = self.turn.lock().await;
                if let Err(error) = self.give_back(work.give_back).await {
                    tracing::debug!(?error, "idle leases not given back yet");
                }
            }
        }
    }

    /// Propose `returns` (from the ledger, which reserves nothing from those leases
    /// meanwhile) and wait until the proxy's state shows them. Call with the turn held.
    async fn give_back(
        &self,
        returns: Vec<skein_types::control::LeaseReturn>,
    ) -> Result<(), GrantError> {
        if returns.is_empty() {
            return Ok(());
        }
        let node = self.ledger.node();
        let proposed = tokio::time::timeout(
            BACKGROUND_WAIT,
            self.propose(Command::ReturnLeases {
                node,
                leases: returns.clone(),
            }),
        )
        .await
        .unwrap_or_else(|_| {
            Err(GrantError::Unavailable(
                "no leader took the return in time".to_owned(),
            ))
        });
        match proposed {
            Ok(version) => {
                self.app.wait_for_control(version, SHOW_WAIT).await;
                self.ledger.returned(&returns, Some(version));
                Ok(())
            }
            Err(error) => {
                self.ledger.returned(&returns, None);
                Err(error)
            }
        }
    }

    /// Give back every lease, keeping what this node has not yet seen recorded (call after
    /// the last spend flush).
    pub async fn give_back_all(&self) {
        let _turn = self.turn.lock().await;
        let returns = self.ledger.give_back(&self.app.control(), None);
        if returns.is_empty() {
            return;
        }
        match self.give_back(returns).await {
            Ok(()) => tracing::info!("budget leases given back"),
            Err(error) => {
                tracing::warn!(
                    ?error,
                    "budget leases not given back; they lapse on their own"
                )
            }
        }
    }
}

#[async_trait::async_trait]
impl LeaseBroker for Leases {
    async fn grant(&self, asks: Vec<LeaseAsk>, seen_version: u64) -> Result<(), GrantError> {
        let _turn = self.turn.lock().await;
        if self.app.control().version > seen_version {
            // Another call's grant (or recorded spend) came meanwhile: try with it first.
            return Ok(());
        }
        let node = self.ledger.node();
        let asked: Vec<String> = asks.iter().map(|ask| ask.budget.clone()).collect();
        let budgets: Vec<String> = asks
            .iter()
            .filter(|ask| ask.need > 0)
            .map(|ask| ask.budget.clone())
            .collect();
        let version = match self.propose(Command::GrantLeases { node, asks }).await {
            Ok(version) => version,
            Err(GrantError::LeasedElsewhere(message)) => {
                // What this node holds is too little for the call too: give it back, so that
                // the rest of the budget can come together on one node instead of being
                // stranded in pieces on several.
                let returns = self.ledger.give_back(&self.app.control(), Some(&budgets));
                let _ = self.give_back(returns).await;
                return Err(GrantError::LeasedElsewhere(message));
            }
            Err(error) => return Err(error),
        };
        if self.app.wait_for_control(version, SHOW_WAIT).await {
            self.ledger.granted(&asked, version);
            Ok(())
        } else {
            Err(GrantError::Unavailable(
                "the grant was applied but this node's state did not show it in time".to_owned(),
            ))
        }
    }
}
