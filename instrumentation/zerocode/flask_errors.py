"""Record exceptions that a Flask app's own error handler swallows on the request's server span.

The OTel Flask instrumentation records an exception only when it escapes the app. The dice API, like most
real apps, has a catch-all `@app.errorhandler(Exception)` that turns failures into a JSON 500, so the span
would say ERROR but not why. Wrapping `Flask.handle_user_exception` from outside adds the exception event
(`exception.type`, `exception.message`, `exception.stacktrace`) without touching the app. An exception that no
handler takes escapes the app, and the instrumentation records it itself: it is left to it.

Only the event is added; the span's status is left to the instrumentation, which derives it from the
HTTP status the handler finally answers (on a SERVER span: 5xx is ERROR, anything else stays unset). An
exception that a handler deliberately turns into a 400 or a 409 is thus recorded, but the request is not
marked as failed, and a 500 is ERROR because it is a 500, whatever raised it.
"""

from __future__ import annotations

import logging

from zerocode.patching import wrap_once

log = logging.getLogger("zerocode.flask_errors")

_WRAPPED_FLAG = "_zerocode_records_exceptions"


def instrument() -> bool:
    import flask
    from opentelemetry import trace
    from werkzeug.exceptions import HTTPException

    def wrap(original):
        def handle_user_exception(self, e):
            # Flask re-raises an exception no handler of the app takes: the Flask instrumentation records what
            # escapes the app, so recording it here too would leave two events (seen with httpbin's /drip).
            # Only what a handler turns into an answer is recorded, once that answer exists.
            answer = original(self, e)
            # HTTP errors such as 404 are answers, not failures: only real exceptions are recorded.
            if not isinstance(e, HTTPException):
                span = trace.get_current_span()
                if span.is_recording():
                    span.record_exception(e)
            return answer
        return handle_user_exception

    return wrap_once(flask.Flask, "handle_user_exception", _WRAPPED_FLAG, wrap)


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; a missing Flask is not an error."""
    try:
        instrument()
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        log.warning("could not record handled Flask exceptions on spans: %s", exc)
