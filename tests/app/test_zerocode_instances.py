"""zerocode.instances: one service.instance.id per process, spawned workers included."""

from __future__ import annotations

import pytest
from zerocode import instances

SHARED = "deployment.environment.name=demo,service.instance.id=own-apps.pod-1.app,k8s.pod.name=pod-1"


@pytest.mark.unit
def test_the_first_process_keeps_the_shared_id_and_claims_it():
    environ = {instances.ATTRIBUTES: SHARED}
    assert instances.claim(environ, pid=100) is False
    assert environ == {instances.ATTRIBUTES: SHARED, instances.OWNER: "100"}
    # Configured again in the same process (or a forked one, which the SDK itself handles): unchanged.
    assert instances.claim(environ, pid=100) is False and environ[instances.ATTRIBUTES] == SHARED


@pytest.mark.unit
def test_a_spawned_process_leaves_the_shared_id_to_the_sdks_own():
    environ = {instances.ATTRIBUTES: SHARED, instances.OWNER: "100"}
    assert instances.claim(environ, pid=200) is True
    assert environ[instances.ATTRIBUTES] == "deployment.environment.name=demo,k8s.pod.name=pod-1"
    assert environ[instances.OWNER] == "100", "its own children keep comparing against the first process"


@pytest.mark.unit
def test_nothing_to_leave_out_changes_nothing():
    environ = {instances.ATTRIBUTES: "deployment.environment.name=demo", instances.OWNER: "100"}
    assert instances.claim(environ, pid=200) is False
    assert environ[instances.ATTRIBUTES] == "deployment.environment.name=demo"
