"""Boot storms pipelined on one DEALER: all reach active, all are deleted, nothing is left."""

from __future__ import annotations

import asyncio
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, disk_dirs, spawn_args

from fastcompute.rpc.client import AsyncClient, ClientTimeout

STORM_CONFIG = "[resources]\ncpu_allocation_ratio = 64.0\nram_allocation_ratio = 4.0\ndisk_gb = 100000\n"
FLAVOR = {"vcpus": 1, "memory_mb": 16, "disk_gb": 1}


@pytest.mark.slow
def test_storm_of_500_spawns_then_deletes(make_agent: Any, image_file: Path) -> None:
    agent: AgentProcess = make_agent(config=STORM_CONFIG)
    chosen = [str(uuid_mod.uuid4()) for _ in range(500)]

    async def storm() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with AsyncClient(agent.control, timeout_s=300) as c:
            spawned = await asyncio.gather(*(
                c.request("instance.spawn", spawn_args(image_file, name=f"s{i}", uuid=u, flavor=FLAVOR, wait=True))
                for i, u in enumerate(chosen)))
            mid = await c.call("host.info")
            assert mid["usage"] == {"VCPU": 500, "PCPU": 0, "MEMORY_MB": 16 * 500, "DISK_GB": 500}
            assert len(await c.call("instance.list", {"vm_state": "active"})) == 500
            deleted = await asyncio.gather(*(c.request("instance.delete", {"uuid": u}) for u in chosen))
            return list(spawned), list(deleted)

    spawned, deleted = asyncio.run(storm())
    failed = [r for r in spawned if not r["ok"]]
    assert not failed, failed[:3]
    assert {r["result"]["uuid"] for r in spawned} == set(chosen)
    assert {(r["result"]["vm_state"], r["result"]["power_state"]) for r in spawned} == {("active", "running")}
    assert all(r["ok"] and r["result"]["deleted"] for r in deleted), [r for r in deleted if not r["ok"]][:3]
    assert agent.call("instance.list") == []
    info = agent.call("host.info")
    assert info["usage"] == {"VCPU": 0, "PCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
    assert disk_dirs(agent) == set()
    # Restarting finds nothing to reconcile: no record, no claim, no disk came back.
    assert agent.terminate() == 0
    agent.start()
    assert agent.call("instance.list") == []
    assert agent.call("host.info")["usage"]["VCPU"] == 0


def test_storm_in_one_project_stops_at_capacity(make_agent: Any, image_file: Path) -> None:
    """Pipelined spawns racing for the last units: exactly what fits is admitted."""
    agent: AgentProcess = make_agent(config="[resources]\ncpu_allocation_ratio = 1.0\n")

    async def storm() -> list[dict[str, Any]]:
        async with AsyncClient(agent.control, timeout_s=120) as c:
            return list(await asyncio.gather(*(
                c.request("instance.spawn", spawn_args(image_file, name=f"c{i}", flavor=FLAVOR))
                for i in range(40))))

    replies = asyncio.run(storm())
    ok = [r for r in replies if r["ok"]]
    refused = [r for r in replies if not r["ok"]]
    # The default test host has 16 CPUs; at ratio 1.0, 16 one-vCPU instances fit.
    assert len(ok) == 16
    assert {r["error"]["code"] for r in refused} == {"NO_CAPACITY"}
    assert agent.call("host.info")["usage"]["VCPU"] == 16
    assert len(agent.call("instance.list")) == 16


def test_client_keeping_a_window_in_flight_never_stalls(agent: AgentProcess) -> None:
    """A client that keeps 20 requests in flight, sending one more per reply, is always answered."""

    async def windowed() -> int:
        window = asyncio.Semaphore(20)
        answered = 0
        async with AsyncClient(agent.control, timeout_s=5) as c:

            async def one() -> None:
                nonlocal answered
                async with window:
                    await c.call("ping")
                answered += 1

            tasks = [asyncio.create_task(one()) for _ in range(3000)]
            try:
                await asyncio.gather(*tasks)
            except ClientTimeout:
                pass
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return answered

    assert asyncio.run(windowed()) == 3000
