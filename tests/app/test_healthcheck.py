"""tooling.native.container: app/Dockerfile's HEALTHCHECK read as Docker reads it, and run natively."""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tooling.native.container import (
    APP_DOCKERFILE,
    DEFAULTS,
    HealthcheckError,
    HealthProbe,
    instructions,
    parse_duration,
    parse_healthcheck,
)
from tooling.native.stack import free_port

pytestmark = pytest.mark.unit


def dockerfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


# --- the parser ----------------------------------------------------------------------------------------


def test_the_app_image_healthcheck_is_read_from_app_dockerfile():
    check = parse_healthcheck()
    assert check.source.startswith(f"{APP_DOCKERFILE}:")
    assert (check.interval, check.timeout, check.start_period, check.retries) == (10.0, 5.0, 20.0, 3)
    assert check.command[:2] == ("python", "-c")  # a slim Python image has no curl or wget
    # Healthchecks are not traffic: the probe sends no HTTP request, so no source can count it.
    assert "socket.create_connection" in check.command[2] and "GET" not in check.command[2]
    assert "urlopen" not in check.command[2] and "/health" not in check.command[2]
    assert "os.environ.get('PORT', '5000')" in check.command[2]


def test_a_dockerfile_without_healthcheck_is_an_error_naming_the_file(tmp_path):
    path = dockerfile(tmp_path, "FROM python:3-slim\n# HEALTHCHECK CMD true (only a comment)\nCMD [\"python\"]\n")
    with pytest.raises(HealthcheckError, match=re.escape(f"{path} has no HEALTHCHECK instruction")):
        parse_healthcheck(path)


def test_a_missing_dockerfile_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(HealthcheckError, match=re.escape(f"cannot read {tmp_path / 'nope'}")):
        parse_healthcheck(tmp_path / "nope")


def test_healthcheck_none_is_an_error(tmp_path):
    path = dockerfile(tmp_path, "FROM scratch\nHEALTHCHECK CMD [\"true\"]\nHEALTHCHECK NONE\n")
    with pytest.raises(HealthcheckError, match=re.escape(f"{path}:3: HEALTHCHECK NONE")):
        parse_healthcheck(path)


def test_only_the_final_stage_counts(tmp_path):
    path = dockerfile(tmp_path, 'FROM a AS build\nHEALTHCHECK CMD ["true"]\nFROM b\nCMD ["x"]\n')
    with pytest.raises(HealthcheckError, match="no HEALTHCHECK instruction in its final stage"):
        parse_healthcheck(path)
    path.write_text('FROM a AS build\nHEALTHCHECK CMD ["false"]\nFROM b\nHEALTHCHECK CMD ["true"]\n')
    assert parse_healthcheck(path).command == ("true",)


def test_the_last_healthcheck_wins_and_omitted_options_take_dockers_defaults(tmp_path):
    path = dockerfile(tmp_path, 'FROM a\nHEALTHCHECK --interval=1s CMD ["first"]\nhealthcheck CMD ["second", "x"]\n')
    check = parse_healthcheck(path)
    assert check.command == ("second", "x")
    assert (check.interval, check.timeout, check.start_period, check.retries) == (
        DEFAULTS["interval"], DEFAULTS["timeout"], DEFAULTS["start-period"], DEFAULTS["retries"])
    assert check.source == f"{path}:3"


def test_continuations_and_comments_inside_them_are_joined_like_docker_does(tmp_path):
    path = dockerfile(tmp_path, (
        "FROM a\n"
        "HEALTHCHECK --interval=1m30s \\\n"
        "    # a comment line inside the instruction is dropped\n"
        "    --timeout=500ms --start-period=0s --start-interval=2s --retries=5 \\\n"
        '    CMD ["probe", "--flag"]\n'
    ))
    check = parse_healthcheck(path)
    assert (check.interval, check.timeout, check.start_period, check.start_interval, check.retries) == (
        90.0, 0.5, 0.0, 2.0, 5)
    assert check.command == ("probe", "--flag")
    assert check.source == f"{path}:2"


def test_shell_form_runs_under_sh_as_in_docker(tmp_path):
    path = dockerfile(tmp_path, "FROM a\nHEALTHCHECK CMD wget -q -O /dev/null http://127.0.0.1/ || exit 1\n")
    assert parse_healthcheck(path).command == ("/bin/sh", "-c", "wget -q -O /dev/null http://127.0.0.1/ || exit 1")
    # Not valid JSON: Docker falls back to shell form too.
    path.write_text("FROM a\nHEALTHCHECK CMD [not, json]\n")
    assert parse_healthcheck(path).command == ("/bin/sh", "-c", "[not, json]")


@pytest.mark.parametrize(("line", "message"), [
    ('HEALTHCHECK --interval 10s CMD ["x"]', "options are written --name=value"),
    ('HEALTHCHECK --every=10s CMD ["x"]', "unknown HEALTHCHECK option --every"),
    ('HEALTHCHECK --interval=10 CMD ["x"]', "--interval=10: not a duration"),
    ('HEALTHCHECK --retries=many CMD ["x"]', "--retries=many"),
    ('HEALTHCHECK --interval=0s CMD ["x"]', "interval and timeout must be positive"),
    ("HEALTHCHECK --interval=10s", "expected HEALTHCHECK \\[OPTIONS\\] CMD command"),
    ('HEALTHCHECK RUN ["x"]', "expected HEALTHCHECK"),
])
def test_malformed_instructions_are_errors_with_file_and_line(tmp_path, line, message):
    path = dockerfile(tmp_path, f"FROM a\n\n{line}\n")
    with pytest.raises(HealthcheckError, match=re.escape(f"{path}:3: ") + message):
        parse_healthcheck(path)


def test_durations_are_read_like_go_durations():
    assert parse_duration("10s") == 10.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1h") == 3600.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("0") == 0.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    for bad in ("10", "", "s", "1m 2s", "-1s", "10x"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_instructions_keep_the_first_line_number():
    text = "# syntax comment\nFROM a\n\nRUN one \\\n  two\nCMD x\n"
    assert instructions(text) == [(2, "FROM a"), (4, "RUN one two"), (6, "CMD x")]


# --- the probe: the Dockerfile's own command against a local HTTP server --------------------------------


class _Server:
    """A TCP server that behaves like a gunicorn worker towards an empty connection: `close` it (a worker
    is free), `answer` bytes (something that is not gunicorn), or stay `silent` (no worker accepts)."""

    def __init__(self, mode: str = "close"):
        self.mode = mode
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = conn.recv(1024)
            self.received.append(data)
            if self.mode == "answer":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            if self.mode == "silent":
                self.held.append(conn)
                continue
            conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def server():
    served = _Server()
    yield served
    served.close()


def test_the_probe_runs_the_dockerfile_command_with_this_python_and_port(server):
    probe = HealthProbe(server.port, env={})
    assert probe.command[0] == sys.executable
    assert probe.command[1:] == list(parse_healthcheck().command[1:])
    assert probe.env == {"PORT": str(server.port)}
    result = probe.run_once()
    assert result.ok, result.output
    assert server.received == [b""], "the probe must send nothing, so that no source counts a request"
    assert (probe.runs, probe.failures, probe.consecutive_failures) == (1, 0, 0)


def test_an_answer_a_silent_server_or_a_closed_port_is_a_failure(server):
    server.mode = "answer"
    probe = HealthProbe(server.port, env={})
    assert not probe.run_once().ok
    server.mode = "close"
    assert probe.run_once().ok
    dead = HealthProbe(free_port(), env={})
    assert not dead.run_once().ok
    assert (probe.runs, probe.failures, dead.runs, dead.failures) == (2, 1, 1, 1)
    server.mode = "silent"
    started = time.monotonic()
    assert not probe.run_once().ok
    assert time.monotonic() - started < parse_healthcheck().timeout + 1


def test_the_probe_runs_on_the_interval_in_a_daemon_thread_until_stopped(server):
    fast = dataclasses.replace(parse_healthcheck(), interval=0.05, retries=2)
    probe = HealthProbe(server.port, env={}, check=fast).start()
    try:
        assert probe._thread.daemon
        with pytest.raises(RuntimeError, match="already running"):
            probe.start()
        deadline = time.monotonic() + 20
        while probe.runs < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert probe.runs >= 3 and probe.failures == 0 and not probe.unhealthy
        server.mode = "answer"
        while probe.consecutive_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert probe.unhealthy
    finally:
        probe.stop()
    runs = probe.runs
    time.sleep(0.2)
    assert probe.runs == runs, "the probe kept running after stop()"
    assert set(server.received) <= {b""}
