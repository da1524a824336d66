"""Any user's Python image, observed natively as the OpenTelemetry Operator would observe its pod.

An example app (examples/<name>/) is what a user brings: a Dockerfile that installs their pinned
requirements.txt and serves the app with their own command, and the Kubernetes Deployment they already have,
with one annotation added (instrumentation.opentelemetry.io/inject-python). Nothing of ours is in either.

Natively, from those very files:

- `app_python()`: a virtualenv with the app's requirements.txt (its image's site-packages, no OpenTelemetry),
  and the image's own setup run in its working folder: every RUN after the Dockerfile's USER instruction is the
  app's setup as the user that serves it (Wagtail's `wagtail start`, `migrate`, `collectstatic`); before USER
  come the root steps (the pip install, done as the venv; `useradd`, which a native process does not need).
  Cached under .cache/own-apps/, keyed by the requirements, those steps and the Python.
- `pod_environment()`: the image's ENV, then the Deployment container's env as the Operator's webhook leaves it
  (`tooling.k8s.injection.operator_container_env`, its own PYTHONPATH kept between the layout's folders as the
  Operator keeps it), resolved as the kubelet does; only addresses and the layout's path are mapped here.
- `command()`: the Dockerfile's CMD, run by the app's Python, its listen address moved to 127.0.0.1:<port>.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tooling.config import REPO_ROOT
from tooling.k8s import injection as inj
from tooling.native.container import instructions

EXAMPLES = REPO_ROOT / "examples"
CACHE_DIR = REPO_ROOT / ".cache" / "own-apps"
INJECT_ANNOTATION = "instrumentation.opentelemetry.io/inject-python"


@dataclass(frozen=True)
class OwnApp:
    """One example under examples/<name>/: Dockerfile, requirements.txt, deployment.yaml, locustfile.py."""

    name: str

    @property
    def folder(self) -> Path:
        return EXAMPLES / self.name

    @property
    def dockerfile(self) -> Path:
        return self.folder / "Dockerfile"

    @property
    def requirements(self) -> Path:
        return self.folder / "requirements.txt"

    @property
    def locustfile(self) -> Path:
        return self.folder / "locustfile.py"

    @property
    def manifest(self) -> Path:
        return self.folder / "deployment.yaml"

    # ------------------------------------------------------------------------------ the Dockerfile

    def instructions(self) -> list[str]:
        return [instruction for _, instruction in instructions(self.dockerfile.read_text())]

    def _keyword(self, keyword: str) -> list[str]:
        return [i.partition(" ")[2] for i in self.instructions() if i.split(None, 1)[0].upper() == keyword]

    def image_env(self) -> dict[str, str]:
        return inj.stage_env(self.instructions())

    def setup_commands(self) -> list[str]:
        """The RUN lines after USER: the app's own setup, as the user that serves it."""
        found, after_user = [], False
        for instruction in self.instructions():
            keyword, _, rest = instruction.partition(" ")
            after_user = after_user or keyword.upper() == "USER"
            if after_user and keyword.upper() == "RUN":
                found.append(rest)
        return found

    def workdir(self) -> str:
        return self._keyword("WORKDIR")[-1]

    def exposed_port(self) -> int:
        (port,) = self._keyword("EXPOSE")
        return int(port.split("/")[0])

    def cmd(self) -> list[str]:
        *_, cmd = self._keyword("CMD")
        return json.loads(cmd)

    # ------------------------------------------------------------------------------ the Deployment

    def deployment(self) -> dict:
        import yaml

        (deployment,) = [d for d in yaml.safe_load_all(self.manifest.read_text())
                         if d and d.get("kind") == "Deployment"]
        return deployment

    def container(self) -> dict:
        return self.deployment()["spec"]["template"]["spec"]["containers"][0]

    def pod(self, namespace: str = "default") -> inj.PodIdentity:
        deployment = self.deployment()
        template = deployment["spec"]["template"]
        container = self.container()
        return inj.PodIdentity(namespace=deployment["metadata"].get("namespace", namespace),
                               deployment=deployment["metadata"]["name"], container=container["name"],
                               image=container["image"],
                               annotations=dict(template["metadata"].get("annotations") or {}))

    @property
    def service_name(self) -> str:
        pod = self.pod()
        return pod.annotations.get(f"{inj.RESOURCE_ANNOTATION}service.name") or pod.deployment


def examples() -> list[OwnApp]:
    return [OwnApp(path.name) for path in sorted(EXAMPLES.iterdir()) if (path / "locustfile.py").is_file()]


# ---------------------------------------------------------------------------------------- the app's Python

def _key(app: OwnApp) -> str:
    digest = hashlib.sha256(app.requirements.read_bytes())
    digest.update(json.dumps([app.setup_commands(), inj._python_tag()]).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class AppPython:
    bin: Path
    site: Path  # the image's WORKDIR, with what the app's setup made there


def app_python(app: OwnApp, cache_dir: Path = CACHE_DIR, log=print) -> AppPython:
    """The app's image natively: a virtualenv with its requirements.txt and its setup run in `site`."""
    # The real path: a virtualenv's scripts name their Python by the path it was made at (shebangs), so one
    # made through a checkout's symlinked .cache breaks once that checkout is gone.
    home = (cache_dir / f"{app.name}-{_key(app)}").resolve()
    result = AppPython(home / "venv" / "bin", home / "site")
    if (home / ".complete").exists() and _scripts_run(result.bin):
        return result
    shutil.rmtree(home, ignore_errors=True)
    result.site.mkdir(parents=True)
    log(f"creating {app.name}'s Python and site: {home}")
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True, timeout=300)
    env = {**os.environ, **app.image_env()}
    _run([str(result.bin / "pip"), "install", "-r", str(app.requirements)], env, result.site)
    env["PATH"] = f"{result.bin}{os.pathsep}{env['PATH']}"
    for command in app.setup_commands():
        _run(["/bin/sh", "-c", command], env, result.site)
    (home / ".complete").write_text("")
    return result


def _scripts_run(bin_dir: Path) -> bool:
    """Whether the virtualenv's scripts still name a Python that exists (the pip script's shebang)."""
    try:
        first = (bin_dir / "pip").read_text().splitlines()[0]
    except (OSError, IndexError):
        return False
    return first.startswith("#!") and Path(first[2:].split()[0]).exists()


def _run(argv: list[str], env: dict, cwd: Path) -> None:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# ------------------------------------------------------------------------------------- the pod, natively

def command(app: OwnApp, python: AppPython, port: int, argv: list[str] | None = None) -> list[str]:
    """The image's CMD (or `argv`, another server for the same image), run by the app's Python, listening on
    127.0.0.1:`port` instead of the image's 0.0.0.0:<EXPOSE>."""
    exposed = str(app.exposed_port())
    mapped = []
    for word in argv or app.cmd():
        word = word.replace("0.0.0.0", "127.0.0.1")
        if word == exposed:
            word = str(port)
        elif word.endswith(f":{exposed}"):
            word = f"{word[: -len(exposed)]}{port}"
        mapped.append(word)
    executable = python.bin / mapped[0]
    return [str(executable) if executable.exists() else mapped[0], *mapped[1:]]


def pod_environment(app: OwnApp, python: AppPython, layout: Path, addresses: dict[tuple[str, int], str],
                    instrumentation: dict | None = None, mutated_env: list[dict] | None = None,
                    ) -> tuple[dict[str, str], list[dict]]:
    """(what the app's process sees, the container's env list) for the app's pod, natively.

    The container's env is `mutated_env` when given (captured from the real webhook), else the Operator's
    logic applied to the Deployment's own env. Resolved over the image's ENV and PATH with the app's Python."""
    pod = app.pod()
    env_list = mutated_env or inj.operator_container_env(
        pod, instrumentation or inj.instrumentation_resource(), app.container().get("env") or [])
    environment = inj.kubelet_resolve(env_list, inj.image_environment(python.bin, app.image_env()), pod)
    for key, value in list(environment.items()):
        environment[key] = inj.map_addresses(value, addresses)
    # The mount and the image's WORKDIR, as this machine has them.
    environment["PYTHONPATH"] = inj.local_paths(environment["PYTHONPATH"],
                                                {inj.MOUNT_PATH: layout, app.workdir(): python.site})
    return environment, env_list
