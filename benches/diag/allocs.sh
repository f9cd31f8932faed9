#!/usr/bin/env bash
# Heap allocations per request: uprobes on libc's malloc and realloc count every call the Skein
# process makes while an open-loop load of 1500 requests (500 req/s for 3 s) runs, after a
# 1 s warm-up. Placed as in benches/run.sh (Skein on core 0; the mock and the load generator
# on core 1).
# Usage: benches/diag/allocs.sh [--model NAME]   (default: the configured route `bench`; try
#        `mock/bench` for a provider/model name)
# Needs: root, taskset, and perf (installed if missing). Leaves no probes behind.
set -euo pipefail
cd "$(dirname "$0")/../.."

model=bench
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }

. benches/lib.sh
libc=$(ldd "$bin/skein" | awk '/libc\.so/ {print $3}')
start_mock
start_skein
removed=0
remove_probes() {
  [ "$removed" = 1 ] && return
  removed=1
  perf probe -q -d 'skein_allocs:*' 2>/dev/null || true
}
trap 'remove_probes; cleanup' EXIT
# A group of our own, so that no one else's probes are touched.
perf probe -q -x "$libc" 'skein_allocs:malloc=malloc'
perf probe -q -x "$libc" 'skein_allocs:realloc=realloc'

printf '| request | requests | malloc per request | realloc per request |\n|---|---:|---:|---:|\n'
for mode in unary stream; do
  stream=false; [ "$mode" = stream ] && stream=true
  request_body="{\"model\":\"$model\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"hello world\"}]}"
  load() {
    taskset -c 1 "$bin/skein-load" --url "$skein_url/v1/chat/completions" --body "$request_body" \
      --rate 500 --duration-secs "$1" --warmup-secs 0
  }
  load 1 > /dev/null
  perf stat -x, -e skein_allocs:malloc -e skein_allocs:realloc -p "$skein_pid" -o "$work/stat.txt" -- sleep 3.3 &
  counting=$!
  sleep 0.1
  line=$(load 3)
  wait "$counting"
  python3 - "$work/stat.txt" "$line" "$mode ($model)" <<'PY'
import json, sys
counts = {}
for row in open(sys.argv[1]):
    fields = row.strip().split(",")
    if len(fields) > 2 and fields[0].isdigit():
        counts[fields[2].split(":")[-1]] = int(fields[0])
result = json.loads(sys.argv[2])
served = result["ok"]
if result["errors"] or not served:
    sys.exit(f"{result['errors']} errors and {served} answers: fix the setup first")
print(f"| {sys.argv[3]} | {served} | {counts['malloc'] / served:.1f} | {counts['realloc'] / served:.1f} |")
PY
done
