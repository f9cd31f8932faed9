#!/usr/bin/env bash
# The proxy's overhead with cluster-wide limiting on, against the single-node numbers:
#   single/plain    one node (no gossip), a virtual key without limits;
#   single/limited  the same node, a key with RPM, TPM and max-parallel limits (never reached);
#   cluster/limited node 1 of a 3-node cluster (Raft and gossip on, limit reports exchanged
#                   every 100 ms), a key with the same limits.
# The node under load runs one worker thread pinned to core 0; the mock provider, the load
# generator and the two other cluster nodes share core 1. Each figure is the median of the
# repeats, which are interleaved. For each: max requests/s (closed loop, 64 connections) with
# the node's CPU use, the service-time p50/p99 at 2000 req/s (open loop), and the p50 of
# requests sent one at a time (closed loop, one connection: no queueing).
# Usage: benches/cluster.sh [--repeat N] [--duration S]
# Results: benches/results/cluster-<timestamp>.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=3; duration=5
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=$2; shift ;;
    --duration) duration=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v taskset >/dev/null || { echo "taskset is required (util-linux)"; exit 1; }
. benches/lib.sh
token=bench-admin-token

start_mock
write_skein_config

serve() { # name core grpc_port extra-args... (in this shell, so its pid is kept for cleanup)
  local name=$1 core=$2 grpc=$3; shift 3
  SKEIN_LOG='warn,skein=info,skein::access=warn' taskset -c "$core" "$bin/skein" serve \
    --config "$work/skein.yaml" --data-dir "$work/$name" --http-addr 127.0.0.1:0 \
    --grpc-addr "127.0.0.1:$grpc" --worker-threads 1 --log-format json --admin-token "$token" "$@" \
    > /dev/null 2> "$work/$name.log" &
  pids+=($!)
}
url_of() { # name
  wait_for_line "$work/$1.log" '"http":"http://127\.0\.0\.1:[0-9]+' | grep -oE 'http://127\.0\.0\.1:[0-9]+'
}
create_key() { # grpc_port extra-args...
  local grpc=$1; shift
  for _ in $(seq 1 100); do
    if out=$("$bin/skein" key create --output json --token "$token" --endpoint "http://127.0.0.1:$grpc" "$@" 2>/dev/null); then
      python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' <<< "$out"; return 0
    fi
    sleep 0.1
  done
  echo "could not create a key" >&2; return 1
}
limits=(--rpm 1000000000 --tpm 1000000000000 --max-parallel 100000)

single_grpc=$(free_port)
serve single 0 "$single_grpc" --gossip-addr off
single_pid=${pids[${#pids[@]}-1]}
single_url=$(url_of single)
plain_key=$(create_key "$single_grpc")
limited_key=$(create_key "$single_grpc" "${limits[@]}")

grpc=($(free_port) $(free_port) $(free_port))
gossip=($(free_port) $(free_port) $(free_port))
voters="1=127.0.0.1:${grpc[0]},2=127.0.0.1:${grpc[1]},3=127.0.0.1:${grpc[2]}"
seeds="127.0.0.1:${gossip[0]},127.0.0.1:${gossip[1]},127.0.0.1:${gossip[2]}"
cluster_url=""
for i in 1 2 3; do
  core=1; [ "$i" = 1 ] && core=0
  serve "node$i" "$core" "${grpc[$((i-1))]}" --node-id "$i" --voters "$voters" \
    --gossip-addr "127.0.0.1:${gossip[$((i-1))]}" --gossip-seeds "$seeds"
  [ "$i" = 1 ] && node1_pid=${pids[${#pids[@]}-1]}
done
cluster_url=$(url_of node1)
url_of node2 > /dev/null
url_of node3 > /dev/null
cluster_key=$(create_key "${grpc[0]}" "${limits[@]}")
for _ in $(seq 1 200); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $cluster_key" -H 'content-type: application/json' -d "$body" "$cluster_url/v1/chat/completions")
  [ "$code" = 200 ] && break
  sleep 0.05
done

mkdir -p benches/results
results="benches/results/cluster-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
load() { # label url key rate [connections]
  taskset -c 1 "$bin/skein-load" --url "$2/v1/chat/completions" --body "$body" --bearer "$3" \
    --rate "$4" --duration-secs "$duration" --warmup-secs 1 --connections "${5:-64}" --label "$1"
}
max_with_cpu() { # label url key pid: the closed-loop run, with the node's CPU use
  local before after started finished line
  before=$(cpu_ticks "$4"); started=$(date +%s.%N)
  line=$(load "$1" "$2" "$3" 0)
  finished=$(date +%s.%N); after=$(cpu_ticks "$4")
  echo "${line%\}},\"proxy_cpu_cores\":$(python3 -c "print(round(($after-$before)/$hz/($finished-$started), 3))")}"
}
for round in $(seq 1 "$repeat"); do
  max_with_cpu single/plain/max "$single_url" "$plain_key" "$single_pid" | tee -a "$results"
  max_with_cpu single/limited/max "$single_url" "$limited_key" "$single_pid" | tee -a "$results"
  max_with_cpu cluster/limited/max "$cluster_url" "$cluster_key" "$node1_pid" | tee -a "$results"
  load single/plain/2000 "$single_url" "$plain_key" 2000 | tee -a "$results"
  load single/limited/2000 "$single_url" "$limited_key" 2000 | tee -a "$results"
  load cluster/limited/2000 "$cluster_url" "$cluster_key" 2000 | tee -a "$results"
  # One request at a time: the time each takes, without queueing.
  load single/plain/seq "$single_url" "$plain_key" 0 1 | tee -a "$results"
  load single/limited/seq "$single_url" "$limited_key" 0 1 | tee -a "$results"
  load cluster/limited/seq "$cluster_url" "$cluster_key" 0 1 | tee -a "$results"
done

python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def median(label, pick):
    values = [pick(r) for r in runs if r["label"] == label]
    return statistics.median(values) if values else None
print("| setup | max req/s | node CPU (cores) | req/s per node core | errors | p50 µs @2000 | p99 µs @2000 | p50 µs one at a time |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
base = None
for setup in ["single/plain", "single/limited", "cluster/limited"]:
    rps = median(setup + "/max", lambda r: r["achieved_rps"])
    cpu = median(setup + "/max", lambda r: r["proxy_cpu_cores"])
    per_core = median(setup + "/max", lambda r: r["achieved_rps"] / max(r["proxy_cpu_cores"], 0.001))
    errors = sum(r["errors"] for r in runs if r["label"].startswith(setup))
    p50 = median(setup + "/2000", lambda r: r["service"]["p50_us"])
    p99 = median(setup + "/2000", lambda r: r["service"]["p99_us"])
    seq = median(setup + "/seq", lambda r: r["service"]["p50_us"])
    if base is None:
        base = (rps, per_core, p50, seq)
    print(f"| {setup} | {rps:.0f} ({rps / base[0]:.0%}) | {cpu:.2f} | {per_core:.0f} ({per_core / base[1]:.0%}) | {errors} | {p50:.0f} ({p50 / base[2]:.2f}×) | {p99:.0f} | {seq:.0f} ({seq / base[3]:.2f}×) |")
PY
echo "results: $results"
