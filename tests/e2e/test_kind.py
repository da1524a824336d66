"""The docker tier on Kubernetes: k8s/ applied to a real kind cluster, with cert-manager and the
OpenTelemetry Operator installed as the README says, checked through each backend's HTTP API.

Runs wherever a Docker engine answers (`make e2e-k8s`, and the e2e GitHub workflow); skipped, saying why,
everywhere else. It builds the two images of the README (the owners' image and our instrumentation
image), creates a kind cluster from KIND_NODE_IMAGE (.env) with kind KIND_VERSION built from its Go
module, loads the images into it, installs cert-manager and the Operator at .env's versions, runs
`kubectl apply -k k8s/`, and waits for every workload. Then it holds:
- the owners' image has nothing of ours; every dice-api pod was mutated by the Operator's webhook (our
  image's init container, PYTHONPATH), and still runs the owners' command;
- the claims of the compose tier, with the same code (backend_checks.py): each source (ebpf, otel,
  manual) counts exactly a known load per route and status, sent half to each of the two replicas
  through port-forwards; the recording rules; Tempo's GET / and /fail traces; Loki's records and their
  trace ids; Pyroscope's CPU profile and span profiles; Grafana's datasources and dashboards;
- the edge in front of the app: the same known load sent through it (svc/edge, its app listener) is counted
  exactly per route and status by the edge's spans (telemetry_source="edge") and per status by Caddy's own
  metrics (Prometheus's `edge` job, every edge pod scraped), while every in-process source counts it too;
  a trace in Tempo runs edge SERVER -> edge CLIENT hop -> dice-api SERVER, each inside its parent's time,
  the edge's spans carrying their pod; Grafana is reached through the edge's grafana listener (every
  Grafana check below goes through it) and locust calls the app through the edge;
- and what only Kubernetes adds: each replica counted on its own by the manual scrape (`pod`) and by Beyla
  (`k8s_pod_name`), spans and log streams that carry the pod, namespace and deployment of the replica that
  served them, and locust's master with its workers.
The cluster is deleted at the end (E2E_KEEP_STACK=1 keeps it); pods, events and logs are written to
.cache/e2e/kind/ first, for CI to keep when something fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import backend_checks as checks
import pytest
import requests
from backend_checks import PLAN, SERVICE, Backends, send_known_load, skip_unless, why_no_docker
from stackfiles import EXPECTED_STATUS, REPO_ROOT, dotenv

from tooling.k8s.injection import MOUNT_PATH
from tooling.k8s.render import BEYLA_NAMESPACE, NAMESPACE, NODE_EXPORTER_NAMESPACE, OWNERS_IMAGE, zerocode_image
from tooling.native import own_app
from tooling.native.stack import poll
from tooling.reports.compare import UNMATCHED, difference, take_snapshot

pytestmark = pytest.mark.e2e

skip_unless("kind tier", why_no_docker())

CLUSTER = "dice-e2e"
INIT_CONTAINER = "opentelemetry-auto-instrumentation-python"  # the Operator's name for it
LOG_DIR = REPO_ROOT / ".cache" / "e2e" / "kind"
# The edge (k8s/stack/edge.yaml): its pods' label, its Service's listeners (compose's), and where locust
# sends its load in k8s/ (as compose's locust, --host=http://edge:8080).
EDGE = "edge"
EDGE_APP_PORT, EDGE_GRAFANA_PORT = 8080, 3000
LOCUST_HOST = f"http://{EDGE}:{EDGE_APP_PORT}"
# Clocks of two processes on the kind node (Go's time.Now in Caddy, Python's time_ns in the app): a child span
# that starts before its parent by more than this is a broken parent link, not clock granularity.
CLOCK_SLACK_NS = 2_000_000
CERT_MANAGER_URL = "https://github.com/cert-manager/cert-manager/releases/download/{}/cert-manager.yaml"
OPERATOR_URL = "https://github.com/open-telemetry/opentelemetry-operator/releases/download/{}/opentelemetry-operator.yaml"


def run(*args: str | Path, timeout: float = 600, check: bool = True, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, args))}` exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


@dataclass
class Cluster:
    kind: Path
    kubectl: Path
    kubeconfig: Path
    forwards: list[subprocess.Popen]

    def k(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return run(self.kubectl, "--kubeconfig", self.kubeconfig, *args, timeout=timeout, check=check)

    def objects(self, kind: str, namespace: str = NAMESPACE, selector: str = "") -> list[dict]:
        args = ["-n", namespace, "get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.k(*args))["items"]

    def app_pods(self, name: str = SERVICE) -> list[dict]:
        """The pods of a workload (the app's by default) that serve: not those still terminating after a
        rollout restart."""
        pods = self.objects("pods", selector=f"app.kubernetes.io/name={name}")
        return [pod for pod in pods if "deletionTimestamp" not in pod["metadata"]]

    def forward(self, target: str, remote_port: int, namespace: str = NAMESPACE) -> str:
        """kubectl port-forward to a random local port; returns the local base URL. Its output goes to a
        file: it prints a line per connection, which would fill an unread pipe and stall the forward."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / f"port-forward-{target.replace('/', '-')}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), "-n", namespace, "port-forward",
                 "--address", "127.0.0.1", target, f":{remote_port}"],
                stdout=out, stderr=subprocess.STDOUT)
        self.forwards.append(process)

        def local_port():
            assert process.poll() is None, f"kubectl port-forward {target} exited: {log.read_text()}"
            # "Forwarding from 127.0.0.1:41235 -> 9090"
            return re.search(r"127\.0\.0\.1:(\d+) ->", log.read_text())

        return f"http://127.0.0.1:{poll(local_port, 60, f'kubectl port-forward {target}', interval=0.5).group(1)}"


OWN_APP = own_app.OwnApp("httpbin")  # the example of docs/own-app.md deployed by annotation (examples/httpbin/)
OWN_APP_NAMESPACE = OWN_APP.pod().namespace
OWN_APP_IMAGE = OWN_APP.container()["image"]


def build_images(env: dict[str, str]) -> None:
    """The two images of the README's Kubernetes prerequisites, built the way it says, and a user's own image
    (docs/own-app.md: httpbin, from examples/httpbin/), built as its owners build it."""
    python = ("--build-arg", f"PYTHON_VERSION={env['PYTHON_VERSION']}")
    busybox = ("--build-arg", f"BUSYBOX_VERSION={env['BUSYBOX_VERSION']}")
    run("docker", "build", "--target", "owners", *python, "-t", OWNERS_IMAGE,
        "-f", REPO_ROOT / "app" / "Dockerfile", REPO_ROOT, timeout=1200)
    run("docker", "build", *python, *busybox, "-t", zerocode_image(),
        "-f", REPO_ROOT / "instrumentation" / "Dockerfile", REPO_ROOT, timeout=1200)
    run("docker", "build", *python, "-t", OWN_APP_IMAGE, OWN_APP.folder, timeout=1200)


def install_stack(cluster: Cluster, env: dict[str, str]) -> None:
    """cert-manager, then the Operator, then `kubectl apply -k k8s/`: the README's order."""
    cluster.k("apply", "-f", CERT_MANAGER_URL.format(env["CERT_MANAGER_VERSION"]))
    cluster.k("-n", "cert-manager", "wait", "--for=condition=Available", "deployment", "--all", "--timeout=300s",
              timeout=330)
    cluster.k("apply", "-f", OPERATOR_URL.format(env["OTEL_OPERATOR_VERSION"]))
    cluster.k("-n", "opentelemetry-operator-system", "wait", "--for=condition=Available", "deployment", "--all",
              "--timeout=300s", timeout=330)

    # The Operator's webhooks answer a little after its Deployment is Available (its serving certificate
    # comes from cert-manager): until then the Instrumentation is refused, so apply again until all is taken.
    def applied():
        done = subprocess.run([str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "apply", "-k",
                               str(REPO_ROOT / "k8s")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return True

    poll(applied, 300, "`kubectl apply -k k8s/` accepted whole", interval=10)
    # An app pod made before the Instrumentation existed is not injected: restart them, as the README says.
    if any(INIT_CONTAINER not in init_names(pod) for pod in cluster.app_pods()):
        cluster.k("-n", NAMESPACE, "rollout", "restart", f"deployment/{SERVICE}")
    for namespace, kinds in ((NAMESPACE, "deployment,statefulset"), (BEYLA_NAMESPACE, "daemonset"),
                             (NODE_EXPORTER_NAMESPACE, "daemonset")):
        for name in cluster.k("-n", namespace, "get", kinds, "-o", "name").split():
            cluster.k("-n", namespace, "rollout", "status", name, "--timeout=600s", timeout=630)


def init_names(pod: dict) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers", [])]


def keep_logs(cluster: Cluster) -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "pods.txt").write_text(cluster.k("get", "pods", "-A", "-o", "wide", check=False))
    (LOG_DIR / "events.txt").write_text(cluster.k("get", "events", "-A", "--sort-by=.lastTimestamp", check=False))
    for namespace in (NAMESPACE, BEYLA_NAMESPACE, NODE_EXPORTER_NAMESPACE, "opentelemetry-operator-system"):
        for pod in cluster.k("-n", namespace, "get", "pods", "-o", "name", check=False).split():
            text = cluster.k("-n", namespace, "logs", pod, "--all-containers", "--tail=2000", check=False)
            (LOG_DIR / f"{namespace}_{pod.removeprefix('pod/')}.log").write_text(text)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tooling.builds import binary, k8s_tools
    from tooling.builds.recipes import kind_node_image

    env = dotenv()
    cluster = Cluster(kind=binary("kind"), kubectl=k8s_tools().kubectl,
                      kubeconfig=tmp_path_factory.mktemp("kind") / "kubeconfig", forwards=[])
    build_images(env)
    # Leftovers of an aborted run would keep its old pods and volumes.
    run(cluster.kind, "delete", "cluster", "--name", CLUSTER, check=False)
    run(cluster.kind, "create", "cluster", "--name", CLUSTER, "--image", kind_node_image(),
        "--kubeconfig", cluster.kubeconfig, "--wait", "300s", timeout=900)
    try:
        run(cluster.kind, "load", "docker-image", "--name", CLUSTER, OWNERS_IMAGE, zerocode_image(), OWN_APP_IMAGE,
            timeout=900)
        install_stack(cluster, env)
        yield cluster
    finally:
        for process in cluster.forwards:
            process.terminate()
        keep_logs(cluster)
        if os.environ.get("E2E_KEEP_STACK") != "1":
            run(cluster.kind, "delete", "cluster", "--name", CLUSTER, check=False)


@pytest.fixture(scope="module")
def backends(cluster) -> Backends:
    password = cluster.k("-n", NAMESPACE, "exec", "grafana-0", "--", "cat", "/var/lib/grafana/admin-password")
    return Backends(
        prometheus=cluster.forward("svc/prometheus", 9090), alertmanager=cluster.forward("svc/alertmanager", 9093),
        tempo=cluster.forward("svc/tempo", 3200), loki=cluster.forward("svc/loki", 3100),
        pyroscope=cluster.forward("svc/pyroscope", 4040),
        # Grafana as users reach it: through the edge's grafana listener (compose publishes it only there).
        grafana=cluster.forward(f"svc/{EDGE}", EDGE_GRAFANA_PORT),
        locust=cluster.forward("svc/locust", 8089), grafana_admin=("admin", password.strip()),
    )


# Per replica: what the manual scrape (relabelled `pod`) and Beyla (its Kubernetes decoration) count.
PER_POD = {
    "manual": ("pod", 'sum by (pod) (flask_http_request_total{telemetry_source="manual"})'),
    "ebpf": ("k8s_pod_name", 'sum by (k8s_pod_name) (http_server_request_duration_seconds_count'
                             f'{{telemetry_source="ebpf", service_name="{SERVICE}"}})'),
}


@pytest.fixture(scope="module")
def load(cluster, backends) -> dict:
    """The known load of backend_checks.send_known_load, half to each app replica through a port-forward
    of its own; plus each replica's count per source, taken at the same two instants."""
    pods = [pod["metadata"]["name"] for pod in cluster.app_pods() if pod["status"]["phase"] == "Running"]
    assert len(pods) == 2, f"two app replicas expected, running: {pods}"
    apps = {cluster.forward(f"pod/{pod}", 5000): pod for pod in pods}

    def per_pod() -> dict[str, Counter]:
        return {source: Counter({row["metric"].get(label, ""): float(row["value"][1])
                                 for row in backends.prometheus_query(query)})
                for source, (label, query) in PER_POD.items()}

    load = send_known_load(backends, list(apps), beyla=True, locust_host=LOCUST_HOST, breakdown=per_pod)
    before, after = load["breakdown"]
    load["per_pod"] = {source: {pod: round(after[source][pod] - before[source][pod]) for pod in after[source]}
                       for source in PER_POD}
    load["sent_by_pod"] = {apps[url]: sum(counts.values()) for url, counts in load["sent_by_app"].items()}
    return load


# Caddy's own count per status on its app listener, summed over the edge pods (the `edge` scrape job).
CADDY_BY_CODE = f'sum by (code) (caddy_http_request_duration_seconds_count{{job="{EDGE}", server="app"}})'


def expected_through_the_edge() -> Counter:
    """What the known load (backend_checks.PLAN) is, per (route, status), when every answer is the app's."""
    return Counter((path if path in EXPECTED_STATUS else UNMATCHED, str(EXPECTED_STATUS.get(path, 404)))
                   for path in PLAN)


@pytest.fixture(scope="module")
def edge_load(cluster, backends, load) -> dict:
    """The same known load again, after the direct one, this time through the edge (a port-forward of
    svc/edge's app listener; the edge's Service then spreads it over the app's replicas). send_known_load
    holds locust stopped until otel, manual and ebpf have each counted it exactly; the breakdown it reads
    (once when every source, the edge's included, stands still, then until every source has counted)
    adds the edge: its spans per route and status, and Caddy's own count per status. It raises until
    both have counted the load exactly, which keeps send_known_load polling, so all of it is read before
    locust's background load, which also goes through the edge, starts again."""
    edge = cluster.forward(f"svc/{EDGE}", EDGE_APP_PORT)
    expected = expected_through_the_edge()
    by_status = Counter()
    for (_, status), n in expected.items():
        by_status[status] += n
    seen: dict = {}

    def caddy_by_code() -> Counter:
        return Counter({row["metric"]["code"]: float(row["value"][1])
                        for row in backends.prometheus_query(CADDY_BY_CODE)})

    def edge_counts():
        snapshot, caddy = take_snapshot(backends.prometheus), caddy_by_code()
        if "before" not in seen:
            seen["before"] = (snapshot, caddy)
            return seen["before"]
        spans = difference(snapshot, seen["before"][0]).counts.get(EDGE, Counter())
        codes = Counter({code: round(n - seen["before"][1][code]) for code, n in caddy.items()})
        seen["after"] = {"spans": spans, "caddy": +codes}
        assert spans == expected, f"edge span metrics {dict(spans)}, sent {dict(expected)}"
        assert +codes == by_status, f"Caddy's count by code {dict(+codes)}, sent {dict(by_status)}"
        return seen["after"]

    result = send_known_load(backends, [edge], beyla=True, locust_host=LOCUST_HOST, breakdown=edge_counts)
    assert result["sent"] == expected, "send_known_load sent another plan than backend_checks.PLAN"
    result["edge"] = result["breakdown"][1]
    return result


# --- the cluster -------------------------------------------------------------------------------------


def test_every_workload_is_ready_with_two_app_replicas(cluster):
    for namespace, kind in ((NAMESPACE, "deployments"), (NAMESPACE, "statefulsets")):
        for item in cluster.objects(kind, namespace):
            name, wanted = item["metadata"]["name"], item["spec"]["replicas"]
            assert item["status"].get("readyReplicas", 0) == wanted, f"{kind} {name}: {item['status']}"
            if name == SERVICE:
                assert wanted == 2
    for namespace in (BEYLA_NAMESPACE, NODE_EXPORTER_NAMESPACE):
        (daemonset,) = cluster.objects("daemonsets", namespace)
        status = daemonset["status"]
        assert status["numberReady"] == status["desiredNumberScheduled"] >= 1, (namespace, status)


def test_the_owners_image_holds_nothing_of_ours():
    probe = ("import importlib.util as u; "
             "print([m for m in ('opentelemetry', 'pyroscope', 'zerocode') if u.find_spec(m)])")
    assert run("docker", "run", "--rm", "--entrypoint", "python", OWNERS_IMAGE, "-c", probe).strip() == "[]"


def test_the_operator_injected_our_image_into_every_app_pod(cluster):
    for pod in cluster.app_pods():
        name = pod["metadata"]["name"]
        (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == INIT_CONTAINER]
        assert init["image"] == zerocode_image(), name
        (app,) = [c for c in pod["spec"]["containers"] if c["name"] == SERVICE]
        assert app["image"] == OWNERS_IMAGE and app["command"] == ["gunicorn", "-c", "gunicorn.conf.py"], name
        env = {item["name"]: item.get("value") for item in app["env"]}
        assert "/otel-auto-instrumentation-python" in env["PYTHONPATH"], env
        assert env["OTEL_SERVICE_NAME"] == SERVICE, env


# --- the claims of the compose tier (backend_checks) -------------------------------------------------


def test_every_source_counts_exactly_what_was_sent_per_route_and_status(load):
    checks.every_source_counts_what_was_sent(load)


def test_the_recording_rules_have_rows_for_every_source(backends, load):
    checks.recording_rule_rows(backends, load["sources"])


def test_tempo_finds_a_get_root_trace(backends, load):
    checks.tempo_finds_a_get_root_trace(backends)


def test_tempo_finds_an_error_trace_for_fail(backends, load):
    checks.tempo_finds_an_error_trace_for_fail(backends)


def test_loki_has_one_dice_rolled_record_per_get_root(backends, load):
    checks.loki_has_one_dice_rolled_record_per_get_root(backends, load)


def test_loki_has_one_error_record_per_failed_request(backends, load):
    checks.loki_has_one_error_record_per_failed_request(backends, load)


def test_a_trace_id_from_tempo_finds_its_logs_in_loki(backends, load):
    checks.a_trace_id_from_tempo_finds_its_logs(backends, load)


def test_loki_indexes_service_name_but_not_trace_ids(backends, load):
    checks.loki_indexes_service_name_but_not_trace_ids(backends)


def test_pyroscope_has_a_cpu_profile_with_the_view_function(backends, load):
    checks.pyroscope_has_a_cpu_profile_with_the_view_function(backends)


def test_span_ids_of_traces_resolve_to_span_profiles(backends, load):
    checks.span_ids_of_traces_resolve_to_span_profiles(backends)


def test_prometheus_sends_alerts_to_the_alertmanager(backends):
    checks.prometheus_sends_alerts_to_the_alertmanager(
        # The address of compose's Prometheus config, unchanged: the Service alertmanager in the same namespace.
        backends, "http://alertmanager:9093/api/v2/alerts", dotenv()["ALERTMANAGER_VERSION"])


def test_grafana_datasources_are_healthy(backends):
    checks.grafana_datasources_are_healthy(backends)


def test_every_provisioned_dashboard_loads_and_its_queries_return_data(backends, load):
    checks.every_dashboard_loads_and_its_queries_return_data(backends)


def test_node_exporter_and_the_kubelets_cadvisor_measure_the_nodes_and_the_app(backends, load):
    """node-exporter's DaemonSet on every node, every kubelet's cAdvisor scraped with nodes/metrics only, and
    the naming layer giving the dice-api pods' container service="app", with the limits of k8s/stack/app.yaml
    summed over its replicas."""
    from tooling.k8s.render import kustomize_build

    (deployment,) = [o for o in kustomize_build(REPO_ROOT / "k8s") if o["kind"] == "Deployment"
                     and o["metadata"]["name"] == SERVICE]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == SERVICE]
    limits, replicas = container["resources"]["limits"], deployment["spec"]["replicas"]
    cpu = float(limits["cpu"][:-1]) / 1000 if str(limits["cpu"]).endswith("m") else float(limits["cpu"])
    assert str(limits["memory"]).endswith("Mi"), limits
    memory = int(str(limits["memory"]).removesuffix("Mi")) * 2**20
    checks.exporters_measure_the_host_and_the_app(backends, cpu * replicas, memory * replicas, kubelets=True)


# --- what Kubernetes adds ----------------------------------------------------------------------------


def test_each_replica_is_counted_on_its_own_by_the_manual_scrape_and_by_beyla(load):
    print(f"\nsent per pod {load['sent_by_pod']}")
    for source, counted in load["per_pod"].items():
        print(f"{source:7} {counted}")
        assert {pod: n for pod, n in counted.items() if n} == load["sent_by_pod"], (
            f"{source} per {PER_POD[source][0]}: {counted}, sent {load['sent_by_pod']}")


def test_spans_carry_the_pod_namespace_and_deployment_of_their_replica(backends, load):
    for pod in load["sent_by_pod"]:
        query = (f'{{ resource.service.name = "{SERVICE}" && resource.k8s.pod.name = "{pod}" && '
                 f'resource.k8s.namespace.name = "{NAMESPACE}" && resource.k8s.deployment.name = "{SERVICE}" }}')
        traces = poll(lambda query=query: backends.tempo_search(query), 180, f"Tempo search {query}", interval=5)
        assert all(trace.get("rootServiceName") == SERVICE for trace in traces)


def test_log_streams_carry_the_pod_namespace_and_deployment_of_their_replica(backends, load):
    # Loki's OTLP defaults make these resource attributes stream labels (the trace ids stay metadata).
    def labelled():
        values = {label: set(backends.loki_get(f"label/{label}/values", {})["data"])
                  for label in ("k8s_pod_name", "k8s_namespace_name", "k8s_deployment_name")}
        assert set(load["sent_by_pod"]) <= values["k8s_pod_name"], values
        assert NAMESPACE in values["k8s_namespace_name"] and SERVICE in values["k8s_deployment_name"], values
        return values

    poll(labelled, 120, "Loki stream labels of both app pods", interval=5)


def test_locust_runs_distributed_with_its_workers(backends, load):
    stats = requests.get(f"{backends.locust}/stats/requests", timeout=10).json()
    workers = stats.get("workers", [])
    assert len(workers) >= 2, f"locust master sees {len(workers)} workers: {workers}"


# --- the edge in front of the app ----------------------------------------------------------------------


def test_every_source_and_the_edge_count_exactly_what_was_sent_through_the_edge(edge_load):
    checks.every_source_counts_what_was_sent(edge_load)
    print(f"edge    {dict(edge_load['edge']['spans'])}\ncaddy   {dict(edge_load['edge']['caddy'])}")
    assert edge_load["edge"]["spans"] == edge_load["sent"]


def test_prometheus_scrapes_every_edge_pod(cluster, backends):
    pods = {pod["metadata"]["name"] for pod in cluster.app_pods(EDGE)}
    assert len(pods) == 2, f"two edge replicas expected: {pods}"

    def up():
        rows = backends.prometheus_query(f'up{{job="{EDGE}"}}')
        targets = {row["metric"].get("pod"): row["value"][1] for row in rows}
        assert targets == {pod: "1" for pod in pods}, targets
        return targets

    poll(up, 120, f"up{{job={EDGE!r}}} == 1 for each of {sorted(pods)}", interval=5)


SPAN_KINDS = {"SPAN_KIND_SERVER": "server", "SPAN_KIND_CLIENT": "client", 2: "server", 3: "client"}


def spans_of(trace: dict) -> list[dict]:
    """Every span of a Tempo trace (its /api/traces JSON: batches, or resourceSpans), with its resource's
    attributes and its span attributes as plain dicts, and its kind as "server"/"client"."""
    def values(attributes):
        return {a["key"]: next(iter(a["value"].values()), None) for a in attributes or []}

    found = []
    for batch in trace.get("batches", trace.get("resourceSpans", [])):
        resource = values(batch.get("resource", {}).get("attributes"))
        for scope in batch.get("scopeSpans", batch.get("instrumentationLibrarySpans", [])):
            for span in scope.get("spans", []):
                found.append({**span, "resource": resource, "attributes": values(span.get("attributes")),
                              "kind": SPAN_KINDS.get(span.get("kind"), span.get("kind"))})
    return found


def test_the_app_span_is_the_child_of_the_edge_hop_inside_the_edge_span(cluster, backends, edge_load):
    query = f'{{ resource.service.name = "{EDGE}" && span.http.route = "/" && kind = server }}'
    edge_pods = {pod["metadata"]["name"] for pod in cluster.app_pods(EDGE)}

    def a_chain():
        for found in backends.tempo_search(query, limit=20):
            spans = spans_of(backends.trace(found["traceID"]) or {})
            by_id = {span["spanId"]: span for span in spans}
            for app in spans:
                if app["resource"].get("service.name") != SERVICE or app["kind"] != "server":
                    continue
                hop = by_id.get(app.get("parentSpanId"))
                server = by_id.get(hop.get("parentSpanId")) if hop else None
                if server:
                    return server, hop, app
        return None

    server, hop, app = poll(a_chain, 180, f"a trace of {query} with the app's span under the edge's", interval=5)
    # The edge's SERVER span (the request as the user sent it), its hop into the app (re-kinded CLIENT by the
    # collector, so that the service graph reads edge -> dice-api), then the app's SERVER span.
    assert (server["resource"]["service.name"], server["kind"], server["attributes"].get("http.route")) == \
        (EDGE, "server", "/")
    assert (hop["resource"]["service.name"], hop["kind"], hop["attributes"].get("edge.hop")) == \
        (EDGE, "client", "upstream")
    assert app["attributes"].get("http.route") == "/"
    # Each inside its parent's time: what the edge span holds beyond the app's is the wait for a worker.
    for child, parent in ((hop, server), (app, hop)):
        assert int(parent["startTimeUnixNano"]) - CLOCK_SLACK_NS <= int(child["startTimeUnixNano"]), (child, parent)
        assert int(child["endTimeUnixNano"]) <= int(parent["endTimeUnixNano"]) + CLOCK_SLACK_NS, (child, parent)
    # The edge's spans carry the pod that served them: the collector's k8s_attributes, by the connection's
    # source address (Caddy sets no Kubernetes attribute itself).
    assert server["resource"].get("k8s.pod.name") in edge_pods, server["resource"]
    assert server["resource"].get("k8s.deployment.name") == EDGE, server["resource"]
    assert server["resource"].get("k8s.namespace.name") == NAMESPACE, server["resource"]


def test_locust_calls_the_app_through_the_edge(backends, edge_load):
    # The service graph pairs locust's CLIENT spans with the edge's SERVER spans, and the edge's hop with the
    # app's: locust's background load (running again after the known loads) goes through the edge, and
    # never straight to the app, in k8s/ as in compose.
    query = 'sum by (client, server) (traces_service_graph_request_total{telemetry_source="otel"})'

    def through_the_edge():
        edges = {(r["metric"]["client"], r["metric"]["server"]): float(r["value"][1])
                 for r in backends.prometheus_query(query)}
        assert edges.get(("locust", EDGE), 0) > 0 and edges.get((EDGE, SERVICE), 0) > 0, edges
        return edges

    edges = poll(through_the_edge, 180, f"service graph edges locust -> {EDGE} -> {SERVICE}", interval=5)
    assert ("locust", SERVICE) not in edges, edges


# ------------------------------------------------------------------- a user's own Deployment, by annotation

# What is sent to the user's app, per (route, status): httpbin's routes (examples/httpbin/locustfile.py).
OWN_APP_PLAN = {("/get", "200", "/get"): 30, ("/drip", "500", "/drip?numbytes=abc"): 10,
                ("/status/<codes>", "503", "/status/503"): 5}


@pytest.fixture(scope="module")
def users_app(cluster, backends) -> dict:
    """examples/httpbin/deployment.yaml applied as its owners would (its namespace first), the pod injected by
    the Operator's webhook through the pod template's one annotation; then a known load through a port-forward."""
    cluster.k("apply", "-f", own_app.EXAMPLES / "namespace.yaml", "-f", OWN_APP.manifest)
    name = OWN_APP.pod().deployment
    cluster.k("-n", OWN_APP_NAMESPACE, "rollout", "status", f"deployment/{name}", "--timeout=300s", timeout=330)
    url = cluster.forward(f"svc/{name}", OWN_APP.exposed_port(), namespace=OWN_APP_NAMESPACE)
    for (_, status, path), count in OWN_APP_PLAN.items():
        for _ in range(count):
            assert str(requests.get(url + path, timeout=10).status_code) == status, path
    pods = [pod for pod in cluster.objects("pods", OWN_APP_NAMESPACE, f"app.kubernetes.io/name={name}")
            if "deletionTimestamp" not in pod["metadata"]]
    return {"url": url, "pods": pods, "sent": Counter({(route, status): n for (route, status, _), n in
                                                       OWN_APP_PLAN.items()})}


def test_the_users_deployment_is_injected_by_its_annotation_alone(users_app):
    (pod,) = users_app["pods"]
    assert INIT_CONTAINER in init_names(pod)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == OWN_APP_IMAGE and "command" not in container, "the owners' image and CMD, untouched"
    env = {var["name"]: var.get("value") for var in container["env"]}
    assert env["OTEL_SERVICE_NAME"] == OWN_APP.service_name and env["PYTHONPATH"].startswith(MOUNT_PATH)


def test_the_users_app_is_counted_exactly_by_otel(backends, users_app):
    query = ('sum by (http_route, http_response_status_code) (http_server_request_duration_seconds_count'
             f'{{telemetry_source="otel", job="{OWN_APP_NAMESPACE}/{OWN_APP.service_name}"}})')

    def counted():
        rows = backends.prometheus_query(query)
        seen = Counter({(r["metric"].get("http_route"), r["metric"]["http_response_status_code"]):
                        int(float(r["value"][1])) for r in rows})
        assert seen == users_app["sent"], f"sent {dict(users_app['sent'])}, otel {dict(seen)}"
        return seen

    poll(counted, 90, f"{OWN_APP.service_name}'s otel counts")


def test_the_users_app_traces_its_exceptions_and_profiles(backends, users_app):
    def failing():
        found = backends.tempo_search(f'{{resource.service.name="{OWN_APP.service_name}" '
                                      f'&& span.http.route="/drip" && status=error}}', limit=50)
        assert len(found) == users_app["sent"][("/drip", "500")], f"{len(found)} error traces of /drip"
        return found

    poll(failing, 90, f"{OWN_APP.service_name}'s error traces of /drip")
    # httpbin's /get view function in the flame graph of its own service.
    body = {"profileTypeID": checks.CPU_PROFILE, "labelSelector": f'{{service_name="{OWN_APP.service_name}"}}',
            **checks.last_minutes_ms()}
    poll(lambda: any("view_get" in name for name in backends.pyroscope_query("SelectMergeStacktraces", body)
                     .get("flamegraph", {}).get("names", [])),
         240, f"a CPU profile of {OWN_APP.service_name} with view_get", interval=5)
