"""Ports on Linux bridges, with their security groups enforced in nftables.

The agent plugs its instances' ports itself (what os-vif and Neutron's Linux bridge agent do
for Nova): a bridge per network (made when missing), a VLAN sub-interface of the configured
physical interface when the network has a VLAN, and one tap per port named from the port id.
Links are made through netlink (pyroute2); every link the agent makes carries an alias
``<owner>:<kind>:...`` so that unplugging and reconciliation remove only what the agent made.

Security groups live in two nftables tables named ``<owner>`` (families ``bridge`` and
``inet``), changed by one atomic transaction per batch of changes (one plug or unplug alone,
or all of those queued together in a storm) through the in-process libnftables binding. The
kernel has no bridge-family conntrack here, so the work is split in two:

* The bridge table sees bridge ports. ``prerouting`` writes into the packet mark the number
  of the sending port's egress rule chain (map ``egress_mark``, keyed by input interface) and
  sends the packets of our ports to the ``spoof`` chain, which drops any packet whose (port,
  MAC), (port, IPv4), (port, IPv6) or ARP sender is not in the port sets, VLAN-tagged frames,
  and DHCP-server and router-advertisement packets. ``forward`` then rewrites the mark to the
  number of the receiving port's ingress chain (map ``ingress_mark``), or clears it.
* br_netfilter hands bridged IP packets to the ``inet`` hooks, where conntrack runs. inet
  ``prerouting`` accepts established and related packets, drops invalid ones and jumps, by
  the mark, through the ``egress`` verdict map to the sender's rule chain; inet ``forward``
  does the same with the ``ingress`` map and the receiver's chain. Rule chains hold the allow
  rules of a set of groups and end in drop.

Every per-port fact is an element of a plain set or map and every lookup a hash lookup, so a
packet's path and the cost of adding a port do not grow with the number of ports. Rule chains
are named by a digest of their rules and shared by every port with the same rules; the
verdict maps hold one element per chain, not per port, because the kernel re-validates every
jump of a verdict map on each commit. A port that joins rule sets in use costs five element
insertions. (libnftables 1.0.6 lists every chain before adding a rule or element, so a new
rule set costs more as rule sets accumulate.) Each rule chain's first rule carries its
digest, which is how reconciliation tells an intact chain from a damaged one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import msgspec
from msgspec import Struct

from fastcompute.config import NetworkConfig
from fastcompute.conntrack import Conntrack
from fastcompute.errors import AgentError, BadRequest, Conflict, NotFound
from fastcompute.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attr, error_of, message, messages, raise_error
from fastcompute.nftables import Nft, NftError
from fastcompute.protocol.ports import IFNAMSIZ, Port, PortNetwork, SecurityGroup, SecurityGroupRule
from fastcompute.protocol.schema import invalid_from, parse_uint

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_IFF_UP: Final = 1
_MAC_RE: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Packet marks: bit 31 says "ours", bits 30-16 are a hash of the tables' name (so that two
# sets of tables on one host, say an agent's and a test's, never judge each other's packets),
# bits 15-0 the number of a rule chain. Other marks never hit our maps.
_MARK_OURS: Final = 0x80000000
_MARK_PORT_BITS: Final = 0xFFFF0000
_MAX_CHAIN_ID: Final = 0xFFFF

# Neutron's protocol names (neutron_lib.constants.IP_PROTOCOL_MAP) and their numbers.
PROTOCOLS: Final[dict[str, int]] = {
    "ah": 51, "dccp": 33, "egp": 8, "esp": 50, "gre": 47, "hopopt": 0, "icmp": 1, "igmp": 2,
    "ip": 0, "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44, "ipv6-icmp": 58, "icmpv6": 58,
    "ipv6-nonxt": 59, "ipv6-opts": 60, "ipv6-route": 43, "ospf": 89, "pgm": 113, "rsvp": 46,
    "sctp": 132, "tcp": 6, "udp": 17, "udplite": 136, "vrrp": 112,
}  # fmt: skip
_PORT_PROTOCOLS: Final = frozenset({6, 17, 33, 132, 136})
_ICMP_PROTOCOLS: Final = frozenset({1, 58})

class PluggedPort(Struct, kw_only=True, frozen=True):
    """What the domain XML needs of a plugged port: ``<interface type='ethernet'>`` on ``tap``."""

    port_id: str
    tap: str
    mac: str
    mtu: int
    bridge: str


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


def _bad(field_name: str, reason: str) -> BadRequest:
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


def _normal_mac(value: str) -> str | None:
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        return None
    return mac


def _protocol_number(value: str | int | None) -> int | None:
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
    proto = _protocol_number(rule.protocol)
    if proto == -1:
        raise _bad(f"{where}.protocol", f"unknown protocol {rule.protocol!r}")
    lo, hi = rule.port_range_min, rule.port_range_max
    if lo is not None or hi is not None:
        if proto in _PORT_PROTOCOLS:
            if lo is None or hi is None or lo < 1 or lo > hi:
                raise _bad(f"{where}.port_range_min", "need 1 <= port_range_min <= port_range_max")
        elif proto in _ICMP_PROTOCOLS:
            if (lo is not None and lo > 255) or (hi is not None and hi > 255) or (lo is None and hi is not None):
                raise _bad(f"{where}.port_range_min", "ICMP type and code must be 0-255, code only with a type")
        else:
            raise _bad(f"{where}.port_range_min", "port ranges need tcp, udp, sctp, dccp, udplite or ICMP")
    if (proto == 1 and rule.ethertype == "IPv6") or (proto == 58 and rule.ethertype == "IPv4"):
        raise _bad(f"{where}.protocol", f"protocol {rule.protocol!r} does not fit ethertype {rule.ethertype}")
    if rule.remote_ip_prefix is not None:
        try:
            net = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
        except ValueError as exc:
            raise _bad(f"{where}.remote_ip_prefix", str(exc)) from exc
        if (net.version == 4) != (rule.ethertype == "IPv4"):
            raise _bad(f"{where}.remote_ip_prefix", f"not an {rule.ethertype} prefix")


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
        return (net, _normal_mac(port.mac) or port.mac), ips

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
            raise _bad(f"{where}.id", f"port {port.id} given twice")
        seen_ids.add(port.id)
        mac = _normal_mac(port.mac)
        if mac is None:
            raise _bad(f"{where}.mac", f"{port.mac!r} is not a MAC address")
        if int(mac[:2], 16) & 1:
            raise _bad(f"{where}.mac", f"{port.mac} is a multicast MAC")
        net = port.network.id
        if (net, mac) in seen_macs:
            raise _bad(f"{where}.mac", f"{mac} is used twice on network {net}")
        seen_macs.add((net, mac))
        for j, fip in enumerate(port.fixed_ips):
            try:
                addr = ipaddress.ip_address(fip.ip)
            except ValueError as exc:
                raise _bad(f"{where}.fixed_ips[{j}].ip", str(exc)) from exc
            if fip.prefix > addr.max_prefixlen:
                raise _bad(f"{where}.fixed_ips[{j}].prefix", f"/{fip.prefix} is too long for {addr}")
            key = (net, str(addr))
            if key in seen_ips:
                raise _bad(f"{where}.fixed_ips[{j}].ip", f"{addr} overlaps another address on network {net}")
            seen_ips.add(key)
        if not port.port_security_enabled and port.security_groups:
            raise _bad(f"{where}.security_groups", "security groups need port_security_enabled")
        for g, group in enumerate(port.security_groups):
            for r, rule in enumerate(group.rules):
                check_rule(rule, f"{where}.security_groups[{g}].rules[{r}]")
    index = existing if isinstance(existing, PortIndex) else PortIndex((None, p) for p in existing)
    for port in ports:
        index.check(port, instance_uuid)


# ---------------------------------------------------------------------------------------
# nftables rendering: pure functions from ports to JSON commands and set elements.

# Hashable forms of set and map elements: a string or int key, a tuple for a concatenation,
# (key, value) for a map element, ("jump", chain) for a verdict.
Elem = Any
SetKey = tuple[str, str]  # (family, set or map name)

_SETS: Final[dict[SetKey, dict[str, Any]]] = {
    ("bridge", "port_mac"): {"type": ["ifname", "ether_addr"]},
    ("bridge", "port_ipv4"): {"type": ["ifname", "ipv4_addr"]},
    ("bridge", "port_ipv6"): {"type": ["ifname", "ipv6_addr"]},
    ("bridge", "egress_mark"): {"type": "ifname", "map": "mark"},
    ("bridge", "ingress_mark"): {"type": "ifname", "map": "mark"},
    ("inet", "egress"): {"type": "mark", "map": "verdict"},
    ("inet", "ingress"): {"type": "mark", "map": "verdict"},
    # bridge -> jump to the chain that sets its conntrack zone
    ("inet", "zones"): {"type": "ifname", "map": "verdict"},
}
ZONES: Final[SetKey] = ("inet", "zones")
_BASE_CHAINS: Final = frozenset(
    {
        ("bridge", "prerouting"),
        ("bridge", "forward"),
        ("bridge", "spoof"),
        ("inet", "zone_in"),
        ("inet", "zone_out"),
        ("inet", "prerouting"),
        ("inet", "forward"),
    }
)
_ZONE_CHAIN: Final = "zone-"


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


def _link_local(mac: str) -> str:
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return str(ipaddress.IPv6Address(bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, *eui])))


def _rule_exprs(rule: SecurityGroupRule) -> list[dict[str, Any]]:
    exprs: list[dict[str, Any]] = [_match(_meta("nfproto"), "ipv4" if rule.ethertype == "IPv4" else "ipv6")]
    proto = _protocol_number(rule.protocol)
    if proto is not None:
        exprs.append(_match(_meta("l4proto"), proto))
    lo, hi = rule.port_range_min, rule.port_range_max
    if proto in _PORT_PROTOCOLS and lo is not None and hi is not None:
        exprs.append(_match(_payload("th", "dport"), lo if lo == hi else {"range": [lo, hi]}))
    elif proto in _ICMP_PROTOCOLS and lo is not None:
        icmp = "icmp" if proto == 1 else "icmpv6"
        exprs.append(_match(_payload(icmp, "type"), lo))
        if hi is not None:
            exprs.append(_match(_payload(icmp, "code"), hi))
    if rule.remote_ip_prefix is not None:
        net = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
        if net.prefixlen:
            ip = "ip" if net.version == 4 else "ip6"
            fld = "saddr" if rule.direction == "ingress" else "daddr"
            exprs.append(
                _match(_payload(ip, fld), {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
            )
    return exprs


def _digest(obj: Any) -> str:
    return hashlib.blake2b(msgspec.json.encode(obj), digest_size=8).hexdigest()


def sg_chain(groups: Sequence[SecurityGroup], direction: str) -> tuple[str, list[list[dict[str, Any]]]]:
    """A port's egress or ingress chain: (name from the digest of its rules, rules).

    The chain accepts what any of the groups allows in that direction and drops the rest;
    ports whose groups give the same rules share one chain.
    """
    return _sg_chain(msgspec.msgpack.encode(groups), direction)


@functools.lru_cache(maxsize=4096)
def _sg_chain(packed_groups: bytes, direction: str) -> tuple[str, list[list[dict[str, Any]]]]:
    groups = msgspec.msgpack.decode(packed_groups, type=list[SecurityGroup])
    rules: list[list[dict[str, Any]]] = []
    seen: set[bytes] = set()
    for group in groups:
        for rule in group.rules:
            if rule.direction != direction:
                continue
            exprs = [*_rule_exprs(rule), {"accept": None}]
            key = msgspec.json.encode(exprs)
            if key not in seen:
                seen.add(key)
                rules.append(exprs)
    rules.append([{"drop": None}])
    return f"{direction[0]}-{_digest(rules)}", rules


def _elem_json(elem: Elem) -> Any:
    if isinstance(elem, tuple) and len(elem) == 2 and elem[0] == "jump":
        return {"jump": {"target": elem[1]}}
    if isinstance(elem, tuple) and elem and elem[0] == "map":
        return [_elem_json(elem[1]), _elem_json(elem[2])]
    if isinstance(elem, tuple):
        return {"concat": list(elem)}
    return elem


def _elem_from_json(obj: Any) -> Elem:
    if isinstance(obj, list) and len(obj) == 2:
        return ("map", _elem_from_json(obj[0]), _elem_from_json(obj[1]))
    if isinstance(obj, dict):
        if "concat" in obj:
            return tuple(obj["concat"])
        if "jump" in obj:
            return ("jump", obj["jump"]["target"])
        if "elem" in obj:
            return _elem_from_json(obj["elem"]["val"])
    return obj


def number_chains(ports: Iterable[Port]) -> dict[tuple[str, str], int]:
    """Numbers for the rule chains of ports with port security, in order of first use."""
    ids: dict[tuple[str, str], int] = {}
    for port in ports:
        if port.port_security_enabled:
            for key in Renderer.chains(port):
                ids.setdefault(key, len(ids) + 1)
    return ids


def ruleset(
    table: str, ports: Iterable[tuple[Port, str]], zones: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """One transaction that replaces both tables with the rules of ``(port, tap)`` pairs and
    the conntrack ``zones`` of bridges.

    What the agent sends when it finds its tables missing or of another layout, e.g. at the
    first start-up with instances to restore.
    """
    render = Renderer(table)
    pairs = list(ports)
    ids = number_chains(port for port, _ in pairs)
    elements: dict[SetKey, set[Elem]] = {k: set() for k in _SETS}
    chains: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for port, tap in pairs:
        chains.update(render.chains(port))
        for key, elems in render.elements_of(port, tap, ids).items():
            elements[key] |= elems
    cmds = render.rebuild()
    for key, rules in chains.items():
        # The chain without its map entry: the entries go in one command per map below.
        cmds += render.chain_body(*key, rules, exists=False)
        elements[render.verdict_map(key[1])].add(render.verdict(key[1], ids[key]))
    for bridge, zone in (zones or {}).items():
        cmds += render.zone_chain(zone, exists=False)
        elements[ZONES].add(render.zone_elem(bridge, zone))
    for key, members in elements.items():
        cmds += render.elements("add", key, members)
    return cmds


class Renderer:
    """Builds the JSON commands of the two tables named ``table``."""

    def __init__(self, table: str) -> None:
        self.table = table
        owner_bits = int.from_bytes(hashlib.blake2b(table.encode(), digest_size=2).digest()) & 0x7FFF
        self.mark = _MARK_OURS | owner_bits << 16
        self.base_tag = "fc-base:" + _digest(self._base(""))

    @staticmethod
    def chains(port: Port) -> dict[tuple[str, str], list[list[dict[str, Any]]]]:
        """The port's egress and ingress rule chains: {(family, name): rules}."""
        egress, egress_rules = sg_chain(port.security_groups, "egress")
        ingress, ingress_rules = sg_chain(port.security_groups, "ingress")
        return {("inet", egress): egress_rules, ("inet", ingress): ingress_rules}

    def elements_of(self, port: Port, tap: str, ids: Mapping[tuple[str, str], int]) -> dict[SetKey, frozenset[Elem]]:
        """The set elements of a port with port security; ``ids`` numbers its rule chains."""
        mac = _normal_mac(port.mac) or port.mac
        addrs = [ipaddress.ip_address(f.ip) for f in port.fixed_ips]
        egress, ingress = self.chains(port)
        return {
            ("bridge", "port_mac"): frozenset({(tap, mac)}),
            ("bridge", "port_ipv4"): frozenset((tap, str(a)) for a in addrs if a.version == 4),
            ("bridge", "port_ipv6"): frozenset(
                [(tap, _link_local(mac))] + [(tap, str(a)) for a in addrs if a.version == 6]
            ),
            ("bridge", "egress_mark"): frozenset({("map", tap, self.mark | ids[egress])}),
            ("bridge", "ingress_mark"): frozenset({("map", tap, self.mark | ids[ingress])}),
        }

    def _obj(self, family: str, kind: str, **body: Any) -> dict[str, Any]:
        return {kind: {"family": family, "table": self.table, **body}}

    def _rule(self, family: str, chain: str, exprs: list[dict[str, Any]], comment: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"chain": chain, "expr": exprs}
        if comment is not None:
            body["comment"] = comment
        return {"add": self._obj(family, "rule", **body)}

    def base(self) -> list[dict[str, Any]]:
        """Both tables from scratch with empty sets; the caller deletes old tables first."""
        return self._base(self.base_tag)

    def _base(self, tag: str) -> list[dict[str, Any]]:
        mark = _meta("mark")
        ether_type = _payload("ether", "type")
        iif, oif = _meta("iifname"), _meta("oifname")
        l4 = _meta("l4proto")
        sport, dport = _payload("th", "sport"), _payload("th", "dport")
        ct_state = {"ct": {"key": "state"}}

        def chain(family: str, name: str, hook: str | None = None, prio: int = 0) -> dict[str, Any]:
            body: dict[str, Any] = {"name": name}
            if hook:
                body.update(type="filter", hook=hook, prio=prio, policy="accept")
            return {"add": self._obj(family, "chain", **body)}

        sets = [
            {"add": self._obj(f, "map" if "map" in spec else "set", name=n, **spec)} for (f, n), spec in _SETS.items()
        ]
        drop, accept, jump_spoof = {"drop": None}, {"accept": None}, {"jump": {"target": "spoof"}}
        is_arp, is_ip, is_ip6 = _match(ether_type, 0x0806), _match(ether_type, 0x0800), _match(ether_type, 0x86DD)

        def spoof(*exprs: dict[str, Any]) -> dict[str, Any]:
            return self._rule("bridge", "spoof", list(exprs))

        def mark_set(key: dict[str, Any], map_name: str) -> dict[str, Any]:
            return {"mangle": {"key": mark, "value": {"map": {"key": key, "data": map_name}}}}

        ours = _match({"&": [mark, _MARK_PORT_BITS]}, self.mark)

        def not_in(left: dict[str, Any], set_name: str) -> dict[str, Any]:
            return _match(_concat(iif, left), "@" + set_name, "!=")

        bridge = [
            chain("bridge", "spoof"),
            chain("bridge", "prerouting", "prerouting", -200),
            chain("bridge", "forward", "forward", -200),
            # Frames from the wire carry mark 0: only frames from our ports get our mark, which
            # names the rule chain of the sender's egress.
            self._rule("bridge", "prerouting", [mark_set(iif, "@egress_mark")], tag),
            self._rule("bridge", "prerouting", [ours, jump_spoof]),
            # The sender's egress is judged in inet prerouting before this hook; from here on
            # the mark names the receiver's ingress chain, or none when it is not our port.
            self._rule("bridge", "forward", [ours, {"mangle": {"key": mark, "value": 0}}], tag),
            self._rule("bridge", "forward", [mark_set(oif, "@ingress_mark")]),
            self._rule("bridge", "spoof", [not_in(_payload("ether", "saddr"), "port_mac"), drop], tag),
            spoof(_match(ether_type, {"set": [0x8100, 0x88A8]}), drop),
            spoof(is_arp, not_in(_payload("arp", "saddr ether"), "port_mac"), drop),
            # ARP probes (RFC 5227) carry sender address 0.0.0.0.
            spoof(is_arp, _match(_payload("arp", "saddr ip"), "0.0.0.0"), accept),
            spoof(is_arp, not_in(_payload("arp", "saddr ip"), "port_ipv4"), drop),
            # A guest may not answer DHCP or advertise itself as a router.
            spoof(is_ip, _match(l4, 17), _match(sport, 67), drop),
            spoof(is_ip6, _match(l4, 17), _match(sport, 547), drop),
            spoof(is_ip6, _match(l4, 58), _match(_payload("icmpv6", "type"), 134), drop),
            # DHCP discovery comes from 0.0.0.0, duplicate address detection from ::.
            spoof(is_ip, _match(_payload("ip", "saddr"), "0.0.0.0"), _match(l4, 17), _match(sport, 68),
                  _match(dport, 67), accept),
            spoof(is_ip6, _match(_payload("ip6", "saddr"), "::"), _match(l4, 58), accept),
            spoof(is_ip, not_in(_payload("ip", "saddr"), "port_ipv4"), drop),
            spoof(is_ip6, not_in(_payload("ip6", "saddr"), "port_ipv6"), drop),
        ]  # fmt: skip
        # Neighbour discovery, MLD and DHCP pass whatever the groups say, as in Neutron.
        nd_out = [130, 131, 132, 133, 135, 136, 143]
        nd_in = [130, 131, 132, 134, 135, 136, 143]

        def judge(
            hook: str,
            prio: int,
            nd: list[int],
            dhcp: tuple[int, int],
            dhcp6: tuple[int, int],
            verdict_map: str,
        ) -> list[dict[str, Any]]:
            def rule(*exprs: dict[str, Any]) -> dict[str, Any]:
                return self._rule("inet", hook, list(exprs))

            nfproto = _meta("nfproto")
            return [
                chain("inet", hook, hook, prio),
                # Packets that do not come from (prerouting) or go to (forward) a secured port
                # are not ours to judge.
                self._rule("inet", hook, [_match({"&": [mark, _MARK_PORT_BITS]}, self.mark, "!="), accept], tag),
                rule(_match(ct_state, ["established", "related"], "in"), accept),
                rule(_match(ct_state, "invalid", "in"), drop),
                rule(_match(l4, 58), _match(_payload("icmpv6", "type"), {"set": nd}), accept),
                rule(_match(nfproto, "ipv4"), _match(l4, 17), _match(sport, dhcp[0]), _match(dport, dhcp[1]), accept),
                rule(_match(nfproto, "ipv6"), _match(l4, 17), _match(sport, dhcp6[0]), _match(dport, dhcp6[1]), accept),
                rule({"vmap": {"key": mark, "data": "@" + verdict_map}}),
            ]

        # Conntrack zones, set before conntrack (-200) looks packets up. Bridged packets reach
        # these hooks (through br_netfilter) with the bridge as their input interface, whichever
        # port they came in by; packets the host sends into a bridge have it as output.
        inet = [
            chain("inet", "zone_in", "prerouting", -300),
            self._rule("inet", "zone_in", [{"vmap": {"key": iif, "data": "@zones"}}], tag),
            chain("inet", "zone_out", "output", -300),
            self._rule("inet", "zone_out", [{"vmap": {"key": oif, "data": "@zones"}}], tag),
            *judge("prerouting", -150, nd_out, (68, 67), (546, 547), "egress"),
            *judge("forward", 0, nd_in, (67, 68), (547, 546), "ingress"),
        ]
        tables = [
            {"add": {"table": {"family": "bridge", "name": self.table}}},
            {"add": {"table": {"family": "inet", "name": self.table}}},
        ]
        return [*tables, *sets, *bridge, *inet]

    def rebuild(self) -> list[dict[str, Any]]:
        """Commands that replace both tables by empty ones ("add" first: valid when absent)."""
        cmds: list[dict[str, Any]] = []
        for family in ("bridge", "inet"):
            cmds += [
                {"add": {"table": {"family": family, "name": self.table}}},
                {"delete": {"table": {"family": family, "name": self.table}}},
            ]
        return cmds + self.base()

    def chain_body(
        self, family: str, name: str, rules: list[list[dict[str, Any]]], exists: bool
    ) -> list[dict[str, Any]]:
        """Commands that write one chain (flushed first when it ``exists``); the first rule
        carries the chain's digest."""
        cmds: list[dict[str, Any]] = [{"add": self._obj(family, "chain", name=name)}]
        if exists:
            cmds.append({"flush": self._obj(family, "chain", name=name)})
        tag = self.chain_tag(rules)
        for i, exprs in enumerate(rules):
            cmds.append(self._rule(family, name, exprs, tag if i == 0 else None))
        return cmds

    def chain(
        self, family: str, name: str, rules: list[list[dict[str, Any]]], chain_id: int, exists: bool
    ) -> list[dict[str, Any]]:
        """Commands that write one rule chain and its verdict-map entry."""
        body = self.chain_body(family, name, rules, exists)
        return body + self.elements("add", self.verdict_map(name), [self.verdict(name, chain_id)])

    @staticmethod
    def zone_rules(zone: int) -> list[list[dict[str, Any]]]:
        """The one rule of a zone's chain."""
        return [[{"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}]]

    def zone_chain(self, zone: int, exists: bool) -> list[dict[str, Any]]:
        """Commands that write the chain setting conntrack zone ``zone`` (without its map entry)."""
        return self.chain_body("inet", f"{_ZONE_CHAIN}{zone}", self.zone_rules(zone), exists)

    @staticmethod
    def zone_elem(bridge: str, zone: int) -> Elem:
        """The zones-map element that puts packets of ``bridge`` in ``zone``."""
        return ("map", bridge, ("jump", f"{_ZONE_CHAIN}{zone}"))

    @staticmethod
    def zone_of(elem: Elem) -> tuple[str, int] | None:
        """(bridge, zone) of a zones-map element as listed; None when it is not one of ours."""
        if isinstance(elem, tuple) and elem[0] == "map" and isinstance(elem[1], str) and isinstance(elem[2], tuple):
            target = elem[2][1]
            if isinstance(target, str) and target.startswith(_ZONE_CHAIN) and target[len(_ZONE_CHAIN) :].isdigit():
                return elem[1], int(target[len(_ZONE_CHAIN) :])
        return None

    def drop_chain(self, family: str, name: str, chain_id: int | None) -> list[dict[str, Any]]:
        """Commands that delete a chain, its rules and (when it has one) its map entry."""
        cmds = (
            [] if chain_id is None else self.elements("delete", self.verdict_map(name), [self.verdict(name, chain_id)])
        )
        chain = self._obj(family, "chain", name=name)
        return [*cmds, {"flush": chain}, {"delete": chain}]

    @staticmethod
    def verdict_map(chain_name: str) -> SetKey:
        """The verdict map that jumps to a rule chain."""
        return ("inet", "egress" if chain_name.startswith("e-") else "ingress")

    def verdict(self, chain_name: str, chain_id: int) -> Elem:
        """The verdict-map element of a rule chain."""
        return ("map", self.mark | chain_id, ("jump", chain_name))

    def elements(self, verb: str, key: SetKey, elems: Iterable[Elem]) -> list[dict[str, Any]]:
        """Add or delete elements of one set or map (nothing when there are none)."""
        items = [_elem_json(e) for e in elems]
        if not items:
            return []
        family, name = key
        return [{verb: self._obj(family, "element", name=name, elem=items)}]

    @staticmethod
    def chain_tag(rules: list[list[dict[str, Any]]]) -> str:
        """The comment the first rule of a correct chain carries."""
        return "fc:" + _digest(rules)


@dataclass
class _NftState:
    """What the tables hold, read back from a listing (start-up and repair)."""

    base_ok: bool = False
    chain_tags: dict[tuple[str, str], str] = field(default_factory=dict)
    elements: dict[SetKey, set[Elem]] = field(default_factory=dict)


def _parse_listing(listing: Iterable[dict[str, Any]], base_tag: str) -> _NftState:
    state = _NftState()
    base_tags = 0
    for obj in listing:
        kind = "set" if "set" in obj else "map" if "map" in obj else None
        if kind is not None:
            body = obj[kind]
            state.elements[(body["family"], body["name"])] = {_elem_from_json(e) for e in body.get("elem", [])}
        elif "chain" in obj:
            c = obj["chain"]
            state.chain_tags.setdefault((c["family"], c["name"]), "")
        elif "rule" in obj:
            r = obj["rule"]
            key = (r["family"], r["chain"])
            comment = r.get("comment")
            if comment == base_tag:
                base_tags += 1
            elif comment is not None and state.chain_tags.get(key) == "":
                state.chain_tags[key] = comment
            elif state.chain_tags.get(key) == "":
                # The first rule has no tag: the chain is not as we wrote it.
                state.chain_tags[key] = "?"
    state.base_ok = base_tags == len(_BASE_CHAINS) and all(k in state.elements for k in _SETS)
    return state


# ---------------------------------------------------------------------------------------
# Links on the hot path.

_TUNSETIFF: Final = 0x400454CA
_TUNSETPERSIST: Final = 0x400454CB
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_TUN_EXCL: Final = 0x8000
_RTM_NEWLINK: Final = 16
_RTM_DELLINK: Final = 17


_IFLA_ADDRESS: Final = 1
_IFLA_MTU: Final = 4
_IFLA_MASTER: Final = 10
_IFLA_IFALIAS: Final = 20
_IFLA_GROUP: Final = 27


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _create_tap(name: str) -> bool:
    """Make a persistent tap (no owner, no packet info); False when the name is taken.

    Taps are made with the tun device's ioctls: the kernel refuses to make them over
    rtnetlink, and pyroute2 does the same."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_TUN_EXCL))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
        return True
    finally:
        os.close(fd)


# Every link the agent makes or re-makes goes (back) to the default group; see set_up.
_GROUP_DEFAULT: Final = attr(_IFLA_GROUP, struct.pack("=I", 0))


class _RawLinks:
    """Link changes on the plug path, over a plain rtnetlink socket.

    A plug needs one RTM_NEWLINK whose reply is a bare acknowledgement. pyroute2's generic
    attribute machinery spends more time encoding that request and decoding replies than the
    kernel spends on the change, so this small request is packed here with ``struct``;
    everything else (bridges, VLANs, listings) goes through pyroute2's IPRoute.
    """

    def __init__(self, doomed_group: int) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self._sock.bind((0, 0))
        self._seq = 0
        self._doomed = attr(_IFLA_GROUP, struct.pack("=I", doomed_group))

    def _request(self, msg_type: int, index: int, flags: int, attrs: bytes) -> None:
        self._seq += 1
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, _IFF_UP if flags else 0) + attrs
        self._sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_ACK, self._seq, body))
        while True:
            data = self._sock.recv(65536)
            for kind, seq, start, _ in messages(data):
                if kind == NLMSG_ERROR and seq == self._seq:
                    if error := error_of(data, start):
                        raise_error(error, "netlink")
                    return

    def set_up(self, index: int, *, master: int, mtu: int, address: str, alias: str) -> None:
        """Give a link its master, MTU, MAC and alias and bring it up, in one request.

        The link also goes (back) to group 0: a tap marked for deletion by a run that died
        before deleting it must not go with the next group deletion once it is wanted again.
        """
        attrs = (
            attr(_IFLA_MASTER, struct.pack("=I", master))
            + _GROUP_DEFAULT
            + attr(_IFLA_MTU, struct.pack("=I", mtu))
            + attr(_IFLA_ADDRESS, bytes.fromhex(address.replace(":", "")))
            + attr(_IFLA_IFALIAS, alias.encode() + b"\0")
        )
        self._request(_RTM_NEWLINK, index, _IFF_UP, attrs)

    def delete(self, index: int) -> None:
        """Delete a link."""
        self._request(_RTM_DELLINK, index, 0, b"")

    def delete_many(self, indexes: Sequence[int]) -> None:
        """Delete links, several in one request; links already gone are skipped.

        The kernel waits for an RCU grace period after every unregistration request (19 ms
        for a tap here), so links deleted one by one cost that each. Marked with this agent's
        doomed group and deleted by group, they cost it once.
        """
        if len(indexes) == 1:
            with contextlib.suppress(OSError):
                self.delete(indexes[0])
            return
        marked = []
        for index in indexes:
            with contextlib.suppress(OSError):
                self._request(_RTM_NEWLINK, index, 0, self._doomed)
                marked.append(index)
        if marked:
            try:
                self._request(_RTM_DELLINK, 0, 0, self._doomed)
            except OSError:
                for index in marked:
                    with contextlib.suppress(OSError):
                        self.delete(index)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


# ---------------------------------------------------------------------------------------
# The record of what is plugged, and the Network service.


@dataclass
class _Plugged:
    instance_uuid: str
    port: Port
    tap: str
    bridge: str
    mtu: int

    @property
    def secured(self) -> bool:
        return self.port.port_security_enabled


@dataclass
class _Change:
    """A queued change of the host's ports. Plugs (or unplugs) queued behind one another run
    as one batch: one nftables transaction, and for unplugs one link deletion request."""

    kind: Literal["plug", "unplug", "other"]
    done: asyncio.Future[Any]
    instance_uuid: str = ""
    ports: list[Port] = field(default_factory=list)
    port_ids: list[str] | None = None
    call: Callable[[], Awaitable[Any]] | None = None


def _settle(change: _Change, outcome: Any) -> None:
    """Give a change's waiter its result, or its exception when ``outcome`` is one."""
    if change.done.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        change.done.cancel()
    elif isinstance(outcome, BaseException):
        change.done.set_exception(outcome)
    else:
        change.done.set_result(outcome)


class Network:
    """Plugs ports into bridges and enforces their security groups; one per agent.

    All public methods are coroutines that queue a change; changes run one at a time, their
    netlink and nftables work in ``executor`` (or the loop's default), and plugs or unplugs
    queued behind one another run as one batch (a boot storm's or a mass delete's). The record
    of what is plugged changes on the event loop only. Call :meth:`reconcile` at start-up with
    every instance's ports before plugging anything, so the record matches the host.
    """

    def __init__(self, cfg: NetworkConfig, executor: concurrent.futures.Executor | None = None) -> None:
        self.cfg = cfg
        self._executor = executor
        self._queue: deque[_Change] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._sync_lock = threading.Lock()
        self._render = Renderer(cfg.owner)
        self._ports: dict[str, _Plugged] = {}
        self._of: dict[str, dict[str, _Plugged]] = {}  # instance uuid -> its ports, by id
        self._index = PortIndex()  # the plugged ports, and those of the batch being plugged
        self.on_batch: Callable[[str, int, float], object] | None = None  # (kind, changes, seconds)
        self._chain_ids: dict[tuple[str, str], int] = {}  # rule chain -> number in its mark
        self._foreign_ids: set[int] = set()  # numbers of chains of ports we were not told about
        self._chain_refs: Counter[tuple[str, str]] = Counter()
        self._zones: dict[str, int] = {}  # bridge -> its conntrack zone, as in the tables
        self._bridge_refs: Counter[str] = Counter()  # bridge -> ports of the record on it, as in the tables
        self._nft: Nft | None = None
        self._ipr: Any = None
        self._raw: _RawLinks | None = None
        self._ct: Conntrack | None = None
        self._bridges: dict[str, int] = {}  # bridges (with their VLAN link) checked, by name
        self._base_ready = False

    # -- names --------------------------------------------------------------------------

    def tap_name(self, port_id: str) -> str:
        """The port's tap: the prefix then the port id, cut at 15 characters (as os-vif)."""
        return (self.cfg.tap_prefix + port_id)[:IFNAMSIZ]

    def bridge_name(self, network: PortNetwork) -> str:
        """The network's bridge: the given one, or the prefix then the network id."""
        return network.bridge or (self.cfg.bridge_prefix + network.id)[:IFNAMSIZ]

    def vlan_name(self, vlan: int) -> str:
        """The VLAN sub-interface of the physical interface for ``vlan``."""
        name = f"{self.cfg.physical_interface}.{vlan}"
        return name if len(name) <= IFNAMSIZ else f"{self.cfg.owner[:6]}v{vlan}"

    @property
    def doomed_group(self) -> int:
        """The link group this agent puts its links in just before deleting them by group.

        A hash of the owner tag in 2**30..2**31-1: clear of the default group 0 and of the small
        numbers administrators use, and within what ``ip link ... group N`` accepts."""
        digest = int.from_bytes(hashlib.blake2b(self.cfg.owner.encode(), digest_size=4).digest())
        return digest & 0x3FFFFFFF | 1 << 30

    def _alias(self, kind: str, *parts: str) -> str:
        return ":".join((self.cfg.owner, kind, *parts))

    # -- public API ---------------------------------------------------------------------

    async def validate(
        self,
        ports: Sequence[Port | Mapping[str, Any]],
        existing: Iterable[Port | Mapping[str, Any]] | None = None,
        instance_uuid: str | None = None,
    ) -> list[Port]:
        """Decode and check ports; ``existing`` (Ports or wire dicts) defaults to every port
        plugged here.

        Ports already plugged for ``instance_uuid`` are not conflicts (a retried spawn).
        Returns the decoded ports; raises BadRequest or Conflict.
        """
        decoded = decode_ports(ports)
        if existing is None:
            check_ports(decoded, self._index, instance_uuid=instance_uuid)
        else:
            check_ports(decoded, decode_ports(existing, "existing"))
        return decoded

    async def plug(self, instance_uuid: str, ports: Sequence[Port | Mapping[str, Any]]) -> list[PluggedPort]:
        """Make the bridges, VLAN sub-interfaces and taps of the ports and apply their groups.

        One nftables transaction for all the ports (and for the ports of the plugs queued
        with this one). Plugging a port again for the same instance is a no-op that returns
        the same answer. On failure nothing is left behind.
        """
        decoded = decode_ports(ports)
        result: list[PluggedPort] = await self._submit(
            _Change("plug", self._future(), instance_uuid=instance_uuid, ports=decoded)
        )
        return result

    async def unplug(self, instance_uuid: str, ports: Iterable[Port | str] | None = None) -> None:
        """Remove the ports' taps and rules, and bridges we made that no port uses any more.

        ``ports`` are Ports or port ids; None means all of the instance's ports. Ports that are
        not plugged are ignored, so a retried delete succeeds.
        """
        ids = None if ports is None else [p.id if isinstance(p, Port) else p for p in ports]
        if ids is None and instance_uuid not in self._of and not self._queue and self._drainer_idle():
            return  # an instance without ports (most, in a storm) costs nothing
        await self._submit(_Change("unplug", self._future(), instance_uuid=instance_uuid, port_ids=ids))

    async def set_security_groups(self, port_id: str, groups: Sequence[SecurityGroup | Mapping[str, Any]]) -> None:
        """Replace a port's security groups in one transaction (Neutron's port update).

        Established connections stay up (conntrack accepts them before any group rule); new
        ones follow the new rules from the moment the transaction commits.
        """
        try:
            decoded = [g if isinstance(g, SecurityGroup) else msgspec.convert(g, SecurityGroup) for g in groups]
        except msgspec.ValidationError as exc:
            raise _bad("security_groups", str(exc)) from exc
        for g, group in enumerate(decoded):
            for r, rule in enumerate(group.rules):
                check_rule(rule, f"security_groups[{g}].rules[{r}]")

        async def change() -> None:
            plugged = self._ports.get(port_id)
            if plugged is None:
                raise NotFound(f"port {port_id} is not plugged on this host", {"field": "port_id", "reason": "unknown"})
            if not plugged.port.port_security_enabled and decoded:
                raise _bad("security_groups", "security groups need port_security_enabled")
            self._remember(await self._run(self._set_groups_sync, plugged, decoded))

        await self._submit(_Change("other", self._future(), call=change))

    async def reconcile(self, ports_by_instance: Mapping[str, Sequence[Port | Mapping[str, Any]]]) -> ReconcileReport:
        """Make the host match the wanted ports: remove strays, re-make what is missing.

        Only links whose alias carries our owner tag, and only our own tables, are touched.
        Running it twice in a row changes nothing the second time.
        """
        wanted: dict[str, _Plugged] = {}
        for uuid, plist in ports_by_instance.items():
            for port in decode_ports(plist):
                wanted[port.id] = self._plugged_for(uuid, port)

        async def change() -> ReconcileReport:
            self._ports, self._of, self._index = {}, {}, PortIndex()
            for p in wanted.values():
                self._remember(p)
                self._index.add(p.port, p.instance_uuid)
            return await self._run(self._reconcile_sync, list(self._ports.values()))

        report: ReconcileReport = await self._submit(_Change("other", self._future(), call=change))
        return report

    def plugged(self, instance_uuid: str | None = None) -> list[PluggedPort]:
        """The ports plugged here (of one instance, or all), as the domain XML needs them."""
        if instance_uuid is None:
            return [self._answer(p) for p in self._ports.values()]
        return [self._answer(p) for p in self._of.get(instance_uuid, {}).values()]

    def close(self) -> None:
        """Close the netlink socket and the nftables context."""
        with self._sync_lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            if self._ct is not None:
                self._ct.close()
                self._ct = None
            if self._nft is not None:
                self._nft.close()
                self._nft = None

    # -- the queue of changes, and the record (both on the event loop) ---------------------

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _drainer_idle(self) -> bool:
        return self._drainer is None or self._drainer.done()

    async def _submit(self, change: _Change) -> Any:
        self._queue.append(change)
        if self._drainer_idle():
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
            started = time.monotonic()
            try:
                if not live:
                    continue
                if kind == "plug":
                    await self._plug_batch(live)
                elif kind == "unplug":
                    await self._unplug_batch(live)
                else:
                    assert live[0].call is not None
                    _settle(live[0], await live[0].call())
            except BaseException as exc:
                for c in live:
                    _settle(c, exc)
                if not isinstance(exc, Exception):  # cancelled (shutdown): nobody is left to run the rest
                    for c in self._queue:
                        _settle(c, exc)
                    self._queue.clear()
                    raise
            if live and self.on_batch is not None:
                try:
                    self.on_batch(kind, len(live), time.monotonic() - started)
                except Exception:  # a metrics failure must not stop the queue behind it
                    log.exception("network batch observer failed")

    def _plugged_for(self, instance_uuid: str, port: Port) -> _Plugged:
        mtu = port.network.mtu or self.cfg.default_mtu
        return _Plugged(instance_uuid, port, self.tap_name(port.id), self.bridge_name(port.network), mtu)

    def _remember(self, p: _Plugged) -> None:
        self._ports[p.port.id] = p
        self._of.setdefault(p.instance_uuid, {})[p.port.id] = p

    def _forget(self, p: _Plugged) -> None:
        self._ports.pop(p.port.id, None)
        mine = self._of.get(p.instance_uuid, {})
        mine.pop(p.port.id, None)
        if not mine:
            self._of.pop(p.instance_uuid, None)
        self._index.discard(p.port)

    async def _plug_batch(self, changes: list[_Change]) -> None:
        """Admit each plug against the host and the batch so far, then make them all."""
        admitted: list[tuple[_Change, list[_Plugged]]] = []
        taken: set[str] = set()  # ports an earlier plug of this batch makes
        for c in changes:
            try:
                check_ports(c.ports, self._index, instance_uuid=c.instance_uuid)
                for port in c.ports:
                    if port.network.vlan is not None and not self.cfg.physical_interface:
                        raise _bad("network.vlan", "this host has no physical_interface for VLAN networks")
            except AgentError as exc:
                _settle(c, exc)
                continue
            new = [
                self._plugged_for(c.instance_uuid, p) for p in c.ports if p.id not in self._ports and p.id not in taken
            ]
            for p in new:
                self._index.add(p.port, c.instance_uuid)
                taken.add(p.port.id)
            admitted.append((c, new))
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
                _settle(c, failure)
                continue
            for p in new:
                self._remember(p)
            missing = [p.id for p in c.ports if p.id not in self._ports]
            if missing:  # made by another plug of this batch, which failed
                _settle(c, AgentError(f"port {missing[0]} could not be plugged"))
            else:
                _settle(c, [self._answer(self._ports[p.id]) for p in c.ports])

    async def _unplug_batch(self, changes: list[_Change]) -> None:
        gone: list[_Plugged] = []
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
        if gone or unknown:
            await self._run(self._unplug_sync, gone, unknown)
        for c in changes:
            _settle(c, None)

    # -- blocking internals (run in the executor, one at a time) -------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()

        def call() -> _T:
            with self._sync_lock:
                return fn(*args)

        return await loop.run_in_executor(self._executor, call)

    @property
    def _netlink(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    @property
    def _links(self) -> _RawLinks:
        if self._raw is None:
            self._raw = _RawLinks(self.doomed_group)
        return self._raw

    @property
    def _nftables(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def _transact(self, cmds: list[dict[str, Any]]) -> None:
        if cmds:
            self._nftables.json({"nftables": cmds})

    def _answer(self, p: _Plugged) -> PluggedPort:
        mac = _normal_mac(p.port.mac) or p.port.mac
        return PluggedPort(port_id=p.port.id, tap=p.tap, mac=mac, mtu=p.mtu, bridge=p.bridge)

    def _take_zone(self, taken: Iterable[int]) -> int:
        used = set(taken)
        for n in range(self.cfg.conntrack_zones_from, 65536):
            if n not in used:
                return n
        raise AgentError(f"no conntrack zone left from {self.cfg.conntrack_zones_from} to 65535 on this host")

    def _take_id(self, taken: Iterable[int]) -> int:
        used = set(taken)
        for n in range(1, _MAX_CHAIN_ID + 1):
            if n not in used:
                return n
        raise AgentError(f"more than {_MAX_CHAIN_ID} distinct security-group rule sets on this host")

    def _read_tables(self) -> _NftState:
        listing: list[dict[str, Any]] = []
        for family in ("bridge", "inet"):
            cmd = {"list": {"table": {"family": family, "name": self.cfg.owner}}}
            try:
                out = self._nftables.json({"nftables": [cmd]})
            except NftError as exc:
                if "No such file or directory" in exc.message:
                    continue
                raise
            listing += out.get("nftables", [])
        return _parse_listing(listing, self._render.base_tag)

    def _link(self, name: str) -> Any | None:
        try:
            links = self._netlink.get_links(ifname=name)
        except Exception as exc:  # pyroute2 raises NetlinkError(ENODEV) for a missing name
            if getattr(exc, "code", None) == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    def _ensure_bridge(self, network: PortNetwork, mtu: int, made: list[str]) -> int:
        name = self.bridge_name(network)
        index = _ifindex(name)
        if index is not None and self._bridges.get(name) == index:
            return index
        ipr = self._netlink
        link = self._link(name)
        if link is None:
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            link = self._link(name)
            assert link is not None
            made.append(name)
            ipr.link("set", index=link["index"], ifalias=self._alias("bridge", network.id), state="up")
        elif link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
            raise Conflict(f"{name} exists and is not a bridge", {"field": "network.bridge", "reason": "not a bridge"})
        bridge_index: int = link["index"]
        if network.vlan is not None:
            vname = self.vlan_name(network.vlan)
            vlink = self._link(vname)
            if vlink is None:
                phys = self._link(self.cfg.physical_interface)
                if phys is None:
                    raise _bad("network.vlan", f"physical interface {self.cfg.physical_interface} not found")
                try:
                    ipr.link("add", ifname=vname, kind="vlan", link=phys["index"], vlan_id=network.vlan, mtu=mtu)
                except Exception as exc:
                    if getattr(exc, "code", None) == errno.EOPNOTSUPP:
                        raise AgentError(f"cannot make {vname}: this kernel has no 802.1Q VLAN support") from exc
                    raise
                vlink = self._link(vname)
                assert vlink is not None
                made.append(vname)
                alias = self._alias("vlan", network.id)
                ipr.link("set", index=vlink["index"], ifalias=alias, master=bridge_index, state="up")
            elif vlink.get("master") != bridge_index:
                ipr.link("set", index=vlink["index"], master=bridge_index, state="up")
        self._bridges[name] = bridge_index
        return bridge_index

    def _ensure_tap(self, instance_uuid: str, port: Port, bridge_index: int, mtu: int, made: list[str]) -> str:
        tap = self.tap_name(port.id)
        alias = self._alias("tap", instance_uuid, port.id)
        mac = _normal_mac(port.mac) or port.mac
        # The host end must not carry the guest's MAC, or the bridge would learn it on the
        # wrong side; libvirt and os-vif use fe: in the first octet for the same reason.
        address = "fe" + mac[2:]
        if _create_tap(tap):
            made.append(tap)
            index = _ifindex(tap)
            assert index is not None
            self._links.set_up(index, master=bridge_index, mtu=mtu, address=address, alias=alias)
            return tap
        link = self._link(tap)
        assert link is not None
        if link.get("ifalias") != alias:
            raise Conflict(f"{tap} exists and is not this port's tap", {"field": "id", "reason": "tap name in use"})
        wanted = {"ifalias": alias, "address": address, "mtu": mtu, "master": bridge_index, "group": 0}
        if any(link.get(k) != v for k, v in wanted.items()) or not link["flags"] & _IFF_UP:
            self._links.set_up(link["index"], master=bridge_index, mtu=mtu, address=address, alias=alias)
        return tap

    def _delete_links(self, names: Iterable[str]) -> None:
        """Delete links this agent made (the record or this call says so)."""
        self._links.delete_many([i for name in names if (i := _ifindex(name)) is not None])

    def _port_cmds(
        self, adds: Iterable[_Plugged], removes: Iterable[_Plugged]
    ) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]], dict[tuple[str, str], int]]:
        """Commands for ports leaving and joining the tables, the change in chain users and
        the numbers given to new chains (applied by :meth:`_commit` once committed)."""
        render = self._render
        gone = [p for p in removes if p.secured]
        new = [p for p in adds if p.secured]
        delta: Counter[tuple[str, str]] = Counter()
        rules_of: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
        for p in new:
            chains = render.chains(p.port)
            delta.update(chains.keys())
            rules_of.update(chains)
        for p in gone:
            delta.subtract(render.chains(p.port).keys())
        ids = dict(self._chain_ids)
        fresh: dict[tuple[str, str], int] = {}
        cmds: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for key, change in delta.items():
            before = self._chain_refs[key]
            if before <= 0 < before + change:
                fresh[key] = ids[key] = self._take_id({*ids.values(), *self._foreign_ids})
                # "exists" adds a flush, harmless on a new chain, so a leftover is rewritten.
                cmds += render.chain(*key, rules_of[key], ids[key], exists=True)
            elif before + change <= 0 < before:
                dropped += render.drop_chain(*key, ids.get(key))
        old_elems: dict[SetKey, set[Elem]] = {}
        new_elems: dict[SetKey, set[Elem]] = {}
        for p in gone:
            for key, elems in render.elements_of(p.port, p.tap, self._chain_ids).items():
                old_elems.setdefault(key, set()).update(elems)
        for p in new:
            for key, elems in render.elements_of(p.port, p.tap, ids).items():
                new_elems.setdefault(key, set()).update(elems)
        for key, leaving in old_elems.items():
            cmds += render.elements("delete", key, leaving - new_elems.get(key, set()))
        for key, joining in new_elems.items():
            cmds += render.elements("add", key, joining - old_elems.get(key, set()))
        return cmds + dropped, delta, fresh

    def _zone_cmds(
        self, adds: Sequence[_Plugged], removes: Sequence[_Plugged]
    ) -> tuple[list[dict[str, Any]], dict[str, int], set[str]]:
        """Commands giving the bridges ports join a zone and taking it from bridges ports
        leave for good, with the zones given and the bridges that lose theirs."""
        if not self.cfg.conntrack_zones_from:
            return [], {}, set()
        render = self._render
        cmds: list[dict[str, Any]] = []
        fresh: dict[str, int] = {}
        for p in adds:
            if p.bridge not in self._zones and p.bridge not in fresh:
                zone = fresh[p.bridge] = self._take_zone([*self._zones.values(), *fresh.values()])
                cmds += render.zone_chain(zone, exists=True)
                cmds += render.elements("add", ZONES, [render.zone_elem(p.bridge, zone)])
        change = Counter(p.bridge for p in adds)
        change.subtract(p.bridge for p in removes)
        dropped = {b for b, n in change.items() if n < 0 and b in self._zones and self._bridge_refs[b] + n <= 0}
        for bridge in dropped:
            zone = self._zones[bridge]
            cmds += render.elements("delete", ZONES, [render.zone_elem(bridge, zone)])
            cmds += render.drop_chain("inet", f"{_ZONE_CHAIN}{zone}", None)
        return cmds, fresh, dropped

    def _apply(self, adds: Sequence[_Plugged], removes: Sequence[_Plugged]) -> None:
        """One transaction for ports joining and leaving; the record follows on success."""
        cmds, delta, fresh = self._port_cmds(adds, removes)
        zone_cmds, new_zones, dropped_zones = self._zone_cmds(adds, removes)
        self._transact(zone_cmds + cmds)
        self._zones.update(new_zones)
        for bridge in dropped_zones:
            del self._zones[bridge]
        for p in adds:
            self._bridge_refs[p.bridge] += 1
        for p in removes:
            self._bridge_refs[p.bridge] -= 1
            if self._bridge_refs[p.bridge] <= 0:
                del self._bridge_refs[p.bridge]
        self._chain_ids.update(fresh)
        for key, change in delta.items():
            users = self._chain_refs[key] + change
            if users > 0:
                self._chain_refs[key] = users
            else:
                self._chain_refs.pop(key, None)
                self._chain_ids.pop(key, None)

    def _ensure_link_of_port(self, p: _Plugged, made: list[str]) -> None:
        bridge_index = self._ensure_bridge(p.port.network, p.mtu, made)
        self._ensure_tap(p.instance_uuid, p.port, bridge_index, p.mtu, made)

    def _commit(self, new: list[_Plugged], also: Sequence[_Plugged] = ()) -> None:
        """Add plugged ports to the tables (``also``: ports committed before, not recorded yet)."""
        if self._base_ready:
            self._apply(new, ())
        else:
            self._sync_tables([*self._ports.values(), *also, *new])

    def _plug_sync(self, plugs: list[list[_Plugged]]) -> list[Exception | None]:
        """Make the links of each plug, then one transaction for them all.

        Returns each plug's failure (None: plugged). A plug that fails leaves nothing behind
        and does not fail the others: when the joint transaction is refused, each plug's is
        tried on its own.
        """
        failures: list[Exception | None] = [None] * len(plugs)
        made_by: list[list[str]] = [[] for _ in plugs]

        def fail(i: int, exc: Exception) -> None:
            self._delete_links(reversed(made_by[i]))
            failures[i] = exc

        for i, new in enumerate(plugs):
            try:
                for p in new:
                    self._ensure_link_of_port(p, made_by[i])
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
            committed: list[_Plugged] = []
            for i in good:
                try:
                    self._commit(plugs[i], committed)
                except Exception as own:
                    fail(i, own)
                else:
                    committed += plugs[i]
        return failures

    def _unplug_sync(self, gone: list[_Plugged], unknown: list[tuple[str, str]]) -> None:
        zone_of = dict(self._zones)  # before the last port of a bridge takes its zone away
        try:
            if not self._base_ready:
                raise NftError("tables not checked yet")
            self._apply((), gone)
        except NftError:
            # The tables do not match the record (changed behind our back, or not read since
            # start-up): bring them to what the remaining ports need.
            self._sync_tables(list(self._ports.values()), forget=gone)
        doomed = [p.tap for p in gone]
        # Taps of unknown ports (a delete after a restart without reconcile) still go if ours.
        for instance_uuid, pid in unknown:
            link = self._link(self.tap_name(pid))
            if link is not None and link.get("ifalias") == self._alias("tap", instance_uuid, pid):
                doomed.append(self.tap_name(pid))
        self._delete_links(doomed)
        self._forget_connections(gone, zone_of)
        for network in {p.bridge: p.port.network for p in gone}.values():
            self._drop_bridge_if_unused(network)

    def _forget_connections(self, gone: Sequence[_Plugged], zone_of: Mapping[str, int]) -> None:
        """Delete the tracked connections of the ports' addresses (see conntrack.py).

        After the ports' taps are gone, so that none comes back; a failure is logged, not
        raised: the ports are unplugged either way. Not alongside the link deletion: that
        waits for an RCU grace period, which the dump (a walk under the RCU read lock)
        delays, and the two took as long together as one after the other."""
        addresses: dict[int, set[str]] = {}
        for p in gone:
            mine = addresses.setdefault(zone_of.get(p.bridge, 0), set())
            mine.update(f.ip for f in p.port.fixed_ips)
            mine.add(_link_local(_normal_mac(p.port.mac) or p.port.mac))
        if not addresses:
            return
        try:
            if self._ct is None:
                self._ct = Conntrack()
            self._ct.forget(addresses)
        except OSError:
            log.warning("could not delete the tracked connections of unplugged ports", exc_info=True)

    def _drop_bridge_if_unused(self, network: PortNetwork) -> None:
        name = self.bridge_name(network)
        if self._bridge_refs[name] > 0:  # still used by a port of the record
            return
        bridge = self._link(name)
        if bridge is None or bridge.get("ifalias") != self._alias("bridge", network.id):
            return
        members = [link for link in self._netlink.get_links() if link.get("master") == bridge["index"]]
        ours = self._alias("vlan", network.id)
        if any(link.get("ifalias") != ours for link in members):
            return
        for link in members:
            self._netlink.link("del", index=link["index"])
        self._netlink.link("del", index=bridge["index"])
        self._bridges.pop(name, None)

    def _set_groups_sync(self, plugged: _Plugged, groups: list[SecurityGroup]) -> _Plugged:
        updated = _Plugged(
            plugged.instance_uuid,
            msgspec.structs.replace(plugged.port, security_groups=groups),
            plugged.tap,
            plugged.bridge,
            plugged.mtu,
        )
        if self._base_ready:
            self._apply([updated], [plugged])
        else:
            self._sync_tables([updated if p is plugged else p for p in self._ports.values()])
        return updated

    def _sync_tables(
        self,
        ports: Sequence[_Plugged],
        report: ReconcileReport | None = None,
        prune: bool = False,
        forget: Sequence[_Plugged] = (),
    ) -> None:
        """Bring the tables to what ``ports`` need, from a listing, in one transaction.

        With ``prune`` everything else goes too (reconciliation, where ``ports`` is all there
        is); without, only the elements of ``forget`` and chains no element uses go, so that a
        partial record never strips the rules of ports it does not know about.
        """
        state = self._read_tables()
        render = self._render
        secured = [p for p in ports if p.secured]
        zones = self._wanted_zones(ports, state)
        if not state.base_ok:
            self._transact(ruleset(self.cfg.owner, [(p.port, p.tap) for p in secured], zones))
            self._chain_refs = Counter(key for p in secured for key in render.chains(p.port))
            self._chain_ids = number_chains(p.port for p in secured)
            self._zones = zones
            self._bridge_refs = Counter(p.bridge for p in ports)
            self._base_ready = True
            if report is not None:
                report.rebuilt_tables = True
                report.made_ports = [p.port.id for p in secured]
            return
        # Chains keep the numbers the tables already give them, so intact ports stay as they are.
        ids = self._ids_in(state)
        present = set(ids.values())
        want_chains: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
        refs: Counter[tuple[str, str]] = Counter()
        for p in secured:
            chains = render.chains(p.port)
            want_chains.update(chains)
            refs.update(chains.keys())
        ids = {k: v for k, v in ids.items() if k in want_chains}
        if len(set(ids.values())) != len(ids):
            ids = {}
        for key in want_chains:
            if key not in ids:
                ids[key] = self._take_id(set(ids.values()) | present)
        want_elems: dict[SetKey, set[Elem]] = {k: set() for k in _SETS}
        want_elems[ZONES] = {render.zone_elem(bridge, zone) for bridge, zone in zones.items()}
        for key in want_chains:
            want_elems[render.verdict_map(key[1])].add(render.verdict(key[1], ids[key]))
        for p in secured:
            broken = False
            for key, elems in render.elements_of(p.port, p.tap, ids).items():
                want_elems[key] |= elems
                broken = broken or not elems <= state.elements.get(key, set())
            for key, rules in render.chains(p.port).items():
                verdict = render.verdict(key[1], ids[key])
                broken = broken or state.chain_tags.get(key) != render.chain_tag(rules)
                broken = broken or verdict not in state.elements.get(render.verdict_map(key[1]), set())
            if broken and report is not None:
                report.made_ports.append(p.port.id)
        cmds: list[dict[str, Any]] = []
        for key, rules in want_chains.items():
            if state.chain_tags.get(key) != render.chain_tag(rules):
                # Written without its map entry here: the element diff below adds that.
                cmds += render.chain_body(*key, rules, exists=key in state.chain_tags)
        for zone in zones.values():
            key = ("inet", f"{_ZONE_CHAIN}{zone}")
            if state.chain_tags.get(key) != render.chain_tag(render.zone_rules(zone)):
                cmds += render.zone_chain(zone, exists=key in state.chain_tags)
        forgotten: dict[SetKey, set[Elem]] = {k: set() for k in _SETS}
        for p in forget:
            if p.secured and all(key in self._chain_ids for key in render.chains(p.port)):
                for key, elems in render.elements_of(p.port, p.tap, self._chain_ids).items():
                    forgotten[key] |= elems
        stray_taps: set[str] = set()
        extra_zones: set[Elem] = set()
        kept_marks: set[int] = set()
        forgotten_bridges = {p.bridge for p in forget}
        forgotten[ZONES] = {e for e in state.elements.get(ZONES, set()) if e[1] in forgotten_bridges}
        for key in _SETS:
            have = state.elements.get(key, set())
            if prune:
                extra = have - want_elems[key]
            elif key[0] == "bridge" or key == ZONES:
                extra = (have & forgotten[key]) - want_elems[key]
            else:
                # Rule chains that ports we do not know about still point to stay.
                extra = {e for e in have - want_elems[key] if e[1] & _MAX_CHAIN_ID not in kept_marks}
            if key in (("bridge", "egress_mark"), ("bridge", "ingress_mark")):
                kept_marks |= {e[2] & _MAX_CHAIN_ID for e in have - extra if isinstance(e, tuple)}
            if key == ("bridge", "egress_mark"):
                stray_taps = {e[1] for e in extra if isinstance(e, tuple)}
            if key == ZONES:
                extra_zones = extra
            cmds += render.elements("delete", key, extra)
        for key in _SETS:
            cmds += render.elements("add", key, want_elems[key] - state.elements.get(key, set()))
        foreign = {ids_key: n for ids_key, n in self._ids_in(state).items() if n in kept_marks} if not prune else {}
        kept_zones = dict(
            z for e in (state.elements.get(ZONES, set()) - extra_zones) | want_elems[ZONES] if (z := render.zone_of(e))
        )
        zone_chains = {("inet", f"{_ZONE_CHAIN}{zone}") for zone in kept_zones.values()}
        for key in state.chain_tags:
            if key in want_chains or key in _BASE_CHAINS or key in foreign or key in zone_chains:
                continue
            cmds += render.drop_chain(*key, None)
        self._transact(cmds)
        self._zones = kept_zones
        self._bridge_refs = Counter(p.bridge for p in ports)
        self._chain_refs = refs
        self._chain_ids = ids
        self._foreign_ids = {n for key, n in foreign.items() if key not in ids}
        self._base_ready = True
        if report is not None:
            report.removed_ports = sorted(stray_taps - {p.tap for p in ports})

    def _wanted_zones(self, ports: Sequence[_Plugged], state: _NftState) -> dict[str, int]:
        """The zone of each bridge of ``ports``: the one the tables give it (connections keep
        their state across restarts), else the one the record gives it, else a free one."""
        if not self.cfg.conntrack_zones_from:
            return {}
        listed = dict(z for e in state.elements.get(ZONES, set()) if (z := self._render.zone_of(e)))
        if not state.base_ok:
            listed = {}
        zones: dict[str, int] = {}
        for bridge in dict.fromkeys(p.bridge for p in ports):
            zone = listed.get(bridge, self._zones.get(bridge))
            taken_by_other = zone in zones.values() or (bridge not in listed and zone in listed.values())
            if zone is None or taken_by_other:
                zone = self._take_zone([*listed.values(), *zones.values(), *self._zones.values()])
            zones[bridge] = zone
        return zones

    @staticmethod
    def _ids_in(state: _NftState) -> dict[tuple[str, str], int]:
        ids: dict[tuple[str, str], int] = {}
        for map_key in (("inet", "egress"), ("inet", "ingress")):
            for elem in state.elements.get(map_key, set()):
                if isinstance(elem, tuple) and elem[0] == "map" and isinstance(elem[1], int):
                    ids.setdefault(("inet", elem[2][1]), elem[1] & _MAX_CHAIN_ID)
        return ids

    def _reconcile_sync(self, wanted: list[_Plugged]) -> ReconcileReport:
        report = ReconcileReport()
        self._bridges.clear()
        owner_prefix = self.cfg.owner + ":"
        ours = {
            link.get("ifname"): link
            for link in self._netlink.get_links()
            if (link.get("ifalias") or "").startswith(owner_prefix)
        }
        wanted_taps = {p.tap: self._alias("tap", p.instance_uuid, p.port.id) for p in wanted}
        wanted_bridges = {p.bridge for p in wanted}
        wanted_vlans = {self.vlan_name(p.port.network.vlan) for p in wanted if p.port.network.vlan is not None}
        for name, link in ours.items():
            kind = (link.get("ifalias") or "").split(":")[1:2]
            keep = (
                (kind == ["tap"] and wanted_taps.get(name) == link.get("ifalias"))
                or (kind == ["bridge"] and name in wanted_bridges)
                or (kind == ["vlan"] and name in wanted_vlans)
            )
            if not keep:
                with contextlib.suppress(Exception):
                    self._netlink.link("del", index=link["index"])
                report.removed_links.append(name)

        made: list[str] = []
        for p in wanted:
            self._ensure_link_of_port(p, made)
        report.made_links = made
        if not wanted:
            # Nothing is wanted: tables a past run left go too, and none are made, so a host
            # without ports keeps no rules of ours.
            self._drop_tables(report)
            return report
        self._sync_tables(wanted, report, prune=True)
        return report

    def _drop_tables(self, report: ReconcileReport) -> None:
        listing = self._nftables.json({"nftables": [{"list": {"tables": {}}}]}).get("nftables", [])
        mine = [e["table"] for e in listing if "table" in e and e["table"].get("name") == self.cfg.owner]
        self._transact([{"delete": {"table": {"family": t["family"], "name": t["name"]}}} for t in mine])
        self._chain_refs = Counter()
        self._chain_ids = {}
        self._zones = {}
        self._bridge_refs = Counter()
        self._base_ready = False
        report.rebuilt_tables = bool(mine)
