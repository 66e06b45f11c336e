"""Host facts from libvirt: its capabilities XML and ``getInfo``, as :class:`HostFacts`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from fastcompute.hypervisor.spec import HostCell, HostFacts, HypervisorInfo, PagePool
from fastcompute.resources import cpusets, units


def topology(capabilities_xml: str, info: list[Any]) -> list[HostCell]:
    """The host's NUMA cells from libvirt's capabilities, or an even split of ``getInfo``.

    libvirt's test driver lists no cells for a custom node file; there (as on any host that
    reports none) the cells are derived from getInfo's nodes, sockets, cores and threads.
    """
    root = ET.fromstring(capabilities_xml)
    cells: list[HostCell] = []
    for cell in root.findall("./host/topology/cells/cell"):
        cpus = sorted(int(c.get("id", "0")) for c in cell.findall("./cpus/cpu"))
        siblings: list[list[int]] = []
        seen: set[int] = set()
        for c in cell.findall("./cpus/cpu"):
            group = sorted(cpusets.parse(c.get("siblings") or c.get("id") or "0"))
            if group[0] not in seen:
                seen.update(group)
                siblings.append(group)
        mem = cell.find("./memory")
        mem_kib = int(mem.text or "0") if mem is not None else 0
        if mem is not None and mem.get("unit", "KiB") != "KiB":
            mem_kib = units.to_kib(mem_kib, mem.get("unit", "KiB"))
        pages = [
            PagePool(int(p.get("size", "4")), int(p.text or "0"))
            for p in cell.findall("./pages")
        ]
        cells.append(HostCell(int(cell.get("id", "0")), cpus, siblings, mem_kib // 1024, pages))
    if cells:
        return cells
    _model, memory_mib, ncpus, _mhz, nodes, _sockets, _cores, threads = info[:8]
    nodes = max(1, int(nodes))
    per_cell = int(ncpus) // nodes
    threads = max(1, int(threads))
    out = []
    for n in range(nodes):
        cpus = list(range(n * per_cell, (n + 1) * per_cell))
        sibs = [cpus[i : i + threads] for i in range(0, len(cpus), threads)]
        cell_mb = int(memory_mib) // nodes
        out.append(HostCell(n, cpus, sibs, cell_mb, [PagePool(4, cell_mb * 256)]))
    return out


def cpu_features(capabilities_xml: str) -> list[str]:
    """The host CPU's feature names (``avx2``, ``sse4.2``), sorted."""
    root = ET.fromstring(capabilities_xml)
    names = {f.get("name", "") for f in root.findall("./host/cpu/feature")}
    names |= {f.tag for f in root.findall("./host/cpu/features/*")}
    return sorted(n for n in names if n)


def cpu_modes(domain_capabilities_xml: str) -> dict[str, bool]:
    """The guest CPU modes of libvirt's domain capabilities: {mode name: supported}."""
    root = ET.fromstring(domain_capabilities_xml)
    return {m.get("name", ""): m.get("supported") == "yes" for m in root.findall("./cpu/mode")}


def host_facts(capabilities_xml: str, info: list[Any], hypervisor: HypervisorInfo) -> HostFacts:
    """Everything :class:`HostFacts` holds, from what libvirt said."""
    return HostFacts(topology(capabilities_xml, info), cpu_features(capabilities_xml), hypervisor)
