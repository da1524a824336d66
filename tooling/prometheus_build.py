"""Prometheus and promtool of the compose image's version, without Docker, from the official Go module.

The compose stack runs `prom/prometheus:${PROMETHEUS_VERSION}` (.env). The tests and the native stack
run the same release, compiled from `github.com/prometheus/prometheus` as served by the Go module
proxy (Prometheus 3.XX.Y is the Go module version v0.3XX.Y). The binaries are cached under
``.cache/prometheus/<version>-<recipe hash>/``, so changing the version in .env or the recipe below
gets a fresh build, and an unchanged one costs nothing after the first build (about 8 minutes on
2 cores with Go's caches cold).

`go install module/cmd/...@version` refuses this module: its go.mod has `replace`/`exclude`
directives, which Go only honours in the main module. So the build runs in a throw-away wrapper
module whose go.mod is generated from Prometheus's own (its `go`, `exclude`, `replace` and `godebug`
lines), and resolves every dependency to the version Prometheus itself was released with.

``python -m tooling.prometheus_build`` prints the paths of both binaries, building them if needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tooling.envfile import load_env_file
from tooling.gobuild import BUILD_ENV, cached_or_built, go_executable, publish_all, recipe_key, run_logged, work_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = REPO_ROOT / ".env"
CACHE_DIR = REPO_ROOT / ".cache" / "prometheus"

MODULE = "github.com/prometheus/prometheus"
COMMANDS = ("prometheus", "promtool")
# The recipe besides the version; it is hashed into the cache path. Like the collector's builder:
# paths trimmed and symbols stripped. No build tags: the official `builtinassets` tag embeds the web
# UI, whose files npm generates and the Go module does not contain. Without it the UI pages answer
# 500 ("Error opening React index.html"), while /-/ready, /-/healthy and /api/v1/* work as usual,
# which is all the tests and Grafana use. `netgo` (also official) changes nothing with CGO_ENABLED=0.
BUILD_FLAGS = ("-trimpath",)
LDFLAGS = ("-s", "-w")
# Stamped with what `prometheus --version` and /api/v1/status/buildinfo report. The proxy serves no
# commit hash, so the revision names the module version instead.
VERSION_PACKAGE = "github.com/prometheus/common/version"


class PrometheusBuildError(RuntimeError):
    """Prometheus could not be built from its Go module."""


def prometheus_version(env_file: Path = ENV_FILE) -> str:
    """PROMETHEUS_VERSION from .env, the compose image tag, like `v3.9.1`."""
    version = load_env_file(env_file).get("PROMETHEUS_VERSION")
    if not version:
        raise PrometheusBuildError(f"{env_file} sets no PROMETHEUS_VERSION")
    return version


def module_version(version: str) -> str:
    """Go module version of a Prometheus release: 3.9.1 -> v0.309.1 (3.x is v0.3XX.Y; 2.x differed)."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?", version)
    if not match or int(match[1]) < 3 or int(match[2]) > 99:
        raise PrometheusBuildError(
            f"PROMETHEUS_VERSION={version}: no Go module version known for it ({MODULE} v0.3XX.Y is "
            "Prometheus 3.XX.Y; 2.x is not built here)"
        )
    major, minor, patch, pre = int(match[1]), int(match[2]), match[3], match[4] or ""
    return f"v0.{major * 100 + minor}.{patch}{pre}"


def ldflags(version: str) -> str:
    stamp = {"Version": version.removeprefix("v"), "Revision": module_version(version), "BuildUser": "zerocode"}
    return " ".join([*LDFLAGS, *(f"-X {VERSION_PACKAGE}.{key}={value}" for key, value in stamp.items())])


def recipe(version: str) -> dict:
    return {"module": MODULE, "module_version": module_version(version), "commands": list(COMMANDS),
            "build_flags": list(BUILD_FLAGS), "ldflags": ldflags(version), "env": BUILD_ENV}


def cache_key(version: str) -> str:
    return recipe_key(version, recipe(version))


def binary_paths(version: str | None = None) -> tuple[Path, Path]:
    """Where (prometheus, promtool) live once built (they may not exist yet)."""
    directory = CACHE_DIR / cache_key(version or prometheus_version())
    return directory / "prometheus", directory / "promtool"


def _go(version: str) -> str:
    return go_executable(PrometheusBuildError, f"to build Prometheus {version} from {MODULE}@{module_version(version)}")


def _go_json(cmd: list[str], log: Path, version: str, cwd: Path) -> dict:
    """A `go ... -json` step whose JSON is wanted; its stderr still goes to the log."""
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, cwd=cwd, env={**os.environ, **BUILD_ENV})
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = {}
    if result.returncode != 0 or data.get("Error"):
        # `go mod download -json` puts its error (e.g. an unknown version) in the JSON, not on stderr.
        detail = data.get("Error") or log.read_text(errors="replace")[-3000:]
        raise PrometheusBuildError(f"building Prometheus {version}: `{' '.join(cmd)}` failed (exit "
                                   f"{result.returncode}); log: {log}\n{detail}")
    return data


def wrapper_edits(upstream: dict, module_dir: Path) -> list[str]:
    """`go mod edit` flags that give the wrapper module the directives of Prometheus's go.mod
    (as printed by `go mod edit -json`) that only a main module's go.mod can carry."""
    # The main module's `go` line also picks the GODEBUG defaults the binaries run with.
    flags = [f"-go={upstream['Go']}"]
    flags += [f"-exclude={e['Path']}@{e['Version']}" for e in upstream.get("Exclude") or []]
    for replace in upstream.get("Replace") or []:
        old, new = replace["Old"], replace["New"]
        old_spec = old["Path"] + (f"@{old['Version']}" if old.get("Version") else "")
        if new.get("Version"):
            new_spec = f"{new['Path']}@{new['Version']}"
        else:  # a directory inside Prometheus's module
            new_spec = str((module_dir / new["Path"]).resolve())
        flags.append(f"-replace={old_spec}={new_spec}")
    flags += [f"-godebug={g['Key']}={g['Value']}" for g in upstream.get("Godebug") or []]
    return flags


def unpinned_dependencies(upstream: dict, wrapper: dict) -> list[str]:
    """Requirements of Prometheus's go.mod that the wrapper resolved to another version."""
    chosen = {r["Path"]: r["Version"] for r in wrapper.get("Require") or []}
    return [f"{r['Path']} {r['Version']} -> {chosen[r['Path']]}" for r in upstream.get("Require") or []
            if r["Path"] in chosen and chosen[r["Path"]] != r["Version"]]


def build(version: str | None = None) -> tuple[Path, Path]:
    """Build prometheus and promtool of `version` (default: .env's) into the cache."""
    version = version or prometheus_version()
    modver = module_version(version)
    go = _go(version)
    targets = binary_paths(version)
    workdir = work_dir(CACHE_DIR, cache_key(version))
    log = workdir / "build.log"
    env = {**os.environ, **BUILD_ENV}
    what = f"building Prometheus {version} ({MODULE}@{modver}) with {go}"

    def run(*args: str, cwd: Path) -> None:
        run_logged([go, *args], log, PrometheusBuildError, what, env=env, cwd=cwd)

    download = _go_json([go, "mod", "download", "-json", f"{MODULE}@{modver}"], log, version, workdir)
    upstream = _go_json([go, "mod", "edit", "-json", download["GoMod"]], log, version, workdir)

    src = workdir / "wrapper"
    src.mkdir()
    run("mod", "init", "zerocode.local/prometheus-build", cwd=src)
    run("mod", "edit", f"-require={MODULE}@{modver}", *wrapper_edits(upstream, Path(download["Dir"])), cwd=src)
    packages = [f"{MODULE}/cmd/{name}" for name in COMMANDS]
    run("get", *(f"{p}@{modver}" for p in packages), cwd=src)
    drift = unpinned_dependencies(upstream, _go_json([go, "mod", "edit", "-json"], log, version, src))
    if drift:
        raise PrometheusBuildError(f"{what}: the wrapper module resolved dependencies differently from "
                                   f"Prometheus's go.mod: {drift[:10]}; log: {log}")

    out = workdir / "bin"
    out.mkdir()
    run("build", *BUILD_FLAGS, f"-ldflags={ldflags(version)}", "-o", f"{out}/", *packages, cwd=src)

    publish_all(out, targets, PrometheusBuildError, f"{what} (log: {log})")
    shutil.rmtree(workdir, ignore_errors=True)
    return targets


def prometheus_binaries(version: str | None = None) -> tuple[Path, Path]:
    """(prometheus, promtool) of `version` (default: PROMETHEUS_VERSION in .env); builds them if not cached."""
    return cached_or_built(binary_paths(version), lambda: build(version))


def main() -> int:
    try:
        if not all(path.exists() for path in binary_paths()):
            print(f"building Prometheus {prometheus_version()} from {MODULE} (minutes the first time)...",
                  file=sys.stderr)
        for path in prometheus_binaries():
            print(path)
    except PrometheusBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
