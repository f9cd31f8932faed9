#!/usr/bin/env bash
# Benchmarks Skein against calling the mock provider directly and against nginx as a plain
# reverse proxy, in one run on this machine:
#   - the proxy under test (Skein with one worker thread, or nginx with one worker) is pinned
#     to core 0; the mock provider and the load generator share core 1;
#   - open-loop runs at 500, 2000 and 5000 req/s, non-streaming and streaming, with latency
#     measured from each request's scheduled send time and the proxy's CPU time per request;
#     in each, the three targets (direct, nginx, Skein) take turns of 1 s (--slice-secs) until
#     each has had 10 s measured, so that what the machine does over time falls on all three
#     alike (benches/README.md, "How it runs"); then max requests/s (closed loop, 64
#     connections);
#   - Skein's RSS idle, and its peak up to 5000 req/s;
#   - for every open-loop run, the halts per request of each core (a halted vCPU of a VM waits
#     for the hypervisor to wake it).
# Usage: benches/run.sh [--quick] [--repeat N] [--slice-secs S] [--control] [--halt-poll NS]
#                       [--kdamond-off]
# (results: benches/results/<timestamp>.jsonl and Markdown tables; with --repeat, every run is
# repeated N times and the tables show the median of each figure, which steadies the noise of
# a shared VM; --slice-secs 0 runs the three one after the other instead, each warmed up then
# measured for 10 s, as run.sh did before the interleaving; --control adds a second, identical
# nginx as a fourth target (an A/A control, judged against the first by the same rule as
# Skein, which shows how often the method alone fails a proxy as fast as nginx); with
# --halt-poll, an idle vCPU polls up to NS ns before halting, for this run only: see
# benches/README.md, "Halts")
# Needs: taskset (util-linux) and nginx (Debian nginx-light; installed if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10; warmup=2; repeat=1; slice=1; poll=""; kdamond_off=""; control=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) duration=3; warmup=1 ;;
    --repeat) repeat=$2; shift ;;
    --slice-secs) slice=$(printf %g "$2"); shift ;;
    --halt-poll) poll=$2; shift ;;
    --kdamond-off) kdamond_off=1 ;;
    --control) control=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

. benches/lib.sh
prepare_and_start

rss_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }
# Sets url and proxy_pid (empty for direct) of a target.
select_target() {
  case $1 in
    direct) url=$mock_url; proxy_pid="" ;;
    nginx) url=$nginx_url; proxy_pid=$nginx_worker ;;
    skein) url=$skein_url; proxy_pid=$skein_pid ;;
  esac
}

mkdir -p benches/results
results="benches/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
load() { # label url body rate
  taskset -c 1 "$bin/skein-load" --url "$2/v1/chat/completions" --body "$3" --rate "$4" \
    --duration-secs "$duration" --warmup-secs "$warmup" --connections 64 --label "$1"
}

setup_record "\"slice_secs\":$slice,\"control\":${control:-0}" | tee -a "$results"
echo "{\"label\":\"rss_idle\",\"skein_rss_kib\":$(rss_kib $skein_pid VmRSS)}" | tee -a "$results"
for round in $(seq 1 "$repeat"); do
  for rate in 500 2000 5000; do
    for mode in unary stream; do
      request_body=$body; [ "$mode" = stream ] && request_body=$stream_body
      # The control goes between nginx and Skein: the turn order alternates (d n c s, d s c n),
      # so nginx and Skein still trade places from cycle to cycle.
      control_target=()
      if [ -n "$control" ]; then
        control_target=(--url "$control_url/v1/chat/completions" --label "control/$mode/$rate" --cpu-pid "$control_worker")
      fi
      # The targets (three, or four with the control) take turns of $slice s until each has had
      # $duration s measured; skein-load reports each one's latencies, its proxy's CPU time per
      # request (over the measured turns) and the halts per request of core 0 (the proxy) and
      # core 1 (the mock and the load generator).
      taskset -c 1 "$bin/skein-load" --body "$request_body" --rate "$rate" --duration-secs "$duration" \
        --warmup-secs "$warmup" --slice-secs "$slice" --connections 64 --halts \
        --url "$mock_url/v1/chat/completions" --label "direct/$mode/$rate" --cpu-pid 0 \
        --url "$nginx_url/v1/chat/completions" --label "nginx/$mode/$rate" --cpu-pid "$nginx_worker" \
        "${control_target[@]}" \
        --url "$skein_url/v1/chat/completions" --label "skein/$mode/$rate" --cpu-pid "$skein_pid" | tee -a "$results"
    done
  done
done
echo "{\"label\":\"rss_peak_to_5000\",\"skein_rss_kib\":$(rss_kib $skein_pid VmHWM)}" | tee -a "$results"

for round in $(seq 1 "$repeat"); do
  for target in direct nginx skein; do
    select_target "$target"
    before=0; [ -n "$proxy_pid" ] && before=$(cpu_ticks "$proxy_pid")
    started=$(date +%s.%N)
    line=$(load "$target/max" "$url" "$body" 0)
    finished=$(date +%s.%N)
    cpu="null"
    if [ -n "$proxy_pid" ]; then
      after=$(cpu_ticks "$proxy_pid")
      cpu=$(python3 -c "print(round(($after-$before)/$hz/($finished-$started), 3))")
    fi
    echo "${line%\}},\"proxy_cpu_cores\":$cpu}" | tee -a "$results"
  done
done
echo "{\"label\":\"rss_after_max\",\"skein_rss_kib\":$(rss_kib $skein_pid VmRSS)}" | tee -a "$results"

python3 benches/summarize.py "$results"
