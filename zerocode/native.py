"""Run the stack's components as local processes on 127.0.0.1, from the same files compose uses.

Only hostnames and ports are overridden; everything else (app/app.env, the collector and Prometheus
configs) is read as committed. The tests and `make native-up` share this code.
"""

from __future__ import annotations

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

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "app"
APP_ENV_FILE = APP_DIR / "app.env"
VENV_BIN = Path(sys.executable).parent


def load_env_file(path: Path = APP_ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines as docker compose's env_file reads them (no quotes or interpolation are used)."""
    values = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def app_environment(settings: AppSettings, multiproc_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYROSCOPE_", "GUNICORN_"))}
    env.update(load_env_file())
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


def start_app(settings: AppSettings, log_dir: Path, timeout: float = 30.0) -> Managed:
    """The real app: `opentelemetry-instrument gunicorn -c gunicorn.conf.py`, exactly as the image runs it."""
    multiproc_dir = Path(tempfile.mkdtemp(prefix="dice-multiproc-", dir=log_dir if log_dir.exists() else None))
    env = app_environment(settings, multiproc_dir)
    managed = spawn(
        "app",
        [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"],
        env, APP_DIR, log_dir,
    )
    try:
        # A TCP probe, not GET /health: tests count every request the app serves.
        wait_tcp("127.0.0.1", settings.port, timeout, managed.process)
    except Exception:
        managed.stop()
        raise RuntimeError(f"the app did not start; its log:\n{managed.log()[-4000:]}") from None
    return managed
