"""The agent's /metrics endpoint, parsed as Prometheus would, agrees with what the agent did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import free_port, raw_request, scrape, spawn_args, sub_socket

from fastcompute.errors import NotFound


def test_metrics_follow_requests_errors_instances_and_claims(make_agent: Any, image_file: Path) -> None:
    port = free_port()
    agent = make_agent(config=f'[stats]\nmetrics = "127.0.0.1:{port}"\ninterval_s = 0.2\n')
    url = f"http://127.0.0.1:{port}/metrics"
    for i in range(3):
        agent.call("instance.spawn", spawn_args(image_file, name=f"m{i}", wait=True))
    missing = spawn_args(image_file, name="broken", wait=True)
    missing["image"] = {"url": (image_file.parent / "nope.raw").as_uri()}
    assert agent.call("instance.spawn", missing)["vm_state"] == "error"
    with pytest.raises(NotFound):
        agent.call("instance.get", {"uuid": "00000000-0000-0000-0000-000000000000"})
    for i in range(5):
        raw_request(agent.control, {"v": 1, "id": f"x{i}", "op": f"no.such.op.{i}"})
    time.sleep(0.5)  # gauges follow within one host.resources pass (100 ms)

    m = scrape(url)
    assert m[("fastcompute_requests_total", (("op", "instance.spawn"), ("outcome", "ok")))] == 4
    assert m[("fastcompute_errors_total", (("code", "NOT_FOUND"), ("op", "instance.get")))] == 1
    assert m[("fastcompute_errors_total", (("code", "UNKNOWN_OP"), ("op", "<unknown>")))] == 5
    assert not any("no.such.op" in str(labels) for _, labels in m)
    assert m[("fastcompute_instances", (("vm_state", "active"),))] == 3
    assert m[("fastcompute_instances", (("vm_state", "error"),))] == 1
    usage = agent.call("host.info")["usage"]
    assert m[("fastcompute_resource_claimed", (("resource_class", "VCPU"),))] == usage["VCPU"] == 3
    assert m[("fastcompute_resource_claimed", (("resource_class", "MEMORY_MB"),))] == usage["MEMORY_MB"] == 3 * 64
    assert m[("fastcompute_claims", (("resource_class", "VCPU"),))] == 3
    assert m[("fastcompute_event_loop_lag_seconds_count", ())] >= 1

    for rec in agent.call("instance.list"):
        agent.call("instance.delete", {"uuid": rec["uuid"]})
    time.sleep(0.5)
    m = scrape(url)
    assert m[("fastcompute_instances", (("vm_state", "active"),))] == 0
    assert m[("fastcompute_resource_claimed", (("resource_class", "VCPU"),))] == 0


def test_instance_stats_and_host_stats_events(make_agent: Any, image_file: Path) -> None:
    import msgspec

    agent = make_agent(config="[stats]\ninterval_s = 0.2\n")
    sub = sub_socket(agent.events, ["host.stats"])
    try:
        rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
        deadline = time.monotonic() + 10
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert sub.poll(5000)
            topic, raw = sub.recv_multipart()
            body = msgspec.msgpack.decode(raw)
            if rec["uuid"] in body["instances"]:
                break
        assert topic == b"host.stats" and rec["uuid"] in body["instances"]
        assert body["instances"][rec["uuid"]]["source"] == "libvirt"
    finally:
        sub.close()
    one = agent.call("instance.stats", {"uuid": rec["uuid"]})
    assert set(one) == {rec["uuid"]} and "cpu_pct" in one[rec["uuid"]]
    assert rec["uuid"] in agent.call("instance.stats")
    with pytest.raises(NotFound):
        agent.call("instance.stats", {"uuid": "00000000-0000-0000-0000-000000000001"})
