"""Property tests of the NUMA fitter on random hosts and requests (hypothesis).

The compiled fitter equals the plain-Python reference; every placement is valid; a request
always fits an empty host made to its shape; claims and releases keep a host model exact.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numa_fixtures import corpus, placement_problems

from fastcompute import _core
from fastcompute.resources import numa, numa_reference

EXAMPLES = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def hosts(draw: st.DrawFn) -> dict[str, Any]:
    """A host of 1-8 cells: SMT or not, split or legacy CPU sets, partly used."""
    n_cells = draw(st.integers(1, 8))
    threads = draw(st.sampled_from([1, 2, 4]))
    mode = draw(st.sampled_from(["split", "legacy", "dedicated"]))
    huge = draw(st.sampled_from([(), (2048,), (2048, 1048576), (1048576,)]))
    cells = []
    cpu = 0
    for cell_id in range(n_cells):
        n_cores = draw(st.integers(1, 6))
        siblings = []
        for _ in range(n_cores):
            siblings.append(list(range(cpu, cpu + threads)))
            cpu += threads
        every = [t for core in siblings for t in core]
        if mode == "legacy":
            cpuset, pcpuset = every, every
        elif mode == "dedicated":
            cpuset, pcpuset = [], every
        else:
            n_shared = draw(st.integers(0, n_cores - 1)) * threads
            cpuset, pcpuset = every[:n_shared], every[n_shared:]
        pinned = sorted(draw(st.sets(st.sampled_from(pcpuset))) if pcpuset else set())
        memory = draw(st.integers(1, 16)) * 1024
        pools = [
            {"size_kb": 4, "total": memory * 256, "used": draw(st.integers(0, memory * 128)),
             "reserved": 0}
        ]
        for size in huge:
            total = draw(st.integers(0, memory * 1024 // size))
            used = draw(st.integers(0, total))
            pools.append({"size_kb": size, "total": total, "used": used, "reserved": 0})
        if draw(st.booleans()) and not huge:
            pools = []
        cells.append(
            {
                "id": cell_id,
                "cpuset": cpuset,
                "pcpuset": pcpuset,
                "siblings": siblings,
                "memory": memory,
                "memory_usage": draw(st.integers(0, memory)),
                "cpu_usage": draw(st.integers(0, 8)),
                "pinned_cpus": pinned,
                "socket": cell_id,
                "mempages": pools,
            }
        )
    order = draw(st.permutations(range(n_cells)))
    return {"cells": [cells[i] for i in order]}


@st.composite
def requests(draw: st.DrawFn, max_nodes: int = 4) -> dict[str, Any]:
    """A request as numa.constraints makes them: 1-4 nodes, any policy and page size."""
    nodes = draw(st.integers(1, max_nodes))
    policy = draw(st.sampled_from([None, "shared", "dedicated", "mixed"]))
    pinned = policy in ("dedicated", "mixed")
    thread = draw(st.sampled_from([None, "prefer", "isolate", "require"])) if pinned else None
    pagesize = draw(st.sampled_from([None, -1, -2, -3, 2048, 1048576]))
    emulator = "isolate" if pinned and draw(st.booleans()) else None
    cells = []
    vcpu = 0
    for node in range(nodes):
        n = draw(st.integers(1, 4))
        vcpus = list(range(vcpu, vcpu + n))
        vcpu += n
        if policy == "dedicated":
            cpuset, pcpuset = [], vcpus
        elif policy == "mixed":
            split = draw(st.integers(0, n))
            cpuset, pcpuset = vcpus[:split], vcpus[split:]
        else:
            cpuset, pcpuset = vcpus, []
        cells.append(
            {
                "id": node,
                "cpuset": cpuset,
                "pcpuset": pcpuset,
                "memory": draw(st.integers(1, 8)) * 512,
                "pagesize": pagesize,
                "cpu_policy": policy,
                "cpu_thread_policy": thread,
            }
        )
    return {"numa_nodes": nodes, "emulator_threads_policy": emulator, "cells": cells}


limits = st.one_of(
    st.none(),
    st.builds(
        lambda c, r: {"cpu_allocation_ratio": c, "ram_allocation_ratio": r},
        st.sampled_from([1.0, 2.0, 16.0]),
        st.sampled_from([1.0, 1.5]),
    ),
)


@EXAMPLES
@given(hosts(), requests(), limits)
def test_compiled_fitter_equals_reference_and_is_valid(
    host: dict[str, Any], request: dict[str, Any], lim: dict[str, Any] | None
) -> None:
    got = numa.fit(host, request, lim)
    assert got == numa_reference.fit(host, request, lim)
    assert numa.fit(numa.compile_host(host), request, lim) == got
    if got is not None:
        assert placement_problems(host, request, lim, got) == []


def empty_host_shaped_like(request: dict[str, Any], spare_cells: int) -> dict[str, Any]:
    """A host with one empty cell per guest cell, each just big enough for it, plus spare
    empty cells: SMT only where the thread policy requires siblings."""
    cells = []
    cpu = 0
    guests = request["cells"]
    reserve = 1 if request["emulator_threads_policy"] == "isolate" else 0
    for index, guest in enumerate([*guests, *guests[:1] * spare_cells]):
        threads = 2 if guest["cpu_thread_policy"] == "require" else 1
        dedicated = len(guest["pcpuset"]) + (reserve if index == 0 else 0)
        if guest["cpu_policy"] in ("dedicated", "mixed"):
            # Nova's packing wants a free core even for a mixed cell with no pinned vCPU.
            dedicated = max(dedicated, 1)
        n_shared = -(-len(guest["cpuset"]) // threads) * threads
        n_dedicated = -(-dedicated // threads) * threads
        siblings = [
            list(range(c, c + threads)) for c in range(cpu, cpu + n_shared + n_dedicated, threads)
        ]
        every = list(range(cpu, cpu + n_shared + n_dedicated))
        cpu += len(every)
        memory = guest["memory"]
        pools = [{"size_kb": 4, "total": memory * 256, "used": 0, "reserved": 0}]
        size = guest["pagesize"]
        if size == 1048576 or (size in (-2,) and memory % 1024 == 0):
            pools.append({"size_kb": 1048576, "total": memory // 1024 + 1, "used": 0,
                          "reserved": 0})
        elif size in (-2, 2048):
            pools.append({"size_kb": 2048, "total": memory // 2, "used": 0, "reserved": 0})
        cells.append(
            {
                "id": index,
                "cpuset": every[:n_shared],
                "pcpuset": every[n_shared:],
                "siblings": siblings,
                "memory": memory,
                "memory_usage": 0,
                "cpu_usage": 0,
                "pinned_cpus": [],
                "socket": index,
                "mempages": pools,
            }
        )
    return {"cells": cells}


@EXAMPLES
@given(requests(), st.integers(0, 3))
def test_a_request_always_fits_an_empty_host_of_its_shape(
    request: dict[str, Any], spare_cells: int
) -> None:
    if request["cells"][0]["pagesize"] == 1048576:
        for cell in request["cells"]:
            cell["memory"] = -(-cell["memory"] // 1024) * 1024
    host = empty_host_shaped_like(request, spare_cells)
    for fitter in (numa.fit, numa_reference.fit):
        got = fitter(host, request, None)
        assert got is not None
        assert placement_problems(host, request, None, got) == []


@settings(max_examples=60, deadline=None)
@given(hosts(), requests(max_nodes=2))
def test_claims_until_full_never_pin_a_cpu_twice_and_release_exactly(
    host: dict[str, Any], request: dict[str, Any]
) -> None:
    """Fit and claim until the host is full; releasing everything gives the host back."""
    current = host
    claimed = []
    for _ in range(64):
        placement = numa.fit(current, request)
        if placement is None:
            break
        assert placement_problems(current, request, None, placement) == []
        current = numa.claim(current, request, placement)
        claimed.append(placement)
    for cell in current["cells"]:
        assert len(set(cell["pinned_cpus"])) == len(cell["pinned_cpus"])
        assert set(cell["pinned_cpus"]) <= set(cell["pcpuset"])
    for placement in reversed(claimed):
        current = numa.release(current, request, placement)
    assert current == host


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 700)))
def test_cpuset_bitmaps_round_trip(cpus: set[int]) -> None:
    assert _core.cpuset_to_list(_core.cpuset_from_list(cpus)) == sorted(cpus)


def test_one_host_snapshot_serves_many_threads_at_once() -> None:
    """The fitter releases the GIL and a snapshot is immutable: threads fitting against one
    snapshot all get the single-threaded answers."""
    cases = [c for c in corpus() if c["family"] == "hard_8cell_128pcpu"]
    snapshots = [numa.compile_host(c["host"]) for c in cases]
    expected = [numa.fit(c["host"], c["request"], c["limits"]) for c in cases]

    def fit_all(_: int) -> list[dict[str, Any] | None]:
        return [
            numa.fit(snap, c["request"], c["limits"])
            for snap, c in zip(snapshots, cases, strict=True)
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        for answers in pool.map(fit_all, range(16)):
            assert answers == expected
