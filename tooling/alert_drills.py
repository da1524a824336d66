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
Nothing here is used by the stack itself: drills exist only in tests.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import yaml

from tooling.sloth_build import SPEC, generate

REPO_ROOT = Path(__file__).resolve().parent.parent
DRIFT_RULES = REPO_ROOT / "prometheus" / "rules" / "dice-alerts.yaml"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
# Sloth's built-in 30-day alert windows (the Google SRE workbook's), as its AlertWindows spec spells them:
# budget share spent in the long window, short and long window. tests/test_slo.py checks the committed
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


def drift_drill(factor: int, rules: Path = DRIFT_RULES) -> str:
    """The alerting rules of `rules` with their windows divided by `factor` (a rules file)."""
    if factor < 1:
        raise ValueError("factor must be a whole number >= 1")
    groups = []
    for group in yaml.safe_load(rules.read_text())["groups"]:
        alerts = []
        for rule in group["rules"]:
            if "alert" not in rule:
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
