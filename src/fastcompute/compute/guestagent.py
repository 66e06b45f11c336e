"""The ops a guest's QEMU guest agent carries out: a user's password, file-system freeze and thaw.

Each needs an active instance with no task under way (CONFLICT naming its state otherwise),
runs under the instance's lock, and first pings the agent (``[hypervisor]
guest_agent_timeout_s``): a guest that runs no agent, or whose agent does not answer, is a
CONFLICT saying so, rather than a call that hangs. Nothing of these ops is recorded: the
instance's record does not change, and the password is never stored, logged, put in a reply
or an event.
"""

from __future__ import annotations

import logging

from fastcompute.compute.manager import Manager
from fastcompute.config import HypervisorConfig
from fastcompute.errors import Conflict
from fastcompute.protocol.schema import PasswordSet, Quiesced

log = logging.getLogger("fastcompute.guestagent")


class GuestAgent:
    """``instance.set_password``, ``instance.quiesce`` and ``instance.unquiesce``."""

    def __init__(self, manager: Manager, cfg: HypervisorConfig) -> None:
        self.manager = manager
        self.ping_timeout_s = cfg.guest_agent_timeout_s
        self.timeout_s = cfg.guest_agent_command_timeout_s

    async def _answers(self, uuid: str) -> None:
        if not await self.manager.driver.guest_agent_ping(uuid, self.ping_timeout_s):
            raise Conflict(f"instance {uuid}: the guest runs no guest agent, or it did not answer within "
                           f"{self.ping_timeout_s:g}s", {"uuid": uuid, "reason": "no guest agent"})

    async def set_password(self, uuid: str, user: str, password: str) -> PasswordSet:
        """Set ``user``'s password in the guest."""
        async with self.manager.held(uuid, "set the password of"):
            await self._answers(uuid)
            await self.manager.driver.set_password(uuid, user, password, self.timeout_s)
        log.info("password of user %s set in instance %s", user, uuid)
        return PasswordSet(uuid=uuid, user=user)

    async def quiesce(self, uuid: str) -> Quiesced:
        """Freeze the guest's file systems (until ``unquiesce``: nothing thaws them otherwise)."""
        async with self.manager.held(uuid, "quiesce"):
            await self._answers(uuid)
            frozen = await self.manager.driver.freeze_filesystems(uuid, self.timeout_s)
        log.info("instance %s: %d file systems frozen", uuid, frozen)
        return Quiesced(uuid=uuid, filesystems=frozen)

    async def unquiesce(self, uuid: str) -> Quiesced:
        """Thaw the guest's file systems."""
        async with self.manager.held(uuid, "unquiesce"):
            await self._answers(uuid)
            thawed = await self.manager.driver.thaw_filesystems(uuid, self.timeout_s)
        log.info("instance %s: %d file systems thawed", uuid, thawed)
        return Quiesced(uuid=uuid, filesystems=thawed)
