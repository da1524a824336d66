"""The comparison: what locust sent, against what each telemetry source counted and measured.

    python -m tooling.reports.compare --scenario steady --duration 60    # starts and stops the native stack
    python -m tooling.reports.compare --prometheus http://127.0.0.1:9090 --app http://127.0.0.1:8080   # compose

For every route and status it reports locust's count beside each source that has data (otel: the SDK's
HTTP metrics; otel span metrics; manual: the app's own prometheus-flask-exporter; ebpf: Beyla; edge: the
proxy in front of the app, what users got), the
difference in requests and in %, and p50/p95/p99 from each source's histogram with the bucket that holds
the quantile, beside the percentiles locust measured itself. Counts are differences of the cumulative
counters between a snapshot before the load and one after every source has caught up, so a running
stack's earlier traffic does not count; other traffic sent meanwhile would (stop compose's background
load in the locust UI first). Writes a terminal table, compare.json and compare.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tooling.native.stack import REPO_ROOT, NativeStack, prometheus_query, run_locust

QUANTILES = (0.5, 0.95, 0.99)
UNMATCHED = "/**"
# Where each source takes its latency, which is why their percentiles differ from each other and from
# locust's (which adds the client, the network and the wait in gunicorn's listen queue).
WHERE_MEASURED = {
    "loadgen": "locust, client side: connect, queueing in gunicorn's backlog, the whole answer",
    "ebpf": "Beyla, the kernel socket: from the request's first bytes read to the answer written",
    "otel": "the OpenTelemetry SDK, the WSGI call inside the worker",
    "otel span metrics": "the SERVER span's duration, which is the same WSGI call, in the collector's buckets",
    "manual": "prometheus-flask-exporter, Flask's request handling inside the app; the owners' code, so their "
              "buckets (first 0-5 ms), not the stack's finer ones (docs/latency-resolution.md)",
    "edge": "Caddy in front of the app: from the request read to the answer written, the wait for a worker "
            "included; its own 502/503/504 when the app cannot answer",
}


@dataclass
class SourceQueries:
    """How one source's counts and latency buckets are read, keyed to (route, status)."""

    name: str
    counts: str
    buckets: str
    route_label: str
    status_label: str
    extra_counts: str | None = None  # manual: unmatched traffic has no per-path series

    def route(self, metric: dict) -> str:
        value = metric.get(self.route_label, "")
        if self.route_label == "span_name":  # "GET /health" -> "/health"; "GET" (no route) -> "/**"
            value = value.partition(" ")[2]
        return value or UNMATCHED


SOURCES = [
    SourceQueries(
        "otel",
        'sum by (http_route, http_response_status_code) '
        '(http_server_request_duration_seconds_count{telemetry_source="otel", service_name="dice-api"})',
        'sum by (http_route, le) (http_server_request_duration_seconds_bucket{telemetry_source="otel", '
        'service_name="dice-api"})',
        "http_route", "http_response_status_code"),
    SourceQueries(
        "otel span metrics",
        'sum by (span_name, http_response_status_code) (traces_spanmetrics_calls_total{telemetry_source="otel", '
        'service_name="dice-api", span_kind="SPAN_KIND_SERVER"})',
        'sum by (span_name, le) (traces_spanmetrics_latency_bucket{telemetry_source="otel", service_name="dice-api", '
        'span_kind="SPAN_KIND_SERVER"})',
        "span_name", "http_response_status_code"),
    SourceQueries(
        "manual",
        'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})',
        'sum by (path, le) (flask_http_request_duration_seconds_bucket{telemetry_source="manual"})',
        "path", "status",
        extra_counts='sum by (status) (flask_http_request_total{telemetry_source="manual"})'),
    SourceQueries(
        "edge",
        'sum by (span_name, http_response_status_code) (traces_spanmetrics_calls_total{telemetry_source="edge", '
        'span_kind="SPAN_KIND_SERVER"})',
        'sum by (span_name, le) (traces_spanmetrics_latency_bucket{telemetry_source="edge", '
        'span_kind="SPAN_KIND_SERVER"})',
        "span_name", "http_response_status_code"),
    SourceQueries(
        "ebpf",
        'sum by (http_route, http_response_status_code) '
        '(http_server_request_duration_seconds_count{telemetry_source="ebpf", service_name="dice-api"})',
        'sum by (http_route, le) (http_server_request_duration_seconds_bucket{telemetry_source="ebpf", '
        'service_name="dice-api"})',
        "http_route", "http_response_status_code"),
]


@dataclass
class Snapshot:
    counts: dict[str, Counter] = field(default_factory=dict)  # source -> (route, status) -> count
    buckets: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)  # source -> route -> le


def take_snapshot(prometheus: str) -> Snapshot:
    snap = Snapshot()
    for source in SOURCES:
        counts: Counter = Counter()
        for row in prometheus_query(prometheus, source.counts):
            status = row["metric"].get(source.status_label, "*")
            counts[(source.route(row["metric"]), status)] += float(row["value"][1])
        if source.extra_counts:
            # The app's requests that no route matched: its total per status minus its per-route series.
            per_status = Counter()
            for (_route, status), n in counts.items():
                per_status[status] += n
            for row in prometheus_query(prometheus, source.extra_counts):
                status = row["metric"]["status"]
                unmatched = float(row["value"][1]) - per_status[status]
                if unmatched > 0:
                    counts[(UNMATCHED, status)] += unmatched
        buckets: dict[str, dict[float, float]] = defaultdict(dict)
        for row in prometheus_query(prometheus, source.buckets):
            le = float(row["metric"]["le"])
            route = source.route(row["metric"])
            buckets[route][le] = buckets[route].get(le, 0.0) + float(row["value"][1])
        snap.counts[source.name] = counts
        snap.buckets[source.name] = dict(buckets)
    return snap


def difference(after: Snapshot, before: Snapshot) -> Snapshot:
    diff = Snapshot()
    for name, counts in after.counts.items():
        diff.counts[name] = Counter({k: round(v - before.counts.get(name, Counter()).get(k, 0))
                                     for k, v in counts.items()})
        diff.counts[name] = Counter({k: v for k, v in diff.counts[name].items() if v})
        diff.buckets[name] = {
            route: {le: v - before.buckets.get(name, {}).get(route, {}).get(le, 0.0) for le, v in les.items()}
            for route, les in after.buckets.get(name, {}).items()}
    return diff


def histogram_quantile(q: float, cumulative: dict[float, float]) -> dict | None:
    """Prometheus's linear interpolation within the bucket, plus the bucket itself: [lower, upper] is
    all the histogram knows."""
    les = sorted(cumulative)
    if not les or cumulative[les[-1]] <= 0:
        return None
    total = cumulative[les[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in les:
        if cumulative[le] >= rank:
            if math.isinf(le):
                return {"value": lower, "bucket": [lower, None]}
            within = cumulative[le] - below
            value = lower + (le - lower) * ((rank - below) / within if within else 0)
            return {"value": value, "bucket": [lower, le]}
        lower, below = le, cumulative[le]
    return None


def bucket_width(bucket: list) -> float | None:
    """A quantile's bucket width as a share of its lower bound (0.25: upper = 1.25 x lower): how finely the
    histogram resolves that percentile. None for an open bucket (from 0, or past the last bound)."""
    lower, upper = bucket
    if upper is None or lower <= 0:
        return None
    return upper / lower - 1


def exact_quantile(q: float, values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def build_report(truth: dict, diff: Snapshot, scenario: str, target: str) -> dict:
    sent = Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})
    present = [s.name for s in SOURCES if diff.counts.get(s.name)]
    rows = []
    for (route, status), n in sorted(sent.items()):
        row = {"route": route, "status": status, "loadgen": n, "sources": {}}
        for name in present:
            seen, expected = diff.counts[name].get((route, status), 0), n
            row["sources"][name] = {"count": seen, "diff": seen - expected,
                                    "diff_pct": round(100 * (seen - expected) / expected, 2) if expected else None}
        rows.append(row)
    extra = {name: {f"{r} {s}": v for (r, s), v in diff.counts[name].items() if (r, s) not in sent}
             for name in present}
    by_route: dict[str, list[float]] = defaultdict(list)
    for _t, name, _status, ms in truth["timeline"]:
        by_route[name].append(ms / 1000)
    latency = {}
    for route in sorted({route for route, _ in sent}):
        entry = {"loadgen": {f"p{round(q * 100)}": exact_quantile(q, by_route[route]) for q in QUANTILES}}
        for name in present:
            cumulative = diff.buckets[name].get(route)
            if cumulative:
                entry[name] = {f"p{round(q * 100)}": histogram_quantile(q, cumulative) for q in QUANTILES}
        latency[route] = entry
    return {
        "scenario": scenario, "target": target,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "sources": present, "rows": rows, "not_sent_but_counted": {k: v for k, v in extra.items() if v},
        "latency_seconds": latency, "where_measured": {k: WHERE_MEASURED[k] for k in ["loadgen", *present]},
        "locust_totals": truth["locust_totals"],
    }


def machine() -> str:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    return f"{os.cpu_count()} cores, {model or 'unknown CPU'}, {platform.system()} {platform.release()}"


def format_table(report: dict) -> str:
    sources = report["sources"]
    lines = [f"scenario {report['scenario']} against {report['target']}, {report['date']}; {report['machine']}",
             "", "counts (difference from what locust sent)"]
    header = f"{'route':10} {'status':6} {'locust':>8}" + "".join(f" {s:>24}" for s in sources)
    lines += [header, "-" * len(header)]
    for row in report["rows"]:
        cells = []
        for s in sources:
            c = row["sources"][s]
            pct = f"{c['diff_pct']:+.1f}%" if c["diff_pct"] is not None else ""
            cells.append(f" {c['count']:>9} ({c['diff']:+d}, {pct:>7})")
        lines.append(f"{row['route']:10} {row['status']:6} {row['loadgen']:>8}" + "".join(cells))
    if report["not_sent_but_counted"]:
        lines.append(f"counted but not sent: {report['not_sent_but_counted']}")
    lines += ["", "latency p50 / p95 / p99 in ms; [bucket +w%] = the histogram bucket that holds the quantile, "
              "and its width as a share of its lower bound (open: from 0 or to +Inf)"]
    for route, entry in report["latency_seconds"].items():
        lines.append(f"{route}")
        for source, qs in entry.items():
            parts = []
            for q, v in qs.items():
                if v is None:
                    parts.append(f"{q} -")
                elif isinstance(v, dict):
                    lo, hi = v["bucket"]
                    upper = "inf" if hi is None else f"{hi * 1000:g}"
                    width = bucket_width(v["bucket"])
                    resolution = "open" if width is None else f"+{width:.0%}"
                    parts.append(f"{q} {v['value'] * 1000:7.1f} [{lo * 1000:g}-{upper} {resolution}]")
                else:
                    parts.append(f"{q} {v * 1000:7.1f}")
            lines.append(f"  {source:18} " + "   ".join(parts))
    lines += ["", "where each source measures:"] + [f"  {k:18} {v}" for k, v in report["where_measured"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = report["sources"]
    rows = report["rows"]
    colors = {"loadgen": "#333333", "otel": "#1f77b4", "otel span metrics": "#7fb3e0", "manual": "#2ca02c",
              "ebpf": "#d62728", "edge": "#ff7f0e"}
    fig, (counts_ax, latency_ax) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1, 1.3]})
    labels = [f"{r['route']}\n{r['status']}" for r in rows]
    series = ["loadgen", *sources]
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [r["loadgen"] if name == "loadgen" else r["sources"][name]["count"] for r in rows]
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(rows))]
        bars = counts_ax.bar(xs, values, width, label="locust (sent)" if name == "loadgen" else name,
                             color=colors[name])
        if name != "loadgen":
            for bar, r in zip(bars, rows, strict=True):
                pct = r["sources"][name]["diff_pct"]
                counts_ax.annotate("exact" if pct == 0 else f"{pct:+.1f}%", (bar.get_x() + bar.get_width() / 2,
                                   bar.get_height()), ha="center", va="bottom", fontsize=7, rotation=45)
    counts_ax.set_xticks(range(len(rows)), labels)
    counts_ax.set_ylabel("requests")
    counts_ax.set_title("Requests counted per route and status, against what locust sent\n"
                        "(label: difference from locust)")
    counts_ax.legend(fontsize=8)

    routes = list(report["latency_seconds"])
    series = ["loadgen", *sources]
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        for j, route in enumerate(routes):
            qs = report["latency_seconds"][route].get(name)
            if not qs:
                continue
            x = j + (i - (len(series) - 1) / 2) * width
            for q, marker in zip(("p50", "p95", "p99"), ("o", "s", "^"), strict=True):
                v = qs.get(q)
                if v is None:
                    continue
                if isinstance(v, dict):
                    lo, hi = v["bucket"]
                    top = hi if hi is not None else v["value"]
                    latency_ax.vlines(x + {"p50": -0.02, "p95": 0, "p99": 0.02}[q], lo * 1000, top * 1000,
                                      color=colors[name], alpha=0.35, linewidth=4)
                    v = v["value"]
                latency_ax.plot(x, v * 1000, marker, color=colors[name],
                                label=f"{'locust (client)' if name == 'loadgen' else name}" if j == 0 and q == "p50"
                                else None)
    latency_ax.set_xticks(range(len(routes)), routes)
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("ms (log)")
    latency_ax.set_title("Latency per route: ● p50  ■ p95  ▲ p99\n"
                         "shaded: the histogram bucket that holds the quantile (all a histogram can tell)")
    latency_ax.legend(fontsize=8)
    fig.suptitle(f"{report['scenario']} scenario, {report['date']} — {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settle(prometheus: str, before: Snapshot, sent_total: int, timeout: float) -> Snapshot:
    """Wait until the otel and manual totals reach what was sent (they are exact when nothing was
    lost), or stop changing; span metrics and scrapes lag the SDK's 10 s export by a few seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        diff = difference(take_snapshot(prometheus), before)
        totals = tuple(sum(diff.counts[name].values()) for name in ("otel", "otel span metrics", "manual", "edge"))
        if all(t >= sent_total for t in totals) or time.monotonic() > deadline:
            return diff
        if totals == last and all(t > 0 for t in totals) and time.monotonic() > deadline - timeout / 2:
            return diff  # stable but short: the report shows the shortfall
        last = totals
        time.sleep(5)


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stack = None
    if args.prometheus:
        prometheus, app, target = args.prometheus.rstrip("/"), args.app.rstrip("/"), f"{args.app} (running stack)"
    else:
        stack = NativeStack(out / "native-stack").up()
        # locust calls the app through the edge, as users do.
        prometheus, app, target = stack.prometheus_url, stack.edge_url, "the native stack (no Docker)"
        time.sleep(6)  # a first scrape of every target
    try:
        before = take_snapshot(prometheus)
        truth = run_locust(app, args.duration if args.scenario in ("steady", "errors") else None, args.users,
                           out, name=f"locust-{args.scenario}", scenario=args.scenario)
        sent_total = truth["locust_totals"]["num_requests"]
        diff = settle(prometheus, before, sent_total, args.settle)
    finally:
        if stack is not None:
            stack.down()
    report = build_report(truth, diff, args.scenario, target)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "compare.png")
    table = format_table(report)
    (out / "compare.txt").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / 'compare.txt'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.reports.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Scenarios: see the table in locustfile.py and the README.")
    parser.add_argument("--scenario", default="steady", choices=("steady", "spike", "errors", "scan"))
    parser.add_argument("--duration", type=int, default=60,
                        help="seconds of load for steady and errors; spike lasts this long too (default 60)")
    parser.add_argument("--users", type=int, default=20, help="locust users for steady, errors and scan")
    parser.add_argument("--prometheus", help="Prometheus of a running stack, e.g. http://127.0.0.1:9090")
    parser.add_argument("--app", help="where that stack's users call the app: its edge, e.g. http://127.0.0.1:8080 "
                        "(with --prometheus)")
    parser.add_argument("--out", default=str(REPO_ROOT / ".cache" / "compare"), help="where the outputs go")
    parser.add_argument("--settle", type=float, default=90, help="max seconds to wait for every source")
    args = parser.parse_args(argv)
    if bool(args.prometheus) != bool(args.app):
        parser.error("--prometheus and --app go together (a running stack), or neither (the native stack)")
    import os

    os.environ.setdefault("DICE_SECONDS", str(args.duration))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
