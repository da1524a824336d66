"""Start Pyroscope continuous profiling from outside the app.

`opentelemetry-instrument` calls :func:`post_instrument` (entry point group
``opentelemetry_post_instrument``) after the SDK providers and instrumentors exist and before the app is
imported. The hook reads its settings from the environment, because pyroscope-io reads none itself:

=============================  ==========================================================  =========
setting                        meaning                                                     default
=============================  ==========================================================  =========
PYROSCOPE_SERVER_ADDRESS       where profiles are pushed; unset turns profiling off        (unset)
PYROSCOPE_TAGS                 extra series labels, ``key=value,key=value``                none
PYROSCOPE_UPLOAD_INTERVAL      seconds between uploads; what is pending at exit is lost    10
PYROSCOPE_SAMPLE_RATE          samples per second                                          100
PYROSCOPE_SPAN_PROFILES        ``true``/``false``: label samples with the root span's id    true
                               (Grafana's trace-to-profile link); ``false`` saves its
                               per-span work (README, "What observing costs")
=============================  ==========================================================  =========

The application name is the OTel ``service.name``, so Grafana's trace-to-profile link matches. Nothing
here may ever crash or block the app: bad settings are logged as warnings that name the setting.

Every worker gets its own agent, however the server made it, and no process gets two:

- a process where the hook runs (a single process, a gunicorn master, each child that
  ``uvicorn --workers`` or hypercorn *spawns*: a fresh interpreter re-runs sitecustomize and the hook) starts
  one here, at most once per pid, however many times the hook is called;
- a *forked* child (gunicorn workers, multiprocessing's fork and forkserver children) does not re-run the
  hook and inherits an agent whose threads died in the fork, so ``os.register_at_fork`` starts a new one;
- multiprocessing's helper interpreters (its resource tracker, which ``uvicorn --workers`` starts, and its
  forkserver) serve nothing: profiling them would only add an idle series under their own pid. The
  forkserver still passes the fork hook on to the workers it forks.

What the agent holds at exit is uploaded by :func:`flush` (atexit here; zerocode.servers calls it where a
server's exit skips atexit), within a few seconds even when the server does not answer.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("zerocode.profiling")

DEFAULT_UPLOAD_INTERVAL = 10
DEFAULT_SAMPLE_RATE = 100
REACHABILITY_TIMEOUT_S = 2.0
# Uploading what is pending at exit waits for the server's answer (10 s when it never comes): bounded.
EXIT_FLUSH_TIMEOUT_S = 3.0

# The `-c` command with which multiprocessing starts its helper interpreters (Python 3.11 to 3.14,
# resource_tracker.py and forkserver.py); seen under `uvicorn --workers 2`: `python -B -c "from
# multiprocessing.resource_tracker import main;main(6)"`. Spawned workers run `...spawn import spawn_main`.
_HELPER_COMMAND = re.compile(r"\s*from\s+multiprocessing\.(resource_tracker|forkserver)\s+import\s+main\b")

# Per interpreter. `pid` is the process whose agent runs (a forked child inherits the parent's value, which
# is how it knows its agent is gone); `settings` is what a forked child starts its agent with.
_agent = {"pid": None, "settings": None, "hooks_registered": False, "span_processor": False}


class SettingError(ValueError):
    """A PYROSCOPE_* value that cannot be used; the message names the setting."""


@dataclass
class ProfilingSettings:
    server_address: str
    application_name: str
    tags: dict[str, str] = field(default_factory=dict)
    upload_interval: int = DEFAULT_UPLOAD_INTERVAL
    sample_rate: int = DEFAULT_SAMPLE_RATE
    span_profiles: bool = True


def _ensure_visible_logging(logger: logging.Logger = log) -> None:
    # The hook runs before the app configures logging. With OTEL_PYTHON_LOG_CORRELATION the logging
    # instrumentation has already configured the root logger (stdout with trace ids, and the OTLP
    # handler), so our lines go there like the app's; without it, INFO lines would vanish (and warnings
    # too, once the instrumentation's OTLP handler sits on the root logger) unless we give them a handler
    # of our own. zerocode.latency uses it for its warning.
    root = logging.getLogger()
    root_prints_info = root.getEffectiveLevel() <= logging.INFO and any(
        isinstance(handler, logging.StreamHandler) for handler in root.handlers)
    if not logger.handlers and not root_prints_info:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def parse_server_address(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(
            f"PYROSCOPE_SERVER_ADDRESS={value!r} is not an http(s) URL such as http://pyroscope:4040"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise SettingError(f"PYROSCOPE_SERVER_ADDRESS={value!r} has an invalid port: {exc}") from None
    return value.rstrip("/")


def parse_tags(name: str, value: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise SettingError(f"{name}={value!r}: {item!r} is not key=value (expected k=v,k2=v2)")
        tags[key.strip()] = val.strip()
    return tags


def parse_positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingError(f"{name}={value!r} is not a whole number") from None
    if number <= 0:
        raise SettingError(f"{name}={value!r} must be greater than 0")
    return number


def parse_bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise SettingError(f"{name}={value!r} is neither true nor false")


def service_name() -> str:
    """The OTel service.name of the configured SDK, so profiles and traces share one name."""
    try:
        from opentelemetry import trace

        resource = getattr(trace.get_tracer_provider(), "resource", None)
        name = resource.attributes.get("service.name") if resource is not None else None
        if name:
            return str(name)
    except Exception:  # noqa: BLE001 - fall back to the environment below
        pass
    return os.environ.get("OTEL_SERVICE_NAME") or "unknown_service"


def _optional(environ, name: str, parse, default):
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return parse(name, value)
    except SettingError as exc:
        log.warning("%s; using the default %r instead", exc, default)
        return default


def settings_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> ProfilingSettings | None:
    """None when profiling is off. Invalid optional settings fall back to defaults with a warning."""
    address = environ.get("PYROSCOPE_SERVER_ADDRESS", "").strip()
    if not address:
        return None
    return ProfilingSettings(
        server_address=parse_server_address(address),
        application_name=service_name(),
        tags=_optional(environ, "PYROSCOPE_TAGS", parse_tags, {}),
        upload_interval=_optional(environ, "PYROSCOPE_UPLOAD_INTERVAL", parse_positive_int, DEFAULT_UPLOAD_INTERVAL),
        sample_rate=_optional(environ, "PYROSCOPE_SAMPLE_RATE", parse_positive_int, DEFAULT_SAMPLE_RATE),
        span_profiles=_optional(environ, "PYROSCOPE_SPAN_PROFILES", parse_bool, True),
    )


def _start_agent(settings: ProfilingSettings) -> None:
    import pyroscope

    pyroscope.configure(
        application_name=settings.application_name,
        server_address=settings.server_address,
        tags=settings.tags,
        sample_rate=settings.sample_rate,
        upload_interval=settings.upload_interval,
        # gunicorn workers are separate processes: a pid label tells their flame graphs apart.
        report_pid=True,
    )


def multiprocessing_helper(orig_argv: list[str]) -> str | None:
    """The helper's module (``multiprocessing.resource_tracker`` or ``.forkserver``) when the interpreter's
    command line (``sys.orig_argv``) is one of multiprocessing's helpers, else None."""
    # Only the interpreter's own options count: they end at -c, -m or the script (`python -m gunicorn -c
    # conf.py` is gunicorn's -c). -W and -X may take their value as the next word.
    words = iter(orig_argv[1:])
    for word in words:
        if word in ("-W", "-X"):
            next(words, None)
        elif re.fullmatch(r"-[bBdEhiIOPqsSuvx]*c", word):
            match = _HELPER_COMMAND.match(next(words, ""))
            return f"multiprocessing.{match.group(1)}" if match else None
        elif word == "-m" or not word.startswith("-") or word == "-":
            return None
    return None


def agent_runs_here() -> bool:
    return _agent["pid"] == os.getpid()


def _start_agent_once(settings: ProfilingSettings) -> bool:
    """Start this process's agent unless it has one already: two agents would upload every sample twice."""
    if agent_runs_here():
        return False
    _start_agent(settings)
    _agent["pid"] = os.getpid()
    return True


def _restart_in_child() -> None:
    # The agent's sampler thread does not survive fork(), so a gunicorn worker would otherwise be
    # profiled by nobody while the idle master keeps uploading.
    settings = _agent["settings"]
    if settings is None:
        return
    try:
        _start_agent_once(settings)
    except Exception as exc:  # noqa: BLE001 - a worker must start even if profiling cannot
        log.warning("Pyroscope could not restart in worker pid %d: %s", os.getpid(), exc)


def flush(timeout_s: float = EXIT_FLUSH_TIMEOUT_S) -> bool:
    """Upload what this process's agent holds and stop it; True when that finished within timeout_s.

    pyroscope.shutdown() uploads the pending profile (seen: a 1.5 s burn reached the server with a 60 s
    upload interval) but waits up to 10 s for a server that accepts and never answers, so it runs in a
    daemon thread that the exit does not wait for beyond timeout_s. Later calls in this pid do nothing."""
    if not agent_runs_here():
        return True
    _agent["pid"] = None
    import pyroscope

    done = threading.Event()

    def shut_down():
        try:
            pyroscope.shutdown()
        finally:
            done.set()

    threading.Thread(target=shut_down, name="pyroscope-flush", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("Pyroscope's last upload to PYROSCOPE_SERVER_ADDRESS did not finish within %.0f s; "
                    "the profile of the last seconds of pid %d is lost", timeout_s, os.getpid())
        return False
    return True


def _flush_at_exit() -> None:
    try:
        flush()
    except Exception as exc:  # noqa: BLE001 - never turn a clean exit into a traceback
        log.warning("Pyroscope's last upload failed at exit: %s", exc)


def _register_process_hooks() -> None:
    # Once per interpreter: a forked child inherits both registrations, so they must not be repeated there.
    if _agent["hooks_registered"]:
        return
    _agent["hooks_registered"] = True
    os.register_at_fork(after_in_child=_restart_in_child)
    atexit.register(_flush_at_exit)


def _add_span_processor() -> bool:
    from opentelemetry import trace
    from pyroscope.otel import PyroscopeSpanProcessor

    provider = trace.get_tracer_provider()
    if not hasattr(provider, "add_span_processor"):
        log.warning("no OpenTelemetry SDK tracer provider (OTEL_TRACES_EXPORTER?); span profiles are off")
        return False
    provider.add_span_processor(PyroscopeSpanProcessor())
    return True


def _warn_if_unreachable(address: str) -> None:
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=REACHABILITY_TIMEOUT_S):
            pass
    except OSError as exc:
        log.warning(
            "PYROSCOPE_SERVER_ADDRESS=%s is unreachable (%s); profiles are dropped until it answers", address, exc
        )


def start(environ: dict[str, str] | os._Environ[str] = os.environ,
          orig_argv: list[str] | None = None) -> ProfilingSettings | None:
    """Start this process's agent (see the module's docstring); None when profiling is off here."""
    if agent_runs_here():
        return None  # the hook ran twice in this process: one agent is enough
    try:
        settings = settings_from_env(environ)
    except SettingError as exc:
        log.warning("%s; continuous profiling is off", exc)
        return None
    if settings is None:
        log.info("PYROSCOPE_SERVER_ADDRESS is not set; continuous profiling is off")
        return None
    _agent["settings"] = settings
    # Added even in a helper: the forkserver's children inherit its tracer provider and need it.
    if not _agent["span_processor"]:
        _agent["span_processor"] = settings.span_profiles and _add_span_processor()
    helper = multiprocessing_helper(sys.orig_argv if orig_argv is None else orig_argv)
    if helper is None:
        _start_agent_once(settings)
    # After the agent's start, never before: pyroscope.configure registers fork handlers of its own that
    # reset the agent in a child, and Python calls after_in_child hooks in the order they were registered.
    # Registered first, ours would restart the agent before that reset, and configure() would refuse
    # (seen: a gunicorn worker with one thread, no agent, no profile).
    _register_process_hooks()
    if helper is not None:
        log.debug("pid %d is %s, which serves nothing: not profiled", os.getpid(), helper)
        return None
    # Checked in the background: a slow DNS lookup or a dead server must not delay the app's start.
    threading.Thread(
        target=_warn_if_unreachable, args=(settings.server_address,), name="pyroscope-reachability", daemon=True
    ).start()
    log.info(
        "Pyroscope profiling started as %r to %s every %ss at %d Hz (span profiles %s)",
        settings.application_name, settings.server_address, settings.upload_interval, settings.sample_rate,
        "on" if _agent["span_processor"] else "off",
    )
    return settings


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; never raises into the app's start-up."""
    _ensure_visible_logging()
    try:
        start()
    except Exception as exc:  # noqa: BLE001 - the app must run even when profiling cannot
        log.warning("Pyroscope profiling could not start (%s: %s); the app runs without it",
                    type(exc).__name__, exc)
