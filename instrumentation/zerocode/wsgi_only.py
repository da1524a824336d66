"""Flask served through the plain WSGI middleware instead of the Flask instrumentation: a cost lever.

With ``ZEROCODE_HTTP_INSTRUMENTATION=wsgi`` (and ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=flask``, so that the
Flask instrumentation stays out), every Flask app's ``wsgi_app`` runs inside OpenTelemetry's WSGI middleware:
one SERVER span and the SDK's HTTP metrics per request, as the Flask instrumentation gives, but without its
per-request hooks (route lookup, `before_request`/`teardown_request` bookkeeping, excluded URLs). What that
costs in fidelity: the middleware runs before Flask matches the route, so spans are named ``GET`` and carry
no ``http.route``, and the request-duration histogram has no route label (the otel RED source loses its
per-route split). The cost benchmark (tooling/reports/bench.py, mode ``wsgi-only``) measures what the Flask
layer adds on top of the middleware; no profile of the stack uses it.
"""

from __future__ import annotations

import functools
import logging
import os

from zerocode.patching import wrap_once

log = logging.getLogger("zerocode.wsgi_only")

SETTING = "ZEROCODE_HTTP_INSTRUMENTATION"
_MIDDLEWARE = "_zerocode_wsgi_middleware"


def instrument(tracer_provider=None, meter_provider=None) -> bool:
    """Wraps Flask.wsgi_app; the providers default to the global ones (a test passes its own)."""
    import flask
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    def wrap(original):
        def wsgi_app(self, environ, start_response):
            # One middleware per app object, made on its first request: apps are created after this hook runs.
            middleware = self.__dict__.get(_MIDDLEWARE)
            if middleware is None:
                middleware = self.__dict__[_MIDDLEWARE] = OpenTelemetryMiddleware(
                    functools.partial(original, self), tracer_provider=tracer_provider,
                    meter_provider=meter_provider)
            return middleware(environ, start_response)
        return wsgi_app

    return wrap_once(flask.Flask, "wsgi_app", _MIDDLEWARE, wrap)


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; off unless the setting asks for it."""
    value = os.environ.get(SETTING, "").strip().lower()
    if value in ("", "flask"):
        return
    if value != "wsgi":
        log.warning("%s=%r is neither 'flask' (the default) nor 'wsgi'; keeping the Flask instrumentation",
                    SETTING, value)
        return
    if "flask" not in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", ""):
        log.warning("%s=wsgi without OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=flask would trace every request twice;"
                    " keeping the Flask instrumentation alone", SETTING)
        return
    try:
        instrument()
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        log.warning("could not serve Flask through the WSGI middleware: %s", exc)
