#!/usr/bin/env bash
# Gossip benchmark: bandwidth, messages and CPU per node (idle and under churn), and
# convergence time, for clusters of 3, 5 and 10 in-process nodes over loopback UDP.
# Usage: benches/gossip.sh [seconds per phase, default 10]
# Results: benches/results/gossip-<timestamp>.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
cargo build --release -p skein-benches --bin skein-gossip
bin="${CARGO_TARGET_DIR:-target}/release"
out="benches/results/gossip-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
for nodes in 3 5 10; do
  "$bin/skein-gossip" --nodes "$nodes" --duration-secs "$seconds" | tee -a "$out"
done
echo "results: $out"
