"""The two env files that hold the stack's settings, read the way docker compose reads them.

`.env` holds image versions and compose settings; `app/app.env` the app's zero-code settings. Neither uses
quotes or interpolation, so a line is exactly KEY=VALUE. `interpolate()` and `variables()` are Compose's
interpolation of docker-compose.yml with them, one copy for the tests and the Kubernetes renderer.
"""

from __future__ import annotations

import re
from pathlib import Path

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
