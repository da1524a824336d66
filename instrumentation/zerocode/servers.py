"""Nothing is lost when a uvicorn worker stops: its last spans, metrics, logs and profile are sent first.

The SDK's batch processors and Pyroscope's agent send what they hold at exit through atexit. uvicorn never
lets atexit run after a SIGTERM or SIGINT: once its graceful shutdown is over, ``Server.capture_signals``
raises the captured signal again, and the default handler kills the process (uvicorn/server.py, 0.55;
under gunicorn's ``uvicorn.workers.UvicornWorker`` too, whose handlers are the defaults again). Seen with
the OTel SDK's 5 s batch delay: 0 of 4 requests' spans reached the collector, under ``uvicorn``,
``uvicorn --workers 2`` and gunicorn with uvicorn workers alike.

So :func:`post_instrument` wraps ``uvicorn.server.Server.shutdown``, which runs after the last request has
been answered and before the signal is raised again, to flush the tracer, meter and logger providers and
Pyroscope. A collector or a Pyroscope that does not answer must not hold the shutdown up: everything is
flushed in parallel in daemon threads, and the shutdown goes on after :data:`FLUSH_TIMEOUT_S` at most, with
one warning line naming what did not finish.

uvicorn is imported only when it is installed. gunicorn's own sync and threaded workers need none of this:
they leave through ``sys.exit`` and atexit runs (tests/app/test_zerocode_servers.py).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import time

from zerocode.patching import wrap_once

log = logging.getLogger("zerocode.servers")

FLUSH_TIMEOUT_S = 4.0
_WRAPPED_FLAG = "_zerocode_flushes_at_shutdown"


def _sdk_flushes(timeout_s: float) -> dict[str, callable]:
    """{what: flush()} for each SDK provider that can flush (the API's no-op providers cannot)."""
    from opentelemetry import _logs, metrics, trace

    timeout_ms = int(timeout_s * 1000)
    flushes = {}
    for name, provider in (("traces", trace.get_tracer_provider()), ("metrics", metrics.get_meter_provider()),
                           ("logs", _logs.get_logger_provider())):
        if hasattr(provider, "force_flush"):
            flushes[name] = functools.partial(provider.force_flush, timeout_millis=timeout_ms)
    return flushes


def _profile_flush(timeout_s: float) -> dict[str, callable]:
    from zerocode import profiling

    return {"profiles": functools.partial(profiling.flush, timeout_s)} if profiling.agent_runs_here() else {}


def flush_everything(timeout_s: float = FLUSH_TIMEOUT_S) -> list[str]:
    """Flush every signal of this process in parallel; the names of those that did not finish in time."""
    flushes = {**_sdk_flushes(timeout_s), **_profile_flush(timeout_s)}
    threads = {}
    for name, flush in flushes.items():
        thread = threading.Thread(target=_quietly, args=(name, flush), name=f"zerocode-flush-{name}", daemon=True)
        thread.start()
        threads[name] = thread
    deadline = time.monotonic() + timeout_s
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    return [name for name, thread in threads.items() if thread.is_alive()]


def _quietly(name: str, flush) -> None:
    try:
        flush()
    except Exception as exc:  # noqa: BLE001 - a failed flush must not break the server's shutdown
        log.warning("flushing %s at shutdown failed: %s", name, exc)


def _flush_and_say_what_was_lost() -> None:
    late = flush_everything()
    if late:
        log.warning("at shutdown, %s did not reach the collector or PYROSCOPE_SERVER_ADDRESS within %.0f s; "
                    "the last seconds of them are lost", ", ".join(late), FLUSH_TIMEOUT_S)


def instrument_uvicorn() -> bool:
    """Wrap uvicorn's Server.shutdown; False when it is wrapped already."""
    from uvicorn.server import Server

    def wrap(original):
        async def shutdown(self, *args, **kwargs):
            try:
                return await original(self, *args, **kwargs)
            finally:
                # Blocking the event loop is fine here: the server has stopped serving.
                _flush_and_say_what_was_lost()
        return shutdown

    return wrap_once(Server, "shutdown", _WRAPPED_FLAG, wrap)


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; an app without uvicorn is left alone."""
    try:
        if importlib.util.find_spec("uvicorn") is None:
            return
        from zerocode.profiling import _ensure_visible_logging

        _ensure_visible_logging(log)  # the shutdown's warning must be seen
        instrument_uvicorn()
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        log.warning("uvicorn workers may lose their last spans and profile at shutdown: could not wrap "
                    "uvicorn.server.Server.shutdown (%s: %s)", type(exc).__name__, exc)
