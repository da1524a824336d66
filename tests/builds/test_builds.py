"""tooling.builds: one table of recipes on one spine. The recipes' keys (which cached binaries they find), the
spine's publishing and locking, the build styles' pure parts, and the edge proxy's row built for real."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tooling.builds as builds
from tooling.builds import BUILDS, BuildError, K8sTools, binaries, k8s_tools, paths, recipes, spine
from tooling.builds.recipes import Recipe, recipe_key
from tooling.config import DOTENV, REPO_ROOT, load_env_file

pytestmark = pytest.mark.unit

# The cache folder of every row for fixed inputs, as the recipes hashed them when the builds became one table
# (the keys of the releases in .env were then checked to be the folders already in .cache/): a recipe dict
# that changes shape changes its key, and every cached binary of it is rebuilt (30 minutes for Kubernetes).
# A deliberate change of a recipe updates its line here.
KEYS = {  # made-up releases (the real ones are stated in .env only)
    ("prometheus", "v3.98.7"): "3.98.7-0961bcbb7550",
    ("alertmanager", "v0.98.7"): "0.98.7-aba22146f148",
    ("sloth", "v0.98.7"): "0.98.7-f19d47e95a55",
    ("kubernetes", "v1.98.7"): "1.98.7-ab622dc53e65",
    ("etcd", "v3.98.7"): "3.98.7-023a500faabe",
    ("kubeconform", "v0.98.7"): "0.98.7-0bab795f61e5",
    ("operator", "v0.987.0"): "0.987.0-b917b5b935b6",
    ("kubernetes-schemas", "1.98.0"): "1.98.0-bb81c8365c1f",
    ("crd-schemas", "v0.987.0"): "0.987.0-29b40b5fa2db",
    ("kind", "v0.98.7"): "0.98.7-5b801af0ae05",
    ("vegeta", "v12.98.7"): "v12.98.7",
    ("caddy", "v2.98.7"): "2.98.7-bb32cd481d77",
    ("node-exporter", "v1.98.7"): "1.98.7-0a6f3c7ef83c",
}


@pytest.mark.parametrize("name, version", KEYS)
def test_a_recipe_keeps_its_cache_key(name, version):
    assert BUILDS[name].key(version) == KEYS[name, version]


def test_every_row_is_keyed_by_its_version_and_lands_in_its_cache_folder():
    for name, row in BUILDS.items():
        for path in paths(name):
            assert path.is_relative_to(REPO_ROOT / ".cache" / row.cache), (name, path)
    for name, version in KEYS:
        assert BUILDS[name].key(version) != BUILDS[name].key(version + "1"), name
    assert [name for name, row in BUILDS.items() if not row.make_test] == ["kind"]


def test_the_collector_and_compose_config_are_keyed_by_their_sources(tmp_path):
    manifest = tmp_path / "builder-config.yaml"
    manifest.write_text(recipes.COLLECTOR_MANIFEST.read_text())
    assert BUILDS["collector"].key(manifest) == BUILDS["collector"].key(recipes.COLLECTOR_MANIFEST)
    manifest.write_text(manifest.read_text() + "# one more line\n")
    assert BUILDS["collector"].key(manifest) != BUILDS["collector"].key(recipes.COLLECTOR_MANIFEST)
    assert re.fullmatch(r"0\.\d+\.\d+-[0-9a-f]{12}", BUILDS["collector"].key(manifest))
    source = tmp_path / "compose_config"
    shutil.copytree(recipes.COMPOSE_CONFIG_SRC, source)
    assert recipes.sources_key(source) == recipes.sources_key(recipes.COMPOSE_CONFIG_SRC)
    (source / "main.go").write_text((source / "main.go").read_text() + "\n")
    assert recipes.sources_key(source) != recipes.sources_key(recipes.COMPOSE_CONFIG_SRC)


# ------------------------------------------------------------------------------------------ the spine


def test_shared_build_steps_key_publish_and_reuse(tmp_path):
    recipe = {"module": "m", "flags": ["-trimpath"]}
    key = recipe_key("v1.2.3", recipe)
    assert re.fullmatch(r"1\.2\.3-[0-9a-f]{12}", key)
    assert key != recipe_key("v1.2.3", {**recipe, "flags": []}) != recipe_key("v1.2.4", recipe)
    out, targets = tmp_path / "bin", [tmp_path / "cache" / "a", tmp_path / "cache" / "b"]
    out.mkdir()
    (out / "a").write_text("a")
    with pytest.raises(RuntimeError, match=r"reported success but .*/bin/b is missing"):
        spine.publish_all(out, targets, RuntimeError, "building x")
    (out / "b").write_text("b")
    spine.publish_all(out, targets, RuntimeError, "building x")
    assert [path.read_text() for path in targets] == ["a", "b"] and not list(out.iterdir())
    built = []
    assert spine.cached_or_built(targets, lambda: built.append(1)) == targets and not built
    targets[1].unlink()
    spine.cached_or_built(targets, lambda: built.append(1))
    assert built == [1]


def test_concurrent_callers_of_a_missing_build_wait_for_one_build(tmp_path):
    targets, builds_run = [tmp_path / "cache" / "1.0-abc" / "tool"], []

    def build():
        builds_run.append(threading.get_ident())
        time.sleep(0.5)  # long enough for every other caller to arrive and find the binary missing
        targets[0].parent.mkdir(parents=True, exist_ok=True)
        targets[0].write_text("built")
        return targets

    callers = [threading.Thread(target=spine.cached_or_built, args=(targets, build)) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert len(builds_run) == 1 and targets[0].read_text() == "built", builds_run


def test_a_changed_manifest_builds_once_into_a_new_folder_and_keeps_the_old_binary(tmp_path, monkeypatch):
    """Helpers and pytest workers run the cached binary while the manifest changes: the new manifest's build
    goes to a folder of its own (keyed by the manifest's content), callers that want it at the same time wait
    for one build, and the previous binary stays. The build itself is replaced by a stand-in here."""
    monkeypatch.setattr(recipes, "CACHE", tmp_path / "cache")
    old_manifest, new_manifest = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_manifest.write_text(recipes.COLLECTOR_MANIFEST.read_text())
    new_manifest.write_text(recipes.COLLECTOR_MANIFEST.read_text() + "# one more line\n")
    built = []

    def stand_in(row: Recipe, manifest: str, workdir: Path) -> Path:
        built.append(Path(manifest))
        time.sleep(0.5)  # the other callers arrive while this build runs
        (workdir / "out").mkdir()
        (workdir / "out" / row.outputs[0]).write_text(Path(manifest).name)
        return workdir / "out"

    monkeypatch.setitem(BUILDS, "collector", dataclasses.replace(BUILDS["collector"], build=stand_in))
    (old,) = binaries("collector", old_manifest)
    with ThreadPoolExecutor(4) as pool:
        new = set(pool.map(lambda _: binaries("collector", new_manifest), range(4)))
    assert new == {paths("collector", new_manifest)}
    assert old.parent != paths("collector", new_manifest)[0].parent
    assert built == [old_manifest, new_manifest], "one build per manifest"
    assert old.read_text() == "old.yaml", "the previous manifest's binary must stay where it is"


def test_a_build_that_fails_its_check_publishes_nothing_and_is_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "CACHE", tmp_path / "cache")
    attempts = []

    def stand_in(row: Recipe, version: str, workdir: Path) -> Path:
        attempts.append(version)
        (workdir / "bin").mkdir()
        (workdir / "bin" / "caddy").write_text("#!/bin/sh\necho v0.0.0-wrong\n")
        (workdir / "bin" / "caddy").chmod(0o755)
        return workdir / "bin"

    monkeypatch.setitem(BUILDS, "caddy", dataclasses.replace(BUILDS["caddy"], build=stand_in))
    monkeypatch.setattr(builds, "_failed", {})
    for _ in range(2):
        with pytest.raises(BuildError, match=r"`caddy version` printed 'v0.0.0-wrong\\n', expected 'v9.9.9'"):
            binaries("caddy", "v9.9.9")
    assert attempts == ["v9.9.9"], "a failed build is not retried in the same process"
    assert not paths("caddy", "v9.9.9")[0].exists()


@pytest.mark.integration
def test_a_failed_build_names_the_version_and_keeps_its_log(monkeypatch, tmp_path):
    """A release with no module version (3.99.0) must fail at the download, saying which one, with a log."""
    monkeypatch.setattr(recipes, "CACHE", tmp_path)
    with pytest.raises(BuildError, match=r"v3\.99\.0.*v0\.399\.0") as failure:
        builds.build(BUILDS["prometheus"], "v3.99.0")
    assert list(tmp_path.glob("prometheus/build-3.99.0-*/build.log")), str(failure.value)
    assert not list(tmp_path.glob("prometheus/3.99.0-*")), "a failed build must publish nothing"


def test_a_build_names_go_and_what_it_builds_when_go_is_missing(monkeypatch, tmp_path):
    """Without Go the build must say what is missing instead of failing obscurely."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for name, what in (("prometheus", r"Prometheus v3\.\d+"), ("collector", "collector"), ("sloth", "Sloth")):
        with pytest.raises(BuildError, match=rf"Go is not on PATH.*{what}"):
            BUILDS[name].build(BUILDS[name], BUILDS[name].version(), tmp_path)


# ------------------------------------------------------------------------------------------ the styles


def test_wrapper_modules_copy_the_main_module_only_directives(tmp_path):
    upstream = {"Go": "1.25.8", "Exclude": [{"Path": "a.example/x", "Version": "v1.0.0"}],
                "Require": [{"Path": "c.example/z", "Version": "v1.1.0"}],
                "Replace": [{"Old": {"Path": "b.example/y"}, "New": {"Path": "b.example/y", "Version": "v0.2.0"}},
                            {"Old": {"Path": "c.example/z", "Version": "v1.1.0"}, "New": {"Path": "./internal/z"}}],
                "Godebug": [{"Key": "x509sha1", "Value": "1"}]}
    inside = lambda _old, folder: str((tmp_path / folder).resolve())  # noqa: E731  (Prometheus's)
    assert spine.wrapper_edits(upstream, inside) == [
        "-go=1.25.8", "-exclude=a.example/x@v1.0.0", "-replace=b.example/y=b.example/y@v0.2.0",
        f"-replace=c.example/z@v1.1.0={tmp_path / 'internal' / 'z'}", "-godebug=x509sha1=1"]


def test_wrapper_modules_repeat_the_replaces_with_sibling_releases():
    kubernetes = {"Go": "1.24.0", "Require": [{"Path": "k8s.io/api", "Version": "v0.0.0"},
                                              {"Path": "golang.org/x/net", "Version": "v1"}],
                  "Replace": [{"Old": {"Path": "k8s.io/api"}, "New": {"Path": "./staging/src/k8s.io/api"}},
                              {"Old": {"Path": "k8s.io/sample-controller"},
                               "New": {"Path": "./staging/src/k8s.io/sample-controller"}}]}
    staging = recipes.kubernetes_staging_version("v1.34.4")
    assert spine.wrapper_edits(kubernetes, lambda old, _folder: f"{old}@{staging}") == [
        "-go=1.24.0", "-replace=k8s.io/api=k8s.io/api@v0.34.4"]  # what nothing requires is left out
    etcd = {"Go": "1.26.0", "Require": [{"Path": "go.etcd.io/etcd/api/v3", "Version": "v3.6.16"}],
            "Replace": [{"Old": {"Path": "go.etcd.io/etcd/api/v3"}, "New": {"Path": "../api"}},
                        {"Old": {"Path": "go.etcd.io/etcd"}, "New": {"Path": "./FORBIDDEN_DEPENDENCY"}}]}
    assert spine.wrapper_edits(etcd, lambda old, _folder: f"{old}@v3.6.16") == [
        "-go=1.26.0", "-replace=go.etcd.io/etcd/api/v3=go.etcd.io/etcd/api/v3@v3.6.16"]
    # Replaced modules may differ from upstream's placeholder version; every other one must not.
    wrapper = {"Require": [{"Path": "k8s.io/api", "Version": "v0.34.4"}, {"Path": "golang.org/x/net", "Version": "v2"}]}
    assert spine.unpinned_dependencies(kubernetes, wrapper) == ["golang.org/x/net v1 -> v2"]
    upstream = {"Require": [{"Path": "a", "Version": "v1"}, {"Path": "b", "Version": "v2"}]}
    assert spine.unpinned_dependencies(upstream, {"Require": upstream["Require"]}) == []
    assert spine.unpinned_dependencies(upstream, {"Require": [{"Path": "b", "Version": "v3"}]}) == ["b v2 -> v3"]


def test_the_kubernetes_schemas_are_made_local():
    shipped = {"$id": "https://kubernetes.io/api/deployment/apps/v1",
               "properties": {"spec": {"$ref": "/api/_definitions.json#/$defs/io.k8s.api.apps.v1.DeploymentSpec"},
                              "list": {"items": [{"$ref": "/api/_definitions.json#/$defs/x", "$id": "y"}]}}}
    assert recipes.make_local(shipped) == {
        "properties": {"spec": {"$ref": "_definitions.json#/$defs/io.k8s.api.apps.v1.DeploymentSpec"},
                       "list": {"items": [{"$ref": "_definitions.json#/$defs/x"}]}}}


# ------------------------------------------------------------------------------------------ versions and stamps


@pytest.mark.parametrize("release, module", [("v3.12.2", "v0.312.2"), ("3.5.1", "v0.305.1"),
                                             ("v3.0.0-rc.1", "v0.300.0-rc.1")])
def test_a_prometheus_release_maps_to_the_go_module_version(release, module):
    assert recipes.prometheus_module_version(release) == module


@pytest.mark.parametrize("release", ["v2.53.0", "latest", "3.12"])
def test_unbuildable_prometheus_versions_are_refused_clearly(release):
    with pytest.raises(BuildError, match="PROMETHEUS_VERSION"):
        recipes.prometheus_module_version(release)


def test_the_builds_follow_dotenv_and_refuse_unbuildable_versions(tmp_path):
    env = load_env_file(DOTENV)
    assert paths("prometheus")[0].parent.name.startswith(env["PROMETHEUS_VERSION"].removeprefix("v") + "-")
    assert paths("alertmanager")[0].parent.name.startswith(env["ALERTMANAGER_VERSION"].removeprefix("v") + "-")
    assert paths("operator")[0].parent.name.startswith(env["OTEL_OPERATOR_VERSION"].removeprefix("v") + "-")
    bad = tmp_path / ".env"
    for version in ("v0.32.0", "0.31.0", "latest"):
        bad.write_text(f"ALERTMANAGER_VERSION={version}\n")
        with pytest.raises(BuildError, match="ALERTMANAGER_VERSION"):
            recipes.alertmanager_version(bad)


def test_the_builds_are_stamped_with_their_versions():
    assert "-X github.com/slok/sloth/internal/info.Version=v0.16.0" in recipes.sloth_ldflags("v0.16.0")
    flags = recipes.kubernetes_ldflags("v1.34.4")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for stamp in ("gitVersion=v1.34.4", "gitMajor=1", "gitMinor=34"):
            assert f"-X {package}.{stamp}" in flags
    assert recipes.kubernetes_staging_version("v1.34.4") == "v0.34.4"
    # A made-up release: the real one is stated in .env only.
    versions_txt = "# comment\nopentelemetry-collector=0.987.0\noperator=0.987.0\ntargetallocator=0.987.0\n" + \
        "operator-opamp-bridge=0.987.0\nautoinstrumentation-java=1\nautoinstrumentation-nodejs=2\n" + \
        "autoinstrumentation-python=0.59b0\nautoinstrumentation-dotnet=3\nautoinstrumentation-go=v4\n" + \
        "autoinstrumentation-apache-httpd=5\nautoinstrumentation-nginx=6\n"
    flags = recipes.operator_ldflags("v0.987.0", versions_txt)
    assert f"-X {recipes.OPERATOR_MODULE}/internal/version.autoInstrumentationPython=0.59b0" in flags
    assert f"-X {recipes.OPERATOR_MODULE}/internal/version.version=0.987.0" in flags
    with pytest.raises(BuildError, match="autoinstrumentation-nginx"):
        recipes.operator_ldflags("v0.987.0", versions_txt.replace("autoinstrumentation-nginx=6\n", ""))


def test_kind_is_the_dotenv_release_and_built_only_on_demand(tmp_path):
    env = load_env_file(DOTENV)
    assert recipes.kind_version() == env["KIND_VERSION"]
    assert recipes.kind_node_image() == env["KIND_NODE_IMAGE"]
    recipe = recipes.kind_recipe("v9.87.6")
    assert (recipe["module"], recipe["version"], recipe["env"]) == ("sigs.k8s.io/kind", "v9.87.6", {"CGO_ENABLED": "0"})
    (path,) = paths("kind", "v9.87.6")
    assert path.name == "kind" and path.parent.parent == REPO_ROOT / ".cache" / "kind"
    assert re.fullmatch(r"9\.87\.6-[0-9a-f]{12}", path.parent.name), path
    assert paths("kind", "v9.87.7")[0].parent != path.parent
    assert paths("kind") == paths("kind", env["KIND_VERSION"])
    # Not part of the Kubernetes tests' set.
    assert "kind" not in builds.K8S_BUILDS
    tools = k8s_tools(build_missing=False)
    assert {f.name for f in dataclasses.fields(K8sTools)} == {f.name for f in dataclasses.fields(tools)}
    # What .env may say: release tags, and a node image at the manifests' Kubernetes minor with its digest.
    digest = "@sha256:" + "0" * 64
    for setting, problem in (("KIND_VERSION=latest", "release tag"), ("KIND_VERSION=", "sets no KIND_VERSION"),
                             ("KIND_NODE_IMAGE=kindest/node:v1.34.99", "digest"),
                             (f"KIND_NODE_IMAGE=kindest/node:v1.99.0{digest}", "minor")):
        bad = tmp_path / "bad.env"
        key = setting.split("=", 1)[0]
        bad.write_text(f"KIND_VERSION=v9.87.6\nKIND_NODE_IMAGE=kindest/node:v1.34.99{digest}\n{setting}\n")
        with pytest.raises(BuildError, match=problem):
            (recipes.kind_version if key == "KIND_VERSION" else recipes.kind_node_image)(bad)


# ------------------------------------------------------------------------------------------ the edge proxy


def test_caddy_is_the_dotenv_release_and_its_recipe_is_keyed_on_it(tmp_path):
    release = load_env_file(DOTENV)["CADDY_VERSION"]
    assert recipes.caddy_version() == f"v{release}"
    assert paths("caddy")[0].parent.name.startswith(f"{release}-")
    recipe = recipes.caddy_recipe(f"v{release}")
    assert recipe["ldflags"] == f"-s -w -X github.com/caddyserver/caddy/v2.CustomVersion=v{release}"
    assert (recipe["packages"], recipe["build_flags"], recipe["env"]) == (
        ["github.com/caddyserver/caddy/v2/cmd/caddy"], ["-trimpath"], {"CGO_ENABLED": "0"})
    other = tmp_path / ".env"
    other.write_text(f"CADDY_VERSION={release}1\n")
    assert recipes.caddy_version(other) == f"v{release}1"
    assert BUILDS["caddy"].key(recipes.caddy_version(other)) != BUILDS["caddy"].key(f"v{release}")


def test_the_caddy_binary_prints_the_dotenv_release():
    """Built by `make test` (about 2 minutes with Go's module cache warm); without the CustomVersion stamp a
    `go install`ed caddy prints "unknown"."""
    (caddy,) = binaries("caddy")
    shown = subprocess.run([str(caddy), "version"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split()[0] == "v" + load_env_file(DOTENV)["CADDY_VERSION"], shown.stdout


# ------------------------------------------------------------------------------------------ the exporters


def test_node_exporter_is_the_dotenv_release_and_its_recipe_is_keyed_on_it(tmp_path):
    release = load_env_file(DOTENV)["NODE_EXPORTER_VERSION"]
    assert recipes.node_exporter_version() == release
    assert paths("node-exporter")[0].parent.name.startswith(f"{release.removeprefix('v')}-")
    recipe = recipes.node_exporter_recipe(release)
    # The Prometheus row's stamp (github.com/prometheus/common/version), which --version and build_info print.
    assert recipe["ldflags"] == (f"-s -w -X github.com/prometheus/common/version.Version={release.removeprefix('v')} "
                                 f"-X github.com/prometheus/common/version.Revision={release} "
                                 "-X github.com/prometheus/common/version.BuildUser=zerocode")
    assert (recipe["package"], recipe["build_flags"], recipe["env"]) == (
        "github.com/prometheus/node_exporter", ["-trimpath"], {"CGO_ENABLED": "0"})
    other = tmp_path / ".env"
    other.write_text("NODE_EXPORTER_VERSION=v1.98.7\n")
    assert recipes.node_exporter_version(other) == "v1.98.7"
    assert BUILDS["node-exporter"].key("v1.98.7") != BUILDS["node-exporter"].key(release)
    other.write_text("NODE_EXPORTER_VERSION=latest\n")
    with pytest.raises(BuildError, match="release tag"):
        recipes.node_exporter_version(other)


def test_cadvisor_is_our_main_at_the_dotenv_release_keyed_on_its_sources(tmp_path):
    release = load_env_file(DOTENV)["CADVISOR_VERSION"]
    assert recipes.cadvisor_version() == release
    # cadvisor/native/go.mod requires the release the compose image runs.
    assert recipes.cadvisor_required() == release
    assert paths("cadvisor")[0].parent.name.startswith(f"{release.removeprefix('v')}-")
    recipe = recipes.cadvisor_recipe(release)
    assert recipe["ldflags"] == (f"-s -w -X github.com/google/cadvisor/version.Version={release} "
                                 f"-X github.com/google/cadvisor/version.Revision={release} "
                                 "-X github.com/google/cadvisor/version.BuildUser=zerocode")
    assert recipe["build_flags"] == ["-mod=readonly", "-trimpath", "-buildvcs=false"]
    # An edit of the wrapper's sources builds into a new folder.
    source = tmp_path / "native"
    shutil.copytree(recipes.CADVISOR_SRC, source)
    assert recipes.cadvisor_recipe(release, source) == recipe
    (source / "main.go").write_text((source / "main.go").read_text() + "\n")
    assert recipes.cadvisor_recipe(release, source) != recipe
    # A .env release that go.mod does not require is refused before anything is built.
    (source / "go.mod").write_text((source / "go.mod").read_text().replace(release, "v0.98.7"))
    assert recipes.cadvisor_required(source) == "v0.98.7"


def test_cadvisor_refuses_a_release_its_go_mod_does_not_require(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "CACHE", tmp_path)  # the refused build's work folder (and log) lands there
    with pytest.raises(BuildError, match=r"CADVISOR_VERSION=v0\.98\.7 in \.env, but .*go\.mod requires "
                                         r"github\.com/google/cadvisor v0\.53\.0"):
        binaries("cadvisor", "v0.98.7")
    assert not paths("cadvisor", "v0.98.7")[0].exists()


@pytest.mark.parametrize("name, printed", [("node-exporter", "node_exporter, version {} "),
                                           ("cadvisor", "cAdvisor v{} ")])
def test_the_exporter_binaries_print_the_dotenv_release(name, printed):
    """Built by `make test` (node_exporter about 45 s, cAdvisor about a minute with Go's module cache warm)."""
    (binary,) = binaries(name)
    release = load_env_file(DOTENV)[f"{name.upper().replace('-', '_')}_VERSION"]
    shown = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert printed.format(release.removeprefix("v")) in shown.stdout + shown.stderr, shown.stdout + shown.stderr
