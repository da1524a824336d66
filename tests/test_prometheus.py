"""Prometheus config and recording rules, checked by the real promtool (Debian's 2.42; the compose
image is 3.x, so the files use only what both accept)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = REPO_ROOT / "prometheus"
CONFIG = PROM_DIR / "prometheus-config.yaml"
RULES = sorted((PROM_DIR / "rules").glob("*.yaml"))
RULES_TEST = REPO_ROOT / "tests" / "data" / "prometheus-rules.test.yaml"

# Which scrape job is which source; the label is what dashboards and rules select on.
SOURCES = {"app": "manual", "beyla": "ebpf", "otel-collector": "otel"}

pytestmark = pytest.mark.unit


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (see README 'Test it')")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}


def test_rule_files_exist():
    assert RULES, "prometheus/rules/ holds no *.yaml rule file"


def test_check_config_accepts_the_config():
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks the rule files the config loads; make sure it found ours.
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout


def test_check_config_rejects_a_broken_config(tmp_path):
    broken = tmp_path / "prometheus.yaml"
    broken.write_text(CONFIG.read_text().replace("scrape_interval:", "scrape_intervall:", 1))
    result = promtool("check", "config", str(broken))
    assert result.returncode != 0
    assert "scrape_intervall" in result.stdout + result.stderr


def test_check_rules_accepts_the_rules():
    result = promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_rules_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES[0].read_text().replace("sum by (", "sum by ((", 1))
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0


def test_recording_rules_give_the_expected_values():
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_test_catches_a_wrong_rule(tmp_path):
    """Negative control: the same test against rules that forget one source's label must fail."""
    rules = (PROM_DIR / "rules" / "dice-red.yaml").read_text()
    mutated = rules.replace('{telemetry_source=~"otel|ebpf"}', '{telemetry_source="otel"}')
    assert mutated != rules
    (tmp_path / "rules.yaml").write_text(mutated)
    spec = yaml.safe_load(RULES_TEST.read_text())
    spec["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec))
    result = promtool("test", "rules", str(tmp_path / "test.yaml"))
    assert result.returncode != 0
    # A failed expectation, not a file that promtool could not load.
    assert "FAILED:" in result.stderr and "round(dice:http_requests:rate1m" in result.stderr


def test_each_source_is_labelled_by_relabelling():
    found = jobs()
    for job, source in SOURCES.items():
        relabel = found[job].get("relabel_configs") or []
        set_labels = [r for r in relabel if r.get("target_label") == "telemetry_source"]
        assert len(set_labels) == 1, f"job {job} must set telemetry_source once"
        rule = set_labels[0]
        # Without source_labels the default regex matches the empty string, so the label is always set.
        assert rule.get("action", "replace") == "replace" and not rule.get("source_labels")
        assert rule["replacement"] == source


def test_only_the_three_sources_carry_telemetry_source():
    others = {name: job for name, job in jobs().items() if name not in SOURCES}
    assert others, "expected the prometheus and collector-internal jobs"
    for name, job in others.items():
        assert "telemetry_source" not in yaml.safe_dump(job), name


def test_collector_job_keeps_the_exporters_job_and_instance():
    # job/instance come from service.name/service.instance.id; without honor_labels Prometheus would
    # rename them to exported_job/exported_instance and dashboards would lose the service.
    assert jobs()["otel-collector"].get("honor_labels") is True
