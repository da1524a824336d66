"""Each process of the app exports as an instance of its own, however the server made it.

The Operator sets ``service.instance.id=<namespace>.<pod>.<container>`` in ``OTEL_RESOURCE_ATTRIBUTES``: one id
for every process of the container. Two processes exporting under one id are one series to the collector's
Prometheus exporter, whose cumulative counters then overwrite each other (seen with ``uvicorn --workers 2``:
the otel source counted 131 of 404 requests to /get). The SDK gives a *forked* process a UUID of its own
(its service-instance detector is process dependent and re-runs after fork), which is why gunicorn's workers
never collided. A *spawned* process (``uvicorn --workers``, multiprocessing's spawn, any exec) starts a fresh
interpreter that reads the shared id from the environment again.

So the first process to configure the SDK claims the environment's id (:data:`OWNER` holds its pid, and its
children inherit that), and any other process that finds the environment claimed by another pid leaves the
shared id out, so that the SDK's own UUID takes its place, as it does after a fork. Every other attribute
stays.
"""

from __future__ import annotations

import os

OWNER = "ZEROCODE_INSTANCE_ID_PID"
ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
KEY = "service.instance.id"


def claim(environ=os.environ, pid: int | None = None) -> bool:
    """True when this process left out a service.instance.id that another process of the app claimed."""
    pid = os.getpid() if pid is None else pid
    owner = environ.get(OWNER)
    if owner is None:
        environ[OWNER] = str(pid)
        return False
    if owner == str(pid):
        return False
    pairs = [pair for pair in environ.get(ATTRIBUTES, "").split(",") if pair.strip()]
    kept = [pair for pair in pairs if pair.split("=", 1)[0].strip() != KEY]
    if len(kept) == len(pairs):
        return False
    environ[ATTRIBUTES] = ",".join(kept)
    return True
