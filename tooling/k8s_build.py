"""Everything the Kubernetes tests run, built from official sources into the git-ignored cache.

No container runtime runs here, but a real API server does. This module builds and caches:

- **kube-apiserver and kubectl** of Kubernetes KUBERNETES_VERSION, from the `k8s.io/kubernetes` Go module;
- **etcd** ETCD_VERSION, from `go.etcd.io/etcd/server/v3` (the module whose `main.go` is the `etcd` command);
- **kubeconform** KUBECONFORM_VERSION, from `github.com/yannh/kubeconform`;
- **the OpenTelemetry Operator** of OTEL_OPERATOR_VERSION in .env, the release users install (its manager
  binary, from `github.com/open-telemetry/opentelemetry-operator`), with its CRDs and webhook manifests copied
  from the same module zip;
- **JSON schemas for kubeconform**: Kubernetes' strict schemas of SCHEMA_KUBERNETES_VERSION from the PyPI
  package kubernetes-validate (made local: their `$id`/`$ref` point at the web as shipped, and kubeconform
  then only says "could not find schema"), and the Operator's CRDs converted by kubeconform's own
  `scripts/openapi2jsonschema.py` (from the kubeconform module zip), strict (`additionalProperties: false`
  wherever properties are listed, the root included).

Each lands in ``.cache/<tool>/<version>-<recipe hash>/`` (the recipe: module, versions, flags; changing
any of them gets a fresh build), published only once complete, so an interrupted build never leaves a
half-written binary. Go's build cache (2+ GB for Kubernetes) stays where Go keeps it; only the binaries
are cached here.

`go install module@version` refuses modules whose go.mod has `replace` lines (Kubernetes and etcd point
theirs at sibling folders of their repositories, which the module zips do not contain), and the
Operator's `go install` fails on the proxy's version list. So those three build in a throw-away wrapper
module: it requires the module, repeats its `go` line and its replaces with each sibling folder mapped to
the sibling module of the same release (`k8s.io/api => k8s.io/api v0.34.4` for Kubernetes v1.34.4), and
checks that every other dependency resolved to the version the module itself was released with.

Measured on 2 cores (2026-11-30), Go's caches cold and the other Go builds of `make test` running at the
same time: about 32 minutes (kube-apiserver + kubectl 25 min, the Operator 6 min, etcd 1.5 min, the rest
seconds; alone on a less busy machine, 21). 75 s into an empty .cache with Go's caches warm (a fresh clone
on a used machine: mostly linking); 0.1 s when cached.

``python -m tooling.k8s_build`` builds whatever is missing and prints where each part is.

On demand only, never by `k8s_tools()` (the tests that need no cluster never need it): **kind** of
KIND_VERSION in .env, by `go install sigs.k8s.io/kind@<KIND_VERSION>`, into ``.cache/kind/`` the same way
(`kind_binary()`, or ``python -m tooling.k8s_build --kind``), for the tier that runs the stack in a kind
cluster on Docker; `kind_node_image()` is the node image it runs (KIND_NODE_IMAGE in .env).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from tooling.envfile import DOTENV, load_env_file
from tooling.gobuild import BUILD_ENV, go_executable, publish_all, recipe_key, run_logged, work_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = REPO_ROOT / ".cache"


class K8sBuildError(RuntimeError):
    """A part of the Kubernetes test tooling could not be built."""


RELEASE_TAG = re.compile(r"v\d+\.\d+\.\d+")


def dotenv_release(key: str, env_file: Path = DOTENV) -> str:
    """A release tag like v1.2.3 that .env states (the Kubernetes block at its end)."""
    value = load_env_file(env_file).get(key)
    if not value:
        raise K8sBuildError(f"{env_file} sets no {key}")
    if not RELEASE_TAG.fullmatch(value):
        raise K8sBuildError(f"{key}={value} in {env_file}: expected a release tag like v1.2.3")
    return value


# The versions validated against (README, Kubernetes). Kubernetes 1.34 is what the manifests target.
KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
KUBECONFORM_VERSION = "v0.8.0"
# The Operator users install (README, Kubernetes, "Prerequisites") is the one the tests build and run.
OTEL_OPERATOR_VERSION = dotenv_release("OTEL_OPERATOR_VERSION")
# kubernetes-validate (PyPI) ships JSON schemas of every Kubernetes minor from 1.25 to its own version, each
# as of its x.y.0 release; 1.34.0's are the schemas of the 1.34 API. The wheel is checked against its hash.
KUBERNETES_VALIDATE_VERSION = "1.37.0"
KUBERNETES_VALIDATE_SHA256 = "85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9"
SCHEMA_KUBERNETES_VERSION = ".".join(KUBERNETES_VERSION.removeprefix("v").split(".")[:2]) + ".0"

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
KUBECONFORM_MODULE = "github.com/yannh/kubeconform"
OPERATOR_MODULE = "github.com/open-telemetry/opentelemetry-operator"
KIND_MODULE = "sigs.k8s.io/kind"

# Like the official release builds: static, paths trimmed, symbols stripped.
BUILD_FLAGS = ("-trimpath",)
LDFLAGS = ("-s", "-w")
# kubeconform's schema-location template for both schema folders: kind plus "-<group's first part>-<version>",
# the layout of kubernetes-json-schema (deployment-apps-v1.json, service-v1.json,
# instrumentation-opentelemetry-v1alpha1.json).
SCHEMA_TEMPLATE = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
CRD_FILENAME_FORMAT = "{kind}-{group}-{version}"


@dataclasses.dataclass(frozen=True)
class K8sTools:
    """Where every built part lives."""

    kube_apiserver: Path
    kubectl: Path
    etcd: Path
    kubeconform: Path
    operator: Path
    operator_crds: Path  # folder of the Operator's CustomResourceDefinition YAML files (config/crd/bases)
    operator_webhooks: Path  # config/webhook/manifests.yaml of the Operator's module
    kubernetes_schemas: Path  # folder of strict JSON schemas of the Kubernetes API
    crd_schemas: Path  # folder of strict JSON schemas of the Operator's CRDs

    def schema_locations(self) -> list[str]:
        """kubeconform's `-schema-location` values, local folders only."""
        return [f"{self.kubernetes_schemas}/{SCHEMA_TEMPLATE}", f"{self.crd_schemas}/{SCHEMA_TEMPLATE}"]


# ------------------------------------------------------------------------------------------ recipes


def kubernetes_ldflags(version: str = KUBERNETES_VERSION) -> str:
    """The version stamp of Kubernetes' hack/lib/version.sh, in both packages it sets. Without it the
    binaries report v0.0.0-master, and kubectl cannot parse the server's version."""
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    if not match:
        raise K8sBuildError(f"Kubernetes version {version}: expected a release tag like v1.34.4")
    stamp = {"gitVersion": version, "gitMajor": match[1], "gitMinor": match[2], "gitTreeState": "clean",
             "gitCommit": version, "buildDate": "1970-01-01T00:00:00Z"}
    flags = [f"-X k8s.io/{package}.{key}={value}" for package in ("client-go/pkg/version", "component-base/version")
             for key, value in stamp.items()]
    return " ".join([*LDFLAGS, *flags])


def kubernetes_staging_version(version: str = KUBERNETES_VERSION) -> str:
    """The release of Kubernetes' staging modules (k8s.io/api, …) cut with `version`: v1.34.4 -> v0.34.4."""
    return "v0." + version.removeprefix("v").split(".", 1)[1]


def etcd_ldflags(version: str = ETCD_VERSION) -> str:
    # etcd's build script stamps the commit; the proxy serves none, so the module version stands in.
    return " ".join([*LDFLAGS, f"-X go.etcd.io/etcd/api/v3/version.GitSHA={version}"])


def kubeconform_ldflags(version: str = KUBECONFORM_VERSION) -> str:
    return " ".join([*LDFLAGS, f"-X main.version={version}"])


def operator_ldflags(version: str, versions_txt: str) -> str:
    """The Operator's Makefile (OPERATOR_LDFLAGS): its version and, from versions.txt, the default versions of
    the images it deploys when a resource names none (autoinstrumentation-python 0.59b0 for the Operator
    release of OTEL_OPERATOR_VERSION in .env when this was written)."""
    defaults = dict(line.split("=", 1) for line in versions_txt.splitlines()
                    if line.strip() and not line.startswith("#") and "=" in line)
    from_versions_txt = {
        "otelCol": "opentelemetry-collector", "targetAllocator": "targetallocator",
        "operatorOpAMPBridge": "operator-opamp-bridge", "autoInstrumentationJava": "autoinstrumentation-java",
        "autoInstrumentationNodeJS": "autoinstrumentation-nodejs",
        "autoInstrumentationPython": "autoinstrumentation-python",
        "autoInstrumentationDotNet": "autoinstrumentation-dotnet",
        "autoInstrumentationGo": "autoinstrumentation-go",
        "autoInstrumentationApacheHttpd": "autoinstrumentation-apache-httpd",
        "autoInstrumentationNginx": "autoinstrumentation-nginx",
    }
    missing = [key for key in from_versions_txt.values() if key not in defaults]
    if missing:
        raise K8sBuildError(f"the Operator {version}'s versions.txt lacks {missing}")
    stamp = {"version": version.removeprefix("v"), "buildDate": "1970-01-01T00:00:00Z",
             **{variable: defaults[key] for variable, key in from_versions_txt.items()}}
    package = f"{OPERATOR_MODULE}/internal/version"
    return " ".join([*LDFLAGS, *(f"-X {package}.{variable}={value}" for variable, value in stamp.items())])


def kubernetes_recipe(version: str = KUBERNETES_VERSION) -> dict:
    return {"module": KUBERNETES_MODULE, "version": version, "staging": kubernetes_staging_version(version),
            "commands": ["kube-apiserver", "kubectl"], "build_flags": list(BUILD_FLAGS),
            "ldflags": kubernetes_ldflags(version), "env": BUILD_ENV}


def etcd_recipe(version: str = ETCD_VERSION) -> dict:
    return {"module": ETCD_MODULE, "version": version, "commands": ["etcd"], "build_flags": list(BUILD_FLAGS),
            "ldflags": etcd_ldflags(version), "env": BUILD_ENV}


def kubeconform_recipe(version: str = KUBECONFORM_VERSION) -> dict:
    return {"module": KUBECONFORM_MODULE, "version": version, "commands": ["kubeconform"],
            "build_flags": list(BUILD_FLAGS), "ldflags": kubeconform_ldflags(version), "env": BUILD_ENV}


def operator_recipe(version: str = OTEL_OPERATOR_VERSION) -> dict:
    # The ldflags depend on versions.txt inside the module, which a module version never changes.
    return {"module": OPERATOR_MODULE, "version": version, "commands": ["manager"], "build_flags": list(BUILD_FLAGS),
            "ldflags": "Makefile OPERATOR_LDFLAGS from versions.txt", "ld": list(LDFLAGS), "env": BUILD_ENV,
            "copied": ["config/crd/bases/*.yaml", "config/webhook/manifests.yaml"]}


def kubernetes_schemas_recipe() -> dict:
    return {"package": "kubernetes-validate", "version": KUBERNETES_VALIDATE_VERSION,
            "sha256": KUBERNETES_VALIDATE_SHA256, "folder": f"v{SCHEMA_KUBERNETES_VERSION}-local-strict",
            "made_local": "no $id; $ref to _definitions.json beside"}


def crd_schemas_recipe() -> dict:
    return {"crds": f"{OPERATOR_MODULE}@{OTEL_OPERATOR_VERSION} config/crd/bases",
            "converter": f"{KUBECONFORM_MODULE}@{KUBECONFORM_VERSION} scripts/openapi2jsonschema.py",
            "FILENAME_FORMAT": CRD_FILENAME_FORMAT, "DENY_ROOT_ADDITIONAL_PROPERTIES": "1"}


def kind_version(env_file: Path = DOTENV) -> str:
    """KIND_VERSION from .env: the kind release the docker tier's Kubernetes test creates its cluster with."""
    return dotenv_release("KIND_VERSION", env_file)


def kind_node_image(env_file: Path = DOTENV) -> str:
    """KIND_NODE_IMAGE from .env: `kindest/node:<Kubernetes release>@sha256:<digest>`, the image built for the
    kind release of KIND_VERSION (its release notes list them; kind requires the digest), at the Kubernetes
    minor the manifests target (KUBERNETES_VERSION)."""
    image = load_env_file(env_file).get("KIND_NODE_IMAGE")
    if not image:
        raise K8sBuildError(f"{env_file} sets no KIND_NODE_IMAGE")
    match = re.fullmatch(r"kindest/node:(v(\d+)\.(\d+)\.\d+)@sha256:[0-9a-f]{64}", image)
    if not match:
        raise K8sBuildError(f"KIND_NODE_IMAGE={image} in {env_file}: expected kindest/node:vX.Y.Z@sha256:<digest> "
                            "(kind needs the digest of the image built for its release)")
    target = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", KUBERNETES_VERSION)
    if (match[2], match[3]) != (target[1], target[2]):
        raise K8sBuildError(f"KIND_NODE_IMAGE={image} in {env_file}: Kubernetes {match[1]}, but the manifests "
                            f"are validated against {KUBERNETES_VERSION}'s minor")
    return image


def kind_recipe(version: str) -> dict:
    # kind's Makefile builds with -trimpath and -s -w too; its version is a constant in the source
    # (pkg/cmd/kind/version), so only the commit stamp, which the proxy cannot give, is left out.
    return {"module": KIND_MODULE, "version": version, "commands": ["kind"], "build_flags": list(BUILD_FLAGS),
            "ldflags": " ".join(LDFLAGS), "env": BUILD_ENV}


def kind_install_args(version: str) -> list[str]:
    """The `go` arguments that build kind `version` (run with GOBIN set to a staging folder)."""
    return ["install", *BUILD_FLAGS, f"-ldflags={' '.join(LDFLAGS)}", f"{KIND_MODULE}@{version}"]


def kind_path(version: str | None = None) -> Path:
    """Where kind `version` (default: KIND_VERSION in .env) lives once built (it may not exist yet)."""
    version = version or kind_version()
    return CACHE_ROOT / "kind" / recipe_key(version, kind_recipe(version)) / "kind"


def tools_paths() -> K8sTools:
    """Where every part lives once built (they may not exist yet)."""
    kubernetes = CACHE_ROOT / "kubernetes" / recipe_key(KUBERNETES_VERSION, kubernetes_recipe())
    operator = CACHE_ROOT / "otel-operator" / recipe_key(OTEL_OPERATOR_VERSION, operator_recipe())
    schemas = CACHE_ROOT / "k8s-schemas"
    return K8sTools(
        kube_apiserver=kubernetes / "kube-apiserver",
        kubectl=kubernetes / "kubectl",
        etcd=CACHE_ROOT / "etcd" / recipe_key(ETCD_VERSION, etcd_recipe()) / "etcd",
        kubeconform=CACHE_ROOT / "kubeconform" / recipe_key(KUBECONFORM_VERSION, kubeconform_recipe()) / "kubeconform",
        operator=operator / "manager",
        operator_crds=operator / "crd",
        operator_webhooks=operator / "webhook" / "manifests.yaml",
        kubernetes_schemas=schemas / f"kubernetes-{recipe_key(SCHEMA_KUBERNETES_VERSION, kubernetes_schemas_recipe())}",
        crd_schemas=schemas / f"otel-operator-{recipe_key(OTEL_OPERATOR_VERSION, crd_schemas_recipe())}",
    )


# ------------------------------------------------------------------------------------------ Go steps


class _Go:
    """Go commands of one build, logged to the work directory's build.log."""

    def __init__(self, what: str, workdir: Path):
        self.go = go_executable(K8sBuildError, f"for {what}")
        self.what = f"{what} with {self.go}"
        self.log = workdir / "build.log"
        self.env = {**os.environ, **BUILD_ENV}

    def run(self, *args: str, cwd: Path, env: dict | None = None) -> None:
        run_logged([self.go, *args], self.log, K8sBuildError, self.what, env=env or self.env, cwd=cwd)

    def json(self, *args: str, cwd: Path) -> dict:
        """A `go … -json` step; its stderr goes to the log, its error (also reported in the JSON) is raised."""
        cmd = [self.go, *args]
        with self.log.open("ab") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, cwd=cwd, env=self.env)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            data = {}
        if result.returncode != 0 or data.get("Error"):
            detail = data.get("Error") or self.log.read_text(errors="replace")[-3000:]
            raise K8sBuildError(f"{self.what}: `{' '.join(cmd)}` failed (exit {result.returncode}); "
                                f"log: {self.log}\n{detail}")
        return data

    def download(self, module: str, version: str, cwd: Path) -> dict:
        """The module's zip, unpacked in Go's module cache: its Dir and GoMod paths."""
        return self.json("mod", "download", "-json", f"{module}@{version}", cwd=cwd)


def wrapper_edits(upstream: dict, sibling_version: Callable[[str], str]) -> list[str]:
    """`go mod edit` flags giving a wrapper module the directives of `upstream` (a go.mod as printed by
    `go mod edit -json`) that only a main module honours. A replace that points at a folder of the
    module's repository (a sibling module, not in the zip) becomes that module at `sibling_version(path)`;
    a replace of a module that the go.mod does not require (etcd's FORBIDDEN_DEPENDENCY guards) is left
    out, since nothing in the build uses it."""
    required = {r["Path"] for r in upstream.get("Require") or []}
    flags = [f"-go={upstream['Go']}"]
    flags += [f"-exclude={e['Path']}@{e['Version']}" for e in upstream.get("Exclude") or []]
    for replace in upstream.get("Replace") or []:
        old, new = replace["Old"], replace["New"]
        if old["Path"] not in required:
            continue
        old_spec = old["Path"] + (f"@{old['Version']}" if old.get("Version") else "")
        if new.get("Version"):
            new_spec = f"{new['Path']}@{new['Version']}"
        elif new["Path"].startswith(("./", "../")):
            new_spec = f"{old['Path']}@{sibling_version(old['Path'])}"
        else:
            raise K8sBuildError(f"replace {old['Path']} => {new['Path']}: an absolute folder cannot be repeated")
        flags.append(f"-replace={old_spec}={new_spec}")
    flags += [f"-godebug={g['Key']}={g['Value']}" for g in upstream.get("Godebug") or []]
    return flags


def unpinned_dependencies(upstream: dict, wrapper: dict) -> list[str]:
    """Requirements of `upstream` that the wrapper resolved to another version (replaced ones aside)."""
    replaced = {r["Old"]["Path"] for r in upstream.get("Replace") or []}
    chosen = {r["Path"]: r["Version"] for r in wrapper.get("Require") or []}
    return [f"{r['Path']} {r['Version']} -> {chosen[r['Path']]}" for r in upstream.get("Require") or []
            if r["Path"] not in replaced and r["Path"] in chosen and chosen[r["Path"]] != r["Version"]]


def _wrapper_build(go: _Go, workdir: Path, module: str, version: str, packages: dict[str, str], ldflags: str,
                   sibling_version: Callable[[str], str], download: dict) -> dict[str, Path]:
    """Build `packages` ({binary name: package}) of `module@version` in a wrapper module; return the binaries."""
    upstream = go.json("mod", "edit", "-json", download["GoMod"], cwd=workdir)
    src = workdir / "wrapper"
    src.mkdir()
    go.run("mod", "init", f"zerocode.local/{Path(module).name}-build", cwd=src)
    go.run("mod", "edit", f"-require={module}@{version}", *wrapper_edits(upstream, sibling_version), cwd=src)
    go.run("get", *(f"{package}@{version}" for package in packages.values()), cwd=src)
    drift = unpinned_dependencies(upstream, go.json("mod", "edit", "-json", cwd=src))
    if drift:
        raise K8sBuildError(f"{go.what}: the wrapper module resolved dependencies differently from {module}'s "
                            f"go.mod: {drift[:10]}; log: {go.log}")
    out = workdir / "bin"
    out.mkdir()
    built = {}
    for name, package in packages.items():
        go.run("build", *BUILD_FLAGS, f"-ldflags={ldflags}", "-o", str(out / name), package, cwd=src)
        if not (out / name).exists():
            raise K8sBuildError(f"{go.what}: go build reported success but {out / name} is missing; log: {go.log}")
        built[name] = out / name
    return built


def _finish(out: Path, targets: list[Path], go: _Go, workdir: Path) -> None:
    """Publish the binaries built into `out` (each named as its target) and drop the work directory."""
    publish_all(out, targets, K8sBuildError, f"{go.what} (log: {go.log})")
    shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ builds


def build_kubernetes() -> tuple[Path, Path]:
    """kube-apiserver and kubectl of KUBERNETES_VERSION, in one wrapper module (about 5 min cold)."""
    paths = tools_paths()
    workdir = work_dir(paths.kubectl.parent.parent, paths.kubectl.parent.name)
    go = _Go(f"building kube-apiserver and kubectl {KUBERNETES_VERSION} ({KUBERNETES_MODULE})", workdir)
    download = go.download(KUBERNETES_MODULE, KUBERNETES_VERSION, workdir)
    staging = kubernetes_staging_version()
    _wrapper_build(go, workdir, KUBERNETES_MODULE, KUBERNETES_VERSION,
                   {name: f"{KUBERNETES_MODULE}/cmd/{name}" for name in ("kube-apiserver", "kubectl")},
                   kubernetes_ldflags(), lambda _path: staging, download)
    _finish(workdir / "bin", [paths.kube_apiserver, paths.kubectl], go, workdir)
    return paths.kube_apiserver, paths.kubectl


def build_etcd() -> Path:
    """etcd ETCD_VERSION; its sibling modules (api, client, pkg) are released with the same version."""
    paths = tools_paths()
    workdir = work_dir(paths.etcd.parent.parent, paths.etcd.parent.name)
    go = _Go(f"building etcd {ETCD_VERSION} ({ETCD_MODULE})", workdir)
    download = go.download(ETCD_MODULE, ETCD_VERSION, workdir)
    _wrapper_build(go, workdir, ETCD_MODULE, ETCD_VERSION, {"etcd": ETCD_MODULE}, etcd_ldflags(),
                   lambda _path: ETCD_VERSION, download)
    _finish(workdir / "bin", [paths.etcd], go, workdir)
    return paths.etcd


def build_kubeconform() -> Path:
    """kubeconform: its go.mod has no replaces, so a plain `go install`."""
    paths = tools_paths()
    workdir = work_dir(paths.kubeconform.parent.parent, paths.kubeconform.parent.name)
    go = _Go(f"building kubeconform {KUBECONFORM_VERSION} ({KUBECONFORM_MODULE})", workdir)
    out = workdir / "bin"
    out.mkdir()
    go.run("install", *BUILD_FLAGS, f"-ldflags={kubeconform_ldflags()}",
           f"{KUBECONFORM_MODULE}/cmd/kubeconform@{KUBECONFORM_VERSION}", cwd=workdir,
           env={**go.env, "GOBIN": str(out)})
    _finish(out, [paths.kubeconform], go, workdir)
    return paths.kubeconform


def build_kind(version: str | None = None) -> Path:
    """kind: no replaces in its go.mod, so a plain `go install` (about a minute cold). Published only once
    `kind version` names the release asked for."""
    version = version or kind_version()
    target = kind_path(version)
    workdir = work_dir(target.parent.parent, target.parent.name)
    go = _Go(f"building kind {version} ({KIND_MODULE})", workdir)
    out = workdir / "bin"
    out.mkdir()
    go.run(*kind_install_args(version), cwd=workdir, env={**go.env, "GOBIN": str(out)})
    result = subprocess.run([str(out / "kind"), "version"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not result.stdout.startswith(f"kind {version} "):
        raise K8sBuildError(f"{go.what}: `kind version` printed {result.stdout + result.stderr!r}; log: {go.log}")
    _finish(out, [target], go, workdir)
    return target


def build_operator() -> Path:
    """The Operator's manager binary (wrapper module: no replaces, but `go install` fails on the proxy's
    version list), with its CRDs and webhook manifests copied beside it from the same module zip."""
    paths = tools_paths()
    target_dir = paths.operator.parent
    workdir = work_dir(target_dir.parent, target_dir.name)
    go = _Go(f"building the OpenTelemetry Operator {OTEL_OPERATOR_VERSION} ({OPERATOR_MODULE})", workdir)
    download = go.download(OPERATOR_MODULE, OTEL_OPERATOR_VERSION, workdir)
    module_dir = Path(download["Dir"])
    ldflags = operator_ldflags(OTEL_OPERATOR_VERSION, (module_dir / "versions.txt").read_text())
    built = _wrapper_build(go, workdir, OPERATOR_MODULE, OTEL_OPERATOR_VERSION, {"manager": OPERATOR_MODULE}, ldflags,
                           lambda path: OTEL_OPERATOR_VERSION, download)
    # The whole folder is published at once, so that a binary in the cache always has its CRDs beside it.
    staged = workdir / "publish"
    (staged / "crd").mkdir(parents=True)
    (staged / "webhook").mkdir()
    for crd in sorted((module_dir / "config" / "crd" / "bases").glob("*.yaml")):
        shutil.copyfile(crd, staged / "crd" / crd.name)
    shutil.copyfile(module_dir / "config" / "webhook" / "manifests.yaml", staged / "webhook" / "manifests.yaml")
    os.replace(built["manager"], staged / "manager")
    _publish_dir(staged, target_dir)
    shutil.rmtree(workdir, ignore_errors=True)
    return paths.operator


def _publish_dir(staged: Path, target: Path) -> None:
    """Move a finished folder into the cache (replacing an older copy)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)


def make_local(schema: dict) -> dict:
    """A kubernetes-validate schema, made loadable from a folder: no `$id` (as shipped it names a web
    address, which would become the base of every `$ref`), and `$ref`s to `/api/_definitions.json` made
    relative, so they resolve to the `_definitions.json` beside the file."""
    def walk(node):
        if isinstance(node, dict):
            return {key: (value.replace("/api/_definitions.json", "_definitions.json", 1)
                          if key == "$ref" and isinstance(value, str) else walk(value))
                    for key, value in node.items() if key != "$id"}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node
    return walk(schema)


def build_kubernetes_schemas() -> Path:
    """The strict JSON schemas of the Kubernetes API, from the kubernetes-validate wheel (PyPI), made local."""
    target = tools_paths().kubernetes_schemas
    workdir = work_dir(target.parent, target.name)
    log = workdir / "build.log"
    what = f"fetching kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI) for the Kubernetes schemas"
    run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                "--only-binary=:all:", "-d", str(workdir), f"kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"],
               log, K8sBuildError, what, cwd=workdir)
    (wheel,) = workdir.glob("kubernetes_validate-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != KUBERNETES_VALIDATE_SHA256:
        raise K8sBuildError(f"{what}: {wheel.name} has sha256 {digest}, expected {KUBERNETES_VALIDATE_SHA256}")
    folder = f"kubernetes_validate/kubernetes-json-schema/v{SCHEMA_KUBERNETES_VERSION}-local-strict/"
    staged = workdir / "schemas"
    staged.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(folder) and name.endswith(".json")]
        if not members:
            raise K8sBuildError(f"{what}: {wheel.name} has no {folder}")
        for name in members:
            schema = make_local(json.loads(archive.read(name)))
            (staged / name.removeprefix(folder)).write_text(json.dumps(schema))
    _publish_dir(staged, target)
    shutil.rmtree(workdir, ignore_errors=True)
    return target


def build_crd_schemas() -> Path:
    """The Operator's CRDs as strict JSON schemas, converted by kubeconform's own script."""
    paths = tools_paths()
    target = paths.crd_schemas
    workdir = work_dir(target.parent, target.name)
    go = _Go(f"converting the Operator {OTEL_OPERATOR_VERSION} CRDs with kubeconform {KUBECONFORM_VERSION}'s "
             "openapi2jsonschema.py", workdir)
    converter = Path(go.download(KUBECONFORM_MODULE, KUBECONFORM_VERSION, workdir)["Dir"]) / "scripts" / \
        "openapi2jsonschema.py"
    crds = sorted(paths.operator_crds.glob("*.yaml"))
    if not crds:
        raise K8sBuildError(f"{go.what}: no CRDs in {paths.operator_crds} (build the Operator first)")
    staged = workdir / "schemas"
    staged.mkdir()
    env = {**os.environ, "FILENAME_FORMAT": CRD_FILENAME_FORMAT, "DENY_ROOT_ADDITIONAL_PROPERTIES": "1"}
    run_logged([sys.executable, str(converter), *map(str, crds)], go.log, K8sBuildError, go.what, cwd=staged, env=env)
    if not list(staged.glob("*.json")):
        raise K8sBuildError(f"{go.what}: the converter wrote no schema; log: {go.log}")
    _publish_dir(staged, target)
    shutil.rmtree(workdir, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ entry points


def _missing(paths: K8sTools) -> dict[str, Callable[[], object]]:
    """The builds whose output is absent, in the order they must run (CRD schemas after the Operator)."""
    steps = {
        "kube-apiserver + kubectl": (build_kubernetes, [paths.kube_apiserver, paths.kubectl]),
        "etcd": (build_etcd, [paths.etcd]),
        "kubeconform": (build_kubeconform, [paths.kubeconform]),
        "operator": (build_operator, [paths.operator, paths.operator_webhooks]),
        "kubernetes schemas": (build_kubernetes_schemas, [paths.kubernetes_schemas / "_definitions.json"]),
        "operator CRD schemas": (build_crd_schemas, [paths.crd_schemas]),
    }
    return {name: step for name, (step, outputs) in steps.items() if not all(p.exists() for p in outputs)}


def k8s_tools(log: Callable[[str], None] | None = None) -> K8sTools:
    """Every part, built first where missing (minutes cold, nothing when cached)."""
    paths = tools_paths()
    for name, step in _missing(paths).items():
        _timed(name, step, log)
    return paths


def _timed(name: str, step: Callable[[], object], log: Callable[[str], None] | None) -> None:
    started = time.monotonic()
    if log:
        log(f"building {name}...")
    step()
    if log:
        log(f"built {name} in {time.monotonic() - started:.0f} s")


def kind_binary(log: Callable[[str], None] | None = None) -> Path:
    """kind of KIND_VERSION in .env, built first if missing (about a minute cold, nothing when cached). Not
    one of `k8s_tools()`: only the tier that runs a kind cluster needs it."""
    target = kind_path()
    if not target.exists():
        _timed(f"kind {kind_version()}", build_kind, log)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.k8s_build", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", action="store_true",
                        help="build (if missing) and print only kind of KIND_VERSION in .env, not the default set")
    args = parser.parse_args(argv)
    started = time.monotonic()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.kind:
            print(f"kind: {kind_binary(log=log)}")
        else:
            tools = k8s_tools(log=log)
            for field in dataclasses.fields(tools):
                print(f"{field.name}: {getattr(tools, field.name)}")
    except K8sBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
