"""The disks of an instance: the roles a disk can have, the file each role's disk is in the
instance directory, and the making and removing of those files.

A new disk role is one row of :data:`ROLES`: its file name, device, bus and format. Everything
else (the guest's disk list, its devices in the hypervisor, the removal of an instance's files)
follows from the table.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from fastcompute import _core
from fastcompute.hypervisor.spec import Disk, DiskBus, DiskDevice
from fastcompute.images.formats import create_overlay


class Role(msgspec.Struct, frozen=True, kw_only=True):
    """What a disk of one role is: ``file`` its name in the instance directory (None for a
    disk that is not a file of the instance, a volume); ``format`` None means the instance
    disk format of the cache (qcow2 overlays or raw copies)."""

    file: str | None
    device: DiskDevice = "disk"
    bus: DiskBus = "virtio"
    format: str | None = None
    read_only: bool = False


ROLES: dict[str, Role] = {
    "root": Role(file="disk"),
    "ephemeral": Role(file="disk.local"),
    "swap": Role(file="disk.swap"),
    # A config drive is an ISO 9660 image the guest reads at boot, a read-only CD-ROM. IDE (on
    # the default pc machine type): the Debian cloud kernel has ata_piix, sr_mod and iso9660 as
    # modules, and no AHCI driver for a SATA one.
    "config": Role(file="disk.config", device="cdrom", bus="ide", format="raw", read_only=True),
    "rescue": Role(file="disk.rescue"),
    "volume": Role(file=None),
    # The root disk a rebuild makes from its new image, beside the old one until it replaces it.
    "rebuild": Role(file="disk.rebuild"),
    # While a running guest's disk is snapshotted, its writes go to this overlay; it is merged
    # back into the root disk afterwards.
    "snapshot": Role(file="disk.snap"),
}

INFO = "disk.info"
"""The root disk's record beside it: which base it was made from (the cache's users); a disk of
another role made from an image has its own (``disk.rescue.info``)."""


def path(instance_dir: Path, role: str) -> Path:
    """The file of an instance's disk of ``role``; ValueError for a role without a file."""
    name = ROLES[role].file
    if name is None:
        raise ValueError(f"a {role} disk is not a file of the instance")
    return instance_dir / name


def info_path(instance_dir: Path, role: str) -> Path:
    """The record of which base the disk of ``role`` was made from."""
    return instance_dir / INFO if role == "root" else path(instance_dir, role).with_name(f"{ROLES[role].file}.info")


def _tmp(disk: Path) -> Path:
    return disk.with_name(f".{disk.name}.tmp")


def file_disk(instance_dir: Path, role: str, disk_format: str, boot_order: int | None = None) -> Disk:
    """The :class:`Disk` of an instance's file disk of ``role``, in ``disk_format`` unless the
    role has a format of its own."""
    r = ROLES[role]
    return Disk(role=role, source=str(path(instance_dir, role)), format=r.format or disk_format,
                bus=r.bus, device=r.device, boot_order=boot_order, read_only=r.read_only)


def spawn_disks(instance_dir: Path, disk_format: str, config_drive: bool = False) -> list[Disk]:
    """The disks a spawned instance has: its root disk, made from its image, booted from; and
    its config drive if it has one."""
    root = [file_disk(instance_dir, "root", disk_format, boot_order=1)]
    return [*root, file_disk(instance_dir, "config", "raw")] if config_drive else root


def rescue_disks(instance_dir: Path, disk_format: str, config_drive: bool = False) -> list[Disk]:
    """The disks of a rescued instance: the rescue disk booted from, the root disk second (the
    rescue system's second disk), and the config drive if it has one."""
    booted = [file_disk(instance_dir, "rescue", disk_format, boot_order=1),
              file_disk(instance_dir, "root", disk_format)]
    return [*booted, file_disk(instance_dir, "config", "raw")] if config_drive else booted


def remove(instance_dir: Path, role: str) -> None:
    """Remove the disk of ``role`` (a half-made one too) and its record; nothing if there is none."""
    disk = path(instance_dir, role)
    for p in (disk, _tmp(disk), info_path(instance_dir, role)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def promote(instance_dir: Path, made: str, role: str) -> bool:
    """Make the disk of role ``made`` the disk of ``role``, the old one gone, by renames: its
    record first, so that a crash between the two leaves the new disk still to be renamed.
    False if there is no disk of ``made`` (already promoted)."""
    disk = path(instance_dir, made)
    if not disk.exists():
        return False
    with contextlib.suppress(FileNotFoundError):
        os.rename(info_path(instance_dir, made), info_path(instance_dir, role))
    # No fsync: a rename lost with the host's power leaves the made disk where it was, and
    # the store still says the rebuild is to finish, which renames it again.
    os.rename(disk, path(instance_dir, role))
    return True


def make_from_base(
    disk: Path,
    size: int,
    base: Path,
    mode: str,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Make ``disk`` of ``size`` bytes from the raw ``base``: a qcow2 overlay on it (``cow``) or
    a private sparse copy (``flat``). Raises OSError; leaves no partial file behind."""
    if mode == "cow":
        # No fsync: a disk lost in a crash belongs to a spawn that did not finish, which
        # start-up reconciliation rolls back anyway.
        create_overlay(disk, size, str(base), "raw")
        return
    tmp = _tmp(disk)
    _core.copy_file(str(base), str(tmp), progress)
    try:
        os.truncate(tmp, size)
        os.rename(tmp, disk)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_files(instance_dir: Path) -> None:
    """Remove every disk file of an instance (and half-made ones, and the root disk's record),
    then the directory if nothing else is left in it."""
    for name, role in ROLES.items():
        if role.file is not None:
            remove(instance_dir, name)
    with contextlib.suppress(OSError):
        instance_dir.rmdir()
