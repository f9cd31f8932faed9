//! Retries, key rotation, fallbacks, timeouts, streaming failover, circuit breaking and load
//! balancing, over real sockets against the mock provider.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skein_mock::{Fault, MockServer};
use skein_node::MapEnvironment;
use skein_tests::{Gateway, metric_value, start_mock, wait_until};

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn env() -> MapEnvironment {
    MapEnvironment::from_pairs([
        ("GOOD", "good-key"),
        ("GOOD2", "good-key-2"),
        ("BAD429", "fail-429-key"),
        ("BAD500", "fail-500-key"),
        ("FLAKY", "flaky-key"),
    ])
}

async fn gateway(mock: &MockServer, body: &str) -> Gateway {
    let config = format!(
        "version: 1\n{}",
        body.replace("MOCK", &format!("{}/v1", mock.url()))
    );
    Gateway::start(&config, env()).await.expect("gateway")
}

fn models_seen(mock: &MockServer) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|request| request.body["model"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn a_rate_limited_key_is_rotated_out_and_cooled_down() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:BAD429, weight: 100}, {key: env:GOOD, weight: 1}]
routes:
  - name: r
    deployments: [{provider: p, model: m}]
"#,
    )
    .await;
    for _ in 0..10 {
        let (status, _, body) = gateway
            .post_json("/v1/chat/completions", &chat("r"))
            .await
            .expect("call");
        assert_eq!(status, 200, "{body}");
    }
    let keys: Vec<String> = mock
        .requests()
        .iter()
        .filter_map(|request| request.api_key.clone())
        .collect();
    let limited = keys
        .iter()
        .filter(|key| key.starts_with("fail-429"))
        .count();
    // The 429 carried Retry-After: 1, so the key is not used again within that second.
    assert_eq!(limited, 1, "{keys:?}");
    assert_eq!(keys.iter().filter(|key| *key == "good-key").count(), 10);
    let metrics = gateway.metrics().await.expect("metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "skein_upstream_attempts_total",
            &["outcome=\"rate_limited\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_route_falls_back_once_every_key_fails() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: broken
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:BAD500}]
  - name: healthy
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: main
    retry: {max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms}
    deployments: [{provider: broken, model: primary-model}]
    fallbacks: [backup]
  - name: backup
    deployments: [{provider: healthy, model: backup-model}]
"#,
    )
    .await;
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &chat("main"))
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-route"], "backup");
    assert_eq!(headers["x-skein-attempts"], "3");
    assert_eq!(
        models_seen(&mock),
        vec!["primary-model", "primary-model", "backup-model"]
    );
    let metrics = gateway.metrics().await.expect("metrics");
    assert_eq!(
        metric_value(&metrics, "skein_fallbacks_total", &["route=\"main\""]),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_errors_are_returned_without_retry_or_fallback() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}, {key: env:GOOD2}]
routes:
  - name: main
    deployments: [{provider: p, model: mock-400}]
    fallbacks: [backup]
  - name: backup
    deployments: [{provider: p, model: fine}]
"#,
    )
    .await;
    let (status, _, body) = gateway
        .post_json("/v1/chat/completions", &chat("main"))
        .await
        .expect("call");
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "mock fault 400 for model mock-400"
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(mock.requests().len(), 1, "a 400 is never retried");
}

#[tokio::test]
async fn a_hanging_deployment_times_out_and_the_next_one_serves() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: r
    strategy: ordered
    timeout: 300ms
    deployments: [{provider: p, model: mock-timeout}, {provider: p, model: quick}]
"#,
    )
    .await;
    let started = Instant::now();
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &chat("r"))
        .await
        .expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-deployment"], "p/quick");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let metrics = gateway.metrics().await.expect("metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "skein_upstream_attempts_total",
            &["outcome=\"timeout\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_stream_fails_over_before_its_first_byte_but_never_after() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: empty-then-good
    strategy: ordered
    deployments: [{provider: p, model: mock-empty-stream}, {provider: p, model: steady}]
  - name: cut
    strategy: ordered
    deployments: [{provider: p, model: mock-stream-cut}, {provider: p, model: steady}]
"#,
    )
    .await;
    let stream = |model: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "go"}]});
    let (status, headers, events) = gateway
        .post_stream("/v1/chat/completions", &stream("empty-then-good"))
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(headers["x-skein-deployment"], "p/steady");
    assert_eq!(headers["x-skein-attempts"], "2");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Mock reply from steady: go");

    // Cut after the first bytes: no failover (the client already has part of an answer); the
    // stream ends with an error event and no [DONE].
    let (status, headers, events) = gateway
        .post_stream("/v1/chat/completions", &stream("cut"))
        .await
        .expect("stream");
    assert_eq!(status, 200);
    assert_eq!(headers["x-skein-deployment"], "p/mock-stream-cut");
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["code"], "upstream_stream_interrupted");
    assert!(!events.iter().any(|data| data == "[DONE]"));
    assert_eq!(
        models_seen(&mock)
            .iter()
            .filter(|model| *model == "steady")
            .count(),
        1
    );
    let metrics = gateway.metrics().await.expect("metrics");
    assert_eq!(
        metric_value(&metrics, "skein_stream_interruptions_total", &[]),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failing_key_cools_down_then_comes_back_through_a_probe() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:FLAKY}]
    circuit_breaker: {after_failures: 2, cooldown: 400ms, max_cooldown: 2s}
routes:
  - name: r
    retry: {max_attempts: 1, initial_backoff: 10ms, max_backoff: 50ms}
    deployments: [{provider: p, model: m}]
"#,
    )
    .await;
    mock.set_key_fault(
        "flaky-key",
        Some(Fault::Status {
            status: 500,
            retry_after: None,
        }),
    );
    for _ in 0..2 {
        let (status, _, _) = gateway
            .post_json("/v1/chat/completions", &chat("r"))
            .await
            .expect("call");
        assert_eq!(status, 502);
    }
    // The breaker is open: no upstream call, a 503 that says when to come back.
    let (status, headers, body) = gateway
        .post_json("/v1/chat/completions", &chat("r"))
        .await
        .expect("call");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_deployment_available");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(mock.requests().len(), 2);

    // The upstream recovers; after the cooldown a probe closes the breaker on its own.
    mock.set_key_fault("flaky-key", None);
    let recovered = wait_until(Duration::from_secs(5), || async {
        matches!(
            gateway.post_json("/v1/chat/completions", &chat("r")).await,
            Ok((200, _, _))
        )
    })
    .await;
    assert!(recovered, "the key never came back");
    for _ in 0..5 {
        let (status, _, _) = gateway
            .post_json("/v1/chat/completions", &chat("r"))
            .await
            .expect("call");
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_short_retry_after_is_waited_for_rather_than_failing() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:FLAKY}]
routes:
  - name: r
    deployments: [{provider: p, model: m}]
"#,
    )
    .await;
    mock.set_key_fault(
        "flaky-key",
        Some(Fault::Status {
            status: 429,
            retry_after: Some(1),
        }),
    );
    let started = Instant::now();
    let request = chat("r");
    let call = gateway.post_json("/v1/chat/completions", &request);
    let lift = async {
        // Lift the limit once the first attempt was seen.
        assert!(
            wait_until(Duration::from_secs(5), || async {
                !mock.requests().is_empty()
            })
            .await
        );
        mock.set_key_fault("flaky-key", None);
    };
    let ((status, headers, body), ()) = tokio::join!(async { call.await.expect("call") }, lift);
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-skein-attempts"], "2");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After was not honoured: {:?}",
        started.elapsed()
    );
}

async fn deployment_counts(
    gateway: &Gateway,
    mock: &MockServer,
    route: &str,
    requests: usize,
) -> (usize, usize) {
    for _ in 0..requests {
        let (status, _, body) = gateway
            .post_json("/v1/chat/completions", &chat(route))
            .await
            .expect("call");
        assert_eq!(status, 200, "{body}");
    }
    let seen = models_seen(mock);
    let first = seen
        .iter()
        .filter(|model| model.starts_with('a') || model.starts_with("mock-slow"))
        .count();
    (first, seen.len() - first)
}

#[tokio::test]
async fn weighted_and_round_robin_balancing() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: weighted
    strategy: weighted
    deployments: [{provider: p, model: a-model, weight: 3}, {provider: p, model: b-model, weight: 1}]
  - name: turns
    strategy: round_robin
    deployments: [{provider: p, model: a-model}, {provider: p, model: b-model}]
"#,
    )
    .await;
    let (a, b) = deployment_counts(&gateway, &mock, "weighted", 400).await;
    // Expected 300 / 100.
    assert!((255..=345).contains(&a), "a={a} b={b}");
    mock.clear_requests();
    let (a, b) = deployment_counts(&gateway, &mock, "turns", 10).await;
    assert_eq!((a, b), (5, 5));
}

#[tokio::test]
async fn least_inflight_avoids_a_busy_deployment() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: r
    strategy: least_inflight
    deployments: [{provider: p, model: mock-slow-600}, {provider: p, model: b-fast}]
"#,
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let client = gateway.client.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&chat("r"))
                .send()
                .await
                .map(|response| response.status().as_u16())
        }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for task in tasks {
        assert_eq!(task.await.expect("join").expect("call"), 200);
    }
    let seen = models_seen(&mock);
    let slow = seen
        .iter()
        .filter(|model| model.starts_with("mock-slow"))
        .count();
    // Once the slow deployment holds a request, everything else goes to the idle one.
    assert!(slow <= 2, "{seen:?}");
}

#[tokio::test]
async fn lowest_latency_prefers_the_faster_deployment() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: p
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
routes:
  - name: r
    strategy: lowest_latency
    deployments: [{provider: p, model: mock-slow-80}, {provider: p, model: b-fast}]
"#,
    )
    .await;
    let (slow, fast) = deployment_counts(&gateway, &mock, "r", 20).await;
    // The slow one is measured once, then avoided.
    assert!(slow <= 1 && fast >= 19, "slow={slow} fast={fast}");
}

#[tokio::test]
async fn adaptive_balancing_moves_off_a_slow_deployment_and_back_when_it_recovers() {
    let mock = start_mock().await.expect("mock");
    // The default strategy (adaptive), two deployments on two keys.
    let gateway = gateway(
        &mock,
        r#"
providers:
  - name: one
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD}]
  - name: two
    kind: openai_compatible
    base_url: MOCK
    keys: [{key: env:GOOD2}]
routes:
  - name: adaptive
    deployments: [{provider: one, model: m}, {provider: two, model: m}]
"#,
    )
    .await;
    // The share of `n` calls that key two served.
    let share_of_two = |n: usize| {
        let gateway = &gateway;
        let mock = &mock;
        async move {
            mock.clear_requests();
            for _ in 0..n {
                let (status, _, body) = gateway
                    .post_json("/v1/chat/completions", &chat("adaptive"))
                    .await
                    .expect("call");
                assert_eq!(status, 200, "{body}");
            }
            let requests = mock.requests();
            let two = requests
                .iter()
                .filter(|r| r.api_key.as_deref() == Some("good-key-2"))
                .count();
            two as f64 / requests.len() as f64
        }
    };
    let healthy = share_of_two(100).await;
    assert!((0.25..=0.75).contains(&healthy), "{healthy}");

    // Deployment two becomes 40 ms slower: within a couple of hundred calls it gets little.
    mock.set_key_fault("good-key-2", Some(Fault::Slow { ms: 40 }));
    share_of_two(100).await;
    let slow = share_of_two(100).await;
    assert!(
        slow <= 0.15,
        "still {slow} of the traffic on the slow deployment"
    );

    // It recovers: traffic comes back within seconds.
    mock.set_key_fault("good-key-2", None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let share = share_of_two(100).await;
        if share >= 0.25 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "traffic did not come back: {share}"
        );
    }
}
