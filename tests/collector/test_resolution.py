"""Latency with resolution (issue 18, item 7): request-duration buckets fine enough where this app lives.

One list of bounds (HTTP_DURATION_BUCKETS, instrumentation/zerocode/latency.py: the SDK's View) is repeated
by the collector's span_metrics connector (which also gives the edge's histogram) and by Beyla. The unit
tests hold the copies equal, check the list's shape, and check that every `le` a rule, an SLO or a dashboard
reads is a bound of every list, so a threshold stays exact. The integration test runs the steady scenario
through the edge of the native stack and asserts, for `/`, that the otel, span-metrics and edge
percentiles each come from a bucket no wider than a quarter of its lower bound, with counts exact.
docs/latency-resolution.md says what each link supports and why explicit buckets.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import yaml
from zerocode.latency import HTTP_DURATION_BUCKETS

from tooling.native.stack import REPO_ROOT, NativeStack, prometheus_query, run_locust
from tooling.reports.compare import (
    QUANTILES,
    bucket_width,
    build_report,
    format_table,
    settle,
    take_snapshot,
)

# upper / lower at most this in the range where the app answers (the issue: "no wider than a quarter").
MAX_RATIO = 1.25
FINE_RANGE = (0.0005, 0.1)  # seconds: to the latency SLO's threshold
# The semantic conventions' advice for http.server.request.duration: also Beyla's default and the manual
# source's (prometheus_client's) buckets. Kept as bounds, so a comparison at any of them lines up.
SEMCONV_DEFAULT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
# Series per histogram label set: one per bucket (with +Inf), plus _sum and _count.
MAX_BUCKETS = 40
# The steady scenario: ~1 request per user per second, 10 : 2 : 1 over /, /health, /fail.
SECONDS, USERS = 30, 20
FINE_SOURCES = ("otel", "otel span metrics", "edge")
# Every series of each histogram, whatever its labels (the series count is the cost of finer buckets).
SERIES = {
    "otel": ("http_server_request_duration_seconds", 'telemetry_source="otel"'),
    "otel span metrics": ("traces_spanmetrics_latency", 'telemetry_source="otel"'),
    "edge": ("traces_spanmetrics_latency", 'telemetry_source="edge"'),
}


# ------------------------------------------------------------------------------------- the bound lists

_GO_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000}


def go_duration_seconds(text: str) -> float:
    """A Go duration as the collector parses it (time.ParseDuration: an integer count of nanoseconds), in
    seconds as the span_metrics connector converts it (nanoseconds / 1e9)."""
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?(ns|us|µs|ms|s|m)", str(text).strip())
    assert match, f"not a simple Go duration: {text!r}"
    whole, fraction, unit = match.groups()
    scale = _GO_UNITS_NS[unit]
    nanoseconds = int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)
    return nanoseconds / 1e9


def collector_bounds() -> tuple[float, ...]:
    config = yaml.safe_load((REPO_ROOT / "otel-collector" / "otel-collector-config.yaml").read_text())
    histogram = config["connectors"]["span_metrics"]["histogram"]
    assert histogram["unit"] == "s", "the bounds below are compared in seconds"
    assert "explicit" in histogram, "no explicit buckets: the connector's default (2, 4, 6, 8, 10, 50 ms, ...) applies"
    return tuple(go_duration_seconds(b) for b in histogram["explicit"]["buckets"])


def beyla_bounds() -> tuple[float, ...]:
    config = yaml.safe_load((REPO_ROOT / "beyla" / "beyla-config.yaml").read_text())
    return tuple(float(b) for b in config["prometheus_export"]["buckets"]["duration_histogram"])


CONFIGURED = {"sdk (zerocode View)": lambda: tuple(HTTP_DURATION_BUCKETS),
              "collector span_metrics (otel span metrics, edge)": collector_bounds, "beyla": beyla_bounds}

# `le` in a PromQL matcher, also JSON-escaped inside a dashboard's expr: le="0.1", le=\"0.1\", le=~"...".
LE_MATCHER = re.compile(r'\ble\s*(=~|!~|!=|=)\s*\\?"([^"\\]*)\\?"')


def thresholds_read_by_queries() -> dict[float, set[str]]:
    """Every finite `le` that a recording or alerting rule, an SLO spec or a dashboard selects -> where."""
    found: dict[float, set[str]] = {}
    files = [*sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yaml")),
             *sorted((REPO_ROOT / "prometheus" / "slo").glob("*.yaml")),
             *sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json"))]
    for path in files:
        for operator, value in LE_MATCHER.findall(path.read_text()):
            assert operator == "=", f"{path.name}: le{operator}\"{value}\" (a regex or negation cannot be checked)"
            if value not in ("+Inf", "Inf"):
                found.setdefault(float(value), set()).add(str(path.relative_to(REPO_ROOT)))
    return found


@pytest.mark.unit
def test_the_sdk_collector_and_beyla_use_one_list_of_bounds():
    lists = {name: read() for name, read in CONFIGURED.items()}
    print("\n" + "\n".join(f"{name}: {len(bounds)} bounds" for name, bounds in lists.items()))
    for name, bounds in lists.items():
        assert bounds == tuple(HTTP_DURATION_BUCKETS), f"{name} differs from zerocode.latency.HTTP_DURATION_BUCKETS"


@pytest.mark.unit
def test_go_durations_are_read_as_the_collector_reads_them():
    assert go_duration_seconds("1.25ms") == 0.00125
    assert go_duration_seconds("100ms") == 0.1
    assert go_duration_seconds("7.5s") == 7.5
    assert go_duration_seconds("500us") == go_duration_seconds("0.5ms") == 0.0005


@pytest.mark.unit
def test_every_threshold_that_queries_read_is_a_bound_of_every_list():
    thresholds = thresholds_read_by_queries()
    print(f"\nthresholds read: { {le: sorted(where) for le, where in thresholds.items()} }")
    # The latency SLO's, at least; a scan that finds nothing would prove nothing.
    assert 0.1 in thresholds
    for name, read in CONFIGURED.items():
        missing = {le: sorted(where) for le, where in thresholds.items() if le not in read()}
        assert not missing, f"{name}: not a bound, so the query interpolates instead of counting: {missing}"


@pytest.mark.unit
def test_the_threshold_scan_finds_le_in_rules_and_in_escaped_dashboard_json():
    text = 'sum(x_bucket{le="0.25"}) / "expr": "rate(y_bucket{le=\\"0.5\\", a=\\"b\\"}[5m])" le="+Inf" file="z"'
    assert LE_MATCHER.findall(text) == [("=", "0.25"), ("=", "0.5"), ("=", "+Inf")]


@pytest.mark.unit
def test_the_bounds_are_fine_where_the_app_lives_and_few_enough():
    bounds = HTTP_DURATION_BUCKETS
    assert list(bounds) == sorted(set(bounds)), "strictly increasing"
    assert len(bounds) + 1 <= MAX_BUCKETS, f"{len(bounds) + 1} buckets with +Inf: series per histogram"
    lo, hi = FINE_RANGE
    assert lo in bounds and hi in bounds
    fine = [b for b in bounds if lo <= b <= hi]
    wide = {(a, b): round(b / a, 3) for a, b in zip(fine, fine[1:], strict=False) if b / a > MAX_RATIO + 1e-9}
    assert not wide, f"buckets wider than x{MAX_RATIO} between {lo * 1000:g} and {hi * 1000:g} ms: {wide}"
    assert set(SEMCONV_DEFAULT) <= set(bounds), set(SEMCONV_DEFAULT) - set(bounds)


@pytest.mark.unit
def test_bucket_width_is_the_share_of_the_lower_bound():
    assert math.isclose(bucket_width([0.002, 0.0025]), 0.25)
    assert bucket_width([0.0, 0.005]) is None and bucket_width([10.0, None]) is None


# --------------------------------------------------------------------------- a steady run through the edge

@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resolution")
    stack = NativeStack(run_dir / "stack").up()
    try:
        before = take_snapshot(stack.prometheus_url)
        truth = run_locust(stack.edge_url, SECONDS, USERS, run_dir, name="locust-resolution", scenario="steady")
        diff = settle(stack.prometheus_url, before, truth["locust_totals"]["num_requests"], timeout=90)
        series = {source: {part: len(prometheus_query(stack.prometheus_url, f"{metric}_{part}{{{matcher}}}"))
                           for part in ("bucket", "count")}
                  for source, (metric, matcher) in SERIES.items()}
    finally:
        stack.down()
    report = build_report(truth, diff, "steady", "the native stack, through its edge")
    print("\n" + format_table(report))
    (run_dir / "compare.json").write_text(json.dumps(report, indent=2))
    return {"report": report, "diff": diff, "truth": truth, "series": series}


@pytest.mark.integration
def test_root_percentiles_come_from_buckets_no_wider_than_a_quarter(steady):
    """The rule holds wherever the bounds are meant to be fine: up to the latency SLO's threshold (100 ms).
    Above it they are coarse by design, and a steady run only gets there when the machine is starved (on
    the 2-core machine shared with five other test runs, load average 17, the edge's p99 of / was seen at 57
    and 196 ms): such a percentile is printed, not judged. Every p50 must be in the fine range, so the test
    never passes on nothing."""
    latency = steady["report"]["latency_seconds"]["/"]
    lines, too_wide, coarse = [], {}, {}
    for source in FINE_SOURCES:
        assert source in latency, f"{source} has no histogram for / (sources: {list(latency)})"
        for q in QUANTILES:
            name = f"p{round(q * 100)}"
            quantile = latency[source][name]
            assert quantile is not None, (source, name)
            lower, upper = quantile["bucket"]
            width = bucket_width(quantile["bucket"])
            where = (round(quantile["value"] * 1000, 3), lower * 1000, upper and upper * 1000)
            lines.append(f"{source:18} {name}: {where[0]} ms in [{where[1]:g}, {where[2]}] ms, "
                         + ("open" if width is None else f"+{width:.0%}"))
            if lower >= FINE_RANGE[1]:
                coarse[(source, name)] = where
            elif width is None or width > MAX_RATIO - 1 + 1e-9:
                too_wide[(source, name)] = (*where, width)
    client = {k: round(v * 1000, 1) for k, v in latency["loadgen"].items()}
    print("\n" + "\n".join(lines) + f"\nlocust (client side): {client} ms")
    if coarse:
        print(f"above {FINE_RANGE[1] * 1000:g} ms, where the buckets are coarse by design: {coarse}")
    assert not too_wide, f"percentiles of / from buckets wider than x{MAX_RATIO} (ms, lower, upper, width): {too_wide}"
    assert not [key for key in coarse if key[1] == "p50"], f"a median above {FINE_RANGE[1]}s: {coarse}"


@pytest.mark.integration
def test_counts_stay_exact_with_the_finer_buckets(steady):
    sent = Counter({(row["name"], str(row["status"])): row["count"] for row in steady["truth"]["sent"]})
    assert sent[("/", "200")] > 100, f"too few requests to say anything about a p99: {sent}"
    for source in FINE_SOURCES:
        counts = steady["diff"].counts[source]
        assert dict(counts) == dict(sent), (source, dict(counts), dict(sent))
        per_route: Counter = Counter()
        for (route, _status), n in sent.items():
            per_route[route] += n
        for route, n in per_route.items():
            cumulative = steady["diff"].buckets[source][route]
            # The +Inf bucket is the histogram's count: every request landed in exactly one bucket.
            assert cumulative[math.inf] == n, (source, route, cumulative[math.inf], n)
            assert set(cumulative) == {*HTTP_DURATION_BUCKETS, math.inf}, (source, route, sorted(cumulative))


@pytest.mark.integration
def test_each_histogram_has_one_series_per_bound_and_inf(steady):
    """The cost: every label set of a histogram has len(bounds) + 1 bucket series (plus _sum and _count)."""
    for source, parts in steady["series"].items():
        label_sets = parts["count"]
        print(f"{source:18} {label_sets} label sets x ({len(HTTP_DURATION_BUCKETS) + 1} buckets + _sum + _count) = "
              f"{label_sets * (len(HTTP_DURATION_BUCKETS) + 3)} series")
        assert label_sets > 0 and parts["bucket"] == label_sets * (len(HTTP_DURATION_BUCKETS) + 1), (source, parts)
