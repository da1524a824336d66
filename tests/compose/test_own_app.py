"""docker-compose.own-app.yml: the stack around an image the user names, instrumented as the Operator does it.

`docker compose -f docker-compose.yml -f docker-compose.own-app.yml up` runs the image of OWN_APP_IMAGE (.env)
untouched, with our instrumentation image's packages copied into a volume by a one-shot service and put on the
app's PYTHONPATH, and the instrumentation's settings (instrumentation/inject.env). The dice API's owners' image
is the default example.

What is checked here, without a Docker engine:
- the merged project as Compose's own loader resolves it (tests/compose/compose_config, the loader `docker compose
  config` is built on): the one-shot copy, the app's image, command, user, volume, environment and waits, and
  every other service left exactly as docker-compose.yml has it;
- the app's environment against the Operator's (tooling/k8s/injection.py) and the Kubernetes Instrumentation;
- the copy step's command, run by busybox as the image's busybox runs it, on the layout the image holds;
- the healthcheck, run as Docker runs it, inside the app's environment;
- the owners' command run natively with exactly the environment Compose gives the app, behind the real edge,
  collector and Prometheus: spans, metrics, logs and profiles under the service name of .env's block (here a
  name that is not the dice API's), its own /metrics scraped, and the dashboards' app queries answering.

Integration tier: builds compose_config (cached), the instrumentation layout and the owners' Python (cached in
.cache/k8s-injection), and starts the native stack.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml
from stackfiles import (
    EXPECTED_STATUS,
    REPO_ROOT,
    SERVICES,
    ComposeConfigError,
    app_routes,
    compose_config,
    dotenv,
)

from tooling.config import load_env_file, variables
from tooling.k8s import injection as inj
from tooling.k8s import render
from tooling.native import edge
from tooling.native.stack import NativeStack, by_labels, poll, spawn, wait_tcp

pytestmark = pytest.mark.integration

OWN_APP_FILE = REPO_ROOT / "docker-compose.own-app.yml"
INJECT_ENV = REPO_ROOT / "instrumentation" / "inject.env"
# How users combine the two files (`-f docker-compose.yml -f docker-compose.own-app.yml`); COMPOSE_FILE is the
# same list for the loader.
BOTH_FILES = {"COMPOSE_FILE": "docker-compose.yml:docker-compose.own-app.yml"}
VOLUME = "otel-auto-instrumentation-python"
# Where the edge, Prometheus and Beyla find the app on the compose network (docker-compose.own-app.yml says why).
APP_PORT_IN_NETWORK = 5000
# A user's image as .env's block would name it: every variable away from its default.
USERS_APP = {
    "OWN_APP_IMAGE": "registry.example/shop:1.4.2",
    "OWN_APP_COMMAND": "uvicorn shop.main:app --host 0.0.0.0 --port 5000 --workers 2",
    "OWN_APP_SERVICE_NAME": "shop-api",
    "OWN_APP_USER": "1000:1000",
    "OWN_APP_PYTHONPATH": "/srv/shop",
}


def merged(**env: str) -> dict:
    return compose_config(env={**BOTH_FILES, **env})


@pytest.fixture(scope="module")
def project() -> dict:
    return merged()


@pytest.fixture(scope="module")
def base() -> dict:
    return compose_config()


def own_app_settings() -> dict[str, str]:
    return {key: value for key, value in dotenv().items() if key.startswith("OWN_APP_")}


def expected_environment(service_name: str, own_env_file: Path, python_path: str = "") -> dict[str, str]:
    """What the app container must get: the instrumentation's settings, the cost profile, the app's own
    settings, then the service name and PYTHONPATH as the Operator sets them."""
    profile = REPO_ROOT / "app" / f"profile-{dotenv()['APP_PROFILE']}.env"
    middle = f"{python_path}:" if python_path else ""
    return {**load_env_file(INJECT_ENV), **load_env_file(profile), **load_env_file(own_env_file),
            "OTEL_SERVICE_NAME": service_name,
            "PYTHONPATH": f"{inj.PYTHONPATH_PREFIX}:{middle}{inj.MOUNT_PATH}"}


# ------------------------------------------------------------------------------------- the merged project

def test_the_own_app_block_of_dotenv_is_read_by_the_override_alone():
    override, base_file = variables(OWN_APP_FILE.read_text()), variables((REPO_ROOT / "docker-compose.yml").read_text())
    own = {key for key in dotenv() if key.startswith("OWN_APP_")}
    assert own and own == {name for name in override if name.startswith("OWN_APP_")}
    assert not own & base_file, "docker-compose.yml alone must not depend on the own-app block"
    assert override <= set(dotenv()), f"not in .env: {sorted(override - set(dotenv()))}"
    # Not found by `docker compose up` on its own: the dice API's stack is unchanged without `-f`.
    assert set(compose_config()["services"]) == SERVICES



def test_the_override_adds_the_copy_and_changes_the_app_alone(project, base):
    assert set(project["services"]) == SERVICES | {"instrumentation"}
    for name in SERVICES - {"app"}:
        assert project["services"][name] == base["services"][name], f"{name} differs from docker-compose.yml's"
    assert set(project["volumes"]) == set(base["volumes"]) | {VOLUME}


def test_the_instrumentation_image_is_the_operators_and_copies_its_packages(project):
    copy = project["services"]["instrumentation"]
    env = dotenv()
    assert copy["build"]["dockerfile"] == "instrumentation/Dockerfile"
    assert Path(copy["build"]["context"]) == REPO_ROOT
    assert copy["build"]["args"] == {"PYTHON_VERSION": env["PYTHON_VERSION"], "BUSYBOX_VERSION": env["BUSYBOX_VERSION"]}
    # Tagged as the Kubernetes Instrumentation names it: the version of instrumentation/pyproject.toml.
    assert copy["image"] == render.zerocode_image() == inj.instrumentation_resource()["spec"]["python"]["image"]
    # The Operator's init container copies the image's layout folder; here into the named volume, emptied first.
    script = copy_script(copy)
    assert script.endswith(f"cp -r {inj.IMAGE_LAYOUT_DIR}/. ."), script
    assert f"cd {inj.MOUNT_PATH};" in script and script.startswith("set -e;")
    ((mount),) = copy["volumes"]
    assert (mount["type"], mount["source"], mount["target"]) == ("volume", VOLUME, inj.MOUNT_PATH)
    assert not mount.get("read_only")
    # One-shot, contained: the app waits for it to exit 0, nothing restarts it, it has no network and no
    # capability, and nothing but the volume is writable.
    assert project["services"]["app"]["depends_on"]["instrumentation"]["condition"] == "service_completed_successfully"
    assert copy["restart"] == "no" and copy["network_mode"] == "none"
    assert copy["cap_drop"] == ["ALL"] and copy["read_only"] is True
    assert "no-new-privileges:true" in copy["security_opt"]


def copy_script(service: dict) -> str:
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = service["command"]
    return script


def test_the_app_runs_the_named_image_untouched(project, base):
    app, settings = project["services"]["app"], own_app_settings()
    assert "build" not in app, "the user's image is run as it is, never built"
    assert app["image"] == settings["OWN_APP_IMAGE"] == render.OWNERS_IMAGE
    # The default example runs the owners' own command (their image's CMD), as the Kubernetes Deployment does.
    assert app["command"] == shlex.split(settings["OWN_APP_COMMAND"]) == inj.owners_command(Path(""))
    uid = int(app["user"].split(":")[0])
    assert uid != 0, f"the app runs as {app['user']}: never root"
    ((mount),) = app["volumes"]
    assert (mount["type"], mount["source"], mount["target"], mount["read_only"]) == \
        ("volume", VOLUME, inj.MOUNT_PATH, True)
    # The rest of docker-compose.yml's app stays: its published port on loopback, its waits, its limits.
    assert app["ports"] == base["services"]["app"]["ports"]
    assert [(p["host_ip"], p["target"]) for p in app["ports"]] == [("127.0.0.1", APP_PORT_IN_NETWORK)]
    waits = {name: spec for name, spec in app["depends_on"].items() if name != "instrumentation"}
    assert waits == base["services"]["app"]["depends_on"]
    for key in ("mem_limit", "cpus", "restart", "expose", "logging"):
        assert app[key] == base["services"]["app"][key], key


def test_the_app_gets_the_environment_the_operator_gives(project):
    app = project["services"]["app"]
    settings = own_app_settings()
    assert app["environment"] == expected_environment(settings["OWN_APP_SERVICE_NAME"],
                                                      REPO_ROOT / settings["OWN_APP_ENV_FILE"])
    # PYTHONPATH exactly as the Operator's webhook writes it for a container without a PYTHONPATH of its own.
    operator = {var["name"]: var.get("value") for var in
                inj.operator_container_env(inj.pod_identity(), inj.instrumentation_resource())}
    assert app["environment"]["PYTHONPATH"] == operator["PYTHONPATH"]
    # The default example's own settings are the ConfigMap its Deployment loads on Kubernetes.
    assert REPO_ROOT / settings["OWN_APP_ENV_FILE"] == inj.APP_SETTINGS_ENV


def test_inject_env_is_the_instrumentations_settings_of_app_env():
    # The compose twin of the Instrumentation's spec.python.env: app/app.env's OTEL_*/PYROSCOPE_* lines but the
    # per-workload service name, in order; on Kubernetes the same lines with cluster addresses.
    inject = load_env_file(INJECT_ENV)
    app_env = load_env_file(REPO_ROOT / "app" / "app.env")
    assert list(inject.items()) == [(key, value) for key, value in app_env.items()
                                    if key.startswith(render.INSTRUMENTATION_PREFIXES)
                                    and key not in render.PER_WORKLOAD_KEYS]
    services = set(render.compose()["services"])
    python_env = [(var["name"], var["value"]) for var in inj.instrumentation_resource()["spec"]["python"]["env"]]
    profile = load_env_file(REPO_ROOT / "app" / f"profile-{dotenv()['APP_PROFILE']}.env")
    instrumented = {**inject, **{k: v for k, v in profile.items() if k.startswith(render.INSTRUMENTATION_PREFIXES)}}
    assert python_env == [(key, render.cluster_address(value, services)) for key, value in instrumented.items()]
    # Nothing that is the dice API's own: its serving settings come from OWN_APP_ENV_FILE.
    assert not {"GUNICORN_WORKERS", "GUNICORN_THREADS", "PROMETHEUS_MULTIPROC_DIR", "LOG_LEVEL"} & set(inject)


def test_a_users_image_is_named_by_the_variables(tmp_path):
    own_settings = tmp_path / "shop.env"
    own_settings.write_text("DJANGO_SETTINGS_MODULE=shop.settings\nWEB_CONCURRENCY=2\n")
    project = merged(**USERS_APP, OWN_APP_ENV_FILE=str(own_settings))
    app = project["services"]["app"]
    assert app["image"] == USERS_APP["OWN_APP_IMAGE"]
    assert app["command"] == shlex.split(USERS_APP["OWN_APP_COMMAND"])
    assert app["user"] == USERS_APP["OWN_APP_USER"]
    # The container's own PYTHONPATH between the Operator's two entries, as its webhook places it.
    assert app["environment"] == expected_environment("shop-api", own_settings, USERS_APP["OWN_APP_PYTHONPATH"])
    assert app["environment"]["PYTHONPATH"] == \
        f"{inj.PYTHONPATH_PREFIX}:/srv/shop:{inj.MOUNT_PATH}"
    # An app without settings of its own: no dice API setting leaks in (PROMETHEUS_MULTIPROC_DIR would put
    # any prometheus_client into multiprocess mode).
    bare = merged(**USERS_APP, OWN_APP_ENV_FILE="/dev/null")["services"]["app"]["environment"]
    assert bare == expected_environment("shop-api", Path("/dev/null"), "/srv/shop")
    assert not [key for key in bare if not key.startswith(("OTEL_", "PYROSCOPE_")) and key != "PYTHONPATH"]
    # The cost profile applies as it does to the dice API.
    lean = merged(**USERS_APP, OWN_APP_ENV_FILE="/dev/null", APP_PROFILE="lean")["services"]["app"]["environment"]
    assert lean["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"


def test_a_missing_own_app_setting_stops_compose_naming_it():
    with pytest.raises(ComposeConfigError, match="OWN_APP_IMAGE is set in .env"):
        merged(OWN_APP_IMAGE="")
    with pytest.raises(ComposeConfigError, match="OWN_APP_COMMAND is set in .env"):
        merged(OWN_APP_COMMAND="")


def test_the_app_listens_where_the_edge_prometheus_and_beyla_look(project):
    # The port is a contract, not a variable (docker-compose.own-app.yml): each of the three files shared with
    # the native and Kubernetes tiers must name the app at the port the healthcheck and `expose` use.
    address = f"app:{APP_PORT_IN_NETWORK}"
    assert edge.upstream_dials(edge.load_config())[edge.APP_SERVER] == [address]
    prometheus = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus-config.yaml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "app"]
    assert [t for static in job["static_configs"] for t in static["targets"]] == [address]
    beyla = yaml.safe_load((REPO_ROOT / "beyla" / "beyla-config.yaml").read_text())
    assert [entry["open_ports"] for entry in beyla["discovery"]["instrument"]] == [APP_PORT_IN_NETWORK]
    app = project["services"]["app"]
    assert app["expose"] == [str(APP_PORT_IN_NETWORK)]
    assert f"('127.0.0.1', {APP_PORT_IN_NETWORK})" in app["healthcheck"]["test"][-1]
    # Beyla shares the app's pid namespace, whatever image runs there.
    assert project["services"]["beyla"]["pid"] == "service:app"


# ------------------------------------------------------------------------------------------- run for real

def tree(folder: Path) -> dict[str, int]:
    """relative path -> size (-1 for a folder) of everything under folder."""
    return {p.relative_to(folder).as_posix(): (-1 if p.is_dir() else p.stat().st_size) for p in folder.rglob("*")}


def test_the_copy_step_leaves_the_volume_holding_exactly_the_images_layout(project, layout, tmp_path):
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.skip("busybox is not installed (apt-get install busybox): the image's sh, cp and rm")
    # The volume after an older image's copy: a package the new image no longer has, and a hidden file.
    volume = tmp_path / "volume"
    (volume / "oldpackage-1.0.dist-info").mkdir(parents=True)
    (volume / "oldpackage-1.0.dist-info" / "entry_points.txt").write_text("[opentelemetry_post_instrument]\n")
    (volume / ".stale").write_text("x")
    (volume / "..stale").write_text("x")
    # The image's /autoinstrumentation is the layout; the command is the compose file's, only its two paths mapped.
    script = copy_script(project["services"]["instrumentation"])
    script = script.replace(inj.MOUNT_PATH, str(volume)).replace(f"{inj.IMAGE_LAYOUT_DIR}/.", f"{layout}/.")
    for run in (1, 2):  # a second `up` copies over the first
        result = subprocess.run([busybox, "sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        found, wanted = tree(volume), tree(layout)
        print(f"\nrun {run}: {len(found)} entries copied, {sum(s for s in found.values() if s > 0) / 1e6:.1f} MB")
        assert found == wanted, f"left over: {sorted(set(found) - set(wanted))[:5]}; missing: " \
                                f"{sorted(set(wanted) - set(found))[:5]}"
    assert (volume / inj.SITECUSTOMIZE).read_bytes() == (layout / inj.SITECUSTOMIZE).read_bytes()


def app_container_env(app: dict, owners_bin: Path, layout: Path, addresses: dict[str, str],
                      multiproc_dir: Path, port: int) -> dict[str, str]:
    """The app container's environment, natively: the owners' image's (its ENV, PATH to its Python), then exactly
    what Compose gives the app, with only addresses and paths mapped to this machine (compose host:port to
    `addresses`, the volume in PYTHONPATH to `layout`, the multiprocess folder) and gunicorn's listen address."""
    image = {"PATH": f"{owners_bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(multiproc_dir.parent),
             **inj.stage_env(inj.stage(inj.APP_DOCKERFILE, "owners"))}
    environment = {**image}
    compose_address = re.compile(r"\b([a-z][a-z0-9-]*):(\d{2,5})\b")
    for key, value in app["environment"].items():
        for host, port_ in compose_address.findall(value):
            assert f"{host}:{port_}" in addresses, f"{key}={value}: {host}:{port_} has no native counterpart"
        environment[key] = compose_address.sub(lambda m: addresses[m[0]], value)
    environment["PYTHONPATH"] = environment["PYTHONPATH"].replace(inj.MOUNT_PATH, str(layout))
    if "PROMETHEUS_MULTIPROC_DIR" in environment:
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    environment.update(BIND_HOST="127.0.0.1", PORT=str(port))
    return environment


def test_the_healthcheck_connects_without_starting_the_instrumentation(project, layout, owners_bin, tmp_path):
    app = project["services"]["app"]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        connection, _ = listener.accept()
        accepted.append(connection.recv(1))
        connection.close()

    threading.Thread(target=accept, daemon=True).start()
    # Nothing listens at these: an SDK or profiler started by the check would log its failed exports.
    environment = app_container_env(app, owners_bin, layout, {"otel-collector:4317": "127.0.0.1:9",
                                                              "pyroscope:4040": "127.0.0.1:9"}, tmp_path / "mp", port)
    test = app["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python3"]
    argv = [str(owners_bin / "python3"), *test[2:-1], test[-1].replace(str(APP_PORT_IN_NETWORK), str(port))]
    started = time.monotonic()
    healthy = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    print(f"\nhealthcheck: exit {healthy.returncode} in {took:.2f} s, stderr {healthy.stderr!r}")
    assert healthy.returncode == 0 and healthy.stderr == "", healthy.stderr[-2000:]
    poll(lambda: accepted, 5, "the check's connection")
    assert accepted == [b""], "the check sent bytes: a request some source would count"
    listener.close()
    refused = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "ConnectionRefusedError" in refused.stderr


SERVICE_NAME = USERS_APP["OWN_APP_SERVICE_NAME"]  # the dice API's owners' image, named as another app
SENT = {"/": 24, "/health": 6, "/fail": 4}


@pytest.fixture(scope="module")
def running(tmp_path_factory, layout, owners_bin):
    """The native stack (real collector, Prometheus and edge; sinks for Tempo, Loki and Pyroscope) without its
    app, then the default image's command with exactly the environment Compose gives `app`, under another
    service name; requests through the edge."""
    app = merged(OWN_APP_SERVICE_NAME=SERVICE_NAME)["services"]["app"]
    assert app["environment"]["OTEL_SERVICE_NAME"] == SERVICE_NAME
    assert set(SENT) == app_routes()
    started = time.monotonic()
    stack = NativeStack(tmp_path_factory.mktemp("own-app")).up(with_app=False)
    try:
        pyroscope = stack.pyroscope_sink.address.removeprefix("http://")
        environment = app_container_env(
            app, owners_bin, layout, {"otel-collector:4317": f"127.0.0.1:{stack.ports.otlp_grpc}",
                                      "pyroscope:4040": pyroscope},
            stack.app_multiproc_dir, stack.ports.app)
        # The command as the container runs it: found on the image's PATH, in its WORKDIR (/app).
        command, *arguments = app["command"]
        stack.app = spawn("app", [str(owners_bin / command), *arguments], environment, REPO_ROOT / "app",
                          stack.run_dir)
        try:
            wait_tcp("127.0.0.1", stack.ports.app, 60, stack.app.process)
        except Exception:
            raise RuntimeError(f"the app did not start; its log:\n{stack.app.log()[-4000:]}") from None
        sent = Counter()
        for route, times in SENT.items():
            for _ in range(times):
                try:
                    status = urllib.request.urlopen(stack.edge_url + route, timeout=10).status
                except urllib.error.HTTPError as error:
                    status = error.code
                assert status == EXPECTED_STATUS[route], (route, status)
                sent[(route, str(status))] += 1
        yield {"stack": stack, "sent": sent, "started": started}
    finally:
        stack.down()
        print(f"\nown-app run: {time.monotonic() - started:.1f} s from stack start to stack down")


def test_every_signal_carries_the_service_name_of_dotenv(running):
    stack, sent = running["stack"], running["sent"]
    spans = poll(lambda: (found := stack.tempo_sink.requests_by_route_and_status(SERVICE_NAME)) == sent and found,
                 30, f"one SERVER span per request under {SERVICE_NAME}: {dict(sent)}")
    assert not stack.tempo_sink.server_spans(service="dice-api"), "the image's default name leaked"
    otel = ('sum by (service_name, http_route, http_response_status_code) '
            '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
    want = Counter({(SERVICE_NAME, *key): n for key, n in sent.items()})
    counted = poll(lambda: (found := by_labels(stack.query(otel), "service_name", "http_route",
                                               "http_response_status_code")) == want and found,
                   45, f"the otel source's counts under {SERVICE_NAME}: {dict(want)}")
    # The app's own /metrics, scraped by the app job (the manual source), counts the same requests.
    manual = 'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'
    scraped = poll(lambda: (found := by_labels(stack.query(manual), "path", "status")) == sent and found,
                   45, f"the app's own /metrics scraped: {dict(sent)}")
    rolls = sent[("/", "200")]
    logs = poll(lambda: len(found := [r for r in stack.loki_sink.records(SERVICE_NAME)
                                      if str(r.body).startswith("Dice rolled: ")]) >= rolls and found,
                30, f"{rolls} `Dice rolled` records under {SERVICE_NAME}")
    profiles = poll(lambda: [u for u in stack.pyroscope_sink.snapshot()
                             if u.labels.get("service_name") == SERVICE_NAME],
                    30, f"a profile upload named {SERVICE_NAME}")
    print(f"\nsent {dict(sent)}\nspans {dict(spans)}\notel {dict(counted)}\nmanual {dict(scraped)}\n"
          f"log records {len(logs)}, profile uploads {len(profiles)}")
    assert len(logs) == rolls


def test_the_dashboards_app_queries_answer_for_any_service_name(running):
    """The comparison's app side selects the otel source's SERVER spans, not a name: it answers for this app."""
    import json
    import math

    stack = running["stack"]
    comparison = json.loads((REPO_ROOT / "grafana" / "dashboards" / "comparison.json").read_text())
    (means,) = [p for p in comparison["panels"] if p.get("title", "").startswith("Mean latency per route")]
    (app_side,) = [t["expr"] for t in means["targets"] if 'telemetry_source="otel"' in t["expr"]]
    assert "dice-api" not in app_side and SERVICE_NAME not in app_side
    # A rate needs traffic while Prometheus scrapes: a gentle load through the edge until the panel answers.
    stop = threading.Event()

    def load():
        while not stop.is_set():
            for route in SENT:
                try:
                    urllib.request.urlopen(stack.edge_url + route, timeout=10).read()
                except urllib.error.HTTPError:
                    pass
            stop.wait(0.2)

    def every_route():
        found = {r["metric"]["route"]: float(r["value"][1]) for r in stack.query(app_side)}
        return set(found) >= set(SENT) and all(math.isfinite(v) and v > 0 for v in found.values()) and found

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        means_by_route = poll(every_route, 60, f"the comparison's app side, a mean per route: {app_side}")
    finally:
        stop.set()
        loader.join(15)
    print(f"\nthe app's mean latency per route, s: {means_by_route}")
