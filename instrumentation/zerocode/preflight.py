"""Is it safe to start the injected OpenTelemetry in this process? Checked before anything of it is imported.

The OpenTelemetry Operator puts our instrumentation image's folder (the "layout") on the app's PYTHONPATH,
ahead of the app's own site-packages. Every distribution the layout shares with the app is then ours in the
app's process: an app that pins protobuf 3.20.3 imports our protobuf 7 and dies at import with "Descriptors
cannot be created directly". The layout's sitecustomize.py (instrumentation/sitecustomize.py) calls `run()`
first; when it finds a conflict, the app starts uninstrumented (Beyla and the edge still observe it), with one
log line on stderr that names the packages and versions.

What counts as a conflict, for each distribution both sides have, the first one on sys.path being the one
that is imported:

- ours shadows the app's with a different major version (packaging's major is a year, so not that one), or an
  older minor version: the app may use what came after ours, and protobuf and grpc generated code refuses an
  older runtime at import; for opentelemetry-* any difference at all, in either direction;
- a Requires-Dist of one side that the other side's winning copy does not satisfy (e.g. the app's pydantic
  needs typing-extensions>=4.14.1 and ours is older);
- an injected compiled wheel whose tags do not fit this interpreter (cp311 on Python 3.12, manylinux on musl
  or an older glibc), and an injected distribution whose Requires-Python this Python does not meet.

ZEROCODE_PREFLIGHT: `strict` (the default) starts the app uninstrumented on a conflict; `warn` logs the same
line and instruments anyway; `off` skips the check.

Only the standard library, and no importlib.metadata (29 ms to import, and it would read every METADATA in
full): nothing of the layout may be in sys.modules before the verdict, or the app would get our copy anyway.
The check reads file names and the header block of METADATA files, and costs a few milliseconds, once per
interpreter (gunicorn's forked workers inherit the verdict). It runs on Python 3.8 too (no newer syntax), so
that an old app image gets this message rather than a SyntaxError.
"""

from __future__ import annotations

import os
import re
import sys

POLICY_VARIABLE = "ZEROCODE_PREFLIGHT"
POLICIES = ("strict", "warn", "off")
PREFIX = "zerocode preflight"
CALENDAR_VERSIONED = frozenset({"packaging"})  # YY.N: a new major is a new year, not a breaking change
MAX_REASONS = 6  # one log line stays readable: the rest are counted

# The layout: the folder that holds zerocode/ (and every injected distribution's dist-info).
LAYOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


# ------------------------------------------------------------------------------------------ versions

_VERSION = re.compile(
    r"v?(?:(\d+)!)?(\d+(?:\.\d+)*)"
    r"(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d*))?"
    r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?"
    r"(?:[-_.]?dev[-_.]?(\d*))?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple:
    """The release numbers (1, 2, 3) of a version, or () when it is not a PEP 440 version."""
    match = _VERSION.fullmatch(version.strip())
    return tuple(int(part) for part in match.group(2).split(".")) if match else ()


def version_key(version: str) -> tuple:
    """A sortable key in PEP 440 order (dev < pre-releases < final < post); ValueError if not PEP 440."""
    match = _VERSION.fullmatch(version.strip())
    if not match:
        raise ValueError(f"not a PEP 440 version: {version!r}")
    epoch, numbers, pre, pre_n, post_implicit, post_n, dev_n = match.groups()
    parts = [int(part) for part in numbers.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    is_post = post_implicit is not None or post_n is not None  # "" when the number is left out
    is_dev = dev_n is not None
    if pre:
        pre_key = (_PRE_RANK[pre.lower()], int(pre_n or 0))
    elif is_dev and not is_post:
        pre_key = (-1, 0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre_key = (3, 0)
    post_key = int(post_implicit or post_n or 0) if is_post else -1
    dev_key = int(dev_n or 0) if is_dev else float("inf")
    return (int(epoch or 0), tuple(parts), pre_key, post_key, dev_key)


def _is_prerelease(version: str) -> bool:
    key = version_key(version)
    return key[2] != (3, 0) or key[4] != float("inf")


def satisfies(version: str, specifier: str) -> bool | None:
    """Whether `version` meets a specifier set such as ">=3.19,<5" (PEP 440, installed pre-releases count);
    None when a clause cannot be read here, so that the caller skips it rather than guess."""
    try:
        for clause in (c.strip() for c in specifier.split(",")):
            if clause and not _meets(version, clause):
                return False
        return True
    except (ValueError, KeyError, IndexError):
        return None


def _meets(version: str, clause: str) -> bool:
    match = re.fullmatch(r"(===|~=|==|!=|<=|>=|<|>)\s*(\S+)", clause)
    if not match:
        raise ValueError(f"unreadable clause {clause!r}")
    operator, wanted = match.groups()
    if operator == "===":
        return version.strip().lower() == wanted.lower()
    if operator in ("==", "!=") and wanted.endswith(".*"):
        prefix = release(wanted[:-2])
        have = release(version)
        if not prefix or not have:
            raise ValueError(f"unreadable clause {clause!r}")
        have = have + (0,) * max(0, len(prefix) - len(have))
        return (have[:len(prefix)] == prefix) == (operator == "==")
    mine, theirs = version_key(version), version_key(wanted.split("+", 1)[0])
    if operator in ("==", "!="):  # a local label (+ubuntu1) is not part of the key
        return (mine == theirs) == (operator == "==")
    if operator == ">=":
        return mine >= theirs
    if operator == "<=":
        return mine <= theirs
    if operator == ">":
        # PEP 440: >1.0 does not match 1.0.post1.
        return mine > theirs and not (mine[1] == theirs[1] and mine[3] >= 0 and theirs[3] < 0)
    if operator == "<":
        # PEP 440: <2.0 does not match 2.0rc1, unless the bound itself is a pre-release.
        return mine < theirs and not (mine[1] == theirs[1] and not _is_prerelease(wanted) and _is_prerelease(version))
    # ~=1.4.5 is >=1.4.5,==1.4.*
    numbers = release(wanted)
    if len(numbers) < 2:
        raise ValueError(f"~= needs two release numbers: {clause!r}")
    prefix = ".".join(str(n) for n in numbers[:-1])
    return _meets(version, f">={wanted}") and _meets(version, f"=={prefix}.*")


# ---------------------------------------------------------------------------- environment markers

def _marker_environment() -> dict:
    info = sys.version_info
    full = f"{info.major}.{info.minor}.{info.micro}"
    if info.releaselevel != "final":
        full += {"alpha": "a", "beta": "b", "candidate": "rc"}.get(info.releaselevel, "") + str(info.serial)
    implementation = sys.implementation
    impl_version = f"{implementation.version.major}.{implementation.version.minor}.{implementation.version.micro}"
    uname = os.uname() if hasattr(os, "uname") else None
    return {
        "python_version": f"{info.major}.{info.minor}", "python_full_version": full,
        "os_name": os.name, "sys_platform": sys.platform,
        "platform_system": uname.sysname if uname else "", "platform_machine": uname.machine if uname else "",
        "platform_release": uname.release if uname else "", "platform_version": uname.version if uname else "",
        "platform_python_implementation": {"cpython": "CPython", "pypy": "PyPy"}.get(
            implementation.name, implementation.name),
        "implementation_name": implementation.name, "implementation_version": impl_version,
    }


_MARKER_TOKEN = re.compile(
    r"\s*(\(|\)|===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b|and\b|or\b|'[^']*'|\"[^\"]*\"|[A-Za-z_.]+)")
_VERSION_VARIABLES = ("python_version", "python_full_version", "implementation_version", "platform_release")


def marker_applies(marker: str, environment: dict) -> bool:
    """An environment marker evaluated here; ValueError for what it cannot read (extras included: which
    extras of a distribution were installed is not recorded, so such a requirement is skipped)."""
    tokens, position = [], 0
    while position < len(marker.rstrip()):
        match = _MARKER_TOKEN.match(marker, position)
        if not match:
            raise ValueError(f"unreadable marker {marker!r}")
        tokens.append(re.sub(r"\s+", " ", match.group(1)))
        position = match.end()
    result, rest = _marker_or(tokens, environment)
    if rest:
        raise ValueError(f"unreadable marker {marker!r}")
    return result


def _marker_or(tokens: list, environment: dict) -> tuple:
    value, tokens = _marker_and(tokens, environment)
    while tokens and tokens[0] == "or":
        right, tokens = _marker_and(tokens[1:], environment)
        value = value or right
    return value, tokens


def _marker_and(tokens: list, environment: dict) -> tuple:
    value, tokens = _marker_atom(tokens, environment)
    while tokens and tokens[0] == "and":
        right, tokens = _marker_atom(tokens[1:], environment)
        value = value and right
    return value, tokens


def _marker_atom(tokens: list, environment: dict) -> tuple:
    if tokens and tokens[0] == "(":
        value, tokens = _marker_or(tokens[1:], environment)
        if not tokens or tokens[0] != ")":
            raise ValueError("unbalanced parentheses")
        return value, tokens[1:]
    if len(tokens) < 3:
        raise ValueError("incomplete comparison")
    left, operator, right = tokens[:3]

    def resolve(token: str) -> tuple:
        if token[0] in "'\"":
            return token[1:-1], None
        if token not in environment:
            raise ValueError(f"unknown marker variable {token!r}")
        return environment[token], token

    (left_value, left_name), (right_value, right_name) = resolve(left), resolve(right)
    if operator in ("in", "not in"):
        return (left_value in right_value) == (operator == "in"), tokens[3:]
    if {left_name, right_name} & set(_VERSION_VARIABLES):
        if left_name is None:  # '3.8' < python_version: turn it around
            operator = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(operator, operator)
            left_value, right_value = right_value, left_value
        met = satisfies(left_value, f"{operator}{right_value}")
        if met is None:
            raise ValueError("unreadable version comparison")
        return met, tokens[3:]
    if operator == "==":
        return left_value == right_value, tokens[3:]
    if operator == "!=":
        return left_value != right_value, tokens[3:]
    raise ValueError(f"{operator} between strings")


def requirement(line: str, environment: dict) -> tuple | None:
    """(normalised name, specifier text) of a Requires-Dist line that applies here; None when it does not
    apply (its marker is false, or names an extra) or cannot be read."""
    text, _, marker = line.partition(";")
    if marker.strip():
        if "extra" in marker:
            return None
        try:
            if not marker_applies(marker.strip(), environment):
                return None
        except (ValueError, IndexError):
            return None
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*", text)
    if not match or "@" in match.group(2):
        return None
    return normalise(match.group(1)), match.group(2).strip("() ")


# --------------------------------------------------------------------------------- distributions

class Distribution:
    """An installed distribution as its folder says, with its METADATA headers read only when asked."""

    def __init__(self, folder: str, name: str, version: str):
        self.folder, self.name, self.version = folder, name, version
        self._headers = None

    def __repr__(self):
        return f"Distribution({self.name} {self.version} in {self.folder})"

    def headers(self) -> dict:
        """{header: [values]} of the metadata's header block (METADATA, or an egg-info's PKG-INFO)."""
        if self._headers is None:
            self._headers = {}
            for file_name in ("METADATA", "PKG-INFO"):
                try:
                    self._headers = read_headers(os.path.join(self.folder, file_name))
                    break
                except OSError:
                    continue
        return self._headers

    def requires(self) -> list:
        if self.folder.endswith(".egg-info"):
            return _egg_requires(os.path.join(self.folder, "requires.txt"))
        return self.headers().get("requires-dist", [])

    def wheel_tags(self) -> list:
        try:
            return read_headers(os.path.join(self.folder, "WHEEL")).get("tag", [])
        except OSError:
            return []


def read_headers(path: str) -> dict:
    """The header block of an email-style metadata file (what comes before its first blank line)."""
    with open(path, "rb") as file:
        data = file.read()
    block = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", errors="replace")
    headers: dict = {}
    last = None
    for line in block.split("\n"):
        if line[:1] in (" ", "\t") and last:  # a folded continuation line
            headers[last][-1] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip().lower()
            headers.setdefault(last, []).append(value.strip())
    return headers


def _egg_requires(path: str) -> list:
    # requires.txt: unconditional requirements first, then [extra] or [:marker] sections, skipped here.
    found = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in file:
                line = line.strip()
                if line.startswith("["):
                    break
                if line and not line.startswith("#"):
                    found.append(line)
    return found


def distributions_in(folder: str) -> list:
    """The distributions installed in one sys.path folder (none for a zip or a missing folder)."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        stem, dot, kind = entry.name.rpartition(".")
        if not dot or kind not in ("dist-info", "egg-info"):
            continue
        name, _, version = stem.partition("-")
        version = version.split("-", 1)[0]  # an egg-info's "-py3.11" tail
        dist = Distribution(entry.path, normalise(name), version)
        if not version or not entry.is_dir():
            try:
                headers = dist.headers() if entry.is_dir() else read_headers(entry.path)
            except OSError:
                continue
            if not headers.get("name") or not headers.get("version"):
                continue
            dist = Distribution(entry.path, normalise(headers["name"][0]), headers["version"][0])
        found.append(dist)
    return found


def inside(path: str, folder: str) -> bool:
    real = os.path.realpath(path or os.getcwd())
    return real == folder or real.startswith(folder + os.sep)


# ------------------------------------------------------------------------------------ the checks

class Installed:
    """The distributions on a sys.path, the app's (its folders) and the injected ones (the layout's), first
    copy of each name on each side, and for each name whether the copy every import gets is ours."""

    def __init__(self, path: list, layout: str = LAYOUT):
        self.app, self.injected, self.ours_first = {}, {}, {}
        for folder in path:
            ours = inside(folder, layout)
            for dist in distributions_in(folder or os.getcwd()):
                side = self.injected if ours else self.app
                if dist.name not in side:
                    side[dist.name] = dist
                self.ours_first.setdefault(dist.name, ours)


def shadowing_conflicts(installed: Installed) -> list:
    """Reasons, for each distribution both sides hold, by which copy wins."""
    app, injected, winner_is_ours = installed.app, installed.injected, installed.ours_first
    reasons = []
    for name in sorted(set(app) & set(injected)):
        ours, theirs = injected[name], app[name]
        if ours.version == theirs.version:
            continue
        if not winner_is_ours[name]:
            if name.startswith("opentelemetry-"):
                reasons.append(f"the injected {name} {ours.version} would be shadowed by the app's own "
                               f"{theirs.version} (OpenTelemetry packages must be one release)")
            continue
        shadowed = f"the app's {name} {theirs.version} would be shadowed by the injected {ours.version}"
        mine, its = release(ours.version), release(theirs.version)
        if name.startswith("opentelemetry-"):
            reasons.append(f"{shadowed} (OpenTelemetry packages must be one release)")
        elif not mine or not its:
            reasons.append(f"{shadowed} (versions not comparable)")
        elif mine[0] != its[0] and name not in CALENDAR_VERSIONED:
            reasons.append(f"{shadowed} (major {its[0]} != {mine[0]})")
        elif (mine + (0,))[:2] < (its + (0,))[:2]:
            reasons.append(f"{shadowed} (older than the app's)")
    return reasons


def requirement_conflicts(installed: Installed, environment: dict | None = None) -> list:
    """Reasons, for each Requires-Dist of one side that the other side's copy, the one imported, does not
    satisfy. A side's requirements on its own copies are its own business, and not looked at."""
    environment = environment or _marker_environment()
    app, injected, winner_is_ours = installed.app, installed.injected, installed.ours_first
    reasons = []
    for side, other, other_is_ours in ((app, injected, True), (injected, app, False)):
        for dist in side.values():
            if dist.name in other and winner_is_ours[dist.name] == other_is_ours:
                continue  # this copy is itself shadowed: its requirements never matter
            for line in dist.requires():
                parsed = requirement(line, environment)
                if not parsed or parsed[0] not in other or winner_is_ours[parsed[0]] != other_is_ours:
                    continue
                name, specifier = parsed
                met = satisfies(other[name].version, specifier)
                if met is False:
                    whose, its = ("the app's", "the injected") if other_is_ours else ("the injected", "the app's")
                    reasons.append(f"{whose} {dist.name} {dist.version} requires {name}{specifier}, "
                                   f"{its} is {other[name].version}")
    return sorted(set(reasons))


def libc() -> tuple:
    """("glibc", (2, 36)), ("musl", ()) or ("", ()) for this process."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        text = ""
    name, _, version = text.partition(" ")
    if name == "glibc":
        return "glibc", release(version)
    for folder in ("/lib", "/usr/lib"):
        try:
            if any(entry.startswith("ld-musl-") for entry in os.listdir(folder)):
                return "musl", ()
        except OSError:
            pass
    return "", ()


def interpreter() -> dict:
    """What a wheel tag is held against: this CPython's cpXY and ABI, the machine and the libc."""
    info = sys.version_info
    return {
        "implementation": sys.implementation.name, "python": (info.major, info.minor),
        "version": f"{info.major}.{info.minor}.{info.micro}",
        "abi": f"cp{info.major}{info.minor}{getattr(sys, 'abiflags', '')}",
        "machine": os.uname().machine if hasattr(os, "uname") else "", "platform": sys.platform,
        "libc": libc(),
    }


def tag_fits(tag: str, this: dict) -> bool:
    """Whether a wheel tag (py3-none-any, cp311-cp311-manylinux_2_17_x86_64, cp39-abi3-musllinux_1_2_aarch64,
    each part possibly dotted) installs on `this` interpreter."""
    pythons, abis, platforms = (part.split(".") for part in tag.split("-"))
    cpython = this["implementation"] == "cpython"
    major, minor = this["python"]

    def python_fits(python: str, abi: str) -> bool:
        if abi == "abi3":
            match = re.fullmatch(r"cp(\d)(\d+)", python)
            return cpython and bool(match) and (int(match.group(1)), int(match.group(2))) <= (major, minor)
        if python in ("py3", f"py{major}{minor}", f"py{major}"):
            return abi == "none"
        return cpython and python == f"cp{major}{minor}" and abi in ("none", this["abi"])

    def platform_fits(platform: str) -> bool:
        if platform == "any":
            return True
        legacy = {"manylinux1": "manylinux_2_5", "manylinux2010": "manylinux_2_12", "manylinux2014": "manylinux_2_17"}
        for old, new in legacy.items():
            if platform.startswith(old + "_"):
                platform = new + platform[len(old):]
        family, libc_name = this["libc"]
        match = re.fullmatch(r"(manylinux|musllinux)_(\d+)_(\d+)_(.+)", platform)
        if match and this["platform"].startswith("linux"):
            wanted = (int(match.group(2)), int(match.group(3)))
            if match.group(4) != this["machine"]:
                return False
            if match.group(1) == "manylinux":
                return family == "glibc" and libc_name[:2] >= wanted
            return family == "musl"
        return platform == f"linux_{this['machine']}" and this["platform"].startswith("linux")

    return any(python_fits(p, a) and platform_fits(f) for p in pythons for a in abis for f in platforms)


def abi_conflicts(injected: list, this: dict | None = None) -> list:
    """At most two reasons: the injected compiled wheels whose tags do not fit this interpreter or libc, and
    the injected distributions whose Requires-Python this Python does not meet (one per kind: on another
    Python, most of the layout fails at once)."""
    this = this or interpreter()
    family, version = this["libc"]
    where = f"{this['implementation']} {this['version']} ({this['abi']}) on {family or 'an unknown libc'}" + (
        " " + ".".join(map(str, version)) if version else "") + f" {this['machine']}"
    unfit, too_new = [], []
    for dist in sorted(injected, key=lambda d: d.name):
        tags = [tag for tag in dist.wheel_tags() if tag.count("-") == 2]
        if tags and not any(tag_fits(tag, this) for tag in tags):
            unfit.append(f"{dist.name} {dist.version} ({tags[0]})")
            continue
        for specifier in dist.headers().get("requires-python", [])[:1]:
            if satisfies(this["version"], specifier) is False:
                too_new.append(f"{dist.name} {dist.version} (Python {specifier})")
    reasons = []
    if unfit:
        reasons.append(f"the injected {_some(unfit)} {'is' if len(unfit) == 1 else 'are'} built for another "
                       f"interpreter than this {where}")
    if too_new:
        reasons.append(f"the injected {_some(too_new)} {'needs' if len(too_new) == 1 else 'need'} another "
                       f"Python than this {this['version']}")
    return reasons


def _some(items: list, shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def conflicts(path: list | None = None, layout: str = LAYOUT) -> list:
    installed = Installed(list(sys.path if path is None else path), layout)
    imported = [dist for name, dist in installed.injected.items() if installed.ours_first[name]]
    return abi_conflicts(imported) + shadowing_conflicts(installed) + requirement_conflicts(installed)


# ------------------------------------------------------------------------------------- the verdict

def service_name(environ) -> str:
    name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if not name:
        for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
            key, _, value = pair.partition("=")
            if key.strip() == "service.name" and value.strip():
                name = value.strip()
    argv = getattr(sys, "argv", None) or [""]
    return name or os.path.basename(argv[0]) or "this process"


def remove_layout_from_path(environ, layout: str = LAYOUT) -> None:
    """The layout off sys.path, and off PYTHONPATH so that the app's children (subprocesses, spawned
    workers) start without it too."""
    sys.path[:] = [entry for entry in sys.path if not inside(entry, layout)]
    python_path = environ.get("PYTHONPATH")
    if python_path is not None:
        kept = [entry for entry in python_path.split(os.pathsep) if entry and not inside(entry, layout)]
        if kept:
            environ["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del environ["PYTHONPATH"]


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - no stderr (closed by a daemon): nothing more can be said
        pass


def run(environ=os.environ, layout: str = LAYOUT) -> bool:
    """The verdict for this process: True to initialise the injected OpenTelemetry, False to start the app
    without it (the layout then taken off sys.path and PYTHONPATH). Never raises."""
    policy = environ.get(POLICY_VARIABLE, "").strip().lower() or "strict"
    if policy == "off":
        return True
    if policy not in POLICIES:
        _say(f"{PREFIX}: {POLICY_VARIABLE}={environ.get(POLICY_VARIABLE)!r} is not one of "
             f"{', '.join(POLICIES)}; using strict")
        policy = "strict"
    try:
        reasons = conflicts(layout=layout)
    except Exception as error:  # noqa: BLE001 - a bug of ours must not stop the app
        # Unchecked is not known to be safe, and what an unsafe injection breaks is the app at import; the
        # app started without us is still seen by Beyla and the edge. So strict stays strict.
        reasons = [f"the check itself failed ({type(error).__name__}: {error})"]
    if not reasons:
        return True
    shown = "; ".join(reasons[:MAX_REASONS]) + (
        f"; and {len(reasons) - MAX_REASONS} more" if len(reasons) > MAX_REASONS else "")
    who = f"{service_name(environ)} (pid {os.getpid()})"
    if policy == "warn":
        _say(f"{PREFIX}: instrumenting {who} despite: {shown}. {POLICY_VARIABLE}=warn; unset it to start "
             f"the app uninstrumented instead.")
        return True
    try:
        remove_layout_from_path(environ, layout)
    except Exception as error:  # noqa: BLE001
        shown += f" (and the layout could not be taken off the path: {type(error).__name__}: {error})"
    _say(f"{PREFIX}: not instrumenting {who}: {shown}. Set {POLICY_VARIABLE}=warn to instrument anyway.")
    return False
