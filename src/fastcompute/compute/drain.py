"""Draining a host: ``host.drain`` takes it out of scheduling and live-migrates its instances away.

The host is disabled first (as ``host.set_enabled false``: schedulers stop sending spawns), and
stays disabled after the drain. Every instance that can move live (``active``, no task under
way, no volumes attached: ``LiveMigrations.movable``) is moved to one of this host's migration
peers, at most ``concurrency`` moves at once; the others are reported with the reason at once.

Where to: an agent sees no fleet, but it has a link to each of its peers. Before each choice it
asks every peer ``migration.host_info`` (that peer's ``host.info``) and runs the scheduler's own
filters and weighers over the answers (``fleet.select``: alive, enabled, capacity within
``max_unit``, the flavor's required and forbidden traits, the instance's server group, NUMA),
this host excluded. Choices are made one at a time, and each waits until its destination holds
the move's claim (``migration.live_prepare`` answered) before the next is made, so every choice
sees the claims of those before it; the migrations themselves then run side by side. A
destination that refuses (``NO_CAPACITY`` after all, no ``[migration] libvirt_uri``...) is left
out and the next is tried; when none takes the instance it is reported ``NO_CAPACITY`` with
each host's reason.

Progress is published on ``host.drain`` (the report so far); the last event, and the reply
with ``wait``, carry the final report. A drain is not resumed after a restart of the agent:
the host stays disabled, the moves under way settle as every live move does, and a new drain
moves what is left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from fastcompute.compute.cpu import flavor_traits
from fastcompute.errors import AgentError, Conflict, NoCapacity
from fastcompute.protocol import HostInfo, invalid
from fastcompute.protocol.schema import DrainArgs, DrainFailed, DrainMoved, DrainReport
from fastcompute.scheduler.fleet import HostView, Weights, request_tuple, select
from fastcompute.scheduler.moves import group_of

if TYPE_CHECKING:
    from fastcompute.compute.livemigration import LiveMigrations
    from fastcompute.compute.manager import Manager

log = logging.getLogger("fastcompute.drain")

TOPIC = "host.drain"


class Drain:
    """This host's drain: at most one at a time."""

    def __init__(self, live: LiveMigrations) -> None:
        self.live = live
        self.m: Manager = live.m
        self.peers = live.moves.peers
        self._task: asyncio.Task[DrainReport] | None = None
        self._placing = asyncio.Lock()

    async def drain(self, a: DrainArgs) -> DrainReport:
        """``host.drain``: the report once started (``wait``: once over). CONFLICT while a
        drain runs here; ``live: false`` is refused."""
        if not a.live:
            raise invalid("args.live", "only live drains are built: cold-migrate stopped instances with "
                                       "instance.migrate")
        if self._task is not None and not self._task.done():
            raise Conflict(f"host {self.m.hostname} is being drained already", {"host": self.m.hostname})
        m = self.m
        if m.enabled:  # an operator's reason for a host already disabled stays
            await m.set_enabled(False, "draining")
        report = DrainReport(host=m.hostname, done=False, total=len(m.instances), running=0, moved=[], failed=[])
        movable = []
        for uuid in sorted(m.instances):
            try:
                self.live.movable(uuid)
            except AgentError as exc:
                report.failed.append(DrainFailed(uuid=uuid, code=exc.code, message=exc.message))
                continue
            movable.append(uuid)
        log.warning("draining host %s: %d instances to move, %d cannot", m.hostname, len(movable), len(report.failed))
        self._task = asyncio.get_running_loop().create_task(self._run(report, movable, a.concurrency))
        self._publish(report)
        if a.wait:
            return await asyncio.shield(self._task)
        return msgspec.structs.replace(report, moved=list(report.moved), failed=list(report.failed))

    async def _run(self, report: DrainReport, uuids: list[str], concurrency: int) -> DrainReport:
        slots = asyncio.Semaphore(concurrency)

        async def one(uuid: str) -> None:
            async with slots:
                report.running += 1
                try:
                    destination = await self._move(uuid)
                    report.moved.append(DrainMoved(uuid=uuid, destination=destination))
                except AgentError as exc:
                    report.failed.append(DrainFailed(uuid=uuid, code=exc.code, message=exc.message))
                except Exception as exc:  # reported for this instance; the other moves go on
                    log.exception("drain: moving instance %s failed", uuid)
                    report.failed.append(DrainFailed(uuid=uuid, code="INTERNAL", message=str(exc)))
                finally:
                    report.running -= 1
                self._publish(report)

        await asyncio.gather(*(one(u) for u in uuids))
        report.done = True
        log.warning("host %s drained: %d moved, %d not", report.host, len(report.moved), len(report.failed))
        self._publish(report)
        return report

    async def _move(self, uuid: str) -> str:
        """Place and live-migrate one instance; where it went, or why it did not."""
        tried = {self.m.hostname}
        refusals: list[str] = []
        async with self._placing:
            while True:
                stored = self.live.movable(uuid)  # it may have changed while it waited
                flavor = stored.record.flavor
                req, numa_request = request_tuple(flavor)
                required, forbidden = flavor_traits(flavor.extra_specs)
                host, reasons = select(await self._views(), req, Weights(), numa_request=numa_request,
                                       required=frozenset(required), forbidden=frozenset(forbidden),
                                       group=group_of(stored.record), exclude=tried)
                if host is None:
                    why = ", ".join(f"{n} {k}" for k, n in reasons.items() if k != "tried") or "no migration peers"
                    raise NoCapacity(f"no other host takes instance {uuid} ({why})" + "".join(
                        f"; {r}" for r in refusals), {"uuid": uuid, "filtered": reasons, "refusals": refusals})
                tried.add(host.name)
                try:
                    _rec, task = await self.live.begin(uuid, stored, host.name)
                    break
                except AgentError as exc:
                    refusals.append(f"{host.name}: {exc.code}: {exc.message}")
        await asyncio.shield(task)
        return host.name

    async def _views(self) -> list[HostView]:
        """The peers as the scheduler would see them, from their ``host.info`` now."""

        async def view(name: str) -> HostView:
            v = HostView(name)
            try:
                v.update(msgspec.convert(await self.peers.call(name, "migration.host_info", {}), HostInfo))
                v.alive = True
            except (AgentError, msgspec.ValidationError) as exc:  # left out as a host that is down
                log.info("drain: peer %s gave no host.info: %s", name, exc)
            return v

        names = [n for n in self.peers.endpoints if n != self.m.hostname]
        return list(await asyncio.gather(*(view(n) for n in names)))

    def _publish(self, report: DrainReport) -> None:
        self.m.publish(TOPIC, report)
