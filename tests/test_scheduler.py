"""The scheduler against three real agents of different sizes, and its filters and weighers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scheduler_fixtures import FLAVOR, Fleet, after, spawns, start_fleet, synthetic_info

from fastcompute.errors import BadRequest
from fastcompute.protocol import Flavor
from fastcompute.scheduler.fleet import (
    DISABLED,
    Group,
    HostView,
    NoValidHost,
    Placed,
    Scheduler,
    Weights,
    request_tuple,
    run_storm,
    select,
)


@pytest.fixture
def fleet(make_agent: Any, tmp_path: Path) -> Fleet:
    """small (64 VCPU), medium (128) and large (512), all on the embedded test hypervisor."""
    return start_fleet(make_agent, tmp_path)


def storm(fleet: Fleet, image: Path, count: int, weights: Weights, **kw: Any
          ) -> tuple[list[Placed], list[Any]]:
    async def run() -> tuple[list[Placed], list[Any]]:
        async with Scheduler(fleet.endpoints(), weights=weights, timeout_s=20) as s:
            return await run_storm(s, spawns(image, count), concurrency=64, **kw)

    return asyncio.run(run())


def assert_agents_hold(fleet: Fleet, placed: list[Placed]) -> Counter[str]:
    """Every placed spawn is on the agent the scheduler named, and no agent is over capacity."""
    per_host = Counter(p.host for p in placed)
    for name in fleet.agents:
        held = fleet.instances(name)
        assert {p.record.uuid for p in placed if p.host == name} == held
        info = fleet.info(name)
        for rc, used in info["usage"].items():
            inv = info["inventory"][rc]
            assert used <= (inv["total"] - inv["reserved"]) * inv["allocation_ratio"], (name, rc)
    return per_host


def test_storm_of_600_spreads_over_all_hosts_within_capacity(fleet: Fleet, image_file: Path) -> None:
    placed, failed = storm(fleet, image_file, 600, Weights(ram=0.0, cpu=1.0))
    assert not failed, failed[:3]
    assert len(placed) == 600
    per_host = assert_agents_hold(fleet, placed)
    assert set(per_host) == {"small", "medium", "large"}
    # Spreading by free VCPU evens out what is left: 704 - 600 = 104 over three hosts.
    free = [fleet.capacity(n) - fleet.info(n)["usage"]["VCPU"] for n in fleet.agents]
    assert max(free) - min(free) <= 3, free


def test_storm_packs_the_fullest_host_first(fleet: Fleet, image_file: Path) -> None:
    placed, failed = storm(fleet, image_file, 200, Weights(ram=0.0, cpu=1.0, strategy="pack"))
    assert not failed, failed[:3]
    per_host = assert_agents_hold(fleet, placed)
    assert per_host == {"small": 64, "medium": 128, "large": 8}


def test_storm_beyond_the_fleet_places_what_fits_and_refuses_the_rest(fleet: Fleet, image_file: Path) -> None:
    placed, failed = storm(fleet, image_file, 720, Weights())
    assert len(placed) == 704
    assert len(failed) == 16
    assert all(isinstance(exc, NoValidHost) for _, exc in failed)
    assert_agents_hold(fleet, placed)


def test_agent_killed_mid_storm_its_spawns_go_elsewhere(fleet: Fleet, image_file: Path) -> None:
    large = fleet.agents["large"]

    async def run() -> tuple[list[Placed], list[Any]]:
        async with Scheduler(fleet.endpoints(), weights=Weights(ram=0.0, cpu=1.0), timeout_s=20) as s:
            result = await run_storm(s, spawns(image_file, 300), concurrency=64, on_done=after(150, large.kill))
            # Back on its store: spawns it had claimed without answering are deleted there.
            await asyncio.to_thread(large.start)
            for _ in range(200):
                if s.hosts["large"].alive and not s.orphans:
                    break
                await asyncio.sleep(0.1)
            assert not s.orphans
            return result

    placed, failed = asyncio.run(run())
    assert not failed, failed[:3]
    assert len(placed) == 300
    on_large = [p for p in placed if p.host == "large"]
    # Spreading by free VCPU sends the first ~384 to large: it took some before it died...
    assert 0 < len(on_large) < 300
    # ...and the spawns in flight there when it died were moved on.
    assert any(p.refused_by and p.refused_by[0].startswith("large") for p in placed)
    per_host = assert_agents_hold(fleet, placed)
    assert per_host["large"] == len(on_large)


def test_anti_affinity_group_of_three_lands_on_three_hosts_and_a_fourth_is_refused(
        fleet: Fleet, image_file: Path) -> None:
    group = Group("web", "anti-affinity")

    async def run() -> tuple[list[Placed], Exception | None]:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            placed, failed = await run_storm(s, spawns(image_file, 3, prefix="web"), group=group)
            assert not failed, failed
            try:
                await s.spawn(spawns(image_file, 1, prefix="web-4")[0], group=group)
            except NoValidHost as exc:
                return placed, exc
            return placed, None

    placed, refused = asyncio.run(run())
    assert sorted(p.host for p in placed) == ["large", "medium", "small"]
    assert isinstance(refused, NoValidHost)
    assert refused.details is not None and refused.details["filtered"] == {"group": 3}

    # A new scheduler learns the group's members from the agents and still refuses a fourth;
    # once a member is deleted behind its back (straight at its agent), the agent's next
    # host.resources tells it, and a new member takes the freed host.
    async def again() -> Placed:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            with pytest.raises(NoValidHost):
                await s.spawn(spawns(image_file, 1, prefix="web-5")[0], group=group)
            on_small = next(p.record.uuid for p in placed if p.host == "small")
            await asyncio.to_thread(fleet.agents["small"].call, "instance.delete", {"uuid": on_small})
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    return await s.spawn(spawns(image_file, 1, prefix="web-6")[0], group=group)
                except NoValidHost:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

    sixth = asyncio.run(again())
    assert sixth.host == "small"
    assert fleet.agents["small"].call("host.info")["server_groups"] == {"web": [sixth.record.uuid]}


def test_affinity_group_stays_on_one_host(fleet: Fleet, image_file: Path) -> None:
    async def run() -> list[Placed]:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            placed, failed = await run_storm(s, spawns(image_file, 10, prefix="db"), group=Group("db", "affinity"))
            assert not failed
            return placed

    assert len({p.host for p in asyncio.run(run())}) == 1


def test_disabled_host_and_traits_are_filtered(fleet: Fleet, image_file: Path) -> None:
    fleet.agents["large"].call("host.set_enabled", {"enabled": False, "reason": "maintenance"})

    async def run() -> tuple[list[Placed], list[Any], list[Any]]:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            placed, _ = await run_storm(s, spawns(image_file, 20), required=["HW_CPU_X86_PAE"])
            _, no_trait = await run_storm(s, spawns(image_file, 1, prefix="t"), required=["CUSTOM_NOWHERE"])
            _, forbidden = await run_storm(s, spawns(image_file, 1, prefix="f"), forbidden=["HW_CPU_X86_PAE"])
            return placed, no_trait, forbidden

    placed, no_trait, forbidden = asyncio.run(run())
    assert len(placed) == 20 and {p.host for p in placed} <= {"small", "medium"}
    assert fleet.instances("large") == set()
    for failures in (no_trait, forbidden):
        (_, exc), = failures
        assert isinstance(exc, NoValidHost)
        assert exc.details is not None and exc.details["filtered"] == {"disabled": 1, "traits": 2}


def test_numa_flavor_is_never_sent_to_a_single_cell_host(fleet: Fleet, image_file: Path) -> None:
    two_cells = {"vcpus": 2, "memory_mb": 256, "disk_gb": 1, "extra_specs": {"hw:numa_nodes": "2"}}

    async def run() -> list[Placed]:
        async with Scheduler(fleet.endpoints(), weights=Weights(ram=0.0, cpu=1.0, strategy="pack"),
                             timeout_s=20) as s:
            assert s.hosts["small"].numa_host is not None, "the agent publishes numa_host"
            jobs = [{**a, "flavor": two_cells} for a in spawns(image_file, 10)]
            placed, failed = await run_storm(s, jobs)
            assert not failed
            return placed

    placed = asyncio.run(run())
    # Packing would choose small first; the pre-check knows it has one cell, so no agent
    # had to refuse anything.
    assert {p.host for p in placed} == {"medium"}
    assert all(p.attempts == 1 and not p.refused_by for p in placed)


def test_bad_flavor_is_refused_before_any_host_is_asked(fleet: Fleet, image_file: Path) -> None:
    async def run() -> None:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            bad = {**spawns(image_file, 1)[0], "flavor": {**FLAVOR, "extra_specs": {"hw:cpu_policy": "nope"}}}
            with pytest.raises(BadRequest):
                await s.spawn(bad)

    asyncio.run(run())
    assert all(fleet.instances(n) == set() for n in fleet.agents)


def test_cli_schedules_with_json_output(fleet: Fleet, image_file: Path) -> None:
    argv = [sys.executable, "-m", "fastcompute.cli", "schedule"]
    for a in fleet.agents.values():
        argv += ["--agent", f"{a.control},{a.events}"]
    argv += ["--count", "30", "--vcpus", "1", "--memory", "128", "--image", str(image_file),
             "--strategy", "pack", "--ram-weight", "0", "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["per_host"] == {"small": 30} and not doc["failed"]
    assert {p["uuid"] for p in doc["placed"]} == fleet.instances("small")


# -- the filters and weighers on synthetic views ---------------------------------------------------

def view(name: str, vcpu: int = 64, mem: int = 65536, used_vcpu: int = 0, traits: tuple[str, ...] = ()) -> HostView:
    h = HostView(name)
    h.alive = True
    inv = {"VCPU": (vcpu, 0, 1.0), "MEMORY_MB": (mem, 0, 1.0), "DISK_GB": (1000, 0, 1.0)}
    h.update(synthetic_info(inv, {"VCPU": used_vcpu}, list(traits)))
    return h


def test_select_spreads_to_the_most_free_and_packs_to_the_least() -> None:
    hosts = [view("a", used_vcpu=10), view("b", used_vcpu=50), view("c", used_vcpu=30)]
    req, _ = request_tuple(Flavor(vcpus=4, memory_mb=512, disk_gb=1))
    assert select(hosts, req, Weights(ram=0.0))[0].name == "a"  # type: ignore[union-attr]
    assert select(hosts, req, Weights(ram=0.0, strategy="pack"))[0].name == "b"  # type: ignore[union-attr]
    big, _ = request_tuple(Flavor(vcpus=20, memory_mb=512, disk_gb=1))
    assert select(hosts, big, Weights(ram=0.0, strategy="pack"))[0].name == "c"  # type: ignore[union-attr]


def test_select_filters_and_says_why() -> None:
    disabled = view("d", traits=(DISABLED,))
    down = view("x")
    down.alive = False
    hosts = [view("a", traits=("CUSTOM_GPU",)), view("b", used_vcpu=64), disabled, down]
    req, _ = request_tuple(Flavor(vcpus=1, memory_mb=512, disk_gb=1))
    chosen, _ = select(hosts, req, Weights(), required=frozenset({"CUSTOM_GPU"}))
    assert chosen is not None and chosen.name == "a"
    chosen, why = select(hosts, req, Weights(), forbidden=frozenset({"CUSTOM_GPU"}))
    assert chosen is None and why == {"down": 1, "disabled": 1, "capacity": 1, "traits": 1}


def test_weights_combine_like_novas_normalised_weighers() -> None:
    # a has more free RAM, b more free VCPU: the larger multiplier decides.
    a, b = view("a", vcpu=16, mem=100_000), view("b", vcpu=64, mem=10_000)
    req, _ = request_tuple(Flavor(vcpus=1, memory_mb=512, disk_gb=1))
    assert select([a, b], req, Weights(ram=2.0, cpu=1.0))[0] is a
    assert select([a, b], req, Weights(ram=1.0, cpu=2.0))[0] is b


def test_a_member_just_sent_survives_an_event_that_predates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # An event generated before the agent took the spawn does not list the new member; the view
    # keeps it (anti-affinity must not place a second member there meanwhile) until the
    # unreported horizon has passed, then follows the agent's list.
    clock = [1000.0]
    monkeypatch.setattr("fastcompute.scheduler.fleet.time.monotonic", lambda: clock[0])
    h = HostView("h")
    h.add_member("web", "new")
    h.take_members({"web": ["old"]})
    assert h.members == {"web": {"old", "new"}}
    clock[0] += 10.0
    h.take_members({"web": ["old"]})
    assert h.members == {"web": {"old"}}
    h.add_member("web", "refused")
    h.drop_member("web", "refused")
    h.take_members({})
    assert h.members == {}


def test_custom_traits_of_a_host_are_required_and_forbidden(make_agent: Any, image_file: Path, tmp_path: Path) -> None:
    fleet = start_fleet(make_agent, tmp_path, traits={"medium": ["CUSTOM_GPU"]})
    assert "CUSTOM_GPU" in fleet.info("medium")["traits"] and "CUSTOM_GPU" not in fleet.info("large")["traits"]

    async def run() -> tuple[list[Placed], list[Placed]]:
        async with Scheduler(fleet.endpoints(), timeout_s=20) as s:
            gpu, failed = await run_storm(s, spawns(image_file, 10, prefix="gpu"), required=["CUSTOM_GPU"])
            assert not failed
            plain, failed = await run_storm(s, spawns(image_file, 10, prefix="cpu"), forbidden=["CUSTOM_GPU"])
            assert not failed
            return gpu, plain

    gpu, plain = asyncio.run(run())
    assert {p.host for p in gpu} == {"medium"}
    assert "medium" not in {p.host for p in plain}


def test_a_malformed_custom_trait_stops_the_agent_with_the_key_named(make_agent: Any) -> None:
    agent = make_agent(config='[resources]\ncustom_traits = ["GPU"]\n', start=False)
    agent.start(wait=False)
    assert agent.proc is not None and agent.proc.wait(60) != 0
    assert "custom_traits" in agent.log()
