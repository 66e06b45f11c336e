"""Pinned, NUMA-aware guests through the agent: claims never over-commit, survive restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from agent_fixtures import spawn_args

from fastcompute.errors import NoCapacity
from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.rpc.client import AsyncClient

PINNED = {"vcpus": 1, "memory_mb": 256, "disk_gb": 1, "extra_specs": {"hw:cpu_policy": "dedicated"}}


def pinned_pcpus(records: list[dict[str, Any]]) -> list[int]:
    return [p for r in records for cell in r["numa"] for p in cell["pinning"].values()]


@pytest.mark.slow
def test_a_thousand_racing_pinned_spawns_fill_exactly_300_pcpus(make_agent: Any, tmp_path: Path,
                                                               image_file: Path) -> None:
    uri = write_test_host(tmp_path / "host.xml", cells=4, sockets=4, cores=40, threads=2, memory_gib=1024)
    agent = make_agent(config='[resources]\ncpu_dedicated_set = "20-319"\ndisk_gb = 100000\n', hypervisor=uri)

    async def storm() -> tuple[list[dict[str, Any]], int]:
        ok: list[dict[str, Any]] = []
        refused = 0
        async with AsyncClient(agent.control) as c:
            async def one(i: int) -> None:
                nonlocal refused
                try:
                    ok.append(await c.call("instance.spawn", spawn_args(image_file, name=f"p{i}", flavor=PINNED)))
                except NoCapacity:
                    refused += 1
            await asyncio.gather(*(one(i) for i in range(1000)))
        return ok, refused

    ok, refused = asyncio.run(storm())
    assert (len(ok), refused) == (300, 700)
    records = agent.call("instance.list")
    assert len(records) == 300
    pcpus = pinned_pcpus(records)
    assert len(pcpus) == 300 and len(set(pcpus)) == 300
    assert set(pcpus) == set(range(20, 320))
    usage = agent.call("host.info")["usage"]
    assert (usage["PCPU"], usage["VCPU"], usage["MEMORY_MB"]) == (300, 0, 300 * 256)

    agent.restart()
    after = {r["uuid"]: r["numa"] for r in agent.call("instance.list")}
    assert after == {r["uuid"]: r["numa"] for r in records}
    assert agent.call("host.info")["usage"]["PCPU"] == 300
    with pytest.raises(NoCapacity):
        agent.call("instance.spawn", spawn_args(image_file, flavor=PINNED))
    freed = records[0]
    agent.call("instance.delete", {"uuid": freed["uuid"]})
    again = agent.call("instance.spawn", spawn_args(image_file, flavor=PINNED, wait=True))
    assert again["vm_state"] == "active"
    assert pinned_pcpus([again]) == pinned_pcpus([freed])


def test_pinned_record_decodes_with_a_plain_msgpack_client(make_agent: Any, tmp_path: Path,
                                                            image_file: Path) -> None:
    """A pinned guest's record, read by a client using msgpack's defaults (strict_map_key):
    every map has string keys, and pinning maps guest vCPU "0".."n" to host pCPU."""
    uri = write_test_host(tmp_path / "host.xml", cells=1, sockets=1, cores=8, threads=1, memory_gib=16)
    agent = make_agent(config='[resources]\ncpu_dedicated_set = "4-7"\n', hypervisor=uri)
    flavor = {**PINNED, "vcpus": 2}
    s: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(agent.control)
    try:
        for i, (op, args) in enumerate((("instance.spawn", spawn_args(image_file, flavor=flavor, wait=True)),
                                        ("instance.list", {}))):
            s.send(msgpack.packb({"v": 1, "id": f"r{i}", "op": op, "args": args}))
            assert s.poll(30_000)
            reply = msgpack.unpackb(s.recv())
            assert reply["ok"], reply
            record = reply["result"] if op == "instance.spawn" else reply["result"][0]
            pinning = record["numa"][0]["pinning"]
            assert sorted(pinning) == ["0", "1"]
            assert set(pinning.values()) <= {4, 5, 6, 7} and len(set(pinning.values())) == 2
    finally:
        s.close()


def test_multi_node_guest_is_spread_and_recorded(make_agent: Any, tmp_path: Path, image_file: Path) -> None:
    uri = write_test_host(tmp_path / "host.xml", cells=2, sockets=2, cores=8, threads=2, memory_gib=64)
    agent = make_agent(config='[resources]\ncpu_dedicated_set = "8-31"\n', hypervisor=uri)
    flavor = {"vcpus": 4, "memory_mb": 2048, "disk_gb": 1,
              "extra_specs": {"hw:cpu_policy": "dedicated", "hw:numa_nodes": "2", "hw:cpu_thread_policy": "require"}}
    rec = agent.call("instance.spawn", spawn_args(image_file, flavor=flavor, wait=True))
    assert rec["vm_state"] == "active"
    cells = rec["numa"]
    assert [c["host_cell"] for c in cells] == [0, 1]
    assert [c["memory_mb"] for c in cells] == [1024, 1024]
    host = agent.call("host.info")
    topo = {c["id"]: c for c in host["topology"]["cells"]}
    for c in cells:
        pins = sorted(c["pinning"].values())
        assert set(pins) <= set(topo[c["host_cell"]]["cpus"])
        # thread policy require: both vCPUs of the cell sit on the two threads of one core
        assert pins in topo[c["host_cell"]]["siblings"]
    assert host["usage"]["PCPU"] == 4
    agent.call("instance.delete", {"uuid": rec["uuid"]})
    assert agent.call("host.info")["usage"]["PCPU"] == 0


def test_numa_flavor_errors_name_the_key(agent: Any, image_file: Path) -> None:
    from fastcompute.errors import BadRequest

    bad = {
        "hw:numa_nodes": {"vcpus": 3, "memory_mb": 1024, "disk_gb": 1, "extra_specs": {"hw:numa_nodes": "2"}},
        "hw:cpu_thread_policy": {"vcpus": 2, "memory_mb": 1024, "disk_gb": 1,
                                 "extra_specs": {"hw:cpu_thread_policy": "isolate"}},
        "hw:frobnicate": {"vcpus": 1, "memory_mb": 64, "disk_gb": 1, "extra_specs": {"hw:frobnicate": "1"}},
    }
    for key, flavor in bad.items():
        with pytest.raises(BadRequest) as err:
            agent.call("instance.spawn", spawn_args(image_file, flavor=flavor))
        assert err.value.details["field"] == f"args.flavor.extra_specs.{key}"
    assert agent.call("instance.list") == []


def test_pinned_flavor_without_dedicated_cpus_is_no_capacity(agent: Any, image_file: Path) -> None:
    with pytest.raises(NoCapacity) as err:
        agent.call("instance.spawn", spawn_args(image_file, flavor=PINNED))
    assert err.value.details["resource_class"] == "PCPU"
    assert agent.call("instance.list") == []
