"""What the docker tier asks of a running stack, through each backend's HTTP API.

Shared by the compose test (test_stack.py) and the Kubernetes one (test_kind.py), so that both hold the
same claims with the same numbers: each source's count per route and status against a known load, the
recording rules, Tempo's search, Loki's records and their trace ids, Pyroscope's profiles and span
profiles, Grafana's datasources and dashboards. Each deployment only says where the backends answer, and
whether the load goes through the edge (then the edge is a source too, and a trace links its spans to the
app's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from stackfiles import EXPECTED_STATUS, REPO_ROOT, dashboard_panels, with_source

from tooling.native.stack import poll

SERVICE = "dice-api"
# The edge's service.name (edge/edge.env): its SERVER span is the user's request, its CLIENT span the hop
# into the app (the collector re-kinds the span Caddy marks edge.hop=upstream).
EDGE_SERVICE = "edge"
CPU_PROFILE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
VIEW_FUNCTION = "roll_dice"
DATASOURCE_UIDS = ("prometheus", "tempo", "loki", "pyroscope")
# Panels that are rightly empty on a healthy stack where Beyla runs (natively BeylaTargetDown is pending).
MAY_BE_EMPTY = {"slo": ("Alerts firing or pending now, with their runbooks",)}
# The known load: every route, the error route and unknown paths (one series, `/**`, for all of them).
PLAN = ["/"] * 1500 + ["/health"] * 100 + ["/fail"] * 100 + [f"/no-such-page-{i}" for i in range(50)]
# Sent to the app's own port beside the plan, when the plan goes through the edge: every in-process and eBPF
# source counts these, the edge must not. /health only, which the app does not log, so Loki's counts of the
# plan's records stay exact.
PAST_THE_EDGE = ["/health"] * 40


def why_no_docker() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not found"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no Docker engine answers (`docker info` timed out)"
    if info.returncode != 0:
        detail = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers (`docker info` failed: {detail})"
    return None


def skip_unless(tier: str, reason: str | None) -> None:
    """Skip the whole module, saying why; E2E_REQUIRE_DOCKER=1 (the GitHub workflow) makes it a failure."""
    if reason:
        if os.environ.get("E2E_REQUIRE_DOCKER") == "1":
            raise RuntimeError(f"E2E_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(f"{tier} skipped: {reason}", allow_module_level=True)


@dataclass(frozen=True)
class Backends:
    """Base URLs of the backends as the test reaches them (published ports, or port-forwards)."""

    prometheus: str
    alertmanager: str
    tempo: str
    loki: str
    pyroscope: str
    grafana: str
    locust: str
    grafana_admin: tuple[str, str]

    def prometheus_query(self, query: str) -> list[dict]:
        answer = requests.get(f"{self.prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def tempo_search(self, traceql: str, limit: int = 20) -> list[dict]:
        now = int(time.time())
        params = {"q": traceql, "start": now - 3600, "end": now + 60, "limit": limit}
        response = requests.get(f"{self.tempo}/api/search", params=params, timeout=30)
        response.raise_for_status()
        return response.json().get("traces", [])

    def trace(self, trace_id: str) -> dict | None:
        detail = requests.get(f"{self.tempo}/api/traces/{trace_id}", timeout=30)
        return detail.json() if detail.ok else None

    def pyroscope_query(self, method: str, body: dict) -> dict:
        response = requests.post(f"{self.pyroscope}/querier.v1.QuerierService/{method}", data=json.dumps(body),
                                 headers={"Content-Type": "application/json"}, timeout=30)
        response.raise_for_status()
        return response.json()

    def loki_get(self, path: str, params: dict, categorize: bool = False) -> dict:
        # categorize-labels: each entry carries its structured metadata apart from the stream's labels.
        headers = {"X-Loki-Response-Encoding-Flags": "categorize-labels"} if categorize else {}
        response = requests.get(f"{self.loki}/loki/api/v1/{path}", params=params, headers=headers, timeout=30)
        assert response.ok, f"Loki {path} {params}: {response.status_code} {response.text[:500]}"
        answer = response.json()
        assert answer["status"] == "success", answer
        return answer

    def loki_count_in_window(self, logql_selector: str, window: tuple[float, float]) -> int:
        """How many records `logql_selector` matches whose time lies in the window (one second of slack each
        side; the load ran alone, locust's background load stopped, so nothing else falls in it)."""
        start, end = window[0] - 1, window[1] + 1
        seconds = int(end - start) + 1
        query = f"sum(count_over_time({logql_selector} [{seconds}s]))"
        result = self.loki_get("query", {"query": query, "time": str(int(end * 1e9))})["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0


def attribute_values(node, key: str):
    """Every value of attribute `key` anywhere in an OTLP-JSON trace."""
    if isinstance(node, dict):
        if node.get("key") == key and isinstance(node.get("value"), dict):
            yield from (v for v in node["value"].values() if isinstance(v, str))
        for value in node.values():
            yield from attribute_values(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from attribute_values(item, key)


def last_minutes_ms(minutes: int = 30) -> dict[str, int]:
    now = int(time.time() * 1000)
    return {"start": now - minutes * 60_000, "end": now + 60_000}


# --- the known load ----------------------------------------------------------------------------------


def send_known_load(backends: Backends, apps: list[str], beyla: bool, locust_host: str,
                    breakdown: Callable[[], object] | None = None, past_the_edge: str | None = None) -> dict:
    """A known load, alone: locust's background load is stopped, every source has reached a steady
    count (Beyla included, which attaches 10-30 s after the stack is ready), and the increase of each
    source is taken against that. The plan goes round-robin to `apps` (one URL per app instance, so every
    instance gets its share). Returns what was sent per (route, status), in all and per app URL, what each
    source counted, and the time window of the load; locust's background load runs again afterwards, so
    the dashboards have data. `breakdown`, if given, is read twice: once the counts stand still before the
    load, and at the instant every source has counted it (for counts of a finer grain, such as per pod).

    `past_the_edge`, the app's own URL, says that `apps` are the edge's: the edge is then a source that must
    count exactly the plan, and PAST_THE_EDGE also goes to the app's own port, which every other source
    counts on top of the plan and the edge must not (it counts what users sent through it, nothing else)."""
    from tooling.reports.compare import difference, take_snapshot

    requests.post(f"{backends.locust}/stop", timeout=10).raise_for_status()
    if beyla:
        def ebpf_counts():
            for app in apps:  # canaries, until Beyla's tracer is loaded for every instance
                requests.get(app + "/health", timeout=10)
            return backends.prometheus_query(
                'sum(http_server_request_duration_seconds_count{telemetry_source="ebpf"})')

        poll(ebpf_counts, 180, "Beyla's first counted request", interval=5)

    def quiet():
        # Two snapshots a full export + scrape cycle apart (SDK 10 s, app job 15 s) that agree.
        first = take_snapshot(backends.prometheus)
        time.sleep(20)
        second = take_snapshot(backends.prometheus)
        return second if first.counts == second.counts else None

    before = poll(quiet, 180, "every source's counts standing still after locust stopped", interval=1)
    breakdowns = [breakdown()] if breakdown else []
    sessions = [requests.Session() for _ in apps]

    def send(numbered: tuple[int, str]) -> tuple[int, str, int]:
        number, path = numbered
        which = number % len(apps)
        return which, path, sessions[which].get(apps[which] + path, timeout=10).status_code

    started = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(send, enumerate(PLAN)))
        direct = [] if past_the_edge is None else list(pool.map(
            lambda path: (path, requests.get(past_the_edge + path, timeout=10).status_code), PAST_THE_EDGE))
    finished = time.time()
    wrong = [(path, status) for _, path, status in answers if status != EXPECTED_STATUS.get(path, 404)]
    wrong += [(f"{past_the_edge}{path}", status) for path, status in direct if status != EXPECTED_STATUS[path]]
    assert not wrong, f"unexpected answers from the app: {wrong[:10]}"

    def route(path: str) -> str:
        return path if path in EXPECTED_STATUS else "/**"

    sent = Counter((route(path), str(status)) for _, path, status in answers)
    sent_by_app = {app: Counter((route(p), str(s)) for which, p, s in answers if apps[which] == app) for app in apps}
    sent_direct = Counter((route(path), str(status)) for path, status in direct)
    sources = ["otel", "manual"] + (["ebpf"] if beyla else []) + (["edge"] if past_the_edge else [])
    # What each source must count: the edge what came through it, the others everything the app answered.
    expected = {source: sent if source == "edge" else sent + sent_direct for source in sources}

    def increases():
        diff = difference(take_snapshot(backends.prometheus), before)
        seen = {source: diff.counts.get(source, Counter()) for source in sources}
        if not all(seen[source] == expected[source] for source in sources):
            return None
        if breakdown:
            breakdowns.append(breakdown())
        return seen

    try:
        counted = poll(increases, 180, f"each of {sources} counting exactly what was sent, {dict(sent)}"
                       + (f", plus {dict(sent_direct)} past the edge (not counted by the edge)" if direct else ""),
                       interval=5)
    finally:
        requests.post(f"{backends.locust}/swarm", data={"user_count": 5, "spawn_rate": 1, "host": locust_host},
                      timeout=10)
    # The window of the known load, for the sources that are read by time (Loki): every request was
    # answered between these two instants, and the app logged it while answering.
    return {"sent": sent, "sent_by_app": sent_by_app, "sent_direct": sent_direct, "expected": expected,
            "counted": counted, "sources": sources, "window": (started, finished), "breakdown": tuple(breakdowns)}


# --- metrics -----------------------------------------------------------------------------------------


def every_source_counts_what_was_sent(load: dict) -> None:
    # send_known_load already waited for equality; this states the claim and shows the numbers.
    direct = f", past the edge {dict(load['sent_direct'])}" if load["sent_direct"] else ""
    print(f"\nsent {dict(load['sent'])}{direct}")
    for source, counts in load["counted"].items():
        print(f"{source:7} {dict(counts)}")
        assert counts == load["expected"][source], source
    if "edge" in load["counted"]:
        # The edge counts what users sent through it: the plan, not the requests to the app's own port.
        assert load["counted"]["edge"] == load["sent"]
        for source in set(load["counted"]) - {"edge"}:
            assert load["counted"][source] - load["counted"]["edge"] == load["sent_direct"], source


def recording_rule_rows(backends: Backends, sources: list[str]) -> None:
    for route in ("/", "/fail", "/**"):
        def rows(route=route):
            found = {r["metric"]["telemetry_source"] for r in backends.prometheus_query(
                f'dice:http_requests:rate1m{{route="{route}"}}')}
            return found if set(sources) <= found else None

        poll(rows, 120, f"dice:http_requests:rate1m rows for route {route} from {sources}", interval=5)


# --- traces ------------------------------------------------------------------------------------------

GET_ROOT = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "/" && span.http.request.method = "GET" }}'
FAIL_ERROR = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "/fail" && status = error }}'


def tempo_finds_a_get_root_trace(backends: Backends, roots: tuple[str, ...] = (SERVICE,)) -> list[dict]:
    """`roots`: the services a GET / trace may start at (the app's own, or the edge in front of it; locust's
    background load starts its own traces, as `locust`)."""
    traces = poll(lambda: backends.tempo_search(GET_ROOT), 180, f"Tempo search {GET_ROOT}", interval=5)
    assert any(trace.get("rootTraceName") == "GET /" for trace in traces), [t.get("rootTraceName") for t in traces]
    assert {trace.get("rootServiceName") for trace in traces} <= set(roots), [t.get("rootServiceName") for t in traces]
    return traces


# The edge's hop into the app, and the app's SERVER span under it (TraceQL's structural `>`: parent of).
EDGE_TO_APP = (f'{{ resource.service.name = "{EDGE_SERVICE}" && kind = client }} > '
               f'{{ resource.service.name = "{SERVICE}" && kind = server && span.http.route = "/" }}')
SPAN_KINDS = {2: "SPAN_KIND_SERVER", 3: "SPAN_KIND_CLIENT"}  # OTLP's enum, when a JSON encoder writes numbers


def trace_spans(trace: dict) -> list[dict]:
    """Every span of a trace as Tempo's API returns it (OTLP JSON: `batches` of /api/traces, or the
    `resourceSpans` of /api/v2/traces), each with its resource's service.name and its kind by name."""
    resource_spans = trace.get("batches") or trace.get("resourceSpans") or trace.get("trace", {}).get("resourceSpans")
    spans = []
    for resource in resource_spans or []:
        service = next(attribute_values(resource.get("resource", {}), "service.name"), None)
        for scope in resource.get("scopeSpans") or resource.get("instrumentationLibrarySpans") or []:
            for span in scope.get("spans", []):
                kind = span.get("kind")
                spans.append({**span, "service": service, "kind": SPAN_KINDS.get(kind, kind),
                              "parentSpanId": span.get("parentSpanId") or span.get("parent_span_id") or "",
                              "spanId": span.get("spanId") or span.get("span_id")})
    return spans


def the_apps_server_span_is_a_child_of_the_edges(backends: Backends) -> None:
    """In a trace of GET / through the edge: the app's SERVER span's parent is the edge's CLIENT span (its hop,
    edge.hop=upstream), whose parent is the edge's SERVER span for route / (what the user waited for)."""
    def linked():
        for found in backends.tempo_search(EDGE_TO_APP, limit=10):
            detail = backends.trace(found["traceID"])
            spans = trace_spans(detail) if detail else []
            by_id = {span["spanId"]: span for span in spans}
            for app in [s for s in spans if s["service"] == SERVICE and s["kind"] == "SPAN_KIND_SERVER"]:
                hop = by_id.get(app["parentSpanId"])
                if hop and hop["service"] == EDGE_SERVICE and hop["kind"] == "SPAN_KIND_CLIENT":
                    return app, hop, by_id.get(hop["parentSpanId"])
        return None

    app, hop, user = poll(linked, 180, f"a trace where {EDGE_TO_APP}", interval=5)
    assert "upstream" in attribute_values(hop, "edge.hop"), hop
    assert user and user["service"] == EDGE_SERVICE and user["kind"] == "SPAN_KIND_SERVER", user
    assert "/" in attribute_values(user, "http.route") and user["name"] == "GET /", user
    # The hop lies inside the user's request, and the app's span inside the hop: the edge's clock includes the app's.
    for outer, inner in ((user, hop), (hop, app)):
        assert int(outer["startTimeUnixNano"]) <= int(inner["startTimeUnixNano"]), (outer, inner)
        assert int(inner["endTimeUnixNano"]) <= int(outer["endTimeUnixNano"]), (outer, inner)


def tempo_finds_an_error_trace_for_fail(backends: Backends) -> None:
    traces = poll(lambda: backends.tempo_search(FAIL_ERROR), 180, f"Tempo search {FAIL_ERROR}", interval=5)
    assert any(trace.get("rootTraceName") == "GET /fail" for trace in traces)


# --- logs --------------------------------------------------------------------------------------------


def wait_for_loki_count(backends: Backends, logql_selector: str, window: tuple[float, float], expected: int) -> int:
    def count():
        seen = backends.loki_count_in_window(logql_selector, window)
        # Raised, not returned: poll then reports the last count seen if it never matches.
        assert seen == expected, f"{seen} records match {logql_selector}, expected {expected}"
        return seen

    return poll(count, 180, f"Loki counting {expected} records of {logql_selector}", interval=5)


def loki_has_one_dice_rolled_record_per_get_root(backends: Backends, load: dict) -> None:
    # app.py logs `Dice rolled: N` once per GET /; the SDK's logging handler exports each record.
    expected = load["sent"][("/", "200")]
    selector = f'{{service_name="{SERVICE}"}} |= "Dice rolled"'
    print(f"\nsent GET / {expected}, Loki {wait_for_loki_count(backends, selector, load['window'], expected)}")


def loki_has_one_error_record_per_failed_request(backends: Backends, load: dict) -> None:
    # app.py's error handler logs the traceback once per /fail, at ERROR.
    expected = load["sent"][("/fail", "500")]
    selector = f'{{service_name="{SERVICE}"}} | severity_text="ERROR" |= "Intentional failure"'
    wait_for_loki_count(backends, selector, load["window"], expected)


def a_trace_id_from_tempo_finds_its_logs(backends: Backends, load: dict) -> None:
    start, end = load["window"][0] - 3600, time.time() + 60

    def logs_of_a_trace():
        # The first /fail trace whose records Loki has (a trace is searchable before its logs arrive).
        for trace in backends.tempo_search(FAIL_ERROR, limit=10):
            trace_id = trace["traceID"].rjust(32, "0")  # Tempo's search may drop leading zeros
            params = {"query": f'{{service_name="{SERVICE}"}} | trace_id="{trace_id}"', "limit": 100,
                      "start": str(int(start * 1e9)), "end": str(int(end * 1e9))}
            streams = backends.loki_get("query_range", params, categorize=True)["data"]["result"]
            if streams:
                return trace_id, [(stream["stream"], value) for stream in streams for value in stream["values"]]
        return None

    trace_id, entries = poll(logs_of_a_trace, 180, "a /fail trace in Tempo whose trace id Loki finds", interval=5)
    for labels, (_, _, metadata) in entries:
        # trace_id is structured metadata of the entry, never a label of its stream.
        assert labels.get("service_name") == SERVICE and "trace_id" not in labels and "span_id" not in labels
        assert metadata["structuredMetadata"]["trace_id"] == trace_id
    errors = [line for _, (_, line, metadata) in entries
              if metadata["structuredMetadata"].get("severity_text") == "ERROR"]
    assert any("Intentional failure" in line for line in errors), entries[:3]


def loki_indexes_service_name_but_not_trace_ids(backends: Backends) -> None:
    labels = poll(lambda: backends.loki_get("labels", {})["data"], 60, "Loki's stream labels", interval=5)
    assert "service_name" in labels
    assert not {"trace_id", "span_id"} & set(labels), labels
    assert SERVICE in backends.loki_get("label/service_name/values", {})["data"]


# --- profiles ----------------------------------------------------------------------------------------


def pyroscope_has_a_cpu_profile_with_the_view_function(backends: Backends) -> None:
    body = {"profileTypeID": CPU_PROFILE, "labelSelector": f'{{service_name="{SERVICE}"}}', **last_minutes_ms()}

    def names() -> list[str]:
        names = backends.pyroscope_query("SelectMergeStacktraces", body).get("flamegraph", {}).get("names", [])
        return names if any(VIEW_FUNCTION in name for name in names) else None

    poll(names, 240, f"a {CPU_PROFILE} profile of {SERVICE} with a {VIEW_FUNCTION} frame", interval=5)


def span_ids_of_traces_resolve_to_span_profiles(backends: Backends) -> None:
    def profile_ids() -> list[str]:
        ids = []
        for route in ("/fail", "/"):
            query = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "{route}" }}'
            for trace in backends.tempo_search(query, limit=30):
                detail = backends.trace(trace["traceID"])
                if detail:
                    ids += attribute_values(detail, "pyroscope.profile.id")
        return sorted(set(ids))

    ids = poll(profile_ids, 180, "traces whose root span carries pyroscope.profile.id", interval=5)
    selector = {"profileTypeID": CPU_PROFILE, "labelSelector": f'{{service_name="{SERVICE}"}}'}

    def total(span_ids: list[str]) -> int:
        answer = backends.pyroscope_query("SelectMergeSpanProfile",
                                    {**selector, "spanSelector": span_ids, **last_minutes_ms()})
        return int(answer.get("flamegraph", {}).get("total", 0))

    # A span shorter than the 10 ms sampling period can have no sample, so ask for all of them first.
    poll(lambda: total(ids), 240, f"a span profile for any of {len(ids)} pyroscope.profile.id values", interval=5)
    resolved = next((span_id for span_id in ids if total([span_id]) > 0), None)
    assert resolved, f"none of {len(ids)} span ids resolves on its own, although together they do"


# --- Alertmanager ------------------------------------------------------------------------------------


def prometheus_sends_alerts_to_the_alertmanager(backends: Backends, url: str, version: str) -> None:
    def active():
        answer = requests.get(f"{backends.prometheus}/api/v1/alertmanagers", timeout=10).json()["data"]
        return answer["activeAlertmanagers"]

    (alertmanager,) = poll(active, 60, "an active Alertmanager in Prometheus's /api/v1/alertmanagers", interval=5)
    assert alertmanager["url"] == url
    status = requests.get(f"{backends.alertmanager}/api/v2/status", timeout=10).json()
    assert status["versionInfo"]["version"] == version.removeprefix("v")
    assert status["cluster"]["status"] == "disabled"


# --- Grafana -----------------------------------------------------------------------------------------

# Caddy's own metrics of the edge's Grafana listener (server "grafana" in edge/caddy-config.json; seen on the
# caddy of CADDY_VERSION: caddy_http_request_duration_seconds_count{server, handler, code, method}).
GRAFANA_AT_THE_EDGE = 'sum(caddy_http_request_duration_seconds_count{server="grafana", code="200"})'


def grafana_answers_through_the_edge(backends: Backends, requests_sent: int = 20) -> None:
    """backends.grafana is the edge's Grafana listener: Grafana answers there, and the edge counts exactly
    those answers on that listener. Nothing else calls Grafana through the edge meanwhile: its healthcheck
    runs inside its own container, and no browser is open."""
    def total() -> float:
        rows = backends.prometheus_query(GRAFANA_AT_THE_EDGE)
        return float(rows[0]["value"][1]) if rows else 0.0

    def steady():
        # Two reads a scrape or more apart that agree (the edge's job is scraped every 15 s at most).
        first = total()
        time.sleep(20)
        second = total()
        return (second,) if first == second else None

    (before,) = poll(steady, 120, f"{GRAFANA_AT_THE_EDGE} standing still", interval=1)
    for _ in range(requests_sent):
        response = requests.get(f"{backends.grafana}/api/health", timeout=10)
        assert response.status_code == 200 and response.json().get("database") == "ok", response.text[:300]

    def counted():
        seen = total() - before
        assert seen <= requests_sent, f"the edge counted {seen} Grafana answers, {requests_sent} were asked"
        return seen == requests_sent

    poll(counted, 90, f"the edge counting the {requests_sent} Grafana answers on its grafana listener", interval=5)



def grafana_datasources_are_healthy(backends: Backends) -> None:
    for uid in DATASOURCE_UIDS:
        def health(uid=uid):
            response = requests.get(f"{backends.grafana}/api/datasources/uid/{uid}/health",
                                    auth=backends.grafana_admin, timeout=30)
            answer = response.json()
            return answer if answer.get("status") == "OK" else None

        poll(health, 120, f"Grafana health check of datasource {uid}", interval=5)


# The field that holds a target's query, per datasource plugin (each plugin's query model, as its backend
# reads it from /api/ds/query): Prometheus and Loki `expr`; Tempo `query`, the TraceQL that queryType
# traceql and traceqlSearch both run (the search builder writes its TraceQL there too); Pyroscope
# `profileTypeId`, narrowed by `labelSelector` and answered as a profile and/or series per `queryType`.
# A target whose plugin is not listed, or that lacks its field, stops the check rather than being skipped.
QUERY_FIELDS = {
    "prometheus": "expr",
    "loki": "expr",
    "tempo": "query",
    "grafana-pyroscope-datasource": "profileTypeId",
}


@dataclass(frozen=True)
class PanelQuery:
    """One query of a provisioned dashboard, as Grafana's /api/ds/query is sent it."""

    dashboard: str  # its uid
    panel: str  # the panel's title
    source: str | None  # the value of the dashboard's `source` variable it was expanded with, if any
    query: dict  # the target with its datasource and every field of its own

    @property
    def title(self) -> str:
        return self.panel + (f" [source={self.source}]" if self.source else "")

    @property
    def text(self) -> str:
        """The query itself (PromQL, LogQL, TraceQL or a profile type), for messages."""
        return self.query[QUERY_FIELDS[self.query["datasource"]["type"]]]


def dashboard_queries(dashboard: dict) -> list[PanelQuery]:
    """Every target of every panel of `dashboard`, each as a query for /api/ds/query.

    A target is sent with all its own fields (whatever its plugin calls the query) and the datasource it
    names, or else its panel's. /api/ds/query does not fill in dashboard variables: a target that uses
    `source` is sent once per value, with the value written in, as Grafana sends it when the variable is
    set to that value. Raises ValueError for a target that cannot be sent as it stands."""
    uid = dashboard.get("uid")
    queries = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"dashboard {uid!r}, panel {panel.get('title')!r}, target {target.get('refId')!r}"
            datasource = target.get("datasource") or panel.get("datasource")
            if not isinstance(datasource, dict) or not {"type", "uid"} <= datasource.keys():
                raise ValueError(f"{where}: names no datasource type and uid (nor does its panel): {datasource!r}")
            field = QUERY_FIELDS.get(datasource["type"])
            if field is None:
                raise ValueError(f"{where}: datasource type {datasource['type']!r} is not in QUERY_FIELDS, so "
                                 f"this check does not know which field holds its query")
            if not str(target.get(field) or "").strip():
                raise ValueError(f"{where}: a {datasource['type']} target without its query field {field!r}; "
                                 f"it has only {sorted(target)}")
            if "refId" not in target:
                raise ValueError(f"{where}: no refId, under which /api/ds/query answers")
            # Every field may use the variable (a Pyroscope label selector as well as an expr): substitute it
            # in the whole target, so no field is left holding an unexpanded `$source`.
            for source, text in with_source(dashboard, json.dumps(target)):
                query = {**json.loads(text), "datasource": datasource, "intervalMs": 15000, "maxDataPoints": 100}
                queries.append(PanelQuery(uid, panel.get("title", ""), source, query))
    return queries


def every_dashboard_loads_and_its_queries_return_data(backends: Backends, empty_here: dict | None = None) -> None:
    """`empty_here`: uid -> panel titles that this deployment rightly leaves empty (besides MAY_BE_EMPTY), each
    with its reason where the caller passes it."""
    dashboards = [json.loads(path.read_text()) for path in (REPO_ROOT / "grafana" / "dashboards").glob("*.json")]
    files = {dashboard["uid"]: dashboard for dashboard in dashboards}
    auth = backends.grafana_admin
    listed = requests.get(f"{backends.grafana}/api/search", params={"type": "dash-db"}, auth=auth, timeout=30).json()
    assert set(files) <= {item["uid"] for item in listed}, "a dashboard file was not provisioned"
    for uid, dashboard in files.items():
        response = requests.get(f"{backends.grafana}/api/dashboards/uid/{uid}", auth=auth, timeout=30)
        assert response.status_code == 200, f"{uid}: {response.status_code} {response.text[:300]}"
        assert response.json()["dashboard"]["title"] == dashboard["title"]
        # Every target, Tempo's TraceQL and Pyroscope's profile type included (tests/grafana/test_dashboard_targets.py
        # checks that none is left out).
        for panel_query in dashboard_queries(dashboard):
            frames = _panel_frames(backends, panel_query.query, panel_query.title)
            if panel_query.panel in (*MAY_BE_EMPTY.get(uid, ()), *(empty_here or {}).get(uid, ())):
                frames()  # answers without an error; data only while an alert is pending or firing
            else:
                poll(frames, 180, f"data for panel {panel_query.title!r} of {uid}: {panel_query.text}", interval=5)


def _panel_frames(backends: Backends, query: dict, title: str) -> Callable[[], list]:
    def frames():
        body = {"queries": [query], "from": "now-10m", "to": "now"}
        answer = requests.post(f"{backends.grafana}/api/ds/query", json=body, auth=backends.grafana_admin,
                               timeout=30).json()
        result = answer["results"][query["refId"]]
        assert "error" not in result, f"{title}: {result['error']}"
        return [f for f in result.get("frames", []) if any(f.get("data", {}).get("values", []))]

    return frames


# --- saturation: node-exporter and cAdvisor, through the naming layer (prometheus/rules/dice-saturation.yaml) ---
MIB = 2**20


def exporters_measure_the_host_and_the_app(backends: Backends, cpu_limit_cores: float, memory_limit_bytes: int,
                                           kubelets: bool = False) -> dict:
    """Both exporters scraped on every target, and the naming layer answering for the host and for the app's
    container (service="app") with the limits the deployment gives the app (summed over replicas): one
    query serves compose's Docker labels and the Kubernetes pod alike. `kubelets`: cAdvisor's targets are
    the nodes' kubelets (then each target's `node` label is its node)."""
    def measured():
        up = backends.prometheus_query('up{job=~"node-exporter|cadvisor"}')
        jobs = Counter(row["metric"]["job"] for row in up)
        assert set(jobs) == {"node-exporter", "cadvisor"}, f"targets: {dict(jobs)}"
        assert all(row["value"][1] == "1" for row in up), [(r["metric"], r["value"][1]) for r in up]
        if kubelets:
            # One kubelet and one node-exporter per node.
            assert jobs["cadvisor"] == jobs["node-exporter"] and all(
                row["metric"].get("node") for row in up if row["metric"]["job"] == "cadvisor"), up

        def value(query: str) -> float:
            rows = backends.prometheus_query(query)
            assert len(rows) == 1, f"{query}: {rows}"
            return float(rows[0]["value"][1])

        found = {
            "cpu_limit": value('dice:container_cpu_limit:cores{service="app"}'),
            "memory_limit": value('dice:container_memory_limit:bytes{service="app"}'),
            "working_set": value('dice:container_memory_working_set:bytes{service="app"}'),
            "cpu_used": value('dice:container_cpu_usage:cores_rate1m{service="app"}'),
            "throttled": value('dice:container_cpu_throttled_periods:ratio_rate1m{service="app"}'),
            "oom_kills": value('dice:container_oom_events:increase5m{service="app"}'),
        }
        assert found["cpu_limit"] == cpu_limit_cores, found
        assert found["memory_limit"] == memory_limit_bytes, found
        # A running gunicorn holds tens of MiB, and the limit was not reached (nothing was OOM-killed).
        assert 10 * MIB < found["working_set"] < memory_limit_bytes, found
        assert 0 < found["cpu_used"] <= cpu_limit_cores and 0 <= found["throttled"] <= 1, found
        assert found["oom_kills"] == 0, found
        for rule in ("dice:node_cpu_busy:ratio_rate1m", "dice:node_memory_available:ratio",
                     "dice:node_filesystem_free:ratio"):
            rows = backends.prometheus_query(f'{rule}{{instance=~".+"}}')
            assert rows and all(0 < float(row["value"][1]) < 1 for row in rows), f"{rule}: {rows}"
        # The host moves bytes: at least Prometheus's own scrapes of node-exporter.
        rows = backends.prometheus_query('dice:node_network_receive:bytes_rate1m{instance=~".+"}')
        assert rows and all(float(row["value"][1]) > 0 for row in rows), rows
        return found

    found = poll(measured, 180, "node-exporter and cAdvisor through the naming layer", interval=5)
    print(f"saturation of the app: {found}")
    return found
