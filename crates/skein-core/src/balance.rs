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
