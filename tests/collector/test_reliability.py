"""Faults under load: a dead backend must never make the app fail or slow down noticeably.

Runs the native stack (tests/collector/test_pipeline.py) and locust, breaks a backend mid-run (killed, hung, or a
name that no longer resolves), and compares the app's answers and latency, as locust saw them, before,
during and after the outage. A flood from tooling.native.flood then pushes the whole pipeline, through the edge
as users come in, as hard as the machine allows and checks that nothing crashes (the edge included), the
collector stays inside its compose memory budget, and every telemetry count, the edge's included, is exact
again once the flood is over.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from unittest import mock

import psutil
import pytest
import yaml
from stackfiles import PeriodicReader, assert_unaffected, phase, traffic_started

from tooling.native import stack as native
from tooling.native.stack import (
    COLLECTOR_CONFIG,
    COMPOSE_FILE,
    REPO_ROOT,
    NativeStack,
    by_labels,
    locust_result,
    poll,
    run_locust,
)

pytestmark = pytest.mark.integration

USERS = 20


@pytest.fixture
def stack(tmp_path):
    native = NativeStack(tmp_path).up()
    yield native
    native.down()


def test_pyroscope_unreachable_leaves_the_app_unaffected(stack):
    seconds, stop_at = 24, 10
    started = time.time()
    locust = run_locust(stack.app_url, seconds, USERS, stack.run_dir, background=True)
    time.sleep(stop_at)
    stopped = time.time()
    stack.pyroscope_sink.stop()  # the port now refuses connections
    uploads_at_stop = len(stack.pyroscope_sink.snapshot())
    locust.wait(seconds + 60)
    truth = locust_result(stack.run_dir)

    before = phase(truth["timeline"], started + 3, stopped)
    during = phase(truth["timeline"], stopped, started + seconds)
    spans_during = [s for s in stack.tempo_sink.spans() if s.span.start_time_unix_nano / 1e9 > stopped]
    print(f"\npyroscope down: before {before}\n  during {during}\n  uploads before the outage "
          f"{uploads_at_stop}, spans exported during it {len(spans_during)}")
    assert uploads_at_stop > 0, "profiles never arrived, so the outage proved nothing"
    assert_unaffected(before, during)
    assert spans_during, "traces stopped when Pyroscope went away"
    assert stack.app.process.poll() is None


# ----------------------------------------------------------------------------------------- helpers


def gunicorn_processes(app: native.Managed, workers: int = 2) -> tuple[psutil.Process, set[int]]:
    """The master (opentelemetry-instrument execs gunicorn, so it keeps the pid) and its worker pids."""
    master = psutil.Process(app.process.pid)
    pids = poll(lambda: {c.pid for c in master.children()} if len(master.children()) == workers else None, 20,
                f"{workers} gunicorn workers", 0.2)
    assert pids, f"expected {workers} gunicorn workers under {master.pid}"
    return master, pids


def scalar(stack: NativeStack, expr: str) -> int | None:
    result = stack.query(expr)
    return int(float(result[0]["value"][1])) if result else None


OTEL_BY_ROUTE = ('sum by (http_route, http_response_status_code) '
                 '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
MANUAL_BY_PATH = 'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'


class HungListener:
    """Accepts TCP connections on a port and holds them, reading what arrives and never answering.

    What a collector looks like when it hangs (deadlocked, paused, or behind a network that drops
    replies): the kernel completes the TCP handshake, so the client's connect succeeds, and then nothing.
    """

    def __init__(self, port: int):
        self.port = port
        self.accepted = 0
        self.received = b""  # the first bytes, to show what the client tried to say
        self.bytes_received = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(64)
        self._server.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="hung-collector", daemon=True)

    def start(self) -> HungListener:
        self._thread.start()
        return self

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    if key.fileobj is self._server:
                        try:
                            conn, _ = self._server.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(False)
                        self.accepted += 1
                        self._connections.append(conn)
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # the client gave up: forget the socket, keep holding the others
                        selector.unregister(key.fileobj)
                        continue
                    self.bytes_received += len(data)
                    if len(self.received) < 64:
                        self.received += data[: 64 - len(self.received)]

    def close(self) -> None:
        """Stop listening and drop every held connection (the hang ends). Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for conn in self._connections:
            conn.close()
        self._server.close()


# --------------------------------------------------------------------------- A. a collector that hangs


@dataclass(frozen=True)
class SpanExport:
    """How the app's SDK batches and exports spans: what SDK 1.45.1 makes of the app's environment."""

    schedule_delay: float  # s between export calls while the queue holds less than a batch (OTEL_BSP_SCHEDULE_DELAY)
    max_queue_size: int  # spans a process holds; beyond it, each new span drops the oldest (OTEL_BSP_MAX_QUEUE_SIZE)
    max_export_batch_size: int  # spans one export call takes from the queue (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
    export_timeout: float  # s, one export call's deadline, retries included (OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT)
    sampler: str


def span_export_settings(pid: int) -> SpanExport:
    """Asks the SDK in .venv, under the running app's own environment (/proc/<pid>/environ), what it uses.

    Not hard-coded and not re-parsed: the same functions the app's BatchSpanProcessor and OTLP span exporter
    call read the same variables. OTEL_BSP_EXPORT_TIMEOUT is read by the SDK but unused ("No way currently
    to pass timeout to export"), so the exporter's own deadline is the one that acts.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with mock.patch.dict(os.environ, psutil.Process(pid).environ(), clear=True):
        exporter = OTLPSpanExporter()
        try:
            timeout = exporter._timeout
        finally:
            exporter.shutdown()
        return SpanExport(BatchSpanProcessor._default_schedule_delay_millis() / 1000,
                          BatchSpanProcessor._default_max_queue_size(),
                          BatchSpanProcessor._default_max_export_batch_size(), timeout,
                          sampling._get_from_env_or_default().get_description())


SCHEDULING_SLACK = 1.0  # s: a loaded 2-core box runs the SDK's export thread late, never early


def span_loss_window(killed: float, back: float, sdk: SpanExport) -> tuple[float, float]:
    """The only span end times a collector outage from `killed` to `back` can lose spans from.

    How SDK 1.45.1 exports spans, per process (sdk/_shared_internal BatchProcessor and the OTLP gRPC
    exporter's _export): one thread loops "sleep schedule_delay (cut short when a batch is queued), pop up
    to max_export_batch_size of the oldest spans, export them". An export call retries until its deadline,
    export_timeout after it started, then drops its batch: against a listener that never answers, the first
    attempt uses the whole deadline. Spans that end meanwhile wait in the queue, and are dropped only if it
    overflows (the caller checks it cannot). So the lost spans are exactly those of failed calls, and a call
    holds the spans that ended between the previous call's pop and its own.
    - Lower end: the first failed call popped at the kill at the earliest (a call to the live collector takes
      milliseconds), and the call before it popped at most schedule_delay earlier.
    - Upper end: a call that pops once the collector is `back` gets through: its first attempt, or, if the
      channel is still failing, the retry on a new channel a second later, well inside its deadline. So every
      span that ended after `back` is sent.
    """
    return killed - sdk.schedule_delay - SCHEDULING_SLACK, back



HTTP2_PREFACE = b"PRI * HTTP/2.0"


def test_hung_collector_times_out_exports_and_the_app_carries_on(stack):
    """Real collector, then a listener that accepts and never answers on its port, then the real one again."""
    # locust's run has room for its own start-up (up to 6 s seen on a loaded box): the phases count from
    # its first request.
    seconds, hang_at, replace_at = 48, 10, 30
    master, workers = gunicorn_processes(stack.app)
    locust = run_locust(stack.app_url, seconds, USERS, stack.run_dir, background=True)
    started = traffic_started(stack)
    time.sleep(max(0.0, started + hang_at - time.time()))
    killed = time.time()
    stack.collector.process.kill()
    stack.collector.process.wait()
    hung = HungListener(stack.ports.otlp_grpc).start()
    try:
        hung_since = time.time()
        span_requests_at_hang = len(stack.tempo_sink.trace_requests)
        time.sleep(replace_at - hang_at - 2)
        # Mid-hang: Prometheus has no OTel data (the collector's exporter is gone, the app's exports hang).
        up_collector = scalar(stack, 'up{job="otel-collector"}')
        otel_series_during = stack.query(
            'count(http_server_request_duration_seconds_count{telemetry_source="otel"})')
        time.sleep(2)
        span_requests_before_replace = len(stack.tempo_sink.trace_requests)
    finally:
        hung.close()
    replaced = time.time()
    stack.start_collector()
    back = time.time()  # the collector's health check answers: its receivers are up
    locust.wait(seconds + 60)
    truth = locust_result(stack.run_dir)
    sdk = span_export_settings(master.pid)

    before = phase(truth["timeline"], started + 3, hung_since)
    during = phase(truth["timeline"], hung_since, replaced)
    after = phase(truth["timeline"], back + 3, float("inf"))
    expected = Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})
    sent = sum(expected.values())
    # The SDK's counters are cumulative: once an export gets through, the totals include the hang.
    recovered = poll(lambda: by_labels(stack.query(OTEL_BY_ROUTE), "http_route", "http_response_status_code")
                     == expected, 45, f"otel counts equal to locust's {dict(expected)} after the hang", 2)
    otel_total = scalar(stack, 'sum(http_server_request_duration_seconds_count{telemetry_source="otel"})')
    recovered_at = time.time()
    # Where the hang may cost spans (span_loss_window), compared with what locust saw. A locust row is
    # (end time, route, status, ms); the request's SERVER span starts after the request left and ends before
    # its answer arrived. So "no span lost before `low`" is: SERVER spans that ended before `low` are at least
    # the requests answered before it; "none lost after `high`": spans that ended after `high` are at least
    # the requests sent after it. Exact but for the few requests in flight across a boundary (20 users).
    low, high = span_loss_window(killed, back, sdk)
    answered_before = sum(1 for t, *_ in truth["timeline"] if t < low)
    sent_after = sum(1 for t, _, _, ms in truth["timeline"] if t - ms / 1000 >= high)

    def server_span_ends():
        return [s.span.end_time_unix_nano / 1e9 for s in stack.tempo_sink.server_spans()]

    # Spans go every schedule_delay: wait until those after the outage are in.
    poll(lambda: sum(1 for end in server_span_ends() if end >= high) >= sent_after, 3 * sdk.schedule_delay + 10,
         f"a SERVER span for each of the {sent_after} requests sent after the collector was back")
    ends = server_span_ends()
    spans_before, spans_after = sum(1 for end in ends if end < low), sum(1 for end in ends if end >= high)
    lost = sent - len(ends)
    in_window = sum(1 for t, _, _, ms in truth["timeline"] if t >= low and t - ms / 1000 < high)
    made_during_hang = [end for end in ends if hung_since <= end < replaced]
    requests_during_hang = sum(1 for r in truth["timeline"] if hung_since <= r[0] < replaced)
    peak_rate = max(Counter(int(t) for t, *_ in truth["timeline"]).values())
    log = stack.app.log()
    failed_exports = re.findall(r"Failed to export (\w+) to [^,]+, error code: StatusCode\.(\w+)", log)
    print(f"\nhung collector: before {before}\n  hung   {during}\n  after  {after}\n"
          f"  hung listener: {hung.accepted} connections accepted, {hung.bytes_received} bytes received, "
          f"first bytes {hung.received[:24]!r}\n"
          f"  failed exports in the app log {dict(Counter(failed_exports))}\n"
          f"  during the hang: up{{job=otel-collector}}={up_collector}, OTel series {otel_series_during}, "
          f"span export requests reaching Tempo {span_requests_before_replace - span_requests_at_hang}\n"
          f"  requests {sent}, of which {requests_during_hang} during the hang; SERVER spans received "
          f"{len(ends)}, {len(made_during_hang)} of them made during the hang (held in the SDK's queue, sent "
          f"after); lost {lost}, at most the {in_window} requests of the {high - low:.1f} s loss window "
          f"[kill - {killed - low:.1f} s, collector back + 0] that {sdk} allows; "
          f"before the window {spans_before} spans for {answered_before} requests, after it {spans_after} "
          f"for {sent_after}; collector back {back - replaced:.1f} s after the hang ended\n"
          f"  OTel request count {otel_total} ({'exact' if recovered else 'NOT exact'}, "
          f"{recovered_at - replaced:.0f}s after the real collector returned)")

    assert_unaffected(before, during, after)
    # The exporters really talked to the hung listener (gRPC over HTTP/2), and gave up on their deadline.
    assert hung.accepted >= 1 and hung.received.startswith(HTTP2_PREFACE), (hung.accepted, hung.received)
    # The SDK's exporter logger drops a repeat of the same message within 20 s (DuplicateFilter), and the
    # traces and metrics failures share one message, so per worker only the first of them is logged.
    assert any(code == "DEADLINE_EXCEEDED" for _, code in failed_exports), failed_exports
    # Nothing reached any backend while the collector hung.
    assert span_requests_before_replace == span_requests_at_hang
    assert up_collector == 0 and otel_series_during == []
    # Spans: the window's derivation holds only if every span is sampled and no queue overflows, which at the
    # busiest second's rate (all of it in one process, to be safe) for a whole failed cycle it cannot.
    assert sdk.sampler.startswith(("AlwaysOnSampler", "ParentBased{root:AlwaysOnSampler")), sdk
    assert peak_rate * (sdk.export_timeout + sdk.schedule_delay + SCHEDULING_SLACK) < sdk.max_queue_size, \
        (peak_rate, sdk)
    # Only the batches that timed out were lost: none of the spans from before the window or after it.
    assert spans_before >= answered_before, f"spans lost before the hang: {spans_before} for {answered_before}"
    assert spans_after >= sent_after, f"spans lost after the collector was back: {spans_after} for {sent_after}"
    assert 0 < lost <= in_window, (lost, in_window)
    # Spans that ended while the collector hung waited in the SDK's queue and were sent once it was back
    # (nothing reached Tempo during the hang, asserted above).
    assert made_during_hang, f"none of the {requests_during_hang} spans made during the hang arrived"
    # The app is alive, its workers are the same processes (none stuck and killed by gunicorn's timeout).
    assert stack.app.process.poll() is None and master.is_running()
    assert {c.pid for c in master.children()} == workers
    assert "WORKER TIMEOUT" not in log
    # And the real collector brings every count back.
    assert recovered, by_labels(stack.query(OTEL_BY_ROUTE), "http_route", "http_response_status_code")


# -------------------------------------------------------------- A. a Pyroscope whose name does not resolve

UNRESOLVABLE_PYROSCOPE = "http://pyroscope.invalid:4040"  # .invalid never resolves (RFC 6761)


@pytest.fixture
def fast_upload_stack(tmp_path):
    """The native stack with 1 s profile uploads, so a failing upload path runs many times in a test."""
    stack = NativeStack(tmp_path)
    stack.app_settings.overrides["PYROSCOPE_UPLOAD_INTERVAL"] = "1"
    yield stack.up()
    stack.down()


def test_pyroscope_name_that_does_not_resolve_leaves_the_app_unaffected(fast_upload_stack):
    """What compose gives when the pyroscope container is gone: its name no longer resolves.

    A baseline run with the Pyroscope sink, then the same app restarted with an address that does not
    resolve, under the same load.
    """
    stack = fast_upload_stack
    baseline_seconds, seconds = 14, 20
    started = time.time()
    baseline = run_locust(stack.app_url, baseline_seconds, USERS, stack.run_dir, name="baseline")
    before = phase(baseline["timeline"], started + 3, started + baseline_seconds)

    stack.app.stop()
    uploads_before = len(stack.pyroscope_sink.snapshot())  # the stopping workers push what they hold
    stack.app_settings.pyroscope_address = UNRESOLVABLE_PYROSCOPE
    stack.start_app()
    master, workers = gunicorn_processes(stack.app)
    restarted = time.time()
    truth = run_locust(stack.app_url, seconds, USERS, stack.run_dir, name="unresolvable")
    during = phase(truth["timeline"], restarted + 3, restarted + seconds)
    sent = sum(row["count"] for row in truth["sent"])

    def server_spans_since_restart():
        return [s for s in stack.tempo_sink.spans()
                if s.span.kind == 2 and s.span.start_time_unix_nano / 1e9 >= restarted]

    spans = poll(lambda: len(server_spans_since_restart()) >= sent and server_spans_since_restart(), 20,
                 f"a SERVER span for each of the {sent} requests")
    log = stack.app.log()
    warnings = [line for line in log.splitlines() if "WARNING [zerocode.profiling]" in line]
    agent_lines = Counter(re.sub(r"\d+", "N", line)[:160] for line in log.splitlines()
                          if "pyroscope" in line.lower() and "[zerocode" not in line)
    print(f"\npyroscope name unresolvable: baseline {before}\n  unresolvable {during}\n"
          f"  requests {sent}, server spans received {len(spans or [])}, uploads reaching the sink "
          f"{len(stack.pyroscope_sink.snapshot()) - uploads_before} (baseline run: {uploads_before})\n"
          f"  hook warnings {warnings}\n  agent log lines {dict(agent_lines) or 'none'}")
    assert uploads_before > 0, "the baseline run uploaded no profiles, so the comparison proves nothing"
    assert len(stack.pyroscope_sink.snapshot()) == uploads_before, "profiles went somewhere they should not"
    assert_unaffected(before, during)
    assert spans and len(spans) == sent, "traces stopped flowing when Pyroscope's name stopped resolving"
    # Reported once per app start: the hook checks the address in a thread of the gunicorn master, before it
    # forks the workers (threads do not survive fork, and a worker's restart of the agent does not check).
    # The log is this start's alone (the restart truncated it), and the agent itself says nothing more.
    assert [w for w in warnings if f"PYROSCOPE_SERVER_ADDRESS={UNRESOLVABLE_PYROSCOPE} is unreachable" in w] \
        == warnings and len(warnings) == 1, warnings
    assert not agent_lines, agent_lines
    assert stack.app.process.poll() is None and {c.pid for c in master.children()} == workers
    assert "WORKER TIMEOUT" not in log


# -------------------------------------------------------------------------------------- B. a flood

FLOOD_SECONDS = 30
FLOOD_MAX_REQUESTS = 600_000  # far above what 2 cores serve in 30 s: the time bound is the one that acts
FLOOD_STATUS = {"/": 200, "/health": 200, "/fail": 500}


def parse_size(value: str | int) -> int:
    """A compose byte value (512m, 1g, 1048576) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg]?)b?", str(value).strip().lower())
    assert match, f"unreadable size {value!r}"
    return int(float(match[1]) * 1024 ** "bkmg".index(match[2] or "b"))


def collector_memory_budget() -> dict:
    """The collector's memory_limiter limits as they work out in compose: a percentage of its mem_limit."""
    mem_limit = parse_size(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["otel-collector"]["mem_limit"])
    limiter = yaml.safe_load(COLLECTOR_CONFIG.read_text())["processors"]["memory_limiter"]
    return {"mem_limit": mem_limit, "limit": mem_limit * limiter["limit_percentage"] // 100,
            "spike": mem_limit * limiter["spike_limit_percentage"] // 100}


class Sampler:
    """Every 0.5 s: the collector's RSS, and whether the collector, Prometheus and the app's processes live."""

    def __init__(self, stack: NativeStack, master: psutil.Process, workers: set[int]):
        self.stack, self.master, self.workers = stack, master, workers
        self.collector = psutil.Process(stack.collector.process.pid)
        self.rss: list[int] = []
        self.deaths: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.rss.append(self.collector.memory_info().rss)
            except psutil.Error as exc:
                self.deaths.append(f"collector: {exc}")
            for name, managed in (("collector", self.stack.collector), ("prometheus", self.stack.prometheus),
                                  ("app", self.stack.app), ("edge", self.stack.edge)):
                if managed.process.poll() is not None:
                    self.deaths.append(f"{name} exited {managed.process.returncode}")
            try:
                workers = {c.pid for c in self.master.children()}
            except psutil.Error as exc:
                workers = set()
                self.deaths.append(f"gunicorn master: {exc}")
            if workers != self.workers:
                self.deaths.append(f"workers changed: {sorted(self.workers)} -> {sorted(workers)}")
            if self.deaths:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(5)


# The collector's own counters of data it refused, failed or dropped, as Prometheus scraped them from its
# :8888 (job otel-collector-internal). Names as the collector v0.158 exposes them.
COLLECTOR_LOSS_COUNTERS = ('{job="otel-collector-internal", __name__=~"otelcol_(receiver_(refused|failed)|'
                           'exporter_(send|enqueue)_failed|processor_memory_limiter_refused|processor_refused|'
                           'processor_dropped|connector_servicegraph_dropped)_.*"}')
# What it accepted: proof that the query above reads a live scrape of the right job, so "no loss counter
# above 0" cannot pass because nothing was scraped at all.
COLLECTOR_ACCEPTED_SPANS = 'sum(otelcol_receiver_accepted_spans{job="otel-collector-internal"})'


class ServiceGraphStore(PeriodicReader):
    """The service-graph connector's own counters, read from the collector's telemetry endpoint every 0.5 s in a
    thread: the edges it took into its store (new edges) and the spans it dropped because the store was full.

    The store holds an edge until its other half comes or its ttl passes (the expiry runs every 2 s), and at
    most max_items: so it can only be full, and drop, after taking max_items edges within that time. What it
    is offered is what the collector passes on when it does, not what the flood sends: a collector that fell
    behind (a busy machine) catches up in bursts, and then offers more than the flood's rate."""

    NEW, DROPPED = "otelcol_connector_servicegraph_total_edges", "otelcol_connector_servicegraph_dropped_spans"

    def __init__(self, stack: NativeStack):
        super().__init__("service-graph store")
        self.url = f"http://127.0.0.1:{stack.ports.collector_telemetry}/metrics"

    def read(self) -> tuple[float, int, int] | None:
        """(monotonic seconds, new edges, dropped spans), or None when the collector does not answer."""
        try:
            text = urllib.request.urlopen(self.url, timeout=2).read().decode()
        except OSError as exc:
            self.errors.append(str(exc))
            return None
        totals = Counter()
        for name, value in re.findall(r"^(otelcol_connector_servicegraph_\w+)(?:\{[^}]*\})? (\S+)$", text, re.M):
            totals[name] += int(float(value))
        return time.monotonic(), totals[self.NEW], totals[self.DROPPED]

    def most_within(self, seconds: float, dropped_too: bool = False) -> int:
        """The most edges taken (with `dropped_too`, offered: taken or dropped) in any `seconds`, at most: a
        window is counted from the sample before its start to the first one after its end."""
        most, samples = 0, self.samples
        for i, (_, new, dropped) in enumerate(samples[:-1]):
            ends_by = samples[i + 1][0] + seconds
            _, new_then, dropped_then = next((s for s in samples if s[0] >= ends_by), samples[-1])
            most = max(most, new_then - new + (dropped_then - dropped if dropped_too else 0))
        return most


def collector_counters(stack: NativeStack) -> dict[str, int]:
    """Each loss counter's total over its series (some exist only once they are above 0)."""
    totals: Counter = Counter()
    for series in stack.query(COLLECTOR_LOSS_COUNTERS):
        totals[series["metric"]["__name__"]] += int(float(series["value"][1]))
    return dict(totals)


@pytest.fixture
def compose_limited_stack(tmp_path, monkeypatch):
    """The native stack, with the collector's memory_limiter at the limits compose would give it.

    In compose, limit_percentage applies to the container's mem_limit (512m); a native process has no
    cgroup limit, so the percentage would be of the whole machine. The same limits in MiB make the
    native collector refuse data where the compose one would.
    """
    budget = collector_memory_budget()
    original = native.collector_overlay

    def with_compose_limits(ports):
        overlay = original(ports)
        overlay.setdefault("processors", {})["memory_limiter"] = {
            "limit_mib": budget["limit"] // 2**20, "spike_limit_mib": budget["spike"] // 2**20}
        return overlay

    monkeypatch.setattr(native, "collector_overlay", with_compose_limits)
    stack = NativeStack(tmp_path).up()
    yield stack, budget
    stack.down()


# The edge's SERVER spans as span metrics, per route and status: span "GET /x" is path "/x".
EDGE_BY_ROUTE = ('sum by (span_name, http_response_status_code) '
                 '(traces_spanmetrics_calls_total{telemetry_source="edge", span_kind="SPAN_KIND_SERVER"})')


def edge_by_path(stack: NativeStack) -> Counter:
    return Counter({(name.partition(" ")[2], status): n for (name, status), n in
                    by_labels(stack.query(EDGE_BY_ROUTE), "span_name", "http_response_status_code").items()})


def test_flood_the_pipeline_answers_right_stays_in_budget_and_counts_recover(compose_limited_stack):
    """The flood goes where users go, through the edge (Caddy) into the app: the edge must neither drop a
    connection nor miscount, and its telemetry rides the same collector."""
    stack, budget = compose_limited_stack
    master, workers = gunicorn_processes(stack.app)
    edge = psutil.Process(stack.edge.process.pid)
    out = stack.run_dir / "flood.json"
    # The service graph's own counters, from before the flood until every span has passed the collector.
    graph_store = ServiceGraphStore(stack).start()
    with Sampler(stack, master, workers) as sampler:
        flood = subprocess.run(
            [sys.executable, "-m", "tooling.native.flood", stack.edge_url, "--seconds", str(FLOOD_SECONDS),
             "--max-requests", str(FLOOD_MAX_REQUESTS), "--json", str(out)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=FLOOD_SECONDS + 60)
        assert flood.returncode == 0, flood.stderr[-3000:]
        from tooling.native.flood import FloodResult

        result = FloodResult.from_json(json.loads(out.read_text()))
        sent = Counter({(path, str(status)): n for (path, status), n in result.counts.items()})

        # Exact again once the flood is over: cumulative OTel counters and the app's own counters.
        def counts():
            return (by_labels(stack.query(OTEL_BY_ROUTE), "http_route", "http_response_status_code"),
                    by_labels(stack.query(MANUAL_BY_PATH), "path", "status"), edge_by_path(stack))

        def explained(seen: Counter) -> bool:
            # An answer that never arrived may still have been served and counted, and only that.
            return all(0 <= seen[key] - sent[key] <= result.unanswered[key[0]] for key in sent | seen)

        flood_ended = time.monotonic()
        recovered = poll(lambda: all(explained(c) for c in counts()), 60,
                         f"otel, manual and edge counts explained by what the flood sent, {dict(sent)}", 2)
        recovery_seconds = time.monotonic() - flood_ended
        otel, manual, edge_counts = counts()
    # A SERVER span for every request the app served: each answered one (the app ran it), and perhaps some of
    # those written but never answered (the app may have served them before the connection broke). Nothing
    # else reaches the app (Prometheus's /metrics scrapes make no spans), so the count is bracketed exactly.
    unanswered = sum(result.unanswered.values())
    def app_server_spans():  # the edge's SERVER spans reach the same sink, as service "edge"
        return [s for s in stack.tempo_sink.server_spans() if s.resource.get("service.name") == "dice-api"]

    server_spans = len(poll(lambda: (spans := app_server_spans()) and len(spans) >= result.answered
                            and spans, 30, f"a SERVER span for each of the {result.answered} answers") or [])
    # The collector scraped after all of them passed through it (Prometheus scrapes it every 5 s).
    accepted = poll(lambda: (n := scalar(stack, COLLECTOR_ACCEPTED_SPANS) or 0) >= server_spans and n, 20,
                    f"the collector's accepted-spans counter at the {server_spans} spans Tempo received")
    counters = collector_counters(stack)
    graph_store.stop()
    store = yaml.safe_load(COLLECTOR_CONFIG.read_text())["connectors"]["service_graph"]["store"]
    ttl = float(store["ttl"].removesuffix("s"))
    # How long the store holds a request's edges: ttl, the 2 s expiry tick, 2 s for the halves of a pair.
    store_window = ttl + 4
    offered, taken = graph_store.most_within(store_window, dropped_too=True), graph_store.most_within(store_window)
    peak = max(sampler.rss)
    unexpected = {k: n for k, n in result.counts.items() if FLOOD_STATUS.get(k[0]) != k[1]}
    print(f"\nflood: {result.answered} answers in {result.seconds:.1f}s = {result.rate:.0f} req/s "
          f"({result.attempts} attempts, bound {FLOOD_MAX_REQUESTS}); by path/status {dict(result.counts)}; "
          f"transport errors {dict(result.errors) or 0} (after sending: {sum(result.unanswered.values())}); "
          f"answers per second min {min(result.per_second[:FLOOD_SECONDS] or [0])} "
          f"max {max(result.per_second or [0])}\n"
          f"  collector RSS peak {peak / 2**20:.0f} MiB over {len(sampler.rss)} samples vs memory_limiter "
          f"limit {budget['limit'] / 2**20:.0f} MiB ({budget['mem_limit'] / 2**20:.0f} MiB mem_limit); "
          f"deaths {sampler.deaths or 'none'}\n"
          f"  otel {dict(otel)}\n  manual {dict(manual)}\n  edge {dict(edge_counts)}\n"
          f"  counts {'exact' if recovered else 'NOT exact'} "
          f"{recovery_seconds:.0f}s after the flood; "
          f"server spans received by the Tempo sink {server_spans} of {result.answered} requests "
          f"({result.answered - server_spans} missing); collector accepted {accepted} spans, "
          f"refused/failed/dropped counters {counters or 'none exposed'}\n"
          f"  service graph: offered at most {offered} spans and took at most {taken} edges in any "
          f"{store_window:.0f} s (store max_items {store['max_items']}, ttl {store['ttl']}; "
          f"{len(graph_store.samples)} samples, {len(graph_store.errors)} unread)")

    assert result.answered > 1000, "the flood hardly ran"
    assert not unexpected, f"answers with an unexpected status: {unexpected}"
    # Throughout: no second of the run (the last one is partial) went without answers.
    assert len(result.per_second) >= FLOOD_SECONDS and min(result.per_second[:FLOOD_SECONDS]) > 0, \
        result.per_second
    # A healthy server under overload queues connections; it does not reset or drop them: not one error.
    assert not result.errors and not unanswered, (result.errors, result.unanswered)
    assert not sampler.deaths, sampler.deaths
    assert len(sampler.rss) >= 2 * FLOOD_SECONDS - 5
    assert peak < budget["limit"], f"collector RSS {peak} over its limit {budget['limit']}"
    assert recovered, f"counts did not recover: sent {dict(sent)}, collector counters {counters}"
    # With no transport error, "explained" is exact: the edge counted each answer as the flood read it.
    assert edge_counts == sent, (dict(edge_counts), dict(sent))
    # The same edge process served it all (the Sampler watched it live throughout).
    assert stack.edge.process.poll() is None and stack.edge.process.pid == edge.pid and edge.is_running()
    assert result.answered <= server_spans <= result.answered + unanswered, (server_spans, result.answered)
    # The collector refused, failed and dropped nothing: each such counter it exposes is 0. One exception,
    # by design: the service-graph connector holds edges waiting for their other half in a store of
    # max_items, and beyond that drops spans from the graph only (traces, span metrics and the RED counts
    # are checked above). Each request leaves an edge ("user" to the edge: the flood has no client span)
    # that waits the whole ttl, up to the 2 s expiry tick more, and one (the edge's client span to the
    # app's server span) that waits for its other half, a second or two: so the store holds about
    # store_window seconds of requests. Seen: 11,744 of 34,102 dropped at 1,136 req/s, 0 below 450 req/s.
    assert accepted, "no otelcol_receiver_accepted_spans from the collector's own metrics"
    graph_dropped = counters.pop("otelcol_connector_servicegraph_dropped_spans", 0)
    assert counters and not any(counters.values()), counters
    (_, new_before, dropped_before), (_, new_after, dropped_after) = graph_store.samples[0], graph_store.samples[-1]
    dropped = dropped_after - dropped_before
    # The connector's counters were read throughout, Prometheus scraped the same, and each answer offered the
    # store two edges: the edge's SERVER span's, and the pair of the edge's CLIENT span and the app's SERVER span.
    assert len(graph_store.samples) >= FLOOD_SECONDS, graph_store.errors[-3:]
    assert graph_dropped <= dropped_after, (graph_dropped, dropped_after)
    edges_per_answer = (new_after - new_before + dropped) / result.answered
    assert edges_per_answer >= 2, graph_store.samples[-1]
    # Whatever the machine: the store drops only when full, which it can be only after taking max_items
    # edges within store_window.
    assert dropped == 0 or taken >= store["max_items"], \
        f"the service graph dropped {dropped} spans, its store having taken at most {taken} edges in any " \
        f"{store_window:.0f} s, fewer than its max_items {store['max_items']}"
    # And while the collector kept up (it never passed the connector spans faster than the flood's busiest
    # second made them), a flood slower than the store holds must lose nothing. A busy machine breaks the
    # first: 4,002 dropped at 811 req/s while two other test stacks ran, the collector catching up in bursts.
    kept_up = offered / store_window <= 1.1 * edges_per_answer * max(result.per_second)
    holds = store["max_items"] / store_window
    print(f"  the collector {'kept up' if kept_up else 'fell behind'}: {offered / store_window:.0f} spans/s "
          f"at the connector's busiest, {edges_per_answer:.2f} per answer, the flood's busiest second "
          f"{max(result.per_second)}; {dropped} dropped from the graph, whose store holds {holds:.0f} req/s")
    if kept_up and max(result.per_second) < holds:
        assert dropped == 0, (dropped, max(result.per_second), holds)
