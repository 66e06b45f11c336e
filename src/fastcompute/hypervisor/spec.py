"""What crosses the hypervisor boundary, as plain typed data.

The manager describes a guest as a :class:`GuestSpec`; a driver turns it into whatever its
hypervisor needs. Facts about the host (:class:`HostFacts`) and a guest's
counters (:class:`DomainStats`) come back the same way. Nothing here knows any hypervisor.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SourceKind = Literal["file", "block", "network"]
DiskBus = Literal["virtio", "scsi", "sata", "ide"]
DiskDevice = Literal["disk", "cdrom"]
Firmware = Literal["bios", "uefi"]
CpuMode = Literal["host-model", "host-passthrough", "custom"]
TpmModel = Literal["tpm-tis", "tpm-crb"]
TpmVersion = Literal["1.2", "2.0"]
WatchdogAction = Literal["none", "pause", "poweroff", "reset"]
VideoModel = Literal["vga", "cirrus", "qxl", "virtio", "bochs", "none"]
GraphicsType = Literal["vnc", "spice"]
ConsoleKind = Literal["vnc", "spice", "serial"]


class DiskAuth(msgspec.Struct, frozen=True, kw_only=True):
    """How a network disk logs in: ``username`` and the hypervisor's secret ``secret_uuid``
    (of ``secret_type`` iscsi or ceph) holding the password or key. With ``value`` the driver
    keeps that secret itself (defined before the disk is attached, removed when the instance's
    volumes are released); without, the secret is the operator's and must exist."""

    username: str
    secret_type: Literal["iscsi", "ceph"]
    secret_uuid: str
    value: str | None = None


class Disk(msgspec.Struct, frozen=True, kw_only=True):
    """One disk of a guest.

    ``role`` is a name from ``fastcompute.images.disks.ROLES`` (root, ephemeral, swap, config,
    rescue, volume); the driver does not interpret it. ``source`` is a file path (``file``), a
    block device path (``block``) or the volume's name on its ``protocol``'s ``hosts``
    (``network``, e.g. an RBD ``pool/image``). Disks are attached in list order; a disk with a
    ``boot_order`` is a boot device, lowest first.

    A volume's disk also has: ``target`` the guest device it must be (``vdb``; None: the next
    free name of its bus), ``alias`` the name the hypervisor knows the device by (a detach
    waits for that device's removal), ``serial`` what the guest reads as its serial number,
    ``discard`` (guest TRIM passed down), ``iotune`` its own I/O limits (``QOS_KEYS`` names;
    None: the flavor's) and ``auth`` a network disk's login.
    """

    role: str
    source: str
    source_kind: SourceKind = "file"
    format: str = "raw"
    bus: DiskBus = "virtio"
    device: DiskDevice = "disk"
    boot_order: int | None = None
    read_only: bool = False
    protocol: str | None = None
    hosts: list[tuple[str, int]] = []
    target: str | None = None
    alias: str | None = None
    serial: str | None = None
    discard: bool = False
    iotune: dict[str, int] | None = None
    auth: DiskAuth | None = None


class Interface(msgspec.Struct, frozen=True):
    """A port's tap, made and plugged by the network module before the guest starts."""

    tap: str
    mac: str
    mtu: int


class GuestCell(msgspec.Struct, frozen=True):
    """A guest NUMA cell and the host cell it lives on (its memory strictly there)."""

    id: int
    cpus: list[int]
    memory_mb: int
    host_cell: int
    pagesize_kb: int | None = None


class Tpm(msgspec.Struct, frozen=True):
    """An emulated TPM (swtpm on the host)."""

    model: TpmModel
    version: TpmVersion


class Rng(msgspec.Struct, frozen=True):
    """A virtio RNG fed from the host's ``/dev/urandom``, at most ``rate_bytes`` per
    ``rate_period`` ms when ``rate_bytes`` is set."""

    rate_bytes: int | None = None
    rate_period: int | None = None


class CpuTopology(msgspec.Struct, frozen=True):
    """How the guest's vCPUs look to it: sockets x cores x threads = vCPUs."""

    sockets: int
    cores: int
    threads: int


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """CPU and disk I/O limits (the flavor's ``quota:*`` extra specs); None = no limit.

    The disk limits apply to each disk of the guest. (The ``quota:vif_*`` ones are the
    agent's own shaping of the guest's taps, not the hypervisor's: network/shaping.py.)
    """

    cpu_shares: int | None = None
    cpu_period: int | None = None
    cpu_quota: int | None = None
    disk_read_bytes_sec: int | None = None
    disk_write_bytes_sec: int | None = None
    disk_read_iops_sec: int | None = None
    disk_write_iops_sec: int | None = None
    disk_total_bytes_sec: int | None = None
    disk_total_iops_sec: int | None = None


class Graphics(msgspec.Struct, frozen=True):
    """A graphical console server of the guest, listening on a host address (the hypervisor
    picks the port)."""

    type: GraphicsType
    listen: str


class ConsoleEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a running guest's console is reached on this host: ``host`` and ``port`` for a
    graphical console, ``path`` (a unix socket) for the interactive serial console."""

    kind: ConsoleKind
    host: str | None = None
    port: int | None = None
    path: str | None = None


class GuestSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a driver needs to define one guest.

    ``vcpupin`` maps a vCPU to the host CPUs it may run on (empty for a floating guest, whose
    vCPUs all run on ``cpuset``: the host's shared CPUs); ``emulatorpin`` lists the host CPUs
    of the emulator threads. Empty ``cpuset`` and ``emulatorpin`` mean anywhere. ``cells`` are
    the guest's NUMA cells as the claim placed them. ``virt_type`` is what
    ``Driver.virt_type`` chose. ``cpu_mode`` is the guest CPU (None: the hypervisor's
    default), ``cpu_model`` its model in ``custom`` mode, ``cpu_features`` the host CPU
    features the guest must see (it does not start without them), ``topology`` its sockets,
    cores and threads (None: the hypervisor's default). The serial console is logged to
    ``console_path``; with ``console_socket`` it is also a unix socket an interactive session
    connects to (the log keeps everything either way). ``graphics`` are its graphical consoles.

    The machine and its devices: ``machine`` the machine type (None: the hypervisor's
    default), ``firmware`` and ``secure_boot`` (UEFI only), ``tpm`` an emulated TPM,
    ``watchdog`` the action of an i6300esb watchdog (None: no watchdog), ``rng`` a virtio
    RNG (None: none), ``video`` the video model (None: the hypervisor's default),
    ``serial_ports`` the serial ports (port 0 is the console, the others are ptys),
    ``boot_menu``, ``pmu`` (None: the hypervisor's default), ``hide_hypervisor``,
    ``locked_memory`` (guest memory never swapped) and ``packed_ring`` (virtio packed
    virtqueues on disks and interfaces). ``guest_agent``: the virtio-serial channel
    ``org.qemu.guest_agent.0`` a QEMU guest agent in the guest answers on.
    """

    uuid: str
    name: str
    project_id: str
    vcpus: int
    memory_mb: int
    console_path: str
    console_socket: str | None = None
    graphics: list[Graphics] = []
    disks: list[Disk] = []
    interfaces: list[Interface] = []
    cells: list[GuestCell] = []
    cpuset: list[int] = []
    vcpupin: dict[int, list[int]] = {}
    emulatorpin: list[int] = []
    limits: Limits = Limits()
    oem_strings: list[str] = []
    virt_type: str = "test"
    arch: str = "x86_64"
    firmware: Firmware = "bios"
    machine: str | None = None
    cpu_mode: CpuMode | None = None
    cpu_model: str | None = None
    cpu_features: list[str] = []
    topology: CpuTopology | None = None
    secure_boot: bool = False
    tpm: Tpm | None = None
    watchdog: WatchdogAction | None = None
    rng: Rng | None = None
    video: VideoModel | None = None
    serial_ports: int = 1
    boot_menu: bool = False
    pmu: bool | None = None
    hide_hypervisor: bool = False
    locked_memory: bool = False
    packed_ring: bool = False
    guest_agent: bool = True


class PagePool(msgspec.Struct):
    """One page size's pool on a host cell."""

    size_kb: int
    total: int


class HostCell(msgspec.Struct):
    """A host NUMA cell."""

    id: int
    cpus: list[int]
    siblings: list[list[int]]
    memory_mb: int
    pages: list[PagePool]


class HypervisorInfo(msgspec.Struct, frozen=True):
    """Which hypervisor this is, as ``host.info`` reports it."""

    uri: str
    type: str
    version: str


class HostFacts(msgspec.Struct, frozen=True):
    """What the hypervisor says of the host: its NUMA cells (CPUs, memory, page pools), the
    host CPU's feature names (``avx2``, ``sse4.2``) and which hypervisor it is."""

    cells: list[HostCell]
    cpu_features: list[str]
    hypervisor: HypervisorInfo


class HostFeatures(msgspec.Struct, frozen=True, kw_only=True):
    """What the hypervisor can give guests beyond CPUs and memory, read once at start:
    ``machines`` the machine types it offers (empty: it does not say), UEFI firmware,
    secure-boot firmware (on q35), the emulated TPM's versions and models (empty: no
    swtpm)."""

    machines: list[str] = []
    uefi: bool = False
    secure_boot: bool = False
    tpm_versions: list[str] = []
    tpm_models: list[str] = []


class DomainStats(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a guest's counters by the hypervisor; None where it does not say.

    ``at`` is ``time.monotonic()`` at the read; CPU times are nanoseconds since the guest
    started, memory bytes now, block and network counters summed over devices since start.
    """

    at: float
    cpu_ns: int | None = None
    user_ns: int | None = None
    system_ns: int | None = None
    memory_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None
    read_ops: int | None = None
    write_ops: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


MigrationFallback = Literal["none", "auto-converge", "post-copy"]


class MigrationPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a live migration is steered.

    The guest may be stopped for at most ``downtime_start_ms`` at the switch-over at first;
    while the migration does not converge the limit is raised, ``downtime_steps`` times in all,
    up to ``downtime_max_ms``; a migration that still has not converged after
    ``fallback_after_s`` falls back to ``fallback`` (auto-converge throttles the guest's vCPUs,
    post-copy switches over at once and fetches the rest of the memory on demand), and one not
    done after ``timeout_s`` is aborted, leaving the guest running where it was.
    ``bandwidth_mib_s`` caps the transfer (0: no cap).
    """

    downtime_start_ms: int = 50
    downtime_max_ms: int = 500
    downtime_steps: int = 10
    fallback: MigrationFallback = "auto-converge"
    fallback_after_s: float = 30.0
    timeout_s: float = 600.0
    bandwidth_mib_s: int = 0


class MigrationTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where a guest goes: the destination hypervisor's ``uri``, the ``address`` its memory
    and disks are sent to, and the guest as the destination describes it (``guest``: its
    disks, console, taps and pins there). Disks of ``copy_roles`` are copied (mirrored) to
    files the destination made beforehand; the others are on shared storage or made anew
    there (a config drive)."""

    uri: str
    address: str
    guest: GuestSpec
    copy_roles: list[str] = []


class MigrationProgress(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a live migration under way: bytes of memory and disk still to send and
    in all, the memory iteration (pass over guest memory), the downtime limit now and the
    fallback once taken."""

    elapsed_s: float
    memory_remaining: int
    memory_total: int
    disk_remaining: int
    disk_total: int
    iteration: int
    downtime_limit_ms: int
    fallback: MigrationFallback = "none"


class MigrationResult(msgspec.Struct, frozen=True, kw_only=True):
    """A completed live migration: its wall time, the guest's measured downtime at the
    switch-over (None where the hypervisor does not say), the downtime limit it ended with and
    the fallback taken."""

    total_s: float
    downtime_ms: int | None
    downtime_limit_ms: int
    fallback: MigrationFallback = "none"
