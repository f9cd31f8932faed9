//! The control plane as its state grows: fills a running cluster with virtual keys (bulk
//! creates of 50,000) and teams (one import), and at each size measures admin writes the way a
//! user makes them (concurrent `CreateKey` calls over gRPC), the nodes' RSS, and how long the
//! state machines took to apply batches (from each node's `skein_raft_apply_seconds`).
//! Prints one JSON line per point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    CreateKeyRequest, CreateKeysRequest, ExportConfigRequest, ImportConfigRequest,
};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The admin gRPC endpoint writes go to (`http://127.0.0.1:8081`).
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    token: String,
    /// Key counts to measure at, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,100000,1000000"
    )]
    levels: Vec<u64>,
    /// Teams imported after the first point (keys are spread over them from then on).
    #[arg(long, default_value_t = 100_000)]
    teams: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    writers: u64,
    /// Writes measured at each point.
    #[arg(long, default_value_t = 4000)]
    writes: u64,
    /// Longest a point's writes may take.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Shortest window a point's apply times are read over (spend is flushed every second).
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
    /// Node processes whose RSS is read (repeat).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Nodes' metrics URLs (`http://127.0.0.1:9090/metrics`; repeat).
    #[arg(long = "metrics")]
    metrics: Vec<String>,
}

const BATCH: u64 = 50_000;
const MESSAGE_LIMIT: usize = 256 << 20;

fn authorized<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Apply-time histogram buckets, by kind then upper bound (s), summed over the nodes.
type Buckets = BTreeMap<String, Vec<(f64, u64)>>;

async fn apply_buckets(http: &reqwest::Client, urls: &[String]) -> anyhow::Result<Buckets> {
    let mut buckets: BTreeMap<String, BTreeMap<u64, (f64, u64)>> = BTreeMap::new();
    for url in urls {
        let text = http.get(url).send().await?.text().await?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("skein_raft_apply_seconds_bucket{") else {
                continue;
            };
            let Some((labels, count)) = rest.split_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .map(|value| value.trim_end_matches('"').to_owned())
            };
            let (Some(kind), Some(le)) = (label("kind"), label("le")) else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            let count: u64 = count.trim().parse::<f64>()? as u64;
            let slot = buckets
                .entry(kind)
                .or_default()
                .entry(bound.to_bits())
                .or_insert((bound, 0));
            slot.1 += count;
        }
    }
    Ok(buckets
        .into_iter()
        .map(|(kind, by_bound)| {
            let mut list: Vec<(f64, u64)> = by_bound.into_values().collect();
            list.sort_by(|a, b| a.0.total_cmp(&b.0));
            (kind, list)
        })
        .collect())
}

/// Count, and the bucket bounds (ms) that hold the 99th percentile and the slowest batch,
/// of the batches applied between two readings.
fn apply_summary(before: &Buckets, after: &Buckets) -> Value {
    let mut summary = serde_json::Map::new();
    for (kind, buckets) in after {
        let earlier = |bound: f64| {
            before
                .get(kind)
                .and_then(|list| list.iter().find(|(b, _)| *b == bound))
                .map_or(0, |(_, count)| *count)
        };
        let cumulative: Vec<(f64, u64)> = buckets
            .iter()
            .map(|(bound, count)| (*bound, count.saturating_sub(earlier(*bound))))
            .collect();
        let total = cumulative.last().map_or(0, |(_, count)| *count);
        let bound_ms = |rank: u64| {
            cumulative
                .iter()
                .find(|(_, count)| *count >= rank)
                .map(|(bound, _)| {
                    if bound.is_finite() {
                        json!(bound * 1000.0)
                    } else {
                        json!("inf")
                    }
                })
                .unwrap_or(Value::Null)
        };
        summary.insert(
            kind.clone(),
            json!({
                "batches": total,
                "p99_at_most_ms": bound_ms(total.saturating_mul(99).div_ceil(100).max(1)),
                "max_at_most_ms": bound_ms(total.max(1)),
            }),
        );
    }
    Value::Object(summary)
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:").and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
        })
        .map_or(0, |kib| kib * 1024)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

struct Bench {
    args: Args,
    client: AdminClient<Channel>,
    http: reqwest::Client,
    keys: u64,
    teams: u64,
    point: u64,
}

impl Bench {
    /// Create keys up to `target` in bulk writes.
    async fn fill(&mut self, target: u64) -> anyhow::Result<f64> {
        let started = Instant::now();
        while self.keys < target {
            let count = BATCH.min(target - self.keys);
            let keys = (self.keys..self.keys + count)
                .map(|n| CreateKeyRequest {
                    id: format!("fill-{n}"),
                    team: if self.teams > 0 {
                        format!("team-{}", n % self.teams)
                    } else {
                        String::new()
                    },
                    ..CreateKeyRequest::default()
                })
                .collect();
            self.client
                .create_keys(authorized(&self.args.token, CreateKeysRequest { keys })?)
                .await
                .context("bulk create")?;
            self.keys += count;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Replace the config with itself plus `teams` teams, in one import.
    async fn import_teams(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        let export = self
            .client
            .export_config(authorized(
                &self.args.token,
                ExportConfigRequest::default(),
            )?)
            .await?
            .into_inner();
        let mut config: Value = serde_norway::from_str(&export.yaml)?;
        let teams: Vec<Value> = (0..self.args.teams)
            .map(|n| json!({"id": format!("team-{n}"), "name": format!("Team {n}")}))
            .collect();
        config["teams"] = Value::Array(teams);
        let yaml = serde_norway::to_string(&config)?;
        self.client
            .import_config(authorized(&self.args.token, ImportConfigRequest { yaml })?)
            .await
            .context("import")?;
        self.teams = self.args.teams;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Concurrent single-key creates, as a user makes them.
    async fn writes(&mut self) -> anyhow::Result<Value> {
        let next = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(self.args.max_secs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.args.writers {
            let mut client = self.client.clone();
            let next = next.clone();
            let token = self.args.token.clone();
            let (point, total, teams) = (self.point, self.args.writes, self.teams);
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total || Instant::now() >= deadline {
                        break;
                    }
                    let request = CreateKeyRequest {
                        id: format!("write-{point}-{n}"),
                        team: if teams > 0 {
                            format!("team-{}", n % teams)
                        } else {
                            String::new()
                        },
                        ..CreateKeyRequest::default()
                    };
                    let sent = Instant::now();
                    let Ok(request) = authorized(&token, request) else {
                        errors += 1;
                        continue;
                    };
                    match client.create_key(request).await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (mut some, failed) = task.await?;
            latencies.append(&mut some);
            errors += failed;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();
        self.keys += latencies.len() as u64;
        Ok(json!({
            "writes": latencies.len(),
            "errors": errors,
            "writes_per_s": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": percentile(&latencies, 1.0),
        }))
    }

    async fn point(&mut self, fill_secs: f64) -> anyhow::Result<()> {
        self.point += 1;
        let before = apply_buckets(&self.http, &self.args.metrics).await?;
        let window = Instant::now() + Duration::from_secs(self.args.window_secs);
        let writes = self.writes().await?;
        tokio::time::sleep_until(window.into()).await;
        let after = apply_buckets(&self.http, &self.args.metrics).await?;
        let rss: Vec<u64> = self.args.pids.iter().map(|pid| rss_bytes(*pid)).collect();
        let largest = rss.iter().copied().max().unwrap_or(0);
        let line = json!({
            "label": "scale",
            "keys": self.keys,
            "teams": self.teams,
            "fill_secs": fill_secs,
            "write": writes,
            "rss_mib": rss.iter().map(|bytes| *bytes as f64 / 1048576.0).collect::<Vec<_>>(),
            "rss_bytes_per_key": largest as f64 / self.keys.max(1) as f64,
            "apply": apply_summary(&before, &after),
        });
        println!("{line}");
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.levels.is_empty() || args.levels.windows(2).any(|pair| pair[0] >= pair[1]) {
        bail!("--levels must be ascending");
    }
    let channel = Channel::from_shared(args.endpoint.clone())?
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .context("connecting")?;
    let client = AdminClient::new(channel)
        .max_decoding_message_size(MESSAGE_LIMIT)
        .max_encoding_message_size(MESSAGE_LIMIT);
    let mut bench = Bench {
        args,
        client,
        // A connection per scrape: a kept one may have been closed by the node's idle timeout.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()?,
        keys: 0,
        teams: 0,
        point: 0,
    };
    let levels = bench.args.levels.clone();
    let fill_secs = bench.fill(levels[0]).await?;
    bench.point(fill_secs).await?;
    if bench.args.teams > 0 {
        let import_secs = bench.import_teams().await?;
        bench.point(import_secs).await?;
    }
    for level in levels.into_iter().skip(1) {
        let fill_secs = bench.fill(level).await?;
        bench.point(fill_secs).await?;
    }
    Ok(())
}
