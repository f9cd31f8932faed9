//! The chaos suite: the chart's own pods, as separate hosts, through the faults clusters meet.
//!
//! `tests/chaos/run.sh` renders the Helm chart (`helm template`) and hands this test the
//! StatefulSet's container arguments and environment (`SKEIN_CHAOS_SPEC`). Each replica runs
//! the real binary with exactly those arguments, in a network namespace of its own (address
//! 10.78.0.1x), with `HOSTNAME`, `POD_NAME` and `POD_IP` set as Kubernetes sets them and the
//! chart's volumes mapped to directories. The headless Service's DNS name resolves, through a
//! hosts file per namespace, to the pods that exist, as cluster DNS would; scaling changes it.
//! A veth from this test's own namespace to the bridge carries the test's traffic.
//!
//! Every scenario runs under load (chat calls round-robin over the healthy nodes, and admin
//! writes) and reports: requests failed on healthy nodes, admin writes acknowledged and lost,
//! spend lost and double-counted, time to a new leader, time to converge, and whether one
//! cluster remains. The table is printed and written to `$SKEIN_CHAOS_OUT` when set.
//!
//! Without the spec, or without root, the test says so and passes without running.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skein_proto::admin::v1::admin_client::AdminClient;
use skein_proto::admin::v1::{
    ClusterStatusRequest, ClusterStatusResponse, CreateKeyRequest, GetRequest, Kind, NodeRequest,
    UsageRequest,
};
use skein_tests::authorized;
use skein_tests::process::Spawned;
use tonic::transport::Channel;

const SUBNET: &str = "10.78.0";
const MOCK_PORT: u16 = 9000;

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

struct Spec {
    fullname: String,
    domain: String,
    args: Vec<String>,
    env: Vec<(String, Result<String, String>)>,
    config: String,
    token: String,
}

impl Spec {
    fn load(path: &Path) -> Spec {
        let spec: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("spec")).expect("json");
        let text = |value: &Value| value.as_str().expect("string").to_owned();
        let service = text(&spec["service"]);
        Spec {
            fullname: text(&spec["fullname"]),
            domain: format!("{service}.default.svc.cluster.local"),
            args: spec["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(text)
                .collect(),
            env: spec["env"]
                .as_array()
                .expect("env")
                .iter()
                .map(|variable| {
                    let name = text(&variable["name"]);
                    match variable.get("value") {
                        Some(value) => (name, Ok(text(value))),
                        None => (name, Err(text(&variable["field"]))),
                    }
                })
                .collect(),
            config: text(&spec["config"]),
            token: text(&spec["token"]),
        }
    }
}

/// The namespaces, links and hosts files of one run; removed on drop.
struct Net {
    tag: u32,
    bridge: String,
    root_link: String,
    nodes: Vec<String>,
}

impl Net {
    fn create(count: usize) -> Option<Net> {
        let tag = std::process::id() % 10_000;
        let net = Net {
            tag,
            bridge: format!("skcb{tag}"),
            root_link: format!("skcr{tag}"),
            nodes: (0..count).map(|i| format!("skc{i}x{tag}")).collect(),
        };
        if !run("ip", &["netns", "add", &net.bridge]).status.success() {
            return None;
        }
        ip(&["-n", &net.bridge, "link", "set", "lo", "up"]);
        ip(&["-n", &net.bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &net.bridge,
            "addr",
            "add",
            &format!("{SUBNET}.1/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &net.bridge, "link", "set", "br0", "up"]);
        // This test's own way in: a veth from its namespace to the bridge.
        let inside = format!("skci{tag}");
        ip(&[
            "link",
            "add",
            &net.root_link,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            &net.bridge,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{SUBNET}.254/24"),
            "dev",
            &net.root_link,
        ]);
        ip(&["link", "set", &net.root_link, "up"]);
        ip(&["-n", &net.bridge, "link", "set", &inside, "master", "br0"]);
        ip(&["-n", &net.bridge, "link", "set", &inside, "up"]);
        for (ordinal, ns) in net.nodes.iter().enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let (pod, host) = (
                format!("skcv{ordinal}x{tag}"),
                format!("skch{ordinal}x{tag}"),
            );
            ip(&[
                "link",
                "add",
                &pod,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &host,
                "netns",
                &net.bridge,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", pod_ip(ordinal)),
                "dev",
                &pod,
            ]);
            ip(&["-n", ns, "link", "set", &pod, "up"]);
            ip(&["-n", &net.bridge, "link", "set", &host, "master", "br0"]);
            ip(&["-n", &net.bridge, "link", "set", &host, "up"]);
            std::fs::create_dir_all(format!("/etc/netns/{ns}")).expect("netns etc");
        }
        Some(net)
    }

    /// Cut (`up == false`) or restore pod `ordinal`'s link.
    fn link(&self, ordinal: usize, up: bool) {
        let host = format!("skch{ordinal}x{}", self.tag);
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &host,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.root_link]);
        for ns in self.nodes.iter().chain(std::iter::once(&self.bridge)) {
            let _ = run("ip", &["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn pod_ip(ordinal: usize) -> String {
    format!("{SUBNET}.{}", 10 + ordinal)
}

/// How a pod is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clock {
    True,
    Skewed(&'static str),
}

struct Pods {
    spec: Spec,
    net: Net,
    dir: tempfile::TempDir,
    procs: Vec<Option<Spawned>>,
    /// The pods cluster DNS lists (they exist, running or not).
    listed: BTreeSet<usize>,
    /// Log lines of panics seen in any pod's output.
    panics: Vec<String>,
}

impl Pods {
    fn name(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.spec.fullname)
    }

    /// Rewrite every namespace's hosts file: the listed pods, and the headless name resolving
    /// to all of them. Written in place (the namespaces see the file through a bind mount).
    fn publish_dns(&self) {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for &ordinal in &self.listed {
            hosts.push_str(&format!(
                "{} {}.{}\n{} {}\n",
                pod_ip(ordinal),
                self.name(ordinal),
                self.spec.domain,
                pod_ip(ordinal),
                self.spec.domain
            ));
        }
        for ns in &self.net.nodes {
            std::fs::write(format!("/etc/netns/{ns}/hosts"), &hosts).expect("hosts");
        }
    }

    fn pod_dir(&self, ordinal: usize) -> PathBuf {
        self.dir.path().join(self.name(ordinal))
    }

    /// Start pod `ordinal` and wait until it serves.
    fn start(&mut self, ordinal: usize, clock: Clock) {
        self.spawn(ordinal, clock);
        if let Some(process) = &self.procs[ordinal] {
            process.serving_url(Duration::from_secs(30));
        }
    }

    /// Start pod `ordinal` with the chart's arguments and environment.
    fn spawn(&mut self, ordinal: usize, clock: Clock) {
        let root = self.pod_dir(ordinal);
        for sub in ["etc-skein", "data", "etc-skein-admin"] {
            std::fs::create_dir_all(root.join(sub)).expect("pod dir");
        }
        std::fs::write(root.join("etc-skein/skein.yaml"), &self.spec.config).expect("config");
        std::fs::write(root.join("etc-skein-admin/token"), &self.spec.token).expect("token");
        let (name, ip) = (self.name(ordinal), pod_ip(ordinal));
        let mount = |arg: &str| {
            arg.replace("$(POD_NAME)", &name)
                .replace("$(POD_IP)", &ip)
                .replace(
                    "/etc/skein-admin",
                    &root.join("etc-skein-admin").display().to_string(),
                )
                .replace(
                    "/etc/skein/",
                    &format!("{}/", root.join("etc-skein").display()),
                )
                .replace("/var/lib/skein", &root.join("data").display().to_string())
        };
        let binary = skein_tests::binary("skein").expect("binary");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.net.nodes[ordinal]])
            .arg(&binary)
            .args(self.spec.args.iter().map(|arg| mount(arg)))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOSTNAME", &name)
            // What the chart's providerSecret would hold.
            .env("UPSTREAM_KEY", "upstream-secret");
        for (variable, value) in &self.spec.env {
            let value = match value {
                Ok(value) => value.clone(),
                Err(field) if field == "metadata.name" => name.clone(),
                Err(field) if field == "status.podIP" => ip.clone(),
                Err(field) => panic!("unknown field {field}"),
            };
            command.env(variable, value);
        }
        command.env("SKEIN_LOG", "info,openraft=warn");
        if let Clock::Skewed(offset) = clock {
            command
                .env("LD_PRELOAD", faketime_library().expect("libfaketime"))
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        self.listed.insert(ordinal);
        self.publish_dns();
        self.procs[ordinal] = Some(Spawned::start(&mut command));
    }

    fn kill9(&mut self, ordinal: usize) {
        if let Some(mut process) = self.procs[ordinal].take() {
            process.kill9();
            self.note_panics(&process);
        }
    }

    fn terminate(&mut self, ordinal: usize) {
        if let Some(mut process) = self.procs[ordinal].take() {
            process.terminate(Duration::from_secs(40));
            self.note_panics(&process);
        }
    }

    fn note_panics(&mut self, process: &Spawned) {
        for line in process.output().lines() {
            if line.contains("panicked") {
                self.panics.push(line.to_owned());
            }
        }
    }

    fn signal(&self, ordinal: usize, signal: &str) {
        if let Some(process) = &self.procs[ordinal] {
            let status = run("kill", &[signal, &process.child.id().to_string()]);
            assert!(status.status.success());
        }
    }

    /// Scale down: the pod leaves DNS and its volume is kept, as a StatefulSet does.
    fn unlist(&mut self, ordinal: usize) {
        self.listed.remove(&ordinal);
        self.publish_dns();
    }

    fn running(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|i| self.procs[*i].is_some())
            .collect()
    }
}

fn faketime_library() -> Option<String> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|path| Path::new(path).exists())
    .map(str::to_owned)
}

fn admin(ordinal: usize) -> AdminClient<Channel> {
    AdminClient::new(
        Channel::from_shared(format!("http://{}:8081", pod_ip(ordinal)))
            .expect("uri")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .connect_lazy(),
    )
}

async fn status(token: &str, ordinal: usize) -> Option<ClusterStatusResponse> {
    admin(ordinal)
        .cluster_status(authorized(token, ClusterStatusRequest {}))
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// The leader every node in `nodes` agrees on, and the cluster ids they report.
async fn agreed_leader(token: &str, nodes: &[usize]) -> Option<(u64, BTreeSet<String>)> {
    let mut leaders = BTreeSet::new();
    let mut clusters = BTreeSet::new();
    for &ordinal in nodes {
        let status = status(token, ordinal).await?;
        leaders.insert(status.leader_id);
        clusters.insert(status.cluster_id);
    }
    let leader = *leaders.iter().next()?;
    (leaders.len() == 1 && leader != 0).then_some((leader, clusters))
}

/// Wait until `nodes` agree on one leader, one cluster, `members` members and the same
/// applied index; how long it took, or `None` past `timeout`.
async fn converge(
    token: &str,
    nodes: &[usize],
    members: usize,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let mut views = Vec::new();
        for &ordinal in nodes {
            views.push(status(token, ordinal).await);
        }
        let converged = views.iter().all(|view| {
            view.as_ref().is_some_and(|view| {
                let first = views[0].as_ref().expect("first");
                view.leader_id != 0
                    && view.leader_id == first.leader_id
                    && !view.cluster_id.is_empty()
                    && view.cluster_id == first.cluster_id
                    && view.members.len() == members
                    && view.applied_index == first.applied_index
            })
        });
        if converged {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Like [`converge`], under load: applied indexes within a few entries of each other.
async fn settle(
    token: &str,
    nodes: &[usize],
    members: usize,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let mut views = Vec::new();
        for &ordinal in nodes {
            views.push(status(token, ordinal).await);
        }
        let views: Vec<ClusterStatusResponse> = views.into_iter().flatten().collect();
        if views.len() == nodes.len() {
            let first = &views[0];
            let most = views
                .iter()
                .map(|view| view.applied_index)
                .max()
                .unwrap_or(0);
            let agreed = views.iter().all(|view| {
                view.leader_id != 0
                    && view.leader_id == first.leader_id
                    && !view.cluster_id.is_empty()
                    && view.cluster_id == first.cluster_id
                    && view.members.len() == members
                    && view.applied_index + 10 >= most
            });
            if agreed {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// What one stream of chat calls saw.
#[derive(Default)]
struct Calls {
    answered: AtomicU64,
    failed_healthy: AtomicU64,
    unknown: AtomicU64,
    /// Calls answered per wall-clock minute (the rate limiter's windows).
    per_minute: Mutex<std::collections::BTreeMap<u64, u64>>,
}

#[derive(Default)]
struct Load {
    /// The scenario's main key: no limits.
    calls: Calls,
    /// A key with an RPM limit, called faster than it allows.
    limited: Calls,
    /// A key with a small hard budget, called until it is spent.
    budgeted: Calls,
    writes_acked: Mutex<Vec<String>>,
    writes_failed: AtomicU64,
    stop: AtomicBool,
}

/// The RPM limit of the scenario's limited key, and the budget of its budgeted key.
const RPM_LIMIT: u64 = 30;
const BUDGET_NANOS: u64 = 300_000;

/// Chat calls with `secret` every `period` over the healthy nodes, until stopped (bounded: at
/// most 10 minutes). A refusal (429) is the limit or budget at work, not a failure.
async fn chat_loop(
    load: Arc<Load>,
    which: fn(&Load) -> &Calls,
    secret: String,
    period: Duration,
    healthy: Arc<Mutex<Vec<usize>>>,
    scenario: String,
) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let calls = which(&load);
    let mut turn = 0usize;
    let bound = 600_000 / period.as_millis().max(1) as u64;
    for _ in 0..bound {
        if load.stop.load(Ordering::Relaxed) {
            return;
        }
        let nodes = healthy.lock().expect("lock").clone();
        if nodes.is_empty() {
            tokio::time::sleep(period).await;
            continue;
        }
        let ordinal = nodes[turn % nodes.len()];
        turn += 1;
        let result = client
            .post(format!("http://{}:8080/v1/chat/completions", pod_ip(ordinal)))
            .bearer_auth(&secret)
            .json(&json!({"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await;
        // 0: no (whole) answer.
        let status = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.bytes().await.is_ok() {
                    status
                } else {
                    0
                }
            }
            Err(_) => 0,
        };
        let still_healthy = healthy.lock().expect("lock").contains(&ordinal);
        match status {
            200 => {
                calls.answered.fetch_add(1, Ordering::Relaxed);
                let minute = skein_types::now_ms() / 60_000;
                *calls
                    .per_minute
                    .lock()
                    .expect("lock")
                    .entry(minute)
                    .or_default() += 1;
            }
            429 => {}
            0 if still_healthy => {
                calls.failed_healthy.fetch_add(1, Ordering::Relaxed);
                calls.unknown.fetch_add(1, Ordering::Relaxed);
                eprintln!("{scenario}: no answer from node {ordinal}");
            }
            0 => {
                calls.unknown.fetch_add(1, Ordering::Relaxed);
            }
            other if still_healthy => {
                calls.failed_healthy.fetch_add(1, Ordering::Relaxed);
                eprintln!("{scenario}: node {ordinal} answered {other}");
            }
            _ => {}
        }
        tokio::time::sleep(period).await;
    }
}

/// The scenario's load: chat calls (about 40/s) with its main key, 20/s with its limited key
/// and 10/s with its budgeted key, over the healthy nodes, and admin writes (about 5/s,
/// teams named `<scenario>-<n>`), until stopped.
fn start_load(
    token: String,
    secrets: [String; 3],
    healthy: Arc<Mutex<Vec<usize>>>,
    scenario: String,
) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let [main, limited, budgeted] = secrets;
    let mut tasks = Vec::new();
    for (which, secret, period) in [
        (
            (|load: &Load| &load.calls) as fn(&Load) -> &Calls,
            main,
            Duration::from_millis(25),
        ),
        (
            |load: &Load| &load.limited,
            limited,
            Duration::from_millis(100),
        ),
        (
            |load: &Load| &load.budgeted,
            budgeted,
            Duration::from_millis(100),
        ),
    ] {
        tasks.push(tokio::spawn(chat_loop(
            load.clone(),
            which,
            secret,
            period,
            healthy.clone(),
            scenario.clone(),
        )));
    }
    let writes = {
        let load = load.clone();
        tokio::spawn(async move {
            let mut turn = 0usize;
            for n in 0..3_000 {
                if load.stop.load(Ordering::Relaxed) {
                    return;
                }
                let nodes = healthy.lock().expect("lock").clone();
                if !nodes.is_empty() {
                    let ordinal = nodes[turn % nodes.len()];
                    turn += 1;
                    let id = format!("{scenario}-{n}");
                    let written = admin(ordinal)
                        .create(authorized(
                            &token,
                            skein_tests::typed_write(
                                Kind::Team,
                                json!({"id": id, "name": "chaos"}),
                            ),
                        ))
                        .await;
                    match written {
                        Ok(_) => load.writes_acked.lock().expect("lock").push(id),
                        Err(_) => {
                            load.writes_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tasks.push(writes);
    (load, tasks)
}

struct Row {
    scenario: &'static str,
    answered: u64,
    failed_healthy: u64,
    writes_acked: usize,
    writes_lost: usize,
    spend_lost: u64,
    spend_double: u64,
    new_leader: Option<Duration>,
    converged: Option<Duration>,
    one_cluster: bool,
    /// The most calls the limited key got in one minute, over its limit.
    rpm_overshoot: f64,
    /// What the budgeted key spent, over its budget.
    budget_overshoot: f64,
}

impl Row {
    fn passed(&self) -> bool {
        self.failed_healthy == 0
            && self.writes_lost == 0
            && self.spend_lost == 0
            && self.spend_double == 0
            && self.converged.is_some()
            && self.one_cluster
    }
}

struct Chaos {
    pods: Pods,
    token: String,
    healthy: Arc<Mutex<Vec<usize>>>,
    rows: Vec<Row>,
}

impl Chaos {
    fn set_healthy(&self, nodes: &[usize]) {
        *self.healthy.lock().expect("lock") = nodes.to_vec();
    }

    async fn leader_ordinal(&self) -> usize {
        let running = self.pods.running();
        for _ in 0..100 {
            if let Some((leader, _)) = agreed_leader(&self.token, &running).await {
                return (leader - 1) as usize;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no agreed leader among {running:?}");
    }

    async fn new_key(&self, name: &str, rpm: Option<u64>) -> String {
        for _ in 0..50 {
            let running = self.pods.running();
            let created = admin(running[0])
                .create_key(authorized(
                    &self.token,
                    CreateKeyRequest {
                        id: name.to_owned(),
                        name: name.to_owned(),
                        rpm: rpm.unwrap_or(0),
                        ..Default::default()
                    },
                ))
                .await;
            if let Ok(created) = created {
                return created.into_inner().secret;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no key created for {name}");
    }

    /// An admin create, retried while the cluster settles.
    async fn write(&self, kind: Kind, value: Value) {
        for _ in 0..50 {
            let running = self.pods.running();
            let written = admin(running[0])
                .create(authorized(
                    &self.token,
                    skein_tests::typed_write(kind, value.clone()),
                ))
                .await;
            if written.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("could not write {value}");
    }

    /// Run `fault` under load and measure. `members`: the cluster's size after the fault.
    async fn scenario<F>(&mut self, name: &'static str, members: usize, fault: F)
    where
        F: AsyncFnOnce(&mut Chaos) -> Option<Duration>,
    {
        eprintln!("== {name}");
        // Ids must be plain: the scenario's number.
        let slug = format!("chaos-{}", self.rows.len() + 1);
        let secrets = [
            self.new_key(&slug, None).await,
            self.new_key(&format!("{slug}-rpm"), Some(RPM_LIMIT)).await,
            self.new_key(&format!("{slug}-budget"), None).await,
        ];
        self.write(
            Kind::Budget,
            json!({"id": format!("{slug}-budget"), "scope": {"kind": "key", "id": format!("{slug}-budget")}, "limit_nanos": BUDGET_NANOS, "period": "lifetime"}),
        )
        .await;
        self.set_healthy(&self.pods.running());
        let (load, tasks) = start_load(
            self.token.clone(),
            secrets,
            self.healthy.clone(),
            slug.clone(),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let new_leader = fault(self).await;
        // From the fault's end, under load: one leader, one cluster, every member, every
        // node's applied index close to the leader's.
        let settled = settle(
            &self.token,
            &self.pods.running(),
            members,
            Duration::from_secs(30),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        load.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        let running = self.pods.running();
        self.set_healthy(&running);
        // And once the load stops, exactly the same state everywhere.
        let converged = converge(&self.token, &running, members, Duration::from_secs(30))
            .await
            .and(settled);
        let one_cluster = agreed_leader(&self.token, &running)
            .await
            .is_some_and(|(_, clusters)| clusters.len() == 1);
        // Writes: every acknowledged one on every node.
        let acked = load.writes_acked.lock().expect("lock").clone();
        let mut lost = BTreeSet::new();
        for &ordinal in &running {
            for id in &acked {
                let found = admin(ordinal)
                    .get(authorized(
                        &self.token,
                        GetRequest {
                            kind: Kind::Team as i32,
                            id: id.clone(),
                            min_version: 0,
                        },
                    ))
                    .await
                    .is_ok();
                if !found {
                    lost.insert(id.clone());
                }
            }
        }
        // Spend: what the cluster recorded for the scenario's key, against what was answered
        // (calls with no answer may or may not have been served).
        let calls = &load.calls;
        let answered = calls.answered.load(Ordering::Relaxed);
        let unknown = calls.unknown.load(Ordering::Relaxed);
        let mut recorded = 0;
        for _ in 0..100 {
            recorded = usage(&self.token, running[0], &slug).await.0;
            if recorded >= answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let most_in_a_minute = load
            .limited
            .per_minute
            .lock()
            .expect("lock")
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        let budget_spent = usage(&self.token, running[0], &format!("{slug}-budget"))
            .await
            .1;
        let row = Row {
            scenario: name,
            answered,
            failed_healthy: calls.failed_healthy.load(Ordering::Relaxed)
                + load.limited.failed_healthy.load(Ordering::Relaxed)
                + load.budgeted.failed_healthy.load(Ordering::Relaxed),
            writes_acked: acked.len(),
            writes_lost: lost.len(),
            spend_lost: answered.saturating_sub(recorded),
            spend_double: recorded.saturating_sub(answered + unknown),
            new_leader,
            converged,
            one_cluster,
            rpm_overshoot: most_in_a_minute as f64 / RPM_LIMIT as f64,
            budget_overshoot: budget_spent as f64 / BUDGET_NANOS as f64,
        };
        eprintln!(
            "{name}: answered {answered}, failed on healthy {}, writes {}/{} lost, spend recorded {recorded} (unknown {unknown}), converged {:?}; limited key: {} answered, most in a minute {most_in_a_minute}; budgeted key: {} answered, spent {budget_spent} of {BUDGET_NANOS}",
            row.failed_healthy,
            row.writes_lost,
            row.writes_acked,
            row.converged,
            load.limited.answered.load(Ordering::Relaxed),
            load.budgeted.answered.load(Ordering::Relaxed),
        );
        self.rows.push(row);
    }
}

/// Requests and cost recorded for `key_id`.
async fn usage(token: &str, ordinal: usize, key_id: &str) -> (u64, u64) {
    admin(ordinal)
        .get_usage(authorized(
            token,
            UsageRequest {
                key_id: key_id.to_owned(),
                ..Default::default()
            },
        ))
        .await
        .map(|usage| {
            let rows = usage.into_inner().rows;
            (
                rows.iter().map(|row| row.requests).sum(),
                rows.iter().map(|row| row.cost_nanos).sum(),
            )
        })
        .unwrap_or((0, 0))
}

/// Wait until the nodes other than `gone` agree on a leader that is not `old`.
async fn time_to_new_leader(
    token: &str,
    others: &[usize],
    old: usize,
    since: Instant,
) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(30) {
        if let Some((leader, _)) = agreed_leader(token, others).await
            && leader != (old + 1) as u64
        {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn table(rows: &[Row]) -> String {
    let seconds = |value: Option<Duration>| match value {
        Some(value) => format!("{:.1} s", value.as_secs_f64()),
        None => "–".to_owned(),
    };
    let mut out = String::from(
        "| scenario | calls answered | failed on healthy nodes | admin writes acked / lost | spend lost / double-counted | RPM / budget overshoot | new leader in | converged in (from the fault's end) | one cluster |\n|---|---:|---:|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} / {} | {:.2}× / {:.2}× | {} | {} | {} |\n",
            row.scenario,
            row.answered,
            row.failed_healthy,
            row.writes_acked,
            row.writes_lost,
            row.spend_lost,
            row.spend_double,
            row.rpm_overshoot,
            row.budget_overshoot,
            seconds(row.new_leader),
            match row.converged {
                Some(_) => seconds(row.converged),
                None => "no".to_owned(),
            },
            if row.one_cluster { "yes" } else { "no" },
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_s_pods_survive_scaling_crashes_stalls_partitions_skew_and_restarts() {
    let Ok(spec_path) = std::env::var("SKEIN_CHAOS_SPEC") else {
        println!("skipped: no chart render (tests/chaos/run.sh runs this suite)");
        return;
    };
    let spec = Spec::load(Path::new(&spec_path));
    let Some(net) = Net::create(5) else {
        println!("skipped: cannot create network namespaces");
        return;
    };
    let mock = Spawned::start(
        Command::new("ip")
            .args(["netns", "exec", &net.bridge])
            .arg(skein_tests::binary("skein-mock").expect("mock binary"))
            .args(["--addr", &format!("{SUBNET}.1:{MOCK_PORT}")]),
    );
    let token = spec.token.clone();
    let mut chaos = Chaos {
        pods: Pods {
            spec,
            net,
            dir: tempfile::tempdir().expect("dir"),
            procs: (0..5).map(|_| None).collect(),
            listed: BTreeSet::new(),
            panics: Vec::new(),
        },
        token,
        healthy: Arc::new(Mutex::new(Vec::new())),
        rows: Vec::new(),
    };
    let _mock = mock;

    // replicaCount 1: pod 0 forms the cluster.
    chaos.pods.start(0, Clock::True);
    assert!(
        converge(&chaos.token, &[0], 1, Duration::from_secs(30))
            .await
            .is_some()
    );
    // A price, so that the budgeted keys spend.
    for model in ["alpha", "mock/m", "m"] {
        chaos
            .write(
                Kind::Price,
                json!({"model": model, "input_nanos_per_token": 1000, "output_nanos_per_token": 1000}),
            )
            .await;
    }

    chaos
        .scenario("scale 1 → 3", 3, async |chaos: &mut Chaos| {
            chaos.pods.start(1, Clock::True);
            chaos.pods.start(2, Clock::True);
            None
        })
        .await;
    chaos
        .scenario("scale 3 → 5", 5, async |chaos: &mut Chaos| {
            chaos.pods.start(3, Clock::True);
            chaos.pods.start(4, Clock::True);
            None
        })
        .await;
    chaos
        .scenario("scale 5 → 3", 3, async |chaos: &mut Chaos| {
            chaos.set_healthy(&[0, 1, 2]);
            for ordinal in [4usize, 3] {
                let removed = admin(0)
                    .remove_node(authorized(
                        &chaos.token,
                        NodeRequest {
                            id: ordinal as u64 + 1,
                        },
                    ))
                    .await;
                assert!(removed.is_ok(), "remove {ordinal}: {removed:?}");
                chaos.pods.terminate(ordinal);
                chaos.pods.unlist(ordinal);
            }
            None
        })
        .await;
    chaos
        .scenario("kill -9 of a follower", 3, async |chaos: &mut Chaos| {
            let leader = chaos.leader_ordinal().await;
            let follower = (0..3).find(|i| *i != leader).expect("follower");
            chaos.set_healthy(&(0..3).filter(|i| *i != follower).collect::<Vec<_>>());
            chaos.pods.kill9(follower);
            tokio::time::sleep(Duration::from_secs(2)).await;
            chaos.pods.start(follower, Clock::True);
            None
        })
        .await;
    chaos
        .scenario("kill -9 of the leader", 3, async |chaos: &mut Chaos| {
            let leader = chaos.leader_ordinal().await;
            let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
            chaos.set_healthy(&others);
            let since = Instant::now();
            chaos.pods.kill9(leader);
            let elected = time_to_new_leader(&chaos.token, &others, leader, since).await;
            chaos.pods.start(leader, Clock::True);
            elected
        })
        .await;
    chaos
        .scenario(
            "SIGSTOP of the leader for 5 s",
            3,
            async |chaos: &mut Chaos| {
                let leader = chaos.leader_ordinal().await;
                let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
                chaos.set_healthy(&others);
                let since = Instant::now();
                chaos.pods.signal(leader, "-STOP");
                let elected = time_to_new_leader(&chaos.token, &others, leader, since).await;
                let left = Duration::from_secs(5).saturating_sub(since.elapsed());
                tokio::time::sleep(left).await;
                chaos.pods.signal(leader, "-CONT");
                elected
            },
        )
        .await;
    chaos
        .scenario(
            "partition of a follower for 5 s",
            3,
            async |chaos: &mut Chaos| {
                let leader = chaos.leader_ordinal().await;
                let follower = (0..3).find(|i| *i != leader).expect("follower");
                chaos.set_healthy(&(0..3).filter(|i| *i != follower).collect::<Vec<_>>());
                chaos.pods.net.link(follower, false);
                tokio::time::sleep(Duration::from_secs(5)).await;
                chaos.pods.net.link(follower, true);
                None
            },
        )
        .await;
    chaos
        .scenario(
            "partition of the leader for 5 s",
            3,
            async |chaos: &mut Chaos| {
                let leader = chaos.leader_ordinal().await;
                let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
                chaos.set_healthy(&others);
                let since = Instant::now();
                chaos.pods.net.link(leader, false);
                let elected = time_to_new_leader(&chaos.token, &others, leader, since).await;
                let left = Duration::from_secs(5).saturating_sub(since.elapsed());
                tokio::time::sleep(left).await;
                chaos.pods.net.link(leader, true);
                elected
            },
        )
        .await;
    for (name, offset) in [
        ("clock of a follower +30 s", "+30s"),
        ("clock of a follower −30 s", "-30s"),
    ] {
        if faketime_library().is_none() {
            println!("skipped {name}: libfaketime is not installed");
            continue;
        }
        chaos
            .scenario(name, 3, async |chaos: &mut Chaos| {
                let leader = chaos.leader_ordinal().await;
                let follower = (0..3).find(|i| *i != leader).expect("follower");
                chaos.set_healthy(&(0..3).filter(|i| *i != follower).collect::<Vec<_>>());
                chaos.pods.terminate(follower);
                chaos.pods.start(follower, Clock::Skewed(offset));
                chaos.set_healthy(&[0, 1, 2]);
                tokio::time::sleep(Duration::from_secs(4)).await;
                chaos.set_healthy(&(0..3).filter(|i| *i != follower).collect::<Vec<_>>());
                chaos.pods.terminate(follower);
                chaos.pods.start(follower, Clock::True);
                None
            })
            .await;
    }
    chaos
        .scenario("rolling restart", 3, async |chaos: &mut Chaos| {
            for ordinal in (0..3).rev() {
                chaos.set_healthy(&(0..3).filter(|i| *i != ordinal).collect::<Vec<_>>());
                chaos.pods.terminate(ordinal);
                chaos.pods.start(ordinal, Clock::True);
                for _ in 0..100 {
                    let ready =
                        reqwest::get(format!("http://{}:8080/health/ready", pod_ip(ordinal)))
                            .await
                            .is_ok_and(|response| response.status() == 200);
                    if ready {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            None
        })
        .await;
    chaos
        .scenario("full restart", 3, async |chaos: &mut Chaos| {
            chaos.set_healthy(&[]);
            for ordinal in 0..3 {
                chaos.pods.kill9(ordinal);
            }
            for ordinal in 0..3 {
                chaos.pods.start(ordinal, Clock::True);
            }
            chaos.set_healthy(&[0, 1, 2]);
            None
        })
        .await;

    // replicaCount 0 → 3 (a new release): three pods with no data start at once, each listed
    // in DNS from the start.
    for ordinal in 0..3 {
        chaos.pods.kill9(ordinal);
        let _ = std::fs::remove_dir_all(chaos.pods.pod_dir(ordinal).join("data"));
    }
    let started = Instant::now();
    for ordinal in 0..3 {
        chaos.pods.listed.insert(ordinal);
    }
    chaos.pods.publish_dns();
    for ordinal in 0..3 {
        chaos.pods.spawn(ordinal, Clock::True);
    }
    for ordinal in 0..3 {
        if let Some(process) = &chaos.pods.procs[ordinal] {
            process.serving_url(Duration::from_secs(30));
        }
    }
    let converged = converge(&chaos.token, &[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .map(|_| started.elapsed());
    let one_cluster = agreed_leader(&chaos.token, &[0, 1, 2])
        .await
        .is_some_and(|(_, clusters)| clusters.len() == 1);
    chaos.rows.push(Row {
        scenario: "scale 0 → 3 (new release, no load)",
        answered: 0,
        failed_healthy: 0,
        writes_acked: 0,
        writes_lost: 0,
        spend_lost: 0,
        spend_double: 0,
        new_leader: None,
        converged,
        one_cluster,
        rpm_overshoot: 0.0,
        budget_overshoot: 0.0,
    });

    for ordinal in 0..5 {
        chaos.pods.terminate(ordinal);
    }
    let text = format!(
        "{}\nPanics in any node's log over the whole run: {}.\n",
        table(&chaos.rows),
        chaos.pods.panics.len()
    );
    println!("{text}");
    if let Ok(out) = std::env::var("SKEIN_CHAOS_OUT") {
        std::fs::write(out, &text).expect("write the table");
    }
    let failed: Vec<&str> = chaos
        .rows
        .iter()
        .filter(|row| !row.passed())
        .map(|row| row.scenario)
        .collect();
    assert!(
        failed.is_empty(),
        "scenarios that missed a target: {failed:?}\n{text}"
    );
}
