"""The stack's own config files, read and generated the way their tools do.

- `.env` (image versions, compose settings) and `app/app.env` (the app's zero-code settings), read as docker
  compose reads them; neither uses quotes or interpolation, so a line is exactly KEY=VALUE. `interpolate()`
  and `variables()` are Compose's interpolation of docker-compose.yml with them, one copy for the tests and
  the Kubernetes renderer.
- The collector's configs: which components a config (merged from --config layers) names, and which config
  layers each collector container of the rendered k8s objects runs; the builder manifest that compiles those
  components (tooling/builds, row `collector`).
- The SLO rules: `prometheus/slo/dice-slos.yaml` is a Sloth spec; `prometheus/rules/dice-slo.yaml` is what
  Sloth generates from it, committed so that Prometheus and promtool need no Sloth.
  ``python -m tooling.config slo`` regenerates it (Sloth built from its Go module on first use);
  tests/prometheus/test_slo.py fails when the committed file drifts from the spec.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DOTENV = REPO_ROOT / ".env"
APP_ENV = REPO_ROOT / "app" / "app.env"


def load_env_file(path: Path = DOTENV) -> dict[str, str]:
    values = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key] = value
    return values


# Compose interpolation: $$ is a literal $, otherwise $VAR or ${VAR[:-|-|:?|?|:+|+]word}.
_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def variables(text: str) -> set[str]:
    """Names of the variables a Compose file interpolates."""
    return {m["braced"] or m["bare"] for m in _VAR.finditer(text) if m.group(0) != "$$"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of `text` with `env` (unset and empty differ as in Compose)."""

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"]
        value = env.get(name)
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            set_ = value is not None and (op == "+" or value != "")
            return arg if set_ else ""
        return value or ""

    return _VAR.sub(substitute, text)


# --- the collector's configs --------------------------------------------------------------------------------

COLLECTOR_MANIFEST = REPO_ROOT / "otel-collector" / "builder-config.yaml"
COLLECTOR_CONFIG = REPO_ROOT / "otel-collector" / "otel-collector-config.yaml"

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")

# Component type each manifest module provides at v0.158 (types were renamed, e.g. otlp -> otlp_grpc, so
# the type cannot be derived from the module path). tests/collector/test_collector.py checks this table against the
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


def load_manifest(manifest: Path = COLLECTOR_MANIFEST) -> dict:
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


# --- the SLO rules --------------------------------------------------------------------------------

SPEC = REPO_ROOT / "prometheus" / "slo" / "dice-slos.yaml"
GENERATED = REPO_ROOT / "prometheus" / "rules" / "dice-slo.yaml"
# The SLO period, named rather than left to Sloth's default. Its alert windows are Sloth's built-in ones
# for 30 days (14.4x 1h/5m and 6x 6h/30m page, 3x 1d/2h and 1x 3d/6h ticket), which
# tests/prometheus/test_slo.py checks in the generated rules.
SLO_PERIOD = "30d"
HEADER = """\
# GENERATED FILE, do not edit: Sloth {version} made it from prometheus/slo/dice-slos.yaml, the SLO spec.
# Edit the spec, then regenerate with
#   python -m tooling.config slo
# (builds Sloth from its Go module into .cache/sloth/ on first use). tests/prometheus/test_slo.py fails when
# this file differs from what Sloth generates from the spec.
"""


class SloGenerationError(RuntimeError):
    """Sloth refused the spec."""


def generate(spec: Path = SPEC, sloth: Path | None = None, period: str = SLO_PERIOD,
             windows_dir: Path | None = None, extra_labels: dict[str, str] | None = None) -> str:
    """The rules file Sloth generates from `spec`, with this repo's header in front of Sloth's own.

    `period` other than Sloth's built-in 30d needs `windows_dir`, a directory of AlertWindows specs
    (tooling/native/drills.py makes time-compressed ones for tests); `extra_labels` go on every rule."""
    from tooling.builds import binary
    from tooling.builds.recipes import SLOTH_VERSION

    sloth = sloth or binary("sloth")
    args = [str(sloth), "generate", f"--input={spec}", "--out=-", f"--default-slo-period={period}"]
    if windows_dir is not None:
        args.append(f"--slo-period-windows-path={windows_dir}")
    args += [f"--extra-labels={key}={value}" for key, value in (extra_labels or {}).items()]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SloGenerationError(f"sloth generate -i {spec} failed (exit {result.returncode}):\n"
                                 f"{result.stderr[-3000:]}")
    # Sloth starts its output with a YAML document marker; one document needs none.
    rules = result.stdout.removeprefix("\n").removeprefix("---\n")
    return HEADER.format(version=SLOTH_VERSION) + rules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["slo"]:
        print("usage: python -m tooling.config slo   (regenerates prometheus/rules/dice-slo.yaml from the spec)",
              file=sys.stderr)
        return 2
    GENERATED.write_text(generate())
    print(f"wrote {GENERATED.relative_to(REPO_ROOT)} from {SPEC.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
