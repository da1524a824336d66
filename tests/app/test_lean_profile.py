"""The lean profile (APP_PROFILE=lean, app/profile-lean.env) on the native stack, with locust as compose runs it.

Compose gives the profile file to the app and to locust (`--otel`), whose client span is the root of every
trace: locust samples one trace in ten and the app, parentbased, follows. tooling.native.stack does the same with
APP_PROFILE=lean, and the first test holds it to the environments Compose's own loader resolves for both
services, so a compose file that stops giving locust the profile turns this red.

What must hold: the otel RED counts stay exact; the SERVER spans Tempo gets are a binomial sample of the
requests at the profile's ratio; locust's CLIENT spans are the same traces (whole traces, no orphans); span
metrics and the service graph count exactly the spans that were kept.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
from stackfiles import compose_config

import tooling.native.stack as native
from tooling.config import load_env_file
from tooling.native.stack import REPO_ROOT, NativeStack, by_labels, poll, run_locust

pytestmark = pytest.mark.integration

PROFILE = "lean"
PROFILE_FILE = REPO_ROOT / "app" / f"profile-{PROFILE}.env"
# About one request per user per second (locustfile.py, steady): ~40 x 15 s = 600 requests, enough for the
# band below to exclude both "keep everything" and a ratio three times the profile's.
LOAD_USERS = 40
LOAD_SECONDS = 15
# README, "What observing costs": the lean profile keeps one trace in ten.
DOCUMENTED_RATIO = 0.1
# The app's batch span processor exports within 5 s of a span's end (OTEL_BSP_SCHEDULE_DELAY, default),
# the collector's batch processor within 1 s more; with margin.
EXPORT_SETTLE = 8.0
# Half-width of the band in standard deviations: a correct sampler lands outside it about 2 times in 10^6
# runs (the exact binomial tails at n = 600, p = 0.1; 4e-6 at n = 300).
SIGMAS = 5


def sampler_settings(env: dict[str, str]) -> dict[str, str | None]:
    return {key: env.get(key) for key in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")}


def band(n: int, ratio: float) -> tuple[float, float]:
    """Where Binomial(n, ratio) lands but with probability of a few 1e-6: mean +- SIGMAS standard deviations."""
    mean, sd = n * ratio, math.sqrt(n * ratio * (1 - ratio))
    return mean - SIGMAS * sd, mean + SIGMAS * sd


@pytest.fixture(scope="module")
def compose_services() -> dict:
    """The app's and locust's environment as Compose resolves them with APP_PROFILE=lean."""
    services = compose_config(env={"APP_PROFILE": PROFILE})["services"]
    return {name: services[name]["environment"] for name in ("app", "locust")}


@pytest.fixture(scope="module")
def ratio() -> float:
    settings = sampler_settings(load_env_file(PROFILE_FILE))
    assert settings["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio", settings
    value = float(settings["OTEL_TRACES_SAMPLER_ARG"])
    assert 0 < value < 1, f"{PROFILE_FILE.name} keeps {value} of traces: not a sample"
    assert value == DOCUMENTED_RATIO, f"README, 'What observing costs', promises one trace in ten, not {value}"
    return value


@pytest.fixture(scope="module")
def run(tmp_path_factory, compose_services):
    run_dir = tmp_path_factory.mktemp("lean")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APP_PROFILE", PROFILE)  # tooling.native.stack gives app/profile-lean.env to the app and locust
        stack = NativeStack(run_dir).up()
        try:
            truth = run_locust(stack.app_url, LOAD_SECONDS, LOAD_USERS, stack.run_dir,
                               otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
            sent = Counter({(row["name"], str(row["status"])): row["count"] for row in truth["sent"]})
            assert sum(sent.values()) == truth["locust_totals"]["num_requests"]
            assert truth["locust_totals"]["num_failures"] == 0, "the app answered something unexpected"
            yield {"stack": stack, "sent": sent, "load_ended": time.monotonic()}
        finally:
            stack.down()


def test_compose_gives_locust_the_apps_sampler(compose_services, ratio, monkeypatch, tmp_path):
    # What the load test below relies on, checked before any load runs: Compose gives locust the app's
    # sampler, and the native app and locust (tooling.native.stack) get the ones Compose gives them.
    app, locust = (sampler_settings(compose_services[name]) for name in ("app", "locust"))
    monkeypatch.setenv("APP_PROFILE", PROFILE)
    app_native = sampler_settings(native.app_environment(native.AppSettings(port=1), tmp_path))
    locust_native = sampler_settings(native.locust_environment())
    print(f"\ncompose app {app}\ncompose locust {locust}\nnative app {app_native}\nnative locust {locust_native}")
    assert app == locust == app_native == locust_native, \
        "locust, the root of every trace, must sample as the app's profile says"


def test_otel_red_counts_stay_exact(run):
    stack, sent = run["stack"], run["sent"]
    otel = ('sum by (http_route, http_response_status_code) '
            '(http_server_request_duration_seconds_count{telemetry_source="otel"})')
    # OTEL_METRIC_EXPORT_INTERVAL (10 s) + batch (1 s) + scrape (5 s), with margin.
    seen = poll(lambda: (c := by_labels(stack.query(otel), "http_route", "http_response_status_code")) == sent and c,
                60, f"otel RED counts equal to what locust sent, {dict(sent)}")
    print(f"\nlocust {dict(sent)}\notel   {dict(seen)}")


@pytest.fixture(scope="module")
def kept(run):
    """The SERVER spans the Tempo sink got and locust's CLIENT spans, once both sides have arrived."""
    stack = run["stack"]

    def client_spans():
        return [s for s in stack.tempo_sink.spans()
                if s.resource.get("service.name") == "locust" and s.span.kind == s.span.SPAN_KIND_CLIENT]

    def answered(span) -> bool:
        # A request that locust abandoned when the run stopped (a user's greenlet ended mid-request) leaves
        # a CLIENT span with no response status and no SERVER span, and is not in locust's counts either.
        return "http.status_code" in span.attributes or "http.response.status_code" in span.attributes

    # Both sides are complete once locust has exited (it flushes its spans then) and EXPORT_SETTLE has
    # passed: until then the two sets can be equal by chance while spans are still on their way. A sampler
    # that keeps server spans without their client span (or the reverse) never gets here.
    # Each check below asserts rather than returns False: poll() reports the last error it saw.
    def both_sides():
        settled = time.monotonic() - run["load_ended"] >= EXPORT_SETTLE
        server = {s.trace_id for s in stack.tempo_sink.server_spans()}
        client = {s.trace_id for s in client_spans() if answered(s)}
        assert settled and server and server == client, {
            "traces with a SERVER span": len(server), "with an answered CLIENT span": len(client),
            "with the SERVER span only": len(server - client), "with the CLIENT span only": len(client - server),
            "requests": sum(run["sent"].values())}
        return True

    poll(both_sides, 30, "every kept trace with both locust's CLIENT span and the app's SERVER span")
    clients = client_spans()
    abandoned = [s for s in clients if not answered(s)]
    # At most one request in flight per user when the run stopped.
    assert len(abandoned) <= LOAD_USERS, f"{len(abandoned)} CLIENT spans without an answer"
    return {"server": stack.tempo_sink.server_spans(), "client": [s for s in clients if answered(s)],
            "all client": clients, "abandoned": abandoned}


def test_server_spans_are_a_binomial_sample_at_the_profiles_ratio(run, kept, ratio):
    n, k = sum(run["sent"].values()), len(kept["server"])
    low, high = band(n, ratio)
    print(f"\nrequests {n}, SERVER spans {k} ({k / n:.3f}); band at p={ratio}: {low:.1f}-{high:.1f}; "
          f"locust CLIENT spans {len(kept['all client'])}, abandoned at its stop {len(kept['abandoned'])}")
    # The run must be long enough for the band to tell the profile from no sampling at all, or from a
    # ratio three times too high; a machine too slow to send that much fails here, not silently.
    assert 0 < low and high < min(3 * ratio, 1) * n, f"only {n} requests: too few to test a ratio of {ratio}"
    assert low <= k <= high, f"{k} of {n} requests traced: not a sample at {ratio} (band {low:.1f}-{high:.1f})"
    # Each kept span is one of the requests locust sent, with its route and status.
    by_route = Counter((s.attributes.get("http.route"), str(s.attributes.get("http.response.status_code")))
                       for s in kept["server"])
    assert not by_route - run["sent"], f"spans that locust did not send: {dict(by_route - run['sent'])}"
    # One locust CLIENT span per kept trace, the parent of the app's SERVER span.
    clients = {s.span_id: s for s in kept["client"]}
    assert len(clients) == len(kept["client"]) == k
    assert {s.span.parent_span_id.hex() for s in kept["server"]} == set(clients)


def test_span_metrics_count_exactly_the_kept_spans(run, kept):
    stack = run["stack"]
    expected = {"dice-api": len(kept["server"]), "locust": len(kept["all client"])}
    expr = ('sum by (service_name) (traces_spanmetrics_calls_total{service_name=~"dice-api|locust", '
            'span_kind=~"SPAN_KIND_SERVER|SPAN_KIND_CLIENT"})')
    def counted():
        seen = {k[0]: v for k, v in by_labels(stack.query(expr), "service_name").items()}
        assert seen == expected, seen
        return seen

    seen = poll(counted, 30, f"span-metric calls equal to the spans the sink got, {expected}")
    print(f"\nspan-metric calls {seen}, spans in the sink {expected}")


def test_service_graph_pairs_every_kept_trace(run, kept):
    stack = run["stack"]
    kept_traces = len(kept["server"])
    expr = "sum by (client, server) (traces_service_graph_request_total)"
    def paired():
        edges = by_labels(stack.query(expr), "client", "server")
        assert edges[("locust", "dice-api")] == kept_traces, dict(edges)
        return edges

    edges = poll(paired, 45, f"the edge locust -> dice-api with the {kept_traces} kept traces")
    print(f"\nservice graph edges {dict(edges)}")
    # Unsampled requests leave no span on either side, so nothing shows up unpaired but the kept requests
    # that locust abandoned at its stop (a CLIENT span without a server: "unknown").
    others = {edge: n for edge, n in edges.items() if edge != ("locust", "dice-api")}
    assert set(others) <= {("locust", "unknown")} and sum(others.values()) <= len(kept["abandoned"]), others


def test_log_records_at_warning_and_above_are_exported_with_their_trace_ids_and_info_is_not(run):
    # The profile's OTEL_PYTHON_LOG_HANDLER_LEVEL: the app's `Dice rolled` (INFO, one per `/`) stays on its
    # stdout only; each `/fail` writes one ERROR record (`Unhandled error`, logged by the app's own error
    # handler), exported in the trace of its request, whether or not the sampler kept that trace.
    stack, sent = run["stack"], run["sent"]
    failures = sent[("/fail", "500")]
    assert failures and sent[("/", "200")], f"the load must exercise both levels: {dict(sent)}"

    def exported():
        records = stack.loki_sink.records("dice-api")
        errors = [r for r in records if str(r.body).startswith("Unhandled error")]
        assert len(errors) == failures, (len(errors), failures)
        return records

    records = poll(exported, 30, f"one ERROR record per /fail, {failures}")
    levels = Counter(r.severity for r in records)
    print(f"\nrecords exported by level {dict(levels)}; /fail sent {failures}, / sent {sent[('/', '200')]}")
    assert all(r.record.severity_number >= 13 for r in records), f"below WARNING exported: {dict(levels)}"
    assert not [r for r in records if str(r.body).startswith("Dice rolled")]
    assert all(len(r.trace_id) == 32 and r.trace_id != "0" * 32 and r.span_id for r in records
               if str(r.body).startswith("Unhandled error"))
