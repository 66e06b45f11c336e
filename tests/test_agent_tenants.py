"""Tenants under CURVE: each key acts only for the projects and roles it was granted, sees only
their instances, and reuses request ids without ever getting another key's reply; the event
socket admits only keys that may read every project."""

from __future__ import annotations

import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from agent_fixtures import AgentProcess, recv_events, spawn_args, sub_socket
from test_agent_security import make_keys

from fastcompute.errors import Forbidden, NotFound
from fastcompute.rpc.client import Client, ClientTimeout, Curve


@pytest.fixture
def tenants(make_agent: Any, tmp_path: Path) -> dict[str, Any]:
    """An agent with an admin key (the plain allow-list) and tenant keys: alice member of p1,
    bob reader of p1, carol member of p2, dave reader of every project."""
    keys = tmp_path / "keys"
    server_pub, server_sec = make_keys(keys, "server")
    pairs = {name: make_keys(keys, name) for name in ("admin", "alice", "bob", "carol", "dave")}
    z85 = {n: zmq.auth.load_certificate(pub)[0].decode() for n, (pub, _) in pairs.items()}
    agent: AgentProcess = make_agent(start=False, config=(
        "[security]\n"
        f'server_secret_key_file = "{server_sec}"\n'
        f'client_public_keys = ["{z85["admin"]}"]\n'
        f'[[security.clients]]\nkey = "{pairs["alice"][0]}"\nrole = "member"\nprojects = ["p1"]\n'
        f'[[security.clients]]\nkey = "{z85["bob"]}"\nrole = "reader"\nprojects = ["p1"]\n'
        f'[[security.clients]]\nkey = "{z85["carol"]}"\nrole = "member"\nprojects = ["p2"]\n'
        f'[[security.clients]]\nkey = "{z85["dave"]}"\nrole = "reader"\nprojects = ["*"]\n'))
    agent.start(wait=False)
    curves = {n: Curve.from_files(server_pub, sec) for n, (_, sec) in pairs.items()}
    deadline = time.monotonic() + 60
    while True:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        try:
            with Client(agent.control, timeout_s=0.5, curve=curves["admin"]) as c:
                c.call("ping")
            break
        except ClientTimeout:
            assert time.monotonic() < deadline, agent.log()
    return {"agent": agent, "curve": curves, "server_public": zmq.auth.load_certificate(server_pub)[0]}


def client(t: dict[str, Any], who: str) -> Client:
    return Client(t["agent"].control, timeout_s=30, curve=t["curve"][who])


def test_members_act_only_in_their_projects(tenants: dict[str, Any], image_file: Path) -> None:
    with client(tenants, "alice") as alice, client(tenants, "carol") as carol:
        mine = alice.call("instance.spawn", spawn_args(image_file, name="a1", project_id="p1", wait=True))
        with pytest.raises(Forbidden):
            alice.call("instance.spawn", spawn_args(image_file, name="a2", project_id="p2"))
        with pytest.raises(Forbidden):  # project_id left out is "default", not granted
            alice.call("instance.spawn", spawn_args(image_file, name="a3"))
        theirs = carol.call("instance.spawn", spawn_args(image_file, name="c1", project_id="p2", wait=True))
        # Another project's instance is not there for carol, whatever the op.
        for op in ("instance.get", "instance.stop", "instance.delete", "instance.console"):
            with pytest.raises(NotFound):
                carol.call(op, {"uuid": mine["uuid"]})
        assert [r["name"] for r in carol.call("instance.list")] == ["c1"]
        assert [r["name"] for r in alice.call("instance.list")] == ["a1"]
        with pytest.raises(Forbidden):
            carol.call("instance.list", {"project_id": "p1"})
        assert mine["uuid"] not in carol.call("instance.stats")
        assert theirs["uuid"] not in alice.call("instance.stats")
        with pytest.raises(Forbidden):
            alice.call("host.info")
        with pytest.raises(Forbidden):
            alice.call("images.prune")
    with client(tenants, "admin") as admin:
        assert admin.call("instance.get", {"uuid": mine["uuid"]})["vm_state"] == "active"
        assert sorted(r["name"] for r in admin.call("instance.list")) == ["a1", "c1"]


def test_readers_read_and_do_not_act(tenants: dict[str, Any], image_file: Path) -> None:
    with client(tenants, "alice") as alice:
        rec = alice.call("instance.spawn", spawn_args(image_file, project_id="p1", wait=True))
    with client(tenants, "bob") as bob:
        assert bob.call("instance.get", {"uuid": rec["uuid"]})["project_id"] == "p1"
        with pytest.raises(Forbidden):
            bob.call("instance.stop", {"uuid": rec["uuid"]})
        with pytest.raises(Forbidden):
            bob.call("instance.spawn", spawn_args(image_file, project_id="p1"))
        with pytest.raises(Forbidden):
            bob.call("host.info")
    with client(tenants, "dave") as dave:
        assert dave.call("host.info")["instances"] == 1
        assert [r["uuid"] for r in dave.call("instance.list")] == [rec["uuid"]]
        with pytest.raises(Forbidden):
            dave.call("host.set_enabled", {"enabled": False})
    with client(tenants, "alice") as alice:
        assert alice.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == "active"


def raw_call(t: dict[str, Any], who: str, rid: str, op: str, args: dict[str, Any] | None = None) -> Any:
    c: Curve = t["curve"][who]
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = t["server_public"], c.public, c.secret
    s.connect(t["agent"].control)
    try:
        s.send(msgpack.packb({"v": 1, "id": rid, "op": op, **({"args": args} if args else {})}))
        assert s.poll(30_000), "no reply"
        return msgpack.unpackb(s.recv())
    finally:
        s.close()


def test_a_reused_request_id_never_returns_another_keys_reply(tenants: dict[str, Any], image_file: Path) -> None:
    spawn = "instance.spawn"
    first = raw_call(tenants, "alice", "same-id", spawn, spawn_args(image_file, name="secret", project_id="p1"))
    assert first["result"]["name"] == "secret"
    other = raw_call(tenants, "carol", "same-id", spawn, spawn_args(image_file, name="mine", project_id="p2"))
    assert other["ok"] and other["result"]["name"] == "mine" and other["result"]["project_id"] == "p2"
    # Alice's retry (a new connection: the key is the client) still replays her reply.
    assert raw_call(tenants, "alice", "same-id", "instance.spawn",
                    spawn_args(image_file, name="secret", project_id="p1")) == first


def test_events_only_for_keys_that_read_every_project(tenants: dict[str, Any], image_file: Path) -> None:
    agent = tenants["agent"]
    pub = tenants["server_public"]
    socks = {who: sub_socket(agent.events, ["instance."], (pub, tenants["curve"][who].public,
                                                          tenants["curve"][who].secret))
             for who in ("alice", "dave", "admin")}
    try:
        with client(tenants, "alice") as alice:
            rec = alice.call("instance.spawn", spawn_args(image_file, project_id="p1", wait=True))
        for who in ("dave", "admin"):
            seen = recv_events(socks[who], 15.0, until=lambda t, b: b["vm_state"] == "active")
            assert seen and seen[-1][0] == "instance." + rec["uuid"], who
        assert recv_events(socks["alice"], 1.0) == []
    finally:
        for s in socks.values():
            s.close()


def test_an_unshelve_that_brings_an_instance_is_a_spawn_in_its_project(tenants: dict[str, Any],
                                                                       image_file: Path) -> None:
    with client(tenants, "admin") as admin:
        rec = admin.call("instance.spawn", spawn_args(image_file, name="tpl", project_id="p1", wait=True))
    moved = str(uuid_mod.uuid4())
    shelved = {"record": {**rec, "uuid": moved, "vm_state": "shelved_offloaded"}, "image_id": "img"}
    for who in ("carol", "bob"):  # a member of another project; a reader of p1
        with client(tenants, who) as c, pytest.raises(Forbidden):
            c.call("instance.unshelve", {"uuid": moved, "shelved": shelved})
    with client(tenants, "admin") as admin:
        assert [r["name"] for r in admin.call("instance.list")] == ["tpl"]
