"""The sitecustomize.py the OpenTelemetry Operator's PYTHONPATH runs in every Python process of the app.

instrumentation/Dockerfile copies this file over upstream's, at
/autoinstrumentation/opentelemetry/instrumentation/auto_instrumentation/sitecustomize.py. Upstream's is two
lines: import initialize() and call it. Ours asks zerocode.preflight first whether the injected packages fit
the app's (issue 21): on a conflict the app starts uninstrumented, with one log line that says why, instead of
crashing at import on our copy of a package it also has. Then, if allowed, exactly upstream's two lines.
"""


def _preflight_allows() -> bool:
    try:
        from zerocode.preflight import run  # the standard library only: nothing of the layout is imported yet
    except Exception as error:  # noqa: BLE001 - a damaged layout must not stop the app either
        import os
        import sys

        if os.environ.get("ZEROCODE_PREFLIGHT", "").strip().lower() in ("warn", "off"):
            return True
        # Nothing checked, nothing started: the layout (the folder that holds opentelemetry/) off sys.path.
        layout = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3))
        sys.path[:] = [entry for entry in sys.path
                       if not (os.path.realpath(entry or os.curdir) + os.sep).startswith(layout + os.sep)]
        sys.stderr.write(f"zerocode preflight: not instrumenting (pid {os.getpid()}): the check cannot be "
                         f"loaded ({type(error).__name__}: {error}). Set ZEROCODE_PREFLIGHT=warn to instrument "
                         f"anyway.\n")
        return False
    return run()


if _preflight_allows():
    from opentelemetry.instrumentation.auto_instrumentation import initialize

    initialize()
