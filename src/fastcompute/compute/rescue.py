"""``instance.rescue`` and ``instance.unrescue``: boot an instance from a rescue image with its
own root disk attached second, and back (Nova's rescue).

A rescue records its task (``rescuing``) and the rescue image (``Stored.rescue``, which is also
what makes the manager describe the guest with the rescue disk first) before it makes
``disk.rescue`` from the image through the cache, stops the guest (ACPI, then forced), and
launches the rescue domain: ``rescued``. Anything failing, or a crash before ``rescued`` is
committed, rolls back: the rescue disk removed and the instance's own domain as it was. An
unrescue (``unrescuing``) removes the rescue domain and disk and launches the instance's own
domain: ``active``; a crash in it finishes it at the next start. A rescued instance keeps its
rescue domain over agent restarts, and a lost one is re-made rescued.

Volumes stay attached through a rescue, after the instance's own disks (Nova's). An instance
booted from a volume is rescued as Nova's stable device rescue does: the rescue disk is the
boot disk, the boot volume and the others follow, and unrescue boots from the volume again;
the rescue image is then required (BAD_REQUEST naming ``args.image``: there is no image of the
instance's own). Volumes keep their device names; the rescue disk (and an image-backed
instance's root disk) take the first free names.
"""

from __future__ import annotations

import logging

from fastcompute.compute import tasks, volumes
from fastcompute.compute.manager import Manager, _typed
from fastcompute.errors import BadRequest, Conflict
from fastcompute.hypervisor import DomainInfo
from fastcompute.images import disks
from fastcompute.protocol import OPS, Fault, InstanceRecord
from fastcompute.protocol.schema import SpawnImage

log = logging.getLogger("fastcompute.rescue")

_RESCUE = OPS["instance.rescue"].rule()
_UNRESCUE = OPS["instance.unrescue"].rule()
_ALIVE = frozenset({"active", "stopped", "paused", "suspended"})


class Rescue:
    """Rescues of this host's instances, and their completion after a crash."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        manager.resumers[_RESCUE.task] = tasks.settles(self._roll_back)
        manager.resumers[_UNRESCUE.task] = tasks.settles(self._unrescue)

    async def rescue(self, uuid: str, image: SpawnImage | None) -> InstanceRecord:
        """Boot ``uuid`` from ``image`` (None: its own image), its root disk second."""
        m = self.m
        async with m.held(uuid, "rescue", _RESCUE.needs) as stored:
            tasks.needs_claim(m, uuid, "rescue")
            rec = stored.record
            bfv = volumes.boots_from_volume(stored)
            if bfv and image is None:
                raise BadRequest("invalid request: args.image: an instance booted from a volume has no image "
                                 "of its own to rescue it from", {"field": "args.image", "reason": "required"})
            if not bfv and not disks.path(m.instance_dir(uuid), "root").exists():
                raise Conflict(f"cannot rescue instance {uuid}: it has no root disk", {"uuid": uuid})
            chosen = image.without_token() if image is not None else rec.image
            was = rec.vm_state
            stored.rescue = chosen
            await m._commit(uuid, task_state=_RESCUE.task)
            tasks.step("rescue:recorded")
            async with tasks.undone_on_failure(f"rescue of {uuid}", lambda: self._roll_back(uuid, None)):
                await tasks.make_disk(m, uuid, "rescue", chosen, image.token if image is not None else None)
                tasks.step("rescue:disk-made")
                if was == "active":
                    await m.driver.power_off(uuid, m.cfg.hypervisor.shutdown_timeout_s)
                await m.driver.destroy(uuid)
                tasks.step("rescue:destroyed")
                power = await m.driver.launch(m._guest(uuid), start=True)
                tasks.step("rescue:launched")
            log.info("instance %s rescued from %s", uuid, chosen.id or chosen.url)
            return await m._commit(uuid, vm_state=_RESCUE.target, task_state=None, power_state=power, fault=None)

    async def unrescue(self, uuid: str) -> InstanceRecord:
        """Boot a rescued ``uuid`` from its own root disk again."""
        m = self.m
        async with m.held(uuid, "unrescue", _UNRESCUE.needs):
            await m._commit(uuid, task_state=_UNRESCUE.task)
            tasks.step("unrescue:recorded")
            return await self._unrescue(uuid, None)

    async def _roll_back(self, uuid: str, dom: DomainInfo | None) -> None:
        """Undo a rescue not committed. The instance's own domain is left alone while no rescue
        disk exists (the rescue touches the domain only once it has made one); otherwise the
        domain may be the rescue one, and the instance's own is made again as the record says."""
        m = self.m
        stored = m.instances[uuid]
        rec = stored.record
        log.info("rolling back the rescue of %s", uuid)
        dom = dom or await tasks.domain(m, uuid)
        if disks.path(m.instance_dir(uuid), "rescue").exists():
            await m.driver.destroy(uuid)
            dom = None
        await m.images.remove_role_disk(uuid, "rescue")
        stored.rescue = None
        power = dom.power_state if dom is not None else "nostate"
        if dom is None and rec.vm_state in _ALIVE:
            power = await m._recreate(uuid, rec.vm_state)
        await m._commit(uuid, task_state=None, power_state=power)

    async def _unrescue(self, uuid: str, _dom: DomainInfo | None) -> InstanceRecord:
        m = self.m
        stored = m.instances[uuid]
        try:
            await m.driver.destroy(uuid)
            tasks.step("unrescue:destroyed")
            await m.images.remove_role_disk(uuid, "rescue")
            stored.rescue = None
            tasks.step("unrescue:disk-removed")
            power = await m.driver.launch(m._guest(uuid), start=True)
            tasks.step("unrescue:launched")
        except Exception as exc:
            err = _typed(exc, f"unrescue of {uuid}")
            stored.rescue = None
            await m._commit(uuid, vm_state="error", task_state=None, power_state="nostate",
                            fault=Fault(err.code, err.message))
            raise err from None
        log.info("instance %s unrescued", uuid)
        return await m._commit(uuid, vm_state=_UNRESCUE.target, task_state=None, power_state=power, fault=None)
