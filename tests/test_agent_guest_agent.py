"""The guest agent's ops through a real agent on libvirt's test hypervisor.

The test driver answers ``setUserPassword``, ``fsFreeze`` and ``fsThaw`` itself (it freezes its
two pretend file systems once), so a running test guest has an agent: the ops succeed there,
and what is checked is what a client sees around them: the reply, the states that refuse,
the password's validation, and that the password is nowhere the agent writes (its state
directory, its log, its events). The refusal of a guest that runs no agent needs a real guest
(``tests/test_guest_password.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest
from agent_fixtures import AgentProcess, call_error, recv_events, spawn_in_state, sub_socket

from fastcompute.hypervisor.libvirt.xml import GUEST_AGENT_CHANNEL, build
from fastcompute.hypervisor.spec import GuestSpec

PASSWORD = "Tr0ub4dor&3-pw-7c1e9a"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_set_password_answers_without_the_password_and_leaves_it_nowhere(
    agent: AgentProcess, image_file: Path
) -> None:
    rec = spawn_in_state(agent, image_file, "active")
    events = sub_socket(agent.events, [""])
    try:
        reply = agent.call("instance.set_password", {"uuid": rec["uuid"], "password": PASSWORD, "user": "admin"})
        seen = recv_events(events, 0.5)
    finally:
        events.close()
    assert reply == {"uuid": rec["uuid"], "user": "admin"}
    assert PASSWORD not in repr(seen)
    after = agent.call("instance.get", {"uuid": rec["uuid"]})
    assert (after["vm_state"], after["task_state"], after["updated_at"]) == ("active", None, rec["updated_at"])
    agent.terminate()  # the store's writes (WAL included) and the log are complete
    assert f"password of user admin set in instance {rec['uuid']}" in agent.log()
    secret = PASSWORD.encode()
    leaked = [p for p in [*files_under(agent.state_dir), agent.log_path] if secret in p.read_bytes()]
    assert leaked == []


def test_set_password_defaults_to_root(agent: AgentProcess, image_file: Path) -> None:
    rec = spawn_in_state(agent, image_file, "active")
    assert agent.call("instance.set_password", {"uuid": rec["uuid"], "password": "x"})["user"] == "root"


@pytest.mark.parametrize(("args", "field"), [
    ({"password": ""}, "password"),
    ({"password": "p" * 256}, "password"),
    ({"password": "secret\nline"}, "password"),
    ({"password": "secret\x1b[2J"}, "password"),
    ({"password": 1234}, "password"),
    ({}, "password"),
    ({"password": "fine-pw", "user": "root; reboot"}, "user"),
    ({"password": "fine-pw", "user": ""}, "user"),
    ({"password": "fine-pw", "user": "u" * 33}, "user"),
    ({"password": "fine-pw", "extra": 1}, "extra"),
], ids=["empty", "too-long", "newline", "escape", "not-a-string", "missing", "user-shell", "user-empty",
        "user-long", "unknown-field"])
def test_set_password_refuses_a_malformed_request_naming_the_field(
    agent: AgentProcess, image_file: Path, args: dict[str, Any], field: str
) -> None:
    rec = spawn_in_state(agent, image_file, "active")
    err = call_error(agent, "instance.set_password", {"uuid": rec["uuid"], **args})
    assert err.code == "BAD_REQUEST", err
    assert err.details["field"] == f"args.{field}", err
    pw = args.get("password")
    if isinstance(pw, str) and pw:
        assert pw not in err.message


@pytest.mark.parametrize("state", ["stopped", "paused", "suspended", "error"])
@pytest.mark.parametrize("op", ["instance.set_password", "instance.quiesce", "instance.unquiesce"])
def test_guest_agent_ops_need_an_active_instance(agent: AgentProcess, image_file: Path, state: str, op: str) -> None:
    rec = spawn_in_state(agent, image_file, state)
    args = {"uuid": rec["uuid"], "password": PASSWORD} if op == "instance.set_password" else {"uuid": rec["uuid"]}
    err = call_error(agent, op, args)
    assert err.code == "CONFLICT", err
    assert err.details["vm_state"] == state
    assert state in err.message and "needs active" in err.message
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == state


def test_guest_agent_ops_on_an_unknown_instance_are_not_found(agent: AgentProcess) -> None:
    uuid = "3f0b8a9e-2c71-4d0e-9a55-6b1f0c2d7e11"
    for op, args in (("instance.set_password", {"uuid": uuid, "password": "x"}),
                     ("instance.quiesce", {"uuid": uuid}), ("instance.unquiesce", {"uuid": uuid})):
        assert call_error(agent, op, args).code == "NOT_FOUND"


def test_quiesce_and_unquiesce_report_the_file_systems_the_agent_froze(agent: AgentProcess, image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    # The test driver's pretend guest has two file systems, frozen and thawed once each.
    assert agent.call("instance.quiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 2}
    assert agent.call("instance.quiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 0}
    assert agent.call("instance.unquiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 2}
    assert agent.call("instance.unquiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 0}
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"]) == ("active", None)


def test_every_guest_has_the_guest_agent_channel() -> None:
    spec = GuestSpec(uuid="5a0b8a9e-2c71-4d0e-9a55-6b1f0c2d7e12", name="g", project_id="p", vcpus=1,
                     memory_mb=64, console_path="/tmp/fc-qga-console.log")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build(spec))
        try:
            xml = dom.XMLDesc(0)
        finally:
            dom.undefine()
    finally:
        conn.close()
    assert f"<target type='virtio' name='{GUEST_AGENT_CHANNEL}'/>" in xml
    assert "<channel type='unix'>" in xml


def test_the_cli_reads_the_password_from_standard_input(agent: AgentProcess, image_file: Path) -> None:
    uuid = spawn_in_state(agent, image_file, "active")["uuid"]
    cli = [sys.executable, "-m", "fastcompute.cli"]
    proc = subprocess.run([*cli, "set-password", uuid[:8], "--user", "admin", "--json", "--endpoint", agent.control],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"uuid": uuid, "user": "admin"}
    proc = subprocess.run([*cli, "quiesce", uuid, "--json", "--endpoint", agent.control],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"] == [{"uuid": uuid, "filesystems": 2}]
