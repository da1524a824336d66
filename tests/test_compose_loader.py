"""docker-compose.yml and .env through Docker Compose's own loader, without a Docker engine.

tests/compose_config is a small Go program around compose-go, the library `docker compose config`
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
    variables,
)

from zerocode.envfile import load_env_file

pytestmark = pytest.mark.integration

UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


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
    # As in `BIND_ADDRESS=0.0.0.0 docker compose up`: the documented way to expose the stack.
    exposed = compose_config(env={"BIND_ADDRESS": "0.0.0.0"})
    for name, ips in port_host_ips(exposed).items():
        assert all(ip == "0.0.0.0" for ip in ips), f"{name} publishes on {ips}"
    assert compose_environment(env={"BIND_ADDRESS": "0.0.0.0"})["BIND_ADDRESS"] == "0.0.0.0"


def test_beyla_can_be_left_out_with_its_scale():
    # README: BEYLA_SCALE=0 where eBPF cannot run. Nothing may need Beyla then.
    project = compose_config(env={"BEYLA_SCALE": "0"})
    assert project["services"]["beyla"]["scale"] == 0
    assert not any("beyla" in s.get("depends_on", {}) for s in project["services"].values())
