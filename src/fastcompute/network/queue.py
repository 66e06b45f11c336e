"""The queue of changes to the host's ports, and their batching.

Changes run one at a time, in the order queued. Plugs (or unplugs) queued behind one another
run as one batch: one nftables transaction, and for unplugs one link deletion request, which
is what makes a boot storm or a mass delete cost less per port than one change alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastcompute.protocol.ports import Port

log = logging.getLogger(__name__)

Kind = Literal["plug", "unplug", "other"]


@dataclass
class Change:
    """A queued change: a plug, an unplug, or another change that runs alone (``call``)."""

    kind: Kind
    done: asyncio.Future[Any]
    instance_uuid: str = ""
    ports: list[Port] = field(default_factory=list)
    port_ids: list[str] | None = None
    call: Callable[[], Awaitable[Any]] | None = None


def settle(change: Change, outcome: Any) -> None:
    """Give a change's waiter its result, or its exception when ``outcome`` is one."""
    if change.done.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        change.done.cancel()
    elif isinstance(outcome, BaseException):
        change.done.set_exception(outcome)
    else:
        change.done.set_result(outcome)


BatchRunner = Callable[[list[Change]], Awaitable[None]]


class ChangeQueue:
    """Runs queued changes in order on the event loop; runs of plugs or unplugs are batches.

    ``plug`` and ``unplug`` run a batch and settle each of its changes; ``on_batch`` (kind,
    changes, seconds) is told of every batch that ran.
    """

    def __init__(self, plug: BatchRunner, unplug: BatchRunner) -> None:
        self._runners: dict[Kind, BatchRunner] = {"plug": plug, "unplug": unplug}
        self._queue: deque[Change] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.on_batch: Callable[[str, int, float], object] | None = None

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        return not self._queue and (self._drainer is None or self._drainer.done())

    def change(self, kind: Kind, **fields: Any) -> Change:
        """A new change, to :meth:`submit`."""
        return Change(kind, asyncio.get_running_loop().create_future(), **fields)

    async def submit(self, change: Change) -> Any:
        """Queue a change and wait for its outcome."""
        self._queue.append(change)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await change.done

    async def _drain(self) -> None:
        """Run the queued changes in order; a run of plugs (or unplugs) is one batch.

        A caller that stops waiting (cancelled) before its change starts is skipped; once
        started, a change completes, as a change in a worker thread cannot be stopped midway.
        """
        while self._queue:
            batch = [self._queue.popleft()]
            kind = batch[0].kind
            while kind != "other" and self._queue and self._queue[0].kind == kind:
                batch.append(self._queue.popleft())
            live = [c for c in batch if not c.done.done()]
            if not live:
                continue
            started = time.monotonic()
            try:
                await self._run(kind, live)
            except BaseException as exc:
                for c in live:
                    settle(c, exc)
                if not isinstance(exc, Exception):  # cancelled (shutdown): nobody is left to run the rest
                    for c in self._queue:
                        settle(c, exc)
                    self._queue.clear()
                    raise
            self._observe(kind, len(live), time.monotonic() - started)

    async def _run(self, kind: Kind, live: list[Change]) -> None:
        if kind == "other":
            call = live[0].call
            assert call is not None
            settle(live[0], await call())
        else:
            await self._runners[kind](live)

    def _observe(self, kind: str, changes: int, seconds: float) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(kind, changes, seconds)
            except Exception:  # a metrics failure must not stop the queue behind it
                log.exception("network batch observer failed")
