"""Django under the injection (zerocode.django_hooks): an app whose settings cannot be loaded yet when
sitecustomize runs keeps working, uninstrumented, with one line that says what to set; with the settings, every
request has its span, and Django's 404/403 answers are not failures while a view's crash is.

A tiny Django project of the tests' own under gunicorn's sync workers, from a Python with Django and no
OpenTelemetry, our instrumentation image's folder on PYTHONPATH (see test_zerocode_servers.py). The same was
seen with a Wagtail site (`wagtail start`): without the hooks every route answered 500."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests
from test_zerocode_servers import cached_venv, injected_environment
from zerocode import django_hooks

from tooling.k8s import injection as inj
from tooling.native.sinks import OtlpSink, PyroscopeSink
from tooling.native.stack import free_port, spawn, wait_tcp

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_UNSET, STATUS_ERROR = 0, 2
# What `pip install wagtail==8.0.1` resolved for Django on Python 3.11 (research notes, section 1), and gunicorn.
DJANGO_PINS = ("Django==5.2.20", "asgiref==3.13.0", "sqlparse==0.6.1", "gunicorn==27.0.1", "packaging==26.4")
PROJECT = {
    "tinysite/__init__.py": "",
    "tinysite/settings.py": """
SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tinysite.urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
""",
    "tinysite/urls.py": """
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.urls import path


def ok(request):
    return HttpResponse("fine")


def missing(request):
    raise Http404("no such thing")


def forbidden(request):
    raise PermissionDenied("not yours")


def boom(request):
    raise RuntimeError("broken")


urlpatterns = [path("ok", ok), path("missing", missing), path("forbidden", forbidden), path("boom", boom)]
""",
    # As `django-admin startproject` writes it: the setting only from inside the app, later than sitecustomize.
    "tinysite/wsgi.py": """
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tinysite.settings")
application = get_wsgi_application()
""",
}
ANSWERS = {"/ok": 200, "/missing": 404, "/forbidden": 403, "/boom": 500}


# ------------------------------------------------------------------------------------------ the decision

def fake_find_spec(importable: set[str]):
    def find_spec(name):
        if name.split(".")[0] not in {n.split(".")[0] for n in importable}:
            if "." in name:
                raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
            return None
        return object() if name in importable else None
    return find_spec


@pytest.mark.unit
@pytest.mark.parametrize("environ, importable, problem", [
    ({}, {"django"}, "DJANGO_SETTINGS_MODULE is not set"),
    ({"DJANGO_SETTINGS_MODULE": " "}, {"django"}, "DJANGO_SETTINGS_MODULE is not set"),
    ({"DJANGO_SETTINGS_MODULE": "mysite.settings"}, {"django"}, "DJANGO_SETTINGS_MODULE=mysite.settings cannot"),
    ({"DJANGO_SETTINGS_MODULE": "mysite.settings"}, {"django", "mysite", "mysite.dev"}, "mysite.settings cannot"),
    ({"DJANGO_SETTINGS_MODULE": "mysite.settings"}, {"django", "mysite", "mysite.settings"}, None),
    # Not a Django app, or the user switched the instrumentation off: nothing to say.
    ({}, set(), None),
    ({"OTEL_PYTHON_DJANGO_INSTRUMENT": "False"}, {"django"}, None),
    ({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask, django"}, {"django"}, None),
    ({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "*"}, {"django"}, None),
])
def test_settings_problem_says_why_django_would_get_empty_settings(environ, importable, problem):
    found = django_hooks.settings_problem(environ, fake_find_spec(importable))
    assert (found is None) if problem is None else (problem in found), found


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def django_bin():
    return cached_venv("django", DJANGO_PINS)


def serve_and_stop(layout: Path, django_bin: Path, project: Path, log_dir: Path, name: str, **settings: str):
    """gunicorn -w 2 on the tiny project, one request per route, SIGTERM: (answers, SERVER spans, log)."""
    otlp, pyro, port = OtlpSink().start(), PyroscopeSink().start(), free_port()
    env = injected_environment(layout, django_bin, otlp, pyro, "tiny-django", OTEL_BSP_SCHEDULE_DELAY="200")
    if "PYTHONPATH" in settings:  # the owners' PYTHONPATH sits between the Operator's two entries
        first, last = env["PYTHONPATH"].split(":")
        settings["PYTHONPATH"] = f"{first}:{settings['PYTHONPATH']}:{last}"
    env.update(settings)
    app = spawn(name, [str(django_bin / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}",
                       "tinysite.wsgi:application"], env, project, log_dir)
    try:
        wait_tcp("127.0.0.1", port, 60, app.process)
        answers = {path: requests.get(f"http://127.0.0.1:{port}{path}", timeout=20).status_code for path in ANSWERS}
    finally:
        app.process.send_signal(signal.SIGTERM)
        app.process.wait(60)
        otlp.stop()
        pyro.stop()
    spans = {s.attributes.get("http.route"): s for s in otlp.spans() if s.span.kind == SERVER}
    return answers, spans, app.log()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tinysite")
    for relative, text in PROJECT.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


@pytest.mark.integration
def test_without_its_settings_module_django_answers_uninstrumented_and_says_what_to_set(
        django_bin, project, tmp_path):
    answers, spans, log = serve_and_stop(inj.instrumentation_layout(), django_bin, project, tmp_path, "unset")
    warnings = [line for line in log.splitlines() if "WARNING [zerocode.django]" in line]
    print(f"\nwithout DJANGO_SETTINGS_MODULE: answers {answers}, SERVER spans {len(spans)}\n  {warnings}")
    # Without the hook the instrumentation configures empty settings and every route answers 500.
    assert answers == ANSWERS, log[-3000:]
    assert spans == {}
    # One line from the master (the workers are its forks): what is wrong and what to set.
    assert len(warnings) == 1, log[-3000:]
    assert "DJANGO_SETTINGS_MODULE is not set" in warnings[0] and "PYTHONPATH" in warnings[0]


@pytest.mark.integration
def test_with_its_settings_module_every_request_has_a_span_and_only_5xx_is_an_error(django_bin, project, tmp_path):
    answers, spans, log = serve_and_stop(inj.instrumentation_layout(), django_bin, project, tmp_path, "set",
                                         DJANGO_SETTINGS_MODULE="tinysite.settings", PYTHONPATH=str(project))
    seen = {route: (s.attributes.get("http.response.status_code"), s.span.status.code,
                    [e.name for e in s.span.events]) for route, s in spans.items()}
    print(f"\nwith DJANGO_SETTINGS_MODULE and PYTHONPATH: answers {answers}\n  spans {seen}")
    assert answers == ANSWERS, log[-3000:]
    assert "WARNING [zerocode" not in log, log[-3000:]
    # Django's 404 and 403 answers are answers (status unset, no event), as a Flask 404 is.
    assert seen["ok"] == (200, STATUS_UNSET, [])
    assert seen["missing"] == (404, STATUS_UNSET, [])
    assert seen["forbidden"] == (403, STATUS_UNSET, [])
    # The view's crash is recorded by the Django instrumentation itself: ERROR with its exception event.
    assert seen["boom"] == (500, STATUS_ERROR, ["exception"])
    assert spans["boom"].is_error_with_exception
