//! Starting and stopping a node's listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skein_core::RuntimeConfig;
use skein_proxy::{AppState, ProxyOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Node settings that are not part of the config file.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub proxy: ProxyOptions,
    /// How long shutdown waits for requests in flight (streams included).
    pub drain_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            proxy: ProxyOptions::default(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A node serving on its listeners.
pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    drain_timeout: Duration,
}

/// Serve the proxy on `http_listener` (bound by the caller, port 0 in tests).
pub async fn start_node(
    http_listener: TcpListener,
    runtime: RuntimeConfig,
    options: NodeOptions,
) -> anyhow::Result<RunningNode> {
    let http_addr = http_listener
        .local_addr()
        .context("reading the HTTP listener address")?;
    let state = Arc::new(
        AppState::new(runtime, &options.proxy).context("building the upstream HTTP client")?,
    );
    let app = skein_proxy::router(state.clone());
    let (shutdown, mut shutdown_signal) = watch::channel(false);
    let server = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_signal.wait_for(|stop| *stop).await;
            })
            .await
    });
    Ok(RunningNode {
        http_addr,
        state,
        shutdown,
        server,
        drain_timeout: options.drain_timeout,
    })
}

impl RunningNode {
    /// Say not ready, stop accepting, and wait for requests in flight up to the drain timeout.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state.set_ready(false);
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(self.drain_timeout, self.server).await {
            Ok(joined) => joined.context("server task")?.context("HTTP server")?,
            Err(_) => tracing::warn!(
                timeout_s = self.drain_timeout.as_secs(),
                "requests still in flight after the drain timeout; stopping anyway"
            ),
        }
        Ok(())
    }
}
