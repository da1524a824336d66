"""The handled-exceptions hook leaves an exception that no handler takes to the Flask instrumentation: one
exception event per failed request, not two (seen twice per /drip with httpbin, an app without a catch-all
handler, before the hook recorded only what a handler answered)."""

from __future__ import annotations

import pytest


@pytest.fixture
def traced_app_without_handlers(monkeypatch):
    import flask
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from zerocode import flask_errors

    monkeypatch.setattr(flask.Flask, "handle_user_exception", flask.Flask.handle_user_exception)
    flask_errors.instrument()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bare = flask.Flask("bare")

    @bare.route("/drip")
    def drip():
        return str(int("abc"))  # ValueError, as httpbin's /drip?numbytes=abc

    FlaskInstrumentor().instrument_app(bare, tracer_provider=provider)
    yield bare.test_client(), exporter
    FlaskInstrumentor.uninstrument_app(bare)


@pytest.mark.unit
def test_an_exception_no_handler_takes_is_recorded_once(traced_app_without_handlers):
    from opentelemetry.trace import StatusCode

    client, exporter = traced_app_without_handlers
    assert client.get("/drip").status_code == 500
    (span,) = exporter.get_finished_spans()
    events = [e.attributes["exception.type"] for e in span.events if e.name == "exception"]
    print(f"\n/drip: 500, span status {span.status.status_code.name}, exception events {events}")
    assert span.status.status_code == StatusCode.ERROR
    assert events == ["ValueError"]
