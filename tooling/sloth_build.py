"""Sloth, the SLO rule generator, built from its official Go module.

`prometheus/slo/dice-slos.yaml` is a Sloth spec; `prometheus/rules/dice-slo.yaml` is what Sloth
generates from it, committed so that Prometheus and promtool need no Sloth. Sloth is needed only to
regenerate that file and for the test that fails when the committed file drifts from the spec
(tests/test_slo.py). It is compiled from `github.com/slok/sloth` at SLOTH_VERSION as served by the
Go module proxy (its go.mod has no `replace` lines, so a plain `go install` works: about 1 min 40 s on
2 cores with Go's caches cold), stamped with its version the way Sloth's own build script does, and
cached under ``.cache/sloth/<version>-<recipe hash>/``.

``python -m tooling.sloth_build`` prints the path of the binary, building it if needed;
``python -m tooling.sloth_build generate`` regenerates prometheus/rules/dice-slo.yaml from the spec.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tooling.gobuild import BUILD_ENV, cached_or_built, go_executable, publish_all, recipe_key, run_logged, work_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "sloth"
SPEC = REPO_ROOT / "prometheus" / "slo" / "dice-slos.yaml"
GENERATED = REPO_ROOT / "prometheus" / "rules" / "dice-slo.yaml"

MODULE = "github.com/slok/sloth"
SLOTH_VERSION = "v0.16.0"
PACKAGE = f"{MODULE}/cmd/sloth"
# As Sloth's scripts/build/bin/build-raw.sh: stripped, with the version in internal/info (without it
# `sloth version` says "dev" or the module version, depending on how it was built).
BUILD_FLAGS = ("-trimpath",)
LDFLAGS = ("-s", "-w")
VERSION_VARIABLE = f"{MODULE}/internal/info.Version"
# The SLO period, named rather than left to Sloth's default. Its alert windows are Sloth's built-in ones
# for 30 days (14.4x 1h/5m and 6x 6h/30m page, 3x 1d/2h and 1x 3d/6h ticket), which tests/test_slo.py
# checks in the generated rules.
SLO_PERIOD = "30d"
HEADER = """\
# GENERATED FILE, do not edit: Sloth {version} made it from prometheus/slo/dice-slos.yaml, the SLO spec.
# Edit the spec, then regenerate with
#   python -m tooling.sloth_build generate
# (builds Sloth from its Go module into .cache/sloth/ on first use). tests/test_slo.py fails when this
# file differs from what Sloth generates from the spec.
"""


class SlothBuildError(RuntimeError):
    """Sloth could not be built from its Go module."""


def ldflags(version: str) -> str:
    return " ".join([*LDFLAGS, f"-X {VERSION_VARIABLE}={version}"])


def recipe(version: str) -> dict:
    return {"package": PACKAGE, "version": version, "build_flags": list(BUILD_FLAGS), "ldflags": ldflags(version),
            "env": BUILD_ENV}


def cache_key(version: str) -> str:
    return recipe_key(version, recipe(version))


def binary_path(version: str = SLOTH_VERSION) -> Path:
    """Where the binary of `version` lives once built (it may not exist yet)."""
    return CACHE_DIR / cache_key(version) / "sloth"


def build(version: str = SLOTH_VERSION) -> Path:
    """`go install` Sloth `version` into a private directory, then publish it into the cache."""
    go = go_executable(SlothBuildError, f"to build Sloth {version} from {MODULE}")
    workdir = work_dir(CACHE_DIR, cache_key(version))
    log = workdir / "build.log"
    out = workdir / "bin"
    out.mkdir()
    env = {**os.environ, **BUILD_ENV, "GOBIN": str(out)}
    run_logged([go, "install", *BUILD_FLAGS, f"-ldflags={ldflags(version)}", f"{PACKAGE}@{version}"], log,
               SlothBuildError, f"building Sloth {version} ({PACKAGE}@{version}) with {go}", env=env, cwd=workdir)
    publish_all(out, [binary_path(version)], SlothBuildError, f"building Sloth {version} (log: {log})")
    shutil.rmtree(workdir, ignore_errors=True)
    return binary_path(version)


def sloth_binary(version: str = SLOTH_VERSION) -> Path:
    """The Sloth binary of `version`; builds it if not cached."""
    (target,) = cached_or_built([binary_path(version)], lambda: [build(version)])
    return target


def generate(spec: Path = SPEC, sloth: Path | None = None, period: str = SLO_PERIOD,
             windows_dir: Path | None = None, extra_labels: dict[str, str] | None = None) -> str:
    """The rules file Sloth generates from `spec`, with this repo's header in front of Sloth's own.

    `period` other than Sloth's built-in 30d needs `windows_dir`, a directory of AlertWindows specs
    (tooling/alert_drills.py makes time-compressed ones for tests); `extra_labels` go on every rule."""
    sloth = sloth or sloth_binary()
    args = [str(sloth), "generate", f"--input={spec}", "--out=-", f"--default-slo-period={period}"]
    if windows_dir is not None:
        args.append(f"--slo-period-windows-path={windows_dir}")
    args += [f"--extra-labels={key}={value}" for key, value in (extra_labels or {}).items()]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SlothBuildError(f"sloth generate -i {spec} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    # Sloth starts its output with a YAML document marker; one document needs none.
    rules = result.stdout.removeprefix("\n").removeprefix("---\n")
    return HEADER.format(version=SLOTH_VERSION) + rules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not binary_path().exists():
            print(f"building Sloth {SLOTH_VERSION} from {MODULE} (about 2 minutes the first time)...",
                  file=sys.stderr)
        if argv == ["generate"]:
            GENERATED.write_text(generate())
            print(f"wrote {GENERATED.relative_to(REPO_ROOT)} from {SPEC.relative_to(REPO_ROOT)}")
        elif not argv:
            print(sloth_binary())
        else:
            print("usage: python -m tooling.sloth_build [generate]", file=sys.stderr)
            return 2
    except SlothBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
