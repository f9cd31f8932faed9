//! Starting and stopping a node's listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use skein_core::RuntimeConfig;
use skein_proxy::{AppState, ProxyOptions};

use crate::admin::AdminService;
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
    /// The admin gRPC address, when a gRPC listener was given.
    pub grpc_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    admin: Option<JoinHandle<std::io::Result<()>>>,
    drain_timeout: Duration,
}

/// Serve the proxy on `http_listener`, and the admin gRPC API on `grpc_listener` when given
/// (both bound by the caller, port 0 in tests).
pub async fn start_node(
    http_listener: TcpListener,
    grpc_listener: Option<TcpListener>,
    runtime: RuntimeConfig,
    options: NodeOptions,
) -> anyhow::Result<RunningNode> {
    let http_addr = http_listener
        .local_addr()
        .context("reading the HTTP listener address")?;
    let state = Arc::new(
        AppState::new(runtime, &options.proxy)
            .map_err(|error| anyhow::anyhow!("building the upstream HTTP client: {error}"))?,
    );
    let app = skein_proxy::router(state.clone());
    let (shutdown, shutdown_signal) = watch::channel(false);
    // Streams write one small event at a time: without TCP_NODELAY, Nagle's algorithm and the
    // client's delayed ACK hold every event after the first for up to 40 ms.
    let http_listener = http_listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    let mut http_signal = shutdown_signal.clone();
    let server = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_signal.wait_for(|stop| *stop).await;
            })
            .await
    });
    let mut grpc_addr = None;
    let mut admin = None;
    if let Some(grpc_listener) = grpc_listener {
        grpc_addr = Some(
            grpc_listener
                .local_addr()
                .context("reading the gRPC listener address")?,
        );
        let router = AdminService::new(state.clone(), http_addr).into_router();
        let mut grpc_signal = shutdown_signal;
        admin = Some(tokio::spawn(async move {
            axum::serve(grpc_listener, router)
                .with_graceful_shutdown(async move {
                    let _ = grpc_signal.wait_for(|stop| *stop).await;
                })
                .await
        }));
    }
    Ok(RunningNode {
        http_addr,
        grpc_addr,
        state,
        shutdown,
        server,
        admin,
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
        if let Some(admin) = self.admin {
            // Admin calls are short; a second is plenty.
            if let Ok(joined) = tokio::time::timeout(Duration::from_secs(1), admin).await {
                joined.context("admin task")?.context("admin gRPC server")?;
            }
        }
        Ok(())
    }
}

/// Bind a TCP listener with a deep accept queue: bursts of new connections (thousands of
/// clients reconnecting, or an open-loop load) must not overflow the kernel's default and
/// turn into one-second SYN retransmissions.
pub async fn bind_listener(address: &str) -> anyhow::Result<TcpListener> {
    let mut last_error = None;
    for resolved in tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
    {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved) {
            Ok(()) => return Ok(socket.listen(LISTEN_BACKLOG)?),
            Err(error) => last_error = Some(error),
        }
    }
    match last_error {
        Some(error) => Err(error).with_context(|| format!("binding {address}")),
        None => anyhow::bail!("{address} resolved to no address"),
    }
}

/// The accept queue length asked for (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;
