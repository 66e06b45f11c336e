"""Every op and transition of the contract against a real agent on libvirt's test driver.

The transition table is Nova's: what each op needs, the vm_state it leads to and the power state
that must come with it. Anything else is CONFLICT naming the current state; delete works from
every state; events for each change go out on ``instance.<uuid>``.
"""

from __future__ import annotations

import uuid as uuid_mod
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import (
    AgentProcess,
    call_error,
    disk_dirs,
    recv_events,
    spawn_args,
    spawn_in_state,
    sub_socket,
    wait_for_state,
)

POWER_OF = {"active": "running", "stopped": "shutdown", "paused": "paused", "suspended": "suspended",
            "error": "nostate"}

# (op, args) -> the vm_states it is legal from, and where it leads.
OPS: dict[str, tuple[str, dict[str, Any], frozenset[str], str]] = {
    "start": ("instance.start", {}, frozenset({"stopped"}), "active"),
    "stop": ("instance.stop", {}, frozenset({"active", "paused", "suspended"}), "stopped"),
    "pause": ("instance.pause", {}, frozenset({"active"}), "paused"),
    "unpause": ("instance.unpause", {}, frozenset({"paused"}), "active"),
    "suspend": ("instance.suspend", {}, frozenset({"active", "paused"}), "suspended"),
    "resume": ("instance.resume", {}, frozenset({"suspended"}), "active"),
    "reboot": ("instance.reboot", {}, frozenset({"active"}), "active"),
    "reboot-hard": ("instance.reboot", {"hard": True},
                    frozenset({"active", "paused", "stopped", "suspended", "error"}), "active"),
}
STATES = ("active", "stopped", "paused", "suspended", "error")


def test_spawn_reply_is_building_then_active(agent: AgentProcess, image_file: Path) -> None:
    chosen = str(uuid_mod.uuid4())
    rec = agent.call("instance.spawn", spawn_args(image_file, name="web-1", uuid=chosen,
                                                   project_id="p1", metadata={"role": "web"}))
    assert rec["uuid"] == chosen
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) in (
        ("building", "spawning", "nostate"), ("active", None, "running"))
    assert rec["name"] == "web-1" and rec["project_id"] == "p1"
    assert rec["flavor"]["vcpus"] == 1 and rec["flavor"]["memory_mb"] == 64
    assert rec["image"]["url"] == image_file.as_uri()
    assert rec["fault"] is None and rec["numa"] is None
    assert rec["created_at"].endswith("Z") and "T" in rec["created_at"]
    assert rec["host"] == agent.call("host.info")["hostname"]
    active = wait_for_state(agent, chosen, "active")
    assert active["power_state"] == "running" and active["fault"] is None
    assert active["updated_at"] >= active["created_at"]
    # Its own disk of disk_gb under the state dir, in place of the image.
    disk = agent.state_dir / "instances" / chosen / "disk"
    assert disk.exists()


def test_spawn_wait_returns_active(agent: AgentProcess, image_file: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")


def test_spawn_uppercase_uuid_is_normalised(agent: AgentProcess, image_file: Path) -> None:
    chosen = str(uuid_mod.uuid4())
    rec = agent.call("instance.spawn", spawn_args(image_file, uuid=chosen.upper(), wait=True))
    assert rec["uuid"] == chosen
    assert agent.call("instance.get", {"uuid": chosen.upper()})["uuid"] == chosen


def failed_build(agent: AgentProcess, directory: Path) -> tuple[dict[str, Any], Path]:
    """An instance in error because its image file was missing; returns it and that path."""
    missing = directory / f"later-{uuid_mod.uuid4().hex}.raw"
    return spawn_in_state(agent, missing, "error", image={"url": missing.as_uri()}), missing


@pytest.mark.parametrize("state", STATES)
def test_transitions_from(agent: AgentProcess, image_file: Path, tmp_path: Path, state: str) -> None:
    """From ``state``: every legal op reaches its target; every other op is CONFLICT naming it."""
    probe = spawn_in_state(agent, image_file, state)
    assert probe["power_state"] == POWER_OF[state] and probe["task_state"] is None
    for name, (op, extra, allowed, target) in OPS.items():
        if state in allowed:
            if state == "error":
                # The image shows up after the failed build: a hard reboot can now rebuild it.
                rec, missing = failed_build(agent, tmp_path)
                missing.write_bytes(image_file.read_bytes())
            else:
                rec = spawn_in_state(agent, image_file, state)
            got = agent.call(op, {"uuid": rec["uuid"], **extra})
            assert (got["vm_state"], got["task_state"], got["power_state"]) == (
                target, None, POWER_OF[target]), f"{name} from {state}: {got}"
            assert agent.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == target
        else:
            exc = call_error(agent, op, {"uuid": probe["uuid"], **extra})
            assert exc.code == "CONFLICT", f"{name} from {state}: {exc.code} {exc.message}"
            assert state in exc.message, exc.message
            assert exc.details["vm_state"] == state
    after = agent.call("instance.get", {"uuid": probe["uuid"]})
    assert (after["vm_state"], after["power_state"]) == (state, POWER_OF[state])


def test_stop_with_timeout_and_start_again(agent: AgentProcess, image_file: Path) -> None:
    rec = spawn_in_state(agent, image_file, "active")
    stopped = agent.call("instance.stop", {"uuid": rec["uuid"], "timeout_s": 0})
    assert (stopped["vm_state"], stopped["power_state"]) == ("stopped", "shutdown")
    started = agent.call("instance.start", {"uuid": rec["uuid"]})
    assert (started["vm_state"], started["power_state"]) == ("active", "running")
    stopped = agent.call("instance.stop", {"uuid": rec["uuid"], "timeout_s": 5.5})
    assert stopped["vm_state"] == "stopped"


def test_full_cycle_on_one_instance(agent: AgentProcess, image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    steps = [
        ("instance.pause", {}, "paused"), ("instance.unpause", {}, "active"),
        ("instance.suspend", {}, "suspended"), ("instance.resume", {}, "active"),
        ("instance.pause", {}, "paused"), ("instance.suspend", {}, "suspended"),
        ("instance.stop", {}, "stopped"), ("instance.start", {}, "active"),
        ("instance.reboot", {}, "active"), ("instance.reboot", {"hard": True}, "active"),
    ]
    for op, extra, target in steps:
        rec = agent.call(op, {"uuid": uuid, **extra})
        assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == (target, None, POWER_OF[target]), op


def test_hard_reboot_of_failed_build_accounts_for_it(agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    rec, missing = failed_build(agent, tmp_path)
    assert rec["fault"]["code"] == "IMAGE_ERROR"
    assert agent.call("host.info")["usage"]["VCPU"] == 0
    # While the image is still missing the hard reboot fails and the instance stays in error.
    exc = call_error(agent, "instance.reboot", {"uuid": rec["uuid"], "hard": True})
    assert exc.code == "IMAGE_ERROR"
    still = agent.call("instance.get", {"uuid": rec["uuid"]})
    assert (still["vm_state"], still["task_state"]) == ("error", None)
    assert agent.call("host.info")["usage"]["VCPU"] == 0
    missing.write_bytes(image_file.read_bytes())
    got = agent.call("instance.reboot", {"uuid": rec["uuid"], "hard": True})
    assert (got["vm_state"], got["power_state"], got["fault"]) == ("active", "running", None)
    usage = agent.call("host.info")["usage"]
    # An active guest must be counted in the host's usage and must have its disk.
    assert usage["VCPU"] == 1 and usage["MEMORY_MB"] == 64
    assert (agent.state_dir / "instances" / rec["uuid"] / "disk").exists()


@pytest.mark.parametrize("state", ["building", *STATES])
def test_delete_from_every_state(agent: AgentProcess, image_file: Path, state: str) -> None:
    if state == "building":
        rec = agent.call("instance.spawn", spawn_args(image_file))
    else:
        rec = spawn_in_state(agent, image_file, state)
    uuid = rec["uuid"]
    assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}
    for op in ("instance.get", "instance.delete", "instance.start", "instance.console"):
        exc = call_error(agent, op, {"uuid": uuid})
        assert exc.code == "NOT_FOUND" and uuid in exc.message, (op, exc.code)
    assert agent.call("instance.list") == []
    info = agent.call("host.info")
    assert set(info["usage"].values()) == {0}
    assert disk_dirs(agent) == set()


def test_ops_on_unknown_uuid_are_not_found(agent: AgentProcess) -> None:
    unknown = str(uuid_mod.uuid4())
    for op in ("instance.get", "instance.start", "instance.stop", "instance.pause", "instance.unpause",
               "instance.suspend", "instance.resume", "instance.reboot", "instance.delete",
               "instance.console"):
        exc = call_error(agent, op, {"uuid": unknown})
        assert exc.code == "NOT_FOUND", op
        assert unknown in exc.message


def test_list_filters(agent: AgentProcess, image_file: Path) -> None:
    a = spawn_in_state(agent, image_file, "active", project_id="alpha")
    b = spawn_in_state(agent, image_file, "stopped", project_id="alpha")
    c = spawn_in_state(agent, image_file, "active", project_id="beta")

    def uuids(args: dict[str, Any]) -> set[str]:
        return {r["uuid"] for r in agent.call("instance.list", args)}

    assert uuids({}) == {a["uuid"], b["uuid"], c["uuid"]}
    assert uuids({"project_id": "alpha"}) == {a["uuid"], b["uuid"]}
    assert uuids({"vm_state": "active"}) == {a["uuid"], c["uuid"]}
    assert uuids({"project_id": "alpha", "vm_state": "stopped"}) == {b["uuid"]}
    assert uuids({"project_id": "gamma"}) == set()
    assert uuids({"vm_state": "paused"}) == set()
    full = {r["uuid"]: r for r in agent.call("instance.list")}
    assert full[b["uuid"]]["vm_state"] == "stopped" and full[b["uuid"]]["power_state"] == "shutdown"


def test_console_returns_bytes_of_the_log_tail(agent: AgentProcess, image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    first = agent.call("instance.console", {"uuid": uuid})["data"]
    assert isinstance(first, bytes)
    # The test hypervisor runs no guest; write the serial log the domain XML points at.
    log = agent.state_dir / "instances" / uuid / "console.log"
    log.write_bytes(b"boot: ok\n" * 100 + b"login: \xff\n")
    assert agent.call("instance.console", {"uuid": uuid})["data"] == log.read_bytes()
    assert agent.call("instance.console", {"uuid": uuid, "tail_bytes": 9})["data"] == b"login: \xff\n"


def _states(events: list[tuple[str, Any]], topic: str) -> list[tuple[str, Any, str]]:
    seen: list[tuple[str, Any, str]] = []
    for t, body in events:
        if t == topic:
            s = (body["vm_state"], body["task_state"], body["power_state"])
            if not seen or seen[-1] != s:
                seen.append(s)
    return seen


def test_instance_events_for_a_lifecycle(agent: AgentProcess, image_file: Path) -> None:
    uuid = str(uuid_mod.uuid4())
    topic = "instance." + uuid
    sub = sub_socket(agent.events, [topic])
    try:
        agent.call("instance.spawn", spawn_args(image_file, uuid=uuid, wait=True))
        agent.call("instance.pause", {"uuid": uuid})
        agent.call("instance.unpause", {"uuid": uuid})
        agent.call("instance.stop", {"uuid": uuid})
        agent.call("instance.delete", {"uuid": uuid})
        events = recv_events(sub, 10.0, until=lambda t, b: b["vm_state"] == "deleted")
    finally:
        sub.close()
    assert all(t == topic for t, _ in events)
    assert all(b["uuid"] == uuid for _, b in events)
    assert _states(events, topic) == [
        ("building", "spawning", "nostate"),
        ("active", None, "running"),
        ("active", "pausing", "running"),
        ("paused", None, "paused"),
        ("paused", "unpausing", "paused"),
        ("active", None, "running"),
        ("active", "powering-off", "running"),
        ("stopped", None, "shutdown"),
        ("stopped", "deleting", "shutdown"),
        ("deleted", None, "nostate"),
    ]


def test_host_resources_events_follow_usage(agent: AgentProcess, image_file: Path) -> None:
    sub = sub_socket(agent.events, ["host.resources"])
    try:
        uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
        up = recv_events(sub, 15.0, until=lambda t, b: b["usage"]["VCPU"] == 1)
        agent.call("instance.delete", {"uuid": uuid})
        down = recv_events(sub, 15.0, until=lambda t, b: b["usage"]["VCPU"] == 0)
    finally:
        sub.close()
    assert up and up[-1][1]["usage"] == {"VCPU": 1, "PCPU": 0, "MEMORY_MB": 64, "DISK_GB": 1}
    assert set(up[-1][1]["inventory"]) == {"VCPU", "PCPU", "MEMORY_MB", "DISK_GB"}
    assert down and down[-1][1]["usage"]["MEMORY_MB"] == 0
