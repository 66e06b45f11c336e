"""Volumes of instances: attach, detach and extend (``instance.attach_volume``,
``detach_volume``, ``extend_volume``), the volume disks a guest has, and their reconciliation
after a restart.

An attachment is written ahead: the record shows it ``attaching`` (or ``detaching``) in the
store before the hypervisor is asked, and ``attached`` (or gone) after. A crash in between
leaves a record the start-up reconciliation (:func:`settle`) finishes the safe way: an
interrupted attach is undone, an interrupted detach completed, so nothing is left half
attached. The volume's connection (Cinder's connection info, CHAP password included) is kept
in the store beside the record (``Stored.volumes``), never in the record itself. The agent
creates no volume and deletes none: deleting an instance disconnects its volumes (their
secrets go with the domain) and leaves them to Cinder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid as uuid_mod
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from fastcompute.compute.records import Stored, VolumeConnection
from fastcompute.config import HypervisorConfig
from fastcompute.errors import AgentError, BadRequest, Conflict, NotFound
from fastcompute.hypervisor import targets
from fastcompute.hypervisor.spec import Disk, DiskAuth, SourceKind
from fastcompute.images import disks
from fastcompute.protocol import InstanceRecord
from fastcompute.protocol.volumes import (
    QOS_KEYS,
    AttachStatus,
    BlockDevice,
    ConnectionInfo,
    FileConnection,
    IscsiConnection,
    LocalConnection,
    NbdConnection,
    RbdConnection,
    VolumeBus,
    VolumeRecord,
    VolumeSpec,
    boot_volume,
    split_portal,
    volume_type,
)

if TYPE_CHECKING:
    from fastcompute.compute.manager import Manager
    from fastcompute.protocol.schema import SpawnArgs

log = logging.getLogger("fastcompute.volumes")

STATES: Final = frozenset({"active", "paused", "stopped"})
"""Where volumes are attached, detached and extended: live on a running (or paused) guest,
persistently on a stopped one (Nova's states, less those this agent does not have)."""
ALIAS_PREFIX: Final = "vol-"
_SECRETS: Final = uuid_mod.UUID("5b0c1c4e-6f0a-4f57-9d0b-0f6d1c9a7e21")


def alias(volume_id: str) -> str:
    """The device alias of a volume's disk: how the hypervisor reports its removal, and how
    the reconciliation tells our volume disks from others."""
    return ALIAS_PREFIX + hashlib.sha1(volume_id.encode()).hexdigest()[:20]


def source_kind(conn: ConnectionInfo, field: str) -> SourceKind:
    """Where a connection's disk comes from: network, or for a path a block device or a file
    (looked at now: NotFound naming the field when it is neither)."""
    if not isinstance(conn, LocalConnection | FileConnection):
        return "network"
    path = conn.data.device_path
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise NotFound(f"volume path {path} cannot be reached on this host: {exc.strerror}",
                       {"field": f"{field}.data.device_path"}) from None
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISREG(mode):
        return "file"
    raise BadRequest(f"invalid request: {field}.data.device_path: {path} is neither a block device nor a file",
                     {"field": f"{field}.data.device_path", "reason": "neither a block device nor a file"})


def disk_of(instance: str, vol: VolumeRecord, conn: VolumeConnection, boot_order: int | None = None) -> Disk:
    """The guest disk of an attached volume."""
    info = conn.connection_info
    qos = {k: int(v) for k, v in (info.data.qos_specs or {}).items() if k in QOS_KEYS}
    base = Disk(role="volume", source="", source_kind="network", format="raw", bus=vol.bus,
                target=vol.device_name.removeprefix("/dev/"), alias=alias(vol.volume_id), serial=vol.serial,
                read_only=vol.read_only, discard=info.data.discard, iotune=qos or None, boot_order=boot_order)
    replace = msgspec.structs.replace
    if isinstance(info, IscsiConnection):
        d = info.data
        host, port = split_portal(d.target_portal) or (d.target_portal, 3260)
        auth = None
        if d.auth_method is not None and d.auth_username and d.auth_password:
            # One secret per instance and volume, its uuid derived: found again after a crash.
            secret = str(uuid_mod.uuid5(_SECRETS, f"{instance}/{vol.volume_id}"))
            auth = DiskAuth(username=d.auth_username, secret_type="iscsi", secret_uuid=secret, value=d.auth_password)
        return replace(base, source=f"{d.target_iqn}/{d.target_lun}", protocol="iscsi", hosts=[(host, port)],
                       auth=auth)
    if isinstance(info, NbdConnection):
        return replace(base, source=info.data.export_name, protocol="nbd", hosts=[(info.data.host, info.data.port)])
    if isinstance(info, RbdConnection):
        r = info.data
        auth = None
        if r.auth_enabled and r.auth_username and r.secret_uuid:
            auth = DiskAuth(username=r.auth_username, secret_type="ceph", secret_uuid=r.secret_uuid)
        return replace(base, source=r.name, protocol="rbd", auth=auth,
                       hosts=[(h, int(p)) for h, p in zip(r.hosts, r.ports, strict=True)])
    return replace(base, source=info.data.device_path, source_kind=conn.source_kind)


def boots_from_volume(stored: Stored) -> bool:
    """Whether the instance's boot disk is a volume (it then has no local root disk)."""
    return any(v.boot_index == 0 for v in stored.record.volumes)


def instance_disks(uuid: str, stored: Stored, instance_dir: Path, disk_format: str, config_drive: bool) -> list[Disk]:
    """The disks of an instance's guest: its local root disk (or its boot volume), its
    volumes (not those being detached), its config drive. A rescued instance boots from its
    rescue disk, its root disk second."""
    rescued = stored.rescue is not None
    local = (disks.rescue_disks if rescued else disks.spawn_disks)(instance_dir, disk_format, config_drive)
    bfv = boots_from_volume(stored)
    if bfv:
        local = [d for d in local if d.role != "root"]
    vols = [disk_of(uuid, v, stored.volumes[v.volume_id], 1 if v.boot_index == 0 and not rescued else None)
            for v in stored.record.volumes if v.status != "detaching" and v.volume_id in stored.volumes]
    if bfv and not rescued:
        return vols + local
    booted = 2 if rescued and not bfv else 1
    return local[:booted] + vols + local[booted:]


def from_mapping(args: SpawnArgs) -> tuple[list[VolumeRecord], dict[str, VolumeConnection]]:
    """The volumes a spawn's block device mapping attaches (its boot volume as ``vda``)."""
    records: list[VolumeRecord] = []
    conns: dict[str, VolumeConnection] = {}
    taken: list[str] = [] if boot_volume(args.block_device_mapping) is not None else ["vda"]
    for i, b in enumerate(args.block_device_mapping):
        if b.source_type != "volume" or b.volume_id is None or b.connection_info is None:
            continue
        field = f"args.block_device_mapping[{i}].connection_info"
        bus = b.disk_bus or "virtio"
        wanted = "vda" if b.boot_index == 0 else (b.device_name.removeprefix("/dev/") if b.device_name else None)
        dev = targets.free_name([], bus, wanted, also_taken=taken)
        if dev is None:
            raise Conflict(f"device {b.device_name} is taken", {"field": f"args.block_device_mapping[{i}].device_name"})
        taken.append(dev)
        conns[b.volume_id] = VolumeConnection(connection_info=b.connection_info,
                                              source_kind=source_kind(b.connection_info, field))
        records.append(_record(b, dev, bus))
    return records, conns


def _record(b: BlockDevice, dev: str, bus: VolumeBus) -> VolumeRecord:
    assert b.volume_id is not None and b.connection_info is not None
    return VolumeRecord(volume_id=b.volume_id, driver_volume_type=volume_type(b.connection_info),
                        device_name="/dev/" + dev, bus=bus, serial=b.volume_id,
                        read_only=bool(b.read_only) or b.connection_info.data.access_mode == "ro",
                        boot_index=b.boot_index if b.boot_index is not None and b.boot_index >= 0 else None,
                        delete_on_termination=b.delete_on_termination)


def _set(stored: Stored, vols: list[VolumeRecord]) -> None:
    stored.record.volumes = vols
    stored.volumes = {k: c for k, c in stored.volumes.items() if any(v.volume_id == k for v in vols)}


def _status(stored: Stored, volume_id: str, status: AttachStatus) -> list[VolumeRecord]:
    return [msgspec.structs.replace(v, status=status) if v.volume_id == volume_id else v
            for v in stored.record.volumes]


class Volumes:
    """``instance.attach_volume``, ``detach_volume`` and ``extend_volume``."""

    def __init__(self, manager: Manager, cfg: HypervisorConfig) -> None:
        self.manager = manager
        self.detach_timeout_s = cfg.volume_detach_timeout_s

    def _find(self, stored: Stored, uuid: str, volume_id: str) -> VolumeRecord:
        vol = next((v for v in stored.record.volumes if v.volume_id == volume_id), None)
        if vol is None or vol.volume_id not in stored.volumes:
            raise NotFound(f"instance {uuid} has no volume {volume_id}", {"volume_id": volume_id})
        return vol

    async def attach(self, uuid: str, spec: VolumeSpec) -> InstanceRecord:
        """Attach a volume: recorded ``attaching`` first, ``attached`` once the hypervisor has
        it; when the hypervisor fails, the record is as before and the error typed."""
        m = self.manager
        async with m.held(uuid, "attach a volume to", STATES):
            stored = m.instances[uuid]
            if any(v.volume_id == spec.id for v in stored.record.volumes):
                raise Conflict(f"volume {spec.id} is already attached to {uuid}", {"volume_id": spec.id})
            bus = spec.bus or "virtio"
            wanted = spec.device_name.removeprefix("/dev/") if spec.device_name else None
            dev = targets.free_name(m.guest_spec(uuid).disks, bus, wanted)
            if dev is None:
                raise Conflict(f"device {spec.device_name} of {uuid} is taken", {"field": "args.volume.device_name"})
            conn = VolumeConnection(connection_info=spec.connection_info,
                                    source_kind=source_kind(spec.connection_info, "args.volume.connection_info"))
            vol = VolumeRecord(volume_id=spec.id, driver_volume_type=volume_type(spec.connection_info),
                               device_name="/dev/" + dev, bus=bus, serial=spec.serial or spec.id,
                               read_only=bool(spec.read_only) or spec.connection_info.data.access_mode == "ro",
                               status="attaching")
            stored.volumes[spec.id] = conn
            stored.record.volumes = [*stored.record.volumes, vol]
            await m.commit(uuid)
            try:
                await m.driver.attach_volume(uuid, disk_of(uuid, vol, conn), m.guest_spec(uuid))
            except BaseException:
                _set(stored, [v for v in stored.record.volumes if v.volume_id != spec.id])
                await m.commit(uuid)
                raise
            stored.record.volumes = _status(stored, spec.id, "attached")
            log.info("volume %s attached to %s as %s", spec.id, uuid, vol.device_name)
            return await m.commit(uuid)

    async def detach(self, uuid: str, volume_id: str) -> InstanceRecord:
        """Detach a volume: recorded ``detaching``, gone once the guest has released it; a
        guest that does not leaves it ``attached`` and the error says so."""
        m = self.manager
        async with m.held(uuid, "detach a volume from", STATES):
            stored = m.instances[uuid]
            vol = self._find(stored, uuid, volume_id)
            if vol.boot_index == 0:
                raise Conflict(f"volume {volume_id} is the boot disk of {uuid}", {"volume_id": volume_id})
            disk = disk_of(uuid, vol, stored.volumes[volume_id])
            stored.record.volumes = _status(stored, volume_id, "detaching")
            await m.commit(uuid)
            try:
                await m.driver.detach_volume(uuid, disk, m.guest_spec(uuid), self.detach_timeout_s)
            except BaseException:
                stored.record.volumes = _status(stored, volume_id, "attached")
                await m.commit(uuid)
                raise
            _set(stored, [v for v in stored.record.volumes if v.volume_id != volume_id])
            log.info("volume %s detached from %s", volume_id, uuid)
            return await m.commit(uuid)

    async def extend(self, uuid: str, volume_id: str, new_size_bytes: int) -> InstanceRecord:
        """The volume grew (Cinder extended it): a running guest is told its new size now, a
        stopped one reads it at its next start."""
        m = self.manager
        async with m.held(uuid, "extend a volume of", STATES):
            stored = m.instances[uuid]
            vol = self._find(stored, uuid, volume_id)
            if vol.size_bytes is not None and new_size_bytes < vol.size_bytes:
                raise BadRequest(f"invalid request: args.new_size_bytes: volumes only grow ({vol.size_bytes} now)",
                                 {"field": "args.new_size_bytes", "reason": "smaller than the volume"})
            told = await m.driver.extend_volume(uuid, disk_of(uuid, vol, stored.volumes[volume_id]), new_size_bytes)
            stored.record.volumes = [msgspec.structs.replace(v, size_bytes=new_size_bytes)
                                     if v.volume_id == volume_id else v for v in stored.record.volumes]
            log.info("volume %s of %s extended to %d bytes%s", volume_id, uuid, new_size_bytes,
                     "" if told else " (the guest sees it at its next start)")
            return await m.commit(uuid)


async def settle(m: Manager, uuid: str, has_domain: bool, timeout_s: float) -> None:
    """After a restart, before the instance's domain is looked at: an attach or a detach a
    crash interrupted is undone or finished (its disk taken out of the domain, its record
    dropped); a volume disk of the domain the record does not have is detached, and a volume
    the record has but the domain lacks is attached again. A disk the guest does not release
    stays recorded as attached (the record says what the guest has); failures are logged, and
    the next restart tries again."""
    stored = m.instances[uuid]
    before = list(stored.record.volumes)
    present = await m.driver.volume_devices(uuid) if has_domain else {}
    keep = [v for v in before if v.status == "attached"]
    leaving = [v for v in before if v.status != "attached"]
    for v in leaving:
        log.info("volume %s of %s was %s when the agent stopped; taking it out", v.volume_id, uuid, v.status)
    # The guest the domain is to be: without the volumes on their way out.
    _set(stored, keep + [msgspec.structs.replace(v, status="detaching") for v in leaving])
    guest = m.guest_spec(uuid)
    for v in leaving:
        if not has_domain or v.volume_id not in stored.volumes:
            continue
        # Also for a disk the live domain does not show: the persistent definition may have it,
        # and its secret goes either way.
        disk = disk_of(uuid, v, stored.volumes[v.volume_id])
        done = await _quietly(f"detach {disk.target} from {uuid}", m.driver.detach_volume(uuid, disk, guest, timeout_s))
        if not done and alias(v.volume_id) in present:
            keep.append(msgspec.structs.replace(v, status="attached"))
    _set(stored, keep)
    if stored.record.volumes != before:
        await m.commit(uuid)
    if not has_domain:
        return
    ours = {alias(v.volume_id): v for v in keep}
    guest = m.guest_spec(uuid)
    for name, dev in present.items():
        if name.startswith(ALIAS_PREFIX) and name not in ours and all(alias(v.volume_id) != name for v in leaving):
            log.warning("domain %s has volume disk %s the record does not; detaching it", uuid, dev)
            await _quietly(f"detach {dev} from {uuid}", m.driver.detach_volume(
                uuid, Disk(role="volume", source="", target=dev, alias=name), guest, timeout_s))
    for name, v in ours.items():
        if name not in present:
            log.warning("volume %s of %s is not in its domain; attaching it again", v.volume_id, uuid)
            await _quietly(f"attach volume {v.volume_id} to {uuid}", m.driver.attach_volume(
                uuid, disk_of(uuid, v, stored.volumes[v.volume_id]), guest))


async def _quietly(what: str, call: Awaitable[object]) -> bool:
    try:
        await call
    except AgentError as exc:
        log.error("could not %s: %s", what, exc.message)
        return False
    return True
