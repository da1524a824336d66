"""uvicorn's own log records (its access log, its "Exception in ASGI application") exported like the app's.

OpenTelemetry exports log records through a handler on the root logger. uvicorn's loggers never reach it: its
logging config gives ``uvicorn`` and ``uvicorn.access`` handlers of their own with ``propagate: False``
(uvicorn/config.py, 0.55), and gunicorn's ``uvicorn.workers.UvicornWorker`` does the same for
``uvicorn.error`` and ``uvicorn.access`` with gunicorn's handlers. A FastAPI app that writes no log of its own
then exports none at all: seen with httpbinx, 0 records for 1,000 requests.

So :func:`post_instrument` wraps ``uvicorn.server.Server.startup``, which runs in each worker once logging is
configured, whichever runner configured it, and gives those loggers the root's OpenTelemetry handlers too.
Their own handlers stay, so the console output is unchanged. The access log line is written while the
response starts, inside the request's span, so each carries the request's trace and span ids.
"""

from __future__ import annotations

import importlib.util
import logging

from zerocode.patching import wrap_once

log = logging.getLogger("zerocode.uvicorn_logs")

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_WRAPPED_FLAG = "_zerocode_exports_uvicorn_logs"


def otel_handlers(logger: logging.Logger | None = None) -> list[logging.Handler]:
    """The OpenTelemetry log handlers on `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    return [handler for handler in logger.handlers
            if type(handler).__module__.startswith("opentelemetry.") and type(handler).__name__ == "LoggingHandler"]


def _reaches_root(logger: logging.Logger) -> bool:
    while logger is not None and logger.parent is not None:
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


def attach(names: tuple[str, ...] = UVICORN_LOGGERS) -> list[str]:
    """Give each named logger that does not propagate to the root the root's OpenTelemetry handlers; the names
    of the loggers that got them. A logger below one that got them is left alone (its records reach them)."""
    handlers = otel_handlers()
    attached = []
    for name in names:
        logger = logging.getLogger(name)
        if not handlers or _reaches_root(logger):
            continue
        if any(parent in attached for parent in _ancestors(name)) and logger.propagate:
            continue
        missing = [handler for handler in handlers if handler not in logger.handlers]
        for handler in missing:
            logger.addHandler(handler)
        attached.append(name)
    return attached


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def instrument_uvicorn() -> bool:
    from uvicorn.server import Server

    def wrap(original):
        async def startup(self, *args, **kwargs):
            try:
                attach()
            except Exception as exc:  # noqa: BLE001 - the server must start whatever happens here
                log.warning("uvicorn's own log records will not be exported: %s", exc)
            return await original(self, *args, **kwargs)
        return startup

    return wrap_once(Server, "startup", _WRAPPED_FLAG, wrap)


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``; an app without uvicorn is left alone."""
    try:
        if importlib.util.find_spec("uvicorn") is None:
            return
        instrument_uvicorn()
    except Exception as exc:  # noqa: BLE001 - never break the app's start-up
        log.warning("uvicorn's own log records will not be exported: could not wrap uvicorn.server.Server.startup "
                    "(%s: %s)", type(exc).__name__, exc)
