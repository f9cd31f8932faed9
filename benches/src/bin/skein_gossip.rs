//! Gossip benchmark: N Skein gossip agents in this process, over real UDP on loopback, with
//! production settings (200 ms interval). Measures, per node:
//! - bandwidth and messages per second, idle (node info only) and under churn (every node
//!   rewrites the soft state a busy gateway publishes every 100 ms: provider-key reports and
//!   rate-limit reports);
//! - CPU (this process's CPU time divided by the number of nodes);
//! - convergence: how long a value one node publishes takes to be seen by every other node.
//!
//! Prints one JSON object per measurement.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use skein_cluster::{CountingTransport, Gossip, GossipOptions, GossipStats, NodeInfo};

#[derive(Parser)]
struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of each measured phase (idle, churn).
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Provider keys each node reports on.
    #[arg(long, default_value_t = 20)]
    keys: usize,
    /// Rate-limit pools each node reports on.
    #[arg(long, default_value_t = 50)]
    pools: usize,
    /// Convergence probes.
    #[arg(long, default_value_t = 20)]
    probes: usize,
}

fn free_udp_port() -> anyhow::Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.port())
}

/// This process's CPU time (user + system).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let hz = 100;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

struct Totals {
    bytes_sent: u64,
    messages_sent: u64,
}

fn totals(stats: &[Arc<GossipStats>]) -> Totals {
    Totals {
        bytes_sent: stats
            .iter()
            .map(|s| s.bytes_sent.load(Ordering::Relaxed))
            .sum(),
        messages_sent: stats
            .iter()
            .map(|s| s.messages_sent.load(Ordering::Relaxed))
            .sum(),
    }
}

async fn measure(
    phase: &str,
    nodes: usize,
    stats: &[Arc<GossipStats>],
    duration: Duration,
) -> serde_json::Value {
    let (before, cpu_before, started) = (totals(stats), cpu_time(), Instant::now());
    tokio::time::sleep(duration).await;
    let (after, cpu_after, elapsed) = (totals(stats), cpu_time(), started.elapsed());
    let per_node_per_sec = |value: u64| value as f64 / nodes as f64 / elapsed.as_secs_f64();
    serde_json::json!({
        "phase": phase,
        "nodes": nodes,
        "bytes_sent_per_node_per_sec": per_node_per_sec(after.bytes_sent - before.bytes_sent).round(),
        "messages_sent_per_node_per_sec": (per_node_per_sec(after.messages_sent - before.messages_sent) * 10.0).round() / 10.0,
        "cpu_per_node_percent": ((cpu_after - cpu_before).as_secs_f64() / elapsed.as_secs_f64() / nodes as f64 * 1000.0).round() / 10.0,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ports: Vec<u16> = (0..args.nodes)
        .map(|_| free_udp_port())
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], *port)))
        .collect();
    let mut agents = Vec::new();
    let mut stats = Vec::new();
    let started = Instant::now();
    for (index, addr) in addrs.iter().enumerate() {
        let seeds = addrs
            .iter()
            .filter(|other| *other != addr)
            .map(ToString::to_string)
            .collect();
        let info = NodeInfo {
            node_id: index as u64 + 1,
            http_addr: format!("127.0.0.1:{}", 8080 + index),
            grpc_addr: format!("127.0.0.1:{}", 9080 + index),
            version: "bench".to_owned(),
            ready: true,
            raft_role: "follower".to_owned(),
            applied_index: 1,
        };
        let transport = CountingTransport::new(chitchat::transport::UdpTransport);
        stats.push(transport.stats());
        agents.push(Arc::new(
            Gossip::start(GossipOptions::new(*addr, seeds), &info, &transport)
                .await
                .context("starting gossip")?,
        ));
    }
    // Membership converges.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for agent in &agents {
            let members = agent.members().await;
            all &= members
                .iter()
                .filter(|m| m.live && m.info.is_some())
                .count()
                == args.nodes;
        }
        if all {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "membership did not converge");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{}",
        serde_json::json!({"phase": "membership", "nodes": args.nodes, "converged_ms": started.elapsed().as_millis()})
    );
    let duration = Duration::from_secs_f64(args.duration_secs);
    println!("{}", measure("idle", args.nodes, &stats, duration).await);

    // Churn: every node rewrites its key and limit reports every 100 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (index, agent) in agents.iter().enumerate() {
        let (agent, stop, keys, pools) = (agent.clone(), stop.clone(), args.keys, args.pools);
        writers.push(tokio::spawn(async move {
            let mut tick: u64 = 0;
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                tick += 1;
                let now = skein_types::now_ms();
                let mut entries = Vec::with_capacity(keys + pools);
                for key in 0..keys {
                    // cooldown window requests tokens, plus upstream figures.
                    entries.push((
                        format!("health:provider-{}/key-{key}", key % 4),
                        format!(
                            "0 {} {} {} {} 10000 {} 2000000 {}",
                            now / 60_000,
                            tick * 3,
                            tick * 900,
                            now,
                            10_000 - (tick % 10_000),
                            2_000_000 - tick * 900 % 2_000_000
                        ),
                    ));
                }
                for pool in 0..pools {
                    entries.push((
                        format!("limit:k/r/key-{pool}"),
                        format!(
                            "1000 {} {} 0 {} {} g s",
                            now / 60_000,
                            tick + index as u64,
                            10 + pool,
                            now / 10_000
                        ),
                    ));
                }
                agent.publish_entries(&entries).await;
            }
        }));
    }
    println!("{}", measure("churn", args.nodes, &stats, duration).await);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }

    // Convergence: one node publishes a value; time until every other node sees it.
    let mut times = Vec::new();
    for probe in 0..args.probes {
        let source = &agents[probe % args.nodes];
        let value = format!("{probe}");
        let started = Instant::now();
        source
            .publish_entries(&[("bench:probe".to_owned(), value.clone())])
            .await;
        let deadline = started + Duration::from_secs(30);
        loop {
            let mut seen = 0;
            for (index, agent) in agents.iter().enumerate() {
                if index == probe % args.nodes {
                    continue;
                }
                if agent
                    .remote_entries("bench:probe")
                    .await
                    .iter()
                    .any(|(_, v)| *v == value)
                {
                    seen += 1;
                }
            }
            if seen == args.nodes - 1 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "probe {probe} did not converge");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        times.push(started.elapsed().as_millis() as u64);
    }
    times.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "phase": "convergence",
            "nodes": args.nodes,
            "probes": times.len(),
            "p50_ms": times[times.len() / 2],
            "max_ms": times[times.len() - 1],
        })
    );
    for agent in agents {
        if let Ok(agent) = Arc::try_unwrap(agent) {
            let _ = agent.shutdown().await;
        }
    }
    Ok(())
}
