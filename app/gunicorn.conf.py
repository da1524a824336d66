"""gunicorn settings for the dice API. Serving configuration, not app code: everything comes from the env.

Started as `opentelemetry-instrument gunicorn -c gunicorn.conf.py`, so the OTel SDK and the zerocode
Pyroscope hook are set up in the master and carried into every worker across fork().
"""

import os
import shutil

from prometheus_client import multiprocess

bind = f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
wsgi_app = "app:app"
# The app logs its own lines; gunicorn's access log would double every request in the output.
accesslog = None
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Workers report through the OTLP exporter threads; give them time to flush on shutdown.
graceful_timeout = 10
# gunicorn 27's control socket defaults to one path per user, so two instances on a host would collide;
# nothing here uses it.
control_socket_disable = True


def on_starting(server):
    # prometheus-flask-exporter aggregates every worker's files in PROMETHEUS_MULTIPROC_DIR; stale files
    # from an earlier run would be added to the new counts, so the directory must start empty.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, exist_ok=True)


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
