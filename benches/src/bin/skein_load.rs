//! `skein-load`: an HTTP load generator for LLM-gateway benchmarks.
//!
//! - `--rate R` (open loop): request *i* is due at `start + i/R` whatever happened to earlier
//!   requests, and its latency is measured from that due time, so a slow server cannot hide
//!   its queueing (no coordinated omission).
//! - `--rate 0` (closed loop): `--connections` workers send back to back; reports the maximum
//!   throughput.
//!
//! Prints one JSON object: achieved rate, errors, and latency and time-to-first-byte
//! percentiles in microseconds. Every run is bounded by `--duration-secs` and by a cap on
//! requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use skein_benches::stats::Percentiles;
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(name = "skein-load")]
struct Args {
    /// Full URL to POST to.
    #[arg(long)]
    url: String,
    /// The JSON body of every request.
    #[arg(long)]
    body: String,
    /// Requests per second (open loop); 0 runs closed loop at maximum speed.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Measured duration.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Warm-up before measuring (same load, results discarded).
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Connections (closed-loop workers, or the open-loop pool size).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests allowed in flight before new ones count as dropped (open loop).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// A bearer token to send (a Skein virtual key).
    #[arg(long)]
    bearer: Option<String>,
    /// A name for this run in the output.
    #[arg(long, default_value = "run")]
    label: String,
    /// Also write every measured request to this file, one line each: due time (µs after the
    /// measurement began), service time (µs) and whether it succeeded, for finding when the slow
    /// ones happened.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
}

/// One finished request.
struct Sample {
    measured: bool,
    /// The scheduled send time, µs after the measurement began (0 for warm-up requests).
    due_us: u64,
    ok: bool,
    /// From the scheduled send time (includes any delay in sending: no coordinated omission).
    latency_us: u64,
    ttfb_us: u64,
    /// From the moment the request was actually handed to the connection.
    service_us: u64,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let report = runtime.block_on(run(args))?;
    println!("{report}");
    Ok(())
}

/// The `authorization` header every request carries, if any.
static AUTHORIZATION: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections.max(1))
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let uri: hyper::Uri = args.url.parse().context("parsing --url")?;
    let body = Bytes::from(args.body.clone());
    let _ = AUTHORIZATION.set(args.bearer.as_ref().map(|token| format!("Bearer {token}")));
    let (sender, mut receiver) = mpsc::unbounded_channel::<Sample>();
    let in_flight = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.duration_secs);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measured;

    if args.rate == 0 {
        let mut workers = Vec::new();
        for _ in 0..args.connections.max(1) {
            let (client, uri, body, sender) =
                (client.clone(), uri.clone(), body.clone(), sender.clone());
            workers.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let due = Instant::now();
                    let sample = send(&client, &uri, &body, due, measure_from).await;
                    if sender.send(sample).is_err() {
                        break;
                    }
                }
            }));
        }
        for worker in workers {
            let _ = worker.await;
        }
    } else {
        // A dedicated thread paces the sends with the OS's high-resolution sleep: the runtime's
        // timer has a granularity of about a millisecond, which would turn a steady 5000 req/s
        // into bursts of five every millisecond and measure burst handling instead.
        let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
        let total = ((warmup + measured).as_secs_f64() * args.rate as f64) as u64;
        let (due_sender, mut due_receiver) = mpsc::unbounded_channel::<Instant>();
        let pacer = std::thread::spawn(move || {
            for sent in 0..total {
                let due = start + interval.mul_f64(sent as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if due_sender.send(due).is_err() {
                    break;
                }
            }
        });
        while let Some(due) = due_receiver.recv().await {
            if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (client, uri, body, sender, in_flight) = (
                client.clone(),
                uri.clone(),
                body.clone(),
                sender.clone(),
                in_flight.clone(),
            );
            tokio::spawn(async move {
                let sample = send(&client, &uri, &body, due, measure_from).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = sender.send(sample);
            });
        }
        if pacer.join().is_err() {
            anyhow::bail!("the pacing thread panicked");
        }
        // Let the last requests finish, within a bound.
        let drain_deadline = Instant::now() + Duration::from_secs(10);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(sender);

    let mut latencies = Vec::new();
    let mut ttfbs = Vec::new();
    let mut services = Vec::new();
    let mut errors = 0u64;
    let mut lines = String::new();
    while let Some(sample) = receiver.recv().await {
        if !sample.measured {
            continue;
        }
        if args.samples.is_some() {
            use std::fmt::Write as _;
            let _ = writeln!(
                lines,
                "{} {} {}",
                sample.due_us,
                sample.service_us,
                u8::from(sample.ok)
            );
        }
        if sample.ok {
            latencies.push(sample.latency_us);
            ttfbs.push(sample.ttfb_us);
            services.push(sample.service_us);
        } else {
            errors += 1;
        }
    }
    if let Some(path) = &args.samples {
        std::fs::write(path, lines)
            .with_context(|| format!("writing the samples to {}", path.display()))?;
    }
    let ok = latencies.len() as u64;
    Ok(json!({
        "label": args.label,
        "mode": if args.rate == 0 { "closed" } else { "open" },
        "target_rps": args.rate,
        "achieved_rps": (ok as f64 / measured.as_secs_f64()).round(),
        "ok": ok,
        "errors": errors,
        "dropped": dropped.load(Ordering::Relaxed),
        "latency": Percentiles::of(&mut latencies).to_json(),
        "ttfb": Percentiles::of(&mut ttfbs).to_json(),
        "service": Percentiles::of(&mut services).to_json(),
    }))
}

/// Send one request and read the whole answer; times are measured from `due` and from the
/// actual send.
async fn send(
    client: &HttpClient,
    uri: &hyper::Uri,
    body: &Bytes,
    due: Instant,
    measure_from: Instant,
) -> Sample {
    let measured = due >= measure_from;
    let due_us = due
        .checked_duration_since(measure_from)
        .map_or(0, |offset| {
            u64::try_from(offset.as_micros()).unwrap_or(u64::MAX)
        });
    let failed = Sample {
        measured,
        due_us,
        ok: false,
        latency_us: 0,
        ttfb_us: 0,
        service_us: 0,
    };
    let mut builder = hyper::Request::post(uri.clone()).header("content-type", "application/json");
    if let Some(Some(authorization)) = AUTHORIZATION.get() {
        builder = builder.header("authorization", authorization.as_str());
    }
    let request = match builder.body(Full::new(body.clone())) {
        Ok(request) => request,
        Err(_) => return failed,
    };
    let sent_at = Instant::now();
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(_) => return failed,
    };
    let ok = response.status().is_success();
    let mut body = response.into_body();
    let mut ttfb = None;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if ttfb.is_none() && frame.data_ref().is_some_and(|data| !data.is_empty()) {
                    ttfb = Some(due.elapsed());
                }
            }
            Some(Err(_)) => return failed,
            None => break,
        }
    }
    let latency = due.elapsed();
    let micros = |duration: Duration| u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    Sample {
        measured,
        due_us,
        ok,
        latency_us: micros(latency),
        ttfb_us: micros(ttfb.unwrap_or(latency)),
        service_us: micros(sent_at.elapsed()),
    }
}
