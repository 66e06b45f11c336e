"""``instance.snapshot``: an instance's root disk saved as a new image in the Image service.

A running guest keeps running. Its file systems are frozen through its guest agent when it
has one (and always thawed), the hypervisor makes the disk a point-in-time copy (a disk-only
snapshot sends the guest's writes to an overlay: ``Driver.freeze_disk``), and the frozen chain
is streamed to Glance as a qcow2 image holding only the clusters with data
(:mod:`fastcompute.images.export`): no second copy of the disk is written. The overlay is then
merged back. Task states are Nova's: ``image_snapshot`` (the image is created and the copy
taken), ``image_pending_upload`` (the chain is mapped), ``image_uploading``.

The image's id is chosen here and recorded (``Stored.pending_image``) before Glance is asked
to create it, so that whatever stops the agent, the next start deletes an image that was not
completed (:meth:`Snapshots.recover`), merges an overlay left behind and thaws the guest: no
half image stays in Glance and no temporary disk on the host.

Only the root disk is saved: attached volumes are not part of the image (Nova's snapshot of
an image-backed instance). An instance booted from a volume is refused (CONFLICT): Nova
snapshots its volumes through Cinder and uploads an image holding only their mapping, and
this agent has no volume service to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuid_mod
from typing import Any

from fastcompute import protocol
from fastcompute.compute import volumes
from fastcompute.compute.manager import Manager
from fastcompute.compute.records import Stored
from fastcompute.errors import AgentError, Conflict, ImageError
from fastcompute.hypervisor import DomainInfo
from fastcompute.images import disks, export
from fastcompute.images.sources.common import redact
from fastcompute.protocol import Snapshotted

log = logging.getLogger("fastcompute.snapshot")

_RULE = protocol.OPS["instance.snapshot"].rule()
# Nova's task states, with the prefix a shelve's snapshot gives them.
_STEPS = ("image_snapshot", "image_pending_upload", "image_uploading")
TASKS = frozenset(_STEPS) | frozenset(f"shelving_{t}" for t in _STEPS[1:])


class Snapshots:
    """Snapshots of this host's instances to the Image service."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.glance = manager.images.glance()
        for task in TASKS:
            manager.resumers[task] = self.recover
        manager.resumers[""] = self._sweep
        manager.on_delete.append(self._forget_pending)

    async def snapshot(self, uuid: str, name: str, properties: dict[str, str]) -> Snapshotted:
        """``instance.snapshot``: the new image's id once it is complete in the Image service."""
        m = self.manager
        if not m.cfg.images.glance_endpoint:
            raise Conflict("this host has no Image service to save snapshots to ([images] glance_endpoint)",
                           {"uuid": uuid})
        async with m.held(uuid, "snapshot", _RULE.needs) as stored:
            if volumes.boots_from_volume(stored):
                raise Conflict(f"cannot snapshot instance {uuid}: it boots from a volume, whose snapshot is "
                               "the volume service's to take", {"uuid": uuid})
            await m._commit(uuid, task_state=_RULE.task)
            try:
                image_id, size = await self.upload(uuid, name, properties, "")
            finally:
                await m._commit(uuid, task_state=None)
        return Snapshotted(uuid=uuid, image_id=image_id, name=name, size=size)

    async def upload(self, uuid: str, name: str, properties: dict[str, str], prefix: str) -> tuple[str, int]:
        """Save the root disk as image ``name`` (under the instance's lock, with its task
        recorded); its id and size. On any failure the image is deleted again."""
        m = self.manager
        stored = m.instances[uuid]
        image_id = str(uuid_mod.uuid4())
        stored.pending_image = image_id
        await m._commit(uuid, snapshot_id=image_id)
        try:
            idir = m.instance_dir(uuid)
            disk, overlay = disks.path(idir, "root"), disks.path(idir, "snapshot")
            # The point in time first: the guest is frozen for that moment only, whatever the
            # Image service then takes to answer.
            frozen = await self._freeze(uuid)
            try:
                redirected = await m.driver.freeze_disk(uuid, str(disk), str(overlay))
            finally:
                if frozen:
                    await self._thaw(uuid)
            try:
                await self.glance.create(self._image_body(stored, image_id, name, properties))
                await m._commit(uuid, task_state=prefix + _STEPS[1])
                loop = asyncio.get_running_loop()
                chain = await loop.run_in_executor(m.images.executor, export.plan, disk)
                await m._commit(uuid, task_state=prefix + _STEPS[2])
                started = time.monotonic()
                progress = m._progress(uuid)
                await self.glance.upload(image_id, export.stream(
                    chain, m.images.executor, lambda done, total: progress("upload", done, total)), chain.size)
            finally:
                if redirected:
                    await m.driver.merge_disk(uuid, str(disk), str(overlay))
        except BaseException as exc:
            await asyncio.shield(self._abandon(uuid, stored, image_id))
            if isinstance(exc, AgentError) or not isinstance(exc, Exception):
                raise
            raise ImageError(f"snapshot of {uuid} failed: {exc}") from exc
        stored.pending_image = None
        await m._commit(uuid)
        log.info("instance %s saved as image %s (%d bytes in %.1fs)", uuid, image_id, chain.size,
                 time.monotonic() - started)
        return image_id, chain.size

    def _image_body(self, stored: Stored, image_id: str, name: str, properties: dict[str, str]) -> dict[str, Any]:
        rec = stored.record
        base = rec.image.id or (redact(rec.image.url) if rec.image.url else "")
        # Nova's snapshot properties; the caller's own come first, so that these win.
        return {
            **properties,
            "id": image_id, "name": name, "disk_format": "qcow2", "container_format": "bare",
            "visibility": "private", "owner": rec.project_id,
            "min_disk": rec.flavor.disk_gb, "min_ram": rec.flavor.memory_mb,
            "image_type": "snapshot", "instance_uuid": rec.uuid, "base_image_ref": base,
        }

    async def _freeze(self, uuid: str) -> bool:
        """Freeze the guest's file systems when it runs and its agent answers."""
        d, hv = self.manager.driver, self.manager.cfg.hypervisor
        info = await d.info(uuid)
        if info is None or info.power_state != "running":
            return False
        if not await d.guest_agent_ping(uuid, hv.guest_agent_timeout_s):
            log.info("instance %s has no guest agent: snapshot without freezing its file systems", uuid)
            return False
        await d.freeze_filesystems(uuid, hv.guest_agent_command_timeout_s)
        return True

    async def _thaw(self, uuid: str) -> None:
        try:
            await self.manager.driver.thaw_filesystems(uuid, self.manager.cfg.hypervisor.guest_agent_command_timeout_s)
        except AgentError as exc:
            log.error("could not thaw the file systems of %s: %s", uuid, exc.message)

    async def _abandon(self, uuid: str, stored: Stored, image_id: str) -> None:
        """Delete a snapshot's unfinished image, then forget it (in that order: a crash in
        between deletes it again at the next start)."""
        try:
            await self.glance.delete(image_id)
        except AgentError as exc:
            log.error("could not delete the unfinished image %s of %s: %s", image_id, uuid, exc.message)
            return
        stored.pending_image = None
        if self.manager.instances.get(uuid) is stored:
            await self.manager._commit(uuid, snapshot_id=None)

    async def delete_pending(self, uuid: str) -> None:
        """Delete the image recorded as one to delete (an unshelved instance's snapshot)."""
        stored = self.manager.instances.get(uuid)
        if stored is not None and stored.pending_image is not None:
            await self._abandon(uuid, stored, stored.pending_image)

    async def _sweep(self, uuid: str, _dom: DomainInfo | None) -> bool:
        """At start, for an instance with no task: an image it was to delete, deleted."""
        await self.delete_pending(uuid)
        return False

    async def _forget_pending(self, stored: Stored) -> None:
        if stored.pending_image is not None:
            await self.delete_quietly(stored.pending_image, stored.record.uuid)

    async def delete_quietly(self, image_id: str, uuid: str) -> None:
        """Delete an image of a deleted instance: an Image service that cannot be reached
        does not stop the delete (the image is left there, and logged)."""
        try:
            await self.glance.delete(image_id)
        except AgentError as exc:
            log.error("instance %s is deleted, but its image %s could not be: %s", uuid, image_id, exc.message)

    async def recover(self, uuid: str, _dom: DomainInfo | None = None) -> bool:
        """Start-up after a crash mid-snapshot: the overlay merged back, the guest thawed, the
        unfinished image deleted; the task is then cleared as any interrupted one. A domain
        that stopped with the overlay in place (its host went down) names the overlay in its
        definition: it is defined again from the record, in the state the record says."""
        m = self.manager
        stored = m.instances[uuid]
        idir = m.instance_dir(uuid)
        overlay = disks.path(idir, "snapshot")
        redefine = False
        if overlay.exists():
            before = await m.driver.info(uuid)
            redefine = before is not None and before.power_state not in ("running", "paused")
            log.info("merging the snapshot overlay of %s back into its disk", uuid)
            await m.driver.merge_disk(uuid, str(disks.path(idir, "root")), str(overlay))
        info = await m.driver.info(uuid)
        if info is not None and info.power_state == "running":
            with contextlib.suppress(AgentError):
                if await m.driver.guest_agent_ping(uuid, m.cfg.hypervisor.guest_agent_timeout_s):
                    await self._thaw(uuid)
        if stored.pending_image is not None:
            log.info("deleting the unfinished snapshot image %s of %s", stored.pending_image, uuid)
            await self._abandon(uuid, stored, stored.pending_image)
        if not redefine:
            return False
        await m.driver.destroy(uuid)
        vm_state = stored.record.vm_state
        await m._commit(uuid, task_state=None, power_state=await m._recreate(uuid, vm_state))
        return True
