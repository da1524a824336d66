"""Logs, zero-code, on the real pipeline: the app's stdlib logging -> OTLP -> the real collector -> Loki.

Loki is AGPL and runs only as its image in compose; here its place is taken by tooling.native.sinks.LogsSink, which
receives what the collector's `otlp_http/loki` exporter sends to Loki's native OTLP endpoint and decodes it
with opentelemetry-proto. The app, the SDK, opentelemetry-instrumentation-logging and the collector are
real. Locust is the ground truth: every `GET /` logs one `Dice rolled` line, every `GET /fail` one traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from stackfiles import assert_unaffected, phase, traffic_started

from tooling.config import APP_ENV, load_env_file
from tooling.native.stack import NativeStack, app_environment, locust_result, poll, run_locust

pytestmark = pytest.mark.integration

SERVICE = load_env_file(APP_ENV)["OTEL_SERVICE_NAME"]
STDOUT_LINE = re.compile(r"\[trace_id=([0-9a-f]{32}|0) span_id=([0-9a-f]{16}|0)\] (.*)$")


def sent(truth: dict) -> Counter:
    return Counter({row["name"]: row["count"] for row in truth["sent"]})


def rolls(stack: NativeStack):
    return [r for r in stack.loki_sink.records(SERVICE) if str(r.body).startswith("Dice rolled: ")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    native = NativeStack(tmp_path_factory.mktemp("logs")).up()
    yield native
    native.down()


@pytest.fixture(scope="module")
def load(stack):
    truth = run_locust(stack.app_url, 20, 10, stack.run_dir, name="logs-load")
    expected = sent(truth)
    assert expected["/"] > 50 and expected["/fail"] > 0, expected
    poll(lambda: len(rolls(stack)) >= expected["/"], 30, f"{expected['/']} `Dice rolled` records in the sink")
    # The SDK sends spans every 5 s, logs every second: wait for the spans the records are matched with.
    poll(lambda: all(len(stack.tempo_sink.server_spans(route)) >= expected[route] for route in ("/", "/fail")), 30,
         "a SERVER span for every request")
    return expected


def test_one_dice_rolled_record_per_roll_that_locust_sent(stack, load):
    time.sleep(3)  # anything late or doubled would have arrived by now (the SDK batches every second)
    records = rolls(stack)
    print(f"\nlocust sent {dict(load)}; `Dice rolled` records {len(records)}; "
          f"records from dice-api in all {len(stack.loki_sink.records(SERVICE))}")
    assert len(records) == load["/"]
    assert {r.severity for r in records} == {"INFO"}
    # Each written inside its request: the trace and span of that request's SERVER span.
    spans = {(s.trace_id, s.span_id) for s in stack.tempo_sink.server_spans("/")}
    assert {(r.trace_id, r.span_id) for r in records} == spans
    assert not stack.loki_sink.rejected


def test_every_failure_has_an_error_record_in_the_trace_of_its_server_span(stack, load):
    errors = [r for r in stack.loki_sink.records(SERVICE) if r.severity == "ERROR"]
    spans = stack.tempo_sink.server_spans("/fail")
    assert len(spans) == load["/fail"]
    assert len(errors) == load["/fail"], [r.body for r in errors][:3]
    assert {r.trace_id for r in errors} == {s.trace_id for s in spans}
    for record in errors:
        assert record.body == "Unhandled error: Intentional failure"
        assert record.attributes["exception.type"] == "RuntimeError"
        assert record.attributes["exception.message"] == "Intentional failure"
        assert 'raise RuntimeError("Intentional failure")' in record.attributes["exception.stacktrace"]


def test_records_outside_a_request_carry_no_trace_id(stack, load):
    # The zerocode hook logs once at start, in gunicorn's master, before any request.
    startup = [r for r in stack.loki_sink.records(SERVICE) if r.scope == "zerocode.profiling"]
    assert startup, f"no startup record; scopes seen: {Counter(r.scope for r in stack.loki_sink.records(SERVICE))}"
    assert all(r.trace_id == "" and r.span_id == "" for r in startup), [(r.body, r.trace_id) for r in startup]
    # and every record written inside a request has one.
    assert all(r.trace_id for r in stack.loki_sink.records(SERVICE) if r.scope != "zerocode.profiling")


def test_stdout_keeps_the_apps_lines_with_the_trace_id(stack, load):
    lines = [STDOUT_LINE.search(line) for line in stack.app.log().splitlines()]
    lines = [m for m in lines if m]
    rolled = {m.group(1) for m in lines if m.group(3).startswith("Dice rolled: ")}
    # The app's own format (time, level, logger) plus the ids, and the same ids as the exported records.
    assert rolled == {r.trace_id for r in rolls(stack)}
    assert any(m.group(1) == "0" for m in lines), "the startup line should say trace_id=0"
    sample = next(line for line in stack.app.log().splitlines() if "Dice rolled: " in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[dice-api\] \[trace_id=[0-9a-f]{32} ", sample), sample
    print("\nstdout:", sample)


def test_log_level_of_stdout_and_export_is_the_apps_log_level():
    settings = load_env_file(APP_ENV)
    # The instrumentation configures the root logger first, so the app's LOG_LEVEL would be ignored.
    assert settings["OTEL_PYTHON_LOG_LEVEL"] == settings["LOG_LEVEL"].lower()


# ------------------------------------------------------------------------------------------ bad input

# Each record is flushed on its own, so that what one record does to its batch is seen apart.
EMITTER = """
import logging
from opentelemetry._logs import get_logger_provider
log = logging.getLogger("bad-input")
for message in ("before", "x" * (1024 * 1024),                       # a 1 MiB message
                b"caf\\xe9 \\xff\\xfe".decode("utf-8", "surrogateescape"),   # bytes that are not UTF-8
                "after"):
    log.info("%s", message)
    get_logger_provider().force_flush()
"""


def test_a_1_mib_message_and_invalid_utf8_neither_crash_nor_block_the_pipeline(stack, load):
    """The app logs neither, so a sibling process with the app's exact zerocode environment emits them
    through the same SDK and logging instrumentation, while locust keeps the app busy; then raw OTLP
    with invalid UTF-8 bytes goes straight to the collector, as a sender without the SDK's checks could."""
    env = app_environment(stack.app_settings, stack.run_dir / "emitter-multiproc")
    env.update(OTEL_SERVICE_NAME="bad-input", OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    env.pop("PYROSCOPE_SERVER_ADDRESS", None)
    started = time.time()
    locust = run_locust(stack.app_url, 15, 10, stack.run_dir, name="bad-input-load", background=True)
    time.sleep(5)
    emitted = subprocess.run([str(Path(sys.executable).parent / "opentelemetry-instrument"), sys.executable,
                              "-c", EMITTER], env=env, capture_output=True, text=True, timeout=60)
    assert emitted.returncode == 0, emitted.stderr[-2000:]

    locust.wait(60)
    truth = locust_result(stack.run_dir, "bad-input-load")
    before = phase(truth["timeline"], started + 1, started + 5)
    during = phase(truth["timeline"], started + 5, started + 15)
    poll(lambda: any(str(r.body) == "after" for r in stack.loki_sink.records()), 20, "the emitter's last record")
    bodies = {str(r.body)[:40]: len(str(r.body)) for r in stack.loki_sink.records()
              if r.resource.get("service.name") == "bad-input"}

    # Raw OTLP, once the load is over (so no app record shares its batch): a record whose body is a
    # string field holding bytes that are not UTF-8, as a sender without the SDK's check could send.
    placeholder = "PLACEHOLDER-INVALID"
    invalid = b"caf\xe9 \xff\xfe not UTF-8!!"
    assert len(invalid) == len(placeholder)  # the same length, so every length prefix stays right
    request = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource={"attributes": [KeyValue(key="service.name", value=AnyValue(string_value="bad-input-raw"))]},
        scope_logs=[ScopeLogs(log_records=[LogRecord(body=AnyValue(string_value=placeholder))])])])
    raw = request.SerializeToString().replace(placeholder.encode(), invalid)
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports.otlp_grpc}")
    export = channel.unary_unary("/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                                 request_serializer=lambda body: body, response_deserializer=lambda body: body)
    try:
        export(raw, timeout=10)
        raw_answer = "accepted"
    except grpc.RpcError as exc:
        raw_answer = f"{exc.code().name}: {exc.details()[:160]}"
    finally:
        channel.close()
    forwarded_raw = poll(lambda: [body for body in stack.loki_sink.not_utf8 if invalid in body], 20,
                         f"the invalid bytes forwarded to Loki (sink: {len(stack.loki_sink.not_utf8)} requests"
                         f" not UTF-8, rejected {stack.loki_sink.rejected})") if raw_answer == "accepted" else []

    print(f"\nbad input: SDK emitter exit {emitted.returncode}; its error: "
          f"{[line for line in emitted.stderr.splitlines() if 'Error' in line][-1:]}\n"
          f"  forwarded to Loki (first 40 characters: length): {bodies}\n"
          f"  raw invalid UTF-8 over OTLP/gRPC: {raw_answer}; forwarded as received: {bool(forwarded_raw)}\n"
          f"  app before {before}, during {during}")
    assert stack.collector.process.poll() is None, "the collector died"
    assert bodies.get("x" * 40) == 1024 * 1024, "the 1 MiB message should be forwarded whole to Loki"
    assert "before" in bodies and "after" in bodies, bodies
    # The SDK cannot encode the surrogates: that one batch (here one record) is dropped, with an error.
    assert not [b for b in bodies if b.startswith("caf")], bodies
    assert "UnicodeEncodeError" in emitted.stderr
    # The collector does not check UTF-8: it forwards the bytes, and Loki stores them as received.
    assert raw_answer == "accepted" and forwarded_raw, raw_answer
    assert before["unexpected"] == during["unexpected"] == 0
    assert not stack.loki_sink.rejected


# ----------------------------------------------------------------------------------------- resilience

def test_loki_down_mid_load_loses_nothing_and_the_app_carries_on(stack, load):
    # Counted once the earlier tests' records have all arrived (two reads 3 s apart agree): a record of
    # theirs arriving during this test would pass for one of this load.
    def settled_count():
        first = len(rolls(stack))
        time.sleep(3)
        return [first] if len(rolls(stack)) == first else None  # a list: 0 records is an answer too

    (rolled_before,) = poll(settled_count, 30, "the earlier records all arrived", interval=0)
    seconds, stop_at, restart_at = 40, 10, 25
    launched = time.time()
    locust = run_locust(stack.app_url, seconds, 10, stack.run_dir, name="loki-outage", background=True)
    started = traffic_started(stack, since=launched)
    time.sleep(max(0.0, started + stop_at - time.time()))
    stopped = time.time()
    stack.loki_sink.stop()  # the port refuses connections, as a Loki container that is gone
    received_at_stop = len(stack.loki_sink.requests)
    time.sleep(restart_at - stop_at)
    # The outage was real: nothing was received while the port was closed (the SDK exports every second).
    assert len(stack.loki_sink.requests) == received_at_stop, "the Loki sink took requests while stopped"
    restarted = time.time()
    stack.loki_sink.start()
    locust.wait(seconds + 60)
    truth = locust_result(stack.run_dir, "loki-outage")
    expected = sent(truth)["/"] + rolled_before
    arrived = poll(lambda: len(rolls(stack)) >= expected and len(rolls(stack)), 60,
                   f"all {expected} `Dice rolled` records after Loki came back")
    time.sleep(3)
    # Delivery is at least once: a batch whose answer was cut by the outage is sent again (Loki drops an
    # exact duplicate line of a stream). So records are counted by their request, once each.
    unique = len({(r.trace_id, r.span_id) for r in rolls(stack)})
    lost, duplicated = expected - unique, len(rolls(stack)) - unique
    before = phase(truth["timeline"], started + 3, stopped)
    during = phase(truth["timeline"], stopped, restarted)
    after = phase(truth["timeline"], restarted + 3, started + seconds)
    failed = stack.query('sum(otelcol_exporter_send_failed_log_records{job="otel-collector-internal"})')
    print(f"\nLoki down {restarted - stopped:.0f} s: before {before}\n  outage {during}\n  after {after}\n"
          f"  `Dice rolled` expected {expected}, arrived {arrived} ({duplicated} sent twice), lost {lost}; "
          f"exporter send_failed_log_records {failed and failed[0]['value'][1]}")
    assert_unaffected(before, during, after)
    assert lost == 0 and unique == expected
    # And records written while Loki was down were among them: queued and delivered after the restart.
    written_during = [r for r in rolls(stack) if stopped * 1e9 < r.record.time_unix_nano < restarted * 1e9]
    assert written_during, "no record was written during the outage"
