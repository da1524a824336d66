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


def test_the_alert_pair_runs_on_one_worker_so_at_most_two_alert_stacks_run_at_once(tmp_path):
    """Three stand-in alert files, each a test that notes when and where it ran, under three xdist workers as
    `make test` runs them: conftest's scheduler gives the ALERT_PAIR to one worker, which runs its files one
    after the other, so no more than two ever run at once although a worker is free for the third."""
    from conftest import ALERT_PAIR, ALERT_STACKS

    (tmp_path / "tests").mkdir()
    shutil.copy(TESTS / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    unit: a tier\n")
    ran = tmp_path / "ran"
    for path in ALERT_STACKS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(
            "import os\nimport time\n\nimport pytest\n\npytestmark = pytest.mark.unit\n\n\ndef test_a_stack():\n"
            "    started = time.time()\n    time.sleep(3)\n"
            f"    with open({str(ran)!r}, 'a') as out:\n"
            f"        out.write(f'{{started}} {{time.time()}} {{os.environ[\"PYTEST_XDIST_WORKER\"]}} {path}\\n')\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadfile",
                             "--no-loadscope-reorder", "-q", *ALERT_STACKS], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted((float(start), float(end), worker, path) for start, end, worker, path in
                  (line.split() for line in ran.read_text().splitlines()))
    assert len(runs) == len(ALERT_STACKS), runs
    most_at_once = max(sum(start <= moment < end for start, end, *_ in runs) for moment, *_ in runs)
    assert most_at_once == 2, runs
    pair = [run for run in runs if run[3] in ALERT_PAIR]
    assert [run[3] for run in pair] == list(ALERT_PAIR) and pair[0][2] == pair[1][2], runs
