#!/usr/bin/env bash
# When do the slow requests happen? Open-loop load at one rate (64 connections, placed as in
# benches/run.sh) to the mock directly, through nginx and through Skein, in interleaved rounds,
# with every request's due time and service time kept (skein-load --samples). benches/diag/tail.py
# then groups the slow requests into episodes (slow requests less than 5 ms apart) and checks
# whether they recur with the period of any of Skein's own timers (a 100 ms phase histogram).
# Usage: benches/diag/tail.sh [--mode unary|stream] [--rate R] [--duration S] [--rounds N]
#                        [--slow US] [--halt-poll NS] [--kdamond-off]
# Results: benches/results/tail-<timestamp>.jsonl (one summary per run; the samples themselves
# are not kept).
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=stream; rate=5000; duration=20; rounds=2; slow=500; poll=""; kdamond_off=""
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift ;;
    --rate) rate=$2; shift ;;
    --duration) duration=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --slow) slow=$2; shift ;;
    --halt-poll) poll=$2; shift ;;
    --kdamond-off) kdamond_off=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
. benches/lib.sh
prepare_and_start

mkdir -p benches/results
results="benches/results/tail-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
setup_record >> "$results"
request_body=$body; [ "$mode" = stream ] && request_body=$stream_body
for round in $(seq 1 "$rounds"); do
  for target in direct nginx skein; do
    case $target in
      direct) url=$mock_url ;;
      nginx) url=$nginx_url ;;
      skein) url=$skein_url ;;
    esac
    taskset -c 1 "$bin/skein-load" --url "$url/v1/chat/completions" --body "$request_body" \
      --rate "$rate" --connections 64 --duration-secs "$duration" --warmup-secs 2 \
      --label "$target/$mode/$rate" --samples "$work/samples" > "$work/report"
    python3 benches/diag/tail.py "$work/report" "$work/samples" "$slow" >> "$results"
  done
done
python3 benches/diag/tail.py --table "$results"
echo "results: $results"
