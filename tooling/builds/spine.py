"""The spine every build of tooling/builds runs on: one recipe row in, cached binaries out.

Each build compiles official sources into `.cache/`, in a private work directory whose log survives a
failure, under a folder named after the version and a hash of the whole recipe, and moves its output into
the cache only once it is complete, so an interrupted or concurrent build never leaves a half-written
binary where a caller would run it. The build *styles* (a plain `go install`, a throw-away wrapper module
for modules whose go.mod `go install` refuses, a local module) are here; which row uses which is in
recipes.py.
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
# Like the official release builds: paths trimmed, symbols stripped.
BUILD_FLAGS = ("-trimpath",)
LDFLAGS = ("-s", "-w")


class BuildError(RuntimeError):
    """A build of tooling/builds failed, or cannot start; the message names the build and its log."""


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


def publish_dir(staged: Path, target: Path) -> Path:
    """Move a finished folder into the cache (replacing an older copy), so that its files arrive together."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
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


class Go:
    """The `go` commands of one build, logged to its work directory's build.log."""

    def __init__(self, what: str, workdir: Path):
        self.go = go_executable(BuildError, f"for {what}")
        self.what = f"{what} with {self.go}"
        self.workdir = workdir
        self.log = workdir / "build.log"
        self.env = {**os.environ, **BUILD_ENV}

    def run(self, *args: str, cwd: Path, env: dict | None = None) -> None:
        run_logged([self.go, *args], self.log, BuildError, self.what, env=env or self.env, cwd=cwd)

    def json(self, *args: str, cwd: Path) -> dict:
        """A `go … -json` step; its stderr goes to the log, its error (also reported in the JSON) is raised."""
        cmd = [self.go, *args]
        with self.log.open("ab") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, cwd=cwd, env=self.env)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            data = {}
        if result.returncode != 0 or data.get("Error"):
            # `go mod download -json` puts its error (e.g. an unknown version) in the JSON, not on stderr.
            detail = data.get("Error") or self.log.read_text(errors="replace")[-3000:]
            raise BuildError(f"{self.what}: `{' '.join(cmd)}` failed (exit {result.returncode}); "
                             f"log: {self.log}\n{detail}")
        return data

    def download(self, module: str, version: str) -> dict:
        """The module's zip, unpacked in Go's module cache: its Dir and GoMod paths."""
        return self.json("mod", "download", "-json", f"{module}@{version}", cwd=self.workdir)


# ------------------------------------------------------------------------------------------ styles


def go_install(go: Go, packages: Sequence[str], flags: Sequence[str]) -> Path:
    """`go install <flags> <package@version>...` into a staging folder (GOBIN); returns that folder."""
    out = go.workdir / "bin"
    out.mkdir()
    go.run("install", *flags, *packages, cwd=go.workdir, env={**go.env, "GOBIN": str(out)})
    return out


def wrapper_edits(upstream: dict, sibling: Callable[[str, str], str]) -> list[str]:
    """`go mod edit` flags giving a wrapper module the directives of `upstream` (a go.mod as printed by
    `go mod edit -json`) that only a main module honours. A replace that points at a folder of the module's
    repository (not in the module zip) becomes `sibling(old path, folder)`; such a replace of a module that
    the go.mod does not require (etcd's FORBIDDEN_DEPENDENCY guards) is left out, since nothing uses it."""
    required = {r["Path"] for r in upstream.get("Require") or []}
    flags = [f"-go={upstream['Go']}"]  # the main module's `go` line also picks the binaries' GODEBUG defaults
    flags += [f"-exclude={e['Path']}@{e['Version']}" for e in upstream.get("Exclude") or []]
    for replace in upstream.get("Replace") or []:
        old, new = replace["Old"], replace["New"]
        old_spec = old["Path"] + (f"@{old['Version']}" if old.get("Version") else "")
        if new.get("Version"):
            new_spec = f"{new['Path']}@{new['Version']}"
        elif old["Path"] not in required:
            continue
        else:
            new_spec = sibling(old["Path"], new["Path"])
        flags.append(f"-replace={old_spec}={new_spec}")
    flags += [f"-godebug={g['Key']}={g['Value']}" for g in upstream.get("Godebug") or []]
    return flags


def unpinned_dependencies(upstream: dict, wrapper: dict) -> list[str]:
    """Requirements of `upstream` that the wrapper resolved to another version (replaced ones aside)."""
    replaced = {r["Old"]["Path"] for r in upstream.get("Replace") or []}
    chosen = {r["Path"]: r["Version"] for r in wrapper.get("Require") or []}
    return [f"{r['Path']} {r['Version']} -> {chosen[r['Path']]}" for r in upstream.get("Require") or []
            if r["Path"] not in replaced and r["Path"] in chosen and chosen[r["Path"]] != r["Version"]]


def wrapper_module(go: Go, module: str, version: str, packages: dict[str, str], ldflags: str,
                   sibling: Callable[[str, str], str], download: dict) -> Path:
    """Build `packages` ({binary name: package}) of `module@version` in a throw-away wrapper module that
    repeats the module's main-module-only go.mod lines and must resolve every dependency to the version
    the module was released with. `go install module@version` refuses modules with `replace` lines."""
    upstream = go.json("mod", "edit", "-json", download["GoMod"], cwd=go.workdir)
    src = go.workdir / "wrapper"
    src.mkdir()
    go.run("mod", "init", f"zerocode.local/{Path(module).name}-build", cwd=src)
    go.run("mod", "edit", f"-require={module}@{version}", *wrapper_edits(upstream, sibling), cwd=src)
    go.run("get", *(f"{package}@{version}" for package in packages.values()), cwd=src)
    drift = unpinned_dependencies(upstream, go.json("mod", "edit", "-json", cwd=src))
    if drift:
        raise BuildError(f"{go.what}: the wrapper module resolved dependencies differently from {module}'s "
                         f"go.mod: {drift[:10]}; log: {go.log}")
    out = go.workdir / "bin"
    out.mkdir()
    for name, package in packages.items():
        go.run("build", *BUILD_FLAGS, f"-ldflags={ldflags}", "-o", str(out / name), package, cwd=src)
    return out


def local_module(go: Go, src: Path, name: str) -> Path:
    """`go build` of a module in this repository; -mod=readonly: its committed go.mod/go.sum are the whole
    truth, a build never edits them."""
    out = go.workdir / "bin"
    out.mkdir()
    go.run("build", "-mod=readonly", "-trimpath", "-buildvcs=false", "-o", str(out / name), ".", cwd=src)
    return out
