"""Soft delete (Nova's ``reclaim_instance_interval``): ``instance.delete``, ``instance.restore``,
``instance.force_delete`` and the periodic reclaim.

With ``[compute] reclaim_instance_interval_s`` above 0, a delete of a launched instance with no
task under way (active, stopped, paused, suspended) stops its guest (``soft-deleting``) and
keeps it ``soft_deleted``: its disk, ports and claim stay held. ``instance.restore`` powers it
on again (``restoring`` → ``active``); the reclaim deletes those soft-deleted longer than the
interval; ``instance.force_delete`` deletes at once from any state. Any other delete (interval
0, or an instance building, failed, rescued, busy or soft-deleted already) is the real delete.
A crash in ``soft-deleting`` or ``restoring`` is finished at the next start.
"""

from __future__ import annotations

import logging
import time

from fastcompute.compute import tasks
from fastcompute.compute.manager import Manager
from fastcompute.config import ComputeConfig
from fastcompute.hypervisor import DomainInfo
from fastcompute.protocol import OPS, Deleted, InstanceRecord

log = logging.getLogger("fastcompute.softdelete")

_RESTORE = OPS["instance.restore"].rule()
_SOFT_DELETING = "soft-deleting"
_SOFT_DELETED = "soft_deleted"
_LAUNCHED = frozenset({"active", "stopped", "paused", "suspended"})


class SoftDelete:
    """Deletes as ``[compute]`` says, restores and reclaims."""

    def __init__(self, manager: Manager, cfg: ComputeConfig) -> None:
        self.m = manager
        self.interval_s = cfg.reclaim_instance_interval_s
        manager.resumers[_SOFT_DELETING] = tasks.settles(self._finish_delete)
        manager.resumers[_RESTORE.task] = tasks.settles(self._finish_restore)

    async def delete(self, uuid: str) -> Deleted | InstanceRecord:
        """``instance.delete``: the soft-deleted instance when it is kept, else as deleted."""
        m = self.m
        rec = m._get(uuid).record
        if self.interval_s <= 0 or rec.task_state is not None or rec.vm_state not in _LAUNCHED:
            return await m.delete(uuid)
        async with m.held(uuid, "soft delete", _LAUNCHED):
            await m._commit(uuid, task_state=_SOFT_DELETING)
            tasks.step("soft-delete:recorded")
            return await self._finish_delete(uuid, None)

    async def force_delete(self, uuid: str) -> Deleted:
        """``instance.force_delete``: the real delete, whatever the interval and the state."""
        return await self.m.delete(uuid)

    async def restore(self, uuid: str) -> InstanceRecord:
        """``instance.restore``: a soft-deleted instance powered on again."""
        m = self.m
        async with m.held(uuid, "restore", _RESTORE.needs):
            await m._commit(uuid, task_state=_RESTORE.task)
            tasks.step("restore:recorded")
            try:
                return await self._finish_restore(uuid, None)
            except BaseException:
                await m._commit(uuid, task_state=None)
                raise

    async def reclaim(self) -> None:
        """Delete the instances soft-deleted longer than the interval (a periodic task)."""
        if self.interval_s <= 0:
            return
        due = time.time() - self.interval_s
        for uuid, stored in list(self.m.instances.items()):
            rec = stored.record
            if rec.vm_state == _SOFT_DELETED and rec.task_state is None and (stored.soft_deleted_at or 0) <= due:
                log.info("reclaiming instance %s, soft-deleted more than %gs ago", uuid, self.interval_s)
                await self.m.delete(uuid, only_if=_SOFT_DELETED)

    async def _finish_delete(self, uuid: str, _dom: DomainInfo | None) -> InstanceRecord:
        m = self.m
        stored = m.instances[uuid]
        dom = await tasks.domain(m, uuid)
        if dom is None:
            # Gone (the host restarted): defined again, not started, so that a restore finds it.
            power = await m._recreate(uuid, _SOFT_DELETED)
        else:
            power = await m.driver.power_off(uuid, m.cfg.hypervisor.shutdown_timeout_s)
        tasks.step("soft-delete:stopped")
        if stored.soft_deleted_at is None:
            stored.soft_deleted_at = time.time()
        log.info("instance %s soft-deleted; reclaimed in %gs unless restored", uuid, self.interval_s)
        return await m._commit(uuid, vm_state=_SOFT_DELETED, task_state=None, power_state=power)

    async def _finish_restore(self, uuid: str, _dom: DomainInfo | None) -> InstanceRecord:
        m = self.m
        dom = await tasks.domain(m, uuid)
        if dom is None:
            power = await m._recreate(uuid, "active")
        else:
            power = await m.driver.power_on(uuid)
        tasks.step("restore:started")
        m.instances[uuid].soft_deleted_at = None
        return await m._commit(uuid, vm_state=_RESTORE.target, task_state=None, power_state=power)
