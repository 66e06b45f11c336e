"""``instance.get_console`` through a real agent on libvirt's test hypervisor: who may ask,
what is refused, and that the agent's proxy honours its tokens. (The test hypervisor runs no
VNC server and no serial socket: sessions with real guests are in tests/test_guest_console.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, call_error, free_port, spawn_args
from test_agent_tenants import client, tenants
from test_cli import fc
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from fastcompute.errors import Conflict, Forbidden, NotFound

__all__ = ["tenants"]


def console_agent(make_agent: Any, tmp_path: Path) -> tuple[AgentProcess, int]:
    port = free_port()
    agent: AgentProcess = make_agent(config=f'[console]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
                                            f'socket_dir = "{tmp_path / "s"}"\n')
    return agent, port


def status_of(url: str) -> int:
    with pytest.raises(InvalidStatus) as exc, connect(url, open_timeout=10):
        pass
    return exc.value.response.status_code


def test_consoles_off_by_default(agent: AgentProcess, image_file: Path) -> None:
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    err = call_error(agent, "instance.get_console", {"uuid": uuid, "type": "novnc"})
    assert (err.code, err.message) == ("CONFLICT", "consoles are not enabled on this host ([console] enabled)")


def test_get_console_checks_its_args_and_the_instance(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    agent, _port = console_agent(make_agent, tmp_path)
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    err = call_error(agent, "instance.get_console", {"uuid": uuid, "type": "rdp"})
    assert err.code == "BAD_REQUEST" and err.details["field"] == "args.type"
    assert call_error(agent, "instance.get_console", {"uuid": uuid}).code == "BAD_REQUEST"
    missing = "00000000-0000-4000-8000-000000000001"
    assert call_error(agent, "instance.get_console", {"uuid": missing, "type": "serial"}).code == "NOT_FOUND"
    # The test hypervisor assigns no VNC port: the guest has no reachable graphical console.
    err = call_error(agent, "instance.get_console", {"uuid": uuid, "type": "novnc"})
    assert err.code == "CONFLICT" and "no port" in err.message
    agent.call("instance.stop", {"uuid": uuid})
    err = call_error(agent, "instance.get_console", {"uuid": uuid, "type": "serial"})
    assert err.code == "CONFLICT" and "is stopped" in err.message


def test_tokens_through_the_agents_proxy(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    agent, port = console_agent(make_agent, tmp_path)
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    got = agent.call("instance.get_console", {"uuid": uuid, "type": "serial"})
    assert set(got) == {"uuid", "type", "url", "expires_at"}
    assert got["url"].startswith(f"ws://127.0.0.1:{port}/serial/{uuid}?token=")
    # Accepted (the token is good), then closed: there is no serial socket behind it here.
    with connect(got["url"], open_timeout=10) as ws, pytest.raises(ConnectionClosedError) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert status_of(got["url"]) == 403  # spent
    # The command prints a fresh URL, by the instance's name too.
    printed = fc("console-url", "vm", "--type", "serial", "--endpoint", agent.control).stdout.strip()
    assert printed.startswith(f"ws://127.0.0.1:{port}/serial/{uuid}?token=") and printed != got["url"]
    # Dead with the instance.
    late = agent.call("instance.get_console", {"uuid": uuid, "type": "serial"})["url"]
    agent.call("instance.delete", {"uuid": uuid})
    assert status_of(late) == 403
    # The store never held the token itself.
    token = late.rsplit("token=", 1)[1]
    for f in agent.state_dir.glob("fastcompute.sqlite*"):
        assert token.encode() not in f.read_bytes()


def test_only_members_of_the_instances_project_get_its_console(tenants: dict[str, Any], image_file: Path) -> None:
    with client(tenants, "alice") as alice:
        uuid = alice.call("instance.spawn", spawn_args(image_file, project_id="p1", wait=True))["uuid"]
        # Past authorization: this host has consoles off.
        with pytest.raises(Conflict):
            alice.call("instance.get_console", {"uuid": uuid, "type": "novnc"})
    for who in ("bob", "dave"):  # readers of p1 (and of every project)
        with client(tenants, who) as reader, pytest.raises(Forbidden):
            reader.call("instance.get_console", {"uuid": uuid, "type": "novnc"})
    # A member of another project is told there is no such instance, as for any op on it.
    with client(tenants, "carol") as carol, pytest.raises(NotFound):
        carol.call("instance.get_console", {"uuid": uuid, "type": "novnc"})
