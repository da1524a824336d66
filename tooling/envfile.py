"""The two env files that hold the stack's settings, read the way docker compose reads them.

`.env` holds image versions and compose settings; `app/app.env` the app's zero-code settings. Neither uses
quotes or interpolation, so a line is exactly KEY=VALUE.
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
