"""Calls the app's WSGI callable N times in this process and prints the CPU it took per request, as JSON.

The cost benchmark's in-process lever table (tooling/reports/bench.py --in-process) runs this module
under `opentelemetry-instrument` with a mode's settings (or without it, for `plain`), from app/ so that
`import app` is the owners' module, exactly as gunicorn's `app:app` imports it. Without gunicorn,
sockets or a load generator on the same cores, what remains is the work each request makes inside the
process: the app, the instrumentation, and the SDK's processors and exporters on their own threads
(process CPU time counts every thread, and the providers are flushed before the clock stops, so the
export of the measured requests is in it). Imports only the standard library and the app: any other
import could be instrumented too.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time


def environ(path: str) -> dict:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "5000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1:5000",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": True, "wsgi.run_once": False}


def flush() -> None:
    """Export what the SDK holds (spans, metrics, log records), so that its CPU falls inside the clock."""
    from opentelemetry import _logs, metrics, trace

    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider()):
        if hasattr(provider, "force_flush"):
            provider.force_flush()


def main(requests: int, warmup: int, path: str = "/") -> dict:
    sys.path.insert(0, os.getcwd())  # app/, as gunicorn's `app:app` finds it
    from app import app  # noqa: PLC0415 - after opentelemetry-instrument has patched Flask

    def call():
        statuses = []
        body = app(environ(path), lambda status, headers, exc_info=None: statuses.append(status))
        b"".join(body)
        getattr(body, "close", lambda: None)()
        if not statuses or not statuses[0].startswith("200"):
            raise SystemExit(f"GET {path} answered {statuses}")

    instrumented = "opentelemetry" in sys.modules
    for _ in range(warmup):
        call()
    if instrumented:
        flush()
    started, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        call()
    if instrumented:
        flush()
    cpu, wall = time.process_time() - started, time.perf_counter() - wall
    return {"requests": requests, "cpu_us_per_request": 1e6 * cpu / requests, "wall_s": wall}


if __name__ == "__main__":
    print("DRIVE " + json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
