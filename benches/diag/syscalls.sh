#!/usr/bin/env bash
# System calls, context switches and CPU time per request of two or more Skein builds, counted
# by perf's tracepoints (cheap enough not to change what they count) while a fixed open-loop
# load runs: what instruction counts do not see, and what costs most on a mostly idle core,
# where every wake-up is paid alone. Placed as in benches/run.sh (Skein on core 0, the mock and
# the load generator on core 1), one worker thread each; the builds take turns, in an order
# that alternates by round.
# Usage: benches/diag/syscalls.sh ROUNDS RATE MODE SECONDS BINARY...   (MODE: unary or stream)
#   e.g. benches/diag/syscalls.sh 3 500 unary 10 /tmp/skein-before target/release/skein
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 5 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
rounds=$1; rate=$2; mode=$3; seconds=$4; shift 4
command -v perf > /dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }
. benches/lib.sh > /dev/null
start_mock
request_body=$body; [ "$mode" = stream ] && request_body=$stream_body
binaries=("$@")
for index in "${!binaries[@]}"; do start_skein "$(realpath "${binaries[$index]}")" "b$index"; done
events='raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_accept4,context-switches,task-clock'
echo "| round | build | requests | syscalls | epoll_wait | futex | accept4 | context switches | CPU µs | p50 µs |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$rounds"); do
  order=("${!binaries[@]}")
  if [ $((round % 2)) = 0 ]; then mapfile -t order < <(printf '%s\n' "${order[@]}" | tac); fi
  for index in "${order[@]}"; do
    pid_var=b${index}_pid; url_var=b${index}_url
    taskset -c 1 "$bin/skein-load" --body "$request_body" --rate "$rate" --duration-secs 1 \
      --warmup-secs 0 --connections 64 --url "${!url_var}/v1/chat/completions" > /dev/null
    perf stat -x, -e "$events" -p "${!pid_var}" -o "$work/perf.txt" &
    counter=$!
    taskset -c 1 "$bin/skein-load" --body "$request_body" --rate "$rate" --duration-secs "$seconds" \
      --warmup-secs 0 --connections 64 --url "${!url_var}/v1/chat/completions" | grep '^{' > "$work/load.json"
    kill -INT "$counter"; wait "$counter" 2>/dev/null || true
    python3 - "$round" "${binaries[$index]}" "$work/perf.txt" "$work/load.json" <<'PY'
import json, sys
load = json.loads(open(sys.argv[4]).read().splitlines()[-1])
requests = load["ok"]
counts = {}
for line in open(sys.argv[3]):
    fields = line.strip().split(",")
    if len(fields) > 2 and fields[0].replace(".", "").isdigit():
        counts[fields[2]] = float(fields[0])
per = lambda name: counts.get(name, 0) / requests
print(f"| {sys.argv[1]} | {sys.argv[2]} | {requests} | {per('raw_syscalls:sys_enter'):.2f} | "
      f"{per('syscalls:sys_enter_epoll_wait'):.2f} | {per('syscalls:sys_enter_futex'):.3f} | "
      f"{per('syscalls:sys_enter_accept4'):.3f} | {per('context-switches'):.2f} | "
      f"{per('task-clock') * 1000:.1f} | {load['latency']['p50_us']} |")
PY
  done
done
