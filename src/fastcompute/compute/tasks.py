"""What the image workflows (rebuild, rescue, soft delete, crash dump) share beyond
``Manager.held``: the claim a launch needs, a disk of a role made through the cache, the
resumer wrapper, and the named steps a crash test stops at.

Each workflow records its task (and what it is about to make) in the store before its first
change, and registers with the manager how start-up finishes or rolls back that task
(``Manager.resumers``), so that a kill -9 at any step leaves a state the next start completes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from fastcompute.compute.manager import Manager, _typed
from fastcompute.compute.records import spec_of
from fastcompute.errors import AgentError, Conflict
from fastcompute.hypervisor import DomainInfo
from fastcompute.protocol import Image

CRASH_AT_ENV: Final = "FASTCOMPUTE_CRASH_AT"
"""For the restart tests: the name of a step (``rebuild:destroyed``) at which the agent kills
itself with SIGKILL, as a crash there would. Unset in any real deployment."""

_crash_at: Final = os.environ.get(CRASH_AT_ENV)


def settles(finish: Callable[[str, DomainInfo | None], Awaitable[object]]) -> Callable[[str, DomainInfo | None],
                                                                                       Awaitable[bool]]:
    """``finish`` as a resumer (``Manager.resumers``) that always settles the instance."""
    async def resume(uuid: str, dom: DomainInfo | None) -> bool:
        await finish(uuid, dom)
        return True
    return resume


def step(name: str) -> None:
    """Mark a step of a workflow; with ``FASTCOMPUTE_CRASH_AT`` naming it, die there (SIGKILL)."""
    if _crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)


def needs_claim(m: Manager, uuid: str, op: str) -> None:
    """An op that launches a domain needs the instance's claim: a failed build gave it back."""
    tracker = m.tracker
    if tracker is None or uuid not in tracker.claims:
        raise Conflict(f"cannot {op} instance {uuid}: its failed build holds no resources; "
                       "a hard reboot takes them again", {"uuid": uuid, "reason": "no claim"})


async def domain(m: Manager, uuid: str) -> DomainInfo | None:
    """The instance's domain as the hypervisor has it now (None: none, or it cannot say)."""
    try:
        return await m.driver.info(uuid)
    except AgentError:
        return None


async def make_disk(m: Manager, uuid: str, role: str, image: Image, token: str | None) -> None:
    """The instance's disk of ``role`` made from ``image`` through the cache (fetched first with
    the tenant's ``token``, as a spawn's), sized as the flavor's root disk."""
    disk_gb = m.instances[uuid].record.flavor.disk_gb
    await m.images.fetch_base(spec_of(image), disk_gb, m._progress(uuid), token=token)
    await m.images.prepare_disk(uuid, spec_of(image), disk_gb, m._progress(uuid), role=role)


@contextlib.asynccontextmanager
async def undone_on_failure(what: str, undo: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Whatever stops the body (an error, a cancel), ``undo`` runs; an error that is no
    AgentError is a bug met on the way, reported as a typed error naming ``what``."""
    try:
        yield
    except BaseException as exc:
        await undo()
        if isinstance(exc, AgentError) or not isinstance(exc, Exception):
            raise
        raise _typed(exc, what) from None
