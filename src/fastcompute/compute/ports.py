"""The ports of an instance after its spawn: ``instance.attach_port``, ``instance.detach_port``
and ``instance.set_security_groups`` (extensions), each under the instance's lock, in the
states a port can change in; a port change re-makes the config drive, so that the guest's
``network_data.json`` shows the ports it has.
"""

from __future__ import annotations

import logging

import msgspec

from fastcompute.compute.manager import Manager, prefixed
from fastcompute.errors import AgentError, Conflict, NotFound
from fastcompute.hypervisor import Interface
from fastcompute.protocol import InstanceRecord
from fastcompute.protocol.ports import Port, SecurityGroup

log = logging.getLogger("fastcompute.ports")

PORT_STATES = frozenset({"active", "stopped", "paused", "suspended"})
"""Where an instance's ports may change."""


class Ports:
    """Port changes of this host's instances."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager

    async def attach(self, uuid: str, wanted: Port) -> InstanceRecord:
        """``instance.attach_port`` (extension): plug a port and add it to the domain."""
        m = self.m
        async with m.held(uuid, "attach a port to", PORT_STATES) as stored:
            port = (await m._validate_ports([wanted], uuid))[0]
            if any(p.id == port.id for p in stored.ports):
                raise Conflict(f"port {port.id} is already attached to {uuid}", {"port_id": port.id})
            plugged = await m.network.plug(uuid, [*stored.ports, port])
            tap = next(p for p in plugged if p.port_id == port.id)
            try:
                await m.driver.attach_interface(uuid, Interface(tap.tap, tap.mac, tap.mtu), m._guest(uuid))
            except AgentError:
                await m.network.unplug(uuid, [port.id])
                raise
            await m.network.reshape(uuid)  # the hot-plug reset the tap's qdisc (network/shaping.py)
            stored.ports = [*stored.ports, port]
            m._own_ports(uuid, [port])
            await self._remake_config_drive(uuid)
            return await m._commit(uuid)

    async def detach(self, uuid: str, port_id: str) -> InstanceRecord:
        """``instance.detach_port`` (extension): remove a port from the domain and unplug it."""
        m = self.m
        async with m.held(uuid, "detach a port from", PORT_STATES) as stored:
            plugged = next((p for p in m.network.plugged(uuid) if p.port_id == port_id), None)
            if plugged is None or not any(p.id == port_id for p in stored.ports):
                raise NotFound(f"instance {uuid} has no port {port_id}", {"port_id": port_id})
            m._disown_ports(uuid, [p for p in stored.ports if p.id == port_id])
            stored.ports = [p for p in stored.ports if p.id != port_id]
            await m.driver.detach_interface(
                uuid, Interface(plugged.tap, plugged.mac, plugged.mtu),
                m._guest(uuid, skip_taps=frozenset({plugged.tap})))
            await m.network.unplug(uuid, [port_id])
            await self._remake_config_drive(uuid)
            return await m._commit(uuid)

    async def _remake_config_drive(self, uuid: str) -> None:
        """After a port change: the drive shows the ports the instance has now. The change is
        done by then, so a drive that cannot be written is logged, not the op's failure."""
        m = self.m
        if not m._drive_wanted(uuid):
            return
        try:
            await m._write_config_drive(uuid)
        except Exception as exc:
            log.error("could not re-make the config drive of %s: %s", uuid, exc, exc_info=True)

    async def set_security_groups(self, uuid: str, port_id: str, groups: list[SecurityGroup]) -> InstanceRecord:
        """``instance.set_security_groups`` (extension): Neutron's port update, in one transaction."""
        m = self.m
        stored = m._get(uuid)
        async with m._locks[uuid]:
            m._same(uuid, stored)
            port = next((p for p in stored.ports if p.id == port_id), None)
            if port is None:
                raise NotFound(f"instance {uuid} has no port {port_id}", {"port_id": port_id})
            try:
                await m.network.set_security_groups(port_id, groups)
            except AgentError as exc:
                raise type(exc)(exc.message, prefixed(exc.details, "args.")) from None
            stored.ports = [msgspec.structs.replace(p, security_groups=groups) if p.id == port_id else p
                            for p in stored.ports]
            return await m._commit(uuid)
