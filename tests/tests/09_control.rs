//! The control plane on one node: virtual keys, the admin API (token, validation, CRUD,
//! pagination, export/import, watch), and the proxy enforcing what was written.

use serde_json::json;
use skein_node::MapEnvironment;
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    CreateKeyRequest, DeleteRequest, ExportConfigRequest, GetRequest, ImportConfigRequest,
    KeyRequest, Kind, ListRequest, WatchRequest, WriteRequest,
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
        .create(authorized(WriteRequest {
            kind: Kind::Route as i32,
            json: json!({"name": "gamma", "deployments": [{"provider": "ghost", "model": "m"}]})
                .to_string(),
        }))
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
            json: "{not json".to_owned(),
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
        .create(authorized(WriteRequest {
            kind: Kind::Key as i32,
            json: stored.to_string(),
        }))
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
            .create(authorized(WriteRequest {
                kind: Kind::Team as i32,
                json: json!({"id": format!("team-{index}"), "name": format!("Team {index}")})
                    .to_string(),
            }))
            .await
            .expect("create team")
            .into_inner();
        assert!(written.version > last_version, "versions grow");
        last_version = written.version;
    }
    let duplicate = client
        .create(authorized(WriteRequest {
            kind: Kind::Team as i32,
            json: json!({"id": "team-0", "name": "again"}).to_string(),
        }))
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
        .update(authorized(WriteRequest {
            kind: Kind::Team as i32,
            json: json!({"id": "team-1", "models": ["alpha"]}).to_string(),
        }))
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
