"""The :class:`GuestSpec` of an instance: its record, its claim's NUMA placement, its ports
and its disks, described for the hypervisor driver."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from fastcompute.compute.cpu import HostCpu, guest_features
from fastcompute.compute.hardware import Hardware, cell_cpus, hardware
from fastcompute.config import ConsoleConfig
from fastcompute.errors import BadRequest
from fastcompute.hypervisor.spec import Disk, Graphics, GuestCell, GuestSpec, Interface, Limits
from fastcompute.network.shaping import Shaping
from fastcompute.protocol import InstanceRecord
from fastcompute.protocol.ports import Port
from fastcompute.resources.numa_types import HostUsage
from fastcompute.resources.tracker import Claim

if TYPE_CHECKING:
    from fastcompute.compute.records import Stored

QUOTA_LIMITS: dict[str, str] = {
    "quota:cpu_shares": "cpu_shares",
    "quota:cpu_period": "cpu_period",
    "quota:cpu_quota": "cpu_quota",
    "quota:disk_read_bytes_sec": "disk_read_bytes_sec",
    "quota:disk_write_bytes_sec": "disk_write_bytes_sec",
    "quota:disk_read_iops_sec": "disk_read_iops_sec",
    "quota:disk_write_iops_sec": "disk_write_iops_sec",
    "quota:disk_total_bytes_sec": "disk_total_bytes_sec",
    "quota:disk_total_iops_sec": "disk_total_iops_sec",
}
"""A flavor's ``quota:*`` extra spec -> the :class:`Limits` field it sets."""
VIF_SHAPING: dict[str, str] = {
    "quota:vif_inbound_average": "inbound_average",
    "quota:vif_inbound_peak": "inbound_peak",
    "quota:vif_inbound_burst": "inbound_burst",
    "quota:vif_outbound_average": "outbound_average",
    "quota:vif_outbound_peak": "outbound_peak",
    "quota:vif_outbound_burst": "outbound_burst",
}
"""A flavor's ``quota:vif_*`` extra spec -> the :class:`Shaping` field of its ports it sets."""

log = logging.getLogger("fastcompute.guest")


def limits(extra_specs: dict[str, str]) -> Limits:
    """The limits a flavor's (validated) ``quota:*`` extra specs set."""
    return Limits(**{QUOTA_LIMITS[k]: int(v) for k, v in extra_specs.items() if k in QUOTA_LIMITS})


def port_shaping(stored: Stored | None) -> Shaping | None:
    """The bandwidth limits of an instance's ports (its flavor's ``quota:vif_*``); None
    when it has none (or is not known)."""
    if stored is None:
        return None
    specs = stored.record.flavor.extra_specs
    return Shaping(**{VIF_SHAPING[k]: int(v) for k, v in specs.items() if k in VIF_SHAPING}) or None


def address_hints(ports: list[Port]) -> list[str]:
    """``fc.ip=ADDR/PREFIX`` for the first port's first IPv4 address: how a guest without DHCP
    (the project's test image, for one) learns the address its port's rules let through."""
    for port in ports[:1]:
        for fixed in port.fixed_ips:
            if ipaddress.ip_address(fixed.ip).version == 4:
                return [f"fc.ip={fixed.ip}/{fixed.prefix}"]
    return []


def _placement(claim: Claim | None, numa_host: HostUsage | None, host_cpu: HostCpu | None
               ) -> tuple[list[GuestCell], list[int], dict[int, list[int]], list[int]]:
    """The guest NUMA cells, the floating vCPUs' host CPUs, the vCPU pins and the emulator
    pins a claim's placement decided, as Nova's libvirt driver places them."""
    shared = host_cpu.shared if host_cpu is not None else []
    if claim is None or claim.numa_request is None or claim.numa_placement is None or numa_host is None:
        # A floating guest, vCPUs and emulator threads alike, stays on the shared CPUs.
        return [], shared, {}, shared
    host_cells = {c["id"]: c for c in numa_host["cells"]}
    cells: list[GuestCell] = []
    vcpupin: dict[int, list[int]] = {}
    for i, (want, got) in enumerate(zip(claim.numa_request["cells"], claim.numa_placement["cells"], strict=True)):
        cells.append(GuestCell(i, sorted(want["cpuset"] + want["pcpuset"]), want["memory"], got["host_cell"],
                               got.get("pagesize")))
        for vcpu, pcpu in got["pinning"]:
            vcpupin[vcpu] = [pcpu]
        for vcpu in want["cpuset"]:
            vcpupin[vcpu] = list(host_cells[got["host_cell"]]["cpuset"])
    # Emulator threads: on the pCPU reserved for them (isolate); on cpu_shared_set when the
    # flavor says share and the operator set one; else across the guest's own CPUs.
    policy = claim.numa_request.get("emulator_threads_policy")
    reserved = [p for got in claim.numa_placement["cells"] for p in (got.get("cpuset_reserved") or [])]
    if policy == "isolate" and reserved:
        emulator = reserved
    elif policy == "share" and host_cpu is not None and host_cpu.shared_configured and shared:
        emulator = shared
    else:
        emulator = sorted({p for pins in vcpupin.values() for p in pins})
    return cells, [], vcpupin, emulator


def _as_made(specs: dict[str, str], vcpus: int) -> Hardware:
    """The machine and devices of a guest whose flavor a spawn would now refuse: its topology
    chosen without its NUMA cells, or, for a key now refused, the defaults."""
    try:
        return hardware(specs, vcpus)
    except BadRequest:
        return Hardware()


def consoles(uuid: str, cfg: ConsoleConfig | None) -> tuple[str | None, list[Graphics]]:
    """The serial console's socket and the graphics servers of a guest (none with consoles off)."""
    if cfg is None or not cfg.enabled:
        return None, []
    graphics = [Graphics("vnc", cfg.address)] + ([Graphics("spice", cfg.address)] if cfg.spice else [])
    return str(Path(cfg.socket_dir) / f"{uuid}.sock"), graphics


def guest_spec(
    rec: InstanceRecord,
    ports: list[Port],
    instance_dir: Path,
    *,
    disks: list[Disk],
    interfaces: list[Interface],
    claim: Claim | None,
    numa_host: HostUsage | None,
    virt_type: str,
    host_cpu: HostCpu | None = None,
    console: ConsoleConfig | None = None,
) -> GuestSpec:
    """The guest an instance is: ``interfaces`` its plugged ports' taps, ``claim`` what it
    holds of the host (``numa_host`` the host's cells), ``virt_type`` the driver's choice,
    ``host_cpu`` the host's shared CPUs and guest CPU (None: no CPU sets, the hypervisor's
    default CPU), ``console`` the host's console settings (None: a serial log only)."""
    cells, cpuset, vcpupin, emulatorpin = _placement(claim, numa_host, host_cpu)
    specs = rec.flavor.extra_specs
    try:
        hw = hardware(specs, rec.flavor.vcpus, cell_cpus(claim.numa_request if claim is not None else None))
    except BadRequest as exc:
        # Only an instance stored by an agent that accepted and dropped this key, or that gave
        # it a topology splitting a core across its NUMA cells, gets here (a spawn is
        # validated first): it keeps running as it was made.
        log.warning("instance %s: %s; its guest is described as it was made", rec.uuid, exc.message)
        hw = _as_made(specs, rec.flavor.vcpus)
    if hw.machine is not None and "q35" in hw.machine:
        # q35 has no IDE bus: its CD-ROMs (the config drive) hang off the AHCI controller.
        disks = [msgspec.structs.replace(d, bus="sata") if d.bus == "ide" else d for d in disks]
    console_socket, graphics = consoles(rec.uuid, console)
    return GuestSpec(
        uuid=rec.uuid,
        name=rec.name,
        project_id=rec.project_id,
        vcpus=rec.flavor.vcpus,
        memory_mb=rec.flavor.memory_mb,
        console_path=str(instance_dir / "console.log"),
        console_socket=console_socket,
        graphics=graphics,
        disks=disks,
        interfaces=interfaces,
        cells=cells,
        cpuset=cpuset,
        vcpupin=vcpupin,
        emulatorpin=emulatorpin,
        limits=limits(specs),
        oem_strings=address_hints(ports),
        virt_type=virt_type,
        cpu_mode=host_cpu.mode if host_cpu is not None else None,
        cpu_model=host_cpu.model if host_cpu is not None else None,
        cpu_features=guest_features(specs, host_cpu) if host_cpu is not None else [],
        topology=hw.topology,
        machine=hw.machine,
        firmware=hw.firmware,
        secure_boot=hw.secure_boot,
        tpm=hw.tpm,
        watchdog=hw.watchdog,
        rng=hw.rng,
        video=hw.video,
        serial_ports=hw.serial_ports,
        boot_menu=hw.boot_menu,
        pmu=hw.pmu,
        hide_hypervisor=hw.hide_hypervisor,
        locked_memory=hw.locked_memory,
        packed_ring=hw.packed_ring,
    )
