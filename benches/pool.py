"""Pool the open-loop runs of several benches/run.sh result files (the same proxy, the same
setup) and estimate each latency target from all their repeats together.

One run's verdict on a latency point rests on the median of a few 10 s repeats, and on this VM
a single repeat's p99 can double when the host stalls a vCPU for a few tens of milliseconds.
Pooling the repeats of many runs gives a steadier estimate of the ratio the target is about.
The interval is a bootstrap over rounds: round k of a file holds the k-th direct, nginx and
Skein repeat of a point (interleaved in one skein-load call since run.sh interleaves; run one
after the other before), and is resampled as a whole so the three stay paired. Files from
`run.sh --control` get a second table: the A/A control (a second, identical nginx) judged by
the same rule, which shows how often the method alone fails a proxy that is as fast as nginx.

Usage: python3 benches/pool.py benches/results/A.jsonl benches/results/B.jsonl ...
"""

import random
import statistics
import sys

from summarize import judge, records

KEYS = {"p50": ("p50_us", 1.5), "p99": ("p99_us", 2.0)}
# The proxies judged against nginx: Skein, and the A/A control of `run.sh --control` (a
# second nginx) when the files have it.
JUDGED = ("skein", "control")


def setup_of(record):
    if record.get("guest_halt_poll_ns") not in (None, "0", "off"):
        machine = "halt polling"
    else:
        machine = "kdamond off core 0" if record.get("kdamond_kept_off_core0", 0) else "as the machine runs"
    if "slice_secs" not in record:
        return f"{machine}, separate runs (before interleaving)"
    slice_secs = record["slice_secs"]
    method = f"turns of {slice_secs} s" if slice_secs else "one after the other"
    control = ", with the A/A control" if record.get("control") else ""
    return f"{machine}, {method}{control}"


def load(path):
    """({(mode, rate): {target: [service percentiles, one per round]}}, setup)."""
    setup = setup_of({})
    repeats = {}
    for record in records(path):
        if record.get("label") == "setup":
            setup = setup_of(record)
        elif record.get("mode") == "open":
            target, mode, rate = record["label"].split("/")
            repeats.setdefault((mode, int(rate)), {}).setdefault(target, []).append(record["service"])
    return repeats, setup


def rounds_of(repeats, judged):
    """{(mode, rate): [(direct, nginx, judged) service percentiles of round k]}."""
    targets = ("direct", "nginx", judged)
    return {
        point: list(zip(*(by_target[target] for target in targets)))
        for point, by_target in repeats.items()
        if all(target in by_target for target in targets)
    }


def figures(rounds, key):
    """Added latency of nginx and Skein and Skein's ratio, from the medians over the rounds."""
    d, n, s = (statistics.median(r[i][key] for r in rounds) for i in range(3))
    added_n, added_s = max(n - d, 0), max(s - d, 0)
    ratio = added_s / added_n if added_n > 0 else float("inf")
    return ratio, added_n, added_s, n, s


def met(rounds, key, factor):
    """The rule summarize.py applies (`judge`): True, False, or None when not judged."""
    _, added_n, added_s, n, s = figures(rounds, key)
    return judge(round(added_s), round(added_n), round(s), round(n), factor)


def main(paths):
    loaded = [load(path) for path in paths]
    setups = {setup for _, setup in loaded}
    if len(setups) > 1:
        sys.exit(f"these files mix setups ({', '.join(sorted(setups))}); pool them separately")
    print(f"Pooled over {len(paths)} result files ({setups.pop()}).")
    for judged in JUDGED:
        files = [rounds_of(repeats, judged) for repeats, _ in loaded]
        if any(files):
            table(judged, [rounds for rounds in files if rounds])


def table(judged, files):
    rng = random.Random(7)
    name = "Skein" if judged == "skein" else "The A/A control (a second nginx)"
    print(f"\n{name}, from {len(files)} of the files:\n")
    print(f"| mode | req/s | rounds | percentile | nginx added | {judged} added | ratio | 90% bootstrap interval | verdict | runs meeting it alone |")
    print("|---|---:|---:|---|---:|---:|---:|---|---|---|")
    for mode in ("unary", "stream"):
        for rate in (500, 2000, 5000):
            per_file = [rounds[(mode, rate)] for rounds in files if (mode, rate) in rounds]
            pooled = [r for rounds in per_file for r in rounds]
            if not pooled:
                continue
            for name, (key, factor) in KEYS.items():
                ratio, added_n, added_s, _, _ = figures(pooled, key)
                draws = sorted(figures([rng.choice(pooled) for _ in pooled], key)[0] for _ in range(2000))
                low, high = draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]
                verdict_pooled = met(pooled, key, factor)
                if verdict_pooled is None:
                    verdict = "not judged (direct's own was higher)"
                elif not verdict_pooled:
                    verdict = f"NOT met (≤{factor}×)"
                elif high <= factor:
                    verdict = f"met (≤{factor}×), interval inside"
                else:
                    verdict = f"met (≤{factor}×), interval crosses"
                alone = sum(met(rounds, key, factor) is True for rounds in per_file)
                print(f"| {mode} | {rate} | {len(pooled)} | {name} | {added_n:.0f} | {added_s:.0f} | {ratio:.2f}× | "
                      f"{low:.2f}–{high:.2f}× | {verdict} | {alone} of {len(per_file)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
