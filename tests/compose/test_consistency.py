"""The stack's files agree with each other.

- Every host:port a config names is a port that compose service provides (its `expose` list), so a
  renamed service or moved port fails here instead of showing "No data" after `docker compose up`.
- Each image version is stated once, in .env (two tied copies are checked by tests).
- Each published port is the port its service listens on (its `expose` list) inside, and on the host
  the port that one .env variable names, by default the same number, on BIND_ADDRESS for the edge and on
  loopback for every other service; the services' settings are not restated as environment variables in
  docker-compose.yml.
- Each service's files live in the folder named like the service.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from stackfiles import REPO_ROOT, bind_mounts, compose, dotenv, raw_compose, repo_text_files, service_ports

pytestmark = pytest.mark.unit

# host:port, where host is a name or an IPv4 address; not preceded by a word character (so that
# "a.b:1" parts of versions or "x_y:1" are not read as addresses).
ADDRESS = re.compile(r"(?<![\w.-])(?P<host>[a-z][a-z0-9-]*|\d{1,3}(?:\.\d{1,3}){3}):(?P<port>\d{2,5})(?![\w.])")
# Addresses that mean "this container" in the file of the service that owns it.
OWN_HOST = {"localhost", "127.0.0.1", "0.0.0.0"}

# A published port as written: its host address (BIND_ADDRESS for the edge, loopback for every other service,
# test_compose.py says which), then the host port from one .env variable (required, as the versions are),
# then the container port as a plain number.
BIND_ADDRESS = "${BIND_ADDRESS:-127.0.0.1}"
PUBLISHED_PORT = re.compile(
    r"(?P<host>\$\{BIND_ADDRESS:-127\.0\.0\.1\}|127\.0\.0\.1):\$\{(?P<variable>[A-Z][A-Z0-9_]*_PORT):\?[^}]*\}:"
    r"(?P<target>\d+)"
)

# Copies of a version outside .env that a test keeps equal to it.
# k8s/images/kustomization.yaml: kustomize cannot read .env, so tooling/k8s/render.py copies every image
# version there, and tests/k8s/test_k8s_manifests.py fails when the copy differs from .env.
K8S_IMAGES = "k8s/images/kustomization.yaml"
TIED_VERSION_COPIES = {
    # test_collector.py: the builder manifest's components are at the compose image's version.
    "OTEL_COLLECTOR_VERSION": {"otel-collector/builder-config.yaml", K8S_IMAGES},
    # below: the tests drive load with the locust of the image.
    "LOCUST_VERSION": {"requirements-dev.txt", K8S_IMAGES},
    # test_service_configs.py: the versions whose config reference its allow-lists follow.
    "BEYLA_VERSION": {"tests/compose/test_service_configs.py", K8S_IMAGES},
    "TEMPO_VERSION": {"tests/compose/test_service_configs.py", K8S_IMAGES},
    "PYROSCOPE_VERSION": {"tests/compose/test_service_configs.py", K8S_IMAGES},
    "LOKI_VERSION": {"tests/compose/test_service_configs.py", K8S_IMAGES},
    "PROMETHEUS_VERSION": {K8S_IMAGES},
    "ALERTMANAGER_VERSION": {K8S_IMAGES},
    "GRAFANA_VERSION": {K8S_IMAGES},
    "CADDY_VERSION": {K8S_IMAGES},
    # The native tier's build (tooling/builds/recipes.py) refuses a go.mod that requires another cAdvisor.
    "CADVISOR_VERSION": {"cadvisor/native/go.mod", K8S_IMAGES},
    "NODE_EXPORTER_VERSION": {K8S_IMAGES},
}

# Versions of other things that happen to equal a .env version (coincidences, not copies): (key, file) -> the
# one line where the other thing's version is stated. Only that line is excused; the rest of the file is
# scanned as usual.
COINCIDENT_VERSIONS = {
    # The PyPI package kubernetes-validate (the Kubernetes schemas for kubeconform) vs busybox.
    ("BUSYBOX_VERSION", "tooling/builds/recipes.py"): re.compile(r'^KUBERNETES_VALIDATE_VERSION = "[^"\n]*"$', re.M),
    # A dependency of cAdvisor's packages vs kind.
    ("KIND_VERSION", "cadvisor/native/go.mod"): re.compile(r"^\tgolang\.org/x/sys v\S+ // indirect$", re.M),
}
# go.sum files hold the checksums of a Go module's dependencies, whatever their versions: a dependency at an
# image's version number is a coincidence there, and the go.mod that chooses a version is still scanned.
CHECKSUM_FILES = {"go.sum"}


def unresolved_addresses(text: str, own_service: str, services: dict) -> list[str]:
    """host:port references in `text` that no compose service provides."""
    problems = []
    for match in ADDRESS.finditer(text):
        host, port = match["host"], int(match["port"])
        if host in OWN_HOST:
            target = own_service
        elif host in services:
            target = host
        else:
            problems.append(f"{host}:{port} (no compose service is called {host!r})")
            continue
        if port not in service_ports(services[target]):
            problems.append(f"{host}:{port} ({target} provides {sorted(service_ports(services[target]))})")
    return problems


def config_files(services: dict) -> dict[Path, str]:
    """Every file of every service's folder, plus top-level files the services mount, by owner."""
    owners = {}
    for name in services:
        folder = REPO_ROOT / name
        if folder.is_dir():
            for path in folder.rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts:
                    owners[path] = name
        for source, _ in bind_mounts(services[name]):
            path = (REPO_ROOT / source).resolve()
            if path.is_file():
                owners.setdefault(path, name)
    return owners


@pytest.fixture(scope="module")
def services() -> dict:
    return compose()["services"]


def test_every_address_in_the_configs_is_provided_by_a_service(services):
    problems = []
    files = config_files(services)
    for path, owner in files.items():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        problems += [f"{path.relative_to(REPO_ROOT)}: {p}" for p in unresolved_addresses(text, owner, services)]
    assert not problems, "\n".join(problems)
    # The files that wire the stack together are among those scanned.
    scanned = {path.relative_to(REPO_ROOT).as_posix() for path in files}
    assert {
        "app/app.env",
        "prometheus/prometheus-config.yaml",
        "alertmanager/alertmanager-config.yaml",
        "otel-collector/otel-collector-config.yaml",
        "grafana/provisioning/datasources/datasources.yaml",
        "tempo/tempo-config.yaml",
        "loki/loki-config.yaml",
        "pyroscope/pyroscope-config.yaml",
        "beyla/beyla-config.yaml",
        "edge/caddy-config.json",
        "edge/edge.env",
        "locustfile.py",
    } <= scanned


def test_every_address_the_injected_app_is_given_is_provided_by_a_service(services):
    # instrumentation/inject.env, docker-compose.own-app.yml's settings for the app, is in no service's folder.
    text = (REPO_ROOT / "instrumentation" / "inject.env").read_text()
    assert ADDRESS.search(text) and not unresolved_addresses(text, "app", services)


def test_every_address_in_docker_compose_is_provided_by_a_service(services):
    problems = []
    for name, service in services.items():
        settings = {key: service.get(key) for key in ("command", "entrypoint", "healthcheck", "environment")}
        problems += [f"{name}: {p}" for p in unresolved_addresses(json.dumps(settings), name, services)]
    assert not problems, "\n".join(problems)


def test_the_address_check_catches_wrong_hosts_and_ports(services):
    assert unresolved_addresses("endpoint: tempo:4318", "otel-collector", services) == [
        "tempo:4318 (tempo provides [3200, 4317])"
    ]
    assert unresolved_addresses("http://memcached:11211", "tempo", services)[0].startswith("memcached:11211")
    assert unresolved_addresses("endpoint: 0.0.0.0:9999", "tempo", services)
    assert not unresolved_addresses("http://app:5000 and localhost:9090", "prometheus", services)
    # Versions, recording-rule names and profile types are not addresses.
    assert not unresolved_addresses("grafana/tempo:9.9.9 dice:http_requests:rate1m process_cpu:cpu:ns", "x", services)


def version_pattern(value: str) -> re.Pattern:
    bare = re.escape(value.removeprefix("v"))
    return re.compile(rf"(?<![\w.])v?{bare}(?![\w]|\.\d)")


def test_every_image_version_is_stated_only_in_dotenv():
    versions = {key: value for key, value in dotenv().items() if key.endswith("_VERSION")}
    assert versions
    found = []
    for path, text in repo_text_files():
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative == ".env" or path.name in CHECKSUM_FILES:
            continue
        for key, value in versions.items():
            if relative in TIED_VERSION_COPIES.get(key, ()):
                continue
            coincidence = COINCIDENT_VERSIONS.get((key, relative))
            if version_pattern(value).search(coincidence.sub("", text) if coincidence else text):
                found.append(f"{relative}: {key}={value}")
    assert not found, "versions belong in .env only:\n" + "\n".join(found)


def test_the_version_check_matches_whole_versions_only():
    pattern = version_pattern("v9.87.6")
    assert pattern.search("prom/prometheus:v9.87.6") and pattern.search("Prometheus 9.87.6 runs")
    assert not pattern.search("v9.87.61") and not pattern.search("19.87.6") and not pattern.search("9.87.6.1")


def test_tied_version_copies_equal_dotenv():
    env = dotenv()
    requirements = (REPO_ROOT / "requirements-dev.txt").read_text()
    pinned = re.search(r"^locust==(\S+)$", requirements, re.MULTILINE)
    assert pinned and pinned.group(1) == env["LOCUST_VERSION"], "locust in requirements-dev.txt != LOCUST_VERSION"


def published_ports() -> dict[str, list[tuple[str, int, str]]]:
    """(host port variable, container port, host address as written) of every published port, by service."""
    found = {}
    for name, service in raw_compose()["services"].items():
        for port in service.get("ports", []):
            match = PUBLISHED_PORT.fullmatch(str(port))
            assert match, f"{name}: {port!r} is not {BIND_ADDRESS} or 127.0.0.1, then :${{X_PORT:?...}}:PORT"
            found.setdefault(name, []).append((match["variable"], int(match["target"]), match["host"]))
    return found


def test_every_published_port_is_a_port_the_service_listens_on(services):
    for name, ports in published_ports().items():
        for _, target, _ in ports:
            assert target in service_ports(services[name]), f"{name}: publishes {target} but does not expose it"


def test_every_host_port_comes_from_its_own_dotenv_variable(services):
    env = dotenv()
    variables = [variable for ports in published_ports().values() for variable, _, _ in ports]
    assert variables, "no published ports found"
    assert len(variables) == len(set(variables)), f"a port variable is used twice: {sorted(variables)}"
    # Every *_PORT in .env is a published port (an unused one would be a setting that does nothing).
    assert set(variables) == {key for key in env if key.endswith("_PORT")}
    host_ports = []
    for name, ports in published_ports().items():
        for variable, target, host in ports:
            assert re.fullmatch(r"[1-9]\d{0,4}", env[variable]) and int(env[variable]) <= 65535, (
                f"{variable}={env[variable]!r} in .env is not a port")
            # By default the host port is the number the service listens on: the README's URLs, the
            # e2e tier and the native stack (tooling.native.StackPorts.fixed) use those.
            assert int(env[variable]) == target, f"{name}: {variable}={env[variable]} in .env, it listens on {target}"
            host_ports.append(int(env[variable]))
            # And what Compose publishes is that variable, with the container side untouched.
            interpolated = [p for p in services[name]["ports"] if p.endswith(f":{target}")]
            host_ip = env["BIND_ADDRESS"] if host == BIND_ADDRESS else host
            assert interpolated == [f"{host_ip}:{env[variable]}:{target}"], name
    assert len(host_ports) == len(set(host_ports)), "a host port is published twice"


def test_a_changed_host_port_changes_only_the_host_side():
    # GRAFANA_PORT is the edge's Grafana listener (container port 3000, as Grafana's own).
    env = {**dotenv(), "GRAFANA_PORT": "13000"}
    edge = compose(env)["services"]["edge"]
    assert edge["ports"] == [f"{env['BIND_ADDRESS']}:{env['EDGE_PORT']}:8080", f"{env['BIND_ADDRESS']}:13000:3000"]
    assert "3000" in [str(port) for port in edge["expose"]]


def test_the_native_stack_listens_on_the_default_host_ports():
    # make native-up prints the compose URLs; they are the .env defaults.
    from tooling.native.stack import StackPorts

    fixed = StackPorts.fixed()
    env = dotenv()
    assert int(env["APP_PORT"]) == fixed.app
    assert int(env["EDGE_PORT"]) == fixed.edge
    assert int(env["PROMETHEUS_PORT"]) == fixed.prometheus
    assert int(env["ALERTMANAGER_PORT"]) == fixed.alertmanager
    assert int(env["OTEL_COLLECTOR_METRICS_PORT"]) == fixed.collector_metrics
    assert int(env["BEYLA_PORT"]) == fixed.beyla
    assert int(env["PYROSCOPE_PORT"]) == fixed.pyroscope_sink
    assert int(env["LOKI_PORT"]) == fixed.loki_sink


# The edge's `environment` holds none of its settings (edge/caddy-config.json, edge/edge.env): the two .env
# values its refusal check reads (edge/entrypoint.sh), and where caddy keeps its scratch files on a read-only
# root, both compose-only.
EDGE_CHECK_INPUTS = {"BIND_ADDRESS", "GRAFANA_ANONYMOUS_ENABLED"}
EDGE_SCRATCH = {"XDG_CONFIG_HOME", "XDG_DATA_HOME"}


def test_settings_are_not_restated_as_environment_variables(services):
    # The app's settings live in app/app.env; the other services read their config files. Only
    # Grafana is configured by environment (GF_*), so only Grafana has an `environment` section, besides the
    # edge's pass-through of .env values and its scratch directories.
    for name, service in services.items():
        if name not in ("grafana", "edge"):
            assert not service.get("environment"), f"{name}: settings belong in its config file or env_file"
    assert all(key.startswith("GF_") for key in services["grafana"]["environment"])
    edge = raw_compose()["services"]["edge"]["environment"]
    assert set(edge) == EDGE_CHECK_INPUTS | EDGE_SCRATCH, sorted(edge)
    for key in EDGE_CHECK_INPUTS:
        # Passed through under its own name, not a value of its own.
        assert re.fullmatch(rf"\$\{{{key}(:-[^}}]*)?\}}", edge[key]), f"edge: {key}: {edge[key]}"
    tmpfs = services["edge"]["tmpfs"]
    for key in EDGE_SCRATCH:
        assert any(edge[key].startswith(mount.rstrip("/") + "/") for mount in tmpfs), f"edge: {key} is not on a tmpfs"


def test_each_service_mounts_files_from_its_own_folder(services):
    top_level = {"locustfile.py"}
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            first = Path(source).parts[0] if Path(source).parts[0] != "." else Path(source).parts[1]
            assert first == name or first in top_level, f"{name} mounts {source}, outside {name}/"


# --- the two homes of our code: the hooks inside the app's process, and the tooling around it ---------

THIRD_PARTY = {
    # import name -> distribution that provides it
    "opentelemetry": {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto"},
    "pyroscope": {"pyroscope-io", "pyroscope-otel"},
    "flask": {"Flask"}, "werkzeug": {"Werkzeug"}, "yaml": {"PyYAML"}, "grpc": {"grpcio"},
    "google": {"protobuf"}, "requests": {"requests"}, "psutil": {"psutil"}, "matplotlib": {"matplotlib"},
    "locust": {"locust"}, "gevent": {"locust"}, "uvicorn": {"uvicorn"},
}


def imported_top_levels(folder) -> dict[str, set[str]]:
    import ast
    import sys

    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(path.name)
    return found


def declared(pyproject) -> set[str]:
    import re
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in requirements}


def test_the_image_installs_the_app_and_the_hooks_and_nothing_else_of_ours():
    import re

    dockerfile = (REPO_ROOT / "app" / "Dockerfile").read_text()
    copied = {src for line in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile, re.M) for src in line.split()}
    assert copied == {"app/requirements.txt", "app/requirements-otel.txt", "instrumentation", "app/app.py",
                      "app/gunicorn.conf.py"}
    ignored = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored[:3] == ["*", "!app/", "!instrumentation/"], "the build context must let in only these two"
    # instrumentation/ is the hooks package and the injected sitecustomize.py, nothing else: no tooling, no
    # sinks, no builds.
    modules = {p.relative_to(REPO_ROOT / "instrumentation").as_posix()
               for p in (REPO_ROOT / "instrumentation").rglob("*.py")}
    assert modules == {"sitecustomize.py", "zerocode/__init__.py", "zerocode/profiling.py", "zerocode/flask_errors.py",
                       "zerocode/latency.py", "zerocode/wsgi_only.py", "zerocode/preflight.py", "zerocode/servers.py",
                       "zerocode/django_hooks.py", "zerocode/uvicorn_logs.py", "zerocode/instances.py",
                       "zerocode/patching.py"}


def test_each_package_declares_what_it_imports():
    for folder, pyproject, ours in ((REPO_ROOT / "instrumentation" / "zerocode",
                                     REPO_ROOT / "instrumentation" / "pyproject.toml", {"zerocode"}),
                                    # The benchmark's in-process driver imports the app under observation
                                    # from app/, as gunicorn's `app:app` does: not a dependency.
                                    (REPO_ROOT / "tooling", REPO_ROOT / "pyproject.toml", {"tooling", "app"})):
        needs = declared(pyproject)
        for top, files in imported_top_levels(folder).items():
            if top in ours:
                continue
            assert top in THIRD_PARTY, f"{folder.name}: {top} (in {files}) is not in THIRD_PARTY"
            assert THIRD_PARTY[top] & needs, f"{pyproject.relative_to(REPO_ROOT)} does not declare {top} ({files})"
    assert "tooling" not in imported_top_levels(REPO_ROOT / "instrumentation"), "the hooks must not need the tooling"
