"""The OpenTelemetry Operator's Python injection, run natively: our instrumentation image's folder, the
owners' image's Python, and the app container's environment as the Operator's webhook makes it.

On Kubernetes the app container runs the owners' image (app/Dockerfile, target `owners`: the app, its own
requirements, `gunicorn -c gunicorn.conf.py`). The Operator (OTEL_OPERATOR_VERSION in .env) adds an init
container that copies our instrumentation image's /autoinstrumentation (instrumentation/Dockerfile) into an
emptyDir mounted at /otel-auto-instrumentation-python, and sets the app container's environment: PYTHONPATH,
so that the layout's sitecustomize.py initialises OpenTelemetry (and our post_instrument hooks) in every
Python process, the Instrumentation resource's spec.python.env, its own defaults and the resource attributes.

Here the same three parts are built from the same sources, with nothing else in the way:

- `instrumentation_layout()`: the image's /autoinstrumentation, made by the very `pip install --target`
  command of instrumentation/Dockerfile's build stage (read from the file, run in a copy of the build
  context laid out as the Dockerfile's COPY lines lay it out). Cached under .cache/k8s-injection/, keyed
  by a hash of that command, the files it reads and the Python version.
- `owners_python()`: a virtualenv with app/requirements.txt only, the owners' image's site-packages (no
  OpenTelemetry in it, so nothing from this repository's .venv can stand in for a missing package).
- `pod_environment()`: the app container's environment (one function, see its docstring), from the
  Operator's logic or from a mutated Pod captured from the real webhook (DICE_MUTATED_POD_ENV).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from tooling.config import REPO_ROOT, load_env_file
from tooling.native.container import instructions

CACHE_DIR = REPO_ROOT / ".cache" / "k8s-injection"
APP_DIR = REPO_ROOT / "app"
APP_DOCKERFILE = APP_DIR / "Dockerfile"
INSTRUMENTATION_DOCKERFILE = REPO_ROOT / "instrumentation" / "Dockerfile"
K8S_STACK = REPO_ROOT / "k8s" / "stack"
INSTRUMENTATION_YAML = K8S_STACK / "generated" / "instrumentation.yaml"
APP_SETTINGS_ENV = K8S_STACK / "generated" / "app-settings.env"
APP_MANIFEST = K8S_STACK / "app.yaml"
STACK_KUSTOMIZATION = K8S_STACK / "kustomization.yaml"

# A JSON file with the app container's env as the real Operator webhook returned it: {"env": [{"name":
# ..., "value": ...} or {"name": ..., "valueFrom": {...}}]}, or tests/k8s/test_k8s.py's mutated-pod-env.json
# ({"<namespace>/<deployment>": {"pod": ..., "env": [...]}}). When set, it replaces the hand-built part.
MUTATED_ENV_VARIABLE = "DICE_MUTATED_POD_ENV"
# Where tests/k8s/test_k8s.py leaves the env the real webhook returned, in pytest's base temp folder.
CAPTURED_ENV_NAME = "mutated-pod-env.json"

# The Operator of OTEL_OPERATOR_VERSION in .env, internal/instrumentation/python.go and sdk.go.
IMAGE_LAYOUT_DIR = "/autoinstrumentation"
MOUNT_PATH = "/otel-auto-instrumentation-python"
PYTHONPATH_PREFIX = f"{MOUNT_PATH}/opentelemetry/instrumentation/auto_instrumentation"
SITECUSTOMIZE = "opentelemetry/instrumentation/auto_instrumentation/sitecustomize.py"
PYTHON_DEFAULTS = (  # getDefaultPythonEnvVars: appended only where the container does not set them yet
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ("OTEL_TRACES_EXPORTER", "otlp"),
    ("OTEL_METRICS_EXPORTER", "otlp"),
    ("OTEL_LOGS_EXPORTER", "otlp"),
)
ENV_POD_NAME = "OTEL_RESOURCE_ATTRIBUTES_POD_NAME"
ENV_NODE_NAME = "OTEL_RESOURCE_ATTRIBUTES_NODE_NAME"
ENV_POD_IP = "OTEL_POD_IP"
ENV_NODE_IP = "OTEL_NODE_IP"
RESOURCE_ANNOTATION = "resource.opentelemetry.io/"

# What .dockerignore keeps out of the build context inside instrumentation/ (its `**/...` lines).
DOCKERIGNORED = ("__pycache__", "*.egg-info", "build")


# ------------------------------------------------------------------------------- Dockerfile reading

def stages(dockerfile: Path) -> list[list[str]]:
    """The instructions of each build stage, continuation lines joined and comments dropped."""
    found: list[list[str]] = []
    for _, instruction in instructions(dockerfile.read_text()):
        if instruction.split(None, 1)[0].upper() == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def stage(dockerfile: Path, name: str | None = None) -> list[str]:
    """A stage's instructions: the one named `name` (FROM ... AS name), or the first one."""
    for instructions_ in stages(dockerfile):
        words = instructions_[0].split()
        if name is None or (len(words) >= 4 and words[-2].upper() == "AS" and words[-1] == name):
            return instructions_
    raise ValueError(f"{dockerfile}: no stage {name!r}")


def stage_env(instructions_: list[str]) -> dict[str, str]:
    """The ENV KEY=VALUE pairs of a stage."""
    env = {}
    for instruction in instructions_:
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"ENV {rest!r}: only the KEY=VALUE form is read here")
                env[key] = value
    return env


def layout_pip_command(dockerfile: Path = INSTRUMENTATION_DOCKERFILE) -> list[str]:
    """argv of the build stage's `pip install --target ...` (the RUN line up to its first `&&`)."""
    for instruction in stage(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "RUN" and "--target" in rest:
            argv = shlex.split(rest.split("&&", 1)[0])
            if argv[:2] == ["pip", "install"]:
                return argv
    raise ValueError(f"{dockerfile}: no `RUN pip install --target` in its build stage")


def layout_target(argv: list[str]) -> str:
    return argv[argv.index("--target") + 1]


def build_stage_copies(dockerfile: Path = INSTRUMENTATION_DOCKERFILE) -> list[tuple[Path, str]]:
    """(source in the build context, destination relative to WORKDIR) of the build stage's COPY lines."""
    copies = []
    for instruction in stage(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "COPY":
            *sources, destination = shlex.split(rest)
            if any(s.startswith("--") for s in sources):
                raise ValueError(f"COPY {rest!r}: flags are not read here")
            copies += [(REPO_ROOT / source, destination) for source in sources]
    return copies


# ----------------------------------------------------------------------------------- the layout

def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{os.uname().machine}"


def _files_of(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    ignored = lambda p: any(  # noqa: E731
        part == "__pycache__" or part == "build" or part.endswith(".egg-info") for part in p.relative_to(source).parts)
    return sorted(p for p in source.rglob("*") if p.is_file() and not ignored(p))


def layout_key() -> str:
    """What the layout depends on: the pip command, the steps after it and the ENV of the Dockerfile's build
    stage, every file its COPY lines bring in (the requirements, the zerocode sources, our sitecustomize.py),
    and the Python it is built for."""
    digest = hashlib.sha256()
    build = stage(INSTRUMENTATION_DOCKERFILE)
    digest.update(json.dumps([layout_pip_command(), layout_steps(), stage_env(build), _python_tag()]).encode())
    for source, destination in build_stage_copies():
        for path in _files_of(source):
            digest.update(f"{path.relative_to(REPO_ROOT)}->{destination}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _stage_build_context(workdir: Path) -> None:
    """The build stage's WORKDIR after its COPY lines: Docker semantics for files into a folder and a
    folder's contents into a folder, with what .dockerignore leaves out."""
    for source, destination in build_stage_copies():
        target = workdir / destination
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*DOCKERIGNORED), dirs_exist_ok=True)
        elif destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / source.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


# What may follow the pip install in its RUN line: commands that only place files in the layout or set their
# modes, which run the same natively. Anything else is refused rather than skipped, so that the folder built
# here can never silently differ from the image's.
LAYOUT_STEP_COMMANDS = ("cp", "chmod")


def layout_steps(dockerfile: Path = INSTRUMENTATION_DOCKERFILE) -> list[list[str]]:
    """argv of each command after the `pip install --target` in its RUN line (the rest of its `&&` chain):
    the `cp` of our sitecustomize.py over upstream's, then the `chmod`."""
    for instruction in stage(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "RUN" and "--target" in rest:
            steps = [shlex.split(part) for part in rest.split("&&")[1:]]
            for argv in steps:
                if not argv or argv[0] not in LAYOUT_STEP_COMMANDS:
                    raise ValueError(f"{dockerfile}: `{' '.join(argv)}` after the pip install cannot be repeated "
                                     f"natively (only {', '.join(LAYOUT_STEP_COMMANDS)})")
            return steps
    raise ValueError(f"{dockerfile}: no `RUN pip install --target` in its build stage")


def _local_step(argv: list[str], image_target: str, target: Path) -> list[str]:
    """A layout step with the image's --target folder (and paths under it) mapped to the local one."""
    return [str(target) + arg[len(image_target):] if arg == image_target or arg.startswith(image_target + "/")
            else arg for arg in argv]


def instrumentation_layout(cache_dir: Path = CACHE_DIR, log=print) -> Path:
    """Our instrumentation image's /autoinstrumentation, as a folder (built once per layout_key()).

    The RUN line is instrumentation/Dockerfile's own: its pip command, with `pip` run by this Python and the
    --target made local, then its layout_steps() (our sitecustomize.py copied over upstream's) with the same
    folder mapped; it runs in a copy of the build context, with the build stage's ENV."""
    steps = layout_steps()
    layout = cache_dir / f"layout-{layout_key()}"
    if (layout / SITECUSTOMIZE).exists():
        return layout
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f".build-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        workdir, target = work / "build", work / "autoinstrumentation"
        _stage_build_context(workdir)
        argv = layout_pip_command()
        argv[argv.index("--target") + 1] = str(target)
        command = [sys.executable, "-m", *argv]
        env = {**os.environ, **stage_env(stage(INSTRUMENTATION_DOCKERFILE))}
        log(f"building the instrumentation layout: {' '.join(argv)}")
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        image_target = layout_target(layout_pip_command())
        for step in steps:
            local = _local_step(step, image_target, target)
            done = subprocess.run(local, cwd=workdir, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        if not (target / SITECUSTOMIZE).exists():
            raise RuntimeError(f"the layout has no {SITECUSTOMIZE}: not what the Operator expects")
        try:
            target.rename(layout)  # atomic: a parallel build that finished first wins
        except OSError:
            if not (layout / SITECUSTOMIZE).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return layout


def layout_distributions(layout: Path) -> dict[str, str]:
    """{normalised name: version} of every distribution pip put in the layout."""
    found = {}
    for metadata in layout.glob("*.dist-info/METADATA"):
        headers = dict(line.split(": ", 1) for line in metadata.read_text().split("\n\n", 1)[0].splitlines()
                       if ": " in line)
        found[normalise(headers["Name"])] = headers["Version"]
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a requirements file whose every line pins exactly (`-r` lines aside)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not re.fullmatch(r"[\w.]+", version.strip()):
            raise ValueError(f"{path.name}: {line!r} is not pinned exactly (==)")
        pins[normalise(name)] = version.strip()
    return pins


def directory_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under path."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# ----------------------------------------------------------------------------- the owners' Python

def owners_python(cache_dir: Path = CACHE_DIR, log=print) -> Path:
    """A virtualenv with app/requirements.txt only, as the owners' image has: its bin/ folder."""
    requirements = APP_DIR / "requirements.txt"
    key = hashlib.sha256(requirements.read_bytes() + _python_tag().encode()).hexdigest()[:16]
    venv = cache_dir / f"owners-{key}"
    if (venv / ".complete").exists():
        return venv / "bin"
    shutil.rmtree(venv, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"creating the owners' Python: {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**os.environ, **stage_env(stage(APP_DOCKERFILE, "owners"))}
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-r", str(requirements)], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip install -r {requirements} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (venv / ".complete").write_text("")
    return venv / "bin"


# ------------------------------------------------------------------------------ the Pod environment

@dataclass(frozen=True)
class PodIdentity:
    """The Pod the Deployment's ReplicaSet would make: names as a cluster would give them."""

    namespace: str
    deployment: str
    container: str
    image: str
    annotations: dict
    pod_template_hash: str = "7c5d9f8b4d"
    pod_suffix: str = "q2x7k"
    node: str = "native-node"
    uid: str = "00000000-0000-4000-8000-000000000001"

    @property
    def replicaset(self) -> str:
        return f"{self.deployment}-{self.pod_template_hash}"

    @property
    def pod(self) -> str:
        return f"{self.replicaset}-{self.pod_suffix}"


def _yaml_documents(path: Path) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def app_deployment() -> dict:
    (deployment,) = [d for d in _yaml_documents(APP_MANIFEST) if d["kind"] == "Deployment"]
    return deployment


def pod_identity(**overrides) -> PodIdentity:
    """The app's Pod as k8s/stack renders it (namespace of its kustomization, the Deployment's first
    container and its pod template's annotations)."""
    import yaml

    deployment = app_deployment()
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    fields = dict(namespace=yaml.safe_load(STACK_KUSTOMIZATION.read_text())["namespace"],
                  deployment=deployment["metadata"]["name"], container=container["name"],
                  image=container["image"], annotations=dict(template["metadata"].get("annotations") or {}))
    return PodIdentity(**{**fields, **overrides})


def instrumentation_resource() -> dict:
    (instrumentation,) = [d for d in _yaml_documents(INSTRUMENTATION_YAML) if d["kind"] == "Instrumentation"]
    return instrumentation


def _image_tag(image: str) -> str:
    # parseServiceVersionFromImage: the tag (digests are not used in these manifests).
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def operator_container_env(pod: PodIdentity, instrumentation: dict, container_env: list[dict] = ()) -> list[dict]:
    """The app container's `env` as the webhook of the Operator of OTEL_OPERATOR_VERSION in .env leaves it,
    for a container whose own `env` is `container_env` (k8s/stack/app.yaml's sets none, only envFrom; a
    Django Deployment sets DJANGO_SETTINGS_MODULE and PYTHONPATH), in the Operator's order:

    injectPythonSDK (python.env, then PYTHONPATH) -> injectCommonEnvVar (OTEL_NODE_IP and OTEL_POD_IP
    prepended, then spec.env) -> injectDefaultPythonEnvVars (protocol and exporters, if not set) ->
    injectCommonSDKConfig (OTEL_SERVICE_NAME, the exporter endpoint if not set, the pod and node name from
    the downward API, OTEL_RESOURCE_ATTRIBUTES extended with the sorted k8s.* and service.* attributes
    and moved last)."""
    spec = instrumentation["spec"]
    env: list[dict] = [dict(var) for var in container_env]
    names = lambda: {var["name"] for var in env}  # noqa: E731

    def append_if_not_set(*variables: dict) -> None:
        for var in variables:
            if var["name"] not in names():
                env.append(dict(var))

    append_if_not_set(*spec.get("python", {}).get("env", []))
    # python.go: the container's own PYTHONPATH stays, between the layout's sitecustomize folder and the layout.
    own = [var for var in env if var["name"] == "PYTHONPATH"]
    if own:
        own[0]["value"] = f"{PYTHONPATH_PREFIX}:{own[0]['value']}:{MOUNT_PATH}"
    else:
        env.append({"name": "PYTHONPATH", "value": f"{PYTHONPATH_PREFIX}:{MOUNT_PATH}"})
    for name, field in ((ENV_POD_IP, "status.podIP"), (ENV_NODE_IP, "status.hostIP")):
        if name not in names():
            env.insert(0, {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}})
    append_if_not_set(*spec.get("env", []))
    append_if_not_set(*({"name": n, "value": v} for n, v in PYTHON_DEFAULTS))

    # createResourceMap: the CR's attributes, then the Kubernetes ones, then the pod's annotations.
    existing = {}
    for var in env:
        if var["name"] == "OTEL_RESOURCE_ATTRIBUTES":
            existing = dict(pair.strip().split("=", 1) for pair in var["value"].split(",") if "=" in pair)
    resources = {k: v for k, v in (spec.get("resource", {}).get("attributes") or {}).items() if k not in existing}
    kubernetes = {
        "k8s.namespace.name": pod.namespace, "k8s.container.name": pod.container,
        "service.instance.id": f"{pod.namespace}.$({ENV_POD_NAME}).{pod.container}",
        # addParentResourceLabels: the owner ReplicaSet, and the Deployment that owns it.
        "k8s.replicaset.name": pod.replicaset, "k8s.deployment.name": pod.deployment,
    }
    resources.update({k: v for k, v in kubernetes.items() if k not in existing and v})
    for key, value in pod.annotations.items():
        if key.startswith(RESOURCE_ANNOTATION):
            attribute = key[len(RESOURCE_ANNOTATION):]
            if attribute not in existing and attribute != "service.name":
                resources[attribute] = value
    if "service.namespace" not in existing:
        resources["service.namespace"] = pod.annotations.get(f"{RESOURCE_ANNOTATION}service.namespace") or pod.namespace

    # injectCommonSDKConfig
    if "OTEL_SERVICE_NAME" not in names():
        service = pod.annotations.get(f"{RESOURCE_ANNOTATION}service.name") or pod.deployment
        env.append({"name": "OTEL_SERVICE_NAME", "value": service})
    if spec.get("exporter", {}).get("endpoint"):
        append_if_not_set({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec["exporter"]["endpoint"]})
    env.append({"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    resources["k8s.pod.name"] = f"$({ENV_POD_NAME})"
    if "service.version" not in existing:
        version = pod.annotations.get(f"{RESOURCE_ANNOTATION}service.version") or _image_tag(pod.image)
        if version:
            resources["service.version"] = version
    env.append({"name": ENV_NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    resources["k8s.node.name"] = f"$({ENV_NODE_NAME})"
    text = ",".join(f"{k}={resources[k]}" for k in sorted(resources))
    attributes = [var for var in env if var["name"] == "OTEL_RESOURCE_ATTRIBUTES"]
    if attributes:
        var = attributes[0]
        var["value"] += text if var["value"].endswith(",") else "," + text
    else:
        env.append({"name": "OTEL_RESOURCE_ATTRIBUTES", "value": text})
    # Moved last, so that its $(...) references come after the variables they name.
    env.sort(key=lambda var: var["name"] == "OTEL_RESOURCE_ATTRIBUTES")
    return env


def with_pod_name(pod: PodIdentity, name: str | None) -> PodIdentity:
    """`pod` renamed as a Pod of its Deployment called `name` (<deployment>-<template hash>-<suffix>)."""
    if not name or not name.startswith(f"{pod.deployment}-") or "-" not in name[len(pod.deployment) + 1:]:
        return pod
    template_hash, _, suffix = name[len(pod.deployment) + 1:].rpartition("-")
    return PodIdentity(**{**pod.__dict__, "pod_template_hash": template_hash, "pod_suffix": suffix})


def read_mutated_env(path: Path, deployment: str) -> tuple[list[dict], str | None]:
    """(the app container's env list, the Pod's name if the file says it) from a captured mutated Pod."""
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("env"), list):
        return data["env"], data.get("pod")
    entries = {key: value for key, value in data.items() if isinstance(value, dict) and "env" in value}
    chosen = [value for key, value in entries.items() if key.rsplit("/", 1)[-1] == deployment] or \
        (list(entries.values()) if len(entries) == 1 else [])
    if len(chosen) != 1:
        raise ValueError(f"{path}: no env for the Deployment {deployment!r} (keys: {sorted(data)})")
    return chosen[0]["env"], chosen[0].get("pod")


def kubelet_resolve(env: list[dict], base: dict[str, str], pod: PodIdentity,
                    pod_ip: str = "127.0.0.1") -> dict[str, str]:
    """What the container's process sees of `env` on top of `base` (the image's ENV and the envFrom
    ConfigMaps): downward-API fieldRefs filled in for `pod`, and $(VAR) expanded as the kubelet does
    (from variables defined before, `$$(` kept literal)."""
    fields = {"metadata.name": pod.pod, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid,
              "spec.nodeName": pod.node, "status.podIP": pod_ip, "status.hostIP": pod_ip}
    resolved = dict(base)
    for var in env:
        if "valueFrom" in var:
            field = (var["valueFrom"].get("fieldRef") or {}).get("fieldPath")
            if field not in fields:
                raise ValueError(f"{var['name']}: valueFrom {var['valueFrom']} cannot be resolved natively")
            value = fields[field]
        else:
            value = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                           lambda m: "$" if m[0] == "$$" else resolved.get(m[1], m[0]), var.get("value", ""))
        resolved[var["name"]] = value
    return resolved


def comparable_env(env: list[dict]) -> list[tuple]:
    """(name, value or valueFrom) per variable of a container's env, in order, with the fieldRef apiVersion that
    the API server defaults (and the Operator leaves out) taken out: a captured env and a built one compare."""
    def source(var: dict):
        if "valueFrom" not in var:
            return var.get("value")
        value_from = {key: dict(ref) for key, ref in var["valueFrom"].items()}
        if value_from.get("fieldRef", {}).get("apiVersion") == "v1":
            del value_from["fieldRef"]["apiVersion"]
        return value_from
    return [(var["name"], source(var)) for var in env]


# The cluster Services the Instrumentation sends to (k8s/stack/otel-collector.yaml, pyroscope.yaml), by port.
COLLECTOR_PORTS = {"grpc": 4317, "http": 4318}
PYROSCOPE_PORT = 4040


def native_addresses(otlp_grpc: int, otlp_http: int, pyroscope: int) -> dict[tuple[str, int], str]:
    """`map_addresses`'s table for a native stack: the collector's two OTLP ports and Pyroscope, on 127.0.0.1."""
    return {("otel-collector", COLLECTOR_PORTS["grpc"]): f"127.0.0.1:{otlp_grpc}",
            ("otel-collector", COLLECTOR_PORTS["http"]): f"127.0.0.1:{otlp_http}",
            ("pyroscope", PYROSCOPE_PORT): f"127.0.0.1:{pyroscope}"}


CLUSTER_ADDRESS = re.compile(r"\b([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9-]+)\.svc(\.cluster\.local)?:(\d+)\b")


def map_addresses(value: str, addresses: dict[tuple[str, int], str]) -> str:
    """Every `<service>.<namespace>.svc[.cluster.local]:<port>` in value replaced by its local address;
    one with no local counterpart is an error, never left pointing nowhere."""
    def local(match: re.Match) -> str:
        key = (match[1], int(match[5]))
        if key not in addresses:
            raise ValueError(f"{match[0]} (in {value!r}) has no address in the native stack: {sorted(addresses)}")
        return addresses[key]
    return CLUSTER_ADDRESS.sub(local, value)


def image_environment(python_bin: Path, image_env: dict[str, str]) -> dict[str, str]:
    """What a python image gives its container's process, natively: PATH with the image's Python (here a
    virtualenv's bin/) first, LANG as the python image sets it, HOME, then the Dockerfile's own ENV."""
    return {"PATH": f"{python_bin}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "HOME": os.environ.get("HOME", "/"), **image_env}


def local_paths(value: str, folders: dict[str, Path]) -> str:
    """A PATH-like value (PYTHONPATH) with every entry at or under one of `folders`' container paths moved to
    that folder's local counterpart (the mount to the layout, the image's WORKDIR to the app's site)."""
    def local(entry: str) -> str:
        for inside, here in folders.items():
            if entry == inside or entry.startswith(inside + "/"):
                return str(here) + entry[len(inside):]
        return entry
    return os.pathsep.join(local(entry) for entry in value.split(os.pathsep))


def pod_environment(layout: Path, owners_bin: Path, addresses: dict[tuple[str, int], str], *, port: int,
                    multiproc_dir: Path, mutated_env: Path | str | None = None,
                    pod: PodIdentity | None = None) -> tuple[dict[str, str], list[dict], str]:
    """The app container's environment on Kubernetes, for the owners' command run natively.

    Returns (environment, the container's env list before resolution, where that list came from).

    Built in the order the container gets it:
      1. the owners' image: the ENV of app/Dockerfile's `owners` stage, PATH with the owners' Python (a
         virtualenv with app/requirements.txt only) and LANG as the python image sets it;
      2. envFrom: the ConfigMap dice-api-settings (k8s/stack/generated/app-settings.env: GUNICORN_*,
         PROMETHEUS_MULTIPROC_DIR, LOG_LEVEL);
      3. env, as the Operator's webhook leaves it. This is the part to replace by the real thing: when
         `mutated_env` (or else the file named by DICE_MUTATED_POD_ENV) is given, it is that captured list
         ({"env": [{"name", "value" | "valueFrom"}]}, or tests/k8s/test_k8s.py's report); otherwise it is
         `operator_container_env()`, the Operator's logic (OTEL_OPERATOR_VERSION) applied to k8s/stack/generated/
         instrumentation.yaml and the app's Deployment;
      4. resolved as the kubelet does (downward API for the pod, $(VAR) references).

    Then only addresses and paths are mapped to this machine, and nothing else is changed or added:
    cluster Service addresses (`map_addresses`, e.g. the collector's OTLP endpoint and Pyroscope) to
    `addresses`, the mount /otel-auto-instrumentation-python in PYTHONPATH to `layout`,
    PROMETHEUS_MULTIPROC_DIR (a folder of the pod's /tmp emptyDir) to `multiproc_dir`, and the listen
    address (gunicorn.conf.py's BIND_HOST and PORT, unset in the pod: 0.0.0.0:5000) to 127.0.0.1:`port`.
    """
    pod = pod or pod_identity()
    mutated_env = mutated_env or os.environ.get(MUTATED_ENV_VARIABLE) or None
    if mutated_env:
        env_list, pod_name = read_mutated_env(Path(mutated_env), pod.deployment)
        source = f"captured from the Operator's webhook ({mutated_env})"
        # Keep the names the webhook saw (its k8s.replicaset.name is literal, the pod name a fieldRef).
        pod = with_pod_name(pod, pod_name)
    else:
        env_list = operator_container_env(pod, instrumentation_resource())
        source = "built by hand from the Operator's logic (OTEL_OPERATOR_VERSION in .env: sdk.go, python.go)"

    image = image_environment(owners_bin, stage_env(stage(APP_DOCKERFILE, "owners")))
    config_map = load_env_file(APP_SETTINGS_ENV)
    environment = kubelet_resolve(env_list, {**image, **config_map}, pod)

    for key, value in list(environment.items()):
        environment[key] = map_addresses(value, addresses)
    environment["PYTHONPATH"] = local_paths(environment["PYTHONPATH"], {MOUNT_PATH: layout})
    if "PROMETHEUS_MULTIPROC_DIR" in environment:
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    environment.update(BIND_HOST="127.0.0.1", PORT=str(port))
    return environment, env_list, source


def owners_command(owners_bin: Path) -> list[str]:
    """The owners' image's CMD (app/Dockerfile, stage `owners`), run by the owners' Python."""
    (cmd,) = [i for i in stage(APP_DOCKERFILE, "owners") if i.split(None, 1)[0].upper() == "CMD"][-1:]
    argv = json.loads(cmd.partition(" ")[2])
    return [str(owners_bin / argv[0]), *argv[1:]]
