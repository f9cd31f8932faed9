//! Latency percentiles over recorded samples.

use serde_json::{Value, json};

/// Percentiles of a set of latencies in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    /// Nearest-rank percentiles; sorts `samples` in place.
    pub fn of(samples: &mut [u64]) -> Percentiles {
        samples.sort_unstable();
        let rank = |fraction: f64| -> u64 {
            if samples.is_empty() {
                return 0;
            }
            let position =
                ((fraction * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[position - 1]
        };
        Percentiles {
            count: samples.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples.last().copied().unwrap_or(0),
        }
    }

    pub fn to_json(self) -> Value {
        json!({"count": self.count, "p50_us": self.p50, "p90_us": self.p90, "p99_us": self.p99, "p999_us": self.p999, "max_us": self.max})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u64> = (1..=1000).rev().collect();
        let percentiles = Percentiles::of(&mut samples);
        assert_eq!(
            (
                percentiles.p50,
                percentiles.p99,
                percentiles.p999,
                percentiles.max
            ),
            (500, 990, 999, 1000)
        );
        assert_eq!(Percentiles::of(&mut []).p50, 0);
    }
}
