"""Claims and releases of placements on a host model (``numa.claim`` / ``numa.release``)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from fastcompute.errors import Conflict
from fastcompute.resources import numa


def host() -> dict[str, Any]:
    """Two legacy (vcpu_pin_set) cells of 4 SMT2 cores, 2 MiB pages on cell 1."""
    cells = []
    for cell_id in range(2):
        base = cell_id * 8
        cpus = list(range(base, base + 8))
        pools = [{"size_kb": 4, "total": 1048576, "used": 0, "reserved": 0}]
        if cell_id == 1:
            pools.append({"size_kb": 2048, "total": 1024, "used": 0, "reserved": 0})
        cells.append(
            {
                "id": cell_id,
                "cpuset": cpus,
                "pcpuset": cpus,
                "siblings": [[base + 2 * i, base + 2 * i + 1] for i in range(4)],
                "memory": 4096,
                "memory_usage": 0,
                "cpu_usage": 0,
                "pinned_cpus": [],
                "socket": cell_id,
                "mempages": pools,
            }
        )
    return {"cells": cells}


def flavor(vcpus: int, memory_mb: int, **specs: str) -> dict[str, Any]:
    request = numa.constraints(
        {"vcpus": vcpus, "memory_mb": memory_mb,
         "extra_specs": {k.replace("__", ":"): v for k, v in specs.items()}}
    )
    assert request is not None
    return request


def test_claim_counts_memory_pins_and_pages_and_release_undoes_it() -> None:
    before = host()
    pristine = copy.deepcopy(before)
    request = flavor(2, 1024, hw__cpu_policy="dedicated", hw__mem_page_size="2MB")
    placement = numa.fit(before, request)
    assert placement is not None
    (cell,) = placement["cells"]
    assert cell["host_cell"] == 1
    after = numa.claim(before, request, placement)
    assert before == pristine
    claimed = after["cells"][1]
    assert claimed["memory_usage"] == 1024
    assert claimed["pinned_cpus"] == sorted(p for _, p in cell["pinning"])
    assert claimed["mempages"][1]["used"] == 512
    assert numa.release(after, request, placement) == pristine


def test_small_pages_are_charged_to_the_smallest_pool_and_huge_pages_stay_usable() -> None:
    """A guest without a page size takes the smallest pool's pages (Nova's accounting), which
    is what bounds the next pinned small-page guest; a huge-page guest is held to its own pool
    even when the cell's memory is used up."""
    pristine = host()
    current = copy.deepcopy(pristine)
    taken = []
    small = flavor(2, 3072, hw__cpu_policy="dedicated")
    for cell_id in (0, 1):
        placement = numa.fit(current, small)
        assert placement is not None and placement["cells"][0]["host_cell"] == cell_id
        current = numa.claim(current, small, placement)
        taken.append((small, placement))
        assert current["cells"][cell_id]["mempages"][0]["used"] == 3072 * 256
    assert numa.fit(current, flavor(2, 2048, hw__cpu_policy="dedicated")) is None
    huge = flavor(2, 2048, hw__cpu_policy="dedicated", hw__mem_page_size="large")
    placement = numa.fit(current, huge)
    assert placement is not None
    assert (placement["cells"][0]["host_cell"], placement["cells"][0]["pagesize"]) == (1, 2048)
    current = numa.claim(current, huge, placement)
    assert current["cells"][1]["memory_usage"] > current["cells"][1]["memory"]
    assert current["cells"][1]["mempages"][0]["used"] == 3072 * 256
    for request, placed in reversed([*taken, (huge, placement)]):
        current = numa.release(current, request, placed)
    assert current == pristine


def test_isolate_claims_whole_cores_and_the_emulator_pcpu_alone() -> None:
    request = flavor(
        2, 1024, hw__cpu_policy="dedicated", hw__cpu_thread_policy="isolate",
        hw__emulator_threads_policy="isolate",
    )
    placement = numa.fit(host(), request)
    assert placement is not None
    (cell,) = placement["cells"]
    assert cell["pinning"] == [[0, 0], [1, 2]]
    assert cell["cpuset_reserved"] == [4]
    after = numa.claim(host(), request, placement)
    assert after["cells"][0]["pinned_cpus"] == [0, 1, 2, 3, 4]


def test_shared_guests_count_vcpus_not_pins() -> None:
    request = flavor(3, 512, hw__numa_nodes="1")
    placement = numa.fit(host(), request)
    assert placement is not None
    after = numa.claim(host(), request, placement)
    used = after["cells"][placement["cells"][0]["host_cell"]]
    assert (used["cpu_usage"], used["pinned_cpus"]) == (3, [])


def test_claims_fill_a_host_and_a_stale_placement_conflicts() -> None:
    request = flavor(4, 512, hw__cpu_policy="dedicated")
    current = host()
    placements = []
    while (placement := numa.fit(current, request)) is not None:
        current = numa.claim(current, request, placement)
        placements.append(placement)
    assert len(placements) == 4
    assert all(len(c["pinned_cpus"]) == 8 for c in current["cells"])
    with pytest.raises(Conflict):
        numa.claim(current, request, placements[0])


def test_releasing_what_was_never_claimed_conflicts() -> None:
    request = flavor(2, 512, hw__cpu_policy="dedicated")
    placement = numa.fit(host(), request)
    assert placement is not None
    with pytest.raises(Conflict):
        numa.release(host(), request, placement)


def test_a_snapshot_built_from_the_previous_one_answers_as_a_fresh_one() -> None:
    # compile_host(h, previous) copies the CPU lists of the cells claim() left untouched; after
    # every claim and release of a mixed sequence it must place exactly as the dict itself does,
    # including once a cell's lists are replaced by new objects (then they are read again).
    rnd = random.Random(3)
    h = host()
    compiled = numa.compile_host(h)
    held: list[tuple[dict[str, Any], dict[str, Any]]] = []
    claims = 0
    requests = [flavor(2, 512, **{"hw:cpu_policy": "dedicated"}), flavor(1, 256, hw__numa_nodes="1"),
                flavor(2, 1024, **{"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate"}),
                flavor(2, 512, **{"hw:mem_page_size": "2MB"})]
    for step in range(200):
        if step == 100:
            # The operator splits each cell: half shared, half dedicated (new list objects).
            h = {**h, "cells": [{**c, "cpuset": c["cpuset"][:4], "pcpuset": c["pcpuset"][4:],
                                 "siblings": [list(s) for s in c["siblings"]]} for c in h["cells"]]}
        compiled = numa.compile_host(h, compiled)
        request = rnd.choice(requests)
        placement = numa.fit(compiled, request)
        assert placement == numa.fit(h, request)
        if placement is not None and rnd.random() < 0.6:
            h = numa.claim(h, request, placement)
            held.append((request, placement))
            claims += 1
        elif held:
            request, placement = held.pop(rnd.randrange(len(held)))
            h = numa.release(h, request, placement)
    assert claims > 50, "the sequence hardly claimed anything: it tested nothing"
