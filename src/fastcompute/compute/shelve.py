"""``instance.shelve``, ``instance.shelve_offload``, ``instance.unshelve`` and
``instance.get_shelved``: an instance parked as an image, costing its host nothing.

Shelve stops the guest and saves its root disk to the Image service (the snapshot's steps,
as ``shelving_image_pending_upload`` and ``shelving_image_uploading``): ``shelved``. Then, at
once (``[compute] shelved_offload_time_s`` = 0) or once that time has passed, the offload
removes the domain and the disks, unplugs the ports and gives back the claim (and so the
Placement allocation): ``shelved_offloaded``. The record, its ports and its bootstrap data
stay, so the instance keeps its uuid, ports and metadata.

Unshelve of a ``shelved`` instance starts it again. Of a ``shelved_offloaded`` one it claims
again (NO_CAPACITY when it no longer fits), builds the root disk from the snapshot, plugs the
same ports and launches the guest; the snapshot is then deleted. Another agent unshelves an
offloaded instance when ``instance.unshelve`` carries it (``shelved``: what
``instance.get_shelved`` of the agent that offloaded it answers): that agent records it as its
own for the unshelve, and forgets it again if the unshelve fails. The agent that offloaded it
keeps its record (``shelved_offloaded``, nothing held) until it is deleted there.

Volumes stay the instance's through a shelve (Nova keeps their attachments): the record keeps
them and the store their connections. The offload disconnects them with the domain (their
secrets go with it) and the unshelve connects them again with the same connection info. An
instance booted from a volume is not imaged: its shelve stops it and offloads it at once
(Nova's rule for volume-backed instances), it claims no ``DISK_GB`` on unshelve, and its guest
boots from its volume again. Another agent unshelving an instance with volumes is given its
own connection of each (``volumes`` of ``instance.unshelve``: what Cinder answers for that
host, as Nova asks it): the connections of the agent that offloaded it never leave it.

Every step is durable before the next: after a crash, an interrupted shelve is rolled back
(its unfinished image deleted), an interrupted offload is finished, and an interrupted
unshelve is rolled back to ``shelved_offloaded`` with its claim given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import msgspec

from fastcompute import protocol
from fastcompute.compute import volumes
from fastcompute.compute.manager import Manager
from fastcompute.compute.records import Stored, VolumeConnection, bootstrap_of, numa_cells, portable_bootstrap
from fastcompute.compute.snapshot import Snapshots
from fastcompute.errors import AgentError, BadRequest, Conflict
from fastcompute.hypervisor import DomainInfo
from fastcompute.images.cache import ImageSpec
from fastcompute.protocol import InstanceRecord, ShelvedInstance
from fastcompute.protocol.volumes import VolumeConnectionSpec, VolumeRecord, volume_type
from fastcompute.store import Store

log = logging.getLogger("fastcompute.shelve")

_SHELVE = protocol.OPS["instance.shelve"].rule()
_OFFLOAD = protocol.OPS["instance.shelve_offload"].rule()
_UNSHELVE = protocol.OPS["instance.unshelve"].rule()
_OFFLOADED = frozenset({"shelved_offloaded"})


class Shelver:
    """Shelving and unshelving of this host's instances, and the offload timer."""

    def __init__(self, manager: Manager, snapshots: Snapshots) -> None:
        self.manager = manager
        self.snapshots = snapshots
        manager.resumers[_SHELVE.task] = snapshots.recover
        manager.resumers[_OFFLOAD.task] = self._finish_offload
        manager.resumers[_UNSHELVE.task] = self._roll_back_unshelve
        manager.on_delete.append(self._delete_image)

    # -- shelve and offload ----------------------------------------------------------------------

    async def shelve(self, uuid: str) -> InstanceRecord:
        """``instance.shelve``: stop, snapshot, and offload when ``shelved_offload_time_s`` is 0."""
        m = self.manager
        async with m.held(uuid, "shelve", _SHELVE.needs) as stored:
            rec = stored.record
            bfv = volumes.boots_from_volume(stored)
            if not bfv and not m.cfg.images.glance_endpoint:
                raise Conflict("this host has no Image service to shelve to ([images] glance_endpoint)",
                               {"uuid": uuid})
            await m._commit(uuid, task_state=_SHELVE.task)
            stopped = False
            try:
                power = await m.driver.power_off(uuid, m.cfg.hypervisor.shutdown_timeout_s)
                stopped = True
                image_id = None if bfv else (await self.snapshots.upload(uuid, f"{rec.name}-shelved", {},
                                                                           "shelving_"))[0]
            except BaseException:
                # The guest stays stopped if it was: the state says what it is.
                if stopped:
                    await m._commit(uuid, task_state=None, vm_state="stopped", power_state="shutdown")
                else:
                    await m._commit(uuid, task_state=None)
                raise
            stored.shelved_at = time.time()
            rec = await m._commit(uuid, vm_state=_SHELVE.target, task_state=None, power_state=power,
                                  shelved_image_id=image_id)
            if bfv or m.cfg.compute.shelved_offload_time_s == 0:
                rec = await self._offload(uuid)
        return rec

    async def offload(self, uuid: str) -> InstanceRecord:
        """``instance.shelve_offload``: give back what a shelved instance holds here."""
        async with self.manager.held(uuid, "shelve-offload", _OFFLOAD.needs):
            return await self._offload(uuid)

    async def _offload(self, uuid: str) -> InstanceRecord:
        m = self.manager
        await m._commit(uuid, task_state=_OFFLOAD.task)
        try:
            return await self._release(uuid)
        except BaseException:
            await m._commit(uuid, task_state=None)
            raise

    async def _release(self, uuid: str) -> InstanceRecord:
        """Domain, disks, plugged ports and claim gone (each step may be repeated)."""
        m = self.manager
        assert m.tracker is not None
        await m.driver.destroy(uuid)
        await m.images.remove_disk(uuid)
        await m.network.unplug(uuid)
        m.tracker.release(uuid)
        m._mark_resources_changed()
        return await m._commit(uuid, vm_state=_OFFLOAD.target, task_state=None, power_state="nostate",
                               numa=None, extra=[Store.delete_claim(uuid)])

    async def _finish_offload(self, uuid: str, _dom: DomainInfo | None) -> bool:
        log.info("finishing the interrupted offload of %s", uuid)
        await self._release(uuid)
        return True

    async def run_offloader(self, stop: asyncio.Event) -> None:
        """Offload shelved instances once ``shelved_offload_time_s`` has passed (a periodic task)."""
        after = self.manager.cfg.compute.shelved_offload_time_s
        if after < 0:
            return
        period = min(max(after / 4, 0.5), 10.0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            now = time.time()
            for uuid, stored in list(self.manager.instances.items()):
                rec = stored.record
                if rec.vm_state == "shelved" and rec.task_state is None and (stored.shelved_at or 0) + after <= now:
                    try:
                        await self.offload(uuid)
                    except AgentError as exc:
                        log.warning("could not offload shelved instance %s: %s", uuid, exc.message)

    # -- unshelve --------------------------------------------------------------------------------

    async def unshelve(self, uuid: str, shelved: ShelvedInstance | None,
                       conns: Sequence[VolumeConnectionSpec] = ()) -> InstanceRecord:
        """``instance.unshelve``: here, or (``shelved``) an instance offloaded on another agent,
        its volumes reached through ``conns``."""
        m = self.manager
        adopted = shelved is not None and uuid not in m.instances
        if adopted:
            assert shelved is not None
            await self._adopt(uuid, shelved, conns)
        try:
            async with m.held(uuid, "unshelve", _UNSHELVE.needs) as stored:
                rec = stored.record
                image_id = rec.shelved_image_id
                if rec.vm_state == "shelved":
                    await m._commit(uuid, task_state=_UNSHELVE.task)
                    try:
                        power = await m.driver.power_on(uuid)
                    except BaseException:
                        await m._commit(uuid, task_state=None)
                        raise
                else:
                    power = await self._build(uuid, stored)
                # The snapshot is deleted once nothing needs it; recorded first, so that a
                # crash before the deletion deletes it at the next start.
                stored.shelved_at, stored.pending_image = None, image_id
                rec = await m._commit(uuid, vm_state=_UNSHELVE.target, task_state=None, power_state=power,
                                      shelved_image_id=None)
        except BaseException:
            if adopted:
                await self._forget(uuid)
            raise
        await self.snapshots.delete_pending(uuid)
        return rec

    async def _build(self, uuid: str, stored: Stored) -> str:
        """Claim, make the disk from the snapshot, plug the ports, launch; all undone on failure."""
        m = self.manager
        tracker = m.tracker
        assert tracker is not None
        rec = stored.record
        bfv = volumes.boots_from_volume(stored)
        if rec.shelved_image_id is None and not bfv:
            raise Conflict(f"instance {uuid} has no shelved image to unshelve from", {"uuid": uuid})
        claim = m.claim_flavor(uuid, rec.project_id, rec.flavor, 0 if bfv else None)
        request = claim.numa_request
        m._mark_resources_changed()
        try:
            await m._commit(uuid, task_state=_UNSHELVE.task, numa=numa_cells(request, claim.numa_placement),
                            extra=[m.store.put_claim(uuid, rec.project_id, claim)])
        except BaseException:
            tracker.release(uuid)
            raise
        try:
            if rec.shelved_image_id is not None:
                image = ImageSpec(id=rec.shelved_image_id, disk_format="qcow2")
                progress = m._progress(uuid)
                await m.images.fetch_base(image, rec.flavor.disk_gb, progress)
                await m.images.prepare_disk(uuid, image, rec.flavor.disk_gb, progress)
            else:
                m.instance_dir(uuid).mkdir(mode=0o700, parents=True, exist_ok=True)
            if m._drive_wanted(uuid):
                await m._write_config_drive(uuid)
            if stored.ports:
                await m.network.plug(uuid, stored.ports)
            return await m.driver.launch(m._guest(uuid), start=True)
        except BaseException:
            released = await m._undo(uuid)
            await m._commit(uuid, task_state=None, numa=None, extra=released)
            raise

    async def _roll_back_unshelve(self, uuid: str, _dom: DomainInfo | None) -> bool:
        m = self.manager
        rec = m.instances[uuid].record
        if rec.vm_state == "shelved":
            return False  # only a start was under way: cleared as any interrupted task
        log.info("rolling back the interrupted unshelve of %s", uuid)
        released = await m._undo(uuid)
        await m._commit(uuid, task_state=None, power_state="nostate", numa=None, extra=released)
        return True

    # -- moving between agents -------------------------------------------------------------------

    def get_shelved(self, uuid: str) -> ShelvedInstance:
        """``instance.get_shelved``: an offloaded instance as another agent unshelves it."""
        m = self.manager
        stored = m._get(uuid)
        rec = stored.record
        if rec.vm_state not in _OFFLOADED:
            raise Conflict(f"instance {uuid} is {rec.vm_state}, not shelved_offloaded",
                           {"vm_state": rec.vm_state})
        if rec.shelved_image_id is None and not volumes.boots_from_volume(stored):
            raise Conflict(f"instance {uuid} has no shelved image", {"uuid": uuid})
        return ShelvedInstance(record=rec, image_id=rec.shelved_image_id, ports=stored.ports,
                               bootstrap=portable_bootstrap(stored))

    async def _adopt(self, uuid: str, shelved: ShelvedInstance, conns: Sequence[VolumeConnectionSpec]) -> None:
        m = self.manager
        if protocol.normalise_uuid(shelved.record.uuid) != uuid:
            raise BadRequest("the shelved instance is another instance than uuid",
                             {"field": "args.shelved.record.uuid"})
        if shelved.record.vm_state != "shelved_offloaded":
            raise BadRequest("only a shelved_offloaded instance moves to another agent",
                             {"field": "args.shelved.record.vm_state"})
        if uuid in m._deleting:
            raise Conflict(f"instance {uuid} is being deleted", {"uuid": uuid})
        boot = bootstrap_of(shelved.bootstrap, "args.shelved.bootstrap")
        vols, vol_conns = _connected(shelved.record.volumes, conns)
        ports = await m._validate_ports(shelved.ports, uuid)
        if uuid in m.instances:
            raise Conflict(f"instance {uuid} is already on this host", {"uuid": uuid})
        rec = msgspec.structs.replace(shelved.record, uuid=uuid, host=m.hostname, task_state=None,
                                      power_state="nostate", numa=None, shelved_image_id=shelved.image_id,
                                      volumes=vols)
        stored = Stored(record=rec, digest="", ports=ports, bootstrap=boot, shelved_at=time.time(),
                        volumes=vol_conns)
        m.instances[uuid] = stored
        m._locks[uuid] = asyncio.Lock()
        m._own_ports(uuid, ports)
        try:
            await m.store.write([m.store.put_instance(uuid, rec.project_id, None, stored)])
        except BaseException:
            await self._forget(uuid)
            raise
        log.info("instance %s, offloaded on %s, taken over to unshelve it here", uuid, shelved.record.host)

    async def _forget(self, uuid: str) -> None:
        """Drop an adopted instance whose unshelve failed: the agent it came from keeps it."""
        m = self.manager
        stored = m.instances.pop(uuid, None)
        m._locks.pop(uuid, None)
        if stored is not None:
            m._disown_ports(uuid, stored.ports)
        await m.store.write([Store.delete_instance(uuid)])

    async def _delete_image(self, stored: Stored) -> None:
        """A deleted shelved instance's snapshot goes with it."""
        image_id = stored.record.shelved_image_id
        if image_id is not None:
            await self.snapshots.delete_quietly(image_id, stored.record.uuid)


def _connected(vols: list[VolumeRecord], conns: Sequence[VolumeConnectionSpec],
               ) -> tuple[list[VolumeRecord], dict[str, VolumeConnection]]:
    """An adopted instance's volumes with this host's connections: one for each of them (and
    none other), BAD_REQUEST naming ``args.volumes`` otherwise."""
    wanted = [v.volume_id for v in vols]
    if sorted(c.id for c in conns) != sorted(wanted):
        raise BadRequest(f"invalid request: args.volumes: this host's connection of each volume of the instance "
                         f"is needed, and only those: {', '.join(wanted) or 'none'}",
                         {"field": "args.volumes", "volumes": wanted})
    by_id = {c.id: (i, c.connection_info) for i, c in enumerate(conns)}
    out: dict[str, VolumeConnection] = {}
    for vid, (i, info) in by_id.items():
        out[vid] = VolumeConnection(connection_info=info,
                                    source_kind=volumes.source_kind(info, f"args.volumes[{i}].connection_info"))
    # The type may differ here (Cinder answers per host): the record says what this host uses.
    return [msgspec.structs.replace(v, driver_volume_type=volume_type(out[v.volume_id].connection_info))
            for v in vols], out
