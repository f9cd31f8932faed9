"""Split a proxy's requests into phases from a loopback packet capture (tcpdump's text output).

Usage: python3 benches/diag/phases.py CAPTURE.txt PROXY_PORT MOCK_PORT LABEL CPU_US_PER_REQUEST \
           [LOAD_GENERATOR_JSON [HALTS_PER_REQUEST_JSON]]

For each request, with only payload-carrying packets considered:
  in        the client's request reaches the proxy -> the proxy's request leaves for the mock
  upstream  -> the mock's last response packet
  out       -> the proxy's last packet to the client
Requests that overlap another (a second request arrives before the first is answered) are left
out, so the figures describe a request on an otherwise idle proxy. Prints one JSON object.
"""

import json
import re
import sys

PACKET = re.compile(
    r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .*length (\d+)"
)


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))])


def main():
    path, proxy, mock, label, cpu = sys.argv[1:6]
    proxy, mock = int(proxy), int(mock)
    events = []
    with open(path) as capture:
        for line in capture:
            match = PACKET.match(line)
            if not match or int(match.group(4)) == 0:
                continue
            at, source, destination = float(match.group(1)), int(match.group(2)), int(match.group(3))
            if destination == proxy:
                kind = "request"
            elif source == proxy:
                kind = "response"
            elif destination == mock:
                kind = "upstream_request"
            elif source == mock:
                kind = "upstream_response"
            else:
                continue
            events.append((at, kind))
    events.sort()
    requests, current = [], None
    for at, kind in events:
        if kind == "request":
            if current is not None and "response" not in current:
                current["overlapped"] = True
            if current is None or "response" in current:
                current = {"request": at}
                requests.append(current)
            continue
        if current is None:
            continue
        if kind == "upstream_request":
            if "upstream_request" in current:
                current["overlapped"] = True
            current["upstream_request"] = at
        else:
            current[kind] = at
    clean = [
        r
        for r in requests
        if not r.get("overlapped")
        and all(k in r for k in ("upstream_request", "upstream_response", "response"))
    ]
    phases = {
        "in": [(r["upstream_request"] - r["request"]) * 1e6 for r in clean],
        "upstream": [(r["upstream_response"] - r["upstream_request"]) * 1e6 for r in clean],
        "out": [(r["response"] - r["upstream_response"]) * 1e6 for r in clean],
        "total": [(r["response"] - r["request"]) * 1e6 for r in clean],
    }
    result = {"label": label, "requests": len(requests), "measured": len(clean)}
    for name, values in phases.items():
        result[f"{name}_p50_us"] = percentile(values, 0.5)
        result[f"{name}_p90_us"] = percentile(values, 0.9)
    result["proxy_cpu_us_per_request"] = float(cpu)
    if len(sys.argv) > 6:
        # The load generator's own figures for the same run, over every request (overlapping
        # ones included), from the client's send to its reading of the last byte.
        client = json.loads(sys.argv[6])["service"]
        result["client_service_p50_us"] = client["p50_us"]
        result["client_service_p99_us"] = client["p99_us"]
    if len(sys.argv) > 7:
        # Halts per request of core 0 (the proxy) and core 1 (the mock and the load generator).
        result["halts_per_request"] = json.loads(sys.argv[7])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
