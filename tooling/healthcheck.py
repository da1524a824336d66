"""The app image's HEALTHCHECK, read from app/Dockerfile and run outside Docker.

The Dockerfile is the one source of truth: `parse_healthcheck()` reads its HEALTHCHECK instruction
(interval, timeout, start period, retries and the command) the way Docker does, and `HealthProbe` runs
that very command against a native app on the Dockerfile's interval, so the native stack sees the same
extra requests (none that any telemetry source counts) as the compose stack.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

APP_DOCKERFILE = Path(__file__).resolve().parent.parent / "app" / "Dockerfile"

# Docker's defaults for options the instruction leaves out (Dockerfile reference, HEALTHCHECK).
DEFAULTS = {"interval": 30.0, "timeout": 30.0, "start-period": 0.0, "start-interval": 5.0, "retries": 3}

# Go's time.ParseDuration units, which Docker's duration flags use.
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_CONTINUATION = re.compile(r"\\\s*$")


class HealthcheckError(ValueError):
    """The Dockerfile has no usable HEALTHCHECK; the message names the file."""


@dataclass(frozen=True)
class Healthcheck:
    """One HEALTHCHECK instruction. Durations are in seconds; `command` is the argv Docker executes."""

    command: tuple[str, ...]
    interval: float = DEFAULTS["interval"]
    timeout: float = DEFAULTS["timeout"]
    start_period: float = DEFAULTS["start-period"]
    start_interval: float = DEFAULTS["start-interval"]
    retries: int = DEFAULTS["retries"]
    source: str = ""


def parse_duration(text: str) -> float:
    """A Go duration as Docker's flags take it ("10s", "1m30s", "500ms") in seconds."""
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"not a duration: {text!r} (use a number and a unit, e.g. 10s, 1m30s, 500ms)")
    return total


def instructions(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each Dockerfile instruction: continuation lines (a trailing `\\`)
    joined, comment lines dropped (also inside a continuation, as Docker does)."""
    found: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if _CONTINUATION.search(line):
            parts.append(_CONTINUATION.sub("", line).strip())
            continue
        parts.append(stripped)
        found.append((start, " ".join(part for part in parts if part)))
        parts = []
    if parts:
        found.append((start, " ".join(part for part in parts if part)))
    return found


def _command(body: str) -> tuple[str, ...]:
    # Exec form is a JSON array of strings; anything else is shell form, run by /bin/sh -c (as Docker does).
    if body.startswith("["):
        try:
            argv = json.loads(body)
        except json.JSONDecodeError:
            argv = None
        if isinstance(argv, list) and argv and all(isinstance(arg, str) for arg in argv):
            return tuple(argv)
    return ("/bin/sh", "-c", body)


def parse_healthcheck(dockerfile: Path | str = APP_DOCKERFILE) -> Healthcheck:
    """The HEALTHCHECK that applies to the image `dockerfile` builds: the last one of its final stage."""
    path = Path(dockerfile)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HealthcheckError(f"cannot read {path}: {exc}") from exc
    final_stage = []
    for number, instruction in instructions(text):
        keyword = instruction.split(None, 1)[0].upper()
        if keyword == "FROM":
            # A stage does not inherit an earlier stage's HEALTHCHECK.
            final_stage = []
        elif keyword == "HEALTHCHECK":
            final_stage.append((number, instruction))
    if not final_stage:
        raise HealthcheckError(f"{path} has no HEALTHCHECK instruction in its final stage")
    number, instruction = final_stage[-1]
    where = f"{path}:{number}"
    rest = (instruction.split(None, 1) + [""])[1]
    options: dict[str, str] = {}
    while rest.startswith("--"):
        match = re.match(r"--([a-z-]+)=(\S+)\s*", rest)
        if not match:
            raise HealthcheckError(f"{where}: options are written --name=value: {rest.split()[0]!r}")
        if match.group(1) not in DEFAULTS:
            raise HealthcheckError(f"{where}: unknown HEALTHCHECK option --{match.group(1)}")
        options[match.group(1)] = match.group(2)
        rest = rest[match.end():]
    keyword, body = (rest.split(None, 1) + ["", ""])[:2]
    if keyword.upper() == "NONE":
        raise HealthcheckError(f"{where}: HEALTHCHECK NONE switches the healthcheck off")
    if keyword.upper() != "CMD" or not body.strip():
        raise HealthcheckError(f"{where}: expected HEALTHCHECK [OPTIONS] CMD command, got {instruction!r}")
    values: dict[str, float | int] = {}
    for name, value in options.items():
        try:
            values[name] = int(value) if name == "retries" else parse_duration(value)
        except ValueError as exc:
            raise HealthcheckError(f"{where}: --{name}={value}: {exc}") from None
    check = Healthcheck(
        command=_command(body.strip()),
        interval=values.get("interval", DEFAULTS["interval"]),
        timeout=values.get("timeout", DEFAULTS["timeout"]),
        start_period=values.get("start-period", DEFAULTS["start-period"]),
        start_interval=values.get("start-interval", DEFAULTS["start-interval"]),
        retries=int(values.get("retries", DEFAULTS["retries"])),
        source=where,
    )
    if check.interval <= 0 or check.timeout <= 0 or check.retries < 1:
        raise HealthcheckError(f"{where}: interval and timeout must be positive and retries at least 1")
    return check


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    returncode: int | None  # None: it timed out or could not be started
    output: str
    finished_at: float  # time.time()


class HealthProbe:
    """Runs the image's healthcheck command against a native app on the Dockerfile's interval.

    The command is the Dockerfile's, with a leading `python` replaced by this interpreter and PORT set
    to `port` in `env` (default: this process's environment). Like Docker, the first run comes one
    interval after start(); a run fails on a non-zero exit status or when it outlasts the timeout.
    """

    def __init__(self, port: int, env: Mapping[str, str] | None = None, *, check: Healthcheck | None = None):
        self.check = check if check is not None else parse_healthcheck()
        argv = list(self.check.command)
        if argv[0] == "python":
            argv[0] = sys.executable
        self.command = argv
        self.env = {**(os.environ if env is None else env), "PORT": str(port)}
        self.port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._last: ProbeResult | None = None

    @property
    def runs(self) -> int:
        with self._lock:
            return self._runs

    @property
    def failures(self) -> int:
        with self._lock:
            return self._failures

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._consecutive_failures

    @property
    def last_result(self) -> ProbeResult | None:
        with self._lock:
            return self._last

    @property
    def unhealthy(self) -> bool:
        """What Docker would report as unhealthy: `retries` failures in a row."""
        return self.consecutive_failures >= self.check.retries

    def run_once(self) -> ProbeResult:
        """One run of the command, counted."""
        try:
            done = subprocess.run(self.command, env=self.env, capture_output=True, text=True,
                                  timeout=self.check.timeout, check=False)
            result = ProbeResult(done.returncode == 0, done.returncode, (done.stdout + done.stderr)[-2000:],
                                 time.time())
        except subprocess.TimeoutExpired:
            result = ProbeResult(False, None, f"timed out after {self.check.timeout}s", time.time())
        except OSError as exc:
            result = ProbeResult(False, None, f"could not run {self.command[0]}: {exc}", time.time())
        with self._lock:
            self._runs += 1
            self._last = result
            if result.ok:
                self._consecutive_failures = 0
            else:
                self._failures += 1
                self._consecutive_failures += 1
        return result

    def _loop(self) -> None:
        while not self._stopping.wait(self.check.interval):
            self.run_once()

    def start(self) -> HealthProbe:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this HealthProbe is already running")
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name=f"health-probe:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the run in progress, if any (waits up to the healthcheck's timeout for it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join(self.check.timeout + 1.0 if timeout is None else timeout)

    def __enter__(self) -> HealthProbe:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
