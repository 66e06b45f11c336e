"""PlacementSync against a real OpenStack Placement, and the agents kept in step with it."""

from __future__ import annotations

import asyncio
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import httpx
import pytest
from placement_fixtures import HEADERS, PlacementServer, placement, placement_venv
from scheduler_fixtures import Fleet, after, agent_config, spawns, start_fleet

from fastcompute.config import PlacementConfig
from fastcompute.scheduler.fleet import Scheduler, Weights, run_storm
from fastcompute.scheduler.placement import PlacementSync, placement_inventory

__all__ = ["placement", "placement_venv"]

INVENTORY = {
    "VCPU": {"total": 32, "reserved": 0, "allocation_ratio": 16.0, "min_unit": 1, "max_unit": 32, "step_size": 1},
    "PCPU": {"total": 0, "reserved": 0, "allocation_ratio": 1.0, "min_unit": 1, "max_unit": 1, "step_size": 1},
    "MEMORY_MB": {"total": 65536, "reserved": 512, "allocation_ratio": 1.5, "min_unit": 1, "max_unit": 65536,
                  "step_size": 1},
    "DISK_GB": {"total": 1000, "reserved": 0, "allocation_ratio": 1.0, "min_unit": 1, "max_unit": 1000,
                "step_size": 1},
}
SMALL = {"VCPU": 1, "MEMORY_MB": 128, "DISK_GB": 1}


def host_name() -> str:
    return "host-" + uuid_mod.uuid4().hex[:8]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def expected_view(inventory: dict[str, Any], traits: list[str], held: dict[str, tuple[str, dict[str, int]]]
                  ) -> dict[str, Any]:
    usage: dict[str, int] = {}
    for _, res in held.values():
        for rc, n in res.items():
            usage[rc] = usage.get(rc, 0) + n
    return {"inventory": {rc: {**inv, "allocation_ratio": float(inv["allocation_ratio"])}
                          for rc, inv in placement_inventory(inventory).items()},
            "traits": sorted(traits), "usage": usage,
            "allocations": {c: res for c, (_, res) in held.items()}}


def placement_view(placement: PlacementServer, name: str) -> dict[str, Any]:
    got = placement.provider_view(name)
    for inv in got["inventory"].values():
        inv["allocation_ratio"] = float(inv["allocation_ratio"])
    del got["uuid"]
    return got


def test_registers_sets_inventory_traits_and_allocations(placement: PlacementServer, tmp_path: Path) -> None:
    name = host_name()
    held = {str(uuid_mod.uuid4()): ("p1", dict(SMALL)) for _ in range(5)}
    traits = ["HW_CPU_X86_AVX2", "CUSTOM_FASTCOMPUTE_GOLD"]

    async def go() -> str:
        sync = PlacementSync(PlacementConfig(url=placement.url), name, tmp_path)
        await sync.start(INVENTORY, [*traits, "HW_CPU_X86_NOT_A_REAL_TRAIT"], held)
        for i in range(50):
            c = str(uuid_mod.uuid4())
            sync.set_allocation(c, f"p{i % 3}", SMALL)
            held[c] = (f"p{i % 3}", dict(SMALL))
        assert await sync.drain(60)
        await sync.close()
        return sync.rp_uuid

    rp_uuid = run(go())
    # PCPU (total 0) is left out; the unknown standard trait is not reported.
    assert placement_view(placement, name) == expected_view(INVENTORY, traits, held)
    assert (tmp_path / "placement-rp-uuid").read_text().strip() == rp_uuid

    # A restart with the same state dir keeps the provider (same uuid) and changes nothing.
    async def again() -> str:
        sync = PlacementSync(PlacementConfig(url=placement.url), name, tmp_path)
        await sync.start(INVENTORY, traits, held)
        assert await sync.drain(60)
        await sync.close()
        return sync.rp_uuid

    assert run(again()) == rp_uuid
    assert placement_view(placement, name) == expected_view(INVENTORY, traits, held)


def test_start_heals_allocations_to_match_the_agent(placement: PlacementServer, tmp_path: Path) -> None:
    name = host_name()
    held = {str(uuid_mod.uuid4()): ("p", dict(SMALL)) for _ in range(20)}

    async def agent_start() -> None:
        sync = PlacementSync(PlacementConfig(url=placement.url), name, tmp_path)
        await sync.start(INVENTORY, [], held)
        assert await sync.drain(60)
        await sync.close()

    run(agent_start())
    # While the agent was away: 5 instances were deleted, 5 spawned, and one changed size
    # in its store; Placement knows none of it.
    consumers = list(held)
    for c in consumers[:5]:
        del held[c]
    for _ in range(5):
        held[str(uuid_mod.uuid4())] = ("p", dict(SMALL))
    held[consumers[10]] = ("p", {"VCPU": 2, "MEMORY_MB": 256, "DISK_GB": 2})

    run(agent_start())
    assert placement_view(placement, name) == expected_view(INVENTORY, [], held)


def test_consumer_with_allocations_elsewhere_keeps_them(placement: PlacementServer, tmp_path: Path) -> None:
    """A consumer Placement already knows (another provider holds part of it) is re-read
    (its generation) and our part added, not written over."""
    shared_rp = str(uuid_mod.uuid4())
    with httpx.Client(base_url=placement.url, headers=HEADERS) as c:
        assert c.post("/resource_providers", json={"uuid": shared_rp, "name": host_name()}).status_code == 200
        r = c.put(f"/resource_providers/{shared_rp}/inventories",
                  json={"resource_provider_generation": 0, "inventories": {"IPV4_ADDRESS": {"total": 10}}})
        assert r.status_code == 200, r.text
        consumer = str(uuid_mod.uuid4())
        r = c.put(f"/allocations/{consumer}", json={
            "allocations": {shared_rp: {"resources": {"IPV4_ADDRESS": 1}}}, "project_id": "p",
            "user_id": "u", "consumer_generation": None, "consumer_type": "INSTANCE"})
        assert r.status_code == 204, r.text
    name = host_name()

    async def go() -> None:
        sync = PlacementSync(PlacementConfig(url=placement.url), name, tmp_path)
        await sync.start(INVENTORY, [], {})
        sync.set_allocation(consumer, "p", SMALL)
        assert await sync.drain(60)
        await sync.close()

    run(go())
    allocs = placement.get(f"/allocations/{consumer}")["allocations"]
    rp = placement.provider_view(name)["uuid"]
    assert allocs == {shared_rp: {"resources": {"IPV4_ADDRESS": 1}, "generation": allocs[shared_rp]["generation"]},
                      rp: {"resources": SMALL, "generation": allocs[rp]["generation"]}}


def test_inventory_follows_changes_made_by_others(placement: PlacementServer, tmp_path: Path) -> None:
    """Another writer moves the provider's generation (an operator adds a trait): our next
    inventory update re-reads the generation and still lands."""
    name = host_name()

    async def go() -> None:
        sync = PlacementSync(PlacementConfig(url=placement.url), name, tmp_path)
        await sync.start(INVENTORY, ["CUSTOM_A"], {})
        assert await sync.drain(60)
        rp = placement.get(f"/resource_providers/{sync.rp_uuid}")
        with httpx.Client(base_url=placement.url, headers=HEADERS) as c:
            assert c.put("/traits/CUSTOM_OPERATOR").status_code in (201, 204)
            r = c.put(f"/resource_providers/{sync.rp_uuid}/traits", json={
                "resource_provider_generation": rp["generation"], "traits": ["CUSTOM_A", "CUSTOM_OPERATOR"]})
            assert r.status_code == 200, r.text
        bigger = {**INVENTORY, "VCPU": {**INVENTORY["VCPU"], "total": 64, "max_unit": 64}}
        sync.update_inventory(bigger, ["CUSTOM_B"])
        assert await sync.drain(60)
        await sync.close()

    run(go())
    got = placement.provider_view(name)
    assert got["inventory"]["VCPU"]["total"] == 64
    assert got["traits"] == ["CUSTOM_B"]


def test_placement_down_queues_and_catches_up(placement: PlacementServer, tmp_path: Path) -> None:
    name = host_name()
    held: dict[str, tuple[str, dict[str, int]]] = {str(uuid_mod.uuid4()): ("p", dict(SMALL)) for _ in range(10)}

    async def go() -> None:
        sync = PlacementSync(PlacementConfig(url=placement.url, retry_max_s=0.5), name, tmp_path)
        await sync.start(INVENTORY, [], held)
        assert await sync.drain(60)
        placement.stop()
        try:
            for _ in range(200):
                c = str(uuid_mod.uuid4())
                sync.set_allocation(c, "p", SMALL)
                held[c] = ("p", dict(SMALL))
            for c in list(held)[:30]:
                sync.remove_allocation(c)
                del held[c]
            # Nothing can be written: the updates wait, and the callers were not held up.
            assert not await sync.drain(1.0)
            assert sync.pending > 0 and sync.failures > 0
        finally:
            placement.start()
        assert await sync.drain(60)
        await sync.close()

    run(go())
    assert placement_view(placement, name) == expected_view(INVENTORY, [], held)


# -- agents with [placement] url ----------------------------------------------------------------------


@pytest.fixture
def placed_fleet(make_agent: Any, tmp_path: Path, placement: PlacementServer) -> Fleet:
    """The three agents, each with ``[placement] url`` set."""
    import time

    fleet = start_fleet(make_agent, tmp_path, suffix="-" + uuid_mod.uuid4().hex[:6],
                        extra_config=f'[placement]\nurl = "{placement.url}"\nretry_max_s = 0.5\n')
    deadline = time.monotonic() + 15
    while not all(placement.get(f"/resource_providers?name={n}")["resource_providers"]
                  for n in fleet.hostnames.values()):
        if time.monotonic() > deadline:
            pytest.fail("the agents did not register in Placement within 15 s")
        time.sleep(0.2)
    return fleet


def agent_view(fleet: Fleet, placement: PlacementServer, name: str) -> dict[str, Any]:
    """What the agent itself says, in the shape of ``placement_view`` (traits Placement does
    not know are not reported to it)."""
    info = fleet.info(name)
    known = set(placement.get("/traits?name=in:" + ",".join(info["traits"]))["traits"]) if info["traits"] else set()
    records = fleet.agents[name].call("instance.list")
    held: dict[str, tuple[str, dict[str, int]]] = {}
    for r in records:
        f = r["flavor"]
        held[r["uuid"]] = (r["project_id"], {"VCPU": f["vcpus"], "MEMORY_MB": f["memory_mb"],
                                             "DISK_GB": f["disk_gb"]})
    want = expected_view(info["inventory"], [t for t in info["traits"] if t in known], held)
    assert want["usage"] == {rc: n for rc, n in info["usage"].items() if n}
    return want


def wait_in_step(fleet: Fleet, placement: PlacementServer, timeout_s: float = 60.0) -> None:
    """Until every agent's Placement provider equals its own view (or fail with the diff)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        diffs = {}
        for name in fleet.agents:
            try:
                got = placement_view(placement, fleet.hostnames[name])
            except AssertionError as exc:
                got = {"error": str(exc)}
            want = agent_view(fleet, placement, name)
            if got != want:
                diffs[name] = (got, want)
        if not diffs:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Placement differs from the agents: {str(diffs)[:3000]}")
        time.sleep(0.25)


def test_agents_keep_placement_in_step_through_storm_and_deletes(
        placed_fleet: Fleet, placement: PlacementServer, image_file: Path) -> None:
    async def storm() -> list[Any]:
        async with Scheduler(placed_fleet.endpoints(), weights=Weights(ram=0.0, cpu=1.0), timeout_s=20) as s:
            placed, failed = await run_storm(s, spawns(image_file, 600))
            assert not failed
            return placed

    placed = asyncio.run(storm())
    wait_in_step(placed_fleet, placement)
    by_host = {h: n for n, h in placed_fleet.hostnames.items()}
    for p in placed[::2]:
        placed_fleet.agents[by_host[p.host]].call("instance.delete", {"uuid": p.record.uuid})
    wait_in_step(placed_fleet, placement)


def test_placement_down_during_storm_no_spawn_fails_and_it_heals(
        placed_fleet: Fleet, placement: PlacementServer, image_file: Path) -> None:
    async def storm() -> None:
        async with Scheduler(placed_fleet.endpoints(), timeout_s=20) as s:
            try:
                placed, failed = await run_storm(s, spawns(image_file, 400), on_done=after(100, placement.stop))
            finally:
                placement.start()
            assert not failed and len(placed) == 400

    asyncio.run(storm())
    wait_in_step(placed_fleet, placement)


def test_agent_restart_heals_placement(placed_fleet: Fleet, placement: PlacementServer, image_file: Path) -> None:
    async def storm() -> None:
        async with Scheduler(placed_fleet.endpoints(), timeout_s=20) as s:
            _, failed = await run_storm(s, spawns(image_file, 60))
            assert not failed

    asyncio.run(storm())
    wait_in_step(placed_fleet, placement)
    # Someone removes allocations behind the agents' backs; a restart puts them back.
    rp = placement.provider_view(placed_fleet.hostnames["large"])
    assert len(rp["allocations"]) >= 5
    with httpx.Client(base_url=placement.url, headers=HEADERS) as c:
        for consumer in list(rp["allocations"])[:5]:
            assert c.delete(f"/allocations/{consumer}").status_code == 204
    placed_fleet.agents["large"].restart()
    wait_in_step(placed_fleet, placement)


def test_scheduler_with_placement_candidates(placed_fleet: Fleet, placement: PlacementServer,
                                             image_file: Path) -> None:
    from fastcompute.scheduler.placement import PlacementClient

    wait_in_step(placed_fleet, placement)

    async def storm() -> list[Any]:
        async with Scheduler(placed_fleet.endpoints(), weights=Weights(ram=0.0, cpu=1.0, strategy="pack"),
                             placement=PlacementClient(placement.url), timeout_s=20) as s:
            placed, failed = await run_storm(s, spawns(image_file, 100), concurrency=16)
            assert not failed
            return placed

    placed = asyncio.run(storm())
    assert {p.host for p in placed} == {placed_fleet.hostnames["small"], placed_fleet.hostnames["medium"]}
    wait_in_step(placed_fleet, placement)


def test_an_agent_publishes_its_tpm_and_secure_boot_traits(
        make_agent: Any, placement: PlacementServer) -> None:
    """The test hypervisor has swtpm (TPM 1.2 and 2.0, TIS and CRB) and secure-boot OVMF: its
    provider carries Nova's security traits, which a flavor's ``trait:`` keys then select."""
    import time

    name = host_name()
    agent = make_agent(config=agent_config(name, f'[placement]\nurl = "{placement.url}"\nretry_max_s = 0.5\n'))
    want = {"COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_TIS",
            "COMPUTE_SECURITY_TPM_CRB", "COMPUTE_SECURITY_UEFI_SECURE_BOOT"}
    assert want <= set(agent.call("host.info")["traits"])
    deadline = time.monotonic() + 15
    while True:
        rps = placement.get(f"/resource_providers?name={name}")["resource_providers"]
        if rps and want <= set(placement.provider_view(name)["traits"]):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"Placement has not the security traits: {placement.provider_view(name) if rps else rps}")
        time.sleep(0.2)
