"""The edge in front of the app, for real: Caddy built from its Go module, the committed edge/caddy-config.json,
locust with --otel calling the app through it, the real collector and Prometheus.

What it must give: one trace per request, locust's CLIENT span -> the edge's SERVER span -> the edge's CLIENT hop
-> the app's SERVER span, each the parent of the next and each inside its parent's time (the gap between the
edge's span and the app's is the wait for a worker); the service graph locust -> edge -> dice-api, counted
exactly; and the edge's own metrics scraped.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tooling.native import edge
from tooling.native.sinks import Span
from tooling.native.stack import NativeStack, poll, run_locust

pytestmark = pytest.mark.integration

SECONDS, USERS = 12, 5
# Clocks of three processes on one host (Python's time_ns, Go's time.Now); a span that starts before its
# parent by more than this is a broken parent link, not clock granularity.
CLOCK_SLACK_NS = 2_000_000


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("edge")
    stack = NativeStack(run_dir).up()
    try:
        truth = run_locust(stack.edge_url, SECONDS, USERS, run_dir,
                           otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
        sent = sum(row["count"] for row in truth["sent"])
        assert sent > 50 and truth["locust_totals"]["num_failures"] == 0, truth["locust_totals"]

        def all_arrived():
            kinds = Counter((_service(s), s.span.kind) for s in answered(stack.tempo_sink.spans()))
            counts = [kinds[key] for key in CHAIN]
            assert len(set(counts)) == 1 and counts[0] >= sent, f"spans per kind {counts} ({CHAIN}), sent {sent}"
            return True

        # The health probe connects to the app's port and sends nothing: every SERVER span is locust's. The
        # processes export on their own schedules: wait until each has sent as many spans as the others.
        poll(all_arrived, 30, f"at least {sent} spans of each kind in the trace sink")
        spans = stack.tempo_sink.spans()
        # A request locust abandoned when the run stopped (a user's greenlet ended before it was sent) leaves a
        # CLIENT span without an answer and nothing at the edge: at most one per user (seen: 1 in 5 runs).
        assert len(spans) - len(answered(spans)) <= USERS, "more unanswered locust spans than users"
        yield {"stack": stack, "truth": truth, "sent": sent, "spans": answered(spans)}
    finally:
        stack.down()


# One trace per request, from the root down: (service.name, span kind).
CHAIN = (("locust", Span.SPAN_KIND_CLIENT), ("edge", Span.SPAN_KIND_SERVER), ("edge", Span.SPAN_KIND_CLIENT),
         ("dice-api", Span.SPAN_KIND_SERVER))


def answered(spans: list) -> list:
    """Every span but locust's CLIENT spans of requests that got no answer (no response status)."""
    return [s for s in spans if not (_service(s) == "locust" and s.span.kind == Span.SPAN_KIND_CLIENT)
            or "http.status_code" in s.attributes or "http.response.status_code" in s.attributes]


def _service(span) -> str:
    return span.resource.get("service.name", "")


def test_each_request_is_one_trace_locust_edge_hop_app(traced):
    spans, sent = traced["spans"], traced["sent"]
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    kinds = Counter((_service(s), s.span.kind) for s in spans)
    print("spans by service and kind:", {f"{svc} {Span.SpanKind.Name(kind)}": n for (svc, kind), n in kinds.items()})
    # Exactly one of each per request: locust's client span, the edge's SERVER span and its CLIENT hop, the
    # app's SERVER span. Locust's count is its stats at the end of the run: a request still in flight when
    # the run stops (at most one per user) is served and traced but not in its stats.
    four = [kinds[key] for key in CHAIN]
    assert len(set(four)) == 1 and sent <= four[0] <= sent + USERS, (four, sent)
    chains = 0
    for app in (s for s in spans if _service(s) == "dice-api" and s.span.kind == Span.SPAN_KIND_SERVER):
        chain = [app]
        for _ in range(3):
            parent = by_id.get((chain[-1].trace_id, chain[-1].span.parent_span_id.hex()))
            assert parent is not None, ("broken parent link", [(_service(c), c.span.name) for c in chain])
            chain.append(parent)
        assert [(_service(c), c.span.kind) for c in reversed(chain)] == list(CHAIN), [c.span.name for c in chain]
        assert chain[-1].is_root
        # Each span lies inside its parent's time: the edge's span holds the hop, which holds the app's.
        for child, parent in zip(chain, chain[1:], strict=False):
            assert parent.span.start_time_unix_nano - CLOCK_SLACK_NS <= child.span.start_time_unix_nano, chain
            assert child.span.end_time_unix_nano <= parent.span.end_time_unix_nano + CLOCK_SLACK_NS, chain
        chains += 1
    assert chains == four[0]


def test_the_edge_span_names_the_route_and_status_the_user_got(traced):
    truth = Counter({(row["name"], str(row["status"])): row["count"] for row in traced["truth"]["sent"]})
    def per_route_and_status(service: str) -> Counter:
        return Counter((s.attributes.get("http.route"), str(s.attributes.get("http.response.status_code")))
                       for s in traced["spans"] if _service(s) == service and s.span.kind == Span.SPAN_KIND_SERVER)

    seen = per_route_and_status("edge")
    # The edge and the app agree on every request; locust's stats may lack the last in-flight one per user.
    assert seen == per_route_and_status("dice-api")
    assert all(seen[key] >= n for key, n in truth.items()) and seen.total() - truth.total() <= USERS, (seen, truth)
    edge_server = [s for s in traced["spans"] if _service(s) == "edge" and s.span.kind == Span.SPAN_KIND_SERVER]
    # The collector names them as the app's: method and route.
    assert {s.span.name for s in edge_server} == {f"GET {route}" for route, _ in truth}


def test_the_service_graph_reads_locust_edge_dice_api(traced):
    stack = traced["stack"]
    sent = sum(1 for s in traced["spans"] if _service(s) == "edge" and s.span.kind == Span.SPAN_KIND_SERVER)
    query = 'sum by (client, server) (traces_service_graph_request_total{telemetry_source="otel"})'

    def edges():
        return {(r["metric"]["client"], r["metric"]["server"]): float(r["value"][1]) for r in stack.query(query)}

    expected = {("locust", "edge"): sent, ("edge", "dice-api"): sent}
    poll(lambda: edges() == expected, 40, f"service graph {expected}")


def test_prometheus_scrapes_the_edge_and_its_config_is_the_committed_one(traced):
    stack = traced["stack"]
    assert stack.query('up{job="edge"} == 1'), "the edge's metrics are not scraped"
    # Caddy's own request counter (no route label) counted locust's requests on the app server.
    total = stack.query('sum(caddy_http_requests_total{job="edge", server="app"})')
    assert total and float(total[0]["value"][1]) >= traced["sent"]
    # The native edge ran the committed config, only re-addressed.
    ran = json.loads((stack.run_dir / "caddy-config.json").read_text())
    assert edge.route_table(ran) == edge.route_table(edge.load_config())


@pytest.mark.unit
def test_the_edge_routes_are_the_apps():
    """The edge names a request's route itself (it cannot ask Flask): its table must be the app's routes, each
    matched exactly and case-sensitively as Flask matches, everything else the catch-all "/**"."""
    from stackfiles import app_routes

    config = edge.load_config()
    table = edge.route_table(config)
    assert table.pop("") == ""  # the catch-all: no http.route, named "GET" like the app's unmatched spans
    assert table == {f"^{route}$": route for route in app_routes()}
    # The app's own metrics are for Prometheus on the inside network, not for users: the edge answers 404.
    # A path that is not UTF-8 once decoded gets a 400 before any span (tests/edge/test_edge_faults.py says why).
    assert edge.answered_at_the_edge(config) == {"^/metrics$": 404, r"\x{FFFD}": 400}


def test_the_apps_metrics_are_not_served_to_users(traced):
    import requests

    stack = traced["stack"]
    assert requests.get(f"{stack.edge_url}/metrics", timeout=5).status_code == 404
    assert requests.get(f"{stack.edge_url}/METRICS", timeout=5).status_code == 404  # forwarded: Flask's 404
    assert requests.get(f"{stack.app_url}/metrics", timeout=5).status_code == 200
