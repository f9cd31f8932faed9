//! The accept loop of every TCP listener (the proxy port and the gRPC port): HTTP/1.1 and
//! HTTP/2 through hyper, with hostile clients shed (invariant 11).
//!
//! - **A cap on open connections**, per node and optionally per client address. At the cap, the
//!   connection that has been idle longest (no request in flight) is closed to make room; when
//!   none is idle, the new connection is refused. An attempt to exhaust file descriptors with
//!   idle or half-sent connections therefore cannot lock normal clients out. The default cap
//!   stays below the process's open-file limit.
//! - **Idle connections closed**: a connection with no request in flight for `idle_timeout`
//!   (a keep-alive connection left open, or one that never finishes its first request's
//!   headers) is closed by a sweeper.
//! - **Header read timeout** (HTTP/1.1, hyper's own, with a timer) and a handshake timeout (TLS).
//! - **HTTP/2 limits**: concurrent streams, header list size, and pending reset streams
//!   (rapid-reset floods).
//! - Request bodies have their own timeouts, applied where they are read
//!   ([`crate::handlers`]).
//!
//! Each of these counts in `skein_connections_shed_total{port,reason}` and logs a line (at most
//! once per 5 s per reason). Shutdown stops accepting and lets every connection finish its
//! requests in flight.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::{Metrics, PortLabels, ShedLabels};

/// What turns an accepted TCP stream into the stream HTTP is spoken on: nothing ([`Plain`]),
/// or a TLS handshake.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn handshake(
        &self,
        stream: TcpStream,
    ) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Plain TCP.
#[derive(Clone, Copy, Debug)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;
    async fn handshake(&self, stream: TcpStream) -> std::io::Result<TcpStream> {
        Ok(stream)
    }
}

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// The port's name in metrics and logs (`proxy`, `grpc`).
    pub port: &'static str,
    /// Open connections at most; 0: derived from the open-file limit.
    pub max_connections: usize,
    /// Open connections per client address at most; 0: no such cap.
    pub max_connections_per_client: usize,
    /// Time to send a request's headers (HTTP/1.1), and to finish a TLS handshake.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub h2_max_pending_accept_reset_streams: usize,
}

impl ListenerOptions {
    /// Defaults for the port named `port`.
    pub fn new(port: &'static str) -> ListenerOptions {
        ListenerOptions {
            port,
            max_connections: 0,
            max_connections_per_client: 0,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            h2_max_concurrent_streams: 256,
            h2_max_header_list_size: 64 * 1024,
            h2_max_pending_accept_reset_streams: 50,
        }
    }
}

/// The connection cap when none is configured: `share` of what the open-file limit leaves
/// after a reserve for upstream connections, files and the other listener, at most `most`.
pub fn default_connection_cap(share: f64, most: usize) -> usize {
    let soft = open_file_limit().unwrap_or(1024);
    let usable = soft.saturating_sub(256) as f64 * share;
    (usable as usize).clamp(16, most)
}

/// The soft open-file limit of this process (Linux: `/proc/self/limits`).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A response future served without the router.
pub type DirectFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Requests served without the router's lookup (its path match, URL parameters and boxed
/// service): given a request, its response future, or the request back for the router.
pub type Direct =
    Arc<dyn Fn(Request<Body>) -> Result<DirectFuture, Request<Body>> + Send + Sync + 'static>;

/// What a listener serves: a router, and the [`Direct`] routes tried before it, if any.
#[derive(Clone)]
pub struct Routes {
    pub router: Router,
    pub direct: Option<Direct>,
}

impl From<Router> for Routes {
    fn from(router: Router) -> Routes {
        Routes {
            router,
            direct: None,
        }
    }
}

/// One open connection, as the registry sees it.
struct Conn {
    id: u64,
    client: IpAddr,
    in_flight: AtomicU32,
    /// Milliseconds since the listener started.
    last_active_ms: AtomicU64,
    closing: AtomicBool,
    /// The connection's task, woken when it is to close or the listener stops.
    waker: AtomicWaker,
}

#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Arc<Conn>>,
    per_client: HashMap<IpAddr, usize>,
    next_id: u64,
}

struct Shared {
    registry: Mutex<Registry>,
    /// Set once the listener stops: connections finish what they are doing and close.
    stopping: AtomicBool,
    started: Instant,
    options: ListenerOptions,
    max_connections: usize,
    open: Gauge,
    shed: Family<ShedLabels, Counter>,
    logged: Mutex<HashMap<&'static str, Instant>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        match self.registry.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Count a shed connection or request, and say so (at most once per 5 s per reason).
    fn shed(&self, reason: &'static str, message: impl FnOnce() -> String) {
        self.shed
            .get_or_create(&ShedLabels {
                port: self.options.port,
                reason,
            })
            .inc();
        let mut logged = match self.logged.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let due = logged
            .get(reason)
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        if due {
            logged.insert(reason, Instant::now());
            tracing::warn!(port = self.options.port, reason, "{}", message());
        }
    }

    /// The idle connection (of `client`, if given) that has been idle longest.
    fn oldest_idle(registry: &Registry, client: Option<IpAddr>) -> Option<Arc<Conn>> {
        registry
            .conns
            .values()
            .filter(|conn| client.is_none_or(|client| conn.client == client))
            .filter(|conn| {
                conn.in_flight.load(Ordering::Relaxed) == 0 && !conn.closing.load(Ordering::Relaxed)
            })
            .min_by_key(|conn| conn.last_active_ms.load(Ordering::Relaxed))
            .cloned()
    }

    fn close(conn: &Conn) {
        conn.closing.store(true, Ordering::SeqCst);
        conn.waker.wake();
    }

    /// Tell every open connection that the listener stops. A connection admitted after the
    /// registry was read sees `stopping` on its first poll.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for conn in self.registry().conns.values() {
            conn.waker.wake();
        }
    }

    /// Why `conn` must stop serving, if it must; otherwise its task is woken when it must.
    /// Polled beside the connection on every wake-up, so it costs two loads and the waker
    /// check, no lock (where a `Notify` and a `watch` took a mutex each, every poll).
    fn poll_interrupted(&self, conn: &Conn, context: &mut Context<'_>) -> Poll<Interruption> {
        let check = || {
            if conn.closing.load(Ordering::SeqCst) {
                Some(Interruption::Closed)
            } else if self.stopping.load(Ordering::SeqCst) {
                Some(Interruption::Stopping)
            } else {
                None
            }
        };
        if let Some(why) = check() {
            return Poll::Ready(why);
        }
        conn.waker.register(context.waker());
        // A flag set between the check and the registration found no waker to wake.
        match check() {
            Some(why) => Poll::Ready(why),
            None => Poll::Pending,
        }
    }

    /// Register a new connection from `client`, making room at a cap by closing the longest
    /// idle one; `None` when there is no room.
    fn admit(&self, client: IpAddr) -> Option<Arc<Conn>> {
        let mut registry = self.registry();
        let per_client = self.options.max_connections_per_client;
        if per_client > 0 && registry.per_client.get(&client).copied().unwrap_or(0) >= per_client {
            match Shared::oldest_idle(&registry, Some(client)) {
                Some(victim) => {
                    Shared::close(&victim);
                    self.shed("evicted_idle_client", || {
                        format!(
                            "client {client} is at its cap of {per_client} connections: closed its longest idle one"
                        )
                    });
                }
                None => {
                    self.shed("client_cap", || {
                        format!(
                            "refused a connection: client {client} has {per_client} connections open, all busy"
                        )
                    });
                    return None;
                }
            }
        }
        if registry.conns.len() >= self.max_connections {
            match Shared::oldest_idle(&registry, None) {
                Some(victim) => {
                    Shared::close(&victim);
                    self.shed("evicted_idle", || {
                        format!(
                            "at the cap of {} open connections: closed the longest idle one",
                            self.max_connections
                        )
                    });
                }
                None => {
                    self.shed("cap", || {
                        format!(
                            "refused a connection: {} connections open, all busy",
                            self.max_connections
                        )
                    });
                    return None;
                }
            }
        }
        registry.next_id += 1;
        let conn = Arc::new(Conn {
            id: registry.next_id,
            client,
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(self.now_ms()),
            closing: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        registry.conns.insert(conn.id, conn.clone());
        *registry.per_client.entry(client).or_default() += 1;
        self.open.inc();
        Some(conn)
    }

    fn forget(&self, conn: &Conn) {
        let mut registry = self.registry();
        if registry.conns.remove(&conn.id).is_some() {
            self.open.dec();
            if let Some(count) = registry.per_client.get_mut(&conn.client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    registry.per_client.remove(&conn.client);
                }
            }
        }
    }

    /// Close connections idle for longer than the idle timeout.
    fn sweep(&self) {
        let now = self.now_ms();
        let limit = u64::try_from(self.options.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let registry = self.registry();
        let mut closed = 0usize;
        for conn in registry.conns.values() {
            if conn.in_flight.load(Ordering::Relaxed) == 0
                && !conn.closing.load(Ordering::Relaxed)
                && now.saturating_sub(conn.last_active_ms.load(Ordering::Relaxed)) >= limit
            {
                Shared::close(conn);
                closed += 1;
            }
        }
        drop(registry);
        for _ in 0..closed {
            self.shed("idle_timeout", || {
                format!(
                    "closed a connection idle for {} s",
                    self.options.idle_timeout.as_secs()
                )
            });
        }
    }
}

/// Serve `router` on `listener` until `shutdown` turns true, then let open connections finish
/// what they are doing.
pub async fn serve<H: Handshake>(
    listener: TcpListener,
    routes: impl Into<Routes>,
    handshake: H,
    options: ListenerOptions,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let routes = routes.into();
    let max_connections = if options.max_connections == 0 {
        default_connection_cap(0.75, 10_000)
    } else {
        options.max_connections
    };
    let shared = Arc::new(Shared {
        registry: Mutex::new(Registry::default()),
        stopping: AtomicBool::new(false),
        started: Instant::now(),
        max_connections,
        open: metrics
            .connections_open
            .get_or_create(&PortLabels { port: options.port })
            .clone(),
        shed: metrics.connections_shed.clone(),
        logged: Mutex::new(HashMap::new()),
        options,
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.options.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(shared.options.h2_max_concurrent_streams)
        .max_header_list_size(shared.options.h2_max_header_list_size)
        .max_pending_accept_reset_streams(shared.options.h2_max_pending_accept_reset_streams);
    let builder = Arc::new(builder);
    let sweeper = tokio::spawn({
        let shared = shared.clone();
        async move {
            let period = (shared.options.idle_timeout / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(1));
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                shared.sweep();
            }
        }
    });
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors (or another accept failure): make room, and do
                    // not spin.
                    let victim = Shared::oldest_idle(&shared.registry(), None);
                    if let Some(victim) = victim {
                        Shared::close(&victim);
                    }
                    shared.shed("accept_error", || format!("accepting a connection failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let Some(conn) = shared.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        tasks.spawn(serve_connection(
            shared.clone(),
            builder.clone(),
            handshake.clone(),
            routes.clone(),
            stream,
            conn,
        ));
    }
    shared.stop();
    sweeper.abort();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Why a connection stops serving before its client is done with it.
enum Interruption {
    /// Closed by the listener: idle too long, or to make room.
    Closed,
    /// The listener stops.
    Stopping,
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Unregisters a connection when its task ends, however it ends.
struct Registered {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.forget(&self.conn);
    }
}

async fn serve_connection<H: Handshake>(
    shared: Arc<Shared>,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    handshake: H,
    routes: Routes,
    stream: TcpStream,
    conn: Arc<Conn>,
) {
    let registered = Registered {
        shared: shared.clone(),
        conn: conn.clone(),
    };
    let handshaking = tokio::time::timeout(
        shared.options.header_read_timeout,
        handshake.handshake(stream),
    );
    tokio::pin!(handshaking);
    // Closed or stopping before the handshake is done: there is no request to finish.
    let handshaken = std::future::poll_fn(|context| {
        if shared.poll_interrupted(&conn, context).is_ready() {
            return Poll::Ready(None);
        }
        handshaking.as_mut().poll(context).map(Some)
    })
    .await;
    let io = match handshaken {
        None => return,
        Some(Ok(Ok(io))) => io,
        Some(Ok(Err(error))) => {
            tracing::debug!(%error, "handshake failed");
            return;
        }
        Some(Err(_)) => {
            shared.shed("handshake_timeout", || {
                "closed a connection that did not finish its TLS handshake in time".to_owned()
            });
            return;
        }
    };
    let service = Tracked {
        routes,
        conn: conn.clone(),
        shared: shared.clone(),
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let served = std::future::poll_fn(|context| {
        if let Poll::Ready(why) = shared.poll_interrupted(&conn, context) {
            return Poll::Ready(Err(why));
        }
        connection.as_mut().poll(context).map(Ok)
    })
    .await;
    let result = match served {
        Ok(result) => result,
        // Closed to make room, or idle too long: nothing is in flight, so drop it.
        Err(Interruption::Closed) => return,
        Err(Interruption::Stopping) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        let timed_out = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            shared.shed("header_timeout", || {
                format!(
                    "closed a connection that did not send its request headers within {} s",
                    shared.options.header_read_timeout.as_secs()
                )
            });
        } else {
            tracing::debug!(%error, "connection ended with an error");
        }
    }
    drop(registered);
}

/// The routes, counting the requests in flight on their connection.
#[derive(Clone)]
struct Tracked {
    routes: Routes,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

/// A request in flight on a connection; it ends when its response body does.
struct Active {
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

impl Active {
    /// No clock read: a connection with a request in flight is not idle, and the time it
    /// became idle is written when the request ends.
    fn begin(conn: &Arc<Conn>, shared: &Arc<Shared>) -> Active {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Active {
            conn: conn.clone(),
            shared: shared.clone(),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.conn
            .last_active_ms
            .store(self.shared.now_ms(), Ordering::Relaxed);
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, request: Request<Incoming>) -> TrackedFuture {
        let active = Active::begin(&self.conn, &self.shared);
        let request = request.map(Body::new);
        let request = match &self.routes.direct {
            Some(direct) => match direct(request) {
                Ok(future) => {
                    return TrackedFuture {
                        inner: Inner::Direct { future },
                        active: Some(active),
                    };
                }
                Err(request) => request,
            },
            None => request,
        };
        let mut router = self.routes.router.clone();
        TrackedFuture {
            inner: Inner::Router {
                future: tower_service::Service::call(&mut router, request),
            },
            active: Some(active),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProjection]
    enum Inner {
        Router {
            #[pin]
            future: axum::routing::future::RouteFuture<Infallible>,
        },
        Direct {
            future: DirectFuture,
        },
    }
}

pin_project_lite::pin_project! {
    /// The request's future; its response body carries the request's [`Active`].
    pub struct TrackedFuture {
        #[pin]
        inner: Inner,
        active: Option<Active>,
    }
}

impl Future for TrackedFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.inner.project() {
            InnerProjection::Router { future } => match future.poll(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
            },
            InnerProjection::Direct { future } => match future.as_mut().poll(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(response) => response,
            },
        };
        let active = this.active.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, active })))
    }
}

/// A response body that ends its request when it ends (or is dropped).
pub struct TrackedBody {
    inner: Body,
    active: Option<Active>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        if let Poll::Ready(None) = polled {
            self.active = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_stays_below_the_open_file_limit() {
        let cap = default_connection_cap(0.75, 10_000);
        let soft = open_file_limit().expect("a Linux open-file limit");
        assert!((16..=10_000).contains(&cap), "{cap}");
        assert!(cap < soft, "cap {cap} below the limit {soft}");
    }
}
