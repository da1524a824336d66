"""A real OpenTelemetry Collector without Docker, built from the project's own manifest.

The compose stack runs the official contrib image. Where no Docker engine exists (tests, CI, the
native stack), the same components at the same version are compiled with the official
OpenTelemetry Collector Builder from ``otel-collector/builder-config.yaml``. The binary is cached
under ``.cache/otelcol/<version>-<manifest hash>/`` so any edit of the manifest gets a fresh build,
and an unchanged manifest costs nothing after the first build (several minutes on 2 cores).

``python -m tooling.collector`` prints the path of the binary, building it if needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import yaml

from tooling.gobuild import BUILD_ENV, go_executable, publish, run_logged, work_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "otel-collector" / "builder-config.yaml"
CONFIG = REPO_ROOT / "otel-collector" / "otel-collector-config.yaml"
CACHE_DIR = REPO_ROOT / ".cache" / "otelcol"

BUILDER_MODULE = "go.opentelemetry.io/collector/cmd/builder"


class CollectorBuildError(RuntimeError):
    """The collector could not be built from the manifest."""


def load_manifest(manifest: Path = MANIFEST) -> dict:
    return yaml.safe_load(manifest.read_text())


def cache_key(manifest: Path = MANIFEST) -> str:
    version = load_manifest(manifest)["dist"]["version"]
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    return f"{version}-{digest}"


def binary_path(manifest: Path = MANIFEST) -> Path:
    """Where the binary for this manifest lives once built (it may not exist yet)."""
    name = load_manifest(manifest)["dist"]["name"]
    return CACHE_DIR / cache_key(manifest) / name


def _go() -> str:
    return go_executable(
        CollectorBuildError,
        f"to build the collector from {MANIFEST.relative_to(REPO_ROOT)} with the OpenTelemetry Collector Builder",
    )


def _run(cmd: list[str], log: Path, **kwargs) -> None:
    run_logged(cmd, log, CollectorBuildError, f"building the collector from {MANIFEST.relative_to(REPO_ROOT)}",
               **kwargs)


def _builder(version: str, env: dict[str, str], log: Path) -> Path:
    # The builder is released together with the collector core, so its version is the manifest's.
    bindir = CACHE_DIR / "builder" / f"v{version}"
    builder = bindir / "builder"
    if not builder.exists():
        _run([_go(), "install", f"{BUILDER_MODULE}@v{version}"], log, env={**env, "GOBIN": str(bindir)})
    return builder


def build(manifest: Path = MANIFEST) -> Path:
    """Build the collector for ``manifest`` into the cache, replacing any previous build of it."""
    spec = load_manifest(manifest)
    version, name = spec["dist"]["version"], spec["dist"]["name"]
    target = binary_path(manifest)
    workdir = work_dir(CACHE_DIR, cache_key(manifest))
    log = workdir / "build.log"
    env = {**os.environ, **BUILD_ENV}
    builder = _builder(version, env, log)

    # A copy of the manifest that writes into the private work directory, so that a failed or
    # concurrent build never leaves a half-written binary at the cached path.
    spec["dist"]["output_path"] = str(workdir / "build")
    build_manifest = workdir / "builder-config.yaml"
    build_manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    _run([str(builder), "--config", str(build_manifest)], log, env=env, cwd=workdir)

    built = workdir / "build" / name
    if not built.exists():
        raise CollectorBuildError(f"the builder reported success but {built} is missing; log: {log}")
    publish(built, target)
    shutil.rmtree(workdir, ignore_errors=True)
    return target


def collector_binary(manifest: Path = MANIFEST) -> Path:
    """Path of the collector built from ``manifest``; builds it first if it is not cached."""
    target = binary_path(manifest)
    if target.exists():
        return target
    return build(manifest)


def main() -> int:
    target = binary_path()
    if not target.exists():
        print(f"building the collector from {MANIFEST.relative_to(REPO_ROOT)} (several minutes)...", file=sys.stderr)
    try:
        print(collector_binary())
    except CollectorBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
