//! Upstream connections: HTTP/1.1 keep-alive connections kept per scheme and host.
//!
//! A request takes the most recently returned idle connection of its host, or opens one (plain
//! TCP or TLS through rustls with the platform's verifier). The connection comes back to the
//! pool when the response body has been read to its end; a body dropped before its end closes
//! the connection instead, since HTTP/1.1 cannot abandon one response and carry on.
//!
//! What it keeps from a general-purpose client, because an upstream will do each of these:
//! - A request that a reused connection never sent (the upstream closed it while it sat idle)
//!   goes out again on another connection. A request that was sent is never sent twice here:
//!   retrying it is the attempt loop's decision.
//! - At most `max_idle_per_host` idle connections per host, so a burst's connections are not
//!   all kept, and none idle longer than the idle timeout.
//!
//! It does less per request than hyper-util's pooled client: no connect raced against the
//! checkout, no task spawned per response to wait for the connection to become idle, and the
//! `Host` header of each host built once.
//!
//! No connection has a task of its own either. The request that holds a connection drives it,
//! in its own task: the request is written in the same poll that hands it over, and the
//! response's bytes wake the request's task directly, with no second task scheduled in
//! between on either pass. An idle connection is driven by nobody; it is looked at (polled
//! once, without a waker) when it is taken, returned or swept, which is when a connection the
//! upstream closed is noticed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service;

type Sender = http1::SendRequest<Full<Bytes>>;
type Connection = http1::Connection<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>, Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector: TCP with the configured connect timeout, then TLS for `https`.
pub type Connector = HttpsConnector<HttpConnector>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The URL has no scheme or host, or a host that is not a valid `Host` header.
    #[error("the upstream URL {0} has no usable scheme and host")]
    InvalidUri(String),
    /// No connection could be opened (DNS, TCP, TLS or the HTTP/1.1 handshake).
    #[error("could not connect to the upstream: {0}")]
    Connect(BoxError),
    /// The connection broke while the request was sent or the response head awaited.
    #[error("the upstream connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The connection ended without answering, and without saying why.
    #[error("the upstream connection closed before answering")]
    Closed,
}

impl SendError {
    /// Whether no connection could be made at all (the upstream may be down).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HostKey {
    scheme: Scheme,
    authority: Authority,
}

/// Hashed as `Authority`'s equality reads it (ASCII case ignored), but eight bytes at a time:
/// `Authority`'s own `Hash` feeds the hasher one byte per call, which cost about 4% of a proxied
/// request's instructions in the pool's two lookups.
impl std::hash::Hash for HostKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scheme.hash(state);
        let bytes = self.authority.as_str().as_bytes();
        state.write_usize(bytes.len());
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            for (slot, byte) in word.iter_mut().zip(chunk) {
                *slot = byte.to_ascii_lowercase();
            }
            state.write_u64(u64::from_le_bytes(word));
        }
    }
}

struct Host {
    /// The `Host` header of every request to this host.
    host_header: HeaderValue,
    /// Oldest first; taken from the back.
    idle: Vec<Idle>,
}

struct Idle {
    upstream: Box<Upstream>,
    since: Instant,
}

/// One HTTP/1.1 connection: the half that sends requests, and the half that does the I/O,
/// which only makes progress while someone polls it.
struct Upstream {
    sender: Sender,
    /// `None` once the connection has ended.
    connection: Option<Connection>,
}

/// How one exchange on a connection went, short of a response.
enum Exchange {
    /// The connection never sent the request (it had closed while idle): it can go out on
    /// another.
    Unsent(Box<Request<Full<Bytes>>>),
    Failed(SendError),
}

impl Upstream {
    /// Let the connection do what it can (write the request, read the response, hand over
    /// the body), with `context` woken when it can do more. Says whether it is still open.
    fn drive(&mut self, context: &mut Context<'_>) -> bool {
        let Some(connection) = self.connection.as_mut() else {
            return false;
        };
        match Pin::new(connection).poll(context) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upstream connection closed with an error");
                }
                // Dropping it resolves whatever still waits on it: the response future and
                // the body end, with an error if they had not ended.
                self.connection = None;
                false
            }
        }
    }

    /// Whether the connection can take a request now: driven once, without a waker, it is
    /// still open and waiting for one. (An upstream that closed it while it sat idle is
    /// noticed here.)
    fn ready_for_next(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Send the request and drive the connection until the response head arrives.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Exchange> {
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        let result = std::future::poll_fn(|context| {
            let open = self.drive(context);
            // Only the connection completes the response, and it ran just now: the response
            // is polled without a waker, so that handing it over does not wake this task.
            let mut quiet = Context::from_waker(Waker::noop());
            match response.as_mut().poll(&mut quiet) {
                Poll::Ready(result) => Poll::Ready(Some(result)),
                Poll::Pending if open => Poll::Pending,
                // Ended and dropped, the connection has resolved the response; if not,
                // nothing will.
                Poll::Pending => Poll::Ready(None),
            }
        })
        .await;
        match result {
            Some(Ok(response)) => Ok(response),
            Some(Err(mut error)) => match error.take_message() {
                Some(unsent) => Err(Exchange::Unsent(Box::new(unsent))),
                None => Err(Exchange::Failed(SendError::Http(error.into_error()))),
            },
            None => Err(Exchange::Failed(SendError::Closed)),
        }
    }
}

/// Upstream connections, shared by every request of the node.
pub struct UpstreamPool {
    connector: Connector,
    hosts: Mutex<HashMap<HostKey, Host, foldhash::fast::RandomState>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    sweeper_started: AtomicBool,
}

impl UpstreamPool {
    pub fn new(connector: Connector, max_idle_per_host: usize, idle_timeout: Duration) -> Self {
        UpstreamPool {
            connector,
            hosts: Mutex::new(HashMap::default()),
            max_idle_per_host,
            idle_timeout,
            sweeper_started: AtomicBool::new(false),
        }
    }

    /// Send a request whose URI is absolute (`scheme://host/path`). The request goes out in
    /// origin form with a `Host` header.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, SendError> {
        let uri = request.uri();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(SendError::InvalidUri(uri.to_string()));
        };
        let key = HostKey {
            scheme: scheme.clone(),
            authority: authority.clone(),
        };
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        let (mut reused, host_header) = self.checkout(&key)?;
        request
            .headers_mut()
            .entry(header::HOST)
            .or_insert(host_header);
        // Reused connections first. One that turns out closed before it sent the request
        // hands the request back, and the next one (or a new one) takes it.
        while let Some(mut upstream) = reused {
            if upstream.ready_for_next() {
                match upstream.exchange(request).await {
                    Ok(response) => return Ok(self.pooled(response, key, upstream)),
                    Err(Exchange::Unsent(unsent)) => request = *unsent,
                    Err(Exchange::Failed(error)) => return Err(error),
                }
            }
            reused = self.checkout(&key)?.0;
        }
        // Boxed: opening a connection is the rare path, and its future (TCP, TLS and the
        // handshake, over 2 KiB) would otherwise be part of every request's future.
        let mut upstream = Box::pin(self.connect(&key)).await?;
        match upstream.exchange(request).await {
            Ok(response) => Ok(self.pooled(response, key, upstream)),
            Err(Exchange::Unsent(_)) => Err(SendError::Closed),
            Err(Exchange::Failed(error)) => Err(error),
        }
    }

    /// Idle connections kept, over all hosts.
    pub fn idle_connections(&self) -> usize {
        self.lock().values().map(|host| host.idle.len()).sum()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<HostKey, Host, foldhash::fast::RandomState>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently returned connection of the host, if any, and its `Host` header. The
    /// caller checks that it is still open, outside the lock.
    fn checkout(&self, key: &HostKey) -> Result<(Option<Box<Upstream>>, HeaderValue), SendError> {
        let mut hosts = self.lock();
        let host = match hosts.get_mut(key) {
            Some(host) => host,
            None => hosts.entry(key.clone()).or_insert(Host {
                host_header: host_header(&key.authority)?,
                idle: Vec::new(),
            }),
        };
        let host_header = host.host_header.clone();
        // Connections past the idle timeout are closed by `put_back` and the sweeper; one
        // that outlived it by less than a sweep is still fine to use.
        Ok((host.idle.pop().map(|idle| idle.upstream), host_header))
    }

    async fn connect(&self, key: &HostKey) -> Result<Box<Upstream>, SendError> {
        let uri = Uri::builder()
            .scheme(key.scheme.clone())
            .authority(key.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| SendError::InvalidUri(error.to_string()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|context| connector.poll_ready(context))
            .await
            .map_err(SendError::Connect)?;
        let io = connector.call(uri).await.map_err(SendError::Connect)?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(|error| SendError::Connect(error.into()))?;
        Ok(Box::new(Upstream {
            sender,
            connection: Some(connection),
        }))
    }

    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        key: HostKey,
        upstream: Box<Upstream>,
    ) -> Response<PooledBody> {
        let pool = Arc::clone(self);
        response.map(|body| PooledBody {
            body,
            connection: Some(Checkout {
                pool,
                key,
                upstream,
            }),
        })
    }

    /// Take back a connection whose response was read to its end.
    fn put_back(self: &Arc<Self>, key: HostKey, mut upstream: Box<Upstream>) {
        // Driven once more, it finishes the exchange and waits for the next request.
        if !upstream.ready_for_next() {
            return;
        }
        let now = Instant::now();
        {
            let mut hosts = self.lock();
            let Some(host) = hosts.get_mut(&key) else {
                return;
            };
            // The oldest are at the front: only the expired ones are looked at.
            let expired = host
                .idle
                .iter()
                .take_while(|idle| self.expired(idle, now))
                .count();
            host.idle.drain(..expired);
            if host.idle.len() < self.max_idle_per_host {
                host.idle.push(Idle {
                    upstream,
                    since: now,
                });
            }
        }
        self.start_sweeper();
    }

    fn expired(&self, idle: &Idle, now: Instant) -> bool {
        now.saturating_duration_since(idle.since) >= self.idle_timeout
    }

    /// Close the connections idle for longer than the timeout, and the ones the upstream
    /// closed.
    fn evict_expired(&self, idle: &mut Vec<Idle>, now: Instant) {
        idle.retain_mut(|idle| !self.expired(idle, now) && idle.upstream.ready_for_next());
    }

    /// Close connections idle for longer than the timeout, also when no request comes to
    /// return one: every half timeout, for as long as the pool exists.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.load(Ordering::Relaxed)
            || self.sweeper_started.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeper_started.store(false, Ordering::Relaxed);
            return;
        };
        let pool = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_millis(100));
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let now = Instant::now();
                let mut hosts = pool.lock();
                for host in hosts.values_mut() {
                    pool.evict_expired(&mut host.idle, now);
                }
            }
        });
    }
}

/// `host[:port]` of an authority, without any user information.
fn host_header(authority: &Authority) -> Result<HeaderValue, SendError> {
    let text = authority.as_str();
    let host = text.rsplit_once('@').map_or(text, |(_, host)| host);
    HeaderValue::from_str(host).map_err(|_| SendError::InvalidUri(text.to_owned()))
}

struct Checkout {
    pool: Arc<UpstreamPool>,
    key: HostKey,
    upstream: Box<Upstream>,
}

/// A response body that drives its connection while it is read, and returns the connection to
/// the pool once read to its end.
pub struct PooledBody {
    body: Incoming,
    connection: Option<Checkout>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PooledBody")
            .field("pooled", &self.connection.is_some())
            .finish()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(Checkout {
            pool,
            key,
            upstream,
        }) = self.connection.take()
        {
            pool.put_back(key, upstream);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // The connection fills the body: drive it first. It is what wakes this task, so the
        // body itself is polled without a waker. Once the connection has ended (and been
        // dropped), the body ends too, so the poll below cannot wait for nothing.
        if let Some(checkout) = this.connection.as_mut() {
            checkout.upstream.drive(context);
        }
        let mut quiet = Context::from_waker(Waker::noop());
        let frame = ready!(Pin::new(&mut this.body).poll_frame(&mut quiet));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.body.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // A broken body leaves the connection in no state to reuse.
            Some(Err(_)) => this.connection = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn host_keys_equal_ignoring_case_hash_alike() {
        use std::hash::BuildHasher;
        let key = |authority: &str| HostKey {
            scheme: Scheme::HTTP,
            authority: authority.parse().expect("authority"),
        };
        let hasher = std::collections::hash_map::RandomState::new();
        let lower = key("api.example-provider.test:8443");
        let mixed = key("API.Example-Provider.test:8443");
        assert_eq!(lower, mixed);
        assert_eq!(hasher.hash_one(&lower), hasher.hash_one(&mixed));
        assert_ne!(
            hasher.hash_one(&lower),
            hasher.hash_one(key("api.example-provider.test:8444"))
        );
    }

    /// How the test server ends each connection's exchanges.
    #[derive(Clone, Copy, PartialEq)]
    enum After {
        /// Keep the connection open for the next request.
        KeepAlive,
        /// Close it right after the response, though the response says keep-alive (as an
        /// upstream does when its own idle timeout fires).
        Close,
        /// Close it when it has been idle this long.
        IdleThenClose(Duration),
    }

    struct Server {
        url: String,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    /// A real HTTP/1.1 server on 127.0.0.1:0 that answers each request with a 1000-byte body
    /// sent in two writes, counts the connections it accepts and records request heads.
    async fn server(after: After) -> Server {
        server_pausing(after, Duration::ZERO).await
    }

    /// The same server, pausing between the two writes of each body.
    async fn server_pausing(after: After, pause: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (accepted_in, heads_in) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.expect("accept");
                socket.set_nodelay(true).expect("nodelay");
                accepted_in.fetch_add(1, Ordering::SeqCst);
                let heads = heads_in.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(read) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..read]);
                        let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n")
                        else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                        let length: usize = head
                            .lines()
                            .find_map(|line| {
                                line.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|value| value.trim().parse().expect("content-length"))
                            })
                            .unwrap_or(0);
                        while buffer.len() < end + 4 + length {
                            let read = socket.read(&mut chunk).await.expect("read");
                            assert!(read > 0, "the client closed mid-request");
                            buffer.extend_from_slice(&chunk[..read]);
                        }
                        buffer.drain(..end + 4 + length);
                        heads.lock().expect("heads").push(head);
                        let body = vec![b'x'; 1000];
                        let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n";
                        socket.write_all(head.as_bytes()).await.expect("write");
                        socket.write_all(&body[..500]).await.expect("write");
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                        socket.write_all(&body[500..]).await.expect("write");
                        match after {
                            After::KeepAlive => {}
                            After::Close => return,
                            After::IdleThenClose(idle) => {
                                tokio::time::sleep(idle).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        Server {
            url,
            accepted,
            heads,
        }
    }

    fn pool(max_idle: usize, idle_timeout: Duration) -> Arc<UpstreamPool> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_platform_verifier()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Arc::new(UpstreamPool::new(connector, max_idle, idle_timeout))
    }

    fn post(url: &str) -> Request<Full<Bytes>> {
        Request::post(format!("{url}/v1/chat/completions?x=1"))
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .expect("request")
    }

    async fn call(pool: &Arc<UpstreamPool>, url: &str) -> usize {
        let response = pool.send(post(url)).await.expect("response");
        assert_eq!(response.status(), 200);
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len()
    }

    /// Poll until `check` holds, for up to 5 s.
    async fn eventually(mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn reuses_one_connection_and_sends_origin_form_with_host() {
        let server = server(After::KeepAlive).await;
        let pool = pool(8, Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(call(&pool, &server.url).await, 1000);
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_connections(), 1);
        let heads = server.heads.lock().expect("heads").clone();
        assert_eq!(heads.len(), 5);
        let host = server.url.trim_start_matches("http://");
        for head in heads {
            assert!(
                head.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(head.to_ascii_lowercase().contains(&format!("host: {host}")));
        }
    }

    #[tokio::test]
    async fn a_body_that_arrives_in_parts_wakes_its_reader() {
        // No task drives the connection but the reader's: the second half of each body, which
        // arrives after a pause, must wake the reader, and the connection must be reused.
        let server = server_pausing(After::KeepAlive, Duration::from_millis(30)).await;
        let pool = pool(8, Duration::from_secs(60));
        for _ in 0..3 {
            let length = tokio::time::timeout(Duration::from_secs(10), call(&pool, &server.url))
                .await
                .expect("the body's end never woke its reader");
            assert_eq!(length, 1000);
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_sweeper_forgets_connections_the_upstream_closed() {
        let server = server(After::IdleThenClose(Duration::from_millis(100))).await;
        // Sweeps every second; a connection would expire only after two.
        let idle_timeout = Duration::from_secs(2);
        let pool = pool(8, idle_timeout);
        let started = Instant::now();
        assert_eq!(call(&pool, &server.url).await, 1000);
        assert_eq!(pool.idle_connections(), 1);
        eventually(|| pool.idle_connections() == 0).await;
        assert!(
            started.elapsed() < idle_timeout,
            "the closed connection was only dropped when it expired"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_a_failure() {
        let server = server(After::Close).await;
        let pool = pool(8, Duration::from_secs(60));
        for round in 1..=4 {
            assert_eq!(call(&pool, &server.url).await, 1000);
            // Each request needed a connection of its own, and none failed.
            assert_eq!(server.accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let server = server(After::KeepAlive).await;
        let pool = pool(8, Duration::from_secs(60));
        let response = pool.send(post(&server.url)).await.expect("response");
        drop(response);
        assert_eq!(pool.idle_connections(), 0);
        assert_eq!(call(&pool, &server.url).await, 1000);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_connections(), 1);
    }

    #[tokio::test]
    async fn keeps_at_most_the_idle_cap_per_host() {
        let server = server(After::KeepAlive).await;
        let pool = pool(2, Duration::from_secs(60));
        // Four requests in flight at once need four connections.
        let responses =
            futures_util::future::join_all((0..4).map(|_| pool.send(post(&server.url))))
                .await
                .into_iter()
                .map(|response| response.expect("response"))
                .collect::<Vec<_>>();
        assert_eq!(server.accepted.load(Ordering::SeqCst), 4);
        for response in responses {
            response.into_body().collect().await.expect("body");
        }
        assert_eq!(pool.idle_connections(), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let server = server(After::KeepAlive).await;
        let pool = pool(8, Duration::from_millis(200));
        assert_eq!(call(&pool, &server.url).await, 1000);
        assert_eq!(pool.idle_connections(), 1);
        // The sweeper closes it without any further request.
        eventually(|| pool.idle_connections() == 0).await;
        assert_eq!(call(&pool, &server.url).await, 1000);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        drop(listener);
        let error = pool(8, Duration::from_secs(60))
            .send(post(&url))
            .await
            .expect_err("the request must fail");
        assert!(error.is_connect(), "{error}");
    }

    #[tokio::test]
    async fn a_uri_without_a_host_is_refused() {
        let request = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let error = pool(8, Duration::from_secs(60))
            .send(request)
            .await
            .expect_err("the request must fail");
        assert!(matches!(error, SendError::InvalidUri(_)), "{error}");
    }
}
