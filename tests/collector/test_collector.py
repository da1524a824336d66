"""The collector configs (compose's, and the layers the k8s Deployment adds), the builder manifest and the
image version agree, and the real collector (built from the manifest by tooling.builds, row `collector`) accepts the
configs as compose and the k8s Deployment pass them."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from tooling.builds import binary
from tooling.config import (
    COLLECTOR_CONFIG as CONFIG,
)
from tooling.config import (
    KINDS,
    MODULE_TYPES,
    REPO_ROOT,
    config_components,
    k8s_collector_configs,
    load_env_file,
    load_manifest,
    manifest_modules,
)
from tooling.k8s import render as k8s_render

ENV_FILE = REPO_ROOT / ".env"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


@pytest.fixture(scope="module")
def k8s_collectors() -> dict[str, list[tuple[str, str]]]:
    """The config layers of every collector container that `kubectl apply -k k8s/` runs, in --config order."""
    found = k8s_collector_configs(k8s_render.kustomize_build(k8s_render.K8S_DIR))
    assert found, "no container of k8s/ runs the collector image"
    return found


@pytest.fixture(scope="module")
def used_components(config, k8s_collectors) -> set[tuple[str, str]]:
    """(kind, type) of every component that the compose config or any k8s config layer names."""
    used = config_components(config)
    for layers in k8s_collectors.values():
        used |= config_components(*(yaml.safe_load(text) for _, text in layers))
    return used


@pytest.mark.unit
def test_manifest_version_matches_compose_image(manifest):
    assert ENV_FILE.exists(), f"{ENV_FILE} is missing: it pins OTEL_COLLECTOR_VERSION for the compose image"
    assert load_env_file(ENV_FILE).get("OTEL_COLLECTOR_VERSION") == manifest["dist"]["version"]


@pytest.mark.unit
def test_every_module_is_at_the_manifest_version(manifest):
    wanted = f"v{manifest['dist']['version']}"
    assert {version for _, _, version in manifest_modules(manifest)} == {wanted}


@pytest.mark.unit
def test_manifest_provides_exactly_the_components_the_configs_use(manifest, used_components):
    """Every component named in the compose config and the k8s layers is built, and nothing else (each module
    adds build time)."""
    unknown = [module for _, module, _ in manifest_modules(manifest) if module not in MODULE_TYPES]
    assert not unknown, f"add to tooling.config.MODULE_TYPES (see the binary's `components`): {unknown}"
    for kind, module, _ in manifest_modules(manifest):
        assert MODULE_TYPES[module][0] == kind, f"{module} is listed under {kind}"
    provided = {MODULE_TYPES[module] for _, module, _ in manifest_modules(manifest)}
    missing, unused = sorted(used_components - provided), sorted(provided - used_components)
    assert not missing, f"used in a collector config but not built by otel-collector/builder-config.yaml: {missing}"
    assert not unused, f"built by otel-collector/builder-config.yaml but used by no collector config: {unused}"


@pytest.mark.unit
def test_every_defined_component_is_used(config):
    """A component defined but in no pipeline is silently ignored by the collector."""
    service = config["service"]
    used = set(service.get("extensions") or [])
    for pipeline in service["pipelines"].values():
        for role in ("receivers", "processors", "exporters"):
            used.update(pipeline.get(role) or [])
    defined = {cid for kind in KINDS for cid in (config.get(kind) or {})}
    assert defined == used


@pytest.fixture(scope="session")
def otelcol() -> Path:
    # Builds on first use (minutes when Go's caches are cold), then reuses .cache/otelcol/.
    return binary("collector")


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_binary_contains_exactly_the_manifest_components(otelcol, manifest, used_components):
    shown = yaml.safe_load(run(otelcol, "components").stdout)
    assert shown["buildinfo"]["version"] == manifest["dist"]["version"]
    in_binary = {(kind, c["name"]) for kind in KINDS for c in shown.get(kind) or []}
    modules = {(kind, c["module"]) for kind in KINDS for c in shown.get(kind) or []}
    assert modules == {(kind, f"{module} {version}") for kind, module, version in manifest_modules(manifest)}
    # The table used by the unit tests says what the binary says.
    by_module = {c["module"].split()[0]: (kind, c["name"]) for kind in KINDS for c in shown.get(kind) or []}
    assert by_module == MODULE_TYPES
    assert in_binary == used_components


@pytest.mark.integration
def test_validate_accepts_the_config(otelcol):
    result = run(otelcol, "validate", "--config", str(CONFIG))
    assert result.returncode == 0, result.stderr


def k8s_layers(tmp_path: Path, where: str, layers: list[tuple[str, str]]) -> list[str]:
    """The layers written out under their ConfigMap keys, as `--config` arguments in the Deployment's order."""
    folder = tmp_path / where.replace("/", "_")
    folder.mkdir()
    args = []
    for key, text in layers:
        (folder / key).write_text(text)
        args += ["--config", str(folder / key)]
    return args


@pytest.mark.integration
def test_validate_accepts_every_k8s_collector_config(otelcol, k8s_collectors, tmp_path):
    """What the k8s Deployment runs: compose's config and the k8s_attributes layer, merged by the collector
    itself. `validate` unmarshals every component's config, runs its own checks (k8s_attributes checks its
    auth type, metadata fields and pod association) and builds the pipelines; it starts no component, so
    k8s_attributes does not contact the Kubernetes API here (its client is made in Start)."""
    for where, layers in k8s_collectors.items():
        assert len(layers) >= 2, f"{where}: expected compose's config plus the k8s layer, got {[k for k, _ in layers]}"
        result = run(otelcol, "validate", *k8s_layers(tmp_path, where, layers))
        assert result.returncode == 0, f"{where}: {result.stderr}"


K8S_BREAKAGES = {
    # k8s_attributes' own validation: a metadata field it cannot extract
    "unsupported-metadata": (
        lambda c: c["processors"]["k8s_attributes"]["extract"]["metadata"].append("k8s.pod.nonsense"),
        '"k8s.pod.nonsense" is not a supported metadata field',
    ),
    # the processor under a type name that no module provides
    "renamed-processor": (lambda c: rename_processor(c, "k8s_attributes", "k8s_attributez"),
                          'unknown type: "k8s_attributez"'),
}


def rename_processor(config: dict, old: str, new: str) -> None:
    config["processors"][new] = config["processors"].pop(old)
    for pipeline in config["service"]["pipelines"].values():
        pipeline["processors"] = [new if name == old else name for name in pipeline["processors"]]


@pytest.mark.integration
@pytest.mark.parametrize("breakage", K8S_BREAKAGES)
def test_validate_rejects_a_broken_k8s_layer(otelcol, k8s_collectors, tmp_path, breakage):
    """Negative control: the k8s layer is read and checked, and fails for the reason we broke it."""
    mutate, message = K8S_BREAKAGES[breakage]
    where, layers = next(iter(k8s_collectors.items()))
    key, text = layers[-1]
    broken = yaml.safe_load(text)
    mutate(broken)
    result = run(otelcol, "validate", *k8s_layers(tmp_path, where, [*layers[:-1], (key, yaml.safe_dump(broken))]))
    assert result.returncode != 0, f"validate accepted a k8s layer with {breakage}"
    assert message in result.stderr


BREAKAGES = {
    # a misspelt option
    "unknown-key": (
        lambda c: c["connectors"]["span_metrics"].update({"exemplar": {"enabled": True}}),
        "invalid keys: exemplar",
    ),
    # a component type that is not built in
    "type-not-built-in": (lambda c: c["exporters"].update({"debug": {}}), 'unknown type: "debug"'),
    # a pipeline naming a component that is not defined
    "undefined-in-pipeline": (
        lambda c: c["service"]["pipelines"]["traces"]["exporters"].append("otlp_grpc/x"),
        'references exporter "otlp_grpc/x" which is not configured',
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_validate_rejects_a_broken_config(otelcol, config, tmp_path, breakage):
    """Negative control: validate really checks, and fails for the reason we broke it."""
    mutate, message = BREAKAGES[breakage]
    broken = yaml.safe_load(yaml.safe_dump(config))
    mutate(broken)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = run(otelcol, "validate", "--config", str(path))
    assert result.returncode != 0, f"validate accepted a config with {breakage}"
    assert message in result.stderr


@pytest.mark.integration
def test_endpoints_can_be_moved_by_an_overlay(otelcol, tmp_path):
    """The native stack runs the real config plus a second --config that only changes addresses."""
    from tooling.native.stack import StackPorts, collector_overlay

    stack_ports = StackPorts.free()
    ports = {"health": stack_ports.collector_health, "grpc": stack_ports.otlp_grpc, "http": stack_ports.otlp_http,
             "prom": stack_ports.collector_metrics, "self": stack_ports.collector_telemetry}
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(collector_overlay(stack_ports)))

    log = tmp_path / "otelcol.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(otelcol), "--config", str(CONFIG), "--config", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{ports['health']}/", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, f"collector exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "health_check never answered on the overlay's address"
            time.sleep(0.2)
        own = requests.get(f"http://127.0.0.1:{ports['self']}/metrics", timeout=2)
        assert "otelcol_process_uptime" in own.text
        exporter = requests.get(f"http://127.0.0.1:{ports['prom']}/metrics", timeout=2)
        assert exporter.status_code == 200
        for port in (ports["grpc"], ports["http"]):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)

