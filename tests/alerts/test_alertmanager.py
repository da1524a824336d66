"""Alertmanager: its config checked by the real amtool, and alerts followed to a real webhook receiver.

Alertmanager and amtool are built from Alertmanager's Go module at ALERTMANAGER_VERSION from .env
(tooling.builds, row `alertmanager`), so what passes here is what the `prom/alertmanager` image accepts. The
native stack runs the committed config, with one change: a webhook to a tooling.native.sinks.WebhookSink is added
to its default receiver, which stands where an e-mail or chat service would be.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml
from stackfiles import compose, dotenv

from tooling.builds import binaries as built
from tooling.builds.recipes import alertmanager_version
from tooling.native.sinks import WebhookSink
from tooling.native.stack import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    NativeStack,
    StackPorts,
    alertmanager_flags,
    poll,
    render_alertmanager_config,
    render_prometheus_config,
)


def committed() -> dict:
    return yaml.safe_load(ALERTMANAGER_CONFIG.read_text())


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


# ------------------------------------------------------------------------------------ the files, statically


@pytest.mark.unit
def test_the_default_route_needs_no_outside_service():
    config = committed()
    (default,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert set(default) == {"name"}, f"the default receiver must send nowhere out of the box: {default}"
    assert not config["route"].get("routes"), "every alert goes to the default receiver"
    assert {"alertname", "severity"} <= set(config["route"]["group_by"])
    route = config["route"]
    assert seconds(route["group_wait"]) < seconds(route["group_interval"]) < seconds(route["repeat_interval"])


@pytest.mark.unit
def test_a_page_mutes_the_ticket_of_the_same_slo_only():
    # Sloth labels its two alerts of an SLO sloth_severity="page"/"ticket"; sloth_id names the SLO.
    (rule,) = committed()["inhibit_rules"]
    assert rule == {"source_matchers": ['sloth_severity="page"'], "target_matchers": ['sloth_severity="ticket"'],
                    "equal": ["sloth_id"]}


@pytest.mark.unit
def test_prometheus_sends_to_the_compose_alertmanager():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (alertmanager,) = config["alerting"]["alertmanagers"]
    assert alertmanager["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    service = compose()["services"]["alertmanager"]
    assert "9093" in [str(port) for port in service["expose"]]
    assert service["image"] == f"prom/alertmanager:{dotenv()['ALERTMANAGER_VERSION']}"


@pytest.mark.unit
def test_compose_runs_the_committed_config_as_one_instance():
    service = compose()["services"]["alertmanager"]
    assert "--config.file=/etc/alertmanager/alertmanager-config.yaml" in service["command"]
    assert "./alertmanager/alertmanager-config.yaml:/etc/alertmanager/alertmanager-config.yaml:ro" in (
        service["volumes"])
    # No HA gossip: nothing listens on 9094, and the native stack (which runs the same flags) cannot
    # collide with another copy of itself there.
    assert "--cluster.listen-address=" in service["command"]
    assert alertmanager_flags() == ["--cluster.listen-address="]


@pytest.mark.unit
def test_the_native_config_adds_only_the_test_webhook():
    assert render_alertmanager_config() == ALERTMANAGER_CONFIG.read_text()
    rendered = yaml.safe_load(render_alertmanager_config("http://127.0.0.1:1/alerts"))
    expected = committed()
    expected["receivers"][0]["webhook_configs"] = [{"url": "http://127.0.0.1:1/alerts", "send_resolved": True}]
    assert rendered == expected


@pytest.mark.unit
def test_the_native_prometheus_sends_to_the_native_alertmanager():
    ports = StackPorts.free()
    rendered = yaml.safe_load(render_prometheus_config(ports))
    assert rendered["alerting"]["alertmanagers"][0]["static_configs"] == [
        {"targets": [f"127.0.0.1:{ports.alertmanager}"]}]


# ------------------------------------------------------------------------------------- with the real amtool


@pytest.fixture(scope="session")
def binaries():
    # Builds on first use (about a minute with Go's caches cold), then reuses .cache/alertmanager/.
    return built("alertmanager")


def amtool(binaries, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binaries[1]), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_binaries_are_the_compose_version(binaries):
    version = alertmanager_version().removeprefix("v")
    for binary in binaries:
        shown = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        assert f"{binary.name}, version {version} " in shown.stdout + shown.stderr


@pytest.mark.integration
def test_amtool_accepts_the_config_and_its_native_rendering(binaries, tmp_path):
    result = amtool(binaries, "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "1 inhibit rules" in result.stdout
    rendered = tmp_path / "alertmanager.yaml"
    rendered.write_text(render_alertmanager_config("http://127.0.0.1:1/alerts"))
    result = amtool(binaries, "check-config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("old, new, error", [
    ("group_wait:", "group_waitt:", "field group_waitt not found"),
    ("  receiver: default", "  receiver: nobody", 'undefined receiver "nobody"'),
])
def test_amtool_rejects_a_broken_config(binaries, tmp_path, old, new, error):
    broken = tmp_path / "alertmanager.yaml"
    text = ALERTMANAGER_CONFIG.read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    result = amtool(binaries, "check-config", str(broken))
    assert result.returncode != 0
    assert error in result.stdout + result.stderr


# --------------------------------------------------------------------- the native stack, alerts end to end

# A rule that fires at its first evaluation, loaded only into this test's Prometheus: an alert that
# Prometheus itself sends, without waiting for a real condition.
WIRING_RULE = {"groups": [{"name": "test-wiring", "rules": [
    {"alert": "NativeStackWiring", "expr": "vector(1)", "labels": {"severity": "info"},
     "annotations": {"summary": "Prometheus reaches Alertmanager"}}]}]}


def post_alerts(stack: NativeStack, *labels: dict) -> float:
    """POST alerts to Alertmanager's v2 API, as Prometheus does; returns when they were accepted."""
    now = datetime.now(UTC).isoformat()
    body = [{"labels": label_set, "annotations": {"summary": "posted by tests/alerts/test_alertmanager.py"},
             "startsAt": now} for label_set in labels]
    response = requests.post(f"{stack.alertmanager_url}/api/v2/alerts", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return time.time()


@pytest.fixture(scope="module")
def alerting(tmp_path_factory):
    """The native stack with a webhook receiver; the test alerts are posted as soon as it is up, so that
    every test below waits out the same group_wait."""
    run_dir = tmp_path_factory.mktemp("alerting")
    rules = run_dir / "wiring.rules.yaml"
    rules.write_text(yaml.safe_dump(WIRING_RULE))
    sink = WebhookSink().start()
    stack = NativeStack(run_dir, alert_webhook=sink.address, extra_rule_files=(rules,))
    try:
        stack.up()
        posted_at = post_alerts(
            stack,
            {"alertname": "DiceTestPosted", "severity": "warning"},
            # An SLO burning fast (page) and slowly (ticket) at once: the ticket is muted...
            {"alertname": "DiceTestSLO", "sloth_severity": "page", "sloth_id": "dice-api-availability"},
            {"alertname": "DiceTestSLO", "sloth_severity": "ticket", "sloth_id": "dice-api-availability"},
            # ...but not another SLO's ticket.
            {"alertname": "DiceTestSLO", "sloth_severity": "ticket", "sloth_id": "dice-api-latency"},
        )
        yield {"stack": stack, "sink": sink, "posted_at": posted_at}
    finally:
        stack.down()
        sink.stop()


def notified(sink: WebhookSink, **labels: str) -> list:
    """(notification, alert) pairs for alerts carrying all of `labels`."""
    return [(n, a) for n in sink.notifications() for a in n.alerts
            if all(a["labels"].get(k) == v for k, v in labels.items())]


@pytest.mark.integration
def test_prometheus_lists_the_alertmanager_as_active(alerting):
    stack = alerting["stack"]

    def active():
        answer = requests.get(f"{stack.prometheus_url}/api/v1/alertmanagers", timeout=5).json()["data"]
        return answer if answer["activeAlertmanagers"] else None

    answer = poll(active, 30, "an active Alertmanager in Prometheus's /api/v1/alertmanagers")
    assert [a["url"] for a in answer["activeAlertmanagers"]] == [f"{stack.alertmanager_url}/api/v2/alerts"]
    assert answer["droppedAlertmanagers"] == []
    # And its own metrics are scraped (job alertmanager): notifications that fail show there.
    poll(lambda: stack.query('up{job="alertmanager"} == 1'), 30, "Prometheus scraping Alertmanager")
    assert stack.query('alertmanager_notifications_failed_total{integration="webhook"}')


@pytest.mark.integration
def test_a_posted_alert_reaches_the_webhook_after_group_wait(alerting):
    sink = alerting["sink"]
    (notification, alert), *_ = poll(lambda: notified(sink, alertname="DiceTestPosted"), 60,
                                     "the posted alert at the webhook")
    latency = notification.received_at - alerting["posted_at"]
    group_wait = seconds(committed()["route"]["group_wait"])
    print(f"\nPOST /api/v2/alerts -> webhook: {latency:.1f} s (group_wait {group_wait} s)")
    assert group_wait - 1 <= latency <= group_wait + 20
    assert notification.path == "/alerts"
    assert notification.body["receiver"] == "default" and notification.body["status"] == "firing"
    assert notification.body["groupLabels"] == {"alertname": "DiceTestPosted", "severity": "warning"}
    assert alert["status"] == "firing" and alert["annotations"]["summary"].startswith("posted by")


@pytest.mark.integration
def test_an_alert_of_a_prometheus_rule_reaches_the_webhook(alerting):
    stack, sink = alerting["stack"], alerting["sink"]
    (notification, alert), *_ = poll(lambda: notified(sink, alertname="NativeStackWiring"), 60,
                                     "the wiring rule's alert, sent by Prometheus, at the webhook")
    assert alert["labels"]["severity"] == "info"
    # Prometheus's link back to the rule's expression (on its external URL, host name and port): this
    # alert came through this stack's Prometheus.
    link = urlsplit(alert["generatorURL"])
    assert link.port == stack.ports.prometheus and parse_qs(link.query)["g0.expr"] == ["vector(1)"]


@pytest.mark.integration
def test_a_page_mutes_the_ticket_of_its_slo_and_no_other(alerting):
    stack, sink = alerting["stack"], alerting["sink"]
    poll(lambda: notified(sink, alertname="DiceTestSLO", sloth_severity="page")
         and notified(sink, alertname="DiceTestSLO", sloth_id="dice-api-latency"), 60,
         "the page and the other SLO's ticket at the webhook")
    # Alertmanager's own account: the muted ticket is held, inhibited by the page.
    alerts = requests.get(f"{stack.alertmanager_url}/api/v2/alerts", params={"filter": 'alertname="DiceTestSLO"'},
                          timeout=5).json()
    states = {(a["labels"]["sloth_severity"], a["labels"]["sloth_id"]): a["status"] for a in alerts}
    muted = states[("ticket", "dice-api-availability")]
    assert muted["state"] == "suppressed" and muted["inhibitedBy"], states
    assert states[("page", "dice-api-availability")]["state"] == "active"
    assert states[("ticket", "dice-api-latency")]["state"] == "active"
    # And nothing was sent for it (the notifications above went out at the same group_wait).
    assert not notified(sink, sloth_severity="ticket", sloth_id="dice-api-availability")
