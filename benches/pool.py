"""Pool the open-loop runs of several benches/run.sh result files (the same proxy, the machine
as it comes) and estimate each latency target from all their repeats together.

One run's verdict on a latency point rests on the median of a few 10 s repeats, and on this VM
a single repeat's p99 can double when the host stalls a vCPU for a few tens of milliseconds.
Pooling the repeats of many runs gives a steadier estimate of the ratio the target is about,
and a bootstrap interval shows how far sampling noise alone moves it.

Usage: python3 benches/pool.py benches/results/A.jsonl benches/results/B.jsonl ...
"""

import json
import random
import statistics
import sys

KEYS = {"p50": ("p50_us", 1.5), "p99": ("p99_us", 2.0)}
TARGETS = ("direct", "nginx", "skein")


def load(paths):
    """{(target, mode, rate): [service percentiles of each repeat]} over every file."""
    pooled = {}
    setups = set()
    for path in paths:
        with open(path) as lines:
            for line in lines:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                if record.get("label") == "setup":
                    if record.get("guest_halt_poll_ns") not in (None, "0", "off"):
                        sys.exit(f"{path} was run with halt polling; pool only runs with the machine as it comes")
                    # Runs from before the benchmark kept core 0 clear of kdamond have no such key.
                    setups.add(record.get("kdamond_kept_off_core0", "not recorded"))
                if record.get("mode") != "open":
                    continue
                target, mode, rate = record["label"].split("/")
                pooled.setdefault((target, mode, int(rate)), []).append(record["service"])
    if len(setups) > 1:
        sys.exit("these files mix runs with and without core 0 cleared of kdamond; pool them separately")
    return pooled


def ratio(direct, nginx, skein, key):
    """Skein's added latency over nginx's, from the medians of the given repeats."""
    d = statistics.median(run[key] for run in direct)
    n = statistics.median(run[key] for run in nginx) - d
    s = statistics.median(run[key] for run in skein) - d
    return (s / n if n > 0 else float("inf")), n, s


def main(paths):
    pooled = load(paths)
    rng = random.Random(7)
    print(f"Pooled over {len(paths)} result files.\n")
    print("| mode | req/s | repeats | percentile | nginx added | skein added | ratio | 90% bootstrap interval | target | runs meeting it alone |")
    print("|---|---:|---:|---|---:|---:|---:|---|---|---|")
    for mode in ("unary", "stream"):
        for rate in (500, 2000, 5000):
            runs = [pooled.get((target, mode, rate), []) for target in TARGETS]
            if not all(runs):
                continue
            for name, (key, factor) in KEYS.items():
                point, n, s = ratio(*runs, key)
                draws = sorted(
                    ratio(*[[rng.choice(r) for _ in r] for r in runs], key)[0] for _ in range(2000)
                )
                low, high = draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]
                verdict = "met" if point <= factor else "NOT met"
                alone = per_file(paths, mode, rate, key, factor)
                print(f"| {mode} | {rate} | {len(runs[2])} | {name} | {n:.0f} | {s:.0f} | {point:.2f}× | {low:.2f}–{high:.2f}× | ≤{factor}× {verdict} | {alone} |")


def per_file(paths, mode, rate, key, factor):
    """In how many of the files the point was met on its own (as summarize.py judges it)."""
    met = 0
    for path in paths:
        runs = load([path])
        sets = [runs.get((target, mode, rate), []) for target in TARGETS]
        if not all(sets):
            continue
        point, _, _ = ratio(*sets, key)
        own_ok = statistics.median(r[key] for r in sets[2]) <= statistics.median(r[key] for r in sets[1])
        met += point <= factor or own_ok
    return f"{met} of {len(paths)}"


if __name__ == "__main__":
    main(sys.argv[1:])
