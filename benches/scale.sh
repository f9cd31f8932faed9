#!/usr/bin/env bash
# The control plane as its state grows: a 3-node cluster (release build, Raft and gossip on,
# no pinning) filled with virtual keys by bulk creates, 100,000 teams imported after the first
# point, and at each size 16 concurrent `CreateKey` calls over gRPC (to node 1) while nodes 2
# and 3 proxy a trickle of requests (so every node flushes spend into Raft every second).
# For each point: write p50/p99 and writes/s, the nodes' RSS, and how long the state machines
# took to apply spend and config batches (skein_raft_apply_seconds, all three nodes).
# Then, at the largest size, a new node joins as a learner and is sent the snapshot (each node
# builds one and compacts its log first) while the leader proxies 200 req/s: the time until the
# learner has installed it and applied the rest of the log, and the leader's proxy p50/p99 during
# that window against an idle window just before. For that phase the leader (which sends the
# snapshot, the worst case) is the node measured, with core 0 to itself (as it would have its
# own machine) while every other process shares core 1: the figure is then what the learner's
# catch-up costs the other nodes through the cluster, not two cores shared by five processes.
# With --beside-leader, the mock and the load generator that measures the leader run on core 0
# beside it (the other nodes and the learner keep core 1): the leader's figures then show what
# the learner costs it, not what the learner's work on core 1 costs the mock and the client.
# Usage: benches/scale.sh [--levels 1000,10000,100000,1000000] [--teams 100000] [--writes 4000]
#                         [--beside-leader]
# Results: benches/results/scale-<timestamp>.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
levels=1000,10000,100000,1000000; teams=100000; writes=4000; beside=0
while [ $# -gt 0 ]; do
  case "$1" in
    --beside-leader) beside=1 ;;
    --levels) levels=$2; shift ;;
    --teams) teams=$2; shift ;;
    --writes) writes=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
. benches/lib.sh
token=bench-admin-token

start_mock
write_skein_config
grpc=($(free_port) $(free_port) $(free_port) $(free_port))
gossip=($(free_port) $(free_port) $(free_port) $(free_port))
voters="1=127.0.0.1:${grpc[0]},2=127.0.0.1:${grpc[1]},3=127.0.0.1:${grpc[2]}"
seeds="127.0.0.1:${gossip[0]},127.0.0.1:${gossip[1]},127.0.0.1:${gossip[2]}"
node_pids=(); urls=()
for i in 1 2 3; do
  SKEIN_LOG='warn,skein=info,skein::access=warn' "$bin/skein" serve --config "$work/skein.yaml" \
    --data-dir "$work/node$i" --http-addr 127.0.0.1:0 --grpc-addr "127.0.0.1:${grpc[$((i-1))]}" \
    --node-id "$i" --voters "$voters" --gossip-addr "127.0.0.1:${gossip[$((i-1))]}" \
    --gossip-seeds "$seeds" --log-format json --admin-token "$token" --raft-keep-logs 100 \
    > /dev/null 2> "$work/node$i.log" &
  pids+=($!); node_pids+=($!)
done
for i in 1 2 3; do
  urls+=("$(wait_for_line "$work/node$i.log" '"http":"http://127\.0\.0\.1:[0-9]+' | grep -oE 'http://127\.0\.0\.1:[0-9]+')")
done
secret=""
for _ in $(seq 1 200); do
  if out=$("$bin/skein" key create --id trickle --output json --token "$token" --endpoint "http://127.0.0.1:${grpc[0]}" 2>/dev/null); then
    secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' <<< "$out"); break
  fi
  sleep 0.1
done
[ -n "$secret" ] || { echo "could not create a key" >&2; exit 1; }
for i in 2 3; do
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $secret" -H 'content-type: application/json' -d "$body" "${urls[$((i-1))]}/v1/chat/completions")" = 200 ]; do sleep 0.05; done
  "$bin/skein-load" --url "${urls[$((i-1))]}/v1/chat/completions" --body "$body" --bearer "$secret" \
    --rate 50 --duration-secs 3600 --warmup-secs 0 --connections 4 --label trickle > /dev/null 2>&1 &
  pids+=($!)
done

mkdir -p benches/results
results="benches/results/scale-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
echo "{\"label\":\"setup\",\"commit\":\"$(git rev-parse --short HEAD)\",\"nproc\":$(nproc)}" > "$results"
"$bin/skein-scale" --endpoint "http://127.0.0.1:${grpc[0]}" --token "$token" --levels "$levels" \
  --teams "$teams" --writes "$writes" \
  --pid "${node_pids[0]}" --pid "${node_pids[1]}" --pid "${node_pids[2]}" \
  --metrics "http://127.0.0.1:${grpc[0]}/metrics" --metrics "http://127.0.0.1:${grpc[1]}/metrics" \
  --metrics "http://127.0.0.1:${grpc[2]}/metrics" | tee -a "$results"

# A learner joins at the largest size.
status_of() { "$bin/skein" cluster status --output json --token "$token" --endpoint "http://127.0.0.1:$1" 2>/dev/null || true; }
for i in 0 1 2; do
  "$bin/skein" cluster snapshot --output json --token "$token" --endpoint "http://127.0.0.1:${grpc[$i]}" > /dev/null
done
# The node measured is the leader: it sends the snapshot, the worst case for its own proxy.
leader=$(status_of "${grpc[0]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
measured=$((leader - 1))
for pid in "${pids[@]}"; do taskset -apc 1 "$pid" > /dev/null 2>&1 || true; done
taskset -apc 0 "${node_pids[$measured]}" > /dev/null
client_core=1
if [ "$beside" = 1 ]; then
  taskset -apc 0 "$mock_pid" > /dev/null
  client_core=0
fi
proxy_load() { # label secs
  taskset -c "$client_core" "$bin/skein-load" --url "${urls[$measured]}/v1/chat/completions" --body "$body" --bearer "$secret" \
    --rate 200 --duration-secs "$2" --warmup-secs 0 --connections 8 --label "$1"
}
proxy_load proxy/idle 10 | tee -a "$results"
leader_applied=$(status_of "${grpc[0]}" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(max(m["applied_index"] or 0 for m in s["members"]))')
proxy_load proxy/learner-joining 20 > "$work/joining.json" &
load_pid=$!; pids+=($load_pid)
joined=$(date +%s.%N)
SKEIN_LOG='warn,skein=info,skein::access=warn' taskset -c 1 "$bin/skein" serve --config "$work/skein.yaml" \
  --data-dir "$work/node4" --http-addr 127.0.0.1:0 --grpc-addr "127.0.0.1:${grpc[3]}" \
  --node-id 4 --voters "$voters" --peers "127.0.0.1:${grpc[0]}" --gossip-addr "127.0.0.1:${gossip[3]}" \
  --gossip-seeds "$seeds" --log-format json --admin-token "$token" > /dev/null 2> "$work/node4.log" &
pids+=($!); learner_pid=$!
caught_up=""
for _ in $(seq 1 1200); do
  line=$(status_of "${grpc[3]}" | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
me = [m for m in s["members"] if m["id"] == 4]
if me and (me[0]["snapshot_index"] or 0) > 0 and (me[0]["applied_index"] or 0) >= int(sys.argv[1]):
    print(me[0]["snapshot_index"], me[0]["applied_index"])
' "$leader_applied")
  if [ -n "$line" ]; then caught_up=$(python3 -c "import sys; print(round($(date +%s.%N) - $joined, 2))"); break; fi
  sleep 0.1
done
wait "$load_pid" || true
cat "$work/joining.json" | tee -a "$results"
learner_rss=$(awk '/VmRSS/ {print $2}' "/proc/$learner_pid/status")
echo "{\"label\":\"learner\",\"beside_leader\":$beside,\"proxy_measured_on_leader\":$leader,\"keys_approx\":\"${levels##*,}\",\"caught_up_secs\":${caught_up:-null},\"snapshot_and_applied\":\"${line:-}\",\"leader_applied_at_join\":$leader_applied,\"learner_rss_kib\":${learner_rss:-0}}" | tee -a "$results"

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"scale"' in line]
print("| keys | teams | write p50 ms | write p99 ms | writes/s | errors | spend apply p99 ≤ ms (max ≤) | config apply p99 ≤ ms | RSS MiB (nodes) | RSS B/key |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
for r in rows:
    w, a = r["write"], r["apply"]
    spend = a.get("spend", {}); config = a.get("config", {})
    print(f"| {r['keys']:,} | {r['teams']:,} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | {w['writes_per_s']:.0f} | {w['errors']} | "
          f"{spend.get('p99_at_most_ms')} ({spend.get('max_at_most_ms')}) | {config.get('p99_at_most_ms')} | "
          f"{' / '.join(f'{m:.0f}' for m in r['rss_mib'])} | {r['rss_bytes_per_key']:.0f} |")
lines = [json.loads(line) for line in open(sys.argv[1])]
proxy = {r["label"]: r for r in lines if r.get("label", "").startswith("proxy/")}
learner = [r for r in lines if r.get("label") == "learner"]
if learner:
    l = learner[0]
    print(f"\nlearner caught up in {l['caught_up_secs']} s (snapshot and applied index {l['snapshot_and_applied']}; its RSS {l['learner_rss_kib'] / 1024:.0f} MiB)")
for label in ["proxy/idle", "proxy/learner-joining"]:
    r = proxy.get(label)
    if r:
        print(f"{label}: p50 {r['service']['p50_us']:.0f} µs, p99 {r['service']['p99_us']:.0f} µs, errors {r['errors']}, achieved {r['achieved_rps']:.0f} req/s")
PY
echo "results: $results"
