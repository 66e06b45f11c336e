"""Host facts from libvirt: its capabilities XML and ``getInfo``, as :class:`HostFacts`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from fastcompute.hypervisor.spec import HostCell, HostFacts, HostFeatures, HypervisorInfo, PagePool
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


def machines(capabilities_xml: str, arch: str = "x86_64") -> list[str]:
    """The machine types (names and their canonical versioned names) libvirt offers for
    ``arch`` hvm guests, sorted."""
    root = ET.fromstring(capabilities_xml)
    names: set[str] = set()
    for guest in root.findall("./guest"):
        if guest.findtext("os_type") != "hvm" or guest.find(f"./arch[@name='{arch}']") is None:
            continue
        for m in guest.findall(f"./arch[@name='{arch}']//machine"):
            names.update(n for n in (m.text, m.get("canonical")) if n)
    return sorted(names)


def _enum(root: ET.Element, path: str, name: str) -> list[str]:
    return [v.text or "" for v in root.findall(f"{path}/enum[@name='{name}']/value")]


def host_features(pc_domcaps: str, q35_domcaps: str | None, capabilities_xml: str) -> HostFeatures:
    """What guests can have beyond CPUs and memory, from libvirt's domain capabilities for the
    default (i440fx) and the q35 machine (secure-boot OVMF runs only on q35) and its host
    capabilities (the machine types). A TPM without a version list is taken to do both, as
    swtpm does."""
    pc = ET.fromstring(pc_domcaps)
    q35 = ET.fromstring(q35_domcaps) if q35_domcaps is not None else None
    tpm = pc.find("./devices/tpm")
    emulated = tpm is not None and tpm.get("supported") == "yes" and "emulator" in _enum(pc, "./devices/tpm",
                                                                                          "backendModel")
    return HostFeatures(
        machines=machines(capabilities_xml),
        uefi="efi" in _enum(pc, "./os", "firmware"),
        secure_boot=q35 is not None and "yes" in _enum(q35, "./os/loader", "secure"),
        tpm_versions=(_enum(pc, "./devices/tpm", "backendVersion") or ["1.2", "2.0"]) if emulated else [],
        tpm_models=_enum(pc, "./devices/tpm", "model") if emulated else [],
    )


def host_facts(capabilities_xml: str, info: list[Any], hypervisor: HypervisorInfo) -> HostFacts:
    """Everything :class:`HostFacts` holds, from what libvirt said."""
    return HostFacts(topology(capabilities_xml, info), cpu_features(capabilities_xml), hypervisor)
