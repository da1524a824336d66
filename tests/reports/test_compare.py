"""The comparison report (`make compare`), run for real: short steady, spike and scan scenarios against one
native stack, the way `make compare` runs against a running compose stack (--prometheus/--app).

Every run must write all three outputs; every source's count must equal what locust sent, on every row
(the scan's 404s included); and every latency the report gives must be what the raw histogram says. The
test reads the raw buckets from Prometheus itself, with its own queries, before and after each run, and
asks Prometheus's own histogram_quantile() for the value, so a wrong bucket, a count off by one or a
source read from the wrong label shows up as a difference.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest

from tooling.native.stack import NativeStack, prometheus_query
from tooling.reports.compare import histogram_quantile

pytestmark = pytest.mark.integration

# Each run short, all three against one stack (about 2 minutes in all on 2 cores): the steady mix, the
# spike's ramp past saturation (its shape is fractions of DICE_SECONDS), and a path scan (404s, "/**").
SCENARIOS = {
    "steady": (["--duration", "15", "--users", "10"], {}),
    "spike": (["--duration", "10"], {}),
    # The scan ends itself after DICE_SCAN_REQUESTS (seconds); DICE_SECONDS, its backstop, is set far
    # beyond the run's timeout below, so a scan that failed to end itself fails the run.
    "scan": (["--users", "10", "--duration", "900"], {"DICE_SCAN_REQUESTS": "600"}),
}
ROUTES = {"steady": {("/", "200"), ("/health", "200"), ("/fail", "500")},
          "spike": {("/", "200"), ("/health", "200"), ("/fail", "500")},
          "scan": {("/**", "404")}}
IN_PROCESS = ("otel", "otel span metrics", "manual")
# Every source that runs here: the in-process three and the edge in front of the app (Beyla needs kprobes).
SOURCES = (*IN_PROCESS, "edge")


@dataclass(frozen=True)
class Histogram:
    """Where the test reads a source's latency buckets: the metric, and the PromQL matcher and the
    report's route for each series. Written apart from tooling.reports.compare's queries on purpose."""

    metric: str
    route_label: str

    def route(self, labels: dict) -> str:
        value = labels.get(self.route_label, "")
        if self.route_label == "span_name":
            # The collector renames an unmatched request's span to the bare method (set_semconv_span_name).
            return "/**" if value == "GET" else value.removeprefix("GET ")
        return value or "/**"

    def selector(self, route: str) -> str:
        if self.route_label == "span_name":
            value = "GET" if route == "/**" else f"GET {route}"
        else:
            value = "" if route == "/**" else route
        return self.metric.replace("}", f', {self.route_label}="{value}"}}')


HISTOGRAMS = {
    "otel": Histogram('http_server_request_duration_seconds_bucket{telemetry_source="otel", service_name="dice-api"}',
                      "http_route"),
    "otel span metrics": Histogram('traces_spanmetrics_latency_bucket{telemetry_source="otel", '
                                   'service_name="dice-api", span_kind="SPAN_KIND_SERVER"}', "span_name"),
    "manual": Histogram('flask_http_request_duration_seconds_bucket{telemetry_source="manual"}', "path"),
    "edge": Histogram('traces_spanmetrics_latency_bucket{telemetry_source="edge", span_kind="SPAN_KIND_SERVER"}',
                      "span_name"),
}


def raw_buckets(prometheus: str) -> dict:
    """source -> route -> le -> cumulative count, summed in Python over every raw series (all instances,
    methods and statuses)."""
    found: dict = {}
    for source, histogram in HISTOGRAMS.items():
        per_route: dict = defaultdict(Counter)
        for row in prometheus_query(prometheus, histogram.metric):
            per_route[histogram.route(row["metric"])][float(row["metric"]["le"])] += float(row["value"][1])
        found[source] = per_route
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    native = NativeStack(tmp_path_factory.mktemp("compare-stack")).up()
    try:
        yield native
    finally:
        native.down()


@pytest.fixture(scope="module", params=list(SCENARIOS))
def run(request, stack, tmp_path_factory):
    scenario = request.param
    args, extra_env = SCENARIOS[scenario]
    out = tmp_path_factory.mktemp(f"compare-{scenario}")
    env = {k: v for k, v in os.environ.items() if k not in ("DICE_SECONDS", "DICE_SCAN_REQUESTS")}
    before, started = raw_buckets(stack.prometheus_url), time.time()
    # A session of its own, so that a run that hangs is stopped with the locust it started.
    process = subprocess.Popen(
        [sys.executable, "-m", "tooling.reports.compare", "--scenario", scenario, *args, "--out", str(out),
         "--prometheus", stack.prometheus_url, "--app", stack.edge_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **extra_env},
        start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"compare --scenario {scenario} did not end within 240 s:\n{stdout[-3000:]}{stderr[-3000:]}")
    print(stdout[-6000:])
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    # compare returns once every source has caught up and nothing else sends traffic the sources count
    # (the healthcheck probe opens and closes an empty connection), so "now" is compare's "after".
    after = raw_buckets(stack.prometheus_url)
    data = json.loads((out / "compare.json").read_text())
    return {"scenario": scenario, "out": out, "stdout": stdout, "data": data, "before": before,
            "after": after, "started": started, "prometheus": stack.prometheus_url}


def test_it_writes_a_table_json_and_a_png(run):
    out, stdout = run["out"], run["stdout"]
    assert "counts (difference from what locust sent)" in stdout and "where each source measures" in stdout
    assert (out / "compare.txt").read_text().strip() in stdout
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_every_source_counts_exactly_what_locust_sent(run):
    data = run["data"]
    assert data["scenario"] == run["scenario"]
    assert data["locust_totals"]["num_failures"] == 0
    assert {(r["route"], r["status"]) for r in data["rows"]} == ROUTES[run["scenario"]]
    assert sum(r["loadgen"] for r in data["rows"]) == data["locust_totals"]["num_requests"]
    assert set(data["sources"]) == set(SOURCES), "Beyla cannot run here; a report must not invent its numbers"
    for row in data["rows"]:
        for source in SOURCES:
            assert row["sources"][source]["diff"] == 0, (source, row)
            assert row["sources"][source]["count"] == row["loadgen"], (source, row)
    assert data["not_sent_but_counted"] == {}


def _cumulative_at(cumulative: dict, bound: float) -> float:
    """The count of observations <= bound; 0 below the first bucket (durations are never negative)."""
    return max((v for le, v in cumulative.items() if le <= bound), default=0.0)


def test_each_reported_quantile_is_what_the_raw_buckets_and_prometheus_say(run):
    data = run["data"]
    sent = Counter()
    for row in data["rows"]:
        sent[row["route"]] += row["loadgen"]
    # Every source with a histogram for the route; the app's own exporter keeps none for unmatched paths.
    expected_sources = {route: set(SOURCES) - ({"manual"} if route == "/**" else set()) for route in sent}
    assert set(data["latency_seconds"]) == set(sent)
    for route, entry in data["latency_seconds"].items():
        assert set(entry) - {"loadgen"} == expected_sources[route], (route, list(entry))
        for source in expected_sources[route]:
            after, before = run["after"][source][route], run["before"][source].get(route, {})
            cumulative = {le: after[le] - before.get(le, 0.0) for le in after}
            bounds = sorted(cumulative)
            total = cumulative[math.inf]
            # The histogram counted exactly the route's requests (its +Inf bucket is its count).
            assert total == sent[route], (route, source, total, sent[route])
            for name, reported in entry[source].items():
                assert reported is not None, (route, source, name, entry[source])
                q = int(name[1:]) / 100
                lower, upper = reported["bucket"]
                upper = math.inf if upper is None else upper
                where = (route, source, name, reported, cumulative)
                # The bucket is one real bucket: adjacent bounds of this histogram (0 below the first).
                assert upper in bounds and lower == ([0.0] + bounds)[bounds.index(upper)], where
                # ... and the one holding the quantile: fewer than q of the requests at or below its lower
                # bound, at least q at or below its upper bound.
                assert _cumulative_at(cumulative, lower) < q * total <= cumulative[upper], where
                # The value is Prometheus's own histogram_quantile over the same before/after difference.
                expected = prometheus_quantile(run, source, route, q)
                assert math.isclose(reported["value"], expected, rel_tol=1e-9, abs_tol=1e-12), (*where, expected)


def prometheus_quantile(run: dict, source: str, route: str, q: float) -> float:
    series = HISTOGRAMS[source].selector(route)
    # Buckets that had no series before the run count from zero (`or ... * 0`).
    delta = (f"sum by (le) ({series}) - (sum by (le) ({series} @ {run['started']:.3f}) "
             f"or sum by (le) ({series}) * 0)")
    result = prometheus_query(run["prometheus"], f"histogram_quantile({q}, {delta})")
    assert len(result) == 1, (source, route, result)
    return float(result[0]["value"][1])


def test_in_process_latency_never_starts_above_what_the_client_measured(run):
    """Every request's in-process duration is part of the same request's duration at locust (the client's
    clock starts before the request is sent and stops after the whole answer arrived), and both sides
    counted the same requests (asserted above), so each order statistic in-process is at most locust's.
    The true in-process quantile lies above its bucket's lower bound, so that bound is below locust's
    quantile. (The interpolated value itself is not bounded: it can sit anywhere in the bucket.)"""
    for route, entry in run["data"]["latency_seconds"].items():
        client = entry["loadgen"]
        assert all(client[name] > 0 for name in ("p50", "p95", "p99")), (route, client)
        for source in set(entry) - {"loadgen"}:
            for name, reported in entry[source].items():
                where = (route, source, name, reported, client[name])
                assert reported is not None and reported["bucket"][0] < client[name], where


@pytest.mark.unit
def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    cumulative = {0.005: 0, 0.01: 50, 0.025: 90, 0.05: 100, float("inf"): 100}
    assert histogram_quantile(0.5, cumulative) == {"value": 0.01, "bucket": [0.005, 0.01]}
    p95 = histogram_quantile(0.95, cumulative)
    assert p95["bucket"] == [0.025, 0.05] and abs(p95["value"] - 0.0375) < 1e-9
    assert histogram_quantile(0.5, {0.1: 0, float("inf"): 0}) is None
    # Past the last finite bucket, all a histogram can say is "above it".
    assert histogram_quantile(0.99, {0.1: 10, float("inf"): 100}) == {"value": 0.1, "bucket": [0.1, None]}


def test_the_edge_sees_the_wait_for_a_worker_that_in_process_sources_miss(run):
    """The spike queues requests in gunicorn's listen backlog: the client and the edge in front of the app wait,
    the worker's own clock starts only when it reads the request. So the edge's p95 is of the client's order
    of magnitude, while every in-process p95 stays a small fraction of it."""
    if run["scenario"] != "spike":
        pytest.skip("only the spike saturates the workers")
    latency = run["data"]["latency_seconds"]["/"]
    client, edge = latency["loadgen"]["p95"], latency["edge"]["p95"]["value"]
    assert client / 10 <= edge, ("the edge's p95 is not of the client's order of magnitude", edge, client)
    for source in IN_PROCESS:
        in_process = latency[source]["p95"]["value"]
        print(f"spike p95 of /: client {client * 1000:.1f} ms, edge {edge * 1000:.1f} ms, "
              f"{source} {in_process * 1000:.1f} ms")
        assert in_process <= edge / 4, (source, "in-process p95 is not flat under the spike", in_process, edge)
