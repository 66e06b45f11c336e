"""Live moves of running instances: ``instance.live_migrate`` and ``instance.live_migrate_abort``.

They share the cold moves' record (``migrations`` table, a ``Move`` of kind ``live``), peer
link and retries (compute/migration.py); the steps differ. The source drives, writing each
step before it is taken:

source  ``live_prep``       ``migration.live_prepare`` at the destination: a claim there under
                            the instance's uuid (NUMA and pins fitted there; no DISK_GB for a
                            volume-backed one), the root overlay made from the same base
                            (fetched there through its cache; none when the instance boots from
                            a volume), the config drive made, the source's console log copied,
                            the volumes' secrets defined, the ports plugged (security groups in
                            force); it answers with the guest as it describes it (paths, taps,
                            pins, the same volume targets), its libvirt URI and address.
        ``live_migrating``  the hypervisor moves the guest (``Driver.live_migrate``, steered by
                            ``[migration]``'s policy); progress is published on
                            ``migration.<uuid>``.
        ``switching``       the guest runs at the destination: ``migration.live_finish`` makes
                            it the instance's host (its record, active, its volumes attached
                            under the same device names); then this host removes its domain,
                            volume secrets, files, ports, claim and console tokens.

Only the root overlay is mirrored by the hypervisor. Volumes are network disks (iSCSI, NBD,
RBD) that both hosts reach: the destination's QEMU opens the same target when the guest
arrives, and nothing of them is copied. Volumes given as a path on the source host (``local``,
``file``) cannot move so, and refuse the migration.

There is no confirm step. A migration that fails, is aborted or times out leaves the guest
running here, its volumes attached; the destination's claim, files, volume secrets, ports and
domain are removed (``migration.live_abort``, which refuses while a guest runs there). After a
restart of either agent, an unfinished move is settled by asking the hypervisors where the
guest runs: here, the destination's side is undone; there (and not here), the switch-over is
finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from fastcompute.compute import volumes
from fastcompute.compute.migration import Move
from fastcompute.compute.records import Stored, image_spec, numa_cells
from fastcompute.config import MigrationConfig
from fastcompute.errors import AgentError, Busy, Conflict, HypervisorError, NotFound
from fastcompute.hypervisor.spec import GuestSpec, MigrationPolicy, MigrationProgress, MigrationTarget
from fastcompute.protocol import InstanceRecord, invalid
from fastcompute.protocol.schema import LivePrepareArgs, PeerArgs
from fastcompute.store import Statement, Store

if TYPE_CHECKING:
    from fastcompute.compute.manager import Manager
    from fastcompute.compute.migration import Migrations

log = logging.getLogger("fastcompute.livemigration")

# The disks the destination makes from the base and the hypervisor fills (the config drive is
# made anew there; volumes are the same network targets, reached from both hosts).
COPIED_ROLES = ["root"]
_LIVE = frozenset({"active"})
# Volumes given as a path on the source host (Cinder's ``local``, and ``file``): nothing says
# that the same path on another host is the same volume.
_HOST_PATHS = frozenset({"local", "file"})


def policy(mc: MigrationConfig) -> MigrationPolicy:
    """The steering policy of ``[migration]``."""
    return MigrationPolicy(downtime_start_ms=mc.downtime_start_ms,
                           downtime_max_ms=max(mc.downtime_max_ms, mc.downtime_start_ms),
                           downtime_steps=mc.downtime_steps, fallback=mc.fallback,
                           fallback_after_s=mc.fallback_after_s, timeout_s=mc.live_timeout_s,
                           bandwidth_mib_s=mc.bandwidth_mib_s)


class LiveMigrations:
    """The live moves of this host, outgoing and incoming."""

    def __init__(self, moves: Migrations) -> None:
        self.moves = moves
        self.m: Manager = moves.m
        self.cfg = moves.cfg
        moves.settlers["live"] = self.settle

    # -- the client's ops (at the instance's host) --------------------------------------------

    async def start(self, uuid: str, destination: str, block_migration: str, wait: bool) -> InstanceRecord:
        """``instance.live_migrate``: reply once the destination is ready for the guest (or
        with its refusal, nothing changed); ``wait``: once the guest runs there."""
        stored = self.movable(uuid)
        if destination == self.m.hostname:
            raise invalid("args.destination", "an instance cannot migrate to the host it is on")
        if block_migration == "false":
            raise invalid("args.block_migration", "this host's instance storage is not shared with other hosts: "
                          "the disks must be copied (auto or true)")
        rec, task = await self.begin(uuid, stored, destination)
        return await asyncio.shield(task) if wait else rec

    def movable(self, uuid: str) -> Stored:
        """The instance, if it can live-migrate now: CONFLICT naming why not (its state, a task
        under way, volumes on paths of this host), NOT_FOUND."""
        stored = self.m._check(uuid, "live-migrate", _LIVE)
        if local := [v.volume_id for v in stored.record.volumes if v.driver_volume_type in _HOST_PATHS]:
            raise Conflict(f"instance {uuid} has volumes on paths of this host ({', '.join(local)}), which no "
                           "other host reaches: detach them to live-migrate it", {"uuid": uuid, "volumes": local})
        return stored

    async def begin(self, uuid: str, stored: Stored, destination: str
                    ) -> tuple[InstanceRecord, asyncio.Task[InstanceRecord]]:
        """Start a live move of a ``movable`` instance: once the destination holds its claim,
        the record and the task that drives the rest; the destination's refusal (nothing
        changed) raised."""
        self.moves.peers.check(destination)
        started: asyncio.Future[InstanceRecord] = asyncio.get_running_loop().create_future()
        task = self.moves._spawn(self.moves.drive_new(uuid, stored, "live", destination, None, _LIVE, "live_prep",
                                                       self._drive, started))
        return await asyncio.shield(started), task

    async def abort(self, uuid: str) -> InstanceRecord:
        """``instance.live_migrate_abort``: the guest stays here (CONFLICT when it is past the
        point of no return, or not migrating)."""
        m = self.m
        stored = m._get(uuid)
        move = self._outgoing_of(uuid)
        if move is None or move.step == "switching":
            raise Conflict(f"instance {uuid} has no live migration to abort", {"uuid": uuid})
        if move.step == "live_migrating" and not await m.driver.abort_migration(uuid):
            raise Conflict(f"the live migration of {uuid} cannot be aborted now", {"uuid": uuid})
        move.status = "aborting"  # the driving task undoes it when the hypervisor returns
        return stored.record

    def _outgoing_of(self, uuid: str) -> Move | None:
        for move in self.moves.moves.values():
            if move.role == "source" and move.uuid == uuid and move.kind == "live":
                return move
        return None

    # -- the source's steps ---------------------------------------------------------------------

    async def _drive(self, move: Move, started: asyncio.Future[InstanceRecord]) -> InstanceRecord:
        m, moves, uuid = self.m, self.moves, move.uuid
        moves.moves[(move.id, "source")] = move
        await m._commit(uuid, task_state="migrating", extra=[moves._row(move)])
        await moves._hold("live_prep")
        guest = m._guest(uuid)
        console = await moves._io(self._console_tail, guest.console_path)
        req = {"id": move.id, "uuid": uuid, "flavor": msgspec.to_builtins(move.new_flavor),
               "disk_format": m.images.disk_format(), "instance": move.instance, "console": console}
        try:
            got = await moves.peers.call(move.destination, "migration.live_prepare", req)
        except Busy:
            await self._undo(move)  # it may have made its side before the answer was lost
            raise
        except AgentError:
            await self._stay(move)  # it refused: it holds nothing
            raise
        target = MigrationTarget(uri=got["uri"], address=got["address"],
                                 guest=msgspec.convert(got["guest"], GuestSpec), copy_roles=COPIED_ROLES)
        started.set_result(msgspec.structs.replace(m.instances[uuid].record))
        move.step = "live_migrating"
        await m.store.write([moves._row(move)])
        await moves._hold("live_migrating")
        if move.status == "aborting":
            await self._undo(move)
            raise Conflict(f"the live migration of {uuid} was aborted", {"uuid": uuid})
        try:
            result = await m.driver.live_migrate(uuid, target, policy(self.cfg.migration), self._reporter(uuid))
        except HypervisorError:
            await self._settle_migrating(move)
            raise
        log.info("instance %s live-migrated to %s in %.2fs (downtime %s ms, limit %d ms, fallback %s)", uuid,
                 move.destination, result.total_s, result.downtime_ms, result.downtime_limit_ms, result.fallback)
        m.publish("migration." + uuid, {"uuid": uuid, "done": True, **msgspec.to_builtins(result)})
        return await self._switch(move)

    def _console_tail(self, path: str) -> bytes:
        limit = self.cfg.migration.console_copy_bytes
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def _reporter(self, uuid: str) -> Any:
        def report(p: MigrationProgress) -> None:
            self.m.publish("migration." + uuid, {"uuid": uuid, **msgspec.to_builtins(p)})
        return report

    async def _switch(self, move: Move) -> InstanceRecord:
        """The guest runs at the destination: make it the instance's host, then leave here."""
        m, moves = self.m, self.moves
        if move.step != "switching":
            move.step = "switching"
            await m.store.write([moves._row(move)])
        await moves._hold("switching")
        got = await moves.peers.call(move.destination, "migration.live_finish", {"id": move.id})
        await self._leave(move)
        return msgspec.convert(got, InstanceRecord)

    async def _leave(self, move: Move) -> None:
        """Remove what this host has of an instance that now runs elsewhere."""
        m, uuid = self.m, move.uuid
        await m.driver.destroy(uuid)  # left defined and stopped by the migration
        await m.network.unplug(uuid)
        await m.images.remove_disk(uuid)  # the instance's directory, console log included
        rows: list[Statement] = [Store.delete_claim(uuid), Store.delete_console_tokens(uuid),
                                 Store.delete_migration(move.id, "source")]
        stored = m.instances.pop(uuid, None)
        if stored is not None:
            m._disown_ports(uuid, stored.ports)
            rows.append(Store.delete_instance(uuid))
        assert m.tracker is not None
        m.tracker.release(uuid)
        m._mark_resources_changed()
        m._locks.pop(uuid, None)
        self.moves.moves.pop((move.id, "source"), None)
        await m.store.write(rows)
        log.info("instance %s left this host for %s", uuid, move.destination)

    async def _settle_migrating(self, move: Move) -> None:
        """After a failed, aborted or interrupted migration: where does the guest run?"""
        dom = await self.m.driver.info(move.uuid)
        if dom is not None and dom.power_state in ("running", "paused"):
            await self._undo(move)
            return
        got = await self.moves.peers.call(move.destination, "migration.live_status", {"id": move.id})
        if got.get("running"):
            await self._switch(move)
        else:
            await self._undo(move)

    async def _undo(self, move: Move) -> None:
        """The destination's side removed, then the guest (still here) kept here. Busy when
        the destination cannot be asked (the ticks retry)."""
        if move.status != "aborting":
            move.status = "aborting"
            await self.m.store.write([self.moves._row(move)])
        await self.moves.peers.call(move.destination, "migration.live_abort", {"id": move.id})
        await self._stay(move)

    async def _stay(self, move: Move) -> None:
        m, uuid = self.m, move.uuid
        dom = await m.driver.info(uuid)
        power = dom.power_state if dom is not None else "nostate"
        if power == "paused":  # stopped by the migration's last phase, which did not end
            power = await m.driver.unpause(uuid)
        elif power != "running":
            power = await m._recreate(uuid, "active")
        self.moves.moves.pop((move.id, "source"), None)
        log.info("instance %s stays on this host (its live migration to %s did not happen)", uuid, move.destination)
        await m._commit(uuid, task_state=None, power_state=power, extra=[Store.delete_migration(move.id, "source")])

    async def settle(self, move: Move) -> None:
        """Settle a live move a restart or an unanswered call left open (from the ticks)."""
        m, uuid = self.m, move.uuid
        if move.role == "destination":
            return  # the source drives both sides
        async with m._locks.setdefault(uuid, asyncio.Lock()):
            if (move.id, "source") not in self.moves.moves:
                return
            if move.step == "switching":
                await self._switch(move)
            elif move.step == "live_migrating":
                await self._settle_migrating(move)
            else:
                await self._undo(move)

    # -- ops between agents (at the destination) ------------------------------------------------

    def _target(self) -> tuple[str, str]:
        mc = self.cfg.migration
        uri = mc.libvirt_uri or self.cfg.hypervisor.uri
        address = mc.address or (urlsplit(uri).hostname or "")
        if not address or uri.startswith("test:"):
            raise Conflict(f"host {self.m.hostname} cannot receive live migrations ([migration] libvirt_uri and "
                           "address are not set)", {"host": self.m.hostname})
        return uri, address

    async def prepare(self, a: LivePrepareArgs) -> dict[str, Any]:
        """``migration.live_prepare``: everything the guest needs here before it comes."""
        moves = self.moves
        async with moves._lock(a.id, "destination"):
            stored = moves._stored.decode(a.instance)
            if (move := moves._in(a)) is not None:
                if move.status != "copying":
                    raise Conflict(f"move {a.id} is {move.status}", {"status": move.status})
                return self._answer(a.uuid, stored)
            self._target()  # refused before anything is claimed
            move = await moves.claim_incoming(a, "live", "active", "copying")
            try:
                await self._make(a.uuid, stored, a.console)
                return self._answer(a.uuid, stored)
            except BaseException:
                await moves._drop_copy(move, forget=True)
                raise

    async def _make(self, uuid: str, stored: Stored, console: bytes) -> None:
        m, moves = self.m, self.moves
        rec = stored.record
        boot = stored.bootstrap
        drive = m._config_drive(uuid, new=True, stored=stored) if boot is not None and boot.config_drive else None

        def beside(d: Any) -> None:
            if console:
                (d / "console.log").write_bytes(console)
            if drive is not None:
                drive(d)

        def beside_only() -> None:
            d = m.instance_dir(uuid)
            d.mkdir(parents=True, exist_ok=True)
            beside(d)

        if volumes.boots_from_volume(stored):  # no root disk here: the boot volume is reached from here too
            await moves._io(beside_only)
        else:
            await m.images.prepare_disk(uuid, image_spec(rec), rec.flavor.disk_gb, beside=beside)
        if stored.volumes:
            await m.driver.prepare_volumes(uuid, m._guest(uuid, stored=stored))
        if stored.ports:
            await m.network.plug(uuid, stored.ports)

    def _answer(self, uuid: str, stored: Stored) -> dict[str, Any]:
        uri, address = self._target()
        rec = stored.record
        assert self.m.tracker is not None
        claim = self.m.tracker.claims[uuid]
        rec.host, rec.numa = self.m.hostname, numa_cells(claim.numa_request, claim.numa_placement)
        return {"guest": msgspec.to_builtins(self.m._guest(uuid, stored=stored)), "uri": uri, "address": address}

    async def finish(self, a: PeerArgs) -> InstanceRecord:
        """``migration.live_finish``: the guest runs here; the instance is this host's now."""
        m, moves = self.m, self.moves
        async with moves._lock(a.id, "destination"):
            move = moves._in(a)
            if move is None:
                raise NotFound(f"no incoming live migration {a.id} on this host", {"id": a.id})
            uuid = move.uuid
            dom = await m.driver.info(uuid)
            if dom is None or dom.power_state not in ("running", "paused"):
                raise Conflict(f"instance {uuid} does not run on this host", {"uuid": uuid})
            stored = moves._stored.decode(move.instance)
            rec = stored.record
            assert m.tracker is not None
            claim = m.tracker.claims[uuid]
            rec.host, rec.vm_state, rec.task_state = m.hostname, "active", None
            rec.numa = numa_cells(claim.numa_request, claim.numa_placement)
            m.instances[uuid] = stored
            m._locks.setdefault(uuid, asyncio.Lock())
            m._own_ports(uuid, stored.ports)
            power = dom.power_state
            if power == "paused":  # post-copy's last phase, or a switch-over caught mid-way
                with contextlib.suppress(HypervisorError):
                    power = await m.driver.unpause(uuid)
            moves.moves.pop((a.id, "destination"), None)
            m._mark_resources_changed()
            log.info("instance %s live-migrated here from %s", uuid, move.source)
            return await m._commit(uuid, power_state=power, extra=[Store.delete_migration(a.id, "destination")])

    async def status(self, a: PeerArgs) -> dict[str, Any]:
        """``migration.live_status``: the incoming move's state, and whether its guest runs here."""
        move = self.moves._in(a)
        if move is None:
            return {"status": "none", "running": False}
        dom = await self.m.driver.info(move.uuid)
        return {"status": move.status, "running": dom is not None and dom.power_state == "running"}

    async def abort_incoming(self, a: PeerArgs) -> dict[str, bool]:
        """``migration.live_abort``: remove this host's side of an incoming live move; refused
        while the guest runs here (the migration ended: the source must finish it instead)."""
        moves = self.moves
        async with moves._lock(a.id, "destination"):
            move = moves._in(a)
            if move is not None:
                dom = await self.m.driver.info(move.uuid)
                if dom is not None and dom.power_state == "running":
                    raise Conflict(f"instance {move.uuid} runs on this host: its migration ended",
                                   {"uuid": move.uuid})
                await moves._drop_copy(move, forget=True)
        return {"aborted": True}

