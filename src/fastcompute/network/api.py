"""The Network service: the public API, the record of plugged ports, and the work of each batch.

The record changes on the event loop only; links and tables change in one worker at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
from msgspec import Struct

from fastcompute.config import NetworkConfig
from fastcompute.errors import AgentError, NotFound
from fastcompute.network.conntrack import Conntrack
from fastcompute.network.links import Links, Names
from fastcompute.network.nft.apply import Tables
from fastcompute.network.nft.libnft import NftError
from fastcompute.network.ports import (
    Plugged,
    PluggedPort,
    PortIndex,
    bad,
    check_ports,
    decode_groups,
    decode_ports,
    link_local,
)
from fastcompute.network.queue import Change, ChangeQueue, settle
from fastcompute.network.shaping import Shaping
from fastcompute.protocol.ports import Port, PortNetwork, SecurityGroup

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class ReconcileReport(Struct, kw_only=True):
    """What a reconciliation changed; all empty when everything was already as wanted."""

    removed_links: list[str] = []
    made_links: list[str] = []
    removed_ports: list[str] = []
    made_ports: list[str] = []
    rebuilt_tables: bool = False

    @property
    def changed(self) -> bool:
        """True when the reconciliation changed anything."""
        return bool(
            self.removed_links or self.made_links or self.removed_ports or self.made_ports or self.rebuilt_tables
        )


class Network:
    """Plugs ports into bridges and enforces their security groups; one per agent.

    All public methods are coroutines that queue a change; changes run one at a time, their
    netlink and nftables work in ``executor`` (or the loop's default), and plugs or unplugs
    queued behind one another run as one batch (a boot storm's or a mass delete's). The record
    of what is plugged changes on the event loop only. Call :meth:`reconcile` at start-up with
    every instance's ports before plugging anything, so the record matches the host.
    """

    def __init__(
        self,
        cfg: NetworkConfig,
        executor: concurrent.futures.Executor | None = None,
        metadata: tuple[str, int] | None = None,
    ) -> None:
        """``metadata``: the (address, port) the metadata service listens on, whose steering
        rules the tables then carry; None when it is off."""
        self.cfg = cfg
        self._executor = executor
        self._changes = ChangeQueue(self._plug_batch, self._unplug_batch)
        self._sync_lock = threading.Lock()
        self._names = Names(cfg)
        self._links = Links(self._names)
        self._tables = Tables(cfg.owner, cfg.conntrack_zones_from, metadata)
        self._ct: Conntrack | None = None
        self._ports: dict[str, Plugged] = {}
        self._of: dict[str, dict[str, Plugged]] = {}  # instance uuid -> its ports, by id
        self._index = PortIndex()  # the plugged ports, and those of the batch being plugged
        self._at: dict[tuple[str, str], Plugged] = {}  # (bridge, address) -> its secured port
        self.on_ports: Callable[[], object] | None = None
        # The bandwidth limits of an instance's ports (its flavor's), asked at each plug.
        self.shaping_of: Callable[[str], Shaping | None] = lambda _uuid: None

    @property
    def on_batch(self) -> Callable[[str, int, float], object] | None:
        """Told (kind, changes, seconds) of every batch of changes that ran."""
        return self._changes.on_batch

    @on_batch.setter
    def on_batch(self, observer: Callable[[str, int, float], object] | None) -> None:
        self._changes.on_batch = observer

    # -- names --------------------------------------------------------------------------

    def tap_name(self, port_id: str) -> str:
        """The port's tap: the prefix then the port id, cut at 15 characters (as os-vif)."""
        return self._names.tap(port_id)

    def bridge_name(self, network: PortNetwork) -> str:
        """The network's bridge: the given one, or the prefix then the network id."""
        return self._names.bridge(network)

    def vlan_name(self, vlan: int) -> str:
        """The VLAN sub-interface of the physical interface for ``vlan``."""
        return self._names.vlan(vlan)

    @property
    def doomed_group(self) -> int:
        """The link group this agent puts its links in just before deleting them by group."""
        return self._names.doomed_group

    # -- public API ---------------------------------------------------------------------

    async def validate(self, ports: Sequence[Port | Mapping[str, Any]], instance_uuid: str | None = None) -> list[Port]:
        """Decode the ports and check them against every port plugged here.

        Ports already plugged for ``instance_uuid`` are not conflicts (a retried spawn).
        Returns the decoded ports; raises BadRequest or Conflict.
        """
        decoded = decode_ports(ports)
        check_ports(decoded, self._index, instance_uuid=instance_uuid)
        return decoded

    async def plug(self, instance_uuid: str, ports: Sequence[Port | Mapping[str, Any]]) -> list[PluggedPort]:
        """Make the bridges, VLAN sub-interfaces and taps of the ports and apply their groups.

        One nftables transaction for all the ports (and for the ports of the plugs queued
        with this one). Plugging a port again for the same instance is a no-op that returns
        the same answer. On failure nothing is left behind.
        """
        decoded = decode_ports(ports)
        change = self._changes.change("plug", instance_uuid=instance_uuid, ports=decoded)
        result: list[PluggedPort] = await self._changes.submit(change)
        return result

    async def unplug(self, instance_uuid: str, ports: Iterable[Port | str] | None = None) -> None:
        """Remove the ports' taps and rules, and bridges we made that no port uses any more.

        ``ports`` are Ports or port ids; None means all of the instance's ports. Ports that are
        not plugged are ignored, so a retried delete succeeds.
        """
        ids = None if ports is None else [p.id if isinstance(p, Port) else p for p in ports]
        if ids is None and instance_uuid not in self._of and self._changes.idle():
            return  # an instance without ports (most, in a storm) costs nothing
        await self._changes.submit(self._changes.change("unplug", instance_uuid=instance_uuid, port_ids=ids))

    async def set_security_groups(self, port_id: str, groups: Sequence[SecurityGroup | Mapping[str, Any]]) -> None:
        """Replace a port's security groups in one transaction (Neutron's port update).

        Established connections stay up (conntrack accepts them before any group rule); new
        ones follow the new rules from the moment the transaction commits.
        """
        decoded = decode_groups(groups)

        async def change() -> None:
            plugged = self._ports.get(port_id)
            if plugged is None:
                raise NotFound(f"port {port_id} is not plugged on this host", {"field": "port_id", "reason": "unknown"})
            if not plugged.port.port_security_enabled and decoded:
                raise bad("security_groups", "security groups need port_security_enabled")
            self._remember(await self._run(self._set_groups_sync, plugged, decoded))

        await self._changes.submit(self._changes.change("other", call=change))

    async def reconcile(self, ports_by_instance: Mapping[str, Sequence[Port | Mapping[str, Any]]]) -> ReconcileReport:
        """Make the host match the wanted ports: remove strays, re-make what is missing.

        Only links whose alias carries our owner tag, and only our own tables, are touched.
        Running it twice in a row changes nothing the second time.
        """
        wanted: dict[str, Plugged] = {}
        for uuid, plist in ports_by_instance.items():
            for port in decode_ports(plist):
                wanted[port.id] = self._plugged_for(uuid, port)

        async def change() -> ReconcileReport:
            self._ports, self._of, self._index, self._at = {}, {}, PortIndex(), {}
            for p in wanted.values():
                self._remember(p)
                self._index.add(p.port, p.instance_uuid)
            try:
                return await self._run(self._reconcile_sync, list(self._ports.values()))
            finally:
                self._ports_changed()

        report: ReconcileReport = await self._changes.submit(self._changes.change("other", call=change))
        return report

    async def reshape(self, instance_uuid: str) -> None:
        """Put the inbound limits of the instance's taps back where they are missing: the
        hypervisor resets the qdisc of a tap whose guest it starts (or hot-plugs it into).
        A failure is logged, not raised (a tap gone meanwhile is no error of the caller's)."""
        shaped = [p for p in self._of.get(instance_uuid, {}).values() if p.shaping and p.shaping.inbound_class()]
        if not shaped:
            return

        async def change() -> None:
            try:
                await self._run(self._links.shape, shaped)
            except Exception:
                log.warning("could not put back the inbound limits of %s's taps", instance_uuid, exc_info=True)

        await self._changes.submit(self._changes.change("other", call=change))

    def plugged(self, instance_uuid: str | None = None) -> list[PluggedPort]:
        """The ports plugged here (of one instance, or all), as the guests' interfaces need them."""
        if instance_uuid is None:
            return [p.answer() for p in self._ports.values()]
        return [p.answer() for p in self._of.get(instance_uuid, {}).values()]

    def port_at(self, bridge: str, address: str) -> tuple[str, str] | None:
        """(instance uuid, port id) of the port with port security on ``bridge`` that owns
        ``address`` (a fixed IP, in its normal form), or None.

        The spoof chain drops what such a port sends from any other address, so a packet from
        ``address`` that came in on ``bridge`` with our mark is this port's.
        """
        p = self._at.get((bridge, address))
        return None if p is None else (p.instance_uuid, p.port.id)

    def secured_bridges(self) -> set[str]:
        """The bridges that have at least one port with port security."""
        return {bridge for bridge, _ in self._at}

    def _ports_changed(self) -> None:
        if self.on_ports is not None:
            try:
                self.on_ports()
            except Exception:
                log.exception("on_ports observer failed")

    def close(self) -> None:
        """Close the netlink socket and the nftables context."""
        with self._sync_lock:
            self._links.close()
            if self._ct is not None:
                self._ct.close()
                self._ct = None
            self._tables.close()

    # -- the record and the batches (on the event loop) ---------------------------------

    def _plugged_for(self, instance_uuid: str, port: Port) -> Plugged:
        mtu = port.network.mtu or self.cfg.default_mtu
        return Plugged(instance_uuid, port, self.tap_name(port.id), self.bridge_name(port.network), mtu,
                       self.shaping_of(instance_uuid))

    def _remember(self, p: Plugged) -> None:
        self._ports[p.port.id] = p
        self._of.setdefault(p.instance_uuid, {})[p.port.id] = p
        if p.secured:
            for f in p.port.fixed_ips:
                self._at[(p.bridge, str(ipaddress.ip_address(f.ip)))] = p

    def _forget(self, p: Plugged) -> None:
        self._ports.pop(p.port.id, None)
        mine = self._of.get(p.instance_uuid, {})
        mine.pop(p.port.id, None)
        if not mine:
            self._of.pop(p.instance_uuid, None)
        self._index.discard(p.port)
        for f in p.port.fixed_ips:
            key = (p.bridge, str(ipaddress.ip_address(f.ip)))
            if self._at.get(key) is p:
                del self._at[key]

    async def _plug_batch(self, changes: list[Change]) -> None:
        """Admit each plug against the host and the batch so far, then make them all."""
        admitted = self._admit(changes)
        try:
            outcomes = await self._run(self._plug_sync, [new for _, new in admitted]) if admitted else []
        except BaseException:
            for _, new in admitted:
                for p in new:
                    self._index.discard(p.port)
            raise
        for (c, new), failure in zip(admitted, outcomes, strict=True):
            if failure is not None:
                for p in new:
                    self._index.discard(p.port)
                settle(c, failure)
                continue
            for p in new:
                self._remember(p)
            missing = [p.id for p in c.ports if p.id not in self._ports]
            if missing:  # made by another plug of this batch, which failed
                settle(c, AgentError(f"port {missing[0]} could not be plugged"))
            else:
                settle(c, [self._ports[p.id].answer() for p in c.ports])
        self._ports_changed()

    def _admit(self, changes: list[Change]) -> list[tuple[Change, list[Plugged]]]:
        """Check each plug against the index (which takes its ports in) and settle those
        refused; the others with the ports they make (none already plugged or made earlier)."""
        admitted: list[tuple[Change, list[Plugged]]] = []
        taken: set[str] = set()  # ports an earlier plug of this batch makes
        for c in changes:
            try:
                check_ports(c.ports, self._index, instance_uuid=c.instance_uuid)
                if not self.cfg.physical_interface and any(p.network.vlan is not None for p in c.ports):
                    raise bad("network.vlan", "this host has no physical_interface for VLAN networks")
            except AgentError as exc:
                settle(c, exc)
                continue
            new = [
                self._plugged_for(c.instance_uuid, p) for p in c.ports if p.id not in self._ports and p.id not in taken
            ]
            for p in new:
                self._index.add(p.port, c.instance_uuid)
                taken.add(p.port.id)
            admitted.append((c, new))
        return admitted

    async def _unplug_batch(self, changes: list[Change]) -> None:
        gone: list[Plugged] = []
        unknown: list[tuple[str, str]] = []  # (instance, port id) of ports not in the record
        for c in changes:
            ids = list(self._of.get(c.instance_uuid, {})) if c.port_ids is None else c.port_ids
            for pid in ids:
                p = self._ports.get(pid)
                if p is None:
                    unknown.append((c.instance_uuid, pid))
                elif p.instance_uuid == c.instance_uuid:
                    self._forget(p)
                    gone.append(p)
        try:
            if gone or unknown:
                await self._run(self._unplug_sync, gone, unknown)
        finally:
            self._ports_changed()
        for c in changes:
            settle(c, None)

    # -- blocking work (in the executor, one at a time) ---------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()

        def call() -> _T:
            with self._sync_lock:
                return fn(*args)

        return await loop.run_in_executor(self._executor, call)

    def _commit(self, new: list[Plugged], also: Sequence[Plugged] = ()) -> None:
        """Add plugged ports to the tables (``also``: ports committed before, not recorded yet)."""
        if self._tables.ready:
            self._tables.change(new, ())
        else:
            self._tables.sync([*self._ports.values(), *also, *new])

    def _plug_sync(self, plugs: list[list[Plugged]]) -> list[Exception | None]:
        """Make the links of each plug, then one transaction for them all.

        Returns each plug's failure (None: plugged). A plug that fails leaves nothing behind
        and does not fail the others: when the joint transaction is refused, each plug's is
        tried on its own.
        """
        failures: list[Exception | None] = [None] * len(plugs)
        made_by: list[list[str]] = [[] for _ in plugs]

        def fail(i: int, exc: Exception) -> None:
            self._links.delete(reversed(made_by[i]))
            failures[i] = exc

        for i, new in enumerate(plugs):
            try:
                for p in new:
                    self._links.ensure_port(p, made_by[i])
            except Exception as exc:
                fail(i, exc)
        good = [i for i, failure in enumerate(failures) if failure is None and plugs[i]]
        if not good:  # nothing new (a retried plug) or nothing left
            return failures
        try:
            self._commit([p for i in good for p in plugs[i]])
        except Exception as joint:
            if len(good) == 1:
                fail(good[0], joint)
                return failures
            committed: list[Plugged] = []
            for i in good:
                try:
                    self._commit(plugs[i], committed)
                except Exception as own:
                    fail(i, own)
                else:
                    committed += plugs[i]
        return failures

    def _unplug_sync(self, gone: list[Plugged], unknown: list[tuple[str, str]]) -> None:
        zone_of = self._tables.zones()  # before the last port of a bridge takes its zone away
        try:
            if not self._tables.ready:
                raise NftError("tables not checked yet")
            self._tables.change((), gone)
        except NftError:
            # The tables do not match the record (changed behind our back, or not read since
            # start-up): bring them to what the remaining ports need.
            self._tables.sync(list(self._ports.values()), forget=gone)
        # Taps of unknown ports (a delete after a restart without reconcile) still go if ours.
        self._links.delete([p.tap for p in gone] + self._links.our_taps(unknown))
        self._forget_connections(gone, zone_of)
        for network in {p.bridge: p.port.network for p in gone}.values():
            if not self._tables.bridge_used(self.bridge_name(network)):
                self._links.drop_bridge(network)

    def _forget_connections(self, gone: Sequence[Plugged], zone_of: Mapping[str, int]) -> None:
        """Delete the tracked connections of the ports' addresses (see conntrack.py).

        After the ports' taps are gone, so that none comes back; a failure is logged, not
        raised: the ports are unplugged either way. Not alongside the link deletion: that
        waits for an RCU grace period, which the dump (a walk under the RCU read lock)
        delays, and the two took as long together as one after the other."""
        addresses: dict[int, set[str]] = {}
        for p in gone:
            mine = addresses.setdefault(zone_of.get(p.bridge, 0), set())
            mine.update(f.ip for f in p.port.fixed_ips)
            mine.add(link_local(p.mac))
        if not addresses:
            return
        try:
            if self._ct is None:
                self._ct = Conntrack()
            self._ct.forget(addresses)
        except OSError:
            log.warning("could not delete the tracked connections of unplugged ports", exc_info=True)

    def _set_groups_sync(self, plugged: Plugged, groups: list[SecurityGroup]) -> Plugged:
        port = msgspec.structs.replace(plugged.port, security_groups=groups)
        updated = dataclasses.replace(plugged, port=port)
        if self._tables.ready:
            self._tables.change([updated], [plugged])
        else:
            self._tables.sync([updated if p is plugged else p for p in self._ports.values()])
        return updated

    def _reconcile_sync(self, wanted: list[Plugged]) -> ReconcileReport:
        report = ReconcileReport(removed_links=self._links.remove_strays(wanted))
        made: list[str] = []
        for p in wanted:
            self._links.ensure_port(p, made)
        report.made_links = made
        if not wanted:
            # Nothing is wanted: tables a past run left go too, and none are made, so a host
            # without ports keeps no rules of ours.
            report.rebuilt_tables = self._tables.drop()
            return report
        synced = self._tables.sync(wanted, prune=True)
        report.rebuilt_tables = synced.rebuilt
        report.made_ports = synced.made_ports
        report.removed_ports = synced.removed_ports
        return report
