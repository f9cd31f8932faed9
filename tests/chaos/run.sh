#!/usr/bin/env bash
# The chaos suite: renders the Helm chart, then runs tests/tests/16_chaos.rs with the
# StatefulSet's arguments and environment, each replica in a network namespace of its own.
# Needs root (namespaces), `ip`, and libfaketime for the clock-skew scenarios (Debian's
# `faketime`). Prints the table of fault figures and writes it to
# ${SKEIN_CHAOS_OUT:-target/chaos-figures.md}.
set -euo pipefail
cd "$(dirname "$0")/../.."

helm="${SKEIN_HELM:-$HOME/.cache/skein/chart-tools/helm-v4.1.4/helm}"
python="${SKEIN_CHART_VENV:-$HOME/.cache/skein/chart-venv}/bin/python"
if [ ! -x "$helm" ] || [ ! -x "$python" ]; then
  # scripts/check-chart installs helm and the Python tools it needs.
  ./scripts/check-chart >/dev/null
fi
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
spec="$(cd "$target_dir" && pwd)/chaos-spec.json"
out="${SKEIN_CHAOS_OUT:-$(cd "$target_dir" && pwd)/chaos-figures.md}"
"$python" tests/chaos/render.py "$helm" helm/skein "$spec"

cargo build --workspace --bins
SKEIN_CHAOS_SPEC="$spec" SKEIN_CHAOS_OUT="$out" \
  cargo nextest run -p skein-tests --test 16_chaos --no-capture --no-fail-fast
echo "fault figures: $out"
