"""What Docker gives the app's container, done for a native process: its HEALTHCHECK and its memory cgroup.

**HEALTHCHECK.** The Dockerfile is the one source of truth: `parse_healthcheck()` reads its HEALTHCHECK
instruction (interval, timeout, start period, retries and the command) the way Docker does, and `HealthProbe` runs
that very command against a native app on the Dockerfile's interval, so the native stack sees the same
extra requests (none that any telemetry source counts) as the compose stack.

**Memory cgroup** (v1), measured and limited like a compose service's `mem_limit`: without Docker there is no
container to account for the app's memory or to carry its limit, so a test makes the cgroup the container
would have been: a child of this process's own memory cgroup (so whatever limits the session already has still
apply above it), whose `memory.limit_in_bytes` can be set to compose's `mem_limit`. A process enters it by
writing its own pid into `cgroup.procs` before it execs the real command, so everything it forks (gunicorn's
workers) is born inside and every page they touch is charged there, as in a container.
"""

from __future__ import annotations

import errno
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

from tooling.config import REPO_ROOT

APP_DOCKERFILE = REPO_ROOT / "app" / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

# Docker's defaults for options the instruction leaves out (Dockerfile reference, HEALTHCHECK).
DEFAULTS = {"interval": 30.0, "timeout": 30.0, "start-period": 0.0, "start-interval": 5.0, "retries": 3}

# Go's time.ParseDuration units, which Docker's duration flags use.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
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
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
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


# --- the memory cgroup -------------------------------------------------------------------------------------

# Docker's units for mem_limit: a number with an optional b/k/m/g suffix, powers of 1024.
_MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


def compose_mem_limit(service: str, compose_file: Path = COMPOSE_FILE) -> int:
    """The service's `mem_limit` in bytes, read from the compose file (never restated in a test)."""
    import yaml

    raw = yaml.safe_load(compose_file.read_text())["services"][service].get("mem_limit")
    if raw is None:
        raise ValueError(f"{compose_file.name}: service {service!r} has no mem_limit")
    if isinstance(raw, int):
        return raw
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(raw))
    if not match or match.group(2).lower() not in _MEMORY_UNITS:
        raise ValueError(f"{compose_file.name}: service {service!r} has a mem_limit I cannot read: {raw!r}")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()]


def _memory_mount() -> Path | None:
    """Where the cgroup v1 memory controller is mounted read-write, from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, super_fields = left.split(), right.split()
        if len(super_fields) < 3 or super_fields[0] != "cgroup":
            continue
        if "memory" in super_fields[2].split(",") and "rw" in fields[5].split(","):
            return Path(fields[4])
    return None


def _own_memory_cgroup() -> str | None:
    """This process's path in the memory hierarchy, from /proc/self/cgroup (`4:memory:/some/path`)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return None


def parent_cgroup() -> tuple[Path | None, str]:
    """The directory a child memory cgroup would be made in, or None and the reason it cannot be."""
    if os.geteuid() != 0:
        return None, f"not root (euid {os.geteuid()}): cannot create a memory cgroup"
    mount = _memory_mount()
    if mount is None:
        return None, "no read-write cgroup v1 memory controller in /proc/self/mountinfo (cgroup v2 is not supported)"
    own = _own_memory_cgroup()
    if own is None:
        return None, "/proc/self/cgroup names no memory cgroup for this process"
    parent = mount / own.lstrip("/")
    if not (parent / "cgroup.procs").exists():
        # A cgroup namespace, or a mount of another hierarchy: this process's cgroup is not visible there.
        return None, f"this process's memory cgroup {own} is not under {mount}"
    if not os.access(parent, os.W_OK):
        return None, f"{parent} is not writable"
    return parent, ""


def _read_flat(path: Path) -> dict[str, int]:
    """A `key value` per line file (memory.stat, memory.oom_control) as a dict."""
    return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines() if line)}


@dataclass
class MemoryCgroup:
    path: Path
    limit: int  # what the kernel took (a multiple of the page size)

    @classmethod
    def create(cls, limit_bytes: int | None = None, name: str | None = None) -> MemoryCgroup:
        """A new child cgroup; without `limit_bytes` it only accounts (the kernel's "no limit")."""
        parent, reason = parent_cgroup()
        if parent is None:
            raise RuntimeError(reason)
        path = parent / (name or f"dice-test-{os.getpid()}")
        path.mkdir()
        group = cls(path, int((path / "memory.limit_in_bytes").read_text()))
        try:
            if limit_bytes is not None:
                group.set_limit(limit_bytes)
        except BaseException:
            group.remove()
            raise
        return group

    def set_limit(self, limit_bytes: int) -> bool:
        """Set the hard limit; False if the kernel refused it because it could not reclaim the usage
        below it (EBUSY: more memory than the limit is in use and none of it can be given back)."""
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            return False
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())
        return True

    def reset_peak(self) -> None:
        """Start memory.max_usage_in_bytes again from the current usage."""
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv`, started so that its pid is in this cgroup before it runs (exec keeps the pid)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def stats(self) -> dict[str, int]:
        """Usage, peak, limit hits and the OOM state, in bytes and counts, as the kernel reports them."""
        stat = _read_flat(self.path / "memory.stat")
        oom = _read_flat(self.path / "memory.oom_control")
        read = lambda name: int((self.path / name).read_text())  # noqa: E731 - a local shorthand
        return {
            "limit": self.limit,
            "usage": read("memory.usage_in_bytes"),
            "max_usage": read("memory.max_usage_in_bytes"),
            "failcnt": read("memory.failcnt"),
            "rss": stat["total_rss"],  # anonymous memory: what no reclaim can give back without swap
            "cache": stat["total_cache"],  # page cache (the multiprocess files among it): reclaimable
            "shmem": stat["total_shmem"],
            "under_oom": oom["under_oom"],
            "oom_kill": oom.get("oom_kill", 0),  # Linux 4.13+
            "pids": len(self.pids()),
        }

    def remove(self) -> None:
        """Move whatever still runs in the cgroup back to the parent, then remove the cgroup."""
        if not self.path.exists():
            return
        parent_procs = self.path.parent / "cgroup.procs"
        for _ in range(50):
            for pid in self.pids():
                try:
                    parent_procs.write_text(str(pid))
                except ProcessLookupError:
                    pass  # it exited meanwhile
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # a task was forked in, or the kernel still holds the last one
        raise RuntimeError(f"could not remove {self.path}: still holds {self.pids()}")


# --- the app's container: one cgroup in the cpu, cpuacct and memory hierarchies (v1) ------------------------

# The folder each NativeStack makes for its containers' cgroups: <own cgroup>/dice-native-<pid>-<n>/<service>.
# The naming layer (prometheus/rules/dice-saturation.yaml) reads the service from cAdvisor's `id` label by
# this shape, and cAdvisor (cadvisor/native) watches only the stack's folder.
NATIVE_CGROUP_PREFIX = "dice-native-"
# The v1 controllers a container's CPU and memory limits and accounting live in (Docker sets the same ones).
APP_CONTROLLERS = ("cpu", "cpuacct", "memory")
# What a NativeStack says, once, when it cannot give the app its cgroup (a developer who is not root, a
# machine without writable v1 controllers): the compose settings that are then not applied, and the series
# that are then absent.
NO_CGROUP_MESSAGE = ("the app runs WITHOUT its container cgroup ({reason}): compose's mem_limit and cpus for "
                     "service 'app' are not applied, and cAdvisor reports no series for it, so the "
                     "dice:container_* saturation series are absent (not zero). Run as root, on cgroup v1 "
                     "controllers cpu, cpuacct and memory mounted read-write, to get them.")
_cgroup_folders = 0


def compose_cpus(service: str, compose_file: Path = COMPOSE_FILE) -> float:
    """The service's `cpus` (a CPU quota in cores), read from the compose file."""
    import yaml

    raw = yaml.safe_load(compose_file.read_text())["services"][service].get("cpus")
    if raw is None:
        raise ValueError(f"{compose_file.name}: service {service!r} has no cpus")
    try:
        cpus = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{compose_file.name}: service {service!r} has cpus I cannot read: {raw!r}") from None
    if cpus <= 0:
        raise ValueError(f"{compose_file.name}: service {service!r} has cpus {raw!r}, not a positive number")
    return cpus


def _v1_mounts() -> dict[str, Path]:
    """controller -> where its v1 hierarchy is mounted read-write (co-mounted ones share a path)."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, super_fields = left.split(), right.split()
        if len(super_fields) < 3 or super_fields[0] != "cgroup" or "rw" not in fields[5].split(","):
            continue
        for option in super_fields[2].split(","):
            mounts.setdefault(option, Path(fields[4]))
    return mounts


@dataclass
class ContainerCgroup:
    """A compose service's container without Docker: the same cgroup path (`name`, what cAdvisor reports as
    `id`) in each of APP_CONTROLLERS' hierarchies, made under this process's memory cgroup (so the session's
    own limits still apply above it) inside a folder of its own (`folder`), with compose's CPU quota and
    memory limit. `memory` is that hierarchy's MemoryCgroup, for the kernel's own accounting."""

    name: str
    folder: str
    dirs: dict[str, Path]  # controller -> its directory (co-mounted controllers share one)
    memory: MemoryCgroup
    made: list[Path]  # every directory this created, parents first (the parents other stacks may share)

    @classmethod
    def create(cls, service: str, mem_limit: int | None = None, cpus: float | None = None) -> ContainerCgroup:
        """Raises RuntimeError saying why when the controllers are not there or not writable."""
        global _cgroup_folders
        parent, reason = parent_cgroup()
        if parent is None:
            raise RuntimeError(reason)
        mounts = _v1_mounts()
        missing = [c for c in APP_CONTROLLERS if c not in mounts]
        if missing:
            raise RuntimeError(f"no read-write cgroup v1 {', '.join(missing)} controller in /proc/self/mountinfo")
        own = parent.relative_to(mounts["memory"]).as_posix()
        _cgroup_folders += 1
        folder = f"{'' if own == '.' else '/' + own}/{NATIVE_CGROUP_PREFIX}{os.getpid()}-{_cgroup_folders}"
        name = f"{folder}/{service}"
        group = cls(name, folder, {}, None, [])  # type: ignore[arg-type] - memory is set below
        try:
            for controller in APP_CONTROLLERS:
                directory = mounts[controller] / name.lstrip("/")
                group.dirs[controller] = directory
                missing_dirs = [d for d in (directory, *directory.parents) if not d.exists()]
                for made in reversed(missing_dirs):
                    try:
                        made.mkdir()
                    except FileExistsError:
                        continue  # another stack made the same parent meanwhile: it is not ours to remove
                    group.made.append(made)
            group.memory = MemoryCgroup(group.dirs["memory"], int((group.dirs["memory"] / "memory.limit_in_bytes")
                                                                  .read_text()))
            if mem_limit is not None and not group.memory.set_limit(mem_limit):
                raise RuntimeError(f"the kernel refused a memory limit of {mem_limit} bytes")
            if cpus is not None:
                group.set_cpus(cpus)
        except BaseException:
            group.remove()
            raise
        return group

    @property
    def cpu_quota(self) -> tuple[int, int]:
        """(cfs_quota_us, cfs_period_us); a quota of -1 is no limit."""
        read = lambda name: int((self.dirs["cpu"] / name).read_text())  # noqa: E731 - a local shorthand
        return read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")

    def set_cpus(self, cpus: float | None) -> None:
        """A CFS quota of `cpus` cores per period, as Docker sets for `cpus:`; None removes it."""
        _, period = self.cpu_quota
        (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(-1 if cpus is None else round(cpus * period)))

    def cpu_stat(self) -> dict[str, int]:
        """nr_periods, nr_throttled, throttled_time (ns): the kernel's CFS accounting for the quota."""
        return _read_flat(self.dirs["cpu"] / "cpu.stat")

    def cpu_seconds(self) -> float:
        """The CPU time the kernel charged the cgroup's processes so far (cpuacct.usage)."""
        return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv`, started so that its pid is in the cgroup of every controller before it runs (exec keeps the
        pid, so gunicorn's master and the workers it forks are all inside)."""
        procs = sorted({str(d / "cgroup.procs") for d in self.dirs.values()})
        script = 'for procs in "$@"; do [ "$procs" = -- ] && break; echo $$ > "$procs" || exit 1; done; ' \
                 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "cgroup-enter", *procs, "--", *argv]

    def pids(self) -> list[int]:
        return self.memory.pids() if self.memory else []

    def remove(self) -> None:
        """Move whatever still runs in it back to the parents, then remove every directory this made."""
        for directory in {*self.dirs.values()}:
            if not directory.exists():
                continue
            for _ in range(50):
                for pid in (directory / "cgroup.procs").read_text().split():
                    try:
                        (directory.parent / "cgroup.procs").write_text(pid)
                    except ProcessLookupError:
                        pass  # it exited meanwhile
                if not (directory / "cgroup.procs").read_text().split():
                    break
                time.sleep(0.1)
        own = {Path(directory) for directory in self.dirs.values()} | {
            directory.parent for directory in self.dirs.values()}  # the service's cgroup and the stack's folder
        for made in reversed(self.made):
            for _ in range(50 if made in own else 1):
                try:
                    made.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if made not in own:
                        break  # a parent another stack's cgroups are in now: left (an empty folder costs nothing)
                    time.sleep(0.1)  # the kernel still holds the last task
            else:
                raise RuntimeError(f"could not remove {made}")
