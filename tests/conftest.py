"""Shared fixtures, and the tiers: every test carries one of the pytest markers unit, integration (real local
processes) or e2e (Docker), by a decorator or its file's `pytestmark`; collection fails on a test without.

The folders mirror the components (app/, builds/, collector/, prometheus/, alerts/, grafana/, compose/, k8s/,
reports/, e2e/); helpers that several folders use live in tests/stackfiles.py (this folder is on sys.path)."""

from __future__ import annotations

import fcntl
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "app"
TIERS = ("unit", "integration", "e2e")

# The three files that each run the native stack with alerting under load for 8 to 10 minutes: 28 of the 47
# test-minutes. Their latency SLOs do not hold on 2 cores with all three at once (three of their tests
# failed within 7 minutes when `make test -n 3` started them together), so at most ALERT_STACKS_AT_ONCE run
# at a time: a third waits for a slot (alert_stack_slot below), and LONGEST_FIRST makes that wait rare.
ALERT_STACKS = ("tests/alerts/test_alerts_native.py", "tests/alerts/test_saturation_alerts.py",
                "tests/alerts/test_alert_faults.py")
ALERT_STACKS_AT_ONCE = 2

# The order in which `make test` hands out the files that matter to its length (minutes each in a CI run of
# 2026-12-07: 10.5, 9.7, 3.0, 1.7, 1.5, 1.4, 1.1, 1.3, 0.6, 8.3; the other files together about 8). It hands
# out whole files (pytest-xdist's --dist loadfile) in collection order, its reordering by test count turned
# off (--no-loadscope-reorder): otherwise these files, having few tests each, come last, and the run ends
# with one worker alone on them. Three workers start on two alert files and the third on the middle-sized
# files, which last about as long as the shorter alert file, so that the third alert file starts as one of
# the first two ends (simulated on that run's test times: 18.3 to 18.8 minutes, at most 2 alert files at once).
LONGEST_FIRST = (
    "tests/alerts/test_alerts_native.py", "tests/alerts/test_saturation_alerts.py",
    "tests/collector/test_reliability.py", "tests/collector/test_logs.py", "tests/edge/test_edge_faults.py",
    "tests/reports/test_compare.py", "tests/saturation/test_saturation_native.py",
    "tests/collector/test_cardinality.py", "tests/alerts/test_alertmanager.py", "tests/alerts/test_alert_faults.py",
    # Four apps nobody here wrote, each run and loaded natively (about 3.5 minutes with their Pythons cached).
    "tests/own_app/test_own_apps.py",
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


@pytest.fixture(scope="module", autouse=True)
def alert_stack_slot(request, tmp_path_factory):
    """Under pytest-xdist, an ALERT_STACKS file runs holding one of ALERT_STACKS_AT_ONCE slots: a lock file in
    the folder that this run's workers share (each worker's temp folder is inside it). Without xdist, files
    run one at a time anyway. Before the module's own fixtures, so its stack starts only once it holds one."""
    if not hasattr(request.config, "workerinput") or request.node.nodeid not in ALERT_STACKS:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent
    asked = time.monotonic()
    while True:
        for slot in range(ALERT_STACKS_AT_ONCE):
            lock = (shared / f"alert-stack-slot-{slot}.lock").open("w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.close()
        else:
            # The other alert files end within their 8 to 10 minutes; far past that, something hangs.
            if time.monotonic() - asked > 30 * 60:
                pytest.fail(f"no alert-stack slot free in 30 minutes ({ALERT_STACKS_AT_ONCE} held)")
            time.sleep(1)
            continue
        break
    waited = time.monotonic() - asked
    if waited > 1:
        warnings.warn(f"{request.node.nodeid} waited {waited:.0f} s for an alert-stack slot "
                      f"({ALERT_STACKS_AT_ONCE} at once)", stacklevel=1)
    try:
        yield
    finally:
        lock.close()  # releases the flock


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
