"""The SLOs: prometheus/slo/dice-slos.yaml (a Sloth spec) and the rules Sloth generates from it.

The SLIs are measured at the edge (the span metrics of its SERVER spans): these tests hold the spec to
that source and its latency threshold to a bucket boundary of the edge's histogram.

prometheus/rules/dice-slo.yaml is committed so that Prometheus needs no Sloth; these tests regenerate it
with Sloth built from its Go module (tooling.builds, row `sloth`) and fail on any drift, and check that what was
generated is the multiwindow, multi-burn-rate table the spec promises. Its alerts' firing and quiet cases
are promtool unit tests (tests/data/dice-slo.test.yaml, run by tests/prometheus/test_prometheus.py).
"""

from __future__ import annotations

import difflib
import re
import subprocess

import pytest
import yaml

from tooling import config
from tooling.builds import binaries, binary
from tooling.builds.recipes import SLOTH_VERSION
from tooling.native import drills as alert_drills

SPEC = config.SPEC
GENERATED = config.GENERATED

# Sloth's built-in 30-day windows (internal/alert/windows/google-30d.yaml in its v0.16.0 module): per
# severity, (short window, long window, burn-rate factor) of each pair.
MWMB = {
    "page": {("5m", "1h", 14.4), ("30m", "6h", 6.0)},
    "ticket": {("2h", "1d", 3.0), ("6h", "3d", 1.0)},
}


def spec() -> dict:
    return yaml.safe_load(SPEC.read_text())


def generated_alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(GENERATED.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def windows_of(expr: str) -> tuple[set[tuple[str, str, float]], set[float]]:
    """The (short, long, factor) pairs of a Sloth alert expression, and the error budgets it uses."""
    terms = re.findall(r"slo:sli_error:ratio_rate(\w+)\{[^}]*\} > \(([\d.]+) \* ([\d.]+)\)", expr)
    assert len(terms) == 4, expr
    pairs = {(terms[i][0], terms[i + 1][0], float(terms[i][1])) for i in (0, 2)}
    assert all(terms[i][1] == terms[i + 1][1] for i in (0, 2)), "both windows of a pair must share the factor"
    return pairs, {float(term[2]) for term in terms}


@pytest.mark.unit
def test_generated_alerts_follow_the_multiwindow_multi_burn_rate_table():
    objectives = {slo["alerting"]["name"]: slo["objective"] for slo in spec()["slos"]}
    seen = set()
    for alert in generated_alerts():
        severity = alert["labels"]["sloth_severity"]
        pairs, budgets = windows_of(alert["expr"])
        assert pairs == MWMB[severity], f"{alert['alert']} ({severity}): {pairs}"
        (budget,) = budgets
        assert budget == pytest.approx(1 - objectives[alert["alert"]] / 100), alert["alert"]
        assert alert["labels"]["severity"] == severity
        seen.add((alert["alert"], severity))
    assert seen == {(name, severity) for name in objectives for severity in MWMB}


EDGE_SELECTOR = ('telemetry_source="edge"', 'service_name="edge"', 'span_kind="SPAN_KIND_SERVER"', 'span_name="GET /"')
COLLECTOR_CONFIG = config.REPO_ROOT / "otel-collector" / "otel-collector-config.yaml"


def span_metrics_bounds() -> set[float]:
    """The explicit bucket bounds of the collector's span_metrics histogram, in seconds (the edge's)."""
    histogram = yaml.safe_load(COLLECTOR_CONFIG.read_text())["connectors"]["span_metrics"]["histogram"]
    units = {"ms": 0.001, "s": 1.0}
    return {round(float(m.group(1)) * units[m.group(2)], 9)
            for m in (re.fullmatch(r"([\d.]+)(ms|s)", str(b)) for b in histogram["explicit"]["buckets"])}


@pytest.mark.unit
def test_every_slo_is_measured_at_the_edge_on_the_user_facing_route_only():
    """The SLIs read the span metrics of the edge's SERVER spans of `GET /` (prometheus/slo/dice-slos.yaml
    says why): what users got, queueing and the edge's own 502s included. Never /fail, never the edge's
    CLIENT hop into the app, never an in-process histogram (those are the diagnostic of service time)."""
    slos = spec()["slos"]
    assert {slo["name"] for slo in slos} >= {"requests-availability", "requests-latency"}
    assert spec()["labels"]["sli_source"] == "edge"
    for slo in slos:
        for query in slo["sli"]["events"].values():
            selectors = re.findall(r"(\w+)\{([^}]*)\}", query.replace("{{.window}}", ""))
            assert selectors, query
            for metric, selector in selectors:
                assert metric.startswith("traces_spanmetrics_latency_"), metric
                assert all(part in selector.split(",") for part in EDGE_SELECTOR), selector


@pytest.mark.unit
def test_the_latency_threshold_is_a_bucket_boundary_of_the_edges_histogram():
    """0.1 s is counted exactly (a bucket's cumulative count), not interpolated between two bounds."""
    (latency,) = [s for s in spec()["slos"] if s["name"] == "requests-latency"]
    thresholds = set(re.findall(r'le="([^"]+)"', latency["sli"]["events"]["error_query"]))
    assert thresholds == {"0.1"}, thresholds
    assert 0.1 in span_metrics_bounds(), sorted(span_metrics_bounds())


@pytest.mark.unit
def test_the_generated_file_says_it_is_generated_and_how_to_regenerate():
    head = GENERATED.read_text().splitlines()[:6]
    assert head[0].startswith("# GENERATED FILE, do not edit") and "prometheus/slo/dice-slos.yaml" in head[0]
    assert any("python -m tooling.config slo" in line for line in head)
    assert f"Sloth {SLOTH_VERSION}" in head[0]


# ------------------------------------------------------------------------------- with the real Sloth


@pytest.fixture(scope="module")
def sloth():
    # Builds on first use (about 2 minutes with Go's caches cold), then reuses .cache/sloth/.
    return binary("sloth")


@pytest.mark.integration
def test_sloth_is_the_pinned_version(sloth):
    shown = subprocess.run([str(sloth), "version"], capture_output=True, text=True, timeout=30)
    assert shown.stdout.strip() == SLOTH_VERSION, shown.stdout + shown.stderr


@pytest.mark.integration
def test_committed_rules_are_what_sloth_generates_from_the_spec(sloth):
    expected = config.generate(sloth=sloth)
    committed = GENERATED.read_text()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                        "committed " + GENERATED.name, "generated from " + SPEC.name, n=1))
    assert committed == expected, (f"{GENERATED.name} differs from what Sloth generates from {SPEC.name}; "
                                   f"run `python -m tooling.config slo`:\n{diff[:4000]}")


@pytest.mark.integration
def test_a_changed_spec_is_caught(sloth, tmp_path):
    """Negative control: an objective changed in the spec alone makes the generated rules differ."""
    changed = tmp_path / "dice-slos.yaml"
    changed.write_text(SPEC.read_text().replace("objective: 99.5", "objective: 99.9", 1))
    assert changed.read_text() != SPEC.read_text()
    assert config.generate(changed, sloth=sloth) != GENERATED.read_text()


@pytest.mark.integration
def test_promtool_accepts_what_sloth_generates(sloth, tmp_path):
    # `promtool check rules` on every committed rule file is tests/prometheus/test_prometheus.py's; this checks the
    # fresh output too, which must also load beside the other rule files (no clashing group names).
    fresh = tmp_path / "dice-slo.yaml"
    fresh.write_text(config.generate(sloth=sloth))
    others = sorted(path for path in GENERATED.parent.glob("*.yaml") if path != GENERATED)
    promtool = binaries("prometheus")[1]
    result = subprocess.run([str(promtool), "check", "rules", str(fresh), *map(str, others)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    groups = [g["name"] for path in [fresh, *others] for g in yaml.safe_load(path.read_text())["groups"]]
    assert len(groups) == len(set(groups)), groups


# --- drills: time-compressed copies for tests that fire alerts for real (tooling/native/drills.py) --------

@pytest.mark.unit
def test_the_sloth_windows_the_drills_scale_are_the_committed_ones():
    def factor(budget_percent: float, long: float) -> float:
        # The budget share spent in the long window, as a multiple of the 30-day period's steady burn.
        return round(budget_percent / 100 * alert_drills.SLO_PERIOD_SECONDS / long, 1)

    scaled = {severity: {(alert_drills.duration(short), alert_drills.duration(long), factor(budget, long))
                         for budget, short, long in speeds.values()}
              for severity, speeds in alert_drills.SLO_WINDOWS_30D.items()}
    assert scaled == MWMB


@pytest.mark.unit
def test_a_drift_drill_divides_every_window_and_labels_every_alert():
    assert alert_drills.compress_expr("max_over_time(x[5m]) and y offset 5m and z[1h:1m]", 10) == \
        "max_over_time(x[30s]) and y offset 30s and z[6m:6s]"
    assert [alert_drills.seconds(d) for d in ("1h30m", "25s", "2m30s", "500ms")] == [5400, 25, 150, 0.5]
    assert alert_drills.duration(150) == "2m30s" and alert_drills.duration(0.5) == "500ms"
    committed = [rule for group in yaml.safe_load(alert_drills.DRIFT_RULES.read_text())["groups"]
                 for rule in group["rules"] if "alert" in rule]
    # Every alert but the undrilled ones (each of which exists, so the list cannot go stale unseen).
    assert alert_drills.UNDRILLED <= {r["alert"] for r in committed}
    committed = [r for r in committed if r["alert"] not in alert_drills.UNDRILLED]
    drill = [rule for group in yaml.safe_load(alert_drills.drift_drill(10))["groups"] for rule in group["rules"]]
    assert [r["alert"] for r in drill] == [r["alert"] for r in committed]
    for mine, theirs in zip(drill, committed, strict=True):
        assert mine["labels"] == {**theirs["labels"], "drill": "x10"}
        if "for" in theirs:
            assert alert_drills.seconds(mine["for"]) * 10 == alert_drills.seconds(theirs["for"])
        ranges = [alert_drills.seconds(d) for d in re.findall(r"\[(\w+)\]", theirs["expr"])]
        assert [alert_drills.seconds(d) * 10 for d in re.findall(r"\[(\w+)\]", mine["expr"])] == ranges


@pytest.mark.integration
def test_an_slo_drill_keeps_the_burn_rates_and_divides_the_windows(sloth):
    rules = yaml.safe_load(alert_drills.slo_drill(12))
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert {a["alert"] for a in alerts} == {a["alert"] for a in generated_alerts()}
    for alert in alerts:
        # The alert's labels come from the recording rules it reads, which carry `drill`.
        assert f'sloth_service="{alert_drills.drill_service(12)}"' in alert["expr"]
        pairs = set(re.findall(r"ratio_rate(\w+)\{[^}]*\} > \(([\d.]+) \*", alert["expr"]))
        windows = {alert_drills.seconds(w) for w, _ in pairs}
        factors = {float(f) for _, f in pairs}
        expected = {factor for pairs_ in MWMB.values() for _, _, factor in pairs_}
        assert factors <= expected and windows <= {300 / 12, 3600 / 12, 1800 / 12, 6 * 3600 / 12, 7200 / 12,
                                                    86400 / 12, 3 * 86400 / 12}, alert["expr"]
    # Its own service name, so that its recording rules never collide with the committed ones.
    records = {(r["record"], r["labels"]["sloth_service"]) for g in rules["groups"] for r in g["rules"]
               if "record" in r}
    assert {service for _, service in records} == {alert_drills.drill_service(12)}
    assert all(r["labels"]["drill"] == "x12" for g in rules["groups"] for r in g["rules"] if "record" in r)
