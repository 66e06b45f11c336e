"""Guest NUMA topologies and CPU pinning, with Nova 34's semantics.

- ``constraints(flavor)`` turns a flavor's ``hw:`` extra specs into a NUMA request (Nova's
  ``numa_get_constraints``), or None for a guest without a NUMA topology.
- ``fit(host, request, limits)`` places a request on a host (Nova's
  ``numa_fit_instance_to_host``) with the compiled fitter of ``_core``; the plain-Python
  ``numa_reference.fit`` beside it gives the same answers. ``compile_host(host)`` makes a
  reusable snapshot of a host for many fits.
- ``claim(host, request, placement)`` and ``release(host, request, placement)`` return the
  host with a placement's usage added or removed, so that a tracker can keep its host model
  exact across spawns and deletes.

Requests, hosts and placements are the typed dicts of ``numa_types``, the JSON shapes of the
conformance corpus (``tests/data/numa-corpus.jsonl``, described in ``docs/NUMA.md``): memory
in MiB, page sizes in KiB, CPU ids as sorted lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

from fastcompute import _core
from fastcompute.errors import BadRequest, Conflict
from fastcompute.protocol.extra_specs import bad, choice
from fastcompute.protocol.schema import parse_uint
from fastcompute.resources import cpusets, units
from fastcompute.resources.numa_types import (
    CpuPolicy,
    EmulatorPolicy,
    HostCellUsage,
    HostUsage,
    Limits,
    NumaRequest,
    Placement,
    ThreadPolicy,
)

PAGE_SMALL = -1
PAGE_LARGE = -2
PAGE_ANY = -3

CPU_POLICIES: tuple[CpuPolicy, ...] = ("shared", "dedicated", "mixed")
THREAD_POLICIES: tuple[ThreadPolicy, ...] = ("prefer", "isolate", "require")
EMULATOR_POLICIES: tuple[EmulatorPolicy, ...] = ("share", "isolate")

# Keys this module interprets; hw:numa_cpus.N and hw:numa_mem.N are matched by pattern.
_NUMA_KEYS = frozenset(
    {
        "hw:numa_nodes",
        "hw:cpu_policy",
        "hw:cpu_thread_policy",
        "hw:cpu_dedicated_mask",
        "hw:mem_page_size",
        "hw:emulator_threads_policy",
    }
)
# Nova's other hw: keys: they do not shape the NUMA request; compute/hardware.py applies (or
# refuses) each of them, and a test holds this set equal to its HW_KEYS.
_OTHER_HW_KEYS = frozenset(
    {
        "hw:cpu_sockets",
        "hw:cpu_cores",
        "hw:cpu_threads",
        "hw:cpu_max_sockets",
        "hw:cpu_max_cores",
        "hw:cpu_max_threads",
        "hw:watchdog_action",
        "hw:boot_menu",
        "hw:serial_port_count",
        "hw:pmu",
        "hw:hide_hypervisor_id",
        "hw:tpm_model",
        "hw:tpm_version",
        "hw:vif_multiqueue_enabled",
        "hw:mem_encryption",
        "hw:machine_type",
        "hw:firmware_type",
        "hw:video_model",
        "hw:viommu_model",
        "hw:locked_memory",
        "hw:virtio_packed_ring",
    }
)
_MAX_PAGE_KIB = 16 * 1024 * 1024  # 16 GiB, the largest page any architecture offers (POWER)
# re.ASCII: ``\d`` alone also matches other scripts' digits, which int() reads.
_PER_NODE_KEY = re.compile(r"^hw:numa_(cpus|mem)\.(\d+)$", re.ASCII)



def constraints(flavor: Mapping[str, Any]) -> NumaRequest | None:
    """The NUMA request Nova 34 makes of ``flavor`` (``{vcpus, memory_mb, extra_specs}``).

    Returns None when nothing asks for a NUMA topology (no ``hw:numa_nodes``, no page size,
    no dedicated or mixed CPU policy): such a guest floats and is counted only in VCPU and
    MEMORY_MB. Raises ``BadRequest`` naming the extra spec (``details.field``) for unknown
    ``hw:`` keys, invalid values and contradictions: vCPUs or memory not divisible by the
    node count, ``hw:numa_cpus.N`` not covering every vCPU exactly once, ``hw:numa_mem.N``
    not adding up to the flavor's memory, a thread or emulator policy without dedicated
    CPUs, a dedicated mask without the mixed policy.
    """
    vcpus = flavor.get("vcpus")
    memory_mb = flavor.get("memory_mb")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus < 1:
        raise BadRequest("flavor vcpus must be a positive integer", details={"field": "vcpus"})
    if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or memory_mb < 1:
        raise BadRequest(
            "flavor memory_mb must be a positive integer", details={"field": "memory_mb"}
        )
    raw: Mapping[str, object] = flavor.get("extra_specs") or {}
    for key, value in raw.items():
        if not key.startswith("hw:"):
            continue
        if key not in _NUMA_KEYS and key not in _OTHER_HW_KEYS and not _PER_NODE_KEY.match(key):
            raise bad(key, "unknown hw: extra spec")
        if not isinstance(value, str):
            raise bad(key, "extra spec values are strings")
    # Every hw: value is a string now; the others are not read here.
    specs = {k: v for k, v in raw.items() if k.startswith("hw:") and isinstance(v, str)}

    cpu_policy: CpuPolicy | None = choice(specs, "hw:cpu_policy", CPU_POLICIES)
    thread_policy: ThreadPolicy | None = choice(specs, "hw:cpu_thread_policy", THREAD_POLICIES)
    emulator_policy: EmulatorPolicy | None = choice(
        specs, "hw:emulator_threads_policy", EMULATOR_POLICIES
    )
    pinned = cpu_policy in ("dedicated", "mixed")
    if thread_policy is not None and not pinned:
        raise bad("hw:cpu_thread_policy", "a thread policy needs hw:cpu_policy dedicated or mixed")
    if emulator_policy == "isolate" and not pinned:
        raise bad(
            "hw:emulator_threads_policy",
            "isolated emulator threads need hw:cpu_policy dedicated or mixed",
        )

    all_cpus = set(range(vcpus))
    dedicated = _dedicated_cpus(specs, cpu_policy, vcpus)
    nodes = _node_count(specs)
    pagesize = _page_size(specs)
    if not (nodes or pagesize or pinned):
        for key in specs:
            if _PER_NODE_KEY.match(key):
                raise bad(key, "per-node specs need hw:numa_nodes")
        return None

    nodes = nodes or 1
    cpu_lists, mem_list = _per_node(specs, nodes, vcpus)
    if cpu_lists is None or mem_list is None:
        cells_cpus, cells_mem = _auto_split(vcpus, memory_mb, nodes)
    else:
        cells_cpus, cells_mem = _manual_split(vcpus, memory_mb, cpu_lists, mem_list)

    shared = all_cpus - dedicated
    return {
        "numa_nodes": nodes,
        "emulator_threads_policy": emulator_policy,
        "cells": [
            {
                "id": node,
                "cpuset": sorted(cpus & shared),
                "pcpuset": sorted(cpus & dedicated),
                "memory": mem,
                "pagesize": pagesize,
                "cpu_policy": cpu_policy,
                "cpu_thread_policy": thread_policy,
            }
            for node, (cpus, mem) in enumerate(zip(cells_cpus, cells_mem, strict=True))
        ],
    }



def parse_cpu_spec(key: str, spec: str, vcpus: int = cpusets.MAX_CPUS) -> set[int]:
    """vCPU ids of a Nova CPU spec such as ``0-3,^2,7``: ranges, singles and exclusions.

    Raises ``BadRequest`` naming ``key`` for malformed text and for ids at or above
    ``vcpus``, checked before any range is expanded.
    """
    try:
        return cpusets.parse(spec, vcpus, what="vCPU")
    except cpusets.CpuOutOfRange as exc:
        raise bad(key, f"vCPU {exc.cpu} is beyond the flavor's {vcpus} vCPUs") from None
    except cpusets.CpuListError as exc:
        raise bad(key, str(exc)) from None


def _dedicated_cpus(specs: Mapping[str, str], cpu_policy: CpuPolicy | None, vcpus: int) -> set[int]:
    key = "hw:cpu_dedicated_mask"
    mask = specs.get(key)
    if cpu_policy == "dedicated":
        if mask is not None:
            raise bad(key, "a dedicated CPU mask needs hw:cpu_policy=mixed")
        return set(range(vcpus))
    if cpu_policy != "mixed":
        if mask is not None:
            raise bad(key, "a dedicated CPU mask needs hw:cpu_policy=mixed")
        return set()
    if mask is None:
        raise bad(key, "hw:cpu_policy=mixed needs a dedicated CPU mask")
    # A mask of exclusions only (^0-1) means "every vCPU but these".
    if mask.strip().startswith("^"):
        dedicated = parse_cpu_spec(key, f"0-{vcpus - 1},{mask}", vcpus)
    else:
        dedicated = parse_cpu_spec(key, mask, vcpus)
    if not dedicated or dedicated == set(range(vcpus)):
        raise bad(key, "a mixed guest needs both dedicated and shared vCPUs")
    return dedicated


def _node_count(specs: Mapping[str, str]) -> int | None:
    key = "hw:numa_nodes"
    value = specs.get(key)
    if value is None:
        return None
    count = parse_uint(value)
    if count is None or count < 1:
        raise bad(key, "must be a positive integer")
    return count


def _page_size(specs: Mapping[str, str]) -> int | None:
    """``small``/``large``/``any`` as -1/-2/-3, a size (``2048``, ``2MB``, ``1GiB``) in KiB."""
    key = "hw:mem_page_size"
    value = specs.get(key)
    if value is None:
        return None
    named = {"small": PAGE_SMALL, "large": PAGE_LARGE, "any": PAGE_ANY}
    if value in named:
        return named[value]
    try:
        size = units.size_kib(value)
    except ValueError:
        raise bad(key, "must be small, large, any or a size such as 2048, 2MB or 1GB") from None
    if size <= 0:
        raise bad(key, "the page size must be positive")
    if size > _MAX_PAGE_KIB:
        # No machine has such pages; the compiled fitter takes sizes as C longs.
        raise bad(key, f"no page size is larger than {_MAX_PAGE_KIB // (1024 * 1024)} GiB")
    return size


def _per_node(
    specs: Mapping[str, str], nodes: int, vcpus: int
) -> tuple[list[set[int]] | None, list[int] | None]:
    cpus: dict[int, set[int]] = {}
    mems: dict[int, int] = {}
    for key, value in specs.items():
        match = _PER_NODE_KEY.match(key)
        if match is None:
            continue
        node = int(match.group(2))
        if node >= nodes:
            raise bad(key, f"the guest has only {nodes} NUMA node(s)")
        if match.group(1) == "cpus":
            cpus[node] = parse_cpu_spec(key, value, vcpus)
            if not cpus[node]:
                raise bad(key, "a guest NUMA node needs at least one vCPU")
        else:
            mib = parse_uint(value)
            if mib is None or mib < 1:
                raise bad(key, "must be a positive number of MiB")
            mems[node] = mib
    if not cpus and not mems:
        return None, None
    for node in range(nodes):
        if node not in cpus:
            raise bad(f"hw:numa_cpus.{node}", "every guest NUMA node needs its CPUs and memory")
        if node not in mems:
            raise bad(f"hw:numa_mem.{node}", "every guest NUMA node needs its CPUs and memory")
    return [cpus[n] for n in range(nodes)], [mems[n] for n in range(nodes)]


def _auto_split(vcpus: int, memory_mb: int, nodes: int) -> tuple[list[set[int]], list[int]]:
    if vcpus % nodes:
        raise bad("hw:numa_nodes", f"{vcpus} vCPUs cannot be split evenly over {nodes} nodes")
    if memory_mb % nodes:
        raise bad(
            "hw:numa_nodes", f"{memory_mb} MiB cannot be split evenly over {nodes} nodes"
        )
    per_cpu, per_mem = vcpus // nodes, memory_mb // nodes
    return [set(range(n * per_cpu, (n + 1) * per_cpu)) for n in range(nodes)], [per_mem] * nodes


def _manual_split(
    vcpus: int, memory_mb: int, cpu_lists: list[set[int]], mem_list: list[int]
) -> tuple[list[set[int]], list[int]]:
    seen: set[int] = set()
    for node, cpus in enumerate(cpu_lists):
        key = f"hw:numa_cpus.{node}"
        if cpus & seen:
            raise bad(key, f"vCPU {min(cpus & seen)} is already on another node")
        seen |= cpus
    if len(seen) != vcpus:
        missing = min(set(range(vcpus)) - seen)
        raise bad("hw:numa_cpus.0", f"vCPU {missing} is on no node")
    if sum(mem_list) != memory_mb:
        raise bad(
            "hw:numa_mem.0",
            f"the nodes' memory adds up to {sum(mem_list)} MiB, not the flavor's {memory_mb}",
        )
    return cpu_lists, mem_list


def compile_host(host: HostUsage, previous: _core.NumaHost | None = None) -> _core.NumaHost:
    """``host`` read once into the compiled fitter's arrays: an immutable snapshot to pass
    to ``fit`` instead of the dict when fitting several requests to the same host state
    (it skips re-reading the dicts, most of a small fit's cost). Build a new one after a
    ``claim`` or ``release``, passing the old one as ``previous``: the cells ``claim`` left
    untouched are then copied from it rather than read again."""
    return _core.NumaHost(host, previous)


def fit(
    host: HostUsage | _core.NumaHost,
    request: NumaRequest,
    limits: Limits | None = None,
) -> Placement | None:
    """Place ``request`` on ``host`` exactly as Nova 34 would, or return None (no fit).

    ``host`` is the host dict or its ``compile_host`` snapshot. ``limits`` is None or
    ``{cpu_allocation_ratio, ram_allocation_ratio}`` (they bound shared guests only). The
    placement is ``{"cells": [{host_cell, pinning: [[vcpu, pcpu], ...], cpuset_reserved:
    None | [pcpu], pagesize: None | KiB}, ...]}`` in guest-cell order. The search is
    polynomial in the number of cells (``docs/NUMA.md``) and runs without the GIL.
    """
    return cast("Placement | None", _core.numa_fit(host, request, limits))


def claim(host: HostUsage, request: NumaRequest, placement: Placement) -> HostUsage:
    """A new host with ``placement`` of ``request`` counted as usage (Nova's
    ``numa_usage_from_instance_numa``): memory, shared vCPUs, pinned and emulator pCPUs
    (whole cores for the isolate thread policy's vCPUs) and the pages of the chosen size
    (the smallest pool's when no size was chosen).

    ``host`` is left as it was; the new host shares its unchanged lists (cpuset, pcpuset,
    siblings), so treat both as read-only. Raises ``Conflict`` if a pCPU to pin is already
    pinned (the placement is stale) or a host cell or page pool is missing.
    """
    return _account(host, request, placement, sign=1)


def release(host: HostUsage, request: NumaRequest, placement: Placement) -> HostUsage:
    """A new host with the usage ``claim`` added for ``placement`` taken away again.

    Raises ``Conflict`` if a pCPU to unpin is not pinned: the placement was never claimed.
    """
    return _account(host, request, placement, sign=-1)


def _account(host: HostUsage, request: NumaRequest, placement: Placement, sign: int) -> HostUsage:
    # Copy only the cells the placement touches (and their page pools): the other cells, and
    # the CPU lists that never change, are shared with the old host; pinned_cpus is replaced,
    # never mutated. On a many-cell host this is most of a claim's cost.
    touched = {placed["host_cell"] for placed in placement["cells"]}
    new: HostUsage = {**host, "cells": [_copy_cell(cell) if cell["id"] in touched else cell
                                        for cell in host["cells"]]}
    cells = {cell["id"]: cell for cell in new["cells"] if cell["id"] in touched}
    guest_cells = request["cells"]
    if len(placement["cells"]) != len(guest_cells):
        raise Conflict("the placement does not match the request's cells")
    for guest, placed in zip(guest_cells, placement["cells"], strict=True):
        cell = cells.get(placed["host_cell"])
        if cell is None:
            raise Conflict(f"host cell {placed['host_cell']} does not exist")
        cell["memory_usage"] += sign * guest["memory"]
        cell["cpu_usage"] += sign * len(guest["cpuset"])
        pagesize = placed.get("pagesize")
        if pagesize:
            pool = next((p for p in cell["mempages"] if p["size_kb"] == pagesize), None)
            if pool is None:
                raise Conflict(f"host cell {cell['id']} has no {pagesize} KiB pages")
            pool["used"] += sign * (guest["memory"] * 1024 // pagesize)
        elif cell["mempages"]:
            # A guest with no page size takes small pages: the fitter holds the next pinned
            # guest to that pool's free pages, not to the cell's memory (Nova 34's accounting).
            pool = min(cell["mempages"], key=lambda p: p["size_kb"])
            pool["used"] += sign * (guest["memory"] * 1024 // pool["size_kb"])
        pcpus = {p for _, p in placed["pinning"]}
        if guest.get("cpu_thread_policy") == "isolate":
            # Isolated guests own their whole cores (the fitter only gives them fully free
            # ones): the siblings can host no one else.
            pcpus = {t for core in cell["siblings"] if pcpus.intersection(core) for t in core}
        # The emulator pCPU is pinned alone: it may sit on a core another guest uses, and
        # pinning its siblings too (as Nova does) would fail that claim.
        pcpus |= set(placed.get("cpuset_reserved") or ())
        pinned = set(cell["pinned_cpus"])
        if sign > 0:
            if pcpus & pinned:
                raise Conflict(
                    f"pCPUs {sorted(pcpus & pinned)} of host cell {cell['id']} are already pinned"
                )
            pinned |= pcpus
        else:
            if not pcpus <= pinned:
                raise Conflict(
                    f"pCPUs {sorted(pcpus - pinned)} of host cell {cell['id']} are not pinned"
                )
            pinned -= pcpus
        cell["pinned_cpus"] = sorted(pinned)
    return new


def _copy_cell(cell: HostCellUsage) -> HostCellUsage:
    return {**cell, "mempages": [p.copy() for p in cell["mempages"]]}
