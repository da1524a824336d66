"""docker-compose.yml and .env through Docker Compose's own loader, without a Docker engine.

tests/compose/compose_config is a small Go program around compose-go, the library `docker compose config`
is built on: it interpolates with .env (and the shell environment) the way users' Compose does, reads
env_file, and runs the loader's schema and consistency checks. test_compose.py checks the stack's
rules on our own reading of the files; these tests make sure Compose reads them the same way.

Integration tier: the program is compiled with Go on first use (about 25 s with Go's caches cold,
then cached in .cache/compose-config/).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from stackfiles import (
    COMPOSE_FILE,
    DOTENV_FILE,
    REPO_ROOT,
    SERVICES,
    ComposeConfigError,
    bind_mounts,
    compose,
    compose_config,
    compose_environment,
    dotenv,
    raw_compose,
)

from tooling.config import load_env_file, variables

pytestmark = pytest.mark.integration

UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}

# The restart policies Docker's engine accepts (Compose's loader passes any string through).
RESTART_POLICY = re.compile(r"no|always|unless-stopped|on-failure(:[1-9]\d*)?")


@pytest.fixture(scope="module")
def project() -> dict:
    return compose_config()


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """The project in a temporary directory: its compose file and .env copied, so a test can break them,
    and links to everything they refer to (bind mounts, env_file, the app's Dockerfile)."""
    shutil.copy(COMPOSE_FILE, tmp_path / COMPOSE_FILE.name)
    shutil.copy(DOTENV_FILE, tmp_path / DOTENV_FILE.name)
    referenced = set()
    for service in raw_compose()["services"].values():
        env_files = service.get("env_file") or []
        referenced.update([env_files] if isinstance(env_files, str) else env_files)
        referenced.update(source for source, _ in bind_mounts(service))
        if "build" in service:
            referenced.add(service["build"]["dockerfile"])
    for top in {Path(os.path.normpath(path)).parts[0] for path in referenced}:
        os.symlink(REPO_ROOT / top, tmp_path / top)
    return tmp_path


def port_host_ips(project: dict) -> dict[str, list[str]]:
    return {name: [port["host_ip"] for port in s.get("ports", [])] for name, s in project["services"].items()}


def images(project: dict) -> dict[str, str]:
    return {name: s["image"] for name, s in project["services"].items()}


def test_the_project_loads_cleanly_under_its_name(project):
    # compose_config raises on any loader warning too, e.g. a variable defaulting to blank.
    assert project["name"] == raw_compose()["name"] == "dice-observability"
    assert set(project["services"]) == SERVICES


def test_every_image_carries_its_version_from_dotenv(project):
    env = dotenv()
    raw = raw_compose()["services"]
    for name, service in project["services"].items():
        image = service["image"]
        assert "$" not in image, f"{name}: {image} is not interpolated"
        if "build" in service:
            for arg, value in service["build"]["args"].items():
                assert value == env[arg], f"{name}: build arg {arg}={value}, .env says {env[arg]}"
            continue
        found = [v for v in variables(raw[name]["image"]) if v.endswith("_VERSION")]
        assert len(found) == 1, f"{name}: the tag of {raw[name]['image']} must be one *_VERSION from .env"
        version_var = found[0]
        assert image.endswith(":" + env[version_var]), f"{name}: {image} lacks {version_var}={env[version_var]}"


def test_every_published_port_binds_to_loopback(project):
    host_ips = port_host_ips(project)
    assert any(host_ips.values())
    for name, ips in host_ips.items():
        assert all(ip == "127.0.0.1" for ip in ips), f"{name} publishes on {ips}"


def test_the_app_gets_its_environment_from_app_env(project):
    app = project["services"]["app"]
    assert "env_file" not in app  # resolved into `environment`, as `docker compose config` shows it
    assert app["environment"]["OTEL_SERVICE_NAME"] == "dice-api"
    expected = load_env_file(REPO_ROOT / "app" / "app.env")
    expected.update(load_env_file(REPO_ROOT / "app" / f"profile-{dotenv()['APP_PROFILE']}.env"))
    differing = {key: (value, app["environment"].get(key)) for key, value in expected.items()
                 if app["environment"].get(key) != value}
    assert not differing, f"app.env as we read it vs as Compose passes it: {differing}"


def test_no_grafana_admin_password_is_committed(project):
    assert project["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""


def test_every_memory_limit_means_what_is_written(project):
    raw = raw_compose()["services"]
    for name, service in project["services"].items():
        written = str(raw[name]["mem_limit"])
        number, unit = re.fullmatch(r"(\d+)([kmg])", written).groups()
        assert int(service["mem_limit"]) == int(number) * UNITS[unit], f"{name}: {written} -> {service['mem_limit']}"


def test_our_reading_of_the_files_agrees_with_composes(project):
    # test_compose.py and the other static tests read the files with stackfiles.compose().
    ours = compose()["services"]
    for name, service in project["services"].items():
        assert ours[name]["image"] == service["image"], name
        published = [f"{p['host_ip']}:{p['published']}:{p['target']}" for p in service.get("ports", [])]
        assert ours[name].get("ports", []) == published, name
        assert int(ours[name].get("scale", 1)) == service.get("scale", 1), name


def test_dotenv_is_read_as_compose_reads_it():
    seen = compose_environment()
    # The loader adds the project name it settled on.
    assert seen.pop("COMPOSE_PROJECT_NAME") == "dice-observability"
    assert seen == dotenv()


def test_a_project_copy_loads_like_the_original(project, project_copy):
    # The control for the broken copies below: they fail because of what each test breaks.
    copy = compose_config(project_copy)
    assert images(copy) == images(project)
    assert copy["services"]["app"]["environment"] == project["services"]["app"]["environment"]


def test_a_missing_version_stops_compose_naming_it(project_copy):
    env_file = project_copy / ".env"
    kept = [line for line in env_file.read_text().splitlines() if not line.startswith("PROMETHEUS_VERSION=")]
    env_file.write_text("\n".join(kept) + "\n")
    with pytest.raises(ComposeConfigError, match="required variable PROMETHEUS_VERSION is missing"):
        compose_config(project_copy)


def test_a_variable_left_blank_is_reported(project_copy):
    # Compose only warns here and runs with an empty value; compose_config treats the warning as an error.
    compose_file = project_copy / COMPOSE_FILE.name
    compose_file.write_text(compose_file.read_text().replace("${LOCUST_VERSION:?LOCUST_VERSION is set in .env}",
                                                             "${LOCUST_TAG}"))
    with pytest.raises(ComposeConfigError, match='The "LOCUST_TAG" variable is not set'):
        compose_config(project_copy)


def test_depends_on_an_undefined_service_is_rejected(project_copy):
    compose_file = project_copy / COMPOSE_FILE.name
    model = yaml.safe_load(compose_file.read_text())
    model["services"]["locust"]["depends_on"]["nosuch"] = {"condition": "service_started"}
    compose_file.write_text(yaml.safe_dump(model, sort_keys=False))
    with pytest.raises(ComposeConfigError, match='"locust" depends on undefined service "nosuch"'):
        compose_config(project_copy)


def test_the_shell_environment_wins_over_dotenv():
    # As in `BIND_ADDRESS=0.0.0.0 docker compose up`: the documented way to expose the stack, which exposes
    # the edge (the app as users call it, and Grafana) and nothing else. The edge's refusal check
    # (edge/entrypoint.sh) is given the same value, and anonymous viewing as Grafana is given it.
    exposed = compose_config(env={"BIND_ADDRESS": "0.0.0.0", "GRAFANA_ANONYMOUS_ENABLED": "false"})
    ips = port_host_ips(exposed)
    assert ips.pop("edge") == ["0.0.0.0", "0.0.0.0"]
    for name, found in ips.items():
        assert all(ip == "127.0.0.1" for ip in found), f"{name} publishes on {found}"
    edge, grafana = exposed["services"]["edge"]["environment"], exposed["services"]["grafana"]["environment"]
    assert edge["BIND_ADDRESS"] == "0.0.0.0"
    assert edge["GRAFANA_ANONYMOUS_ENABLED"] == grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert compose_environment(env={"BIND_ADDRESS": "0.0.0.0"})["BIND_ADDRESS"] == "0.0.0.0"


def test_an_ipv6_loopback_needs_brackets():
    # What README and .env can promise about BIND_ADDRESS's forms: Compose takes [::1] (and hands the edge's
    # check the bracketed form, which edge/entrypoint.sh knows as loopback), and rejects ::1 and host names.
    bracketed = compose_config(env={"BIND_ADDRESS": "[::1]"})
    assert port_host_ips(bracketed)["edge"] == ["::1", "::1"]
    assert bracketed["services"]["edge"]["environment"]["BIND_ADDRESS"] == "[::1]"
    for rejected in ("::1", "localhost"):
        with pytest.raises(ComposeConfigError, match="Invalid ip address"):
            compose_config(env={"BIND_ADDRESS": rejected})


def test_beyla_can_be_left_out_with_its_scale(project):
    # README: BEYLA_SCALE=0 where eBPF cannot run. Nothing may need Beyla then.
    assert dotenv()["BEYLA_SCALE"] == "1"
    assert project["services"]["beyla"]["scale"] == 1
    left_out = compose_config(env={"BEYLA_SCALE": "0"})
    assert left_out["services"]["beyla"]["scale"] == 0
    assert not any("beyla" in s.get("depends_on", {}) for s in left_out["services"].values())
    # Only Beyla has a scale to switch.
    assert [name for name, s in left_out["services"].items() if s.get("scale", 1) != 1] == ["beyla"]


def test_beyla_scale_is_read_from_the_dotenv_file(project_copy):
    # The same switch written into .env itself, as the README tells users to do.
    env_file = project_copy / ".env"
    env_file.write_text(re.sub(r"^BEYLA_SCALE=.*$", "BEYLA_SCALE=0", env_file.read_text(), flags=re.M))
    assert compose_config(project_copy)["services"]["beyla"]["scale"] == 0


def one_shot_services(project: dict) -> set[str]:
    """Services that are meant to exit: something waits for them to complete."""
    return {target for s in project["services"].values() for target, spec in s.get("depends_on", {}).items()
            if spec.get("condition") == "service_completed_successfully"}


def test_every_long_running_service_has_a_restart_policy(project):
    long_running = set(project["services"]) - one_shot_services(project)
    assert long_running == SERVICES
    for name in sorted(long_running):
        policy = project["services"][name].get("restart")
        assert policy and policy != "no", f"{name} has no restart policy"
        assert RESTART_POLICY.fullmatch(policy), f"{name}: restart: {policy} is not a policy Docker knows"
    # Everything but Beyla comes back after a crash and after a reboot, until stopped on purpose.
    policies = {name: s["restart"] for name, s in project["services"].items()}
    assert {name for name, policy in policies.items() if policy != "unless-stopped"} == {"beyla"}


def test_beyla_restarts_a_bounded_number_of_times(project):
    # Where eBPF cannot run Beyla exits at once: a bounded on-failure ends in a visible Exited state
    # instead of an endless restart loop (docker-compose.yml explains the choice).
    match = re.fullmatch(r"on-failure:(\d+)", project["services"]["beyla"]["restart"])
    assert match and 1 <= int(match.group(1)) <= 5


def test_beyla_follows_app_restarts(project):
    beyla = project["services"]["beyla"]
    # It lives in the app's pid namespace, so it dies whenever the app's container stops...
    assert beyla["pid"] == "service:app"
    # ...and Compose restarts it after every restart or recreation of the app it performs.
    app = beyla["depends_on"]["app"]
    assert app["restart"] is True
    assert app["condition"] == "service_healthy"
    # No other edge needs it: no one else shares a namespace.
    others = {(name, target) for name, s in project["services"].items()
              for target, spec in s.get("depends_on", {}).items() if spec.get("restart")}
    assert others == {("beyla", "app")}
    assert not [name for name, s in project["services"].items()
                if name != "beyla" and (s.get("pid") or s.get("network_mode", "").startswith("service:"))]


def test_a_restart_policy_typo_is_caught(project_copy):
    # compose-go passes any restart string through (the engine refuses it only at `up`), which is why
    # the tests above hold the value to Docker's policies. Either way, a typo must not pass.
    compose_file = project_copy / COMPOSE_FILE.name
    compose_file.write_text(compose_file.read_text().replace("restart: on-failure:3", "restart: on-failure-3"))
    try:
        policy = compose_config(project_copy)["services"]["beyla"]["restart"]
    except ComposeConfigError:
        return
    assert policy == "on-failure-3" and not RESTART_POLICY.fullmatch(policy)


def test_a_host_port_changes_from_the_shell_without_touching_the_container_port(project):
    # GRAFANA_PORT is the edge's Grafana listener: Grafana itself publishes nothing.
    moved = compose_config(env={"GRAFANA_PORT": "13000", "APP_PORT": "15000"})
    ports = {name: [(p["published"], p["target"]) for p in s.get("ports", [])] for name, s in moved["services"].items()}
    env = dotenv()
    assert ports["edge"] == [(env["EDGE_PORT"], 8080), ("13000", 3000)]
    assert ports["app"] == [("15000", 5000)]
    before = {name: [(p["published"], p["target"]) for p in s.get("ports", [])]
              for name, s in project["services"].items()}
    assert {k: v for k, v in ports.items() if k not in ("edge", "app")} == {
        k: v for k, v in before.items() if k not in ("edge", "app")}
    assert before["edge"] == [(env["EDGE_PORT"], 8080), (env["GRAFANA_PORT"], 3000)]
    assert before["grafana"] == ports["grafana"] == []


def test_a_missing_port_variable_stops_compose_naming_it(project_copy):
    env_file = project_copy / ".env"
    kept = [line for line in env_file.read_text().splitlines() if not line.startswith("TEMPO_PORT=")]
    env_file.write_text("\n".join(kept) + "\n")
    with pytest.raises(ComposeConfigError, match="required variable TEMPO_PORT is missing"):
        compose_config(project_copy)


def test_the_lean_profile_is_one_variable_away(project):
    # README, "What observing costs": APP_PROFILE=lean puts app/profile-lean.env over app/app.env.
    assert project["services"]["app"]["environment"].get("OTEL_TRACES_SAMPLER") is None  # full: nothing added
    lean = compose_config(env={"APP_PROFILE": "lean"})["services"]["app"]["environment"]
    for key, value in load_env_file(REPO_ROOT / "app" / "profile-lean.env").items():
        assert lean[key] == value, key
    assert lean["OTEL_SERVICE_NAME"] == "dice-api", "the profile adds to app.env, it does not replace it"

