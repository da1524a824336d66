"""The table of builds: one row per tool, each built from official sources by a style of spine.py.

A row names what is built (module, packages, ldflags), where its version comes from (.env, where compose
and k8s/ take the same release as an image tag, or a pin here), the recipe that is hashed into its cache
folder, ``.cache/<cache>/<version>-<12 hex digits of the recipe>/`` (a change of any of it gets a fresh
build in a new folder; the hashed dicts must never change shape for an unchanged build, or every cached
binary is rebuilt, 30 minutes for the Kubernetes row), and its build style:

- **go install**: `go install package@version` where the module's go.mod allows it (Alertmanager, Sloth,
  kubeconform, kind, Caddy, node_exporter, vegeta);
- **wrapper module**: modules whose go.mod has `replace`/`exclude` lines, which Go honours only in the main
  module, so `go install module@version` refuses them (Prometheus; Kubernetes and etcd, whose replaces point
  at sibling folders of their repositories that the module zips lack; the Operator, whose `go install`
  fails on the proxy's version list). A throw-away module requires the module and repeats those lines
  (a sibling folder becomes the sibling module of the same release), and every other dependency must
  resolve to the version the module was released with;
- **ocb**: the collector, by the OpenTelemetry Collector Builder from otel-collector/builder-config.yaml,
  keyed by the manifest's content;
- **local module**: tests/compose/compose_config (Docker Compose's own loader), keyed by its sources, and
  cadvisor/native (our main around cAdvisor's packages: its `cmd` module is not served), keyed by its
  sources and CADVISOR_VERSION;
- the two folders of JSON schemas kubeconform validates k8s/ against (a PyPI wheel, and the Operator's
  CRDs converted by kubeconform's own script).

Measured on 2 cores, Go's caches cold: Kubernetes about 25 minutes, Prometheus 8, the Operator 6, the
collector several, the others a minute or two; with warm Go caches mostly linking; nothing when cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import yaml

from tooling.builds.spine import (
    BUILD_ENV,
    BUILD_FLAGS,
    LDFLAGS,
    BuildError,
    Go,
    go_install,
    local_module,
    recipe_key,
    run_logged,
    wrapper_module,
)
from tooling.config import COLLECTOR_MANIFEST, DOTENV, REPO_ROOT, load_env_file

CACHE = REPO_ROOT / ".cache"
RELEASE_TAG = re.compile(r"v\d+\.\d+\.\d+")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row: what `binaries(name)` builds and where it lands."""

    name: str  # what callers and `python -m tooling.builds <name>` call it
    about: str  # what it builds, for messages
    cache: str  # its folder under .cache/
    outputs: tuple[str, ...]  # what its cache folder holds once built ("" is the folder itself)
    version: Callable[[], str]  # the version built when none is asked for
    build: Callable[[Recipe, str, Path], Path]  # (row, version, work dir) -> a staged folder of the outputs
    key: Callable[[str], str]  # the cache folder name of a version
    prefix: str = ""  # before the key in the folder name (two rows share .cache/k8s-schemas/)
    whole_folder: bool = False  # published as one folder (binaries with files that must arrive with them)
    check: Callable[[Path, str], str | None] | None = None  # a staged build's problem, checked before publishing
    needs: tuple[str, ...] = ()  # rows whose outputs its build reads
    make_test: bool = True  # built by `make test` (kind only for the docker tier)

    def folder(self, version: str) -> Path:
        return CACHE / self.cache / f"{self.prefix}{self.key(version)}"

    def paths(self, version: str | None = None) -> tuple[Path, ...]:
        folder = self.folder(version or self.version())
        return tuple(folder / output for output in self.outputs)


def hashed(recipe: Callable[[str], dict]) -> Callable[[str], str]:
    """The usual key: the version and a hash of the recipe dict made for it."""
    return lambda version: recipe_key(version, recipe(version))


def dotenv_version(key: str, pattern: re.Pattern = RELEASE_TAG, env_file: Path = DOTENV) -> str:
    """A release that .env states, like v1.2.3 (the image tag compose and k8s/ run)."""
    value = load_env_file(env_file).get(key)
    if not value:
        raise BuildError(f"{env_file} sets no {key}")
    if not pattern.fullmatch(value):
        raise BuildError(f"{key}={value} in {env_file}: expected a release tag like v1.2.3")
    return value


def version_stamp(package: str, stamp: dict[str, str]) -> str:
    """-s -w and `-X package.Key=value` for every entry: what the official builds stamp (and `--version`
    prints); the proxy serves no commit hash, so a revision names the module version instead."""
    return " ".join([*LDFLAGS, *(f"-X {package}.{key}={value}" for key, value in stamp.items())])


def install(packages: Callable[[str], list[str]], ldflags: Callable[[str], str] | None,
            flags: tuple[str, ...] = BUILD_FLAGS) -> Callable[[Recipe, str, Path], Path]:
    """The go-install style: `packages(version)` are `package@version` arguments."""
    def build(row: Recipe, version: str, workdir: Path) -> Path:
        go = Go(f"building {row.about} {version}", workdir)
        stamp = [f"-ldflags={ldflags(version)}"] if ldflags else []
        return go_install(go, packages(version), [*flags, *stamp])
    return build


# ------------------------------------------------------------------------------------------ the collector

BUILDER_MODULE = "go.opentelemetry.io/collector/cmd/builder"


def collector_key(manifest: str | Path) -> str:
    """`<dist.version>-<hash of the manifest file>`: any edit of the manifest builds into a new folder (the
    binary of the previous manifest stays, for whoever still runs it)."""
    manifest = Path(manifest)
    version = yaml.safe_load(manifest.read_text())["dist"]["version"]
    return f"{version}-{hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]}"


def build_collector(row: Recipe, manifest: str | Path, workdir: Path) -> Path:
    manifest = Path(manifest)
    spec = yaml.safe_load(manifest.read_text())
    go = Go(f"building the collector from {manifest.name} with the OpenTelemetry Collector Builder", workdir)
    # The builder is released together with the collector core, so its version is the manifest's.
    bindir = CACHE / row.cache / "builder" / f"v{spec['dist']['version']}"
    builder = bindir / "builder"
    if not builder.exists():
        go.run("install", f"{BUILDER_MODULE}@v{spec['dist']['version']}", cwd=workdir,
               env={**go.env, "GOBIN": str(bindir)})
    # A copy of the manifest that writes into the private work directory.
    spec["dist"]["output_path"] = str(workdir / "build")
    build_manifest = workdir / "builder-config.yaml"
    build_manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_logged([str(builder), "--config", str(build_manifest)], go.log, BuildError, go.what, env=go.env, cwd=workdir)
    return workdir / "build"


# ------------------------------------------------------------------------------------------ Prometheus

PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
# Stamped with what `prometheus --version`, `alertmanager --version` and their build info APIs report.
PROMETHEUS_VERSION_PACKAGE = "github.com/prometheus/common/version"


def prometheus_version(env_file: Path = DOTENV) -> str:
    """PROMETHEUS_VERSION from .env, the compose image tag, like `v3.9.1`."""
    return dotenv_version("PROMETHEUS_VERSION", re.compile(r".+"), env_file)


def prometheus_module_version(version: str) -> str:
    """Go module version of a Prometheus release: 3.9.1 -> v0.309.1 (3.x is v0.3XX.Y; 2.x differed)."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?", version)
    if not match or int(match[1]) < 3 or int(match[2]) > 99:
        raise BuildError(f"PROMETHEUS_VERSION={version}: no Go module version known for it ({PROMETHEUS_MODULE} "
                         "v0.3XX.Y is Prometheus 3.XX.Y; 2.x is not built here)")
    major, minor, patch, pre = int(match[1]), int(match[2]), match[3], match[4] or ""
    return f"v0.{major * 100 + minor}.{patch}{pre}"


def prometheus_ldflags(version: str) -> str:
    return version_stamp(PROMETHEUS_VERSION_PACKAGE, {"Version": version.removeprefix("v"),
                                                      "Revision": prometheus_module_version(version),
                                                      "BuildUser": "zerocode"})


def prometheus_recipe(version: str) -> dict:
    # No build tags: the official `builtinassets` tag embeds the web UI, whose files npm generates and the Go
    # module lacks; without it the UI pages answer 500, while /-/ready and /api/v1/* work as usual, which is
    # all the tests and Grafana use. `netgo` (also official) changes nothing with CGO_ENABLED=0.
    return {"module": PROMETHEUS_MODULE, "module_version": prometheus_module_version(version),
            "commands": ["prometheus", "promtool"], "build_flags": list(BUILD_FLAGS),
            "ldflags": prometheus_ldflags(version), "env": BUILD_ENV}


def build_prometheus(row: Recipe, version: str, workdir: Path) -> Path:
    modver = prometheus_module_version(version)
    go = Go(f"building Prometheus {version} ({PROMETHEUS_MODULE}@{modver})", workdir)
    download = go.download(PROMETHEUS_MODULE, modver)
    # Its replaces, if any pointed at a folder, would be folders inside its own module zip.
    inside = lambda _old, folder: str((Path(download["Dir"]) / folder).resolve())  # noqa: E731
    return wrapper_module(go, PROMETHEUS_MODULE, modver, {name: f"{PROMETHEUS_MODULE}/cmd/{name}" for name in
                                                          ("prometheus", "promtool")},
                          prometheus_ldflags(version), inside, download)


# ------------------------------------------------------------------------------------------ Alertmanager

ALERTMANAGER_MODULE = "github.com/prometheus/alertmanager"
# The last release whose Go module contains its web UI, and so the newest that `go install` builds: from
# v0.32 the UI's files are generated by npm and not part of the module (`pattern app/dist: no matching files`).
ALERTMANAGER_NEWEST_BUILDABLE = (0, 31)


def alertmanager_version(env_file: Path = DOTENV) -> str:
    """ALERTMANAGER_VERSION from .env, the compose image tag, like `v0.31.0` (also the Go module version)."""
    version = dotenv_version("ALERTMANAGER_VERSION", re.compile(r".+"), env_file)
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", version)
    if not match:
        raise BuildError(f"ALERTMANAGER_VERSION={version}: expected a release tag like v0.31.0")
    if (int(match[1]), int(match[2])) > ALERTMANAGER_NEWEST_BUILDABLE:
        raise BuildError(f"ALERTMANAGER_VERSION={version}: from v0.32 on, {ALERTMANAGER_MODULE}'s Go module lacks "
                         "the web UI files its code embeds, so it cannot be built with Go alone (README, 'Versions')")
    return version


def alertmanager_ldflags(version: str) -> str:
    return version_stamp(PROMETHEUS_VERSION_PACKAGE, {"Version": version.removeprefix("v"), "Revision": version,
                                                      "BuildUser": "zerocode"})


def alertmanager_recipe(version: str) -> dict:
    return {"module": ALERTMANAGER_MODULE, "module_version": version, "commands": ["alertmanager", "amtool"],
            "build_flags": list(BUILD_FLAGS), "ldflags": alertmanager_ldflags(version), "env": BUILD_ENV}


# ------------------------------------------------------------------------------------------ Sloth

SLOTH_MODULE = "github.com/slok/sloth"
SLOTH_PACKAGE = f"{SLOTH_MODULE}/cmd/sloth"
SLOTH_VERSION = "v0.16.0"


def sloth_ldflags(version: str) -> str:
    # As Sloth's scripts/build/bin/build-raw.sh (without it `sloth version` says "dev" or the module version).
    return " ".join([*LDFLAGS, f"-X {SLOTH_MODULE}/internal/info.Version={version}"])


def sloth_recipe(version: str) -> dict:
    return {"package": SLOTH_PACKAGE, "version": version, "build_flags": list(BUILD_FLAGS),
            "ldflags": sloth_ldflags(version), "env": BUILD_ENV}


# ------------------------------------------------------------------------------------------ Caddy

CADDY_MODULE = "github.com/caddyserver/caddy/v2"
CADDY_PACKAGE = f"{CADDY_MODULE}/cmd/caddy"


def caddy_version(env_file: Path = DOTENV) -> str:
    """v + CADDY_VERSION from .env: the edge proxy's image tag is the release without its v."""
    return "v" + dotenv_version("CADDY_VERSION", re.compile(r"\d+\.\d+\.\d+"), env_file)


def caddy_ldflags(version: str) -> str:
    # Without CustomVersion a `go install`ed caddy says "unknown" for its version (the module's build info
    # is not read for it).
    return " ".join([*LDFLAGS, f"-X {CADDY_MODULE}.CustomVersion={version}"])


def caddy_recipe(version: str) -> dict:
    return {"module": CADDY_MODULE, "version": version, "packages": [CADDY_PACKAGE], "build_flags": list(BUILD_FLAGS),
            "ldflags": caddy_ldflags(version), "env": BUILD_ENV}


def version_printed(command: str, expected: Callable[[str], str]) -> Callable[[Path, str], str | None]:
    """A check that `<binary> version`, run from the staged build, prints what `expected(version)` says."""
    def check(staged: Path, version: str) -> str | None:
        result = subprocess.run([str(staged / command), "version"], capture_output=True, text=True, timeout=60)
        printed = result.stdout + result.stderr
        return None if result.returncode == 0 and printed.startswith(expected(version)) else \
            f"`{command} version` printed {printed!r}, expected {expected(version)!r}"
    return check


# ------------------------------------------------------------------------------------------ the exporters

NODE_EXPORTER_MODULE = "github.com/prometheus/node_exporter"
CADVISOR_MODULE = "github.com/google/cadvisor"
# Our own main around cAdvisor's manager and metrics packages (its official cmd module is not served by the
# Go proxy): a local module whose go.mod requires cAdvisor at CADVISOR_VERSION.
CADVISOR_SRC = REPO_ROOT / "cadvisor" / "native"


def node_exporter_version(env_file: Path = DOTENV) -> str:
    """NODE_EXPORTER_VERSION from .env (the image tag prom/node-exporter:vX.Y.Z is the module version)."""
    return dotenv_version("NODE_EXPORTER_VERSION", env_file=env_file)


def node_exporter_ldflags(version: str) -> str:
    # The same stamp as Prometheus's: without it `node_exporter --version` and node_exporter_build_info are empty.
    return version_stamp(PROMETHEUS_VERSION_PACKAGE, {"Version": version.removeprefix("v"), "Revision": version,
                                                      "BuildUser": "zerocode"})


def node_exporter_recipe(version: str) -> dict:
    return {"package": NODE_EXPORTER_MODULE, "version": version, "build_flags": list(BUILD_FLAGS),
            "ldflags": node_exporter_ldflags(version), "env": BUILD_ENV}


def cadvisor_version(env_file: Path = DOTENV) -> str:
    """CADVISOR_VERSION from .env: the image tag gcr.io/cadvisor/cadvisor:vX.Y.Z, and the cAdvisor module
    version that cadvisor/native/go.mod must require (checked before building)."""
    return dotenv_version("CADVISOR_VERSION", env_file=env_file)


def cadvisor_required(src: Path = CADVISOR_SRC) -> str | None:
    """The cAdvisor version cadvisor/native/go.mod requires."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(CADVISOR_MODULE)}\s+(v\S+)", (src / "go.mod").read_text(),
                      re.MULTILINE)
    return match[1] if match else None


def cadvisor_ldflags(version: str) -> str:
    return version_stamp(f"{CADVISOR_MODULE}/version", {"Version": version, "Revision": version,
                                                        "BuildUser": "zerocode"})


def cadvisor_recipe(version: str, src: Path = CADVISOR_SRC) -> dict:
    # Keyed on the wrapper's sources too: an edit of main.go or go.mod builds into a new folder.
    return {"module": CADVISOR_MODULE, "version": version, "wrapper": sources_key(src),
            "build_flags": ["-mod=readonly", *BUILD_FLAGS, "-buildvcs=false"], "ldflags": cadvisor_ldflags(version),
            "env": BUILD_ENV}


def build_cadvisor(row: Recipe, version: str, workdir: Path) -> Path:
    required = cadvisor_required()
    if required != version:
        raise BuildError(f"CADVISOR_VERSION={version} in .env, but {CADVISOR_SRC / 'go.mod'} requires "
                         f"{CADVISOR_MODULE} {required}: make them equal (`go get {CADVISOR_MODULE}@{version} && "
                         "go mod tidy` in that folder), so that the native tier runs the compose image's release")
    go = Go(f"building cAdvisor {version} (our main in cadvisor/native around {CADVISOR_MODULE})", workdir)
    out = workdir / "bin"
    out.mkdir()
    # -mod=readonly: the committed go.mod/go.sum are the whole truth, a build never edits them.
    go.run("build", *cadvisor_recipe(version)["build_flags"], f"-ldflags={cadvisor_ldflags(version)}",
           "-o", str(out / "cadvisor"), ".", cwd=CADVISOR_SRC)
    return out


def flag_version_printed(command: str, expected: Callable[[str], str]) -> Callable[[Path, str], str | None]:
    """A check that `<binary> --version`, run from the staged build, prints `expected(version)` somewhere."""
    def check(staged: Path, version: str) -> str | None:
        result = subprocess.run([str(staged / command), "--version"], capture_output=True, text=True, timeout=60)
        printed = result.stdout + result.stderr
        return None if result.returncode == 0 and expected(version) in printed else \
            f"`{command} --version` printed {printed!r}, expected {expected(version)!r} in it"
    return check


# ------------------------------------------------------------------------------------------ Kubernetes

# The versions validated against (README, Kubernetes). Kubernetes 1.34 is what the manifests target.
KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
KUBECONFORM_VERSION = "v0.8.0"
# kubernetes-validate (PyPI) ships JSON schemas of every Kubernetes minor from 1.25 to its own version, each
# as of its x.y.0 release; 1.34.0's are the schemas of the 1.34 API. The wheel is checked against its hash.
KUBERNETES_VALIDATE_VERSION = "1.37.0"
KUBERNETES_VALIDATE_SHA256 = "85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9"
SCHEMA_KUBERNETES_VERSION = ".".join(KUBERNETES_VERSION.removeprefix("v").split(".")[:2]) + ".0"

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"  # the module whose main.go is the `etcd` command
KUBECONFORM_MODULE = "github.com/yannh/kubeconform"
OPERATOR_MODULE = "github.com/open-telemetry/opentelemetry-operator"
KIND_MODULE = "sigs.k8s.io/kind"
# kubeconform's schema-location template for both schema folders: kind plus "-<group's first part>-<version>",
# the layout of kubernetes-json-schema (deployment-apps-v1.json, instrumentation-opentelemetry-v1alpha1.json).
SCHEMA_TEMPLATE = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
CRD_FILENAME_FORMAT = "{kind}-{group}-{version}"


def operator_version() -> str:
    """OTEL_OPERATOR_VERSION from .env: the Operator users install (README, Kubernetes) is the one tested."""
    return dotenv_version("OTEL_OPERATOR_VERSION")


def kubernetes_ldflags(version: str = KUBERNETES_VERSION) -> str:
    """The version stamp of Kubernetes' hack/lib/version.sh, in both packages it sets. Without it the
    binaries report v0.0.0-master, and kubectl cannot parse the server's version."""
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    if not match:
        raise BuildError(f"Kubernetes version {version}: expected a release tag like v1.34.4")
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
        raise BuildError(f"the Operator {version}'s versions.txt lacks {missing}")
    stamp = {"version": version.removeprefix("v"), "buildDate": "1970-01-01T00:00:00Z",
             **{variable: defaults[key] for variable, key in from_versions_txt.items()}}
    return version_stamp(f"{OPERATOR_MODULE}/internal/version", stamp)


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


def operator_recipe(version: str) -> dict:
    # The ldflags depend on versions.txt inside the module, which a module version never changes.
    return {"module": OPERATOR_MODULE, "version": version, "commands": ["manager"], "build_flags": list(BUILD_FLAGS),
            "ldflags": "Makefile OPERATOR_LDFLAGS from versions.txt", "ld": list(LDFLAGS), "env": BUILD_ENV,
            "copied": ["config/crd/bases/*.yaml", "config/webhook/manifests.yaml"]}


def kubernetes_schemas_recipe(_version: str = SCHEMA_KUBERNETES_VERSION) -> dict:
    return {"package": "kubernetes-validate", "version": KUBERNETES_VALIDATE_VERSION,
            "sha256": KUBERNETES_VALIDATE_SHA256, "folder": f"v{SCHEMA_KUBERNETES_VERSION}-local-strict",
            "made_local": "no $id; $ref to _definitions.json beside"}


def crd_schemas_recipe(version: str) -> dict:
    return {"crds": f"{OPERATOR_MODULE}@{version} config/crd/bases",
            "converter": f"{KUBECONFORM_MODULE}@{KUBECONFORM_VERSION} scripts/openapi2jsonschema.py",
            "FILENAME_FORMAT": CRD_FILENAME_FORMAT, "DENY_ROOT_ADDITIONAL_PROPERTIES": "1"}


def kind_version(env_file: Path = DOTENV) -> str:
    """KIND_VERSION from .env: the kind release the docker tier's Kubernetes test creates its cluster with."""
    return dotenv_version("KIND_VERSION", env_file=env_file)


def kind_node_image(env_file: Path = DOTENV) -> str:
    """KIND_NODE_IMAGE from .env: `kindest/node:<Kubernetes release>@sha256:<digest>`, the image built for the
    kind release of KIND_VERSION (its release notes list them; kind requires the digest), at the Kubernetes
    minor the manifests target (KUBERNETES_VERSION)."""
    image = load_env_file(env_file).get("KIND_NODE_IMAGE")
    if not image:
        raise BuildError(f"{env_file} sets no KIND_NODE_IMAGE")
    match = re.fullmatch(r"kindest/node:(v(\d+)\.(\d+)\.\d+)@sha256:[0-9a-f]{64}", image)
    if not match:
        raise BuildError(f"KIND_NODE_IMAGE={image} in {env_file}: expected kindest/node:vX.Y.Z@sha256:<digest> "
                         "(kind needs the digest of the image built for its release)")
    target = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", KUBERNETES_VERSION)
    if (match[2], match[3]) != (target[1], target[2]):
        raise BuildError(f"KIND_NODE_IMAGE={image} in {env_file}: Kubernetes {match[1]}, but the manifests "
                         f"are validated against {KUBERNETES_VERSION}'s minor")
    return image


def kind_recipe(version: str) -> dict:
    # kind's Makefile builds with -trimpath and -s -w too; its version is a constant in the source
    # (pkg/cmd/kind/version), so only the commit stamp, which the proxy cannot give, is left out.
    return {"module": KIND_MODULE, "version": version, "commands": ["kind"], "build_flags": list(BUILD_FLAGS),
            "ldflags": " ".join(LDFLAGS), "env": BUILD_ENV}


def build_wrapped(module: str, packages: dict[str, str], ldflags: Callable[[str], str],
                  sibling_version: Callable[[str], str]) -> Callable[[Recipe, str, Path], Path]:
    """The wrapper-module style for a module whose replaces point at sibling modules of its repository:
    each becomes that module at `sibling_version(release)`."""
    def build(row: Recipe, version: str, workdir: Path) -> Path:
        go = Go(f"building {row.about} {version} ({module})", workdir)
        sibling = lambda old, _folder: f"{old}@{sibling_version(version)}"  # noqa: E731
        return wrapper_module(go, module, version, packages, ldflags(version), sibling, go.download(module, version))
    return build


def build_operator(row: Recipe, version: str, workdir: Path) -> Path:
    """The manager binary, with the CRDs and webhook manifests of the same module zip beside it (published as
    one folder, so that a binary in the cache always has its CRDs)."""
    go = Go(f"building the OpenTelemetry Operator {version} ({OPERATOR_MODULE})", workdir)
    download = go.download(OPERATOR_MODULE, version)
    module_dir = Path(download["Dir"])
    ldflags = operator_ldflags(version, (module_dir / "versions.txt").read_text())
    built = wrapper_module(go, OPERATOR_MODULE, version, {"manager": OPERATOR_MODULE}, ldflags,
                           lambda old, _folder: f"{old}@{version}", download)
    staged = workdir / "publish"
    (staged / "crd").mkdir(parents=True)
    (staged / "webhook").mkdir()
    for crd in sorted((module_dir / "config" / "crd" / "bases").glob("*.yaml")):
        shutil.copyfile(crd, staged / "crd" / crd.name)
    shutil.copyfile(module_dir / "config" / "webhook" / "manifests.yaml", staged / "webhook" / "manifests.yaml")
    os.replace(built / "manager", staged / "manager")
    return staged


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


def build_kubernetes_schemas(row: Recipe, _version: str, workdir: Path) -> Path:
    """Kubernetes' strict schemas from the kubernetes-validate wheel (PyPI), made local: as shipped their
    `$id`/`$ref` point at the web, and kubeconform then only says "could not find schema"."""
    log = workdir / "build.log"
    what = f"fetching kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI) for the Kubernetes schemas"
    run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                "--only-binary=:all:", "-d", str(workdir), f"kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"],
               log, BuildError, what, cwd=workdir)
    (wheel,) = workdir.glob("kubernetes_validate-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != KUBERNETES_VALIDATE_SHA256:
        raise BuildError(f"{what}: {wheel.name} has sha256 {digest}, expected {KUBERNETES_VALIDATE_SHA256}")
    folder = f"kubernetes_validate/kubernetes-json-schema/v{SCHEMA_KUBERNETES_VERSION}-local-strict/"
    staged = workdir / "schemas"
    staged.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(folder) and name.endswith(".json")]
        if not members:
            raise BuildError(f"{what}: {wheel.name} has no {folder}")
        for name in members:
            (staged / name.removeprefix(folder)).write_text(json.dumps(make_local(json.loads(archive.read(name)))))
    return staged


def build_crd_schemas(row: Recipe, version: str, workdir: Path) -> Path:
    """The Operator's CRDs as strict JSON schemas (`additionalProperties: false` wherever properties are listed,
    the root included), converted by kubeconform's own scripts/openapi2jsonschema.py."""
    go = Go(f"converting the Operator {version} CRDs with kubeconform {KUBECONFORM_VERSION}'s "
            "openapi2jsonschema.py", workdir)
    converter = Path(go.download(KUBECONFORM_MODULE, KUBECONFORM_VERSION)["Dir"]) / "scripts" / "openapi2jsonschema.py"
    crds_folder = BUILDS["operator"].paths(version)[1]
    crds = sorted(crds_folder.glob("*.yaml"))
    if not crds:
        raise BuildError(f"{go.what}: no CRDs in {crds_folder} (build the Operator first)")
    staged = workdir / "schemas"
    staged.mkdir()
    env = {**os.environ, "FILENAME_FORMAT": CRD_FILENAME_FORMAT, "DENY_ROOT_ADDITIONAL_PROPERTIES": "1"}
    run_logged([sys.executable, str(converter), *map(str, crds)], go.log, BuildError, go.what, cwd=staged, env=env)
    if not list(staged.glob("*.json")):
        raise BuildError(f"{go.what}: the converter wrote no schema; log: {go.log}")
    return staged


# ------------------------------------------------------------------------------------------ test helpers

VEGETA_MODULE = "github.com/tsenart/vegeta/v12"  # the benchmark's open-loop load generator
VEGETA_VERSION = "v12.12.0"
COMPOSE_CONFIG_SRC = REPO_ROOT / "tests" / "compose" / "compose_config"  # Docker Compose's own loader, for the tests


def sources_key(src: str | Path) -> str:
    """A local module's key: a hash of its go.mod, go.sum and main.go."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (Path(src) / name).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_compose_config(row: Recipe, src: str | Path, workdir: Path) -> Path:
    return local_module(Go("building tests/compose/compose_config (Docker Compose's loader)", workdir), Path(src),
                        "compose-config")


# ------------------------------------------------------------------------------------------ the table

_ROWS = [
    Recipe("collector", "the OpenTelemetry Collector", "otelcol",
           (yaml.safe_load(COLLECTOR_MANIFEST.read_text())["dist"]["name"],), lambda: str(COLLECTOR_MANIFEST),
           build_collector, collector_key),
    Recipe("prometheus", "Prometheus and promtool", "prometheus", ("prometheus", "promtool"), prometheus_version,
           build_prometheus, hashed(prometheus_recipe)),
    Recipe("alertmanager", "Alertmanager and amtool", "alertmanager", ("alertmanager", "amtool"), alertmanager_version,
           install(lambda v: [f"{ALERTMANAGER_MODULE}/cmd/{name}@{v}" for name in ("alertmanager", "amtool")],
                   alertmanager_ldflags), hashed(alertmanager_recipe)),
    Recipe("sloth", "Sloth", "sloth", ("sloth",), lambda: SLOTH_VERSION,
           install(lambda v: [f"{SLOTH_PACKAGE}@{v}"], sloth_ldflags), hashed(sloth_recipe)),
    Recipe("caddy", "Caddy, the edge proxy", "caddy", ("caddy",), caddy_version,
           install(lambda v: [f"{CADDY_PACKAGE}@{v}"], caddy_ldflags), hashed(caddy_recipe),
           check=version_printed("caddy", lambda v: v)),
    Recipe("node-exporter", "node_exporter, the host's metrics", "node-exporter", ("node_exporter",),
           node_exporter_version, install(lambda v: [f"{NODE_EXPORTER_MODULE}@{v}"], node_exporter_ldflags),
           hashed(node_exporter_recipe),
           check=flag_version_printed("node_exporter", lambda v: f"version {v.removeprefix('v')} ")),
    Recipe("cadvisor", "cAdvisor, the containers' metrics (cadvisor/native)", "cadvisor", ("cadvisor",),
           cadvisor_version, build_cadvisor, hashed(cadvisor_recipe),
           check=flag_version_printed("cadvisor", lambda v: f"cAdvisor {v} ")),
    Recipe("kubernetes", "kube-apiserver and kubectl", "kubernetes", ("kube-apiserver", "kubectl"),
           lambda: KUBERNETES_VERSION,
           build_wrapped(KUBERNETES_MODULE, {name: f"{KUBERNETES_MODULE}/cmd/{name}" for name in
                                             ("kube-apiserver", "kubectl")}, kubernetes_ldflags,
                         kubernetes_staging_version), hashed(kubernetes_recipe)),
    Recipe("etcd", "etcd", "etcd", ("etcd",), lambda: ETCD_VERSION,
           # Its sibling modules (api, client, pkg) are released with the same version.
           build_wrapped(ETCD_MODULE, {"etcd": ETCD_MODULE}, etcd_ldflags, lambda v: v), hashed(etcd_recipe)),
    Recipe("kubeconform", "kubeconform", "kubeconform", ("kubeconform",), lambda: KUBECONFORM_VERSION,
           install(lambda v: [f"{KUBECONFORM_MODULE}/cmd/kubeconform@{v}"], kubeconform_ldflags),
           hashed(kubeconform_recipe)),
    Recipe("operator", "the OpenTelemetry Operator", "otel-operator", ("manager", "crd", "webhook/manifests.yaml"),
           operator_version, build_operator, hashed(operator_recipe), whole_folder=True),
    Recipe("kubernetes-schemas", "the Kubernetes API's JSON schemas", "k8s-schemas", ("",),
           lambda: SCHEMA_KUBERNETES_VERSION, build_kubernetes_schemas, hashed(kubernetes_schemas_recipe),
           prefix="kubernetes-", whole_folder=True),
    Recipe("crd-schemas", "the Operator CRDs' JSON schemas", "k8s-schemas", ("",), operator_version,
           build_crd_schemas, hashed(crd_schemas_recipe), prefix="otel-operator-", whole_folder=True,
           needs=("operator",)),
    Recipe("vegeta", "vegeta", "vegeta", ("vegeta",), lambda: VEGETA_VERSION,
           install(lambda v: [f"{VEGETA_MODULE}@{v}"], None, flags=()), lambda v: v),
    Recipe("compose-config", "Docker Compose's loader (tests/compose/compose_config)", "compose-config",
           ("compose-config",),
           lambda: str(COMPOSE_CONFIG_SRC), build_compose_config, sources_key),
    Recipe("kind", "kind", "kind", ("kind",), kind_version,
           install(lambda v: [f"{KIND_MODULE}@{v}"], lambda _v: " ".join(LDFLAGS)), hashed(kind_recipe),
           check=version_printed("kind", lambda v: f"kind {v} "), make_test=False),
]
BUILDS: dict[str, Recipe] = {row.name: row for row in _ROWS}
