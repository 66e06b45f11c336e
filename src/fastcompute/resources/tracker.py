"""The host's resources: its topology, inventories in Placement's classes, claims and quotas.

A claim is taken synchronously on the event loop thread, with no await between the check and
the reservation, so concurrent spawns can never both take the last unit of anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from fastcompute import _core
from fastcompute.config import QuotaConfig, ResourcesConfig
from fastcompute.errors import NoCapacity, QuotaExceeded
from fastcompute.hypervisor.spec import HostCell
from fastcompute.hypervisor.spec import PagePool as PagePool  # re-exported: the host's cells are the driver's facts
from fastcompute.protocol.schema import Inventory as Inventory  # re-exported: Placement's fields, as on the wire
from fastcompute.protocol.schema import Topology
from fastcompute.resources import cpusets, numa, units
from fastcompute.resources.classes import RESOURCE_CLASSES, ResourceClass
from fastcompute.resources.numa_types import HostUsage, Limits, NumaRequest, PagePoolUsage, Placement


class Claim(msgspec.Struct, kw_only=True):
    """What one instance holds of the host: amounts per resource class and its NUMA placement."""

    project_id: str
    resources: dict[ResourceClass, int]
    vcpus: int
    memory_mb: int
    numa_request: NumaRequest | None = None
    numa_placement: Placement | None = None


def parse_reserved_huge_pages(specs: list[str]) -> dict[tuple[int, int], int]:
    """Nova's ``reserved_huge_pages`` entries as {(node, size_kb): count}."""
    out: dict[tuple[int, int], int] = {}
    for spec in specs:
        try:
            fields = dict(part.split(":", 1) for part in spec.replace(" ", "").split(","))
            kib = units.size_kib(fields["size"])
            out[(int(fields["node"]), kib)] = int(fields["count"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"[resources] reserved_huge_pages: {spec!r} is not 'node:N,size:S,count:C'") from exc
    return out


def _numa_host(cells: list[HostCell], shared: set[int], dedicated: set[int],
               reserved_pages: dict[tuple[int, int], int]) -> HostUsage:
    """The host in the NUMA fitter's shape (``numa.fit``), with nothing used yet."""
    return {"cells": [
        {
            "id": c.id,
            "cpuset": sorted(shared.intersection(c.cpus)),
            "pcpuset": sorted(dedicated.intersection(c.cpus)),
            "siblings": c.siblings,
            "memory": c.memory_mb,
            "memory_usage": 0,
            "cpu_usage": 0,
            "pinned_cpus": [],
            "socket": c.id,
            "mempages": [PagePoolUsage(size_kb=p.size_kb, total=p.total, used=0,
                                       reserved=reserved_pages.get((c.id, p.size_kb), 0))
                         for p in sorted(c.pages, key=lambda p: p.size_kb)],
        }
        for c in cells
    ]}


def cpu_traits(features: Iterable[str]) -> list[str]:
    """Placement traits for the host CPU's feature names (``HW_CPU_X86_*``)."""
    return sorted({"HW_CPU_X86_" + n.upper().replace(".", "_").replace("-", "_") for n in features if n})


class Tracker:
    """Inventories, usage, claims and quotas of one host."""

    def __init__(
        self,
        cells: list[HostCell],
        cfg: ResourcesConfig,
        quota: QuotaConfig,
        state_dir: Path,
    ) -> None:
        self.cells = cells
        self.cfg = cfg
        self.quota = quota
        all_cpus = {c for cell in cells for c in cell.cpus}
        try:
            dedicated = cpusets.parse(cfg.cpu_dedicated_set) & all_cpus
            shared = cpusets.parse(cfg.cpu_shared_set) & all_cpus if cfg.cpu_shared_set else all_cpus - dedicated
        except cpusets.CpuListError as exc:
            raise ValueError(f"[resources] {exc}") from None
        # The host CPUs of unpinned vCPUs and of pinned ones, for the guests' CPU sets.
        self.shared_cpus, self.dedicated_cpus = sorted(shared), sorted(dedicated)
        memory_mb = sum(c.memory_mb for c in cells)
        if cfg.disk_gb:
            disk_gb = cfg.disk_gb
        else:
            st = os.statvfs(state_dir)
            disk_gb = st.f_blocks * st.f_frsize // (1024**3)
        self.inventory: dict[ResourceClass, Inventory] = {}
        self._add("VCPU", len(shared), cfg.reserved_host_cpus, cfg.cpu_allocation_ratio)
        self._add("PCPU", len(dedicated), 0, 1.0)
        self._add("MEMORY_MB", memory_mb, cfg.reserved_host_memory_mb, cfg.ram_allocation_ratio)
        self._add("DISK_GB", disk_gb, math.ceil(cfg.reserved_host_disk_mb / 1024), cfg.disk_allocation_ratio)
        self.numa_host = _numa_host(cells, shared, dedicated, parse_reserved_huge_pages(cfg.reserved_huge_pages))
        # The fitter's compiled copy of numa_host, rebuilt (from the last one) when it is stale.
        self._compiled: _core.NumaHost | None = None
        self._compiled_for: HostUsage | None = None
        self.usage: dict[ResourceClass, int] = dict.fromkeys(RESOURCE_CLASSES, 0)
        self.claims: dict[str, Claim] = {}
        # per project: (instances, vcpus, memory_mb) held, kept up to date for quota checks
        self._projects: dict[str, tuple[int, int, int]] = {}
        self.generation = 0

    def _add(self, rc: ResourceClass, total: int, reserved: int, ratio: float) -> None:
        self.inventory[rc] = Inventory(total=total, reserved=reserved, allocation_ratio=ratio,
                                       min_unit=1, max_unit=max(total, 1), step_size=1)

    def capacity(self, rc: ResourceClass) -> int:
        """How much of a resource class may be allocated in all."""
        inv = self.inventory[rc]
        return int((inv["total"] - inv["reserved"]) * inv["allocation_ratio"])

    @staticmethod
    def request_of(vcpus: int, memory_mb: int, disk_gb: int, numa_request: NumaRequest | None
                   ) -> dict[ResourceClass, int]:
        """The amounts per resource class a flavor asks for: pinned vCPUs are PCPU."""
        pinned = sum(len(c["pcpuset"]) for c in numa_request["cells"]) if numa_request else 0
        # An isolated emulator thread takes one more dedicated pCPU, as Nova reports to Placement.
        emulator = 1 if numa_request and numa_request.get("emulator_threads_policy") == "isolate" else 0
        return {"VCPU": vcpus - pinned, "PCPU": pinned + emulator, "MEMORY_MB": memory_mb, "DISK_GB": disk_gb}

    def check_quota(self, project_id: str, vcpus: int, memory_mb: int) -> None:
        """Raise QuotaExceeded when one more such instance would exceed the project's quota."""
        count, cores, ram = self._projects.get(project_id, (0, 0, 0))
        checks = (
            ("instances", self.quota.instances, count + 1),
            ("cores", self.quota.cores, cores + vcpus),
            ("ram_mb", self.quota.ram_mb, ram + memory_mb),
        )
        for name, limit, wanted in checks:
            if limit >= 0 and wanted > limit:
                raise QuotaExceeded(
                    f"project {project_id} would have {wanted} {name}, over its quota of {limit}",
                    {"resource": name, "limit": limit, "requested": wanted},
                )

    def claim(self, uuid: str, project_id: str, vcpus: int, memory_mb: int, disk_gb: int,
              numa_request: NumaRequest | None = None) -> Claim:
        """Reserve everything an instance needs, or nothing (NoCapacity / QuotaExceeded).

        ``numa_request`` (from ``numa.constraints``) asks for a NUMA placement: host cells,
        pinned pCPUs and huge pages are then taken together with the amounts, atomically.
        """
        wanted = self.request_of(vcpus, memory_mb, disk_gb, numa_request)
        self.check_quota(project_id, vcpus, memory_mb)
        for rc, amount in wanted.items():
            # Placement refuses an allocation above an inventory's max_unit (one instance may
            # not have more VCPU than the host has CPUs, however high the ratio), so does this.
            max_unit = self.inventory[rc]["max_unit"]
            if amount > max_unit:
                raise NoCapacity(
                    f"{amount} {rc} requested, more than one instance may have on this host ({max_unit})",
                    {"resource_class": rc, "requested": amount, "max_unit": max_unit},
                )
            if amount and self.usage[rc] + amount > self.capacity(rc):
                free = self.capacity(rc) - self.usage[rc]
                raise NoCapacity(
                    f"not enough {rc} on this host: {amount} requested, {free} free",
                    {"resource_class": rc, "requested": amount, "free": free},
                )
        placement = None
        if numa_request is not None:
            limits = Limits(cpu_allocation_ratio=self.cfg.cpu_allocation_ratio,
                            ram_allocation_ratio=self.cfg.ram_allocation_ratio)
            if self._compiled_for is not self.numa_host:
                self._compiled = numa.compile_host(self.numa_host, self._compiled)
                self._compiled_for = self.numa_host
            assert self._compiled is not None
            placement = numa.fit(self._compiled, numa_request, limits)
            if placement is None:
                raise NoCapacity(
                    "no NUMA placement on this host fits the flavor's topology, pinning or page size",
                    {"resource_class": "NUMA", "numa_nodes": numa_request["numa_nodes"]},
                )
        claim = Claim(project_id=project_id, resources={k: v for k, v in wanted.items() if v},
                      vcpus=vcpus, memory_mb=memory_mb, numa_request=numa_request,
                      numa_placement=placement)
        self.restore(uuid, claim)
        return claim

    def restore(self, uuid: str, claim: Claim) -> None:
        """Take a claim as it is (from the store at start-up, or a fresh one).

        Raises Conflict when its NUMA placement no longer fits (a pCPU already pinned).
        """
        if claim.numa_request is not None and claim.numa_placement is not None:
            self.numa_host = numa.claim(self.numa_host, claim.numa_request, claim.numa_placement)
        self.claims[uuid] = claim
        for rc, amount in claim.resources.items():
            self.usage[rc] = self.usage.get(rc, 0) + amount
        self._account(claim, 1)
        self.generation += 1

    def release(self, uuid: str) -> None:
        """Give back exactly what an instance claimed; a no-op when it holds nothing."""
        claim = self.claims.pop(uuid, None)
        if claim is None:
            return
        if claim.numa_request is not None and claim.numa_placement is not None:
            self.numa_host = numa.release(self.numa_host, claim.numa_request, claim.numa_placement)
        for rc, amount in claim.resources.items():
            self.usage[rc] -= amount
        self._account(claim, -1)
        self.generation += 1

    def _account(self, claim: Claim, sign: int) -> None:
        count, cores, ram = self._projects.get(claim.project_id, (0, 0, 0))
        self._projects[claim.project_id] = (count + sign, cores + sign * claim.vcpus, ram + sign * claim.memory_mb)

    def topology(self) -> Topology:
        """The topology as host.info reports it."""
        return Topology(self.cells)
