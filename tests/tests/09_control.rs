//! The control plane on one node: virtual keys, the admin API (token, validation, CRUD,
//! pagination, export/import, watch), and the proxy enforcing what was written.

use serde_json::json;
use skein_node::MapEnvironment;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    CreateKeyRequest, CreateKeyResponse, CreateKeysRequest, DeleteRequest, ExportConfigRequest,
    GetRequest, ImportConfigRequest, KeyRequest, Kind, ListRequest, UsageRequest, WatchRequest,
    WriteRequest,
};
use skein_tests::{Gateway, start_mock};
use tonic::Code;
use tonic::transport::Channel;

const TOKEN: &str = "admin-token-for-tests";

async fn gateway_with_token(mock_url: &str) -> Gateway {
    let config = format!(
        "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {mock_url}/v1\n    keys: [{{key: env:A}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n  - name: beta\n    deployments: [{{provider: p, model: m}}]\n"
    );
    Gateway::start_with(
        &config,
        MapEnvironment::from_pairs([("A", "key-a")]),
        |options| {
            options.admin_token = Some(TOKEN.to_owned());
        },
    )
    .await
    .expect("gateway")
}

async fn admin(gateway: &Gateway) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", gateway.node.grpc_addr))
        .await
        .expect("connect")
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    request
}

async fn chat(gateway: &Gateway, key: Option<&str>, model: &str) -> (u16, serde_json::Value) {
    let mut request = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("call");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

#[tokio::test]
async fn admin_calls_need_the_token_and_name_bad_fields() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;

    let missing = client
        .list(ListRequest {
            kind: Kind::Route as i32,
            ..Default::default()
        })
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(ListRequest {
        kind: Kind::Route as i32,
        ..Default::default()
    });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        client.list(wrong).await.expect_err("wrong token").code(),
        Code::Unauthenticated
    );

    // A route naming a provider that does not exist: INVALID_ARGUMENT naming the field.
    let invalid = client
        .create(authorized(skein_tests::typed_write(
            Kind::Route,
            json!({"name": "gamma", "deployments": [{"provider": "ghost", "model": "m"}]}),
        )))
        .await
        .expect_err("invalid route");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("route.deployments[0].provider"),
        "{}",
        invalid.message()
    );
    let garbage = client
        .create(authorized(WriteRequest {
            kind: Kind::Team as i32,
            // The JSON form older clients send.
            json: "{not json".to_owned(),
            entity: None,
        }))
        .await
        .expect_err("garbage");
    assert_eq!(garbage.code(), Code::InvalidArgument);
    let no_kind = client
        .get(authorized(GetRequest::default()))
        .await
        .expect_err("no kind");
    assert_eq!(no_kind.code(), Code::InvalidArgument);
    let missing_entity = client
        .get(authorized(GetRequest {
            kind: Kind::Team as i32,
            id: "nobody".to_owned(),
            min_version: 0,
        }))
        .await
        .expect_err("missing");
    assert_eq!(missing_entity.code(), Code::NotFound);

    // With an admin token set, the proxy is closed even before any key exists.
    let (status, body) = chat(&gateway, None, "alpha").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "missing_api_key");
}

#[tokio::test]
async fn virtual_keys_are_shown_once_enforced_rotated_and_revoked() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;

    let created = client
        .create_key(authorized(CreateKeyRequest {
            id: "team-a-key".to_owned(),
            name: "Team A".to_owned(),
            models: vec!["alpha".to_owned()],
            ..Default::default()
        }))
        .await
        .expect("create key")
        .into_inner();
    assert!(created.secret.starts_with("sk-skein-"));
    let stored = created.key.expect("key").json;
    assert!(
        !stored.contains(&created.secret),
        "the secret is never stored"
    );
    let stored: serde_json::Value = serde_json::from_str(&stored).expect("json");
    assert_eq!(stored["hash"].as_str().map(str::len), Some(64));
    assert!(
        stored["prefix"]
            .as_str()
            .is_some_and(|prefix| created.secret.starts_with(prefix.trim_end_matches('…')))
    );

    // The key works for the model it may use, not for others, and nothing else works.
    let (status, body) = chat(&gateway, Some(&created.secret), "alpha").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = chat(&gateway, Some(&created.secret), "beta").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed");
    let (status, body) = chat(&gateway, Some("sk-skein-made-up"), "alpha").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // Anthropic clients send x-api-key.
    let response = gateway
        .client
        .post(format!("{}/v1/messages", gateway.url))
        .header("x-api-key", &created.secret)
        .json(&json!({"model": "alpha", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("messages");
    assert_eq!(response.status().as_u16(), 200);

    // Rotation: the old secret stops working, the new one works.
    let rotated = client
        .rotate_key(authorized(KeyRequest {
            id: "team-a-key".to_owned(),
        }))
        .await
        .expect("rotate")
        .into_inner();
    assert_ne!(rotated.secret, created.secret);
    assert_eq!(chat(&gateway, Some(&created.secret), "alpha").await.0, 401);
    assert_eq!(chat(&gateway, Some(&rotated.secret), "alpha").await.0, 200);

    // Revocation.
    client
        .revoke_key(authorized(KeyRequest {
            id: "team-a-key".to_owned(),
        }))
        .await
        .expect("revoke");
    let (status, body) = chat(&gateway, Some(&rotated.secret), "alpha").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("revoked"))
    );

    // Keys are created with CreateKey only.
    let refused = client
        .create(authorized(skein_tests::typed_write(
            Kind::Key,
            stored.clone(),
        )))
        .await
        .expect_err("create key through Create");
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn entities_list_in_pages_export_import_and_watch() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;
    let mut changes = client
        .watch(authorized(WatchRequest { from_version: 0 }))
        .await
        .expect("watch")
        .into_inner();

    let mut last_version = 0;
    for index in 0..5 {
        let written = client
            .create(authorized(skein_tests::typed_write(
                Kind::Team,
                json!({"id": format!("team-{index}"), "name": format!("Team {index}")}),
            )))
            .await
            .expect("create team")
            .into_inner();
        assert!(written.version > last_version, "versions grow");
        last_version = written.version;
    }
    let duplicate = client
        .create(authorized(skein_tests::typed_write(
            Kind::Team,
            json!({"id": "team-0", "name": "again"}),
        )))
        .await
        .expect_err("duplicate");
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    // Pages of two: 2 + 2 + 1, in id order.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(authorized(ListRequest {
                kind: Kind::Team as i32,
                page_size: 2,
                page_token: token.clone(),
                min_version: last_version,
            }))
            .await
            .expect("list")
            .into_inner();
        assert!(page.items.len() <= 2);
        ids.extend(page.items.into_iter().map(|item| item.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, ["team-0", "team-1", "team-2", "team-3", "team-4"]);

    // Update merges fields; delete removes.
    client
        .update(authorized(skein_tests::typed_write(
            Kind::Team,
            json!({"id": "team-1", "name": "Team 1", "models": ["alpha"]}),
        )))
        .await
        .expect("update");
    let team: serde_json::Value = serde_json::from_str(
        &client
            .get(authorized(GetRequest {
                kind: Kind::Team as i32,
                id: "team-1".to_owned(),
                min_version: 0,
            }))
            .await
            .expect("get")
            .into_inner()
            .resource
            .expect("resource")
            .json,
    )
    .expect("json");
    assert_eq!(team["name"], "Team 1");
    assert_eq!(team["models"], json!(["alpha"]));
    client
        .delete(authorized(DeleteRequest {
            kind: Kind::Team as i32,
            id: "team-4".to_owned(),
        }))
        .await
        .expect("delete");

    // Export, change the YAML, import it back atomically.
    let exported = client
        .export_config(authorized(ExportConfigRequest { min_version: 0 }))
        .await
        .expect("export")
        .into_inner();
    assert!(exported.yaml.contains("team-3"));
    assert!(!exported.yaml.contains("team-4"));
    let changed = exported.yaml.replace("Team 3", "Team Three");
    client
        .import_config(authorized(ImportConfigRequest { yaml: changed }))
        .await
        .expect("import");
    let after = client
        .export_config(authorized(ExportConfigRequest { min_version: 0 }))
        .await
        .expect("export")
        .into_inner();
    assert!(after.yaml.contains("Team Three"));
    let broken = client
        .import_config(authorized(ImportConfigRequest {
            yaml: "providers: [{name: x}]".to_owned(),
        }))
        .await
        .expect_err("invalid import");
    assert_eq!(broken.code(), Code::InvalidArgument);

    // The watch saw the changes in order.
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), changes.message())
            .await
            .expect("change in time")
            .expect("stream")
            .expect("open");
        seen.push((change.action, change.target));
    }
    assert!(seen.contains(&("put_team".to_owned(), "team/team-0".to_owned())));
    assert!(seen.contains(&("delete_team".to_owned(), "team/team-4".to_owned())));
}

#[tokio::test]
async fn many_keys_are_created_in_one_atomic_write() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;

    let keys = (0..20_000)
        .map(|n| CreateKeyRequest {
            id: format!("bulk-{n}"),
            models: vec!["alpha".to_owned()],
            ..Default::default()
        })
        .collect();
    let created = client
        .create_keys(authorized(CreateKeysRequest { keys }))
        .await
        .expect("bulk create")
        .into_inner();
    assert_eq!(created.keys.len(), 20_000);
    let secrets: std::collections::BTreeSet<&str> =
        created.keys.iter().map(|key| key.secret.as_str()).collect();
    assert_eq!(secrets.len(), 20_000, "every key has its own secret");
    assert_eq!(created.keys[19_999].id, "bulk-19999", "in the order asked");
    for key in [
        &created.keys[0],
        &created.keys[12_345],
        &created.keys[19_999],
    ] {
        assert_eq!(chat(&gateway, Some(&key.secret), "alpha").await.0, 200);
        assert_eq!(chat(&gateway, Some(&key.secret), "beta").await.0, 403);
    }

    // One taken id refuses the whole batch: the new key before it is not written either.
    let clash = vec![
        CreateKeyRequest {
            id: "fresh-1".to_owned(),
            ..Default::default()
        },
        CreateKeyRequest {
            id: "bulk-7".to_owned(),
            ..Default::default()
        },
    ];
    let refused = client
        .create_keys(authorized(CreateKeysRequest { keys: clash }))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused.message().contains("keys[1].id"),
        "{}",
        refused.message()
    );
    let missing = client
        .get(authorized(GetRequest {
            kind: Kind::Key as i32,
            id: "fresh-1".to_owned(),
            min_version: created.version,
        }))
        .await
        .expect_err("not written");
    assert_eq!(missing.code(), Code::NotFound);

    let empty = client
        .create_keys(authorized(CreateKeysRequest { keys: Vec::new() }))
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
}

async fn put(client: &mut AdminClient<Channel>, kind: Kind, value: serde_json::Value) -> u64 {
    client
        .create(authorized(skein_tests::typed_write(kind, value)))
        .await
        .expect("create")
        .into_inner()
        .version
}

async fn recorded_cost(client: &mut AdminClient<Channel>, key_id: &str) -> (u64, u64) {
    let usage = client
        .get_usage(authorized(UsageRequest {
            key_id: key_id.to_owned(),
            ..Default::default()
        }))
        .await
        .expect("usage")
        .into_inner();
    let cost = usage.rows.iter().map(|row| row.cost_nanos).sum();
    let requests = usage.rows.iter().map(|row| row.requests).sum();
    (cost, requests)
}

/// Price `alpha` at 1 µ$ per token in and out, and create a key `id`.
async fn priced_key(client: &mut AdminClient<Channel>, id: &str) -> CreateKeyResponse {
    put(
        client,
        Kind::Price,
        json!({"model": "alpha", "input_nanos_per_token": 1000, "output_nanos_per_token": 1000}),
    )
    .await;
    client
        .create_key(authorized(CreateKeyRequest {
            id: id.to_owned(),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
}

#[tokio::test]
async fn a_hard_budget_refuses_with_insufficient_quota_once_spent() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;
    let key = priced_key(&mut client, "budgeted").await;
    // 0.2 m$: a few dozen small requests.
    put(
        &mut client,
        Kind::Budget,
        json!({"id": "small", "scope": {"kind": "key", "id": "budgeted"}, "limit_nanos": 200_000, "period": "lifetime"}),
    )
    .await;

    let mut accepted = 0;
    let mut refusal = None;
    for _ in 0..500 {
        let response = gateway
            .client
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(&key.secret)
            .json(&json!({"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("call");
        if response.status().as_u16() == 200 {
            accepted += 1;
        } else {
            refusal = Some((
                response.status().as_u16(),
                response.json::<serde_json::Value>().await.expect("json"),
            ));
            break;
        }
    }
    let (status, body) = refusal.expect("the budget ran out");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(accepted > 5, "{accepted} requests fit");

    // Every accepted request is recorded once, and the total stays within the budget: on one
    // node, the reservation check sees all of its own spend.
    let mut recorded = (0, 0);
    let converged = skein_tests::wait_until(std::time::Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            let (_, requests) = recorded_cost(&mut client, "budgeted").await;
            requests == accepted
        }
    })
    .await;
    if converged {
        recorded = recorded_cost(&mut client, "budgeted").await;
    }
    assert_eq!(recorded.1, accepted, "each request recorded once");
    assert!(recorded.0 <= 200_000, "spent {} of 200000", recorded.0);
    assert!(recorded.0 > 0);

    // By period: today holds it all, tomorrow nothing.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let period = |since_ms, until_ms| UsageRequest {
        key_id: "budgeted".to_owned(),
        since_ms,
        until_ms,
        ..Default::default()
    };
    let today = client
        .get_usage(authorized(period(now_ms, 0)))
        .await
        .expect("usage")
        .into_inner();
    assert_eq!(today.cost_in_period_nanos, recorded.0);
    assert_eq!(
        today.rows.iter().map(|row| row.requests).sum::<u64>(),
        accepted
    );
    let tomorrow = client
        .get_usage(authorized(period(now_ms + 86_400_000, 0)))
        .await
        .expect("usage")
        .into_inner();
    assert!(tomorrow.rows.is_empty() && tomorrow.cost_in_period_nanos == 0);
}

#[tokio::test]
async fn a_stream_the_client_leaves_is_still_charged() {
    let mock = skein_mock::MockServer::start(skein_mock::MockOptions {
        token_latency: std::time::Duration::from_millis(30),
        record: true,
        ..Default::default()
    })
    .await
    .expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;
    let key = priced_key(&mut client, "streamer").await;
    let mut response = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key.secret)
        .json(&json!({"model": "alpha", "stream": true, "messages": [{"role": "user", "content": "tell me a long story please"}]}))
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    // Read the first chunks, then hang up.
    let mut received = 0;
    while received < 2 {
        match response.chunk().await.expect("chunk") {
            Some(chunk) if !chunk.is_empty() => received += 1,
            Some(_) => {}
            None => break,
        }
    }
    drop(response);

    let charged = skein_tests::wait_until(std::time::Duration::from_secs(5), || {
        let mut client = client.clone();
        async move { recorded_cost(&mut client, "streamer").await.1 == 1 }
    })
    .await;
    assert!(charged, "the abandoned stream was recorded");
    let (cost, _) = recorded_cost(&mut client, "streamer").await;
    assert!(cost > 0, "it cost something");
}

#[tokio::test]
async fn rpm_tpm_and_max_parallel_limits_refuse_with_rate_limit_headers() {
    let mock = start_mock().await.expect("mock");
    let gateway = gateway_with_token(&mock.url()).await;
    let mut client = admin(&gateway).await;

    // A key with 3 requests per minute: admitted answers count down, the fourth is refused.
    let rpm = client
        .create_key(authorized(CreateKeyRequest {
            id: "rpm".to_owned(),
            rpm: 3,
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    let call = |secret: String, model: &'static str| {
        let client = gateway.client.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        async move {
            let response = client
                .post(url)
                .bearer_auth(secret)
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .expect("call");
            let headers = response.headers().clone();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("json");
            (status, headers, body)
        }
    };
    for remaining in [2, 1, 0] {
        let (status, headers, _) = call(rpm.clone(), "alpha").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            headers["x-ratelimit-remaining-requests"],
            remaining.to_string().as_str()
        );
        let reset = headers["x-ratelimit-reset-requests"]
            .to_str()
            .expect("ascii");
        assert!(reset.ends_with('s'), "{reset}");
    }
    let (status, headers, body) = call(rpm.clone(), "alpha").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");

    // A team with 100 tokens per minute: its key is refused once the tokens are spent.
    put(
        &mut client,
        Kind::Team,
        json!({"id": "small", "name": "small", "limits": {"tpm": 100}}),
    )
    .await;
    let tpm = client
        .create_key(authorized(CreateKeyRequest {
            id: "tpm".to_owned(),
            team: "small".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..100 {
        let (status, headers, body) = call(tpm.clone(), "alpha").await;
        match status {
            200 => admitted += 1,
            429 => {
                refused = Some((headers, body));
                break;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let (headers, body) = refused.expect("the token limit refuses at last");
    assert!(admitted > 0);
    assert_eq!(headers["x-ratelimit-limit-tokens"], "100");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("team `small`"),
        "{body}"
    );

    // A request that alone needs more tokens than the whole limit is told so.
    let tiny = client
        .create_key(authorized(CreateKeyRequest {
            id: "tiny".to_owned(),
            tpm: 5,
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    let (status, headers, body) = call(tiny, "alpha").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("too large"),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));

    // One call in flight at a time: a second concurrent call is refused, and the slot comes
    // back when the first ends.
    let parallel = client
        .create_key(authorized(CreateKeyRequest {
            id: "parallel".to_owned(),
            max_parallel: 1,
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    let slow = tokio::spawn(call(parallel.clone(), "p/mock-slow-500"));
    // Wait until the slow call has reached the provider.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !mock
        .requests()
        .iter()
        .any(|r| r.body["model"] == "mock-slow-500")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow call never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (status, headers, body) = call(parallel.clone(), "alpha").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["x-skein-ratelimit-limit-parallel"], "1");
    assert_eq!(headers["retry-after"], "1");
    let (status, _, _) = slow.await.expect("slow call");
    assert_eq!(status, 200);
    let (status, _, body) = call(parallel, "alpha").await;
    assert_eq!(status, 200, "{body}");

    // Every refusal is counted, by scope and kind.
    let metrics = gateway.metrics().await.expect("metrics");
    for (scope, kind) in [("key", "requests"), ("team", "tokens"), ("key", "parallel")] {
        let value = skein_tests::metric_value(
            &metrics,
            "skein_rate_limited_total",
            &[&format!("scope=\"{scope}\""), &format!("kind=\"{kind}\"")],
        );
        assert!(value.is_some_and(|v| v >= 1.0), "{scope}/{kind}: {metrics}");
    }
}
