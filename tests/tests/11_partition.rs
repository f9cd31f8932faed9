//! A network partition, for real: three `skein` processes, each in a network namespace this
//! test creates, joined by veth pairs to a bridge in a fourth namespace (addresses 10.77.0.x,
//! which exist only inside these namespaces); the mock provider listens on a second bridge
//! every node is linked to (10.78.0.x). Cutting node 3's cluster link isolates it from gossip and Raft alike (not from its
//! upstream); the others mark it dead and stop counting its rate-limit use; restoring the link
//! lets it rejoin and catch up. A second test cuts off a node that holds a budget lease.
//!
//! Needs root (to create namespaces) and `ip` and `curl`; without root the test says so and
//! passes without running. Ports are fixed because every namespace is private to this test.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use skein_tests::binary;
use skein_tests::process::Spawned;

const TOKEN: &str = "partition-admin-token";
const HTTP: u16 = 8080;
const GRPC: u16 = 8081;
const GOSSIP: u16 = 8082;
/// The upstream's address on its own bridge (the mock binds port 0 there): cutting a node off
/// the cluster leaves it its upstream, as a partition between gateway nodes does.
const UPSTREAM_HOST: &str = "10.78.0.254";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("running {program} {args:?}: {error}"))
}

fn ip(args: &[&str]) {
    let output = run("ip", args);
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The namespaces and links of one test run, removed on drop.
struct Net {
    bridge: String,
    nodes: Vec<String>,
}

impl Net {
    /// `None` when this machine does not let the test create a network namespace.
    fn create(count: usize) -> Option<Net> {
        let tag = std::process::id() % 100_000;
        let net = Net {
            bridge: format!("skb{tag}"),
            nodes: (1..=count).map(|i| format!("skn{i}x{tag}")).collect(),
        };
        let first = run("ip", &["netns", "add", &net.bridge]);
        if !first.status.success() {
            println!(
                "skipped: cannot create a network namespace: {}",
                String::from_utf8_lossy(&first.stderr).trim()
            );
            return None;
        }
        ip(&["-n", &net.bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.bridge, "link", "set", "br0", "up"]);
        // A second bridge, for the upstream: the mock provider listens on it, and a node cut
        // off the cluster (its br0 link down) still reaches it.
        ip(&["-n", &net.bridge, "link", "set", "lo", "up"]);
        ip(&["-n", &net.bridge, "link", "add", "br1", "type", "bridge"]);
        ip(&[
            "-n",
            &net.bridge,
            "addr",
            "add",
            &format!("{UPSTREAM_HOST}/24"),
            "dev",
            "br1",
        ]);
        ip(&["-n", &net.bridge, "link", "set", "br1", "up"]);
        for (index, ns) in net.nodes.iter().enumerate() {
            let i = index + 1;
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let (inside, outside) = (format!("skv{i}x{tag}"), format!("skp{i}x{tag}"));
            ip(&[
                "link",
                "add",
                &inside,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &outside,
                "netns",
                &net.bridge,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.77.0.{i}/24"),
                "dev",
                &inside,
            ]);
            ip(&["-n", ns, "link", "set", &inside, "up"]);
            ip(&["-n", &net.bridge, "link", "set", &outside, "master", "br0"]);
            ip(&["-n", &net.bridge, "link", "set", &outside, "up"]);
            let (inside, outside) = (format!("skw{i}x{tag}"), format!("skq{i}x{tag}"));
            ip(&[
                "link",
                "add",
                &inside,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &outside,
                "netns",
                &net.bridge,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.78.0.{i}/24"),
                "dev",
                &inside,
            ]);
            ip(&["-n", ns, "link", "set", &inside, "up"]);
            ip(&["-n", &net.bridge, "link", "set", &outside, "master", "br1"]);
            ip(&["-n", &net.bridge, "link", "set", &outside, "up"]);
        }
        Some(net)
    }

    /// Cut (`up == false`) or restore node `i`'s link to the bridge.
    fn link(&self, i: usize, up: bool) {
        let tag = std::process::id() % 100_000;
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &format!("skp{i}x{tag}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// A command that runs inside the bridges' namespace (where the upstream is).
    fn upstream_command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.bridge, program]);
        command
    }

    /// A command that runs inside node `i`'s namespace.
    fn command(&self, i: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.nodes[i - 1], program]);
        command
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.bridge)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

fn addr(i: usize, port: u16) -> String {
    format!("10.77.0.{i}:{port}")
}

/// `skein cluster status` as node `i` sees it.
fn status(net: &Net, i: usize) -> Option<Value> {
    cli_json(net, i, &["cluster", "status"])
}

/// Whether node `i` sees node `other` live in gossip.
fn sees_live(net: &Net, i: usize, other: u64) -> Option<bool> {
    let status = status(net, i)?;
    status["gossip"]
        .as_array()?
        .iter()
        .find(|member| member["node_id"] == other)
        .map(|member| member["live"] == true)
}

/// One chat call through node `i`: status and `x-ratelimit-remaining-requests`.
fn chat(net: &Net, i: usize, secret: &str) -> (u16, Option<u64>) {
    let output = net
        .command(i, "curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--max-time", "5"])
        .args(["-H", &format!("authorization: Bearer {secret}")])
        .args(["-H", "content-type: application/json"])
        .args([
            "-d",
            r#"{"model":"alpha","messages":[{"role":"user","content":"hi"}]}"#,
        ])
        .arg(format!("http://{}/v1/chat/completions", addr(i, HTTP)))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout);
    let status = text
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let remaining = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-ratelimit-remaining-requests")
            .then(|| value.trim().parse().ok())
            .flatten()
    });
    (status, remaining)
}

fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mock (on the upstream bridge) and three nodes, each in its own namespace, serving.
fn start_cluster(net: &Net, dir: &std::path::Path) -> (Spawned, Vec<Spawned>) {
    let mock_binary = binary("skein-mock").expect("mock binary");
    // Through a shell that sends its stdout (where it prints its address) to stderr, which
    // `Spawned` collects.
    let mut mock_command = net.upstream_command("sh");
    mock_command.args([
        "-c",
        "exec \"$0\" \"$@\" 1>&2",
        mock_binary.to_str().expect("path"),
        "--addr",
        &format!("{UPSTREAM_HOST}:0"),
        "--threads",
        "1",
        "--no-record",
    ]);
    let mock = Spawned::start(&mut mock_command);
    let line = mock
        .wait_for("listening on", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the mock did not start:\n{}", mock.output()));
    let mock_url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .expect("the mock's address")
        .to_owned();
    let config = dir.join("skein.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\nproviders:\n  - name: p\n    kind: openai_compatible\n    base_url: {mock_url}/v1\n    keys: [{{key: env:UPSTREAM_KEY}}]\nroutes:\n  - name: alpha\n    deployments: [{{provider: p, model: m}}]\n"
        ),
    )
    .expect("config");

    let voters = (1..=3)
        .map(|i| format!("{i}={}", addr(i, GRPC)))
        .collect::<Vec<_>>()
        .join(",");
    let skein = binary("skein").expect("binary");
    let mut nodes: Vec<Spawned> = Vec::new();
    for i in 1..=3 {
        let seeds = (1..=3)
            .filter(|other| *other != i)
            .map(|other| addr(other, GOSSIP))
            .collect::<Vec<_>>()
            .join(",");
        let data = dir.join(format!("node-{i}"));
        let mut command = net.command(i, skein.to_str().expect("path"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--node-id", &i.to_string(), "--voters", &voters])
            .args(["--http-addr", &addr(i, HTTP), "--grpc-addr", &addr(i, GRPC)])
            .args(["--gossip-addr", &addr(i, GOSSIP), "--gossip-seeds", &seeds])
            .args(["--log-format", "json", "--admin-token", TOKEN])
            .env("UPSTREAM_KEY", "upstream-secret")
            .env("SKEIN_LOG", "info,openraft=error")
            .env_remove("SKEIN_CONFIG");
        nodes.push(Spawned::start(&mut command));
    }
    for (index, node) in nodes.iter().enumerate() {
        node.wait_for("skein is serving", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("node {} did not start:\n{}", index + 1, node.output()));
    }
    (mock, nodes)
}

#[test]
fn a_partitioned_node_is_marked_dead_its_counters_expire_and_it_rejoins_after_healing() {
    // Creating namespaces needs root.
    if !run("id", &["-u"]).stdout.starts_with(b"0") {
        println!("skipped: creating network namespaces needs root");
        return;
    }
    let Some(net) = Net::create(3) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let (_mock, nodes) = start_cluster(&net, dir.path());
    let skein = binary("skein").expect("binary");
    // Everyone sees everyone.
    for i in 1..=3 {
        poll(Duration::from_secs(15), "gossip membership", || {
            (1..=3u64)
                .all(|other| sees_live(&net, i, other) == Some(true))
                .then_some(())
        });
    }

    // A key with 1000 requests per minute, used 30 times through node 3.
    let (secret, _) = poll(Duration::from_secs(15), "a key created", || {
        let output = net
            .command(1, skein.to_str().expect("path"))
            .args(["key", "create", "--id", "shared", "--rpm", "1000"])
            .args(["--output", "json", "--token", TOKEN])
            .args(["--endpoint", &format!("http://{}", addr(1, GRPC))])
            .output()
            .expect("cli");
        let created: Value = serde_json::from_slice(&output.stdout).ok()?;
        created["secret"].as_str().map(str::to_owned)
    });
    poll(Duration::from_secs(10), "the key on node 3", || {
        (chat(&net, 3, &secret).0 == 200).then_some(())
    });
    for _ in 0..29 {
        assert_eq!(chat(&net, 3, &secret).0, 200);
    }
    // Node 1 counts node 3's use: at most 1000 - 30 - its own calls remain.
    let (seen_with_3, _) = poll(
        Duration::from_secs(5),
        "node 3's use seen on node 1",
        || {
            let (status, remaining) = chat(&net, 1, &secret);
            assert_eq!(status, 200);
            remaining.filter(|remaining| *remaining < 1000 - 30)
        },
    );

    // Cut node 3 off. Nodes 1 and 2 log when they mark it dead.
    let cut = Instant::now();
    net.link(3, false);
    for node in &nodes[..2] {
        poll(
            Duration::from_secs(15),
            "node 3 marked dead in the log",
            || {
                node.output()
                    .lines()
                    .any(|line| {
                        line.contains("gossip: node is no longer live")
                            && line.contains("\"node_id\":3")
                    })
                    .then_some(())
            },
        );
    }
    println!(
        "nodes 1 and 2 marked the partitioned node 3 dead {:?} after its link was cut",
        cut.elapsed()
    );
    poll(
        Duration::from_secs(10),
        "node 3 dead in cluster status",
        || {
            (sees_live(&net, 1, 3) == Some(false) && sees_live(&net, 2, 3) == Some(false))
                .then_some(())
        },
    );
    // Its counters no longer count: node 1's remaining goes back up by node 3's 30 calls.
    let (_, remaining) = chat(&net, 1, &secret);
    let remaining = remaining.expect("remaining header");
    assert!(
        remaining >= seen_with_3 + 30 - 5,
        "node 3's use still counted: {remaining} remaining, {seen_with_3} before"
    );
    // The majority keeps accepting writes.
    let output = net
        .command(2, skein.to_str().expect("path"))
        .args(["key", "create", "--id", "during-partition"])
        .args(["--output", "json", "--token", TOKEN])
        .args(["--endpoint", &format!("http://{}", addr(2, GRPC))])
        .output()
        .expect("cli");
    let created: Value = serde_json::from_slice(&output.stdout).expect("created during partition");
    let new_secret = created["secret"].as_str().expect("secret").to_owned();

    // Heal: node 3 is live again everywhere, and catches up with what it missed.
    net.link(3, true);
    let (_, took) = poll(Duration::from_secs(20), "node 3 live again", || {
        (sees_live(&net, 1, 3) == Some(true) && sees_live(&net, 2, 3) == Some(true)).then_some(())
    });
    println!("node 3 was live again on nodes 1 and 2 {took:?} after the link came back");
    let (_, took) = poll(Duration::from_secs(20), "node 3 catching up", || {
        (chat(&net, 3, &new_secret).0 == 200).then_some(())
    });
    println!("node 3 served the key created during the partition {took:?} later");
    let applied = |i: usize| status(&net, i).and_then(|s| s["members"].as_array().cloned());
    poll(Duration::from_secs(10), "applied indexes equal", || {
        let members = applied(3)?;
        let indexes: Vec<u64> = members
            .iter()
            .filter_map(|member| member["applied_index"].as_u64())
            .collect();
        (indexes.len() == 3 && indexes.iter().all(|index| *index == indexes[0])).then_some(())
    });
    for mut node in nodes {
        node.terminate(Duration::from_secs(10));
    }
}

/// The CLI on node `i`'s namespace against its own admin port; its JSON output.
fn cli_json(net: &Net, i: usize, args: &[&str]) -> Option<Value> {
    let skein = binary("skein").expect("binary");
    let output = net
        .command(i, skein.to_str().expect("path"))
        .args(args)
        .args(["--output", "json", "--token", TOKEN])
        .args(["--endpoint", &format!("http://{}", addr(i, GRPC))])
        .output()
        .expect("cli");
    serde_json::from_slice(&output.stdout).ok()
}

/// One chat call through node `i` with `max_tokens` set: status and error code.
fn spend(net: &Net, i: usize, secret: &str) -> (u16, String) {
    let output = net
        .command(i, "curl")
        .args(["-s", "-w", "\n%{http_code}", "--max-time", "8"])
        .args(["-H", &format!("authorization: Bearer {secret}")])
        .args(["-H", "content-type: application/json"])
        .args([
            "-d",
            r#"{"model":"alpha","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        ])
        .arg(format!("http://{}/v1/chat/completions", addr(i, HTTP)))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status.trim().parse().unwrap_or(0), code)
}

/// Node 3 holds part of a budget as its lease when it is cut off: it keeps serving from it,
/// and only from it, while the majority spends the rest; nobody can be granted what node 3
/// holds, so the spend recorded once the link is back is within the budget.
#[test]
fn a_partitioned_node_spends_only_its_lease_and_the_budget_holds() {
    if !run("id", &["-u"]).stdout.starts_with(b"0") {
        println!("skipped: creating network namespaces needs root");
        return;
    }
    let Some(net) = Net::create(3) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let (_mock, nodes) = start_cluster(&net, dir.path());
    // A price for the route, a key and a budget of 2,000,000 n$ (a call with max_tokens 16
    // holds about 41,000 and costs about 11,000).
    let limit: u64 = 2_000_000;
    poll(Duration::from_secs(15), "a price", || {
        cli_json(
            &net,
            1,
            &[
                "price",
                "create",
                "--json",
                r#"{"model":"alpha","input_nanos_per_token":1000,"output_nanos_per_token":1000}"#,
            ],
        )
    });
    let created = cli_json(&net, 1, &["key", "create", "--id", "leased"]).expect("key");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    cli_json(
        &net,
        1,
        &["budget", "create", "--json", &format!(r#"{{"id":"leased-budget","scope":{{"kind":"key","id":"leased"}},"limit_nanos":{limit},"period":"lifetime"}}"#)],
    )
    .expect("budget");
    // Node 3 takes a lease by serving a call.
    poll(Duration::from_secs(15), "a call through node 3", || {
        (spend(&net, 3, &secret).0 == 200).then_some(())
    });
    let (held, _) = poll(
        Duration::from_secs(10),
        "node 3's lease seen on node 1",
        || {
            let status = cli_json(&net, 1, &["budget", "status", "leased-budget"])?;
            status["leases"]
                .as_array()?
                .iter()
                .find(|lease| lease["node_id"] == 3)
                .and_then(|lease| lease["outstanding_nanos"].as_u64())
                .filter(|held| *held > 0)
        },
    );
    println!("node 3 holds {held} n$ of the {limit} n$ budget");
    assert!(held < limit, "one node never holds the whole budget");

    net.link(3, false);
    let cut = Instant::now();
    // Cut off, node 3 serves from what it holds, then refuses: it cannot reach the leader
    // for more. Bounded: 200 calls or 30 s.
    let mut served_cut_off = 0u64;
    let mut refusal = (0, String::new());
    for _ in 0..200 {
        if cut.elapsed() > Duration::from_secs(30) {
            break;
        }
        match spend(&net, 3, &secret) {
            (200, _) => served_cut_off += 1,
            other => {
                refusal = other;
                break;
            }
        }
    }
    println!(
        "cut off, node 3 served {served_cut_off} calls from its lease, then answered {refusal:?}"
    );
    assert!(served_cut_off > 0, "a cut-off node spends what it holds");
    assert_eq!(refusal.0, 503, "then it cannot get more: {refusal:?}");
    assert_eq!(refusal.1, "budget_lease_unavailable");
    // The majority spends the rest, and is refused while node 3's lease still holds its part.
    // What the majority cannot have is node 3's part: it runs out saying the rest is leased
    // elsewhere (or spent). Bounded: 400 calls; stops after 10 refusals in a row.
    let mut served_majority = 0u64;
    let mut last = (0, String::new());
    let mut refused_in_a_row = 0;
    for call in 0..400 {
        last = spend(&net, 1 + call % 2, &secret);
        match &last {
            (200, _) => {
                served_majority += 1;
                refused_in_a_row = 0;
            }
            (429, code) if code == "budget_leased_elsewhere" || code == "insufficient_quota" => {
                refused_in_a_row += 1;
                if refused_in_a_row >= 10 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!("unexpected answer from the majority: {other:?}"),
        }
    }
    println!("the majority served {served_majority} calls, then answered {last:?}");
    assert_eq!(refused_in_a_row, 10, "the majority ran out: {last:?}");
    let status = cli_json(&net, 1, &["budget", "status", "leased-budget"]).expect("status");
    let node3 = status["leases"]
        .as_array()
        .and_then(|leases| leases.iter().find(|lease| lease["node_id"] == 3).cloned())
        .expect("node 3's lease still held");
    assert!(
        node3["outstanding_nanos"].as_u64().unwrap_or(0) > 0,
        "node 3's lease still holds its part: {status}"
    );
    assert!(
        cut.elapsed() < Duration::from_secs(120),
        "measured within the lease's grace"
    );

    // Heal: node 3 records what it spent while cut off; the total is within the budget.
    net.link(3, true);
    let answered = 1 + served_cut_off + served_majority;
    let (usage, took) = poll(Duration::from_secs(30), "every call recorded", || {
        let usage = cli_json(&net, 1, &["usage", "--key", "leased"])?;
        let rows = usage["rows"].as_array()?;
        let requests: u64 = rows.iter().filter_map(|row| row["requests"].as_u64()).sum();
        let cost: u64 = rows
            .iter()
            .filter_map(|row| row["cost_nanos"].as_u64())
            .sum();
        (requests == answered).then_some(cost)
    });
    println!("after healing ({took:?}): {answered} calls recorded, {usage} n$ of {limit} n$ spent");
    assert!(usage <= limit, "spent {usage} n$ of a {limit} n$ budget");
    assert!(
        usage >= limit * 8 / 10,
        "the budget was used: {usage} of {limit}"
    );
    for mut node in nodes {
        node.terminate(Duration::from_secs(10));
    }
}
