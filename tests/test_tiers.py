"""Every test carries a tier marker (conftest.py refuses to collect one without): what `make test` (-m "not
e2e") and the tier targets select is then the whole suite, split by what each test needs to run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent


def collect(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", *args, str(directory)], capture_output=True, text=True, timeout=120,
                          cwd=directory)


def test_no_test_of_the_suite_lacks_a_tier():
    result = collect(TESTS, "-m", "not unit and not integration and not e2e")
    # Exit 5: nothing collected (every test deselected by the expression), which only tiered tests are.
    assert result.returncode == 5 and "no tests collected" in result.stdout, result.stdout + result.stderr


def test_a_test_without_a_tier_fails_the_collection(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n\n@pytest.mark.unit\ndef test_tiered():\n    pass\n\n\ndef test_forgotten():\n    pass\n")
    result = collect(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "tests without a tier marker" in result.stdout + result.stderr
    assert "test_sample.py::test_forgotten" in result.stdout + result.stderr
    assert "test_tiered" not in (result.stdout + result.stderr).split("tests without a tier marker")[1]


def test_the_longest_files_run_first_and_exist():
    from conftest import LONGEST_FIRST, REPO_ROOT

    missing = [path for path in LONGEST_FIRST if not (REPO_ROOT / path).is_file()]
    assert not missing, f"conftest.LONGEST_FIRST names files that do not exist (renamed?): {missing}"
    result = collect(TESTS, "-m", "not e2e")
    files = list(dict.fromkeys(line.split("::")[0] for line in result.stdout.splitlines() if "::" in line))
    assert files[:len(LONGEST_FIRST)] == list(LONGEST_FIRST), files[:12]


def test_the_alert_files_run_at_most_so_many_at_once(tmp_path):
    """Three stand-in alert files, each a test that notes when it ran, under three xdist workers: the slots of
    conftest.alert_stack_slot keep the third waiting until one of the first two is done."""
    from conftest import ALERT_STACKS, ALERT_STACKS_AT_ONCE

    (tmp_path / "tests").mkdir()
    shutil.copy(TESTS / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    unit: a tier\n")
    ran = tmp_path / "ran"
    for path in ALERT_STACKS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(
            "import time\n\nimport pytest\n\npytestmark = pytest.mark.unit\n\n\ndef test_a_stack():\n"
            "    started = time.time()\n    time.sleep(3)\n"
            f"    with open({str(ran)!r}, 'a') as out:\n        out.write(f'{{started}} {{time.time()}}\\n')\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadfile",
                             "-q", *ALERT_STACKS], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    spans = sorted(tuple(map(float, line.split())) for line in ran.read_text().splitlines())
    assert len(spans) == len(ALERT_STACKS), spans
    most_at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert most_at_once == ALERT_STACKS_AT_ONCE < len(ALERT_STACKS), spans
    assert "waited" in result.stdout and "for an alert-stack slot" in result.stdout, result.stdout
