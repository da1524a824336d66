"""Shared fixtures. The tiers are pytest markers: unit, integration (real local processes), e2e (Docker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "app"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def dice_app():
    """The app module itself, imported the way gunicorn's `app:app` does (from app/)."""
    sys.path.insert(0, str(APP_DIR))
    try:
        import app as module
    finally:
        sys.path.remove(str(APP_DIR))
    return module


@pytest.fixture
def client(dice_app):
    return dice_app.app.test_client()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")
