//! Scenarios on chitchat's in-memory transport: Skein's gossip agents and rate limiters, wired
//! as a node wires them, with no sockets. A cluster of three exchanges limit reports and key
//! health; the tests drive demand through it and check what the cluster admits and how fast
//! health spreads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use skein_cluster::{Gossip, GossipOptions, NodeInfo, keys};
use skein_core::limits::{Ask, Kind, Limiter, Member, PoolId, Scope};
use skein_core::shared::KeyReport;

const INTERVAL: Duration = Duration::from_millis(50);

struct Node {
    gossip: Arc<Gossip>,
    limiter: Arc<Limiter>,
    exchange: tokio::task::JoinHandle<()>,
}

fn info(node_id: u64) -> NodeInfo {
    NodeInfo {
        node_id,
        http_addr: format!("127.0.0.1:{}", 8000 + node_id),
        grpc_addr: format!("127.0.0.1:{}", 9000 + node_id),
        version: "test".to_owned(),
        ready: true,
        raft_role: "follower".to_owned(),
        applied_index: 0,
    }
}

/// Three nodes on one in-memory network (`base` keeps tests' addresses apart), each running
/// the limit exchange every `INTERVAL / 2`, as `skein serve` does every 100 ms.
async fn cluster(transport: &ChannelTransport, base: u16) -> Vec<Node> {
    let addrs: Vec<SocketAddr> = (1..=3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i)))
        .collect();
    let mut nodes = Vec::new();
    for (index, addr) in addrs.iter().enumerate() {
        let seeds = addrs
            .iter()
            .filter(|other| *other != addr)
            .map(ToString::to_string)
            .collect();
        let mut options = GossipOptions::new(*addr, seeds);
        options.interval = INTERVAL;
        options.failure_detector.initial_interval = INTERVAL;
        options.failure_detector.max_interval = Duration::from_millis(500);
        let node_id = index as u64 + 1;
        let gossip = Arc::new(
            Gossip::start(options, &info(node_id), transport)
                .await
                .expect("start"),
        );
        let limiter = Arc::new(Limiter::new());
        limiter.set_node_id(node_id);
        let exchange = tokio::spawn({
            let (gossip, limiter) = (gossip.clone(), limiter.clone());
            async move {
                loop {
                    let (members, reports) = gossip.limit_view().await;
                    let members = members
                        .into_iter()
                        .map(|(node_id, started_ms)| Member {
                            node_id,
                            started_ms,
                        })
                        .collect();
                    let mine = limiter.exchange(members, reports, limiter.now_ms());
                    gossip.publish_limits(&mine).await;
                    tokio::time::sleep(INTERVAL / 2).await;
                }
            }
        });
        nodes.push(Node {
            gossip,
            limiter,
            exchange,
        });
    }
    // Everyone sees everyone.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in &nodes {
        loop {
            let (members, _) = node.gossip.limit_view().await;
            if members.len() == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "membership did not converge");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    nodes
}

/// Offer `count` requests spread over `duration`, each to the node `target(i)` picks; how many
/// the cluster admitted.
async fn offer(
    nodes: &[Node],
    pool: &PoolId,
    limit: u64,
    count: u32,
    duration: Duration,
    target: impl Fn(u32) -> usize,
) -> u64 {
    let started = Instant::now();
    let mut admitted = 0;
    for i in 0..count {
        tokio::time::sleep_until((started + duration * i / count).into()).await;
        let node = &nodes[target(i)];
        let ask = Ask {
            pool: pool.clone(),
            limit,
            cost: 1,
        };
        if let Ok((ticket, _)) = node.limiter.admit(&[ask], node.limiter.now_ms()) {
            ticket.settle(0);
            admitted += 1;
        }
    }
    admitted
}

/// Wait, if needed, so that a run of `needed` falls in one one-minute window.
async fn within_one_window(needed: Duration) {
    let now = skein_types::now_ms();
    let left = 60_000 - now % 60_000;
    if left < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_holds_for_the_cluster_whether_demand_is_even_or_moves() {
    let transport = ChannelTransport::with_mtu(65_507);
    let nodes = cluster(&transport, 21_000).await;
    let limit = 120;
    let within =
        |admitted: u64| admitted <= limit + limit * 2 / 100 && admitted * 100 >= limit * 95;

    within_one_window(Duration::from_secs(10)).await;
    let even = PoolId::new(Scope::Key, "even", Kind::Requests);
    let admitted = offer(
        &nodes,
        &even,
        limit,
        3 * limit as u32,
        Duration::from_secs(3),
        |i| i as usize % 3,
    )
    .await;
    println!("even: {admitted} admitted of {}, limit {limit}", 3 * limit);
    assert!(within(admitted), "even: {admitted} admitted, limit {limit}");

    within_one_window(Duration::from_secs(10)).await;
    let moving = PoolId::new(Scope::Team, "moving", Kind::Requests);
    let half = 3 * limit as u32 / 2;
    let admitted = offer(
        &nodes,
        &moving,
        limit,
        3 * limit as u32,
        Duration::from_secs(3),
        |i| usize::from(i >= half),
    )
    .await;
    println!(
        "moving: {admitted} admitted of {}, limit {limit}",
        3 * limit
    );
    assert!(
        within(admitted),
        "moving: {admitted} admitted, limit {limit}"
    );

    // Every node reports the same cluster-wide use.
    tokio::time::sleep(INTERVAL * 6).await;
    for node in &nodes {
        let status = node
            .limiter
            .status(&moving, node.limiter.now_ms())
            .expect("pool known everywhere");
        assert!(
            status.remaining <= limit - admitted.min(limit) + 2,
            "{status:?}"
        );
    }
    for node in nodes {
        node.exchange.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cooldown_reaches_every_node_within_an_interval() {
    let transport = ChannelTransport::with_mtu(65_507);
    let nodes = cluster(&transport, 22_000).await;
    let report = KeyReport {
        cooldown_until_ms: skein_types::now_ms() + 30_000,
        window: skein_types::now_ms() / 60_000,
        ..KeyReport::default()
    };
    let started = Instant::now();
    nodes[0]
        .gossip
        .publish_entries(&[(format!("{}p/a", keys::HEALTH_PREFIX), report.encode())])
        .await;
    for node in &nodes[1..] {
        loop {
            let seen = node
                .gossip
                .remote_entries(keys::HEALTH_PREFIX)
                .await
                .iter()
                .any(|(name, value)| name == "p/a" && KeyReport::decode(value) == Some(report));
            if seen {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the cooldown did not spread"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let took = started.elapsed();
    println!("a cooldown reached both other nodes in {took:?} (gossip interval {INTERVAL:?})");
    assert!(took <= INTERVAL * 4, "{took:?}");
    for node in nodes {
        node.exchange.abort();
    }
}
