"""The saturation alerts fired for real on the native stack: a real cgroup, real exporters, real notifications.

promtool's cases (tests/data/dice-saturation-alerts.test.yaml) prove each alert on made-up series. Here the
app runs in its container cgroup with compose's limits for the `app` service (NativeStack.app_cgroup: CPU
quota `cpus`, memory `mem_limit`), cAdvisor and node-exporter are scraped, and the real Prometheus and
Alertmanager notify a webhook receiver:

1. Under compose's steady load, through the edge, no saturation alert goes even pending, and the app's
   share of throttled CFS periods is measured (the baseline DiceAppCpuThrottled's 25 % stands on).
2. OOM: the app's memory limit lowered to what it uses plus HEADROOM, then a path scan (locust's scan
   scenario, through the edge, in bounded chunks) until the kernel OOM-kills a process of the cgroup. It
   must be a gunicorn worker: the master stays and forks a new one, the app keeps answering the steady
   load (no gap longer than MAX_GAP_S in what locust got back), and DiceAppOomKilled fires as committed
   (no `for`). Then compose's limit is put back, the scan ends by itself and the steady load is stopped
   AFTER_KILL_S after the kill (SIGTERM: locust writes its exact ground truth), and the
   counts of every source say what happened to the requests in flight: the edge counts exactly what locust
   and the scanner got, 502s included; the app's own metrics (manual: files that outlive the worker)
   count exactly what the app answered, i.e. the edge's counts without the 502s; the SDK's (otel metrics
   and span metrics) lose what the killed worker answered after its last export, and no more.
3. Throttling: the spike scenario alone, through the edge (5 users with no think time, up to 40), against
   the app under a CFS quota of SPIKE_CPUS cores: the quota is spent in most periods. DiceAppCpuThrottled
   fires in its drill (windows divided by 10: 30 s of `for`) and resolves once the spike is over; the
   committed alert goes pending (its 5-minute `for` outlasts the spike). This replaces the SIGSTOP drill
   the CPU-starvation test once used. Not compose's quota of 1 core: on a 2-core machine that also runs
   locust, the edge and the collector, the spike left the app at most 0.66 cores (the host 99 % busy) and
   8 % of its periods throttled: the machine, not the quota, was its limit.
4. cAdvisor and node-exporter SIGKILLed: CadvisorTargetDown and NodeExporterTargetDown fire, the saturation
   series go absent (not 0) and no saturation alert fires on them; both resolve once they are back.
5. DiceAppOomKilled resolves: it reads the naming layer's 5-minute count of kills, which no drill shortens, so
   about 5 minutes after the kill. The throttling and exporter tests run meanwhile. The count is taken
   over the samples of those 5 minutes, which cAdvisor's absence leaves in place, so the alert neither
   resolves early nor starts again around cAdvisor's restart (both checked).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import psutil
import pytest

from tooling.native.container import compose_cpus, compose_mem_limit
from tooling.native.drills import Notified, SteadyLoad, alerts_seen, compose_users, drill_stack
from tooling.native.stack import locust_result, poll, prometheus_query, run_locust

pytestmark = pytest.mark.integration

FACTOR = 10
DRILL = f"x{FACTOR}"
SATURATION = ("DiceAppCpuThrottled", "DiceAppMemoryNearLimit", "DiceAppOomKilled", "HostDiskWillFillIn24h",
              "NodeExporterTargetDown", "CadvisorTargetDown")
# What must stay quiet while the exporters are down: the saturation alerts that read their instant series
# and rates (the OOM kills' 5-minute increase is held by its samples, and the OOM test's kill is in it).
ON_ABSENT_DATA = ("DiceAppCpuThrottled", "DiceAppMemoryNearLimit", "HostDiskWillFillIn24h")
QUIET_SECONDS = 75  # the steady load's first 75 s: every 1-minute rate of the app's cgroup has data
# The OOM test's steady load is stopped this long after the kill, once the alert has fired: MAX_GAP_S is
# measured over the 30 s after the kill, and the app must be seen answering after it.
AFTER_KILL_S = 35
# Above what the app uses at rest under the steady load: what the scan has to add before the kernel acts.
# Small enough that a few thousand paths do it (each path a worker has seen costs it memory in its
# exporters), large enough that the steady load alone never does.
HEADROOM = 64 * 2**20
SCAN_CHUNK, MAX_CHUNKS = 500, 16  # at most 8,000 paths
SPIKE_CPUS = 0.25  # a quarter of the 0.66 cores the spike gets the app to use on a 2-core machine
MAX_GAP_S = 10.0  # the longest the steady load may go without an answer around the kill
# The SDK exports metrics every 10 s (OTEL_METRIC_EXPORT_INTERVAL) and spans every 5 s (the batch span
# processor's schedule): what the killed worker answered in that long before the kill may be lost. Twice
# the interval: the worker was busy with the scan, and its export thread waits for the GIL and the quota.
LOST_WINDOW_S = 20.0
ROUTES = {"/": 200, "/health": 200, "/fail": 500}
TIMES: dict[str, float] = {}  # fault-to-notification times, printed at the end
STATE: dict[str, float] = {}  # what a later test needs from an earlier one (times)
BEFORE: dict[str, Counter] = {}  # every source's counts once the quiet test's load was counted


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with drill_stack(tmp_path_factory.mktemp("saturation-alerts"), (FACTOR,), None, TIMES) as native:
        if native.app_cgroup is None:
            pytest.skip(f"the app has no container cgroup here: {native.app_cgroup_problem}")
        yield native


@pytest.fixture(scope="module")
def notified(stack):
    return Notified(stack.webhook)


def value(stack, expr: str, at: float | None = None) -> float | None:
    result = prometheus_query(stack.prometheus_url, expr, **({"time": f"{at:.3f}"} if at else {}))
    return float(result[0]["value"][1]) if result else None


def counts(stack) -> dict[str, Counter]:
    """(route, status) -> requests, per source; unmatched paths are route "?"."""
    def read(expr: str, route_label: str, status_label: str) -> Counter:
        found: Counter = Counter()
        for row in prometheus_query(stack.prometheus_url, expr):
            route = row["metric"].get(route_label, "")
            if route_label == "span_name":
                route = route.partition(" ")[2]  # "GET /" -> "/", the catch-all's "GET" -> ""
            found[(route if route in ROUTES else "?", int(row["metric"][status_label]))] += int(float(row["value"][1]))
        return found

    return {
        "edge": read('sum by (span_name, http_response_status_code) (traces_spanmetrics_calls_total'
                     '{telemetry_source="edge", span_kind="SPAN_KIND_SERVER"})', "span_name",
                     "http_response_status_code"),
        # Per route from the histogram (the app job keeps only the app's routes' paths), unmatched paths
        # from the request total, which has no path label.
        "manual": read('sum by (path, status) (flask_http_request_duration_seconds_count{telemetry_source="manual"})',
                       "path", "status")
        + read('sum by (status) (flask_http_request_total{telemetry_source="manual", status="404"})', "path",
               "status"),
        "otel": read('sum by (http_route, http_response_status_code) (http_server_request_duration_seconds_count'
                     '{telemetry_source="otel", service_name="dice-api"})', "http_route", "http_response_status_code"),
        "otel spans": read('sum by (span_name, http_response_status_code) (traces_spanmetrics_calls_total'
                           '{telemetry_source="otel", service_name="dice-api", span_kind="SPAN_KIND_SERVER"})',
                           "span_name", "http_response_status_code"),
    }


def sent(truth: dict, name_to_route: dict[str, str]) -> Counter:
    """Locust's ground truth as (route, status) -> requests."""
    return Counter({(name_to_route[row["name"]], row["status"]): row["count"] for row in truth["sent"]})


class KillWatcher:
    """Notes when the kernel's OOM-kill count of a memory cgroup first grows (polled every 0.2 s)."""

    def __init__(self, memory, kills_before: int):
        self.memory, self.kills_before, self.killed_at = memory, kills_before, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2) and not self.killed_at:
            if self.memory.stats()["oom_kill"] > self.kills_before:
                self.killed_at = time.time()

    def start(self) -> KillWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_steady_load_sets_off_no_saturation_alert(stack, notified):
    group = stack.app_cgroup
    # The limits compose gives the app's container, on its cgroup and as cAdvisor reports them.
    assert group.memory.limit == compose_mem_limit("app")
    quota, period = group.cpu_quota
    assert quota / period == compose_cpus("app")
    poll(lambda: value(stack, 'dice:container_memory_limit:bytes{service="app"}') == compose_mem_limit("app")
         and value(stack, 'dice:container_cpu_limit:cores{service="app"}') == compose_cpus("app"), 60,
         "the app's limits in the naming layer")

    started = STATE["quiet"] = time.time()
    truth = run_locust(stack.edge_url, QUIET_SECONDS, compose_users("locust"), stack.run_dir, name="quiet",
                       scenario="steady", otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}")
    seen = alerts_seen(stack.prometheus_url, started, selector=f'{{alertname=~"{"|".join(SATURATION)}"}}')
    throttled = value(stack, 'max_over_time(dice:container_cpu_throttled_periods:ratio_rate1m{service="app"}[1m])')
    cpu = value(stack, 'max_over_time(dice:container_cpu_usage:cores_rate1m{service="app"}[1m])')
    memory = value(stack, 'max_over_time(dice:container_memory_working_set:bytes{service="app"}[1m])')
    print(f"\nsteady load ({compose_users('locust')} users): throttled share of CFS periods at most {throttled:.1%}, "
          f"CPU at most {cpu:.3f} of {compose_cpus('app')} cores, working set at most {memory / 2**20:.0f} MiB "
          f"of {compose_mem_limit('app') / 2**20:.0f} MiB; kernel: {group.cpu_stat()}")
    assert not seen, f"saturation alerts set off by the steady load: {seen}"
    # The series the alerts read were there, so they could have fired.
    assert throttled is not None and cpu is not None and memory is not None
    assert throttled < 0.25 / 2, "the steady load alone comes near the throttling threshold"

    # Every source counted exactly what locust sent, the starting point of the OOM test's counts.
    quiet = sent(truth, {r: r for r in ROUTES})

    def settled():
        now = counts(stack)
        if not all(now[source] == quiet for source in now):
            raise AssertionError(f"sent {dict(quiet)}; counted {({s: dict(c) for s, c in now.items()})}")
        return now

    BEFORE.update(poll(settled, 60, "every source's counts equal to what the steady load sent", interval=2))


def test_path_scan_under_a_low_memory_limit_oom_kills_a_worker_and_every_source_says_what_was_lost(
        stack, notified, request):
    group = stack.app_cgroup
    master = psutil.Process(stack.app.process.pid)
    workers = {w.pid for w in master.children()}
    assert len(workers) == 2 and set(group.pids()) >= {master.pid, *workers}, (workers, group.pids())
    assert BEFORE, "the quiet test did not leave its counts"
    before = BEFORE
    steady = SteadyLoad(stack, name="steady")
    request.addfinalizer(steady.stop)  # if the test fails before it is stopped
    time.sleep(20)  # the steady load's memory is in use, as it is at rest
    kills_before = group.memory.stats()["oom_kill"]
    at_rest = group.memory.stats()
    low_limit = at_rest["usage"] + HEADROOM
    assert group.memory.set_limit(low_limit)
    notified.since = time.time()
    watcher = KillWatcher(group.memory, kills_before).start()
    scanned, chunks = 0, []
    try:
        for number in range(MAX_CHUNKS):
            chunks.append(f"scan-{number}")
            run_locust(stack.edge_url, None, 4, stack.run_dir, name=chunks[-1], scenario="scan",
                       env={"DICE_SCAN_REQUESTS": str(SCAN_CHUNK), "DICE_SECONDS": "120"})
            scanned += SCAN_CHUNK
            if watcher.killed_at:
                break
        else:
            # The next scrape of /metrics renders every path seen: it may be what takes the worker over.
            deadline = time.monotonic() + 20
            while not watcher.killed_at and time.monotonic() < deadline:
                time.sleep(0.5)
    finally:
        watcher.stop()
        stats = group.memory.stats()
        assert group.memory.set_limit(compose_mem_limit("app")), "compose's limit could not be put back"
    kills = stats["oom_kill"] - kills_before
    print(f"\nat rest {at_rest['usage'] / 2**20:.0f} MiB; limit lowered to {low_limit / 2**20:.0f} MiB; "
          f"{scanned} paths scanned: {kills} OOM kill(s), peak {stats['max_usage'] / 2**20:.0f} MiB")
    assert kills >= 1 and watcher.killed_at, f"no OOM kill after {scanned} paths under {low_limit / 2**20:.0f} MiB"
    killed = STATE["killed"] = watcher.killed_at

    # gunicorn's master stays and replaces the killed worker.
    assert master.is_running(), "the OOM kill took gunicorn's master: the app is down"
    replaced = poll(lambda: len(now := {w.pid for w in master.children()}) == 2 and now != workers and now, 30,
                    "a new worker in place of the killed one")
    print(f"workers {sorted(workers)} -> {sorted(replaced)}")

    oom = {"alertname": "DiceAppOomKilled", "drill": "", "service": "app"}
    TIMES["worker OOM-killed -> DiceAppOomKilled (committed)"] = \
        notified.wait("firing", 120, **oom) - (killed - notified.since)

    # The scan's chunks ended by themselves; the steady load is stopped (SIGTERM): both ground truths are exact.
    time.sleep(max(0.0, killed + AFTER_KILL_S - time.time()))
    truth = steady.stop()
    scan_truth = Counter()
    for name in chunks:
        scan_truth += sent(locust_result(stack.run_dir, name), {"/**": "?"})
    steady_sent = sent(truth, {r: r for r in ROUTES})
    clients = steady_sent + scan_truth

    # The app answered throughout: the longest wait between two answers locust got around the kill.
    answered = sorted(t for t, _, status, _ in truth["timeline"] if status)
    assert answered[-1] > killed + 15, "the steady load ended before it could show the app answering after the kill"
    around = [t for t in answered if killed - 60 <= t <= killed + 30]
    gap = max(b - a for a, b in zip(around, around[1:], strict=False))
    failed = [(round(t - killed, 1), name, status) for t, name, status, _ in truth["timeline"]
              if status != ROUTES[name]]
    print(f"steady load: {dict(steady_sent)}; failed {failed}; longest gap around the kill {gap:.1f} s\n"
          f"scan: {dict(scan_truth)}")
    assert gap <= MAX_GAP_S, f"the app did not answer for {gap:.1f} s around the OOM kill"
    assert all(status == 502 for _, _, status in failed), failed

    # Every source once it has published the end of both loads: the edge and the app's own exporter
    # exactly, the SDK's sources up to what they lost.
    def settled():
        now = counts(stack)
        grown = {source: now[source] - before[source] for source in now}
        answered_by_app = Counter({key: n for key, n in grown["edge"].items() if key[1] != 502})
        if grown["edge"] != clients or grown["manual"] != answered_by_app:
            raise AssertionError(f"clients {dict(clients)}; grown {({s: dict(c) for s, c in grown.items()})}")
        return grown

    grown = poll(settled, 90, "the edge's counts equal to what the clients got, the app's to what it answered",
                 interval=2)
    errors_502 = sum(n for (_, status), n in clients.items() if status == 502)
    failed_scrapes = value(stack, f'count_over_time((up{{job="app"}} == 0)[{round(time.time() - notified.since)}s:5s])')
    # What locust got answered shortly before the kill: the most the killed worker may not have exported.
    in_flight_window = Counter((name, status) for t, name, status, _ in truth["timeline"]
                               if killed - LOST_WINDOW_S <= t <= killed + 1)
    lost = {source: grown["manual"] - grown[source] for source in ("otel", "otel spans")}
    print(f"502s (requests in flight on the killed worker): {errors_502}; failed scrapes of the app: {failed_scrapes}; "
          f"lost by the SDK's sources: {({s: dict(c) for s, c in lost.items()})}")
    # A sync worker serves one request at a time: each kill cost at most the one it was serving (or a
    # scrape of /metrics, which no client counts).
    assert errors_502 <= kills, (errors_502, kills)
    for source in ("otel", "otel spans"):
        # Never more than the app answered; short only on routes the steady load used near the kill.
        assert not (grown[source] - grown["manual"]), (source, grown[source], grown["manual"])
        for key, n in lost[source].items():
            if key[0] == "?":
                continue  # the scan's 404s: hundreds a second, no bound worth stating
            assert n <= in_flight_window[key], (source, key, n, in_flight_window)


def test_spike_through_the_edge_throttles_the_app_and_fires_cpu_throttled(stack, notified):
    group = stack.app_cgroup
    group.set_cpus(SPIKE_CPUS)
    start_stat = group.cpu_stat()
    start_cpu = group.cpu_seconds()
    started = notified.since = time.time()
    spike = run_locust(stack.edge_url, None, 5, stack.run_dir, name="spike", background=True, scenario="spike")
    throttled = {"alertname": "DiceAppCpuThrottled", "drill": DRILL, "service": "app"}
    try:
        TIMES[f"spike through the edge, quota {SPIKE_CPUS} cores -> DiceAppCpuThrottled (drill x10)"] = \
            notified.wait("firing", 150, **throttled)
        spike.wait(180)
    finally:
        if spike.poll() is None:
            spike.terminate()
            spike.wait(30)
        end_stat = group.cpu_stat()
        end_cpu = group.cpu_seconds()
        group.set_cpus(compose_cpus("app"))
    ended = time.time()
    kernel_cores = (end_cpu - start_cpu) / (ended - started)
    kernel_share = (end_stat["nr_throttled"] - start_stat["nr_throttled"]) / max(
        1, end_stat["nr_periods"] - start_stat["nr_periods"])
    window = f"{round(ended - started)}s"
    peak = value(stack, f'max_over_time(dice:container_cpu_throttled_periods:ratio_rate1m{{service="app"}}[{window}])')
    cpu = value(stack, f'max_over_time(dice:container_cpu_usage:cores_rate1m{{service="app"}}[{window}])')
    print(f"\nspike: {dict(sent(locust_result(stack.run_dir, 'spike'), {r: r for r in ROUTES}))} in "
          f"{ended - started:.0f} s; throttled share (kernel, whole spike) {kernel_share:.1%}, naming layer peak "
          f"{peak:.1%}; CPU peak {cpu:.2f} cores of {SPIKE_CPUS} (kernel, whole spike {kernel_cores:.3f})")
    # The kernel's own accounting agrees with what cAdvisor and the naming layer made of it.
    assert kernel_share > 0.25 and peak > 0.25, (kernel_share, peak)
    # The quota held, by the kernel's own count (cpuacct.usage over the whole spike). The naming layer's
    # peak is a 1-minute rate over cAdvisor's 5-second samples: one sample more or less in its window is
    # 1/12 of it, so it is held to 20 % (it read 0.277 and 0.281 cores of 0.25 in two runs).
    assert kernel_cores <= SPIKE_CPUS * 1.05, "the app used more CPU than its quota allows"
    assert cpu <= SPIKE_CPUS * 1.2, "cAdvisor's rate of the app's CPU far above what its quota allows"
    TIMES["spike over -> DiceAppCpuThrottled resolved (drill x10)"] = \
        notified.wait("resolved", 150, **throttled) - (ended - notified.since)
    # The committed alert's expression held too; its 5 minutes outlast the spike.
    committed = alerts_seen(stack.prometheus_url, started, selector='{alertname="DiceAppCpuThrottled", drill=""}')
    assert "pending" in {state for state, *_ in committed.get("DiceAppCpuThrottled", set())}, committed
    print("notifications so far:", notified.summary())


def test_exporters_down_fire_their_target_down_and_saturation_goes_absent_not_zero(stack, notified):
    """cAdvisor and node-exporter SIGKILLed: their target-down alerts fire (the x10 drills, 6 s of `for`; as
    committed, 1 minute), the naming layer's series go absent rather than 0, so no saturation alert can
    fire on what is not measured; both resolve once the exporters are started again. The OOM test's
    DiceAppOomKilled is still firing meanwhile (its 5-minute increase holds the kill): it must carry on as
    it was, neither resolved nor started again."""
    # A quiet start: the spike's committed DiceAppCpuThrottled stays pending while its 1-minute rate still
    # holds the spike, and would read as an alert on absent data below.
    poll(lambda: not stack.query(f'ALERTS{{alertname=~"{"|".join(ON_ABSENT_DATA)}"}}'), 120,
         "no saturation alert but DiceAppOomKilled pending or firing before the exporters are killed")
    oom_started = {a["labels"].get("drill", ""): a["startsAt"] for _, a in notified.seen("firing", since=0.0)
                   if a["labels"]["alertname"] == "DiceAppOomKilled"}
    started = notified.since = time.time()
    for exporter in (stack.cadvisor, stack.node_exporter):
        exporter.process.kill()
        exporter.process.wait()
    for alert in ("CadvisorTargetDown", "NodeExporterTargetDown"):
        TIMES[f"exporter SIGKILLed -> {alert} (drill x10)"] = notified.wait("firing", 60, alertname=alert, drill=DRILL)
    # Instant series go stale at the first failed scrape; rates over 1 minute end a minute later.
    names = ("dice:container_cpu_usage:cores_rate1m", "dice:container_cpu_limit:cores",
             "dice:container_cpu_throttled_periods:ratio_rate1m", "dice:container_memory_working_set:bytes",
             "dice:container_memory_limit:bytes", "dice:node_filesystem_free:ratio", "dice:node_cpu_busy:ratio_rate1m")
    # (Not the OOM kills' 5-minute increase: it is computed from the last 5 minutes' samples for 5 minutes.)
    poll(lambda: not stack.query(f'{{__name__=~"{"|".join(names)}"}}'), 90,
         "every saturation series absent while the exporters are down")
    seen = alerts_seen(stack.prometheus_url, started, selector=f'{{alertname=~"{"|".join(ON_ABSENT_DATA)}"}}')
    assert not seen, f"saturation alerts on absent data: {seen}"

    restarted = time.time()
    stack.start_node_exporter()
    stack.start_cadvisor()
    for alert in ("CadvisorTargetDown", "NodeExporterTargetDown"):
        TIMES[f"exporter started again -> {alert} resolved (drill x10)"] = \
            notified.wait("resolved", 60, alertname=alert, drill=DRILL) - (restarted - started)
    poll(lambda: value(stack, 'dice:container_memory_limit:bytes{service="app"}') == compose_mem_limit("app"), 60,
         "the app's container series back after cAdvisor's restart")
    # One firing of DiceAppOomKilled, as before the exporters went down: none started since.
    restarted_oom = [a["startsAt"] for _, a in notified.seen("firing", since=started)
                     if a["labels"]["alertname"] == "DiceAppOomKilled"
                     and a["startsAt"] != oom_started.get(a["labels"].get("drill", ""))]
    assert not restarted_oom, f"DiceAppOomKilled started again around cAdvisor's restart: {restarted_oom}"


def test_oom_alert_resolves_once_the_kill_leaves_its_five_minutes(stack, notified):
    killed = STATE.get("killed")
    if killed is None:
        pytest.skip("the OOM test did not get a kill")
    notified.since = killed
    oom = {"alertname": "DiceAppOomKilled", "drill": "", "service": "app"}
    resolved = TIMES["worker OOM-killed -> DiceAppOomKilled resolved (committed, its 5-minute increase)"] = \
        notified.wait("resolved", max(60.0, killed + 420 - time.time()), **oom)
    # Not before the kill left the increase's 5 minutes (less a scrape): not on cAdvisor's absence meanwhile.
    assert resolved >= 300 - 10, resolved
    # Nothing else of the saturation alerts fired but what the faults set off, from the quiet test on.
    fired = {name for name, *_ in notified.firing(STATE.get("quiet", 0.0)) if name in SATURATION}
    print("saturation alerts that fired:", sorted(fired), "\nall notifications:", notified.summary())
    assert fired <= {"DiceAppOomKilled", "DiceAppCpuThrottled", "DiceAppMemoryNearLimit", "CadvisorTargetDown",
                     "NodeExporterTargetDown"}, fired
