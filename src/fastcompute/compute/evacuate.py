"""``instance.evacuate``: an instance of a host that is down rebuilt on this one, and the
dead host's copy dropped when its agent comes back (Nova's evacuate).

The destination cannot ask the dead host for the instance, so the caller brings it: what
``instance.export`` of the instance's own agent last gave (record, ports, bootstrap data), kept
by the caller as Nova's database keeps it. The destination refuses while the source agent
answers on the peer link (``migration.evacuated`` with no uuids, ``[migration]
evacuate_probe_s``): a host that is up is migrated from, not evacuated.

Steps at the destination, each durable before the next: the instance recorded here (task
``evacuating``), its claim and an evacuation mark (``evacuations`` table: uuid, source,
status ``rebuilding``) in one write; the image fetched, the root disk and the config drive
made, the same ports plugged, the domain launched (started unless the instance was
stopped); then the mark ``done`` with the instance's new state. A failure or a crash before
that gives everything back and forgets the instance here (the caller may evacuate it again).

The source learns it lost the instance two ways: at start-up, before it reconciles anything,
it asks each peer which of its instances were evacuated from it (``migration.evacuees``); and
each peer holding a ``done`` mark tells it every ``[migration] retry_interval_s``
(``migration.evacuated``) until it answers that its copy is gone, which ends the mark. Its
copy (domain, disks, plugged ports, claim, record) is then removed; the ports themselves,
which the new copy uses, and the image are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import msgspec

from fastcompute.compute import tasks
from fastcompute.compute.cpu import check_traits
from fastcompute.compute.hardware import check_host, hardware
from fastcompute.compute.manager import Manager, _typed
from fastcompute.compute.records import Stored, bootstrap_of, now, numa_cells, portable_bootstrap
from fastcompute.compute.validate import flavor_request
from fastcompute.errors import AgentError, BadRequest, Busy, Conflict
from fastcompute.hypervisor import DomainInfo
from fastcompute.protocol import EvacuateArgs, EvacuatedArgs, InstanceCopy, InstanceRecord, invalid, normalise_uuid
from fastcompute.store import Statement, Store

log = logging.getLogger("fastcompute.evacuate")

TASK = "evacuating"
# Nova's rule: an instance that was running, stopped or failed on the dead host.
EVACUABLE = frozenset({"active", "stopped", "error"})


class Mark(msgspec.Struct, kw_only=True):
    """An instance evacuated to this host, kept until its source has dropped its copy."""

    uuid: str
    source: str
    status: Literal["rebuilding", "done"]
    at: float


class Evacuations:
    """Evacuations to this host, and the dropping of this host's copies evacuated elsewhere."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.peers = manager.migrations.peers
        self.marks: dict[str, Mark] = {}
        self._unasked: set[str] = set()  # peers that did not answer at start-up
        manager.resumers[TASK] = tasks.settles(self._roll_back)
        manager.before_reconcile.append(self._at_start)

    # -- the client's ops ------------------------------------------------------------------------

    def export(self, uuid: str) -> InstanceCopy:
        """``instance.export``: the instance as another host rebuilds it (``instance.evacuate``)."""
        stored = self.m._get(uuid)
        return InstanceCopy(record=stored.record, ports=stored.ports, bootstrap=portable_bootstrap(stored))

    async def evacuate(self, a: EvacuateArgs) -> InstanceRecord:
        """``instance.evacuate``: rebuild here an instance whose host is down."""
        m, uuid, rec = self.m, a.uuid, a.instance.record
        if normalise_uuid(rec.uuid) != uuid:
            raise BadRequest("the instance carried is another instance than uuid",
                             {"field": "args.instance.record.uuid"})
        source = a.source or rec.host
        if source == m.hostname:
            raise invalid("args.source", "an instance is not evacuated to the host it is on")
        self.peers.check(source)
        if rec.vm_state not in EVACUABLE:
            raise Conflict(f"cannot evacuate instance {uuid} in vm_state {rec.vm_state}",
                           {"uuid": uuid, "vm_state": rec.vm_state})
        if rec.volumes:
            raise Conflict(f"instance {uuid} has volumes attached: evacuating it is not supported",
                           {"uuid": uuid, "reason": "volumes"})
        boot = bootstrap_of(a.instance.bootstrap, "args.instance.bootstrap")
        ports = await m._validate_ports(a.instance.ports, uuid)
        self._not_here(uuid)
        await self._source_down(source)
        self._not_here(uuid)
        stored = await self._take(uuid, rec, source, ports, boot)
        async with m._locks[uuid]:
            tasks.step("evacuate:recorded")
            try:
                power = await self._build(uuid, stored)
            except BaseException as exc:
                await self._roll_back(uuid, None)
                if isinstance(exc, AgentError) or not isinstance(exc, Exception):
                    raise
                raise _typed(exc, f"evacuate of {uuid}") from None
            tasks.step("evacuate:launched")
            mark = self.marks[uuid]
            mark.status = "done"
            target = "stopped" if rec.vm_state == "stopped" else "active"
            log.info("instance %s evacuated from %s", uuid, source)
            return await m._commit(uuid, vm_state=target, task_state=None, power_state=power, fault=None,
                                   extra=[m.store.put_evacuation(uuid, mark)])

    def _not_here(self, uuid: str) -> None:
        if uuid in self.m.instances or uuid in self.m._deleting:
            raise Conflict(f"instance {uuid} is already on this host", {"uuid": uuid})

    async def _source_down(self, source: str) -> None:
        """CONFLICT unless the source agent leaves the peer link unanswered."""
        try:
            await self.peers.call(source, "migration.evacuated", {"uuids": []},
                                  timeout_s=self.m.cfg.migration.evacuate_probe_s)
        except Busy:
            return
        except AgentError:
            pass  # a refusal is an answer too
        raise Conflict(f"host {source} answers: only an instance of a host that is down is evacuated "
                       "(migrate it instead)", {"source": source})

    async def _take(self, uuid: str, rec: InstanceRecord, source: str, ports: list[Any],
                    boot: Any) -> Stored:
        """The instance recorded here, claimed, and marked as evacuated (one write)."""
        m = self.m
        tracker = m.tracker
        assert tracker is not None
        f = rec.flavor
        if m.host_cpu is not None:
            check_traits(f.extra_specs, m.host_cpu)
        check_host(hardware(f.extra_specs, f.vcpus), m.host_features, f.extra_specs)
        request = flavor_request(f)
        claim = tracker.claim(uuid, rec.project_id, f.vcpus, f.memory_mb, f.disk_gb, request)
        new = msgspec.structs.replace(rec, uuid=uuid, host=m.hostname, task_state=TASK, power_state="nostate",
                                      numa=numa_cells(request, claim.numa_placement), updated_at=now())
        stored = Stored(record=new, digest="", ports=ports, bootstrap=boot)
        mark = Mark(uuid=uuid, source=source, status="rebuilding", at=time.time())
        m.instances[uuid], self.marks[uuid] = stored, mark
        m._locks[uuid] = asyncio.Lock()
        m._own_ports(uuid, ports)
        m._mark_resources_changed()
        try:
            await m.store.write([m.store.put_instance(uuid, rec.project_id, None, stored),
                                 m.store.put_claim(uuid, rec.project_id, claim), m.store.put_evacuation(uuid, mark)])
        except BaseException:
            tracker.release(uuid)
            self._forget(uuid)
            raise
        return stored

    async def _build(self, uuid: str, stored: Stored) -> str:
        m, rec = self.m, stored.record
        if not await m._fetch_image(uuid, rec):
            raise Conflict(f"the evacuate of {uuid} was cancelled", {"uuid": uuid})
        tasks.step("evacuate:fetched")
        drive = m._config_drive(uuid, new=True) if m._drive_wanted(uuid) else None
        await m._prepare_root(uuid, rec, drive)
        if stored.ports:
            await m.network.plug(uuid, stored.ports)
        return await m.driver.launch(m._guest(uuid), start=rec.vm_state != "stopped")

    async def _roll_back(self, uuid: str, _dom: DomainInfo | None) -> None:
        """An evacuate that did not finish: everything it made here goes, and the instance."""
        log.info("rolling back the evacuate of %s", uuid)
        released = await self.m._undo(uuid)
        await self.m.store.write([*released, Store.delete_instance(uuid), Store.delete_evacuation(uuid)])
        self._forget(uuid)

    def _forget(self, uuid: str) -> None:
        m = self.m
        stored = m.instances.pop(uuid, None)
        m._locks.pop(uuid, None)
        self.marks.pop(uuid, None)
        if stored is not None:
            m._disown_ports(uuid, stored.ports)

    # -- the source's side -----------------------------------------------------------------------

    async def _at_start(self) -> None:
        """Load the marks; drop this host's copies its peers say they evacuated (before the
        start-up re-creates their domains)."""
        dec = msgspec.msgpack.Decoder(Mark)
        for body in await self.m.store.load_evacuations():
            mark = dec.decode(body)
            self.marks[mark.uuid] = mark
        hosts = [h for h in self.peers.endpoints if h != self.m.hostname]
        await asyncio.gather(*(self._ask(h) for h in hosts))

    async def _ask(self, host: str) -> None:
        """Ask ``host`` which of this host's instances it evacuated, and drop them."""
        mine = [u for u, s in self.m.instances.items() if s.record.host == self.m.hostname and u not in self.marks]
        if not mine:
            # Nothing here a peer could have taken: no wait of up to evacuate_probe_s for a
            # peer that is down too (as when a pair of hosts starts together).
            self._unasked.discard(host)
            return
        try:
            got = await self.peers.call(host, "migration.evacuees", {"uuids": mine},
                                        timeout_s=self.m.cfg.migration.evacuate_probe_s)
        except AgentError as exc:
            log.warning("could not ask %s which instances it evacuated from here (asked again later): %s",
                        host, exc.message)
            self._unasked.add(host)
            return
        self._unasked.discard(host)
        for uuid in got.get("uuids", []):
            if uuid in mine:
                await self._drop(uuid, host)

    async def _drop(self, uuid: str, host: str) -> None:
        """This host's copy of an instance ``host`` evacuated: domain, disk, plugged ports,
        claim, record. An instance a move holds, or one evacuated to this host, stays."""
        m = self.m
        stored = m.instances.get(uuid)
        if stored is None or uuid in m._held or uuid in self.marks:
            return
        async with m._locks.setdefault(uuid, asyncio.Lock()):
            if m.instances.get(uuid) is not stored:
                return
            log.info("instance %s was evacuated to %s while this host was down: removing its copy here", uuid, host)
            released = await m._undo(uuid)
            if not released:
                return  # its domain is still here: tried again by the next call
            rows: list[Statement] = [*released, Store.delete_instance(uuid), Store.delete_console_tokens(uuid)]
            await m.store.write(rows)
            del m.instances[uuid]
            m._disown_ports(uuid, stored.ports)
        m._locks.pop(uuid, None)

    # -- ops between agents ----------------------------------------------------------------------

    async def evacuated(self, a: EvacuatedArgs) -> dict[str, list[str]]:
        """``migration.evacuated``: the caller holds these instances now; this host's copies
        go. Replies with those of them this host no longer has."""
        self.peers.check(a.peer)
        for uuid in a.uuids:
            await self._drop(uuid, a.peer)
        return {"dropped": [u for u in a.uuids if u not in self.m.instances or u in self.marks]}

    async def evacuees(self, a: EvacuatedArgs) -> dict[str, list[str]]:
        """``migration.evacuees``: which of the caller's instances ``uuids`` this host evacuated."""
        self.peers.check(a.peer)
        return {"uuids": [u for u in a.uuids if (mark := self.marks.get(u)) is not None
                          and mark.source == a.peer and mark.status == "done"]}

    async def tick(self) -> None:
        """Tell the sources of finished evacuations to drop their copies; ask the peers that
        did not answer at start-up again."""
        for host in list(self._unasked):
            await self._ask(host)
        by_source: dict[str, list[str]] = {}
        for mark in self.marks.values():
            if mark.status == "done":
                by_source.setdefault(mark.source, []).append(mark.uuid)
        for source, uuids in by_source.items():
            try:
                got = await self.peers.call(source, "migration.evacuated", {"uuids": uuids},
                                            timeout_s=self.m.cfg.migration.evacuate_probe_s)
            except AgentError:
                continue  # still down: told at the next tick
            dropped = [u for u in got.get("dropped", []) if u in uuids]
            for uuid in dropped:
                self.marks.pop(uuid, None)
            if dropped:
                await self.m.store.write([Store.delete_evacuation(u) for u in dropped])
