"""The comparison report (`make compare`), run for real: a short steady scenario on the native stack.

It must write all three outputs, and its counts for otel and manual must equal what locust sent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tooling.compare import histogram_quantile

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = subprocess.run(
        [sys.executable, "-m", "tooling.compare", "--scenario", "steady", "--duration", "15", "--users", "10",
         "--out", str(out)], capture_output=True, text=True, timeout=400)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_it_writes_a_table_json_and_a_png(report):
    out, stdout = report
    assert "counts (difference from what locust sent)" in stdout and "where each source measures" in stdout
    assert (out / "compare.txt").read_text().strip() in stdout
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_otel_and_manual_counts_equal_what_locust_sent(report):
    out, _ = report
    data = json.loads((out / "compare.json").read_text())
    assert data["locust_totals"]["num_failures"] == 0
    assert {(r["route"], r["status"]) for r in data["rows"]} == {("/", "200"), ("/health", "200"), ("/fail", "500")}
    for row in data["rows"]:
        for source in ("otel", "otel span metrics", "manual"):
            assert row["sources"][source]["diff"] == 0, (source, row)
    assert "ebpf" not in data["sources"], "Beyla cannot run here; a report must not invent its numbers"
    for route, entry in data["latency_seconds"].items():
        assert entry["loadgen"]["p50"] > 0, route
        for source in ("otel", "manual"):
            p95 = entry[source]["p95"]
            lower, upper = p95["bucket"]
            assert lower <= p95["value"] <= upper, (route, source, p95)


@pytest.mark.unit
def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    cumulative = {0.005: 0, 0.01: 50, 0.025: 90, 0.05: 100, float("inf"): 100}
    assert histogram_quantile(0.5, cumulative) == {"value": 0.01, "bucket": [0.005, 0.01]}
    p95 = histogram_quantile(0.95, cumulative)
    assert p95["bucket"] == [0.025, 0.05] and abs(p95["value"] - 0.0375) < 1e-9
    assert histogram_quantile(0.5, {0.1: 0, float("inf"): 0}) is None
    # Past the last finite bucket, all a histogram can say is "above it".
    assert histogram_quantile(0.99, {0.1: 10, float("inf"): 100}) == {"value": 0.1, "bucket": [0.1, None]}
