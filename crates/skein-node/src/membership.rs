//! How a node comes into a cluster and how the cluster keeps its shape:
//!
//! - [`join_or_form`]: a node with no Raft state asks every address its peers resolve to who
//!   they are. If one is in a cluster, the node joins it as a learner. Only the bootstrap node
//!   may form a new cluster, of one voter, and only once every address has answered and none
//!   is in one. So no value of the chart and no scaling step can make a second group: the
//!   arguments a node starts with never name the voters.
//! - [`tend_cluster`]: the first leader gives the cluster its id; every node registers its
//!   incarnation; the leader promotes caught-up learners so that the cluster has the largest
//!   odd number of voters up to its target.
//! - [`watch_health`]: what the probes report, from the Raft metrics.

use std::collections::BTreeSet;
use std::time::Duration;

use skein_control::{ControlPlane, LeaderRequest, NodeId, Refusal};
use skein_proxy::AppState;
use skein_types::control::{Command, Outcome};
use std::sync::Arc;

/// How far behind the leader's log a learner may be and still be promoted.
const CAUGHT_UP_ENTRIES: u64 = 100;

/// Log a repeated condition at most this often.
const QUIET: Duration = Duration::from_secs(10);

/// In join-or-form mode: a node without state joins (or forms) a cluster; a node with state
/// whose own membership no longer holds it (it was removed, and came back with its old data)
/// joins again as a learner. A member with state does nothing.
pub async fn rejoin_if_outside(
    control: ControlPlane,
    advertise: String,
    peers: Vec<String>,
    has_state: bool,
    forms: bool,
) {
    if has_state {
        // Ask the cluster, not this node's own log: a node removed while it was away may not
        // have received the membership that removed it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let removed = loop {
            if let Some(members) = cluster_members(&control, &peers).await {
                break !members.contains(&control.id());
            }
            if tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if !removed {
            return;
        }
        tracing::warn!(
            "the cluster no longer has this node as a member (it was removed): joining again as a learner"
        );
    }
    join_or_form(control, advertise, peers, forms, has_state).await;
}

/// The members of the cluster as a peer that knows a leader reports them.
async fn cluster_members(control: &ControlPlane, peers: &[String]) -> Option<Vec<NodeId>> {
    for peer in peers {
        let Ok(found) = tokio::net::lookup_host(peer.as_str()).await else {
            continue;
        };
        for address in found {
            if let Ok(hello) = control.hello_to(&address.to_string()).await
                && hello.node_id != control.id()
                && hello.member
                && hello.leader.is_some()
            {
                return Some(hello.members);
            }
        }
    }
    None
}

/// Join a cluster through `peers`, or (for the bootstrap node) form one when there is none.
/// With `rejoining`, this node's own (stale) membership is not looked at.
pub async fn join_or_form(
    control: ControlPlane,
    advertise: String,
    peers: Vec<String>,
    forms: bool,
    rejoining: bool,
) {
    let mut last_said: Option<tokio::time::Instant> = None;
    let mut say = |message: String| {
        if last_said.is_none_or(|at| at.elapsed() >= QUIET) {
            tracing::warn!("{message}");
            last_said = Some(tokio::time::Instant::now());
        }
    };
    loop {
        if !rejoining && control.is_member() {
            return;
        }
        let mut addresses = Vec::new();
        let mut silent = Vec::new();
        for peer in &peers {
            match tokio::net::lookup_host(peer.as_str()).await {
                Ok(found) => addresses.extend(found.map(|address| address.to_string())),
                Err(error) => silent.push(format!("{peer} ({error})")),
            }
        }
        addresses.sort();
        addresses.dedup();
        let mut cluster = None;
        for address in &addresses {
            match control.hello_to(address).await {
                Ok(hello)
                    if hello.node_id == control.id()
                        && hello.incarnation == control.identity().incarnation() => {}
                Ok(hello) if hello.node_id == control.id() => {
                    silent.push(format!("{address} (another node with this node's id)"));
                }
                Ok(hello) if hello.member => {
                    cluster = Some((address.clone(), hello.cluster_id));
                    break;
                }
                Ok(_) => {}
                Err(error) => silent.push(format!("{address} ({error})")),
            }
        }
        if let Some((address, cluster_id)) = cluster {
            let request = LeaderRequest::AddLearner {
                id: control.id(),
                addr: advertise.clone(),
                incarnation: Some(control.identity().incarnation()),
            };
            match control.forward_to(&address, &request, true).await {
                Ok(_) => {
                    tracing::info!(
                        through = %address,
                        cluster_id = cluster_id.as_deref().unwrap_or(""),
                        "joined the cluster as a learner"
                    );
                    return;
                }
                Err(error) => say(format!(
                    "could not join the cluster through {address} yet: {error}"
                )),
            }
        } else if forms && silent.is_empty() {
            let alone = std::collections::BTreeMap::from([(control.id(), advertise.clone())]);
            match control.initialize(alone).await {
                Ok(()) => {
                    tracing::info!(
                        asked = addresses.len(),
                        "no peer is in a cluster: formed a new cluster of one voter"
                    );
                    return;
                }
                Err(error) => say(format!("could not form a cluster: {error}")),
            }
        } else if forms {
            say(format!(
                "not forming a cluster while some peers have not answered: {}",
                silent.join(", ")
            ));
        } else {
            say(format!(
                "waiting for a cluster to join (asked {} addresses{})",
                addresses.len(),
                if silent.is_empty() {
                    String::new()
                } else {
                    format!("; no answer from {}", silent.join(", "))
                }
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The learners to promote: enough caught-up ones (lowest ids first) to reach the largest odd
/// number of voters not above `target` nor the voters and caught-up learners there are.
pub fn voters_to_promote(
    voters: &BTreeSet<NodeId>,
    caught_up: &[NodeId],
    target: u64,
) -> Vec<NodeId> {
    let available = (voters.len() + caught_up.len()) as u64;
    let mut wanted = target.min(available);
    if wanted.is_multiple_of(2) {
        wanted = wanted.saturating_sub(1);
    }
    let have = voters.len() as u64;
    if wanted <= have {
        return Vec::new();
    }
    let mut candidates: Vec<NodeId> = caught_up
        .iter()
        .copied()
        .filter(|id| !voters.contains(id))
        .collect();
    candidates.sort_unstable();
    candidates.truncate((wanted - have) as usize);
    candidates
}

/// Once a second: give the cluster its id (the leader, once), register this node's
/// incarnation, and (the leader) promote caught-up learners up to the target.
pub async fn tend_cluster(control: ControlPlane, initial_target: u64) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut complained: Option<tokio::time::Instant> = None;
    loop {
        ticks.tick().await;
        let state = control.state();
        if control.is_leader() && state.cluster.id.is_empty() {
            match skein_control::identity::new_cluster_id() {
                Ok(cluster_id) => {
                    let command = Command::InitCluster {
                        cluster_id,
                        target_voters: initial_target.max(1),
                    };
                    if let Err(error) = control.propose("cluster", command).await {
                        tracing::debug!(%error, "cluster id not recorded yet");
                    }
                }
                Err(error) => tracing::error!(%error, "cannot make a cluster id"),
            }
            continue;
        }
        let incarnation = control.identity().incarnation();
        let registered = state.cluster.incarnations.get(&control.id()).copied();
        if control.is_member() && registered != Some(incarnation) && !state.cluster.id.is_empty() {
            let command = Command::RegisterNode {
                node: control.id(),
                incarnation,
            };
            match control.propose("cluster", command).await {
                Ok(response) => {
                    if let Outcome::Rejected(rejection) = response.outcome
                        && complained.is_none_or(|at| at.elapsed() >= QUIET)
                    {
                        tracing::error!(
                            "this node's incarnation is refused: {}",
                            rejection.message
                        );
                        complained = Some(tokio::time::Instant::now());
                    }
                }
                Err(error) => tracing::debug!(%error, "incarnation not registered yet"),
            }
        }
        if control.is_leader() {
            promote_learners(&control, state.cluster.target_voters).await;
        }
    }
}

async fn promote_learners(control: &ControlPlane, target: u64) {
    let metrics = control.metrics();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let last_index = metrics.last_log_index.unwrap_or(0);
    let Some(replication) = &metrics.replication else {
        return;
    };
    let caught_up: Vec<NodeId> = membership
        .learner_ids()
        .filter(|id| {
            replication.get(id).is_some_and(|matched| {
                matched.is_some_and(|log| log.index + CAUGHT_UP_ENTRIES >= last_index)
            })
        })
        .collect();
    let promoted = voters_to_promote(&voters, &caught_up, target);
    if promoted.is_empty() {
        return;
    }
    let mut new_voters = voters.clone();
    new_voters.extend(promoted.iter().copied());
    match control
        .to_leader(LeaderRequest::ChangeVoters {
            voters: new_voters.clone(),
        })
        .await
    {
        Ok(_) => tracing::info!(
            ?promoted,
            voters = ?new_voters,
            target,
            "promoted caught-up learners to voters"
        ),
        Err(error) => tracing::debug!(%error, ?promoted, "learners not promoted yet"),
    }
}

/// Keep the probes' view current: whether the Raft core runs, whether a leader is known, and
/// (once) whether this node has caught up with what its cluster had applied when it joined.
pub async fn watch_health(control: ControlPlane, app: Arc<AppState>) {
    let mut metrics = control.raft().metrics();
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The leader's applied index when this node first saw it: caught up once applied here.
    let mut catch_up_to: Option<u64> = None;
    let mut refused_counted = [0u64; 4];
    loop {
        let current = control.metrics();
        let running = current.running_state.is_ok() && control.is_running();
        app.metrics.raft_running.set(i64::from(running));
        if !running {
            if app.health.live().is_ok() {
                tracing::error!(
                    error = ?current.running_state,
                    "the Raft core has stopped: this node reports not live"
                );
            }
            app.health.set_raft_stopped();
        }
        app.health
            .set_leader(current.current_leader.is_some(), skein_types::now_ms());
        let applied = current.last_applied.map_or(0, |id| id.index);
        if !app.health.is_caught_up() {
            if catch_up_to.is_none() {
                catch_up_to = match current.current_leader {
                    Some(leader) if leader == control.id() => Some(control.committed_index()),
                    Some(_) => match control.hello().leader_addr {
                        Some(addr) => control
                            .hello_to(&addr)
                            .await
                            .ok()
                            .map(|hello| hello.applied),
                        None => None,
                    },
                    None => None,
                };
            }
            if let Some(target) = catch_up_to
                && applied >= target
            {
                tracing::info!(applied, "caught up with the cluster: ready");
                app.health.set_caught_up();
            }
        }
        for (index, reason) in Refusal::ALL.into_iter().enumerate() {
            let now = control.identity().refused(reason);
            app.metrics
                .cluster_refused
                .get_or_create(&skein_proxy::metrics::ReasonLabels {
                    reason: reason.label(),
                })
                .inc_by(now.saturating_sub(refused_counted[index]));
            refused_counted[index] = now;
        }
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    app.health.set_raft_stopped();
                    app.metrics.raft_running.set(0);
                    return;
                }
            }
            _ = ticks.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn learners_are_promoted_to_the_largest_odd_voter_count_up_to_the_target() {
        // 1 → 3: two learners at once (never two voters).
        assert_eq!(voters_to_promote(&set(&[1]), &[3, 2], 3), vec![2, 3]);
        // One learner alone is not promoted: two voters would need both.
        assert_eq!(voters_to_promote(&set(&[1]), &[2], 3), Vec::<NodeId>::new());
        // Already at the target: learners stay learners.
        assert_eq!(
            voters_to_promote(&set(&[1, 2, 3]), &[4, 5], 3),
            Vec::<NodeId>::new()
        );
        // 3 → 5.
        assert_eq!(
            voters_to_promote(&set(&[1, 2, 3]), &[5, 4, 6], 5),
            vec![4, 5]
        );
        // A voter was removed: two voters and one caught-up learner make three.
        assert_eq!(voters_to_promote(&set(&[1, 3]), &[4], 3), vec![4]);
        // A target of one never promotes.
        assert_eq!(
            voters_to_promote(&set(&[1]), &[2, 3], 1),
            Vec::<NodeId>::new()
        );
        // More voters than the target: nothing is demoted here.
        assert_eq!(
            voters_to_promote(&set(&[1, 2, 3, 4]), &[5], 3),
            Vec::<NodeId>::new()
        );
    }
}
