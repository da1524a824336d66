"""Apps nobody here wrote, observed as the Operator would observe their pods (issue 21, "Proof on apps nobody
here wrote").

Each example under examples/ is a real open-source web app from PyPI, pinned, with the Dockerfile and the
Deployment its owners would have: httpbin (Flask, gunicorn sync workers), a Wagtail site (Django, gunicorn
threaded workers) and httpbinx (FastAPI, `uvicorn --workers 2`, and the same image under gunicorn's uvicorn
workers). Each runs natively the way its injected pod runs (tooling/native/own_app.py): the owners' command and
Python, our instrumentation image's folder on PYTHONPATH, the env the Operator's webhook gives the container,
against the real collector and Prometheus (Tempo, Loki and Pyroscope are capture sinks), with locust driving it.

Per app and server, what the issue asks: SERVER spans equal to the requests sent, per route and status; the otel
RED counts in Prometheus exact; log records with trace ids of those spans; profiles from every worker process,
their span ids those of the spans; an exception recorded on the 5xx that has one behind it.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass

import psutil
import pytest

from tooling.k8s import injection as inj
from tooling.native import own_app
from tooling.native.stack import NativeStack, by_labels, free_port, poll, run_locust, spawn, wait_tcp

LOAD_SECONDS = 16  # more than the profiler's 10-s upload interval: every worker uploads during the load
LOAD_USERS = 6
NO_ROUTE = "(no route)"  # the locust name of requests that match no route of the app


@pytest.mark.unit
@pytest.mark.parametrize("app", own_app.examples(), ids=lambda app: app.name)
def test_each_examples_deployment_runs_its_dockerfiles_image_as_built(app):
    """What the Deployment says of the container equals what the Dockerfile builds: the port it listens on, the
    user it runs as, its settings (the Deployment's own env may only repeat the image's) and, for PYTHONPATH,
    the image's working folder; the image is the one docs/own-app.md builds, the annotation names the stack's
    Instrumentation, and examples/kustomization.yaml deploys it."""
    import re

    import yaml

    container, pod = app.container(), app.deployment()["spec"]["template"]
    assert [port["containerPort"] for port in container["ports"]] == [app.exposed_port()]
    uids = {int(uid) for run in app.instructions() for uid in re.findall(r"useradd --uid (\d+)", run)}
    assert uids == {pod["spec"]["securityContext"]["runAsUser"]}
    assert container["image"] == f"own-apps/{app.name}:local"
    own = {var["name"]: var["value"] for var in container.get("env", [])}
    image = app.image_env()
    assert {k: v for k, v in own.items() if k != "PYTHONPATH"}.items() <= image.items(), (own, image)
    assert own.get("PYTHONPATH", app.workdir()) == app.workdir()
    instrumentation = inj.instrumentation_resource()["metadata"]
    namespace = yaml.safe_load((own_app.EXAMPLES / "kustomization.yaml").read_text())
    assert pod["metadata"]["annotations"][own_app.INJECT_ANNOTATION] == \
        f"{inj.pod_identity().namespace}/{instrumentation['name']}"
    assert f"{app.name}/deployment.yaml" in namespace["resources"]


@dataclass(frozen=True)
class Run:
    """One app under one server: the image's own CMD, or another server the same image has."""

    app: str
    server: str
    argv: tuple[str, ...] | None = None  # None: the Dockerfile's CMD
    # The route whose 5xx has an exception behind it, and the log record the framework writes for it.
    exception_route: str = ""
    workers: int = 2


RUNS = [
    Run("httpbin", "gunicorn-sync", exception_route="/drip"),
    Run("wagtail", "gunicorn-gthread", exception_route="search/"),
    Run("httpbinx", "uvicorn-workers", exception_route="/range/{numbytes}"),
    Run("httpbinx", "gunicorn-uvicorn-workers",
        argv=("gunicorn", "--workers", "2", "--worker-class", "uvicorn.workers.UvicornWorker",
              "--bind", "0.0.0.0:8080", "httpbinx.main:app"),
        exception_route="/range/{numbytes}"),
]


@dataclass
class Observed:
    run: Run
    app: own_app.OwnApp
    stack: NativeStack
    environment: dict
    sent: Counter  # (route, status) -> requests, from locust's ground truth
    workers: dict[int, str]
    url: str

    @property
    def service(self) -> str:
        return self.app.service_name

    @property
    def environment_attributes(self) -> dict[str, str]:
        return dict(pair.split("=", 1) for pair in self.environment["OTEL_RESOURCE_ATTRIBUTES"].split(","))


@pytest.fixture(scope="module", params=RUNS, ids=[f"{r.app}-{r.server}" for r in RUNS])
def observed(request, layout, tmp_path_factory):
    run: Run = request.param
    app = own_app.OwnApp(run.app)
    python = own_app.app_python(app)
    stack = NativeStack(tmp_path_factory.mktemp(f"{run.app}-{run.server}"))
    for sink in (stack.tempo_sink, stack.loki_sink, stack.pyroscope_sink):
        sink.start()
    try:
        stack.start_collector()
        stack.start_prometheus()
        addresses = inj.native_addresses(stack.ports.otlp_grpc, stack.ports.otlp_http, stack.ports.pyroscope_sink)
        environment, env_list = own_app.pod_environment(app, python, layout, addresses)
        # A port of its own, not the stack's app port: Prometheus scrapes the dice API's /metrics there, and
        # these apps have none (Django would count each scrape as a request: a 301, then a 404).
        port = free_port()
        argv = own_app.command(app, python, port, list(run.argv) if run.argv else None)
        print(f"\n{run.app} ({run.server}): {' '.join(argv)}\nthe container's env, as the Operator's webhook makes it:")
        for var in env_list:
            print(f"  {var['name']}={environment[var['name']]}")
        stack.app = spawn(run.app, argv, environment, python.site, stack.run_dir)
        try:
            wait_tcp("127.0.0.1", port, 60, stack.app.process)
        except Exception:
            raise RuntimeError(f"{run.app} did not start; its log:\n{stack.app.log()[-4000:]}") from None
        url = f"http://127.0.0.1:{port}"
        truth = run_locust(url, LOAD_SECONDS, LOAD_USERS, stack.run_dir, name=f"locust-{run.app}",
                           locustfile=app.locustfile)
        sent = Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})
        assert sum(sent.values()) == truth["locust_totals"]["num_requests"] > 100
        assert not [key for key in sent if key[1] == "0"], f"requests without an answer: {sent}"
        # Every process below the server's but multiprocessing's resource tracker (uvicorn --workers has one).
        workers = {child.pid: " ".join(child.cmdline())
                   for child in psutil.Process(stack.app.process.pid).children(recursive=True)}
        workers = {pid: cmd for pid, cmd in workers.items() if "resource_tracker" not in cmd}
        observed = Observed(run, app, stack, environment, sent, workers, url)
        yield observed
    finally:
        stack.down()


def spans_by_route(observed: Observed) -> Counter:
    return Counter({(route or NO_ROUTE, status): n
                    for (route, status), n in observed.stack.tempo_sink.requests_by_route_and_status(
                        observed.service).items()})


def expected(observed: Observed) -> Counter:
    """What locust sent per (route, status). Requests to one route that locust tells apart (a search, and a
    search that fails) are named by the route, a space and what sets them apart."""
    total: Counter = Counter()
    for (name, status), count in observed.sent.items():
        total[(name if name == NO_ROUTE else name.split(" ", 1)[0], status)] += count
    return total


@pytest.mark.integration
def test_one_server_span_per_request_per_route_and_status(observed):
    want = expected(observed)

    def equal():
        seen = spans_by_route(observed)
        if seen != want:
            differing = {key for key in seen.keys() | want.keys() if seen[key] != want[key]}
            paths = Counter((s.attributes.get("http.route") or NO_ROUTE,
                             str(s.attributes.get("http.response.status_code")), s.attributes.get("url.path"))
                            for s in observed.stack.tempo_sink.server_spans(service=observed.service))
            raise AssertionError(f"sent {dict(want)}, SERVER spans {dict(seen)}; paths where they differ: "
                                 f"{ {k: n for k, n in paths.items() if k[:2] in differing} }")
        return seen

    seen = poll(equal, 30, "SERVER spans per route and status equal to what locust sent")
    print(f"\n{observed.run.app} ({observed.run.server}) sent {dict(want)}\nSERVER spans {dict(seen)}")


@pytest.mark.integration
def test_the_otel_red_counts_in_prometheus_are_exact(observed):
    want = expected(observed)
    # The collector's Prometheus exporter names the job <service.namespace>/<service.name>.
    job = f"{observed.environment_attributes['service.namespace']}/{observed.service}"
    query = ('sum by (http_route, http_response_status_code) (http_server_request_duration_seconds_count'
             f'{{telemetry_source="otel", job="{job}"}})')

    def equal():
        counts = by_labels(observed.stack.query(query), "http_route", "http_response_status_code")
        seen = Counter({(route or NO_ROUTE, status): n for (route, status), n in counts.items()})
        assert seen == want, f"sent {dict(want)}, otel in Prometheus {dict(seen)}"
        return seen

    seen = poll(equal, 45, f"otel RED counts of job {job} equal to what locust sent")
    print(f"\notel RED in Prometheus (job {job}) {dict(seen)}")


@pytest.mark.integration
def test_each_worker_exports_as_an_instance_of_its_own(observed):
    """Forked or spawned, every worker has its own service.instance.id, not the Pod's shared one: two processes
    under one id would overwrite each other's counters in the collector's Prometheus exporter. (Which workers
    serve is the kernel's and the server's choice: a threaded worker may take every connection locust keeps.)"""
    shared = observed.environment_attributes["service.instance.id"]
    spans = Counter(s.resource.get("service.instance.id")
                    for s in observed.stack.tempo_sink.server_spans(service=observed.service))
    print(f"\nSERVER spans per instance: {dict(spans)} (the Pod's id: {shared})")
    assert shared not in spans and 1 <= len(spans) <= observed.run.workers


@pytest.mark.integration
def test_the_5xx_with_an_exception_behind_it_records_the_exception(observed):
    route = observed.run.exception_route
    want = expected(observed)
    failed = sum(n for (r, status), n in want.items() if r == route and status.startswith("5"))
    assert failed > 0, f"locust sent no failing request to {route}: {dict(want)}"
    poll(lambda: len([s for s in observed.stack.tempo_sink.server_spans(route, observed.service)
                      if str(s.attributes.get("http.response.status_code")).startswith("5")]) >= failed,
         30, f"{failed} 5xx spans of {route}")
    spans = [s for s in observed.stack.tempo_sink.server_spans(route, observed.service)
             if str(s.attributes.get("http.response.status_code")).startswith("5")]
    types = Counter(e.attributes[0].value.string_value if e.attributes else "" for s in spans
                    for e in s.span.events if e.name == "exception")
    print(f"\n{route}: {len(spans)} 5xx spans, exception events {dict(types)}")
    assert all(s.is_error_with_exception for s in spans), "a 5xx span without an exception event or ERROR status"
    # A 5xx the app answers on purpose (/status/503) has no exception: the events are not made up.
    returned = [s for s in observed.stack.tempo_sink.server_spans(service=observed.service)
                if s.attributes.get("http.response.status_code") == 503]
    assert all(not any(e.name == "exception" for e in s.span.events) for s in returned)


@pytest.mark.integration
def test_log_records_carry_the_trace_ids_of_the_requests(observed):
    """Every failing request left a log record in its trace: Flask's and Django's ERROR with the traceback,
    uvicorn's access log line (its "Exception in ASGI application" is written after the request's span has
    ended, so it carries no trace id). No record claims a trace the app did not serve."""
    stack, route = observed.stack, observed.run.exception_route
    failing = {s.trace_id for s in stack.tempo_sink.server_spans(route, observed.service)
               if str(s.attributes.get("http.response.status_code")).startswith("5")}
    every = {s.trace_id for s in stack.tempo_sink.server_spans(service=observed.service)}
    assert failing

    def records():
        found = [r for r in stack.loki_sink.records(observed.service) if r.trace_id]
        missing = failing - {r.trace_id for r in found}
        assert not missing, f"{len(missing)} of {len(failing)} failing requests have no log record in their trace"
        return found

    found = poll(records, 20, "a log record in the trace of every failing request")
    severities = Counter(r.severity for r in found if r.trace_id in failing)
    print(f"\nlog records with a trace id: {len(found)} ({dict(Counter(r.severity for r in found))}); "
          f"in the traces of the {len(failing)} failing requests: {dict(severities)}")
    assert {r.trace_id for r in found} <= every, "a log record in a trace the app never served"


@pytest.mark.integration
def test_every_worker_process_is_profiled_with_span_ids_of_its_spans(observed):
    stack = observed.stack
    roots = {s.attributes.get("pyroscope.profile.id") for s in stack.tempo_sink.server_spans(service=observed.service)}
    assert None not in roots, "a SERVER span without pyroscope.profile.id"
    workers = {str(pid) for pid, cmd in observed.workers.items()}

    def profiled():
        uploads = [u for u in stack.pyroscope_sink.snapshot() if u.labels.get("service_name") == observed.service]
        pids = set().union(*[u.sample_labels("pid") for u in uploads]) | {u.labels.get("pid") for u in uploads}
        assert workers <= pids, f"workers {sorted(workers)}, profiled pids {sorted(p for p in pids if p)}"
        return uploads, pids

    uploads, pids = poll(profiled, 25, "profiles from every worker process")
    labelled = set().union(*[u.sample_labels("span_id") for u in uploads])
    print(f"\nworkers {observed.workers}\nprofiled pids {sorted(p for p in pids if p)}; span ids in profiles "
          f"{len(labelled)}, of SERVER spans {len(labelled & roots)}")
    assert len(workers) == observed.run.workers, f"expected {observed.run.workers} workers: {observed.workers}"
    assert labelled and labelled <= roots


@pytest.mark.integration
def test_the_last_requests_spans_survive_the_servers_shutdown(observed):
    """SIGTERM right after the last answers: the spans still in the SDK's batch queue are exported before the
    worker dies (uvicorn re-raises the signal after its shutdown, before atexit would flush)."""
    import urllib.request

    stack = observed.stack
    before = len(stack.tempo_sink.server_spans(service=observed.service))
    path = "/get" if observed.run.app != "wagtail" else "/"
    for _ in range(5):
        urllib.request.urlopen(f"{observed.url}{path}", timeout=10).read()
    stack.app.process.send_signal(signal.SIGTERM)
    stack.app.process.wait(30)
    poll(lambda: len(stack.tempo_sink.server_spans(service=observed.service)) >= before + 5, 10,
         "the 5 last requests' spans after SIGTERM")
    assert len(stack.tempo_sink.server_spans(service=observed.service)) == before + 5
