"""The edge in compose: hardened, the one service that leaves loopback, and wired to what it fronts.

- docker-compose.yml runs the edge as nobody, read-only, with only the capability its binary needs, its
  scratch files on a tmpfs, its healthcheck on the edge's own health listener.
- edge/entrypoint.sh, run for real under sh (dash here) and busybox sh (the caddy image's /bin/sh): with
  BIND_ADDRESS off loopback and anonymous Grafana on, it refuses, naming both settings, and idles without
  serving until stopped (the container turns unhealthy and `docker compose up --wait` fails); otherwise it
  execs its command in its own process, which the real caddy binary then serves from.
- docker-compose.yml and edge/caddy-config.json cannot drift apart: locust's --host is the edge's app
  listener, that listener proxies to the app's service and port, the grafana listener to Grafana's, and
  the ports the edge publishes are the listeners' ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from stackfiles import REPO_ROOT, bind_mounts, compose, dotenv, raw_compose, service_ports

from tooling.native import edge
from tooling.native.stack import free_port, poll

ENTRYPOINT = REPO_ROOT / "edge" / "entrypoint.sh"
# Where docker-compose.yml mounts edge/ files in the caddy image.
MOUNTED = {"./edge/entrypoint.sh": "/etc/caddy/entrypoint.sh",
           "./edge/caddy-config.json": "/etc/caddy/caddy-config.json"}
NOBODY = "65534:65534"

# The shells the script must run under: the caddy image's is busybox ash (Alpine); sh is dash on Debian.
SHELLS = [
    pytest.param(["sh"], id="sh"),
    pytest.param(["busybox", "sh"], id="busybox", marks=pytest.mark.skipif(
        shutil.which("busybox") is None, reason="busybox is not installed (Debian: apt-get install busybox)")),
]

# (BIND_ADDRESS, GRAFANA_ANONYMOUS_ENABLED); None leaves the variable out, as if unset.
SERVES = [
    ("127.0.0.1", "true"), ("127.0.1.1", "true"), ("[::1]", "true"), ("::1", "true"), ("localhost", "true"),
    (None, "true"),  # compose's default, ${BIND_ADDRESS:-127.0.0.1}
    ("0.0.0.0", "false"), ("192.168.1.20", "false"), ("0.0.0.0", "0"), ("0.0.0.0", "off"),
    ("0.0.0.0", "nonsense"),  # Grafana reads what go-ini cannot parse as false: anonymous viewing is off
]
REFUSES = [
    ("0.0.0.0", "true"), ("192.168.1.20", "true"), ("[::]", "true"), ("10.0.0.5", "TRUE"), ("0.0.0.0", "1"),
    ("0.0.0.0", "on"), ("0.0.0.0", "yes"),
    ("0.0.0.0", None),  # compose's default, ${GRAFANA_ANONYMOUS_ENABLED:-true}
    ("127.0.0.1.example.com", "true"),  # not an address: not loopback (Compose would reject it anyway)
]


@pytest.fixture(scope="module")
def services() -> dict:
    return compose()["services"]


@pytest.fixture(scope="module")
def config() -> dict:
    return edge.load_config()


def listen_port(config: dict, server: str) -> int:
    (address,) = config["apps"]["http"]["servers"][server]["listen"]
    return int(address.rpartition(":")[2])


# --- the service, as written ---------------------------------------------------------------------------


@pytest.mark.unit
def test_the_edge_runs_unprivileged_and_read_only(services):
    service = services["edge"]
    assert service["user"] == NOBODY
    assert service["cap_drop"] == ["ALL"]
    # The image's caddy binary carries cap_net_bind_service as a file capability: exec fails without it in
    # the bounding set (docker-compose.yml). Nothing else.
    assert service["cap_add"] == ["NET_BIND_SERVICE"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
    assert not service.get("privileged") and not service.get("pid") and not service.get("network_mode")
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):  # caddy's autosave and storage, on the tmpfs
        assert service["environment"][key].startswith("/tmp/"), key


@pytest.mark.unit
def test_the_edge_runs_the_entrypoint_then_caddy_with_the_mounted_config(services):
    service = services["edge"]
    mounts = dict(bind_mounts(service))
    assert {source: mounts.get(source) for source in MOUNTED} == MOUNTED
    assert raw_compose()["services"]["edge"]["volumes"] == [f"{s}:{t}:ro" for s, t in mounts.items()], "read-only"
    assert service["entrypoint"] == ["/bin/sh", MOUNTED["./edge/entrypoint.sh"]]
    assert service["command"] == ["caddy", "run", f"--config={MOUNTED['./edge/caddy-config.json']}"]
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")


@pytest.mark.unit
def test_the_healthcheck_asks_the_edges_health_listener(services, config):
    test = services["edge"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "wget"], "busybox wget, in the Alpine-based image"
    url = urlsplit(test[-1])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", listen_port(config, edge.METRICS_SERVER), "/health")
    routes = config["apps"]["http"]["servers"][edge.METRICS_SERVER]["routes"]
    assert any(m.get("path") == ["/health"] for r in routes for m in r.get("match", [])), "no /health route"
    # Short enough that a refusal turns the edge unhealthy within a minute (see edge/entrypoint.sh).
    assert services["edge"]["healthcheck"]["start_period"] == "10s"


@pytest.mark.unit
def test_the_check_reads_the_settings_as_compose_does():
    # edge/entrypoint.sh is given BIND_ADDRESS and GRAFANA_ANONYMOUS_ENABLED exactly as the rest of the file
    # reads them: the host address of the edge's ports, and Grafana's GF_AUTH_ANONYMOUS_ENABLED, default
    # included. A different default here would check a value that is not the one in effect.
    raw = raw_compose()["services"]
    environment = raw["edge"]["environment"]
    hosts = {port.partition(":${")[0] for port in raw["edge"]["ports"]}  # before ${EDGE_PORT:?...}
    assert hosts == {environment["BIND_ADDRESS"]}
    assert environment["GRAFANA_ANONYMOUS_ENABLED"] == raw["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]
    # And filled in: both unset (the defaults), and both set.
    unset = {k: v for k, v in dotenv().items() if k not in ("BIND_ADDRESS", "GRAFANA_ANONYMOUS_ENABLED")}
    for env, expected in ((unset, ("127.0.0.1", "true")),
                          ({**unset, "BIND_ADDRESS": "0.0.0.0", "GRAFANA_ANONYMOUS_ENABLED": "false"},
                           ("0.0.0.0", "false"))):
        services = compose(env)["services"]
        seen = services["edge"]["environment"]
        # (YAML types an unquoted true after interpolation; Compose passes the string.)
        anonymous = str(seen["GRAFANA_ANONYMOUS_ENABLED"]).lower()
        assert (seen["BIND_ADDRESS"], anonymous) == expected
        assert anonymous == str(services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]).lower()
        assert {port.rsplit(":", 2)[0] for port in services["edge"]["ports"]} == {seen["BIND_ADDRESS"]}


# --- compose and the edge's config, tied -----------------------------------------------------------------


@pytest.mark.unit
def test_locust_calls_the_app_through_the_edge(services, config):
    (host,) = [word.partition("=")[2] for word in services["locust"]["command"] if word.startswith("--host=")]
    url = urlsplit(host)
    assert url.hostname == "edge", f"locust calls {host}, not the edge"
    assert url.port == listen_port(config, edge.APP_SERVER), "locust's --host is not the edge's app listener"
    assert url.port in service_ports(services["edge"])


@pytest.mark.unit
def test_the_edges_upstreams_are_the_services_it_fronts(services, config):
    dials = edge.upstream_dials(config)
    published = {name: {int(port.rsplit(":", 1)[1]) for port in service.get("ports", [])}
                 for name, service in services.items()}
    # The app listener proxies to the app's own port: the one the app exposes and publishes for the comparisons.
    (app,) = set(dials[edge.APP_SERVER])
    host, _, port = app.rpartition(":")
    assert host == "app" and int(port) in service_ports(services["app"]) and published["app"] == {int(port)}, app
    # The Grafana listener proxies to Grafana's port, which Grafana exposes and no longer publishes itself.
    (grafana,) = set(dials[edge.GRAFANA_SERVER])
    host, _, port = grafana.rpartition(":")
    assert host == "grafana" and int(port) in service_ports(services["grafana"]), grafana
    assert not dials[edge.METRICS_SERVER], "the metrics listener proxies nothing"


@pytest.mark.unit
def test_the_edge_publishes_its_app_and_grafana_listeners_and_keeps_metrics_inside(services, config):
    raw = raw_compose()["services"]["edge"]["ports"]
    targets = {re.search(r"\$\{([A-Z_]+_PORT):", port).group(1): int(port.rsplit(":", 1)[1]) for port in raw}
    assert targets == {"EDGE_PORT": listen_port(config, edge.APP_SERVER),
                       "GRAFANA_PORT": listen_port(config, edge.GRAFANA_SERVER)}
    assert service_ports(services["edge"]) == {listen_port(config, server) for server in
                                               (edge.APP_SERVER, edge.GRAFANA_SERVER, edge.METRICS_SERVER)}


# --- edge/entrypoint.sh, run for real ----------------------------------------------------------------------


def script_env(tmp_path: Path, bind_address: str | None, anonymous: str | None) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    if bind_address is not None:
        env["BIND_ADDRESS"] = bind_address
    if anonymous is not None:
        env["GRAFANA_ANONYMOUS_ENABLED"] = anonymous
    return env


def stub_command(tmp_path: Path) -> tuple[list[str], Path]:
    """A stand-in for `caddy run ...` that records its pid and arguments, so a test sees whether the script
    ran it and whether it replaced the shell (exec: same pid) rather than forking."""
    marker = tmp_path / "ran"
    stub = tmp_path / "caddy-stub"
    stub.write_text(f'#!/bin/sh\necho "$$ $*" > {marker}\n')
    stub.chmod(0o755)
    return [str(stub), "run", "--config=/etc/caddy/caddy-config.json"], marker


@pytest.mark.integration
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("bind_address", "anonymous"), SERVES)
def test_the_entrypoint_execs_the_command_when_grafana_is_safe(tmp_path, shell, bind_address, anonymous):
    command, marker = stub_command(tmp_path)
    process = subprocess.Popen([*shell, str(ENTRYPOINT), *command], env=script_env(tmp_path, bind_address, anonymous),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "refusing" not in out + err
    # exec: the command runs as the script's own process (PID 1 in the container, so it gets the signals).
    assert marker.read_text().split() == [str(process.pid), *command[1:]]


@pytest.mark.integration
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("bind_address", "anonymous"), REFUSES)
def test_the_entrypoint_refuses_anonymous_grafana_off_loopback(tmp_path, shell, bind_address, anonymous):
    command, marker = stub_command(tmp_path)
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen([*shell, str(ENTRYPOINT), *command], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err,
                                   env=script_env(tmp_path, bind_address, anonymous))
    try:
        def refused():
            assert process.poll() is None, f"exited ({process.returncode}) without refusing: {stderr.read_text()!r}"
            return "again" in stderr.read_text() and stderr.read_text()

        message = poll(refused, 10, "the refusal message", interval=0.05)
        # Both settings named with the values in effect (compose's defaults when unset), and the way out.
        assert f"BIND_ADDRESS={bind_address}" in message, message
        assert f"GRAFANA_ANONYMOUS_ENABLED={anonymous or 'true'}" in message, message
        assert "GRAFANA_ANONYMOUS_ENABLED=false" in message and "BIND_ADDRESS=127.0.0.1" in message
        # It idles instead of exiting (an exit would be restarted forever by unless-stopped) and never runs
        # the command: nothing listens, so the healthcheck fails.
        time.sleep(0.3)
        assert process.poll() is None, f"the script exited ({process.returncode}) instead of idling"
        assert not marker.exists(), "the command ran although the script refused"
        children = psutil.Process(process.pid).children()
        assert len(children) == 1 and "caddy" not in children[0].name(), children  # its sleep
        # `docker compose stop` (SIGTERM) ends it at once, with a failure status, its sleep with it.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 1
        assert not any(psutil.pid_exists(child.pid) for child in children), "the script left its sleep behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.integration
@pytest.mark.parametrize("shell", SHELLS)
def test_the_entrypoint_needs_a_command(tmp_path, shell):
    result = subprocess.run([*shell, str(ENTRYPOINT)], env=script_env(tmp_path, "127.0.0.1", "true"),
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 64 and "no command" in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("anonymous", ["false", "true"])
def test_the_real_caddy_serves_through_the_entrypoint_only_when_safe(tmp_path, anonymous):
    # The compose command with the real caddy of CADDY_VERSION (built from its Go module, as the native tier
    # runs it), its health listener moved to a free port: off loopback (the address is what the check reads;
    # caddy itself listens on 127.0.0.1 here), it serves with anonymous Grafana off and refuses with it on.
    caddy = edge.caddy_binary()
    port = free_port()
    config = tmp_path / "caddy-config.json"
    config.write_text(json.dumps(edge.render_config({edge.METRICS_SERVER: port}, {})))
    env = {**script_env(tmp_path, "0.0.0.0", anonymous), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    log = tmp_path / "edge.log"
    with log.open("w") as out:
        process = subprocess.Popen(["sh", str(ENTRYPOINT), str(caddy), "run", f"--config={config}"],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    health = f"http://127.0.0.1:{port}/health"
    try:
        if anonymous == "false":
            def healthy():
                try:
                    return requests.get(health, timeout=2).text
                except requests.ConnectionError:
                    assert process.poll() is None, log.read_text()
                    return None

            assert poll(healthy, 30, f"caddy answering {health}") == "ok\n"
            assert Path(psutil.Process(process.pid).exe()) == caddy.resolve(), "the shell did not exec caddy"
            process.send_signal(signal.SIGTERM)  # caddy's graceful stop
            assert process.wait(timeout=15) == 0, log.read_text()
        else:
            poll(lambda: "refusing" in log.read_text() or None, 10, "the refusal message")
            time.sleep(1)  # caddy, had it been run, would listen within this
            with pytest.raises(requests.ConnectionError):
                requests.get(health, timeout=2)
            assert process.poll() is None and Path(psutil.Process(process.pid).exe()).name != "caddy"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
