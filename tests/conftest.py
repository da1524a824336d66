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

# The files that take longest run first, in this order (minutes each in a CI run of 2026-12-07: 10.4, 9.4,
# 8.0, 3.0, 1.6, 1.5, 1.3, 1.0, 1.0; the other 60 files together about 9). `make test` hands out whole files
# (pytest-xdist's --dist loadfile) in collection order, its reordering by test count turned off
# (--no-loadscope-reorder): otherwise these files, having few tests each, come last, and the run ends with
# one worker alone on two of them while the other idles (a run took 29 minutes that way, 24 this way).
LONGEST_FIRST = (
    "tests/alerts/test_alerts_native.py", "tests/alerts/test_saturation_alerts.py",
    "tests/alerts/test_alert_faults.py", "tests/collector/test_reliability.py", "tests/collector/test_logs.py",
    "tests/edge/test_edge_faults.py", "tests/reports/test_compare.py", "tests/saturation/test_saturation_native.py",
    "tests/collector/test_cardinality.py",
)


def untiered(items) -> list[str]:
    """The node ids of collected tests that carry no tier marker."""
    return [item.nodeid for item in items if not {mark.name for mark in item.iter_markers()} & set(TIERS)]


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test without a tier would never be selected by one
def pytest_collection_modifyitems(config, items):
    missing = untiered(items)
    if missing:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}; a decorator or the file's "
                                f"pytestmark): {', '.join(missing)}")
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


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
