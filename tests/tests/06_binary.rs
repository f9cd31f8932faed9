//! Black-box tests of the real `skein` binary: config errors, serving, logs without secrets,
//! graceful shutdown on SIGTERM.

use std::process::Command;
use std::time::Duration;

use skein_tests::process::{Spawned, run_cli};
use skein_tests::{binary, start_mock};

/// Write `content` to a config file, run `skein check` on it, expect a failure; its stderr.
fn failing_check(path: &std::path::Path, content: &str) -> String {
    std::fs::write(path, content).expect("write");
    let output = Command::new(binary("skein").expect("binary"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run");
    assert!(!output.status.success(), "skein check accepted:\n{content}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_names_the_unknown_key_and_its_line() {
    let directory = std::env::temp_dir().join(format!("skein-check-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("dir");
    let path = directory.join("bad.yaml");
    let stderr = failing_check(
        &path,
        "version: 1\nproviders:\n  - name: a\n    kind: openai\n    api_key: sk-literal\n",
    );
    assert!(
        stderr.contains("api_key") && stderr.contains("line 5"),
        "{stderr}"
    );
    let stderr = failing_check(
        &path,
        "version: 1\nroutes:\n  - name: r\n    deployments: [{provider: ghost, model: m}]\n",
    );
    assert!(
        stderr.contains("routes[0].deployments[0].provider: no provider named \"ghost\""),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_proxies_keeps_secrets_out_of_logs_and_drains_on_sigterm() {
    let mock = start_mock().await.expect("mock");
    let secret = "sk-do-not-log-this-7d1c";
    let data = tempfile::tempdir().expect("data dir");
    let node = Spawned::start(
        Command::new(binary("skein").expect("binary"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--gossip-addr",
                "off",
                "--log-format",
                "json",
            ])
            .env("OPENAI_API_KEY", secret)
            .env("OPENAI_BASE_URL", format!("{}/v1", mock.url()))
            .env("SKEIN_LOG", "debug")
            .env_remove("SKEIN_CONFIG"),
    );
    let line = node
        .wait_for("skein is serving", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no start line:\n{}", node.output()));
    let started: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    let url = started["http"].as_str().expect("http field").to_owned();
    assert!(
        node.output().contains("OPEN"),
        "open mode must be announced"
    );

    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    for model in ["gpt-4o", "openai/mock-500", "openai/mock-429"] {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("call");
        assert!(response.status().as_u16() > 0);
    }
    assert_eq!(mock.requests()[0].api_key.as_deref(), Some(secret));
    assert!(
        node.wait_for("upstream attempt failed", Duration::from_secs(5))
            .is_some()
    );
    assert!(
        !node.output().contains(secret),
        "the provider key reached the logs:\n{}",
        node.output()
    );

    // `skein status` reads the node through the admin gRPC API.
    let grpc = started["grpc"].as_str().expect("grpc field").to_owned();
    let status_output = Command::new(binary("skein").expect("binary"))
        .args(["status", "--addr", &grpc])
        .output()
        .expect("status");
    let printed = String::from_utf8_lossy(&status_output.stdout);
    assert!(
        status_output.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&status_output.stderr)
    );
    assert!(
        printed.contains("provider openai (openai)") && printed.contains("key key-0 weight 1"),
        "{printed}"
    );
    assert!(!printed.contains(secret));

    let mut node = node;
    let exit = node
        .terminate(Duration::from_secs(15))
        .expect("stopped after SIGTERM");
    assert!(exit.success(), "exit status {exit:?}\n{}", node.output());
    assert!(node.wait_for("stopped", Duration::from_secs(2)).is_some());
}

/// Run the `skein` CLI against `endpoint`; (success, stdout, stderr).
fn cli(endpoint: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend(["--endpoint", endpoint, "--token", token]);
    run_cli(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_keys_entities_cluster_and_config() {
    let mock = start_mock().await.expect("mock");
    let data = tempfile::tempdir().expect("data dir");
    let config = data.path().join("skein.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:UPSTREAM}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n",
            mock.url()
        ),
    )
    .expect("config");
    let node = Spawned::start(
        Command::new(binary("skein").expect("binary"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--gossip-addr",
                "off",
                "--log-format",
                "json",
                "--admin-token",
                "cli-token",
            ])
            .env("UPSTREAM", "upstream-secret")
            .env_remove("SKEIN_CONFIG"),
    );
    let line = node
        .wait_for("skein is serving", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no start line:\n{}", node.output()));
    let started: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    let grpc = started["grpc"].as_str().expect("grpc").to_owned();
    let http = started["http"].as_str().expect("http").to_owned();

    // A key: the secret is printed once and works on the proxy.
    let (ok, out, err) = cli(
        &grpc,
        "cli-token",
        &[
            "key", "create", "--id", "cli-key", "--model", "alpha", "--output", "json",
        ],
    );
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).expect("json");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let status = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(format!("{http}/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(
            &serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("call")
        .status();
    assert_eq!(status.as_u16(), 200);
    let (ok, out, _) = cli(&grpc, "cli-token", &["key", "list"]);
    assert!(
        ok && out.contains("cli-key") && !out.contains(&secret),
        "{out}"
    );

    // Entities from JSON, the cluster, export.
    let (ok, _, err) = cli(
        &grpc,
        "cli-token",
        &[
            "team",
            "create",
            "--json",
            r#"{"id": "platform", "name": "Platform"}"#,
        ],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&grpc, "cli-token", &["cluster", "status"]);
    assert!(ok && out.contains("leader"), "{out}{err}");
    let (ok, out, _) = cli(&grpc, "cli-token", &["config", "export"]);
    assert!(
        ok && out.contains("platform") && out.contains("cli-key"),
        "{out}"
    );
    let (ok, out, _) = cli(&grpc, "cli-token", &["usage", "--output", "json"]);
    assert!(ok && out.contains("rows"), "{out}");

    // Errors are typed and say what is wrong.
    let (ok, _, err) = cli(&grpc, "wrong-token", &["team", "list"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = cli(
        &grpc,
        "cli-token",
        &[
            "route",
            "create",
            "--json",
            r#"{"name": "r", "deployments": [{"provider": "ghost", "model": "m"}]}"#,
        ],
    );
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("route.deployments[0].provider"),
        "{err}"
    );
    let (ok, _, err) = cli(&grpc, "cli-token", &["key", "revoke", "nobody"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}
