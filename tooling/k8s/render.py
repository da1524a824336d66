"""The generated part of k8s/, from the compose stack's own files.

`kubectl apply -k k8s/` cannot read files outside k8s/ (kustomize's load restrictor), yet the Kubernetes
stack must run the very configs that compose runs. This module writes them into k8s/, each marked as
generated, so that one source stays the truth:

- ``k8s/images/kustomization.yaml``: every image tag, from the ``image:`` of each compose service,
  interpolated with ``.env`` (no version is written anywhere else in k8s/).
- ``k8s/stack/generated/``: the Instrumentation resource (its ``spec.python.env`` is ``app/app.env``
  and the APP_PROFILE file with only addresses changed), the owners' serving settings of the same file,
  and verbatim copies of the collector, Tempo, Loki, Pyroscope, Alertmanager and Grafana files and the
  rule files. Prometheus's config is compose's with every static target of a compose service replaced by
  Kubernetes pod discovery (cAdvisor's by node discovery of every kubelet, which embeds it); the collector
  gets a second ``--config`` adding ``k8s_attributes`` to every pipeline. The edge's Caddy config is
  compose's with each upstream dial of a compose service (app:5000) as that service's Kubernetes Service
  (dice-api:5000); its edge.env is copied verbatim (the collector's
  name is the same in the namespace). A kustomize component there turns the files into ConfigMaps.
- ``k8s/beyla/generated/``: compose's Beyla config with Kubernetes discovery and metadata.

    python -m tooling.k8s.render            # write every generated file (and remove stale ones)
    python -m tooling.k8s.render --check    # exit 1, naming the files, if k8s/ differs from its sources

``kustomize_build`` renders a kustomization the way ``kubectl kustomize`` does, for the subset of
kustomize that k8s/ uses (resources, components, configMapGenerator, namespace, images), without the
content-hash suffix of generated ConfigMap names. tests/k8s/test_k8s_manifests.py uses it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import textwrap
import tomllib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from tooling.config import REPO_ROOT, interpolate, load_env_file
from tooling.native.edge import load_config as load_edge_config

K8S_DIR = REPO_ROOT / "k8s"

# The stack's namespace, and the two that allow host privileges, each holding the one DaemonSet that needs
# them: Beyla's (eBPF) and node-exporter's (the host's network, and its root read-only).
NAMESPACE = "dice-observability"
BEYLA_NAMESPACE = "dice-observability-beyla"
NODE_EXPORTER_NAMESPACE = "dice-observability-node-exporter"
# Folders of k8s/ that hold only generated files (everything else in k8s/ is written by hand).
GENERATED_DIRS = ("images", "stack/generated", "beyla/generated")

# Compose service -> Kubernetes Service (and Deployment) name, where they differ. The app is named by its
# OpenTelemetry service name (app/app.env), which is also its Deployment's name; Beyla has no Service.
RENAMED_SERVICES = {"app": "dice-api"}
# Services whose pods live in a privileged namespace of their own (the rest live in NAMESPACE).
HOST_SERVICES = {"beyla": BEYLA_NAMESPACE, "node-exporter": NODE_EXPORTER_NAMESPACE}
# Compose services that Kubernetes runs already: every kubelet embeds cAdvisor and serves its metrics at
# this path of its HTTPS port. Their Prometheus job scrapes each node's kubelet instead of a pod of ours,
# and their image is not run (nor in images/).
KUBELET_SERVICES = {"cadvisor": "/metrics/cadvisor"}
# How Prometheus reaches a kubelet: with its ServiceAccount's token, which the kubelet checks by a
# TokenReview and authorizes, for a path under /metrics, as `get` on nodes/metrics (k8s/stack/prometheus.yaml
# grants that, nothing of nodes/proxy). A kubelet's serving certificate is self-signed unless the cluster
# has it signed (kubeadm's and kind's default: serverTLSBootstrap off), so its name cannot be verified
# against the cluster's CA; where the cluster signs kubelet certificates, replace insecure_skip_verify with
# ca_file (the ServiceAccount's ca.crt).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBELET_SCRAPE = {
    "scheme": "https",
    "authorization": {"credentials_file": f"{SERVICE_ACCOUNT_DIR}/token"},
    "tls_config": {"insecure_skip_verify": True},
}

# Our instrumentation image (the Operator's Python layout: /autoinstrumentation with our pins, hooks and
# pyroscope-io); its tag is the version of the zerocode package that it carries.
ZEROCODE_IMAGE = "dice-observability/zerocode-python"
INSTRUMENTATION_NAME = "dice-zerocode"
# The app's own image as its owners ship it (app/Dockerfile, target `owners`), in k8s/stack/app.yaml.
OWNERS_IMAGE = "dice-api:owners"

# app/app.env keys that configure the instrumentation (the Instrumentation resource's python.env); the
# other keys are the owners' serving settings (gunicorn, prometheus-flask-exporter, the log level).
INSTRUMENTATION_PREFIXES = ("OTEL_", "PYROSCOPE_")
# Per workload, not per Instrumentation: the Operator sets OTEL_SERVICE_NAME for each pod (from the
# resource.opentelemetry.io/service.name annotation, or the Deployment's name); an Instrumentation that
# set it would name every annotated Deployment "dice-api".
PER_WORKLOAD_KEYS = ("OTEL_SERVICE_NAME",)

# The k8s_attributes processor in every pipeline of the collector: pod, namespace, deployment and node of
# the sender. The Operator puts k8s.pod.name and k8s.namespace.name into OTEL_RESOURCE_ATTRIBUTES;
# senders without them (locust) are matched by the connection's source address.
K8S_ATTRIBUTES = {
    "auth_type": "serviceAccount",
    "passthrough": False,
    "extract": {
        "metadata": ["k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.deployment.name", "k8s.node.name"],
    },
    "pod_association": [
        {"sources": [{"from": "resource_attribute", "name": "k8s.pod.ip"}]},
        {"sources": [{"from": "resource_attribute", "name": "k8s.pod.uid"}]},
        {"sources": [{"from": "resource_attribute", "name": "k8s.pod.name"},
                     {"from": "resource_attribute", "name": "k8s.namespace.name"}]},
        {"sources": [{"from": "connection"}]},
    ],
}
K8S_ATTRIBUTES_NAME = "k8s_attributes"

# Verbatim copies: generated path (under k8s/) -> source (under the repository root).
COPIES = {
    "stack/generated/otel-collector/otel-collector-config.yaml": "otel-collector/otel-collector-config.yaml",
    "stack/generated/alertmanager/alertmanager-config.yaml": "alertmanager/alertmanager-config.yaml",
    "stack/generated/tempo/tempo-config.yaml": "tempo/tempo-config.yaml",
    "stack/generated/loki/loki-config.yaml": "loki/loki-config.yaml",
    "stack/generated/pyroscope/pyroscope-config.yaml": "pyroscope/pyroscope-config.yaml",
    "stack/generated/grafana/provisioning/datasources/datasources.yaml":
        "grafana/provisioning/datasources/datasources.yaml",
    "stack/generated/grafana/provisioning/dashboards/dashboards.yaml":
        "grafana/provisioning/dashboards/dashboards.yaml",
    "stack/generated/grafana/entrypoint.sh": "grafana/entrypoint.sh",
    "stack/generated/locust/locust.env": "locust/locust.env",
    # The edge's OpenTelemetry settings: its collector address (otel-collector:4317) is a Service of the
    # namespace, so the file works unchanged.
    "stack/generated/edge/edge.env": "edge/edge.env",
    "stack/generated/locustfile.py": "locustfile.py",
}
# Copied from folders, file by file (so a new rule file or dashboard is picked up): k8s folder -> source.
COPIED_FOLDERS = {
    "stack/generated/prometheus/rules": ("prometheus/rules", "*.yaml"),
    "stack/generated/grafana/dashboards": ("grafana/dashboards", "*.json"),
}

HEADER_MARK = "GENERATED by `python -m tooling.k8s.render`"


# --- sources ----------------------------------------------------------------------------------------


def dotenv(root: Path = REPO_ROOT) -> dict[str, str]:
    return load_env_file(root / ".env")


def app_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """The app's settings as compose passes them: app/app.env, then the APP_PROFILE file over it."""
    values = load_env_file(root / "app" / "app.env")
    profile = dotenv(root)["APP_PROFILE"]
    values.update(load_env_file(root / "app" / f"profile-{profile}.env"))
    return values


def compose(root: Path = REPO_ROOT) -> dict:
    return yaml.safe_load((root / "docker-compose.yml").read_text())


def zerocode_version(root: Path = REPO_ROOT) -> str:
    return tomllib.loads((root / "instrumentation" / "pyproject.toml").read_text())["project"]["version"]


def zerocode_image(root: Path = REPO_ROOT) -> str:
    return f"{ZEROCODE_IMAGE}:{zerocode_version(root)}"


def split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def compose_images(root: Path = REPO_ROOT) -> dict[str, str]:
    """Image name -> tag of every compose service that runs a published image (not the built app)."""
    env = dotenv(root)
    images = {}
    for name, service in compose(root)["services"].items():
        if "build" in service or "image" not in service or name in KUBELET_SERVICES:
            continue
        image, tag = split_image(interpolate(service["image"], env))
        if not tag:
            raise ValueError(f"compose service {name}: image {image} has no tag")
        if images.setdefault(image, tag) != tag:
            raise ValueError(f"{image} has two tags in docker-compose.yml")
    return images


# --- addresses ----------------------------------------------------------------------------------------


def service_name(compose_service: str) -> str:
    return RENAMED_SERVICES.get(compose_service, compose_service)


def service_namespace(compose_service: str) -> str:
    return HOST_SERVICES.get(compose_service, NAMESPACE)


def cluster_address(value: str, services: set[str]) -> str:
    """A compose URL (http://otel-collector:4317) as one that resolves from any namespace
    (http://otel-collector.dice-observability.svc:4317); other values unchanged."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.hostname not in services:
        return value
    host = f"{service_name(parts.hostname)}.{service_namespace(parts.hostname)}.svc"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def instrumentation_env(root: Path = REPO_ROOT) -> list[tuple[str, str]]:
    """spec.python.env: the instrumentation keys of app/app.env (+ profile), with only addresses changed."""
    services = set(compose(root)["services"])
    return [(key, cluster_address(value, services)) for key, value in app_env(root).items()
            if key.startswith(INSTRUMENTATION_PREFIXES) and key not in PER_WORKLOAD_KEYS]


def app_settings(root: Path = REPO_ROOT) -> list[tuple[str, str]]:
    """The owners' serving settings of app/app.env: everything that is not the instrumentation's."""
    services = set(compose(root)["services"])
    settings = []
    for key, value in app_env(root).items():
        if key.startswith(INSTRUMENTATION_PREFIXES) or key in PER_WORKLOAD_KEYS:
            continue
        if cluster_address(value, services) != value:
            raise ValueError(f"app/app.env: {key} holds an address; give it a k8s mapping in tooling/k8s/render.py")
        settings.append((key, value))
    return settings


def address_keys(root: Path = REPO_ROOT) -> set[str]:
    """The app/app.env keys whose value the Instrumentation changes (compose addresses)."""
    services = set(compose(root)["services"])
    return {key for key, value in app_env(root).items() if cluster_address(value, services) != value}


# --- YAML -----------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # noqa: ARG002 - every repeated dict written out in full
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(data, explicit_start: bool = False) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120,
                     allow_unicode=True, explicit_start=explicit_start)


def header(sources: list[str], what: str = "", comment: str = "#") -> str:
    text = (f"{HEADER_MARK} from {', '.join(sources)}{what}. Do not edit: change the source and run the"
            " command again. `python -m tooling.k8s.render --check` and tests/k8s/test_k8s_manifests.py fail when"
            " this file differs from what its sources give.")
    lines = textwrap.wrap(text, width=104, break_on_hyphens=False, break_long_words=False)
    return "".join(f"{comment} {line}\n" for line in lines)


def with_header(text: str, source: str) -> str:
    """A verbatim copy of `source` with the generated header (after a shebang, if any). JSON cannot carry
    one: it is copied as it is (k8s/stack/generated/README.md lists it)."""
    if source.endswith(".json"):
        return text
    mark = header([source], ", verbatim")
    if text.startswith("#!"):
        first, _, rest = text.partition("\n")
        return f"{first}\n{mark}{rest}"
    return mark + text


def source_of_copy(generated: str, source: str) -> str:
    """The source text inside a verbatim copy (the inverse of with_header)."""
    if source.endswith(".json"):
        return generated
    mark = header([source], ", verbatim")
    if generated.startswith("#!"):
        first, _, rest = generated.partition("\n")
        return f"{first}\n{rest.removeprefix(mark)}"
    return generated.removeprefix(mark)


# --- generated files ------------------------------------------------------------------------------------


def images_component(root: Path) -> str:
    images = [{"name": name, "newTag": tag} for name, tag in sorted(compose_images(root).items())]
    body = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component", "images": images}
    return header([".env", "docker-compose.yml"], " (the image: of every compose service)") + dump(body)


def instrumentation(root: Path) -> str:
    env = instrumentation_env(root)
    endpoint = dict(env)["OTEL_EXPORTER_OTLP_ENDPOINT"]
    body = {
        "apiVersion": "opentelemetry.io/v1alpha1",
        "kind": "Instrumentation",
        "metadata": {"name": INSTRUMENTATION_NAME,
                     "labels": {"app.kubernetes.io/name": INSTRUMENTATION_NAME,
                                "app.kubernetes.io/part-of": NAMESPACE}},
        "spec": {
            # Also in python.env below (which wins); stated so that the Operator's own default does not apply.
            "exporter": {"endpoint": endpoint},
            "python": {
                "image": zerocode_image(root),
                # Every OTEL_* and PYROSCOPE_* setting of app/app.env, as compose passes it, with the
                # collector's and Pyroscope's addresses as Services of this namespace. The Operator adds
                # them to the app container unless it sets the same name itself, then its defaults
                # (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) only where unset: grpc to 4317 stays.
                "env": [{"name": key, "value": value} for key, value in env],
                # The init container that copies the packages (the Operator's defaults, stated).
                "resourceRequirements": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                         "limits": {"cpu": "500m", "memory": "256Mi"}},
            },
        },
    }
    what = (" (app/app.env and app/profile-<APP_PROFILE>.env: OTEL_* and PYROSCOPE_* but OTEL_SERVICE_NAME,"
            " addresses as cluster Services; the image tag is instrumentation/pyproject.toml's version)")
    return header(["app/app.env", ".env", "instrumentation/pyproject.toml"], what) + dump(body)


def settings_env(root: Path) -> str:
    what = " (the keys that are not OTEL_*/PYROSCOPE_*: the owners' serving settings, for the app container)"
    return header(["app/app.env"], what) + "".join(f"{key}={value}\n" for key, value in app_settings(root))


def locust_profile_env(root: Path) -> str:
    """What compose gives locust after locust/locust.env: the APP_PROFILE file's OTEL_* keys. Locust's
    client span is the root of every trace and the app's parentbased sampler follows it, so locust must
    sample as the profile says (app/profile-lean.env says why)."""
    profile = dotenv(root)["APP_PROFILE"]
    values = load_env_file(root / "app" / f"profile-{profile}.env")
    what = " (its OTEL_* keys, for locust, as compose's second env_file of the locust service)"
    return header([f"app/profile-{profile}.env"], what) + "".join(
        f"{key}={value}\n" for key, value in values.items() if key.startswith("OTEL_"))


def grafana_env(root: Path) -> str:
    env = dotenv(root)
    grafana = compose(root)["services"]["grafana"]
    lines = []
    for key, value in grafana.get("environment", {}).items():
        # No password in a ConfigMap: the Secret grafana-admin (optional) provides it, else the entrypoint
        # generates one (k8s/stack/grafana.yaml).
        if key == "GF_SECURITY_ADMIN_PASSWORD":
            continue
        lines.append(f"{key}={interpolate(str(value), env)}\n")
    what = " (the grafana service's environment, interpolated with .env, without the admin password)"
    return header(["docker-compose.yml", ".env"], what) + "".join(lines)


def prometheus_config(root: Path) -> str:
    source = yaml.safe_load((root / "prometheus" / "prometheus-config.yaml").read_text())
    services = set(compose(root)["services"])
    config = copy.deepcopy(source)
    for job in config["scrape_configs"]:
        job.clear()
    for job, original in zip(config["scrape_configs"], source["scrape_configs"], strict=True):
        job.update(_pod_discovery_job(original, services))
    for manager in config.get("alerting", {}).get("alertmanagers", []):
        for static in manager.get("static_configs", []):
            static["targets"] = [_service_target(target, services) for target in static["targets"]]
    what = (" (compose's config with each static target of a compose service found by Kubernetes pod"
            " discovery instead; jobs, relabelling, limits and rules unchanged)")
    return header(["prometheus/prometheus-config.yaml"], what) + dump(config)


def _service_target(target: str, services: set[str]) -> str:
    host, _, port = target.rpartition(":")
    if host not in services:
        return target
    if service_namespace(host) != NAMESPACE:
        return f"{service_name(host)}.{service_namespace(host)}.svc:{port}"
    return f"{service_name(host)}:{port}"


def _pod_discovery_job(job: dict, services: set[str]) -> dict:
    targets = [target for static in job.get("static_configs", []) for target in static.get("targets", [])]
    hosts = {target.rpartition(":")[0] for target in targets}
    if not targets or not hosts & services:
        return copy.deepcopy(job)
    if len(targets) != 1 or any(set(static) - {"targets"} for static in job["static_configs"]):
        raise ValueError(f"job {job['job_name']}: one static target of a compose service is all that is mapped")
    host, _, port = targets[0].rpartition(":")
    if host in KUBELET_SERVICES:
        return _kubelet_job(job, KUBELET_SERVICES[host])
    namespace = service_namespace(host)
    discovery = {"role": "pod",
                 "namespaces": {"own_namespace": True} if namespace == NAMESPACE else {"names": [namespace]}}
    relabel = [
        # The pods of the workload behind the compose service, at the port compose scraped: one target per
        # pod (every app replica, every Beyla of every node).
        {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                           "__meta_kubernetes_pod_container_port_number"],
         "regex": f"{service_name(host)};{port}", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Succeeded|Failed", "action": "drop"},
    ]
    if not job.get("honor_labels"):
        # Which pod. Not for a job that honours scraped labels (the collector's): its series describe
        # the processes that sent them, and a collector restart must not start new series.
        relabel += [{"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}]
    mapped = {}
    for key, value in job.items():
        if key == "static_configs":
            mapped["kubernetes_sd_configs"] = [discovery]
            mapped["relabel_configs"] = relabel + copy.deepcopy(job.get("relabel_configs", []))
        elif key != "relabel_configs":
            mapped[key] = copy.deepcopy(value)
    return mapped


def _kubelet_job(job: dict, path: str) -> dict:
    """A compose job of a service the kubelet embeds (cAdvisor): every node's kubelet, found by node discovery
    (its address and HTTPS port from the Node's status), at `path`; compose's metric relabelling unchanged."""
    mapped = {}
    for key, value in job.items():
        if key == "static_configs":
            mapped["metrics_path"] = path
            mapped.update(copy.deepcopy(KUBELET_SCRAPE))
            mapped["kubernetes_sd_configs"] = [{"role": "node"}]
            # Which node, by name (the target's instance is the kubelet's address).
            mapped["relabel_configs"] = [{"source_labels": ["__meta_kubernetes_node_name"], "target_label": "node"}]
            mapped["relabel_configs"] += copy.deepcopy(job.get("relabel_configs", []))
        elif key not in ("relabel_configs", "metrics_path", "scheme"):
            mapped[key] = copy.deepcopy(value)
    return mapped


def reverse_proxies(node):
    """Every reverse_proxy handler anywhere in a Caddy route tree (routes, subroutes, named routes)."""
    if isinstance(node, dict):
        if node.get("handler") == "reverse_proxy":
            yield node
        for value in node.values():
            yield from reverse_proxies(value)
    elif isinstance(node, list):
        for item in node:
            yield from reverse_proxies(item)


def edge_config(root: Path) -> str:
    """edge/caddy-config.json with each upstream that is a compose service dialled at its Kubernetes Service
    (app:5000 -> dice-api:5000); listeners, routes, tracing and everything else unchanged. JSON carries no
    header: the folder's README lists the file as generated."""
    config = load_edge_config(root / "edge" / "caddy-config.json")
    services = set(compose(root)["services"])
    for handler in reverse_proxies(config):
        for upstream in handler.get("upstreams", []):
            upstream["dial"] = _service_target(upstream["dial"], services)
    return json.dumps(config, indent=2) + "\n"


def collector_overlay(root: Path) -> str:
    source = yaml.safe_load((root / "otel-collector" / "otel-collector-config.yaml").read_text())
    pipelines = {}
    for name, pipeline in source["service"]["pipelines"].items():
        processors = list(pipeline.get("processors", []))
        # Right after memory_limiter (first, so it refuses data before anything else works on it), and
        # before the transforms and the connectors, so span metrics and logs carry the pod too.
        at = processors.index("memory_limiter") + 1 if "memory_limiter" in processors else 0
        processors.insert(at, K8S_ATTRIBUTES_NAME)
        pipelines[name] = {"processors": processors}
    body = {"processors": {K8S_ATTRIBUTES_NAME: copy.deepcopy(K8S_ATTRIBUTES)},
            "service": {"pipelines": pipelines}}
    what = (" (a second --config over the verbatim copy: the k8s_attributes processor, added to every"
            " pipeline; collector configs merge maps key by key and replace lists, so each pipeline's"
            " processor list is repeated whole)")
    return header(["otel-collector/otel-collector-config.yaml"], what) + dump(body)


def beyla_config(root: Path) -> str:
    source = yaml.safe_load((root / "beyla" / "beyla-config.yaml").read_text())
    config = copy.deepcopy(source)
    deployment = service_name("app")
    for entry in config["discovery"]["instrument"]:
        # Every selector of an entry must match: the app's port, and now its Deployment and namespace.
        entry["k8s_namespace"] = NAMESPACE
        entry["k8s_deployment_name"] = deployment
    config.setdefault("attributes", {}).setdefault("kubernetes", {})["enable"] = True
    what = (" (compose's config; discovery also by the app's Deployment and namespace, and Kubernetes"
            " metadata on every series)")
    return header(["beyla/beyla-config.yaml"], what) + dump(config)


def stack_component(files: dict[str, str]) -> str:
    def under(folder: str) -> list[str]:
        """The generated files directly in stack/generated/<folder>/ (env files are envs, not files)."""
        prefix = f"stack/generated/{folder}/"
        return sorted(path.removeprefix("stack/generated/") for path in files
                      if path.startswith(prefix) and "/" not in path.removeprefix(prefix)
                      and not path.endswith(".env"))

    generators = [
        # envFrom of the app container: gunicorn's and prometheus-flask-exporter's settings.
        {"name": "dice-api-settings", "envs": ["app-settings.env"]},
        {"name": "otel-collector-config", "files": under("otel-collector")},
        {"name": "prometheus-config", "files": under("prometheus")},
        {"name": "prometheus-rules", "files": under("prometheus/rules")},
        {"name": "alertmanager-config", "files": under("alertmanager")},
        {"name": "tempo-config", "files": under("tempo")},
        {"name": "loki-config", "files": under("loki")},
        {"name": "pyroscope-config", "files": under("pyroscope")},
        {"name": "grafana-datasources", "files": under("grafana/provisioning/datasources")},
        {"name": "grafana-dashboard-provider", "files": under("grafana/provisioning/dashboards")},
        {"name": "grafana-dashboards", "files": under("grafana/dashboards")},
        {"name": "grafana-entrypoint", "files": ["grafana/entrypoint.sh"]},
        {"name": "grafana-settings", "envs": ["grafana/grafana.env"]},
        {"name": "locust-settings", "envs": ["locust/locust.env", "locust/profile.env"]},
        {"name": "locustfile", "files": ["locustfile.py"]},
        # The edge: its Caddy config (mounted) and its OpenTelemetry settings (envFrom).
        {"name": "edge-config", "files": under("edge")},
        {"name": "edge-settings", "envs": ["edge/edge.env"]},
    ]
    body = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
            "resources": ["instrumentation.yaml"], "configMapGenerator": generators}
    return header(["the files of this folder"], " (a ConfigMap per compose mount)") + dump(body)


def beyla_component() -> str:
    body = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
            "configMapGenerator": [{"name": "beyla-config", "files": ["beyla-config.yaml"]}]}
    return header(["the files of this folder"], " (Beyla's config as a ConfigMap)") + dump(body)


def readme(files: dict[str, str], sources: dict[str, str]) -> str:
    def source(text: str) -> str:
        path, sep, note = text.partition(" (")
        return f"`{path}`" + (f" ({note}" if sep else "")

    rows = "".join(f"| `{path.removeprefix('stack/generated/')}` | {source(sources[path])} |\n"
                   for path in sorted(sources) if path.startswith("stack/generated/"))
    return (f"<!-- {HEADER_MARK}; do not edit. -->\n"
            "# Generated: do not edit\n\n"
            "Everything in this folder (and in `../../beyla/generated/`, `../../images/`) is written by\n"
            "`python -m tooling.k8s.render` from the compose stack's files; `python -m tooling.k8s.render --check`\n"
            "and `tests/k8s/test_k8s_manifests.py` fail when a file here differs from what its source gives.\n"
            "Change the source, then run the command. Every file but the JSON ones (the dashboards and the edge's\n"
            "Caddy config: JSON has no comments) starts with a header that says so.\n\n"
            "| file | from |\n|---|---|\n" + rows)


def generated_files(root: Path = REPO_ROOT) -> dict[str, str]:
    """Every generated file: path relative to k8s/ -> content."""
    files: dict[str, str] = {}
    sources: dict[str, str] = {}
    for target, source in COPIES.items():
        files[target] = with_header((root / source).read_text(), source)
        sources[target] = source
    for folder, (source_folder, pattern) in COPIED_FOLDERS.items():
        for path in sorted((root / source_folder).glob(pattern)):
            source = path.relative_to(root).as_posix()
            files[f"{folder}/{path.name}"] = with_header(path.read_text(), source)
            sources[f"{folder}/{path.name}"] = source
    derived = {
        "stack/generated/instrumentation.yaml": (instrumentation, "app/app.env (OTEL_*, PYROSCOPE_*)"),
        "stack/generated/app-settings.env": (settings_env, "app/app.env (the other keys)"),
        "stack/generated/prometheus/prometheus-config.yaml": (prometheus_config, "prometheus/prometheus-config.yaml"),
        "stack/generated/otel-collector/otel-collector-k8s.yaml":
            (collector_overlay, "otel-collector/otel-collector-config.yaml (k8s_attributes)"),
        "stack/generated/grafana/grafana.env": (grafana_env, "docker-compose.yml (grafana's environment)"),
        "stack/generated/locust/profile.env": (locust_profile_env, "app/profile-<APP_PROFILE>.env (OTEL_*)"),
        "stack/generated/edge/caddy-config.json":
            (edge_config, "edge/caddy-config.json (upstreams dialled at their Kubernetes Services)"),
        "beyla/generated/beyla-config.yaml": (beyla_config, "beyla/beyla-config.yaml"),
        "images/kustomization.yaml": (images_component, ".env"),
    }
    for target, (build, source) in derived.items():
        files[target] = build(root)
        sources[target] = source
    files["stack/generated/kustomization.yaml"] = stack_component(files)
    files["beyla/generated/kustomization.yaml"] = beyla_component()
    files["stack/generated/README.md"] = readme(files, sources)
    return files


# --- writing and checking -------------------------------------------------------------------------------


def _existing(k8s_dir: Path) -> set[str]:
    found = set()
    for folder in GENERATED_DIRS:
        base = k8s_dir / folder
        if base.is_dir():
            found |= {p.relative_to(k8s_dir).as_posix() for p in base.rglob("*") if p.is_file()}
    return found


def _compare(k8s_dir: Path, expected: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """({path: "missing" or "differs from its source"} of what must be written, [stale paths to remove])."""
    to_write = {}
    for path, text in sorted(expected.items()):
        target = k8s_dir / path
        if not target.is_file():
            to_write[path] = "missing"
        elif target.read_text() != text:
            to_write[path] = "differs from its source"
    return to_write, sorted(_existing(k8s_dir) - set(expected))


def drift(k8s_dir: Path = K8S_DIR, expected: dict[str, str] | None = None) -> list[str]:
    """What differs between k8s_dir and the renderer: missing, changed and stale generated files."""
    to_write, stale = _compare(k8s_dir, generated_files() if expected is None else expected)
    return [f"{path}: {why}" for path, why in to_write.items()] + [
        f"{path}: stale (no source gives it)" for path in stale]


def write(k8s_dir: Path = K8S_DIR, expected: dict[str, str] | None = None) -> list[str]:
    expected = generated_files() if expected is None else expected
    to_write, stale = _compare(k8s_dir, expected)
    for path in to_write:
        target = k8s_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(expected[path])
    for path in stale:
        (k8s_dir / path).unlink()
    return list(to_write) + [f"{path} (removed)" for path in stale]


# --- a kustomize for what k8s/ uses --------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration", "PriorityClass", "IngressClass"}


def _generate(folder: Path, kustomization: dict) -> list[dict]:
    objects = []
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for name in generator.get("files", []):
            key, sep, file = name.partition("=")
            path = folder / (file if sep else key)
            data[path.name if not sep else key] = path.read_text()
        for name in generator.get("envs", []):
            data.update(load_env_file(folder / name))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    return objects


def _images(objects: list[dict], images: list[dict]) -> None:
    by_name = {image["name"]: image for image in images}

    def fix(container: dict) -> None:
        name, tag = split_image(container["image"])
        image = by_name.get(name)
        if image:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"

    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", obj.get("spec", {}))
        for field in ("containers", "initContainers"):
            for container in spec.get(field, []) if isinstance(spec, dict) else []:
                fix(container)


def _transform(objects: list[dict], kustomization: dict) -> None:
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    _images(objects, kustomization.get("images", []))


def kustomize_build(folder: Path = K8S_DIR) -> list[dict]:
    """The objects `kubectl kustomize folder` gives, generated ConfigMaps without their hash suffix."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        if path.is_dir():
            objects += kustomize_build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for component in kustomization.get("components", []):
        path = folder / component
        spec = yaml.safe_load((path / "kustomization.yaml").read_text())
        if spec.get("kind") != "Component":
            raise ValueError(f"{path}: not a kustomize Component")
        for resource in spec.get("resources", []):
            objects += [doc for doc in yaml.safe_load_all((path / resource).read_text()) if doc]
        objects += _generate(path, spec)
        _transform(objects, spec)
    objects += _generate(folder, kustomization)
    _transform(objects, kustomization)
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if k8s/ differs from its sources")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for problem in problems:
            print(f"k8s/{problem}", file=sys.stderr)
        if problems:
            print("k8s/ is out of date: run `python -m tooling.k8s.render`", file=sys.stderr)
        return 1 if problems else 0
    for path in write():
        print(f"wrote k8s/{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
