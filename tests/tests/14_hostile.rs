//! Hostile clients on real sockets: what the proxy refuses before reading, and that it keeps
//! serving others meanwhile.

use std::time::Duration;

use skein_node::MapEnvironment;
use skein_tests::{Gateway, start_mock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A body declared far above `server.max_body_bytes` is refused with 413 at once, without
/// waiting for any of it, on every endpoint that takes a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_terabyte_body_is_refused_before_it_is_read() {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        "version: 1\nserver:\n  max_body_bytes: 4096\nproviders:\n  - name: mock\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:KEY}}]\nroutes:\n  - name: ok\n    deployments: [{{provider: mock, model: fine}}]\n",
        mock.url()
    );
    let gateway = Gateway::start(&config, MapEnvironment::from_pairs([("KEY", "k")]))
        .await
        .expect("gateway");
    let address = gateway.node.http_addr;
    for path in [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ] {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        // Headers only: the declared terabyte never comes.
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: skein\r\ncontent-type: application/json\r\ncontent-length: 1000000000000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let count = stream.read(&mut buffer).await.unwrap_or(0);
                if count == 0 {
                    break;
                }
                answer.extend_from_slice(&buffer[..count]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{path}: no answer in time");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{path}: {text}");
        assert!(
            text.contains("1000000000000 bytes declared"),
            "{path}: {text}"
        );
    }
    // Others are served all along.
    let ok = gateway
        .post(
            "/v1/chat/completions",
            &serde_json::json!({"model": "ok", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .expect("post");
    assert_eq!(ok.status(), 200);
}
