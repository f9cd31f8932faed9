//! The floor of Skein's HTTP stack: a proxy with nothing but hyper and tokio in it, to tell
//! how much of a request's cost is the stack Skein is built on and how much is Skein's own.
//!
//! It does the least a gateway that reads its traffic must do: it reads the whole request
//! body, sends it to the one upstream over a pooled keep-alive connection (hyper-util's
//! client), reads the whole answer and returns it with the upstream's status and content type.
//! No auth, routing, limits, accounting, metrics or logging. One current-thread runtime, as
//! `skein serve --worker-threads 1` runs; `benches/independent.sh` measures it beside nginx
//! and Skein.
//!
//! Usage: skein-floor --listen 127.0.0.1:0 --upstream http://127.0.0.1:PORT
//! (prints `listening on http://ADDR` once it accepts).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The upstream's base URL (`http://host:port`); the request's path is appended.
    #[arg(long)]
    upstream: String,
}

struct Floor {
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await.context("binding")?;
    println!("listening on http://{}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let floor = Arc::new(Floor {
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector),
        upstream: args.upstream.trim_end_matches('/').to_owned(),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("accept: {error}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let floor = floor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let floor = floor.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(&floor, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(floor: &Floor, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match try_forward(floor, request).await {
        Ok(response) => response,
        Err(error) => {
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "{{\"error\":{{\"message\":\"{error}\",\"type\":\"upstream_error\"}}}}"
            ))));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}

async fn try_forward(
    floor: &Floor,
    request: Request<Incoming>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let uri: Uri = format!("{}{path}", floor.upstream).parse()?;
    let mut upstream = Request::post(uri).body(Full::new(body))?;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        upstream
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
    }
    let answer = floor.client.request(upstream).await?;
    let (parts, body) = answer.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = parts.status;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
    }
    Ok(response)
}
