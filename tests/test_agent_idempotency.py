"""Idempotent retries: same request id -> the first reply again (byte for byte), never a second
execution, also after the agent restarted; a client-chosen uuid reused with the same arguments is
the same instance, with other arguments CONFLICT."""

from __future__ import annotations

import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import zmq
from agent_fixtures import AgentProcess, call_error, spawn_args, wait_for_state


def send_frames(endpoint: str, msgs: list[dict[str, Any]], timeout_ms: int = 30_000) -> list[bytes]:
    """Send all requests at once on one DEALER; return the raw reply frames in arrival order."""
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        for m in msgs:
            s.send(msgpack.packb(m))
        out = []
        for _ in msgs:
            assert s.poll(timeout_ms), "no reply"
            out.append(s.recv())
        return out
    finally:
        s.close()


def req(rid: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": 1, "id": rid, "op": op}
    if args is not None:
        msg["args"] = args
    return msg


def test_same_id_twice_gives_same_reply_and_one_instance(agent: AgentProcess, image_file: Path) -> None:
    m = req("spawn-once", "instance.spawn", spawn_args(image_file))
    first = send_frames(agent.control, [m])[0]
    second = send_frames(agent.control, [m])[0]
    assert first == second
    rec = msgpack.unpackb(first)["result"]
    assert len(agent.call("instance.list")) == 1
    assert agent.call("host.info")["usage"]["VCPU"] == 1
    wait_for_state(agent, rec["uuid"], "active")
    # The replay is the first reply, not the instance's current record.
    assert msgpack.unpackb(send_frames(agent.control, [m])[0]) == msgpack.unpackb(first)


def test_same_id_concurrently_executes_once(agent: AgentProcess, image_file: Path) -> None:
    m = req("spawn-burst", "instance.spawn", spawn_args(image_file, wait=True))
    replies = send_frames(agent.control, [m] * 5)
    assert len(set(replies)) == 1
    assert msgpack.unpackb(replies[0])["result"]["vm_state"] == "active"
    assert len(agent.call("instance.list")) == 1


def test_retry_of_a_lifecycle_op_is_not_executed_again(agent: AgentProcess, image_file: Path) -> None:
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    stop = req("stop-1", "instance.stop", {"uuid": uuid})
    first = send_frames(agent.control, [stop])[0]
    assert msgpack.unpackb(first)["result"]["vm_state"] == "stopped"
    agent.call("instance.start", {"uuid": uuid})
    # Executed again, the stop would stop the instance; replayed, it leaves it active.
    assert send_frames(agent.control, [stop])[0] == first
    assert agent.call("instance.get", {"uuid": uuid})["vm_state"] == "active"


def test_error_replies_are_replayed_too(agent: AgentProcess, image_file: Path) -> None:
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    start = req("start-early", "instance.start", {"uuid": uuid})
    first = send_frames(agent.control, [start])[0]
    assert msgpack.unpackb(first)["error"]["code"] == "CONFLICT"
    agent.call("instance.stop", {"uuid": uuid})
    assert send_frames(agent.control, [start])[0] == first
    assert agent.call("instance.get", {"uuid": uuid})["vm_state"] == "stopped"


def test_delete_retry_replays_deleted(agent: AgentProcess, image_file: Path) -> None:
    uuid = agent.call("instance.spawn", spawn_args(image_file, wait=True))["uuid"]
    d = req("delete-1", "instance.delete", {"uuid": uuid})
    first = send_frames(agent.control, [d])[0]
    assert msgpack.unpackb(first)["result"] == {"uuid": uuid, "deleted": True}
    # A lost reply retried must not turn into NOT_FOUND.
    assert send_frames(agent.control, [d])[0] == first


def test_client_chosen_uuid_same_args_same_instance(agent: AgentProcess, image_file: Path) -> None:
    chosen = str(uuid_mod.uuid4())
    args = spawn_args(image_file, uuid=chosen, project_id="p", metadata={"a": "b"})
    a = agent.call("instance.spawn", args)
    b = agent.call("instance.spawn", args)  # a new request id each time
    assert a["uuid"] == b["uuid"] == chosen
    c = agent.call("instance.spawn", {**args, "wait": True})  # wait does not count as an argument
    assert c["uuid"] == chosen and c["vm_state"] == "active"
    assert len(agent.call("instance.list")) == 1
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 64


def test_client_chosen_uuid_other_args_conflict(agent: AgentProcess, image_file: Path) -> None:
    chosen = str(uuid_mod.uuid4())
    agent.call("instance.spawn", spawn_args(image_file, uuid=chosen, wait=True))
    for other in (
        spawn_args(image_file, uuid=chosen, name="other-name"),
        spawn_args(image_file, uuid=chosen, flavor={"vcpus": 2, "memory_mb": 64, "disk_gb": 1}),
        spawn_args(image_file, uuid=chosen, project_id="elsewhere"),
    ):
        exc = call_error(agent, "instance.spawn", other)
        assert exc.code == "CONFLICT" and chosen in exc.message
    listed = agent.call("instance.list")
    assert len(listed) == 1 and listed[0]["name"] == "vm" and listed[0]["flavor"]["vcpus"] == 1
    assert agent.call("host.info")["usage"]["VCPU"] == 1


def test_retry_after_restart_returns_first_reply(agent: AgentProcess, image_file: Path) -> None:
    spawn = req("r-spawn", "instance.spawn", spawn_args(image_file, wait=True))
    spawn_reply = send_frames(agent.control, [spawn])[0]
    uuid = msgpack.unpackb(spawn_reply)["result"]["uuid"]
    stop = req("r-stop", "instance.stop", {"uuid": uuid})
    stop_reply = send_frames(agent.control, [stop])[0]
    assert msgpack.unpackb(stop_reply)["result"]["vm_state"] == "stopped"
    agent.call("instance.start", {"uuid": uuid})

    assert agent.terminate() == 0
    agent.start()

    assert send_frames(agent.control, [spawn])[0] == spawn_reply
    assert send_frames(agent.control, [stop])[0] == stop_reply
    listed = agent.call("instance.list")
    assert [r["uuid"] for r in listed] == [uuid]
    assert listed[0]["vm_state"] == "active"
