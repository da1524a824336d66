"""Shared fixtures, and the tiers: every test carries one of the pytest markers unit, integration (real local
processes) or e2e (Docker), by a decorator or its file's `pytestmark`; collection fails on a test without.

The folders mirror the components (app/, builds/, collector/, prometheus/, alerts/, grafana/, compose/, k8s/,
reports/, e2e/); helpers that several folders use live in tests/stackfiles.py (this folder is on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "app"
TIERS = ("unit", "integration", "e2e")


def untiered(items) -> list[str]:
    """The node ids of collected tests that carry no tier marker."""
    return [item.nodeid for item in items if not {mark.name for mark in item.iter_markers()} & set(TIERS)]


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test without a tier would never be selected by one
def pytest_collection_modifyitems(config, items):
    missing = untiered(items)
    if missing:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}; a decorator or the file's "
                                f"pytestmark): {', '.join(missing)}")


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
