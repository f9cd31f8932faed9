#!/usr/bin/env bash
# Where a proxy's time goes, request by request, at one fixed rate. While nginx and Skein each
# carry an open-loop run (placed as in benches/run.sh), tcpdump captures the loopback packets,
# and benches/diag/phases.py splits every request that had the proxy to itself into
#   in        the client's request reaches the proxy -> the proxy's request leaves for the mock
#   upstream  -> the mock's last response packet
#   out       -> the proxy's last packet to the client
# It also reports the proxy's CPU time per request during the run (from /proc), and the load
# generator's own service latency p50/p99 over the same run (every request, from the client).
# And it counts the halts per request of each core (see benches/diag/README.md, "Halts").
# Usage: benches/diag/phases.sh [--rate R] [--unary] [--repeat N] [--duration S] [--halt-poll NS] [--kdamond-off]
# Needs: taskset, nginx and tcpdump (installed if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=500; mode=stream; repeat=3; duration=5; poll=""; kdamond_off=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift ;;
    --unary) mode=unary ;;
    --repeat) repeat=$2; shift ;;
    --duration) duration=$2; shift ;;
    --halt-poll) poll=$2; shift ;;
    --kdamond-off) kdamond_off=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v tcpdump >/dev/null || { apt-get update -qq && apt-get install -y -qq tcpdump; }

. benches/lib.sh
prepare_and_start
mock_port=${mock_url##*:}
request_body=$stream_body; [ "$mode" = unary ] && request_body=$body

mkdir -p benches/results
results="benches/results/phases-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
for round in $(seq 1 "$repeat"); do
  for target in nginx skein; do
    case $target in
      nginx) url=$nginx_url; pid=$nginx_worker ;;
      skein) url=$skein_url; pid=$skein_pid ;;
    esac
    port=${url##*:}
    tcpdump -i lo -n -tt --time-stamp-precision=nano -B 65536 -w "$work/$target.pcap" \
      "tcp port $port or tcp port $mock_port" 2> "$work/tcpdump.log" &
    capture=$!
    pids+=($capture)
    wait_for_line "$work/tcpdump.log" 'listening on' > /dev/null
    before=$(cpu_ticks "$pid")
    halts_before=$(halts_now)
    line=$(taskset -c 1 "$bin/skein-load" --url "$url/v1/chat/completions" --body "$request_body" \
      --rate "$rate" --duration-secs "$duration" --warmup-secs 0 --connections 64 --label "$target/$mode/$rate")
    after=$(cpu_ticks "$pid")
    halts_after=$(halts_now)
    kill -INT "$capture"; wait "$capture" 2>/dev/null || true
    sent=$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['ok'] + r['errors'])" "$line")
    cpu_us=$(python3 -c "print(round(($after - $before) / $hz * 1e6 / max($sent, 1), 1))")
    per_request=$(halts_per_request "$halts_before" "$halts_after" "$sent")
    tcpdump -r "$work/$target.pcap" -n -tt --time-stamp-precision=nano 2>/dev/null > "$work/$target.txt"
    python3 benches/diag/phases.py "$work/$target.txt" "$port" "$mock_port" "$target/$mode/$rate" "$cpu_us" "$line" "$per_request" \
      | tee -a "$results"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("\n| proxy | in p50 | upstream p50 | out p50 | total p50 | proxy CPU per request (µs) | client's service p50 | halts per request, core 0 / core 1 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for label in dict.fromkeys(row["label"] for row in rows):
    mine = [row for row in rows if row["label"] == label]
    median = lambda key: round(statistics.median(row[key] for row in mine)) if all(key in row for row in mine) else "–"
    halts = [row["halts_per_request"] for row in mine if "halts_per_request" in row]
    halts = " / ".join(f"{statistics.median(core):.2f}" for core in zip(*halts)) if halts else "–"
    print(f"| {label} | {median('in_p50_us')} | {median('upstream_p50_us')} | {median('out_p50_us')} | "
          f"{median('total_p50_us')} | {median('proxy_cpu_us_per_request')} | {median('client_service_p50_us')} | {halts} |")
PY
