#!/usr/bin/env bash
# Benchmarks Skein against calling the mock provider directly and against nginx as a plain
# reverse proxy, in one run on this machine:
#   - the proxy under test (Skein with one worker thread, or nginx with one worker) is pinned
#     to core 0; the mock provider and the load generator share core 1;
#   - max requests/s (closed loop, 64 connections), then open-loop runs at 500, 2000 and
#     5000 req/s, non-streaming and streaming, with latency measured from each request's
#     scheduled send time;
#   - Skein's RSS idle, and its peak up to 5000 req/s.
# Usage: benches/run.sh [--quick] [--repeat N]   (results: benches/results/<timestamp>.jsonl
# and Markdown tables; with --repeat, every open-loop run is repeated N times, interleaved, and
# the tables show the median of each figure, which steadies the noise of a shared VM)
# Needs: taskset (util-linux) and nginx (Debian nginx-light; installed if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10; warmup=2; repeat=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) duration=3; warmup=1 ;;
    --repeat) repeat=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

command -v taskset >/dev/null || { echo "taskset is required (util-linux)"; exit 1; }
if ! command -v nginx >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nginx-light
fi

. benches/lib.sh

# The mock provider: one thread on core 1, no request recording, no latency.
taskset -c 1 "$bin/skein-mock" --addr 127.0.0.1:0 --threads 1 --no-record > "$work/mock.out" 2>&1 &
pids+=($!)
mock_url=$(wait_for_line "$work/mock.out" 'http://127\.0\.0\.1:[0-9]+')

# Skein: one worker thread on core 0.
cat > "$work/skein.yaml" <<YAML
version: 1
providers:
  - name: mock
    kind: openai_compatible
    base_url: $mock_url/v1
routes:
  - name: bench
    deployments: [{provider: mock, model: bench}]
YAML
SKEIN_LOG='warn,skein=info,skein::access=warn' taskset -c 0 "$bin/skein" serve --config "$work/skein.yaml" --data-dir "$work/data" \
  --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --gossip-addr off --worker-threads 1 --log-format json > /dev/null 2> "$work/skein.log" &
skein_pid=$!
pids+=($skein_pid)
skein_url=$(wait_for_line "$work/skein.log" 'http://127\.0\.0\.1:[0-9]+')

# nginx: one worker on core 0, keepalive to the mock, no buffering (SSE passes through).
nginx_port=$(free_port)
mock_hostport=${mock_url#http://}
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  upstream mock { server $mock_hostport; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port backlog=4096;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
taskset -c 0 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
nginx_url="http://127.0.0.1:$nginx_port"
for _ in $(seq 1 500); do curl -s -o /dev/null "$nginx_url/v1/models" && break; sleep 0.02; done

rss_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

mkdir -p benches/results
results="benches/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
body='{"model":"bench","messages":[{"role":"user","content":"hello world"}]}'
stream_body='{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello world"}]}'
load() { # label url body rate
  taskset -c 1 "$bin/skein-load" --url "$2/v1/chat/completions" --body "$3" --rate "$4" \
    --duration-secs "$duration" --warmup-secs "$warmup" --connections 64 --label "$1"
}

echo "{\"label\":\"rss_idle\",\"skein_rss_kib\":$(rss_kib $skein_pid VmRSS)}" | tee -a "$results"
for round in $(seq 1 "$repeat"); do
  for rate in 500 2000 5000; do
    for target in direct nginx skein; do
      case $target in direct) url=$mock_url ;; nginx) url=$nginx_url ;; skein) url=$skein_url ;; esac
      load "$target/unary/$rate" "$url" "$body" "$rate" | tee -a "$results"
      load "$target/stream/$rate" "$url" "$stream_body" "$rate" | tee -a "$results"
    done
  done
done
echo "{\"label\":\"rss_peak_to_5000\",\"skein_rss_kib\":$(rss_kib $skein_pid VmHWM)}" | tee -a "$results"

hz=$(getconf CLK_TCK)
for target in direct nginx skein; do
  case $target in direct) url=$mock_url ;; nginx) url=$nginx_url ;; skein) url=$skein_url ;; esac
  proxy_pid=""
  if [ "$target" = skein ]; then proxy_pid=$skein_pid; fi
  if [ "$target" = nginx ]; then proxy_pid=$(pgrep -P "$(cat "$work/nginx/nginx.pid")" | head -1); fi
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
echo "{\"label\":\"rss_after_max\",\"skein_rss_kib\":$(rss_kib $skein_pid VmRSS)}" | tee -a "$results"

python3 benches/summarize.py "$results"
