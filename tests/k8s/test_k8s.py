"""Kubernetes: what `kubectl kustomize k8s/` renders, checked by the real tools (issue 12, "Validation, for real").

1. **kubeconform**, strict, against the Kubernetes 1.34 schemas and the OpenTelemetry Operator's CRD schemas,
   with local schemas only and never told to skip a kind it has no schema for: every rendered object must be
   valid, and the broken fixtures in tests/data/k8s-broken/ must fail, so that a schema gone missing cannot
   pass silently.
2. **A real kube-apiserver and etcd**: the Operator's CRDs applied and established, the rendered namespaces
   and their `default` ServiceAccounts created (no controller-manager runs), then `kubectl apply
   --dry-run=server` of everything rendered. The broken fixtures are refused here too.
3. **The Operator's own webhook**: the Operator binary runs against that API server, its webhooks registered
   by hand from its module's config/webhook/manifests.yaml. The repo's Instrumentation is applied for real
   (through the Operator's defaulting and validating webhooks), the app's Deployment and a ReplicaSet owned by
   it are stored (nothing runs them), and the Pod that ReplicaSet would make is created with
   `--dry-run=server`: the mutated Pod that comes back is checked (init container, volume, PYTHONPATH,
   every OTEL_* variable, app/app.env with only addresses changed) and its environment written to
   `mutated-pod-env.json` in the test's tmp folder, and printed.

Everything is built once into .cache/ by tooling.builds (minutes cold, nothing warm). The API server,
etcd and the Operator run inside a private network namespace (`unshare --net`) that has only its own
loopback: the Operator's webhook server listens on every interface and has no flag to change that, and in
there the fixed ports below cannot clash with the tests running beside these, nor be reached from outside.
All three are stopped by their process ids when the module's tests are done.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tooling.builds import K8sTools, k8s_tools, recipes
from tooling.config import load_env_file
from tooling.k8s.injection import CAPTURED_ENV_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
BROKEN_DIR = REPO_ROOT / "tests" / "data" / "k8s-broken"
EXAMPLES_DIR = REPO_ROOT / "examples"
APP_ENV = REPO_ROOT / "app" / "app.env"
DOTENV = REPO_ROOT / ".env"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

INJECT_PYTHON = "instrumentation.opentelemetry.io/inject-python"
# What the Operator (OTEL_OPERATOR_VERSION in .env, internal/instrumentation/python.go) puts into an annotated Pod.
INIT_CONTAINER = "opentelemetry-auto-instrumentation-python"
MOUNT_PATH = "/otel-auto-instrumentation-python"
COPY_COMMAND = ["cp", "-r", "/autoinstrumentation/.", MOUNT_PATH]
PYTHONPATH_PREFIX = f"{MOUNT_PATH}/opentelemetry/instrumentation/auto_instrumentation"

# Each broken fixture and the layers that must refuse it, with a pattern of the reason each gives. A layer not
# named must accept it: that shows what each layer adds (the API server sees a selector that matches no labels,
# only the Operator's webhook checks a sampler argument's range).
BROKEN = {
    "deployment-field-typo.yaml": {
        "kubeconform": r"additional properties 'replica' not allowed",
        "apiserver": r'unknown field "spec\.replica"',
    },
    "service-port-wrong-type.yaml": {
        "kubeconform": r"/spec/ports/0/port.*(integer|got string)",
        "apiserver": r"(?i)ServicePort.*port.*int32|cannot unmarshal string into .*port",
    },
    "unknown-kind.yaml": {
        "kubeconform": r"could not find schema for Servise",
        "apiserver": r'no matches for kind "Servise"',
    },
    "instrumentation-field-typo.yaml": {
        "kubeconform": r"additional properties 'imag' not allowed",
        "apiserver": r'unknown field "spec\.python\.imag"',
    },
    "deployment-selector-mismatch.yaml": {
        "apiserver": r"`selector` does not match template `labels`",
    },
    "instrumentation-sampler-argument.yaml": {
        "webhook": r"spec\.sampler\.argument should be in rage \[0\.\.1\]: 1\.5",
    },
}

# Ports inside the private network namespace (nothing else listens there).
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
APISERVER_PORT = 6443
WEBHOOK_PORT, OPERATOR_METRICS_PORT, OPERATOR_HEALTH_PORT = 9443, 8080, 8081
TOKEN = "zerocode-test-token"


def kustomizations() -> list[Path]:
    """k8s/ itself (whether or not it has a kustomization yet: its absence must fail, not skip) and every
    other kustomization below it; Components only render inside a kustomization, so they are left out. Then
    examples/, the users' own apps as they would deploy them (docs/own-app.md)."""
    found = [K8S_DIR]
    if K8S_DIR.is_dir():
        for path in sorted(K8S_DIR.rglob("*")):
            if path.name in KUSTOMIZATION_FILES and path.parent != K8S_DIR and path.parent not in found:
                if (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization") != "Component":
                    found.append(path.parent)
    return [*found, EXAMPLES_DIR]


KUSTOMIZATIONS = kustomizations()
KUSTOMIZATION_IDS = [str(path.relative_to(REPO_ROOT)) for path in KUSTOMIZATIONS]


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def identity(obj: dict) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def json_objects(text: str) -> list[dict]:
    """The objects kubectl printed with -o json: one, a List of them, or several one after another."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while text[position:].strip():
        obj, position = decoder.raw_decode(text, len(text) - len(text[position:].lstrip()))
        objects.extend(obj["items"] if obj.get("kind") == "List" else [obj])
    return objects


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# ------------------------------------------------------------------------------------------ tools, rendering


@pytest.fixture(scope="module")
def tools() -> K8sTools:
    """Every binary and schema; built on first use (about 20 minutes cold on 2 cores, 75 s with Go's caches
    warm), cached after."""
    return k8s_tools(log=lambda line: print(line, flush=True))


@pytest.fixture(scope="module")
def render(tools):
    """`kubectl kustomize <folder>` with the built kubectl (its kustomize is the one `kubectl apply -k` uses)."""
    rendered: dict[Path, str] = {}

    def render(directory: Path) -> str:
        if directory not in rendered:
            if not any((directory / name).exists() for name in KUSTOMIZATION_FILES):
                pytest.fail(f"{directory.relative_to(REPO_ROOT)}/ has no kustomization.yaml: the Kubernetes "
                            "manifests (issue 12) are missing, so there is nothing to validate")
            result = subprocess.run([str(tools.kubectl), "kustomize", str(directory)], capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
            rendered[directory] = result.stdout
            assert documents(result.stdout), f"kubectl kustomize {directory} rendered no object"
        return rendered[directory]

    return render


def kubeconform(tools: K8sTools, text: str) -> list[dict]:
    """kubeconform's verdict on each object of `text`: strict, local schemas only, no schema ever ignored."""
    cmd = [str(tools.kubeconform), "-strict", "-verbose", "-summary", "-output", "json",
           *(f"-schema-location={location}" for location in tools.schema_locations()), "-"]
    result = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"kubeconform printed no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return report["resources"]


# ------------------------------------------------------------------------------------------ 1. kubeconform


@pytest.mark.integration
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_every_rendered_object_passes_kubeconform_strict(tools, render, directory):
    objects = documents(render(directory))
    resources = kubeconform(tools, render(directory))
    assert len(resources) == len(objects), "kubeconform must report on every rendered object"
    bad = [f"{r['kind']}/{r['name']}: {r['status']} {r['msg']}" for r in resources if r["status"] != "statusValid"]
    assert not bad, "kubeconform (strict, Kubernetes 1.34 and Operator CRD schemas):\n" + "\n".join(bad)
    assert Counter((r["version"], r["kind"], r["name"]) for r in resources) == Counter(map(identity, objects))


@pytest.mark.unit
def test_the_broken_fixtures_are_the_ones_listed():
    assert sorted(p.name for p in BROKEN_DIR.glob("*.yaml")) == sorted(BROKEN), \
        "every fixture in tests/data/k8s-broken/ needs its line in BROKEN (which layer refuses it, and why)"


@pytest.mark.integration
@pytest.mark.parametrize("fixture", sorted(BROKEN))
def test_kubeconform_refuses_the_broken_fixtures(tools, fixture):
    text = (BROKEN_DIR / fixture).read_text()
    (resource,) = kubeconform(tools, text)
    pattern = BROKEN[fixture].get("kubeconform")
    if pattern is None:
        assert resource["status"] == "statusValid", f"{fixture} is schema-valid on purpose: {resource}"
        return
    assert resource["status"] in ("statusInvalid", "statusError"), f"kubeconform accepted {fixture}: {resource}"
    reasons = resource["msg"] + json.dumps(resource.get("validationErrors", []))
    assert re.search(pattern, reasons), f"{fixture} failed for another reason than {pattern!r}: {reasons}"
    print(f"kubeconform refused {fixture}: {resource['msg']}")


# ------------------------------------------------------------------------------------------ the local cluster


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def make_ca(directory: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=zerocode-test-ca", cwd=directory)


def make_serving_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for IP:127.0.0.1, signed by the CA in `directory`."""
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


# SIGKILL for the child when the test process dies, so that a killed test run leaves no API server behind
# (PR_SET_PDEATHSIG survives nsenter's exec). Set by util-linux's setpriv, not by a preexec_fn: that makes
# subprocess fork() instead of vfork(), which runs the fork handlers of the gRPC the worker has loaded
# (the native stack's sinks), and one aborted the child before its exec (exit -6, "epoll_wait error: Bad
# file descriptor").
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


class LocalCluster:
    """etcd, kube-apiserver and (on demand) the Operator, in a private network namespace of their own."""

    def __init__(self, tools: K8sTools, workdir: Path):
        self.tools = tools
        self.workdir = workdir
        self.pki = workdir / "pki"
        self.pki.mkdir()
        self.kubeconfig = workdir / "kubeconfig"
        self.holder: subprocess.Popen | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.webhooks_registered = False
        self.timings: dict[str, float] = {}

    # -- the network namespace

    def start_namespace(self) -> None:
        """`unshare --net` keeps a `sleep` in a new network namespace; everything else joins it by pid."""
        self.holder = subprocess.Popen([*DIE_WITH_PARENT, "unshare", "--net", "sleep", "infinity"],
                                       stderr=subprocess.PIPE)
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                raise RuntimeError(f"`unshare --net` is not permitted here (exit {self.holder.returncode}): "
                                   f"{self.holder.stderr.read().decode(errors='replace').strip()}")
            try:
                if os.readlink(f"/proc/{self.holder.pid}/ns/net") != own:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            raise RuntimeError("`unshare --net sleep` did not enter a new network namespace within 10 s")
        self.check("ip", "link", "set", "lo", "up")

    def inside(self, *cmd) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *map(str, cmd)]

    def check(self, *cmd, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(self.inside(*cmd), capture_output=True, text=True, timeout=timeout, **kwargs)
        assert result.returncode == 0, f"{' '.join(map(str, cmd))} (exit {result.returncode}):\n{result.stderr}"
        return result

    def start(self, name: str, *cmd, env: dict | None = None) -> subprocess.Popen:
        """A process inside the namespace; nsenter execs it, so the Popen's pid is the process's own."""
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as out:
            proc = subprocess.Popen([*DIE_WITH_PARENT, *self.inside(*cmd)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.processes[name] = proc
        return proc

    def wait_until(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                       f"{tail(self.logs[name])}")
            if ready():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {name}\n{tail(log, 15)}" for name, log in self.logs.items())
        raise RuntimeError(f"{what} not ready within {timeout:.0f} s\n{logs}")

    def http_ok(self, url: str) -> bool:
        probe = f"import urllib.request,sys; urllib.request.urlopen({url!r}, timeout=2); sys.exit(0)"
        return subprocess.run(self.inside(sys.executable, "-c", probe), capture_output=True, timeout=30).returncode == 0

    # -- kubectl

    def kubectl(self, *args, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [self.tools.kubectl, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.workdir / 'kube-cache'}",
               *args]
        return subprocess.run(self.inside(*cmd), input=input, capture_output=True, text=True, timeout=timeout)

    def kubectl_ok(self, *args, input: str | None = None, timeout: float = 120) -> str:
        result = self.kubectl(*args, input=input, timeout=timeout)
        assert result.returncode == 0, f"kubectl {' '.join(map(str, args))} (exit {result.returncode}):\n" \
                                       f"{result.stderr}\n{result.stdout[-2000:]}"
        return result.stdout

    # -- the API server

    def start_control_plane(self) -> None:
        started = time.monotonic()
        make_ca(self.pki)
        cert, key = make_serving_cert(self.pki, "apiserver")
        openssl("genrsa", "-out", "service-account.key", "2048", cwd=self.pki)
        (self.pki / "tokens.csv").write_text(f'{TOKEN},zerocode-admin,zerocode-admin,"system:masters"\n')
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": f"https://127.0.0.1:{APISERVER_PORT}",
                                                        "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        }))
        self.start_namespace()
        etcd_url = f"http://127.0.0.1:{ETCD_CLIENT_PORT}"
        self.start("etcd", self.tools.etcd, f"--data-dir={self.workdir / 'etcd'}", "--name=zerocode",
                   f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                   f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
                   f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
                   f"--initial-cluster=zerocode=http://127.0.0.1:{ETCD_PEER_PORT}",
                   "--unsafe-no-fsync", "--log-level=warn")
        self.wait_until("etcd", lambda: self.http_ok(f"{etcd_url}/health"), timeout=30)
        sa_key = self.pki / "service-account.key"
        self.start("kube-apiserver", self.tools.kube_apiserver,
                   f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                   f"--secure-port={APISERVER_PORT}", f"--cert-dir={self.pki}", f"--tls-cert-file={cert}",
                   f"--tls-private-key-file={key}", f"--token-auth-file={self.pki / 'tokens.csv'}",
                   "--authorization-mode=AlwaysAllow", "--service-account-issuer=https://kubernetes.default.svc",
                   f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
                   "--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none",
                   "--enable-priority-and-fairness=false", "--allow-privileged=true", "--profiling=false")
        self.wait_until("kube-apiserver", lambda: self.kubectl("get", "--raw=/readyz").returncode == 0, timeout=90)
        self.timings["control plane ready"] = time.monotonic() - started
        # The Operator's CRDs: `create`, not `apply`, whose last-applied annotation would not fit their size.
        self.kubectl_ok("create", "-f", self.tools.operator_crds)
        # `kubectl wait` fails at once, instead of waiting, on a CRD so new that it has no status yet
        # (".status.conditions accessor error"), which a busy machine sees: so wait until it succeeds.
        established = ("wait", "--for=condition=established", "crd", "--all", "--timeout=30s")
        self.wait_until("the CRDs established", lambda: self.kubectl(*established).returncode == 0, timeout=90)
        self.timings["CRDs established"] = time.monotonic() - started

    def ensure_namespaces(self, objects: list[dict]) -> None:
        """Create (for real) the namespaces the rendered objects declare, each with the `default`
        ServiceAccount that a controller-manager would add. Namespaces they only refer to are not created:
        a dry run into one of those fails, as it would for a user."""
        namespaces = [obj for obj in objects if obj["kind"] == "Namespace" and obj["apiVersion"] == "v1"]
        accounts = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": name}}
                    for name in ["default", *(ns["metadata"]["name"] for ns in namespaces)]]
        self.kubectl_ok("apply", "-f", "-", input=yaml.safe_dump_all(namespaces + accounts))

    # -- the Operator

    def start_operator(self) -> None:
        started = time.monotonic()
        # controller-runtime reads its serving certificate from $TMPDIR/k8s-webhook-server/serving-certs/.
        tmpdir = self.workdir / "operator-tmp"
        certs = tmpdir / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True)
        cert, key = make_serving_cert(self.pki, "webhook")
        shutil.copyfile(cert, certs / "tls.crt")
        shutil.copyfile(key, certs / "tls.key")
        # It reads the cluster from KUBECONFIG only (its own flag set has no --kubeconfig).
        self.start("operator", self.tools.operator, "--enable-leader-election=false",
                   f"--metrics-addr=127.0.0.1:{OPERATOR_METRICS_PORT}",
                   f"--health-probe-addr=127.0.0.1:{OPERATOR_HEALTH_PORT}", f"--webhook-port={WEBHOOK_PORT}",
                   "--enable-python-instrumentation=true",
                   env={"KUBECONFIG": str(self.kubeconfig), "TMPDIR": str(tmpdir)})
        self.wait_until("the Operator", lambda: self.http_ok(f"http://127.0.0.1:{OPERATOR_HEALTH_PORT}/readyz"),
                        timeout=90)
        self.kubectl_ok("apply", "-f", "-", input=yaml.safe_dump_all(self.webhook_configurations()))
        self.webhooks_registered = True
        # The API server picks webhook configurations up asynchronously: wait until the Operator's
        # defaulting webhook visibly answers (it fills in spec.python.image).
        probe = yaml.safe_dump({"apiVersion": "opentelemetry.io/v1alpha1", "kind": "Instrumentation",
                                "metadata": {"name": "webhook-probe", "namespace": "default"}, "spec": {}})

        def defaulted() -> bool:
            result = self.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=probe)
            return result.returncode == 0 and bool(json.loads(result.stdout)["spec"].get("python", {}).get("image"))

        self.wait_until("the Operator's webhooks", defaulted, timeout=60)
        self.timings["Operator webhooks answering"] = time.monotonic() - started

    def webhook_configurations(self) -> list[dict]:
        """The Operator's own webhook configurations (config/webhook/manifests.yaml of its module) with the
        in-cluster Service swapped for its URL here and our CA. Every failurePolicy is Fail (upstream's Pod
        webhook says Ignore), so that a webhook that cannot be called fails the test instead of leaving a
        Pod unmutated without a word."""
        ca = base64.b64encode((self.pki / "ca.crt").read_bytes()).decode()
        configurations = documents(self.tools.operator_webhooks.read_text())
        for configuration in configurations:
            configuration["metadata"]["name"] = "zerocode-test-" + configuration["metadata"]["name"]
            for webhook in configuration["webhooks"]:
                path = webhook["clientConfig"]["service"]["path"]
                webhook["clientConfig"] = {"url": f"https://127.0.0.1:{WEBHOOK_PORT}{path}", "caBundle": ca}
                webhook["failurePolicy"] = "Fail"
        return configurations

    # -- the end

    def stop(self) -> list[str]:
        """Stop every process by its pid, newest first; return the ones that had died on their own."""
        died = []
        for name, proc in reversed(list(self.processes.items())):
            if proc.poll() is not None:
                died.append(f"{name} (exit {proc.returncode}):\n{tail(self.logs[name])}")
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self.holder is not None and self.holder.poll() is None:
            os.kill(self.holder.pid, signal.SIGKILL)
            self.holder.wait(timeout=10)
        return died


@pytest.fixture(scope="module")
def cluster(tools, tmp_path_factory):
    """The API server and etcd, shared by this module's tests, stopped by pid at the end."""
    local = LocalCluster(tools, tmp_path_factory.mktemp("k8s-cluster"))
    try:
        local.start_control_plane()
        yield local
    finally:
        died = local.stop()
        print(f"local cluster timings: {json.dumps({k: round(v, 1) for k, v in local.timings.items()})}")
        assert not died, "died before the end of the tests: " + "\n".join(died)


@pytest.fixture(scope="module")
def operator(cluster):
    """The same cluster, with the Operator running and its webhooks registered."""
    if not cluster.webhooks_registered:
        cluster.start_operator()
    return cluster


# ------------------------------------------------------------------------------------------ 2. the API server


@pytest.mark.integration
def test_the_api_server_accepts_every_rendered_object(cluster, render, tmp_path):
    """What `kubectl apply -k k8s/` would send (the folders below it are parts of it)."""
    directory = K8S_DIR
    objects = documents(render(directory))
    cluster.ensure_namespaces(objects)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(directory))
    result = cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", rendered)
    assert result.returncode == 0, f"kubectl apply --dry-run=server refused objects of {directory}:\n{result.stderr}"
    accepted = json_objects(result.stdout)
    assert Counter(map(identity, accepted)) == Counter(map(identity, objects))
    names = sorted(f"{o['kind']}/{o['metadata'].get('namespace', '-')}/{o['metadata']['name']}" for o in accepted)
    (tmp_path / "accepted.json").write_text(json.dumps(names, indent=1))
    print(f"the API server (Kubernetes 1.34.4) accepted {len(names)} objects of {directory.name}/:\n" +
          "\n".join(names))


def pod_of(workload: dict) -> dict:
    """The Pod a workload's controller would create (no controller runs here): its template, with each volume
    claim of a StatefulSet as the claim of its first replica."""
    template = copy.deepcopy(workload["spec"]["template"])
    name = workload["metadata"]["name"]
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        claim_name = claim["metadata"]["name"]
        template["spec"].setdefault("volumes", []).append(
            {"name": claim_name, "persistentVolumeClaim": {"claimName": f"{claim_name}-{name}-0"}})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**template["metadata"], "name": f"{name}-0", "namespace": workload["metadata"]["namespace"]},
            "spec": template["spec"]}


@pytest.mark.integration
def test_pod_security_admits_the_pod_of_every_workload(cluster, render):
    """Pod Security admission enforces a namespace's standard on Pods only: the dry run above sends
    Deployments, StatefulSets and a DaemonSet, which it lets through. So the Pod each of them would make is
    created with --dry-run=server: in dice-observability ("restricted") every one must pass, the edge with
    the one capability restricted allows (NET_BIND_SERVICE, which its caddy binary carries as a file
    capability); Beyla's and node-exporter's each in its "privileged" namespace."""
    objects = documents(render(K8S_DIR))
    cluster.ensure_namespaces(objects)
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objects if o["kind"] == "Namespace"}
    assert namespaces["dice-observability"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The ServiceAccount admission plugin refuses a Pod whose account does not exist: store them for real.
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    cluster.kubectl_ok("apply", "-f", "-", input=yaml.safe_dump_all(accounts))
    pods = [pod_of(o) for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    assert "edge" in {pod["metadata"]["labels"].get("app.kubernetes.io/name") for pod in pods}
    result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump_all(pods))
    assert result.returncode == 0, f"the API server (Pod Security admission) refused Pods of k8s/:\n{result.stderr}"
    accepted = json_objects(result.stdout)
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in accepted) == \
        sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods)
    (edge,) = [p for p in accepted if p["metadata"]["labels"].get("app.kubernetes.io/name") == "edge"]
    assert edge["metadata"]["namespace"] == "dice-observability"
    assert edge["spec"]["containers"][0]["securityContext"]["capabilities"] == {
        "drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    # The host agents are admitted in their "privileged" namespaces only: node-exporter's Pod (the node's
    # network, a hostPath of /) is refused where the rest of the stack runs, naming both reasons.
    (node,) = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/name") == "node-exporter"]
    assert node["metadata"]["namespace"] == "dice-observability-node-exporter"
    moved = {**node, "metadata": {**node["metadata"], "namespace": "dice-observability"}}
    refused = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(moved))
    assert refused.returncode != 0, "restricted admitted node-exporter's Pod"
    assert "violates PodSecurity" in refused.stderr and "hostNetwork" in refused.stderr \
        and "hostPath" in refused.stderr, refused.stderr
    print(f"Pod Security admitted {len(accepted)} Pods: " +
          ", ".join(sorted(f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in accepted)))


@pytest.mark.integration
@pytest.mark.parametrize("fixture", sorted(BROKEN))
def test_the_api_server_refuses_the_broken_fixtures(cluster, fixture):
    layers = BROKEN[fixture]
    result = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", BROKEN_DIR / fixture)
    if "apiserver" in layers:
        assert result.returncode != 0, f"the API server accepted {fixture}:\n{result.stdout}"
        assert re.search(layers["apiserver"], result.stderr), f"{fixture} refused for another reason:\n{result.stderr}"
        print(f"the API server refused {fixture}: {result.stderr.strip()}")
    elif "webhook" in layers and cluster.webhooks_registered:
        assert result.returncode != 0 and re.search(layers["webhook"], result.stderr), result.stderr
    else:
        assert result.returncode == 0, f"{fixture} passes the API server's own checks on purpose:\n{result.stderr}"


# ------------------------------------------------------------------------------------------ 3. the Operator


def env_list_to_dict(env: list[dict]) -> dict[str, str | dict]:
    return {var["name"]: var.get("value", var.get("valueFrom", "")) for var in env}


def instrumentation_for(annotation: str, namespace: str, instrumentations: list[dict]) -> dict:
    """The Instrumentation an inject annotation names, as the Operator picks it: "true" is the one
    Instrumentation of the Pod's namespace, otherwise a name or namespace/name."""
    def namespace_of(obj):
        return obj["metadata"].get("namespace", "default")
    if annotation == "true":
        candidates = [i for i in instrumentations if namespace_of(i) == namespace]
    else:
        ns, _, name = annotation.rpartition("/")
        candidates = [i for i in instrumentations
                      if i["metadata"]["name"] == name and namespace_of(i) == (ns or namespace)]
    assert len(candidates) == 1, f"{INJECT_PYTHON}: {annotation!r} in namespace {namespace} names " \
                                 f"{len(candidates)} of the rendered Instrumentations"
    return candidates[0]


def pod_template_hash(template: dict) -> str:
    """A stand-in for the ReplicaSet controller's hash, in the alphabet it uses (SafeEncodeString)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join("bcdfghjklmnpqrstvwxz2456789"[b % 27] for b in digest[:10])


def resolve_env(env: list[dict], pod: dict, rendered: list[dict]) -> dict[str, str]:
    """The app container's environment as its process would see it, with fieldRefs filled in for a run on
    127.0.0.1 and $(VAR) references expanded as the kubelet does; envFrom ConfigMaps of the rendered
    objects first (explicit env wins over them, as in Kubernetes)."""
    resolved: dict[str, str] = {}
    container = pod["spec"]["containers"][0]
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            (configmap,) = [o for o in rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref["name"]]
            resolved.update({source.get("prefix", "") + k: v for k, v in configmap.get("data", {}).items()})
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "spec.nodeName": "localhost",
              "metadata.uid": pod["metadata"].get("uid", "")}
    for var in env:
        if "valueFrom" in var:
            field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            value = fields.get(field, f"<{json.dumps(var['valueFrom'])}>")
        else:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: resolved.get(m[1], m[0]), var.get("value", ""))
        resolved[var["name"]] = value
    return resolved


def same_but_address(expected: str, actual: str) -> bool:
    """Equal, or both addresses (scheme://host:port…) with the same scheme and port: only the host differs."""
    address = re.compile(r"^(\w+)://[^:/]+(?::(\d+))?")
    a, b = address.match(expected), address.match(actual)
    return expected == actual or bool(a and b and a[1] == b[1] and a[2] == b[2])


def assert_own_app_env_is_the_hand_built_one(name: str, instrumentation: dict, mutated: dict, env: list[dict]):
    from tooling.k8s import injection as inj
    from tooling.native import own_app

    app = own_app.OwnApp(name)
    pod = inj.with_pod_name(app.pod(), mutated["metadata"]["name"])
    built = inj.operator_container_env(pod, instrumentation, app.container().get("env") or [])
    own = {var["name"]: var["value"] for var in app.container().get("env") or []}
    given = {var["name"]: var.get("value") for var in env}
    if "PYTHONPATH" in own:
        assert given["PYTHONPATH"] == f"{PYTHONPATH_PREFIX}:{own['PYTHONPATH']}:{MOUNT_PATH}", given["PYTHONPATH"]
    print(f"\n{name}: the webhook's env ({len(env)} variables) vs tooling/native/own_app.py's")
    assert inj.comparable_env(env) == inj.comparable_env(built)


@pytest.mark.integration
def test_the_operator_injects_python_into_the_app_pod(operator, render, tmp_path, tmp_path_factory):
    rendered = documents(render(K8S_DIR))
    # The users' own apps (examples/), each in its own namespace, injected by the stack's Instrumentation.
    examples = documents(render(EXAMPLES_DIR))
    operator.ensure_namespaces(rendered + examples)
    instrumentations = [o for o in rendered if o["kind"] == "Instrumentation"]
    assert instrumentations, "k8s/ renders no Instrumentation for the Operator"
    workloads = [o for o in rendered if o["kind"] == "Deployment" and INJECT_PYTHON in
                 (o["spec"]["template"]["metadata"].get("annotations") or {})]
    assert workloads, f"no Deployment of k8s/ has the {INJECT_PYTHON} annotation on its pod template"
    own_apps = [o for o in examples if o["kind"] == "Deployment"]
    assert own_apps and all(INJECT_PYTHON in (o["spec"]["template"]["metadata"].get("annotations") or {})
                            for o in own_apps), f"every Deployment of examples/ carries {INJECT_PYTHON}"

    # The ServiceAccounts the pods run as, and the Instrumentations, for real: the Instrumentations go through
    # the Operator's defaulting and validating webhooks.
    accounts = [o for o in rendered if o["kind"] == "ServiceAccount"]
    operator.kubectl_ok("apply", "-f", "-", input=yaml.safe_dump_all(accounts + instrumentations))
    for inst in instrumentations:
        stored = json.loads(operator.kubectl_ok("get", "instrumentation", inst["metadata"]["name"], "-n",
                                                inst["metadata"].get("namespace", "default"), "-o", "json"))
        # The defaulting webhook fills in the images of the languages a resource leaves out.
        assert stored["spec"].get("java", {}).get("image"), \
            f"the Operator's defaulting webhook did not run on Instrumentation {inst['metadata']['name']}"

    # The app's settings as compose gives them: app/app.env, then the cost profile .env names.
    app_env = {**load_env_file(APP_ENV),
               **load_env_file(APP_ENV.parent / f"profile-{load_env_file(DOTENV)['APP_PROFILE']}.env")}
    report = {}
    for deployment in workloads + own_apps:
        ours = deployment in workloads
        name = deployment["metadata"]["name"]
        namespace = deployment["metadata"].get("namespace", "default")
        template = copy.deepcopy(deployment["spec"]["template"])
        instrumentation = instrumentation_for(template["metadata"]["annotations"][INJECT_PYTHON], namespace,
                                              instrumentations)

        # What the Deployment and ReplicaSet controllers would do: a ReplicaSet owned by the Deployment, and a
        # Pod owned by the ReplicaSet (the Operator follows both owners to name the service).
        stored = json.loads(operator.kubectl_ok("apply", "-o", "json", "-f", "-", input=json.dumps(deployment)))
        hashed = pod_template_hash(template)
        labels = {**(template["metadata"].get("labels") or {}), "pod-template-hash": hashed}
        replicaset = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{name}-{hashed}", "namespace": namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                              "uid": stored["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"replicas": deployment["spec"].get("replicas", 1),
                     "selector": {"matchLabels": {**deployment["spec"]["selector"].get("matchLabels", {}),
                                                  "pod-template-hash": hashed}},
                     "template": {**template, "metadata": {**template["metadata"], "labels": labels}}},
        }
        stored_rs = json.loads(operator.kubectl_ok("create", "-o", "json", "-f", "-", input=json.dumps(replicaset)))
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {**template["metadata"], "name": f"{name}-{hashed}-{hashed[:5]}", "namespace": namespace,
                         "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": replicaset["metadata"]["name"],
                                              "uid": stored_rs["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": template["spec"],
        }
        mutated = json.loads(operator.kubectl_ok("create", "--dry-run=server", "-o", "json", "-f", "-",
                                                 input=json.dumps(pod)))
        spec = mutated["spec"]

        # The init container copies the instrumentation image's /autoinstrumentation into an emptyDir.
        (init,) = [c for c in spec.get("initContainers", []) if c["name"] == INIT_CONTAINER] or [None]
        assert init, f"the Operator did not inject Python into {name}'s Pod: {json.dumps(spec)[:3000]}"
        assert init["image"] == instrumentation["spec"]["python"]["image"]
        assert init["command"] == COPY_COMMAND
        volume_name = init["volumeMounts"][0]["name"]
        assert init["volumeMounts"][0]["mountPath"] == MOUNT_PATH
        (volume,) = [v for v in spec["volumes"] if v["name"] == volume_name]
        assert "emptyDir" in volume, volume
        app = spec["containers"][0]
        assert {"name": volume_name, "mountPath": MOUNT_PATH} in [
            {k: m[k] for k in ("name", "mountPath")} for m in app.get("volumeMounts", [])]

        env = app["env"]
        names = [var["name"] for var in env]
        assert len(names) == len(set(names)), f"duplicate variables: {names}"
        resolved = resolve_env(env, mutated, rendered)
        pythonpath = resolved["PYTHONPATH"]
        assert pythonpath.startswith(PYTHONPATH_PREFIX + ":") and pythonpath.endswith(":" + MOUNT_PATH), pythonpath

        # Every variable the Instrumentation sets reaches the app (the container's own env wins, as upstream).
        own = env_list_to_dict(template["spec"]["containers"][0].get("env", []))
        from_instrumentation = {**env_list_to_dict(instrumentation["spec"].get("env", [])),
                                **env_list_to_dict(instrumentation["spec"]["python"].get("env", []))}
        given = env_list_to_dict(env)
        for key, value in from_instrumentation.items():
            want = own.get(key, value)
            if key == "OTEL_RESOURCE_ATTRIBUTES":  # the Operator appends the Kubernetes attributes
                assert given.get(key, "").startswith(want), f"{key}: {given.get(key)!r} does not start with {want!r}"
            else:
                assert given.get(key) == want, f"{key}: {given.get(key)!r} != {want!r}"
        # What the Operator adds.
        for key in ("OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES",
                    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
                    "OTEL_LOGS_EXPORTER", "OTEL_NODE_IP", "OTEL_POD_IP"):
            assert key in resolved, f"{key} missing from the mutated Pod: {names}"
        attributes = dict(pair.split("=", 1) for pair in resolved["OTEL_RESOURCE_ATTRIBUTES"].split(",") if pair)
        assert attributes.get("k8s.deployment.name") == name, attributes
        assert attributes.get("k8s.namespace.name") == namespace, attributes
        assert attributes.get("k8s.pod.name") == mutated["metadata"]["name"], attributes
        assert attributes.get("k8s.replicaset.name") == replicaset["metadata"]["name"], attributes

        if not ours:
            # A user's app: the container's own env (Django's settings, its PYTHONPATH) stays, and the env is
            # the one tooling/native/own_app.py builds from the Operator's logic, which tests/own_app/ runs.
            assert_own_app_env_is_the_hand_built_one(name, instrumentation, mutated, env)
            report[f"{namespace}/{name}"] = {"pod": mutated["metadata"]["name"], "container": app["name"],
                                             "env": env}
            continue
        # app/app.env (with the profile's) is the one source of the settings: every one reaches the app, only
        # addresses differ, and the resource attributes keep app.env's beside the Kubernetes ones.
        for key, value in app_env.items():
            assert key in resolved, f"{key} of app/app.env does not reach {name}'s container"
            if key == "OTEL_RESOURCE_ATTRIBUTES":
                wanted = dict(pair.split("=", 1) for pair in value.split(",") if pair)
                assert wanted.items() <= attributes.items(), f"{key}: {attributes} lacks {wanted}"
            else:
                assert same_but_address(value, resolved[key]), f"{key}: {resolved[key]!r}, app/app.env: {value!r}"
        otel = sorted(key for key in resolved if key.startswith("OTEL_"))
        report[f"{namespace}/{name}"] = {"pod": mutated["metadata"]["name"], "container": app["name"],
                                         "image": app["image"], "init_image": init["image"], "env": env,
                                         "resolved": resolved, "otel_variables": otel}

    out = tmp_path / "mutated-pod-env.json"
    out.write_text(json.dumps(report, indent=2))
    # For tests/k8s/k8s_injection_checks.py (collected at the end of this file), which starts the app with
    # exactly this environment.
    (tmp_path_factory.getbasetemp() / CAPTURED_ENV_NAME).write_text(json.dumps(report, indent=2))
    print(f"mutated Pod environment ({out}):\n{json.dumps(report, indent=2)}")


@pytest.mark.integration
@pytest.mark.parametrize("fixture", [name for name, layers in sorted(BROKEN.items()) if "webhook" in layers])
def test_the_operator_webhook_refuses_what_only_it_checks(operator, fixture):
    result = operator.kubectl("apply", "--dry-run=server", "-n", "default", "-f", BROKEN_DIR / fixture)
    assert result.returncode != 0, f"the Operator's webhook accepted {fixture}:\n{result.stdout}"
    assert re.search(BROKEN[fixture]["webhook"], result.stderr), result.stderr
    print(f"the Operator's webhook refused {fixture}: {result.stderr.strip()}")


# ------------------------------------------------------------------------------------------ the build itself


@pytest.mark.integration
def test_the_binaries_are_the_pinned_versions(tools):
    def output(*cmd) -> str:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    client = json.loads(output(tools.kubectl, "version", "--client", "-o", "json"))["clientVersion"]
    assert (client["gitVersion"], client["major"], client["minor"]) == (recipes.KUBERNETES_VERSION, "1", "34")
    assert output(tools.kube_apiserver, "--version").split() == ["Kubernetes", recipes.KUBERNETES_VERSION]
    assert f"etcd Version: {recipes.ETCD_VERSION.removeprefix('v')}" in output(tools.etcd, "--version")
    assert output(tools.kubeconform, "-v").strip() == recipes.KUBECONFORM_VERSION
    for name in ("instrumentation-opentelemetry-v1alpha1.json", "opentelemetrycollector-opentelemetry-v1beta1.json"):
        assert (tools.crd_schemas / name).exists(), sorted(p.name for p in tools.crd_schemas.iterdir())
    assert json.loads((tools.crd_schemas / "instrumentation-opentelemetry-v1alpha1.json").read_text())[
        "additionalProperties"] is False, "the CRD schemas must be strict from the root"


# The injected run, chained to the webhook test above: tests/k8s/k8s_injection_checks.py starts the owners'
# command with the very env that test captured. Its tests are collected here, after this file's, so that
# both run in one module, in that order, on one pytest-xdist worker (`--dist loadfile`).
from k8s_injection_checks import *  # noqa: E402, F403
