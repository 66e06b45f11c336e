"""The NUMA domain's shapes: a guest's request, its placement, a host's cells and usage.

They are ``TypedDict``s, not classes: the compiled fitter (``_core``) reads them by key as
plain dicts and lists, and a host snapshot is rebuilt cheaply after a claim only because the
unchanged cells' lists are the very same objects (``numa.compile_host``). A ``TypedDict`` is
that dict at no cost, and ``mypy --strict`` checks every key and value of it. The shapes are
those of the conformance corpus (``tests/data/numa-corpus.jsonl``, ``docs/NUMA.md``): memory
in MiB, page sizes in KiB, CPU ids as sorted lists.
"""

from __future__ import annotations

from typing import Literal, TypedDict

CpuPolicy = Literal["shared", "dedicated", "mixed"]
ThreadPolicy = Literal["prefer", "isolate", "require"]
EmulatorPolicy = Literal["share", "isolate"]


class GuestCell(TypedDict):
    """One guest NUMA cell a flavor asks for."""

    id: int
    cpuset: list[int]
    """The cell's shared (floating) vCPUs."""
    pcpuset: list[int]
    """The cell's dedicated (pinned) vCPUs."""
    memory: int
    pagesize: int | None
    """None, a size in KiB, or ``numa.PAGE_SMALL``/``PAGE_LARGE``/``PAGE_ANY``."""
    cpu_policy: CpuPolicy | None
    cpu_thread_policy: ThreadPolicy | None


class NumaRequest(TypedDict):
    """What ``numa.constraints`` makes of a flavor: its guest cells in order."""

    numa_nodes: int
    emulator_threads_policy: EmulatorPolicy | None
    cells: list[GuestCell]


class PlacedCell(TypedDict):
    """Where one guest cell went: its host cell, vCPU-to-pCPU pins, emulator pCPUs, page size."""

    host_cell: int
    pinning: list[list[int]]
    """``[vcpu, pcpu]`` pairs, empty for a shared cell."""
    cpuset_reserved: list[int] | None
    pagesize: int | None


class Placement(TypedDict):
    """A request's placement on a host (``numa.fit``), in guest-cell order."""

    cells: list[PlacedCell]


class PagePoolUsage(TypedDict):
    """One page size's pool on a host cell, with what is used and kept for the host."""

    size_kb: int
    total: int
    used: int
    reserved: int


class HostCellUsage(TypedDict):
    """A host NUMA cell as the fitter sees it: its CPUs and memory and what guests use."""

    id: int
    cpuset: list[int]
    pcpuset: list[int]
    siblings: list[list[int]]
    memory: int
    memory_usage: int
    cpu_usage: int
    pinned_cpus: list[int]
    socket: int
    mempages: list[PagePoolUsage]


class HostUsage(TypedDict):
    """A host's NUMA cells and their usage: what ``numa.fit`` places requests on."""

    cells: list[HostCellUsage]


class Limits(TypedDict):
    """Over-subscription limits that bound shared guests."""

    cpu_allocation_ratio: float
    ram_allocation_ratio: float
