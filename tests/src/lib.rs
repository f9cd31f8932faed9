//! Test harness: start a mock provider and a gateway node in-process on port 0, poll with a
//! deadline, locate the real binaries for black-box tests.

pub mod process;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use skein_mock::{MockOptions, MockServer};
use skein_node::{MapEnvironment, NodeOptions, RunningNode, parse_config_text, start_node};

/// A gateway node started in-process.
pub struct Gateway {
    pub node: RunningNode,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub client: reqwest::Client,
    /// The node's data directory (removed on drop).
    pub data_dir: tempfile::TempDir,
}

impl Gateway {
    /// Start a node from YAML config text; credentials resolve from `env`.
    pub async fn start(config_yaml: &str, env: MapEnvironment) -> anyhow::Result<Gateway> {
        Gateway::start_with(config_yaml, env, |_| {}).await
    }

    /// Start a node from YAML config text, with options adjusted by `adjust`.
    pub async fn start_with(
        config_yaml: &str,
        env: MapEnvironment,
        adjust: impl FnOnce(&mut NodeOptions),
    ) -> anyhow::Result<Gateway> {
        let validated = parse_config_text(config_yaml, "test config")?;
        let data_dir = tempfile::tempdir()?;
        let mut options = NodeOptions::new(data_dir.path().to_owned());
        adjust(&mut options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let node = start_node(
            listener,
            grpc_listener,
            validated,
            std::sync::Arc::new(env),
            options,
        )
        .await?;
        let url = format!("http://{}", node.http_addr);
        let client = reqwest::Client::builder().no_proxy().build()?;
        Ok(Gateway {
            node,
            url,
            client,
            data_dir,
        })
    }

    /// POST JSON to a path.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await?)
    }

    /// POST JSON and read the answer as JSON, with its status and headers.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, serde_json::Value)> {
        let response = self.post(path, body).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let json = serde_json::from_str(&text)
            .with_context(|| format!("not JSON (status {status}): {text}"))?;
        Ok((status, headers, json))
    }

    /// POST a streaming request and collect the `data:` payloads of the SSE answer.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Vec<String>)> {
        let response = self.post(path, body).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok((status, headers, sse_data(&text)))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?)
    }
}

/// The `data:` payloads of an SSE body, in order.
/// (event name, data) pairs of an SSE body whose events are named (Anthropic, Responses).
pub fn named_events(text: &str) -> Vec<(String, serde_json::Value)> {
    let mut events = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(event) = line.strip_prefix("event: ") {
            name = event.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            events.push((
                std::mem::take(&mut name),
                serde_json::from_str(data).expect("event json"),
            ));
        }
    }
    events
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
        })
        .map(str::to_owned)
        .collect()
}

/// A mock provider with request recording on.
pub async fn start_mock() -> anyhow::Result<MockServer> {
    Ok(MockServer::start(MockOptions {
        record: true,
        ..MockOptions::default()
    })
    .await?)
}

/// Poll `condition` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A binary of this workspace (`skein`, `skein-mock`), built by `cargo build`.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("locating the target directory")?;
    let path = profile_dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    Ok(path)
}

/// The value of a metric line (first match of `name{labels…}` containing every fragment).
pub fn metric_value(metrics: &str, name: &str, fragments: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(name) && fragments.iter().all(|fragment| line.contains(fragment))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for addresses that must be known before
/// a process starts, such as Raft voter lists).
///
/// It is drawn at random below the kernel's ephemeral range (which starts at 32768 by
/// default): a port the kernel handed out for `bind(0)` could be handed out again, to any
/// outgoing connection, before the process that is told to use it binds it. Tests that use
/// these ports run one at a time (`.config/nextest.toml`), and a port is never given twice.
pub fn free_port() -> anyhow::Result<u16> {
    // Ports handed out here but not yet bound by their process must not be handed out again.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..100 {
        let port = fastrand::u16(20_000..32_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free port found below the ephemeral range")
}

/// A gRPC request carrying `authorization: Bearer <token>`.
pub fn authorized<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

/// An admin write carrying `entity` (given in the config file's schema) as its typed message,
/// as every client generated from the proto sends it.
pub fn typed_write(
    kind: skein_proto::admin::v1::Kind,
    entity: serde_json::Value,
) -> skein_proto::admin::v1::WriteRequest {
    let typed = skein_node::typed::entity_of(kind, &entity.to_string())
        .unwrap_or_else(|status| panic!("{entity} as a typed entity: {}", status.message()));
    skein_proto::admin::v1::WriteRequest {
        kind: kind as i32,
        json: String::new(),
        entity: Some(typed),
    }
}
