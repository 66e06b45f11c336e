"""Cold moves of instances: ``instance.migrate``, ``instance.resize``, their confirm and revert.

The source agent drives a move and owns its record (the ``migrations`` table, role
``source``); the destination keeps its own side of it (role ``destination``). Each step is
written before it is taken, so that a restart of either agent knows where the move stood:

source  ``prep``       the instance's claim re-keyed to the move's id (it holds the old
                       flavor's resources until the move ends), ``migration.prepare`` at the
                       destination: a move claim there under the instance's uuid (NUMA and
                       pins fitted again); a refusal (NO_CAPACITY...) undoes the re-keying.
        ``migrating``  the guest stopped, its domain removed, its ports unplugged, its
                       directory renamed to ``<uuid>_resize``, its console tokens revoked.
        ``finishing``  ``migration.finish``: the destination pulls the files (``migration.read``
                       chunk by chunk, holes skipped, each file's digest checked), takes the
                       root disk over (its base cached there, grown to the new flavor), re-makes
                       the config drive, plugs the same ports, defines (and starts) the domain,
                       and records the instance ``resized``.
        ``finished``   the source forgets the instance but keeps its claim and files for a
                       revert, until ``migration.confirm`` (or ``migration.revert``).

Anything failing before ``finished`` is undone destination first (``migration.abort``), then
at the source (the directory renamed back, the claim re-keyed, ports plugged, the domain
re-created in its old state). A step whose outcome is unknown (a peer that does not answer)
is asked about and retried every ``[migration] retry_interval_s``: until then the instance
runs nowhere rather than in two places. Confirm and revert go to the destination, where the
instance is; it calls the source, which holds the move's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from fastcompute.compute import volumes
from fastcompute.compute.peers import Peers
from fastcompute.compute.records import Stored, image_spec, numa_cells
from fastcompute.compute.validate import flavor_request
from fastcompute.errors import AgentError, Busy, Conflict, Forbidden, ImageError, NotFound
from fastcompute.images import transfer
from fastcompute.images.disks import INFO, ROLES
from fastcompute.protocol import Flavor, InstanceRecord, invalid
from fastcompute.protocol.ports import Port
from fastcompute.protocol.schema import Chunk, FinishArgs, LivePrepareArgs, MoveRequest, PeerArgs, ReadArgs
from fastcompute.store import Statement, Store

if TYPE_CHECKING:
    from fastcompute.compute.manager import Manager

log = logging.getLogger("fastcompute.migration")

MOVABLE = frozenset({"active", "stopped"})
RESIZED = frozenset({"resized"})
HELD_SUFFIX = "_resize"
_VERBS = {"live": "live-migrate"}  # a move's kind as its refusals name it
# Made again at the destination from what the instance is there, not copied.
_NOT_MOVED = frozenset({INFO, str(ROLES["config"].file)})

Role = Literal["source", "destination"]


class Move(msgspec.Struct, kw_only=True):
    """One side of a move, as the store keeps it.

    ``status``: at the source ``running`` (at ``step`` prep, migrating or finishing),
    ``aborting`` or ``finished``; at the destination ``prepared``, ``copying``, ``finished``,
    ``confirming`` or ``reverting``.
    """

    id: str
    uuid: str
    role: Role
    kind: str
    source: str
    destination: str
    old_flavor: Flavor
    new_flavor: Flavor
    vm_state: str
    """The instance's state when the move began (active or stopped): the state it ends in."""
    status: str
    step: str = ""
    instance: bytes
    """The instance as the source had it (a ``Stored``): what a revert brings back."""
    finished_at: float = 0.0


class Migrations:
    """The moves of this host, outgoing and incoming."""

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.cfg = m.cfg
        self.peers = Peers(m.cfg.migration, m.cfg.security, m.hostname)
        self.moves: dict[tuple[str, Role], Move] = {}
        self._locks: dict[tuple[str, Role], asyncio.Lock] = {}
        self._driving: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stored = msgspec.msgpack.Decoder(Stored)
        self._enc = msgspec.msgpack.Encoder()
        # How other kinds of moves (compute/livemigration.py) settle what the ticks find open.
        self.settlers: dict[str, Callable[[Move], Coroutine[Any, Any, None]]] = {}

    # -- start-up ---------------------------------------------------------------------------

    def load(self, bodies: list[bytes]) -> set[str]:
        """Take the stored moves; return what they hold that the manager's start-up must leave
        alone: claim keys, instance directories, and instances whose move is to be settled."""
        dec = msgspec.msgpack.Decoder(Move)
        held: set[str] = set()
        for body in bodies:
            move = dec.decode(body)
            self.moves[(move.id, move.role)] = move
            if move.role == "source":
                held |= {move.id, move.uuid + HELD_SUFFIX}
                if move.status != "finished":
                    held.add(move.uuid)
            elif move.status in ("prepared", "copying", "reverting"):
                held.add(move.uuid)
            elif move.status == "confirming" and (stored := self.m.instances.get(move.uuid)) is not None:
                stored.record.task_state = None  # asked again by the next tick
        return held

    def incoming_ports(self) -> dict[str, list[Port]]:
        """The ports of live moves coming here, plugged before their guest arrives: the start-up
        keeps them."""
        out: dict[str, list[Port]] = {}
        for move in self.moves.values():
            if move.role == "destination" and move.kind == "live" and move.status == "copying":
                out[move.uuid] = self._stored.decode(move.instance).ports
        return out

    # -- helpers ----------------------------------------------------------------------------

    def _lock(self, move_id: str, role: Role) -> asyncio.Lock:
        return self._locks.setdefault((move_id, role), asyncio.Lock())

    def _row(self, move: Move) -> Statement:
        return self.m.store.put_migration(move.id, move.role, move.uuid, move)

    def _held_dir(self, uuid: str) -> Path:
        return self.m.state_dir / "instances" / (uuid + HELD_SUFFIX)

    def _incoming(self, uuid: str) -> Move:
        for move in self.moves.values():
            if move.role == "destination" and move.uuid == uuid:
                return move
        raise Conflict(f"instance {uuid} has no move to confirm or revert on this host", {"uuid": uuid})

    def _rekey(self, old: str, new: str) -> list[Statement]:
        """Move a claim from one consumer to another (instance uuid <-> move id), at once."""
        tracker = self.m.tracker
        assert tracker is not None
        claim = tracker.claims.get(old)
        if claim is None:
            return []
        tracker.release(old)
        tracker.restore(new, claim)
        self.m._mark_resources_changed()
        return [Store.delete_claim(old), self.m.store.put_claim(new, claim.project_id, claim)]

    async def _hold(self, step: str) -> None:
        mc = self.cfg.migration
        if mc.test_hold_step == step and mc.test_hold_s > 0:
            log.warning("test hold: waiting %.1fs at step %s", mc.test_hold_s, step)
            await asyncio.sleep(mc.test_hold_s)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.warning("move stopped: %s", exc)

        task.add_done_callback(done)
        return task

    # -- the client's ops (at the instance's host) --------------------------------------------

    async def start(self, uuid: str, kind: Literal["migrate", "resize"], destination: str | None,
                    flavor: Flavor | None, wait: bool) -> InstanceRecord:
        """``instance.migrate`` / ``instance.resize``: reply once the destination holds its
        claim (or with its refusal, nothing changed); ``wait``: once the move is over."""
        m = self.m
        stored = m._check(uuid, kind, MOVABLE)
        dest = destination or m.hostname
        if dest == m.hostname:
            if kind == "migrate":
                raise invalid("args.destination", "an instance cannot migrate to the host it is on")
            if not self.cfg.compute.allow_resize_to_same_host:
                raise invalid("args.destination", "resizing on this host is off ([compute] "
                              "allow_resize_to_same_host): name another host")
        self.peers.check(dest)
        old = stored.record.flavor
        if flavor is not None:
            flavor_request(flavor)
            # A volume-backed instance's root is its volume: the flavor's disk size is not its own.
            if flavor.disk_gb < old.disk_gb and not volumes.boots_from_volume(stored):
                raise invalid("args.flavor.disk_gb", f"a resize cannot shrink the root disk "
                              f"({old.disk_gb} GiB to {flavor.disk_gb} GiB)")
            if flavor == old:
                raise invalid("args.flavor", "the instance has this flavor already")
        started: asyncio.Future[InstanceRecord] = asyncio.get_running_loop().create_future()
        task = self._spawn(self._move(uuid, stored, kind, dest, flavor or old, started))
        rec = await asyncio.shield(started)
        return await asyncio.shield(task) if wait else rec

    @contextlib.asynccontextmanager
    async def _ending(self, uuid: str, what: str, status: str, task: str) -> AsyncIterator[Move]:
        """A resized instance under its lock, its move marked ``status`` and ``task`` recorded."""
        m = self.m
        before = m._check(uuid, what, RESIZED)
        move = self._incoming(uuid)
        async with m._locks[uuid]:
            m._same(uuid, before)
            m._check(uuid, what, RESIZED)
            move.status = status
            await m._commit(uuid, task_state=task, extra=[self._row(move)])
            yield move

    async def confirm(self, uuid: str) -> InstanceRecord:
        """``instance.confirm_resize``: the source drops what it kept; the instance stays."""
        m = self.m
        async with self._ending(uuid, "confirm the resize of", "confirming", "resize_confirming") as move:
            try:
                await self.peers.call(move.source, "migration.confirm", {"id": move.id})
            except BaseException:
                move.status = "finished"
                await m._commit(uuid, task_state=None, extra=[self._row(move)])
                raise
            del self.moves[(move.id, "destination")]
            return await m._commit(uuid, vm_state=move.vm_state, task_state=None,
                                   extra=[Store.delete_migration(move.id, "destination")])

    async def revert(self, uuid: str) -> InstanceRecord:
        """``instance.revert_resize``: this host's copy goes, the source brings the instance
        back with its old flavor, disk and claim."""
        m = self.m
        async with self._ending(uuid, "revert the resize of", "reverting", "resize_reverting") as move:
            rec = await self._revert(move)
            if uuid not in m.instances:
                m._locks.pop(uuid, None)
            return rec

    async def _revert(self, move: Move) -> InstanceRecord:
        old = self._stored.decode(move.instance).record
        await self._drop_copy(move, forget=False)
        result = await self.peers.call(move.source, "migration.revert", {"id": move.id})
        self.moves.pop((move.id, "destination"), None)
        await self.m.store.write([Store.delete_migration(move.id, "destination")])
        return msgspec.convert(result, InstanceRecord) if result else old

    async def on_delete(self, uuid: str) -> list[Statement]:
        """An instance deleted while resized: its source's hold is dropped (now, or by the
        next ticks); returns the store changes that go with the delete."""
        for move in list(self.moves.values()):
            if move.role == "destination" and move.uuid == uuid:
                move.status = "confirming"
                self._spawn(self._confirm_gone(move))
                return [self._row(move)]
        return []

    async def _confirm_gone(self, move: Move) -> None:
        await self.peers.call(move.source, "migration.confirm", {"id": move.id})
        self.moves.pop((move.id, "destination"), None)
        await self.m.store.write([Store.delete_migration(move.id, "destination")])

    # -- the source's steps ---------------------------------------------------------------------

    async def _move(self, uuid: str, stored: Stored, kind: str, dest: str, flavor: Flavor,
                    started: asyncio.Future[InstanceRecord]) -> InstanceRecord:
        return await self.drive_new(uuid, stored, kind, dest, flavor, MOVABLE, "prep", self._drive, started)

    async def drive_new(self, uuid: str, stored: Stored, kind: str, dest: str, flavor: Flavor | None,
                        allowed: frozenset[str], step: str,
                        drive: Callable[[Move, asyncio.Future[InstanceRecord]], Coroutine[Any, Any, InstanceRecord]],
                        started: asyncio.Future[InstanceRecord]) -> InstanceRecord:
        """Under the instance's lock, a new outgoing move of ``kind`` at ``step``, driven by
        ``drive``; ``started`` gets the refusal if there is one before ``drive`` answers it."""
        m = self.m
        try:
            async with m._locks[uuid]:
                m._same(uuid, stored)
                rec = m._check(uuid, _VERBS.get(kind, kind), allowed).record
                move = Move(id=str(uuid_mod.uuid4()), uuid=uuid, role="source", kind=kind, source=m.hostname,
                            destination=dest, old_flavor=rec.flavor, new_flavor=flavor or rec.flavor,
                            vm_state=rec.vm_state, status="running", step=step, instance=self._enc.encode(stored))
                self._driving.add(move.id)
                try:
                    return await drive(move, started)
                finally:
                    self._driving.discard(move.id)
        except BaseException as exc:
            if not started.done():
                if isinstance(exc, Exception):
                    started.set_exception(exc)
                else:
                    started.cancel()
            raise

    async def _drive(self, move: Move, started: asyncio.Future[InstanceRecord]) -> InstanceRecord:
        m, uuid = self.m, move.uuid
        self.moves[(move.id, "source")] = move
        await m._commit(uuid, task_state="resize_prep", extra=[self._row(move), *self._rekey(uuid, move.id)])
        await self._hold("prep")
        req = {"id": move.id, "uuid": uuid, "kind": move.kind, "flavor": msgspec.to_builtins(move.new_flavor),
               "vm_state": move.vm_state, "disk_format": m.images.disk_format(), "instance": move.instance}
        try:
            await self.peers.call(move.destination, "migration.prepare", req)
        except Busy:
            await self._abort(move)  # it may have claimed before the answer was lost
            raise
        except AgentError:
            await self._restore(move)  # it refused: it holds nothing
            raise
        started.set_result(msgspec.structs.replace(m.instances[uuid].record))
        move.step = "migrating"
        await m._commit(uuid, task_state="resize_migrating", extra=[self._row(move)])
        await self._hold("migrating")
        try:
            await self._leave(move)
        except Exception:
            await self._abort(move)
            raise
        move.step = "finishing"
        await m._commit(uuid, task_state="resize_migrated", power_state="shutdown", extra=[self._row(move)])
        await self._hold("finishing")
        files = await self._io(transfer.listing, self._held_dir(uuid), _NOT_MOVED)
        try:
            result = await self.peers.call(
                move.destination, "migration.finish",
                {"id": move.id, "files": [{"name": n, "size": s, "digest": d} for n, s, d in files]},
                timeout_s=self.cfg.migration.finish_timeout_s)
        except Busy:
            return await self._settle(move)
        except AgentError:
            await self._abort(move)
            raise
        await self._finished(move)
        return msgspec.convert(result, InstanceRecord)

    async def _leave(self, move: Move) -> None:
        """Take the instance off this host, keeping its files (renamed) for a revert."""
        m, uuid = self.m, move.uuid
        dom = await m.driver.info(uuid)
        if dom is not None and dom.power_state in ("running", "paused"):
            await m.driver.power_off(uuid, self.cfg.hypervisor.shutdown_timeout_s)
        await m.driver.destroy(uuid)
        await m.network.unplug(uuid)
        idir, held = m.instance_dir(uuid), self._held_dir(uuid)
        if idir.exists() and not held.exists():
            await self._io(os.rename, idir, held)
        await m.store.write([Store.delete_console_tokens(uuid)])

    async def _settle(self, move: Move) -> InstanceRecord:
        """The destination did not answer ``migration.finish``: go on if it finished, undo if
        it did not; Busy (retried by the ticks) while it cannot be asked."""
        got = await self.peers.call(move.destination, "migration.status", {"id": move.id})
        if got.get("status") == "finished":
            await self._finished(move)
            return msgspec.convert(got["instance"], InstanceRecord)
        await self._abort(move)
        raise Busy(f"the move of {move.uuid} to {move.destination} did not finish there; it was undone",
                   {"uuid": move.uuid})

    async def _finished(self, move: Move) -> None:
        m, uuid = self.m, move.uuid
        extra: list[Statement] = []
        stored = m.instances.get(uuid)
        if stored is not None and stored.record.vm_state != "resized":  # not the new copy (same host)
            del m.instances[uuid]
            m._disown_ports(uuid, stored.ports)
            m._locks.pop(uuid, None)
            extra.append(Store.delete_instance(uuid))
        move.status, move.step = "finished", "done"
        await m.store.write([self._row(move), *extra])
        m._mark_resources_changed()
        log.info("instance %s moved to %s; its old claim and files are kept until confirmed", uuid, move.destination)

    async def _abort(self, move: Move) -> None:
        """Undo an outgoing move that did not finish: the destination's side first, then this
        host's. Busy when the destination cannot be asked (the ticks retry)."""
        if move.status != "aborting":
            move.status = "aborting"
            await self.m.store.write([self._row(move)])
        await self.peers.call(move.destination, "migration.abort", {"id": move.id})
        await self._restore(move)

    async def _restore(self, move: Move) -> InstanceRecord:
        """The instance back on this host as it was before the move (idempotent)."""
        m, uuid = self.m, move.uuid
        stored = m.instances.get(uuid)
        if stored is None:
            stored = m.instances[uuid] = self._stored.decode(move.instance)
            m._locks.setdefault(uuid, asyncio.Lock())
            m._own_ports(uuid, stored.ports)
        idir, held = m.instance_dir(uuid), self._held_dir(uuid)
        if held.exists():
            await self._io(shutil.rmtree, idir, True)
            await self._io(os.rename, held, idir)
        rows = self._rekey(move.id, uuid)
        tracker = m.tracker
        assert tracker is not None
        claim = tracker.claims.get(uuid)
        stored.record.flavor = move.old_flavor
        stored.record.numa = numa_cells(claim.numa_request, claim.numa_placement) if claim else None
        stored.record.host = m.hostname
        if stored.ports:
            await m.network.plug(uuid, stored.ports)
        dom = await m.driver.info(uuid)
        # A move refused at its first step left the guest as it was: it is not restarted.
        power = dom.power_state if dom is not None else await m._recreate(uuid, move.vm_state)
        if move.vm_state == "active" and power != "running":
            power = await m.driver.power_on(uuid)  # stopped for the move, not yet removed
        self.moves.pop((move.id, "source"), None)
        log.info("instance %s is back on this host (%s)", uuid, move.vm_state)
        return await m._commit(uuid, vm_state=move.vm_state, task_state=None, power_state=power,
                               extra=[*rows, Store.delete_migration(move.id, "source")])

    # -- ops between agents ---------------------------------------------------------------------

    def _outgoing(self, a: PeerArgs) -> Move:
        self.peers.check(a.peer)
        move = self.moves.get((a.id, "source"))
        if move is None:
            raise NotFound(f"no outgoing move {a.id} on this host", {"id": a.id})
        if move.destination != a.peer:
            raise Forbidden(f"move {a.id} goes to {move.destination}, not to {a.peer}", {"peer": a.peer})
        return move

    def _in(self, a: PeerArgs | MoveRequest | LivePrepareArgs) -> Move | None:
        self.peers.check(a.peer)
        move = self.moves.get((a.id, "destination"))
        if move is not None and move.source != a.peer:
            raise Forbidden(f"move {a.id} comes from {move.source}, not from {a.peer}", {"peer": a.peer})
        return move

    async def prepare(self, a: MoveRequest) -> dict[str, str]:
        """``migration.prepare``: the move claim for an incoming instance."""
        async with self._lock(a.id, "destination"):
            if self._in(a) is not None:
                return {"id": a.id}
            await self.claim_incoming(a, a.kind, a.vm_state, "prepared")
            return {"id": a.id}

    async def claim_incoming(self, a: MoveRequest | LivePrepareArgs, kind: str, vm_state: str, status: str) -> Move:
        """The checks and the claim of an incoming move, recorded with its move (as ``status``)
        before anything is made for it, so that a restart finds what to remove."""
        m = self.m
        tracker = m.tracker
        assert tracker is not None
        if a.disk_format != m.images.disk_format():
            raise Conflict(f"this host's disks are {m.images.disk_format()}, the instance's {a.disk_format}",
                           {"disk_format": a.disk_format})
        if a.uuid in m.instances and (a.peer != m.hostname or kind == "live"):
            raise Conflict(f"instance {a.uuid} is already on this host", {"uuid": a.uuid})
        stored = self._stored.decode(a.instance)
        f = a.flavor
        claim = m.claim_flavor(a.uuid, stored.record.project_id, f, 0 if volumes.boots_from_volume(stored) else None)
        move = Move(id=a.id, uuid=a.uuid, role="destination", kind=kind, source=a.peer,
                    destination=m.hostname, old_flavor=stored.record.flavor, new_flavor=f,
                    vm_state=vm_state, status=status, instance=a.instance)
        try:
            await m.store.write([self._row(move), m.store.put_claim(a.uuid, claim.project_id, claim)])
        except BaseException:
            tracker.release(a.uuid)
            raise
        self.moves[(a.id, "destination")] = move
        m._mark_resources_changed()
        return move

    async def finish(self, a: FinishArgs) -> InstanceRecord:
        """``migration.finish``: pull the files, take the instance over, define its domain."""
        m = self.m
        async with self._lock(a.id, "destination"):
            move = self._in(a)
            if move is None:
                raise NotFound(f"no incoming move {a.id} on this host", {"id": a.id})
            uuid = move.uuid
            if move.status == "finished":
                return m.instances[uuid].record
            if move.status not in ("prepared", "copying"):
                raise Conflict(f"move {a.id} is {move.status}", {"status": move.status})
            move.status = "copying"
            await m.store.write([self._row(move)])
            await self._hold("copying")
            idir = m.instance_dir(uuid)
            await self._io(shutil.rmtree, idir, True)
            await self._io(idir.mkdir, 0o700, True)
            for f in a.files:
                await self._pull(move, f.name, f.size, f.digest, idir)
            stored = self._stored.decode(move.instance)
            rec = stored.record
            if not volumes.boots_from_volume(stored):
                await m.images.adopt_disk(uuid, image_spec(rec), move.new_flavor.disk_gb)
            tracker = m.tracker
            assert tracker is not None
            claim = tracker.claims[uuid]
            rec.flavor, rec.host, rec.vm_state, rec.task_state = move.new_flavor, m.hostname, "resized", None
            rec.numa = numa_cells(claim.numa_request, claim.numa_placement)
            m.instances[uuid] = stored
            m._locks.setdefault(uuid, asyncio.Lock())
            m._own_ports(uuid, stored.ports)
            if m._drive_wanted(uuid):
                await m._write_config_drive(uuid)
            if stored.ports:
                await m.network.plug(uuid, stored.ports)
            power = await m.driver.launch(m._guest(uuid), start=move.vm_state == "active")
            move.status, move.finished_at = "finished", time.time()
            m._mark_resources_changed()
            return await m._commit(uuid, power_state=power, extra=[self._row(move)])

    async def _pull(self, move: Move, name: str, size: int, digest: str, idir: Path) -> None:
        path = idir / name
        sink = await self._io(transfer.Sink, path, size)
        offset = 0
        try:
            while True:
                got = await self.peers.call(move.source, "migration.read", {
                    "id": move.id, "name": name, "offset": offset, "length": self.cfg.migration.chunk_bytes})
                data = got["data"]
                if data:
                    await self._io(sink.write, got["offset"], data)
                offset = got["offset"] + len(data)
                if got["eof"]:
                    break
        finally:
            sink.close()
        if (have := await self._io(transfer.digest, path)) != digest:
            raise ImageError(f"the copy of {name} of {move.uuid} does not match the source's ({have}, not {digest})",
                             {"file": name})

    async def read(self, a: ReadArgs) -> Chunk:
        """``migration.read``: the next data of an outgoing move's file."""
        move = self._outgoing(a)
        try:
            start, data, eof = await self._io(transfer.read_data, self._held_dir(move.uuid), a.name, a.offset,
                                              a.length)
        except FileNotFoundError:
            raise NotFound(f"move {a.id} has no file {a.name}", {"name": a.name}) from None
        return Chunk(start, data, eof)

    async def status(self, a: PeerArgs) -> dict[str, Any]:
        """``migration.status``: where an incoming move stands (``none``: not known here)."""
        move = self._in(a)
        if move is None:
            return {"status": "none"}
        stored = self.m.instances.get(move.uuid)
        return {"status": move.status, "instance": stored.record if stored is not None else None}

    async def abort(self, a: PeerArgs) -> dict[str, bool]:
        """``migration.abort``: undo whatever of an incoming move this host holds."""
        async with self._lock(a.id, "destination"):
            move = self._in(a)
            if move is not None:
                if move.status in ("finished", "confirming", "reverting"):
                    raise Conflict(f"move {a.id} is {move.status} here: confirm or revert it", {"status": move.status})
                await self._drop_copy(move, forget=True)
        return {"aborted": True}

    async def _drop_copy(self, move: Move, forget: bool) -> None:
        """Remove this host's copy of an incoming instance: domain, ports, files, claim, record
        (and the move's record too when ``forget``)."""
        m, uuid = self.m, move.uuid
        tracker = m.tracker
        assert tracker is not None
        stored = m.instances.get(uuid)
        mine = stored is not None and stored.record.vm_state == "resized"
        if mine or move.status != "prepared":
            await m.driver.destroy(uuid)
            await m.network.unplug(uuid)
            await m.images.remove_disk(uuid)
        rows: list[Statement] = [Store.delete_claim(uuid)]
        if mine and stored is not None:
            del m.instances[uuid]
            m._disown_ports(uuid, stored.ports)
            rows.append(Store.delete_instance(uuid))
        tracker.release(uuid)
        m._mark_resources_changed()
        if forget:
            self.moves.pop((move.id, "destination"), None)
            rows.append(Store.delete_migration(move.id, "destination"))
        await m.store.write(rows)

    async def peer_confirm(self, a: PeerArgs) -> dict[str, bool]:
        """``migration.confirm``: drop the claim and files an outgoing move kept."""
        async with self._lock(a.id, "source"):
            if (a.id, "source") not in self.moves:
                self.peers.check(a.peer)
                return {"confirmed": True}
            move = self._outgoing(a)
            if move.status != "finished":
                raise Conflict(f"move {a.id} is {move.status} here", {"status": move.status})
            m = self.m
            await self._io(shutil.rmtree, self._held_dir(move.uuid), True)
            assert m.tracker is not None
            m.tracker.release(move.id)
            m._mark_resources_changed()
            del self.moves[(move.id, "source")]
            await m.store.write([Store.delete_claim(move.id), Store.delete_migration(move.id, "source")])
            return {"confirmed": True}

    async def peer_revert(self, a: PeerArgs) -> InstanceRecord | None:
        """``migration.revert``: bring an outgoing move's instance back (None: already back)."""
        async with self._lock(a.id, "source"):
            if (a.id, "source") not in self.moves:
                self.peers.check(a.peer)
                return None
            move = self._outgoing(a)
            if move.status != "finished":
                raise Conflict(f"move {a.id} is {move.status} here", {"status": move.status})
            return await self._restore(move)

    # -- retries ----------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Settle what restarts and unanswered calls left open, and auto-confirm."""
        window = self.cfg.compute.resize_confirm_window_s
        for move in list(self.moves.values()):
            try:
                await self._tick_one(move, window)
            except AgentError as exc:
                log.warning("move %s of %s (%s, %s): %s", move.id, move.uuid, move.role, move.status, exc.message)

    async def _tick_one(self, move: Move, window: float) -> None:
        m, uuid = self.m, move.uuid
        if (settle := self.settlers.get(move.kind)) is not None:
            if move.id not in self._driving:
                await settle(move)
            return
        if move.role == "source":
            if move.status == "finished" or move.id in self._driving:
                return
            async with m._locks.setdefault(uuid, asyncio.Lock()):
                if (move.id, "source") not in self.moves:
                    return
                if move.step == "finishing":
                    await self._settle(move)
                else:
                    await self._abort(move)
            return
        if move.status == "reverting":
            async with m._locks.setdefault(uuid, asyncio.Lock()):
                await self._revert(move)
        elif move.status == "confirming":
            if uuid in m.instances:
                await self.confirm(uuid)
            else:
                await self._confirm_gone(move)
        elif move.status == "finished" and window > 0 and time.time() - move.finished_at >= window:
            log.info("confirming the move of %s: %.0fs passed ([compute] resize_confirm_window_s)", uuid, window)
            await self.confirm(uuid)

    async def drain(self, timeout_s: float) -> None:
        """Wait for moves under way (or leave them to the next start-up's settling)."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for t in pending:
                t.cancel()
        await self.peers.close()
