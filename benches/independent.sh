#!/usr/bin/env bash
# An independent benchmark, with the tools and setup a new user would pick, beside run.sh:
# - the upstream: nginx with its Lua module answering a fixed 0.9 KB chat completion (not
#   skein-mock), one worker on core 1, `access_log off`;
# - the proxies on core 0: nginx (one worker, keepalive upstream, `access_log off`) and Skein
#   as `skein serve` runs by default (gossip and Raft on; access log off with SKEIN_LOG=warn),
#   and, to tell what gossip costs, Skein with `--gossip-addr off`; and the floor of Skein's
#   stack (`skein-floor`: hyper and tokio forwarding bodies, no policy), to tell what part of
#   the gap to nginx is the stack's and what part Skein's own;
# - the load, on core 1 with the upstream: `wrk -t2 -c64` (closed loop: max req/s) and
#   `oha -q RATE -c 64 --latency-correction` (open loop: p50 and p99 at RATE);
# - every repeat runs each target once, in turn, in one sitting.
# Prints the medians and the ratios to nginx (req/s, and latency added over calling the
# upstream directly), and keeps every figure in benches/results/independent-<time>.jsonl.
# Usage: benches/independent.sh [REPEATS] [RATE] [SECONDS]   (defaults: 3, 2000, 10; as root:
# installs nginx-light, libnginx-mod-http-lua and wrk, and builds oha into ~/.cache/skein/tools)
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}; rate=${2:-2000}; seconds=${3:-10}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/share/nginx/modules/ngx_http_lua_module.so ] || need+=(libnginx-mod-http-lua)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; fi
tools="$HOME/.cache/skein/tools"
if [ ! -x "$tools/bin/oha" ]; then
  cargo install --quiet --locked oha --version 1.16.0 --root "$tools"
fi
oha="$tools/bin/oha"

. benches/lib.sh > /dev/null
answer='{"id":"chatcmpl-independent","object":"chat.completion","created":1700000000,"model":"bench","system_fingerprint":"fp_independent","choices":[{"index":0,"message":{"role":"assistant","content":"This is a fixed answer from the upstream, long enough to stand for a short reply of a model: about one hundred and fifty words of text would be usual, so here is some more of it, sentence after sentence, until the whole body is near nine hundred bytes. The proxy passes it through as it is, and counts the usage below.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":75,"total_tokens":87,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default"}'

# The upstream: nginx + Lua on core 1.
upstream_port=$(free_port)
mkdir -p "$work/upstream/logs"
cat > "$work/upstream/nginx.conf" <<NGINX
load_module /usr/share/nginx/modules/ndk_http_module.so;
load_module /usr/share/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
pid $work/upstream/nginx.pid;
error_log $work/upstream/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/upstream/body;
  server {
    listen 127.0.0.1:$upstream_port backlog=4096;
    location / {
      default_type application/json;
      content_by_lua_block {
        ngx.req.read_body()
        ngx.print([[$answer]])
      }
    }
  }
}
NGINX
taskset -c 1 nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" &
pids+=($!)
mock_url="http://127.0.0.1:$upstream_port"
for _ in $(seq 1 500); do curl -sf -o /dev/null -X POST "$mock_url/v1/chat/completions" && break; sleep 0.02; done
[ "$(curl -s -X POST "$mock_url/v1/chat/completions" | wc -c)" -gt 800 ] || { echo "the Lua upstream does not answer" >&2; exit 1; }

start_nginx
write_skein_config
declare -A http_port
for name in skein skein_nogossip; do
  extra=(--gossip-addr "127.0.0.1:$(free_port)")
  [ "$name" = skein_nogossip ] && extra=(--gossip-addr off)
  http_port[$name]=$(free_port)
  SKEIN_LOG=warn taskset -c 0 "$bin/skein" serve --config "$work/skein.yaml" --data-dir "$work/data-$name" \
    --http-addr "127.0.0.1:${http_port[$name]}" --grpc-addr 127.0.0.1:0 "${extra[@]}" > "$work/$name.log" 2>&1 &
  pids+=($!)
done
# The floor of Skein's HTTP stack (hyper and tokio, nothing else: see benches/src/bin/skein_floor.rs).
taskset -c 0 "$bin/skein-floor" --listen 127.0.0.1:0 --upstream "$mock_url" > "$work/floor.log" 2>&1 &
pids+=($!)
floor_url=$(wait_for_line "$work/floor.log" 'http://127\.0\.0\.1:[0-9]+')
skein_url="http://127.0.0.1:${http_port[skein]}"
nogossip_url="http://127.0.0.1:${http_port[skein_nogossip]}"
for url in "$skein_url" "$nogossip_url"; do
  for _ in $(seq 1 500); do curl -sf -o /dev/null "$url/health/ready" && break; sleep 0.02; done
  curl -sf -o /dev/null "$url/health/ready" || { echo "Skein at $url is not ready" >&2; exit 1; }
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello world"}]}'
LUA
request='{"model":"bench","messages":[{"role":"user","content":"hello world"}]}'
mkdir -p benches/results
results="benches/results/independent-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
echo "{\"setup\": {\"commit\": \"$(git rev-parse --short HEAD)\", \"rate\": $rate, \"seconds\": $seconds, \"repeats\": $repeats, \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"}}" > "$results"
targets=("direct $mock_url" "nginx $nginx_url" "floor $floor_url" "skein $skein_url" "skein_nogossip $nogossip_url")
for repeat in $(seq 1 "$repeats"); do
  for entry in "${targets[@]}"; do
    label=${entry%% *}; url=${entry#* }/v1/chat/completions
    rps=$(taskset -c 1 wrk -t2 -c64 -d"${seconds}s" -s "$work/post.lua" "$url" | awk '/Requests\/sec/ {print $2}')
    taskset -c 1 "$oha" -q "$rate" -c 64 --latency-correction -z "${seconds}s" --no-tui --output-format json \
      -m POST -H 'content-type: application/json' -d "$request" "$url" > "$work/oha.json" 2> /dev/null
    python3 - "$repeat" "$label" "$rps" "$work/oha.json" >> "$results" <<'PY'
import json, sys
report = json.load(open(sys.argv[4]))
latency = report["latencyPercentiles"]
codes = report.get("statusCodeDistribution", {})
print(json.dumps({"repeat": int(sys.argv[1]), "label": sys.argv[2], "wrk_rps": float(sys.argv[3]),
                  "oha_p50_us": latency["p50"] * 1e6, "oha_p99_us": latency["p99"] * 1e6,
                  "oha_ok": codes.get("200", 0), "oha_total": sum(codes.values())}))
PY
    echo "repeat $repeat $label: $rps req/s" >&2
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"label"' in line]
labels = ["direct", "nginx", "floor", "skein", "skein_nogossip"]
med = {label: {key: statistics.median(row[key] for row in rows if row["label"] == label)
               for key in ("wrk_rps", "oha_p50_us", "oha_p99_us")} for label in labels}
nginx = med["nginx"]; direct = med["direct"]
print("| target | wrk -t2 -c64 req/s | vs nginx | oha p50 / p99 (µs) | added p50 / p99 over direct (µs) | added p50 vs nginx |")
print("|---|---:|---:|---|---|---:|")
for label in labels:
    m = med[label]
    added50 = m["oha_p50_us"] - direct["oha_p50_us"]; added99 = m["oha_p99_us"] - direct["oha_p99_us"]
    nginx50 = nginx["oha_p50_us"] - direct["oha_p50_us"]
    ratio = f"{added50 / nginx50:.2f}×" if label not in ("direct", "nginx") and nginx50 > 0 else "–"
    print(f"| {label} | {m['wrk_rps']:.0f} | {m['wrk_rps'] / nginx['wrk_rps']:.2f}× | {m['oha_p50_us']:.0f} / {m['oha_p99_us']:.0f} | {added50:.0f} / {added99:.0f} | {ratio} |")
PY
echo "results: $results"
