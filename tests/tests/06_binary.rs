//! Black-box tests of the real `skein` binary: config errors, serving, logs without secrets,
//! graceful shutdown on SIGTERM.

use std::process::Command;
use std::time::Duration;

use skein_tests::process::Spawned;
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
