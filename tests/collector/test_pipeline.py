"""The real pipeline without Docker: app -> collector -> Prometheus, with locust as ground truth.

The collector (built from otel-collector/builder-config.yaml), Prometheus (the compose version, built from
its Go module), the app under `opentelemetry-instrument gunicorn` and locust run as local processes from the
same config files compose uses. Only addresses change, and Tempo and Pyroscope are capture sinks (tooling.native.sinks).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from stackfiles import GRAFANA_VARIABLE, with_source

from tooling.config import APP_ENV, load_env_file
from tooling.native.stack import REPO_ROOT, NativeStack, by_labels, poll, prometheus_query

README = REPO_ROOT / "README.md"

APP = "dice-api"  # the app's service.name; the edge in front of it is "edge"
pytestmark = pytest.mark.integration

LOAD_SECONDS = 20
LOAD_USERS = 20
VIEW_FUNCTION = "roll_dice"

# Queries that read Beyla's series: Beyla needs kprobes, which these machines lack, so they can only
# return data where Docker runs on a normal kernel (tests/e2e). Anything else must answer with data.
NEEDS_BEYLA: dict[str, str] = {
    'sum by (telemetry_source) (max by (telemetry_source, process_pid, cpu_mode) '
    '(rate(process_cpu_time_seconds_total{telemetry_source="ebpf", cpu_mode!="wait"}[1m])))':
        "Beyla's process CPU (metrics feature application_process)",
    'sum by (telemetry_source) (max by (telemetry_source, process_pid) '
    '(process_memory_usage_bytes{telemetry_source="ebpf"}))':
        "Beyla's process memory (metrics feature application_process)",
}
# Rules whose only origin is the kubelet's cAdvisor (prometheus/rules/dice-saturation.yaml says why the
# other origins have no such signal): absent here, checked by promtool (tests/data/dice-saturation.test.yaml).
NEEDS_KUBERNETES: dict[str, str] = {
    "dice-saturation.yaml:dice:container_restarts:increase1h":
        "a pod's container start times, from the kubelet's cAdvisor",
}
# A dashboard query with the `source` variable is run once per value (stackfiles.with_source); with
# source=ebpf it reads only Beyla's series, so it must answer nothing here, like NEEDS_BEYLA.
BEYLA_SOURCE = "ebpf"


def sent_by_route_status(truth: dict) -> Counter:
    return Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    native = NativeStack(tmp_path_factory.mktemp("native")).up()
    yield native
    native.down()


@pytest.fixture(scope="module")
def load(stack):
    """One locust run; then wait until the last export and scrape have landed in Prometheus."""
    from tooling.native.stack import run_locust

    # With --otel, as compose runs it: locust's own metrics are the loadgen source, and its client spans
    # carry the trace context into the app.
    truth = run_locust(stack.edge_url, LOAD_SECONDS, LOAD_USERS, stack.run_dir,
                       otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
    ended = time.time()
    expected = sent_by_route_status(truth)
    assert sum(expected.values()) == truth["locust_totals"]["num_requests"] > 100
    assert truth["locust_totals"]["num_failures"] == 0, "the app answered something unexpected"

    otel = ('sum by (http_route, http_response_status_code) '
            '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
    manual = 'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'
    # OTEL_METRIC_EXPORT_INTERVAL (10 s) + batch (1 s) + scrape (5 s), with margin.
    poll(lambda: by_labels(stack.query(otel), "http_route", "http_response_status_code") == expected
         and by_labels(stack.query(manual), "path", "status") == expected, 60,
         f"otel and manual counts in Prometheus equal to what locust sent, {dict(expected)}")
    poll(lambda: VIEW_FUNCTION in set().union(*[u.function_names() for u in stack.pyroscope_sink.snapshot()]),
         30, f"a profile with {VIEW_FUNCTION}")
    return {"truth": truth, "expected": expected, "otel": otel, "manual": manual, "ended": ended}


def test_otel_metrics_through_the_collector_equal_locust(stack, load):
    seen = by_labels(stack.query(load["otel"]), "http_route", "http_response_status_code")
    print(f"\nlocust {dict(load['expected'])}\notel   {dict(seen)}")
    assert seen == load["expected"]


def test_manual_metrics_equal_locust_and_exclude_scrapes(stack, load):
    seen = by_labels(stack.query(load["manual"]), "path", "status")
    print(f"\nlocust {dict(load['expected'])}\nmanual {dict(seen)}")
    assert seen == load["expected"]
    # Prometheus scrapes /metrics every 5 s; none of those requests may count as app traffic.
    assert stack.query('flask_http_request_duration_seconds_count{path="/metrics"}') == []
    # The image's healthcheck ran beside the load (an empty TCP connection every 10 s) and counted nowhere.
    probe = stack.health_probe
    print(f"healthcheck runs {probe.runs}, failures {probe.failures}")
    assert probe.runs >= 2 and probe.failures == 0
    up = by_labels(stack.query("up"), "job")
    assert up[("app",)] == 1 and up[("otel-collector",)] == 1 and up[("beyla",)] == 0


def test_every_series_of_the_three_sources_is_labelled(stack, load):
    for job, source in (("app", "manual"), ("otel-collector", "otel")):
        unlabelled = stack.query(f'count({{job="{job}", telemetry_source!="{source}"}})')
        assert unlabelled == [], f"{job} series without telemetry_source={source}"
    assert stack.query('count({job="dice-api", telemetry_source!="otel"})') == []
    # Locust's own metrics come through the same collector, but are the load generator's.
    assert stack.query('count({job="locust"})'), "locust --otel sent nothing"
    assert stack.query('count({job="locust", telemetry_source!="loadgen"})') == []


def test_traces_one_server_span_per_request(stack, load):
    # Locust calls the app through the edge: one SERVER span of each per request.
    for service in (APP, "edge"):
        seen = stack.tempo_sink.requests_by_route_and_status(service)
        print(f"\n{service} server spans {sum(seen.values())} locust {sum(load['expected'].values())}")
        assert seen == load["expected"], service
    fails = stack.tempo_sink.server_spans("/fail", APP)
    assert fails and all(s.is_error_with_exception for s in fails)


def test_span_metrics_calls_equal_server_spans(stack, load):
    spans = len(stack.tempo_sink.server_spans(service=APP))
    expr = 'sum(traces_spanmetrics_calls_total{span_kind="SPAN_KIND_SERVER", service_name="dice-api"})'
    calls = poll(lambda: (r := stack.query(expr)) and int(float(r[0]["value"][1])) == spans and r, 30,
                 f"span-metric calls equal to the {spans} SERVER spans")
    print(f"\nspan-metric calls {calls[0]['value'][1]} server spans {spans}")
    errors = stack.query('sum(traces_spanmetrics_calls_total{span_kind="SPAN_KIND_SERVER", service_name="dice-api", '
                         'status_code="STATUS_CODE_ERROR"})')
    assert int(float(errors[0]["value"][1])) == load["expected"][("/fail", "500")]


def test_service_graph_reads_locust_edge_dice_api_with_every_request(stack, load):
    sent = sum(load["expected"].values())
    expr = "sum by (client, server) (traces_service_graph_request_total)"
    # Locust (--otel) sends its client span's context with every request: the edge's SERVER span pairs with
    # it, and the edge's CLIENT hop with the app's SERVER span. (An uninstrumented client shows as "user".)
    hops = (("locust", "edge"), ("edge", APP))
    seen = {}

    def paired():
        # An assertion, not a False: poll() reports the last error, so a timeout shows the edges it saw.
        seen.update(edges=by_labels(stack.query(expr), "client", "server"))
        assert all(seen["edges"][hop] == sent for hop in hops), dict(seen["edges"])
        return True

    poll(paired, 60, f"the service graph locust -> edge -> dice-api with all {sent} requests")
    print(f"\nservice graph edges {dict(seen['edges'])}, sent {sent}")
    # A request that locust gave up on at its stop may leave a client span with no server: "unknown".
    others = {edge: n for edge, n in seen["edges"].items() if edge not in hops}
    assert set(others) <= {("locust", "unknown")} and sum(others.values()) <= 2, others
    failed = by_labels(stack.query(expr.replace("request_total", "request_failed_total")), "client", "server")
    assert all(failed[hop] == load["expected"][("/fail", "500")] for hop in hops), failed


def grafana_service_graph_queries(span_names: list[str], window: str = "5m") -> dict[str, str]:
    """What Grafana's Tempo datasource (grafana-tempo-datasource, src/datasource.ts and graphTransform.ts)
    sends to Prometheus for Explore's Service Graph: the node graph, then the table under it."""
    queries = {}
    for metric in ("traces_service_graph_request_server_seconds_sum", "traces_service_graph_request_total",
                   "traces_service_graph_request_failed_total", "traces_service_graph_request_server_seconds_bucket"):
        queries[metric] = f"sum by (client, server) (rate({metric}[{window}]))"
        queries[f"{metric}_labels"] = f"group by (client, connection_type, server) ({metric})"
    queries["table: rate"] = (f'topk(5, sum(rate(traces_spanmetrics_calls_total{{span_kind="SPAN_KIND_SERVER"}}'
                              f'[{window}])) by (span_name))')
    names = "|".join(span_names)
    queries["table: error rate"] = (f'topk(5, sum(rate(traces_spanmetrics_calls_total{{status_code="STATUS_CODE_ERROR",'
                                    f'span_name=~"{names}"}}[{window}])) by (span_name))')
    for name in span_names:
        queries[f"table: p90 {name}"] = (f'histogram_quantile(.9, sum(rate(traces_spanmetrics_latency_bucket'
                                         f'{{span_name=~"{name}"}}[{window}])) by (le))')
    return queries


def test_grafana_service_graph_view_gets_data_for_every_query_it_sends(stack, load):
    rates = poll(lambda: stack.query(grafana_service_graph_queries([])["table: rate"]), 30, "the table's rate query")
    span_names = sorted(r["metric"]["span_name"] for r in rates)
    assert span_names == ["GET /", "GET /fail", "GET /health"], span_names
    for name, expr in grafana_service_graph_queries(span_names).items():
        result = poll(lambda expr=expr: stack.query(expr), 30, f"service graph view, {name}: {expr}")
        # A client span locust abandoned at its stop pairs with no server ("unknown", asserted above): its
        # server-side latency is 0 by construction.
        known = [r for r in result if r["metric"].get("server") != "unknown"]
        assert all(r["value"][1] not in ("NaN", "0") for r in known) or "failed" in name, (name, result)


def test_exemplars_link_the_latency_histogram_to_exported_traces(stack, load):
    from tooling.native.stack import prometheus_query

    now = time.time()
    histogram = 'http_server_request_duration_seconds_bucket{telemetry_source="otel"}'
    data = prometheus_query(stack.prometheus_url, histogram, path="query_exemplars", start=now - 600, end=now)
    exemplars = [e for series in data for e in series["exemplars"]]
    trace_ids = {e["labels"]["trace_id"] for e in exemplars}
    exported = {s.trace_id for s in stack.tempo_sink.spans()}
    print(f"\nexemplars {len(exemplars)} distinct trace ids {len(trace_ids)} matched {len(trace_ids & exported)}")
    assert exemplars, "no exemplars: exemplar storage or enable_open_metrics is off"
    assert trace_ids <= exported


def test_profiles_have_the_view_function_and_link_to_root_spans(stack, load):
    uploads = stack.pyroscope_sink.snapshot()
    assert uploads and {u.labels["service_name"] for u in uploads} == {"dice-api"}
    assert VIEW_FUNCTION in set().union(*[u.function_names() for u in uploads])
    labelled = set().union(*[u.sample_labels("span_id") for u in uploads])
    # pyroscope-otel labels the process's local root spans: the app's SERVER spans, whose parent is
    # locust's (remote) CLIENT span.
    roots = {s.attributes.get("pyroscope.profile.id") for s in stack.tempo_sink.server_spans(service=APP)}
    assert None not in roots, "a SERVER span without pyroscope.profile.id"
    print(f"\nprofile uploads {len(uploads)} span ids in profiles {len(labelled)} matched {len(labelled & roots)}")
    assert labelled and labelled <= roots


# ------------------------------------------------------------------------- rules and dashboards run

def rule_expressions() -> list[tuple[str, str]]:
    found = []
    for path in sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((f"{path.name}:{rule.get('record') or rule.get('alert')}", rule["expr"]))
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    found = []
    for path in sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())

        def walk(panels):
            for panel in panels:
                yield panel
                yield from walk(panel.get("panels", []))

        for panel in walk(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                # PromQL only: a Loki target's expr is LogQL, which the native stack has nothing to run on.
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                if uid == "prometheus" and target.get("expr"):
                    where = f"{path.name}:{panel.get('title')}"
                    found += [(where if source is None else f"{where} [source={source}]", expr)
                              for source, expr in with_source(dashboard, target["expr"])]
    return found


def needs_beyla(where: str, expr: str) -> str | None:
    """Why a query can answer only where Beyla runs, or None."""
    if expr in NEEDS_BEYLA:
        return NEEDS_BEYLA[expr]
    if where.endswith(f"[source={BEYLA_SOURCE}]"):
        return f"the dashboard's source variable set to {BEYLA_SOURCE}"
    return None


@pytest.mark.parametrize("where, expr", rule_expressions() + dashboard_queries())
def test_every_rule_and_dashboard_query_runs_and_answers(stack, load, where, expr):
    # Queries are run as written, the source variable substituted (dashboard_queries). Any other Grafana
    # variable ($__rate_interval, $__range, another template variable) would make the query untestable.
    assert not GRAFANA_VARIABLE.search(expr), f"{where}: a Grafana variable other than $source in {expr}"
    alerts = {rule["expr"] for path in (REPO_ROOT / "prometheus" / "rules").glob("*.yaml")
              for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "alert" in rule}
    if expr in alerts:
        # A healthy stack answers an alert's expression with nothing: it must only parse and run here
        # (stack.query raises on a PromQL error). Its firing and quiet cases are promtool unit tests
        # (tests/data/*.test.yaml).
        stack.query(expr)
        return
    if where in NEEDS_KUBERNETES:
        assert not stack.query(expr), f"{where}: needs Kubernetes ({NEEDS_KUBERNETES[where]}) but answered here"
        pytest.skip(f"{where}: needs {NEEDS_KUBERNETES[where]}; its cases are promtool tests")
    beyla = needs_beyla(where, expr)
    if beyla:
        assert not stack.query(expr), f"{where}: needs Beyla ({beyla}) but answered here, where Beyla cannot run"
        pytest.skip(f"{where}: needs Beyla's series ({beyla}); checked in tests/e2e")
    # A panel that compares sources must show every source that runs here, not just any one of them
    # (each within the wait: a source's recording rule may have its first sample a few seconds later).
    wanted = set(re.findall(r'telemetry_source=~"([^"]+)"', expr))
    expected = set("|".join(wanted).split("|")) - {"ebpf"} if wanted else set()

    def during_the_load(query: str) -> list:
        # Rates over 1 m: a rule that keeps only routes with traffic (the error ratios) answers nothing a
        # minute after the load, and this test may run later than that. Every export and scrape of the
        # load has landed 30 s after it ended (the fixture waited for them), and its 1 m rates still hold.
        return prometheus_query(stack.prometheus_url, query, time=min(time.time(), load["ended"] + 30))

    def answers():
        result = during_the_load(expr)  # raises on a PromQL error
        shown = {r["metric"].get("telemetry_source") for r in result}
        assert result and expected <= shown, f"shows {shown}, missing {expected - shown}"
        return True

    poll(answers, 20, f"{where}: data for {expr}")
    # `a or b` answers when either side does. Where the sides read different sources (locust's client
    # view beside the servers' histograms), each side is half of the comparison and must answer itself.
    operands = top_level_or_operands(expr)
    named = [sources_named(operand) for operand in operands]
    if len(operands) > 1 and sum(map(len, named)) == len(set().union(*named)):  # no source on two sides
        for operand, sources in zip(operands, named, strict=True):
            if sources - {"ebpf"}:
                poll(lambda operand=operand: during_the_load(operand), 15, f"{where}: data for its half {operand}")


def top_level_or_operands(expr: str) -> list[str]:
    """The operands of the `or`s outside any parentheses, brackets or braces."""
    operands, depth, start = [], 0, 0
    for index, char in enumerate(expr):
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and expr.startswith(" or ", index):
            operands.append(expr[start:index].strip())
            start = index + 4
    return [*operands, expr[start:].strip()]


def sources_named(expr: str) -> set[str]:
    """The telemetry_source values a query selects, by `=` or `=~`."""
    return {value for values in re.findall(r'telemetry_source=~?"([^"]+)"', expr) for value in values.split("|")}


@pytest.mark.unit
def test_the_halves_of_a_comparing_or_are_found():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(x_bucket{telemetry_source="loadgen"}[1m]))) or '
            'max by (route) (y{telemetry_source=~"ebpf|otel|manual"} or z{telemetry_source="otel"})')
    halves = top_level_or_operands(expr)
    assert len(halves) == 2 and halves[1].startswith("max by")
    assert [sources_named(h) for h in halves] == [{"loadgen"}, {"ebpf", "otel", "manual"}]


def test_queries_were_found():
    assert len(rule_expressions()) >= 3
    queries = dashboard_queries()
    assert len(queries) >= 3
    # The golden-signals queries run once per source, and the ebpf ones are known to need Beyla.
    per_source = {re.search(r"\[source=(\w+)\]$", where).group(1) for where, _ in queries if where.endswith("]")}
    assert per_source == {"otel", "edge", "manual", "ebpf"}
    assert all(not GRAFANA_VARIABLE.search(expr) for _, expr in queries)


def test_native_fixed_ports_are_the_ports_the_configs_name():
    """`make native-up` listens where the committed configs say each component listens."""
    from tooling.native.stack import COLLECTOR_CONFIG, PROMETHEUS_CONFIG, StackPorts

    fixed = StackPorts.fixed()
    port = lambda address: int(str(address).rsplit(":", 1)[1])  # noqa: E731
    collector = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    reader = collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert fixed.otlp_grpc == port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert fixed.otlp_http == port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    assert fixed.collector_health == port(collector["extensions"]["health_check"]["endpoint"])
    assert fixed.collector_metrics == port(collector["exporters"]["prometheus"]["endpoint"])
    assert fixed.collector_telemetry == reader["port"]
    targets = {job["job_name"]: port(job["static_configs"][0]["targets"][0])
               for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert (targets["app"], targets["beyla"], targets["prometheus"]) == (fixed.app, fixed.beyla, fixed.prometheus)
    assert targets["otel-collector"] == fixed.collector_metrics
    assert targets["otel-collector-internal"] == fixed.collector_telemetry
    assert targets["alertmanager"] == fixed.alertmanager
    alerting = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["alerting"]["alertmanagers"][0]["static_configs"][0]
    assert port(alerting["targets"][0]) == fixed.alertmanager
    pyroscope = load_env_file(APP_ENV)["PYROSCOPE_SERVER_ADDRESS"]
    assert fixed.pyroscope_sink == port(pyroscope)
    # The Tempo sink cannot share the collector's OTLP port, so it is the one that differs.
    assert port(collector["exporters"]["otlp_grpc/tempo"]["endpoint"]) == fixed.otlp_grpc != fixed.tempo_sink


def test_native_runner_renders_every_target(tmp_path):
    from tooling.native.stack import StackPorts, render_prometheus_config

    rendered = render_prometheus_config(StackPorts.free())
    assert not re.search(r"\b(app|beyla|otel-collector|alertmanager|tempo|pyroscope):\d+", rendered)
    assert Path(yaml.safe_load(rendered)["rule_files"][0]).parent.exists()


def test_an_otel_attribute_cannot_pass_for_another_source(stack, load):
    """An OTLP data point labelled telemetry_source="manual" still lands as the otel source."""
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter = OTLPMetricExporter(endpoint=f"127.0.0.1:{stack.ports.otlp_grpc}", insecure=True)
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter, 60_000)],
                             resource=Resource.create({"service.name": "impostor"}))
    provider.get_meter("test").create_counter("impostor_requests").add(3, {"telemetry_source": "manual"})
    provider.shutdown()
    result = poll(lambda: stack.query("impostor_requests_total"), 30, "the impostor's counter in Prometheus")
    assert [r["metric"]["telemetry_source"] for r in result] == ["otel"]


# The labels each source's request series carry, as README.md "Labels per source" lists them. A label
# that appears here unannounced (a resource attribute, a scope version) starts new series on upgrades.
SERIES_LABELS = {
    "otel": {"__name__", "job", "instance", "telemetry_source", "service_name", "http_request_method",
             "http_response_status_code", "http_route", "url_scheme", "network_protocol_version", "error_type"},
    "manual": {"__name__", "job", "instance", "telemetry_source", "app", "method", "path", "status"},
    "otel span metrics": {"__name__", "job", "instance", "telemetry_source", "service_name", "span_name",
                          "span_kind", "status_code", "http_response_status_code"},
}


def test_series_carry_only_the_documented_labels(stack, load):
    selectors = {
        "otel": 'http_server_request_duration_seconds_count{telemetry_source="otel"}',
        "manual": 'flask_http_request_duration_seconds_count{telemetry_source="manual"}',
        "otel span metrics": 'traces_spanmetrics_calls_total{telemetry_source="otel"}',
    }
    for source, selector in selectors.items():
        seen = set().union(*(r["metric"].keys() for r in stack.query(selector))) | {"__name__"}
        print(f"\n{source}: {sorted(seen)}")
        assert seen <= SERIES_LABELS[source], f"{source}: unexpected labels {seen - SERIES_LABELS[source]}"


def readme_label_table() -> dict[str, set[str]]:
    """README's "Labels per source" table: source (the row's text before its first colon, backticks
    removed) -> the labels its second cell lists. A label is a backticked name at the start of a
    comma-separated item; what a parenthesis says about it (`service.instance.id`, …) is not a label."""
    section = README.read_text().split("### Labels per source", 1)[1].split("\n#", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or ":" not in cells[0]:
            continue
        source = cells[0].split(":", 1)[0].replace("`", "").strip()
        listed = re.sub(r"\([^)]*\)", "", cells[1].split(":", 1)[-1] if cells[1].startswith("Beyla") else cells[1])
        table[source] = set(re.findall(r"`([a-z_]+)`", listed))
    return table


@pytest.mark.unit
def test_the_readme_label_table_lists_exactly_the_allowed_labels():
    table = readme_label_table()
    print(table)
    for source, allowed in SERIES_LABELS.items():
        assert table.get(source) == allowed - {"__name__"}, (source, table.get(source))
    # Beyla cannot run here, so its row is checked only for the labels the recording rules join on.
    assert {"service_name", "http_route", "http_request_method", "http_response_status_code",
            "telemetry_source"} <= table["ebpf"], table["ebpf"]
