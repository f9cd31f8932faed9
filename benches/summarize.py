"""Summarize a benches/run.sh result file into Markdown tables and check the targets."""

import json
import statistics
import sys


def median_run(records):
    """One record whose figures are the medians over repeated runs of the same label."""
    if len(records) == 1:
        return records[0]
    merged = dict(records[0])
    for section in ("latency", "ttfb", "service"):
        merged[section] = {
            key: statistics.median(record[section][key] for record in records) for key in records[0][section]
        }
    for key in ("achieved_rps", "errors", "dropped"):
        merged[key] = statistics.median(record[key] for record in records) if key == "achieved_rps" else sum(record[key] for record in records)
    cores = [record["proxy_cpu_cores"] for record in records if record.get("proxy_cpu_cores") is not None]
    if cores:
        merged["proxy_cpu_cores"] = statistics.median(cores)
    cpu = [record["proxy_cpu_us_per_request"] for record in records if record.get("proxy_cpu_us_per_request") is not None]
    if cpu:
        merged["proxy_cpu_us_per_request"] = statistics.median(cpu)
    halts = [record["halts_per_request"] for record in records if record.get("halts_per_request")]
    if halts:
        merged["halts_per_request"] = [statistics.median(core) for core in zip(*halts)]
    merged["repeats"] = len(records)
    return merged


def records(path):
    """The JSON records of a result file, one per non-empty line."""
    with open(path) as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def judge(proxy_added, nginx_added, proxy_total, nginx_total, factor):
    """A latency target for a proxy (Skein, or the A/A control): met when it adds at most
    `factor` times what nginx adds, or when its own percentile is no worse than nginx's
    (nginx's added latency can be within noise of zero, which makes a ratio meaningless).
    None (not judged) when the direct target's own percentile was above both proxies': the
    machine stalled during direct's turns, so nothing was measured as added, and "0 ≤ 2 × 0"
    would pass vacuously."""
    if proxy_total <= nginx_total:
        return True
    if nginx_added <= 0 and proxy_added <= 0:
        return None
    return proxy_added <= factor * nginx_added


KEYS = ("p50_us", "p99_us", "p999_us")


def added_and_verdicts(direct, nginx, proxy):
    """What nginx and `proxy` added over direct at each percentile (0 when below), and the
    p50 and p99 verdicts with their table text."""
    n = [round(max(nginx["service"][key] - direct["service"][key], 0)) for key in KEYS]
    p = [round(max(proxy["service"][key] - direct["service"][key], 0)) for key in KEYS]

    def verdict(index, factor):
        proxy_total = round(proxy["service"][KEYS[index]])
        nginx_total = round(nginx["service"][KEYS[index]])
        met = judge(p[index], n[index], proxy_total, nginx_total, factor)
        shown = f"{p[index] / n[index]:.2f}×" if n[index] else "n/a"
        word = {True: "met", False: "NOT met", None: "not judged (direct's own was higher)"}[met]
        return met, f"{shown}, {proxy_total} vs {nginx_total} → {word}"

    met50, text50 = verdict(0, 1.5)
    met99, text99 = verdict(1, 2.0)
    return n, p, met50, text50, met99, text99


def print_latency_targets(what, checks):
    for name, index in (("p50 ≤ 1.5×", 2), ("p99 ≤ 2×", 3)):
        failed = [f"{check[0]}@{check[1]}" for check in checks if check[index] is False]
        unjudged = [f"{check[0]}@{check[1]}" for check in checks if check[index] is None]
        parts = ["met" if not failed else "NOT met at " + ", ".join(failed)]
        if unjudged:
            parts.append("not judged at " + ", ".join(unjudged) + " (direct's own percentile was higher than both proxies')")
        print(f"- {what} {name} nginx at every rate and mode: {'; '.join(parts)}")


def main(path):
    grouped = {}
    extra = {}
    setup = {}
    for record in records(path):
        if record.get("label") == "setup":
            setup = record
        elif "skein_rss_kib" in record:
            extra[record["label"]] = record["skein_rss_kib"]
        else:
            grouped.setdefault(record["label"], []).append(record)
    runs = {label: median_run(group) for label, group in grouped.items()}
    repeats = max(len(records) for records in grouped.values()) if grouped else 0
    print(f"\nFigures are medians over {repeats} repeat(s) of each.")
    slice_secs = setup.get("slice_secs")
    if slice_secs:
        who = "direct, nginx, the A/A control (a second nginx) and Skein" if setup.get("control") else "direct, nginx and Skein"
        print(f"In each open-loop run, {who} took turns of {slice_secs} s until each had its measured time.")
    else:
        print("In each open-loop run, direct, nginx and Skein ran one after the other, each warmed up then measured.")
    if setup.get("guest_halt_poll_ns") not in (None, "off"):
        print(f"The guest's halt polling (guest_halt_poll_ns) was {setup['guest_halt_poll_ns']} ns.")

    print("\n### Max throughput (closed loop, 64 connections)\n")
    print("| target | req/s | errors | proxy CPU (cores) | req/s per proxy core |")
    print("|---|---:|---:|---:|---:|")
    for target in ["direct", "nginx", "skein"]:
        run = runs.get(f"{target}/max")
        if not run:
            continue
        cpu = run.get("proxy_cpu_cores")
        per_core = round(run["achieved_rps"] / cpu) if cpu else None
        print(f"| {target} | {run['achieved_rps']:.0f} | {run['errors']} | {cpu if cpu is not None else '–'} | {per_core if per_core else '–'} |")

    print("\n### Added latency over calling the mock directly (µs; open loop; service time from the actual send; streams: to the last byte)\n")
    print("| mode | req/s | direct p50 / p99 / p99.9 | nginx added p50 / p99 / p99.9 | skein added p50 / p99 / p99.9 | p50 target (≤1.5×) | p99 target (≤2×) | errors+dropped nginx/skein |")
    print("|---|---:|---|---|---|---|---|---|")
    checks = []
    for mode in ["unary", "stream"]:
        for rate in [500, 2000, 5000]:
            direct = runs.get(f"direct/{mode}/{rate}")
            nginx = runs.get(f"nginx/{mode}/{rate}")
            skein = runs.get(f"skein/{mode}/{rate}")
            if not (direct and nginx and skein):
                continue
            d = [round(direct["service"][key]) for key in KEYS]
            n, s_, met50, text50, met99, text99 = added_and_verdicts(direct, nginx, skein)
            errors = f"{nginx['errors'] + nginx['dropped']}/{skein['errors'] + skein['dropped']}"
            print(f"| {mode} | {rate} | {d[0]} / {d[1]} / {d[2]} | {n[0]} / {n[1]} / {n[2]} | {s_[0]} / {s_[1]} / {s_[2]} | {text50} | {text99} | {errors} |")
            checks.append((mode, rate, met50, met99))

    control_checks = []
    control_rows = []
    for mode in ["unary", "stream"]:
        for rate in [500, 2000, 5000]:
            row = [runs.get(f"{target}/{mode}/{rate}") for target in ("direct", "nginx", "control")]
            if not all(row):
                continue
            n, c, met50, text50, met99, text99 = added_and_verdicts(*row)
            control_rows.append(f"| {mode} | {rate} | {n[0]} / {n[1]} / {n[2]} | {c[0]} / {c[1]} / {c[2]} | {text50} | {text99} |")
            control_checks.append((mode, rate, met50, met99))
    if control_rows:
        print("\n### A/A control: a second, identical nginx judged by the same rule as Skein (µs added)\n")
        print("| mode | req/s | nginx added p50 / p99 / p99.9 | control added p50 / p99 / p99.9 | p50 (≤1.5×) | p99 (≤2×) |")
        print("|---|---:|---|---|---|---|")
        print("\n".join(control_rows))

    print("\n### Latency from the scheduled send time (µs; includes any delay in the load generator and any queueing)\n")
    print("| mode | req/s | direct p50 / p99 / p99.9 | nginx p50 / p99 / p99.9 | skein p50 / p99 / p99.9 | skein TTFB p50 / p99 |")
    print("|---|---:|---|---|---|---|")
    for mode in ["unary", "stream"]:
        for rate in [500, 2000, 5000]:
            row = [runs.get(f"{target}/{mode}/{rate}") for target in ("direct", "nginx", "skein")]
            if not all(row):
                continue
            cells = [" / ".join(str(round(run["latency"][key])) for key in KEYS) for run in row]
            ttfb = f"{round(row[2]['ttfb']['p50_us'])} / {round(row[2]['ttfb']['p99_us'])}"
            print(f"| {mode} | {rate} | {cells[0]} | {cells[1]} | {cells[2]} | {ttfb} |")

    cpu_rows = []
    with_control = any(label.startswith("control/") for label in runs)
    for mode in ["unary", "stream"]:
        for rate in [500, 2000, 5000]:
            nginx, skein = runs.get(f"nginx/{mode}/{rate}"), runs.get(f"skein/{mode}/{rate}")
            if nginx and skein and nginx.get("proxy_cpu_us_per_request") and skein.get("proxy_cpu_us_per_request"):
                n, s_ = nginx["proxy_cpu_us_per_request"], skein["proxy_cpu_us_per_request"]
                row = f"| {mode} | {rate} | {n:.1f} | {s_:.1f} | {s_ / n:.2f} |"
                if with_control:
                    c = runs.get(f"control/{mode}/{rate}", {}).get("proxy_cpu_us_per_request")
                    row += f" {c:.1f} | {c / n:.2f} |" if c else " – | – |"
                cpu_rows.append(row)
    if cpu_rows:
        print("\n### The proxy's CPU time per request (µs; open loop, from /proc over its measured turns or run)\n")
        if with_control:
            print("| mode | req/s | nginx | skein | skein ÷ nginx | control | control ÷ nginx |")
            print("|---|---:|---:|---:|---:|---:|---:|")
        else:
            print("| mode | req/s | nginx | skein | skein ÷ nginx |")
            print("|---|---:|---:|---:|---:|")
        print("\n".join(cpu_rows))

    halt_targets = ["direct", "nginx", "skein"]
    if any(label.startswith("control/") for label in runs):
        halt_targets.append("control")
    halt_rows = []
    for mode in ["unary", "stream"]:
        for rate in [500, 2000, 5000]:
            row = [runs.get(f"{target}/{mode}/{rate}") for target in halt_targets]
            if all(row) and all(run.get("halts_per_request") for run in row):
                cells = [" / ".join(f"{core:.2f}" for core in run["halts_per_request"]) for run in row]
                halt_rows.append(f"| {mode} | {rate} | " + " | ".join(cells) + " |")
    if halt_rows:
        print("\n### Halts per request, core 0 (the proxy) / core 1 (the mock and the load generator)\n")
        print("| mode | req/s | " + " | ".join(halt_targets) + " |")
        print("|---|---:|" + "---:|" * len(halt_targets))
        print("\n".join(halt_rows))

    print("\n### Memory (Skein)\n")
    for label in ["rss_idle", "rss_peak_to_5000", "rss_after_max"]:
        if label in extra:
            print(f"- {label}: {extra[label] / 1024:.1f} MiB")

    print("\n### Targets\n")
    nginx_max = runs.get("nginx/max", {}).get("achieved_rps")
    skein_max = runs.get("skein/max", {}).get("achieved_rps")
    if nginx_max and skein_max:
        share = skein_max / nginx_max
        print(f"- max req/s on one core ≥ 70% of nginx: {share:.0%} → {'met' if share >= 0.7 else 'NOT met'}")
        # The closed loop is capped by the rig (the mock and the load generator share core 1)
        # whenever nginx does not fill its core: then req/s compares the rig, not the proxies,
        # and req/s per proxy core is the figure that does (benches/independent.sh agrees with it).
        nginx_cpu = runs.get("nginx/max", {}).get("proxy_cpu_cores")
        skein_cpu = runs.get("skein/max", {}).get("proxy_cpu_cores")
        if nginx_cpu and skein_cpu:
            per_core = (skein_max / skein_cpu) / (nginx_max / nginx_cpu)
            capped = " (nginx did not fill its core: the rig capped req/s)" if nginx_cpu < 0.95 else ""
            print(f"- req/s per proxy core, Skein vs nginx: {per_core:.0%}{capped}")
    print_latency_targets("added", checks)
    if control_checks:
        print_latency_targets("A/A control (a second nginx, the same rule): added", control_checks)
    if "rss_idle" in extra:
        idle = extra["rss_idle"] / 1024
        print(f"- RSS idle ≤ 30 MiB: {idle:.1f} MiB → {'met' if idle <= 30 else 'NOT met'}")
    if "rss_peak_to_5000" in extra:
        peak = extra["rss_peak_to_5000"] / 1024
        print(f"- RSS at 5000 req/s ≤ 80 MiB: {peak:.1f} MiB peak → {'met' if peak <= 80 else 'NOT met'}")


if __name__ == "__main__":
    main(sys.argv[1])
