"""Scheduler speed: one placement decision over a 1,000-host view, and a storm through the
scheduler against the same storm sent straight to one agent of the fleet's combined size.

A storm's rate is spawns to ``active`` (``wait``), as the spine's storm benchmark counts them:
every instance's disk made, its domain defined and started, its record durable. (Counting
replies at ``building`` instead measures how fast requests are queued, about 0.1 s for 600 here,
which a stray process on these two shared cores moves by half.)
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler_fixtures import SIZES, agent_config, spawns, start_fleet, synthetic_info

from fastcompute.hypervisor.libvirt.testhost import write_test_host
from fastcompute.protocol import Flavor
from fastcompute.rpc.client import AsyncClient
from fastcompute.scheduler.fleet import Group, HostView, Scheduler, Weights, request_tuple, run_storm, select

STORM = 600
CONCURRENCY = 64
ROUNDS = 7


# The target: 80% of the single agent's rate. Measured 1.04-1.06 (three agents build
# in three processes, the one agent's builds share one interpreter).
STORM_GATE = 0.8


def synthetic_fleet(n: int, seed: int = 7) -> list[HostView]:
    """``n`` hosts of assorted sizes, usage and traits, as the scheduler's view holds them."""
    rnd = random.Random(seed)
    hosts = []
    for i in range(n):
        h = HostView(f"host-{i:04d}")
        h.alive = True
        cpus = rnd.choice((16, 32, 64, 128))
        mem = cpus * rnd.choice((4096, 8192))
        traits = ["HW_CPU_X86_AVX2"] + (["CUSTOM_GPU"] if i % 10 == 0 else [])
        h.update(synthetic_info(
            {"VCPU": (cpus, 0, 16.0), "MEMORY_MB": (mem, 512, 1.5), "DISK_GB": (2000, 0, 1.0)},
            {"VCPU": rnd.randrange(cpus * 16), "MEMORY_MB": rnd.randrange(mem), "DISK_GB": rnd.randrange(2000)},
            traits,
        ))
        if i % 7 == 0:
            h.members = {"web": {f"vm-{i}"}}
        hosts.append(h)
    return hosts


# The decision is timed in windows of consecutive rounds, spread out by pauses: on this VM a
# thread runs either at full speed or ~1.7x slower (two modes, flipping every second or so, as
# if the vCPUs were unequal), and one window of 300 rounds read 1.32 ms where the code reads
# 0.55. The gate takes the fastest window's median, as timeit takes the fastest repeat: the
# slower ones time the machine. In a clean-clone CI run nine windows of ten were slow (0.85-0.95
# ms), hence twenty, over ~5 s. Beside each window, in the pause before it, its floor is timed:
# one pass over the view keeping the hosts with room for the request, the least a decision
# does; their ratio, window by window, is the same whatever mode the thread is in (6.0 here in
# two runs, the floor 0.086 ms; the decision before dc68644 was ~1.3x slower).
WINDOWS = 20
WINDOW_ROUNDS = 50
WINDOW_PAUSE_S = 0.2
FLOOR_GATE = 8.0


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def test_decision_over_1000_hosts_under_1ms(benchmark: Any) -> None:
    hosts = synthetic_fleet(1000)
    req, _ = request_tuple(Flavor(vcpus=4, memory_mb=8192, disk_gb=20))
    group = Group("web", "anti-affinity")
    need = frozenset({"HW_CPU_X86_AVX2"})
    v, p, m, d = req

    def decide() -> HostView | None:
        return select(hosts, req, Weights(), required=need, group=group)[0]

    def floor() -> list[HostView]:
        return [h for h in hosts if (r := h.room)[0] >= v and r[1] >= p and r[2] >= m and r[3] >= d]

    rounds = itertools.count()
    floors: list[float] = []

    def between_windows() -> None:
        if next(rounds) % WINDOW_ROUNDS == 0:
            time.sleep(WINDOW_PAUSE_S)
            floors.append(_median_ms(floor, WINDOW_ROUNDS))

    assert decide() is not None
    _median_ms(decide, 20)  # warm-up, outside the windows
    benchmark.pedantic(decide, setup=between_windows, rounds=WINDOWS * WINDOW_ROUNDS)
    data = benchmark.stats.stats.data
    medians = [statistics.median(data[i:i + WINDOW_ROUNDS]) * 1000 for i in range(0, len(data), WINDOW_ROUNDS)]
    ratio = statistics.median(dm / fm for dm, fm in zip(medians, floors, strict=True))
    print(f"\nplacement decision over 1,000 hosts: median {min(medians):.3f} ms in the fastest of "
          f"{WINDOWS} windows (gate 1 ms); the windows' medians "
          + ", ".join(f"{x:.2f}" for x in sorted(medians))
          + f"; against its floor (a pass keeping the hosts with room, {min(floors):.3f} ms at best) "
          f"{ratio:.2f}x, median of the windows (gate <= {FLOOR_GATE}x)")
    assert min(medians) < 1.0
    assert ratio <= FLOOR_GATE


async def _direct_storm(agent: Any, image: Path) -> float:
    async with AsyncClient(agent.control, timeout_s=60) as c:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(args: dict[str, Any]) -> None:
            async with slots:
                await c.call("instance.spawn", args)

        jobs = [dict(a, wait=True) for a in spawns(image, STORM)]
        started = time.perf_counter()
        await asyncio.gather(*(one(a) for a in jobs))
        return time.perf_counter() - started


async def _scheduled_storm(fleet: Any, image: Path) -> float:
    async with Scheduler(fleet.endpoints(), weights=Weights(ram=0.0, cpu=1.0), timeout_s=60) as s:
        jobs = [dict(a, wait=True) for a in spawns(image, STORM)]
        started = time.perf_counter()
        placed, failed = await run_storm(s, jobs, concurrency=CONCURRENCY)
        elapsed = time.perf_counter() - started
    assert not failed and len(placed) == STORM
    return elapsed


def test_storm_through_scheduler_vs_straight_to_one_agent(make_memory_agent: Any, image_file: Path,
                                                          tmp_path: Path) -> None:
    combined = {
        "cells": 2, "sockets": 1, "threads": 1,
        "cores": sum(s["sockets"] * s["cores"] * s["threads"] for s in SIZES.values()),
        "memory_gib": sum(s["memory_gib"] for s in SIZES.values()),
    }
    direct_s: list[float] = []
    sched_s: list[float] = []
    # Alternating rounds, each side's best (the round the rest of the machine disturbed least).
    for rnd in range(ROUNDS):
        base = tmp_path / f"round{rnd}"
        base.mkdir()
        one = make_memory_agent(config=agent_config("combined"),
                                hypervisor=write_test_host(base / "combined.xml", **combined))
        direct_s.append(asyncio.run(_direct_storm(one, image_file)))
        one.terminate()
        fleet = start_fleet(make_memory_agent, base)
        sched_s.append(asyncio.run(_scheduled_storm(fleet, image_file)))
        for a in fleet.agents.values():
            a.terminate()
    direct_rate = STORM / min(direct_s)
    sched_rate = STORM / min(sched_s)
    ratio = sched_rate / direct_rate
    print("\nstorm rounds (s): direct", [round(x, 3) for x in direct_s], "scheduled", [round(x, 3) for x in sched_s])
    print(f"{STORM}-spawn storm to active: straight to one agent {direct_rate:.0f}/s, through the scheduler "
          f"over three agents {sched_rate:.0f}/s: ratio {ratio:.2f} (gate >= {STORM_GATE}, the issue's target)")
    assert ratio >= STORM_GATE
