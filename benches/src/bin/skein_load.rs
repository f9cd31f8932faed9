//! `skein-load`: an HTTP load generator for LLM-gateway benchmarks.
//!
//! - `--rate R` (open loop): request *i* is due at `start + i/R` whatever happened to earlier
//!   requests, and its latency is measured from that due time, so a slow server cannot hide
//!   its queueing (no coordinated omission). One target runs one unbroken schedule: the
//!   warm-up, then the measured time.
//! - `--rate 0` (closed loop): `--connections` workers send back to back; reports the maximum
//!   throughput.
//! - Several `--url`s (open loop) with `--slice-secs` interleave targets. After a warm-up of
//!   each, they take turns on a fixed grid (direct first, the others alternating order from
//!   cycle to cycle), each turn with its own schedule that starts with nothing in flight, until
//!   every target has had at least `--duration-secs` measured. Slow changes of the machine (a
//!   busy host) then fall on every target alike, and so does a disturbance that repeats every
//!   few seconds (a kernel thread's periodic work), instead of landing on whichever target
//!   happened to run at the time. The edges of each turn are not measured.
//!
//! Prints one JSON object per target: achieved rate, errors, and latency and time-to-first-byte
//! percentiles in microseconds, and optionally the CPU time per request of the process serving
//! it and the halts per request of every core. Every run is bounded in time (the warm-up and
//! measured time of each target, and a cap on turns) and by a cap on requests in flight.

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
    /// Full URL to POST to. Repeat it (open loop only) to interleave several targets: they
    /// take turns in slices of `--slice-secs`, so that whatever the machine does over time
    /// falls on each of them alike.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// The JSON body of every request; repeated, one per `--url` in order (the first is used
    /// for any URL without one), to compare two APIs of one server.
    #[arg(long, required = true)]
    body: Vec<String>,
    /// Requests per second (open loop); 0 runs closed loop at maximum speed.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Measured duration (of each target).
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Warm-up before measuring (same load, results discarded; of each target).
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// With several targets, turns begin every this many seconds, one target after the other
    /// (direct first, the others alternating order from cycle to cycle), until each has had at
    /// least `--duration-secs` measured. In a turn the first 100 ms and the last 50 ms of
    /// sending are not measured, and the last 25 ms send nothing, so its requests finish before
    /// the next turn. 0: one target after the other, each warmed up, then measured.
    #[arg(long, default_value_t = 0.0)]
    slice_secs: f64,
    /// Connections (closed-loop workers, or the open-loop pool size of each target).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests allowed in flight before new ones count as dropped (open loop).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// A bearer token to send (a Skein virtual key).
    #[arg(long)]
    bearer: Option<String>,
    /// A name for each target in the output, in the order of the `--url`s.
    #[arg(long)]
    label: Vec<String>,
    /// The process serving each target (in the order of the `--url`s; 0 for none): its CPU time
    /// over the measured turns, divided by the requests sent in them, is reported as
    /// `proxy_cpu_us_per_request` (open loop).
    #[arg(long)]
    cpu_pid: Vec<u32>,
    /// Report each target's halts per request of every core over its measured turns (entries
    /// into the cpuidle states other than polling; a halted vCPU waits for the hypervisor).
    #[arg(long)]
    halts: bool,
    /// Also write every measured request to this file, one line each: due time (µs after the
    /// measurement began), service time (µs) and whether it succeeded, for finding when the slow
    /// ones happened; with several targets, a fourth field names the target.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
}

/// One finished request.
struct Sample {
    target: usize,
    measured: bool,
    /// The scheduled send time, µs after the measurement began (0 for requests due before it).
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
    let reports = runtime.block_on(run(args))?;
    for report in reports {
        println!("{report}");
    }
    Ok(())
}

/// The start of an interleaved turn, not measured: the first few requests after a target sat
/// idle for the others' turns find its core cold (on this VM, 300–800 µs for the first two or
/// three, through either proxy), which a sequential run's warm-up hides.
const TURN_SETTLE: Duration = Duration::from_millis(100);
/// The end of an interleaved turn's sending, not measured: requests still arrive behind the
/// measured ones, as they would in an unbroken run, so a backlog near the end of a turn does not
/// clear unusually fast.
const TURN_TAIL: Duration = Duration::from_millis(50);
/// After an interleaved turn's sending stops, until the next turn begins: its last requests
/// finish first.
const TURN_GAP: Duration = Duration::from_millis(25);

/// The `authorization` header every request carries, if any.
static AUTHORIZATION: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// One URL under load, with its own connections.
struct Target {
    label: String,
    /// The body of every request to this target.
    body: Bytes,
    uri: hyper::Uri,
    client: HttpClient,
    cpu_pid: Option<u32>,
    /// Over its measured turns: requests due, dropped, CPU ns of its process, halts per core.
    sent: u64,
    dropped: u64,
    measured: Duration,
    cpu_ns: u64,
    halts: Vec<u64>,
}

/// What every open-loop turn shares: the rate, and where samples go.
struct Run {
    rate: u64,
    max_in_flight: u64,
    samples: mpsc::UnboundedSender<Sample>,
    /// Count the halts of every core over measured turns.
    halts: bool,
}

/// One target's turn: requests are due every 1/rate from `begin` until `end`; those due within
/// `measure` count; `origin` is the time the samples' due times are given from.
struct Turn {
    begin: Instant,
    end: Instant,
    measure: Option<(Instant, Instant)>,
    origin: Instant,
}

async fn run(args: Args) -> anyhow::Result<Vec<serde_json::Value>> {
    if !args.label.is_empty() && args.label.len() != args.url.len() {
        anyhow::bail!("give one --label per --url, or none");
    }
    if !args.cpu_pid.is_empty() && args.cpu_pid.len() != args.url.len() {
        anyhow::bail!("give one --cpu-pid per --url (0 for none), or none");
    }
    if args.rate == 0 && args.url.len() > 1 {
        anyhow::bail!("several --url targets need an open-loop --rate");
    }
    let interleave = args.rate > 0 && args.slice_secs > 0.0 && args.url.len() > 1;
    let slice = Duration::from_secs_f64(args.slice_secs.max(0.0));
    if interleave && slice < TURN_SETTLE + TURN_TAIL + TURN_GAP + Duration::from_millis(100) {
        anyhow::bail!(
            "--slice-secs must leave at least 100 ms measured after the {:?} unmeasured in a turn",
            TURN_SETTLE + TURN_TAIL + TURN_GAP
        );
    }
    let _ = AUTHORIZATION.set(args.bearer.as_ref().map(|token| format!("Bearer {token}")));
    let mut targets = Vec::new();
    for (index, url) in args.url.iter().enumerate() {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(args.connections.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        targets.push(Target {
            body: Bytes::from(
                args.body
                    .get(index)
                    .or(args.body.first())
                    .cloned()
                    .unwrap_or_default(),
            ),
            label: match args.label.get(index) {
                Some(label) => label.clone(),
                None if args.url.len() == 1 => "run".to_owned(),
                None => format!("target{index}"),
            },
            uri: url
                .parse()
                .with_context(|| format!("parsing --url {url}"))?,
            client,
            cpu_pid: args.cpu_pid.get(index).copied().filter(|pid| *pid != 0),
            sent: 0,
            dropped: 0,
            measured: Duration::ZERO,
            cpu_ns: 0,
            halts: Vec::new(),
        });
    }
    let body = targets[0].body.clone();
    let (sender, mut receiver) = mpsc::unbounded_channel::<Sample>();
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.duration_secs);

    if args.rate == 0 {
        closed_loop(
            &targets[0],
            &body,
            warmup,
            measured,
            args.connections,
            &sender,
        )
        .await;
    } else {
        let run = Run {
            rate: args.rate,
            max_in_flight: args.max_in_flight,
            samples: sender.clone(),
            halts: args.halts,
        };
        if interleave {
            for index in 0..targets.len() {
                let now = Instant::now();
                let warm = Turn {
                    begin: now,
                    end: now + warmup,
                    measure: None,
                    origin: now,
                };
                open_loop_turn(&run, &mut targets, index, warm).await;
            }
            // Turns begin on a fixed grid, in the order direct-first then alternating: 0 1 2,
            // 0 2 1, 0 1 2… so neither proxy always follows the other on the shared core, and a
            // disturbance that repeats every few seconds (not a multiple of the six-turn cycle)
            // lands on each target in turn.
            let origin = Instant::now();
            let count = targets.len() as u32;
            // Whole cycles until every target has its measured time (a turn that began late is
            // shorter), within a bound: four times the turns that would normally do.
            let max_turns = 4 * count * (measured.as_secs_f64() / args.slice_secs).ceil() as u32;
            let mut turn = 0u32;
            while turn < max_turns.max(count)
                && (!turn.is_multiple_of(count)
                    || targets.iter().any(|target| target.measured < measured))
            {
                let (cycle, position) = (turn / count, turn % count);
                let index = if cycle % 2 == 0 || position == 0 {
                    position
                } else {
                    count - position
                } as usize;
                let begin = origin + slice * turn;
                tokio::time::sleep_until(begin.into()).await;
                // A turn that could not begin on time (the previous one's requests took that
                // long to finish) starts late and is shorter: never a burst.
                let start = Instant::now().max(begin);
                let end = begin + slice - TURN_GAP;
                let measure = (start + TURN_SETTLE, end - TURN_TAIL);
                let turn_plan = Turn {
                    begin: start,
                    end,
                    measure: (measure.0 < measure.1).then_some(measure),
                    origin,
                };
                open_loop_turn(&run, &mut targets, index, turn_plan).await;
                turn += 1;
            }
        } else {
            // One target after the other, each warmed up right before it is measured, in one
            // unbroken schedule.
            for index in 0..targets.len() {
                let now = Instant::now();
                let plan = Turn {
                    begin: now,
                    end: now + warmup + measured,
                    measure: Some((now + warmup, now + warmup + measured)),
                    origin: now + warmup,
                };
                open_loop_turn(&run, &mut targets, index, plan).await;
            }
        }
    }
    drop(sender);

    let mut latencies = vec![Vec::new(); targets.len()];
    let mut ttfbs = vec![Vec::new(); targets.len()];
    let mut services = vec![Vec::new(); targets.len()];
    let mut errors = vec![0u64; targets.len()];
    let mut lines = String::new();
    while let Some(sample) = receiver.recv().await {
        if !sample.measured {
            continue;
        }
        if args.samples.is_some() {
            use std::fmt::Write as _;
            let _ = write!(
                lines,
                "{} {} {}",
                sample.due_us,
                sample.service_us,
                u8::from(sample.ok)
            );
            if targets.len() > 1 {
                let _ = write!(lines, " {}", targets[sample.target].label);
            }
            lines.push('\n');
        }
        if sample.ok {
            latencies[sample.target].push(sample.latency_us);
            ttfbs[sample.target].push(sample.ttfb_us);
            services[sample.target].push(sample.service_us);
        } else {
            errors[sample.target] += 1;
        }
    }
    if let Some(path) = &args.samples {
        std::fs::write(path, lines)
            .with_context(|| format!("writing the samples to {}", path.display()))?;
    }
    let mut reports = Vec::new();
    for (index, target) in targets.iter().enumerate() {
        let ok = latencies[index].len() as u64;
        let measured_time = if args.rate == 0 {
            measured
        } else {
            target.measured
        };
        let mut report = json!({
            "label": target.label,
            "mode": if args.rate == 0 { "closed" } else { "open" },
            "target_rps": args.rate,
            "achieved_rps": (ok as f64 / measured_time.as_secs_f64().max(1e-3)).round(),
            "measured_secs": (measured_time.as_secs_f64() * 1000.0).round() / 1000.0,
            "ok": ok,
            "errors": errors[index],
            "dropped": target.dropped,
            "latency": Percentiles::of(&mut latencies[index]).to_json(),
            "ttfb": Percentiles::of(&mut ttfbs[index]).to_json(),
            "service": Percentiles::of(&mut services[index]).to_json(),
        });
        if args.rate > 0 {
            // Requests actually sent in the measured turns, their unmeasured edges included, as
            // the CPU time and halts are.
            let sent = target.sent.saturating_sub(target.dropped).max(1) as f64;
            if interleave {
                report["interleaved_with"] = json!(targets.len() - 1);
                report["slice_secs"] = json!(args.slice_secs);
            }
            if target.cpu_pid.is_some() {
                report["proxy_cpu_us_per_request"] =
                    json!((target.cpu_ns as f64 / 1e3 / sent * 10.0).round() / 10.0);
            }
            if args.halts {
                report["halts_per_request"] = json!(
                    target
                        .halts
                        .iter()
                        .map(|halts| (*halts as f64 / sent * 100.0).round() / 100.0)
                        .collect::<Vec<_>>()
                );
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// `connections` workers send back to back for `warmup` then `measured`.
async fn closed_loop(
    target: &Target,
    body: &Bytes,
    warmup: Duration,
    measured: Duration,
    connections: usize,
    sender: &mpsc::UnboundedSender<Sample>,
) {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measured;
    let mut workers = Vec::new();
    for _ in 0..connections.max(1) {
        let (client, uri, body, sender) = (
            target.client.clone(),
            target.uri.clone(),
            body.clone(),
            sender.clone(),
        );
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let due = Instant::now();
                let sample = send(&client, &uri, &body, due, measure_from, 0).await;
                if sender.send(sample).is_err() {
                    break;
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// Runs one turn of a target and adds it to the target's figures: requests due, dropped,
/// measured time, and over a measured turn the CPU time of its process and the halts of every
/// core. It ends when the turn's last request has finished (within a bound), so the next turn
/// starts with nothing in flight.
async fn open_loop_turn(run: &Run, targets: &mut [Target], index: usize, turn: Turn) {
    let target = &targets[index];
    let cpu_before = target
        .cpu_pid
        .filter(|_| turn.measure.is_some())
        .map(thread_cpu_ns);
    let halts_before = if run.halts && turn.measure.is_some() {
        halts()
    } else {
        Vec::new()
    };
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut dropped = 0;
    // A dedicated thread paces the sends with the OS's high-resolution sleep: the runtime's
    // timer has a granularity of about a millisecond, which would turn a steady 5000 req/s
    // into bursts of five every millisecond and measure burst handling instead.
    let interval = Duration::from_secs_f64(1.0 / run.rate as f64);
    let total =
        (turn.end.saturating_duration_since(turn.begin).as_secs_f64() * run.rate as f64) as u64;
    let (due_sender, mut due_receiver) = mpsc::unbounded_channel::<Instant>();
    let begin = turn.begin;
    let pacer = std::thread::spawn(move || {
        for sent in 0..total {
            let due = begin + interval.mul_f64(sent as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if due_sender.send(due).is_err() {
                break;
            }
        }
    });
    let measure = turn.measure;
    while let Some(due) = due_receiver.recv().await {
        if in_flight.load(Ordering::Relaxed) >= run.max_in_flight {
            dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, uri, body, sender, in_flight, origin) = (
            target.client.clone(),
            target.uri.clone(),
            target.body.clone(),
            run.samples.clone(),
            in_flight.clone(),
            turn.origin,
        );
        tokio::spawn(async move {
            let mut sample = send(&client, &uri, &body, due, origin, index).await;
            sample.measured = measure.is_some_and(|(from, until)| due >= from && due < until);
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = sender.send(sample);
        });
    }
    let _ = pacer.join();
    // Let the last requests finish, within a bound.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let Some((from, until)) = turn.measure else {
        return;
    };
    let target = &mut targets[index];
    target.sent += total;
    target.dropped += dropped;
    target.measured += until.saturating_duration_since(from);
    if let (Some(before), Some(pid)) = (cpu_before, target.cpu_pid) {
        let after = thread_cpu_ns(pid);
        // Per thread, so that one that exits in between takes away nothing already counted.
        target.cpu_ns += after
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
            .sum::<u64>();
    }
    if run.halts {
        let after = halts();
        target.halts.resize(after.len(), 0);
        for ((total, after), before) in target.halts.iter_mut().zip(&after).zip(&halts_before) {
            *total += after.saturating_sub(*before);
        }
    }
}

/// Every thread's CPU time so far, in ns, by thread id (empty if the process is gone).
fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return std::collections::HashMap::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse::<u64>().ok()?;
            Some((task.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// Every core's halts so far: entries into its cpuidle states other than polling (empty
/// without cpuidle).
fn halts() -> Vec<u64> {
    let mut cores = Vec::new();
    for core in 0.. {
        let Ok(states) = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{core}/cpuidle"))
        else {
            if std::path::Path::new(&format!("/sys/devices/system/cpu/cpu{core}")).exists() {
                cores.push(0);
                continue;
            }
            break;
        };
        let mut total = 0;
        for state in states.filter_map(Result::ok) {
            let name = std::fs::read_to_string(state.path().join("name")).unwrap_or_default();
            if name.trim() == "POLL" {
                continue;
            }
            total += std::fs::read_to_string(state.path().join("usage"))
                .ok()
                .and_then(|usage| usage.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        cores.push(total);
    }
    cores
}

/// Send one request and read the whole answer; times are measured from `due` and from the
/// actual send.
async fn send(
    client: &HttpClient,
    uri: &hyper::Uri,
    body: &Bytes,
    due: Instant,
    origin: Instant,
    target: usize,
) -> Sample {
    // Measured when due from the origin on (a turn narrows that down itself).
    let measured = due >= origin;
    let due_us = due.checked_duration_since(origin).map_or(0, |offset| {
        u64::try_from(offset.as_micros()).unwrap_or(u64::MAX)
    });
    let failed = Sample {
        target,
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
        target,
        measured,
        due_us,
        ok,
        latency_us: micros(latency),
        ttfb_us: micros(ttfb.unwrap_or(latency)),
        service_us: micros(sent_at.elapsed()),
    }
}
