"""Ports beyond their wire struct: decoding, the checks types cannot say, the conflict index
and the record of a plugged port.

The wire structs (``Port``, ``SecurityGroup`` and their parts) are in
``fastcompute.protocol.ports``; this module checks what they cannot (a MAC's form, a rule's
protocol and ports, addresses used twice) and indexes the ports plugged on the host so that a
new port's conflicts are found in constant time.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from msgspec import Struct

from fastcompute.errors import BadRequest, Conflict
from fastcompute.network.shaping import Shaping
from fastcompute.protocol.ports import Port, SecurityGroup, SecurityGroupRule
from fastcompute.protocol.schema import invalid_from, parse_uint

_MAC_RE: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# Neutron's protocol names (neutron_lib.constants.IP_PROTOCOL_MAP) and their numbers.
PROTOCOLS: Final[dict[str, int]] = {
    "ah": 51, "dccp": 33, "egp": 8, "esp": 50, "gre": 47, "hopopt": 0, "icmp": 1, "igmp": 2,
    "ip": 0, "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44, "ipv6-icmp": 58, "icmpv6": 58,
    "ipv6-nonxt": 59, "ipv6-opts": 60, "ipv6-route": 43, "ospf": 89, "pgm": 113, "rsvp": 46,
    "sctp": 132, "tcp": 6, "udp": 17, "udplite": 136, "vrrp": 112,
}  # fmt: skip
PORT_PROTOCOLS: Final = frozenset({6, 17, 33, 132, 136})
ICMP_PROTOCOLS: Final = frozenset({1, 58})


class PluggedPort(Struct, kw_only=True, frozen=True):
    """What the guest's interface needs of a plugged port: an ethernet device on ``tap``."""

    port_id: str
    tap: str
    mac: str
    mtu: int
    bridge: str


@dataclass
class Plugged:
    """The record of a plugged port: whose it is and the links it is on."""

    instance_uuid: str
    port: Port
    tap: str
    bridge: str
    mtu: int
    shaping: Shaping | None = None  # the instance's bandwidth limits

    @property
    def secured(self) -> bool:
        """True when the port's security groups are enforced (port security on)."""
        return self.port.port_security_enabled

    @property
    def mac(self) -> str:
        """The port's MAC in the normal form (lower case, colons)."""
        return normal_mac(self.port.mac) or self.port.mac

    def answer(self) -> PluggedPort:
        """What the guest's interface needs of this port."""
        return PluggedPort(port_id=self.port.id, tap=self.tap, mac=self.mac, mtu=self.mtu, bridge=self.bridge)


def bad(field_name: str, reason: str) -> BadRequest:
    """The BadRequest of an invalid port field."""
    return BadRequest(f"invalid port: {field_name}: {reason}", {"field": field_name, "reason": reason})


def decode_ports(raw: Iterable[Any], field_name: str = "networks") -> list[Port]:
    """Convert wire dicts (or Ports) into Ports; type errors are BadRequest with the field."""
    ports: list[Port] = []
    for i, item in enumerate(raw):
        if isinstance(item, Port):
            ports.append(item)
            continue
        try:
            ports.append(msgspec.convert(item, Port))
        except msgspec.ValidationError as exc:
            raise invalid_from(exc, f"{field_name}[{i}]") from exc
    return ports


def decode_groups(raw: Sequence[SecurityGroup | Mapping[str, Any]]) -> list[SecurityGroup]:
    """Convert and check a port's new security groups; BadRequest names the field."""
    try:
        groups = [g if isinstance(g, SecurityGroup) else msgspec.convert(g, SecurityGroup) for g in raw]
    except msgspec.ValidationError as exc:
        raise invalid_from(exc, "security_groups") from exc
    for g, group in enumerate(groups):
        for r, rule in enumerate(group.rules):
            check_rule(rule, f"security_groups[{g}].rules[{r}]")
    return groups


def normal_mac(value: str) -> str | None:
    """The MAC in lower case with colons, or None when it is not a MAC."""
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        return None
    return mac


def link_local(mac: str) -> str:
    """The IPv6 link-local address (EUI-64) a port with this MAC configures."""
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return str(ipaddress.IPv6Address(bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, *eui])))


def protocol_number(value: str | int | None) -> int | None:
    """A rule's protocol as a number; None for any, -1 for a name nobody knows."""
    if value is None or value == "any":
        return None
    if isinstance(value, int):
        return value
    number = parse_uint(value)
    if number is not None and number <= 255:
        return number
    return PROTOCOLS.get(value.lower(), -1)


def check_rule(rule: SecurityGroupRule, where: str) -> None:
    """Raise BadRequest when a rule cannot be enforced as written."""
    proto = protocol_number(rule.protocol)
    if proto == -1:
        raise bad(f"{where}.protocol", f"unknown protocol {rule.protocol!r}")
    lo, hi = rule.port_range_min, rule.port_range_max
    if lo is not None or hi is not None:
        if proto in PORT_PROTOCOLS:
            if lo is None or hi is None or lo < 1 or lo > hi:
                raise bad(f"{where}.port_range_min", "need 1 <= port_range_min <= port_range_max")
        elif proto in ICMP_PROTOCOLS:
            if (lo is not None and lo > 255) or (hi is not None and hi > 255) or (lo is None and hi is not None):
                raise bad(f"{where}.port_range_min", "ICMP type and code must be 0-255, code only with a type")
        else:
            raise bad(f"{where}.port_range_min", "port ranges need tcp, udp, sctp, dccp, udplite or ICMP")
    if (proto == 1 and rule.ethertype == "IPv6") or (proto == 58 and rule.ethertype == "IPv4"):
        raise bad(f"{where}.protocol", f"protocol {rule.protocol!r} does not fit ethertype {rule.ethertype}")
    if rule.remote_ip_prefix is not None:
        try:
            net = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
        except ValueError as exc:
            raise bad(f"{where}.remote_ip_prefix", str(exc)) from exc
        if (net.version == 4) != (rule.ethertype == "IPv4"):
            raise bad(f"{where}.remote_ip_prefix", f"not an {rule.ethertype} prefix")


class PortIndex:
    """Who holds each port id, and each MAC and address on each network, on this host.

    A port is checked against it in time independent of how many ports the host has: the
    check used to walk every plugged port, 2.6 ms a spawn at 1,000 ports, so a boot storm's
    validation grew with the square of its size. Holders carry the instance that owns them
    (None when unknown), so that a port plugged again for its own instance (a retried spawn)
    is not a conflict with itself; another port of the same instance with its MAC or an
    address is one, as a second holder could not be told apart when one of them leaves.
    """

    def __init__(self, ports: Iterable[tuple[str | None, Port]] = ()) -> None:
        self._ids: dict[str, str | None] = {}
        self._macs: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._ips: dict[tuple[str, str], tuple[str, str | None]] = {}
        for owner, port in ports:
            self.add(port, owner)

    @staticmethod
    def _keys(port: Port) -> tuple[tuple[str, str], list[tuple[str, str]]]:
        net = port.network.id
        ips = [(net, str(ipaddress.ip_address(fip.ip))) for fip in port.fixed_ips]
        return (net, normal_mac(port.mac) or port.mac), ips

    def add(self, port: Port, owner: str | None = None) -> None:
        """Record a (valid) port as held by ``owner``."""
        mac, ips = self._keys(port)
        self._ids[port.id] = owner
        self._macs[mac] = (port.id, owner)
        for key in ips:
            self._ips[key] = (port.id, owner)

    def discard(self, port: Port) -> None:
        """Forget a port; its MAC and addresses are forgotten only where it holds them."""
        mac, ips = self._keys(port)
        self._ids.pop(port.id, None)
        for table, key in ((self._macs, mac), *((self._ips, k) for k in ips)):
            if table.get(key, ("",))[0] == port.id:
                del table[key]

    def check(self, port: Port, instance_uuid: str | None = None) -> None:
        """Raise Conflict when another port holds this port's MAC or an address, or another
        instance holds its id; the port itself, held by ``instance_uuid``, is a retry."""

        def other(holder: tuple[str, str | None]) -> bool:
            return instance_uuid is None or holder != (port.id, instance_uuid)

        if port.id in self._ids and other((port.id, self._ids[port.id])):
            raise Conflict(f"port {port.id} is already plugged on this host", {"field": "id", "reason": "in use"})
        mac, ips = self._keys(port)
        holder = self._macs.get(mac)
        if holder is not None and other(holder):
            raise Conflict(
                f"MAC {mac[1]} is already used on network {mac[0]} by port {holder[0]}",
                {"field": "mac", "reason": "in use", "port_id": holder[0]},
            )
        for key in ips:
            holder = self._ips.get(key)
            if holder is not None and other(holder):
                raise Conflict(
                    f"IP {key[1]} is already used on network {key[0]} by port {holder[0]}",
                    {"field": "fixed_ips", "reason": "in use", "port_id": holder[0]},
                )


def check_ports(
    ports: Sequence[Port],
    existing: PortIndex | Iterable[Port] = (),
    field_name: str = "networks",
    instance_uuid: str | None = None,
) -> None:
    """Validate ports on their own and against the ports already on this host.

    Malformed ports (bad MAC, bad address, an address twice on one network, unknown protocol,
    security groups on a port without port security) are BadRequest; a port id, MAC or IP that
    another port on the host's same network already uses is Conflict. With a PortIndex,
    ports ``instance_uuid`` holds there are not conflicts.
    """
    seen_ids: set[str] = set()
    seen_macs: set[tuple[str, str]] = set()
    seen_ips: set[tuple[str, str]] = set()
    for i, port in enumerate(ports):
        where = f"{field_name}[{i}]"
        if port.id in seen_ids:
            raise bad(f"{where}.id", f"port {port.id} given twice")
        seen_ids.add(port.id)
        mac = normal_mac(port.mac)
        if mac is None:
            raise bad(f"{where}.mac", f"{port.mac!r} is not a MAC address")
        if int(mac[:2], 16) & 1:
            raise bad(f"{where}.mac", f"{port.mac} is a multicast MAC")
        net = port.network.id
        if (net, mac) in seen_macs:
            raise bad(f"{where}.mac", f"{mac} is used twice on network {net}")
        seen_macs.add((net, mac))
        for j, fip in enumerate(port.fixed_ips):
            try:
                addr = ipaddress.ip_address(fip.ip)
            except ValueError as exc:
                raise bad(f"{where}.fixed_ips[{j}].ip", str(exc)) from exc
            if fip.prefix > addr.max_prefixlen:
                raise bad(f"{where}.fixed_ips[{j}].prefix", f"/{fip.prefix} is too long for {addr}")
            key = (net, str(addr))
            if key in seen_ips:
                raise bad(f"{where}.fixed_ips[{j}].ip", f"{addr} overlaps another address on network {net}")
            seen_ips.add(key)
        if not port.port_security_enabled and port.security_groups:
            raise bad(f"{where}.security_groups", "security groups need port_security_enabled")
        for g, group in enumerate(port.security_groups):
            for r, rule in enumerate(group.rules):
                check_rule(rule, f"{where}.security_groups[{g}].rules[{r}]")
    index = existing if isinstance(existing, PortIndex) else PortIndex((None, p) for p in existing)
    for port in ports:
        index.check(port, instance_uuid)
