#!/usr/bin/env bash
# The Responses API's cost: one Skein (placed as in benches/run.sh), one OpenAI-compatible
# upstream (the mock, which speaks chat), and in each round one load generator run interleaving
# in 1 s turns: the mock directly, a chat request through Skein, and the same question as a
# Responses request through Skein (translated to chat and back), once with `store: false`
# (translation only) and once stored (translation plus the response kept in the node's store).
# Prints per round each target's added p50/p99 over calling the mock directly (µs) and Skein's
# CPU per request (µs), then the medians and the ratios to chat.
# Usage: benches/responses.sh [ROUNDS] [RATE] [MODE]   (defaults: 3 rounds, 2000 req/s, unary)
# Target (issue 17): Responses translated to an OpenAI chat upstream adds at most 10% over a
# chat request through the same path.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; rate=${2:-2000}; mode=${3:-unary}

. benches/lib.sh > /dev/null
start_mock
start_skein
stream=false; [ "$mode" = stream ] && stream=true
chat_body="{\"model\":\"bench\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"hello world\"}]}"
unstored="{\"model\":\"bench\",\"stream\":$stream,\"store\":false,\"input\":\"hello world\"}"
stored="{\"model\":\"bench\",\"stream\":$stream,\"input\":\"hello world\"}"
mkdir -p benches/results
results="benches/results/responses-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
echo "{\"setup\": {\"commit\": \"$(git rev-parse --short HEAD)\", \"rate\": $rate, \"mode\": \"$mode\", \"rounds\": $rounds}}" > "$results"
for round in $(seq 1 "$rounds"); do
  taskset -c 1 "$bin/skein-load" --rate "$rate" --duration-secs 10 --warmup-secs 2 --slice-secs 1 --connections 64 \
    --url "$mock_url/v1/chat/completions" --body "$chat_body" --label direct --cpu-pid 0 \
    --url "$skein_url/v1/chat/completions" --body "$chat_body" --label chat --cpu-pid "$skein_pid" \
    --url "$skein_url/v1/responses" --body "$unstored" --label responses --cpu-pid "$skein_pid" \
    --url "$skein_url/v1/responses" --body "$stored" --label responses_stored --cpu-pid "$skein_pid" \
    | grep '^{' | sed "s/^{/{\"round\": $round, /" >> "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"label"' in line]
by_round = {}
for row in rows:
    by_round.setdefault(row["round"], {})[row["label"]] = row
figures = {}
for runs in by_round.values():
    direct = runs["direct"]["service"]
    for label in ("chat", "responses", "responses_stored"):
        service = runs[label]["service"]
        errors = runs[label].get("errors", 0)
        figures.setdefault(label, []).append((service["p50_us"] - direct["p50_us"], service["p99_us"] - direct["p99_us"], runs[label].get("proxy_cpu_us_per_request", 0.0), errors))
print("| target | added p50 (µs) | added p99 (µs) | Skein CPU per request (µs) | CPU vs chat | errors |")
print("|---|---:|---:|---:|---:|---:|")
chat_cpu = statistics.median(cpu for _, _, cpu, _ in figures["chat"])
for label, values in figures.items():
    p50 = statistics.median(v[0] for v in values)
    p99 = statistics.median(v[1] for v in values)
    cpu = statistics.median(v[2] for v in values)
    errors = sum(v[3] for v in values)
    print(f"| {label} | {p50:.0f} | {p99:.0f} | {cpu:.1f} | {cpu / chat_cpu:.2f}× | {errors} |")
PY
echo "results: $results"
