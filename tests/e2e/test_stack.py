"""The docker tier: the whole compose stack, started for real, checked through each backend's HTTP API.

Runs wherever a Docker engine answers (`make e2e`, and the e2e GitHub workflow); skipped, saying why,
everywhere else. It brings the stack up exactly as the README says (`docker compose up -d --wait`,
here under its own project name), sends a known load, then asserts:
- with locust's background load stopped, each source (ebpf, otel, manual) counts exactly what the test
  sent, per route and status, 404s included, and the recording rules have rows for every source;
- Tempo's search finds a `GET /` trace and an error trace for /fail;
- Pyroscope has a CPU profile of dice-api with the view function's frame, and the span ids that
  traces carry as pyroscope.profile.id resolve to span profiles;
- Loki, by LogQL over the same known load, has one `Dice rolled` record per `GET /` and one ERROR record
  per `/fail`; the trace id of a /fail trace in Tempo finds its ERROR record as structured metadata
  (service_name is the only stream label of the two);
- Prometheus sends its alerts to the compose Alertmanager, which runs alone (no HA cluster);
- Grafana's health check passes for every datasource, Loki's included, every provisioned dashboard
  loads, and its queries (PromQL, and the LogQL of the logs panel) return data through Grafana;
and tears the stack down with its volumes (E2E_KEEP_STACK=1 keeps it for a look).
Compose's logs are written to .cache/e2e/ before teardown, for CI to keep when something fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from stackfiles import COMPOSE_FILE, REPO_ROOT, dashboard_panels, dotenv, with_source

from tooling.native import poll

pytestmark = pytest.mark.e2e

PROJECT = "dice-e2e"
SERVICE = "dice-api"
CPU_PROFILE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
VIEW_FUNCTION = "roll_dice"
LOG_DIR = REPO_ROOT / ".cache" / "e2e"

# Published ports, on the loopback address the test sets as BIND_ADDRESS: .env's, or the shell's.
def published(variable: str) -> str:
    return f"http://127.0.0.1:{os.environ.get(variable) or dotenv()[variable]}"


APP = published("APP_PORT")
PROMETHEUS = published("PROMETHEUS_PORT")
ALERTMANAGER = published("ALERTMANAGER_PORT")
TEMPO = published("TEMPO_PORT")
LOKI = published("LOKI_PORT")
PYROSCOPE = published("PYROSCOPE_PORT")
GRAFANA = published("GRAFANA_PORT")
LOCUST = published("LOCUST_PORT")


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
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        return "Docker Compose v2 (`docker compose`) is not installed"
    return None


REASON = why_no_docker()
if REASON:
    if os.environ.get("E2E_REQUIRE_DOCKER") == "1":
        raise RuntimeError(f"E2E_REQUIRE_DOCKER=1 but {REASON}")
    pytest.skip(f"docker tier skipped: {REASON}", allow_module_level=True)


def compose_cmd(*args: str) -> list[str]:
    return ["docker", "compose", "--project-name", PROJECT, "--project-directory", str(REPO_ROOT),
            "--file", str(COMPOSE_FILE), *args]  # fmt: skip


@dataclass
class Stack:
    env: dict[str, str]
    admin: tuple[str, str]

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(compose_cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def logs(self, service: str = "", tail: int = 60) -> str:
        return self.compose("logs", "--no-color", f"--tail={tail}", *([service] if service else [])).stdout


@pytest.fixture(scope="module")
def stack():
    password = secrets.token_urlsafe(18)
    env = {**os.environ, "BIND_ADDRESS": "127.0.0.1", "GRAFANA_ADMIN_PASSWORD": password}
    stack = Stack(env=env, admin=(dotenv()["GRAFANA_ADMIN_USER"], password))
    # Leftovers of an aborted run would keep the old Grafana password and data.
    stack.compose("down", "--volumes", "--remove-orphans", timeout=300)
    up = stack.compose("up", "--detach", "--wait", "--wait-timeout", "600", "--build", timeout=1500)
    if up.returncode != 0:
        state = stack.compose("ps", "--all").stdout
        logs = stack.logs(tail=80)
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300)
        pytest.fail(
            f"`docker compose up -d --wait` failed:\n{up.stderr}\n\n{state}\n\n{logs}\n"
            "If only beyla failed, eBPF cannot run on this host (README: Beyla requirements)."
        )
    try:
        yield stack
    finally:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (LOG_DIR / "compose.log").write_text(stack.logs(tail=2000))
        (LOG_DIR / "ps.txt").write_text(stack.compose("ps", "--all").stdout)
        if os.environ.get("E2E_KEEP_STACK") != "1":
            stack.compose("down", "--volumes", "--remove-orphans", timeout=300)


@pytest.fixture(scope="module")
def load(stack) -> dict[tuple[str, str], int]:
    """A known load, alone: locust's background load is stopped, every source has reached a steady
    count (Beyla included, which attaches 10-30 s after `up --wait` returns), and the increase of each
    source is taken against that. Returns what was sent per (route, status); the background load runs
    again afterwards, so the dashboards have data."""
    from tooling.compare import difference, take_snapshot

    requests.post(f"{LOCUST}/stop", timeout=10).raise_for_status()
    beyla = dotenv()["BEYLA_SCALE"] != "0"
    if beyla:
        def ebpf_counts():
            requests.get(APP + "/health", timeout=10)  # canaries, until Beyla's tracer is loaded
            return prometheus_query('sum(http_server_request_duration_seconds_count{telemetry_source="ebpf"})')

        poll(ebpf_counts, 180, "Beyla's first counted request", interval=5)

    def quiet():
        # Two snapshots a full export + scrape cycle apart (SDK 10 s, app job 15 s) that agree.
        first = take_snapshot(PROMETHEUS)
        time.sleep(20)
        second = take_snapshot(PROMETHEUS)
        return second if first.counts == second.counts else None

    before = poll(quiet, 180, "every source's counts standing still after locust stopped", interval=1)
    plan = ["/"] * 1500 + ["/health"] * 100 + ["/fail"] * 100 + [f"/no-such-page-{i}" for i in range(50)]
    expected_status = {"/": 200, "/health": 200, "/fail": 500}
    session = requests.Session()

    def send(path: str) -> tuple[str, int]:
        return path, session.get(APP + path, timeout=10).status_code

    started = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(send, plan))
    finished = time.time()
    wrong = [(p, s) for p, s in answers if s != expected_status.get(p, 404)]
    assert not wrong, f"unexpected answers from the app: {wrong[:10]}"
    sent = Counter((p if p in expected_status else "/**", str(s)) for p, s in answers)
    sources = ["otel", "manual"] + (["ebpf"] if beyla else [])

    def increases():
        diff = difference(take_snapshot(PROMETHEUS), before)
        seen = {source: diff.counts.get(source, Counter()) for source in sources}
        return seen if all(seen[source] == sent for source in sources) else None

    try:
        counted = poll(increases, 180, f"each of {sources} counting exactly what was sent, {dict(sent)}",
                       interval=5)
    finally:
        requests.post(f"{LOCUST}/swarm", data={"user_count": 5, "spawn_rate": 1, "host": "http://app:5000"},
                      timeout=10)
    # The window of the known load, for the sources that are read by time (Loki): every request was
    # answered between these two instants, and the app logged it while answering.
    return {"sent": sent, "counted": counted, "beyla": beyla, "window": (started, finished)}


def prometheus_query(query: str) -> list[dict]:
    answer = requests.get(f"{PROMETHEUS}/api/v1/query", params={"query": query}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def tempo_search(traceql: str, limit: int = 20) -> list[dict]:
    now = int(time.time())
    params = {"q": traceql, "start": now - 3600, "end": now + 60, "limit": limit}
    response = requests.get(f"{TEMPO}/api/search", params=params, timeout=30)
    response.raise_for_status()
    return response.json().get("traces", [])


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


def pyroscope(method: str, body: dict) -> dict:
    response = requests.post(
        f"{PYROSCOPE}/querier.v1.QuerierService/{method}",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def last_minutes_ms(minutes: int = 30) -> dict[str, int]:
    now = int(time.time() * 1000)
    return {"start": now - minutes * 60_000, "end": now + 60_000}


# --- the stack itself --------------------------------------------------------------------------------


def test_every_service_is_up_and_healthy(stack):
    out = stack.compose("ps", "--all", "--format", "json").stdout.strip()
    # Compose prints a JSON array (older releases) or one JSON object per line (newer ones).
    rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
    states = {row["Service"]: (row["State"], row.get("Health", "")) for row in rows}
    expected = set(stack.compose("config", "--services").stdout.split())
    if dotenv()["BEYLA_SCALE"] == "0":
        expected.discard("beyla")
    assert expected <= set(states), f"missing containers: {expected - set(states)}"
    for service in expected:
        state, health = states[service]
        hint = "\nBeyla needs eBPF (README: Beyla requirements):\n" + stack.logs("beyla") if service == "beyla" else ""
        assert state == "running", f"{service} is {state}{hint}"
        assert health in ("", "healthy"), f"{service} is {health}"


# --- metrics -----------------------------------------------------------------------------------------


def test_every_source_counts_exactly_what_was_sent_per_route_and_status(load):
    # The fixture already waited for equality; this states the claim and shows the numbers.
    print(f"\nsent {dict(load['sent'])}")
    for source, counts in load["counted"].items():
        print(f"{source:7} {dict(counts)}")
        assert counts == load["sent"], source


def test_the_recording_rules_have_rows_for_every_source(load):
    sources = ["otel", "manual"] + (["ebpf"] if load["beyla"] else [])
    for route in ("/", "/fail", "/**"):
        def rows(route=route):
            found = {r["metric"]["telemetry_source"] for r in prometheus_query(
                f'dice:http_requests:rate1m{{route="{route}"}}')}
            return found if set(sources) <= found else None

        poll(rows, 120, f"dice:http_requests:rate1m rows for route {route} from {sources}", interval=5)


# --- traces ------------------------------------------------------------------------------------------


def test_tempo_finds_a_get_root_trace(load):
    query = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "/" && span.http.request.method = "GET" }}'
    traces = poll(lambda: tempo_search(query), 180, f"Tempo search {query}", interval=5)
    assert any(trace.get("rootTraceName") == "GET /" for trace in traces), [t.get("rootTraceName") for t in traces]
    assert all(trace.get("rootServiceName") == SERVICE for trace in traces)


def test_tempo_finds_an_error_trace_for_fail(load):
    query = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "/fail" && status = error }}'
    traces = poll(lambda: tempo_search(query), 180, f"Tempo search {query}", interval=5)
    assert any(trace.get("rootTraceName") == "GET /fail" for trace in traces)


# --- logs --------------------------------------------------------------------------------------------


def loki_get(path: str, params: dict, categorize: bool = False) -> dict:
    # categorize-labels: each entry carries its structured metadata apart from the stream's labels.
    headers = {"X-Loki-Response-Encoding-Flags": "categorize-labels"} if categorize else {}
    response = requests.get(f"{LOKI}/loki/api/v1/{path}", params=params, headers=headers, timeout=30)
    assert response.ok, f"Loki {path} {params}: {response.status_code} {response.text[:500]}"
    answer = response.json()
    assert answer["status"] == "success", answer
    return answer


def loki_count_in_window(logql_selector: str, window: tuple[float, float]) -> int:
    """How many records `logql_selector` matches whose time lies in the window (one second of slack each
    side; the load ran alone, locust's background load stopped, so nothing else falls in it)."""
    start, end = window[0] - 1, window[1] + 1
    seconds = int(end - start) + 1
    query = f"sum(count_over_time({logql_selector} [{seconds}s]))"
    result = loki_get("query", {"query": query, "time": str(int(end * 1e9))})["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def wait_for_count(logql_selector: str, window: tuple[float, float], expected: int) -> int:
    def count():
        seen = loki_count_in_window(logql_selector, window)
        # Raised, not returned: poll then reports the last count seen if it never matches.
        assert seen == expected, f"{seen} records match {logql_selector}, expected {expected}"
        return seen

    return poll(count, 180, f"Loki counting {expected} records of {logql_selector}", interval=5)


def test_loki_has_one_dice_rolled_record_per_get_root(load):
    # app.py logs `Dice rolled: N` once per GET /; the SDK's logging handler exports each record.
    expected = load["sent"][("/", "200")]
    selector = f'{{service_name="{SERVICE}"}} |= "Dice rolled"'
    print(f"\nsent GET / {expected}, Loki {wait_for_count(selector, load['window'], expected)}")


def test_loki_has_one_error_record_per_failed_request(load):
    # app.py's error handler logs the traceback once per /fail, at ERROR.
    expected = load["sent"][("/fail", "500")]
    selector = f'{{service_name="{SERVICE}"}} | severity_text="ERROR" |= "Intentional failure"'
    wait_for_count(selector, load["window"], expected)


def test_a_trace_id_from_tempo_finds_its_logs_in_loki_by_structured_metadata(load):
    query = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "/fail" && status = error }}'
    start, end = load["window"][0] - 3600, time.time() + 60

    def logs_of_a_trace():
        # The first /fail trace whose records Loki has (a trace is searchable before its logs arrive).
        for trace in tempo_search(query, limit=10):
            trace_id = trace["traceID"].rjust(32, "0")  # Tempo's search may drop leading zeros
            params = {"query": f'{{service_name="{SERVICE}"}} | trace_id="{trace_id}"', "limit": 100,
                      "start": str(int(start * 1e9)), "end": str(int(end * 1e9))}
            streams = loki_get("query_range", params, categorize=True)["data"]["result"]
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


def test_loki_indexes_service_name_but_not_trace_ids(load):
    labels = poll(lambda: loki_get("labels", {})["data"], 60, "Loki's stream labels", interval=5)
    assert "service_name" in labels
    assert not {"trace_id", "span_id"} & set(labels), labels
    values = loki_get("label/service_name/values", {})["data"]
    assert SERVICE in values


# --- profiles ----------------------------------------------------------------------------------------


def test_pyroscope_has_a_cpu_profile_with_the_view_function(load):
    body = {"profileTypeID": CPU_PROFILE, "labelSelector": f'{{service_name="{SERVICE}"}}', **last_minutes_ms()}

    def names() -> list[str]:
        names = pyroscope("SelectMergeStacktraces", body).get("flamegraph", {}).get("names", [])
        return names if any(VIEW_FUNCTION in name for name in names) else None

    poll(names, 240, f"a {CPU_PROFILE} profile of {SERVICE} with a {VIEW_FUNCTION} frame", interval=5)


def test_span_ids_of_traces_resolve_to_span_profiles(load):
    def profile_ids() -> list[str]:
        ids = []
        for route in ("/fail", "/"):
            query = f'{{ resource.service.name = "{SERVICE}" && span.http.route = "{route}" }}'
            for trace in tempo_search(query, limit=30):
                detail = requests.get(f"{TEMPO}/api/traces/{trace['traceID']}", timeout=30)
                if detail.ok:
                    ids += attribute_values(detail.json(), "pyroscope.profile.id")
        return sorted(set(ids))

    ids = poll(profile_ids, 180, "traces whose root span carries pyroscope.profile.id", interval=5)
    selector = {"profileTypeID": CPU_PROFILE, "labelSelector": f'{{service_name="{SERVICE}"}}'}

    def total(span_ids: list[str]) -> int:
        answer = pyroscope("SelectMergeSpanProfile", {**selector, "spanSelector": span_ids, **last_minutes_ms()})
        return int(answer.get("flamegraph", {}).get("total", 0))

    # A span shorter than the 10 ms sampling period can have no sample, so ask for all of them first.
    poll(lambda: total(ids), 240, f"a span profile for any of {len(ids)} pyroscope.profile.id values", interval=5)
    resolved = next((span_id for span_id in ids if total([span_id]) > 0), None)
    assert resolved, f"none of {len(ids)} span ids resolves on its own, although together they do"


# --- Alertmanager ------------------------------------------------------------------------------------


def test_prometheus_sends_alerts_to_the_alertmanager(stack):
    def active():
        answer = requests.get(f"{PROMETHEUS}/api/v1/alertmanagers", timeout=10).json()["data"]
        return answer["activeAlertmanagers"]

    (alertmanager,) = poll(active, 60, "an active Alertmanager in Prometheus's /api/v1/alertmanagers", interval=5)
    assert alertmanager["url"] == "http://alertmanager:9093/api/v2/alerts"
    status = requests.get(f"{ALERTMANAGER}/api/v2/status", timeout=10).json()
    assert status["versionInfo"]["version"] == dotenv()["ALERTMANAGER_VERSION"].removeprefix("v")
    assert status["cluster"]["status"] == "disabled"


# --- Grafana -----------------------------------------------------------------------------------------


def test_grafana_datasources_are_healthy(stack):
    for uid in ("prometheus", "tempo", "loki", "pyroscope"):

        def health(uid=uid):
            response = requests.get(f"{GRAFANA}/api/datasources/uid/{uid}/health", auth=stack.admin, timeout=30)
            answer = response.json()
            return answer if answer.get("status") == "OK" else None

        poll(health, 120, f"Grafana health check of datasource {uid}", interval=5)


# Panels that are rightly empty on a healthy stack where Beyla runs (natively BeylaTargetDown is pending).
MAY_BE_EMPTY = {"slo": ("Alerts firing or pending now, with their runbooks",)}


def test_every_provisioned_dashboard_loads_and_its_queries_return_data(stack, load):
    dashboards = [json.loads(path.read_text()) for path in (REPO_ROOT / "grafana" / "dashboards").glob("*.json")]
    files = {dashboard["uid"]: dashboard for dashboard in dashboards}
    listed = requests.get(f"{GRAFANA}/api/search", params={"type": "dash-db"}, auth=stack.admin, timeout=30).json()
    assert set(files) <= {item["uid"] for item in listed}, "a dashboard file was not provisioned"
    for uid, dashboard in files.items():
        response = requests.get(f"{GRAFANA}/api/dashboards/uid/{uid}", auth=stack.admin, timeout=30)
        assert response.status_code == 200, f"{uid}: {response.status_code} {response.text[:300]}"
        assert response.json()["dashboard"]["title"] == dashboard["title"]
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                if "expr" not in target:
                    continue
                # /api/ds/query does not fill in dashboard variables: each value of `source` is sent as
                # a query of its own, as Grafana sends it when the variable is set to that value.
                for source, expr in with_source(dashboard, target["expr"]):
                    query = {**target, "expr": expr, "intervalMs": 15000, "maxDataPoints": 100}
                    title = panel["title"] + (f" [source={source}]" if source else "")

                    def frames(query=query, title=title):
                        body = {"queries": [query], "from": "now-10m", "to": "now"}
                        answer = requests.post(f"{GRAFANA}/api/ds/query", json=body, auth=stack.admin,
                                               timeout=30).json()
                        result = answer["results"][query["refId"]]
                        assert "error" not in result, f"{title}: {result['error']}"
                        return [f for f in result.get("frames", []) if any(f.get("data", {}).get("values", []))]

                    if panel["title"] in MAY_BE_EMPTY.get(uid, ()):
                        frames()  # answers without an error; data only while an alert is pending or firing
                    else:
                        poll(frames, 180, f"data for panel {title!r}: {expr}", interval=5)


def test_anonymous_visitors_can_view_the_overview(stack):
    if dotenv()["GRAFANA_ANONYMOUS_ENABLED"] != "true":
        pytest.skip("anonymous viewing is switched off in .env")
    response = requests.get(f"{GRAFANA}/api/dashboards/uid/stack-overview", timeout=30)
    assert response.status_code == 200, response.text[:300]
    # Read-only: the anonymous role is Viewer, which cannot create anything.
    created = requests.post(f"{GRAFANA}/api/folders", json={"title": "anonymous write"}, timeout=30)
    assert created.status_code in (401, 403), f"anonymous visitor could write: {created.status_code}"
