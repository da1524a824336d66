"""A real OpenTelemetry Collector without Docker, built from the project's own manifest.

The compose stack runs the official contrib image. Where no Docker engine exists (tests, CI, the
native stack), the same components at the same version are compiled with the official
OpenTelemetry Collector Builder from ``otel-collector/builder-config.yaml``. The binary is cached
under ``.cache/otelcol/<version>-<manifest hash>/`` so any edit of the manifest gets a fresh build in a
new folder (the binary of the previous manifest stays where it is, for whoever is still running it), and
an unchanged manifest costs nothing after the first build (several minutes on 2 cores). Processes that
need the same missing binary at once wait for one build instead of each compiling it.

``python -m tooling.collector`` prints the path of the binary, building it if needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import yaml

from tooling.gobuild import BUILD_ENV, cached_or_built, go_executable, publish, run_logged, work_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "otel-collector" / "builder-config.yaml"
CONFIG = REPO_ROOT / "otel-collector" / "otel-collector-config.yaml"
CACHE_DIR = REPO_ROOT / ".cache" / "otelcol"

BUILDER_MODULE = "go.opentelemetry.io/collector/cmd/builder"
KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")

# Component type each manifest module provides at v0.158 (types were renamed, e.g. otlp -> otlp_grpc, so
# the type cannot be derived from the module path). tests/test_collector.py checks this table against the
# built binary's `components` output.
CORE, CONTRIB = "go.opentelemetry.io/collector", "github.com/open-telemetry/opentelemetry-collector-contrib"
MODULE_TYPES = {
    f"{CORE}/receiver/otlpreceiver": ("receivers", "otlp"),
    f"{CORE}/processor/memorylimiterprocessor": ("processors", "memory_limiter"),
    f"{CORE}/processor/batchprocessor": ("processors", "batch"),
    f"{CONTRIB}/processor/transformprocessor": ("processors", "transform"),
    f"{CONTRIB}/processor/k8sattributesprocessor": ("processors", "k8s_attributes"),
    f"{CORE}/exporter/otlpexporter": ("exporters", "otlp_grpc"),
    f"{CORE}/exporter/otlphttpexporter": ("exporters", "otlp_http"),
    f"{CONTRIB}/exporter/prometheusexporter": ("exporters", "prometheus"),
    f"{CONTRIB}/connector/spanmetricsconnector": ("connectors", "span_metrics"),
    f"{CONTRIB}/connector/servicegraphconnector": ("connectors", "service_graph"),
    f"{CONTRIB}/extension/healthcheckextension": ("extensions", "health_check"),
}


def image_name(compose_file: Path = REPO_ROOT / "docker-compose.yml") -> str:
    """The image (without its tag) that runs the collector in compose, and so in k8s/: the manifest builds
    what its configs use."""
    return yaml.safe_load(compose_file.read_text())["services"]["otel-collector"]["image"].split(":", 1)[0]


class CollectorBuildError(RuntimeError):
    """The collector could not be built from the manifest."""


def load_manifest(manifest: Path = MANIFEST) -> dict:
    return yaml.safe_load(manifest.read_text())


def manifest_modules(manifest: dict) -> list[tuple[str, str, str]]:
    """(kind, module path, version) for every gomod entry of a builder manifest."""
    entries = []
    for kind in KINDS:
        for item in manifest.get(kind) or []:
            module, version = item["gomod"].split()
            entries.append((kind, module, version))
    return entries


def config_components(*layers: dict) -> set[tuple[str, str]]:
    """(kind, type) of every component a config names, given as the layers (--config files) it is merged
    from: those the layers define and those their services refer to. Ids are `type` or `type/name`."""
    defined = {(kind, cid) for layer in layers for kind in KINDS for cid in (layer.get(kind) or {})}
    named = set(defined)
    for layer in layers:
        service = layer.get("service") or {}
        named |= {("extensions", cid) for cid in service.get("extensions") or []}
        for pipeline in (service.get("pipelines") or {}).values():
            for role in ("receivers", "processors", "exporters"):
                # A connector is listed as an exporter of one pipeline and a receiver of another, and may be
                # defined in another layer than the one that lists it.
                for cid in pipeline.get(role) or []:
                    kinds = [kind for kind, defined_id in defined if defined_id == cid] or [role]
                    named.add((kinds[0], cid))
    return {(kind, cid.split("/", 1)[0]) for kind, cid in named}


def k8s_collector_configs(objects: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """The config layers each collector container of rendered k8s objects runs, in the order of its
    `--config` arguments (later layers merge over earlier ones): {"Kind/name/container": [(file name,
    text)]}, the text read from the ConfigMap mounted where the argument points."""
    configmaps = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("data", {})
                  for o in objects if o["kind"] == "ConfigMap"}
    image, found = image_name(), {}
    for workload in objects:
        if workload["kind"] not in {"Deployment", "StatefulSet", "DaemonSet"}:
            continue
        pod = workload["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            if container["image"].split("@")[0].rsplit(":", 1)[0] != image:
                continue
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            args = list(container.get("command", [])[1:]) + list(container.get("args", []))
            paths = [arg.removeprefix("--config=") for arg in args if arg.startswith("--config=")]
            if not paths or len(paths) != sum(arg.startswith("--config") for arg in args):
                raise ValueError(f"{where}: give every config as --config=<file in a mounted ConfigMap>: {args}")
            layers = []
            for path in paths:
                name, key = _mounted_key(container, path)
                volume = volumes.get(name, {})
                data = configmaps.get((workload["metadata"].get("namespace"), volume["configMap"]["name"]), {}) \
                    if "configMap" in volume else {}
                if key not in data:
                    raise ValueError(f"{where}: --config={path} is not a key of a ConfigMap mounted there")
                layers.append((key, data[key]))
            found[where] = layers
    return found


def _mounted_key(container: dict, path: str) -> tuple[str | None, str | None]:
    """(volume name, key) of the volume mount that holds `path` in the container."""
    for mount in container.get("volumeMounts", []):
        if "subPath" in mount:
            if mount["mountPath"] == path:
                return mount["name"], mount["subPath"]
        elif path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return mount["name"], path[len(mount["mountPath"].rstrip("/")) + 1:]
    return None, None


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
    """Path of the collector built from ``manifest``; builds it first if it is not cached (callers that
    miss it at the same time wait for one build: gobuild.cached_or_built)."""
    (target,) = cached_or_built([binary_path(manifest)], lambda: [build(manifest)])
    return target


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
