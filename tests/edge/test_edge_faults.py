"""The edge (Caddy, edge/caddy-config.json) under bad input and faults: it must not become the weak link.

Each test runs the native stack (tooling.native: the real app, collector, Prometheus and Caddy) and talks
to the edge as users do. Bad input that Caddy's HTTP server rejects never reaches the app and is counted by
no source; the app stopping is a 502 for every request, counted by the edge exactly as the client saw it,
and the edge recovers without a restart when the app is back; a collector that hangs costs the edge's
telemetry for a while, never its answers or their latency.

The flood and the 10,000-path scan through the edge live with the others of their kind, in
tests/collector/test_reliability.py and tests/collector/test_cardinality.py.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import pytest
from stackfiles import EXPECTED_STATUS, assert_unaffected, phase
from test_bad_requests import header_of

from tooling.native import edge
from tooling.native.flood import raw_exchange
from tooling.native.sinks import Span
from tooling.native.stack import NativeStack, by_labels, poll

pytestmark = pytest.mark.integration

APP_SERVER = edge.load_config()["apps"]["http"]["servers"][edge.APP_SERVER]
READ_HEADER_TIMEOUT = float(APP_SERVER["read_header_timeout"].removesuffix("s"))
# Caddy's max_header_bytes is Go's http.Server.MaxHeaderBytes, which net/http enforces with 4096 bytes of
# "bufio slop" on top (server.go, initialReadLimitSize): measured on the Caddy of CADDY_VERSION, a whole head (request
# line and headers) of max_header_bytes + 4110 bytes passes, one byte more is a 431. So 8192 lets a
# 12 KiB header line through to gunicorn, whose own limit is 8190 bytes per line.
# gunicorn's default (app/gunicorn.conf.py sets none): one header line, CRLF included, at most this.
GUNICORN_FIELD_LIMIT = 8190

# What users see of the app, through the edge, per path (locustfile.py's weights).
MIX = ["/"] * 10 + ["/health"] * 2 + ["/fail"]

# The edge's SERVER span per request, named by route ("GET /"; "GET" for the catch-all), with its status.
EDGE_BY_ROUTE = ('sum by (span_name, http_response_status_code) '
                 '(traces_spanmetrics_calls_total{telemetry_source="edge", span_kind="SPAN_KIND_SERVER"})')
OTEL_BY_ROUTE = ('sum by (http_route, http_response_status_code) '
                 '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
MANUAL_BY_PATH = 'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'
# Caddy's own count per status on the app listener (job edge, its :9180, no telemetry_source).
CADDY_BY_CODE = ('sum by (code) (caddy_http_request_duration_seconds_count'
                 '{job="edge", telemetry_source="", server="app"})')
# Caddy's own metrics count each request of the app listener twice, both samples labelled handler
# "tracing" (seen: 6 for 3 requests answered 200, 2 for one /fail): the matched route and the named
# route `app` it invokes both begin with a tracing handler, and each is instrumented.
CADDY_SAMPLES_PER_REQUEST = 2


def edge_counts(stack: NativeStack) -> Counter:
    """The edge's span metrics as Counter((path, status)): span "GET /x" is path "/x", "GET" is "/**"."""
    counts: Counter = Counter()
    for (name, status), n in by_labels(stack.query(EDGE_BY_ROUTE), "span_name", "http_response_status_code").items():
        counts[(name.partition(" ")[2] or "/**", status)] += n
    return counts


def caddy_counts(stack: NativeStack) -> Counter:
    return Counter({code: n for (code,), n in by_labels(stack.query(CADDY_BY_CODE), "code").items()})


def app_spans(stack: NativeStack) -> list:
    """The app's SERVER spans (the edge's SERVER spans reach the same sink, under service.name "edge")."""
    return [s for s in stack.tempo_sink.server_spans() if s.resource.get("service.name") == "dice-api"]


def edge_server_spans(stack: NativeStack) -> list:
    return [s for s in stack.tempo_sink.spans()
            if s.resource.get("service.name") == "edge" and s.span.kind == Span.SPAN_KIND_SERVER]


def drive(port: int, seconds: float, connections: int = 4, pause: float = 0.02) -> list[tuple]:
    """Users through the edge: `connections` keep-alive clients cycling through MIX with a short pause.

    Returns one row per request, (end time, path, status, ms), the shape of locust's timeline that
    tests/stackfiles.py's phase() reads; a request that got no HTTP answer is status 0.
    """
    rows: list[tuple] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def user(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, i = [], offset
        while time.monotonic() < stop_at:
            path = MIX[i % len(MIX)]
            i += 1
            started = time.monotonic()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                status = 0
            mine.append((time.time(), path, status, (time.monotonic() - started) * 1000))
            time.sleep(pause)
        conn.close()
        with lock:
            rows.extend(mine)

    threads = [threading.Thread(target=user, args=(n * 3,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(rows)


def exactly(expected: Counter, seen: Counter) -> Counter:
    """`seen` if it equals `expected`; else raises with it, so that poll() reports what it last saw."""
    if seen != expected:
        raise AssertionError(f"saw {dict(seen)}")
    return seen


def sent(rows: list[tuple]) -> Counter:
    return Counter((path, str(status)) for _, path, status, _ in rows)


# ------------------------------------------------------------------------- bad input, at the edge


def request(method: bytes = b"GET", target: bytes = b"/", headers: bytes = b"", proto: bytes = b"HTTP/1.1") -> bytes:
    return method + b" " + target + b" " + proto + b"\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    status: int  # what the edge itself answers
    slow: bool = False  # a head too short to judge: answered when read_header_timeout ends
    # Answered by the edge's first route (a handler, so Caddy's own metrics count it), not by Go's parser.
    guarded: bool = False


CASES = [
    Case("malformed request line", b"THIS IS NOT HTTP\r\n\r\n", 400),
    Case("HTTP/0.9 request line", b"GET /\r\n\r\n", 400, slow=True),
    Case("request line without a version", b"GET / \r\n\r\n", 400, slow=True),
    Case("invalid character in the method", request(b"G(T"), 400),
    Case("space in a header name", request(headers=b"Bad Header: y\r\n"), 400),
    Case("header line without a colon", request(headers=b"nocolon\r\n"), 400),
    Case("NUL in a header value", request(headers=b"X-A: a\x00b\r\n"), 400),
    Case("raw byte 0xff in the Host", b"GET / HTTP/1.1\r\nHost: a\xffb\r\n\r\n", 400),
    Case("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    Case("space in the request target", request(target=b"/a b"), 400),
    Case("absurd Content-Length", request(b"POST", headers=b"Content-Length: " + b"9" * 30 + b"\r\n"), 400),
    Case("negative Content-Length", request(b"POST", headers=b"Content-Length: -1\r\n"), 400),
    Case("two different Content-Lengths", request(b"POST", headers=b"Content-Length: 1\r\nContent-Length: 2\r\n")
         + b"ab", 400),
    # RFC 9112 6.1: a transfer coding the server does not understand is 501 (Not Implemented).
    Case("unknown Transfer-Encoding", request(b"POST", headers=b"Transfer-Encoding: gzip\r\n"), 501),
    # RFC 9110 15.6.6: a major version the server does not support is 505.
    Case("HTTP/2.0 on an HTTP/1 connection", request(proto=b"HTTP/2.0"), 505),
    Case("HTTP/3.1", request(proto=b"HTTP/3.1"), 505),
    # Over gunicorn's per-line limit (it would answer 431 itself): the edge must not pass it on.
    Case("header line over gunicorn's limit_request_field_size",
         request(headers=header_of(GUNICORN_FIELD_LIMIT + 1)), 431),
    Case("header line of 8 KiB + 1", request(headers=header_of(8 * 1024 + 1)), 431),
    # Bytes that are not UTF-8 where the edge's span would carry them (url.path decoded, user_agent.original,
    # client.address from X-Forwarded-For): protobuf refuses such a string, and the edge's exporter would lose
    # the whole batch, other users' spans with it. The edge's first route answers them 400, untraced.
    Case("percent-encoded 0xff in the path", request(target=b"/%ff"), 400, guarded=True),
    Case("raw 0xff in the User-Agent", request(headers=b"User-Agent: a\xffb\r\n"), 400, guarded=True),
    Case("raw 0xff in X-Forwarded-For", request(headers=b"X-Forwarded-For: 10.0.0.1\xff\r\n"), 400, guarded=True),
]
# After them, requests the edge must pass on, so that "nothing forwarded" is judged on a pipeline seen working.
GOOD = [("GET /", request(), 5), ("GET / with a 2 KiB header", request(headers=header_of(2048)), 3)]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    stack = NativeStack(tmp_path_factory.mktemp("edge-bad-input")).up()
    try:
        edge_pid = stack.edge.process.pid
        master = psutil.Process(stack.app.process.pid)
        workers = poll(lambda: {c.pid for c in master.children()} if len(master.children()) == 2 else None, 20,
                       "two gunicorn workers", 0.2)
        timeout = READ_HEADER_TIMEOUT + 10

        def exchange(case: Case):
            started = time.monotonic()
            answer = raw_exchange("127.0.0.1", stack.ports.edge, case.data, timeout=timeout, head_only=True)
            return answer, time.monotonic() - started

        # The slow ones all wait out the same timeout, side by side.
        with ThreadPoolExecutor(len(CASES)) as pool:
            slow = {c.name: pool.submit(exchange, c) for c in CASES if c.slow}
            answers = {c.name: exchange(c) for c in CASES if not c.slow}
            answers |= {name: future.result() for name, future in slow.items()}
        good = {name: [raw_exchange("127.0.0.1", stack.ports.edge, data, head_only=True).status for _ in range(n)]
                for name, data, n in GOOD}
        expected = Counter({("/", "200"): sum(n for *_, n in GOOD)})

        def counted():
            seen = {"edge": edge_counts(stack),
                    "otel": by_labels(stack.query(OTEL_BY_ROUTE), "http_route", "http_response_status_code"),
                    "manual": by_labels(stack.query(MANUAL_BY_PATH), "path", "status"),
                    "caddy": caddy_counts(stack)}
            # Every source's counters are cumulative: once each shows the good requests (sent last), it
            # includes whatever it counted of the bad input before them.
            if not all(seen[s][("/", "200")] >= expected[("/", "200")] for s in ("edge", "otel", "manual")):
                raise AssertionError(f"not yet: {seen}")
            return seen

        # The edge exports spans every 5 s (Go SDK default), the app its metrics every 10 s; scrape 5 s.
        seen = poll(counted, 60, f"every source counting the {dict(expected)} good requests")
        yield dict(answers=answers, good=good, expected=expected, seen=seen, spans=app_spans(stack),
                   app_log=stack.app.log(), edge_log=stack.edge.log(), workers_before=workers,
                   workers_after={c.pid for c in master.children()},
                   edge_alive=stack.edge.process.poll() is None and stack.edge.process.pid == edge_pid)
    finally:
        stack.down()


def test_the_edge_answers_bad_input_itself_with_a_client_error(bad_input):
    print()
    wrong = {}
    for case in CASES:
        answer, seconds = bad_input["answers"][case.name]
        # Caddy's reverse_proxy adds "Via: 1.1 Caddy" to every answer it relays: without it, the edge
        # (Go's HTTP server, before any handler) answered on its own.
        relayed = b"\r\nvia:" in answer.head.lower()
        print(f"  {case.name:52} {answer.status} in {seconds:4.1f}s {'RELAYED from the app' if relayed else ''}")
        if answer.status != case.status or relayed:
            wrong[case.name] = (answer.status, answer.head[:200])
        limit = READ_HEADER_TIMEOUT + 3 if case.slow else 3
        assert seconds < limit, f"{case.name}: answered after {seconds:.1f}s (limit {limit}s)"
    assert not wrong, f"not answered by the edge itself with the expected status: {wrong}"
    assert bad_input["good"] == {name: [200] * n for name, _, n in GOOD}, bad_input["good"]


def test_nothing_bad_is_forwarded_and_no_source_counts_it(bad_input):
    seen, expected = bad_input["seen"], bad_input["expected"]
    rejections = [line for line in bad_input["app_log"].splitlines() if "Invalid request from" in line]
    spans = Counter((s.attributes.get("http.route"), str(s.attributes.get("http.response.status_code")))
                    for s in bad_input["spans"])
    print(f"\nedge span metrics {dict(seen['edge'])}\ncaddy by code {dict(seen['caddy'])}\n"
          f"app otel {dict(seen['otel'])}\napp manual {dict(seen['manual'])}\napp SERVER spans {dict(spans)}\n"
          f"gunicorn rejections {rejections[:3]}")
    # The app saw the good requests and nothing else: nothing it rejected, nothing it answered.
    assert not rejections, rejections
    assert seen["otel"] == expected and seen["manual"] == expected and spans == expected
    # Neither do the edge's span metrics, nor Caddy's own counts: Go's HTTP server rejects these before
    # any handler runs, so no SERVER span and no caddy_http_* sample exists for them.
    assert seen["edge"] == expected
    # The guard's 400s are answered by a handler: Caddy's metrics count them (once: no tracing around them).
    guarded = sum(1 for case in CASES if case.guarded)
    assert seen["caddy"] == Counter({"200": CADDY_SAMPLES_PER_REQUEST * sum(expected.values()),
                                     "400": guarded}), seen["caddy"]


def test_bad_input_costs_no_process(bad_input):
    assert bad_input["edge_alive"]
    assert bad_input["workers_after"] == bad_input["workers_before"]
    assert "panic" not in bad_input["edge_log"].lower()


# ----------------------------------------------------------------------------- the app restarting


@pytest.fixture
def stack(tmp_path):
    native = NativeStack(tmp_path).up()
    yield native
    native.down()


def test_app_restart_is_counted_as_502s_and_the_edge_recovers_alone(stack):
    edge_process = psutil.Process(stack.edge.process.pid)
    up = drive(stack.ports.edge, 5)
    stack.app.stop()
    stopped = time.time()
    down = drive(stack.ports.edge, 4)
    stack.start_app()
    back = time.time()
    again = drive(stack.ports.edge, 5)
    rows = up + down + again
    expected = sent(rows)
    seen = poll(lambda: exactly(expected, edge_counts(stack)), 60,
                f"the edge's span metrics equal to what the client saw, {dict(expected)}", 2)
    caddy = poll(lambda: (c := caddy_counts(stack))["502"] == CADDY_SAMPLES_PER_REQUEST * sent(down).total() and c,
                 30, f"Caddy's own count of the {sent(down).total()} 502s")
    print(f"\napp up {dict(sent(up))}\napp stopped {dict(sent(down))}\napp back {dict(sent(again))}\n"
          f"edge span metrics {dict(seen)}\ncaddy by code {dict(caddy)}\n"
          f"latency while stopped: {phase(down, stopped, back)}")
    assert all(EXPECTED_STATUS[path] == status for _, path, status, _ in up), sent(up)
    # Every request while the app was down got a 502 from the edge, quickly (connection refused).
    assert down and {status for *_, status, _ in down} == {502}, sent(down)
    assert phase(down, stopped, back)["p95_ms"] < 1000
    # The first request after start_app() (which waits for the app's port) succeeds: no retry, no restart.
    assert all(EXPECTED_STATUS[path] == status for _, path, status, _ in again), sent(again)
    assert seen == expected
    assert caddy["502"] == CADDY_SAMPLES_PER_REQUEST * sent(down).total()
    assert stack.edge.process.poll() is None and edge_process.is_running()
    assert stack.edge.process.pid == edge_process.pid


# ------------------------------------------------------------------------------- the collector down


def test_a_hung_collector_leaves_the_edge_serving_and_its_spans_flow_again(stack):
    """The collector SIGSTOPped (accepts connections, answers nothing: the edge's exports hang until their
    deadline), then resumed."""
    collector = stack.collector.process
    started = time.time()
    before = drive(stack.ports.edge, 6)
    collector.send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        during = drive(stack.ports.edge, 12)
    finally:
        collector.send_signal(signal.SIGCONT)
    resumed = time.time()
    after = drive(stack.ports.edge, 6)
    # Spans of requests that started a second after the resume: the edge's queue has drained by then.
    fresh_after = [r for r in after if r[0] - r[3] / 1000 >= resumed + 1]

    def fresh_spans():
        return [s for s in edge_server_spans(stack) if s.span.start_time_unix_nano / 1e9 >= resumed + 1]

    spans = poll(lambda: len(s := fresh_spans()) >= len(fresh_after) and s, 30,
                 f"an edge SERVER span for each of the {len(fresh_after)} requests after the collector resumed")
    phases = [phase(before, started + 1, stopped), phase(during, stopped, resumed), phase(after, resumed, 1e12)]
    during_spans = [s for s in edge_server_spans(stack) if stopped <= s.span.start_time_unix_nano / 1e9 < resumed]
    print(f"\ncollector hung: before {phases[0]}\n  during {phases[1]}\n  after {phases[2]}\n"
          f"  edge SERVER spans from the hang that arrived {len(during_spans)} of {len(during)}; "
          f"after the resume {len(spans)} for {len(fresh_after)} requests\n"
          f"  edge log: {[line for line in stack.edge.log().splitlines() if 'export' in line][-3:]}")
    # Served right and as fast: the median within the baseline's noise (stackfiles.assert_unaffected).
    assert_unaffected(*phases)
    assert not [r for r in before + during + after if r[2] == 0], "transport errors"
    assert stack.edge.process.poll() is None
    # Every one of them, and no more than the few requests in flight across the boundary (one per client).
    assert len(fresh_after) <= len(spans) <= len(fresh_after) + 4, (len(spans), len(fresh_after))
    os.kill(collector.pid, 0)  # the collector itself survived the pause
