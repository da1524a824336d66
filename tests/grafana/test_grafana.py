"""Grafana provisioning: datasources and their links, the dashboards, and the admin-password entrypoint.

Every PromQL query (dashboard targets and the trace-to-metrics links) is parsed by the real promtool,
as a recording rule; the metric names they use must be ones the stack produces (the contract's names
and the recording rules in prometheus/rules), because a wrong name shows as "No data", not an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from stackfiles import (
    GRAFANA_VARIABLE,
    REPO_ROOT,
    SOURCE_VARIABLE,
    bind_mounts,
    compose,
    dashboard_panels,
    dotenv,
    named_volumes,
    source_values,
    with_source,
)

GRAFANA = REPO_ROOT / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
ENTRYPOINT = GRAFANA / "entrypoint.sh"

EXPECTED_DATASOURCES = {
    "prometheus": "prometheus",
    "tempo": "tempo",
    "loki": "loki",
    "pyroscope": "grafana-pyroscope-datasource",
    "alertmanager": "alertmanager",
}
CPU_PROFILE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"

# Metric names the stack produces (the shared contract): OTel SDK and Beyla share the HTTP histogram;
# the app's own prometheus-flask-exporter; the collector's span-metrics and service-graph connectors;
# Beyla's application_process feature (Beyla's docs/sources/metrics.md); Prometheus's `up`.
KNOWN_METRICS = {
    *(f"http_server_request_duration_seconds_{s}" for s in ("bucket", "count", "sum")),
    *(f"flask_http_request_duration_seconds_{s}" for s in ("bucket", "count", "sum")),
    "flask_http_request_total",
    "app_info",
    "traces_spanmetrics_calls_total",
    *(f"locust_client_duration_seconds_{s}" for s in ("bucket", "count", "sum")),
    *(f"traces_spanmetrics_latency_{s}" for s in ("bucket", "count", "sum")),
    "process_cpu_time_seconds_total",
    "process_cpu_utilization_ratio",
    "process_memory_usage_bytes",
    "process_memory_virtual_bytes",
    "process_disk_io_bytes_total",
    "process_network_io_bytes_total",
    "http_server_active_requests",  # the OTel SDK's http.server.active_requests (Flask/WSGI instrumentation)
    "up",
    "ALERTS",  # Prometheus's own series of the alerts pending or firing
}
KNOWN_METRIC_PREFIXES = ("traces_service_graph_",)
SOURCES = {"manual", "otel", "ebpf", "edge", "loadgen"}
# The sources inside the app's process or kernel: a query that lists two of them compares sources, and must
# list the edge (what users got) beside them.
IN_PROCESS = {"manual", "otel", "ebpf"}


def recording_rules() -> set[str]:
    names = set()
    for path in (REPO_ROOT / "prometheus" / "rules").glob("*.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def selected_metrics(expr: str) -> set[str]:
    """Metric names used with a {…} selector (every query here writes its selectors with braces)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))


def promtool_check(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Parse every expression with the real PromQL parser, as recording rules."""
    from tooling.builds import binaries

    exe = binaries("prometheus")[1]  # the compose image's version, built from its Go module
    rules = {"groups": [{"name": "queries", "rules": [{"record": n, "expr": e} for n, e in exprs.items()]}]}
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def provisioned() -> dict:
    return yaml.safe_load(DATASOURCES.read_text())


def datasources() -> dict[str, dict]:
    return {ds["uid"]: ds for ds in provisioned()["datasources"]}


panels = dashboard_panels


def prometheus_targets(dashboard: dict):
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
            if uid == "prometheus":
                yield panel, target


def load_dashboard(name: str) -> dict:
    return json.loads((GRAFANA / "dashboards" / f"{name}.json").read_text())


def sections(dashboard: dict) -> dict[str, list[dict]]:
    """The panels under each row of the dashboard, by the row's title (rows are not collapsed here)."""
    found, current = {}, None
    for panel in sorted(panels(dashboard), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = found.setdefault(panel["title"], [])
        elif current is not None:
            current.append(panel)
    return found


def exprs_of(panel_list) -> str:
    return " ".join(target.get("expr", "") for panel in panel_list for target in panel.get("targets", []))


def trace_to_metrics_queries() -> list[str]:
    queries = datasources()["tempo"]["jsonData"]["tracesToMetrics"]["queries"]
    # What Grafana runs: `$$` unescaped by provisioning, $__tags replaced by the span's tag matchers.
    return [q["query"].replace("$$", "$").replace("$__tags", 'service_name="dice-api"') for q in queries]


# --- datasources -------------------------------------------------------------------------------------


@pytest.mark.unit
def test_datasources_have_fixed_uids_and_types():
    assert {uid: ds["type"] for uid, ds in datasources().items()} == EXPECTED_DATASOURCES
    assert sum(bool(ds.get("isDefault")) for ds in datasources().values()) == 1


@pytest.mark.unit
def test_prometheus_exemplars_link_to_tempo_by_trace_id():
    (destination,) = datasources()["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # The collector's exporters name the exemplar label trace_id (not traceID).
    assert destination == {**destination, "name": "trace_id", "datasourceUid": "tempo"}


@pytest.mark.unit
def test_prometheus_min_step_is_the_scrape_interval():
    # A smaller step than the scrape interval draws gaps; a larger one hides samples.
    config = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus-config.yaml").read_text())
    assert datasources()["prometheus"]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


@pytest.mark.unit
def test_traces_link_to_profiles_by_service_name_and_cpu_profile():
    link = datasources()["tempo"]["jsonData"]["tracesToProfiles"]
    assert link["datasourceUid"] == "pyroscope"
    assert link["profileTypeId"] == CPU_PROFILE
    assert {"key": "service.name", "value": "service_name"} in link["tags"]


@pytest.mark.unit
def test_traces_link_to_metrics_and_service_map():
    json_data = datasources()["tempo"]["jsonData"]
    assert json_data["tracesToMetrics"]["datasourceUid"] == "prometheus"
    assert {"key": "service.name", "value": "service_name"} in json_data["tracesToMetrics"]["tags"]
    assert json_data["serviceMap"]["datasourceUid"] == "prometheus"
    assert json_data["nodeGraph"]["enabled"] is True


def grafana_sees(value: str) -> str:
    """A provisioned value as Grafana uses it: `$$` is a literal `$` (no environment variable is used here)."""
    return value.replace("$$", "$")


@pytest.mark.unit
def test_loki_is_the_compose_service_on_its_port():
    loki = datasources()["loki"]
    port = yaml.safe_load((REPO_ROOT / "loki" / "loki-config.yaml").read_text())["server"]["http_listen_port"]
    assert loki["url"] == f"http://loki:{port}" and loki["access"] == "proxy"


@pytest.mark.unit
def test_log_lines_link_to_their_trace_by_the_trace_id_structured_metadata():
    (field,) = datasources()["loki"]["jsonData"]["derivedFields"]
    # Loki keeps an OTLP record's trace id as structured metadata trace_id, not in the line: the field is
    # read from the line's labels (matcherType label), whose name matcherRegex matches, here exactly.
    assert field["matcherType"] == "label"
    pattern = re.compile(grafana_sees(field["matcherRegex"]))
    assert pattern.search("trace_id")
    assert not any(pattern.search(name) for name in ("span_id", "otelTraceID", "trace_id_x", "parent_trace_id"))
    # An internal link: the value is the query of the Tempo datasource, i.e. the trace id itself.
    assert field["datasourceUid"] == "tempo"
    assert grafana_sees(field["url"]) == "${__value.raw}"


@pytest.mark.unit
def test_traces_link_to_their_logs_in_loki_by_trace_id():
    link = datasources()["tempo"]["jsonData"]["tracesToLogsV2"]
    assert link["datasourceUid"] == "loki"
    # service.name is Loki's stream label service_name (Loki's default OTLP mapping, loki/loki-config.yaml).
    assert link["tags"] == [{"key": "service.name", "value": "service_name"}]
    assert link["filterByTraceID"] is True
    # The query Grafana runs: the tags as stream selector, the trace id matched on structured metadata.
    assert link["customQuery"] is True
    assert grafana_sees(link["query"]) == '{${__tags}} | trace_id="${__trace.traceId}"'
    # Once Grafana fills in the tags, a stream the overview's logs panel selects too: that panel takes the app
    # by any service name (APP_SERVICES), the link the one of the span it starts from.
    ((_, target),) = loki_targets(load_dashboard("stack-overview"))
    assert target["expr"].split(" | ")[0] == APP_SERVICES, target["expr"]
    assert_selects_the_app_alone(APP_SERVICES)


@pytest.mark.unit
def test_alertmanager_is_the_one_prometheus_sends_to():
    alertmanager = datasources()["alertmanager"]
    prometheus = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus-config.yaml").read_text())
    (target,) = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager["url"] == f"http://{target}"
    # Prometheus's Alertmanager, not Mimir's (Grafana's default), which has other API paths; and
    # Grafana's own alert rules are not routed into it.
    assert alertmanager["jsonData"] == {"implementation": "prometheus", "handleGrafanaManagedAlerts": False}


@pytest.mark.unit
def test_every_datasource_link_points_to_a_provisioned_datasource():
    def uids(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasourceUid":
                    yield value
                else:
                    yield from uids(value)
        elif isinstance(node, list):
            for item in node:
                yield from uids(item)

    linked = set(uids(provisioned()))
    assert linked and linked <= set(datasources())


@pytest.mark.unit
def test_grafana_variables_are_escaped_from_provisioning_interpolation():
    # Provisioning expands $VAR and ${VAR} in values; Grafana's own $__tags must be written $$__tags.
    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    values = list(strings(provisioned()))
    assert any("$$__tags" in value for value in values)
    for value in values:
        assert "$" not in value.replace("$$", ""), f"unescaped $ in {value!r}"


@pytest.mark.integration  # builds Prometheus's promtool
def test_trace_to_metrics_queries_parse_and_use_known_metrics(tmp_path):
    queries = trace_to_metrics_queries()
    result = promtool_check({f"link:q{i}": q for i, q in enumerate(queries)}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for query in queries:
        assert selected_metrics(query) <= KNOWN_METRICS, query


# --- dashboards --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_dashboards_exist_and_are_valid_json():
    assert DASHBOARDS, "grafana/dashboards/ has no dashboard"
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids), "dashboard uids must be unique"
    assert "stack-overview" in uids


@pytest.mark.unit
def test_dashboard_provider_reads_the_mounted_directory():
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    mounts = dict(bind_mounts(compose()["services"]["grafana"]))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()


@pytest.mark.unit
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_references_only_provisioned_datasources(path):
    dashboard = json.loads(path.read_text())
    known = datasources()
    assert "${DS_" not in path.read_text(), "import placeholders do not resolve in provisioned dashboards"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels(dashboard):
        refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ref in filter(None, refs):
            assert ref["uid"] in known, f"panel {panel['title']!r}: unknown datasource uid {ref['uid']!r}"
            assert ref["type"] == known[ref["uid"]]["type"], f"panel {panel['title']!r}: wrong type for {ref}"
        if panel["type"] not in ("row", "text"):
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"


@pytest.mark.integration  # builds Prometheus's promtool
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_promql_parses_and_uses_known_metrics(path, tmp_path):
    dashboard = json.loads(path.read_text())
    exprs = {}
    allowed = KNOWN_METRICS | recording_rules()
    for panel, target in prometheus_targets(dashboard):
        where = f"panel {panel['title']!r} query {target['refId']}"
        assert target.get("expr", "").strip(), f"{where}: empty expr"
        for source, expr in with_source(dashboard, target["expr"]):
            suffix = f"_{source}" if source else ""
            # Plain PromQL (after $source), so tests can run every query against a real Prometheus.
            assert not GRAFANA_VARIABLE.search(expr), f"{where}: Grafana variables make the query untestable: {expr}"
            metrics = selected_metrics(expr)
            assert metrics, f'{where}: write selectors with braces, e.g. up{{job=~".+"}}: {expr}'
            unknown = {m for m in metrics if m not in allowed and not m.startswith(KNOWN_METRIC_PREFIXES)}
            assert not unknown, f"{where}: metrics nobody produces: {unknown}"
            for named in re.findall(r'telemetry_source\s*=~?\s*"([^"]+)"', expr):
                assert set(named.split("|")) <= SOURCES, f"{where}: telemetry_source {named!r}"
            exprs[f"dashboard:panel{panel['id']}_{target['refId']}{suffix}"] = expr
    assert exprs, "no PromQL in the dashboard"
    result = promtool_check(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration  # builds Prometheus's promtool
def test_the_promql_check_rejects_a_broken_query(tmp_path):
    result = promtool_check({"dashboard:broken": "sum by (route (rate(up[1m]))"}, tmp_path)
    assert result.returncode != 0


@pytest.mark.unit
def test_overview_compares_the_four_sources_and_shows_traces_and_profiles():
    dashboard = json.loads((GRAFANA / "dashboards" / "stack-overview.json").read_text())
    exprs = " ".join(target["expr"] for _, target in prometheus_targets(dashboard))
    assert 'telemetry_source=~"edge|ebpf|otel|manual"' in exprs
    kinds = {(panel.get("datasource") or {}).get("uid") for panel in panels(dashboard)}
    assert {"prometheus", "tempo", "loki", "pyroscope"} <= kinds
    (profile,) = [t for p in panels(dashboard) if p["type"] == "flamegraph" for t in p["targets"]]
    assert profile["profileTypeId"] == CPU_PROFILE
    # The app's profiles, under whatever service name it runs (OWN_APP_SERVICE_NAME, docker-compose.own-app.yml).
    assert profile["labelSelector"] == APP_SERVICES
    assert_selects_the_app_alone(APP_SERVICES)


# The app's traces, logs and profiles in the overview: every service but the stack's own senders (the edge's
# spans, locust's), so the panels follow the app whatever OWN_APP_SERVICE_NAME calls it. LogQL and Pyroscope need
# one matcher that cannot match the empty value, hence `=~".+"` beside the exclusion.
APP_SERVICES = '{service_name=~".+", service_name!~"edge|locust"}'


def assert_selects_the_app_alone(selector: str) -> None:
    """The selector's matchers, applied as Prometheus, Loki and Pyroscope apply them (fully anchored RE2, here
    Python's re), take the dice API and any other app name, and neither the edge nor locust."""
    matchers = re.findall(r'(\w+)(=~|!~|=|!=)"([^"]*)"', selector)
    assert matchers and all(label == "service_name" for label, _, _ in matchers), selector

    def selects(name: str) -> bool:
        checks = {"=": lambda v: name == v, "!=": lambda v: name != v,
                  "=~": lambda v: re.fullmatch(v, name) is not None, "!~": lambda v: re.fullmatch(v, name) is None}
        return all(checks[op](value) for _, op, value in matchers)

    app = dotenv(REPO_ROOT / "app" / "app.env")["OTEL_SERVICE_NAME"]
    assert selects(app) and selects("shop-api") and not selects("edge") and not selects("locust"), selector
    assert not selects(""), f"{selector}: Loki refuses a selector that can match the empty value"


def loki_targets(dashboard: dict):
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel.get("datasource") or {}).get("uid") == "loki":
                yield panel, target


@pytest.mark.unit
def test_overview_shows_recent_error_logs_of_the_app_linked_to_their_traces():
    dashboard = load_dashboard("stack-overview")
    ((panel, target),) = loki_targets(dashboard)
    assert panel["type"] == "logs"
    # The stream label from service.name (any app's but the edge's and locust's), then the OTLP severity
    # (structured metadata): Python's ERROR, and CRITICAL, which opentelemetry-instrumentation-logging reports as
    # FATAL.
    assert target["expr"] == f'{APP_SERVICES} | severity_text=~"ERROR|FATAL"'
    assert_selects_the_app_alone(APP_SERVICES)
    assert target["queryType"] == "range"
    assert panel["options"]["enableLogDetails"] is True, "the trace link is in a line's details"
    assert panel["options"]["sortOrder"] == "Descending"
    # Each line links to its trace through the Loki datasource's derived field (trace_id -> Tempo).
    assert datasources()["loki"]["jsonData"]["derivedFields"][0]["datasourceUid"] == "tempo"


def dashboard_links(dashboard: dict) -> set[str]:
    """The uids the dashboard's own links (top right) open."""
    return {re.fullmatch(r"/d/([\w-]+)", link["url"]).group(1) for link in dashboard.get("links", [])}


@pytest.mark.unit
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_links_open_provisioned_dashboards(path):
    uids = {json.loads(other.read_text())["uid"] for other in DASHBOARDS}
    links = dashboard_links(json.loads(path.read_text()))
    assert links and links <= uids - {json.loads(path.read_text())["uid"]}


@pytest.mark.unit
def test_overview_links_to_golden_signals_slo_and_comparison():
    assert {"golden-signals", "slo", "comparison"} <= dashboard_links(load_dashboard("stack-overview"))


# --- golden signals ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_golden_signals_chooses_the_telemetry_source_with_a_variable():
    golden = load_dashboard("golden-signals")
    (variable,) = golden["templating"]["list"]
    assert variable["name"] == "source" and variable["type"] == "custom"
    # The values of the telemetry_source label that describe the service; loadgen is the client's view,
    # on the comparison dashboard. One at a time, otel first (what the SLOs use), then the edge (what users got).
    assert source_values(golden) == variable["query"].split(",") == ["otel", "edge", "manual", "ebpf"]
    assert variable["current"]["value"] == "otel"
    assert not variable["multi"] and not variable["includeAll"]
    for panel, target in prometheus_targets(golden):
        if SOURCE_VARIABLE.search(target["expr"]):
            assert 'telemetry_source="$source"' in target["expr"], panel["title"]
            assert "${source}" in panel["title"], f"{panel['title']!r} follows the variable: say so in its title"


@pytest.mark.unit
def test_golden_signals_shows_latency_traffic_errors_and_saturation_per_route():
    by_row = sections(load_dashboard("golden-signals"))
    assert set(by_row) == {"Latency", "Traffic", "Errors", "Saturation"}
    latency, traffic, errors = (exprs_of(by_row[name]) for name in ("Latency", "Traffic", "Errors"))
    assert "histogram_quantile" in latency and "dice:http_request_duration_seconds_bucket:rate1m" in latency
    assert "dice:http_requests_by_route:rate1m" in traffic
    assert "dice:http_requests:error_ratio_rate1m" in errors
    for name in ("Latency", "Traffic", "Errors"):
        assert all("$source" in exprs_of([panel]) for panel in by_row[name]), f"{name}: every panel follows $source"
        assert any("by (route" in exprs_of([panel]) for panel in by_row[name]), f"{name}: nothing per route"
    saturation = by_row["Saturation"]
    assert "http_server_active_requests" in exprs_of(saturation)
    assert "process_cpu_time_seconds_total" in exprs_of(saturation)
    for panel in saturation:
        if "$source" not in exprs_of([panel]):
            # Read from one source only (or one exporter, below): the title and description must say which.
            exporter = exporter_of(exprs_of([panel]))
            name = EXPORTER_NAMES[exporter] if exporter else (
                "OpenTelemetry" if 'telemetry_source="otel"' in exprs_of([panel]) else "Beyla")
            assert name in panel["title"] and "does not follow the source" in panel["description"], panel["title"]


@pytest.mark.unit
def test_golden_signals_links_to_the_comparison_and_the_slos():
    assert {"comparison", "slo"} <= dashboard_links(load_dashboard("golden-signals"))


# --- the edge, and the wait for a worker -------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_that_lists_sources_lists_the_edge(path):
    """A panel that compares the in-process sources by name shows the edge beside them, and a dashboard
    that names its sources in its text names the edge too."""
    dashboard = json.loads(path.read_text())
    for panel, target in prometheus_targets(dashboard):
        for named in re.findall(r'telemetry_source=~"([^"]+)"', target["expr"]):
            if len(set(named.split("|")) & IN_PROCESS) > 1:
                assert "edge" in named.split("|"), f"{panel['title']!r} lists {named!r} without the edge"
    texts = [panel["options"]["content"] for panel in panels(dashboard) if panel["type"] == "text"
             and not panel["title"].startswith("Runbook: ")]
    if any("`otel`" in text and "`manual`" in text for text in texts):
        assert any("`edge`" in text for text in texts), f"{path.name}: its text names the sources but not the edge"


@pytest.mark.unit
def test_golden_signals_panels_say_why_a_source_is_empty():
    # Grafana shows fieldConfig.defaults.noValue instead of "No data" (PanelDataErrorView): an edge that is
    # down, like Beyla where eBPF cannot run, must not look like a broken dashboard.
    golden = load_dashboard("golden-signals")
    following = [p for p in panels(golden) if any("$source" in t.get("expr", "") for t in p.get("targets", []))]
    assert len(following) >= 6
    for panel in following:
        no_value = panel["fieldConfig"]["defaults"].get("noValue", "")
        if panel["type"] != "stat":  # a stat shows it as its value, in large type: a short word there
            assert "edge is down" in no_value and "eBPF" in no_value, panel["title"]
        else:
            assert no_value, panel["title"]


def comparison_panel(title_start: str) -> dict:
    (panel,) = [p for p in panels(load_dashboard("comparison")) if p.get("title", "").startswith(title_start)]
    return panel


WAIT_PANEL = "Waiting for a worker"
MEANS_PANEL = "Mean latency per route"
SERVICE_GRAPH_PANEL = "Service graph"
EDGE_TRACES_PANEL = "Requests through the edge (Tempo)"


@pytest.mark.unit
def test_the_wait_panel_says_what_it_can_and_cannot_tell():
    panel = comparison_panel(WAIT_PANEL)
    description = panel["description"]
    for claim in ("exact for means", "not the p95 of the wait", "proxy's own time", "network hop",
                  "listen queue", "502/503/504", "no in-process"):
        assert claim in description, claim
    mean, gap = panel["targets"]
    assert "not the p95 of the wait" in gap["legendFormat"], "the dashed line's legend must not pass for a quantile"
    for target in (mean, gap):
        # Per route, the edge's SERVER spans against the app's, both from the same span-metrics connector.
        assert 'service_name="edge", span_kind="SPAN_KIND_SERVER", http_response_status_code!~"502|503|504"' in (
            target["expr"])
        # The app's side: the otel source's SERVER spans, whatever the app's service name (the edge's and
        # locust's spans are telemetry_source edge and loadgen).
        assert 'telemetry_source="otel", span_kind="SPAN_KIND_SERVER"' in target["expr"]
        assert "dice-api" not in target["expr"]
    assert "traces_spanmetrics_latency_sum" in mean["expr"] and "traces_spanmetrics_latency_count" in mean["expr"]
    assert gap["expr"].count("histogram_quantile(0.95,") == 2
    for title in (WAIT_PANEL, MEANS_PANEL):
        no_value = comparison_panel(title)["fieldConfig"]["defaults"]["noValue"]
        assert "edge is down" in no_value and "502" in no_value, title


@pytest.mark.unit
def test_the_comparison_shows_the_service_graph_and_how_to_see_the_wait_in_a_trace():
    graph = comparison_panel(SERVICE_GRAPH_PANEL)
    (target,) = graph["targets"]
    assert target["expr"].startswith("sum by (client, server) (rate(traces_service_graph_request_total{")
    assert "locust \u2192 edge \u2192 app" in graph["title"]
    traces = comparison_panel(EDGE_TRACES_PANEL)
    (query,) = traces["targets"]
    assert query["query"] == '{resource.service.name="edge" && kind=server}' and query["queryType"] == "traceql"
    # The hint names the spans to look at: the edge's hop into the app (edge/caddy-config.json marks it) and
    # the app's own span, whose late start is the wait.
    hop = "edge.hop=upstream"
    named = json.loads((REPO_ROOT / "edge" / "caddy-config.json").read_text())["apps"]["http"]["servers"]["app"]
    assert named["named_routes"]["app"]["handle"][0]["span_attributes"] == {"edge.hop": "upstream"}
    (hint,) = [p for p in panels(load_dashboard("comparison"))
               if p["type"] == "text" and hop in p["options"]["content"]]
    assert "wait for a worker" in hint["options"]["content"] and hop in traces["description"]


def span_metric(name: str, service: str, kind: str, span: str, status: str, instance: str, **extra: str) -> str:
    labels = {"job": service, "instance": instance, "telemetry_source": "edge" if service == "edge" else "otel",
              "service_name": service, "span_kind": kind, "span_name": span, "http_response_status_code": status,
              **extra}
    return f"traces_spanmetrics_latency_{name}{{{', '.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}}}"


def span_series(service, kind, span, status, per_step, seconds_each, instance="i1", buckets=()):
    """Span metrics of `per_step` spans every 15 s, each lasting `seconds_each`: count, sum and, if
    `buckets` are given, the cumulative buckets (every bound at or above the duration holds them all)."""
    args = (service, kind, span, status, instance)
    series = [(span_metric("count", *args), per_step), (span_metric("sum", *args), per_step * seconds_each)]
    if buckets:
        series += [(span_metric("bucket", *args, le=str(le)), per_step if seconds_each <= le else 0) for le in buckets]
        series.append((span_metric("bucket", *args, le="+Inf"), per_step))
    return [{"series": name, "values": f"0+{step!r}x12"} for name, step in series]


@pytest.mark.integration  # builds Prometheus's promtool
def test_the_edge_panels_compute_the_wait_from_known_spans(tmp_path):
    """The panels' own queries, run by promtool on series shaped like the collector's span metrics: the
    requests that reached the app took 50 ms at the edge and 3 ms in the app (two workers), so the mean
    wait on / is 47 ms; the edge's own 502s (1 ms, the app down) and its CLIENT hop spans are left out."""
    buckets = (0.002, 0.004, 0.01, 0.05, 0.1)
    series = [
        *span_series("edge", "SPAN_KIND_SERVER", "GET /", "200", 10, 0.05, buckets=buckets),
        *span_series("edge", "SPAN_KIND_SERVER", "GET /", "502", 5, 0.001, buckets=buckets),
        *span_series("edge", "SPAN_KIND_CLIENT", "GET", "200", 12, 1.0, buckets=buckets),
        *span_series("edge", "SPAN_KIND_SERVER", "GET", "404", 2, 0.01),
        *span_series("dice-api", "SPAN_KIND_SERVER", "GET /", "200", 4, 0.003, "w1", buckets=buckets),
        *span_series("dice-api", "SPAN_KIND_SERVER", "GET /", "200", 6, 0.003, "w2", buckets=buckets),
        *span_series("dice-api", "SPAN_KIND_SERVER", "GET", "404", 2, 0.005, "w1"),
    ]
    (mean_wait, p95_gap), (edge_mean, app_mean) = (comparison_panel(t)["targets"] for t in (WAIT_PANEL, MEANS_PANEL))
    golden = load_dashboard("golden-signals")
    (in_progress,) = [p for p in panels(golden) if p["title"].startswith("Requests in progress")]
    (edge_in_progress,) = [expr for source, expr in with_source(golden, in_progress["targets"][0]["expr"])
                           if source == "edge"]

    def expect(target_expr: str, samples: dict[str, float]) -> dict:
        # promtool compares floats exactly: round both sides to 0.1 ms.
        return {"expr": f"round({target_expr}, 0.0001)", "eval_time": "2m",
                "exp_samples": [{"labels": f'{{route="{route}"}}', "value": round(value, 4)}
                                for route, value in samples.items()]}

    tests = [
        expect(mean_wait["expr"], {"/": 0.047, "/**": 0.005}),
        # p95 inside the bucket (0.01, 0.05] at the edge and (0.002, 0.004] in the app, by linear interpolation.
        expect(p95_gap["expr"], {"/": (0.01 + 0.95 * 0.04) - (0.002 + 0.95 * 0.002)}),
        expect(edge_mean["expr"], {"/": 0.05, "/**": 0.01}),
        expect(app_mean["expr"], {"/": 0.003, "/**": 0.005}),
        # Little's law at the edge: 10 spans of 50 ms and 5 of 1 ms every 15 s on /, all statuses counted.
        expect(edge_in_progress, {"/": (10 * 0.05 + 5 * 0.001) / 15, "/**": 2 * 0.01 / 15}),
    ]
    spec = {"rule_files": [], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "edge-panels.test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from tooling.builds import binaries

    result = subprocess.run([str(binaries("prometheus")[1]), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr



SPIKE_SECONDS = 30  # locust's spike shape squeezed into 30 s: 40 users without think time from 12 s to 21 s


def instant(stack, expr: str) -> dict[str, float]:
    """An instant query's answer by route (the panels here are per route)."""
    return {r["metric"].get("route"): float(r["value"][1]) for r in stack.query(expr)}


def edge_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query that reads the edge or the service graph, $source written in."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel, target in prometheus_targets(dashboard):
            for source, expr in with_source(dashboard, target["expr"]):
                if ("edge" in expr or "traces_service_graph" in expr) and source in (None, "edge"):
                    found.append((f"{path.stem}: {panel['title']} {target['refId']}", expr))
    return found


@pytest.mark.integration  # the native stack (app, edge, collector, Prometheus) under locust's spike
def test_the_edge_panels_answer_and_show_the_wait_during_a_spike(tmp_path, monkeypatch):
    """Locust's spike through the edge: the wait panel shows most of the edge's time on / spent outside the
    app while the app's own p95 stays small, and no more than the client itself waited; every dashboard
    query that reads the edge answers, the edge among the sources it lists."""
    from tooling.native.stack import NativeStack, locust_result, poll, run_locust

    (mean_wait, _), (edge_mean, app_mean) = (comparison_panel(t)["targets"] for t in (WAIT_PANEL, MEANS_PANEL))
    p95 = 'dice:http_request_duration_seconds:p95_rate1m{{telemetry_source="{}", route="/"}}'
    queries = edge_queries()
    assert len(queries) >= 20, queries

    def waiting() -> dict:
        seen = {"wait": instant(stack, mean_wait["expr"]).get("/"), "edge": instant(stack, edge_mean["expr"]).get("/"),
                "app": instant(stack, app_mean["expr"]).get("/"),
                "edge_p95": instant(stack, p95.format("edge")).get("/"),
                "otel_p95": instant(stack, p95.format("otel")).get("/"), "at": time.time()}
        assert None not in seen.values(), f"not every query answers on / yet: {seen}"
        # A large share of the users' time is the wait, while the app's own p95 stays a fraction of theirs.
        assert seen["wait"] >= 0.5 * seen["edge"] and seen["otel_p95"] <= 0.25 * seen["edge_p95"], seen
        return seen

    monkeypatch.setenv("DICE_SECONDS", str(SPIKE_SECONDS))
    stack = NativeStack(tmp_path / "native").up()
    try:
        locust = run_locust(stack.edge_url, None, 5, stack.run_dir, name="spike", background=True,
                            scenario="spike", otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
        try:
            seen = poll(waiting, SPIKE_SECONDS + 30, "the wait for a worker, most of the edge's time on /",
                        interval=2)
            for where, expr in queries:
                listed = {value for named in re.findall(r'telemetry_source=~"([^"]+)"', expr)
                          for value in named.split("|")}

                def answers(expr=expr, listed=listed):
                    result = stack.query(expr)
                    shown = {r["metric"].get("telemetry_source") for r in result}
                    pairs = {(r["metric"].get("client"), r["metric"].get("server")) for r in result}
                    if "traces_service_graph" in expr:
                        return {("locust", "edge"), ("edge", "dice-api")} <= pairs
                    return bool(result) and ("edge" in shown if "edge" in listed else True)

                poll(answers, 30, f"{where}: data, with the edge if it lists sources: {expr}", interval=2)
        finally:
            try:
                locust.wait(SPIKE_SECONDS + 60)  # the shape ends the run by itself
            except subprocess.TimeoutExpired:
                locust.kill()
                raise
        truth = locust_result(stack.run_dir, "spike")
    finally:
        stack.down()
    # Plausible: the edge's time sits inside the client's, so the wait is below what locust measured on / over
    # the minute before (a quarter more allowed: span metrics reach Prometheus 5-15 s after the request ended).
    client = [ms / 1000 for end, name, _, ms in truth["timeline"]
              if name == "/" and seen["at"] - 75 <= end <= seen["at"]]
    client_mean = sum(client) / len(client)
    print(f"\n/ at {seen['at'] - truth['timeline'][0][0]:.0f} s into the spike: mean wait {seen['wait'] * 1000:.1f} ms "
          f"of edge {seen['edge'] * 1000:.1f} ms (app {seen['app'] * 1000:.1f} ms); p95 edge "
          f"{seen['edge_p95'] * 1000:.1f} ms, otel {seen['otel_p95'] * 1000:.1f} ms; locust's mean "
          f"{client_mean * 1000:.1f} ms over {len(client)} requests; {len(queries)} edge queries answered")
    assert 0 < seen["wait"] < 1.25 * client_mean


# --- SLOs, alerts and runbooks -----------------------------------------------------------------------


def slo_spec() -> dict:
    return yaml.safe_load((REPO_ROOT / "prometheus" / "slo" / "dice-slos.yaml").read_text())


@pytest.mark.unit
def test_slo_dashboard_shows_objective_budget_and_burn_rates_of_every_slo():
    from tooling.reports.runbooks import ALERTS_TABLE_ID

    slo = load_dashboard("slo")
    exprs = exprs_of(panels(slo))
    for rule in ("slo:objective:ratio", "slo:period_error_budget_remaining:ratio", "slo:current_burn_rate:ratio"):
        assert f"{rule}{{" in exprs, rule
    # The burn rate of every window the alerts use, for every SLO of the spec.
    windows = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
    for spec in slo_spec()["slos"]:
        for window in windows:
            burn = (f'slo:sli_error:ratio_rate{window}{{sloth_slo="{spec["name"]}"}} '
                    f'/ on (sloth_id) slo:error_budget:ratio{{sloth_slo="{spec["name"]}"}}')
            assert burn in exprs, burn
    (table,) = [panel for panel in panels(slo) if panel["id"] == ALERTS_TABLE_ID]
    assert table["type"] == "table"
    (target,) = table["targets"]
    assert 'ALERTS{alertstate=~"firing|pending"}' in target["expr"] and target["format"] == "table"
    assert target["instant"] is True
    shown = table["transformations"][0]["options"]["indexByName"]
    assert {"alertname", "alertstate", "severity", "route", "telemetry_source", "runbook"} <= set(shown)


def alerts_and_runbooks() -> list[tuple[str, str]]:
    """(alert name, README anchor of its runbook) of every alert: the rule files and the Sloth spec."""
    from tooling.reports.runbooks import alert_rules

    found = [(rule["alert"], rule["annotations"]["runbook"]) for rule in alert_rules()]
    found += [(spec["alerting"]["name"], spec["alerting"]["annotations"]["runbook"]) for spec in slo_spec()["slos"]]
    assert all(runbook.startswith("README.md#") for _, runbook in found)
    return sorted({(name, runbook.split("#", 1)[1]) for name, runbook in found})


@pytest.mark.unit
def test_the_runbook_panels_are_the_readme_sections():
    """Drift: `python -m tooling.reports.runbooks` would change nothing."""
    from tooling.reports.runbooks import README, alert_rules, dump, render

    current = (GRAFANA / "dashboards" / "slo.json").read_text()
    assert dump(render(json.loads(current), README.read_text(), alert_rules())) == current, (
        "grafana/dashboards/slo.json differs from README.md's runbooks: run python -m tooling.reports.runbooks")


@pytest.mark.unit
def test_the_runbook_check_notices_an_edited_readme():
    from tooling.reports.runbooks import README, alert_rules, render

    slo = load_dashboard("slo")
    edited = README.read_text().replace("### Runbook: scrape target down\n", "### Runbook: scrape target down\nNew.\n")
    assert render(slo, edited, alert_rules()) != slo


@pytest.mark.unit
@pytest.mark.parametrize("alert, anchor", alerts_and_runbooks())
def test_every_alert_is_in_its_runbook_panel_and_the_table_links_it_there(alert, anchor):
    from tooling.reports.runbooks import ALERTS_TABLE_ID, github_anchor

    slo = load_dashboard("slo")
    by_id = {panel["id"]: panel for panel in panels(slo)}
    (runbook,) = [p for p in by_id.values() if p["type"] == "text" and p["title"].startswith("Runbook: ")
                  and github_anchor(p["title"]) == anchor]
    assert f"`{alert}`" in runbook["options"]["content"], f"{alert} is not named in {runbook['title']!r}"
    # The table's query labels the alert's rows with that panel's id, and the column links there.
    table = by_id[ALERTS_TABLE_ID]
    labelled = {int(panel_id) for panel_id, names in
                re.findall(r'"runbook", "(\d+)", "alertname", "([^"]+)"', table["targets"][0]["expr"])
                if re.fullmatch(names, alert)}
    assert labelled == {runbook["id"]}, f"{alert}: the table points to panels {labelled}, not {runbook['id']}"
    (column,) = [o for o in table["fieldConfig"]["overrides"] if o["matcher"] == {"id": "byName", "options": "runbook"}]
    properties = {prop["id"]: prop["value"] for prop in column["properties"]}
    assert properties["links"] == [{"title": "Runbook: ${__value.text}", "url": "/d/slo?viewPanel=${__value.raw}"}]
    shown = properties["mappings"][0]["options"][str(runbook["id"])]["text"]
    assert slo["uid"] == "slo" and shown == runbook["title"].removeprefix("Runbook: ")


# --- the admin password entrypoint -------------------------------------------------------------------


def run_entrypoint(data_dir: Path, password: str | None = None) -> tuple[str, str]:
    """Run grafana/entrypoint.sh with a stand-in for /run.sh; returns (password Grafana gets, log)."""
    data_dir.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "GF_PATHS_DATA": str(data_dir)}
    if password is not None:
        env["GF_SECURITY_ADMIN_PASSWORD"] = password
    seen = data_dir.parent / f"{data_dir.name}.seen"
    stand_in = ["bash", "-c", 'printf %s "$GF_SECURITY_ADMIN_PASSWORD" >"$1"', "run.sh", str(seen)]
    result = subprocess.run(["bash", str(ENTRYPOINT), *stand_in], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return seen.read_text(), result.stdout + result.stderr


@pytest.mark.unit
def test_entrypoint_generates_a_password_once_and_reuses_it(tmp_path):
    password, log = run_entrypoint(tmp_path / "data")
    assert re.fullmatch(r"[A-Za-z0-9+/]{24}", password)
    stored = tmp_path / "data" / "admin-password"
    assert stored.read_text().strip() == password
    assert stored.stat().st_mode & 0o077 == 0, "the password file must not be readable by others"
    assert "read the admin password with" in log
    assert password not in log, "the password itself must not be logged"
    assert run_entrypoint(tmp_path / "data")[0] == password
    assert run_entrypoint(tmp_path / "fresh")[0] != password


@pytest.mark.unit
def test_entrypoint_keeps_a_given_password(tmp_path):
    assert run_entrypoint(tmp_path / "data", "chosen-by-the-user")[0] == "chosen-by-the-user"
    assert not (tmp_path / "data" / "admin-password").exists()


@pytest.mark.unit
def test_entrypoint_is_mounted_where_compose_runs_it():
    grafana = compose()["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    assert grafana["entrypoint"][-1] == mounts["./grafana/entrypoint.sh"]
    assert grafana["command"] == ["/run.sh"]
    # The generated password lives in the data volume: it survives restarts and goes with `down -v`.
    assert ("grafana-data", "/var/lib/grafana") in named_volumes(grafana)


# --- saturation: cAdvisor and node-exporter through the naming layer -------------------------------------------
SATURATION_RULES_FILE = REPO_ROOT / "prometheus" / "rules" / "dice-saturation.yaml"
# What each exporter's naming-layer rules are called, and the condition every query reading them ends with: no
# value while a target of that exporter is down, which the panel's noValue then names ("exporter down").
EXPORTER_RULES = {"cadvisor": ("dice:container_", "dice:process_open_fds"), "node-exporter": ("dice:node_",)}
EXPORTER_UP = {exporter: f'and on() (min(up{{job="{exporter}"}}) == 1)' for exporter in EXPORTER_RULES}
EXPORTER_NAMES = {"cadvisor": "cAdvisor", "node-exporter": "node-exporter"}
SATURATION_DASHBOARDS = ("golden-signals", "stack-overview")


def saturation_rules() -> set[str]:
    return {rule["record"] for group in yaml.safe_load(SATURATION_RULES_FILE.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def exporter_of(expr: str) -> str | None:
    """The exporter whose naming-layer rules a query reads, or None; a query may read one exporter only."""
    found = {exporter for exporter, prefixes in EXPORTER_RULES.items()
             if any(metric.startswith(prefixes) for metric in selected_metrics(expr))}
    assert len(found) <= 1, f"one exporter per query, so that its noValue can name the one that is down: {expr}"
    return found.pop() if found else None


def saturation_panels(dashboard: dict) -> list[tuple[dict, str]]:
    """(panel, exporter) of every panel that reads the naming layer's saturation rules."""
    found = []
    for panel in panels(dashboard):
        exporters = {exporter_of(target.get("expr", "")) for target in panel.get("targets", [])}
        if exporters - {None}:
            assert len(exporters) == 1, f"{panel['title']!r}: every query of the panel reads the same exporter"
            found.append((panel, exporters.pop()))
    return found


@pytest.mark.unit
@pytest.mark.parametrize("name", SATURATION_DASHBOARDS)
def test_saturation_panels_read_only_the_naming_layer(name):
    # One query serves compose, Kubernetes and the native tier: no raw cAdvisor or node_exporter series, whose
    # labels differ per origin, only the rules that give the app's container service="app".
    rules = saturation_rules()
    found = saturation_panels(load_dashboard(name))
    assert len(found) >= 8, [panel["title"] for panel, _ in found]
    for panel, exporter in found:
        for target in panel["targets"]:
            metrics = selected_metrics(target["expr"]) - {"up"}
            assert metrics <= rules, f"{panel['title']!r}: {metrics - rules} is not a naming-layer rule"
            if exporter == "cadvisor":
                # The app's container, by its compose service name, in every selector.
                selectors = re.findall(r"dice:(?:container_\w+|process_open_fds)(?::\w+)?\{([^}]*)\}", target["expr"])
                assert selectors and set(selectors) == {'service="app"'}, f"{panel['title']!r}: {selectors}"
        assert EXPORTER_NAMES[exporter] in panel["title"] + panel["description"], panel["title"]


@pytest.mark.unit
def test_golden_signals_shows_every_saturation_rule_beside_beylas_process_view():
    golden = load_dashboard("golden-signals")
    saturation = sections(golden)["Saturation"]
    shown = set().union(*(selected_metrics(exprs_of([panel])) for panel, _ in saturation_panels(golden)))
    assert saturation_rules() <= shown, f"not on Golden signals: {saturation_rules() - shown}"
    assert {panel["id"] for panel, _ in saturation_panels(golden)} <= {panel["id"] for panel in saturation}
    # Beyla's per-process CPU and RSS stay, as the view where eBPF runs.
    assert 'process_cpu_time_seconds_total{telemetry_source="ebpf"' in exprs_of(saturation)
    assert 'process_memory_usage_bytes{telemetry_source="ebpf"' in exprs_of(saturation)
    # The overview's row has the app's CPU, throttling, memory and OOM kills, and the host's four.
    overview = set().union(*(selected_metrics(exprs_of([panel]))
                             for panel, _ in saturation_panels(load_dashboard("stack-overview"))))
    assert {rule for rule in saturation_rules() if "restarts" not in rule and "open_fds" not in rule} <= overview


@pytest.mark.unit
@pytest.mark.parametrize("name", SATURATION_DASHBOARDS)
def test_saturation_panels_say_exporter_down_instead_of_zero(name):
    for panel, exporter in saturation_panels(load_dashboard(name)):
        for target in panel["targets"]:
            # Gated on the exporter's targets being up: no value (never a 0 from a window over old samples)
            # while one is down...
            assert target["expr"].endswith(EXPORTER_UP[exporter]), f"{panel['title']!r}: {target['expr']}"
        # ...and then the panel says so, where Grafana would say "No data".
        no_value = panel["fieldConfig"]["defaults"].get("noValue", "")
        assert "exporter down" in no_value, panel["title"]
        assert EXPORTER_NAMES[exporter] in no_value, panel["title"]


def saturation_input_series() -> list[dict]:
    """Both exporters' series as Prometheus scrapes them in compose (cAdvisor's compose labels), every 15 s for
    10 minutes: the exporters up for the first 5 minutes, then down while their last series stay (which shows
    that the gate alone blanks the panels; for real, the series of a failed scrape go stale too)."""
    app = ('container_label_com_docker_compose_project="dice-observability", '
           'container_label_com_docker_compose_service="app", id="/system.slice/docker-0a1b.scope", '
           'name="dice-observability-app-1", instance="cadvisor:8080", job="cadvisor"')
    node = 'instance="node-exporter:9100", job="node-exporter"'
    disk = f'{node}, device="/dev/sda1", fstype="ext4", mountpoint="/"'
    return [
        {"series": 'up{job="cadvisor", instance="cadvisor:8080"}', "values": "1x20 0x20"},
        {"series": 'up{job="node-exporter", instance="node-exporter:9100"}', "values": "1x20 0x20"},
        # Half a core used of a one-core quota; 10 CFS periods a second, 2 of them throttled.
        {"series": f"container_cpu_usage_seconds_total{{{app}}}", "values": "0+7.5x40"},
        {"series": f"container_spec_cpu_quota{{{app}}}", "values": "100000x40"},
        {"series": f"container_spec_cpu_period{{{app}}}", "values": "100000x40"},
        {"series": f"container_cpu_cfs_periods_total{{{app}}}", "values": "0+150x40"},
        {"series": f"container_cpu_cfs_throttled_periods_total{{{app}}}", "values": "0+30x40"},
        # 256 MiB of a 512 MiB limit; one OOM kill at 2 min 15 s; 42 open file descriptors.
        {"series": f"container_memory_working_set_bytes{{{app}}}", "values": "268435456x40"},
        {"series": f"container_spec_memory_limit_bytes{{{app}}}", "values": "536870912x40"},
        {"series": f"container_oom_events_total{{{app}}}", "values": "0x8 1x31"},
        {"series": f"container_file_descriptors{{{app}}}", "values": "42x40"},
        # One CPU, idle 80% of the time; a quarter of the memory available; 30% of / free; 100 B/s in, 50 out.
        {"series": f'node_cpu_seconds_total{{{node}, cpu="0", mode="idle"}}', "values": "0+12x40"},
        {"series": f'node_cpu_seconds_total{{{node}, cpu="0", mode="iowait"}}', "values": "0x40"},
        {"series": f"node_memory_MemAvailable_bytes{{{node}}}", "values": "1000000000x40"},
        {"series": f"node_memory_MemTotal_bytes{{{node}}}", "values": "4000000000x40"},
        {"series": f"node_filesystem_avail_bytes{{{disk}}}", "values": "30000000000x40"},
        {"series": f"node_filesystem_size_bytes{{{disk}}}", "values": "100000000000x40"},
        {"series": f'node_network_receive_bytes_total{{{node}, device="eth0"}}', "values": "0+1500x40"},
        {"series": f'node_network_transmit_bytes_total{{{node}, device="eth0"}}', "values": "0+750x40"},
    ]


# What each saturation query answers on saturation_input_series() while both exporters are up: (dashboard,
# panel title, refId) -> {labels: value}.
APP = '{service="app"}'
HOST = '{instance="node-exporter:9100"}'
SATURATION_EXPECTED = {
    ("golden-signals", "App CPU against its limit, in cores (cAdvisor)", "A"): {APP: 0.5},
    ("golden-signals", "App CPU against its limit, in cores (cAdvisor)", "B"): {APP: 1.0},
    ("golden-signals", "Share of the app's CPU periods throttled (cAdvisor)", "A"): {APP: 0.2},
    ("golden-signals", "App memory working set against its limit (cAdvisor)", "A"): {APP: 268435456},
    ("golden-signals", "App memory working set against its limit (cAdvisor)", "B"): {APP: 536870912},
    # Compose has no restarts series (the naming layer's rule is Kubernetes-only): the OOM kill alone.
    ("golden-signals", "App OOM kills (5 min) and container restarts (1 h) (cAdvisor)", "A"):
        {'{service="app", what="OOM kills, 5 min"}': 1.0},
    ("golden-signals", "App open file descriptors (cAdvisor)", "A"): {APP: 42},
    ("golden-signals", "Host CPU busy, per host (node-exporter)", "A"): {HOST: 0.2},
    ("golden-signals", "Host memory available, per host (node-exporter)", "A"):
        {'{instance="node-exporter:9100", job="node-exporter"}': 0.25},
    ("golden-signals", "Host filesystem free, per mount point (node-exporter)", "A"):
        {'{device="/dev/sda1", fstype="ext4", instance="node-exporter:9100", job="node-exporter", mountpoint="/"}':
         0.3},
    ("golden-signals", "Host network, bytes per second (node-exporter)", "A"): {HOST: 100},
    ("golden-signals", "Host network, bytes per second (node-exporter)", "B"): {HOST: 50},
    ("stack-overview", "App CPU, share of its limit", "A"): {APP: 0.5},
    ("stack-overview", "App CPU periods throttled", "A"): {APP: 0.2},
    ("stack-overview", "App memory, share of its limit", "A"): {APP: 0.5},
    ("stack-overview", "App OOM kills, last 5 minutes", "A"): {APP: 1.0},
    ("stack-overview", "Host CPU busy", "A"): {"{}": 0.2},
    ("stack-overview", "Host memory available", "A"): {"{}": 0.25},
    ("stack-overview", "Host disk free, fullest filesystem", "A"): {"{}": 0.3},
    ("stack-overview", "Host network, bytes per second", "A"): {"{}": 150},
}


@pytest.mark.integration  # builds Prometheus's promtool
def test_saturation_panels_answer_from_both_exporters_and_say_nothing_while_one_is_down(tmp_path):
    """Every saturation query, through the naming layer's rules as Prometheus loads them, on both exporters'
    series: the figures the inputs imply while the exporters are up (4 min), and no value at all while they
    are down (9 min), where the panels' noValue says "exporter down"."""
    queries = {(name, panel["title"], target["refId"]): target["expr"]
               for name in SATURATION_DASHBOARDS for panel, _ in saturation_panels(load_dashboard(name))
               for target in panel["targets"]}
    assert set(queries) == set(SATURATION_EXPECTED), set(queries) ^ set(SATURATION_EXPECTED)
    tests = []
    for key, expr in sorted(queries.items()):
        # promtool compares floats exactly: both sides rounded to 0.001.
        rounded = f"round({expr}, 0.001)"
        tests.append({"expr": rounded, "eval_time": "4m",
                      "exp_samples": [{"labels": labels, "value": round(value, 3)}
                                      for labels, value in SATURATION_EXPECTED[key].items()]})
        tests.append({"expr": rounded, "eval_time": "9m", "exp_samples": []})
    spec = {"rule_files": [str(SATURATION_RULES_FILE)], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": saturation_input_series(), "promql_expr_test": tests}]}
    path = tmp_path / "saturation-panels.test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from tooling.builds import binaries

    result = subprocess.run([str(binaries("prometheus")[1]), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"{len(queries)} saturation queries: the inputs' figures with both exporters up, nothing while down")
