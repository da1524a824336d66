"""Run the stack's components as local processes on 127.0.0.1, from the same files compose uses.

Only hostnames and ports are overridden; everything else (app/app.env, the collector, Prometheus and
Alertmanager configs) is read as committed. The tests and `make native-up` share this code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tooling.config import APP_ENV, DOTENV, REPO_ROOT, load_env_file

APP_DIR = REPO_ROOT / "app"
VENV_BIN = Path(sys.executable).parent


# Ports for the servers we start, chosen below Linux's ephemeral range (32768-60999 by default): a port
# the kernel may hand to an outgoing connection can be taken between choosing it and binding it, and the
# scan, flood and load tests open tens of thousands of such connections.
SERVER_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def _port_range() -> range:
    """SERVER_PORTS, or this pytest-xdist worker's share of it, so that parallel workers never pick the
    same port between one's choice and its bind."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit():
        return SERVER_PORTS
    return SERVER_PORTS[int(worker[2:]) % int(count)::int(count)]


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, not handed out before by this process."""
    import random

    ports = _port_range()
    for _ in range(200):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1} after 200 tries")


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 2xx; fail early, with a clear message, if `process` has died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last_error}")


def poll(check, timeout: float, what: str, interval: float = 0.5):
    """Re-run `check` until it returns something truthy, and return that; on timeout, fail with the
    last answer it gave (or the exception it raised), so a red test says what it saw."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value, error = check(), None
        except Exception as exc:  # noqa: BLE001 - reported below if it never succeeds
            value, error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            last = f"{type(error).__name__}: {error}" if error else repr(value)
            raise AssertionError(f"{what}: not reached within {timeout}s; last answer: {last[:2000]}")
        time.sleep(interval)


def wait_tcp(host: str, port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until something listens on host:port, without sending a request that would count as traffic."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {host}:{port} listened")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s")


@dataclass
class Managed:
    """A child process with its log file; stop() is idempotent."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spawn(name: str, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> Managed:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
    return Managed(name, process, log_path)


@dataclass
class AppSettings:
    """Where the app listens and sends telemetry when it runs natively; the rest comes from app.env."""

    port: int = field(default_factory=free_port)
    otlp_endpoint: str = "http://127.0.0.1:4317"
    pyroscope_address: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    # False runs the owners' command alone (`gunicorn -c gunicorn.conf.py`): the app with its own
    # metrics only, the baseline of the cost benchmark.
    instrumented: bool = True
    # Put before the command, e.g. tooling.native.container's wrapper that enters a cgroup and execs the rest (so the
    # pid stays gunicorn's master, and its workers are forked inside).
    command_prefix: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def profile_file() -> Path:
    """The cost profile compose loads into the app after app.env, and into locust after locust.env
    (APP_PROFILE in .env, or this process's environment)."""
    profile = os.environ.get("APP_PROFILE") or load_env_file(DOTENV)["APP_PROFILE"]
    return APP_DIR / f"profile-{profile}.env"


def app_environment(settings: AppSettings, multiproc_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYROSCOPE_", "GUNICORN_"))}
    env.update(load_env_file(APP_ENV))
    env.update(load_env_file(profile_file()))
    env.update(
        BIND_HOST="127.0.0.1",
        PORT=str(settings.port),
        OTEL_EXPORTER_OTLP_ENDPOINT=settings.otlp_endpoint,
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if settings.pyroscope_address is None:
        env.pop("PYROSCOPE_SERVER_ADDRESS", None)
    else:
        env["PYROSCOPE_SERVER_ADDRESS"] = settings.pyroscope_address
    env.update(settings.overrides)
    return env


def start_app(settings: AppSettings, log_dir: Path, timeout: float = 30.0,
              multiproc_dir: Path | None = None) -> Managed:
    """The real app: `opentelemetry-instrument gunicorn -c gunicorn.conf.py`, exactly as the image runs it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    multiproc_dir = multiproc_dir or Path(tempfile.mkdtemp(prefix="dice-multiproc-", dir=log_dir))
    env = app_environment(settings, multiproc_dir)
    launcher = [str(VENV_BIN / "opentelemetry-instrument")] if settings.instrumented else []
    managed = spawn("app", [*settings.command_prefix, *launcher, str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"],
                    env, APP_DIR, log_dir)
    try:
        # A TCP probe, not GET /health: tests count every request the app serves.
        wait_tcp("127.0.0.1", settings.port, timeout, managed.process)
    except Exception:
        managed.stop()
        raise RuntimeError(f"the app did not start; its log:\n{managed.log()[-4000:]}") from None
    return managed


# ------------------------------------------------------------------------------------ the whole stack

COLLECTOR_CONFIG = REPO_ROOT / "otel-collector" / "otel-collector-config.yaml"
PROMETHEUS_CONFIG = REPO_ROOT / "prometheus" / "prometheus-config.yaml"
ALERTMANAGER_CONFIG = REPO_ROOT / "alertmanager" / "alertmanager-config.yaml"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@dataclass
class StackPorts:
    """Every port the native stack listens on, all on 127.0.0.1. `fixed()` gives the compose ports."""

    app: int
    otlp_grpc: int
    otlp_http: int
    collector_health: int
    collector_metrics: int
    collector_telemetry: int
    prometheus: int
    alertmanager: int
    tempo_sink: int
    loki_sink: int
    pyroscope_sink: int
    beyla: int  # nothing listens: Beyla needs kprobes, so its scrape target stays down, as it would
    edge: int  # Caddy in front of the app: what locust and users call
    edge_metrics: int  # Caddy's own metrics and health
    node_exporter: int  # the host's metrics
    cadvisor: int  # the app's cgroup (its container, natively): CPU, memory, their limits, OOM kills

    @classmethod
    def free(cls) -> StackPorts:
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})

    @classmethod
    def fixed(cls) -> StackPorts:
        return cls(app=5000, otlp_grpc=4317, otlp_http=4318, collector_health=13133, collector_metrics=8889,
                   collector_telemetry=8888, prometheus=9090, alertmanager=9093, tempo_sink=14317,
                   loki_sink=3100, pyroscope_sink=4040, beyla=9400, edge=8080, edge_metrics=9180,
                   # Compose publishes neither exporter; cAdvisor's own 8080 is the edge's on the host.
                   node_exporter=9100, cadvisor=8081)

    def target_map(self) -> dict[str, str]:
        """compose host:port -> local address, for every target a config names."""
        local = "127.0.0.1:{}".format
        return {
            "app:5000": local(self.app),
            "beyla:9400": local(self.beyla),
            "edge:9180": local(self.edge_metrics),
            "node-exporter:9100": local(self.node_exporter),
            "cadvisor:8080": local(self.cadvisor),
            "otel-collector:4317": local(self.otlp_grpc),
            "otel-collector:8889": local(self.collector_metrics),
            "otel-collector:8888": local(self.collector_telemetry),
            "localhost:9090": local(self.prometheus),
            "alertmanager:9093": local(self.alertmanager),
            "tempo:4317": local(self.tempo_sink),
        }


def collector_overlay(ports: StackPorts, base: Path = COLLECTOR_CONFIG) -> dict:
    """A second --config for the real collector config that changes addresses and nothing else."""
    import yaml

    config = yaml.safe_load(base.read_text())
    # Lists are replaced whole when configs merge, so the telemetry reader is copied and re-addressed.
    readers = config["service"]["telemetry"]["metrics"]["readers"]
    readers = [dict(r, pull={"exporter": {"prometheus": {
        **r["pull"]["exporter"]["prometheus"], "host": "127.0.0.1", "port": ports.collector_telemetry}}})
        for r in readers]
    tempo_exporter = next(name for name in config["exporters"] if name.endswith("/tempo"))
    loki_exporter = next(name for name in config["exporters"] if name.endswith("/loki"))
    return {
        "extensions": {"health_check": {"endpoint": f"127.0.0.1:{ports.collector_health}"}},
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{ports.otlp_grpc}"},
                                             "http": {"endpoint": f"127.0.0.1:{ports.otlp_http}"}}}},
        "exporters": {tempo_exporter: {"endpoint": f"127.0.0.1:{ports.tempo_sink}"},
                      loki_exporter: {"endpoint": f"http://127.0.0.1:{ports.loki_sink}/otlp"},
                      "prometheus": {"endpoint": f"127.0.0.1:{ports.collector_metrics}"}},
        "service": {"telemetry": {"metrics": {"readers": readers}}},
    }


def render_prometheus_config(ports: StackPorts, base: Path = PROMETHEUS_CONFIG,
                             extra_rule_files: tuple[Path, ...] = ()) -> str:
    """prometheus-config.yaml with compose targets (scrape jobs and Alertmanagers) rewritten to local
    ports and rule paths made absolute; `extra_rule_files` are loaded besides the committed rules."""
    import yaml

    config = yaml.safe_load(base.read_text())
    targets = ports.target_map()

    def rewrite(static_configs: list, what: str) -> None:
        for static in static_configs:
            unknown = [t for t in static["targets"] if t not in targets]
            if unknown:
                raise ValueError(f"{base.name}: {what} names {unknown}, unknown to the native stack")
            static["targets"] = [targets[t] for t in static["targets"]]

    for job in config["scrape_configs"]:
        rewrite(job.get("static_configs", []), f"job {job['job_name']}")
    for alertmanager in (config.get("alerting") or {}).get("alertmanagers", []):
        rewrite(alertmanager.get("static_configs", []), "alerting")
    config["rule_files"] = [str(base.parent / pattern) for pattern in config.get("rule_files", [])]
    config["rule_files"] += [str(Path(path).resolve()) for path in extra_rule_files]
    return yaml.safe_dump(config, sort_keys=False)


def render_alertmanager_config(webhook_url: str | None = None, base: Path = ALERTMANAGER_CONFIG,
                               route_timings: dict[str, str] | None = None) -> str:
    """alertmanager-config.yaml as committed; with `webhook_url`, its default receiver (the route's) also
    POSTs every notification there, resolved ones included, so that a test can see what would be sent.
    `route_timings` overrides the route's group_wait / group_interval / repeat_interval (a test that
    waits for a resolved notification cannot wait the committed 5-minute group_interval)."""
    import yaml

    if webhook_url is None and not route_timings:
        return base.read_text()
    config = yaml.safe_load(base.read_text())
    if webhook_url is not None:
        (receiver,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
        receiver.setdefault("webhook_configs", []).append({"url": webhook_url, "send_resolved": True})
    unknown = set(route_timings or {}) - {"group_wait", "group_interval", "repeat_interval"}
    if unknown:
        raise ValueError(f"route_timings: {sorted(unknown)} are not route timings")
    config["route"].update(route_timings or {})
    return yaml.safe_dump(config, sort_keys=False)


def compose_command(service: str, compose_file: Path = COMPOSE_FILE) -> list[str]:
    import yaml

    command = yaml.safe_load(compose_file.read_text())["services"][service].get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def prometheus_feature_flags(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """The --enable-feature flags compose gives Prometheus, so the native one runs the same way."""
    return [arg for arg in compose_command("prometheus", compose_file) if arg.startswith("--enable-feature")]


def node_exporter_flags(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """compose's flags for node-exporter except --path.rootfs (the container reads the host's root mounted at
    /host; the native one runs on the host itself)."""
    return [arg for arg in compose_command("node-exporter", compose_file) if not arg.startswith("--path.rootfs")]


# compose's cAdvisor flags that the native build (cadvisor/native, our main around cAdvisor's packages) has;
# the others are about Docker (docker_only, container labels), which the native tier does not run.
CADVISOR_NATIVE_FLAGS = ("--enable_metrics=", "--housekeeping_interval=")


def cadvisor_flags(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """Compose's flags the native build has, and one more metric kind: `process` (the app's open file
    descriptors, container_file_descriptors). The native cAdvisor runs as root in the host's pid namespace,
    so it can read the app's /proc/<pid>/fd; compose's cAdvisor has neither (docs/saturation.md), and would
    report zeros."""
    flags = [arg for arg in compose_command("cadvisor", compose_file) if arg.startswith(CADVISOR_NATIVE_FLAGS)]
    return [f"{arg},process" if arg.startswith("--enable_metrics=") and "process" not in arg else arg
            for arg in flags]


def alertmanager_flags(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """The flags compose gives Alertmanager besides its config and data paths (which are files inside
    the container), so the native one runs the same way; among them, no HA cluster listener."""
    return [arg for arg in compose_command("alertmanager", compose_file)
            if not arg.startswith(("--config.file=", "--storage.path="))]


class NativeStack:
    """Collector, Prometheus, Alertmanager, the edge, node-exporter, cAdvisor and the app as local processes,
    with Tempo and Pyroscope as capture sinks.

    The app runs in a cgroup of its own (`app_cgroup`, a tooling.native.container.ContainerCgroup: cpu, cpuacct
    and memory, v1) with compose's `cpus` and `mem_limit` for the `app` service, as its container would, and
    cAdvisor watches that cgroup alone. Where cgroups are not writable (not root), `app_cgroup` is None, one
    message says so and why (`app_cgroup_problem`), and the app runs unlimited: its container series are
    then absent. `app_cgroup=False` runs it unlimited on purpose, silently.

    The sinks run in this process (`tempo_sink`, `loki_sink`, `pyroscope_sink`) so callers can inspect
    what arrived.
    `alert_webhook` (a URL, e.g. a tooling.native.sinks.WebhookSink's) is added to Alertmanager's default
    receiver, and `alert_route_timings` override its route's; `extra_rule_files` are rule files
    Prometheus loads besides the committed ones.
    """

    def __init__(self, run_dir: Path, ports: StackPorts | None = None, keep_traces: bool = True,
                 alert_webhook: str | None = None, extra_rule_files: tuple[Path, ...] = (),
                 alert_route_timings: dict[str, str] | None = None, app_cgroup: bool = True):
        from tooling.native.sinks import LogsSink, OtlpSink, PyroscopeSink

        self.run_dir = run_dir.resolve()  # children run with it as cwd, so relative paths would break
        self.ports = ports or StackPorts.free()
        self.tempo_sink = OtlpSink(port=self.ports.tempo_sink, keep=keep_traces)
        self.loki_sink = LogsSink(port=self.ports.loki_sink)
        self.pyroscope_sink = PyroscopeSink(port=self.ports.pyroscope_sink)
        self.app_settings = AppSettings(
            port=self.ports.app, otlp_endpoint=f"http://127.0.0.1:{self.ports.otlp_grpc}",
            pyroscope_address=self.pyroscope_sink.address)
        self.alert_webhook = alert_webhook
        self.alert_route_timings = alert_route_timings
        self.extra_rule_files = tuple(extra_rule_files)
        self.collector: Managed | None = None
        self.prometheus: Managed | None = None
        self.alertmanager: Managed | None = None
        self.app: Managed | None = None
        self.edge: Managed | None = None
        self.node_exporter: Managed | None = None
        self.cadvisor: Managed | None = None
        self.want_app_cgroup = app_cgroup
        self.app_cgroup = None  # a ContainerCgroup once up() made it
        self.app_cgroup_problem = "" if app_cgroup else "not asked for (app_cgroup=False)"
        self.health_probe = None

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prometheus}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.alertmanager}"

    @property
    def app_url(self) -> str:
        return self.app_settings.url

    @property
    def edge_url(self) -> str:
        """Where users and locust call the app: through the edge."""
        return f"http://127.0.0.1:{self.ports.edge}"

    @property
    def collector_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.collector_metrics}/metrics"

    def query(self, expr: str) -> list:
        return prometheus_query(self.prometheus_url, expr)

    def start_collector(self, *extra_configs: dict) -> Managed:
        """The collector with the committed config and the address overlay; each of `extra_configs` is
        layered on top as one more --config (maps merge key by key, lists are replaced), for a test that
        runs it misconfigured."""
        import yaml

        from tooling.builds import binary

        overlay = self.run_dir / "otel-collector-overlay.yaml"
        overlay.write_text(yaml.safe_dump(collector_overlay(self.ports), sort_keys=False))
        layers = []
        for number, extra in enumerate(extra_configs, 1):
            layers.append(self.run_dir / f"otel-collector-extra-{number}.yaml")
            layers[-1].write_text(yaml.safe_dump(extra, sort_keys=False))
        self.collector = spawn(
            "otel-collector",
            [str(binary("collector")), f"--config={COLLECTOR_CONFIG}", f"--config={overlay}",
             *(f"--config={layer}" for layer in layers)],
            dict(os.environ), self.run_dir, self.run_dir)
        self._wait("otel-collector", self.collector, f"http://127.0.0.1:{self.ports.collector_health}/")
        return self.collector

    def start_prometheus(self) -> Managed:
        from tooling.builds import binaries

        # The compose image's version, built from its Go module; PROMETHEUS_BIN runs another one instead.
        binary = os.environ.get("PROMETHEUS_BIN") or str(binaries("prometheus")[0])
        config = self.run_dir / "prometheus-config.yaml"
        config.write_text(render_prometheus_config(self.ports, extra_rule_files=self.extra_rule_files))
        self.prometheus = spawn(
            "prometheus",
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{self.ports.prometheus}", *prometheus_feature_flags()],
            dict(os.environ), self.run_dir, self.run_dir)
        self._wait("prometheus", self.prometheus, f"{self.prometheus_url}/-/ready")
        return self.prometheus

    def start_alertmanager(self) -> Managed:
        from tooling.builds import binaries

        # The compose image's version, built from its Go module.
        config = self.run_dir / "alertmanager-config.yaml"
        config.write_text(render_alertmanager_config(self.alert_webhook, route_timings=self.alert_route_timings))
        self.alertmanager = spawn(
            "alertmanager",
            [str(binaries("alertmanager")[0]), f"--config.file={config}",
             f"--storage.path={self.run_dir / 'alertmanager-data'}",
             f"--web.listen-address=127.0.0.1:{self.ports.alertmanager}", *alertmanager_flags()],
            dict(os.environ), self.run_dir, self.run_dir)
        self._wait("alertmanager", self.alertmanager, f"{self.alertmanager_url}/-/ready")
        return self.alertmanager

    @property
    def app_multiproc_dir(self) -> Path:
        """prometheus-flask-exporter's PROMETHEUS_MULTIPROC_DIR (gunicorn empties it at each start)."""
        return self.run_dir / "app-multiproc"

    def make_app_cgroup(self):
        """The app's container cgroup with compose's limits for `app`, or None and one message saying why not."""
        from tooling.native.container import NO_CGROUP_MESSAGE, ContainerCgroup, compose_cpus, compose_mem_limit

        if self.app_cgroup is None and self.want_app_cgroup and not self.app_cgroup_problem:
            try:
                self.app_cgroup = ContainerCgroup.create("app", compose_mem_limit("app"), compose_cpus("app"))
            except (OSError, RuntimeError) as exc:
                self.app_cgroup_problem = str(exc)
                print(f"NativeStack: {NO_CGROUP_MESSAGE.format(reason=exc)}", file=sys.stderr, flush=True)
        return self.app_cgroup

    def start_node_exporter(self) -> Managed:
        from tooling.builds import binary

        # The compose image's version, built from its Go module.
        self.node_exporter = spawn(
            "node-exporter",
            [str(binary("node-exporter")), f"--web.listen-address=127.0.0.1:{self.ports.node_exporter}",
             *node_exporter_flags()], dict(os.environ), self.run_dir, self.run_dir)
        self._wait("node-exporter", self.node_exporter, f"http://127.0.0.1:{self.ports.node_exporter}/metrics")
        return self.node_exporter

    def start_cadvisor(self) -> Managed:
        """cAdvisor (cadvisor/native, at the compose image's release) watching only this stack's cgroups: the
        app's, or, without one, none but the root (whose series the cadvisor job drops)."""
        from tooling.builds import binary
        from tooling.native.container import NATIVE_CGROUP_PREFIX

        group = self.make_app_cgroup()
        # A folder no cgroup has, when there is none: a stack never reports another stack's app.
        watched = f"{group.folder}/" if group else f"/{NATIVE_CGROUP_PREFIX}none-{os.getpid()}/"
        self.cadvisor = spawn(
            "cadvisor",
            [str(binary("cadvisor")), f"--listen_address=127.0.0.1:{self.ports.cadvisor}",
             f"--raw_cgroup_prefix_whitelist={watched}", *cadvisor_flags()],
            dict(os.environ), self.run_dir, self.run_dir)
        self._wait("cadvisor", self.cadvisor, f"http://127.0.0.1:{self.ports.cadvisor}/healthz")
        return self.cadvisor

    def start_app(self) -> Managed:
        import dataclasses

        from tooling.native.container import HealthProbe

        group = self.make_app_cgroup()
        # Into the container cgroup first, then whatever the caller puts before the command (its wrapper
        # runs inside ours, so a cgroup of its own for a controller wins for that controller).
        settings = dataclasses.replace(self.app_settings, command_prefix=(
            *(group.wrap([]) if group else ()), *self.app_settings.command_prefix))
        self.app = start_app(settings, self.run_dir, multiproc_dir=self.app_multiproc_dir)
        # The image's HEALTHCHECK, run on its schedule as Docker would, so that every count the tests
        # compare with locust is taken with the probe's requests going on beside the load.
        if self.health_probe is None:
            self.health_probe = HealthProbe(self.ports.app).start()
        return self.app

    def start_edge(self) -> Managed:
        """Caddy with edge/caddy-config.json, its app server proxying to the native app. The Grafana listener
        is left out: Grafana is not part of the native tier."""
        from tooling.native import edge

        config = self.run_dir / "caddy-config.json"
        config.write_text(json.dumps(edge.render_config(
            {edge.APP_SERVER: self.ports.edge, edge.METRICS_SERVER: self.ports.edge_metrics},
            {"app:5000": f"127.0.0.1:{self.ports.app}"}), indent=2))
        env = edge.edge_environment(f"http://127.0.0.1:{self.ports.otlp_grpc}")
        env.update(XDG_DATA_HOME=str(self.run_dir / "caddy-data"), XDG_CONFIG_HOME=str(self.run_dir / "caddy-config"))
        self.edge = spawn("edge", [str(edge.caddy_binary()), "run", f"--config={config}"], env, self.run_dir,
                          self.run_dir)
        self._wait("edge", self.edge, f"http://127.0.0.1:{self.ports.edge_metrics}/health")
        return self.edge

    def _wait(self, name: str, managed: Managed, url: str) -> None:
        try:
            wait_http(url, 30, managed.process)
        except Exception as exc:
            managed.stop()
            raise RuntimeError(f"{name} did not become ready ({exc}); its log:\n{managed.log()[-4000:]}") from None

    def up(self, with_app: bool = True) -> NativeStack:
        """Start everything; with_app=False leaves the app to the caller (the benchmark starts its own)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tempo_sink.start()
        self.loki_sink.start()
        self.pyroscope_sink.start()
        try:
            self.start_collector()
            # Before Prometheus, so that its first alerts find Alertmanager listening.
            self.start_alertmanager()
            self.start_prometheus()
            self.start_node_exporter()
            self.start_cadvisor()
            if with_app:
                self.start_app()
            self.start_edge()
        except BaseException:
            self.down()  # never leave a half-started stack behind
            raise
        return self

    def down(self) -> None:
        if self.health_probe is not None:
            self.health_probe.stop()
        for managed in (self.edge, self.app, self.collector, self.prometheus, self.alertmanager, self.node_exporter,
                        self.cadvisor):
            if managed is not None:
                managed.stop()
        if self.app_cgroup is not None:
            self.app_cgroup.remove()
            self.app_cgroup = None
        self.tempo_sink.stop()
        self.loki_sink.stop()
        self.pyroscope_sink.stop()

    def urls(self) -> dict[str, str]:
        return {
            "edge (the app, as users call it)": self.edge_url,
            "app": self.app_url,
            "prometheus": self.prometheus_url,
            "alertmanager": self.alertmanager_url,
            "collector metrics": self.collector_metrics_url,
            "node-exporter": f"http://127.0.0.1:{self.ports.node_exporter}/metrics",
            "cadvisor": f"http://127.0.0.1:{self.ports.cadvisor}/metrics",
            "collector health": f"http://127.0.0.1:{self.ports.collector_health}/",
            "tempo sink (OTLP gRPC)": f"127.0.0.1:{self.ports.tempo_sink}",
            "loki sink (OTLP HTTP)": f"{self.loki_sink.address}/otlp",
            "pyroscope sink": self.pyroscope_sink.address,
        }


def prometheus_query(base_url: str, expr: str, path: str = "query", **params) -> list:
    """Run one PromQL query through the HTTP API; raises with Prometheus's own error text."""
    import requests

    response = requests.get(f"{base_url}/api/v1/{path}", params={"query": expr, **params}, timeout=10)
    body = response.json()
    if body.get("status") != "success":
        raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"] if path == "query" else body["data"]


def by_labels(result: list, *labels: str):
    """A query result as a Counter keyed by the values of `labels` (None where a series lacks one)."""
    from collections import Counter

    return Counter({tuple(r["metric"].get(label) for label in labels): int(float(r["value"][1])) for r in result})


LOCUSTFILE = REPO_ROOT / "locustfile.py"
LOCUST_ENV = REPO_ROOT / "locust" / "locust.env"
GROUND_TRUTH_PLUGIN = Path(__file__).with_name("locust_ground_truth.py")


def locust_environment() -> dict[str, str]:
    """What compose's locust service gets: locust/locust.env, then the app's cost profile."""
    return {**load_env_file(LOCUST_ENV), **load_env_file(profile_file())}


def run_locust(host: str, seconds: int | None, users: int, run_dir: Path, name: str = "locust",
               background: bool = False, scenario: str = "steady",
               otlp_endpoint: str | None = None, env: dict[str, str] | None = None,
               locustfile: Path = LOCUSTFILE) -> subprocess.Popen | dict:
    """A scenario of locustfile.py headless against `host`, with the ground-truth plugin; returns what
    it sent. seconds=None lets the scenario end itself (locustfile.py's table says when).

    With otlp_endpoint, locust runs with `--otel`, locust/locust.env and the app's cost profile (its
    sampler: locust roots the traces), as compose runs it, exporting there. With background=True the
    process is returned; call `locust_result(run_dir, name)` after it ends. `env` adds settings of the
    scenario (DICE_SPIKE_USERS, ...). `locustfile` is another app's load (examples/<app>/locustfile.py).
    """
    run_dir = run_dir.resolve()  # locust runs with it as cwd
    extra, env = env or {}, {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otlp_endpoint:
        env.update(locust_environment(), OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint)
    env.update(LOCUST_GROUND_TRUTH_FILE=str(run_dir / f"{name}.json"), DICE_SCENARIO=scenario, **extra)
    args = [str(VENV_BIN / "locust"), "-f", f"{locustfile},{GROUND_TRUTH_PLUGIN}", "--headless",
            "-u", str(users), "-r", str(users), "--host", host, "--only-summary",
            "--stop-timeout", "5", "--exit-code-on-error", "0", *(["--otel"] if otlp_endpoint else [])]
    if seconds is not None:
        args += ["-t", f"{seconds}s"]
    with open(run_dir / f"{name}.log", "wb") as log:
        process = subprocess.Popen(args, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
    if background:
        return process
    process.wait((seconds or 600) + 60)
    return locust_result(run_dir, name)


def locust_result(run_dir: Path, name: str = "locust") -> dict:
    import json

    path = run_dir / f"{name}.json"
    if not path.exists():
        log = (run_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust wrote no ground truth ({path}); its log:\n{log}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------- `make native-up` / `native-down`

STATE_DIR = REPO_ROOT / ".native"
PID_FILE = STATE_DIR / "native.pid"
URLS_FILE = STATE_DIR / "urls.json"


def _serve() -> int:
    """Foreground: the stack on the compose ports until SIGTERM; reports what the sinks received."""
    import json
    import signal

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    stack = NativeStack(STATE_DIR / "run", StackPorts.fixed())
    try:
        stack.up()
        URLS_FILE.write_text(json.dumps(stack.urls(), indent=2))
        while not stop:
            time.sleep(10)
            print(f"tempo sink: {len(stack.tempo_sink.spans())} spans; loki sink: "
                  f"{len(stack.loki_sink.records())} log records; pyroscope sink: "
                  f"{len(stack.pyroscope_sink.snapshot())} profiles", flush=True)
    finally:
        stack.down()
    return 0


def _up() -> int:
    import json

    if PID_FILE.exists():
        print(f"the native stack already runs (pid {PID_FILE.read_text().strip()}); `make native-down` first")
        return 1
    STATE_DIR.mkdir(exist_ok=True)
    URLS_FILE.unlink(missing_ok=True)
    with open(STATE_DIR / "native.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tooling.native", "serve"], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    PID_FILE.write_text(str(process.pid))
    deadline = time.monotonic() + 120
    while not URLS_FILE.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            PID_FILE.unlink(missing_ok=True)
            process.kill()
            print((STATE_DIR / "native.log").read_text()[-4000:])
            print("the native stack did not start; log above (.native/native.log)")
            return 1
        time.sleep(0.5)
    for name, url in json.loads(URLS_FILE.read_text()).items():
        print(f"  {name:24} {url}")
    print(f"load:  .venv/bin/locust -f locustfile.py --host http://127.0.0.1:{StackPorts.fixed().edge}\n"
          "logs:  .native/native.log and .native/run/*.log\nstop:  make native-down")
    return 0


def _down() -> int:
    import signal

    if not PID_FILE.exists():
        print("the native stack is not running")
        return 0
    pid = int(PID_FILE.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    PID_FILE.unlink(missing_ok=True)
    print("the native stack is stopped")
    return 0


def main() -> int:
    """`python -m tooling.native up|down|serve` (tooling/native/__main__.py)."""
    commands = {"up": _up, "down": _down, "serve": _serve}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m tooling.native {{{'|'.join(commands)}}}")
    return commands[sys.argv[1]]()
