"""The zerocode hooks in every worker of each server the stack supports (issue 21, point 2).

Unit: the profiler's per-process decisions (one agent per pid, a new one in a forked child, none in
multiprocessing's helpers) and the shutdown flush's time bound.

Integration: tiny apps of our own under the real servers, injected as the Operator injects (our instrumentation
image's folder, tooling/k8s/injection.py, on PYTHONPATH of a Python that has no OpenTelemetry): FastAPI under
`uvicorn --workers 2` and under `gunicorn -k uvicorn.workers.UvicornWorker -w 2`, Flask under gunicorn's sync
workers. Batches, metric exports and profile uploads are set 60 s apart, longer than each run, so everything the
sinks hold was sent by the flush at SIGTERM: the counts must equal the requests sent, and every worker pid that
answered must have uploaded its own profile.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from zerocode import profiling, servers

from tooling.config import REPO_ROOT
from tooling.k8s import injection as inj
from tooling.native.sinks import OtlpSink, PyroscopeSink
from tooling.native.stack import free_port, poll, spawn, wait_tcp

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_ERROR = 2
VENV_CACHE = REPO_ROOT / ".cache" / "zerocode-venvs"
# What `pip install httpbinx==1.13.1` resolved (research notes, section 1), minus the app itself.
ASGI_PINS = ("annotated-doc==0.0.7", "annotated-types==0.8.0", "anyio==4.16.0", "click==8.5.1", "fastapi==0.139.2",
             "gunicorn==27.0.1", "h11==0.16.0", "idna==3.21", "packaging==26.4", "pydantic==2.14.4",
             "pydantic_core==2.50.5", "starlette==1.10.0", "typing-inspection==0.4.5", "typing_extensions==4.16.0",
             "uvicorn==0.55.0")
# Every batch, export and upload waits longer than a run: only the flush at SIGTERM sends anything.
NEVER_DURING_THE_RUN = {"OTEL_BSP_SCHEDULE_DELAY": "60000", "OTEL_BLRP_SCHEDULE_DELAY": "60000",
                        "OTEL_METRIC_EXPORT_INTERVAL": "60000", "PYROSCOPE_UPLOAD_INTERVAL": "60"}
WORK_FUNCTION = "burn_cpu"
REQUESTS_PER_WORKER = 8


# --------------------------------------------------------------------------------- profiler decisions

# sys.orig_argv of the processes of `uvicorn --workers 2` (seen, Python 3.11) and of a forkserver.
PY = "/venv/bin/python3.11"
RESOURCE_TRACKER = [PY, "-B", "-c", "from multiprocessing.resource_tracker import main;main(6)"]
FORKSERVER = [PY, "-B", "-c", "from multiprocessing.forkserver import main; main(11, 12, ['__main__'], **{})"]
SPAWNED_WORKER = [PY, "-B", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=7, "
                  "pipe_handle=9)", "--multiprocessing-fork"]
UVICORN_SUPERVISOR = [PY, "/venv/bin/uvicorn", "app:app", "--workers", "2"]


@pytest.mark.unit
@pytest.mark.parametrize("orig_argv, helper", [
    (RESOURCE_TRACKER, "multiprocessing.resource_tracker"),
    (FORKSERVER, "multiprocessing.forkserver"),
    (SPAWNED_WORKER, None),
    (UVICORN_SUPERVISOR, None),
    ([PY, "-c", "print('from multiprocessing.forkserver import main')"], None),
    ([PY, "-m", "gunicorn", "-c", "from multiprocessing.forkserver import main"], None),  # -c of gunicorn
    ([PY, "gunicorn.py", "-c", "from multiprocessing.forkserver import main"], None),  # a script's -c
    ([PY, "-W", "ignore", "-Bc", "from multiprocessing.resource_tracker import main;main(3)"],
     "multiprocessing.resource_tracker"),
    ([PY, "-c"], None),
    ([PY], None),
])
def test_multiprocessing_helpers_are_recognised_from_their_command_line(orig_argv, helper):
    assert profiling.multiprocessing_helper(orig_argv) == helper


@pytest.mark.unit
def test_the_stdlib_starts_its_helpers_with_the_commands_recognised():
    # The commands come from multiprocessing's own source of this Python, not from a copy of them.
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import re

    for module in (multiprocessing.resource_tracker, multiprocessing.forkserver):
        source = Path(module.__file__).read_text()
        command = re.search(r"""['"](from multiprocessing\.\w+ import main;[^'"]*)['"]""", source).group(1)
        assert profiling.multiprocessing_helper([PY, "-B", "-c", command]) == module.__name__, command


@pytest.fixture
def counted_agents(monkeypatch):
    """The hook's start-up with pyroscope.configure replaced by a counter per pid, from a fresh state."""
    started: list[int] = []
    monkeypatch.setattr(profiling, "_agent", {"pid": None, "settings": None, "hooks_registered": False,
                                              "span_processor": False})
    monkeypatch.setattr(profiling, "_start_agent", lambda settings: started.append(os.getpid()))
    monkeypatch.setattr(profiling, "_register_process_hooks", lambda: None)  # no fork hook left in pytest
    monkeypatch.setattr(profiling, "_add_span_processor", lambda: True)
    monkeypatch.setattr(profiling, "_warn_if_unreachable", lambda address: None)
    return started


ADDRESS = {"PYROSCOPE_SERVER_ADDRESS": "http://127.0.0.1:9"}


@pytest.mark.unit
def test_one_agent_per_process_however_often_the_hook_runs(counted_agents):
    assert profiling.start(ADDRESS, SPAWNED_WORKER) is not None
    assert profiling.start(ADDRESS, SPAWNED_WORKER) is None
    profiling._restart_in_child()  # a fork hook firing in the same pid must not start a second one
    assert counted_agents == [os.getpid()]


@pytest.mark.unit
def test_a_forked_child_starts_its_own_agent(counted_agents):
    profiling.start(ADDRESS, UVICORN_SUPERVISOR)
    profiling._agent["pid"] = os.getpid() + 100_000  # as a child sees it: the pid of the parent that forked it
    profiling._restart_in_child()
    assert counted_agents == [os.getpid(), os.getpid()] and profiling.agent_runs_here()


@pytest.mark.unit
@pytest.mark.parametrize("orig_argv", [RESOURCE_TRACKER, FORKSERVER])
def test_helpers_get_no_agent_but_their_forked_children_do(counted_agents, orig_argv):
    assert profiling.start(ADDRESS, orig_argv) is None
    assert counted_agents == [] and profiling._agent["settings"] is not None
    profiling._restart_in_child()  # a child the forkserver forks is a worker
    assert counted_agents == [os.getpid()]


@pytest.mark.unit
def test_the_fork_hook_is_registered_after_the_agent_starts(counted_agents, monkeypatch):
    # pyroscope.configure registers its own after-fork reset; ours must come after it (see start()).
    order = []
    monkeypatch.setattr(profiling, "_start_agent", lambda settings: order.append("agent"))
    monkeypatch.setattr(profiling, "_register_process_hooks", lambda: order.append("fork hook"))
    profiling.start(ADDRESS, SPAWNED_WORKER)
    assert order == ["agent", "fork hook"]


@pytest.mark.unit
def test_the_shutdown_flush_gives_up_after_its_timeout(monkeypatch):
    # A collector that never answers: the flush must return within its bound and name what it left behind.
    stuck = threading.Event()
    monkeypatch.setattr(servers, "_sdk_flushes", lambda timeout_s: {"traces": lambda: stuck.wait(30),
                                                                     "metrics": lambda: None})
    monkeypatch.setattr(servers, "_profile_flush", lambda timeout_s: {})
    started = time.monotonic()
    late = servers.flush_everything(0.5)
    elapsed = time.monotonic() - started
    stuck.set()
    assert late == ["traces"] and elapsed < 1.5, (late, elapsed)


# ------------------------------------------------------------------------------ the injected servers

def cached_venv(name: str, pins: tuple[str, ...]) -> Path:
    """bin/ of a virtualenv with exactly `pins` (no resolution: `pip check` must pass), built once per pins
    and Python under .cache/zerocode-venvs/."""
    key = hashlib.sha256("\n".join((sys.version, *sorted(pins))).encode()).hexdigest()[:12]
    venv = VENV_CACHE / f"{name}-{key}"
    if (venv / ".complete").exists():
        return venv / "bin"
    shutil.rmtree(venv, ignore_errors=True)
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    for command in ([*pip, "install", "--no-deps", *pins], [*pip, "check"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    (venv / ".complete").write_text("")
    return venv / "bin"


def injected_environment(layout: Path, bin_dir: Path, otlp: OtlpSink, pyro: PyroscopeSink, service: str,
                         **extra: str) -> dict[str, str]:
    """The app container's environment as the Operator makes it (the layout on PYTHONPATH, OTLP and
    Pyroscope settings), pointing at the sinks."""
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": f"{layout}/opentelemetry/instrumentation/auto_instrumentation:{layout}",
        "OTEL_SERVICE_NAME": service, "OTEL_PYTHON_CONFIGURATOR": "zerocode",
        "OTEL_SEMCONV_STABILITY_OPT_IN": "http", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{otlp.endpoint}", "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp", "OTEL_LOGS_EXPORTER": "none",
        "PYROSCOPE_SERVER_ADDRESS": pyro.address, **NEVER_DURING_THE_RUN, **extra,
    }


ASGI_APP = f'''
"""A FastAPI app of the tests': CPU work that says which worker did it, an unhandled exception, and one
that the app's own handler answers with a 503."""
import os
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


class Unavailable(Exception):
    pass


@app.exception_handler(Unavailable)
async def unavailable(request, exc):
    return JSONResponse({{"error": str(exc)}}, status_code=503)


def {WORK_FUNCTION}(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@app.get("/work")
def work():
    {WORK_FUNCTION}(0.05)
    return {{"pid": os.getpid()}}


@app.get("/boom")
def boom():
    raise NotImplementedError("not here")


@app.get("/handled")
def handled():
    raise Unavailable("try later")
'''

WSGI_APP = f'''
"""A Flask app of the tests': CPU work that says which worker did it."""
import os
import time

from flask import Flask

app = Flask(__name__)


def {WORK_FUNCTION}(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@app.get("/work")
def work():
    {WORK_FUNCTION}(0.05)
    return {{"pid": os.getpid()}}
'''


def workers_of(master: psutil.Process, server: str) -> tuple[set[int], set[int]]:
    """(worker pids, helper pids) below the master: uvicorn's spawned children run spawn_main, the other
    child is multiprocessing's resource tracker; gunicorn's children are all workers."""
    workers, helpers = set(), set()
    for child in master.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if server.startswith("uvicorn") and "spawn_main" not in command:
            helpers.add(child.pid)
        else:
            workers.add(child.pid)
    return workers, helpers


def run_and_stop(argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path, port: int, server: str,
                 extra_paths: dict[str, int]) -> dict:
    """Start the server, have each of its 2 workers answer REQUESTS_PER_WORKER /work, send `extra_paths`,
    SIGTERM the master and wait for it to exit. What was sent and seen."""
    app = spawn(server, argv, env, cwd, log_dir)
    url = f"http://127.0.0.1:{port}"
    answered_by: Counter = Counter()
    sent: Counter = Counter()
    try:
        master = psutil.Process(app.process.pid)

        def two_workers():
            workers, helpers = workers_of(master, server)
            return (workers, helpers) if len(workers) == 2 else None

        workers, helpers = poll(two_workers, 60, f"2 workers of {server}")
        wait_tcp("127.0.0.1", port, 60, app.process)  # no request: every request sent is counted

        def get(path):
            response = requests.get(url + path, timeout=20, headers={"Connection": "close"})
            return path, response

        with ThreadPoolExecutor(4) as pool:
            for _ in range(30):  # each round opens new connections, so the kernel spreads them over workers
                for path, response in pool.map(get, ["/work"] * 4):
                    sent[path] += 1
                    answered_by[response.json()["pid"]] += 1
                if all(answered_by[w] >= REQUESTS_PER_WORKER for w in workers):
                    break
            for path, response in pool.map(get, [p for p, n in extra_paths.items() for _ in range(n)]):
                sent[(path, response.status_code)] += 1
        assert set(answered_by) == workers, f"answered by {dict(answered_by)}, workers {workers}"
        assert min(answered_by.values()) >= REQUESTS_PER_WORKER, dict(answered_by)
    finally:
        stopped_at = time.monotonic()
        app.process.send_signal(signal.SIGTERM)
        try:
            code = app.process.wait(60)
        except subprocess.TimeoutExpired:
            app.stop()
            raise
    return dict(sent=sent, answered_by=answered_by, workers=workers, helpers=helpers, master=master.pid,
                exit_code=code, stop_seconds=time.monotonic() - stopped_at, log=app.log())


def server_spans(otlp: OtlpSink) -> Counter:
    return Counter((s.attributes.get("http.route"), s.attributes.get("http.response.status_code"))
                   for s in otlp.spans() if s.span.kind == SERVER)


def profiled_pids(pyro: PyroscopeSink) -> dict[int, set[str]]:
    """{pid: function names} over every upload, from the agent's `pid` sample label."""
    stacks: dict[int, set[str]] = {}
    for upload in pyro.snapshot():
        for pid, names in upload.functions_by_sample_label("pid").items():
            stacks.setdefault(int(pid), set()).update(names)
    return stacks


ASGI_SERVERS = {
    "uvicorn-workers": ["uvicorn", "tinyasgi:app", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"],
    "gunicorn-uvicorn-workers": ["gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
                                 "-b", "127.0.0.1:{port}", "tinyasgi:app"],
}


@pytest.fixture(scope="module")
def asgi_bin():
    return cached_venv("asgi", ASGI_PINS)


@pytest.mark.integration
@pytest.mark.parametrize("server", list(ASGI_SERVERS))
def test_asgi_workers_are_profiled_and_lose_nothing_at_sigterm(layout, asgi_bin, tmp_path, server):
    (tmp_path / "tinyasgi.py").write_text(ASGI_APP)
    otlp, pyro, port = OtlpSink().start(), PyroscopeSink().start(), free_port()
    try:
        env = injected_environment(layout, asgi_bin, otlp, pyro, "tiny-asgi")
        argv = [str(asgi_bin / word) if i == 0 else word.format(port=port)
                for i, word in enumerate(ASGI_SERVERS[server])]
        run = run_and_stop(argv, env, tmp_path, tmp_path / "logs", port, server, {"/boom": 2, "/handled": 2})
    finally:
        otlp.stop()
        pyro.stop()
    spans, stacks = server_spans(otlp), profiled_pids(pyro)
    print(f"\n{server}: master {run['master']}, workers {sorted(run['workers'])}, helpers {sorted(run['helpers'])}, "
          f"answered by {dict(run['answered_by'])}; stopped in {run['stop_seconds']:.1f} s (exit {run['exit_code']})"
          f"\n  SERVER spans {dict(spans)}\n  profiled pids {sorted(stacks)}; uploads {len(pyro.snapshot())}")
    expected = {("/work", 200): run["sent"]["/work"], ("/boom", 500): 2, ("/handled", 503): 2}
    assert run["sent"][("/boom", 500)] == 2 and run["sent"][("/handled", 503)] == 2, run["sent"]
    # The batch delay is 60 s: every span here was sent by the flush at SIGTERM.
    assert spans == Counter(expected), (spans, run["log"][-3000:])
    counts = otlp.latest_cumulative_counts("http.server.request.duration",
                                           ("http.route", "http.response.status_code"))
    assert counts == expected, counts
    # Each worker uploaded its own profile of the work it did (60 s upload interval: at SIGTERM).
    for worker in run["workers"]:
        assert WORK_FUNCTION in stacks.get(worker, set()), f"worker {worker}: {sorted(stacks.get(worker, ()))[:20]}"
    assert not set(stacks) & run["helpers"], "multiprocessing's resource tracker was profiled"
    assert set(stacks) <= run["workers"] | {run["master"]}
    # One agent started per process that runs the hook: uvicorn's supervisor and its 2 spawned workers
    # (never the resource tracker); gunicorn's master only, its forked workers restarting silently.
    started = run["log"].count("Pyroscope profiling started")
    assert started == (3 if server == "uvicorn-workers" else 1), run["log"][-3000:]
    assert "WARNING [zerocode" not in run["log"], run["log"][-3000:]
    # FastAPI's instrumentation records the unhandled exception itself, with the 500 on the span.
    boom = [s for s in otlp.spans() if s.span.kind == SERVER and s.attributes.get("http.route") == "/boom"]
    assert all(s.span.status.code == STATUS_ERROR and s.is_error_with_exception for s in boom), boom
    handled = [s for s in otlp.spans() if s.span.kind == SERVER and s.attributes.get("http.route") == "/handled"]
    events = [[e.name for e in s.span.events] for s in handled]
    print(f"  /boom: ERROR with an exception event; /handled (503 from the app's handler): events {events}")


@pytest.mark.integration
def test_gunicorn_sync_workers_send_everything_at_sigterm_through_atexit(layout, tmp_path):
    (tmp_path / "tinywsgi.py").write_text(WSGI_APP)
    owners_bin = inj.owners_python()  # Flask and gunicorn, pinned by app/requirements.txt
    otlp, pyro, port = OtlpSink().start(), PyroscopeSink().start(), free_port()
    try:
        env = injected_environment(layout, owners_bin, otlp, pyro, "tiny-wsgi")
        argv = [str(owners_bin / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "tinywsgi:app"]
        run = run_and_stop(argv, env, tmp_path, tmp_path / "logs", port, "gunicorn-sync", {})
    finally:
        otlp.stop()
        pyro.stop()
    spans, stacks = server_spans(otlp), profiled_pids(pyro)
    print(f"\ngunicorn sync: workers {sorted(run['workers'])}, answered by {dict(run['answered_by'])}; stopped in "
          f"{run['stop_seconds']:.1f} s\n  SERVER spans {dict(spans)}; profiled pids {sorted(stacks)}")
    assert spans == Counter({("/work", 200): run["sent"]["/work"]}), (spans, run["log"][-3000:])
    for worker in run["workers"]:
        assert WORK_FUNCTION in stacks.get(worker, set()), f"worker {worker} uploaded no profile of its work"
    assert "WARNING [zerocode" not in run["log"], run["log"][-3000:]
