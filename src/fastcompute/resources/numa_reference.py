"""The NUMA fitter in plain Python, written to be read: the oracle of the tests and the
baseline of the benchmarks for the compiled fitter in ``core/numa_fit.pxi``.

It follows Nova 34's ``numa_fit_instance_to_host`` as the conformance corpus describes it
(``docs/NUMA.md``): host cells are tried in Nova's order, each (guest cell, host cell) pair
is checked on its own, and the first assignment in the order of
``itertools.permutations(host_cells, len(guest_cells))`` wins. Instead of walking those
permutations (exponential), it computes every pair once and then picks, guest cell by guest
cell, the first host cell that still leaves a perfect matching for the guest cells after it:
the same answer in polynomial time.

Inputs and outputs are the corpus's JSON shapes (``SCHEMA.md`` of the corpus): plain dicts
and lists, memory in MiB, page sizes in KiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Nova's symbolic page-size requests.
PAGE_SMALL = -1
PAGE_LARGE = -2
PAGE_ANY = -3

PINNED_POLICIES = ("dedicated", "mixed")
SHARED_POLICIES = (None, "shared", "mixed")


def fit(
    host: dict[str, Any], request: dict[str, Any], limits: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Place ``request`` on ``host`` as Nova would, or return None when it does not fit.

    The placement is ``{"cells": [{host_cell, pinning, cpuset_reserved, pagesize}, ...]}``
    in guest-cell order.
    """
    host_cells = host["cells"]
    guest_cells = request["cells"]
    if not guest_cells or len(host_cells) < len(guest_cells):
        return None
    ordered = host_cell_order(host_cells, guest_cells)
    reserve = 1 if request.get("emulator_threads_policy") == "isolate" else 0
    # The emulator thread's pCPU goes with guest cell 0 only, so each pair is still
    # independent of the others and can be computed once.
    pairs = [
        [fit_cell(h, g, limits, reserve if i == 0 else 0) for h in ordered]
        for i, g in enumerate(guest_cells)
    ]
    chosen = first_assignment([[p is not None for p in row] for row in pairs])
    if chosen is None:
        return None
    return {"cells": [pairs[i][j] for i, j in enumerate(chosen)]}


def host_cell_order(
    host_cells: Sequence[dict[str, Any]], guest_cells: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Host cells in the order Nova tries them (the default "spread" strategy).

    With more host cells than guest cells: a stable sort by free memory, descending, then a
    stable sort by shared CPU usage, ascending (shared guests), or by free pCPUs,
    descending (pinned guests). Python's sort is stable even with ``reverse=True``, as in
    Nova.
    """
    cells = list(host_cells)
    if len(cells) <= len(guest_cells):
        return cells
    cells.sort(key=lambda c: c["memory"] - c["memory_usage"], reverse=True)
    if guest_cells[0].get("cpu_policy") in (None, "shared"):
        cells.sort(key=lambda c: c["cpu_usage"])
    else:
        cells.sort(key=lambda c: len(free_pcpus(c)), reverse=True)
    return cells


def first_assignment(allowed: list[list[bool]]) -> list[int] | None:
    """The lexicographically first injective choice ``row -> column`` with every
    ``allowed[row][column]`` true, as ``itertools.permutations`` would find it first.

    Row by row, take the first free column that leaves a perfect matching for the rows
    after it (augmenting paths, Kuhn's algorithm): O(rows^2 * columns * edges).
    """
    rows = len(allowed)
    used: set[int] = set()
    chosen: list[int] = []
    for row in range(rows):
        for col, ok in enumerate(allowed[row]):
            if ok and col not in used and _has_matching(allowed, row + 1, used | {col}):
                chosen.append(col)
                used.add(col)
                break
        else:
            return None
    return chosen


def _has_matching(allowed: list[list[bool]], first_row: int, taken: set[int]) -> bool:
    """Whether rows ``first_row..`` can each get a distinct column not in ``taken``."""
    owner: dict[int, int] = {}

    def augment(row: int, seen: set[int]) -> bool:
        for col, ok in enumerate(allowed[row]):
            if not ok or col in taken or col in seen:
                continue
            seen.add(col)
            if col not in owner or augment(owner[col], seen):
                owner[col] = row
                return True
        return False

    return all(augment(row, set()) for row in range(first_row, len(allowed)))


def free_pcpus(cell: dict[str, Any]) -> set[int]:
    """The host cell's pCPUs for pinned guests that no guest has pinned yet."""
    return set(cell["pcpuset"]) - set(cell["pinned_cpus"])


def fit_cell(
    host_cell: dict[str, Any],
    guest_cell: dict[str, Any],
    limits: dict[str, Any] | None,
    reserve: int,
) -> dict[str, Any] | None:
    """One guest cell on one host cell (Nova's ``_numa_fit_instance_cell``), or None.

    ``reserve`` is the number of extra pCPUs to set aside for the emulator threads.
    """
    policy = guest_cell.get("cpu_policy")
    pinned = policy in PINNED_POLICIES
    memory = guest_cell["memory"]

    pagesize = guest_cell.get("pagesize")
    chosen_pagesize = None
    if pagesize:
        chosen_pagesize = pick_pagesize(host_cell, memory, pagesize)
        if chosen_pagesize is None:
            return None
    elif host_cell["mempages"]:
        # Without a page-size request the guest takes small pages; only pinned guests are
        # held to the free ones (shared guests may over-commit memory).
        smallest = min(host_cell["mempages"], key=lambda p: p["size_kb"])
        if not _pool_fits(smallest, memory * 1024, use_free=pinned):
            return None
    elif pinned:
        # Only without page pools is a pinned guest held to the cell's free memory: with
        # pools, the pool its pages come from decides (Nova 34), so a huge-page guest fits a
        # cell whose small-page memory other guests have used up.
        if host_cell["memory"] - host_cell["memory_usage"] < memory:
            return None
    elif memory > host_cell["memory"]:
        return None

    if pinned and len(guest_cell["pcpuset"]) + reserve > len(host_cell["pcpuset"]):
        return None
    if policy in SHARED_POLICIES and len(guest_cell["cpuset"]) > len(host_cell["cpuset"]):
        return None

    pinning: list[list[int]] = []
    reserved: list[int] | None = None
    if pinned:
        if len(free_pcpus(host_cell)) < len(guest_cell["pcpuset"]) + reserve:
            return None
        packed = pack_onto_cores(host_cell, guest_cell, reserve)
        if packed is None:
            return None
        pinning, reserved = packed

    if policy in SHARED_POLICIES and limits:
        cpu_limit = len(host_cell["cpuset"]) * limits["cpu_allocation_ratio"]
        if host_cell["cpu_usage"] + len(guest_cell["cpuset"]) > cpu_limit:
            return None
        ram_limit = host_cell["memory"] * limits["ram_allocation_ratio"]
        if host_cell["memory_usage"] + memory > ram_limit:
            return None

    return {
        "host_cell": host_cell["id"],
        "pinning": pinning,
        "cpuset_reserved": reserved,
        "pagesize": chosen_pagesize,
    }


def pick_pagesize(host_cell: dict[str, Any], memory_mb: int, request: int) -> int | None:
    """The page size (KiB) a page-size request gets on this cell, or None.

    ``small`` is the smallest pool, ``large`` every other pool, ``any`` every pool (largest
    first); an explicit size is that pool only.
    """
    pools = sorted(host_cell["mempages"], key=lambda p: p["size_kb"], reverse=True)
    if request == PAGE_SMALL:
        candidates = pools[-1:]
    elif request == PAGE_LARGE:
        candidates = pools[:-1]
    elif request == PAGE_ANY:
        candidates = pools
    else:
        candidates = [p for p in pools if p["size_kb"] == request]
    for pool in candidates:
        if _pool_fits(pool, memory_mb * 1024, use_free=True):
            return int(pool["size_kb"])
    return None


def _pool_fits(pool: dict[str, Any], memory_kb: int, use_free: bool) -> bool:
    pages = pool["total"] - pool["used"] - pool["reserved"] if use_free else pool["total"]
    size: int = pool["size_kb"]
    return memory_kb <= pages * size and memory_kb % size == 0


def pack_onto_cores(
    host_cell: dict[str, Any], guest_cell: dict[str, Any], reserve: int
) -> tuple[list[list[int]], list[int] | None] | None:
    """Pin the guest cell's dedicated vCPUs to free host threads (Nova's
    ``_pack_instance_onto_cores``), returning ``(pinning, reserved pCPUs)`` or None.

    A core is a host ``siblings`` entry restricted to free pCPUs, threads ascending. For
    ``prefer`` (and no policy) and ``require``: for each width ``w`` from the widest free
    core down, take the first ``w`` threads of every core with at least ``w`` free ones;
    the first width that yields enough threads wins. ``isolate`` takes one thread of each
    fully free core.
    """
    free = free_pcpus(host_cell)
    cores = [[t for t in core if t in free] for core in host_cell["siblings"]]
    threads_per_core = max((len(core) for core in host_cell["siblings"]), default=1)
    vcpus = sorted(guest_cell["pcpuset"])
    thread_policy = guest_cell.get("cpu_thread_policy")

    if thread_policy == "isolate":
        whole = [core for core in cores if core and len(core) == threads_per_core]
        if not whole:
            return None
        # Nova can only isolate on SMT hosts with the legacy vcpu_pin_set configuration
        # (cpuset == pcpuset); otherwise it refuses (bug 1889633).
        if threads_per_core != 1 and set(host_cell["cpuset"]) != set(host_cell["pcpuset"]):
            return None
        return _take(1, whole, vcpus, reserve, cores, whole_cores=True)

    if thread_policy == "require" and threads_per_core <= 1:
        return None
    widest = max((len(core) for core in cores), default=0)
    lowest = 2 if thread_policy == "require" else 1
    for width in range(widest, lowest - 1, -1):
        eligible = [core for core in cores if len(core) >= width]
        taken = _take(width, eligible, vcpus, reserve, cores, whole_cores=False)
        if taken is not None:
            return taken
    if thread_policy == "require":
        return None
    singles = [[t] for core in cores for t in core]
    return _take(1, singles, vcpus, reserve, cores, whole_cores=False)


def _take(
    width: int,
    cores: list[list[int]],
    vcpus: list[int],
    reserve: int,
    free_cores: list[list[int]],
    whole_cores: bool,
) -> tuple[list[list[int]], list[int] | None] | None:
    """The first ``width`` threads of each of ``cores``, concatenated, zipped onto the
    vCPUs; then ``reserve`` emulator pCPUs: the first free threads, in core order over all
    of ``free_cores``, that the guest does not use (with ``whole_cores``, on no core the
    guest uses)."""
    if width * len(cores) < len(vcpus):
        return None
    threads = [t for core in cores for t in core[:width]]
    pinning = [[v, p] for v, p in zip(vcpus, threads, strict=False)]
    if not reserve:
        return pinning, None
    used = {p for _, p in pinning}
    spare = [
        t
        for core in free_cores
        if not (whole_cores and used.intersection(core))
        for t in core
        if t not in used
    ]
    if len(spare) < reserve:
        return None
    return pinning, spare[:reserve]
