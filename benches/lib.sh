# Shared by the benchmark scripts (sourced, not run): the release binaries, a work directory,
# the processes started (stopped, and the directory removed, on exit), free ports, and waiting
# for a line in a log.
cargo build --release -p skein-node -p skein-mock -p skein-benches --bins
bin="${CARGO_TARGET_DIR:-target}/release"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_for_line() { # file, regex: prints the first match; waits up to 30 s
  for _ in $(seq 1 1500); do
    if grep -qE "$2" "$1" 2>/dev/null; then grep -oE "$2" "$1" | head -1; return 0; fi
    sleep 0.02
  done
  echo "timed out waiting for $2 in $1" >&2; cat "$1" >&2; return 1
}
