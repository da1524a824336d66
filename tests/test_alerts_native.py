"""The alert rules on the real pipeline (native stack, no Docker): gentle steady load sets off nothing.

promtool's unit tests (tests/data/*.test.yaml) prove each alert fires on made-up series. This proves the
other half on real ones: the app under locust's `steady` scenario (compose's background load: 5 users,
about 5 req/s), with the three sources publishing on their own schedules, never makes a drift alert
pending, let alone firing, and every rule evaluates without error. Beyla cannot run here (no kprobes),
so BeylaTargetDown is expected, and must be pending: that shows the alert rules are being evaluated.
"""

from __future__ import annotations

import time

import pytest
import requests

from tooling.native import NativeStack, prometheus_query, run_locust

pytestmark = pytest.mark.integration

LOAD_SECONDS = 60
USERS = 5  # compose's background load (locust/locust.env)
EXPECTED = {"BeylaTargetDown": "Beyla needs kprobes, which these machines lack: its target is down"}
DRIFT = {"DiceTelemetrySourceSilent", "DiceTelemetrySourcesDisagree", "OtelCollectorRefusingData",
         "OtelCollectorExportFailing"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    native = NativeStack(tmp_path_factory.mktemp("alerts-native")).up()
    yield native
    native.down()


def test_steady_load_sets_off_no_drift_alert(stack):
    started, load_started = time.monotonic(), time.time()
    truth = run_locust(stack.app_url, LOAD_SECONDS, USERS, stack.run_dir, scenario="steady",
                       otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
    assert sum(row["count"] for row in truth["sent"]) > LOAD_SECONDS * USERS / 2, truth
    # Let the last SDK export (every 10 s) and app scrape (every 15 s) land, and the rules run on them.
    time.sleep(20)
    span = f"{int(time.monotonic() - started) + 30}s"

    # Every alert that was pending or firing at any evaluation since the stack started.
    seen = {}
    for series in stack.query(f"max_over_time(ALERTS[{span}])"):
        labels = series["metric"]
        seen.setdefault(labels["alertname"], set()).add(
            (labels.get("alertstate"), labels.get("telemetry_source"), labels.get("route")))
    unexpected = {name: states for name, states in seen.items() if name not in EXPECTED}
    assert not set(unexpected) & DRIFT, f"drift alerts set off by the steady load: {unexpected}"
    assert not unexpected, f"alerts set off by the steady load: {unexpected}"
    assert "pending" in {state for state, _, _ in seen.get("BeylaTargetDown", set())}, seen
    now = requests.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert {a["labels"]["alertname"] for a in now} <= set(EXPECTED), now

    # Every rule ran without error on real series (a many-to-many match, say, fails only at run time).
    groups = requests.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    broken = {rule["name"]: rule.get("lastError") for group in groups for rule in group["rules"]
              if rule.get("health") != "ok"}
    assert not broken, broken

    # The drift alerts had something to compare, and the SLIs and the clients' view had data. The rates
    # are those of the load's last 30 s (after the stop, the sources' 1-minute rates fall at different
    # times: the transient that the alerts' 5-minute guards leave out).
    rates = prometheus_query(stack.prometheus_url, 'avg_over_time(dice:http_requests_by_route:rate1m'
                             '{telemetry_source=~"otel|manual|loadgen"}[30s])', time=load_started + LOAD_SECONDS - 2)
    by_route: dict[str, dict[str, float]] = {}
    for series in rates:
        by_route.setdefault(series["metric"]["route"], {})[series["metric"]["telemetry_source"]] = \
            float(series["value"][1])
    assert {"otel", "manual"} <= set(by_route.get("/", {})), by_route
    print("\nreq/s per route over the load's last 30 s:", {r: {s: round(v, 2) for s, v in sorted(src.items())}
                                                     for r, src in sorted(by_route.items())})
    for route, sources in by_route.items():
        observed = {s: v for s, v in sources.items() if s != "loadgen"}
        if len(observed) > 1 and max(observed.values()) > 0:
            spread = 1 - min(observed.values()) / max(observed.values())
            print(f"  {route}: otel/manual spread {spread:.1%} (DiceTelemetrySourcesDisagree tolerance 10 %)")
    slis = stack.query("slo:sli_error:ratio_rate5m")
    assert {s["metric"]["sloth_slo"] for s in slis} == {"requests-availability", "requests-latency"}, slis
    print("SLI error ratios (5m):", {s["metric"]["sloth_slo"]: float(s["value"][1]) for s in slis})
    assert stack.query('locust_client_duration_seconds_count{telemetry_source="loadgen"}'), "no loadgen series"
