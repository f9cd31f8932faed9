//! `skein-mock`: run the mock provider as its own process (for SDK tests and benchmarks).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use skein_mock::{MockOptions, MockServer};

/// A mock OpenAI/Anthropic provider with latency and fault injection.
#[derive(Debug, Parser)]
#[command(name = "skein-mock", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0", env = "SKEIN_MOCK_ADDR")]
    addr: String,
    /// Latency before the first byte, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Latency between stream events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_latency_ms: u64,
    /// Do not keep a record of requests (for long benchmark runs).
    #[arg(long)]
    no_record: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let address: std::net::SocketAddr = args
        .addr
        .parse()
        .with_context(|| format!("parsing {}", args.addr))?;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(address)
        .with_context(|| format!("binding {address}"))?;
    // A deep accept queue, so connection bursts in benchmarks do not overflow it.
    let listener = socket.listen(4096)?;
    let options = MockOptions {
        latency: Duration::from_millis(args.latency_ms),
        token_latency: Duration::from_millis(args.token_latency_ms),
        record: !args.no_record,
    };
    let server = MockServer::start_on(listener, options)?;
    // The first line on stdout is the address, for scripts and tests to read.
    println!("skein-mock listening on {}", server.url());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    drop(server);
    Ok(())
}
