"""docker-compose.yml and .env, checked without a Docker engine.

The Compose Specification's JSON schema (vendored by check-jsonschema) validates the structure; the
rest are the rules of this stack: versions from .env, no `latest`, only the edge's ports bound to
BIND_ADDRESS (every other port on loopback), a memory limit and a healthcheck (or a stated reason and
a stand-in) for every service, and `depends_on` conditions that make `docker compose up -d --wait` mean
"ready". Restart policies and the values Compose fills in from .env are checked on Compose's own reading
(test_compose_loader.py).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from stackfiles import (
    COMPOSE_FILE,
    DOTENV_FILE,
    REPO_ROOT,
    SERVICES,
    bind_mounts,
    compose,
    compose_text,
    dotenv,
    host_mounts,
    named_volumes,
    raw_compose,
)

from tooling.config import variables
from tooling.native.container import HealthcheckError, parse_healthcheck

pytestmark = pytest.mark.unit

# Services whose image cannot run a healthcheck, and what checks them instead.
NO_HEALTHCHECK = {
    # FROM scratch: no shell, no HTTP client. The probe service polls its health_check extension.
    "otel-collector": "http://otel-collector:13133/",
    # distroless (cmd/tempo/Dockerfile of its version, cited in docker-compose.yml): no shell, no HTTP
    # client. The probe service polls its readiness endpoint.
    "tempo": "http://tempo:3200/ready",
    # FROM scratch, and must not be stood in for: where eBPF cannot run it exits, visibly.
    "beyla": None,
}

# .env settings that docker-compose.yml does not read: the Kubernetes path's, in the block of .env after
# KUBERNETES_BLOCK, each with the file(s) that read it (a test keeps both true, so the list cannot go stale).
KUBERNETES_BLOCK = "# The Kubernetes path ("
KIND_TIER = "tests/e2e/test_kind.py"
KUBERNETES_SETTINGS = {
    # built and run by tests/k8s/test_k8s.py, installed by users and by the kind tier
    "OTEL_OPERATOR_VERSION": {"tooling/builds/recipes.py", "README.md", KIND_TIER},
    "CERT_MANAGER_VERSION": {"README.md", KIND_TIER},  # installed before the Operator
    "KIND_VERSION": {"tooling/builds/recipes.py"},  # kind_binary(), which the kind tier runs
    "KIND_NODE_IMAGE": {"tooling/builds/recipes.py"},  # kind_node_image(), which the kind tier runs its nodes from
    # a build argument, also of docker-compose.own-app.yml's instrumentation service (not docker-compose.yml's)
    "BUSYBOX_VERSION": {"instrumentation/Dockerfile", "docker-compose.own-app.yml", "README.md", KIND_TIER},
}

# Where each backend keeps its data (the images' data directories).
DATA_DIRS = {"prometheus": "/prometheus", "alertmanager": "/alertmanager", "tempo": "/var/tempo", "pyroscope": "/data",
             "loki": "/loki", "grafana": "/var/lib/grafana"}


def check_jsonschema(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def dockerfile_has_healthcheck(service: dict) -> bool:
    # Read as Docker reads it (the final stage's last HEALTHCHECK), by the parser the native stack uses.
    build = service.get("build")
    if not build:
        return False
    try:
        parse_healthcheck(REPO_ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    except HealthcheckError:
        return False
    return True


def has_healthcheck(service: dict) -> bool:
    check = service.get("healthcheck")
    if check:
        return not check.get("disable", False) and check.get("test") not in (["NONE"], "NONE")
    return dockerfile_has_healthcheck(service)


@pytest.fixture(scope="module")
def services() -> dict:
    return compose()["services"]


def test_compose_file_matches_the_compose_specification_schema():
    result = check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(compose_text().replace("mem_limit:", "mem_limt:", 1))
    result = check_jsonschema(broken)
    assert result.returncode != 0
    assert "mem_limt" in result.stdout + result.stderr


def test_the_stack_has_exactly_its_services(services):
    assert set(services) == SERVICES


def test_every_variable_is_defined_in_dotenv():
    used = variables(compose_text())
    defined = set(dotenv())
    assert used <= defined, f"used in docker-compose.yml but not defined in .env: {sorted(used - defined)}"


# Read by the native tier's build before the service that runs its image is in docker-compose.yml (setting ->
# the file that reads it). The entry must go once compose reads it; none today (the edge's caddy was one).
AHEAD_OF_COMPOSE: dict[str, str] = {}


# The second compose file, for an app of the user's own (README, "Observe your own service"): it reads .env's
# OWN_APP_* block, which docker-compose.yml does not (tests/compose/test_own_app.py checks that block).
OWN_APP_FILE = REPO_ROOT / "docker-compose.own-app.yml"


def test_every_dotenv_setting_is_used():
    read = variables(compose_text()) | variables(OWN_APP_FILE.read_text())
    unused = set(dotenv()) - read - set(KUBERNETES_SETTINGS) - set(AHEAD_OF_COMPOSE)
    assert not unused, f".env settings that docker-compose.yml never reads: {sorted(unused)}"
    for key, reader in AHEAD_OF_COMPOSE.items():
        assert key not in variables(compose_text()), f"compose reads {key} now: drop its AHEAD_OF_COMPOSE entry"
        assert key in (REPO_ROOT / reader).read_text(), f"{reader} does not read {key}"


def test_the_settings_compose_does_not_read_are_the_kubernetes_block_and_read_where_stated():
    _, header, block = DOTENV_FILE.read_text().partition(KUBERNETES_BLOCK)
    assert header, f".env has no block headed {KUBERNETES_BLOCK!r}"
    in_block = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", block, re.M))
    assert in_block == set(KUBERNETES_SETTINGS), "the Kubernetes block of .env (its last) holds exactly these"
    assert not set(KUBERNETES_SETTINGS) & variables(compose_text()), "compose reads it: no exemption needed"
    for key, files in KUBERNETES_SETTINGS.items():
        for name in files:
            text = (REPO_ROOT / name).read_text()
            # In Python, a read is the name as a string (env["KEY"], dotenv_release("KEY")), not a mention
            # in a docstring or comment; elsewhere ${KEY} or ARG KEY.
            word = rf'["\']{key}["\']' if name.endswith(".py") else rf"(?<![A-Za-z0-9_]){key}(?![A-Za-z0-9_])"
            assert re.search(word, text), f"{name} does not read {key}"


def test_no_password_is_committed():
    assert dotenv()["GRAFANA_ADMIN_PASSWORD"] == ""
    for name, service in raw_compose()["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items() if isinstance(environment, dict) else ():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+(:-)?\}", str(value)), f"{name}: {key} has a literal value"


def test_every_image_is_pinned_to_a_version_from_dotenv(services):
    raw = raw_compose()["services"]
    versions = {key: value for key, value in dotenv().items() if key.endswith("_VERSION")}
    for name, service in services.items():
        if "build" in service:
            # Built here; its base image version is a build argument from .env.
            for arg in (raw[name]["build"].get("args") or {}).values():
                assert variables(str(arg)) <= set(versions), f"{name}: build arg {arg} not from .env"
            assert not service["image"].endswith(":latest")
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"
        written = raw[name]["image"]
        assert variables(written) & set(versions), f"{name}: the tag of {written} must come from a *_VERSION in .env"


def test_no_latest_anywhere():
    assert not re.search(r":latest\b", compose_text())
    assert not any(value == "latest" for value in dotenv().values())


# The one service whose published ports follow BIND_ADDRESS: users reach the app and Grafana through it.
EDGE = "edge"


def host_ips(services: dict) -> dict[str, set[str]]:
    return {name: {port.rsplit(":", 2)[0] for port in service.get("ports", [])} for name, service in services.items()}


def test_only_the_edge_follows_the_bind_address(services):
    # As written: the edge's ports on ${BIND_ADDRESS:-127.0.0.1}, every other one on 127.0.0.1 itself, so that
    # leaving loopback exposes the edge and nothing behind it (Prometheus, Tempo, Loki, Pyroscope, locust...).
    for name, service in raw_compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short syntax HOST_IP:HOST:CONTAINER ({port!r})"
            bound = "${BIND_ADDRESS:-127.0.0.1}:" if name == EDGE else "127.0.0.1:"
            assert port.startswith(bound), f"{name}: {port} is not bound to {bound.rstrip(':')}"
    assert raw_compose()["services"][EDGE].get("ports"), "the edge publishes nothing"
    # As Compose fills it in: with .env, with BIND_ADDRESS off loopback, and without it (loopback by default).
    env = dotenv()
    without = {key: value for key, value in env.items() if key != "BIND_ADDRESS"}
    for given, edge_ip in ((env, env["BIND_ADDRESS"]), ({**env, "BIND_ADDRESS": "0.0.0.0"}, "0.0.0.0"),
                           ({**env, "BIND_ADDRESS": "192.168.1.20"}, "192.168.1.20"), (without, "127.0.0.1")):
        found = host_ips(compose(given)["services"])
        assert found.pop(EDGE) == {edge_ip}, given.get("BIND_ADDRESS")
        assert all(ips <= {"127.0.0.1"} for ips in found.values()), (given.get("BIND_ADDRESS"), found)


def test_grafana_is_published_by_the_edge_alone(services):
    # Grafana's own container port is on the compose network only; its host port is the edge's listener.
    assert not services["grafana"].get("ports"), "grafana publishes a port of its own, past the edge"
    assert "3000" in [str(port) for port in services["grafana"]["expose"]]
    published = raw_compose()["services"][EDGE]["ports"]
    assert any("${GRAFANA_PORT:" in port for port in published), published


def test_every_service_has_a_memory_limit(services):
    for name, service in services.items():
        limit = service.get("mem_limit") or (
            service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
        )
        assert limit, f"{name} has no memory limit"
        assert re.fullmatch(r"\d+[kmg]", str(limit)), f"{name}: unexpected memory limit {limit!r}"


def test_every_service_has_a_healthcheck_or_a_stand_in(services):
    probe_test = " ".join(services["probe"]["healthcheck"]["test"])
    for name, service in services.items():
        if name in NO_HEALTHCHECK:
            assert not has_healthcheck(service), f"{name}: listed as unable to run a healthcheck, but has one"
            if NO_HEALTHCHECK[name]:
                assert NO_HEALTHCHECK[name] in probe_test, f"nothing checks {name} at {NO_HEALTHCHECK[name]}"
        else:
            assert has_healthcheck(service), f"{name} has no healthcheck"


def test_the_app_image_healthcheck_is_found():
    # The app's healthcheck lives in its Dockerfile; make sure the lookup above really reads it.
    app = raw_compose()["services"]["app"]
    assert dockerfile_has_healthcheck(app)
    assert not dockerfile_has_healthcheck({"build": {"context": ".", "dockerfile": "docker-compose.yml"}})


def test_depends_on_waits_for_health(services):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form with a condition"
        for target, spec in depends_on.items():
            condition = spec.get("condition")
            if has_healthcheck(services[target]):
                assert condition == "service_healthy", f"{name} -> {target}: wait for service_healthy"
            else:
                assert condition == "service_started", f"{name} -> {target}: {target} has no healthcheck"


def test_nothing_waits_for_beyla(services):
    # Where eBPF cannot run, Beyla exits; nothing else may depend on it.
    for name, service in services.items():
        assert "beyla" not in service.get("depends_on", {}), f"{name} depends on beyla"


def test_every_service_an_app_needs_is_waited_for(services):
    app_needs = set(services["app"]["depends_on"])
    assert {"probe", "pyroscope"} <= app_needs
    assert set(services["grafana"]["depends_on"]) >= {"prometheus", "pyroscope", "loki", "probe"}
    # The edge proxies to the app and sends its spans to the collector (probe); locust calls the app through
    # the edge and sends to the collector too. The edge does not wait for Grafana: the app's front door must
    # not depend on the dashboards (docker-compose.yml).
    assert set(services[EDGE]["depends_on"]) == {"app", "probe"}
    assert set(services["locust"]["depends_on"]) == {EDGE, "probe"}


def test_backends_keep_their_data_in_named_volumes(services):
    declared = set(raw_compose().get("volumes") or {})
    for name, directory in DATA_DIRS.items():
        volumes = dict((target, source) for source, target in named_volumes(services[name]))
        assert directory in volumes, f"{name}: no named volume at {directory}"
        assert volumes[directory] in declared, f"{name}: volume {volumes[directory]} is not declared"


def test_every_mounted_file_exists(services):
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert (REPO_ROOT / source).exists(), f"{name}: mounts {source}, which does not exist"
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            for path in [env_file.replace("${APP_PROFILE:?APP_PROFILE is set in .env}", profile)
                         for profile in ("full", "lean")]:
                assert (REPO_ROOT / path).is_file(), f"{name}: env_file {path} is missing"
        build = service.get("build")
        if build:
            assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file()


def test_config_paths_on_command_lines_are_mounted(services):
    for name, service in services.items():
        targets = [target for _, target in bind_mounts(service)]
        words = [*(service.get("entrypoint") or []), *(service.get("command") or [])]
        for word in words:
            for path in re.findall(r"(/(?:etc|mnt)/\S+)", str(word)):
                assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets), (
                    f"{name}: {path} is used on the command line but nothing is mounted there"
                )


def test_prometheus_runs_the_config_with_exemplar_storage_and_its_rules(services):
    prometheus = services["prometheus"]
    command = prometheus["command"]
    assert "--config.file=/etc/prometheus/prometheus-config.yaml" in command
    assert "--enable-feature=exemplar-storage" in command
    mounts = dict(bind_mounts(prometheus))
    assert mounts["./prometheus/prometheus-config.yaml"] == "/etc/prometheus/prometheus-config.yaml"
    # rule_files are relative to the config file's directory: they must resolve into the mounted rules.
    config = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus-config.yaml").read_text())
    for pattern in config.get("rule_files", []):
        resolved = pattern if pattern.startswith("/") else "/etc/prometheus/" + pattern
        directory = resolved.rsplit("/", 1)[0]
        assert mounts.get("./prometheus/rules") == directory, f"rule_files {pattern} is not the mounted rules dir"


def test_collector_runs_its_config(services):
    collector = services["otel-collector"]
    assert collector["command"] == ["--config=/etc/otelcol/otel-collector-config.yaml"]
    assert ("./otel-collector/otel-collector-config.yaml", "/etc/otelcol/otel-collector-config.yaml") in (
        bind_mounts(collector)
    )


def test_beyla_shares_the_app_pid_namespace_with_the_privileges_it_needs(services):
    beyla = services["beyla"]
    assert beyla["pid"] == "service:app"
    documented_caps = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "CHECKPOINT_RESTORE", "NET_RAW", "SYS_ADMIN"}
    assert beyla.get("privileged") is True or documented_caps <= set(beyla.get("cap_add", []))


# The host paths a service may see (everything else of the host is hidden from every container), all
# read-only: what each exporter reads, docker-compose.yml says why.
HOST_MOUNTS = {
    # The host's root, under which node_exporter (--path.rootfs) reads /proc, /sys and every mount point.
    "node-exporter": {"/": "/host"},
    # The mounts of cAdvisor's docs (docs/running.md), /var/run narrowed to the Docker socket.
    "cadvisor": {"/": "/rootfs", "/sys": "/sys", "/var/lib/docker": "/var/lib/docker",
                 "/var/run/docker.sock": "/var/run/docker.sock"},
}
DOCKER_SOCKET = "/var/run/docker.sock"


def test_only_the_exporters_see_the_host_and_only_read_it(services):
    raw = raw_compose()["services"]
    for name, service in raw.items():
        mounts = host_mounts(service)
        assert {source: target for source, (target, _) in mounts.items()} == HOST_MOUNTS.get(name, {}), name
        for source, (_, options) in mounts.items():
            assert "ro" in options, f"{name}: {source} is mounted writable"
    # The Docker socket is root on the host, read-only or not: cAdvisor alone has it (container names and labels).
    assert [name for name, service in raw.items() if DOCKER_SOCKET in host_mounts(service)] == ["cadvisor"]
    # The host's root follows mounts made after the start (rslave), as node_exporter's README mounts it.
    assert "rslave" in host_mounts(raw["node-exporter"])["/"][1]


def test_the_exporters_run_with_the_least_privilege_they_need(services):
    # Beyla alone is privileged; no service shares the host's pid namespace or network.
    assert [name for name, service in services.items() if service.get("privileged")] == ["beyla"]
    for name, service in services.items():
        assert service.get("pid") in (None, "service:app"), f"{name}: pid {service['pid']}"
        assert "network_mode" not in service, f"{name}: network_mode {service['network_mode']}"
    for name in ("node-exporter", "cadvisor"):
        service = services[name]
        assert service["cap_drop"] == ["ALL"], name
        assert service["read_only"] is True and "no-new-privileges:true" in service["security_opt"], name
        assert not service.get("ports"), f"{name} publishes a port: its raw series are Prometheus's to show"
    # node-exporter: the image's user (nobody), no capability, no device.
    node = services["node-exporter"]
    assert "user" not in node and not node.get("cap_add") and not node.get("devices")
    assert node["command"] == ["--path.rootfs=/host"]
    # cAdvisor: root (the cgroup files, Docker's state and socket are root's), the kernel log read for OOM
    # kills, and the one capability that reading needs where kernel.dmesg_restrict=1.
    cadvisor = services["cadvisor"]
    assert cadvisor["cap_add"] == ["SYSLOG"]
    assert cadvisor["devices"] == ["/dev/kmsg:/dev/kmsg:r"]
    assert "oom_event" in next(flag for flag in cadvisor["command"] if flag.startswith("--enable_metrics="))


def test_cadvisor_labels_series_with_the_compose_labels_only(services):
    command = services["cadvisor"]["command"]
    # The naming layer (prometheus/rules/) finds the app by its compose service label; no other label of any
    # container becomes a series label.
    assert "--store_container_labels=false" in command
    assert "--whitelisted_container_labels=com.docker.compose.project,com.docker.compose.service" in command
    assert "--docker_only=true" in command
    rules = "".join(path.read_text() for path in (REPO_ROOT / "prometheus" / "rules").glob("*.yaml"))
    used = set(re.findall(r"container_label_([a-z_]+)", rules))
    assert "com_docker_compose_service" in used and used <= {"com_docker_compose_project",
                                                             "com_docker_compose_service"}, used


def test_beyla_scale_is_written_as_the_dotenv_switch():
    # What is written, not what an interpolation filled in from .env (which would equal .env whatever
    # the file said). test_compose_loader.py checks that Compose turns both values into the scale.
    written = raw_compose()["services"]["beyla"].get("scale")
    assert isinstance(written, str) and re.fullmatch(r"\$\{BEYLA_SCALE(:-1)?\}", written), (
        f"beyla's scale must be ${{BEYLA_SCALE}} from .env, not {written!r}")
    assert dotenv()["BEYLA_SCALE"] in ("0", "1")
    for name, service in raw_compose()["services"].items():
        if name != "beyla":
            assert "scale" not in service and "replicas" not in (service.get("deploy") or {}), name


def test_the_app_runs_as_non_root(services):
    app = services["app"]
    assert app.get("user") in (None, "") or not str(app["user"]).startswith(("0", "root"))
    dockerfile = (REPO_ROOT / app["build"]["context"] / app["build"]["dockerfile"]).read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0"), "app/Dockerfile must end with a non-root USER"


def test_grafana_downloads_nothing_at_start(services):
    environment = services["grafana"]["environment"]
    assert not {"GF_INSTALL_PLUGINS", "GF_PLUGINS_PREINSTALL", "GF_PLUGINS_PREINSTALL_SYNC"} & set(environment)
    assert environment["GF_PLUGINS_PREINSTALL_DISABLED"] == "true"


def test_dotenv_is_where_compose_reads_it():
    # Compose reads .env from the project directory, i.e. beside docker-compose.yml.
    assert DOTENV_FILE.parent == COMPOSE_FILE.parent


def test_the_docker_tier_workflow_is_valid_and_cannot_skip_silently():
    workflow = REPO_ROOT / ".github" / "workflows" / "e2e.yml"
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(workflow)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # One job per deployment of the docker tier: compose (make e2e) and kind (make e2e-k8s), each with its
    # make target, each failing instead of skipping when the runner has no Docker engine.
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = {}
    for name, job in jobs.items():
        assert job["runs-on"] == "ubuntu-latest", name
        (run,) = [step for step in job["steps"] if re.search(r"\bmake e2e", step.get("run", ""))]
        assert run["env"]["E2E_REQUIRE_DOCKER"] == "1", name
        target = re.search(r"make (e2e[\w-]*)", run["run"]).group(1)
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"{name} runs `make {target}`, which is not a target"
        targets[target] = re.search(rf"^{target}:.*\n\t(.*)", makefile, re.MULTILINE).group(1)
    assert set(targets) == {"e2e", "e2e-k8s"}, targets
    # The Go that builds the tools is the README's minimum.
    go_minimum = re.search(r"Go (\d+\.\d+)\+", (REPO_ROOT / "README.md").read_text()).group(1)
    go_versions = {step["with"]["go-version"] for job in jobs.values() for step in job["steps"]
                   if step.get("uses", "").startswith("actions/setup-go@")}
    assert go_versions == {go_minimum}, (go_versions, go_minimum)
    assert targets["e2e"].endswith("tests/e2e/test_stack.py") and targets["e2e-k8s"].endswith("tests/e2e/test_kind.py")


def test_make_test_runs_what_the_readme_promises_and_no_docker_tier():
    # make test is the README's test command and CI's: unit and integration only. A Docker engine on the
    # machine must not turn it into a compose stack and a kind cluster (release downloads) at once.
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    (pytest_line,) = [line for line in recipe.splitlines() if " -m pytest" in line]
    assert '-m "not e2e"' in pytest_line, pytest_line
    for target in ("e2e", "e2e-k8s"):
        assert re.search(rf"^{target}:.*\n\t.* -m e2e ", makefile, re.MULTILINE), target
    assert "make e2e" in recipe and "make e2e-k8s" in recipe, "make test must say where the docker tiers are"
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE), ci
