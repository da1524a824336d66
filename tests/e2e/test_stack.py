"""The docker tier: the whole compose stack, started for real, checked through each backend's HTTP API.

Runs wherever a Docker engine answers (`make e2e`, and the e2e GitHub workflow); skipped, saying why,
everywhere else. It brings the stack up exactly as the README says (`docker compose up -d --wait`,
here under its own project name), sends a known load through the edge, as users call the app, then asserts:
- with locust's background load stopped, each source (ebpf, otel, manual, and edge: telemetry_source="edge")
  counts exactly what the test sent, per route and status, 404s included, and the recording rules have rows
  for every source; requests sent to the app's own port beside it (kept for the comparisons) are counted by
  every source but the edge;
- Tempo's search finds a `GET /` trace and an error trace for /fail, and a trace in which the app's SERVER
  span is the child of the edge's CLIENT span (its hop into the app), itself under the edge's SERVER span;
- Pyroscope has a CPU profile of dice-api with the view function's frame, and the span ids that
  traces carry as pyroscope.profile.id resolve to span profiles;
- Loki, by LogQL over the same known load, has one `Dice rolled` record per `GET /` and one ERROR record
  per `/fail`; the trace id of a /fail trace in Tempo finds its ERROR record as structured metadata
  (service_name is the only stream label of the two);
- Prometheus sends its alerts to the compose Alertmanager, which runs alone (no HA cluster);
- Grafana answers on the edge's Grafana listener (its published port), and the edge counts those answers;
  its health check passes for every datasource, Loki's included, every provisioned dashboard loads, and
  its queries (PromQL, and the LogQL of the logs panel) return data through Grafana;
- the edge run on its own with BIND_ADDRESS=0.0.0.0 and anonymous Grafana refuses to serve, says why in its
  log naming both settings, and turns unhealthy (what makes `docker compose up --wait` fail);
and tears the stack down with its volumes (E2E_KEEP_STACK=1 keeps it for a look).
Compose's logs are written to .cache/e2e/ before teardown, for CI to keep when something fails.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass

import backend_checks as checks
import pytest
import requests
from backend_checks import Backends, send_known_load, skip_unless, why_no_docker
from stackfiles import COMPOSE_FILE, REPO_ROOT, compose, dotenv

from tooling.native.stack import poll

pytestmark = pytest.mark.e2e

PROJECT = "dice-e2e"
LOG_DIR = REPO_ROOT / ".cache" / "e2e"


# Published ports, on the loopback address the test sets as BIND_ADDRESS: .env's, or the shell's.
def published(variable: str) -> str:
    return f"http://127.0.0.1:{os.environ.get(variable) or dotenv()[variable]}"


EDGE = published("EDGE_PORT")  # the app, as users call it
APP = published("APP_PORT")  # the app's own port, past the edge
GRAFANA = published("GRAFANA_PORT")  # the edge's Grafana listener


def why_no_compose() -> str | None:
    reason = why_no_docker()
    if reason is None and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                         timeout=30).returncode != 0:
        reason = "Docker Compose v2 (`docker compose`) is not installed"
    return reason


skip_unless("docker tier", why_no_compose())


def compose_cmd(*args: str) -> list[str]:
    return ["docker", "compose", "--project-name", PROJECT, "--project-directory", str(REPO_ROOT),
            "--file", str(COMPOSE_FILE), *args]  # fmt: skip


@dataclass
class Stack:
    env: dict[str, str]
    backends: Backends

    def compose(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        # `env`: variables over the stack's own, for one command (as a user's shell would set them).
        return subprocess.run(compose_cmd(*args), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self, service: str = "", tail: int = 60) -> str:
        return self.compose("logs", "--no-color", f"--tail={tail}", *([service] if service else [])).stdout


@pytest.fixture(scope="module")
def stack():
    password = secrets.token_urlsafe(18)
    env = {**os.environ, "BIND_ADDRESS": "127.0.0.1", "GRAFANA_ADMIN_PASSWORD": password}
    backends = Backends(
        prometheus=published("PROMETHEUS_PORT"), alertmanager=published("ALERTMANAGER_PORT"),
        tempo=published("TEMPO_PORT"), loki=published("LOKI_PORT"), pyroscope=published("PYROSCOPE_PORT"),
        grafana=GRAFANA, locust=published("LOCUST_PORT"), grafana_admin=(dotenv()["GRAFANA_ADMIN_USER"], password),
    )
    stack = Stack(env=env, backends=backends)
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
def load(stack) -> dict:
    """The known load of backend_checks.send_known_load through the edge's published port, as locust's --host
    in docker-compose.yml, and a few requests to the app's own port beside it."""
    beyla = dotenv()["BEYLA_SCALE"] != "0"
    return send_known_load(stack.backends, [EDGE], beyla=beyla, locust_host="http://edge:8080", past_the_edge=APP)


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


# --- metrics, traces, logs, profiles: the claims every deployment of the stack holds (backend_checks) ---


def test_every_source_counts_exactly_what_was_sent_per_route_and_status(load):
    checks.every_source_counts_what_was_sent(load)


def test_the_edge_counts_what_came_through_it_and_the_apps_own_port_still_answers(load):
    # The edge is the fourth source (telemetry_source="edge"): the plan, per route and status, exactly; the
    # requests to the app's own port answered 200 and were counted by the app's sources, not by the edge.
    assert "edge" in load["sources"]
    assert load["counted"]["edge"] == load["sent"]
    assert load["sent_direct"] == {("/health", "200"): len(checks.PAST_THE_EDGE)}
    assert load["counted"]["otel"] == load["sent"] + load["sent_direct"]


def test_the_recording_rules_have_rows_for_every_source(stack, load):
    checks.recording_rule_rows(stack.backends, load["sources"])


def test_tempo_finds_a_get_root_trace(stack, load):
    # Every GET / went through the edge: the test's requests start their traces there, locust's at locust.
    checks.tempo_finds_a_get_root_trace(stack.backends, roots=(checks.EDGE_SERVICE, "locust"))


def test_the_apps_server_span_is_a_child_of_the_edges_client_span(stack, load):
    checks.the_apps_server_span_is_a_child_of_the_edges(stack.backends)


def test_tempo_finds_an_error_trace_for_fail(stack, load):
    checks.tempo_finds_an_error_trace_for_fail(stack.backends)


def test_loki_has_one_dice_rolled_record_per_get_root(stack, load):
    checks.loki_has_one_dice_rolled_record_per_get_root(stack.backends, load)


def test_loki_has_one_error_record_per_failed_request(stack, load):
    checks.loki_has_one_error_record_per_failed_request(stack.backends, load)


def test_a_trace_id_from_tempo_finds_its_logs_in_loki_by_structured_metadata(stack, load):
    checks.a_trace_id_from_tempo_finds_its_logs(stack.backends, load)


def test_loki_indexes_service_name_but_not_trace_ids(stack, load):
    checks.loki_indexes_service_name_but_not_trace_ids(stack.backends)


def test_pyroscope_has_a_cpu_profile_with_the_view_function(stack, load):
    checks.pyroscope_has_a_cpu_profile_with_the_view_function(stack.backends)


def test_span_ids_of_traces_resolve_to_span_profiles(stack, load):
    checks.span_ids_of_traces_resolve_to_span_profiles(stack.backends)


def test_prometheus_sends_alerts_to_the_alertmanager(stack):
    checks.prometheus_sends_alerts_to_the_alertmanager(
        stack.backends, "http://alertmanager:9093/api/v2/alerts", dotenv()["ALERTMANAGER_VERSION"])


def test_grafana_answers_through_the_edge(stack):
    checks.grafana_answers_through_the_edge(stack.backends)


def test_grafana_datasources_are_healthy(stack):
    checks.grafana_datasources_are_healthy(stack.backends)


# Compose's cAdvisor collects no process metrics (they need the host's pid namespace and SYS_PTRACE:
# docs/saturation.md), and the app's /metrics has no process_open_fds: no open-file-descriptor series here.
EMPTY_IN_COMPOSE = {"golden-signals": ("App open file descriptors (cAdvisor)",)}


def test_every_provisioned_dashboard_loads_and_its_queries_return_data(stack, load):
    checks.every_dashboard_loads_and_its_queries_return_data(stack.backends, EMPTY_IN_COMPOSE)


def test_node_exporter_and_cadvisor_measure_the_host_and_the_apps_container(stack, load):
    # Compose's limits for the app service (docker-compose.yml: cpus, mem_limit), as Docker applies them.
    app = compose()["services"]["app"]
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    limit = int(app["mem_limit"][:-1]) * units[app["mem_limit"][-1]]
    checks.exporters_measure_the_host_and_the_app(stack.backends, float(app["cpus"]), limit)


def test_anonymous_visitors_can_view_the_overview(stack):
    if dotenv()["GRAFANA_ANONYMOUS_ENABLED"] != "true":
        pytest.skip("anonymous viewing is switched off in .env")
    response = requests.get(f"{GRAFANA}/api/dashboards/uid/stack-overview", timeout=30)
    assert response.status_code == 200, response.text[:300]
    # Read-only: the anonymous role is Viewer, which cannot create anything.
    created = requests.post(f"{GRAFANA}/api/folders", json={"title": "anonymous write"}, timeout=30)
    assert created.status_code in (401, 403), f"anonymous visitor could write: {created.status_code}"


def test_the_edge_refuses_anonymous_grafana_off_loopback(stack):
    # The edge alone (no dependencies, no published ports: `compose run` publishes none without
    # --service-ports), as `up` would start it with BIND_ADDRESS=0.0.0.0 and anonymous viewing on.
    name = f"{PROJECT}-edge-refusal"
    off_loopback = {"BIND_ADDRESS": "0.0.0.0", "GRAFANA_ANONYMOUS_ENABLED": "true"}
    started = stack.compose("run", "--detach", "--no-deps", "--name", name, "edge", env=off_loopback)
    assert started.returncode == 0, started.stderr
    try:
        def inspect(field: str) -> str:
            return subprocess.run(["docker", "inspect", "--format", f"{{{{{field}}}}}", name], capture_output=True,
                                  text=True, timeout=30).stdout.strip()

        def logs() -> str:
            result = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
            return result.stdout + result.stderr

        message = poll(lambda: "refusing" in logs() and logs(), 60, "the edge's refusal in its log", interval=2)
        assert "BIND_ADDRESS=0.0.0.0" in message and "GRAFANA_ANONYMOUS_ENABLED=true" in message, message
        # Unhealthy, not restarting: Compose fails `up --wait` on an unhealthy container (it would wait without
        # end on one that restarts). Its start period is 10 s, then 5 failures 5 s apart.
        health = poll(lambda: inspect(".State.Health.Status") == "unhealthy" or None, 120,
                      "the refusing edge turning unhealthy", interval=5)
        assert health and inspect(".State.Status") == "running" and inspect(".RestartCount") == "0"
        # And `stop` ends it on SIGTERM: the script handles it as PID 1 and exits 1 (137 would be the SIGKILL
        # that follows the grace period when PID 1 ignores SIGTERM).
        stop = subprocess.run(["docker", "stop", "--time", "30", name], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert inspect(".State.ExitCode") == "1"
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)
