"""Reading the stack's files the way their tools do: .env and docker-compose.yml as Compose reads them.

Shared by the static tests of the compose stack (test_compose, test_grafana, test_service_configs,
test_consistency) and the docker tier.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from zerocode.envfile import load_env_file

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOTENV_FILE = REPO_ROOT / ".env"

# The services of the stack; `probe` runs the healthchecks the scratch/distroless images cannot.
SERVICES = {"app", "beyla", "otel-collector", "prometheus", "tempo", "pyroscope", "grafana", "locust", "probe"}

# Compose interpolation: $$ is a literal $, otherwise $VAR or ${VAR[:-|-|:?|?|:+|+]word}.
_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)

# Directories that are not the project's own files.
_SKIP_DIRS = {".git", ".venv", ".cache", ".native", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}


def dotenv(path: Path = DOTENV_FILE) -> dict[str, str]:
    return load_env_file(path)


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


def compose_text() -> str:
    return COMPOSE_FILE.read_text()


def compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml, interpolated with .env (or `env`) as `docker compose config` would."""
    return yaml.safe_load(interpolate(compose_text(), dotenv() if env is None else env))


def raw_compose() -> dict:
    """docker-compose.yml before interpolation: what is written in the file."""
    return yaml.safe_load(compose_text())


def service_ports(service: dict) -> set[int]:
    """Ports a service offers on the compose network: its `expose` list (documented per service)."""
    return {int(str(port).split("/")[0]) for port in service.get("expose", [])}


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of a service's bind mounts, sources relative to the repository."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def named_volumes(service: dict) -> list[tuple[str, str]]:
    """(volume name, target) of a service's named volumes."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "volume":
                result.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            result.append((source, target))
    return result


def repo_text_files() -> Iterator[tuple[Path, str]]:
    """The project's own text files (no venv, caches, build output or git internals)."""
    for dirpath, dirnames, filenames in os.walk(REPO_ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                yield path, path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
