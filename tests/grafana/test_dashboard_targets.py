"""Which queries the docker tier's "every provisioned dashboard query returns data" sends (the unit tier).

That check (tests/e2e/backend_checks.py) runs only where Docker does; what it sends is decided by a pure
function, `dashboard_queries`, checked here against the committed dashboards: every target of every panel,
whatever its plugin calls the query (Prometheus and Loki `expr`, Tempo `query`, Pyroscope `profileTypeId`),
and none skipped silently.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

# tests/e2e is a folder of the docker tier, not a package; its helpers import like test_stack.py's do.
from e2e.backend_checks import QUERY_FIELDS, dashboard_queries
from stackfiles import SOURCE_VARIABLE, source_values

pytestmark = pytest.mark.unit

DASHBOARDS = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_dashboards() -> list[dict]:
    found = [load(path) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert found, f"no dashboard in {DASHBOARDS}"
    return found


def raw_targets(node, panel_title=None):
    """(panel title, target) for every target anywhere in the dashboard's JSON, found by walking all of it
    rather than by the panel layout the function under test assumes."""
    if isinstance(node, dict):
        title = node.get("title", panel_title)
        for key, value in node.items():
            if key == "targets" and isinstance(value, list):
                yield from ((title, target) for target in value)
            else:
                yield from raw_targets(value, title)
    elif isinstance(node, list):
        for item in node:
            yield from raw_targets(item, panel_title)


def times_sent(dashboard: dict, target: dict) -> int:
    """Once, or once per value of `source` for a target that uses it."""
    return len(source_values(dashboard)) if SOURCE_VARIABLE.search(json.dumps(target)) else 1


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda path: path.stem)
def test_every_target_of_every_panel_is_sent(path):
    dashboard = load(path)
    expected = Counter()
    for title, target in raw_targets(dashboard.get("panels", [])):
        expected[(title, target["refId"])] += times_sent(dashboard, target)
    sent = Counter((query.panel, query.query["refId"]) for query in dashboard_queries(dashboard))
    assert sent == expected, f"left out: {expected - sent}; unexpected: {sent - expected}"


def test_the_committed_dashboards_send_every_kind_of_query():
    """The totals, and every datasource plugin the dashboards use, Tempo and Pyroscope included."""
    dashboards = all_dashboards()
    queries = [query for dashboard in dashboards for query in dashboard_queries(dashboard)]
    targets = [(dashboard, target) for dashboard in dashboards for _, target in raw_targets(dashboard["panels"])]
    assert len(queries) == sum(times_sent(dashboard, target) for dashboard, target in targets)
    by_type = Counter(query.query["datasource"]["type"] for query in queries)
    print(f"\n{len(targets)} targets in {len(dashboards)} dashboards, sent as {len(queries)} queries: {dict(by_type)}")
    assert set(by_type) == {target["datasource"]["type"] for _, target in targets}
    assert {"prometheus", "loki", "tempo", "grafana-pyroscope-datasource"} <= set(by_type)


def test_each_query_carries_its_targets_own_fields():
    for dashboard in all_dashboards():
        found = list(raw_targets(dashboard["panels"]))
        targets = {(title, target["refId"]): target for title, target in found}
        assert len(targets) == len(found), f"{dashboard['uid']}: this test needs (panel title, refId) unique"
        for query in dashboard_queries(dashboard):
            target = targets[(query.panel, query.query["refId"])]
            where = f"{query.dashboard}: {query.title} {target['refId']}"
            assert query.query["datasource"] == target["datasource"], where
            # Every field of the target goes along unchanged, but for `source` written in.
            for key, value in target.items():
                if query.source is not None and isinstance(value, str):
                    value = SOURCE_VARIABLE.sub(query.source, value)
                assert query.query[key] == value, f"{where}: {key}"
            assert not SOURCE_VARIABLE.search(json.dumps(query.query)), f"{where}: $source left in"
            assert query.text == query.query[QUERY_FIELDS[target["datasource"]["type"]]]


def test_tempo_and_pyroscope_panels_are_sent_with_their_query_fields():
    queries = [query for dashboard in all_dashboards() for query in dashboard_queries(dashboard)]
    tempo = [q.query for q in queries if q.query["datasource"]["type"] == "tempo"]
    pyroscope = [q.query for q in queries if q.query["datasource"]["type"] == "grafana-pyroscope-datasource"]
    assert tempo and pyroscope
    for query in tempo:
        # The plugin's backend runs traceql and traceqlSearch from `query`, and answers other types with an error.
        assert query["queryType"] in {"traceql", "traceqlSearch"} and query["query"].startswith("{"), query
    for query in pyroscope:
        assert query["queryType"] in {"profile", "metrics", "both"}, query
        assert query["profileTypeId"].count(":") == 4 and query["labelSelector"].startswith("{"), query


def targets_of_every_dashboard():
    for dashboard in all_dashboards():
        for title, target in raw_targets(dashboard["panels"]):
            yield pytest.param(dashboard, title, target["refId"], id=f"{dashboard['uid']}-{title}-{target['refId']}")


def only_target(dashboard: dict, title: str, ref_id: str) -> tuple[dict, dict]:
    """A copy of the dashboard holding just that target, and the copy's target."""
    dashboard = copy.deepcopy(dashboard)
    kept = None
    for panel_title, target in raw_targets(dashboard["panels"]):
        if (panel_title, target["refId"]) == (title, ref_id):
            kept = target
    assert kept is not None
    for node in _panels_with_targets(dashboard["panels"]):
        node["targets"] = [t for t in node["targets"] if t is kept]
    return dashboard, kept


def _panels_with_targets(node):
    if isinstance(node, dict):
        if isinstance(node.get("targets"), list):
            yield node
        for value in node.values():
            yield from _panels_with_targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _panels_with_targets(item)


def test_each_single_target_is_sent():
    """Each target alone gives its queries: none is sent only because another target of its panel is."""
    for dashboard in all_dashboards():
        for title, target in raw_targets(dashboard["panels"]):
            alone, _ = only_target(dashboard, title, target["refId"])
            sent = [(q.panel, q.query["refId"]) for q in dashboard_queries(alone)]
            assert sent == [(title, target["refId"])] * times_sent(dashboard, target), (dashboard["uid"], title)


def test_a_target_without_its_query_field_stops_the_check():
    """Not skipped: the check fails, naming the dashboard, panel and target. Tried on every committed target."""
    tried = Counter()
    for dashboard in all_dashboards():
        for title, target in raw_targets(dashboard["panels"]):
            broken, kept = only_target(dashboard, title, target["refId"])
            kind = kept["datasource"]["type"]
            del kept[QUERY_FIELDS[kind]]
            with pytest.raises(ValueError, match="without its query field") as raised:
                dashboard_queries(broken)
            assert repr(title) in str(raised.value) and repr(target["refId"]) in str(raised.value)
            tried[kind] += 1
    assert set(tried) == set(QUERY_FIELDS), tried


def test_an_unknown_plugin_or_a_missing_datasource_stops_the_check():
    panel = {"title": "p", "targets": [{"refId": "A", "datasource": {"type": "elasticsearch", "uid": "es"},
                                        "query": "x"}]}
    with pytest.raises(ValueError, match="'elasticsearch' is not in QUERY_FIELDS"):
        dashboard_queries({"uid": "d", "panels": [panel]})
    panel = {"title": "p", "targets": [{"refId": "A", "expr": "up"}]}
    with pytest.raises(ValueError, match="names no datasource"):
        dashboard_queries({"uid": "d", "panels": [panel]})


def test_a_target_may_take_its_panels_datasource():
    datasource = {"type": "prometheus", "uid": "prometheus"}
    panel = {"title": "p", "datasource": datasource, "targets": [{"refId": "A", "expr": "up"}]}
    (query,) = dashboard_queries({"uid": "d", "panels": [panel]})
    assert query.query["datasource"] == datasource and query.query["expr"] == "up"


def test_the_edge_and_the_wait_for_a_worker_are_sent():
    """The docker tier asks Grafana for the edge's panels too: the golden signals once more, with source=edge,
    and the comparison's wait, its two sides, the service graph and the edge's traces in Tempo."""
    dashboards = {dashboard["uid"]: dashboard for dashboard in all_dashboards()}
    golden = dashboard_queries(dashboards["golden-signals"])
    following = {(title, target["refId"]) for title, target in raw_targets(dashboards["golden-signals"]["panels"])
                 if SOURCE_VARIABLE.search(json.dumps(target))}
    assert following and {(q.panel, q.query["refId"]) for q in golden if q.source == "edge"} == following
    for query in golden:
        if query.source == "edge":
            assert 'telemetry_source="edge"' in query.text and "$source" not in query.text, query.title
    comparison = Counter((q.panel.split(",")[0].split(":")[0], q.query["datasource"]["type"])
                         for q in dashboard_queries(dashboards["comparison"]))
    assert comparison["Waiting for a worker", "prometheus"] == 2  # the mean wait and the p95 gap
    assert comparison["Mean latency per route", "prometheus"] == 2  # the edge's side and the app's
    assert comparison["Service graph", "prometheus"] == 1
    assert comparison["Requests through the edge (Tempo)", "tempo"] == 1
