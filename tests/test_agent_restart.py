"""Restarts: a clean SIGTERM with instances in every state, SIGTERM while requests are in flight,
and kill -9 in the middle of a boot storm. Nothing acknowledged is lost, nothing is leaked.

libvirt's embedded test hypervisor lives inside the agent process, so every restart also finds
every domain gone: the agent has to re-create each instance in the state it last had.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from agent_fixtures import AgentProcess, GatedImage, disk_dirs, spawn_args, spawn_in_state, wait_for_state

from fastcompute.rpc.client import AsyncClient


def interrupted_build(agent: AgentProcess, image: GatedImage) -> str:
    """An instance whose build is under way (fetching its image) when the agent is killed."""
    rec = agent.call("instance.spawn", {**spawn_args(Path("/unused")), "image": {"url": image.url}})
    time.sleep(0.5)
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == "building"
    agent.kill()
    image.release()
    return str(rec["uuid"])


def test_interrupted_build_is_resumed_after_kill_9(agent: AgentProcess, gated_image: GatedImage) -> None:
    uuid = interrupted_build(agent, gated_image)
    agent.start()
    rec = wait_for_state(agent, uuid, "active")
    assert rec["power_state"] == "running" and rec["fault"] is None
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 64
    assert (agent.state_dir / "instances" / uuid / "disk").exists()


def test_interrupted_build_with_leftover_disk_is_resumed(agent: AgentProcess, gated_image: GatedImage) -> None:
    uuid = interrupted_build(agent, gated_image)
    # As if the kill had come just after the build wrote the disk, before the domain started.
    idir = agent.state_dir / "instances" / uuid
    idir.mkdir(parents=True, exist_ok=True)
    (idir / "disk").write_bytes(b"half-written overlay")
    agent.start()
    deadline = time.monotonic() + 30
    while (rec := agent.call("instance.get", {"uuid": uuid}))["vm_state"] == "building":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert rec["vm_state"] == "active", rec["fault"]
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 64


STATES = ("active", "stopped", "paused", "suspended", "error")
STORM_CONFIG = "[resources]\ncpu_allocation_ratio = 64.0\nram_allocation_ratio = 4.0\ndisk_gb = 100000\n"


def snapshot(agent: AgentProcess) -> dict[str, tuple[str, Any, str, Any]]:
    return {r["uuid"]: (r["vm_state"], r["task_state"], r["power_state"], r["fault"])
            for r in agent.call("instance.list")}


def test_restart_with_instances_in_every_state(agent: AgentProcess, image_file: Path) -> None:
    made = {state: spawn_in_state(agent, image_file, state, project_id="p-" + state)["uuid"]
            for state in STATES}
    before = snapshot(agent)
    assert {before[u][0] for u in made.values()} == set(STATES)
    usage = agent.call("host.info")["usage"]
    assert usage["VCPU"] == 4  # the failed build holds nothing
    disks = disk_dirs(agent)

    assert agent.terminate() == 0
    agent.start()

    assert snapshot(agent) == before
    assert agent.call("host.info")["usage"] == usage
    assert disk_dirs(agent) == disks
    err = agent.call("instance.get", {"uuid": made["error"]})
    assert err["fault"]["code"] == "IMAGE_ERROR"
    # They are real again, not just records: each can leave its state as before.
    assert agent.call("instance.pause", {"uuid": made["active"]})["power_state"] == "paused"
    assert agent.call("instance.start", {"uuid": made["stopped"]})["power_state"] == "running"
    assert agent.call("instance.unpause", {"uuid": made["paused"]})["power_state"] == "running"
    assert agent.call("instance.resume", {"uuid": made["suspended"]})["power_state"] == "running"
    for uuid in made.values():
        agent.call("instance.delete", {"uuid": uuid})
    assert set(agent.call("host.info")["usage"].values()) == {0}
    assert disk_dirs(agent) == set()


def test_restart_twice_keeps_paused_and_suspended(agent: AgentProcess, image_file: Path) -> None:
    paused = spawn_in_state(agent, image_file, "paused")["uuid"]
    suspended = spawn_in_state(agent, image_file, "suspended")["uuid"]
    before = snapshot(agent)
    for _ in range(2):
        assert agent.terminate() == 0
        agent.start()
        assert snapshot(agent) == before
    assert agent.call("instance.stop", {"uuid": paused})["vm_state"] == "stopped"
    assert agent.call("instance.stop", {"uuid": suspended})["vm_state"] == "stopped"


def test_sigterm_finishes_requests_in_flight(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config=STORM_CONFIG)
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(agent.control)
    sent = {}
    for i in range(40):
        u = str(uuid_mod.uuid4())
        sent[f"t-{i}"] = u
        s.send(msgpack.packb({"v": 1, "id": f"t-{i}", "op": "instance.spawn",
                              "args": spawn_args(image_file, name=f"t{i}", uuid=u, wait=True)}))
    assert s.poll(30_000)
    replies = [msgpack.unpackb(s.recv())]
    assert agent.terminate() == 0
    while s.poll(2_000):
        replies.append(msgpack.unpackb(s.recv()))
    s.close()
    ok = {sent[r["id"]] for r in replies if r["ok"]}
    refused = {sent[r["id"]] for r in replies if not r["ok"]}
    assert ok
    assert all(r["ok"] or r["error"]["code"] == "BUSY" for r in replies), replies
    assert all(r["result"]["vm_state"] == "active" for r in replies if r["ok"])

    agent.start()
    present = snapshot(agent)
    assert ok <= set(present) <= set(sent.values())
    assert not refused & set(present)
    for u in present:
        wait_for_state(agent, u, "active")
    usage = agent.call("host.info")["usage"]
    assert usage["VCPU"] == len(present) and usage["MEMORY_MB"] == 64 * len(present)
    assert disk_dirs(agent) == set(present)


@pytest.mark.slow
def test_kill_9_mid_storm_loses_and_leaks_nothing(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config=STORM_CONFIG)
    flavor = {"vcpus": 1, "memory_mb": 32, "disk_gb": 1}
    requests = {f"k9-{i}": spawn_args(image_file, name=f"k{i}", uuid=str(uuid_mod.uuid4()), flavor=flavor)
                for i in range(200)}
    acked: set[str] = set()

    async def storm() -> None:
        killed = asyncio.Event()
        async with AsyncClient(agent.control, timeout_s=60) as c:

            async def one(rid: str, args: dict[str, Any]) -> None:
                reply = await c.request("instance.spawn", args, request_id=rid)
                assert reply["ok"], reply
                acked.add(reply["result"]["uuid"])
                if len(acked) == 60:
                    agent.kill()
                    killed.set()

            tasks = [asyncio.create_task(one(rid, a)) for rid, a in requests.items()]
            everything: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
            waiter: asyncio.Future[Any] = asyncio.ensure_future(killed.wait())
            # Requests the dead agent never answered are abandoned, not waited for.
            await asyncio.wait([everything, waiter], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            for t in [*tasks, waiter]:
                t.cancel()
            await asyncio.gather(everything, waiter, return_exceptions=True)

    asyncio.run(storm())
    assert agent.proc is not None and agent.proc.returncode == -9
    assert len(acked) >= 60
    sent = {a["uuid"] for a in requests.values()}

    agent.start()
    present = set(snapshot(agent))
    assert acked <= present <= sent
    deadline = time.monotonic() + 120
    while "building" in {r["vm_state"] for r in agent.call("instance.list")}:
        assert time.monotonic() < deadline, snapshot(agent)
        time.sleep(0.2)
    states = snapshot(agent)
    assert {s[0] for s in states.values()} == {"active"}, {u: s for u, s in states.items() if s[0] != "active"}
    info = agent.call("host.info")
    assert info["usage"] == {"VCPU": len(present), "PCPU": 0, "MEMORY_MB": 32 * len(present),
                             "DISK_GB": len(present)}
    assert disk_dirs(agent) == present
    assert all((agent.state_dir / "instances" / u / "disk").exists() for u in present)

    # The client retries every request with its id: each one succeeds, exactly once.
    async def retry() -> list[dict[str, Any]]:
        async with AsyncClient(agent.control, timeout_s=120) as c:
            return list(await asyncio.gather(*(c.request("instance.spawn", {**a, "wait": True}, request_id=rid)
                                               for rid, a in requests.items())))

    replies = asyncio.run(retry())
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    listed = agent.call("instance.list")
    assert {r["uuid"] for r in listed} == sent
    for r in listed:
        if r["vm_state"] != "active":
            wait_for_state(agent, r["uuid"], "active")
    assert agent.call("host.info")["usage"]["MEMORY_MB"] == 32 * 200
    assert disk_dirs(agent) == sent
