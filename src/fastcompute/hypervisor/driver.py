"""What the manager needs of a hypervisor, in the terms of :mod:`fastcompute.hypervisor.spec`.

No libvirt here: a driver takes a :class:`GuestSpec` and hands back typed facts, states and
statistics; how its hypervisor is spoken to is its own business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from fastcompute.hypervisor.spec import (
    ConsoleEndpoint,
    ConsoleKind,
    CpuMode,
    Disk,
    DomainStats,
    GuestSpec,
    HostFacts,
    HostFeatures,
    Interface,
    MigrationPolicy,
    MigrationProgress,
    MigrationResult,
    MigrationTarget,
)


class DomainInfo(msgspec.Struct, frozen=True):
    """A domain as the hypervisor sees it."""

    uuid: str
    power_state: str
    ours: bool
    has_managed_save: bool = False


class PowerEvent(msgspec.Struct, frozen=True):
    """A change of a domain's power state reported by the hypervisor."""

    uuid: str
    power_state: str


class Driver(Protocol):
    """The operations the manager drives; every async method may raise HypervisorError.

    ``attach_interface`` and ``detach_interface`` take the guest as it is after the change, for
    a hypervisor that can only change a device by defining the guest again. ``domain_stats``
    and ``guest_pid`` block (call them from a worker thread); ``domain_stats`` maps the
    hypervisor's domain UUIDs to the keys to report them under, and leaves out domains it does
    not find. ``console_endpoint`` says where a running guest's console of a kind is reached
    (Conflict when it has none or does not run).

    The guest agent's calls (``set_password``, ``freeze_filesystems``, ``thaw_filesystems``,
    which return the file systems frozen or thawed) take how long the agent has to answer;
    an agent that is not there or does not answer in time is Conflict. ``guest_agent_ping``
    says whether it answers now. The password is never logged or put in an error.

    ``live_migrate`` moves a running guest to ``target`` while it runs, steered by ``policy``
    and reporting its progress about twice a second; on success the guest runs at the
    destination (defined there) and its domain here is left defined and stopped, for the
    caller to remove once it has recorded the move. A migration that fails, times out or is
    aborted (``abort_migration``: False when none is under way) raises HypervisorError with
    the guest still running here and nothing of it left at the destination.
    ``inject_nmi`` sends a non-maskable interrupt to a running guest (its kernel's crash dump);
    a guest that does not run is Conflict.
    Volumes: ``attach_volume`` adds a volume's disk (live and persistent on a running guest,
    persistent on a stopped one), its secret first, and leaves nothing behind when it fails;
    ``detach_volume`` removes it and, on a running guest, returns only once the guest has
    released the device (asked again while ``timeout_s`` lasts; HypervisorError, the disk
    still attached, when it does not); ``extend_volume`` tells a running guest the disk's new
    size (False when nothing needed telling); ``volume_devices`` the volume disks a domain has
    (alias -> device name); ``destroy`` also removes the secrets the driver keeps for the
    instance's volumes.
    ``freeze_disk`` makes a disk file a point-in-time copy while its guest runs (its writes go
    to a new overlay; False when nothing writes the disk anyway), ``merge_disk`` merges that
    overlay back and removes it.
    """

    async def connect(self, on_power_event: Callable[[PowerEvent], None]) -> None: ...
    async def close(self) -> None: ...
    async def host_facts(self) -> HostFacts: ...
    async def virt_type(self, wanted: str) -> str: ...
    async def guest_cpu(self, virt_type: str, wanted: str, models: list[str]) -> tuple[CpuMode, str | None]: ...
    async def host_features(self, virt_type: str) -> HostFeatures: ...
    async def launch(self, guest: GuestSpec, start: bool) -> str: ...
    async def power_on(self, uuid: str) -> str: ...
    async def power_off(self, uuid: str, timeout_s: float) -> str: ...
    async def pause(self, uuid: str) -> str: ...
    async def unpause(self, uuid: str) -> str: ...
    async def suspend(self, uuid: str) -> str: ...
    async def reboot(self, uuid: str, hard: bool) -> str: ...
    async def attach_interface(self, uuid: str, iface: Interface, guest: GuestSpec) -> None: ...
    async def detach_interface(self, uuid: str, iface: Interface, guest: GuestSpec) -> None: ...
    async def destroy(self, uuid: str) -> None: ...
    async def attach_volume(self, uuid: str, disk: Disk, guest: GuestSpec) -> None: ...
    async def detach_volume(self, uuid: str, disk: Disk, guest: GuestSpec, timeout_s: float) -> None: ...
    async def extend_volume(self, uuid: str, disk: Disk, size_bytes: int) -> bool: ...
    async def volume_devices(self, uuid: str) -> dict[str, str]: ...
    async def prepare_volumes(self, uuid: str, guest: GuestSpec) -> None: ...
    async def info(self, uuid: str) -> DomainInfo | None: ...
    async def list_domains(self) -> list[DomainInfo]: ...
    async def console_endpoint(self, uuid: str, kind: ConsoleKind) -> ConsoleEndpoint: ...
    async def guest_agent_ping(self, uuid: str, timeout_s: float) -> bool: ...
    async def set_password(self, uuid: str, user: str, password: str, timeout_s: float) -> None: ...
    async def freeze_filesystems(self, uuid: str, timeout_s: float) -> int: ...
    async def thaw_filesystems(self, uuid: str, timeout_s: float) -> int: ...
    async def live_migrate(self, uuid: str, target: MigrationTarget, policy: MigrationPolicy,
                           on_progress: Callable[[MigrationProgress], None]) -> MigrationResult: ...
    async def abort_migration(self, uuid: str) -> bool: ...
    async def freeze_disk(self, uuid: str, disk: str, overlay: str) -> bool: ...
    async def merge_disk(self, uuid: str, disk: str, overlay: str) -> None: ...
    def domain_stats(self, domains: Mapping[str, str]) -> dict[str, DomainStats]: ...
    def guest_pid(self, uuid: str) -> int | None: ...
    async def inject_nmi(self, uuid: str) -> None: ...
