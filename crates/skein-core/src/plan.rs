//! The attempt plan of one request: which deployment and key to try next, and how long to wait
//! first.
//!
//! Order: the route's deployments as its strategy orders them, each with its provider's keys
//! (weighted); then the route's fallbacks. Keys that are cooling down are skipped. When a pass
//! over a route tried something and attempts remain, the next pass starts after an exponential
//! backoff with jitter. When nothing in a route is usable but a cooldown ends within the
//! route's `max_backoff` (a `Retry-After`, typically), the plan waits for it rather than
//! failing.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::balance::{order_deployments, weighted_order};
use crate::health::Admission;
use crate::runtime::{DeploymentRuntime, KeyRuntime, RouteRuntime};

/// One attempt: a deployment of a route, with one of its provider's keys.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub route: Arc<RouteRuntime>,
    pub deployment: Arc<DeploymentRuntime>,
    pub key_index: usize,
    /// This attempt is the half-open probe of a cooled-down key.
    pub probe: bool,
}

impl Candidate {
    pub fn key(&self) -> &KeyRuntime {
        &self.deployment.provider.keys[self.key_index]
    }
}

/// What to do next.
#[derive(Debug)]
pub enum NextAttempt {
    /// Wait `wait`, then try `candidate`.
    Try {
        candidate: Candidate,
        wait: Duration,
    },
    /// Nothing left to try. `retry_after_ms` is when the earliest cooling key comes back.
    Exhausted { retry_after_ms: Option<u64> },
}

/// Walks the candidates of a request's routes.
#[derive(Debug)]
pub struct AttemptPlan {
    routes: Vec<Arc<RouteRuntime>>,
    route_index: usize,
    order: Vec<(Arc<DeploymentRuntime>, usize)>,
    position: usize,
    attempts_in_route: u32,
    attempted_this_pass: bool,
    waited_for_cooldown: bool,
    pending_wait: Duration,
    backoff: Option<backon::ExponentialBackoff>,
    earliest_cooldown_ms: Option<u64>,
    /// Attempts handed out over all routes.
    pub attempts: u32,
}

impl AttemptPlan {
    pub fn new(routes: Vec<Arc<RouteRuntime>>) -> AttemptPlan {
        AttemptPlan {
            routes,
            route_index: 0,
            order: Vec::new(),
            position: 0,
            attempts_in_route: 0,
            attempted_this_pass: false,
            waited_for_cooldown: false,
            pending_wait: Duration::ZERO,
            backoff: None,
            earliest_cooldown_ms: None,
            attempts: 0,
        }
    }

    /// The next attempt, as of `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> NextAttempt {
        loop {
            let Some(route) = self.routes.get(self.route_index).cloned() else {
                let retry_after_ms = self
                    .earliest_cooldown_ms
                    .map(|until| until.saturating_sub(now_ms));
                return NextAttempt::Exhausted { retry_after_ms };
            };
            if self.order.is_empty() {
                self.start_route(&route);
                if self.order.is_empty() {
                    self.advance_route();
                    continue;
                }
            }
            if self.attempts_in_route >= route.retry.max_attempts {
                self.advance_route();
                continue;
            }
            let at_ms = now_ms + u64::try_from(self.pending_wait.as_millis()).unwrap_or(u64::MAX);
            while self.position < self.order.len() {
                let (deployment, key_index) = self.order[self.position].clone();
                self.position += 1;
                let admission = deployment.provider.keys[key_index].health.admit(at_ms);
                let probe = match admission {
                    Admission::Open => false,
                    Admission::Probe => true,
                    Admission::CoolingUntil(until) => {
                        self.earliest_cooldown_ms = Some(
                            self.earliest_cooldown_ms
                                .map_or(until, |earliest| earliest.min(until)),
                        );
                        continue;
                    }
                };
                self.attempts_in_route += 1;
                self.attempts += 1;
                self.attempted_this_pass = true;
                let wait = std::mem::take(&mut self.pending_wait);
                let candidate = Candidate {
                    route: route.clone(),
                    deployment,
                    key_index,
                    probe,
                };
                return NextAttempt::Try { candidate, wait };
            }
            // End of a pass over this route.
            self.position = 0;
            if self.attempted_this_pass {
                self.attempted_this_pass = false;
                let backoff = self.backoff.get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(route.retry.initial_backoff_ms))
                        .with_max_delay(Duration::from_millis(route.retry.max_backoff_ms))
                        .with_jitter()
                        .without_max_times()
                        .build()
                });
                self.pending_wait = backoff.next().unwrap_or(Duration::ZERO);
                continue;
            }
            // Nothing usable in this pass: wait for a cooldown that ends soon, once.
            if let Some(until) = self.earliest_cooldown_ms {
                let wait_ms = until.saturating_sub(now_ms);
                if !self.waited_for_cooldown && wait_ms <= route.retry.max_backoff_ms {
                    self.waited_for_cooldown = true;
                    self.pending_wait = Duration::from_millis(wait_ms);
                    continue;
                }
            }
            self.advance_route();
        }
    }

    fn start_route(&mut self, route: &RouteRuntime) {
        self.order.clear();
        // Read only for a provider with several keys (their quota orders them).
        let mut now_wall_ms = None;
        // One deployment needs no ordering, and one key no shuffling: the common case
        // allocates nothing here.
        let ordered;
        let deployments = if route.deployments.len() <= 1 {
            &route.deployments
        } else {
            ordered = order_deployments(route);
            &ordered
        };
        for deployment in deployments {
            let keys = &deployment.provider.keys;
            if keys.len() == 1 {
                self.order.push((deployment.clone(), 0));
                continue;
            }
            let weights: Vec<u32> = keys.iter().map(|key| key.weight).collect();
            let order = weighted_order(&weights);
            // Keys nearly out of upstream quota (cluster-wide) go after the others.
            let (tight, roomy): (Vec<usize>, Vec<usize>) = if keys.len() > 1 {
                order.into_iter().partition(|index| {
                    let now = *now_wall_ms.get_or_insert_with(skein_types::now_ms);
                    keys[*index].quota_tight(now)
                })
            } else {
                (Vec::new(), order)
            };
            for key_index in roomy.into_iter().chain(tight) {
                self.order.push((deployment.clone(), key_index));
            }
        }
        self.position = 0;
        self.attempts_in_route = 0;
        self.attempted_this_pass = false;
        self.waited_for_cooldown = false;
        self.pending_wait = Duration::ZERO;
        self.backoff = None;
    }

    fn advance_route(&mut self) {
        self.route_index += 1;
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::FailureKind;
    use crate::runtime::RuntimeConfig;
    use skein_types::{SkeinConfig, ValidatedConfig};

    /// Provider `a` with two keys serving route `main`, which falls back to route `backup`
    /// on provider `b` with one key.
    fn runtime() -> RuntimeConfig {
        let validated = ValidatedConfig::validate(test_config()).expect("valid");
        RuntimeConfig::build(&validated, &|reference| Ok(format!("secret-{reference}")))
            .expect("build")
    }

    fn test_config() -> SkeinConfig {
        use skein_types::{
            CredentialRef, DeploymentSpec, KeySpec, ProviderKind, ProviderSpec, RouteSpec, Strategy,
        };
        let key = |name: &str| KeySpec {
            key: CredentialRef::Env(name.to_owned()),
            weight: 1,
            name: None,
            rpm: None,
            tpm: None,
        };
        let provider = |name: &str, keys: Vec<KeySpec>| ProviderSpec {
            name: name.to_owned(),
            kind: ProviderKind::OpenAi,
            base_url: None,
            headers: Default::default(),
            keys,
            api_version: None,
            models: vec![],
            circuit_breaker: Default::default(),
        };
        let route = |name: &str, provider: &str, fallbacks: Vec<String>| RouteSpec {
            name: name.to_owned(),
            strategy: Strategy::Ordered,
            deployments: vec![DeploymentSpec {
                provider: provider.to_owned(),
                model: format!("{provider}-model"),
                weight: 1,
                max_output_tokens: None,
            }],
            fallbacks,
            attempt_timeout_ms: None,
            retry: skein_types::RetrySpec {
                max_attempts: 3,
                initial_backoff_ms: 10,
                max_backoff_ms: 1_000,
            },
        };
        SkeinConfig {
            version: 1,
            server: Default::default(),
            providers: vec![
                provider("a", vec![key("A1"), key("A2")]),
                provider("b", vec![key("B1")]),
            ],
            routes: vec![
                route("main", "a", vec!["backup".to_owned()]),
                route("backup", "b", vec![]),
            ],
        }
    }

    fn take(plan: &mut AttemptPlan, now_ms: u64) -> (String, usize, Duration) {
        match plan.next(now_ms) {
            NextAttempt::Try { candidate, wait } => (
                candidate.deployment.provider.name.to_string(),
                candidate.key_index,
                wait,
            ),
            NextAttempt::Exhausted { retry_after_ms } => {
                panic!("exhausted early ({retry_after_ms:?})")
            }
        }
    }

    #[test]
    fn rotates_keys_then_falls_back_then_exhausts() {
        let config = runtime();
        let mut plan = AttemptPlan::new(config.resolve("main").expect("route"));
        let (first_provider, first_key, first_wait) = take(&mut plan, 0);
        let (second_provider, second_key, second_wait) = take(&mut plan, 0);
        assert_eq!(
            (first_provider.as_str(), second_provider.as_str()),
            ("a", "a")
        );
        assert_ne!(
            first_key, second_key,
            "the second attempt uses the other key"
        );
        assert_eq!((first_wait, second_wait), (Duration::ZERO, Duration::ZERO));
        // Third attempt of route `main` goes back to a key after a backoff.
        let (third_provider, _, third_wait) = take(&mut plan, 0);
        assert_eq!(third_provider, "a");
        assert!(third_wait > Duration::ZERO);
        // Then the fallback route, three times, then nothing.
        for _ in 0..3 {
            assert_eq!(take(&mut plan, 0).0, "b");
        }
        assert!(matches!(plan.next(0), NextAttempt::Exhausted { .. }));
    }

    #[test]
    fn skips_cooling_keys_and_waits_for_a_short_retry_after() {
        let config = runtime();
        let routes = config.resolve("backup").expect("route");
        let key = &routes[0].deployments[0].provider.keys[0];
        let policy = routes[0].deployments[0].provider.breaker.clone();
        key.health.record_failure(
            FailureKind::RateLimited {
                retry_after_ms: Some(500),
            },
            &policy,
            1_000,
        );
        let mut plan = AttemptPlan::new(routes);
        // The only key is cooling until 1500: the plan waits 500 ms and sends the probe.
        match plan.next(1_000) {
            NextAttempt::Try { candidate, wait } => {
                assert!(candidate.probe);
                assert_eq!(wait, Duration::from_millis(500));
            }
            NextAttempt::Exhausted { .. } => panic!("should wait for the cooldown"),
        }
    }

    #[test]
    fn reports_when_everything_is_cooling_for_long() {
        let config = runtime();
        let routes = config.resolve("backup").expect("route");
        let key = &routes[0].deployments[0].provider.keys[0];
        let policy = routes[0].deployments[0].provider.breaker.clone();
        key.health.record_failure(
            FailureKind::RateLimited {
                retry_after_ms: Some(30_000),
            },
            &policy,
            0,
        );
        let mut plan = AttemptPlan::new(routes);
        match plan.next(0) {
            NextAttempt::Exhausted { retry_after_ms } => assert_eq!(retry_after_ms, Some(30_000)),
            NextAttempt::Try { .. } => panic!("nothing is usable"),
        }
        assert_eq!(plan.attempts, 0);
    }

    #[test]
    fn direct_provider_model_and_unknown_models() {
        let config = runtime();
        let routes = config.resolve("b/some-model").expect("direct");
        assert_eq!(routes[0].deployments[0].model, "some-model");
        assert!(config.resolve("nope").is_err());
        assert!(config.resolve("zzz/some-model").is_err());
    }

    #[test]
    fn a_client_chosen_model_cannot_reach_into_another_upstream_path() {
        let mut config = test_config();
        let mut gemini = config.providers[0].clone();
        gemini.name = "g".to_owned();
        gemini.kind = skein_types::ProviderKind::Gemini;
        config.providers.push(gemini);
        let validated = ValidatedConfig::validate(config).expect("valid");
        let config = RuntimeConfig::build(&validated, &|reference| Ok(format!("s-{reference}")))
            .expect("build");
        let routes = config.resolve("g/gemini-2.5-flash").expect("direct");
        assert_eq!(routes[0].deployments[0].model, "gemini-2.5-flash");
        // An inferred Gemini name goes to the one Gemini provider.
        assert!(config.resolve("gemini-2.5-pro").is_ok());
        for model in [
            "g/../../v1/files",
            "g/..",
            "g/a b",
            "g/x?alt=1",
            "gemini-x/../../y",
        ] {
            assert!(
                matches!(
                    config.resolve(model),
                    Err(crate::ResolveError::UnusableModel { ref provider }) if provider == "g"
                ),
                "{model}"
            );
        }
        // An OpenAI-shaped provider takes the model in the body: any name goes.
        assert!(config.resolve("b/../x").is_ok());
    }

    #[test]
    fn an_implicit_route_is_built_once_and_the_kept_ones_are_bounded() {
        let config = runtime();
        let first = config.resolve("b/some-model").expect("direct");
        let again = config.resolve("b/some-model").expect("direct");
        assert!(Arc::ptr_eq(&first[0], &again[0]));
        let other = config.resolve("b/other-model").expect("direct");
        assert!(!Arc::ptr_eq(&first[0], &other[0]));
        assert_eq!(other[0].deployments[0].model, "other-model");

        // Past the bound, names still resolve; they are just not kept.
        for index in 0..1100 {
            let model = format!("b/model-{index}");
            let routes = config.resolve(&model).expect("direct");
            assert_eq!(routes[0].deployments[0].model, format!("model-{index}"));
        }
        let late = config.resolve("b/model-1099").expect("direct");
        let late_again = config.resolve("b/model-1099").expect("direct");
        assert!(!Arc::ptr_eq(&late[0], &late_again[0]));
        assert!(Arc::ptr_eq(
            &first[0],
            &config.resolve("b/some-model").expect("direct")[0]
        ));
    }

    #[test]
    fn keys_near_the_end_of_their_quota_are_tried_last() {
        let config = runtime();
        let provider = config.provider("a").expect("provider");
        let now = skein_types::now_ms();
        provider.keys[0]
            .quota
            .observe(crate::shared::QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(3),
                limit_tokens: None,
                remaining_tokens: None,
                at_ms: now,
            });
        for _ in 0..20 {
            let mut plan = AttemptPlan::new(config.resolve("main").expect("route"));
            let (_, first_key, _) = take(&mut plan, 0);
            assert_eq!(first_key, 1, "the key with quota left goes first");
        }
    }

    #[test]
    fn adaptive_scores_follow_the_clusters_view() {
        use crate::balance::adaptive_score;
        use crate::shared::DeploymentReport;
        let config = runtime();
        let route = config.resolve("main").expect("route");
        let deployment = &route[0].deployments[0];
        let now = skein_types::now_ms();
        let healthy = adaptive_score(deployment, None, now);
        assert_eq!(healthy, 1000);
        // Two other nodes see it fail 90% of the time: its share falls to the floor.
        deployment.remote.set(&[
            DeploymentReport {
                error_ppm: 900_000,
                latency_us: 0,
            },
            DeploymentReport {
                error_ppm: 900_000,
                latency_us: 0,
            },
        ]);
        assert!(adaptive_score(deployment, None, now) <= 20);
        // Healthy again, but 30 ms slower than the route's fastest deployment (with the 2 ms
        // slack: 12 / 42 of the score).
        deployment.remote.set(&[DeploymentReport {
            error_ppm: 0,
            latency_us: 40_000,
        }]);
        assert_eq!(adaptive_score(deployment, Some(10_000), now), 286);
        // A sub-millisecond difference hardly counts: 1 ms against the fastest's 0.3 ms.
        deployment.remote.set(&[DeploymentReport {
            error_ppm: 0,
            latency_us: 1_000,
        }]);
        assert_eq!(adaptive_score(deployment, Some(300), now), 767);
    }
}
