"""The collector config, its builder manifest and the compose image version agree, and the real
collector (built from the manifest by tooling.collector) accepts the config."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from tooling.collector import CONFIG, REPO_ROOT, collector_binary, load_manifest
from tooling.envfile import load_env_file

ENV_FILE = REPO_ROOT / ".env"
KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")

# Component type each manifest module provides at v0.158 (types were renamed, e.g. otlp -> otlp_grpc,
# so the type cannot be derived from the module path). The integration test checks this table
# against the built binary's `components` output.
MODULE_TYPES = {
    "go.opentelemetry.io/collector/receiver/otlpreceiver": ("receivers", "otlp"),
    "go.opentelemetry.io/collector/processor/memorylimiterprocessor": ("processors", "memory_limiter"),
    "go.opentelemetry.io/collector/processor/batchprocessor": ("processors", "batch"),
    "github.com/open-telemetry/opentelemetry-collector-contrib/processor/transformprocessor": (
        "processors",
        "transform",
    ),
    "go.opentelemetry.io/collector/exporter/otlpexporter": ("exporters", "otlp_grpc"),
    "go.opentelemetry.io/collector/exporter/otlphttpexporter": ("exporters", "otlp_http"),
    "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/prometheusexporter": (
        "exporters",
        "prometheus",
    ),
    "github.com/open-telemetry/opentelemetry-collector-contrib/connector/spanmetricsconnector": (
        "connectors",
        "span_metrics",
    ),
    "github.com/open-telemetry/opentelemetry-collector-contrib/connector/servicegraphconnector": (
        "connectors",
        "service_graph",
    ),
    "github.com/open-telemetry/opentelemetry-collector-contrib/extension/healthcheckextension": (
        "extensions",
        "health_check",
    ),
}


def manifest_modules(manifest: dict) -> list[tuple[str, str, str]]:
    """(kind, module path, version) for every gomod entry of a builder manifest."""
    entries = []
    for kind in KINDS:
        for item in manifest.get(kind) or []:
            module, version = item["gomod"].split()
            entries.append((kind, module, version))
    return entries


def config_components(config: dict) -> set[tuple[str, str]]:
    """(kind, type) of every component the config defines; ids are `type` or `type/name`."""
    return {(kind, cid.split("/", 1)[0]) for kind in KINDS for cid in (config.get(kind) or {})}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


@pytest.mark.unit
def test_manifest_version_matches_compose_image(manifest):
    assert ENV_FILE.exists(), f"{ENV_FILE} is missing: it pins OTEL_COLLECTOR_VERSION for the compose image"
    assert load_env_file(ENV_FILE).get("OTEL_COLLECTOR_VERSION") == manifest["dist"]["version"]


@pytest.mark.unit
def test_every_module_is_at_the_manifest_version(manifest):
    wanted = f"v{manifest['dist']['version']}"
    assert {version for _, _, version in manifest_modules(manifest)} == {wanted}


@pytest.mark.unit
def test_manifest_provides_exactly_the_components_the_config_uses(manifest, config):
    unknown = [module for _, module, _ in manifest_modules(manifest) if module not in MODULE_TYPES]
    assert not unknown, f"add these modules to MODULE_TYPES (see the binary's `components`): {unknown}"
    for kind, module, _ in manifest_modules(manifest):
        assert MODULE_TYPES[module][0] == kind, f"{module} is listed under {kind}"
    provided = {MODULE_TYPES[module] for _, module, _ in manifest_modules(manifest)}
    assert config_components(config) == provided


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
    return collector_binary()


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_binary_contains_exactly_the_manifest_components(otelcol, manifest, config):
    shown = yaml.safe_load(run(otelcol, "components").stdout)
    assert shown["buildinfo"]["version"] == manifest["dist"]["version"]
    in_binary = {(kind, c["name"]) for kind in KINDS for c in shown.get(kind) or []}
    modules = {(kind, c["module"]) for kind in KINDS for c in shown.get(kind) or []}
    assert modules == {(kind, f"{module} {version}") for kind, module, version in manifest_modules(manifest)}
    # The table used by the unit tests says what the binary says.
    by_module = {c["module"].split()[0]: (kind, c["name"]) for kind in KINDS for c in shown.get(kind) or []}
    assert by_module == MODULE_TYPES
    assert in_binary == config_components(config)


@pytest.mark.integration
def test_validate_accepts_the_config(otelcol):
    result = run(otelcol, "validate", "--config", str(CONFIG))
    assert result.returncode == 0, result.stderr


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
    from tooling.native import StackPorts, collector_overlay

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


@pytest.mark.unit
def test_build_names_go_when_it_is_missing(monkeypatch):
    """Without Go the build must say what is missing instead of failing obscurely."""
    from tooling import collector

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(collector.CollectorBuildError, match="Go"):
        collector._go()
