#!/usr/bin/env bash
# Instructions per request: Skein (one worker thread) runs under callgrind with instrumentation
# off, the mock outside it; for each request kind, instrumentation is switched on only while
# REQUESTS requests run at 100 req/s, and the dump's instruction total is divided by them.
# Repeatable to the per mille, unlike timings on this VM: the way to compare two builds exactly.
# Usage: benches/diag/instructions.sh [REQUESTS] [BINARY]   (defaults: 500, this tree's release build)
# Kinds: chat, chat streamed, Responses (store: false), Responses stored, Responses streamed,
# and the chat request through the floor of the stack (skein-floor) for comparison.
# The dumps stay in benches/results/callgrind/ (callgrind_annotate FILE shows where they went).
set -euo pipefail
cd "$(dirname "$0")/../.."
requests=${1:-500}
. benches/lib.sh > /dev/null
binary=${2:-$bin/skein}
command -v valgrind > /dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
start_mock
write_skein_config
SKEIN_LOG='warn,skein=info,skein::access=warn' taskset -c 0 valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$work/callgrind.out.%p" "$binary" serve --config "$work/skein.yaml" \
  --data-dir "$work/data" --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --gossip-addr off \
  --worker-threads 1 --log-format json > /dev/null 2> "$work/skein.log" &
pids+=($!)
skein_pid=$!
skein_url=$(wait_for_line "$work/skein.log" 'http://127\.0\.0\.1:[0-9]+')
out=benches/results/callgrind
mkdir -p "$out"
commit=$(git rev-parse --short HEAD)
chat='{"model":"bench","messages":[{"role":"user","content":"hello world"}]}'
chat_stream='{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello world"}]}'
unstored='{"model":"bench","store":false,"input":"hello world"}'
stored='{"model":"bench","input":"hello world"}'
responses_stream='{"model":"bench","stream":true,"store":false,"input":"hello world"}'
echo "| request | instructions per request |"
echo "|---|---:|"
run() { # label path body
  local seconds=$(( (requests + 99) / 100 ))
  # A warm-up outside the count: connections, caches, the first of everything.
  taskset -c 1 "$bin/skein-load" --rate 100 --duration-secs 1 --warmup-secs 0 --connections 4 --url "$target_url$2" --body "$3" > /dev/null
  callgrind_control -z "$target_pid" > /dev/null
  callgrind_control -i on "$target_pid" > /dev/null
  taskset -c 1 "$bin/skein-load" --rate 100 --duration-secs "$seconds" --warmup-secs 0 --connections 4 --url "$target_url$2" --body "$3" | grep "^{" > "$work/load.json"
  callgrind_control -i off "$target_pid" > /dev/null
  callgrind_control -d "$1" "$target_pid" > /dev/null
  local dump
  dump=$(ls -t "$work"/callgrind.out.*."$1"* 2>/dev/null | head -1 || true)
  [ -n "$dump" ] || dump=$(ls -t "$work"/callgrind.out.* | head -1)
  cp "$dump" "$out/$commit-$1.out"
  local total
  total=$(awk '/^totals:/ {print $2; exit}' "$dump")
  echo "| $1 | $(( total / (seconds * 100) )) |"
}
target_pid=$skein_pid; target_url=$skein_url
run chat /v1/chat/completions "$chat"
run chat_stream /v1/chat/completions "$chat_stream"
run responses /v1/responses "$unstored"
run responses_stored /v1/responses "$stored"
run responses_stream /v1/responses "$responses_stream"
# The floor of the stack (benches/src/bin/skein_floor.rs: hyper and tokio, no policy) for the
# same chat request: what part of Skein's count the stack takes.
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out.%p" \
  "$bin/skein-floor" --listen 127.0.0.1:0 --upstream "$mock_url" > "$work/floor.log" 2> "$work/floor.err" &
pids+=($!)
target_pid=$!
target_url=$(wait_for_line "$work/floor.log" 'http://127\.0\.0\.1:[0-9]+')
run floor_chat /v1/chat/completions "$chat"
echo "dumps: $out/$commit-*.out"
