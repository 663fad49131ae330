#!/usr/bin/python3
"""Scrapes a running peerd's GET /metrics and checks it against Prometheus' conventions with the
Prometheus project's own Python client (Debian's python3-prometheus-client) parsing it:
every family has # HELP and # TYPE, counters end in _total, histograms have cumulative buckets
ending in +Inf with _sum and _count, no family is written twice. Prints the samples as JSON
({"name{label=value,...}": value}) for the caller to check values; exits non-zero with the
broken rule otherwise.

usage: check_metrics.py ADMIN_ADDRESS TOKEN_FILE"""
import json, sys, urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main():
    address, token_file = sys.argv[1], sys.argv[2]
    token = open(token_file).read().strip()
    req = urllib.request.Request(f"http://{address}/metrics", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=30) as r:
        ctype = r.headers.get("Content-Type", "")
        text = r.read().decode()
    if not ctype.startswith("text/plain"):
        sys.exit(f"Content-Type is {ctype!r}, not text/plain")

    helped, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            if name in helped:
                sys.exit(f"{name}: # HELP twice (a family written twice)")
            helped[name] = line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            typed[name] = kind
            if name not in helped:
                sys.exit(f"{name}: # TYPE without # HELP before it")
            if kind == "counter" and not name.endswith("_total"):
                sys.exit(f"{name}: a counter whose name does not end in _total")
            if kind == "gauge" and name.endswith("_total"):
                sys.exit(f"{name}: a gauge named like a counter")
        elif line and not line.startswith("#"):
            sample = line.split("{")[0].split(" ")[0]
            family = next((f for f in typed if sample == f or (typed[f] == "histogram" and sample.startswith(f + "_"))), None)
            if family is None:
                sys.exit(f"sample {sample} before its family's # TYPE")

    samples = {}
    for family in text_string_to_metric_families(text):  # raises on anything malformed
        if family.type == "histogram":
            buckets = [s for s in family.samples if s.name.endswith("_bucket")]
            les = [s.labels["le"] for s in buckets]
            if not les or les[-1] != "+Inf":
                sys.exit(f"{family.name}: buckets do not end with le=\"+Inf\"")
            counts = [s.value for s in buckets]
            if counts != sorted(counts):
                sys.exit(f"{family.name}: buckets are not cumulative")
            names = {s.name for s in family.samples}
            if not {family.name + "_sum", family.name + "_count"} <= names:
                sys.exit(f"{family.name}: no _sum or _count")
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[s.name + ("{" + labels + "}" if labels else "")] = s.value
    print(json.dumps({"types": typed, "samples": samples}))


if __name__ == "__main__":
    main()
