"""Saturation on the native stack: node-exporter and cAdvisor for real (built from their Go modules), the app in
its own cgroup with compose's limits for the `app` service, read through the naming layer
(prometheus/rules/dice-saturation.yaml) as a dashboard would.

One stack and one load for the whole file: a 10,000-path scan through the edge, as a scanner from outside
sends it (tests/collector/test_cardinality.py drives the same scan without limits and checks the app's own
series). It is the load that must move the app's CPU (held under its 1-core quota), must add no cAdvisor
series, and whose memory cost under compose's 512 MiB limit is printed: working set before and after, each
gunicorn worker's RSS, OOM kills.
"""

from __future__ import annotations

import bisect
import http.client
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from stackfiles import PeriodicReader

from tooling.native import container
from tooling.native.container import compose_cpus, compose_mem_limit
from tooling.native.stack import NativeStack, poll

pytestmark = pytest.mark.integration

SCAN_PATHS = 10_000
MiB = 2**20
APP = '{service="app"}'


def send(port: int, paths: list[str], connections: int = 8) -> Counter:
    """GET every path once over `connections` keep-alive clients; Counter of statuses (0: no answer)."""
    seen: Counter = Counter()
    lock = threading.Lock()

    def worker(chunk: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local: Counter = Counter()
        for path in chunk:
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                local[response.status] += 1
            except (OSError, http.client.HTTPException):
                conn.close()
                local[0] += 1
        conn.close()
        with lock:
            seen.update(local)

    threads = [threading.Thread(target=worker, args=(paths[i::connections],)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def scan_paths(count: int) -> list[str]:
    shapes = ("/{}", "/admin/{}.php", "/api/v1/users/{}", "/{}.env?x={}", "/wp-{}/x")
    return [shapes[i % len(shapes)].format(secrets.token_hex(6), i) for i in range(count)]


def one(stack: NativeStack, expr: str) -> float | None:
    result = stack.query(expr)
    assert len(result) <= 1, f"{expr}: more than one series: {result}"
    return float(result[0]["value"][1]) if result else None


def kernel_working_set(group: container.ContainerCgroup) -> int:
    """What cAdvisor calls the working set, from the kernel's files: usage less inactive page cache."""
    stat = {k: int(v) for k, v in (line.split() for line in (group.dirs["memory"] / "memory.stat").read_text()
                                   .splitlines())}
    return int((group.dirs["memory"] / "memory.usage_in_bytes").read_text()) - stat["total_inactive_file"]


def in_mib(facts: dict) -> dict:
    """Byte counts (the working sets and the kernel's usage, peak, anonymous and page cache) in MiB."""
    byte_keys = ("usage", "max_usage", "rss", "cache", "limit")
    return {key: (in_mib(value) if isinstance(value, dict) and key == "kernel"
                  else round(value / MiB) if value is not None and (key.startswith("working") or key in byte_keys)
                  else value) for key, value in facts.items()}


def workers_rss(stack: NativeStack) -> dict[int, int]:
    return {w.pid: round(w.memory_info().rss / MiB) for w in psutil.Process(stack.app.process.pid).children()}


def series(stack: NativeStack, job: str) -> set[tuple]:
    return {tuple(sorted(r["metric"].items())) for r in stack.query(f'{{job="{job}"}}')}


class KernelCpu(PeriodicReader):
    """The kernel's accounting of the app's cgroup, read every 0.5 s in a thread: CPU used (cpuacct.usage) and the
    CFS periods it ran in and was throttled in (cpu.stat). The naming layer's rates are checked against the
    kernel's own over the same windows, whatever CPU the machine had to spare: on a busy machine the app may
    not reach its quota, the kernel then throttles it less, and both sides show it."""

    def __init__(self, group: container.ContainerCgroup):
        super().__init__("cgroup cpu")
        self.group = group

    def read(self) -> tuple[float, float, int, int] | None:
        """(epoch seconds, CPU-seconds, nr_periods, nr_throttled); at the cgroup's creation all were 0. None once
        the cgroup is gone (the stack went down with a failed fixture)."""
        try:
            stat = self.group.cpu_stat()
            used = self.group.cpu_seconds()
        except OSError as exc:
            self.errors.append(str(exc))
            return None
        return time.time(), used, stat["nr_periods"], stat["nr_throttled"]

    def throttled_between(self, start: float, end: float) -> int:
        """Periods throttled from the last sample at or before `start` to the first at or after `end`."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        return after[0][3] - before[-1][3]

    def windows(self, ends_from: float, ends_to: float, width: float):
        """For each window of `width` seconds ending at a sample between the two times: that sample, and the two
        between which the window starts (before the first sample, the cgroup's creation, all counters 0)."""
        known = [(float("-inf"), 0.0, 0, 0), *self.samples]
        times = [sample[0] for sample in known]
        for end in self.samples:
            if ends_from <= end[0] <= ends_to:
                i = bisect.bisect_right(times, end[0] - width) - 1
                yield end, known[i], known[i + 1]

    def peak_cores(self, ends_from: float, ends_to: float, width: float) -> tuple[float, float]:
        """The highest CPU used over those windows, in cores, as (at least, at most)."""
        rates = [((end[1] - after[1]) / width, (end[1] - before[1]) / width)
                 for end, before, after in self.windows(ends_from, ends_to, width)]
        return max(low for low, _ in rates), max(high for _, high in rates)

    def peak_throttled_share(self, ends_from: float, ends_to: float, width: float) -> tuple[float, float]:
        """The highest share of throttled periods, rate(throttled) / rate(periods) as a rule over [1m] sees it
        (0 where no period passed), over those windows, as (at least, at most)."""
        low = high = 0.0
        for end, before, after in self.windows(ends_from, ends_to, width):
            (periods, throttled), (periods_before, throttled_before) = end[2:], before[2:]
            periods_after, throttled_after = after[2:]
            if periods > periods_before:
                low = max(low, (throttled - throttled_after) / (periods - periods_before))
            high = max(high, (throttled - throttled_before) / (periods - periods_after)
                       if periods > periods_after else float("inf") if throttled > throttled_before else 0.0)
        return low, high


def scraped_after(stack: NativeStack, job: str, when: float) -> bool:
    """True once a scrape of `job` that began after `when` (epoch seconds) is stored."""
    return any(float(r["value"][1]) > when for r in stack.query(f'timestamp(up{{job="{job}"}})'))


@dataclass
class Run:
    counts: dict[str, dict[str, float]]  # scrape job -> samples scraped / stored
    idle_cores: float  # the naming layer's CPU used before the scan
    busy_cores: float  # its highest from the scan's start
    throttled: float  # the naming layer's highest share of throttled CFS periods, from the scan's start
    # The kernel's highest over the windows that the naming layer's rate1m can have seen (its [1m] spans 50 to
    # 65 s of the kernel's time: the scrapes' 5 s spacing, cAdvisor's 5 s housekeeping), as (the lowest of
    # the peaks over windows of one width, at least; the highest, at most): see KernelCpu.
    kernel_cores: tuple[float, float]
    kernel_throttled: tuple[float, float]
    kernel_throttled_periods: int  # periods the kernel throttled during the scan
    scan_cpu_seconds: float  # what the kernel charged the app's cgroup during the scan (cpuacct.usage)
    statuses: Counter
    seconds: float
    cadvisor_before: set
    cadvisor_after: set
    memory: dict[str, dict]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    native = NativeStack(tmp_path_factory.mktemp("saturation")).up()
    try:
        yield native
    finally:
        native.down()


@pytest.fixture(scope="module")
def run(stack) -> Run:
    group = stack.app_cgroup
    if group is None:
        pytest.skip(f"the app has no cgroup here: {stack.app_cgroup_problem}")
    kernel_cpu = KernelCpu(group).start()
    # The naming layer has the app once cAdvisor has been scraped twice (a rate needs two samples).
    poll(lambda: one(stack, f"dice:container_cpu_usage:cores_rate1m{APP}") is not None, 60,
         "dice:container_cpu_usage:cores_rate1m for service app")
    counts = {job: {what: one(stack, f'{what}{{job="{job}"}}') for what in
                    ("scrape_samples_scraped", "scrape_samples_post_metric_relabeling")}
              for job in ("node-exporter", "cadvisor")}
    idle = one(stack, f"dice:container_cpu_usage:cores_rate1m{APP}")
    cadvisor_before = series(stack, "cadvisor")
    # Right after the start the workers are still growing, and cAdvisor's value is up to 10 s old (5 s
    # housekeeping, 5 s scrape): once it read 42 MiB against the kernel's 84. The snapshot is taken once the
    # two are within the test's 25 %, or after 30 s with what they say then, for the test to judge.
    deadline = time.monotonic() + 30
    while True:
        memory = {"before": {"working set (cAdvisor)": one(stack, f"dice:container_memory_working_set:bytes{APP}"),
                             "working set (kernel)": kernel_working_set(group), "kernel": group.memory.stats(),
                             "worker RSS MiB": workers_rss(stack)}}
        ratio = (memory["before"]["working set (cAdvisor)"] or 0) / memory["before"]["working set (kernel)"]
        if 0.75 < ratio < 1.25 or time.monotonic() > deadline:
            break
        time.sleep(2)
    group.memory.reset_peak()

    started, cpu_before = time.monotonic(), group.cpu_seconds()
    scan_start = time.time()
    statuses = send(stack.ports.edge, scan_paths(SCAN_PATHS))
    seconds, scan_cpu_seconds = time.monotonic() - started, group.cpu_seconds() - cpu_before
    scan_end = time.time()
    memory["after the scan"] = {"kernel": group.memory.stats(), "worker RSS MiB": workers_rss(stack)}
    # What the scan leaves once the app has been scraped (its exporter renders every scanned path) and
    # cAdvisor has read the cgroup after that.
    poll(lambda: scraped_after(stack, "app", scan_end), 45, "a scrape of the app after the scan", interval=1)
    app_scraped = time.time()
    poll(lambda: scraped_after(stack, "cadvisor", app_scraped + 5), 30, "cAdvisor after the app's scrape", interval=1)
    # The highest the naming layer's rates went since the scan began, and the kernel's over the same windows.
    kernel_cpu.stop()
    since_scan = f"{int(time.time() - scan_start)}s"
    busy = one(stack, f"max_over_time(dice:container_cpu_usage:cores_rate1m{APP}[{since_scan}])")
    throttled = one(stack, f"max_over_time(dice:container_cpu_throttled_periods:ratio_rate1m{APP}[{since_scan}])")
    windows = [(scan_start - 10, time.time(), width) for width in (50, 55, 60, 65)]
    kernel_cores, kernel_throttled = ((min(low for low, _ in peaks), max(high for _, high in peaks)) for peaks in
                                      ([kernel_cpu.peak_cores(*w) for w in windows],
                                       [kernel_cpu.peak_throttled_share(*w) for w in windows]))
    kernel_throttled_periods = kernel_cpu.throttled_between(scan_start, scan_end)
    kernel = group.memory.stats()
    # cAdvisor reads OOM kills from the kernel log within seconds; the naming layer's count must reach the
    # kernel's own (memory.oom_control) before the snapshot.
    oom_kills = poll(lambda: (n := one(stack, f"round(dice:container_oom_events:increase5m{APP})")) is not None
                     and n >= kernel["oom_kill"] and [n], 30, f"{kernel['oom_kill']} OOM kill(s) in the naming layer")
    memory["after the scrape"] = {
        "working set (cAdvisor)": one(stack, f"dice:container_memory_working_set:bytes{APP}"),
        "working set (kernel)": kernel_working_set(group), "kernel": kernel,
        "worker RSS MiB": workers_rss(stack), "OOM kills (naming layer, 5 min)": oom_kills[0],
        # Each later scrape of the app renders every scanned path again, and may cost another worker.
        "OOM kills (kernel, after the naming layer's count)": group.memory.stats()["oom_kill"]}
    result = Run(counts, idle, busy, throttled, kernel_cores, kernel_throttled, kernel_throttled_periods,
                 scan_cpu_seconds, statuses, seconds, cadvisor_before, series(stack, "cadvisor"), memory)
    print(f"\nseries per scrape, scraped -> stored: {counts}"
          f"\nscan of {SCAN_PATHS} paths through the edge in {seconds:.1f} s ({SCAN_PATHS / seconds:.0f} req/s): "
          f"{dict(statuses)}"
          f"\napp CPU: the kernel charged {scan_cpu_seconds:.1f} CPU-s in the scan's {seconds:.1f} s "
          f"({scan_cpu_seconds / seconds:.2f} cores); the naming layer's rate1m {idle} cores before, up to "
          f"{busy} after (the kernel's over the same windows: {kernel_cores[0]:.3f} to {kernel_cores[1]:.3f}); "
          f"throttled up to {throttled} of its CFS periods (the kernel: "
          f"{kernel_throttled_periods} periods throttled in the scan, up to {kernel_throttled[0]:.3f} to "
          f"{kernel_throttled[1]:.3f} of its periods over 50 to 65 s windows)")
    for moment, facts in memory.items():
        print(f"app memory (MiB) {moment}: {in_mib(facts)}")
    return result


def test_the_apps_cgroup_carries_composes_limits_through_the_naming_layer(stack, run):
    # compose's mem_limit 512m and cpus 1.0 for `app`, read from docker-compose.yml by the stack, as cAdvisor
    # reports them and the rules name them.
    assert compose_mem_limit("app") == 512 * MiB and compose_cpus("app") == 1.0
    assert one(stack, f"dice:container_memory_limit:bytes{APP}") == 512 * MiB
    assert one(stack, f"dice:container_cpu_limit:cores{APP}") == 1.0
    # The kernel holds the same limits for the cgroup the app runs in: its master and every worker.
    assert stack.app_cgroup.cpu_quota == (100_000, 100_000)
    master = psutil.Process(stack.app.process.pid)
    for process in (master, *master.children()):
        cgroups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{process.pid}/cgroup").read_text().splitlines())
        assert {cgroups.get(c) for c in ("cpu", "cpuacct", "memory")} == {stack.app_cgroup.name}, (process, cgroups)
    # cAdvisor's working set is the kernel's (usage less inactive page cache), read before the scan.
    before = run.memory["before"]
    assert 0.75 < before["working set (cAdvisor)"] / before["working set (kernel)"] < 1.25, before


def agrees(naming_layer: float, kernel: tuple[float, float]) -> bool:
    """A rate1m of the naming layer against the kernel's (at least, at most) over the same windows. The margin:
    rate() extrapolates each counter to the window's edges (counters that started at 0 with the cgroup, less),
    seen up to 1.13 times the kernel's on a busy machine, whose scrapes come late; and 0.02 for small rates."""
    low, high = kernel
    return 0.7 * low - 0.02 <= naming_layer <= 1.35 * high + 0.02


def test_the_apps_cpu_moves_with_load_through_the_edge_and_stays_under_its_quota(run):
    # The kernel's accounting: the quota holds (on 2 cores, 2 busy workers could take more without it). How
    # near it the scan gets depends on the CPU the machine has to spare: 0.9 to 0.97 cores alone, 0.27 to 0.54
    # beside other test stacks and CPU burners, the scan then taking 45 to 150 s instead of 20 to 26.
    cores = run.scan_cpu_seconds / run.seconds
    assert 0.2 < cores <= 1.05, f"the app used {cores:.2f} cores during the scan, under a 1-core quota"
    # The naming layer moves with it: idle, the app's CPU is its exporter threads; its rate1m peaks where the
    # kernel's CPU-seconds over the same windows do (the render of the app's /metrics for the scrape after the
    # scan included), and at no more than the quota.
    assert run.idle_cores < 0.2 and run.busy_cores > run.idle_cores + 0.1, (run.idle_cores, run.busy_cores)
    assert agrees(run.busy_cores, run.kernel_cores), (run.busy_cores, run.kernel_cores)
    assert run.busy_cores <= 1.05, run.busy_cores
    # And the share of CFS periods the quota throttled is the kernel's (cpu.stat) over the same windows: how
    # much the quota bites depends on spare CPU too (0.38 to 0.43 of the periods alone, 0.01 to 0.07 beside
    # other stacks), the agreement does not.
    assert run.throttled is not None, "no dice:container_cpu_throttled_periods:ratio_rate1m for the app"
    assert agrees(run.throttled, run.kernel_throttled), (run.throttled, run.kernel_throttled)
    # Any period the kernel throttled in the scan shows: a rule on the wrong series, or a share that reads 0,
    # fails here even when the quota bit only a little.
    assert run.kernel_throttled_periods == 0 or run.throttled > 0, (run.throttled, run.kernel_throttled_periods)


def test_cadvisor_adds_no_series_per_path_or_request(stack, run):
    assert run.cadvisor_after == run.cadvisor_before, (
        f"added {sorted(run.cadvisor_after - run.cadvisor_before)[:5]}, "
        f"gone {sorted(run.cadvisor_before - run.cadvisor_after)[:5]}")
    # Every stored series is the app's cgroup's, or the scrape's own (up, scrape_*: no id): the root cgroup
    # (the host, node-exporter's) is dropped, and no other stack's cgroup is watched.
    ids = {dict(labels).get("id") for labels in run.cadvisor_after}
    assert ids == {None, stack.app_cgroup.name}, ids


def test_the_exporters_series_are_bounded_by_relabelling(run):
    for job, count in run.counts.items():
        assert count["scrape_samples_post_metric_relabeling"] < count["scrape_samples_scraped"], (job, count)
    # cAdvisor: one cgroup, one series of each of the 10 metrics kept (CPU used, CFS periods and throttled
    # periods, quota and period, working set and limit, OOM events, start time, and open fds: the native
    # cAdvisor adds `process` to compose's --enable_metrics, tooling.native.stack.cadvisor_flags).
    assert run.counts["cadvisor"]["scrape_samples_post_metric_relabeling"] == 10, run.counts


def test_node_exporter_gives_the_hosts_series(stack, run):
    busy = one(stack, "dice:node_cpu_busy:ratio_rate1m")
    assert busy is not None and 0 <= busy <= 1, busy
    meminfo = dict((line.split(":")[0], int(line.split()[1]) * 1024)
                   for line in Path("/proc/meminfo").read_text().splitlines())
    available = one(stack, "dice:node_memory_available:ratio")
    assert available == pytest.approx(meminfo["MemAvailable"] / meminfo["MemTotal"], abs=0.05), available
    free = {r["metric"]["mountpoint"]: float(r["value"][1]) for r in stack.query("dice:node_filesystem_free:ratio")}
    assert "/" in free and 0 < free["/"] < 1, free
    # The scan went over loopback, which the rule leaves out; the host's other devices still report.
    assert one(stack, "dice:node_network_receive:bytes_rate1m") is not None
    assert one(stack, "dice:node_network_transmit:bytes_rate1m") is not None


def test_memory_after_a_scan_under_composes_limit(run):
    """Item 6: printed above; the limit held (the kernel's own accounting), and the numbers are the app's."""
    before, after = run.memory["before"], run.memory["after the scrape"]
    assert before["kernel"]["limit"] == after["kernel"]["limit"] == 512 * MiB
    # The scan, and the scrape of the app after it, cost memory: the peak is above where it started.
    assert after["kernel"]["max_usage"] > before["kernel"]["usage"] + 20 * MiB, (before["kernel"], after["kernel"])
    # Every OOM kill the kernel made in the app's cgroup is in the naming layer (cAdvisor, from the kernel log).
    assert after["kernel"]["oom_kill"] <= after["OOM kills (naming layer, 5 min)"] <= after[
        "OOM kills (kernel, after the naming layer's count)"], after


def test_without_writable_cgroups_the_stack_says_so_once_and_runs_without(monkeypatch, tmp_path, capsys):
    """A developer who is not root: one message naming compose's settings that are then not applied, and no
    cgroup (so cAdvisor reports nothing for the app: the saturation series are absent, not faked)."""
    monkeypatch.setattr(container, "parent_cgroup", lambda: (None, "not root (euid 1000): cannot create a memory "
                                                                   "cgroup"))
    native = NativeStack(tmp_path)
    assert native.make_app_cgroup() is None and native.make_app_cgroup() is None
    said = capsys.readouterr().err
    assert said.count("NativeStack:") == 1, said
    assert "not root (euid 1000)" in said and "mem_limit and cpus" in said and "absent" in said, said
    assert native.app_cgroup_problem.startswith("not root")
