"""A real QEMU guest (TCG) of the project's image answers the guest agent's ops through its
``org.qemu.guest_agent.0`` channel: the image's init runs a tiny responder (``fc-qga``) there.

Before the guest has booted its responder the agent refuses with CONFLICT (no guest agent);
once it has, ``instance.set_password`` sets root's password (the guest prints that it did, never
the password), an unknown user is the guest's refusal, and quiesce/unquiesce answer with the
file systems frozen and thawed (none: the guest runs from its initramfs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error
from guest_fixtures import READY, guest_image, libvirtd
from test_guest_agent import agent_config, conn, guest_agent, spawn_guest, wait_console

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]

PASSWORD = "Guest-Pw-5e0c7b1d"


def test_a_real_guest_gets_its_password_and_freezes_through_its_guest_agent(
        guest_agent: Callable[..., AgentProcess], conn: Any, guest_image: Path) -> None:
    agent = guest_agent(agent_config())
    uuid = spawn_guest(agent, guest_image, "qga")["uuid"]
    # The domain has just started: the firmware runs, nothing in the guest has opened the port.
    err = call_error(agent, "instance.set_password", {"uuid": uuid, "password": PASSWORD})
    assert err.code == "CONFLICT", err
    assert err.details["reason"] == "no guest agent" and "guest agent" in err.message

    wait_console(agent, uuid, "FASTCOMPUTE-QGA port=/dev/vport")
    wait_console(agent, uuid, READY)
    assert agent.call("instance.set_password", {"uuid": uuid, "password": PASSWORD}) == {"uuid": uuid, "user": "root"}
    wait_console(agent, uuid, "FASTCOMPUTE-PASSWORD user=root set", timeout_s=30)

    err = call_error(agent, "instance.set_password", {"uuid": uuid, "password": PASSWORD, "user": "nobody"})
    assert err.code == "HYPERVISOR_ERROR", err
    assert "user nobody does not exist" in err.message and PASSWORD not in err.message

    assert agent.call("instance.quiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 0}
    assert agent.call("instance.unquiesce", {"uuid": uuid}) == {"uuid": uuid, "filesystems": 0}
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")

    # Nowhere the agent writes (its store, the guest's console log) nor its own log has it.
    secret = PASSWORD.encode()
    files = [p for p in agent.state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "console.log" for p in files)
    assert [p for p in [*files, agent.log_path] if secret in p.read_bytes()] == []
    agent.call("instance.delete", {"uuid": uuid})
