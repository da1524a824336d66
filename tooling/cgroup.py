"""A memory cgroup (v1) for a native process tree: its memory measured, and a compose service's `mem_limit`.

Without Docker there is no container to account for the app's memory or to carry its limit, so a test
makes the cgroup the container would have been: a child of this process's own memory cgroup (so whatever
limits the session already has still apply above it), whose `memory.limit_in_bytes` can be set to
compose's `mem_limit`. A process enters it by writing its own pid into `cgroup.procs` before it execs the
real command, so everything it forks (gunicorn's workers) is born inside and every page they touch is
charged there, as in a container.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tooling.native import COMPOSE_FILE

# Docker's units for mem_limit: a number with an optional b/k/m/g suffix, powers of 1024.
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


def compose_mem_limit(service: str, compose_file: Path = COMPOSE_FILE) -> int:
    """The service's `mem_limit` in bytes, read from the compose file (never restated in a test)."""
    import yaml

    raw = yaml.safe_load(compose_file.read_text())["services"][service].get("mem_limit")
    if raw is None:
        raise ValueError(f"{compose_file.name}: service {service!r} has no mem_limit")
    if isinstance(raw, int):
        return raw
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(raw))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{compose_file.name}: service {service!r} has a mem_limit I cannot read: {raw!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


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
