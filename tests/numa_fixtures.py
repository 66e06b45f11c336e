"""Shared helpers of the NUMA tests: the corpus loader and an independent validity checker."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "numa-corpus.jsonl"


@cache
def corpus() -> tuple[dict[str, Any], ...]:
    """Every case of the conformance corpus (Nova 34's answers, see docs/NUMA.md)."""
    with CORPUS.open() as f:
        return tuple(json.loads(line) for line in f if line.strip())


def placement_problems(
    host: dict[str, Any],
    request: dict[str, Any],
    limits: dict[str, Any] | None,
    placement: dict[str, Any],
) -> list[str]:
    """What is wrong with ``placement`` of ``request`` on ``host``; empty when it is valid.

    Written from the rules (free pCPUs of the chosen cell, none twice, thread policy kept,
    emulator pCPU, page size, memory and CPU capacity), not from the fitter's code.
    """
    problems: list[str] = []
    cells = {c["id"]: c for c in host["cells"]}
    guests = request["cells"]
    placed = placement["cells"]
    if len(placed) != len(guests):
        return [f"{len(placed)} placed cells for {len(guests)} guest cells"]
    hosts_used = [p["host_cell"] for p in placed]
    if len(set(hosts_used)) != len(hosts_used):
        problems.append(f"host cells used twice: {hosts_used}")
    all_pcpus: list[int] = []
    emulator = request.get("emulator_threads_policy") == "isolate"
    for index, (guest, cell_placed) in enumerate(zip(guests, placed, strict=True)):
        where = f"guest cell {index}"
        cell = cells.get(cell_placed["host_cell"])
        if cell is None:
            problems.append(f"{where}: unknown host cell {cell_placed['host_cell']}")
            continue
        policy = guest.get("cpu_policy")
        pinned_policy = policy in ("dedicated", "mixed")
        free = set(cell["pcpuset"]) - set(cell["pinned_cpus"])
        pinning = cell_placed["pinning"]
        reserved = cell_placed["cpuset_reserved"] or []
        vcpus = [v for v, _ in pinning]
        pcpus = [p for _, p in pinning]
        expected_vcpus = sorted(guest["pcpuset"]) if pinned_policy else []
        if vcpus != expected_vcpus:
            problems.append(f"{where}: pins vCPUs {vcpus}, wants {expected_vcpus}")
        for p in [*pcpus, *reserved]:
            if p not in free:
                problems.append(f"{where}: pCPU {p} is not a free pCPU of cell {cell['id']}")
        all_pcpus += pcpus + reserved
        wants_reserved = emulator and index == 0 and pinned_policy
        if len(reserved) != (1 if wants_reserved else 0):
            problems.append(f"{where}: emulator pCPUs {reserved}")
        core_of = {t: tuple(core) for core in cell["siblings"] for t in core}
        threads_per_core = max((len(c) for c in cell["siblings"]), default=1)
        thread_policy = guest.get("cpu_thread_policy")
        if pinned_policy and thread_policy == "require" and threads_per_core < 2:
            problems.append(f"{where}: require on a host without SMT")
        if pinned_policy and thread_policy == "isolate":
            cores = [core_of.get(p) for p in pcpus]
            if len(set(cores)) != len(cores):
                problems.append(f"{where}: isolate shares a core")
            for core in set(cores):
                if core is None or not set(core) <= free:
                    problems.append(f"{where}: isolate on a core that is not fully free")
            if any(core_of.get(p) in cores for p in reserved):
                problems.append(f"{where}: emulator pCPU on a core of the isolated guest")
        memory = guest["memory"]
        pagesize_req = guest.get("pagesize")
        chosen = cell_placed["pagesize"]
        sizes = sorted(p["size_kb"] for p in cell["mempages"])
        if not pagesize_req:
            if chosen is not None:
                problems.append(f"{where}: page size {chosen} returned but none requested")
        else:
            pool = next((p for p in cell["mempages"] if p["size_kb"] == chosen), None)
            if pool is None:
                problems.append(f"{where}: page size {chosen} is not a pool of the cell")
            else:
                ok_kind = {
                    -1: chosen == sizes[0],
                    -2: chosen != sizes[0],
                    -3: True,
                }.get(pagesize_req, chosen == pagesize_req)
                if not ok_kind:
                    problems.append(f"{where}: page size {chosen} for request {pagesize_req}")
                free_kb = (pool["total"] - pool["used"] - pool["reserved"]) * chosen
                if memory * 1024 > free_kb or (memory * 1024) % chosen:
                    problems.append(f"{where}: {memory} MiB do not fit {chosen} KiB pages")
        if pinned_policy and not pagesize_req:
            # Pinned small pages: the smallest pool's free pages, or the cell's free memory
            # when it reports no pools (with a page size, its pool was checked above).
            if sizes:
                small = next(p for p in cell["mempages"] if p["size_kb"] == sizes[0])
                if memory * 1024 > (small["total"] - small["used"] - small["reserved"]) * sizes[0]:
                    problems.append(f"{where}: {memory} MiB pinned exceed the free small pages")
            elif memory > cell["memory"] - cell["memory_usage"]:
                problems.append(f"{where}: {memory} MiB pinned exceed the free memory")
        if not pinned_policy and not pagesize_req and memory > cell["memory"]:
            problems.append(f"{where}: {memory} MiB exceed the cell")
        if policy in (None, "shared", "mixed"):
            if len(guest["cpuset"]) > len(cell["cpuset"]):
                problems.append(f"{where}: more shared vCPUs than the cell's shared CPUs")
            if limits:
                cpu_limit = len(cell["cpuset"]) * limits["cpu_allocation_ratio"]
                if cell["cpu_usage"] + len(guest["cpuset"]) > cpu_limit:
                    problems.append(f"{where}: CPU allocation ratio exceeded")
                if cell["memory_usage"] + memory > cell["memory"] * limits["ram_allocation_ratio"]:
                    problems.append(f"{where}: RAM allocation ratio exceeded")
    if len(set(all_pcpus)) != len(all_pcpus):
        problems.append("a pCPU is used twice")
    return problems
