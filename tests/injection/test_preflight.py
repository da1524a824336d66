"""The injection never breaks the app (issue 21, point 3): zerocode's preflight, run by the layout's
sitecustomize.py before the injected OpenTelemetry starts.

Unit: the comparisons of instrumentation/zerocode/preflight.py on synthetic dist-info folders (a shadowed
major, Requires-Dist satisfied or not, wheel tags against an interpreter), and the verdict's policy.

Integration, with real processes: the instrumentation image's folder as instrumentation/Dockerfile lays it
out (tooling.k8s.injection.instrumentation_layout(), our sitecustomize.py included), on the PYTHONPATH the
Operator gives the app container, and
- examples/protobuf-conflict/ (protobuf 3.20.3 for opencensus-proto's old generated code) run by its own
  Dockerfile's gunicorn command from its own virtualenv: it starts uninstrumented and answers, with one log
  line naming protobuf 3.20.3 and 7.36.2, and no OpenTelemetry module imported in any of its processes;
  with ZEROCODE_PREFLIGHT=off the same app dies at import, so the conflict is real and the preflight is what
  saves it;
- the owners' dice app (no conflict) is instrumented, and the preflight says nothing;
- another CPython than the layout's 3.11, where one is installed: the cp311 wheels are named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from zerocode import preflight

from tooling.k8s import injection as inj
from tooling.native.stack import REPO_ROOT, free_port, poll, spawn, wait_tcp

CONFLICT_APP = REPO_ROOT / "examples" / "protobuf-conflict"
CACHE_DIR = REPO_ROOT / ".cache" / "preflight"
LINE = "zerocode preflight:"


# ------------------------------------------------------------------------------ synthetic installs

def install(folder: Path, name: str, version: str, requires: tuple = (), tags: tuple = (),
            requires_python: str | None = None) -> Path:
    """A dist-info folder as pip leaves it: METADATA headers (and a long description after the blank line
    that ends them), and WHEEL tags when given."""
    dist_info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    headers += [f"Requires-Python: {requires_python}"] if requires_python else []
    headers += [f"Requires-Dist: {line}" for line in requires]
    (dist_info / "METADATA").write_text("\n".join(headers) + "\n\nRequires-Dist: not-a-header 9\n")
    if tags:
        (dist_info / "WHEEL").write_text("Wheel-Version: 1.0\n" + "".join(f"Tag: {tag}\n" for tag in tags))
    return dist_info


@pytest.fixture
def sides(tmp_path):
    """An app's site-packages and a layout, and the sys.path the Operator's PYTHONPATH makes of them."""
    app, layout = tmp_path / "site-packages", tmp_path / "layout"
    app.mkdir()
    (layout / "opentelemetry" / "instrumentation" / "auto_instrumentation").mkdir(parents=True)
    path = [str(layout / "opentelemetry" / "instrumentation" / "auto_instrumentation"), str(layout), str(app)]
    return app, layout, path


def installed(path: list, layout: Path) -> preflight.Installed:
    return preflight.Installed(path, os.path.realpath(layout))


@pytest.mark.unit
def test_versions_and_specifiers_as_pep_440_orders_them():
    ok = [("7.36.2", ">=3.19,<8"), ("4.16.0", "~=4.12"), ("0.66b1", ">=0.40b0"), ("1.45.1", "==1.45.*"),
          ("3.20.3", "<4"), ("2.0", "==2.0.0"), ("1.0.post1", ">=1.0"), ("1.0", "!=1.1"), ("26.4", ">=22")]
    not_ok = [("3.20.3", ">=4.21"), ("4.16.0", ">=4.17"), ("4.16.0", "~=4.17"), ("7.36.2", "<5"),
              ("2.0rc1", "<2.0"), ("1.0.post1", ">1.0"), ("1.45.1", "==1.44.*"), ("0.66b1", ">=0.66"),
              ("1.0.dev1", ">=1.0a1")]
    assert [spec for version, spec in ok if preflight.satisfies(version, spec) is not True] == []
    assert [spec for version, spec in not_ok if preflight.satisfies(version, spec) is not False] == []
    # What cannot be read is neither: the caller skips it rather than guess.
    assert preflight.satisfies("1.0", "=>1.0") is None
    assert preflight.satisfies("not a version", ">=1") is None


@pytest.mark.unit
def test_requirements_apply_by_their_markers_and_extras_are_skipped():
    env = dict(preflight._marker_environment(), python_version="3.11", python_full_version="3.11.7",
               sys_platform="linux")
    assert preflight.requirement('typing-extensions>=4.6; python_version < "3.13"', env) == \
        ("typing-extensions", ">=4.6")
    assert preflight.requirement("protobuf (<4,>=3.5)", env) == ("protobuf", "<4,>=3.5")
    assert preflight.requirement('importlib-metadata>=3.6; python_version < "3.10"', env) is None
    assert preflight.requirement('grpcio>=1.0; sys_platform == "win32" or (python_version >= "3.8" and '
                                 'python_version < "3.12")', env) == ("grpcio", ">=1.0")
    assert preflight.requirement('asgiref>=3.2 ; extra == "async"', env) is None
    assert preflight.requirement("foo @ https://example.invalid/foo.whl", env) is None
    assert preflight.requirement('bar>=1; python_version ~~ "3"', env) is None  # unreadable: skipped


@pytest.mark.unit
def test_a_shadowed_major_an_older_minor_and_any_opentelemetry_difference_are_conflicts(sides):
    app, layout, path = sides
    for name, theirs, ours in [("protobuf", "3.20.3", "7.36.2"),      # major 3 -> 7: conflict
                               ("grpcio", "1.85.4", "1.85.3"),        # same minor, older patch: fine
                               ("typing-extensions", "4.17.0", "4.16.0"),  # older minor: conflict
                               ("packaging", "24.2", "26.4"),         # calendar major (a year): fine
                               ("wrapt", "1.17.2", "2.5.2"),          # major: conflict
                               ("asgiref", "3.13.0", "3.13.0"),       # equal: fine
                               ("opentelemetry-api", "1.45.0", "1.45.1")]:  # OpenTelemetry: conflict
        install(app, name, theirs)
        install(layout, name, ours)
    reasons = preflight.shadowing_conflicts(installed(path, layout))
    assert reasons == [
        "the app's opentelemetry-api 1.45.0 would be shadowed by the injected 1.45.1 (OpenTelemetry packages "
        "must be one release)",
        "the app's protobuf 3.20.3 would be shadowed by the injected 7.36.2 (major 3 != 7)",
        "the app's typing-extensions 4.17.0 would be shadowed by the injected 4.16.0 (older than the app's)",
        "the app's wrapt 1.17.2 would be shadowed by the injected 2.5.2 (major 1 != 2)",
    ], reasons


@pytest.mark.unit
def test_where_the_apps_copy_comes_first_only_opentelemetry_is_a_conflict(sides):
    app, layout, path = sides
    install(app, "protobuf", "3.20.3")
    install(layout, "protobuf", "7.36.2")
    install(app, "opentelemetry-api", "1.20.0")
    install(layout, "opentelemetry-api", "1.45.1")
    app_first = [path[0], str(app), str(layout)]  # a container PYTHONPATH between the Operator's two entries
    assert preflight.shadowing_conflicts(installed(app_first, layout)) == [
        "the injected opentelemetry-api 1.45.1 would be shadowed by the app's own 1.20.0 (OpenTelemetry "
        "packages must be one release)"]


@pytest.mark.unit
def test_requires_dist_of_either_side_against_the_copy_that_is_imported(sides):
    app, layout, path = sides
    install(app, "pydantic", "2.12.0", requires=("typing-extensions>=4.17.0", "annotated-types>=0.6.0"))
    install(app, "opencensus-proto", "0.1.0", requires=("grpcio (<2.0.0,>=1.0.0)",))
    install(app, "old-tool", "1.0", requires=('typing-extensions<4; python_version < "3.0"',
                                              'grpcio<1.50; extra == "grpc"', "grpcio (weird)"))
    install(layout, "typing-extensions", "4.16.0")
    install(layout, "grpcio", "1.85.3")
    # Ours needs protobuf>=5, which the app's copy would not give it if the app's came first.
    install(layout, "opentelemetry-proto", "1.45.1", requires=("protobuf<7,>=5.0",))
    install(layout, "protobuf", "6.33.0")
    install(app, "protobuf", "3.20.3")
    assert preflight.requirement_conflicts(installed(path, layout)) == [
        "the app's pydantic 2.12.0 requires typing-extensions>=4.17.0, the injected is 4.16.0"]
    app_first = [path[0], str(app), str(layout)]
    assert preflight.requirement_conflicts(installed(app_first, layout)) == [
        "the app's pydantic 2.12.0 requires typing-extensions>=4.17.0, the injected is 4.16.0",
        "the injected opentelemetry-proto 1.45.1 requires protobuf<7,>=5.0, the app's is 3.20.3"]


INTERPRETER_311 = {"implementation": "cpython", "python": (3, 11), "version": "3.11.7", "abi": "cp311",
                   "machine": "x86_64", "platform": "linux", "libc": ("glibc", (2, 36))}


@pytest.mark.unit
def test_wheel_tags_against_the_interpreter_and_its_libc():
    py312 = dict(INTERPRETER_311, python=(3, 12), version="3.12.1", abi="cp312")
    old_glibc = dict(INTERPRETER_311, libc=("glibc", (2, 12)))
    musl = dict(INTERPRETER_311, libc=("musl", ()))
    arm = dict(INTERPRETER_311, machine="aarch64")
    grpcio = "cp311-cp311-manylinux_2_17_x86_64"
    cases = [  # (tag, interpreter, fits)
        (grpcio, INTERPRETER_311, True), (grpcio, py312, False), (grpcio, old_glibc, False),
        (grpcio, musl, False), (grpcio, arm, False),
        ("cp311-cp311-manylinux2014_x86_64", old_glibc, False), ("cp311-cp311-manylinux1_x86_64", old_glibc, True),
        ("cp310-abi3-manylinux2014_x86_64", py312, True), ("cp313-abi3-manylinux2014_x86_64", py312, False),
        ("cp311-cp311-musllinux_1_2_x86_64", musl, True), ("cp311-cp311-musllinux_1_2_x86_64", INTERPRETER_311, False),
        ("py3-none-any", musl, True), ("py2.py3-none-any", py312, True), ("py2-none-any", py312, False),
        ("cp311-cp311-macosx_11_0_arm64", INTERPRETER_311, False),
    ]
    wrong = [(tag, this["version"], this["libc"], this["machine"], fits) for tag, this, fits in cases
             if preflight.tag_fits(tag, this) != fits]
    assert wrong == [], wrong


@pytest.mark.unit
def test_the_injected_wheels_and_requires_python_are_named_against_this_python(tmp_path):
    layout = tmp_path / "layout"
    install(layout, "grpcio", "1.85.3", tags=("cp311-cp311-manylinux_2_17_x86_64",))
    install(layout, "wrapt", "2.5.2", tags=("cp311-cp311-manylinux_2_5_x86_64", "cp311-cp311-manylinux1_x86_64"))
    install(layout, "protobuf", "7.36.2", tags=("cp310-abi3-manylinux2014_x86_64",))
    install(layout, "opentelemetry-api", "1.45.1", tags=("py3-none-any",), requires_python=">=3.10")
    dists = preflight.distributions_in(str(layout))
    assert preflight.abi_conflicts(dists, INTERPRETER_311) == []
    py39 = dict(INTERPRETER_311, python=(3, 9), version="3.9.18", abi="cp39")
    assert preflight.abi_conflicts(dists, py39) == [
        # protobuf's abi3 wheel is for CPython 3.10 and later
        "the injected grpcio 1.85.3 (cp311-cp311-manylinux_2_17_x86_64), protobuf 7.36.2 "
        "(cp310-abi3-manylinux2014_x86_64), wrapt 2.5.2 (cp311-cp311-manylinux_2_5_x86_64) are built for "
        "another interpreter than this cpython 3.9.18 (cp39) on glibc 2.36 x86_64",
        "the injected opentelemetry-api 1.45.1 (Python >=3.10) needs another Python than this 3.9.18"]


# ------------------------------------------------------------------------------------- the verdict

@pytest.fixture
def conflicting(sides, monkeypatch):
    """sys.path and PYTHONPATH as the Operator leaves them, over an app whose protobuf ours would shadow."""
    app, layout, path = sides
    install(app, "protobuf", "3.20.3")
    install(layout, "protobuf", "7.36.2")
    monkeypatch.setattr(sys, "path", list(path))
    environ = {"PYTHONPATH": os.pathsep.join(path[:2]), "OTEL_SERVICE_NAME": "billing"}
    return environ, os.path.realpath(layout), path


def preflight_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(LINE)]


@pytest.mark.unit
def test_strict_starts_the_app_without_the_layout_and_says_why(conflicting, capsys):
    environ, layout, path = conflicting
    assert preflight.run(environ, layout) is False
    (line,) = preflight_lines(capsys.readouterr().err)
    assert line == (f"{LINE} not instrumenting billing (pid {os.getpid()}): the app's protobuf 3.20.3 would be "
                    "shadowed by the injected 7.36.2 (major 3 != 7). Set ZEROCODE_PREFLIGHT=warn to instrument "
                    "anyway.")
    assert sys.path == [path[2]], "the layout must be off sys.path"
    assert "PYTHONPATH" not in environ, "children (subprocesses, spawned workers) must not re-enter"


@pytest.mark.unit
def test_a_container_pythonpath_of_its_own_stays(conflicting, capsys):
    environ, layout, path = conflicting
    environ["PYTHONPATH"] = os.pathsep.join([path[0], "/srv/lib", path[1]])
    assert preflight.run(environ, layout) is False
    assert environ["PYTHONPATH"] == "/srv/lib"
    assert len(preflight_lines(capsys.readouterr().err)) == 1


@pytest.mark.unit
def test_warn_instruments_anyway_and_off_does_not_look(conflicting, capsys, monkeypatch):
    environ, layout, path = conflicting
    assert preflight.run({**environ, "ZEROCODE_PREFLIGHT": "warn"}, layout) is True
    (line,) = preflight_lines(capsys.readouterr().err)
    assert line.startswith(f"{LINE} instrumenting billing (pid {os.getpid()}) despite: the app's protobuf 3.20.3")
    assert sys.path == path
    monkeypatch.setattr(preflight, "conflicts", lambda **_: pytest.fail("off must not even look"))
    assert preflight.run({**environ, "ZEROCODE_PREFLIGHT": "off"}, layout) is True
    assert capsys.readouterr().err == ""


@pytest.mark.unit
def test_a_bug_in_the_check_is_one_line_and_strict_stays_strict(conflicting, capsys, monkeypatch):
    environ, layout, path = conflicting

    def broken(**_):
        raise KeyError("Name")

    monkeypatch.setattr(preflight, "conflicts", broken)
    assert preflight.run(dict(environ, ZEROCODE_PREFLIGHT="Strict "), layout) is False
    (line,) = preflight_lines(capsys.readouterr().err)
    assert "the check itself failed (KeyError: 'Name')" in line and "ZEROCODE_PREFLIGHT=warn" in line
    assert preflight.run(dict(environ, ZEROCODE_PREFLIGHT="warn"), layout) is True
    monkeypatch.setattr(sys, "path", list(path))
    # A misspelt policy is said once, and taken as strict.
    assert preflight.run(dict(environ, ZEROCODE_PREFLIGHT="yes"), layout) is False
    lines = preflight_lines(capsys.readouterr().err)
    assert len(lines) == 3 and "ZEROCODE_PREFLIGHT='yes' is not one of strict, warn, off; using strict" in lines[1]


@pytest.mark.unit
def test_unreadable_metadata_is_skipped_not_fatal(sides):
    app, layout, path = sides
    (app / "broken-1.0.dist-info").mkdir()  # no METADATA at all
    (app / "weird.dist-info").mkdir()  # no version in the name, none inside
    bad = install(app, "binary", "1.0")
    (bad / "METADATA").write_bytes(b"Name: binary\nVersion: 1.0\nRequires-Dist: \xff\xfe (\n\n")
    install(layout, "binary", "1.0", tags=("garbage",))
    assert preflight.conflicts(path, os.path.realpath(layout)) == []


# ------------------------------------------------------------------------------------- real processes

def operator_pythonpath(layout: Path) -> str:
    """The Operator's PYTHONPATH with its mount replaced by the layout's folder."""
    return f"{inj.PYTHONPATH_PREFIX.replace(inj.MOUNT_PATH, str(layout))}{os.pathsep}{layout}"


def container_env(bin_dir: Path, layout: Path, **extra: str) -> dict[str, str]:
    """A container's environment, not this test's: the app's Python first on PATH, the Operator's PYTHONPATH."""
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": operator_pythonpath(layout), **extra}


def conflict_python() -> Path:
    """A virtualenv with examples/protobuf-conflict/requirements.txt only, as its image has: its bin/ folder.
    Cached, keyed by the requirements and this Python."""
    requirements = CONFLICT_APP / "requirements.txt"
    python = f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{os.uname().machine}"
    key = hashlib.sha256(requirements.read_bytes() + python.encode()).hexdigest()[:16]
    venv = CACHE_DIR / f"protobuf-conflict-{key}"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        result = subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-r",
                                 str(requirements)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"pip install -r {requirements}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        (venv / ".complete").write_text("")
    return venv / "bin"


def conflict_command(bin_dir: Path, port: int) -> list[str]:
    """The example's Dockerfile CMD, run by its virtualenv, on a local port."""
    (cmd,) = [i for i in inj.stage(CONFLICT_APP / "Dockerfile") if i.split(None, 1)[0].upper() == "CMD"]
    argv = json.loads(cmd.partition(" ")[2])
    assert "0.0.0.0:8080" in argv, argv
    return [str(bin_dir / argv[0]), *[f"127.0.0.1:{port}" if arg == "0.0.0.0:8080" else arg for arg in argv[1:]]]


@pytest.fixture(scope="module")
def conflict_bin() -> Path:
    return conflict_python()


@pytest.mark.integration
def test_the_layout_runs_our_sitecustomize(layout):
    assert (layout / inj.SITECUSTOMIZE).read_text() == (REPO_ROOT / "instrumentation" / "sitecustomize.py").read_text()
    assert (layout / "zerocode" / "preflight.py").is_file()


@pytest.mark.integration
def test_the_conflicting_app_starts_uninstrumented_with_one_line(layout, conflict_bin, tmp_path):
    port = free_port()
    # -X importtime in every process (gunicorn's workers are forked, and import the app after the fork):
    # each module imported anywhere is in the log, so no OpenTelemetry module can be loaded unseen.
    env = container_env(conflict_bin, layout, OTEL_SERVICE_NAME="protobuf-conflict", PYTHONPROFILEIMPORTTIME="1")
    app = spawn("protobuf-conflict", conflict_command(conflict_bin, port), env, CONFLICT_APP, tmp_path)
    try:
        wait_tcp("127.0.0.1", port, 60, app.process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/trace-config", timeout=10) as response:
            assert response.status == 200
            answer = json.load(response)
    finally:
        app.stop()
    log = app.log()
    assert answer["protobuf"] == "3.20.3" and answer["sampling_probability"] == 0.25, answer
    lines = preflight_lines(log)
    print(f"\nthe preflight's line: {lines}")
    # sitecustomize runs once per interpreter: in gunicorn's master, whose forked workers inherit the verdict.
    assert len(lines) == 1, log[-3000:]
    assert lines[0].startswith(f"{LINE} not instrumenting protobuf-conflict (pid {app.process.pid}): "), lines
    assert "protobuf 3.20.3" in lines[0] and "7.36.2" in lines[0], lines
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if line.startswith("import time:")]
    assert "opencensus.proto.trace.v1.trace_config_pb2" in imported, "the workers' imports must be in the log"
    assert [m for m in imported if m.startswith(("opentelemetry", "grpc", "pyroscope"))] == []
    assert "Booting worker" in log and "Descriptors cannot be created directly" not in log


@pytest.mark.integration
def test_without_the_preflight_the_same_app_dies_at_import(layout, conflict_bin, tmp_path):
    """Exporters off, so that nothing imports protobuf in gunicorn's master: each worker's first import of it
    finds ours. Seen 2026-12-07: with the OTLP gRPC exporter the master imports protobuf first and gets the
    app's 3.20.3 (the `google` namespace that protobuf 3's nspkg.pth sets up at start holds only the app's
    folder then, it seems), so the app runs but OpenTelemetry fails to start ("No module named 'google.rpc'");
    with http/protobuf the app dies as here."""
    port = free_port()
    env = container_env(conflict_bin, layout, OTEL_SERVICE_NAME="protobuf-conflict", ZEROCODE_PREFLIGHT="off",
                        OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    app = spawn("protobuf-conflict-off", conflict_command(conflict_bin, port), env, CONFLICT_APP, tmp_path)
    try:
        app.process.wait(90)  # gunicorn's master gives up when its workers fail to boot
    finally:
        app.stop()
    log = app.log()
    assert app.process.returncode != 0, log[-3000:]
    assert "TypeError: Descriptors cannot be created directly" in log, log[-3000:]
    assert preflight_lines(log) == []


@pytest.mark.integration
def test_the_verdict_holds_for_the_apps_children(layout, conflict_bin):
    """The layout is off PYTHONPATH too: a subprocess of the app starts plain, without a second check; and
    with warn the same process is instrumented in spite of the conflict."""
    child = ("import os, subprocess, sys; print(os.environ.get('PYTHONPATH')); "
             "subprocess.run([sys.executable, '-c', 'import google.protobuf as p; print(p.__version__)'])")
    strict = subprocess.run([str(conflict_bin / "python"), "-c", child], capture_output=True, text=True, timeout=60,
                            env=container_env(conflict_bin, layout, OTEL_SERVICE_NAME="protobuf-conflict"))
    assert strict.stdout.split() == ["None", "3.20.3"], strict
    assert len(preflight_lines(strict.stderr)) == 1, strict.stderr
    warned = subprocess.run(
        [str(conflict_bin / "python"), "-c", "import sys; print('opentelemetry.sdk.trace' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
        env=container_env(conflict_bin, layout, ZEROCODE_PREFLIGHT="warn", OTEL_TRACES_EXPORTER="none",
                          OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none"))
    assert warned.stdout.split() == ["True"], warned
    (line,) = preflight_lines(warned.stderr)
    assert " despite: the app's protobuf 3.20.3 would be shadowed by the injected 7.36.2" in line


@pytest.mark.integration
def test_a_clean_app_is_instrumented_and_the_preflight_says_nothing(layout, tmp_path):
    owners_bin = inj.owners_python()
    port = free_port()
    env = container_env(owners_bin, layout, OTEL_SERVICE_NAME="dice-api", BIND_HOST="127.0.0.1", PORT=str(port),
                        GUNICORN_WORKERS="1", OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none",
                        OTEL_LOGS_EXPORTER="none", OTEL_BSP_SCHEDULE_DELAY="100")
    app = spawn("dice-api", inj.owners_command(owners_bin), env, REPO_ROOT / "app", tmp_path)
    try:
        wait_tcp("127.0.0.1", port, 60, app.process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
        # The console exporter prints each span as JSON: a SERVER span is the injection at work.
        poll(lambda: '"kind": "SpanKind.SERVER"' in app.log(), 20, "a SERVER span on the console exporter")
    finally:
        app.stop()
    assert preflight_lines(app.log()) == [], app.log()[-3000:]


def other_cpython() -> str | None:
    """A CPython 3 of another minor version than this one (the layout's), if this machine has one: on PATH,
    or installed by pyenv (whose shims on PATH answer only for the selected versions)."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for minor in (12, 13, 10, 9):
        if minor == sys.version_info.minor:
            continue
        installed_by_pyenv = sorted(pyenv.glob(f"3.{minor}.*/bin/python3.{minor}"))
        candidates = [shutil.which(f"python3.{minor}"), *map(str, installed_by_pyenv)]
        for found in filter(None, candidates):
            if subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
                return found
    return None


@pytest.mark.integration
def test_another_python_than_the_layouts_is_named_not_crashed(layout):
    python = other_cpython()
    if python is None:
        pytest.skip("no CPython 3 of another minor version (python3.12, 3.13, 3.10 or 3.9) on PATH or in pyenv")
    env = container_env(Path(python).parent, layout, OTEL_SERVICE_NAME="py-other")
    started = time.monotonic()
    result = subprocess.run([python, "-c", "import sys; print(sorted(m for m in sys.modules if m.startswith("
                             "('grpc', 'google', 'wrapt', 'opentelemetry', 'typing_extensions'))))"],
                            capture_output=True, text=True, timeout=60, env=env)
    print(f"\n{python}: {time.monotonic() - started:.2f} s; {result.stderr.strip()}")
    assert result.returncode == 0 and result.stdout.strip() == "[]", result
    (line,) = preflight_lines(result.stderr)
    assert re.search(r"grpcio 1\.\d+\.\d+ \(cp311-cp311-manylinux", line) and "built for another interpreter" in line
