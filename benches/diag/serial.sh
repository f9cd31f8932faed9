#!/usr/bin/env bash
# What one request costs in latency, with nothing else going on: one connection sends request
# after request (closed loop), to the mock directly, through nginx and through Skein, placed as
# in benches/run.sh, in interleaved rounds. No request waits behind another, so the added
# latency is each proxy's own pass in and pass out. With --halt-poll NS (as root, on a guest
# with the haltpoll cpuidle driver), an idle vCPU polls up to NS ns before it halts, which
# takes the hypervisor's wake-ups out of the figures (see benches/diag/README.md, "Halts").
# Usage: benches/diag/serial.sh [--rounds N] [--duration S] [--halt-poll NS] [--kdamond-off]
# Results: benches/results/serial-<timestamp>.jsonl and a Markdown table of medians.
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=5; duration=4; poll=""; kdamond_off=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift ;;
    --duration) duration=$2; shift ;;
    --halt-poll) poll=$2; shift ;;
    --kdamond-off) kdamond_off=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
. benches/lib.sh
prepare_and_start

mkdir -p benches/results
results="benches/results/serial-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
setup_record >> "$results"
for round in $(seq 1 "$rounds"); do
  for target in direct nginx skein; do
    case $target in
      direct) url=$mock_url ;;
      nginx) url=$nginx_url ;;
      skein) url=$skein_url ;;
    esac
    for mode in unary stream; do
      request_body=$body; [ "$mode" = stream ] && request_body=$stream_body
      taskset -c 1 "$bin/skein-load" --url "$url/v1/chat/completions" --body "$request_body" \
        --rate 0 --connections 1 --duration-secs "$duration" --warmup-secs 1 \
        --label "$target/$mode" >> "$results"
    done
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
setup = rows[0]
runs = {}
for row in rows[1:]:
    runs.setdefault(row["label"], []).append(row)
median = lambda label, key: statistics.median(row["service"][key] for row in runs[label])
print(f"\n{len(runs['direct/unary'])} rounds; guest_halt_poll_ns: {setup['guest_halt_poll_ns']}")
print("\n| mode | direct p50 / p99 | nginx p50 / p99 | skein p50 / p99 | added p50: nginx, skein | skein ÷ nginx |")
print("|---|---|---|---|---|---:|")
for mode in ("unary", "stream"):
    cells = {t: (median(f"{t}/{mode}", "p50_us"), median(f"{t}/{mode}", "p99_us")) for t in ("direct", "nginx", "skein")}
    added = {t: cells[t][0] - cells["direct"][0] for t in ("nginx", "skein")}
    ratio = f"{added['skein'] / added['nginx']:.2f}×" if added["nginx"] > 0 else "n/a"
    print(f"| {mode} | " + " | ".join(f"{cells[t][0]:.0f} / {cells[t][1]:.0f}" for t in ("direct", "nginx", "skein"))
          + f" | {added['nginx']:.0f}, {added['skein']:.0f} | {ratio} |")
PY
echo "results: $results"
