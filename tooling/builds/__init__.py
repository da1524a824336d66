"""Every binary tooling and the tests run that is built from source: one table (recipes.py), one spine.

    from tooling.builds import binaries
    prometheus, promtool = binaries("prometheus")      # built into .cache/ first if missing

    python -m tooling.builds prometheus caddy           # print the paths, building what is missing
    python -m tooling.builds                            # every build `make test` needs

Callers that miss the same build at once wait for one build (spine.cached_or_built).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tooling.builds.recipes import BUILDS, SCHEMA_TEMPLATE, Recipe
from tooling.builds.spine import BuildError, cached_or_built, publish_all, publish_dir, work_dir

__all__ = ["BUILDS", "BuildError", "K8sTools", "binaries", "binary", "build", "k8s_tools", "paths"]

# A failed build is not retried by every caller in the same process (each retry may wait on the network).
_failed: dict[Path, BuildError] = {}


def paths(name: str, version: str | Path | None = None) -> tuple[Path, ...]:
    """Where the outputs of build `name` at `version` (default: its row's) live once built (they may not exist
    yet). For the collector the version is its builder manifest; for compose-config, its source folder."""
    row = BUILDS[name]
    return row.paths(str(version) if version else None)


def build(row: Recipe, version: str) -> tuple[Path, ...]:
    """Build one row into the cache (replacing any earlier build of the same key)."""
    folder = row.folder(version)
    workdir = work_dir(folder.parent, folder.name)
    staged = row.build(row, version, workdir)
    problem = row.check(staged, version) if row.check else None
    if problem:
        raise BuildError(f"building {row.about} {version}: {problem}; log: {workdir / 'build.log'}")
    if row.whole_folder:
        publish_dir(staged, folder)
    else:
        publish_all(staged, row.paths(version), BuildError, f"building {row.about} {version} (log: "
                    f"{workdir / 'build.log'})")
    shutil.rmtree(workdir, ignore_errors=True)
    return row.paths(version)


def binaries(name: str, version: str | Path | None = None,
             log: Callable[[str], None] | None = None) -> tuple[Path, ...]:
    """The outputs of build `name` (see `paths`), built first if any is missing (minutes cold, nothing when
    cached). `log` hears when a build starts and how long it took."""
    row = BUILDS[name]
    for need in row.needs:
        binaries(need, log=log)
    version = str(version) if version else row.version()
    targets = row.paths(version)
    if all(path.exists() for path in targets):
        return targets
    if row.folder(version) in _failed:
        raise _failed[row.folder(version)]

    def timed() -> tuple[Path, ...]:
        started = time.monotonic()
        if log:
            log(f"building {row.about} {version} ({name})...")
        try:
            built = build(row, version)
        except BuildError as exc:
            _failed[row.folder(version)] = exc
            raise
        if log:
            log(f"built {name} in {time.monotonic() - started:.0f} s")
        return built

    return tuple(cached_or_built(targets, timed))


def binary(name: str, version: str | Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The one output of a build that has one (sloth, caddy, the collector, …)."""
    (path,) = binaries(name, version, log)
    return path


@dataclasses.dataclass(frozen=True)
class K8sTools:
    """Where every part the Kubernetes tests run lives."""

    kube_apiserver: Path
    kubectl: Path
    etcd: Path
    kubeconform: Path
    operator: Path
    operator_crds: Path  # folder of the Operator's CustomResourceDefinition YAML files (config/crd/bases)
    operator_webhooks: Path  # config/webhook/manifests.yaml of the Operator's module
    kubernetes_schemas: Path  # folder of strict JSON schemas of the Kubernetes API
    crd_schemas: Path  # folder of strict JSON schemas of the Operator's CRDs

    def schema_locations(self) -> list[str]:
        """kubeconform's `-schema-location` values, local folders only."""
        return [f"{self.kubernetes_schemas}/{SCHEMA_TEMPLATE}", f"{self.crd_schemas}/{SCHEMA_TEMPLATE}"]


K8S_BUILDS = ("kubernetes", "etcd", "kubeconform", "operator", "kubernetes-schemas", "crd-schemas")


def k8s_tools(log: Callable[[str], None] | None = None, build_missing: bool = True) -> K8sTools:
    """Every part the Kubernetes tests run (not kind: only the docker tier needs it), built where missing."""
    get = (lambda name: binaries(name, log=log)) if build_missing else paths
    parts = {name: get(name) for name in K8S_BUILDS}
    (kube_apiserver, kubectl), (etcd,), (kubeconform,) = parts["kubernetes"], parts["etcd"], parts["kubeconform"]
    operator, crds, webhooks = parts["operator"]
    return K8sTools(kube_apiserver, kubectl, etcd, kubeconform, operator, crds, webhooks,
                    parts["kubernetes-schemas"][0], parts["crd-schemas"][0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = argv or [name for name, row in BUILDS.items() if row.make_test]
    unknown = [name for name in names if name not in BUILDS]
    if unknown or any(name.startswith("-") for name in names):
        print(f"usage: python -m tooling.builds [name...]; names: {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        for name in names:
            for path in binaries(name, log=log):
                print(path)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0
