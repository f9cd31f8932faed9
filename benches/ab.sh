#!/usr/bin/env bash
# A/B of two Skein builds, interleaved with nginx: at each point, one load generator run gives
# nginx and the two builds turns of 1 s (10 s measured each, after a 2 s warm-up), so that the
# machine's drift falls on all three alike. The order of the two builds alternates by round.
# Prints, per round and point, each proxy's added p50/p99 (µs, over calling the mock directly
# in the same run) and its CPU time per request (µs, from /proc). Placed as in benches/run.sh.
# Usage: benches/ab.sh ROUNDS "RATE:MODE ..." BINARY_A BINARY_B
#   e.g. benches/ab.sh 3 "5000:stream 5000:unary 500:stream" /tmp/skein-before target/release/skein
# (copy a build aside first: the script builds the current tree's release binaries too).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 4 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
rounds=$1; points=$2; binary_a=$(realpath "$3"); binary_b=$(realpath "$4")

. benches/lib.sh > /dev/null
start_mock
start_nginx
start_skein "$binary_a" A
start_skein "$binary_b" B

for round in $(seq 1 "$rounds"); do
  for point in $points; do
    rate=${point%%:*}; mode=${point##*:}
    request_body=$body; [ "$mode" = stream ] && request_body=$stream_body
    if [ $((round % 2)) = 1 ]; then first=A; second=B; else first=B; second=A; fi
    first_url=${first}_url; first_pid=${first}_pid; second_url=${second}_url; second_pid=${second}_pid
    taskset -c 1 "$bin/skein-load" --body "$request_body" --rate "$rate" --duration-secs 10 \
      --warmup-secs 2 --slice-secs 1 --connections 64 \
      --url "$mock_url/v1/chat/completions" --label direct --cpu-pid 0 \
      --url "$nginx_url/v1/chat/completions" --label nginx --cpu-pid "$nginx_worker" \
      --url "${!first_url}/v1/chat/completions" --label "$first" --cpu-pid "${!first_pid}" \
      --url "${!second_url}/v1/chat/completions" --label "$second" --cpu-pid "${!second_pid}" \
      > "$work/round.jsonl"
    python3 - "$round" "$point" "$work/round.jsonl" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[3]):
    line = line.strip()
    if line.startswith("{"):
        record = json.loads(line)
        runs[record["label"]] = record
direct = runs["direct"]["service"]
cells = [f"round {sys.argv[1]} {sys.argv[2]:>12}"]
for target in ("nginx", "A", "B"):
    service = runs[target]["service"]
    cells.append(
        f"{target}: +{service['p50_us'] - direct['p50_us']:.0f} / +{service['p99_us'] - direct['p99_us']:.0f} µs,"
        f" CPU {runs[target].get('proxy_cpu_us_per_request', 0):.1f} µs"
    )
print(" | ".join(cells), flush=True)
PY
  done
done
