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

fn config(mock_url: &str) -> String {
    format!(
        "version: 1\nserver:\n  max_body_bytes: 65536\nproviders:\n  - name: mock\n    kind: openai_compatible\n    base_url: {mock_url}/v1\n    keys: [{{key: env:KEY}}]\nroutes:\n  - name: ok\n    deployments: [{{provider: mock, model: fine}}]\n"
    )
}

/// A gateway whose listeners shed quickly: 1 s to send headers, 2 s idle, bodies 1 s between
/// chunks, and (optionally) a connection cap on both ports.
async fn quick_gateway(mock_url: &str, cap: usize) -> Gateway {
    Gateway::start_with(
        &config(mock_url),
        MapEnvironment::from_pairs([("KEY", "k")]),
        |options| {
            for listener in [&mut options.proxy_listener, &mut options.grpc_listener] {
                listener.header_read_timeout = Duration::from_secs(1);
                listener.idle_timeout = Duration::from_secs(2);
                if cap > 0 {
                    listener.max_connections = cap;
                }
            }
            options.proxy.body_idle_timeout = Duration::from_secs(1);
            options.proxy.body_timeout = Duration::from_secs(3);
        },
    )
    .await
    .expect("gateway")
}

/// Read until the peer closes (or `timeout`); what was read, and whether it closed.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    timeout: Duration,
) -> (String, bool) {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(timeout, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(count) => answer.extend_from_slice(&buffer[..count]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

async fn shed(gateway: &Gateway, port: &str, reason: &str) -> f64 {
    let metrics = gateway.metrics().await.expect("metrics");
    skein_tests::metric_value(
        &metrics,
        "skein_connections_shed_total",
        &[&format!("port=\"{port}\""), &format!("reason=\"{reason}\"")],
    )
    .unwrap_or(0.0)
}

/// A well-behaved client is served: on a connection of its own (a pooled one may be closed by
/// these tests' 2 s idle timeout just as it is reused, which is the client's race, not a refusal).
async fn chat_ok(gateway: &Gateway) -> bool {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
    else {
        return false;
    };
    client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .json(&serde_json::json!({"model": "ok", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .is_ok_and(|response| response.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_stop_halfway_are_cut_on_both_ports() {
    let mock = start_mock().await.expect("mock");
    let gateway = quick_gateway(&mock.url(), 0).await;
    for (port, address) in [
        ("proxy", gateway.node.http_addr),
        ("grpc", gateway.node.grpc_addr),
    ] {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: skein\r\ncontent-ty")
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(8)).await;
        assert!(closed, "{port}: a half-sent request is cut");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{port}: {:?}",
            started.elapsed()
        );
        assert!(chat_ok(&gateway).await, "others are served");
    }
    let proxy = shed(&gateway, "proxy", "header_timeout").await
        + shed(&gateway, "proxy", "idle_timeout").await;
    let grpc = shed(&gateway, "grpc", "header_timeout").await
        + shed(&gateway, "grpc", "idle_timeout").await;
    assert!(
        proxy >= 1.0 && grpc >= 1.0,
        "counted: proxy {proxy}, grpc {grpc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_on_both_ports() {
    let mock = start_mock().await.expect("mock");
    let gateway = quick_gateway(&mock.url(), 0).await;
    for (port, address) in [
        ("proxy", gateway.node.http_addr),
        ("grpc", gateway.node.grpc_addr),
    ] {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(8)).await;
        assert!(closed, "{port}: a connection that sends nothing is closed");
        assert!(
            shed(&gateway, port, "idle_timeout").await >= 1.0,
            "{port}: counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_stops_arriving_gets_408() {
    let mock = start_mock().await.expect("mock");
    let gateway = quick_gateway(&mock.url(), 0).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.node.http_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: skein\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(8)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(shed(&gateway, "proxy", "body_timeout").await >= 1.0);

    // A body that keeps trickling in (a chunk every 600 ms, under the idle limit) is cut at
    // the overall limit (3 s).
    let mut stream = tokio::net::TcpStream::connect(gateway.node.http_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: skein\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut answered = String::new();
    for _ in 0..20 {
        if stream.write_all(b"1\r\n \r\n").await.is_err() {
            break;
        }
        let mut buffer = [0u8; 4096];
        if let Ok(Ok(count)) =
            tokio::time::timeout(Duration::from_millis(600), stream.read(&mut buffer)).await
        {
            answered = String::from_utf8_lossy(&buffer[..count]).into_owned();
            break;
        }
    }
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room_on_both_ports() {
    let mock = start_mock().await.expect("mock");
    let gateway = quick_gateway(&mock.url(), 20).await;
    let mut idle = Vec::new();
    for address in [gateway.node.http_addr, gateway.node.grpc_addr] {
        for _ in 0..40 {
            idle.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
    }
    // The proxy still serves a new client, and the admin API an operator.
    assert!(chat_ok(&gateway).await, "served at the cap");
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", gateway.node.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("grpc connect");
    let status = skein_proto::admin::v1::admin_client::AdminClient::new(channel)
        .get_status(skein_proto::admin::v1::GetStatusRequest {})
        .await;
    assert!(status.is_ok(), "{status:?}");
    for port in ["proxy", "grpc"] {
        assert!(
            shed(&gateway, port, "evicted_idle").await >= 20.0,
            "{port}: the longest idle connections were closed"
        );
    }
    let metrics = gateway.metrics().await.expect("metrics");
    let open = skein_tests::metric_value(&metrics, "skein_connections_open", &["port=\"proxy\""])
        .expect("gauge");
    assert!(open <= 21.0, "at most the cap stays open: {open}");
    drop(idle);
}

/// The real binary with 512 open files: 600 idle connections cannot stop it serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_exhaustion_attempt_does_not_lock_clients_out() {
    let mock = start_mock().await.expect("mock");
    let dir = tempfile::tempdir().expect("dir");
    let config_path = dir.path().join("skein.yaml");
    std::fs::write(&config_path, config(&mock.url())).expect("config");
    let binary = skein_tests::binary("skein").expect("binary");
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n 512 && exec \"$0\" \"$@\"")
        .arg(&binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--gossip-addr", "off", "--log-format", "json"])
        .env("KEY", "k")
        .env_remove("SKEIN_CONFIG");
    let node = skein_tests::process::Spawned::start(&mut command);
    let url = node.serving_url(Duration::from_secs(30));
    let address = url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..600 {
        match tokio::net::TcpStream::connect(&address).await {
            Ok(stream) => idle.push(stream),
            Err(_) => break,
        }
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    for _ in 0..5 {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .timeout(Duration::from_secs(5))
            .json(&serde_json::json!({"model": "ok", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await;
        assert!(
            response.as_ref().is_ok_and(|r| r.status() == 200),
            "served through the attempt: {response:?}\n{}",
            node.output()
        );
    }
    assert!(
        node.output().contains("closed the longest idle one"),
        "the node says what it did:\n{}",
        node.output()
    );
    drop(idle);
}

/// A client at its own cap makes room with its own idle connections, not others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_its_cap_makes_room_from_its_own_idle_connections() {
    let mock = start_mock().await.expect("mock");
    let gateway = Gateway::start_with(
        &config(&mock.url()),
        MapEnvironment::from_pairs([("KEY", "k")]),
        |options| {
            options.proxy_listener.max_connections_per_client = 5;
        },
    )
    .await
    .expect("gateway");
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(
            tokio::net::TcpStream::connect(gateway.node.http_addr)
                .await
                .expect("connect"),
        );
    }
    assert!(chat_ok(&gateway).await, "served at its cap");
    assert!(
        shed(&gateway, "proxy", "evicted_idle_client").await >= 7.0,
        "the client's longest idle connections were closed"
    );
    // Of the twelve, at most the cap stay open.
    let mut open = 0;
    for stream in &mut idle {
        let (_, closed) = read_until_closed(stream, Duration::from_millis(300)).await;
        if !closed {
            open += 1;
        }
    }
    assert!(open <= 5, "{open} of the idle connections stayed open");
}

/// HTTP/2 streams beyond the node's concurrent-stream limit wait for a free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_beyond_the_limit_wait_their_turn() {
    let mock = start_mock().await.expect("mock");
    let config = format!(
        "version: 1\nproviders:\n  - name: mock\n    kind: openai_compatible\n    base_url: {}/v1\n    keys: [{{key: env:KEY}}]\nroutes:\n  - name: slow\n    deployments: [{{provider: mock, model: mock-slow-300}}]\n",
        mock.url()
    );
    let gateway = Gateway::start_with(
        &config,
        MapEnvironment::from_pairs([("KEY", "k")]),
        |options| {
            options.proxy_listener.h2_max_concurrent_streams = 2;
        },
    )
    .await
    .expect("gateway");
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let started = std::time::Instant::now();
    let calls = (0..6).map(|_| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        async move {
            client
                .post(url)
                .json(&serde_json::json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .map(|response| (response.status().as_u16(), response.version()))
        }
    });
    let results = futures_util::future::join_all(calls).await;
    for result in &results {
        let (status, version) = result.as_ref().expect("answered");
        assert_eq!(*status, 200);
        assert_eq!(*version, reqwest::Version::HTTP_2);
    }
    // Six calls of 300 ms, two at a time over one connection: three turns.
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "the limit held: {:?}",
        started.elapsed()
    );
}

/// A node whose Raft core has stopped says it is not live (so that its pod restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_core_stopped_is_not_live() {
    let mock = start_mock().await.expect("mock");
    let gateway = Gateway::start(
        &config(&mock.url()),
        MapEnvironment::from_pairs([("KEY", "k")]),
    )
    .await
    .expect("gateway");
    let live = |gateway: &Gateway| {
        let request = gateway
            .client
            .get(format!("{}/health/live", gateway.url))
            .send();
        async move {
            match request.await {
                Ok(response) => (
                    response.status().as_u16(),
                    response.text().await.unwrap_or_default(),
                ),
                Err(_) => (0, String::new()),
            }
        }
    };
    assert_eq!(live(&gateway).await.0, 200);
    gateway.node.control.shutdown().await;
    let stopped = skein_tests::wait_until(Duration::from_secs(5), || async {
        live(&gateway).await.0 == 503
    })
    .await;
    assert!(stopped, "not live once the Raft core stopped");
    assert!(live(&gateway).await.1.contains("raft_stopped"));
    let metrics = gateway.metrics().await.expect("metrics");
    assert_eq!(
        skein_tests::metric_value(&metrics, "skein_raft_running", &[]),
        Some(0.0),
        "{metrics}"
    );
}
