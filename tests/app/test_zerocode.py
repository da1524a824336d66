"""Our zero-code layer: the hook settings, and the real app under `opentelemetry-instrument gunicorn` (2
workers) sending OTLP and Pyroscope pushes to capture sinks that decode them with real libraries."""

from __future__ import annotations

import logging
import os
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from zerocode import profiling
from zerocode.latency import HTTP_DURATION_BUCKETS

from tooling.native.sinks import OtlpSink, PyroscopeSink
from tooling.native.stack import VENV_BIN, AppSettings, poll, start_app

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_ERROR = 2
VIEW_FUNCTION = "roll_dice"


# ------------------------------------------------------------------------------------- hook settings

@pytest.mark.unit
def test_hook_is_off_and_says_so_without_a_server_address(caplog):
    caplog.set_level(logging.INFO, logger="zerocode.profiling")
    assert profiling.start({}) is None
    assert [r.getMessage() for r in caplog.records] == [
        "PYROSCOPE_SERVER_ADDRESS is not set; continuous profiling is off"]


@pytest.mark.unit
@pytest.mark.parametrize("address", ["pyroscope:4040", "ftp://pyroscope:4040", "http://", "http://host:99999"])
def test_bad_server_address_is_a_warning_naming_the_setting(caplog, address):
    assert profiling.start({"PYROSCOPE_SERVER_ADDRESS": address}) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PYROSCOPE_SERVER_ADDRESS" in warnings[0], warnings


@pytest.mark.unit
@pytest.mark.parametrize("name, value, attribute, default", [
    ("PYROSCOPE_TAGS", "env", "tags", {}),
    ("PYROSCOPE_TAGS", "env=demo,=x", "tags", {}),
    ("PYROSCOPE_UPLOAD_INTERVAL", "soon", "upload_interval", profiling.DEFAULT_UPLOAD_INTERVAL),
    ("PYROSCOPE_UPLOAD_INTERVAL", "-1", "upload_interval", profiling.DEFAULT_UPLOAD_INTERVAL),
    ("PYROSCOPE_SAMPLE_RATE", "1.5", "sample_rate", profiling.DEFAULT_SAMPLE_RATE),
    ("PYROSCOPE_SPAN_PROFILES", "no", "span_profiles", True),
])
def test_bad_optional_setting_falls_back_with_a_warning_naming_it(caplog, name, value, attribute, default):
    settings = profiling.settings_from_env({"PYROSCOPE_SERVER_ADDRESS": "http://pyroscope:4040", name: value})
    assert getattr(settings, attribute) == default
    assert any(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.unit
def test_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "dice-api")
    settings = profiling.settings_from_env({
        "PYROSCOPE_SERVER_ADDRESS": "http://pyroscope:4040/", "PYROSCOPE_TAGS": "env=demo, team = sre",
        "PYROSCOPE_UPLOAD_INTERVAL": "3", "PYROSCOPE_SAMPLE_RATE": "50", "PYROSCOPE_SPAN_PROFILES": "False"})
    assert settings == profiling.ProfilingSettings(
        "http://pyroscope:4040", "dice-api", {"env": "demo", "team": "sre"}, 3, 50, False)


@pytest.mark.unit
def test_unreachable_server_is_a_warning_naming_the_setting(caplog):
    profiling._warn_if_unreachable("http://127.0.0.1:9")  # discard port: nothing listens
    assert any("PYROSCOPE_SERVER_ADDRESS=http://127.0.0.1:9 is unreachable" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------ handled exceptions (flask_errors)

class _Conflict(Exception):
    """A domain error that a handler deliberately answers with a 400."""


def _tiny_app():
    """Not the dice API: an app whose handler maps one exception to 400 and the rest to 500."""
    import flask
    from werkzeug.exceptions import HTTPException

    tiny = flask.Flask("tiny")

    @tiny.route("/conflict")
    def conflict():
        raise _Conflict("already rolled")

    @tiny.route("/boom")
    def boom():
        raise RuntimeError("broken")

    @tiny.route("/ok")
    def ok():
        return "fine"

    @tiny.errorhandler(_Conflict)
    def bad_request(error):
        return {"error": str(error)}, 400

    @tiny.errorhandler(Exception)
    def internal(error):
        return error if isinstance(error, HTTPException) else ({"error": "internal"}, 500)

    return tiny


@pytest.fixture
def traced_tiny_app(monkeypatch):
    """The tiny app under the real Flask instrumentor and our hook, exporting to memory."""
    import flask
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from zerocode import flask_errors

    # The hook patches the Flask class; monkeypatch puts the original back after the test.
    monkeypatch.setattr(flask.Flask, "handle_user_exception", flask.Flask.handle_user_exception)
    assert flask_errors.instrument() is True
    assert flask_errors.instrument() is False, "a second call must not wrap twice"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tiny = _tiny_app()
    FlaskInstrumentor().instrument_app(tiny, tracer_provider=provider)
    yield tiny.test_client(), exporter
    FlaskInstrumentor.uninstrument_app(tiny)


@pytest.mark.unit
@pytest.mark.parametrize("path, status, exception_type, span_status", [
    # Handled and answered 4xx: the exception is recorded, but the request did not fail.
    ("/conflict", 400, "_Conflict", "UNSET"),
    # Handled and answered 500: ERROR comes from the instrumentation's 5xx rule, with one event.
    ("/boom", 500, "RuntimeError", "ERROR"),
    # HTTP errors are answers, not exceptions to record.
    ("/no-such-page", 404, None, "UNSET"),
    ("/ok", 200, None, "UNSET"),
])
def test_handled_exception_is_an_event_and_the_status_follows_the_http_answer(
        traced_tiny_app, path, status, exception_type, span_status):
    from opentelemetry.trace import SpanKind, StatusCode

    client, exporter = traced_tiny_app
    assert client.get(path).status_code == status
    spans = exporter.get_finished_spans()
    assert len(spans) == 1 and spans[0].kind == SpanKind.SERVER
    span = spans[0]
    events = [e for e in span.events if e.name == "exception"]
    print(f"\n{path}: {status}, span status {span.status.status_code.name}, "
          f"exception events {[e.attributes['exception.type'] for e in events]}")
    assert span.status.status_code == StatusCode[span_status]
    if exception_type is None:
        assert events == []
    else:
        # The SDK qualifies non-builtin types with their module (test_zerocode._Conflict).
        assert len(events) == 1 and events[0].attributes["exception.type"].rsplit(".", 1)[-1] == exception_type


# ------------------------------------------------------------------- the configurator and its buckets

# Records one duration on the instrument the Flask instrumentation creates, under opentelemetry-instrument
# with the app's OTLP exporter, and flushes it to the sink.
RECORD_ONE_DURATION = """
from opentelemetry import metrics
metrics.get_meter("probe").create_histogram("http.server.request.duration", unit="s").record(0.0013)
metrics.get_meter_provider().force_flush()
"""
SEMCONV_ADVICE = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


def exported_duration_points(sink: OtlpSink) -> list[tuple[str, object]]:
    """(kind of histogram, its data point) of every export of http.server.request.duration."""
    return [(metric.WhichOneof("data"), point) for request in sink.metric_requests
            for rm in request.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
            if metric.name == "http.server.request.duration"
            for point in getattr(metric, metric.WhichOneof("data")).data_points]


@pytest.mark.integration
@pytest.mark.parametrize("configurator, aggregation, bounds, warning", [
    # app/app.env: our configurator, the stack's bounds.
    ("zerocode", None, HTTP_DURATION_BUCKETS, None),
    # The distro's configurator (what a missing OTEL_PYTHON_CONFIGURATOR may pick): the SDK's default
    # buckets (this instrument carries no advice, so the SDK's own), and a warning that names the setting.
    ("configurator", None, (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000),
     "set OTEL_PYTHON_CONFIGURATOR=zerocode"),
    # Exponential histograms asked for: the View steps aside, silently.
    ("zerocode", "base2_exponential_bucket_histogram", "exponential", None),
])
def test_the_configurator_gives_the_request_duration_its_bounds(configurator, aggregation, bounds, warning):
    sink = OtlpSink().start()
    env = {"PATH": os.environ["PATH"], "OTEL_PYTHON_CONFIGURATOR": configurator, "OTEL_METRICS_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink.endpoint}",
           "OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    if aggregation:
        env["OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"] = aggregation
    try:
        result = subprocess.run([str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "python"), "-c",
                                 RECORD_ONE_DURATION], env=env, capture_output=True, text=True, timeout=60)
    finally:
        sink.stop()
    assert result.returncode == 0, result.stderr
    points = exported_duration_points(sink)
    assert points and all(point.count == 1 for _, point in points), (points, result.stderr[-2000:])
    if bounds == "exponential":
        assert {kind for kind, _ in points} == {"exponential_histogram"}
    else:
        assert {(kind, tuple(point.explicit_bounds)) for kind, point in points} == {("histogram", bounds)}
    warnings = [line for line in result.stderr.splitlines() if "zerocode.latency" in line]
    if warning:
        assert len(warnings) == 1 and warning in warnings[0], result.stderr
    else:
        assert not warnings, result.stderr


# --------------------------------------------------------------------------- the real app, 2 workers

SENT_MIX = {"/": 150, "/health": 30, "/fail": 20, "/no-such-page": 10}
EXPECTED_STATUS = {"/": 200, "/health": 200, "/fail": 500, "/no-such-page": 404}
ROUTE = {"/": "/", "/health": "/health", "/fail": "/fail", "/no-such-page": None}


@pytest.fixture(scope="module")
def served(log_dir):
    """Runs the app against both sinks, sends a known mix, and returns everything that was captured."""
    otlp, pyro = OtlpSink().start(), PyroscopeSink().start()
    settings = AppSettings(
        otlp_endpoint=f"http://{otlp.endpoint}", pyroscope_address=pyro.address,
        overrides={"GUNICORN_WORKERS": "2", "PYROSCOPE_UPLOAD_INTERVAL": "1", "OTEL_METRIC_EXPORT_INTERVAL": "1000"})
    app = start_app(settings, log_dir)
    sent: Counter = Counter()
    statuses: Counter = Counter()

    def get(path):
        response = requests.get(settings.url + path, timeout=10)
        return path, response.status_code

    def send(paths):
        with ThreadPoolExecutor(4) as pool:
            for path, status in pool.map(get, paths):
                sent[path] += 1
                statuses[(path, status)] += 1

    try:
        master = psutil.Process(app.process.pid)
        workers = poll(lambda: [p.pid for p in master.children()] if len(master.children()) == 2 else None, 20,
                       "two gunicorn workers")
        assert workers and len(workers) == 2, f"expected 2 gunicorn workers, found {workers}"
        send([p for p, n in SENT_MIX.items() for _ in range(n)])
        scrape = requests.get(settings.url + "/metrics", timeout=10).text  # must not count as traffic

        def every_worker_profiled_the_view():
            stacks = {}
            for upload in pyro.snapshot():
                for pid, names in upload.functions_by_sample_label("pid").items():
                    stacks.setdefault(int(pid), set()).update(names)
            if all(VIEW_FUNCTION in stacks.get(w, ()) for w in workers):
                return stacks
            send(["/"] * 40)  # short views need more samples; every extra request is counted
            return None

        stacks = poll(every_worker_profiled_the_view, 60, "a profile of the view from every worker", interval=1.5)
        manual = requests.get(settings.url + "/metrics", timeout=10).text
        expected = {(ROUTE[p], EXPECTED_STATUS[p]): n for p, n in sent.items()}
        poll(lambda: otlp.latest_cumulative_counts(
            "http.server.request.duration", ("http.route", "http.response.status_code")) == expected, 20,
             "the SDK's request-duration counts equal to what was sent")
        poll(lambda: len([s for s in otlp.spans() if s.span.kind == SERVER]) >= sum(sent.values()), 20,
             "a SERVER span per request")
    finally:
        app.stop()
        otlp.stop()
        pyro.stop()
    return dict(sent=sent, statuses=statuses, expected=expected, otlp=otlp, pyro=pyro, workers=workers,
                stacks=stacks, manual=manual, first_scrape=scrape, log=app.log())


@pytest.mark.integration
def test_load_got_the_expected_answers_and_nothing_else_went_wrong(served):
    assert all(status == EXPECTED_STATUS[path] for path, status in served["statuses"])
    log = served["log"]
    # The only tracebacks are the app's own error handler logging each /fail.
    assert log.count("Traceback (most recent call last)") == served["sent"]["/fail"]
    assert "WARNING [zerocode" not in log and "WORKER TIMEOUT" not in log
    print(f"\nsent {dict(served['sent'])}; worker pids {served['workers']}; "
          f"profile uploads {len(served['pyro'].snapshot())}; OTLP metric exports "
          f"{len(served['otlp'].metric_requests)}")


@pytest.mark.integration
def test_one_server_span_per_request_with_route_and_status(served):
    spans = [s for s in served["otlp"].spans() if s.span.kind == SERVER]
    seen = Counter((s.attributes.get("http.route"), s.attributes.get("http.response.status_code")) for s in spans)
    print(f"\nSERVER spans {len(spans)}: {dict(seen)}")
    assert seen == Counter(served["expected"])
    assert {s.resource["service.name"] for s in spans} == {"dice-api"}
    # Scrapes of /metrics are excluded from tracing (OTEL_PYTHON_EXCLUDED_URLS).
    assert not [s for s in spans if "/metrics" in str(s.attributes.get("url.path"))]


@pytest.mark.integration
def test_fail_spans_are_errors_with_an_exception_event(served):
    fails = [s for s in served["otlp"].spans() if s.attributes.get("http.route") == "/fail"]
    assert len(fails) == served["sent"]["/fail"]
    for captured in fails:
        assert captured.span.status.code == STATUS_ERROR
        events = [e for e in captured.span.events if e.name == "exception"]
        assert len(events) == 1
        attrs = {kv.key: kv.value.string_value for kv in events[0].attributes}
        assert attrs["exception.type"] == "RuntimeError"
        assert attrs["exception.message"] == "Intentional failure"
    ok = [s for s in served["otlp"].spans() if s.attributes.get("http.route") == "/"]
    assert ok and all(not s.span.events and s.span.status.code != STATUS_ERROR for s in ok)


@pytest.mark.integration
def test_request_duration_histogram_counts_equal_requests_sent(served):
    counts = served["otlp"].latest_cumulative_counts(
        "http.server.request.duration", ("http.route", "http.response.status_code"))
    print(f"\nhttp.server.request.duration counts summed over workers: {counts}")
    assert counts == served["expected"]
    instances = {p.resource["service.instance.id"]
                 for p in served["otlp"].histogram_points("http.server.request.duration")}
    assert len(instances) == 2, "both workers export their own cumulative histogram"


@pytest.mark.integration
def test_request_duration_histogram_has_the_stacks_bounds(served):
    # app/app.env's OTEL_PYTHON_CONFIGURATOR=zerocode: the View applies in every worker, with the hooks above.
    bounds = {tuple(point.explicit_bounds) for request in served["otlp"].metric_requests
              for rm in request.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
              if metric.name == "http.server.request.duration" for point in metric.histogram.data_points}
    assert bounds == {HTTP_DURATION_BUCKETS}


@pytest.mark.integration
def test_manual_metrics_count_every_request_across_workers(served):
    by_path: Counter = Counter()
    for family in text_string_to_metric_families(served["manual"]):
        for sample in family.samples:
            if sample.name == "flask_http_request_duration_seconds_count":
                by_path[(sample.labels["path"], int(sample.labels["status"]))] += int(sample.value)
    expected = {(p, EXPECTED_STATUS[p]): n for p, n in served["sent"].items()}
    print(f"\nmanual /metrics counts: {dict(by_path)}")
    assert by_path == Counter(expected)


@pytest.mark.integration
def test_every_worker_uploads_profiles_with_the_view_function(served):
    uploads = served["pyro"].snapshot()
    assert served["pyro"].rejected == []
    assert {u.labels["service_name"] for u in uploads} == {"dice-api"}
    assert {u.labels["__name__"] for u in uploads} == {"process_cpu"}
    assert {u.sample_type for u in uploads} == {("cpu", "nanoseconds")}
    per_worker = {w: sum(str(w) in u.sample_labels("pid") for u in uploads) for w in served["workers"]}
    print(f"\nprofile uploads {len(uploads)}; uploads with samples per worker pid {per_worker}")
    for worker in served["workers"]:
        assert VIEW_FUNCTION in served["stacks"].get(worker, set()), f"worker {worker} has no {VIEW_FUNCTION}"


@pytest.mark.integration
def test_profile_span_ids_match_exported_root_spans(served):
    roots = [s for s in served["otlp"].spans() if s.is_root]
    assert roots and all(s.attributes.get("pyroscope.profile.id") == s.span_id for s in roots)
    profile_ids = {s.attributes["pyroscope.profile.id"] for s in roots}
    labelled = set().union(*(u.sample_labels("span_id") for u in served["pyro"].snapshot()))
    print(f"\nroot spans {len(roots)}; span ids in profiles {len(labelled)}, matched {len(labelled & profile_ids)}")
    assert labelled, "no profile sample carried a span_id label"
    assert labelled <= profile_ids, labelled - profile_ids


@pytest.mark.integration
def test_every_worker_exports_its_log_records_over_otlp_with_the_trace_context(served):
    # OTEL_LOGS_EXPORTER=otlp and opentelemetry-instrumentation-logging (app/app.env): one record per
    # `Dice rolled` line, each in the trace of its request; tests/collector/test_logs.py counts them end to end.
    records = [(rl.resource, record) for request in served["otlp"].log_requests for rl in request.resource_logs
               for sl in rl.scope_logs for record in sl.log_records]
    rolled = [(resource, record) for resource, record in records if record.body.string_value.startswith("Dice rolled")]
    # The fixture may send extra `GET /` until every worker is profiled: count against what it sent.
    assert len(rolled) == served["sent"]["/"], (len(rolled), served["sent"]["/"])
    assert all(record.trace_id and record.span_id for _, record in rolled)
    instances = {kv.value.string_value for resource, _ in rolled for kv in resource.attributes
                 if kv.key == "service.instance.id"}
    assert len(instances) == 2, f"records from {len(instances)} workers, expected both"


@pytest.mark.unit
def test_wsgi_only_serves_flask_through_the_middleware_without_routes(monkeypatch):
    # The benchmark's `wsgi-only` lever: one SERVER span per request from OTel's WSGI middleware, named by the
    # method and the raw path, without http.route (the middleware runs before Flask matches the route).
    import flask
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind
    from zerocode import wsgi_only

    monkeypatch.setattr(flask.Flask, "wsgi_app", flask.Flask.wsgi_app)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert wsgi_only.instrument(tracer_provider=provider) is True
    assert wsgi_only.instrument(tracer_provider=provider) is False, "a second call must not wrap twice"
    client = _tiny_app().test_client()
    paths = ("/ok", "/boom", "/no-such-page")
    statuses = []
    for path in paths:
        with client.get(path) as response:  # the middleware ends its span when the answer is closed
            statuses.append(response.status_code)
    assert statuses == [200, 500, 404]
    spans = [(s.name, s.kind, s.attributes.get("http.route"), s.attributes.get("http.response.status_code",
                                                                             s.attributes.get("http.status_code")))
             for s in exporter.get_finished_spans()]
    expected = [(f"GET {path}", SpanKind.SERVER, None, code) for path, code in zip(paths, statuses, strict=True)]
    assert spans == expected, spans


@pytest.mark.unit
@pytest.mark.parametrize("settings, warning", [
    ({"ZEROCODE_HTTP_INSTRUMENTATION": "wsgi"}, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=flask"),
    ({"ZEROCODE_HTTP_INSTRUMENTATION": "asgi", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask"},
     "ZEROCODE_HTTP_INSTRUMENTATION='asgi'"),
    ({}, None),
])
def test_wsgi_only_is_off_unless_both_settings_ask_for_it(monkeypatch, caplog, settings, warning):
    import flask
    from zerocode import wsgi_only

    monkeypatch.setattr(flask.Flask, "wsgi_app", flask.Flask.wsgi_app)
    original = flask.Flask.wsgi_app
    for name in ("ZEROCODE_HTTP_INSTRUMENTATION", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    wsgi_only.post_instrument()
    assert flask.Flask.wsgi_app is original
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (warnings == []) if warning is None else (len(warnings) == 1 and warning in warnings[0]), warnings
