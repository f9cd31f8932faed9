//! The admin gRPC API: what a node serves and the live state of its provider keys.

use serde_json::json;
use skein_mock::Fault;
use skein_node::MapEnvironment;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{GetStatusRequest, Kind};
use skein_tests::{Gateway, start_mock};

#[tokio::test]
async fn get_status_reports_routes_and_key_cooldowns() {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:A, name: first}}, {{key: env:B, name: second, weight: 3}}]\nroutes:\n  - name: zeta\n    deployments: [{{provider: p, model: m}}]\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n",
        mock.url()
    );
    let gateway = Gateway::start(
        &config,
        MapEnvironment::from_pairs([("A", "key-a"), ("B", "key-b")]),
    )
    .await
    .expect("gateway");
    // Key A is rate limited for 30 s; one request to it is enough for the node to notice.
    mock.set_key_fault(
        "key-a",
        Some(Fault::Status {
            status: 429,
            retry_after: Some(30),
        }),
    );
    // Keys are picked by weight (1 : 3), so call until key A has been tried (bounded).
    for _ in 0..200 {
        if mock
            .requests()
            .iter()
            .any(|request| request.api_key.as_deref() == Some("key-a"))
        {
            break;
        }
        let (status, _, _) = gateway
            .post_json(
                "/v1/chat/completions",
                &json!({"model": "alpha", "messages": []}),
            )
            .await
            .expect("call");
        assert_eq!(status, 200);
    }
    assert!(
        mock.requests()
            .iter()
            .any(|request| request.api_key.as_deref() == Some("key-a")),
        "key A was tried"
    );

    let grpc = gateway.node.grpc_addr;
    let mut client = AdminClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert!(status.ready);
    assert_eq!(status.http_addr, gateway.node.http_addr.to_string());
    assert_eq!(status.routes, vec!["alpha", "zeta"]);
    let provider = &status.providers[0];
    assert_eq!(
        (provider.name.as_str(), provider.kind.as_str()),
        ("p", "openai_compatible")
    );
    let first = provider
        .keys
        .iter()
        .find(|key| key.name == "first")
        .expect("first key");
    let second = provider
        .keys
        .iter()
        .find(|key| key.name == "second")
        .expect("second key");
    assert!(
        first.cooling_down_ms > 20_000,
        "the rate-limited key cools down: {first:?}"
    );
    assert_eq!((second.cooling_down_ms, second.weight), (0, 3));

    // A config change rebuilds the node's routing; what it learned about keys is kept.
    client
        .create(skein_tests::typed_write(
            Kind::Route,
            json!({"name": "gamma", "deployments": [{"provider": "p", "model": "m"}]}),
        ))
        .await
        .expect("create route");
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    assert_eq!(status.routes, vec!["alpha", "gamma", "zeta"]);
    let first = status.providers[0]
        .keys
        .iter()
        .find(|key| key.name == "first")
        .expect("first key");
    assert!(
        first.cooling_down_ms > 20_000,
        "the cooldown survived the rebuild: {first:?}"
    );
}
