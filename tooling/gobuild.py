"""What the Go builds of tooling.collector and tooling.prometheus_build share.

Both compile official Go modules into `.cache/`, in a private work directory whose log survives a
failure, and move a binary into the cache only once it is complete, so an interrupted or concurrent
build never leaves a half-written binary where a caller would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Static binaries like the official releases, and no C toolchain needed.
BUILD_ENV = {"CGO_ENABLED": "0"}


def go_executable(error: type[Exception], purpose: str) -> str:
    """`go` on PATH, or `error` saying what it was needed for."""
    go = shutil.which("go")
    if go is None:
        raise error(f"Go is not on PATH; it is needed {purpose} (install Go, see README 'Test it').")
    return go


def run_logged(cmd: list[str], log: Path, error: type[Exception], what: str, **kwargs) -> None:
    """Run one build step with its output appended to `log`; on failure raise `error` with the log's tail."""
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise error(f"{what} failed at `{' '.join(cmd)}` (exit {result.returncode}); full log: {log}\n{tail}")


def work_dir(cache_dir: Path, key: str) -> Path:
    """A fresh directory next to the cached builds (same filesystem, so publishing is a rename)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache_dir))


def publish(built: Path, target: Path) -> Path:
    """Move a finished binary to its cached path atomically (replacing an older copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, target)
    return target
