"""Requests that race each other on one instance, and ops that fail part-way, against a real agent.

The windows are held open, not hoped for: a build waits on an image served over HTTP until the
test lets it through (``GatedImage``), ``max_concurrent_builds = 1`` queues the builds behind it,
and requests that must reach the agent in a given order go down one DEALER socket together.
Whatever the interleaving, a delete leaves nothing behind, a uuid being deleted is not handed out
twice, and no failure leaves an instance busy with a task or holding what it no longer uses.
"""

from __future__ import annotations

import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgspec
import zmq
from agent_fixtures import (
    AgentProcess,
    GatedImage,
    call_error,
    disk_dirs,
    spawn_args,
    spawn_in_state,
    wait_for_state,
)

ONE_BUILD = "[agent]\nmax_concurrent_builds = 1\n"


class Pipe:
    """One DEALER socket with many requests in flight: the agent starts them in the order sent."""

    def __init__(self, agent: AgentProcess) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(agent.control)
        self.replies: dict[str, Any] = {}

    def send(self, rid: str, op: str, args: dict[str, Any]) -> None:
        self.sock.send(msgspec.msgpack.encode({"v": 1, "id": rid, "op": op, "args": args}))

    def reply(self, rid: str, timeout_s: float = 30.0) -> Any:
        """The reply to ``rid`` (those to others that come first are kept for later)."""
        while rid not in self.replies:
            assert self.sock.poll(int(timeout_s * 1000)), f"no reply to {rid} within {timeout_s}s"
            got = msgspec.msgpack.decode(self.sock.recv())
            self.replies[got["id"]] = got
        return self.replies.pop(rid)

    def close(self) -> None:
        self.sock.close()


def memory_used(agent: AgentProcess) -> int:
    return int(agent.call("host.info")["usage"]["MEMORY_MB"])


def gated_spawn(agent: AgentProcess, image: GatedImage, **over: Any) -> dict[str, Any]:
    """Spawn an instance whose build is then fetching ``image``, held until it is released."""
    rec = agent.call("instance.spawn", {**spawn_args(Path("/unused"), **over), "image": {"url": image.url}})
    assert image.asked.wait(30), "the build never asked for its image"
    return rec  # type: ignore[no-any-return]


def assert_no_traceback(agent: AgentProcess) -> None:
    log = agent.log()
    assert "Traceback" not in log and "exception was never retrieved" not in log, log


def test_delete_of_a_queued_build_is_prompt_and_the_build_never_runs(
        make_agent: Any, image_file: Path, gated_image: GatedImage) -> None:
    agent = make_agent(ONE_BUILD)
    first = gated_spawn(agent, gated_image, name="first")
    # The only build slot is taken: this one's build is queued, not started.
    queued = str(uuid_mod.uuid4())
    args = spawn_args(image_file, name="queued", uuid=queued)
    assert agent.call("instance.spawn", args)["vm_state"] == "building"
    with agent.client(timeout_s=10) as c:
        assert c.call("instance.delete", {"uuid": queued}) == {"uuid": queued, "deleted": True}
    assert call_error(agent, "instance.get", {"uuid": queued}).code == "NOT_FOUND"
    assert memory_used(agent) == 64
    # The same uuid again while the deleted one's build is still queued: that build must not
    # run, nor touch this instance, which builds once and alone.
    assert agent.call("instance.spawn", args)["vm_state"] == "building"
    gated_image.release()
    wait_for_state(agent, first["uuid"], "active")
    rec = wait_for_state(agent, queued, "active")
    assert rec["power_state"] == "running" and rec["fault"] is None
    assert memory_used(agent) == 128
    # Its domain is its own: deleted and spawned once more, it is active again.
    agent.call("instance.delete", {"uuid": queued})
    again = agent.call("instance.spawn", {**args, "wait": True})
    assert again["vm_state"] == "active", again["fault"]
    assert_no_traceback(agent)


def test_spawn_of_a_uuid_being_deleted_is_conflict_or_a_new_instance(
        agent: AgentProcess, gated_image: GatedImage) -> None:
    uuid = str(uuid_mod.uuid4())
    args = {**spawn_args(Path("/unused"), uuid=uuid), "image": {"url": gated_image.url}}
    gated_spawn(agent, gated_image, uuid=uuid)
    pipe = Pipe(agent)
    try:
        pipe.send("delete", "instance.delete", {"uuid": uuid})
        pipe.send("spawn", "instance.spawn", args)
        # The delete waits for the build's stage in progress; the spawn is answered meanwhile.
        spawn = pipe.reply("spawn", timeout_s=10)
        gated_image.release()
        delete = pipe.reply("delete")
    finally:
        pipe.close()
    assert delete["ok"] and delete["result"] == {"uuid": uuid, "deleted": True}, delete
    if spawn["ok"]:
        # Acknowledged: then the instance must exist once the delete is over.
        assert agent.call("instance.get", {"uuid": uuid})["vm_state"] in ("building", "active")
    else:
        assert spawn["error"]["code"] == "CONFLICT", spawn
        assert call_error(agent, "instance.get", {"uuid": uuid}).code == "NOT_FOUND"
        assert memory_used(agent) == 0 and uuid not in disk_dirs(agent)
    assert_no_traceback(agent)


def test_a_spawn_waiting_for_its_build_is_refused_when_a_delete_stops_it(
        agent: AgentProcess, gated_image: GatedImage) -> None:
    uuid = str(uuid_mod.uuid4())
    args = {**spawn_args(Path("/unused"), uuid=uuid, wait=True), "image": {"url": gated_image.url}}
    pipe = Pipe(agent)
    try:
        pipe.send("spawn", "instance.spawn", args)
        assert gated_image.asked.wait(30), "the build never asked for its image"
        pipe.send("delete", "instance.delete", {"uuid": uuid})
        gated_image.release()
        spawn, delete = pipe.reply("spawn"), pipe.reply("delete")
    finally:
        pipe.close()
    assert delete["ok"] and delete["result"] == {"uuid": uuid, "deleted": True}, delete
    # Never an acknowledgement with a record about to vanish: the build it waited for is gone.
    assert not spawn["ok"] and spawn["error"]["code"] == "CONFLICT", spawn
    assert spawn["error"]["details"] == {"uuid": uuid, "task_state": "deleting"}, spawn
    assert call_error(agent, "instance.get", {"uuid": uuid}).code == "NOT_FOUND"
    assert memory_used(agent) == 0 and uuid not in disk_dirs(agent)
    assert_no_traceback(agent)


def test_deletes_and_a_stop_racing_a_build(agent: AgentProcess, image_file: Path, gated_image: GatedImage) -> None:
    uuid = str(gated_spawn(agent, gated_image)["uuid"])
    pipe = Pipe(agent)
    try:
        pipe.send("d1", "instance.delete", {"uuid": uuid})
        pipe.send("d2", "instance.delete", {"uuid": uuid})
        pipe.send("stop", "instance.stop", {"uuid": uuid})
        stop = pipe.reply("stop", timeout_s=10)
        gated_image.release()
        d1, d2 = pipe.reply("d1"), pipe.reply("d2")
    finally:
        pipe.close()
    assert not stop["ok"] and stop["error"]["code"] == "CONFLICT", stop
    assert d1["ok"], d1
    # One delete did it; the other finds it gone.
    assert not d2["ok"] and d2["error"]["code"] == "NOT_FOUND", d2
    assert call_error(agent, "instance.get", {"uuid": uuid}).code == "NOT_FOUND"
    assert memory_used(agent) == 0 and uuid not in disk_dirs(agent)
    rec = agent.call("instance.spawn", spawn_args(image_file, uuid=uuid, wait=True))
    assert rec["vm_state"] == "active", rec["fault"]
    assert_no_traceback(agent)


def test_spawns_racing_with_one_uuid_make_one_instance(agent: AgentProcess, image_file: Path) -> None:
    for i in range(10):
        uuid = str(uuid_mod.uuid4())
        args = spawn_args(image_file, name=f"twin-{i}", uuid=uuid, wait=True)
        pipe = Pipe(agent)
        try:
            pipe.send(f"a{i}", "instance.spawn", args)
            pipe.send(f"b{i}", "instance.spawn", args)
            a, b = pipe.reply(f"a{i}"), pipe.reply(f"b{i}")
        finally:
            pipe.close()
        # Both waited for the one build.
        for reply in (a, b):
            assert reply["ok"] and reply["result"]["vm_state"] == "active", reply
    assert memory_used(agent) == 640
    assert len(agent.call("instance.list")) == 10


def blocked_disk(agent: AgentProcess, uuid: str) -> Path:
    """A plain file where the instance's directory must go: making its disk fails with an
    OSError no part of the agent expects."""
    path = agent.state_dir / "instances" / uuid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_build_meeting_an_unexpected_error_ends_in_error_with_a_typed_fault(
        agent: AgentProcess, image_file: Path) -> None:
    uuid = str(uuid_mod.uuid4())
    blocker = blocked_disk(agent, uuid)
    rec = agent.call("instance.spawn", spawn_args(image_file, uuid=uuid, wait=True))
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("error", None, "nostate")
    assert rec["fault"]["code"] != "INTERNAL" and uuid in rec["fault"]["message"], rec["fault"]
    assert memory_used(agent) == 0
    # Once the obstacle is gone, a hard reboot builds it.
    blocker.unlink()
    rec = agent.call("instance.reboot", {"uuid": uuid, "hard": True})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")
    assert memory_used(agent) == 64


def test_hard_reboot_meeting_an_unexpected_error_leaves_no_task_and_no_claim(
        agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "later.raw"
    rec = spawn_in_state(agent, missing, "error", image={"url": missing.as_uri()})
    uuid = rec["uuid"]
    assert memory_used(agent) == 0
    missing.write_bytes(image_file.read_bytes())
    blocker = blocked_disk(agent, uuid)
    err = call_error(agent, "instance.reboot", {"uuid": uuid, "hard": True})
    assert err.code != "INTERNAL" and "reboot" in err.message, (err.code, err.message)
    rec = agent.call("instance.get", {"uuid": uuid})
    assert (rec["vm_state"], rec["task_state"]) == ("error", None), rec
    assert memory_used(agent) == 0
    # Nothing stuck: the next hard reboot, with the way clear, recovers it.
    blocker.unlink()
    rec = agent.call("instance.reboot", {"uuid": uuid, "hard": True})
    assert (rec["vm_state"], rec["task_state"], rec["power_state"]) == ("active", None, "running")
    assert memory_used(agent) == 64
