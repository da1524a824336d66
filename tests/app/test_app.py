"""The application under observation: its behaviour, its zero-code guard, and the image that serves it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tooling.k8s.injection import requirement_pins
from tooling.native.stack import AppSettings, free_port, start_app

APP_DIR = Path(__file__).resolve().parents[2] / "app"
FORBIDDEN_MODULES = ("opentelemetry", "pyroscope", "beyla", "zerocode")


# ------------------------------------------------------------------------------------------ endpoints

@pytest.mark.unit
def test_roll_returns_a_die_value_and_covers_one_to_six(client):
    values = Counter()
    for _ in range(600):
        response = client.get("/")
        assert response.status_code == 200
        assert set(response.get_json()) == {"dice_value"}
        values[response.get_json()["dice_value"]] += 1
    assert set(values) == {1, 2, 3, 4, 5, 6}, values


@pytest.mark.unit
def test_roll_logs_the_value(client, caplog):
    caplog.set_level("INFO", logger="dice-api")
    value = client.get("/").get_json()["dice_value"]
    assert any("Dice rolled" in r.getMessage() and str(value) in r.getMessage() for r in caplog.records)


@pytest.mark.unit
def test_health(client, dice_app):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "app": "dice-api", "version": dice_app.APP_VERSION}


@pytest.mark.unit
def test_version_comes_from_app_version():
    code = "import app; print(app.app.test_client().get('/health').get_json()['version'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=APP_DIR, capture_output=True, text=True,
                         env={"APP_VERSION": "1.2.3", "PATH": ""}, check=True).stdout.strip()
    assert out == "1.2.3"


@pytest.mark.unit
def test_fail_answers_500_with_the_error_body(client, caplog):
    caplog.set_level("ERROR", logger="dice-api")
    response = client.get("/fail")
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal_server_error", "app": "dice-api", "message": "Intentional failure"}
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


@pytest.mark.unit
@pytest.mark.parametrize("path", ["/nope", "/fail/extra", "/.env", "/admin/../etc/passwd", "/%ff"])
def test_unknown_paths_are_404_not_500(client, path):
    assert client.get(path).status_code == 404


@pytest.mark.unit
def test_wrong_method_is_405_not_500(client):
    assert client.post("/").status_code == 405


@pytest.mark.unit
def test_manual_metrics_endpoint(client):
    client.get("/")
    text = client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "flask_http_request" in families  # counter family name without _total
    assert all(s.labels.get("app") == "dice-api" for s in families["flask_http_request"].samples)
    info = [s for s in families["app_info"].samples]
    assert info and info[0].labels["version"] and info[0].value == 1


# ----------------------------------------------------------------------------------- zero-code guard

def zero_code_violations(source: str, filename: str = "<src>") -> list[str]:
    """Every import of, or dynamic import of, an observability module in a Python source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):
            func = node.func
            func_name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if func_name in ("__import__", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names = [arg.value]
        for name in names:
            if name.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


@pytest.mark.unit
@pytest.mark.parametrize("source", [
    "import opentelemetry.trace",
    "from opentelemetry import trace",
    "import os, pyroscope as p",
    "from zerocode.profiling import start",
    "x = __import__('pyroscope')",
    "import importlib\nimportlib.import_module('opentelemetry.sdk')",
    "def f():\n    import beyla",
])
def test_zero_code_guard_catches_violations(source):
    assert zero_code_violations(source)


@pytest.mark.unit
def test_app_code_never_touches_observability_libraries():
    files = sorted(APP_DIR.rglob("*.py"))
    assert APP_DIR / "app.py" in files
    violations = [v for f in files for v in zero_code_violations(f.read_text(), str(f))]
    assert violations == []


# ------------------------------------------------------------------------------ image and pinning

@pytest.mark.unit
def test_every_dependency_is_pinned_and_otel_versions_match():
    pins = requirement_pins(APP_DIR / "requirements.txt") | requirement_pins(APP_DIR / "requirements-otel.txt")
    otel = {n: v for n, v in pins.items() if n.startswith("opentelemetry-")}
    contrib = {v for v in otel.values() if re.fullmatch(r"0\.\d+b\d+", v)}
    core = {v for v in otel.values() if re.fullmatch(r"1\.\d+\.\d+", v)}
    assert len(contrib) == 1 and len(core) == 1, otel
    # Contrib 0.NNbM ships with core 1.(NN-21): 0.66b1 <-> 1.45.x.
    assert int(contrib.pop().split(".")[1].split("b")[0]) - 21 == int(core.pop().split(".")[1])
    assert pins["pyroscope-io"].startswith("1.") and pins["pyroscope-otel"].startswith("1.")
    instrumentations = {n for n in otel if n.startswith("opentelemetry-instrumentation-")}
    # The frameworks a user's own app may be (docs/own-app.md), and logging: nothing detected at build time.
    assert instrumentations == {"opentelemetry-instrumentation-flask", "opentelemetry-instrumentation-wsgi",
                                "opentelemetry-instrumentation-logging", "opentelemetry-instrumentation-django",
                                "opentelemetry-instrumentation-asgi", "opentelemetry-instrumentation-fastapi",
                                "opentelemetry-instrumentation-starlette"}


@pytest.mark.unit
def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    pins = requirement_pins(APP_DIR / "requirements.txt") | requirement_pins(APP_DIR / "requirements-otel.txt")
    drift = {n: (v, version(n)) for n, v in pins.items() if version(n) != v}
    assert drift == {}


@pytest.mark.unit
def test_dockerfile_runs_as_non_root_without_bootstrap():
    dockerfile = (APP_DIR / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "opentelemetry-bootstrap" not in re.sub(r"#.*", "", dockerfile)
    for copied in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile, re.M):
        for source in copied.split():
            assert (APP_DIR.parent / source).exists(), f"Dockerfile copies missing {source}"
    assert re.search(r'^CMD \["opentelemetry-instrument", "gunicorn", "-c", "gunicorn.conf.py"\]', dockerfile, re.M)
    from stackfiles import compose, service_ports

    exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", dockerfile, re.M)}
    assert exposed == service_ports(compose()["services"]["app"])


def healthcheck_command() -> list[str]:
    from tooling.native.container import parse_healthcheck

    return list(parse_healthcheck(APP_DIR / "Dockerfile").command)


@pytest.mark.integration
def test_image_healthcheck_command_passes_on_a_live_app_and_fails_on_a_dead_one(log_dir):
    command = healthcheck_command()
    assert command[0] == "python"  # the one HTTP client a slim Python image has
    command[0] = sys.executable
    settings = AppSettings(otlp_endpoint=f"http://127.0.0.1:{free_port()}")
    app = start_app(settings, log_dir)
    try:
        ok = subprocess.run(command, env={"PORT": str(settings.port)}, capture_output=True, timeout=10)
    finally:
        app.stop()
    assert ok.returncode == 0, ok.stderr
    dead = subprocess.run(command, env={"PORT": str(free_port())}, capture_output=True, timeout=10)
    assert dead.returncode != 0

