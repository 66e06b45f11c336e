"""The domain XML for an instance: what libvirt is asked to run, built from plain data."""

from __future__ import annotations

from xml.sax.saxutils import escape

import msgspec

NAMESPACE = "http://fastcompute.org/xmlns/instance/1.0"
PREFIX = "fastcompute"


class DiskSpec(msgspec.Struct, frozen=True):
    """The instance's root disk."""

    path: str
    format: str = "raw"


class Interface(msgspec.Struct, frozen=True):
    """A port's tap, made and plugged by the network module before the domain starts."""

    tap: str
    mac: str
    mtu: int


class GuestCell(msgspec.Struct, frozen=True):
    """A guest NUMA cell and where it lives on the host."""

    id: int
    cpus: list[int]
    memory_mb: int
    host_cell: int
    pagesize_kb: int | None = None


class DomainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the XML needs about one instance."""

    uuid: str
    name: str
    instance_name: str
    project_id: str
    vcpus: int
    memory_mb: int
    disk: DiskSpec | None
    console_path: str
    domain_type: str = "test"
    arch: str = "x86_64"
    interfaces: list[Interface] = []
    numa: list[GuestCell] = []
    vcpupin: dict[int, list[int]] = {}
    emulatorpin: list[int] = []
    cputune: dict[str, int] = {}
    iotune: dict[str, int] = {}
    oem_strings: list[str] = []


def cpulist(cpus: list[int]) -> str:
    """A CPU list as libvirt writes it (``0-3,8``)."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def domain_name(uuid: str) -> str:
    """libvirt's name of an instance's domain."""
    return "fc-" + uuid


def _a(value: object) -> str:
    """Escape text for an XML attribute or element."""
    return escape(str(value), _QUOTES)


_QUOTES = {'"': "&quot;", "'": "&apos;"}


def build(spec: DomainSpec) -> str:
    """The domain XML of an instance.

    Built as text from escaped parts rather than with ElementTree: in a boot storm the XML of
    every instance is built on the event loop, and this is several times cheaper.
    """
    parts = [
        f"<domain type='{_a(spec.domain_type)}'>",
        f"<name>{_a(domain_name(spec.uuid))}</name><uuid>{_a(spec.uuid)}</uuid>",
        f"<metadata><{PREFIX}:instance xmlns:{PREFIX}='{NAMESPACE}'>"
        f"<{PREFIX}:name>{_a(spec.instance_name)}</{PREFIX}:name>"
        f"<{PREFIX}:project>{_a(spec.project_id)}</{PREFIX}:project>"
        f"</{PREFIX}:instance></metadata>",
        f"<memory unit='MiB'>{int(spec.memory_mb)}</memory><vcpu>{int(spec.vcpus)}</vcpu>",
        *_tuning(spec),
        *_sysinfo(spec.oem_strings),
        f"<os><type arch='{_a(spec.arch)}'>hvm</type><boot dev='hd'/>"
        + ("<smbios mode='sysinfo'/>" if spec.oem_strings else "") + "</os>",
        "<features><acpi/></features>",
        # The power-state logic reads a powered-off or crashed guest from its domain state, so
        # the domain must stop (not restart) on both; a guest-initiated reboot restarts in place.
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>",
        "<devices>",
    ]
    if spec.disk is not None:
        parts.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{_a(spec.disk.format)}'/>"
            f"<source file='{_a(spec.disk.path)}'/><target dev='vda' bus='virtio'/>"
            + _iotune(spec.iotune) + "</disk>"
        )
    parts.extend(interface_xml(i) for i in spec.interfaces)
    console = _a(spec.console_path)
    # append: a new QEMU process (start after stop, restore after suspend) must not wipe the
    # console history that instance.console returns.
    parts.append(
        f"<serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>"
        f"<console type='file'><source path='{console}' append='on'/><target type='serial' port='0'/></console>"
    )
    if spec.domain_type in ("qemu", "kvm"):
        # No USB bus and no balloon: nothing in a cloud guest uses them, and they cost boot time.
        parts.append("<controller type='usb' model='none'/><memballoon model='none'/>")
    parts.append("</devices></domain>")
    return "".join(parts)


# quota:* extra specs -> the cputune and iotune elements they set (Nova's libvirt driver does
# the same mapping).
_CPUTUNE = (("cpu_shares", "shares"), ("cpu_period", "period"), ("cpu_quota", "quota"))
_IOTUNE = ("read_bytes_sec", "write_bytes_sec", "read_iops_sec", "write_iops_sec")


def _tuning(spec: DomainSpec) -> list[str]:
    parts: list[str] = []
    pagesizes = [(c.id, c.pagesize_kb) for c in spec.numa if c.pagesize_kb and c.pagesize_kb > 4]
    if pagesizes:
        parts.append("<memoryBacking><hugepages>" + "".join(
            f"<page size='{int(size)}' unit='KiB' nodeset='{int(cell)}'/>" for cell, size in pagesizes
        ) + "</hugepages></memoryBacking>")
    tune = [f"<{tag}>{int(spec.cputune[key])}</{tag}>" for key, tag in _CPUTUNE if key in spec.cputune]
    pins = [f"<vcpupin vcpu='{int(v)}' cpuset='{cpulist(p)}'/>" for v, p in sorted(spec.vcpupin.items())]
    if spec.emulatorpin:
        pins.append(f"<emulatorpin cpuset='{cpulist(spec.emulatorpin)}'/>")
    if tune or pins:
        parts.append("<cputune>" + "".join(tune + pins) + "</cputune>")
    if spec.numa:
        nodes = cpulist([c.host_cell for c in spec.numa])
        parts.append(f"<numatune><memory mode='strict' nodeset='{nodes}'/>" + "".join(
            f"<memnode cellid='{c.id}' mode='strict' nodeset='{c.host_cell}'/>" for c in spec.numa
        ) + "</numatune>")
        parts.append("<cpu><numa>" + "".join(
            f"<cell id='{c.id}' cpus='{cpulist(c.cpus)}' memory='{int(c.memory_mb)}' unit='MiB'/>"
            for c in spec.numa
        ) + "</numa></cpu>")
    return parts


def _sysinfo(entries: list[str]) -> list[str]:
    # SMBIOS type 11 strings: settings a guest reads from its firmware tables, no image change
    # and no metadata service needed.
    if not entries:
        return []
    return ["<sysinfo type='smbios'><oemStrings>" + "".join(f"<entry>{_a(e)}</entry>" for e in entries)
            + "</oemStrings></sysinfo>"]


def _iotune(limits: dict[str, int]) -> str:
    inner = "".join(f"<{k}>{int(limits[k])}</{k}>" for k in _IOTUNE if k in limits)
    return f"<iotune>{inner}</iotune>" if inner else ""


def interface_xml(iface: Interface) -> str:
    """An ``<interface type='ethernet'>`` on a tap the agent made (libvirt must not manage it)."""
    return (
        f"<interface type='ethernet'><mac address='{_a(iface.mac)}'/>"
        f"<target dev='{_a(iface.tap)}' managed='no'/><model type='virtio'/>"
        f"<mtu size='{int(iface.mtu)}'/></interface>"
    )
