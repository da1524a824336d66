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

# The three files that each run the native stack with alerting under load for 6 to 11 minutes: 25 of the 49
# test-minutes. Their latency SLOs do not hold on 2 cores with all three at once (three of their tests
# failed within 7 minutes when `make test -n 3` started them together), so two of them are one unit of
# work for pytest-xdist (ALERT_PAIR, pytest_xdist_make_scheduler below): one worker runs them one after the
# other, and at most two alert stacks ever run at once.
ALERT_STACKS = ("tests/alerts/test_alerts_native.py", "tests/alerts/test_saturation_alerts.py",
                "tests/alerts/test_alert_faults.py")
ALERT_PAIR = ALERT_STACKS[1:]

# The order in which `make test` hands out the files that matter to its length, longest first (minutes each
# in a CI run of 2026-12-07: 10.9; the pair 7.4 + 6.5; 3.1, 2.5, 2.2, 1.7, 1.6, 1.6, 1.4, 1.4, 1.0, 0.9, 0.8,
# 0.8, 0.6, 0.6; the other files together about 3.5; 46 to 49 test-minutes in all). Whole files (--dist
# loadfile) in collection order, its reordering by test count turned off (--no-loadscope-reorder):
# otherwise these files, having few tests each, come last, and the run ends with one worker alone on them.
# One worker takes the longest alert file, one the pair, the third the rest from the longest down, and each
# of the first two joins it when done: 15 to 17 minutes of pytest on three workers (16.3 if the rest
# packed perfectly).
LONGEST_FIRST = (
    "tests/alerts/test_alerts_native.py", *ALERT_PAIR,
    "tests/collector/test_reliability.py",
    # Four apps nobody here wrote, each run and loaded natively (about 2.5 minutes with their Pythons cached).
    "tests/own_app/test_own_apps.py",
    "tests/collector/test_cardinality.py", "tests/collector/test_logs.py", "tests/edge/test_edge_faults.py",
    "tests/saturation/test_saturation_native.py", "tests/reports/test_bench.py", "tests/reports/test_compare.py",
    "tests/k8s/test_k8s.py", "tests/collector/test_pipeline.py", "tests/collector/test_resolution.py",
    "tests/prometheus/test_prometheus.py", "tests/grafana/test_grafana.py", "tests/alerts/test_alertmanager.py",
)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run with -p no:xdist does not load
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile with the ALERT_PAIR as one unit of work: its files run on one worker, in collection
    order, each with its own module fixtures (its own stack)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class AlertPairScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return " + ".join(ALERT_PAIR) if path in ALERT_PAIR else path

    return AlertPairScheduling(config, log)


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


@pytest.fixture(scope="session")
def layout() -> Path:
    """Our instrumentation image's folder (instrumentation/Dockerfile's own commands), built once per content."""
    from tooling.k8s import injection

    return injection.instrumentation_layout()


@pytest.fixture(scope="session")
def owners_bin() -> Path:
    """The owners' image's Python: app/requirements.txt alone, no OpenTelemetry."""
    from tooling.k8s import injection

    return injection.owners_python()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")
