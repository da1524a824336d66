"""The naming layer of saturation (prometheus/rules/dice-saturation.yaml): promtool's unit test of the three
origins (Docker, Kubernetes, native) and the host, each origin's selector broken once to show its case is
what catches it, and the ties between the rules, the scrape jobs that feed them and the native cgroup path."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tooling.builds import binaries
from tooling.config import REPO_ROOT
from tooling.native.container import NATIVE_CGROUP_PREFIX

RULES = REPO_ROOT / "prometheus" / "rules" / "dice-saturation.yaml"
RULES_TEST = REPO_ROOT / "tests" / "data" / "dice-saturation.test.yaml"
CONFIG = REPO_ROOT / "prometheus" / "prometheus-config.yaml"
# The contract between the issue-19 helpers (rules, alerts, dashboards): these names and nothing else.
CONTRACT = {
    "dice:container_cpu_usage:cores_rate1m", "dice:container_cpu_limit:cores",
    "dice:container_cpu_throttled_periods:ratio_rate1m", "dice:container_memory_working_set:bytes",
    "dice:container_memory_limit:bytes", "dice:container_oom_events:increase5m",
    "dice:container_restarts:increase1h", "dice:process_open_fds", "dice:node_cpu_busy:ratio_rate1m",
    "dice:node_memory_available:ratio", "dice:node_filesystem_free:ratio", "dice:node_network_receive:bytes_rate1m",
    "dice:node_network_transmit:bytes_rate1m",
}


def rules() -> list[dict]:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    return group["rules"]


def kept_metrics(job: str) -> re.Pattern:
    """The regex of the `keep` by __name__ in a scrape job's metric relabelling."""
    (job_config,) = [j for j in yaml.safe_load(CONFIG.read_text())["scrape_configs"] if j["job_name"] == job]
    (keep,) = [r for r in job_config["metric_relabel_configs"] if r.get("action") == "keep"]
    assert keep["source_labels"] == ["__name__"]
    return re.compile(keep["regex"])


@pytest.fixture(scope="module")
def promtool():
    _, tool = binaries("prometheus")
    return lambda *args: subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.unit
def test_the_rules_are_the_contracts_names():
    assert {rule["record"] for rule in rules()} == CONTRACT


@pytest.mark.unit
def test_every_series_the_rules_read_is_kept_by_its_scrape_job():
    """The scrape jobs drop what no rule or alert reads: they must keep what these rules read."""
    read = {name for rule in rules() for name in re.findall(r"\b((?:container|node)_[a-z_A-Z]+)\{", rule["expr"])}
    assert {n for n in read if n.startswith("container_")} == {
        "container_cpu_usage_seconds_total", "container_spec_cpu_quota", "container_spec_cpu_period",
        "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_periods_total",
        "container_memory_working_set_bytes", "container_spec_memory_limit_bytes", "container_oom_events_total",
        "container_start_time_seconds", "container_file_descriptors"}
    for name in read:
        job = "cadvisor" if name.startswith("container_") else "node-exporter"
        assert kept_metrics(job).fullmatch(name), f"{name} is read by the rules but dropped by the {job} job"
    assert not kept_metrics("cadvisor").fullmatch("container_memory_usage_bytes")  # not read: dropped


@pytest.mark.unit
def test_the_native_origin_is_the_cgroup_path_the_native_stack_makes():
    """The rules' native selector matches ContainerCgroup's path shape, and only the service's own cgroup."""
    native = re.compile(r'id=~"(\.\*/dice-native-\[\^/\]\+/\[\^/\]\+)"')
    patterns = {m for rule in rules() for m in native.findall(rule["expr"])}
    assert patterns == {".*/dice-native-[^/]+/[^/]+"}, patterns
    assert NATIVE_CGROUP_PREFIX == "dice-native-"
    selector = re.compile(".*/dice-native-[^/]+/[^/]+")
    assert selector.fullmatch(f"/process_api/81d2/{NATIVE_CGROUP_PREFIX}4242-1/app")
    assert selector.fullmatch(f"/{NATIVE_CGROUP_PREFIX}4242-1/app")  # a session in the root cgroup
    for other in (f"/{NATIVE_CGROUP_PREFIX}4242-1", f"/a/{NATIVE_CGROUP_PREFIX}1-1/app/sub", "/a/dice-test-7", "/"):
        assert not selector.fullmatch(other), other


@pytest.mark.integration
def test_every_origin_gives_service_app(promtool):
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("origin, old, new", [
    ("docker", '"service", "$1", "container_label_com_docker_compose_service", "(.+)"',
     '"service", "$1", "container_label_com_docker_compose_project", "(.+)"'),
    ("kubernetes", 'pod=~"dice-api-.+", container="dice-api"}[1m]', 'pod=~"dice-api-.+"}[1m]'),
    ("native", '{id=~".*/dice-native-[^/]+/[^/]+"}', '{id=~".*/dice-native-.+"}'),
])
def test_each_origins_case_catches_a_broken_selector(promtool, tmp_path, origin, old, new):
    """Negative controls: the Docker service read from the wrong compose label, the Kubernetes selector that
    forgets the container (the pod's own cgroup and the init container count too), the native id that takes
    every cgroup of the stack's folder (the folder itself and the app's sub-cgroups). Each fails its origin's
    case with wrong values (not a load error), and only that one: the other cases pass with the same rules."""
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules.yaml").write_text(text.replace(old, new))
    spec = yaml.safe_load(RULES_TEST.read_text())
    cases = {case["name"]: case for case in spec["tests"]}
    assert origin in cases

    def run(selected: list[dict], name: str) -> subprocess.CompletedProcess:
        (tmp_path / name).write_text(yaml.safe_dump({**spec, "rule_files": [str(tmp_path / "rules.yaml")],
                                                     "tests": selected}))
        return promtool("test", "rules", str(tmp_path / name))

    broken = run([cases[origin]], "broken.yaml")
    failed = broken.stdout + broken.stderr
    assert broken.returncode != 0 and "FAILED:" in failed and "exp:" in failed and "got:" in failed, failed
    others = run([case for name, case in cases.items() if name != origin], "others.yaml")
    assert others.returncode == 0, others.stdout + others.stderr
