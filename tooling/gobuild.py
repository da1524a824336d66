"""What the Go builds of tooling (collector, Prometheus, Alertmanager, Sloth, the Kubernetes tools) share.

Each compiles official Go modules into `.cache/`, in a private work directory whose log survives a
failure, under a folder named after the version and a hash of the whole recipe, and moves a binary into
the cache only once it is complete, so an interrupted or concurrent build never leaves a half-written
binary where a caller would run it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
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


def recipe_key(version: str, recipe: dict) -> str:
    """The cache folder name of a build: `<version without its v>-<12 hex digits of the recipe>`, so that a
    change of version, flags or anything else in the recipe gets a fresh build."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{version.removeprefix('v')}-{digest}"


def publish_all(out: Path, targets: Sequence[Path], error: type[Exception], what: str) -> None:
    """Publish the binaries that the build left in `out`, each under its target's name; `error`, publishing
    none, if any is missing although the build reported success."""
    missing = [out / target.name for target in targets if not (out / target.name).exists()]
    if missing:
        raise error(f"{what}: the build reported success but {', '.join(map(str, missing))} is missing")
    for target in targets:
        publish(out / target.name, target)


def cached_or_built(targets: Sequence[Path], build: Callable[[], object]) -> Sequence[Path]:
    """`targets` if all are cached, else what `build()` returns (the same paths, once built).

    Callers that miss the same build at once (make's parallel builds, test files on two workers, a
    developer's second shell) wait on one lock file per recipe and the later ones find the binaries
    built: on 2 cores, four concurrent compilations of Prometheus take four times as long as one. The OS
    releases the lock when its holder dies, so a killed build never blocks the next."""
    if all(path.exists() for path in targets):
        return targets
    folder = targets[0].parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder.with_name(f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return targets if all(path.exists() for path in targets) else build()
