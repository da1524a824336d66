"""The alert runbooks inside the SLO dashboard, generated from the README.

Every alert's `runbook` annotation names a README section (``README.md#runbook-...``). Grafana does not
serve the README, and the repository's public URL is not known, so a link from Grafana into the README
cannot work. The SLO dashboard (grafana/dashboards/slo.json) carries the runbooks itself instead:

- one text panel per ``### Runbook: ...`` section of the README, with the section's text as it is there
  and the alerts whose annotation points to it;
- the table of alerts firing or pending gets a ``runbook`` column: its query adds to every ALERTS series
  a label holding the id of the alert's runbook panel (label_replace on the alert name), the column shows
  the runbook's title (a value mapping) and links to ``/d/slo?viewPanel=<id>``, which opens that panel
  alone. A numeric viewPanel is what Grafana's dashboards have always taken, and the Scenes-based ones
  of Grafana 11 and later still look panels up by it.

    python -m tooling.reports.runbooks            # rewrite those panels and the table's query in slo.json
    python -m tooling.reports.runbooks --check    # exit 1 if slo.json differs from what the README gives

tests/grafana/test_grafana.py fails when the dashboard drifts from the README or the rule files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tooling.config import REPO_ROOT

README = REPO_ROOT / "README.md"
RULES_DIR = REPO_ROOT / "prometheus" / "rules"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "slo.json"

# Panel ids in slo.json that this module owns. Everything else in the dashboard is written by hand.
ALERTS_TABLE_ID = 20
RUNBOOK_ROW_ID = 100
FIRST_RUNBOOK_PANEL_ID = 101
RUNBOOK_LABEL = "runbook"
# Pending alerts too: they fire unless the condition clears, and an operator wants to see them coming.
ALERTS_SELECTOR = 'ALERTS{alertstate=~"firing|pending"}'
RUNBOOK_HEADING = re.compile(r"^### +Runbook: *(.+?) *$", re.M)
ANY_HEADING = re.compile(r"^#{1,6} ", re.M)
# A text panel's height in grid rows (30 px each) for a given length of text, at full width.
CHARS_PER_LINE = 170


@dataclass
class Runbook:
    title: str  # the heading without "Runbook: "
    anchor: str  # GitHub's anchor of the heading, as in the annotations
    body: str  # the section's Markdown, without the heading
    alerts: dict[str, list[str]] = field(default_factory=dict)  # alert name -> its severities


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def readme_runbooks(readme: str) -> list[Runbook]:
    """The README's `### Runbook: ...` sections in their order, each up to the next heading."""
    found = []
    for match in RUNBOOK_HEADING.finditer(readme):
        end = ANY_HEADING.search(readme, match.end())
        body = readme[match.end():end.start() if end else len(readme)].strip()
        heading = match.group(0).lstrip("#").strip()
        found.append(Runbook(match.group(1), github_anchor(heading), body))
    return found


def alert_rules(rules_dir: Path = RULES_DIR) -> list[dict]:
    """Every alerting rule of the rule files Prometheus loads, in file order."""
    return [rule for path in sorted(rules_dir.glob("*.yaml"))
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def runbooks_with_alerts(readme: str, rules: list[dict]) -> list[Runbook]:
    """The README's runbooks, each with the alerts whose `runbook` annotation points to it."""
    runbooks = readme_runbooks(readme)
    by_anchor = {runbook.anchor: runbook for runbook in runbooks}
    for rule in rules:
        target = rule["annotations"]["runbook"]
        anchor = target.split("#", 1)[1] if target.startswith("README.md#") else None
        if anchor not in by_anchor:
            raise ValueError(f"alert {rule['alert']}: runbook {target!r} is not a `### Runbook:` section of README.md")
        severities = by_anchor[anchor].alerts.setdefault(rule["alert"], [])
        if rule["labels"]["severity"] not in severities:
            severities.append(rule["labels"]["severity"])
    return runbooks


def panel_ids(runbooks: list[Runbook]) -> dict[str, int]:
    """Runbook anchor -> the id of its text panel."""
    return {runbook.anchor: FIRST_RUNBOOK_PANEL_ID + i for i, runbook in enumerate(runbooks)}


def panel_content(runbook: Runbook) -> str:
    alerts = ", ".join(f"`{name}` ({', '.join(severities)})" for name, severities in runbook.alerts.items())
    return (f"**Alerts:** {alerts or 'none'}\n\n{runbook.body}\n\n"
            f"*README.md, section \"Runbook: {runbook.title}\" (`#{runbook.anchor}`); copied here by "
            "`python -m tooling.reports.runbooks`.*")


def panel_height(content: str) -> int:
    lines = sum(max(1, math.ceil(len(paragraph) / CHARS_PER_LINE)) + 1 for paragraph in content.split("\n\n"))
    return max(4, math.ceil(lines * 21 / 30) + 2)


def alerts_query(runbooks: list[Runbook]) -> str:
    """ALERTS with a `runbook` label: the id of the text panel of the alert's runbook."""
    ids = panel_ids(runbooks)
    expr = ALERTS_SELECTOR
    for runbook in runbooks:
        if not runbook.alerts:
            continue
        names = list(runbook.alerts)
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in names), names
        expr = (f'label_replace({expr}, "{RUNBOOK_LABEL}", "{ids[runbook.anchor]}", '
                f'"alertname", "{"|".join(names)}")')
    return expr


def runbook_field_override(runbooks: list[Runbook]) -> dict:
    """The table's `runbook` column: shows the runbook's title, links to its panel."""
    ids = panel_ids(runbooks)
    mapping = {str(ids[runbook.anchor]): {"text": runbook.title, "index": i} for i, runbook in enumerate(runbooks)}
    return {
        "matcher": {"id": "byName", "options": RUNBOOK_LABEL},
        "properties": [
            {"id": "mappings", "value": [{"type": "value", "options": mapping}]},
            {"id": "links", "value": [{"title": "Runbook: ${__value.text}", "url": "/d/slo?viewPanel=${__value.raw}"}]},
        ],
    }


def runbook_panels(runbooks: list[Runbook], y: int) -> list[dict]:
    ids = panel_ids(runbooks)
    panels = [{
        "type": "row",
        "title": "Runbooks (from README.md; the alert table's runbook column opens each one)",
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
        "id": RUNBOOK_ROW_ID,
    }]
    y += 1
    for runbook in runbooks:
        content = panel_content(runbook)
        height = panel_height(content)
        panels.append({
            "type": "text",
            "title": f"Runbook: {runbook.title}",
            "description": f"Generated from README.md#{runbook.anchor} by `python -m tooling.reports.runbooks`; "
                           "edit the README, then run it again.",
            "gridPos": {"x": 0, "y": y, "w": 24, "h": height},
            "options": {"mode": "markdown", "content": content},
            "id": ids[runbook.anchor],
        })
        y += height
    return panels


def render(dashboard: dict, readme: str, rules: list[dict]) -> dict:
    """The dashboard with its runbook panels and alert table regenerated; the rest untouched."""
    runbooks = runbooks_with_alerts(readme, rules)
    result = copy.deepcopy(dashboard)
    kept = [panel for panel in result["panels"] if panel["id"] < RUNBOOK_ROW_ID]
    (table,) = [panel for panel in kept if panel["id"] == ALERTS_TABLE_ID]
    (target,) = table["targets"]
    target["expr"] = alerts_query(runbooks)
    overrides = table.setdefault("fieldConfig", {}).setdefault("overrides", [])
    overrides[:] = [o for o in overrides if o["matcher"] != {"id": "byName", "options": RUNBOOK_LABEL}]
    overrides.append(runbook_field_override(runbooks))
    bottom = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in kept)
    result["panels"] = kept + runbook_panels(runbooks, bottom)
    return result


def dump(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether slo.json is up to date")
    args = parser.parse_args(argv)
    current = DASHBOARD.read_text()
    wanted = dump(render(json.loads(current), README.read_text(), alert_rules()))
    if wanted == current:
        print(f"{DASHBOARD.relative_to(REPO_ROOT)} is up to date")
        return 0
    if args.check:
        print(f"{DASHBOARD.relative_to(REPO_ROOT)} differs from README.md's runbooks; "
              "run python -m tooling.reports.runbooks")
        return 1
    DASHBOARD.write_text(wanted)
    print(f"rewrote the runbooks in {DASHBOARD.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
