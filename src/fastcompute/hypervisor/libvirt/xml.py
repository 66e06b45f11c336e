"""The domain XML of a guest: a :class:`GuestSpec` rendered as libvirt wants it."""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from xml.sax.saxutils import escape

from fastcompute.hypervisor import targets
from fastcompute.hypervisor.libvirt.names import domain_name
from fastcompute.hypervisor.spec import Disk, GuestSpec, Interface, Limits

NAMESPACE = "http://fastcompute.org/xmlns/instance/1.0"
PREFIX = "fastcompute"
USER_ALIAS = "ua-"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
"""The virtio-serial port name QEMU guest agents open (and libvirt looks for)."""


def cpulist(cpus: Iterable[int]) -> str:
    """A CPU list as libvirt writes it (``0-3,8``)."""
    return _cpulist(tuple(cpus))


# Every floating guest of a host carries the same shared set: rendered once, not per spawn.
@functools.lru_cache(maxsize=4096)
def _cpulist(cpus: tuple[int, ...]) -> str:
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


def _a(value: object) -> str:
    """Escape text for an XML attribute or element."""
    return escape(str(value), _QUOTES)


_QUOTES = {'"': "&quot;", "'": "&apos;"}


def build(spec: GuestSpec) -> str:
    """The domain XML of a guest.

    Built as text from escaped parts rather than with ElementTree: in a boot storm the XML of
    every instance is built on the event loop, and this is several times cheaper.
    """
    per_device_boot = any(d.boot_order is not None for d in spec.disks)
    machine = f" machine='{_a(spec.machine)}'" if spec.machine else ""
    parts = [
        f"<domain type='{_a(spec.virt_type)}'>",
        f"<name>{_a(domain_name(spec.uuid))}</name><uuid>{_a(spec.uuid)}</uuid>",
        f"<metadata><{PREFIX}:instance xmlns:{PREFIX}='{NAMESPACE}'>"
        f"<{PREFIX}:name>{_a(spec.name)}</{PREFIX}:name>"
        f"<{PREFIX}:project>{_a(spec.project_id)}</{PREFIX}:project>"
        f"</{PREFIX}:instance></metadata>",
        f"<memory unit='MiB'>{int(spec.memory_mb)}</memory>",
        # A floating guest's vCPUs (and, unless pinned apart, its emulator threads) stay on the
        # host's shared CPUs, off the pCPUs pinned guests were promised exclusively.
        (f"<vcpu cpuset='{cpulist(spec.cpuset)}'>{int(spec.vcpus)}</vcpu>" if spec.cpuset
         else f"<vcpu>{int(spec.vcpus)}</vcpu>"),
        *_tuning(spec),
        *_sysinfo(spec.oem_strings),
        # libvirt takes either per-device boot orders or <os><boot>, never both.
        _os_open(spec) + f"<type arch='{_a(spec.arch)}'{machine}>hvm</type>"
        + ("" if per_device_boot else "<boot dev='hd'/>")
        + ("<bootmenu enable='yes'/>" if spec.boot_menu else "")
        + ("<smbios mode='sysinfo'/>" if spec.oem_strings else "") + "</os>",
        _features(spec),
        *_cpu(spec),
        # The power-state logic reads a powered-off or crashed guest from its domain state, so
        # the domain must stop (not restart) on both; a guest-initiated reboot restarts in place.
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>",
        "<devices>",
    ]
    iotune = _iotune(spec.limits)
    for disk, dev in zip(spec.disks, targets.assign(spec.disks), strict=True):
        parts.append(disk_xml(disk, dev, iotune, spec.packed_ring))
    parts.extend(interface_xml(i, spec) for i in spec.interfaces)
    parts.append(_serial(spec))
    if spec.guest_agent:
        # libvirt picks the socket's path and connects to it itself (setUserPassword, fsFreeze).
        parts.append(f"<channel type='unix'><target type='virtio' name='{GUEST_AGENT_CHANNEL}'/></channel>")
    parts.extend(
        f"<graphics type='{g.type}' autoport='yes' listen='{_a(g.listen)}'>"
        f"<listen type='address' address='{_a(g.listen)}'/></graphics>" for g in spec.graphics
    )
    parts.extend(_devices(spec))
    if spec.virt_type in ("qemu", "kvm"):
        # No USB bus and no balloon: nothing in a cloud guest uses them, and they cost boot time.
        parts.append("<controller type='usb' model='none'/><memballoon model='none'/>")
    parts.append("</devices></domain>")
    return "".join(parts)


def disk_xml(disk: Disk, dev: str, iotune: str = "", packed: bool = False) -> str:
    """A ``<disk>`` on target ``dev`` (``vda``); ``iotune`` is the flavor's ``<iotune>``
    element, if any (a disk with limits of its own has those instead); ``packed``: virtio
    packed virtqueues (virtio disks only)."""
    if disk.source_kind == "file":
        source = f"<source file='{_a(disk.source)}'/>"
    elif disk.source_kind == "block":
        source = f"<source dev='{_a(disk.source)}'/>"
    else:
        hosts = "".join(f"<host name='{_a(h)}' port='{int(p)}'/>" for h, p in disk.hosts)
        source = f"<source protocol='{_a(disk.protocol or '')}' name='{_a(disk.source)}'>{hosts}</source>"
    if disk.auth is not None:
        source += (f"<auth username='{_a(disk.auth.username)}'>"
                   f"<secret type='{disk.auth.secret_type}' uuid='{_a(disk.auth.secret_uuid)}'/></auth>")
    if disk.iotune is not None:
        inner = "".join(f"<{k}>{int(v)}</{k}>" for k, v in disk.iotune.items())
        iotune = f"<iotune>{inner}</iotune>" if inner else ""
    boot = f"<boot order='{int(disk.boot_order)}'/>" if disk.boot_order is not None else ""
    driver = (" packed='on'" if packed and disk.bus == "virtio" else "") + (
        " discard='unmap'" if disk.discard else "")
    serial = f"<serial>{_a(disk.serial)}</serial>" if disk.serial else ""
    # libvirt keeps a user's alias only with its ua- prefix; QEMU's device id is then ours.
    alias = f"<alias name='{USER_ALIAS}{_a(disk.alias)}'/>" if disk.alias else ""
    return (
        f"<disk type='{disk.source_kind}' device='{disk.device}'>"
        f"<driver name='qemu' type='{_a(disk.format)}'{driver}/>{source}"
        f"<target dev='{dev}' bus='{disk.bus}'/>"
        + ("<readonly/>" if disk.read_only else "") + serial + boot + iotune + alias + "</disk>"
    )


# Limits field -> the cputune or iotune element it sets (Nova's libvirt driver does the same).
_CPUTUNE = (("cpu_shares", "shares"), ("cpu_period", "period"), ("cpu_quota", "quota"))
_IOTUNE = (("disk_read_bytes_sec", "read_bytes_sec"), ("disk_write_bytes_sec", "write_bytes_sec"),
           ("disk_read_iops_sec", "read_iops_sec"), ("disk_write_iops_sec", "write_iops_sec"),
           ("disk_total_bytes_sec", "total_bytes_sec"), ("disk_total_iops_sec", "total_iops_sec"))


def _tuning(spec: GuestSpec) -> list[str]:
    parts: list[str] = []
    pagesizes = [(c.id, c.pagesize_kb) for c in spec.cells if c.pagesize_kb and c.pagesize_kb > 4]
    backing = ("<hugepages>" + "".join(
        f"<page size='{int(size)}' unit='KiB' nodeset='{int(cell)}'/>" for cell, size in pagesizes
    ) + "</hugepages>") if pagesizes else ""
    if spec.locked_memory:
        backing += "<locked/>"
    if backing:
        parts.append(f"<memoryBacking>{backing}</memoryBacking>")
    limits = spec.limits
    tune = [f"<{tag}>{int(v)}</{tag}>" for key, tag in _CPUTUNE if (v := getattr(limits, key)) is not None]
    pins = [f"<vcpupin vcpu='{int(v)}' cpuset='{cpulist(p)}'/>" for v, p in sorted(spec.vcpupin.items())]
    if spec.emulatorpin:
        pins.append(f"<emulatorpin cpuset='{cpulist(spec.emulatorpin)}'/>")
    if tune or pins:
        parts.append("<cputune>" + "".join(tune + pins) + "</cputune>")
    if spec.cells:
        nodes = cpulist([c.host_cell for c in spec.cells])
        parts.append(f"<numatune><memory mode='strict' nodeset='{nodes}'/>" + "".join(
            f"<memnode cellid='{c.id}' mode='strict' nodeset='{c.host_cell}'/>" for c in spec.cells
        ) + "</numatune>")
    return parts


def _cpu(spec: GuestSpec) -> list[str]:
    mode = spec.cpu_mode or ("custom" if spec.cpu_model else None)
    if not spec.cells and mode is None and not spec.cpu_features and spec.topology is None:
        return []
    attrs = ""
    if mode == "custom":
        attrs = " mode='custom' match='exact'"
    elif mode is not None:
        attrs = f" mode='{mode}'"
    # fallback='forbid': a model the hypervisor lacks is an error, not a silent other model.
    model = f"<model fallback='forbid'>{_a(spec.cpu_model)}</model>" if mode == "custom" and spec.cpu_model else ""
    # policy='require': the guest does not start on a CPU without the feature, rather than
    # running without what its flavor asked for.
    features = "".join(f"<feature policy='require' name='{_a(f)}'/>" for f in spec.cpu_features)
    if spec.topology is not None:
        t = spec.topology
        features = (f"<topology sockets='{int(t.sockets)}' cores='{int(t.cores)}' threads='{int(t.threads)}'/>"
                    + features)
    numa = ("<numa>" + "".join(
        f"<cell id='{c.id}' cpus='{cpulist(c.cpus)}' memory='{int(c.memory_mb)}' unit='MiB'/>"
        for c in spec.cells
    ) + "</numa>") if spec.cells else ""
    return [f"<cpu{attrs}>{model}{features}{numa}</cpu>"]


def _serial(spec: GuestSpec) -> str:
    """The serial console: a log file, or a unix socket (QEMU listening) that also logs there."""
    console = _a(spec.console_path)
    # append: a new QEMU process (start after stop, restore after suspend) must not wipe the
    # console history that instance.console returns.
    if spec.console_socket is None:
        chardev, source = "file", f"<source path='{console}' append='on'/>"
    else:
        # libvirt's <log> inside the chardev: whatever goes through the socket, and whatever
        # the guest writes while no one is connected, still lands in the log.
        chardev = "unix"
        source = f"<source mode='bind' path='{_a(spec.console_socket)}'/><log file='{console}' append='on'/>"
    return (f"<serial type='{chardev}'>{source}<target port='0'/></serial>"
            f"<console type='{chardev}'>{source}<target type='serial' port='0'/></console>")


def _sysinfo(entries: list[str]) -> list[str]:
    # SMBIOS type 11 strings: settings a guest reads from its firmware tables, no image change
    # and no metadata service needed.
    if not entries:
        return []
    return ["<sysinfo type='smbios'><oemStrings>" + "".join(f"<entry>{_a(e)}</entry>" for e in entries)
            + "</oemStrings></sysinfo>"]


def _iotune(limits: Limits) -> str:
    inner = "".join(f"<{tag}>{int(v)}</{tag}>" for key, tag in _IOTUNE if (v := getattr(limits, key)) is not None)
    return f"<iotune>{inner}</iotune>" if inner else ""


def interface_xml(iface: Interface, guest: GuestSpec | None = None) -> str:
    """An ``<interface type='ethernet'>`` on a tap the agent made (libvirt must not manage it),
    with the ``guest``'s virtqueue format. Its bandwidth limits are not libvirt's to apply: the
    agent shapes its taps itself (network/shaping.py)."""
    packed = "<driver packed='on'/>" if guest is not None and guest.packed_ring else ""
    return (
        f"<interface type='ethernet'><mac address='{_a(iface.mac)}'/>"
        f"<target dev='{_a(iface.tap)}' managed='no'/><model type='virtio'/>{packed}"
        + f"<mtu size='{int(iface.mtu)}'/></interface>"
    )


def _os_open(spec: GuestSpec) -> str:
    # UEFI: libvirt picks the OVMF build whose descriptor has the features asked for, and
    # gives the domain its own NVRAM from that build's template. Without secure boot the
    # build without it is asked for explicitly: it runs on every machine type.
    if spec.firmware != "uefi":
        return "<os>"
    on = "yes" if spec.secure_boot else "no"
    return (f"<os firmware='efi'><firmware><feature enabled='{on}' name='secure-boot'/>"
            f"<feature enabled='{on}' name='enrolled-keys'/></firmware>")


def _features(spec: GuestSpec) -> str:
    parts = ["<acpi/>"]
    if spec.pmu is not None:
        parts.append(f"<pmu state='{'on' if spec.pmu else 'off'}'/>")
    if spec.hide_hypervisor:
        parts.append("<kvm><hidden state='on'/></kvm>")
    if spec.secure_boot:
        # Secure-boot OVMF keeps its variables safe from the guest OS in SMM.
        parts.append("<smm state='on'/>")
    return "<features>" + "".join(parts) + "</features>"


def _devices(spec: GuestSpec) -> list[str]:
    """The flavor's devices beyond disks, interfaces and the console."""
    parts = [
        f"<serial type='pty'><target port='{port}'/></serial>" for port in range(1, spec.serial_ports)
    ]
    if spec.watchdog is not None:
        parts.append(f"<watchdog model='i6300esb' action='{spec.watchdog}'/>")
    if spec.rng is not None:
        rate = ""
        if spec.rng.rate_bytes is not None:
            period = f" period='{int(spec.rng.rate_period)}'" if spec.rng.rate_period else ""
            rate = f"<rate bytes='{int(spec.rng.rate_bytes)}'{period}/>"
        parts.append(f"<rng model='virtio'>{rate}<backend model='random'>/dev/urandom</backend></rng>")
    if spec.tpm is not None:
        parts.append(f"<tpm model='{spec.tpm.model}'><backend type='emulator' version='{spec.tpm.version}'/></tpm>")
    if spec.video is not None:
        parts.append(f"<video><model type='{spec.video}'/></video>")
    return parts


def disk_aliases(domain_xml: str) -> dict[str, str]:
    """The disks of a domain that carry an alias of ours: alias (without libvirt's ``ua-``)
    -> device name."""
    found: dict[str, str] = {}
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        alias, target = disk.find("alias"), disk.find("target")
        name = alias.get("name", "") if alias is not None else ""
        if name.startswith(USER_ALIAS) and target is not None:
            found[name.removeprefix(USER_ALIAS)] = target.get("dev", "")
    return found


def disk_targets(domain_xml: str) -> set[str]:
    """The device names of a domain's disks."""
    return {t.get("dev", "") for t in ET.fromstring(domain_xml).iterfind("devices/disk/target")}


def disk_snapshot(domain_xml: str, disk: str, overlay: str) -> tuple[str, str]:
    """A disk-only snapshot of the domain's disk whose source is the file ``disk``: its writes
    go to the new qcow2 ``overlay``, every other disk is left out. Returns the snapshot's XML
    and the disk's target device (for the block commit that merges it back); ValueError when
    the domain has no such disk."""
    target = None
    parts = ["<domainsnapshot><disks>"]
    for d in ET.fromstring(domain_xml).iterfind("devices/disk"):
        dev = d.find("target")
        src = d.find("source")
        if dev is None:
            continue
        name = dev.get("dev", "")
        if src is not None and src.get("file") == disk:
            target = name
            parts.append(f"<disk name='{_a(name)}' snapshot='external'><driver type='qcow2'/>"
                         f"<source file='{_a(overlay)}'/></disk>")
        else:
            parts.append(f"<disk name='{_a(name)}' snapshot='no'/>")
    if target is None:
        raise ValueError(f"the domain has no disk {disk}")
    parts.append("</disks></domainsnapshot>")
    return "".join(parts), target


def disk_target(domain_xml: str, source: str) -> str | None:
    """The target device of the domain's disk whose source is the file ``source``."""
    for d in ET.fromstring(domain_xml).iterfind("devices/disk"):
        src, dev = d.find("source"), d.find("target")
        if src is not None and dev is not None and src.get("file") == source:
            return dev.get("dev")
    return None
