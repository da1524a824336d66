"""A path scan must not grow the telemetry, nor push the app past its container's memory limit.

The real pipeline (tests/collector/test_pipeline.py's native stack) takes one bounded scan of 10,000 random paths on
loopback, shared by the tests below, through the edge (Caddy) as a scanner from outside would send it.
Before the scan, traffic to every route and unknown paths until every gunicorn worker has served a 404
create the series that unmatched traffic aggregates into (route "/**", span name "GET"; the edge's
catch-all route makes its span "GET" too). The scan must then add no series at all to any source (the
app's otel and manual, the edge's span metrics, Caddy's own metrics), and the exact per-route counts of
all sources must still hold.

The app runs in a memory cgroup (tooling/native/container.py) that accounts for all of its processes, as a container
would: what the scan costs the app's memory is measured against the `mem_limit` compose gives the `app`
service, and that limit is then applied for real.
"""

from __future__ import annotations

import http.client
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass

import psutil
import pytest

from tooling.native.container import MemoryCgroup, compose_mem_limit, parent_cgroup
from tooling.native.stack import NativeStack, poll, prometheus_query

pytestmark = pytest.mark.integration

SCAN_PATHS = 10_000
ROUTES = {"/": 200, "/health": 200, "/fail": 500}
WARMUP = {"/": 60, "/health": 20, "/fail": 10}
WARMUP_UNKNOWN = 20
SOURCES = ("otel", "manual", "edge")  # ebpf needs Beyla (kprobes): checked in tests/e2e
# The Prometheus job that scrapes each source's series; "edge" also stands for Caddy's own metrics, job
# edge, which have no telemetry_source (the edge's health).
JOBS = {"otel": "otel-collector", "manual": "app", "edge": "edge"}
CADDY_SERIES = '{job="edge", telemetry_source=""}'
# The series each source may gain from the scan, by identity: none. Unmatched traffic has one set of
# series per gunicorn worker (otel: http_server_request_duration_seconds_* without http_route, span
# metrics of span "GET"; manual: flask_http_request_total{status="404"}), and the warm-up made them all;
# the edge is one process, whose catch-all route's SERVER span "GET" and upstream hop "GET" (status 404)
# the warm-up made too. The issue allows the edge one new series per scan; it needs none.
EXPECTED_NEW_SERIES: dict[str, set] = {"otel": set(), "manual": set(), "edge": set(), "caddy": set()}
ROUTE_LABELS = {*ROUTES, "/**"}  # every route label the recording rules may carry
MiB = 2**20


def send(port: int, paths: list[str], connections: int = 6, deadline_s: float = 240) -> Counter:
    """GET every path once over `connections` parallel clients; returns Counter((path or '?', status))."""
    seen: Counter = Counter()
    lock = threading.Lock()
    chunks = [paths[i::connections] for i in range(connections)]
    stop_at = time.monotonic() + deadline_s  # a bound on time as well as on count

    def worker(chunk: list[str]) -> None:
        # Longer than the edge's response_header_timeout (15 s): an app too slow to answer gets the edge's
        # 504, which the counts then show. A 10 s timeout once gave up on all 8 connections at once while
        # the suite's other stacks loaded both cores (status 0, no answer to count).
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local: Counter = Counter()
        for path in chunk:
            if time.monotonic() > stop_at:
                break
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                status = 0
            local[(path if path in ROUTES else "?", status)] += 1
        conn.close()
        with lock:
            seen.update(local)

    threads = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def random_paths(count: int) -> list[str]:
    # Shapes a scanner sends: deep paths, extensions, query strings; each one distinct.
    shapes = ("/{}", "/admin/{}.php", "/{}/../etc/passwd", "/api/v1/users/{}", "/{}.env?x={}", "/wp-{}/x")
    return [shapes[i % len(shapes)].format(secrets.token_hex(6), i) for i in range(count)]


def query(stack: NativeStack, expr: str, at: float | None = None) -> list:
    return prometheus_query(stack.prometheus_url, expr, **({"time": f"{at:.3f}"} if at is not None else {}))


def value(stack: NativeStack, expr: str) -> int:
    result = stack.query(expr)
    return int(float(result[0]["value"][1])) if result else 0


def scraped_instant(stack: NativeStack, not_before: float) -> float | None:
    """An instant at which the last scrape of every source's job began after `not_before` (epoch s) and
    succeeded, or None. A failed scrape (the app's ~20 MB page can outlast the timeout on a busy machine)
    marks all of its series stale, and a snapshot taken then would miss them."""
    at = time.time()
    up = {r["metric"]["job"]: r["value"][1] for r in query(stack, f'up{{job=~"{"|".join(JOBS.values())}"}}', at)}
    began = {r["metric"]["job"]: float(r["value"][1])
             for r in query(stack, f'timestamp(up{{job=~"{"|".join(JOBS.values())}"}})', at)}
    ok = all(up.get(job) == "1" and began.get(job, 0) > not_before for job in JOBS.values())
    return at if ok else None


def series_at(stack: NativeStack, at: float) -> dict[str, set]:
    """Every stored series of each source at `at`, by identity (its full label set, name included),
    recording rules aside (their series come and go with a minute's traffic: see rule_routes); and
    Caddy's own, as "caddy"."""
    result = query(stack, f'{{telemetry_source=~"{"|".join(SOURCES)}", __name__!~".*:.*"}}', at)
    series: dict[str, set] = {source: set() for source in (*SOURCES, "caddy")}
    for r in result:
        series[r["metric"]["telemetry_source"]].add(tuple(sorted(r["metric"].items())))
    series["caddy"] = {tuple(sorted(r["metric"].items())) for r in query(stack, CADDY_SERIES, at)}
    return series


def rule_routes(stack: NativeStack, at: float) -> set[str]:
    """The route labels on the recording rules' series of the sources at `at`."""
    result = query(stack, f'count by (route) ({{telemetry_source=~"{"|".join(SOURCES)}", __name__=~".*:.*"}})', at)
    return {r["metric"].get("route", "") for r in result}


def counts_by_route(stack: NativeStack, at: float | None = None) -> dict[str, Counter]:
    otel = query(stack, 'sum by (http_route, http_response_status_code) '
                        '(http_server_request_duration_seconds_count{telemetry_source="otel"})', at)
    manual = query(stack, 'sum by (path, status) '
                          '(flask_http_request_duration_seconds_count{telemetry_source="manual"})', at)
    edge = query(stack, 'sum by (span_name, http_response_status_code) (traces_spanmetrics_calls_total'
                        '{telemetry_source="edge", span_kind="SPAN_KIND_SERVER"})', at)
    return {
        # The edge's SERVER span is "GET /route", or "GET" for its catch-all route (unknown paths).
        "edge": Counter({(r["metric"]["span_name"].partition(" ")[2] or "?",
                          int(r["metric"]["http_response_status_code"])): int(float(r["value"][1])) for r in edge}),
        "otel": Counter({(r["metric"].get("http_route", "?"), int(r["metric"]["http_response_status_code"])):
                         int(float(r["value"][1])) for r in otel}),
        "manual": Counter({(r["metric"]["path"], int(r["metric"]["status"])): int(float(r["value"][1]))
                           for r in manual}),
    }


def workers_with_a_404(stack: NativeStack) -> int:
    """How many gunicorn workers (the SDK's service.instance.id, one per worker) have an `otel` series of
    unmatched traffic."""
    return len(stack.query('count by (instance) (http_server_request_duration_seconds_count'
                           '{telemetry_source="otel", http_route=""})'))


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def app_footprint(stack: NativeStack) -> dict:
    master = psutil.Process(stack.app.process.pid)
    # The cgroup wrapper (sh) and opentelemetry-instrument exec, so the spawned pid is the gunicorn master.
    workers = master.children()
    footprint = {
        "worker_pids": sorted(w.pid for w in workers),
        "worker_rss_mib": sorted(round(w.memory_info().rss / MiB) for w in workers),
        "multiproc_files_kib": round(sum(f.stat().st_size for f in stack.app_multiproc_dir.iterdir()) / 1024),
    }
    started = time.monotonic()
    try:
        footprint["metrics_body_kib"] = round(len(_get(stack.ports.app, "/metrics")) / 1024)
    except (OSError, http.client.HTTPException) as exc:  # its worker killed (see the last test)
        footprint["metrics_body_kib"] = f"no answer ({type(exc).__name__})"
    footprint["metrics_render_s"] = round(time.monotonic() - started, 1)
    return footprint


def mib(stats: dict | None) -> dict:
    keys = ("usage", "max_usage", "rss", "cache")
    return {k: round(stats[k] / MiB) for k in keys} | {k: stats[k] for k in ("failcnt", "under_oom", "oom_kill")} \
        if stats else {}


@pytest.fixture(scope="module")
def app_cgroup():
    """A memory cgroup for the app, or (None, why not). It only accounts during the scan: under the
    compose limit a worker may be OOM-killed mid-scan (see the last test), which would lose counts."""
    parent, reason = parent_cgroup()
    if parent is None:
        yield None, reason
        return
    group = MemoryCgroup.create()
    try:
        yield group, ""
    finally:
        group.remove()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, app_cgroup):
    group, _ = app_cgroup
    native = NativeStack(tmp_path_factory.mktemp("native-scan")).up(with_app=False)
    try:
        if group is not None:
            # The gunicorn master enters the cgroup before it forks its workers.
            native.app_settings.command_prefix = tuple(group.wrap([]))
        native.start_app()
        yield native
    finally:
        native.down()


@dataclass
class Scan:
    seconds: float
    expected_routes: Counter
    total_404: int
    series_before: dict[str, set]
    series_after: dict[str, set]
    routes_after: set[str]
    counts: dict[str, Counter]
    footprint_before: dict
    footprint_after: dict
    memory_before: dict | None
    memory_after: dict | None
    in_cgroup: set[int]
    limited: bool | None  # whether the kernel took compose's limit for the app after the scan


@pytest.fixture(scope="module")
def scan(stack, app_cgroup) -> Scan:
    """Warm-up, snapshots, the one 10,000-path scan, snapshots: what both tests below judge."""
    group, _ = app_cgroup
    port = stack.ports.edge  # what users and scanners call
    warmup = [path for path, n in WARMUP.items() for _ in range(n)] + random_paths(WARMUP_UNKNOWN)
    sent = send(port, warmup)
    expected_routes = Counter({(p, ROUTES[p]): n for p, n in WARMUP.items()})
    assert sent == expected_routes + Counter({("?", 404): WARMUP_UNKNOWN}), sent
    warmup_404 = WARMUP_UNKNOWN

    def settled(total_404: int) -> bool:
        """True once every source shows the counts; otherwise raises with what it saw (poll reports it)."""
        counts = counts_by_route(stack)
        seen = {"routes": {s: {k: counts[s][k] for k in expected_routes} for s in SOURCES},
                "otel 404": counts["otel"][("?", 404)],
                "edge 404": counts["edge"][("?", 404)],
                "manual 404": value(stack, 'sum(flask_http_request_total{telemetry_source="manual", status="404"})'),
                "span GET": value(stack, 'sum(traces_spanmetrics_calls_total{span_kind="SPAN_KIND_SERVER", '
                                         'span_name="GET", service_name="dice-api"})'),
                "app scrape": query(stack, 'up{job="app"}')}
        if not (all(seen["routes"][s] == expected_routes for s in SOURCES)
                and seen["otel 404"] == seen["manual 404"] == seen["span GET"] == seen["edge 404"] == total_404):
            raise AssertionError(f"expected {dict(expected_routes)} and {total_404} 404s; saw {seen}")
        return True

    poll(lambda: settled(warmup_404), timeout=60, what="the warm-up counts in Prometheus")
    # Every worker must have served a 404 before the scan, or the scan would add that worker's series
    # of unmatched traffic (it does so once per worker, never per path): more unknown paths until so.
    workers = len(psutil.Process(stack.app.process.pid).children())
    while workers_with_a_404(stack) < workers:
        assert warmup_404 < WARMUP_UNKNOWN + 200, f"after {warmup_404} 404s, not every one of {workers} workers"
        assert send(port, random_paths(10)) == Counter({("?", 404): 10})
        warmup_404 += 10
        poll(lambda n=warmup_404: settled(n), timeout=60, what="the extra warm-up 404s in Prometheus")
    # The service graph pairs client and server spans for 12 s (its store's TTL) before it counts a
    # request without client span as an edge "user" -> edge (the scanner has no span): its series appear
    # that much later. The edge's upstream hop pairs with the app's SERVER span as edge -> dice-api.
    warmup_total = sum(WARMUP.values()) + warmup_404
    poll(lambda: value(stack, 'sum(traces_service_graph_request_total{client="user", server="edge"})')
         == value(stack, 'sum(traces_service_graph_request_total{client="edge", server="dice-api"})')
         == warmup_total, 60, f"the service graph's {warmup_total} warm-up requests, user -> edge -> dice-api")
    settled_at = time.time()
    before = poll(lambda: scraped_instant(stack, settled_at), 60, "a good scrape of every source after the warm-up")
    series_before = series_at(stack, before)
    footprint_before = app_footprint(stack)
    memory_before = group.stats() if group else None
    if group:
        group.reset_peak()  # from here: the scan and the first scrape after it

    started = time.monotonic()
    scanned = send(port, random_paths(SCAN_PATHS), connections=8)
    seconds = time.monotonic() - started
    scan_end = time.time()
    assert scanned == Counter({("?", 404): SCAN_PATHS}), f"a scanned path was not a plain 404: {scanned}"
    total_404 = warmup_404 + SCAN_PATHS

    poll(lambda: settled(total_404), timeout=90, what="the counts after the scan")
    # The first scrape of each job that began after the scan and succeeded: the app's then renders every
    # scanned path (about 20 MB), in seconds of a worker, under the 15 s timeout.
    after = poll(lambda: scraped_instant(stack, scan_end), 60, "a good scrape of every source after the scan",
                 interval=1)
    series_after, routes_after = series_at(stack, after), rule_routes(stack, after)
    counts = counts_by_route(stack, after)
    memory_after = group.stats() if group else None
    in_cgroup = set(group.pids()) if group else set()
    # Now that the scan's series and counts are taken, compose's limit for the app: the next render of
    # /metrics (what every scrape asks for) runs under it, as it would in the container. The kernel
    # refuses the limit if it cannot reclaim the usage below it.
    limited = group.set_limit(compose_mem_limit("app")) if group else None
    footprint_after = app_footprint(stack)
    scrape = query(stack, 'scrape_duration_seconds{job="app"}', after)
    samples = query(stack, 'scrape_samples_scraped{job="app"}', after)
    print(f"\nscan of {SCAN_PATHS} paths in {seconds:.1f}s ({SCAN_PATHS / seconds:.0f} req/s), "
          f"{warmup_404} warm-up 404s for {workers} workers"
          f"\nseries per source before {({s: len(v) for s, v in series_before.items()})}"
          f"\n                  after  {({s: len(v) for s, v in series_after.items()})}"
          f"\nper route: otel {dict(counts['otel'])}\n           manual {dict(counts['manual'])}"
          f"\n           edge {dict(counts['edge'])}"
          f"\napp before {footprint_before}\n    after  {footprint_after}"
          f"\napp scrape after the scan: {samples and samples[0]['value'][1]} samples in "
          f"{scrape and round(float(scrape[0]['value'][1]), 1)} s"
          f"\napp cgroup (MiB) before {mib(memory_before)}\n                 after  {mib(memory_after)}")
    return Scan(seconds, expected_routes, total_404, series_before, series_after, routes_after, counts,
                footprint_before, footprint_after, memory_before, memory_after, in_cgroup, limited)


def test_a_10k_path_scan_adds_no_series_and_counts_stay_exact(scan):
    for source in EXPECTED_NEW_SERIES:
        added = scan.series_after[source] - scan.series_before[source]
        gone = scan.series_before[source] - scan.series_after[source]
        print(f"{source}: {len(added)} series added {sorted(added)[:20]}, {len(gone)} gone {sorted(gone)[:20]}")
        names = Counter(dict(labels)["__name__"] for labels in added)
        assert added == EXPECTED_NEW_SERIES[source], (
            f"{source}: the scan added {len(added)} series, per metric {dict(names)}; e.g. {sorted(added)[:5]}")
        # Nothing went stale either: the snapshot after is of a complete, successful scrape.
        assert not gone, f"{source}: {len(gone)} series gone after the scan, e.g. {sorted(gone)[:5]}"
    assert scan.routes_after <= ROUTE_LABELS, f"recording rules with new routes: {scan.routes_after - ROUTE_LABELS}"
    # The comparison still holds for every route; the otel source and the edge counted every 404 exactly.
    for source in SOURCES:
        assert {k: v for k, v in scan.counts[source].items() if k[0] in ROUTES} == scan.expected_routes, source
    assert scan.counts["otel"][("?", 404)] == scan.counts["edge"][("?", 404)] == scan.total_404


def test_one_scan_takes_the_app_past_its_containers_memory_limit(scan, app_cgroup, stack):
    """What the owners' exporter holds after the scan, against compose's mem_limit for `app`; then that
    limit applied for real, and one scrape's worth of /metrics."""
    group, reason = app_cgroup
    if group is None:
        pytest.skip(f"no memory cgroup for the app: {reason}")
    limit = compose_mem_limit("app")
    before, after = scan.memory_before, scan.memory_after
    master = psutil.Process(stack.app.process.pid)
    # The master and its workers ran in the cgroup all along (children inherit it at fork).
    assert {master.pid, *scan.footprint_after["worker_pids"]} <= scan.in_cgroup, (master.pid, scan.in_cgroup)
    print(f"app memory: {before['usage'] / MiB:.0f} MiB before the scan; the scan and the scrape after it "
          f"peaked at {after['max_usage'] / MiB:.0f} MiB and left {after['usage'] / MiB:.0f} MiB in use "
          f"({after['rss'] / MiB:.0f} anonymous, {after['cache'] / MiB:.0f} page cache); limit {limit / MiB:.0f} MiB")
    assert before["usage"] < limit / 2, "the app no longer fits its limit with room even before the scan"
    assert after["max_usage"] > limit, "the scan fits under the limit now: update the README (Cardinality)"

    # The limit for real (set by the scan fixture, before one more GET /metrics): the kernel reclaims
    # what it can (page cache) to get under it, or refuses.
    if not scan.limited:
        print(f"the kernel refused the {limit / MiB:.0f} MiB limit: {group.stats()['usage'] / MiB:.0f} MiB in use")
        assert group.stats()["usage"] > limit
    else:
        # A render of the page takes hundreds of MiB more: the kernel OOM-kills a worker (the largest
        # process) rather than let the cgroup pass its limit, as it would kill a container's.
        stats = poll(lambda: (s := group.stats())["oom_kill"] > 0 and s, 30, "an OOM kill under the limit")
        print(f"under the {limit / MiB:.0f} MiB limit, GET /metrics: {scan.footprint_after['metrics_body_kib']} KiB; "
              f"{stats['oom_kill']} OOM kill(s), {stats['usage'] / MiB:.0f} MiB in use")
        # gunicorn replaces the killed worker; the master stays.
        workers = set(scan.footprint_after["worker_pids"])
        poll(lambda: len(now := {w.pid for w in master.children()}) == len(workers) and now != workers, 30,
             "a new worker in place of the killed one")
    # The app keeps answering.
    poll(lambda: _status(stack.ports.app, "/health") == 200, 30, "GET /health answered after the OOM kill")
    assert master.is_running()


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()
