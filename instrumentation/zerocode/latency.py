"""Request-duration buckets fine enough for where the app lives, set from outside the app.

The Flask instrumentation records ``http.server.request.duration`` with the semantic conventions' advice
for buckets (5 ms, 10 ms, 25 ms, ...). This app answers ``/`` in 1 to 10 ms, so nearly every request fell in
the first bucket and every percentile was an interpolation inside 0-5 ms. The SDK reads no environment
variable for a histogram's buckets (only OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION, which
switches every histogram to exponential), and ``opentelemetry-instrument`` has no other place for a View
(opentelemetry-python issue 2751). So this module is a configurator: the distro's own, plus one View.

:data:`HTTP_DURATION_BUCKETS` is the stack's one list of request-duration bounds. The collector's
span_metrics connector (otel-collector/otel-collector-config.yaml) and Beyla (beyla/beyla-config.yaml)
repeat it, and tests/collector/test_resolution.py fails when a copy differs or when a threshold that a rule, an SLO
or a dashboard reads (``le="0.1"``) is not one of its bounds.

``opentelemetry-instrument`` loads one configurator: the one that OTEL_PYTHON_CONFIGURATOR names (app/app.env
names ``zerocode``), else whichever entry point of the group it finds first. With the distro's installed as
well, that order is not ours to choose, so the setting is needed; without it :func:`post_instrument` logs a
warning that names it.
"""

from __future__ import annotations

import logging
import os

from opentelemetry.distro import OpenTelemetryConfigurator
from opentelemetry.sdk import _configuration as sdk_configuration
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from zerocode import instances

log = logging.getLogger("zerocode.latency")

INSTRUMENT = "http.server.request.duration"
CONFIGURATOR_SETTING = "OTEL_PYTHON_CONFIGURATOR"
CONFIGURATOR_NAME = "zerocode"
AGGREGATION_SETTING = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"

# Seconds. At most x1.25 from one bound to the next from 0.5 ms to 100 ms, so a percentile there comes from a
# bucket no wider than a quarter of its value: the app answers / in 1-10 ms, and the edge adds the wait for
# a worker, whose tail reaches tens of ms on a busy machine, up to the latency SLO's threshold (0.1, a
# bound, so the SLO stays exact). The same 13 steps in each decade (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5,
# 6, 7.5, 9); coarser above 100 ms, where this app only goes when it is in trouble. Every bound of the
# semantic conventions' default (5, 10, 25, 50, 75, 100, 250, 500, 750 ms, 1, 2.5, 5, 7.5, 10 s) is kept:
# that list is also Beyla's default and the manual source's (prometheus-flask-exporter), so a comparison at
# any of those `le` still lines up across sources. 39 bounds, 40 buckets with +Inf.
HTTP_DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.0006, 0.0007, 0.0008,
    0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.005, 0.006, 0.0075, 0.009,
    0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06, 0.075, 0.09,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip

_state = {"view_applied": False}


def wants_exponential(environ=os.environ) -> bool:
    """The user asked for exponential histograms (native histograms in Prometheus): the View steps aside."""
    return environ.get(AGGREGATION_SETTING, "").strip().lower() == "base2_exponential_bucket_histogram"


def request_duration_views(environ=os.environ) -> list[View]:
    if wants_exponential(environ):
        return []
    return [View(instrument_name=INSTRUMENT,
                 aggregation=ExplicitBucketHistogramAggregation(boundaries=HTTP_DURATION_BUCKETS))]


class Configurator(OpenTelemetryConfigurator):
    """The distro's configurator (traces, metrics and logs from the OTEL_* settings, unchanged), whose
    MeterProvider also gets :func:`request_duration_views`.

    The SDK builds the MeterProvider inside its own set-up and takes no views there, so the class that set-up
    calls is swapped for one that adds them, for the duration of this call only. If an SDK upgrade stops
    building it that way, the views are not applied and :func:`post_instrument` says so;
    tests/app/test_zerocode.py fails on it too.
    """

    def _configure(self, **kwargs):
        # Before the SDK reads its resource: a spawned worker must not export under its parent's instance id.
        instances.claim()
        views = request_duration_views()
        original = sdk_configuration.MeterProvider

        def meter_provider_with_views(*args, **provider_kwargs):
            provider_kwargs["views"] = [*provider_kwargs.get("views", ()), *views]
            _state["view_applied"] = bool(views)
            return original(*args, **provider_kwargs)

        sdk_configuration.MeterProvider = meter_provider_with_views
        try:
            super()._configure(**kwargs)
        finally:
            sdk_configuration.MeterProvider = original


def post_instrument(*_args, **_kwargs) -> None:
    """Entry point for ``opentelemetry_post_instrument``: a warning when the buckets were not applied."""
    if _state["view_applied"] or wants_exponential():
        return
    from zerocode.profiling import _ensure_visible_logging

    _ensure_visible_logging(log)
    if os.environ.get(CONFIGURATOR_SETTING) != CONFIGURATOR_NAME:
        reason = f"set {CONFIGURATOR_SETTING}={CONFIGURATOR_NAME}: another configurator ran"
    else:
        reason = "the SDK did not build its MeterProvider where zerocode adds the View (an SDK upgrade?)"
    log.warning("%s keeps the SDK's default buckets (first bucket 0-5 ms): %s", INSTRUMENT, reason)
