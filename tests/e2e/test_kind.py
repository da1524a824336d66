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
from backend_checks import SERVICE, Backends, send_known_load, skip_unless, why_no_docker
from stackfiles import REPO_ROOT, dotenv

from tooling.k8s.render import BEYLA_NAMESPACE, NAMESPACE, OWNERS_IMAGE, zerocode_image
from tooling.native.stack import poll

pytestmark = pytest.mark.e2e

skip_unless("kind tier", why_no_docker())

CLUSTER = "dice-e2e"
INIT_CONTAINER = "opentelemetry-auto-instrumentation-python"  # the Operator's name for it
LOG_DIR = REPO_ROOT / ".cache" / "e2e" / "kind"
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

    def app_pods(self) -> list[dict]:
        """The app's pods that serve: not those still terminating after a rollout restart."""
        pods = self.objects("pods", selector=f"app.kubernetes.io/name={SERVICE}")
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


def build_images(env: dict[str, str]) -> None:
    """The two images of the README's Kubernetes prerequisites, built the way it says."""
    python = ("--build-arg", f"PYTHON_VERSION={env['PYTHON_VERSION']}")
    busybox = ("--build-arg", f"BUSYBOX_VERSION={env['BUSYBOX_VERSION']}")
    run("docker", "build", "--target", "owners", *python, "-t", OWNERS_IMAGE,
        "-f", REPO_ROOT / "app" / "Dockerfile", REPO_ROOT, timeout=1200)
    run("docker", "build", *python, *busybox, "-t", zerocode_image(),
        "-f", REPO_ROOT / "instrumentation" / "Dockerfile", REPO_ROOT, timeout=1200)


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
    for namespace, kinds in ((NAMESPACE, "deployment,statefulset"), (BEYLA_NAMESPACE, "daemonset")):
        for name in cluster.k("-n", namespace, "get", kinds, "-o", "name").split():
            cluster.k("-n", namespace, "rollout", "status", name, "--timeout=600s", timeout=630)


def init_names(pod: dict) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers", [])]


def keep_logs(cluster: Cluster) -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "pods.txt").write_text(cluster.k("get", "pods", "-A", "-o", "wide", check=False))
    (LOG_DIR / "events.txt").write_text(cluster.k("get", "events", "-A", "--sort-by=.lastTimestamp", check=False))
    for namespace in (NAMESPACE, BEYLA_NAMESPACE, "opentelemetry-operator-system"):
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
        run(cluster.kind, "load", "docker-image", "--name", CLUSTER, OWNERS_IMAGE, zerocode_image(),
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
        pyroscope=cluster.forward("svc/pyroscope", 4040), grafana=cluster.forward("svc/grafana", 3000),
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

    load = send_known_load(backends, list(apps), beyla=True, locust_host=f"http://{SERVICE}:5000",
                           breakdown=per_pod)
    before, after = load["breakdown"]
    load["per_pod"] = {source: {pod: round(after[source][pod] - before[source][pod]) for pod in after[source]}
                       for source in PER_POD}
    load["sent_by_pod"] = {apps[url]: sum(counts.values()) for url, counts in load["sent_by_app"].items()}
    return load


# --- the cluster -------------------------------------------------------------------------------------


def test_every_workload_is_ready_with_two_app_replicas(cluster):
    for namespace, kind in ((NAMESPACE, "deployments"), (NAMESPACE, "statefulsets")):
        for item in cluster.objects(kind, namespace):
            name, wanted = item["metadata"]["name"], item["spec"]["replicas"]
            assert item["status"].get("readyReplicas", 0) == wanted, f"{kind} {name}: {item['status']}"
            if name == SERVICE:
                assert wanted == 2
    (beyla,) = cluster.objects("daemonsets", BEYLA_NAMESPACE)
    assert beyla["status"]["numberReady"] == beyla["status"]["desiredNumberScheduled"] >= 1, beyla["status"]


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
