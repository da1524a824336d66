"""Time-compressed copies of the committed alert rules, so that a test can fire them for real in minutes.

The committed alerts wait as an on-call engineer wants them to: DiceTelemetrySourceSilent needs a source
silent for 5 minutes and then 1 more, the SLO page alerts look at 1-hour and 6-hour windows. A test
that injects a real fault cannot wait that long, so it loads, beside the committed rules, a *drill*
copy whose windows are divided by a factor:

- `drift_drill(factor)`: the hand-written alerts of prometheus/rules/dice-alerts.yaml with every range
  (`[5m]`), `offset` and `for` divided by `factor`. Recording rules are not copied: the drill alerts
  read the same `dice:*` series as the committed ones.
- `slo_drill(factor)`: Sloth's generation from the same spec (prometheus/slo/dice-slos.yaml) with a
  period and alert windows all divided by `factor` (so every burn-rate factor, 14.4x, 6x, 3x, 1x, stays
  as it is), under the service name `dice-api-drill-x<factor>` so that its recording rules never
  collide with the committed ones.

Every drill alert carries the label `drill="x<factor>"`, so a notification says which copy fired.
Nothing here is used by the stack itself: drills exist only in tests, and so do the helpers at the end
(a native stack with drills, what reached the webhook receiver, the steady background load).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from tooling.config import REPO_ROOT, SPEC, generate

DRIFT_RULES = REPO_ROOT / "prometheus" / "rules" / "dice-alerts.yaml"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
# Sloth's built-in 30-day alert windows (the Google SRE workbook's), as its AlertWindows spec spells them:
# budget share spent in the long window, short and long window. tests/prometheus/test_slo.py checks the committed
# rules use exactly these.
SLO_PERIOD_SECONDS = 30 * 86400
SLO_WINDOWS_30D = {
    "page": {"quick": (2, 5 * 60, 3600), "slow": (5, 30 * 60, 6 * 3600)},
    "ticket": {"quick": (10, 2 * 3600, 86400), "slow": (10, 6 * 3600, 3 * 86400)},
}


def seconds(duration: str) -> float:
    """A Prometheus duration ("1h30m", "25s") in seconds."""
    if not re.fullmatch(_DURATION, duration):
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def duration(total: float) -> str:
    """Seconds as the shortest Prometheus duration; sub-second values in ms."""
    if total < 1 or total != int(total):
        return f"{round(total * 1000)}ms"
    total, out = int(total), ""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if total >= size:
            out += f"{total // size}{unit}"
            total %= size
    return out


def compress_expr(expr: str, factor: int) -> str:
    """Every range, subquery range and offset of a PromQL expression divided by `factor`."""
    def scale(match: re.Match) -> str:
        return duration(seconds(match.group(0)) / factor)

    expr = re.sub(r"(?<=\[)" + _DURATION + r"(?=[:\]])", scale, expr)
    expr = re.sub(r"(?<=\[)(" + _DURATION + r")(:)(" + _DURATION + r")(?=\])",
                  lambda m: f"{m.group(1)}:{duration(seconds(m.group(3)) / factor)}", expr)
    return re.sub(r"(?<=offset\s)\s*" + _DURATION, lambda m: duration(seconds(m.group(0).strip()) / factor), expr)


# Alerts with no drill. HostDiskWillFillIn24h extrapolates the host's disk over 6 hours, from an hour of
# history: divided by 10, a 36-minute trend of a test machine's disk, which every other process on it writes
# to (Go builds, pytest's files), which predicts nothing, and which no test fires on purpose (promtool's
# cases cover it). The committed alert is loaded as it is, and cannot fire in a test's first 2 hours.
UNDRILLED = frozenset({"HostDiskWillFillIn24h"})


def drift_drill(factor: int, rules: Path = DRIFT_RULES) -> str:
    """The alerting rules of `rules` with their windows divided by `factor` (a rules file), but UNDRILLED."""
    if factor < 1:
        raise ValueError("factor must be a whole number >= 1")
    groups = []
    for group in yaml.safe_load(rules.read_text())["groups"]:
        alerts = []
        for rule in group["rules"]:
            if "alert" not in rule or rule["alert"] in UNDRILLED:
                continue
            rule = dict(rule, expr=compress_expr(rule["expr"], factor),
                        labels={**rule.get("labels", {}), "drill": f"x{factor}"})
            if "for" in rule:
                rule["for"] = duration(seconds(rule["for"]) / factor)
            alerts.append(rule)
        if alerts:
            groups.append({"name": f"{group['name']}-drill-x{factor}", "rules": alerts})
    return yaml.safe_dump({"groups": groups}, sort_keys=False, width=120)


def slo_windows(factor: int) -> dict:
    """Sloth's AlertWindows spec for a period of 30 days / factor, every window divided alike."""
    spec = {"sloPeriod": duration(SLO_PERIOD_SECONDS / factor)}
    for severity, speeds in SLO_WINDOWS_30D.items():
        spec[severity] = {speed: {"errorBudgetPercent": budget, "shortWindow": duration(short / factor),
                                  "longWindow": duration(long / factor)}
                          for speed, (budget, short, long) in speeds.items()}
    return {"apiVersion": "sloth.slok.dev/v1", "kind": "AlertWindows", "spec": spec}


def drill_service(factor: int, service: str = "dice-api") -> str:
    return f"{service}-drill-x{factor}"


def slo_drill(factor: int, spec: Path = SPEC) -> str:
    """What Sloth generates from `spec` with every window divided by `factor` (a rules file)."""
    if factor < 1 or (SLO_PERIOD_SECONDS % factor):
        raise ValueError("factor must divide 30 days into whole seconds")
    source = yaml.safe_load(spec.read_text())
    source["service"] = drill_service(factor, source["service"])
    with tempfile.TemporaryDirectory(prefix="slo-drill-") as tmp:
        windows = Path(tmp) / "windows"
        windows.mkdir()
        (windows / "windows.yaml").write_text(yaml.safe_dump(slo_windows(factor), sort_keys=False))
        drill_spec = Path(tmp) / "slos.yaml"
        drill_spec.write_text(yaml.safe_dump(source, sort_keys=False))
        return generate(drill_spec, period=duration(SLO_PERIOD_SECONDS / factor), windows_dir=windows,
                        extra_labels={"drill": f"x{factor}"})


# ----------------------------------------------------------------------------- what the tests share

ROUTE_TIMINGS = {"group_wait": "5s", "group_interval": "10s", "repeat_interval": "1h"}
TIMINGS_DIR = REPO_ROOT / ".cache" / "alert-timings"  # fault -> notification seconds of the last run, per file


@contextmanager
def drill_stack(run_dir: Path, drift_factors: tuple[int, ...], slo_factor: int | None,
                times: dict[str, float] | None = None) -> Iterator:
    """A native stack, up, whose Prometheus loads, beside the committed rules, a drift drill per factor
    and the SLO drill, and whose Alertmanager notifies a webhook receiver (`stack.webhook`, a
    tooling.native.sinks.WebhookSink) with its group wait and interval cut to 5 s and 10 s (a test waiting for a
    resolved notification cannot wait the committed 5 minutes). At the end it prints `times`, the
    fault-to-notification seconds the tests filled in."""
    from tooling.native.sinks import WebhookSink
    from tooling.native.stack import NativeStack

    files = []
    for factor in drift_factors:
        files.append(run_dir / f"drill-drift-alerts-x{factor}.yaml")
        files[-1].write_text(drift_drill(factor))
    if slo_factor is not None:
        files.append(run_dir / f"drill-slo-x{slo_factor}.yaml")
        files[-1].write_text(slo_drill(slo_factor))
    sink = WebhookSink().start()
    stack = NativeStack(run_dir, alert_webhook=sink.address, extra_rule_files=tuple(files),
                        alert_route_timings=ROUTE_TIMINGS)
    stack.webhook = sink
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        sink.stop()
        if times:
            print(f"\nfault -> notification (Alertmanager group_wait {ROUTE_TIMINGS['group_wait']}, "
                  f"group_interval {ROUTE_TIMINGS['group_interval']}):")
            for what, seconds in times.items():
                print(f"  {what}: {seconds:.0f} s")
            # Kept where a CI run leaves them too (pytest-xdist swallows the print): the README's table of
            # alert timings is read from these files.
            record = TIMINGS_DIR / f"{run_dir.name.rstrip('0123456789')}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M %Z"),
                                          "seconds": {what: round(s) for what, s in times.items()}}, indent=2))


@dataclass
class Notified:
    """What reached the webhook receiver (a tooling.native.sinks.WebhookSink), one entry per alert per
    notification, from `since` (time.time()) on."""

    sink: object
    since: float = 0.0

    def seen(self, status: str, since: float | None = None, until: float | None = None,
             **labels: str) -> list[tuple[float, dict]]:
        since = self.since if since is None else since
        return [(n.received_at, a) for n in self.sink.notifications()
                if since <= n.received_at and (until is None or n.received_at < until)
                for a in n.alerts
                if a["status"] == status and all(a["labels"].get(k, "") == v for k, v in labels.items())]

    def wait(self, status: str, timeout: float, **labels: str) -> float:
        """Seconds from `since` to the first notification of an alert with `labels` in `status`."""
        from tooling.native.stack import poll

        found = poll(lambda: self.seen(status, **labels), timeout,
                     f"a {status} notification for {labels} (received: {self.summary()})", interval=1)
        return found[0][0] - self.since

    def firing(self, since: float, until: float | None = None) -> set[tuple[str, str, str]]:
        """(alertname, drill or "committed", detail: its source, route, exporter...) of every alert that
        started firing at or after `since` (its startsAt) and was notified before `until`. Alertmanager
        repeats the alerts still firing in a group with each new notification of that group, so the
        notification time alone would count alerts of an earlier fault."""
        return {(a["labels"]["alertname"], a["labels"].get("drill", "committed"), _detail(a["labels"]))
                for _, a in self.seen("firing", since=since, until=until)
                if datetime.fromisoformat(a["startsAt"]).timestamp() >= since}

    def summary(self) -> list[str]:
        return sorted({f"{a['status']} {a['labels'].get('alertname')}{{{a['labels'].get('drill', 'committed')},"
                       f" {_detail(a['labels'])}}}" for n in self.sink.notifications() for a in n.alerts})


def _detail(labels: dict) -> str:
    return ",".join(labels[k] for k in ("telemetry_source", "route", "exporter", "receiver", "signal", "name",
                                        "sloth_severity") if k in labels)


def alerts_seen(prometheus_url: str, start: float, end: float | None = None, selector: str = "") -> dict[str, set]:
    """Every alert pending or firing at an evaluation between `start` and `end` (now), from Prometheus's
    ALERTS series: name -> {(state, drill, telemetry_source, route, seconds after start when first seen)}."""
    from tooling.native.stack import prometheus_query

    end = end or time.time()
    seen: dict[str, set] = {}
    for series in prometheus_query(prometheus_url, f"ALERTS{selector}", path="query_range",
                                   start=start, end=end, step=5)["result"]:
        labels = series["metric"]
        seen.setdefault(labels["alertname"], set()).add(
            (labels.get("alertstate"), labels.get("drill", "committed"), labels.get("telemetry_source"),
             labels.get("route"), round(float(series["values"][0][0]) - start)))
    return seen


def compose_users(service: str) -> int:
    """The --users of a compose service's locust command: the background load the stack ships with."""
    from tooling.native.stack import compose_command

    (users,) = [int(arg.split("=", 1)[1]) for arg in compose_command(service) if arg.startswith("--users=")]
    return users


@dataclass
class SteadyLoad:
    """Compose's background load (locust's steady scenario, with its own OTLP metrics: loadgen) on a
    stack until `stop()`, which returns locust's ground truth. Through the edge, as compose's locust
    calls it: the SLOs are measured there, and an app that is down answers 502 from it."""

    stack: object
    users: int = field(default_factory=lambda: compose_users("locust"))
    name: str = "background"
    started: float = 0.0
    stopped: float = 0.0
    truth: dict | None = None

    def __post_init__(self):
        from tooling.native.stack import run_locust

        self.process = run_locust(self.stack.edge_url, 1800, self.users, self.stack.run_dir, name=self.name,
                                  background=True, scenario="steady",
                                  otlp_endpoint=f"http://127.0.0.1:{self.stack.ports.otlp_grpc}")
        self.started = time.time()

    def stop(self) -> dict:
        """Ends the load (SIGTERM: locust quits and writes its ground truth) and returns what it sent."""
        from tooling.native.stack import locust_result

        if self.truth is None:
            self.process.terminate()
            self.process.wait(60)
            self.truth = locust_result(self.stack.run_dir, self.name)
            self.stopped = time.time()
        return self.truth
