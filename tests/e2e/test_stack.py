"""The docker tier: the whole compose stack, started for real, checked through each backend's HTTP API.

Runs wherever a Docker engine answers (`make e2e`, and the e2e GitHub workflow); skipped, saying why,
everywhere else. It brings the stack up exactly as the README says (`docker compose up -d --wait`,
here under its own project name), sends a known load, then asserts:
- Prometheus has series for route "/" from all three sources (telemetry_source ebpf, otel, manual);
- Tempo's search finds a `GET /` trace and an error trace for /fail;
- Pyroscope has a CPU profile of dice-api with the view function's frame, and the span ids that
  traces carry as pyroscope.profile.id resolve to span profiles;
- Grafana's health check passes for every datasource, every provisioned dashboard loads, and its
  PromQL returns data through Grafana;
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from stackfiles import COMPOSE_FILE, REPO_ROOT, dotenv

from zerocode.native import poll

pytestmark = pytest.mark.e2e

PROJECT = "dice-e2e"
SERVICE = "dice-api"
CPU_PROFILE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
VIEW_FUNCTION = "roll_dice"
LOG_DIR = REPO_ROOT / ".cache" / "e2e"

# Published ports (docker-compose.yml), on the loopback address the test sets as BIND_ADDRESS.
APP = "http://127.0.0.1:5000"
PROMETHEUS = "http://127.0.0.1:9090"
TEMPO = "http://127.0.0.1:3200"
PYROSCOPE = "http://127.0.0.1:4040"
GRAFANA = "http://127.0.0.1:3000"


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
def load(stack) -> dict[str, int]:
    """A known load on top of locust's background load; returns requests sent per route."""
    plan = ["/"] * 1500 + ["/health"] * 100 + ["/fail"] * 100
    session = requests.Session()

    def send(path: str) -> int:
        return session.get(APP + path, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(send, plan))
    expected = {"/": 200, "/health": 200, "/fail": 500}
    wrong = [(path, status) for path, status in zip(plan, statuses, strict=True) if status != expected[path]]
    assert not wrong, f"unexpected answers from the app: {wrong[:10]}"
    return {path: plan.count(path) for path in expected}


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


def test_every_source_reports_route_root(load):
    queries = {
        "otel/ebpf": 'sum by (telemetry_source) (http_server_request_duration_seconds_count{http_route="/"})',
        "manual": 'sum by (telemetry_source) (flask_http_request_duration_seconds_count{path="/"})',
    }

    def sources() -> dict[str, float] | None:
        seen = {}
        for query in queries.values():
            for series in prometheus_query(query):
                seen[series["metric"].get("telemetry_source", "")] = float(series["value"][1])
        # Locust's background load adds to ours, so each source must count at least what was sent.
        complete = all(seen.get(source, 0) >= load["/"] for source in ("ebpf", "otel", "manual"))
        return seen if complete else None

    poll(sources, 180, f'series with telemetry_source ebpf, otel and manual counting >= {load["/"]} requests to "/"',
         interval=5)


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


# --- Grafana -----------------------------------------------------------------------------------------


def test_grafana_datasources_are_healthy(stack):
    for uid in ("prometheus", "tempo", "pyroscope"):

        def health(uid=uid):
            response = requests.get(f"{GRAFANA}/api/datasources/uid/{uid}/health", auth=stack.admin, timeout=30)
            answer = response.json()
            return answer if answer.get("status") == "OK" else None

        poll(health, 120, f"Grafana health check of datasource {uid}", interval=5)


def test_every_provisioned_dashboard_loads_and_its_queries_return_data(stack, load):
    dashboards = [json.loads(path.read_text()) for path in (REPO_ROOT / "grafana" / "dashboards").glob("*.json")]
    files = {dashboard["uid"]: dashboard for dashboard in dashboards}
    listed = requests.get(f"{GRAFANA}/api/search", params={"type": "dash-db"}, auth=stack.admin, timeout=30).json()
    assert set(files) <= {item["uid"] for item in listed}, "a dashboard file was not provisioned"
    for uid, dashboard in files.items():
        response = requests.get(f"{GRAFANA}/api/dashboards/uid/{uid}", auth=stack.admin, timeout=30)
        assert response.status_code == 200, f"{uid}: {response.status_code} {response.text[:300]}"
        assert response.json()["dashboard"]["title"] == dashboard["title"]
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if "expr" not in target:
                    continue
                query = {**target, "intervalMs": 15000, "maxDataPoints": 100}

                def frames(query=query, title=panel["title"]):
                    body = {"queries": [query], "from": "now-10m", "to": "now"}
                    answer = requests.post(f"{GRAFANA}/api/ds/query", json=body, auth=stack.admin, timeout=30).json()
                    result = answer["results"][query["refId"]]
                    assert "error" not in result, f"{title}: {result['error']}"
                    return [f for f in result.get("frames", []) if any(f.get("data", {}).get("values", []))]

                poll(frames, 180, f"data for panel {panel['title']!r}: {target['expr']}", interval=5)


def test_anonymous_visitors_can_view_the_overview(stack):
    if dotenv()["GRAFANA_ANONYMOUS_ENABLED"] != "true":
        pytest.skip("anonymous viewing is switched off in .env")
    response = requests.get(f"{GRAFANA}/api/dashboards/uid/stack-overview", timeout=30)
    assert response.status_code == 200, response.text[:300]
    # Read-only: the anonymous role is Viewer, which cannot create anything.
    created = requests.post(f"{GRAFANA}/api/folders", json={"title": "anonymous write"}, timeout=30)
    assert created.status_code in (401, 403), f"anonymous visitor could write: {created.status_code}"
