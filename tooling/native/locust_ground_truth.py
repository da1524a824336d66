"""A locust plugin that records what the load generator actually sent, per request name and status.

Load it beside the scenario: `locust -f locustfile.py,tooling/native/locust_ground_truth.py ...`. When locust
quits it writes {"sent": [{"method", "name", "status", "count"}, ...], "locust_totals", "timeline"} to
$LOCUST_GROUND_TRUTH_FILE. Locust's own
stats count requests and failures per name; this keeps the status code too, which the telemetry is keyed by.
Status 0 means no HTTP answer (a connection error).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from locust import events

_sent: Counter = Counter()
# (unix time at the end of the request, name, status, response time in ms): latency by phase of a test.
_timeline: list[tuple[float, str, int, float]] = []


@events.request.add_listener
def _count(request_type, name, response_time=0.0, response=None, exception=None, **_kwargs):
    status = getattr(response, "status_code", 0) or 0
    _sent[(request_type, name, status)] += 1
    _timeline.append((time.time(), name, status, response_time))


@events.quitting.add_listener
def _write(environment, **_kwargs):
    path = os.environ.get("LOCUST_GROUND_TRUTH_FILE")
    if not path:
        return
    stats = environment.stats
    rows = [{"method": m, "name": n, "status": s, "count": c} for (m, n, s), c in sorted(_sent.items())]
    # Cross-check with locust's own stats, so the plugin can never drift from what locust reports.
    totals = {"num_requests": stats.total.num_requests, "num_failures": stats.total.num_failures}
    with open(path, "w") as out:
        json.dump({"sent": rows, "locust_totals": totals, "timeline": _timeline}, out)
