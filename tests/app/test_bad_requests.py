"""Bad requests, sent as raw bytes to the app under the native stack, and how each source counts them.

Every request gets a 4xx (or 200 for HEAD), never a 500, and never costs a gunicorn worker. Requests that
gunicorn itself rejects (a malformed request line, a header over its limit, a request target that is not
valid) never reach the WSGI app, so neither in-app source (the OTel SDK, the app's own /metrics) counts
them, and no span exists. Requests that do reach Flask are counted by both as what they were: POST / and
DELETE / as 405 with their own method, HEAD / as HEAD 200.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import psutil
import pytest

from tooling.native.flood import raw_exchange
from tooling.native.stack import NativeStack, by_labels, poll

pytestmark = pytest.mark.integration

# gunicorn's defaults (app/gunicorn.conf.py sets neither): a header line, counted with its CRLF, may be
# at most limit_request_field_size bytes; the request line at most limit_request_line.
LIMIT_REQUEST_FIELD_SIZE = 8190
LIMIT_REQUEST_LINE = 4094


def request(method: bytes, target: bytes = b"/", headers: bytes = b"") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


def header_of(size_with_crlf: int) -> bytes:
    """One header line that takes exactly `size_with_crlf` bytes, CRLF included."""
    name = b"X-Padding: "
    return name + b"a" * (size_with_crlf - len(name) - 2) + b"\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    times: int  # distinct counts per case, so a count can only match the case it belongs to
    status: int
    # What the in-app sources should record, or None if gunicorn rejects it before the app:
    otel: tuple[str, str | None, str] | None = None  # (http_request_method, http_route, status)
    manual: tuple[str, str, str] | None = None  # (method, path, status)


CASES = [
    Case("malformed request line", b"THIS IS NOT HTTP\r\n\r\n", 2, 400),
    Case("request line over limit_request_line", request(b"GET", b"/" + b"a" * LIMIT_REQUEST_LINE), 1, 414),
    Case("header line over limit_request_field_size", request(b"GET", headers=header_of(
        LIMIT_REQUEST_FIELD_SIZE + 1)), 3, 431),
    Case("header line at limit_request_field_size", request(b"GET", headers=header_of(LIMIT_REQUEST_FIELD_SIZE)),
         1, 200, ("GET", "/", "200"), ("GET", "/", "200")),
    Case("raw byte 0xff in the request target", request(b"GET", b"/\xff"), 4, 400),
    # Flask answers 405 with no matched rule: the OTel span and metric have no http.route.
    Case("POST /", request(b"POST", headers=b"Content-Length: 0\r\n"), 3, 405,
         ("POST", None, "405"), ("POST", "/", "405")),
    Case("DELETE /", request(b"DELETE"), 2, 405, ("DELETE", None, "405"), ("DELETE", "/", "405")),
    Case("HEAD /", request(b"HEAD"), 4, 200, ("HEAD", "/", "200"), ("HEAD", "/", "200")),
    # Last: the app still serves ordinary requests after all of the above.
    Case("GET /", request(b"GET"), 5, 200, ("GET", "/", "200"), ("GET", "/", "200")),
]


def expected(source: str) -> Counter:
    totals: Counter = Counter()
    for case in CASES:
        key = getattr(case, source)
        if key is not None:
            totals[key] += case.times
    return totals


OTEL = ('sum by (http_request_method, http_route, http_response_status_code) '
        '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
MANUAL = 'sum by (method, path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'


@pytest.fixture(scope="module")
def sent(tmp_path_factory):
    stack = NativeStack(tmp_path_factory.mktemp("bad-requests")).up()
    try:
        master = psutil.Process(stack.app.process.pid)
        workers_before = poll(lambda: {c.pid for c in master.children()} if len(master.children()) == 2
                              else None, 20, "two gunicorn workers", 0.2)
        answers = {case.name: [raw_exchange("127.0.0.1", stack.ports.app, case.data, head_only=True)
                               for _ in range(case.times)] for case in CASES}
        workers_after = {c.pid for c in master.children()}
        master_alive = master.is_running() and stack.app.process.poll() is None

        def otel():
            return by_labels(stack.query(OTEL), "http_request_method", "http_route", "http_response_status_code")

        def manual():
            return by_labels(stack.query(MANUAL), "method", "path", "status")

        def spans():
            return Counter((s.attributes.get("http.request.method"), s.attributes.get("http.route"),
                            str(s.attributes.get("http.response.status_code")))
                           for s in stack.tempo_sink.server_spans())

        # OTEL_METRIC_EXPORT_INTERVAL (10 s) + batch (1 s) + scrape (5 s), with margin.
        poll(lambda: otel() == expected("otel") and manual() == expected("manual") and spans() == expected("otel"),
             45, f"otel, manual and spans counting each bad request as what it was: {expected('otel')}")
        span_names = Counter(s.span.name for s in stack.tempo_sink.server_spans())
        yield dict(answers=answers, workers_before=workers_before, workers_after=workers_after,
                   master_alive=master_alive, otel=otel(), manual=manual(), spans=spans(), span_names=span_names,
                   log=stack.app.log())
    finally:
        stack.down()


def test_every_bad_request_gets_a_client_error_and_never_a_500(sent):
    print()
    for case in CASES:
        statuses = [a.status for a in sent["answers"][case.name]]
        print(f"  {case.name:45} x{case.times}: {statuses}")
        assert statuses == [case.status] * case.times, (case.name, sent["answers"][case.name])
    assert all(a.status is not None and a.status < 500 for answers in sent["answers"].values() for a in answers)


def test_no_worker_died_and_the_master_lives(sent):
    assert sent["workers_before"] and sent["workers_after"] == sent["workers_before"]
    assert sent["master_alive"]
    assert "WORKER TIMEOUT" not in sent["log"] and "Traceback" not in sent["log"]


def test_gunicorn_rejects_before_the_app_and_logs_each_one(sent):
    rejected = sum(case.times for case in CASES if case.otel is None)
    warnings = [line for line in sent["log"].splitlines() if "Invalid request from ip=127.0.0.1" in line]
    print(f"\ngunicorn: {len(warnings)} rejections logged, e.g. {warnings[:1]}")
    assert len(warnings) == rejected


def test_otel_counts_each_request_that_reached_the_app_as_what_it_was(sent):
    print(f"\notel (method, route, status): {dict(sent['otel'])}")
    assert sent["otel"] == expected("otel")


def test_manual_metrics_count_each_request_that_reached_the_app_as_what_it_was(sent):
    print(f"\nmanual (method, path, status): {dict(sent['manual'])}")
    assert sent["manual"] == expected("manual")


def test_one_server_span_per_request_that_reached_the_app(sent):
    print(f"\nserver spans (method, route, status): {dict(sent['spans'])}; names {dict(sent['span_names'])}")
    assert sent["spans"] == expected("otel")
