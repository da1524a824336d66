"""Django under the injection: the app never breaks, and a 4xx answer is not a failed request.

**Settings.** OpenTelemetry's Django instrumentation (0.66b1) adds its middleware to
``settings.MIDDLEWARE`` while sitecustomize runs, before the app's own code. When the settings cannot be
loaded at that moment (DJANGO_SETTINGS_MODULE unset, because the project's ``wsgi.py`` or ``manage.py``
sets it only later with ``os.environ.setdefault``; or set, but the project's folder is not on the path
yet, because gunicorn adds it only when it loads the app), it calls ``settings.configure()`` with Django's
empty defaults, and every route of the app answers 500 (seen with a Wagtail site: ``global_settings`` has
no ROOT_URLCONF). :func:`pre_instrument` runs before the instrumentors: if Django is installed and its
settings module cannot be found, it keeps the Django instrumentation off (OTEL_PYTHON_DJANGO_INSTRUMENT=False,
for the instrumentors of this process only; :func:`post_instrument` puts the variable back, so that a child
with the setting, such as runserver's reloader, is instrumented) and says in one line what to set. The app
then runs as it does without us; Beyla and the edge still see it.

**4xx.** A view that raises Http404 or PermissionDenied gets Django's 404 or 403 answer, but the
instrumentation ends the span with that exception, so the span has status ERROR and an exception event:
every 404 would count as a failed request. Our rule, as for Flask (zerocode.flask_errors): a 5xx is
ERROR, a 4xx is an answer. :func:`post_instrument` therefore drops the exception the middleware kept when
the response is below 500 (Django answers 4xx only for Http404, PermissionDenied, BadRequest and
SuspiciousOperation); a view that fails with a 500 keeps its exception event and ERROR.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from zerocode.patching import wrap_once

log = logging.getLogger("zerocode.django")

SETTINGS_VARIABLE = "DJANGO_SETTINGS_MODULE"
SWITCH = "OTEL_PYTHON_DJANGO_INSTRUMENT"  # the Django instrumentation's own off switch
_MIDDLEWARE_MODULE = "opentelemetry.instrumentation.django.middleware.otel_middleware"
_WRAPPED_FLAG = "_zerocode_4xx_is_an_answer"

_switched_off = {"previous": None, "done": False}


def instrumentation_wanted(environ) -> bool:
    """False when the user switched the Django instrumentation off already."""
    disabled = [name.strip() for name in environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")]
    return environ.get(SWITCH) != "False" and "django" not in disabled and "*" not in disabled


def settings_problem(environ, find_spec=importlib.util.find_spec) -> str | None:
    """Why the Django instrumentation would replace the app's settings with empty ones in this process,
    or None when it can run (or Django is not installed, or the instrumentation is off anyway)."""
    if not instrumentation_wanted(environ) or find_spec("django") is None:
        return None
    module = environ.get(SETTINGS_VARIABLE, "").strip()
    if not module:
        return f"{SETTINGS_VARIABLE} is not set"
    try:
        found = find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a malformed name such as "a..b"
        found = False
    if not found:
        return f"{SETTINGS_VARIABLE}={module} cannot be imported from this process's path"
    return None


def pre_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_pre_instrument`` (before the instrumentors run)."""
    try:
        problem = settings_problem(os.environ)
        if problem is None:
            return
        _switched_off.update(previous=os.environ.get(SWITCH), done=True)
        os.environ[SWITCH] = "False"
        from zerocode.profiling import _ensure_visible_logging, multiprocessing_helper

        if multiprocessing_helper(sys.orig_argv):
            return  # multiprocessing's helpers serve nothing: no line of their own
        _ensure_visible_logging(log)
        log.warning(
            "Django is not instrumented by OpenTelemetry in pid %d: %s, and the instrumentation would replace "
            "the app's settings with empty ones (every request would answer 500). Set %s to the project's "
            "settings module (e.g. mysite.settings) in the app's environment and put the project's folder on "
            "PYTHONPATH (now %s); the app runs uninstrumented until then",
            os.getpid(), problem, SETTINGS_VARIABLE, os.environ.get("PYTHONPATH") or "unset")
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        log.warning("could not check %s before the Django instrumentation: %s", SETTINGS_VARIABLE, exc)


def _restore_switch() -> None:
    if not _switched_off["done"]:
        return
    _switched_off["done"] = False
    if _switched_off["previous"] is None:
        os.environ.pop(SWITCH, None)
    else:
        os.environ[SWITCH] = _switched_off["previous"]


def answers_below_500_are_not_errors() -> bool:
    """Wrap the Django middleware's process_response; False when Django's instrumentation is not loaded
    or the wrapper is there already."""
    middleware = sys.modules.get(_MIDDLEWARE_MODULE)
    if middleware is None:
        return False
    cls = middleware._DjangoMiddleware

    def wrap(original):
        def process_response(self, request, response):
            if getattr(response, "status_code", 500) < 500:
                # The exception kept by process_exception would end the span as ERROR with its event.
                request.META.pop(cls._environ_exception_key, None)
            return original(self, request, response)
        return process_response

    return wrap_once(cls, "process_response", _WRAPPED_FLAG, wrap)


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; an app without Django is left alone."""
    try:
        _restore_switch()
        answers_below_500_are_not_errors()
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        from zerocode.profiling import _ensure_visible_logging

        _ensure_visible_logging(log)
        log.warning("Django 404 and 403 answers may count as failed requests: %s", exc)
