"""``instance.crash_dump``: a non-maskable interrupt into the guest (Nova's
``trigger_crash_dump``), whose kernel, when set up for it, panics and writes a crash dump.

Allowed in Nova's states (``protocol.ops.CRASH_DUMP_STATES``) with no task under way, under the
instance's lock; a guest that does not run is CONFLICT. Nothing is recorded: the instance's
state changes only as the guest's reaction makes it (a panicked guest that stops is seen by the
power sync).
"""

from __future__ import annotations

import logging

from fastcompute.compute.manager import Manager
from fastcompute.protocol import InstanceRecord
from fastcompute.protocol.ops import CRASH_DUMP_STATES

log = logging.getLogger("fastcompute.crashdump")


async def crash_dump(m: Manager, uuid: str) -> InstanceRecord:
    """Inject an NMI into ``uuid``'s guest; the reply is the instance."""
    async with m.held(uuid, "trigger a crash dump of", CRASH_DUMP_STATES) as stored:
        await m.driver.inject_nmi(uuid)
    log.warning("NMI injected into instance %s (crash dump asked for)", uuid)
    return stored.record
