//! Load balancing: the order in which a route's deployments, and a provider's keys, are tried.

use std::sync::Arc;

use skein_types::Strategy;

use crate::runtime::{DeploymentRuntime, RouteRuntime};

/// A random order in which each index comes first with probability proportional to its weight
/// (weighted sampling without replacement).
pub fn weighted_order(weights: &[u32]) -> Vec<usize> {
    let mut remaining: Vec<usize> = (0..weights.len()).collect();
    let mut order = Vec::with_capacity(weights.len());
    while !remaining.is_empty() {
        let total: u64 = remaining
            .iter()
            .map(|&index| u64::from(weights[index].max(1)))
            .sum();
        let mut pick = fastrand::u64(0..total);
        let mut chosen = 0;
        for (slot, &index) in remaining.iter().enumerate() {
            let weight = u64::from(weights[index].max(1));
            if pick < weight {
                chosen = slot;
                break;
            }
            pick -= weight;
        }
        order.push(remaining.swap_remove(chosen));
    }
    order
}

/// The order in which to try a route's deployments.
pub fn order_deployments(route: &RouteRuntime) -> Vec<Arc<DeploymentRuntime>> {
    let deployments = &route.deployments;
    if deployments.len() <= 1 {
        return deployments.clone();
    }
    match route.strategy {
        Strategy::Adaptive => {
            let best_latency = deployments
                .iter()
                .map(|deployment| deployment.cluster_latency_us())
                .filter(|latency| *latency > 0)
                .min();
            let now = skein_types::now_ms();
            let scores: Vec<u32> = deployments
                .iter()
                .map(|deployment| adaptive_score(deployment, best_latency, now))
                .collect();
            weighted_order(&scores)
                .into_iter()
                .map(|index| deployments[index].clone())
                .collect()
        }
        Strategy::Ordered => deployments.clone(),
        Strategy::Weighted => {
            let weights: Vec<u32> = deployments
                .iter()
                .map(|deployment| deployment.weight)
                .collect();
            weighted_order(&weights)
                .into_iter()
                .map(|index| deployments[index].clone())
                .collect()
        }
        Strategy::RoundRobin => {
            let start = route.next_turn() % deployments.len();
            (0..deployments.len())
                .map(|offset| deployments[(start + offset) % deployments.len()].clone())
                .collect()
        }
        Strategy::LeastInflight => {
            // Shuffle first so ties are broken at random, then a stable sort by load.
            let mut shuffled = shuffled(deployments);
            shuffled.sort_by_key(|deployment| deployment.in_flight());
            shuffled
        }
        Strategy::LowestLatency => {
            // Unknown latency (0) sorts first, so new deployments get measured.
            let mut shuffled = shuffled(deployments);
            shuffled.sort_by_key(|deployment| deployment.latency_ewma_us());
            shuffled
        }
    }
}

/// Latency differences this small are noise for a model call, not speed: the speed factor
/// compares latencies with this much added to both, so two healthy deployments at 0.3 and 1 ms
/// still share traffic about evenly, while one 40 ms slower than the other gets little.
const LATENCY_SLACK_US: f64 = 2_000.0;

/// A deployment's share under the adaptive strategy: its weight, times the square of the
/// cluster's success rate on it, times how close its latency is to the route's fastest (with
/// [`LATENCY_SLACK_US`] added to both), times 1/20 when every key of its provider is nearly
/// out of upstream quota. Never zero, so a deployment that recovers gets traffic again (and its
/// error rate fades meanwhile).
pub fn adaptive_score(
    deployment: &DeploymentRuntime,
    best_latency_us: Option<u64>,
    now_wall_ms: u64,
) -> u32 {
    let health = (1.0 - deployment.cluster_error_rate())
        .clamp(0.0, 1.0)
        .powi(2);
    let speed = match (best_latency_us, deployment.cluster_latency_us()) {
        (Some(best), latency) if latency > 0 => {
            (best as f64 + LATENCY_SLACK_US) / (latency as f64 + LATENCY_SLACK_US)
        }
        _ => 1.0,
    };
    let quota = if deployment
        .provider
        .keys
        .iter()
        .all(|key| key.quota_tight(now_wall_ms))
    {
        0.05
    } else {
        1.0
    };
    let score =
        f64::from(deployment.weight.max(1)) * 1000.0 * health.max(0.02) * speed.max(0.02) * quota;
    score.round().clamp(1.0, f64::from(u32::MAX)) as u32
}

fn shuffled(deployments: &[Arc<DeploymentRuntime>]) -> Vec<Arc<DeploymentRuntime>> {
    let mut copy = deployments.to_vec();
    fastrand::shuffle(&mut copy);
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_order_is_a_permutation_and_follows_weights() {
        let mut first_counts = [0u32; 3];
        for _ in 0..6_000 {
            let order = weighted_order(&[1, 2, 3]);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2]);
            first_counts[order[0]] += 1;
        }
        // Expected 1000 / 2000 / 3000; allow a wide margin.
        assert!((800..1_200).contains(&first_counts[0]), "{first_counts:?}");
        assert!(
            (1_750..2_250).contains(&first_counts[1]),
            "{first_counts:?}"
        );
        assert!(
            (2_700..3_300).contains(&first_counts[2]),
            "{first_counts:?}"
        );
    }
}
