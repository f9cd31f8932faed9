"""Where in time a run's slow requests fell (see benches/tail.sh).

  tail.py REPORT SAMPLES SLOW_US   one JSON summary of a run: percentiles, the slow requests
                                   grouped into episodes, and their 100 ms phase histogram
  tail.py --table RESULTS          a Markdown table of the summaries in a tail-*.jsonl file
"""

import collections
import json
import sys

EPISODE_GAP_US = 5000


def summarize(report_path, samples_path, slow_us):
    report = json.load(open(report_path))
    samples = []
    with open(samples_path) as lines:
        for line in lines:
            due, service, ok = (int(field) for field in line.split())
            if ok:
                samples.append((due, service))
    slow = sorted(due for due, service in samples if service > slow_us)
    episodes = []
    for due in slow:
        if episodes and due - episodes[-1][-1] < EPISODE_GAP_US:
            episodes[-1].append(due)
        else:
            episodes.append([due])
    phase = collections.Counter((due % 100_000) // 10_000 for due in slow)
    return {
        "label": report["label"],
        "requests": len(samples),
        "service": report["service"],
        "slow_us": slow_us,
        "slow": len(slow),
        "episodes": len(episodes),
        "largest_episodes": sorted((len(e) for e in episodes), reverse=True)[:5],
        "longest_episode_ms": round(max((e[-1] - e[0] for e in episodes), default=0) / 1000, 1),
        "phase_100ms": [phase[bucket] for bucket in range(10)],
    }


def table(results_path):
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    setup, runs = rows[0], rows[1:]
    print(f"\nguest_halt_poll_ns: {setup['guest_halt_poll_ns']}; slow means over {runs[0]['slow_us']} µs\n")
    print("| run | p50 / p99 / p99.9 (µs) | slow requests | episodes | largest episodes (requests) | longest (ms) | slow requests by 10 ms phase of 100 ms |")
    print("|---|---|---:|---:|---|---:|---|")
    for run in runs:
        s = run["service"]
        print(f"| {run['label']} | {s['p50_us']} / {s['p99_us']} / {s['p999_us']} | {run['slow']} | {run['episodes']} | "
              f"{', '.join(map(str, run['largest_episodes']))} | {run['longest_episode_ms']} | {' '.join(map(str, run['phase_100ms']))} |")


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        table(sys.argv[2])
    else:
        print(json.dumps(summarize(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
