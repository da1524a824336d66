"""The OpenTelemetry Operator's Python injection, run (issue 12, "The injection, run").

On Kubernetes the app runs its owners' image and command (`gunicorn -c gunicorn.conf.py`, no
opentelemetry-instrument, no OpenTelemetry installed), and the Operator injects our instrumentation image
(instrumentation/Dockerfile) into the pod: an init container copies its /autoinstrumentation into an emptyDir,
and the app container's environment gets PYTHONPATH (the layout's sitecustomize.py first), the Instrumentation
resource's python.env, the Operator's defaults and the Kubernetes resource attributes.

Here, with tooling.k8s.injection: the image's folder laid out by the Dockerfile's own pip command, the owners'
Python (a virtualenv with app/requirements.txt only), the owners' command, and the container's environment as
the real webhook returned it in tests/k8s/test_k8s.py (these checks are collected into that module, after its
webhook test; run alone, or with DICE_MUTATED_POD_ENV, they fall back to the Operator's logic rebuilt from its
source, which a test holds equal to the captured env), only addresses mapped to the native stack. The
pipeline tests' assertions then hold: counts per route and status equal to locust's, one SERVER span per
request, exemplars that link to exported traces, span profiles, log records.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tooling.config import load_env_file
from tooling.k8s import injection as inj
from tooling.native.stack import REPO_ROOT, NativeStack, by_labels, poll, prometheus_query, run_locust, spawn, wait_tcp

VIEW_FUNCTION = "roll_dice"
LOAD_SECONDS = 12
LOAD_USERS = 10


# ----------------------------------------------------------------------------------- the two Dockerfiles

@pytest.mark.unit
def test_the_owners_stage_is_the_app_alone_and_compose_builds_the_instrumented_stage_on_it():
    owners = inj.stage(inj.APP_DOCKERFILE, "owners")
    stages = inj.stages(inj.APP_DOCKERFILE)
    last = stages[-1]
    assert len(stages) == 2 and last[0] == "FROM owners", "compose builds the last stage: `FROM owners`"
    owners_text = "\n".join(owners)
    # Nothing of ours, and no OpenTelemetry, in the owners' image.
    for word in ("requirements-otel", "instrumentation", "opentelemetry", "pyroscope", "zerocode"):
        assert word not in owners_text, f"the owners' stage mentions {word}"
    copied = {s for i in owners if i.startswith("COPY ") for s in i.split()[1:-1]}
    assert copied == {"app/requirements.txt", "app/app.py", "app/gunicorn.conf.py"}
    assert [i for i in owners if i.startswith("CMD ")] == ['CMD ["gunicorn", "-c", "gunicorn.conf.py"]']
    assert [i for i in owners if i.startswith("USER ")] == ["USER dice"]
    # The last stage adds exactly the pins and the hooks, and keeps the compose command and a non-root user.
    added = {s for i in last if i.startswith("COPY ") for s in i.split()[1:-1]}
    assert added == {"app/requirements-otel.txt", "instrumentation"}
    assert [i for i in last if i.startswith("CMD ")][-1] == \
        'CMD ["opentelemetry-instrument", "gunicorn", "-c", "gunicorn.conf.py"]'
    assert [i for i in last if i.startswith("USER ")][-1] == "USER dice"
    # One healthcheck: repeated in the last stage only because tooling/native/container.py reads the last stage.
    checks = [[i for i in s if i.startswith("HEALTHCHECK ")] for s in stages]
    assert len(checks[0]) == 1 and checks[0] == checks[1], checks
    assert inj.owners_command(Path("/venv/bin")) == ["/venv/bin/gunicorn", "-c", "gunicorn.conf.py"]


@pytest.mark.unit
def test_the_instrumentation_image_is_laid_out_as_the_operator_expects():
    build, final = inj.stages(inj.INSTRUMENTATION_DOCKERFILE)
    # CPython 3.11 on glibc, the very Python of the owners' image (same ABI for grpcio, protobuf, wrapt...).
    assert build[0].split()[1] == inj.stage(inj.APP_DOCKERFILE, "owners")[0].split()[1] == \
        "python:${PYTHON_VERSION}-slim-bookworm"
    assert load_env_file(REPO_ROOT / ".env")["PYTHON_VERSION"].startswith("3.11.")
    argv = inj.layout_pip_command()
    assert inj.layout_target(argv) == inj.IMAGE_LAYOUT_DIR
    # Exactly the compose image's pins (requirements-otel.txt) and our hooks; the owners' pins only as
    # constraints, for what the pins leave unpinned.
    assert argv == ["pip", "install", "--target", "/autoinstrumentation", "-c", "app/requirements.txt",
                    "-r", "app/requirements-otel.txt", "./instrumentation"]
    copies = {(str(s.relative_to(REPO_ROOT)), d) for s, d in inj.build_stage_copies()}
    assert copies == {("app/requirements.txt", "app/"), ("app/requirements-otel.txt", "app/"),
                      ("instrumentation", "instrumentation/")}
    assert any("chmod -R go+rX /autoinstrumentation" in i for i in build)
    # Our sitecustomize.py (zerocode's preflight, then upstream's initialize()) over upstream's, in the same RUN.
    assert inj.layout_steps() == [
        ["cp", "instrumentation/sitecustomize.py", f"{inj.IMAGE_LAYOUT_DIR}/{Path(inj.SITECUSTOMIZE).parent}/"],
        ["chmod", "-R", "go+rX", inj.IMAGE_LAYOUT_DIR]]
    # busybox (for the init container's `cp`), pinned by .env through a build argument declared before the
    # first FROM (where a FROM can use it), with the folder where the Operator copies from.
    assert final[0] == "FROM busybox:${BUSYBOX_VERSION}", final[0]
    every = [i for _, i in inj.instructions(inj.INSTRUMENTATION_DOCKERFILE.read_text())]
    preamble = every[:next(n for n, i in enumerate(every) if i.upper().startswith("FROM "))]
    assert "ARG BUSYBOX_VERSION" in preamble, f"ARG BUSYBOX_VERSION must come before the first FROM: {preamble}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", load_env_file(REPO_ROOT / ".env")["BUSYBOX_VERSION"])
    assert "COPY --from=build /autoinstrumentation /autoinstrumentation" in final
    # The image's tag is the hooks' version, and the Instrumentation resource points at it.
    import tomllib

    version = tomllib.loads((REPO_ROOT / "instrumentation" / "pyproject.toml").read_text())["project"]["version"]
    assert inj.instrumentation_resource()["spec"]["python"]["image"].endswith(f":{version}")


# ------------------------------------------------------------------------------ the Pod's environment

def local_addresses(otlp_grpc: int = 14317, otlp_http: int = 14318, pyroscope: int = 14040) -> dict:
    return inj.native_addresses(otlp_grpc, otlp_http, pyroscope)


@pytest.mark.unit
def test_the_hand_built_env_is_the_operators(monkeypatch, tmp_path):
    monkeypatch.delenv(inj.MUTATED_ENV_VARIABLE, raising=False)
    pod = inj.pod_identity()
    env_list = inj.operator_container_env(pod, inj.instrumentation_resource())
    names = [var["name"] for var in env_list]
    assert len(names) == len(set(names)), names
    # injectCommonEnvVar prepends the IPs; OTEL_RESOURCE_ATTRIBUTES is moved last.
    assert names[:2] == ["OTEL_NODE_IP", "OTEL_POD_IP"] and names[-1] == "OTEL_RESOURCE_ATTRIBUTES"
    python_env = {v["name"]: v["value"] for v in inj.instrumentation_resource()["spec"]["python"]["env"]}
    values = {var["name"]: var.get("value") for var in env_list}
    # The Instrumentation's python.env wins over the Operator's defaults (grpc, not http/protobuf).
    assert values["OTEL_EXPORTER_OTLP_PROTOCOL"] == python_env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert values["PYTHONPATH"] == f"{inj.PYTHONPATH_PREFIX}:{inj.MOUNT_PATH}"
    assert values["OTEL_SERVICE_NAME"] == "dice-api"

    environment, _, source = inj.pod_environment(Path("/layout"), Path("/owners/bin"), local_addresses(),
                                                 port=15000, multiproc_dir=tmp_path / "mp")
    assert "by hand" in source
    attributes = dict(pair.split("=", 1) for pair in environment["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert attributes == {
        "deployment.environment.name": "demo", "k8s.container.name": "dice-api",
        "k8s.deployment.name": "dice-api", "k8s.namespace.name": "dice-observability",
        "k8s.node.name": pod.node, "k8s.pod.name": pod.pod, "k8s.replicaset.name": pod.replicaset,
        "service.instance.id": f"dice-observability.{pod.pod}.dice-api",
        "service.namespace": "dice-observability", "service.version": "owners"}
    assert environment["PYTHONPATH"] == "/layout/opentelemetry/instrumentation/auto_instrumentation:/layout"
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:14317"
    assert environment["PYROSCOPE_SERVER_ADDRESS"] == "http://127.0.0.1:14040"
    # The owners' serving settings come from the ConfigMap, the multiprocess folder mapped to this machine.
    settings = load_env_file(inj.APP_SETTINGS_ENV)
    assert {k: environment[k] for k in settings if k != "PROMETHEUS_MULTIPROC_DIR"} == \
        {k: v for k, v in settings.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    assert environment["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "mp")
    # app/app.env reaches the app, only addresses differ (OTEL_SERVICE_NAME is the Operator's, per workload).
    for key, value in load_env_file(REPO_ROOT / "app" / "app.env").items():
        if key not in ("OTEL_RESOURCE_ATTRIBUTES", "PROMETHEUS_MULTIPROC_DIR") and not re.match(r"\w+://", value):
            assert environment[key] == value, key
    assert not any(k.startswith(("OTEL_", "PYROSCOPE_")) and k not in {v["name"] for v in env_list}
                   for k in environment), "an OTEL_/PYROSCOPE_ variable that the Pod does not have"


@pytest.mark.unit
def test_a_captured_mutated_pod_env_replaces_the_hand_built_one(monkeypatch, tmp_path):
    pod = inj.pod_identity()
    env_list = inj.operator_container_env(pod, inj.instrumentation_resource())
    captured = [dict(var, value="captured") if var["name"] == "OTEL_PYTHON_LOG_LEVEL" else var for var in env_list]
    # tests/k8s/test_k8s.py's report, with the webhook's own Pod name.
    report = tmp_path / "mutated-pod-env.json"
    report.write_text(json.dumps({"dice-observability/dice-api": {
        "pod": "dice-api-abcde12345-zz9zz", "container": "dice-api", "env": captured}}))
    monkeypatch.setenv(inj.MUTATED_ENV_VARIABLE, str(report))
    environment, used, source = inj.pod_environment(Path("/layout"), Path("/owners/bin"), local_addresses(),
                                                    port=15000, multiproc_dir=tmp_path)
    assert used == captured and str(report) in source
    assert environment["OTEL_PYTHON_LOG_LEVEL"] == "captured"
    assert environment[inj.ENV_POD_NAME] == "dice-api-abcde12345-zz9zz"
    # The plain form.
    plain = tmp_path / "env.json"
    plain.write_text(json.dumps({"env": captured}))
    environment, used, _ = inj.pod_environment(Path("/layout"), Path("/owners/bin"), local_addresses(),
                                               port=15000, multiproc_dir=tmp_path, mutated_env=plain)
    assert used == captured


def captured_env(tmp_path_factory) -> str | None:
    """The env the real webhook returned: DICE_MUTATED_POD_ENV, else what tests/k8s/test_k8s.py left in this
    session's temp folder (collected into tests/k8s/test_k8s.py after its webhook test, so it ran just before)."""
    shared = tmp_path_factory.getbasetemp() / inj.CAPTURED_ENV_NAME
    return os.environ.get(inj.MUTATED_ENV_VARIABLE) or (str(shared) if shared.exists() else None)


@pytest.mark.integration  # needs tests/k8s/test_k8s.py's webhook test first (this module is collected into it)
def test_the_hand_built_env_equals_the_one_captured_from_the_webhook(tmp_path_factory):
    """The env captured from the real webhook (tests/k8s/test_k8s.py's mutated-pod-env.json, or {"env": [...]}
    named by DICE_MUTATED_POD_ENV): the Operator's logic as rebuilt here must give the very list it gave,
    same variables, order and values."""
    path = captured_env(tmp_path_factory)
    if not path:
        pytest.skip("no env captured from the Operator's webhook: these checks run inside tests/k8s/test_k8s.py, "
                    f"after its webhook test; or set {inj.MUTATED_ENV_VARIABLE}")
    captured, pod_name = inj.read_mutated_env(Path(path), inj.pod_identity().deployment)
    pod = inj.with_pod_name(inj.pod_identity(), pod_name)
    built = inj.operator_container_env(pod, inj.instrumentation_resource())
    print(f"\ncaptured {len(captured)} variables from {path}")
    assert inj.comparable_env(captured) == inj.comparable_env(built)


@pytest.mark.unit
def test_a_cluster_address_without_a_native_counterpart_is_refused():
    assert inj.map_addresses("http://otel-collector.dice-observability.svc:4317", local_addresses()) == \
        "http://127.0.0.1:14317"
    with pytest.raises(ValueError, match="tempo.dice-observability.svc:4317"):
        inj.map_addresses("http://tempo.dice-observability.svc:4317", local_addresses())


# ------------------------------------------------------------------------------------ the layout itself

@pytest.mark.integration
def test_the_layout_holds_exactly_the_compose_pins_and_the_hooks(layout):
    import tomllib

    found = inj.layout_distributions(layout)
    otel = inj.requirement_pins(REPO_ROOT / "app" / "requirements-otel.txt")
    owners = inj.requirement_pins(REPO_ROOT / "app" / "requirements.txt")
    project = tomllib.loads((REPO_ROOT / "instrumentation" / "pyproject.toml").read_text())["project"]
    size, files = inj.directory_size(layout)
    print(f"\nlayout {layout}: {size / 1e6:.1f} MB, {files} files, {len(found)} distributions")
    assert (layout / inj.SITECUSTOMIZE).is_file()
    assert {k: found.get(k) for k in otel} == otel, "the layout differs from app/requirements-otel.txt"
    assert found[inj.normalise(project["name"])] == project["version"]
    extra = {k: v for k, v in found.items() if k not in otel and k != inj.normalise(project["name"])}
    # Whatever the pins need beyond themselves is pinned by the owners' requirements (packaging, today).
    assert {k: owners.get(k) for k in extra} == extra, f"unpinned packages in the layout: {extra}"
    print(f"beyond requirements-otel.txt and zerocode: {extra}")
    # The hooks are registered where sitecustomize's initialize() looks for them.
    entry_points = (layout / f"zerocode-{project['version']}.dist-info" / "entry_points.txt").read_text()
    assert "[opentelemetry_post_instrument]" in entry_points
    # ... and the configurator that gives the SDK's HTTP histogram its fine buckets (OTEL_PYTHON_CONFIGURATOR).
    assert "[opentelemetry_configurator]" in entry_points and "zerocode = zerocode.latency:Configurator" in entry_points


@pytest.mark.integration
def test_the_owners_python_has_no_opentelemetry(owners_bin):
    result = subprocess.run([str(owners_bin / "python"), "-c", "import opentelemetry"], capture_output=True)
    assert result.returncode != 0, "the owners' Python must not have OpenTelemetry of its own"


# --------------------------------------------------------------------------------- the injection run

@pytest.fixture(scope="module")
def injected(tmp_path_factory, layout, owners_bin):
    """The native stack without its app, then the owners' command with the Pod's environment."""
    from tooling.native.container import HealthProbe

    started = time.monotonic()
    stack = NativeStack(tmp_path_factory.mktemp("k8s-injection")).up(with_app=False)
    try:
        addresses = local_addresses(stack.ports.otlp_grpc, stack.ports.otlp_http, stack.ports.pyroscope_sink)
        captured = captured_env(tmp_path_factory)
        environment, env_list, source = inj.pod_environment(
            layout, owners_bin, addresses, port=stack.ports.app, multiproc_dir=stack.app_multiproc_dir,
            mutated_env=Path(captured) if captured else None)
        # PYROSCOPE_UPLOAD_INTERVAL is the Instrumentation's (10 s): what is pending at the stop is lost.
        print(f"\nthe app container's env, {source}:")
        for var in env_list:
            print(f"  {var['name']}={environment[var['name']]}")
        stack.app = spawn("app", inj.owners_command(owners_bin), environment, REPO_ROOT / "app", stack.run_dir)
        try:
            wait_tcp("127.0.0.1", stack.ports.app, 30, stack.app.process)
        except Exception:
            raise RuntimeError(f"the injected app did not start; its log:\n{stack.app.log()[-4000:]}") from None
        # The kubelet's tcpSocket probes, like the image's healthcheck: a connection and no request.
        stack.health_probe = HealthProbe(stack.ports.app).start()
        yield {"stack": stack, "environment": environment, "env": env_list, "started": started}
    finally:
        stack.down()
        print(f"\ninjection run: {time.monotonic() - started:.1f} s from stack start to stack down")


@pytest.fixture(scope="module")
def load(injected):
    stack = injected["stack"]
    truth = run_locust(stack.app_url, LOAD_SECONDS, LOAD_USERS, stack.run_dir,
                       otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
    expected = Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})
    assert sum(expected.values()) == truth["locust_totals"]["num_requests"] > 50
    assert truth["locust_totals"]["num_failures"] == 0, "the app answered something unexpected"
    otel = ('sum by (http_route, http_response_status_code) '
            '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
    manual = 'sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})'
    seen = {}

    def counted():
        seen.update(otel=by_labels(stack.query(otel), "http_route", "http_response_status_code"),
                    manual=by_labels(stack.query(manual), "path", "status"))
        return seen["otel"] == expected and seen["manual"] == expected

    poll(counted, 45, f"otel and manual counts equal to what locust sent, {dict(expected)} (seen: {seen})")
    sent = sum(expected.values())
    poll(lambda: len(stack.tempo_sink.server_spans()) >= sent, 20,
         f"{sent} SERVER spans")
    poll(lambda: any(u.sample_labels("span_id") for u in stack.pyroscope_sink.snapshot()), 20,
         "a profile with span_id labels")
    rolls = expected[("/", "200")]
    poll(lambda: len(dice_rolled(stack)) >= rolls, 15, f"{rolls} `Dice rolled` log records")
    print(f"\nlocust sent {dict(expected)} in {LOAD_SECONDS} s with {LOAD_USERS} users")
    return {"expected": expected, "otel": otel, "manual": manual}


def dice_rolled(stack):
    return [r for r in stack.loki_sink.records("dice-api") if str(r.body).startswith("Dice rolled: ")]


@pytest.mark.integration
def test_injected_counts_per_route_and_status_equal_locust(injected, load):
    stack = injected["stack"]
    otel = by_labels(stack.query(load["otel"]), "http_route", "http_response_status_code")
    manual = by_labels(stack.query(load["manual"]), "path", "status")
    print(f"\nlocust {dict(load['expected'])}\notel   {dict(otel)}\nmanual {dict(manual)}")
    assert otel == load["expected"] and manual == load["expected"]
    assert stack.query('flask_http_request_duration_seconds_count{path="/metrics"}') == []
    assert stack.health_probe.runs >= 1 and stack.health_probe.failures == 0


@pytest.mark.integration
def test_each_gunicorn_worker_exports_as_its_own_instance(injected, load):
    """The Operator sets service.instance.id=<namespace>.<pod>.<container>, the same for every process of
    the container. Two gunicorn workers exporting under one id would be one series to the collector's
    Prometheus exporter, whose cumulative counters then overwrite each other. The SDK (1.45) refreshes its
    process-dependent resource after fork(): each worker replaces the id with a UUID of its own."""
    stack = injected["stack"]
    given = dict(pair.split("=", 1) for pair in injected["environment"]["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    operator_id = given["service.instance.id"]
    workers = int(injected["environment"]["GUNICORN_WORKERS"])
    spans = stack.tempo_sink.server_spans()
    span_ids = Counter(s.resource.get("service.instance.id") for s in spans)
    series = stack.query('count by (instance, job) (http_server_request_duration_seconds_count'
                         '{telemetry_source="otel"})')
    metric_ids = {r["metric"]["instance"] for r in series}
    jobs = {r["metric"]["job"] for r in series}
    log_ids = Counter(r.resource.get("service.instance.id") for r in stack.loki_sink.records("dice-api"))
    print(f"\nOperator's service.instance.id: {operator_id}\nSERVER spans by instance: {dict(span_ids)}"
          f"\nPrometheus `instance` of the otel request series: {sorted(metric_ids)} (job {sorted(jobs)})"
          f"\nlog records by instance: {dict(log_ids)}")
    assert len(span_ids) == workers, f"{workers} workers, SERVER spans from {len(span_ids)} instance ids"
    assert metric_ids == set(span_ids), "metrics and spans of a worker under different ids"
    assert operator_id not in span_ids, "workers export under the Operator's shared id"
    # Every other attribute the Pod gives (k8s.*, service.namespace, service.version) stays on each worker.
    for span in (spans[0], spans[-1]):
        assert {k: span.resource.get(k) for k in given if k != "service.instance.id"} == \
            {k: v for k, v in given.items() if k != "service.instance.id"}
    assert given["k8s.deployment.name"] == "dice-api" and given["service.namespace"] == "dice-observability"


@pytest.mark.integration
def test_injected_traces_one_server_span_per_request(injected, load):
    seen = injected["stack"].tempo_sink.requests_by_route_and_status()
    print(f"\nserver spans {sum(seen.values())} locust {sum(load['expected'].values())}")
    assert seen == load["expected"]
    # The zerocode flask_errors hook ran: the exception the app's handler swallows is on the span.
    fails = injected["stack"].tempo_sink.server_spans("/fail")
    assert fails and all(s.is_error_with_exception for s in fails)


@pytest.mark.integration
def test_injected_exemplars_link_to_exported_traces(injected, load):
    stack = injected["stack"]
    now = time.time()
    histogram = 'http_server_request_duration_seconds_bucket{telemetry_source="otel"}'
    data = prometheus_query(stack.prometheus_url, histogram, path="query_exemplars", start=now - 600, end=now)
    trace_ids = {e["labels"]["trace_id"] for series in data for e in series["exemplars"]}
    exported = {s.trace_id for s in stack.tempo_sink.spans()}
    print(f"\nexemplar trace ids {len(trace_ids)}, matched {len(trace_ids & exported)}")
    assert trace_ids and trace_ids <= exported


@pytest.mark.integration
def test_injected_span_profiles(injected, load):
    stack = injected["stack"]
    # The workers upload every PYROSCOPE_UPLOAD_INTERVAL (10 s): the samples of the load's last seconds
    # may still be on their way (seen once: no upload with the view function yet when this test began).
    def with_view_function():
        uploads = stack.pyroscope_sink.snapshot()
        assert VIEW_FUNCTION in set().union(*[u.function_names() for u in uploads]), f"{len(uploads)} uploads"
        return uploads

    uploads = poll(with_view_function, 25, f"a CPU profile with {VIEW_FUNCTION}")
    assert {u.labels["service_name"] for u in uploads} == {"dice-api"}
    labelled = set().union(*[u.sample_labels("span_id") for u in uploads])
    roots = {s.attributes.get("pyroscope.profile.id") for s in stack.tempo_sink.server_spans()}
    pids = set().union(*[u.sample_labels("pid") for u in uploads]) or {u.labels.get("pid") for u in uploads}
    print(f"\nprofile uploads {len(uploads)} from pids {sorted(map(str, pids))}, "
          f"span ids in profiles {len(labelled)}, matched {len(labelled & roots)}")
    assert None not in roots, "a SERVER span without pyroscope.profile.id"
    assert labelled and labelled <= roots


@pytest.mark.integration
def test_injected_log_records_one_per_roll_in_the_request_trace(injected, load):
    stack = injected["stack"]
    time.sleep(2)  # anything doubled would have arrived (the SDK exports logs every second)
    records = dice_rolled(stack)
    spans = {(s.trace_id, s.span_id) for s in stack.tempo_sink.server_spans("/")}
    print(f"\n`Dice rolled` records {len(records)}, rolls sent {load['expected'][('/', '200')]}")
    assert len(records) == load["expected"][("/", "200")]
    assert {(r.trace_id, r.span_id) for r in records} == spans
    errors = [r for r in stack.loki_sink.records("dice-api") if r.severity == "ERROR"]
    assert len(errors) == load["expected"][("/fail", "500")]
    print(f"injection run so far: {time.monotonic() - injected['started']:.1f} s")
