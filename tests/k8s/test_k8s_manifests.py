"""k8s/: what `kubectl apply -k k8s/` installs, checked statically (the unit tier).

The generated files must equal what `python -m tooling.k8s.render` makes of the compose stack's files,
every image tag must come from .env, every workload must be bounded, probed and (Beyla aside) non-root,
the app must run its owners' image and command with no OpenTelemetry in it, the Instrumentation must
carry app/app.env with only addresses changed, the edge must be compose's (config, settings, user,
capabilities, listeners) in front of the app with locust calling it, and Prometheus must scrape the same
jobs, with the same telemetry_source labels and relabelling, through Kubernetes discovery. The rendering is
tooling.k8s.render.kustomize_build (checked against a real `kubectl kustomize` where one is found);
the API server and kubeconform checks live in tests/k8s/test_k8s.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tooling.config import (
    MODULE_TYPES,
    config_components,
    k8s_collector_configs,
    load_env_file,
    load_manifest,
    manifest_modules,
)
from tooling.k8s import render as k8s_render
from tooling.native.edge import APP_SERVER, load_config, upstream_dials

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
NS = k8s_render.NAMESPACE
BEYLA_NS = k8s_render.BEYLA_NAMESPACE
NODE_NS = k8s_render.NODE_EXPORTER_NAMESPACE
# The workloads with host privileges, each alone in its privileged namespace (the documented exceptions).
HOST_WORKLOADS = {"beyla": BEYLA_NS, "node-exporter": NODE_NS}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# The app.env keys whose value the Instrumentation changes: the collector's and Pyroscope's addresses.
ADDRESS_KEYS = {"OTEL_EXPORTER_OTLP_ENDPOINT", "PYROSCOPE_SERVER_ADDRESS"}
# The backends of the stack: one replica each, state on a persistent volume.
BACKENDS = {"prometheus", "alertmanager", "tempo", "loki", "pyroscope", "grafana"}
# Containers whose root filesystem stays writable, each with its reason in its manifest.
WRITABLE_ROOT = {"grafana", "locust-master", "locust-worker"}
INSTRUMENTATION_PREFIXES = ("OTEL_", "PYROSCOPE_")


# --- fixtures and helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return k8s_render.kustomize_build(K8S)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return load_env_file(REPO_ROOT / ".env")


@pytest.fixture(scope="module")
def app_env(dotenv) -> dict[str, str]:
    values = load_env_file(REPO_ROOT / "app" / "app.env")
    values.update(load_env_file(REPO_ROOT / "app" / f"profile-{dotenv['APP_PROFILE']}.env"))
    return values


def find(objects, kind, name, namespace=None) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
             and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def workloads(objects) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload) -> list[dict]:
    spec = pod_spec(workload)
    return spec["containers"] + spec.get("initContainers", [])


def configmap(objects, name, namespace=NS) -> dict:
    return find(objects, "ConfigMap", name, namespace)["data"]


def instrumentation(objects) -> dict:
    return find(objects, "Instrumentation", k8s_render.INSTRUMENTATION_NAME, NS)


def app(objects) -> dict:
    return find(objects, "Deployment", k8s_render.service_name("app"), NS)


def compose_command(service) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else command.split()


def quantity(value) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match[1]) * units.get(match[2], 1)


def readme_beyla_capabilities() -> set[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Beyla requirements", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\s*\| `([A-Z_]+)` \|", section, re.M))


# --- generated files ------------------------------------------------------------------------------------


def test_generated_files_equal_what_the_renderer_makes_of_their_sources():
    problems = k8s_render.drift()
    assert not problems, "run `python -m tooling.k8s.render`:\n" + "\n".join(problems)


def test_the_check_names_changed_missing_and_stale_files(tmp_path):
    expected = k8s_render.generated_files()
    shutil.copytree(K8S, tmp_path / "k8s")
    k8s = tmp_path / "k8s"
    assert k8s_render.drift(k8s, expected) == []
    (k8s / "stack/generated/tempo/tempo-config.yaml").write_text("edited by hand\n")
    (k8s / "images/kustomization.yaml").unlink()
    (k8s / "stack/generated/prometheus/rules/old-rules.yaml").write_text("groups: []\n")
    assert k8s_render.drift(k8s, expected) == [
        "images/kustomization.yaml: missing",
        "stack/generated/tempo/tempo-config.yaml: differs from its source",
        "stack/generated/prometheus/rules/old-rules.yaml: stale (no source gives it)",
    ]
    k8s_render.write(k8s, expected)
    assert k8s_render.drift(k8s, expected) == []
    # The command line exits non-zero on drift (it checks the real k8s/, which is up to date).
    assert k8s_render.main(["--check"]) == 0


def test_the_renderer_follows_its_sources(tmp_path):
    # A copy of the sources, changed as a maintainer would change them.
    root = tmp_path / "repo"
    root.mkdir()
    for name in (".env", "docker-compose.yml", "locustfile.py"):
        shutil.copy(REPO_ROOT / name, root / name)
    for folder in ("app", "prometheus", "otel-collector", "beyla", "tempo", "loki", "pyroscope", "alertmanager",
                   "grafana", "locust", "edge"):
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "instrumentation").mkdir()
    shutil.copy(REPO_ROOT / "instrumentation" / "pyproject.toml", root / "instrumentation" / "pyproject.toml")
    before = k8s_render.generated_files(root)
    assert before == k8s_render.generated_files()

    env = root / "app" / "app.env"
    env.write_text(env.read_text().replace("OTEL_METRIC_EXPORT_INTERVAL=10000", "OTEL_METRIC_EXPORT_INTERVAL=30000"))
    (root / "prometheus" / "rules" / "extra.yaml").write_text("groups: []\n")
    dotenv = root / ".env"
    tempo_version = load_env_file(dotenv)["TEMPO_VERSION"]
    dotenv.write_text(dotenv.read_text().replace(f"TEMPO_VERSION={tempo_version}", "TEMPO_VERSION=9.8.7"))
    after = k8s_render.generated_files(root)

    changed = {path for path in after if after[path] != before.get(path)}
    assert changed == {"stack/generated/instrumentation.yaml", "stack/generated/prometheus/rules/extra.yaml",
                       "stack/generated/kustomization.yaml", "stack/generated/README.md",
                       "images/kustomization.yaml"}
    assert "value: '30000'" in after["stack/generated/instrumentation.yaml"]
    assert "prometheus/rules/extra.yaml" in after["stack/generated/kustomization.yaml"]
    assert {"name": "grafana/tempo", "newTag": "9.8.7"} in yaml.safe_load(after["images/kustomization.yaml"])["images"]


def test_every_generated_file_says_so_in_a_header():
    for path, text in k8s_render.generated_files().items():
        if path.endswith(".json"):
            # JSON has no comments; the folder's README lists the dashboards as generated.
            assert f"`{path.removeprefix('stack/generated/')}`" in (K8S / "stack/generated/README.md").read_text()
            continue
        lines = text.splitlines()
        first = lines[1] if lines[0].startswith("#!") else lines[0]
        assert k8s_render.HEADER_MARK in first, f"{path}: no generated header"
    # And nothing outside the generated folders claims to be generated.
    for path in K8S.rglob("*"):
        relative = path.relative_to(K8S).as_posix()
        if path.is_file() and not relative.startswith(k8s_render.GENERATED_DIRS):
            assert k8s_render.HEADER_MARK not in path.read_text(), relative


def test_verbatim_copies_are_the_compose_files():
    files = k8s_render.generated_files()
    copies = dict(k8s_render.COPIES)
    for folder, (source_folder, pattern) in k8s_render.COPIED_FOLDERS.items():
        copies |= {f"{folder}/{p.name}": p.relative_to(REPO_ROOT).as_posix()
                   for p in (REPO_ROOT / source_folder).glob(pattern)}
    assert len(copies) >= 14
    for path, source in copies.items():
        assert k8s_render.source_of_copy(files[path], source) == (REPO_ROOT / source).read_text(), path


def test_the_python_rendering_matches_kubectl_kustomize(objects):
    kubectl = os.environ.get("KUBECTL") or next(
        (str(p) for p in sorted((REPO_ROOT / ".cache").rglob("kubectl")) if p.is_file() and os.access(p, os.X_OK)),
        None) or shutil.which("kubectl")
    if not kubectl:
        pytest.skip("no kubectl (KUBECTL, .cache/**/kubectl or PATH): the Python rendering is not cross-checked")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    real = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    # kustomize suffixes generated ConfigMaps with a content hash and rewrites every reference to it.
    hashed = {o["metadata"]["name"]: o["metadata"]["name"][:-11] for o in real if o["kind"] == "ConfigMap"}
    assert all(re.fullmatch(r".+-[a-z0-9]{10}", name) for name in hashed)
    text = json.dumps(real, sort_keys=True)
    for name, base in hashed.items():
        text = text.replace(f'"{name}"', f'"{base}"')
    key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731
    assert sorted(json.loads(text), key=key) == sorted(objects, key=key)
    # `kubectl apply -k` applies in this order: namespaces first, the Instrumentation before any workload.
    kinds = [o["kind"] for o in real]
    assert kinds[:2] == ["Namespace", "Namespace"]
    assert kinds.index("Instrumentation") < min(kinds.index(kind) for kind in WORKLOAD_KINDS)


def test_the_instrumentation_is_applied_before_the_pods_it_instruments():
    # The Operator's webhook instruments a pod only if the Instrumentation exists when the pod is created.
    options = yaml.safe_load((K8S / "kustomization.yaml").read_text())["sortOptions"]
    assert options["order"] == "legacy"
    first = options["legacySortOptions"]["orderFirst"]
    assert first[0] == "Namespace" and "Instrumentation" in first
    assert all(first.index("Instrumentation") < first.index(kind) for kind in WORKLOAD_KINDS if kind in first)
    # Kinds that orderFirst does not list come after all that it lists.
    assert "DaemonSet" not in first or first.index("Instrumentation") < first.index("DaemonSet")


# --- images ---------------------------------------------------------------------------------------------


def test_every_image_tag_comes_from_dotenv(objects, compose, dotenv):
    expected = {}
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image, _, tag = service["image"].partition(":")
        if name in k8s_render.KUBELET_SERVICES:
            # Not run: the kubelet embeds it. Nor tagged in images/ (a tag for no image would go stale unseen).
            assert image not in {i["name"] for i in yaml.safe_load((K8S / "images" / "kustomization.yaml")
                                                                    .read_text())["images"]}, image
            continue
        variable = re.fullmatch(r"\$\{([A-Z_]+)(:?[?-].*)?\}", tag)
        assert variable, f"compose service {name}: the tag {tag} is not one .env variable"
        expected[image] = dotenv[variable[1]]
    seen = set()
    for workload in workloads(objects):
        for container in containers(workload):
            image = container["image"]
            if workload["metadata"]["name"] == k8s_render.service_name("app"):
                assert image == k8s_render.OWNERS_IMAGE
                continue
            name, tag = k8s_render.split_image(image)
            assert name in expected, f"{image}: not an image of docker-compose.yml"
            assert tag == expected[name], f"{image}: .env says {expected[name]}"
            seen.add(name)
    # Every published image of compose runs here too (the probe's Prometheus image is Prometheus's).
    assert seen == set(expected)
    version = k8s_render.zerocode_version()
    assert instrumentation(objects)["spec"]["python"]["image"] == f"{k8s_render.ZEROCODE_IMAGE}:{version}"


def test_no_version_is_written_by_hand_in_k8s(dotenv):
    versions = {key: value for key, value in dotenv.items() if key.endswith("_VERSION")}
    for path in K8S.rglob("*"):
        relative = path.relative_to(K8S).as_posix()
        if not path.is_file() or relative.startswith(k8s_render.GENERATED_DIRS):
            continue
        text = path.read_text()
        for key, value in versions.items():
            bare = re.escape(value.removeprefix("v"))
            assert not re.search(rf"(?<![\w.])v?{bare}(?![\w]|\.\d)", text), f"k8s/{relative}: {key}={value}"
        assert not re.search(r"image: \S+:latest\b", text), f"k8s/{relative}: a floating tag"


# --- every workload ---------------------------------------------------------------------------------------


def test_every_workload_has_requests_limits_and_a_readiness_probe(objects):
    assert {w["metadata"]["name"] for w in workloads(objects)} == {
        "dice-api", "edge", "otel-collector", "locust-master", "locust-worker", *HOST_WORKLOADS, *BACKENDS}
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert set(resources.get(bound, {})) >= {"cpu", "memory"}, f"{where}: {bound}"
            for resource in ("cpu", "memory"):
                assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), where
            assert "readinessProbe" in container, f"{where}: no readiness probe"


def compose_service_of(workload_name: str) -> str:
    """The compose service a workload of k8s/ runs (locust's master and workers are compose's locust)."""
    renamed = {k8s_render.service_name(s): s for s in k8s_render.compose()["services"]}
    return "locust" if workload_name.startswith("locust-") else renamed.get(workload_name, workload_name)


def test_every_workload_but_beyla_runs_non_root_without_privileges(objects, compose):
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        if name in HOST_WORKLOADS:
            continue  # below, each on its own
        # Capabilities: none, but what compose's service adds back (the edge: NET_BIND_SERVICE, which the
        # caddy binary carries as a file capability), and never more than Pod Security "restricted" allows.
        added = compose["services"][compose_service_of(name)].get("cap_add", [])
        assert set(added) <= {"NET_BIND_SERVICE"}, f"{name}: compose adds {added}, which restricted refuses"
        expected_capabilities = {"drop": ["ALL"], **({"add": added} if added else {})}
        spec = pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostPID") and not spec.get("hostNetwork") and not spec.get("hostIPC"), name
        assert not any("hostPath" in volume for volume in spec.get("volumes", [])), name
        for container in containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == expected_capabilities, name
            assert not context.get("privileged") and context.get("runAsUser", 1) != 0, name
            assert bool(context.get("readOnlyRootFilesystem")) is (name not in WRITABLE_ROOT), name


def test_beyla_is_the_documented_exception(objects):
    daemonset = find(objects, "DaemonSet", "beyla", BEYLA_NS)
    spec = pod_spec(daemonset)
    assert spec["hostPID"] is True and not spec.get("hostNetwork")
    (container,) = spec["containers"]
    context = container["securityContext"]
    # Root with exactly README's capabilities, not privileged.
    assert context["runAsUser"] == 0 and context.get("privileged") is False
    assert context["capabilities"]["drop"] == ["ALL"]
    documented = readme_beyla_capabilities()
    assert len(documented) == 7
    assert set(context["capabilities"]["add"]) == documented
    # The API server refuses allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in context
    # Only Beyla and node-exporter need a privileged namespace, each its own; the stack's enforces "restricted".
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objects if o["kind"] == "Namespace"}
    assert set(namespaces) == {NS, *HOST_WORKLOADS.values()}
    assert namespaces[NS]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, namespace in HOST_WORKLOADS.items():
        assert namespaces[namespace]["pod-security.kubernetes.io/enforce"] == "privileged"
        assert [w["metadata"]["name"] for w in workloads(objects) if w["metadata"]["namespace"] == namespace] == [name]


def test_node_exporter_reads_the_node_read_only_with_no_privilege_but_its_network(objects, compose):
    daemonset = find(objects, "DaemonSet", "node-exporter", NODE_NS)
    spec = pod_spec(daemonset)
    # The node's network namespace (its interfaces' counters), not its pids or IPC; no API token.
    assert spec["hostNetwork"] is True and not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65534
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                       "capabilities": {"drop": ["ALL"]}}
    # Compose's command and memory limit; the node's root read-only where --path.rootfs says.
    service = compose["services"]["node-exporter"]
    assert container["args"] == compose_command(service) == ["--path.rootfs=/host"]
    assert quantity(container["resources"]["limits"]["memory"]) == 64 * 2**20
    assert service["mem_limit"] == "64m"
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/host" and mount["readOnly"] is True
    assert mount["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount["name"]]["hostPath"]["path"] == "/" and len(volumes) == 1


def test_prometheus_scrapes_every_kubelets_cadvisor_with_nodes_metrics_only(objects, prometheus):
    k8s, source = prometheus
    job = jobs(k8s)["cadvisor"]
    assert job["kubernetes_sd_configs"] == [{"role": "node"}]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics/cadvisor"
    assert job["authorization"] == {"credentials_file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}
    # Compose's relabelling of what is stored, unchanged (the naming layer reads the same names).
    assert job["metric_relabel_configs"] == jobs(source)["cadvisor"]["metric_relabel_configs"]
    # Prometheus's ServiceAccount may list Nodes and read their kubelets' metrics, and no more of nodes: not
    # nodes/proxy (the kubelet's exec and attach), nothing written.
    account = pod_spec(find(objects, "StatefulSet", "prometheus", NS))["serviceAccountName"]
    cluster_rules = [rule for role in objects if role["kind"] == "ClusterRole"
                     and bound(objects, "ClusterRole", role["metadata"]["name"], account, NS) for rule in role["rules"]]
    assert rules_allow(cluster_rules, "", "nodes", ["list", "watch"])
    assert rules_allow(cluster_rules, "", "nodes/metrics", ["get"])
    node_resources = {resource for rule in cluster_rules for resource in rule["resources"]
                      if resource.startswith("nodes")}
    assert node_resources == {"nodes", "nodes/metrics"}, node_resources
    assert {verb for rule in cluster_rules for verb in rule["verbs"]} <= {"get", "list", "watch"}


def test_backends_are_single_replica_statefulsets_with_volumes_where_compose_keeps_them(objects, compose):
    for name in BACKENDS:
        statefulset = find(objects, "StatefulSet", name, NS)
        assert statefulset["spec"]["replicas"] == 1
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30
        mounts = {m["name"]: m["mountPath"] for m in pod_spec(statefulset)["containers"][0]["volumeMounts"]}
        named = [v for v in compose["services"][name]["volumes"] if v.split(":")[0].endswith("-data")]
        assert [v.split(":")[1] for v in named] == [mounts[claim["metadata"]["name"]]], name
        assert pod_spec(statefulset)["securityContext"]["fsGroup"] > 0, name
        service = find(objects, "Service", name, NS)
        assert service["spec"]["type"] == "ClusterIP"


def test_each_compose_service_has_its_workload(objects, compose):
    names = {w["metadata"]["name"] for w in workloads(objects)}
    for service in compose["services"]:
        if service == "probe":
            continue  # Kubernetes probes each container itself
        if service in k8s_render.KUBELET_SERVICES:
            continue  # every kubelet embeds it (cAdvisor): Prometheus scrapes the kubelets
        expected = "locust-master" if service == "locust" else k8s_render.service_name(service)
        assert expected in names, service


def test_commands_are_compose_commands(objects, compose):
    def container(kind, name, namespace=NS):
        return pod_spec(find(objects, kind, name, namespace))["containers"][0]

    services = compose["services"]
    for name in ("prometheus", "alertmanager", "tempo", "loki", "pyroscope"):
        assert container("StatefulSet", name)["args"] == compose_command(services[name]), name
    assert container("DaemonSet", "beyla", BEYLA_NS)["args"] == compose_command(services["beyla"])
    collector = container("Deployment", "otel-collector")["args"]
    assert collector == compose_command(services["otel-collector"]) + [
        "--config=/etc/otelcol/otel-collector-k8s.yaml"]
    grafana = container("StatefulSet", "grafana")
    assert grafana["command"] == services["grafana"]["entrypoint"]
    assert grafana["args"] == compose_command(services["grafana"])
    assert container("Deployment", "edge")["args"] == compose_command(services["edge"])
    # Locust's master: compose's command (its --host with the Kubernetes name of the service it calls, which
    # for the edge is compose's own), plus --master.
    master = container("Deployment", "locust-master")["args"]
    assert master == [k8s_host(arg) for arg in compose_command(services["locust"])] + ["--master"]
    assert "--host=http://edge:8080" in master, "locust calls the app through the edge, as compose's does"


def k8s_host(arg: str) -> str:
    """A compose --host=http://<service>:<port> argument with the service's Kubernetes name."""
    if not arg.startswith("--host="):
        return arg
    url = urlsplit(arg.removeprefix("--host="))
    return "--host=" + url._replace(netloc=f"{k8s_render.service_name(url.hostname)}:{url.port}").geturl()


def test_mounted_configs_are_where_the_commands_read_them(objects):
    for workload in workloads(objects):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        namespace = workload["metadata"]["namespace"]
        for container in spec["containers"]:
            files = set()
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, mount
                volume = volumes.get(mount["name"], {})
                if "configMap" in volume:
                    data = configmap(objects, volume["configMap"]["name"], namespace)
                    if "subPath" in mount:
                        assert mount["subPath"] in data
                        files.add(mount["mountPath"])
                    else:
                        files |= {f"{mount['mountPath']}/{key}" for key in data}
            for source in container.get("envFrom", []):
                configmap(objects, source["configMapRef"]["name"], namespace)
            for arg in container.get("command", []) + container.get("args", []):
                path = arg.split("=", 1)[-1]
                if re.fullmatch(r"/(etc|mnt)/\S+\.(yaml|json|py|sh)", path):
                    assert path in files, f"{workload['metadata']['name']}: {arg} is not mounted"


def test_services_select_pods_and_their_ports(objects):
    for service in (o for o in objects if o["kind"] == "Service"):
        namespace = service["metadata"]["namespace"]
        selector = service["spec"]["selector"]
        selected = [w for w in workloads(objects) if w["metadata"]["namespace"] == namespace
                    and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, service["metadata"]["name"]
        for workload in selected:
            assert workload["spec"]["selector"]["matchLabels"].items() <= \
                workload["spec"]["template"]["metadata"]["labels"].items()
            ports = [p for c in pod_spec(workload)["containers"] for p in c.get("ports", [])]
            for port in service["spec"]["ports"]:
                assert any(port["targetPort"] in (p.get("name"), p["containerPort"]) for p in ports), port


def test_every_address_in_the_configs_is_a_service_port(objects, compose):
    # Inside the namespace the configs keep compose's names (tempo:4317, http://loki:3100, ...): each must
    # be a Service of this namespace with that port. Fully qualified ones must name the Service's namespace.
    services = {(o["metadata"]["name"], o["metadata"]["namespace"]): {p["port"] for p in o["spec"]["ports"]}
                for o in objects if o["kind"] == "Service"}
    texts = [json.dumps(o) for o in objects if o["kind"] in ("ConfigMap", "Instrumentation")]
    texts += [json.dumps(containers(w)) for w in workloads(objects)]
    hosts = set(compose["services"]) | {k8s_render.service_name(s) for s in compose["services"]}
    found = 0
    for text in texts:
        for host, namespace, port in re.findall(r"(?<![\w.-])([a-z][a-z0-9-]*)(?:\.([a-z0-9-]+)\.svc)?:(\d{4,5})\b",
                                                text):
            if host not in hosts:
                continue
            found += 1
            assert (host, namespace or NS) in services, f"{host}.{namespace or NS}: no such Service"
            assert int(port) in services[(host, namespace or NS)], f"{host}:{port}: the Service has no such port"
    assert found >= 10


def test_configmaps_fit_the_annotation_of_a_client_side_apply(objects):
    # `kubectl apply` keeps each object whole in an annotation, and annotations may hold 256 KiB.
    for config in (o for o in objects if o["kind"] == "ConfigMap"):
        assert len(json.dumps(config)) < 200 * 1024, config["metadata"]["name"]


# --- the app and its instrumentation ------------------------------------------------------------------


def test_the_app_runs_two_replicas_of_the_owners_image_with_no_instrumentation(objects):
    deployment = app(objects)
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    assert "initContainers" not in spec, "the Operator adds the instrumentation, not the manifest"
    (container,) = spec["containers"]
    assert container["image"] == k8s_render.OWNERS_IMAGE
    assert container["command"][0] == "gunicorn"
    assert not any("opentelemetry" in arg or "pyroscope" in arg
                   for arg in container["command"] + container.get("args", []))
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(configmap(objects, source["configMapRef"]["name"]))
    assert names and not {n for n in names if n.startswith(INSTRUMENTATION_PREFIXES) or n == "PYTHONPATH"}
    assert not any(m["mountPath"].startswith("/otel-auto-instrumentation") for m in container["volumeMounts"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["instrumentation.opentelemetry.io/inject-python"] == "true"
    # "true" picks the one Instrumentation of the pod's namespace.
    assert [o["metadata"]["name"] for o in objects
            if o["kind"] == "Instrumentation" and o["metadata"]["namespace"] == NS] == [k8s_render.INSTRUMENTATION_NAME]


def test_the_service_name_is_app_envs(objects, app_env):
    deployment = app(objects)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert deployment["metadata"]["name"] == app_env["OTEL_SERVICE_NAME"]
    assert annotations["resource.opentelemetry.io/service.name"] == app_env["OTEL_SERVICE_NAME"]
    # Not in the Instrumentation: it would name every annotated Deployment after the dice app.
    assert "OTEL_SERVICE_NAME" not in {e["name"] for e in instrumentation(objects)["spec"]["python"]["env"]}


def test_the_instrumentation_env_is_app_env_with_only_addresses_changed(objects, app_env, compose):
    spec = instrumentation(objects)["spec"]
    env = {e["name"]: e["value"] for e in spec["python"]["env"]}
    assert len(env) == len(spec["python"]["env"]), "a name twice"
    expected = {k: v for k, v in app_env.items() if k.startswith(INSTRUMENTATION_PREFIXES) and k != "OTEL_SERVICE_NAME"}
    assert set(env) == set(expected)
    assert k8s_render.address_keys() == ADDRESS_KEYS
    for key, value in expected.items():
        if key not in ADDRESS_KEYS:
            assert env[key] == value, key
            continue
        compose_url, k8s_url = urlsplit(value), urlsplit(env[key])
        assert compose_url.hostname in compose["services"], key
        assert k8s_url.hostname == f"{k8s_render.service_name(compose_url.hostname)}.{NS}.svc", key
        assert (k8s_url.scheme, k8s_url.port, k8s_url.path) == (compose_url.scheme, compose_url.port,
                                                                  compose_url.path), key
    # The Operator defaults OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf only where unset: ours is grpc, to 4317.
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == 4317
    assert spec["exporter"]["endpoint"] == env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    # The rest of app/app.env (gunicorn, prometheus-flask-exporter, LOG_LEVEL) is the app container's.
    settings = configmap(objects, "dice-api-settings")
    assert settings == {k: v for k, v in app_env.items() if not k.startswith(INSTRUMENTATION_PREFIXES)}
    assert set(settings) | set(env) | {"OTEL_SERVICE_NAME"} == set(app_env)


def test_kubernetes_expands_no_env_value(objects):
    # $(NAME) in an env value is replaced by Kubernetes, and $$ becomes $: compose's values must not hold either.
    values = [e.get("value", "") for e in instrumentation(objects)["spec"]["python"]["env"]]
    values += [e.get("value", "") for w in workloads(objects) for c in containers(w) for e in c.get("env", [])]
    assert values and not [v for v in values if "$(" in v or "$$" in v]


# --- the collector ----------------------------------------------------------------------------------------


def merged(base: dict, layer: dict) -> dict:
    """The collector's merge of two --config files: maps key by key, everything else replaced."""
    result = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def test_the_collector_runs_compose_config_plus_k8s_attributes_in_every_pipeline(objects):
    data = configmap(objects, "otel-collector-config")
    source = (REPO_ROOT / "otel-collector" / "otel-collector-config.yaml").read_text()
    assert k8s_render.source_of_copy(data["otel-collector-config.yaml"], "otel-collector/otel-collector-config.yaml") \
        == source
    compose_config = yaml.safe_load(source)
    config = merged(compose_config, yaml.safe_load(data["otel-collector-k8s.yaml"]))
    assert config["processors"]["k8s_attributes"]["passthrough"] is False
    assert {"k8s.pod.name", "k8s.namespace.name", "k8s.deployment.name"} <= set(
        config["processors"]["k8s_attributes"]["extract"]["metadata"])
    for name, pipeline in config["service"]["pipelines"].items():
        before = compose_config["service"]["pipelines"][name]["processors"]
        assert [p for p in pipeline["processors"] if p != "k8s_attributes"] == before, name
        assert pipeline["processors"][:2] == ["memory_limiter", "k8s_attributes"], name
    # Only the processor lists differ from compose.
    for name in config["service"]["pipelines"]:
        config["service"]["pipelines"][name]["processors"] = compose_config["service"]["pipelines"][name]["processors"]
    del config["processors"]["k8s_attributes"]
    assert config == compose_config


def rules_allow(rules, group, resource, verbs) -> bool:
    return any(group in rule["apiGroups"] and resource in rule["resources"] and set(verbs) <= set(rule["verbs"])
               for rule in rules)


def bound(objects, kind, role, account, namespace) -> bool:
    bindings = [o for o in objects if o["kind"] == f"{kind}Binding" and o["roleRef"]["name"] == role]
    return any({"kind": "ServiceAccount", "name": account, "namespace": namespace} in b["subjects"]
               for b in bindings)


def test_k8s_attributes_can_read_pods_and_namespaces(objects):
    deployment = find(objects, "Deployment", "otel-collector", NS)
    account = pod_spec(deployment)["serviceAccountName"]
    role = find(objects, "ClusterRole", "dice-observability-otel-collector")
    for resource in ("pods", "namespaces"):
        assert rules_allow(role["rules"], "", resource, ["get", "list", "watch"]), resource
    assert not any(set(r["verbs"]) - {"get", "list", "watch"} for r in role["rules"]), "read-only"
    assert bound(objects, "ClusterRole", role["metadata"]["name"], account, NS)


def test_the_collector_manifest_builds_every_component_of_the_k8s_collector_configs(objects):
    """The collector that tests/collector/test_collector.py validates the k8s configs with is built from
    otel-collector/builder-config.yaml: every component a k8s config layer names must be in it, at the
    image's version."""
    collectors = k8s_collector_configs(objects)
    assert [key for key, _ in collectors["Deployment/otel-collector/otel-collector"]] == [
        "otel-collector-config.yaml", "otel-collector-k8s.yaml"]
    manifest = load_manifest()
    provided = {MODULE_TYPES[module] for _, module, _ in manifest_modules(manifest) if module in MODULE_TYPES}
    version = manifest["dist"]["version"]
    for where, layers in collectors.items():
        named = config_components(*(yaml.safe_load(text) for _, text in layers))
        for kind, kind_type in sorted(named - provided):
            singular = kind.removesuffix("s")
            pytest.fail(
                f"{where} (--config {', '.join(key for key, _ in layers)}) names the {singular} {kind_type!r}, which "
                f"otel-collector/builder-config.yaml does not build. Add its module at v{version} (for contrib: "
                f"github.com/open-telemetry/opentelemetry-collector-contrib/{singular}/"
                f"{kind_type.replace('_', '')}{singular} v{version}) and its type to tooling.config.MODULE_TYPES.")


# --- Prometheus -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(objects) -> tuple[dict, dict]:
    k8s = yaml.safe_load(configmap(objects, "prometheus-config")["prometheus-config.yaml"])
    source = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus-config.yaml").read_text())
    return k8s, source


def jobs(config) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def telemetry_source(job) -> str | None:
    values = [r["replacement"] for r in job.get("relabel_configs", []) if r.get("target_label") == "telemetry_source"]
    return values[0] if values else None


def test_prometheus_keeps_compose_jobs_labels_and_relabelling(prometheus):
    k8s, source = prometheus
    assert list(jobs(k8s)) == list(jobs(source))
    for name, job in jobs(k8s).items():
        original = jobs(source)[name]
        # Everything but the targets is compose's: metric_relabel_configs, honor_labels, limits, intervals.
        # A kubelet's job also says how to reach a kubelet (its HTTPS port, path and credentials).
        targets = ("kubernetes_sd_configs", "relabel_configs", "static_configs")
        if name in k8s_render.KUBELET_SERVICES:
            targets += ("metrics_path", *k8s_render.KUBELET_SCRAPE)
        assert {k: v for k, v in job.items() if k not in targets} == \
            {k: v for k, v in original.items() if k not in targets}, name
        # Compose's relabelling (telemetry_source) comes last, after the pod selection.
        relabel, kept = job.get("relabel_configs", []), original.get("relabel_configs", [])
        assert relabel[len(relabel) - len(kept):] == kept, name
    assert telemetry_source(jobs(k8s)["app"]) == "manual"
    assert telemetry_source(jobs(k8s)["beyla"]) == "ebpf"
    otel = jobs(k8s)["otel-collector"]
    assert telemetry_source(otel) == "otel" and otel["honor_labels"] is True
    assert otel["metric_relabel_configs"] == jobs(source)["otel-collector"]["metric_relabel_configs"]
    assert {k: v for k, v in k8s.items() if k != "scrape_configs"} == \
        {k: v for k, v in source.items() if k != "scrape_configs"}


def test_prometheus_discovers_every_replica_and_beyla_pod(objects, prometheus):
    k8s, _ = prometheus
    discovered = {}
    for name, job in jobs(k8s).items():
        if "kubernetes_sd_configs" not in job:
            assert name == "prometheus" and job["static_configs"] == [{"targets": ["localhost:9090"]}]
            continue
        (sd,) = job["kubernetes_sd_configs"]
        if name in k8s_render.KUBELET_SERVICES:
            assert sd == {"role": "node"}, name  # every node's kubelet: the test above
            continue
        assert sd["role"] == "pod"
        namespaces = [NS] if sd["namespaces"] == {"own_namespace": True} else sd["namespaces"]["names"]
        keep = job["relabel_configs"][0]
        assert keep["action"] == "keep" and keep["source_labels"] == [
            "__meta_kubernetes_pod_label_app_kubernetes_io_name", "__meta_kubernetes_pod_container_port_number"]
        label, port = keep["regex"].split(";")
        pods = [w for w in workloads(objects) if w["metadata"]["namespace"] in namespaces
                and w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == label
                and any(p["containerPort"] == int(port) for c in pod_spec(w)["containers"] for p in c.get("ports", []))]
        assert len(pods) == 1, f"job {name}: {label}:{port} in {namespaces}"
        discovered[name] = pods[0]
        # Prometheus may list pods wherever it discovers them.
        account = pod_spec(find(objects, "StatefulSet", "prometheus", NS))["serviceAccountName"]
        for namespace in namespaces:
            roles = [o for o in objects if o["kind"] == "Role" and o["metadata"]["namespace"] == namespace
                     and rules_allow(o["rules"], "", "pods", ["list", "watch"])
                     and bound(objects, "Role", o["metadata"]["name"], account, NS)]
            assert roles, f"prometheus cannot list pods in {namespace}"
    assert discovered["app"]["metadata"]["name"] == k8s_render.service_name("app")
    assert discovered["beyla"]["kind"] == "DaemonSet"
    assert discovered["node-exporter"]["kind"] == "DaemonSet"
    assert discovered["node-exporter"]["metadata"]["namespace"] == NODE_NS
    assert set(jobs(k8s)) - set(discovered) == {"prometheus", *k8s_render.KUBELET_SERVICES}
    assert discovered["otel-collector"]["metadata"]["name"] == "otel-collector"
    assert discovered["alertmanager"]["metadata"]["name"] == "alertmanager"
    # The edge's own metrics (compose's edge:9180): every edge pod, on its metrics port.
    assert discovered["edge"]["metadata"]["name"] == "edge"
    assert jobs(k8s)["edge"]["relabel_configs"][0]["regex"] == "edge;9180"


def test_prometheus_loads_compose_rule_files(objects):
    rules = configmap(objects, "prometheus-rules")
    sources = sorted((REPO_ROOT / "prometheus" / "rules").glob("*.yaml"))
    assert sorted(rules) == [p.name for p in sources]
    for path in sources:
        source = path.relative_to(REPO_ROOT).as_posix()
        assert k8s_render.source_of_copy(rules[path.name], source) == path.read_text()


# --- Beyla ------------------------------------------------------------------------------------------------


def test_beyla_finds_the_app_by_its_kubernetes_attributes(objects):
    config = yaml.safe_load(configmap(objects, "beyla-config", BEYLA_NS)["beyla-config.yaml"])
    source = yaml.safe_load((REPO_ROOT / "beyla" / "beyla-config.yaml").read_text())
    deployment = app(objects)
    assert config["discovery"]["exclude_otel_instrumented_services"] is False
    assert config["attributes"]["kubernetes"]["enable"] is True
    for entry, original in zip(config["discovery"]["instrument"], source["discovery"]["instrument"], strict=True):
        assert entry == original | {"k8s_namespace": deployment["metadata"]["namespace"],
                                    "k8s_deployment_name": deployment["metadata"]["name"]}
    # Everything else is compose's.
    config["discovery"]["instrument"] = source["discovery"]["instrument"]
    del config["attributes"]["kubernetes"]
    if not config["attributes"]:
        del config["attributes"]
    assert config == source


def test_beyla_may_read_what_kubernetes_decoration_needs(objects):
    daemonset = find(objects, "DaemonSet", "beyla", BEYLA_NS)
    account = pod_spec(daemonset)["serviceAccountName"]
    role = find(objects, "ClusterRole", "dice-observability-beyla")
    for resource in ("pods", "services", "nodes"):
        assert rules_allow(role["rules"], "", resource, ["list", "watch"]), resource
    assert rules_allow(role["rules"], "apps", "replicasets", ["list", "watch"])
    assert not any(set(r["verbs"]) - {"get", "list", "watch"} for r in role["rules"]), "read-only"
    assert bound(objects, "ClusterRole", role["metadata"]["name"], account, BEYLA_NS)


# --- the edge -------------------------------------------------------------------------------------------


def edge_container(objects) -> dict:
    (container,) = pod_spec(find(objects, "Deployment", "edge", NS))["containers"]
    return container


def test_the_edge_runs_compose_config_with_its_upstreams_as_kubernetes_services(objects, compose):
    source = load_config()
    data = configmap(objects, "edge-config")
    assert list(data) == ["caddy-config.json"]
    config = json.loads(data["caddy-config.json"])
    services = {o["metadata"]["name"]: o for o in objects
                if o["kind"] == "Service" and o["metadata"]["namespace"] == NS}
    compose_dials, k8s_dials = upstream_dials(source), upstream_dials(config)
    assert list(k8s_dials) == list(compose_dials)
    for server, dials in compose_dials.items():
        assert len(k8s_dials[server]) == len(dials), server
        for compose_dial, k8s_dial in zip(dials, k8s_dials[server], strict=True):
            host, _, port = compose_dial.rpartition(":")
            assert host in compose["services"], f"{server} proxies to {compose_dial}, not a compose service"
            # The same port on the Kubernetes Service of that compose service, in the edge's namespace.
            assert k8s_dial == f"{k8s_render.service_name(host)}:{port}", server
            assert int(port) in {p["port"] for p in services[k8s_render.service_name(host)]["spec"]["ports"]}
    # The app listener proxies to the app's Service, which selects the app's pods.
    (app_dial,) = k8s_dials[APP_SERVER]
    app_service = services[app_dial.rpartition(":")[0]]
    assert app_service["spec"]["selector"].items() <= app(objects)["spec"]["template"]["metadata"]["labels"].items()
    # Nothing but the dials differs from compose's file (listeners, routes, tracing, timeouts, error routes).
    restored = copy.deepcopy(config)
    for handler, original in zip(k8s_render.reverse_proxies(restored), k8s_render.reverse_proxies(source),
                                 strict=True):
        handler["upstreams"] = original["upstreams"]
    assert restored == source


def test_the_edge_container_is_compose_edge_service(objects, compose, dotenv):
    service = compose["services"]["edge"]
    deployment = find(objects, "Deployment", "edge", NS)
    container = edge_container(objects)
    assert container["image"] == f"caddy:{dotenv['CADDY_VERSION']}"
    assert container["args"] == compose_command(service)
    # Compose's entrypoint is a check of where compose publishes the edge (BIND_ADDRESS, with anonymous
    # Grafana): k8s/ publishes nothing (ClusterIP, port-forwards bind loopback), so caddy runs directly.
    assert service["entrypoint"] == ["/bin/sh", "/etc/caddy/entrypoint.sh"] and "command" not in container
    entrypoint_inputs = {"BIND_ADDRESS", "GRAFANA_ANONYMOUS_ENABLED"}
    # Settings: compose's env_file (edge/edge.env) as a ConfigMap, and compose's environment but the
    # entrypoint's inputs.
    expected = {}
    for env_file in service["env_file"]:
        expected.update(load_env_file(REPO_ROOT / env_file))
    assert expected["OTEL_SERVICE_NAME"] == "edge"
    (source,) = container["envFrom"]
    assert configmap(objects, source["configMapRef"]["name"]) == expected
    assert {e["name"]: e["value"] for e in container["env"]} == {
        key: value for key, value in service["environment"].items() if key not in entrypoint_inputs}
    # Its spans go to the collector's Service, at the port of compose's address.
    endpoint = urlsplit(expected["OTEL_EXPORTER_OTLP_ENDPOINT"])
    collector = find(objects, "Service", k8s_render.service_name(endpoint.hostname), NS)
    assert endpoint.port in {p["port"] for p in collector["spec"]["ports"]}
    # The config where compose mounts it (and where the command reads it); the entrypoint is not mounted.
    assert {v.split(":")[0] for v in service["volumes"]} == {"./edge/caddy-config.json", "./edge/entrypoint.sh"}
    (config_volume,) = [v for v in service["volumes"] if v.startswith("./edge/caddy-config.json:")]
    mount_path = config_volume.split(":")[1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == "edge-config"
    assert mount["subPath"] == "caddy-config.json" and mount["readOnly"] is True
    assert f"--config={mount_path}" in container["args"]
    # Compose's user, capabilities, read-only root with a scratch /tmp, and memory limit.
    user, _, group = service["user"].partition(":")
    pod = pod_spec(deployment)["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user), int(group))
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": service["cap_drop"], "add": service["cap_add"]}
    assert "no-new-privileges:true" in service["security_opt"] and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is service["read_only"] is True
    scratch = {m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert scratch == set(service["tmpfs"])
    assert all(e["value"].startswith(tuple(scratch)) for e in container["env"])
    assert quantity(container["resources"]["limits"]["memory"]) == quantity(service["mem_limit"].replace("m", "Mi"))


def test_the_edge_listens_where_compose_exposes_it_and_probes_its_health(objects, compose):
    service = compose["services"]["edge"]
    container = edge_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listeners = {name: int(server["listen"][0].rpartition(":")[2])
                 for name, server in load_config()["apps"]["http"]["servers"].items()}
    # One container port per Caddy server, named after it, and exactly compose's `expose`.
    assert ports == listeners
    assert set(ports.values()) == {int(port) for port in service["expose"]}
    # The Service offers every one of them in the cluster, as compose's network does.
    edge_service = find(objects, "Service", "edge", NS)
    assert {p["port"]: p["targetPort"] for p in edge_service["spec"]["ports"]} == {v: k for k, v in ports.items()}
    # Readiness and liveness: compose's healthcheck URL (the metrics server's /health, not a route of the app
    # listener, so no probe makes a span or is counted by a source).
    url = urlsplit(next(arg for arg in service["healthcheck"]["test"] if arg.startswith("http://")))
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert (check["path"], ports[check["port"]]) == (url.path, url.port), probe
        assert ports[check["port"]] != listeners[APP_SERVER], probe


def test_locust_calls_the_app_through_the_edge(objects, compose):
    assert "--host=http://edge:8080" in compose_command(compose["services"]["locust"])
    listeners = {name: int(server["listen"][0].rpartition(":")[2])
                 for name, server in load_config()["apps"]["http"]["servers"].items()}
    container_ports = {p["name"]: p["containerPort"] for p in edge_container(objects)["ports"]}
    for name in ("locust-master", "locust-worker"):
        (container,) = pod_spec(find(objects, "Deployment", name, NS))["containers"]
        (host,) = [urlsplit(arg.removeprefix("--host=")) for arg in container["args"] if arg.startswith("--host=")]
        service = find(objects, "Service", host.hostname, NS)
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == host.port]
        # That Service port reaches the edge's app listener (not the app directly, not Grafana's).
        assert service["metadata"]["name"] == "edge", name
        assert container_ports[port["targetPort"]] == listeners[APP_SERVER], name


def test_prometheus_scrapes_the_edge_and_labels_its_spans_as_a_source(prometheus):
    k8s, _ = prometheus
    # The edge's own metrics are its health: no telemetry_source. Its span metrics come through the
    # collector, where job="edge" (service.name) becomes telemetry_source="edge".
    assert telemetry_source(jobs(k8s)["edge"]) is None
    assert {"source_labels": ["job"], "regex": "edge", "target_label": "telemetry_source", "replacement": "edge"} in \
        jobs(k8s)["otel-collector"]["metric_relabel_configs"]


# --- locust -----------------------------------------------------------------------------------------------


def test_locust_runs_distributed_with_compose_files(objects):
    master = find(objects, "Deployment", "locust-master", NS)
    worker = find(objects, "Deployment", "locust-worker", NS)
    assert master["spec"]["replicas"] == 1 and worker["spec"]["replicas"] >= 2
    assert "--master" in pod_spec(master)["containers"][0]["args"]
    (container,) = pod_spec(worker)["containers"]
    assert "--worker" in container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = find(objects, "Service", env["LOCUST_MASTER_NODE_HOST"], NS)
    assert service["spec"]["selector"].items() <= master["spec"]["template"]["metadata"]["labels"].items()
    assert int(env["LOCUST_MASTER_NODE_PORT"]) in {p["port"] for p in service["spec"]["ports"]}
    locustfile = configmap(objects, "locustfile")["locustfile.py"]
    assert k8s_render.source_of_copy(locustfile, "locustfile.py") == (REPO_ROOT / "locustfile.py").read_text()
    # As compose's locust: locust.env, then the app's cost profile (its sampler: locust roots the traces).
    profile = load_env_file(REPO_ROOT / "app" / f"profile-{k8s_render.dotenv()['APP_PROFILE']}.env")
    assert configmap(objects, "locust-settings") == {
        **load_env_file(REPO_ROOT / "locust" / "locust.env"),
        **{key: value for key, value in profile.items() if key.startswith("OTEL_")}}


def test_the_lean_profile_samples_at_locust_as_at_the_app(monkeypatch):
    # APP_PROFILE=lean in .env: the Instrumentation and locust get the same sampler, or locust's sampled
    # parents keep every trace (app/profile-lean.env).
    real = k8s_render.dotenv
    monkeypatch.setattr(k8s_render, "dotenv", lambda root=REPO_ROOT: {**real(root), "APP_PROFILE": "lean"})
    files = k8s_render.generated_files()
    locust = load_env_text(files["stack/generated/locust/profile.env"])
    app = dict(k8s_render.instrumentation_env())
    sampler = {key: app[key] for key in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")}
    assert sampler == {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert sampler.items() <= locust.items(), locust


def load_env_text(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
