"""``instance.rebuild``: a new root disk from another image, the instance otherwise the same
(uuid, ports, claim, metadata), as Nova's rebuild.

Steps, each durable before the next: the task ``rebuilding`` with the new image recorded; the
new image fetched through the cache and the new root disk made beside the old one
(``disk.rebuild``); the old domain removed; then ``rebuild_spawning`` with the new image in the
record (from here on the rebuild finishes forward); the new disk renamed over the old one; the
config drive re-made; the domain launched. A crash while ``rebuilding`` rolls back (the made
disk removed, the old domain re-created as it was); a crash while ``rebuild_spawning`` finishes.
A failed fetch or disk leaves the instance as it was, running; a launch that fails leaves it
``error`` with its new disk and its claim (a hard reboot recovers it). A stopped instance stays
stopped (Nova's rule); an active or failed one ends ``active``. Its volumes stay attached:
the new domain has them as the old one had. An instance booted from a volume is refused
(CONFLICT): its root is the volume, which only Cinder could re-image (Nova's API before 2.93
refuses a volume-backed rebuild to another image too).
"""

from __future__ import annotations

import logging

from fastcompute.compute import tasks, volumes
from fastcompute.compute.manager import Manager, _typed
from fastcompute.errors import Conflict
from fastcompute.hypervisor import DomainInfo
from fastcompute.protocol import OPS, Fault, InstanceRecord
from fastcompute.protocol.schema import SpawnImage

log = logging.getLogger("fastcompute.rebuild")

_RULE = OPS["instance.rebuild"].rule()
_SPAWNING = "rebuild_spawning"
_ALIVE = frozenset({"active", "stopped", "paused", "suspended"})


class Rebuild:
    """Rebuilds of this host's instances, and their completion after a crash."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        manager.resumers[_RULE.task] = tasks.settles(self._roll_back)
        manager.resumers[_SPAWNING] = tasks.settles(self._finish)

    async def rebuild(self, uuid: str, image: SpawnImage) -> InstanceRecord:
        """Rebuild ``uuid`` from ``image``; the reply is the rebuilt instance."""
        m = self.m
        async with m.held(uuid, "rebuild", _RULE.needs) as stored:
            tasks.needs_claim(m, uuid, "rebuild")
            if volumes.boots_from_volume(stored):
                raise Conflict(f"cannot rebuild instance {uuid} from an image: it boots from a volume, "
                               "which only the volume service could re-image", {"uuid": uuid})
            rec = stored.record
            new = image.without_token()
            stored.rebuild = new
            await m._commit(uuid, task_state=_RULE.task)
            tasks.step("rebuild:recorded")
            async with tasks.undone_on_failure(f"rebuild of {uuid}", lambda: self._roll_back(uuid, None)):
                await tasks.make_disk(m, uuid, "rebuild", new, image.token)
                tasks.step("rebuild:disk-made")
                await m.driver.destroy(uuid)
                tasks.step("rebuild:destroyed")
            rec.image, stored.rebuild = new, None
            await m._commit(uuid, task_state=_SPAWNING)
            tasks.step("rebuild:spawning")
            return await self._finish(uuid, None)

    async def _roll_back(self, uuid: str, dom: DomainInfo | None) -> None:
        """Undo a rebuild that had not removed the old root disk: the instance as before it.
        ``dom`` is its domain as start-up found it (None: looked up now)."""
        m = self.m
        stored = m.instances[uuid]
        log.info("rolling back the rebuild of %s", uuid)
        dom = dom or await tasks.domain(m, uuid)
        await m.images.remove_role_disk(uuid, "rebuild")
        stored.rebuild = None
        rec = stored.record
        power = dom.power_state if dom is not None else rec.power_state
        if dom is None and rec.vm_state in _ALIVE:
            power = await m._recreate(uuid, rec.vm_state)
        await m._commit(uuid, task_state=None, power_state=power)

    async def _finish(self, uuid: str, _dom: DomainInfo | None) -> InstanceRecord:
        """From ``rebuild_spawning``: the new disk in place of the old, the drive, the domain."""
        m = self.m
        rec = m.instances[uuid].record
        target = "stopped" if rec.vm_state == "stopped" else "active"
        try:
            await m.driver.destroy(uuid)  # a domain launched before a crash: launched again below
            await m.images.promote_disk(uuid, "rebuild", "root")
            tasks.step("rebuild:promoted")
            if m._drive_wanted(uuid):
                await m._write_config_drive(uuid)
            power = await m.driver.launch(m._guest(uuid), start=target == "active")
            tasks.step("rebuild:launched")
        except Exception as exc:
            err = _typed(exc, f"rebuild of {uuid}")
            log.warning("rebuild of %s failed after its old disk was gone: %s", uuid, err.message)
            await m._commit(uuid, vm_state="error", task_state=None, power_state="nostate",
                            fault=Fault(err.code, err.message))
            raise err from None
        log.info("instance %s rebuilt from %s", uuid, rec.image.id or rec.image.url)
        return await m._commit(uuid, vm_state=target, task_state=None, power_state=power, fault=None)

