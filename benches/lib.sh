# Shared by the benchmark scripts (sourced, not run): the release binaries, a work directory,
# the processes started (stopped, and the directory removed, on exit), free ports, and waiting
# for a line in a log, halt counts, and the figures every script records per run.
command -v taskset >/dev/null || { echo "taskset is required (util-linux)" >&2; exit 1; }
cargo build --release -p skein-node -p skein-mock -p skein-benches --bins
bin="${CARGO_TARGET_DIR:-target}/release"

work=$(mktemp -d)
pids=()
halt_poll_param=/sys/module/haltpoll/parameters/guest_halt_poll_ns
halt_poll_before=""
housekeeping=()
# Puts the machine back first (kdamond's affinity, halt polling), so that a failure further
# down cannot leave it changed.
cleanup() {
  restore_housekeeping
  if [ -n "$halt_poll_before" ]; then echo "$halt_poll_before" > "$halt_poll_param" || true; fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work" || true
}
trap cleanup EXIT

# A process's CPU time so far, in ticks of 1/hz s.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# Halts so far of one core: entries into its cpuidle states other than polling. On a VM every
# halt is an exit to the hypervisor, and waking from it is slow; prints 0 without cpuidle.
halts() {
  local total=0 state
  for state in /sys/devices/system/cpu/cpu"$1"/cpuidle/state*; do
    [ -r "$state/usage" ] || continue
    [ "$(cat "$state/name")" = POLL ] && continue
    total=$((total + $(cat "$state/usage")))
  done
  echo "$total"
}
# The guest's halt polling (the cpuidle haltpoll driver's guest_halt_poll_ns): "off" when the
# guest has no such driver.
halt_poll() { if [ -r "$halt_poll_param" ]; then cat "$halt_poll_param"; else echo off; fi; }
# The first line of a result file: how the machine was set up for the run.
# Extra fields, if given, are appended as they are (e.g. '"slice_secs":1').
setup_record() {
  echo "{\"label\":\"setup\",\"guest_halt_poll_ns\":\"$(halt_poll)\",\"kdamond_kept_off_core0\":${#housekeeping[@]}${1:+,$1}}"
}

# Both cores' halts so far, for halts_per_request.
halts_now() { echo "$(halts 0) $(halts 1)"; }
# before after requests: halts per request of core 0 and core 1, as a JSON list.
halts_per_request() {
  python3 -c "import sys; b, a, n = sys.argv[1].split(), sys.argv[2].split(), max(float(sys.argv[3]), 1); print([round((int(y) - int(x)) / n, 2) for x, y in zip(b, a)])" "$1" "$2" "$3"
}
# Sets guest_halt_poll_ns for this run (put back on exit): an idle vCPU then polls up to that
# many ns before it halts, which takes the hypervisor's wake-up latency out of a measurement.
set_halt_poll() {
  [ -w "$halt_poll_param" ] || { echo "no writable $halt_poll_param: --halt-poll needs the haltpoll cpuidle driver, as root" >&2; exit 1; }
  halt_poll_before=$(cat "$halt_poll_param")
  echo "$1" > "$halt_poll_param"
}

# The kernel's DAMON thread (kdamond), when the machine runs one, wakes every half second for
# about 1 ms and every 5 s for about 20-30 ms, on whichever core is idle when it wakes; on the
# proxy's core 0 it stalls the proxy, while the direct baseline, which leaves core 0 idle, does
# not pay for it. --kdamond-off (a diagnostic, like --halt-poll; the targets are judged without
# it) keeps it on core 1 for the run and gives it back its affinity on exit. Its stalls then
# fall on the load generator's core, where the service time mostly does not see them.
clear_proxy_core() {
  local pid mask all
  all=$(printf '%x' $(( (1 << $(nproc)) - 1 )))
  for pid in $(pgrep '^kdamond' || true); do
    mask=$(taskset -p "$pid" 2>/dev/null | awk '{print $NF}') || continue
    # A mask of 2 is most likely left over from a run that was killed: give back all cores.
    [ "$mask" = 2 ] && mask=$all
    if taskset -p 2 "$pid" > /dev/null 2>&1; then housekeeping+=("$pid:$mask"); fi
  done
  [ ${#housekeeping[@]} -gt 0 ] || echo "--kdamond-off: no kdamond thread moved (none running, or not root)" >&2
}
restore_housekeeping() {
  local entry
  for entry in "${housekeeping[@]}"; do
    taskset -p "${entry#*:}" "${entry%%:*}" > /dev/null 2>&1 || true
  done
}

# What every comparison script does after parsing its options: set up the machine as asked
# (--halt-poll NS in $poll, --kdamond-off in $kdamond_off), then start the mock, Skein and nginx
# (and a second nginx, the A/A control, when $control is set).
prepare_and_start() {
  if [ -n "${poll:-}" ]; then set_halt_poll "$poll"; fi
  if [ -n "${kdamond_off:-}" ]; then clear_proxy_core; fi
  start_mock
  start_skein
  start_nginx
  if [ -n "${control:-}" ]; then start_nginx control; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_for_line() { # file, regex: prints the first match; waits up to 30 s
  for _ in $(seq 1 1500); do
    if grep -qE "$2" "$1" 2>/dev/null; then grep -oE "$2" "$1" | head -1; return 0; fi
    sleep 0.02
  done
  echo "timed out waiting for $2 in $1" >&2; cat "$1" >&2; return 1
}

# The mock provider: one thread on core 1, no request recording, no latency. Sets mock_url.
start_mock() {
  taskset -c 1 "$bin/skein-mock" --addr 127.0.0.1:0 --threads 1 --no-record > "$work/mock.out" 2>&1 &
  pids+=($!); mock_pid=$!
  mock_url=$(wait_for_line "$work/mock.out" 'http://127\.0\.0\.1:[0-9]+')
}

# Skein's config: one OpenAI-compatible provider (the mock) and one route, in $work/skein.yaml.
write_skein_config() {
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
}

# Skein with one worker thread on core 0 and the config above. Sets skein_pid and skein_url.
# `start_skein BINARY NAME` starts another build (benches/ab.sh) and sets ${NAME}_pid and
# ${NAME}_url.
start_skein() {
  local binary=${1:-$bin/skein} name=${2:-skein}
  write_skein_config
  SKEIN_LOG='warn,skein=info,skein::access=warn' taskset -c 0 "$binary" serve --config "$work/skein.yaml" --data-dir "$work/data-$name" \
    --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --gossip-addr off --worker-threads 1 --log-format json > /dev/null 2> "$work/$name.log" &
  pids+=($!)
  printf -v "${name}_pid" %s "$!"
  printf -v "${name}_url" %s "$(wait_for_line "$work/$name.log" 'http://127\.0\.0\.1:[0-9]+')"
}

# nginx: one worker on core 0, keepalive to the mock, no buffering (SSE passes through).
# Sets nginx_url, and nginx_worker (the worker's pid). `start_nginx control` starts a second,
# identical one (the A/A control of `run.sh --control`) and sets control_url and control_worker.
start_nginx() {
  local name=${1:-nginx} port mock_hostport url dir
  command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light; }
  port=$(free_port)
  mock_hostport=${mock_url#http://}
  dir="$work/$name"
  mkdir -p "$dir/logs"
  cat > "$dir/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  upstream mock { server $mock_hostport; keepalive 256; }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
  taskset -c 0 nginx -p "$dir" -c "$dir/nginx.conf" &
  pids+=($!)
  url="http://127.0.0.1:$port"
  for _ in $(seq 1 500); do curl -s -o /dev/null "$url/v1/models" && break; sleep 0.02; done
  printf -v "${name}_url" %s "$url"
  printf -v "${name}_worker" %s "$(pgrep -P "$(cat "$dir/nginx.pid")" | head -1)"
}

body='{"model":"bench","messages":[{"role":"user","content":"hello world"}]}'
stream_body='{"model":"bench","stream":true,"messages":[{"role":"user","content":"hello world"}]}'
