"""Ports on Linux bridges, with their security groups enforced in nftables.

The agent plugs its instances' ports itself (what os-vif and Neutron's Linux bridge agent do
for Nova): a bridge per network (made when missing), a VLAN sub-interface of the configured
physical interface when the network has a VLAN, and one tap per port named from the port id.
Links are made through netlink (pyroute2); every link the agent makes carries an alias
``<owner>:<kind>:...`` so that unplugging and reconciliation remove only what the agent made.

Security groups live in two nftables tables named ``<owner>`` (families ``bridge`` and
``inet``), changed by one atomic transaction per change through the in-process libnftables
binding. The kernel here has no bridge-family conntrack, so the work is split:

* the bridge table sees the bridge ports. In ``prerouting`` a verdict map keyed by the input
  interface jumps to the port's anti-spoofing chain (MAC, IPv4/IPv6 source, ARP sender, no
  VLAN tags, no DHCP or router-advertisement server), which also writes the port's number in
  the high half of the packet mark. In ``forward`` a map keyed by the output interface writes
  the destination port's number in the low half.
* br_netfilter hands the bridged IP packets to the ``inet`` hooks, where conntrack runs. The
  inet ``forward`` chain accepts established and related packets, drops invalid ones, then
  looks the two halves of the mark up in two verdict maps: the sender's egress chain, then
  the receiver's ingress chain (default drop).

Each lookup is a hash lookup, so a packet's path is the same length for 2 ports or 10,000.
Per-port chains are named after the tap, and each carries a comment with a digest of what
it should contain, which is how reconciliation tells a correct port from a stale one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import ipaddress
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from .config import NetworkConfig
from .errors import AgentError, BadRequest, Conflict, NotFound
from .nftables import Nft, NftError

_T = TypeVar("_T")
IFNAMSIZ: Final = 15
_IFF_UP: Final = 1
_MAC_RE: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Mark layout: bit 31 + 15-bit sender port number in the high half, bit 15 + receiver number
# in the low half. Bits 31 and 15 say "set by us", so unmarked traffic never hits a port map.
_MARK_FROM_FLAG: Final = 0x80000000
_MARK_TO_FLAG: Final = 0x8000
_MAX_PORT_NUMBER: Final = 0x7FFF
_BASE_VERSION: Final = "1"

# Neutron's protocol names (neutron_lib.constants.IP_PROTOCOL_MAP) and their numbers.
PROTOCOLS: Final[dict[str, int]] = {
    "ah": 51, "dccp": 33, "egp": 8, "esp": 50, "gre": 47, "hopopt": 0, "icmp": 1, "igmp": 2,
    "ip": 0, "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44, "ipv6-icmp": 58, "icmpv6": 58,
    "ipv6-nonxt": 59, "ipv6-opts": 60, "ipv6-route": 43, "ospf": 89, "pgm": 113, "rsvp": 46,
    "sctp": 132, "tcp": 6, "udp": 17, "udplite": 136, "vrrp": 112,
}  # fmt: skip
_PORT_PROTOCOLS: Final = frozenset({6, 17, 33, 132, 136})
_ICMP_PROTOCOLS: Final = frozenset({1, 58})

ShortId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
PortNumber = Annotated[int, Meta(ge=0, le=65535)]


class SecurityGroupRule(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One Neutron security-group rule; an absent field matches anything."""

    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | Annotated[int, Meta(ge=0, le=255)] | None = None
    port_range_min: PortNumber | None = None
    port_range_max: PortNumber | None = None
    remote_ip_prefix: str | None = None


class SecurityGroup(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A Neutron security group: its id and its rules (allow rules; the rest is denied)."""

    id: ShortId
    rules: list[SecurityGroupRule] = []


class FixedIp(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """An address of the port and the prefix length of its subnet."""

    ip: str
    prefix: Annotated[int, Meta(ge=0, le=128)]


class PortNetwork(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The network a port is on: an existing bridge to use, a VLAN, the MTU."""

    id: ShortId
    bridge: Annotated[str, Meta(min_length=1, max_length=IFNAMSIZ)] | None = None
    vlan: Annotated[int, Meta(ge=1, le=4094)] | None = None
    mtu: Annotated[int, Meta(ge=68, le=65535)] | None = None


class Port(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A Neutron port as ``instance.spawn``'s ``networks`` and ``instance.attach_port`` give it."""

    id: ShortId
    mac: str
    network: PortNetwork
    fixed_ips: list[FixedIp] = []
    port_security_enabled: bool = True
    security_groups: list[SecurityGroup] = []


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
            text = str(exc)
            where = ""
            if " - at `$" in text:
                text, _, where = text.partition(" - at `$")
                where = where.rstrip("`")
            raise _bad(f"{field_name}[{i}]{where}", text) from exc
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
    if value.isdigit() and int(value) <= 255:
        return int(value)
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


def check_ports(ports: Sequence[Port], existing: Iterable[Port] = (), field_name: str = "networks") -> None:
    """Validate ports on their own and against the ports already on this host.

    Malformed ports (bad MAC, bad address, an address twice on one network, unknown protocol,
    security groups on a port without port security) are BadRequest; a port id, MAC or IP that
    another port on the host's same network already uses is Conflict.
    """
    seen_ids: set[str] = set()
    seen_macs: dict[tuple[str, str], str] = {}
    seen_ips: dict[tuple[str, str], str] = {}
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
        seen_macs[(net, mac)] = port.id
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
            seen_ips[key] = port.id
        if not port.port_security_enabled and port.security_groups:
            raise _bad(f"{where}.security_groups", "security groups need port_security_enabled")
        for g, group in enumerate(port.security_groups):
            for r, rule in enumerate(group.rules):
                check_rule(rule, f"{where}.security_groups[{g}].rules[{r}]")
    for other in existing:
        if other.id in seen_ids:
            raise Conflict(f"port {other.id} is already plugged on this host", {"field": "id", "reason": "in use"})
        net = other.network.id
        other_mac = _normal_mac(other.mac) or other.mac
        if (net, other_mac) in seen_macs:
            raise Conflict(
                f"MAC {other_mac} is already used on network {net} by port {other.id}",
                {"field": "mac", "reason": "in use", "port_id": other.id},
            )
        for fip in other.fixed_ips:
            key = (net, str(ipaddress.ip_address(fip.ip)))
            if key in seen_ips:
                raise Conflict(
                    f"IP {key[1]} is already used on network {net} by port {other.id}",
                    {"field": "fixed_ips", "reason": "in use", "port_id": other.id},
                )


# ---------------------------------------------------------------------------------------
# nftables rendering: pure functions from ports to JSON commands.


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _set_of(values: Sequence[str]) -> Any:
    return values[0] if len(values) == 1 else {"set": list(values)}


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


@dataclass(frozen=True)
class _Names:
    """The nftables object names of one port, all derived from its tap name."""

    tap: str

    @property
    def spoof(self) -> str:
        return "s-" + self.tap

    @property
    def to(self) -> str:
        return "t-" + self.tap

    @property
    def egress(self) -> str:
        return "e-" + self.tap

    @property
    def ingress(self) -> str:
        return "i-" + self.tap


class _Renderer:
    """Builds the JSON commands of the two tables; one instance per table name."""

    def __init__(self, table: str) -> None:
        self.table = table

    def _obj(self, family: str, kind: str, **body: Any) -> dict[str, Any]:
        return {kind: {"family": family, "table": self.table, **body}}

    def _rule(self, family: str, chain: str, exprs: list[dict[str, Any]], comment: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"chain": chain, "expr": exprs}
        if comment is not None:
            body["comment"] = comment
        return {"add": self._obj(family, "rule", **body)}

    def base(self) -> list[dict[str, Any]]:
        """Both tables from scratch, empty maps; the caller deletes old tables first."""
        t = self.table
        mark = _meta("mark")
        tag = f"fc-base:{_BASE_VERSION}"
        return [
            {"add": {"table": {"family": "bridge", "name": t}}},
            {"add": self._obj("bridge", "map", name="from_port", type="ifname", map="verdict")},
            {"add": self._obj("bridge", "map", name="to_port", type="ifname", map="verdict")},
            {"add": self._obj("bridge", "chain", name="prerouting", type="filter", hook="prerouting",
                              prio=-200, policy="accept")},
            {"add": self._obj("bridge", "chain", name="forward", type="filter", hook="forward",
                              prio=-200, policy="accept")},
            self._rule("bridge", "prerouting", [{"vmap": {"key": _meta("iifname"), "data": "@from_port"}}], tag),
            self._rule("bridge", "forward", [{"vmap": {"key": _meta("oifname"), "data": "@to_port"}}], tag),
            {"add": {"table": {"family": "inet", "name": t}}},
            {"add": self._obj("inet", "map", name="egress", type="mark", map="verdict")},
            {"add": self._obj("inet", "map", name="ingress", type="mark", map="verdict")},
            {"add": self._obj("inet", "chain", name="forward", type="filter", hook="forward",
                              prio=0, policy="accept")},
            # Traffic that touches none of our ports is not ours to judge.
            self._rule("inet", "forward", [_match({"&": [mark, _MARK_FROM_FLAG | _MARK_TO_FLAG]}, 0),
                                           {"accept": None}], tag),
            self._rule("inet", "forward", [_match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                                           {"accept": None}]),
            self._rule("inet", "forward", [_match({"ct": {"key": "state"}}, "invalid", "in"), {"drop": None}]),
            # Neighbour discovery and DHCP replies reach ports whatever their groups, as in Neutron.
            self._rule("inet", "forward", [_match(_meta("l4proto"), 58),
                                           _match(_payload("icmpv6", "type"), {"set": [133, 134, 135, 136]}),
                                           {"accept": None}]),
            self._rule("inet", "forward", [_match(_meta("nfproto"), "ipv4"), _match(_meta("l4proto"), 17),
                                           _match(_payload("th", "sport"), 67), _match(_payload("th", "dport"), 68),
                                           {"accept": None}]),
            self._rule("inet", "forward", [{"vmap": {"key": {"&": [mark, 0xFFFF0000]}, "data": "@egress"}}]),
            self._rule("inet", "forward", [{"vmap": {"key": {"&": [mark, 0xFFFF]}, "data": "@ingress"}}]),
        ]  # fmt: skip

    def spoof_rules(self, port: Port, number: int) -> list[list[dict[str, Any]]]:
        """The anti-spoofing chain's rules (bridge family), first rule marks the packet."""
        mac = _normal_mac(port.mac) or port.mac
        v4 = [f.ip for f in port.fixed_ips if ipaddress.ip_address(f.ip).version == 4]
        v6 = [str(ipaddress.ip_address(f.ip)) for f in port.fixed_ips if ipaddress.ip_address(f.ip).version == 6]
        v6.append(_link_local(mac))
        ether_type = _payload("ether", "type")
        rules: list[list[dict[str, Any]]] = [
            [{"mangle": {"key": _meta("mark"), "value": _MARK_FROM_FLAG | (number << 16)}}],
            [_match(_payload("ether", "saddr"), mac, "!="), {"drop": None}],
            [_match(ether_type, {"set": [0x8100, 0x88A8]}), {"drop": None}],
            [_match(_payload("arp", "saddr ether"), mac, "!="), {"drop": None}],
            [_match(_payload("arp", "saddr ip"), _set_of([*v4, "0.0.0.0"]), "!="), {"drop": None}],
            # A guest may not answer DHCP or advertise itself as a router.
            [_match(ether_type, 0x0800), _match(_meta("l4proto"), 17), _match(_payload("th", "sport"), 67),
             {"drop": None}],
            [_match(_meta("l4proto"), 58), _match(_payload("icmpv6", "type"), 134), {"drop": None}],
            # DHCP discovery comes from 0.0.0.0 before the guest knows its address.
            [_match(_payload("ip", "saddr"), "0.0.0.0"), _match(_meta("l4proto"), 17),
             _match(_payload("th", "sport"), 68), _match(_payload("th", "dport"), 67), {"accept": None}],
            # Duplicate address detection and MLD reports come from :: too.
            [_match(_payload("ip6", "saddr"), "::"), _match(_meta("l4proto"), 58), {"accept": None}],
        ]  # fmt: skip
        if v4:
            rules.append([_match(_payload("ip", "saddr"), _set_of(v4), "!="), {"drop": None}])
        else:
            rules.append([_match(ether_type, 0x0800), {"drop": None}])
        rules.append([_match(_payload("ip6", "saddr"), _set_of(v6), "!="), {"drop": None}])
        return rules

    @staticmethod
    def to_rules(number: int) -> list[list[dict[str, Any]]]:
        """The output-port chain: the receiver's number into the low half of the mark."""
        mark = _meta("mark")
        value = {"|": [{"&": [mark, 0xFFFF0000]}, _MARK_TO_FLAG | number]}
        return [[{"mangle": {"key": mark, "value": value}}]]

    @staticmethod
    def sg_rules(groups: Sequence[SecurityGroup], direction: str) -> list[list[dict[str, Any]]]:
        """A port's egress (verdict return) or ingress (verdict accept) chain, default drop."""
        verdict = {"return": None} if direction == "egress" else {"accept": None}
        rules: list[list[dict[str, Any]]] = []
        seen: set[str] = set()
        for group in groups:
            for rule in group.rules:
                if rule.direction != direction:
                    continue
                exprs = [*_rule_exprs(rule), verdict]
                key = msgspec.json.encode(exprs).decode()
                if key not in seen:
                    seen.add(key)
                    rules.append(exprs)
        rules.append([{"drop": None}])
        return rules

    def port_chains(self, port: Port, tap: str, number: int) -> dict[tuple[str, str], list[list[dict[str, Any]]]]:
        """All four chains of a port: (family, chain name) -> rules."""
        n = _Names(tap)
        return {
            ("bridge", n.spoof): self.spoof_rules(port, number),
            ("bridge", n.to): self.to_rules(number),
            ("inet", n.egress): self.sg_rules(port.security_groups, "egress"),
            ("inet", n.ingress): self.sg_rules(port.security_groups, "ingress"),
        }

    @staticmethod
    def digest(chain_rules: list[list[dict[str, Any]]]) -> str:
        """The tag a chain's first rule carries: a hash of the chain's intended rules."""
        return "fc:" + hashlib.blake2b(msgspec.json.encode(chain_rules), digest_size=10).hexdigest()

    def chain_cmds(
        self, family: str, name: str, rules: list[list[dict[str, Any]]], fresh: bool
    ) -> list[dict[str, Any]]:
        """Commands that (re)write one chain; the first rule carries the digest comment."""
        cmds: list[dict[str, Any]] = [{"add": self._obj(family, "chain", name=name)}]
        if not fresh:
            cmds.append({"flush": self._obj(family, "chain", name=name)})
        tag = self.digest(rules)
        for i, exprs in enumerate(rules):
            cmds.append(self._rule(family, name, exprs, tag if i == 0 else None))
        return cmds

    def elements(self, tap: str, number: int) -> list[tuple[str, str, Any, str]]:
        """The four map elements of a port: (family, map, key, target chain)."""
        n = _Names(tap)
        return [
            ("bridge", "from_port", tap, n.spoof),
            ("bridge", "to_port", tap, n.to),
            ("inet", "egress", _MARK_FROM_FLAG | (number << 16), n.egress),
            ("inet", "ingress", _MARK_TO_FLAG | number, n.ingress),
        ]

    def element_cmd(self, verb: str, family: str, map_name: str, key: Any, target: str) -> dict[str, Any]:
        """Add or delete one verdict-map element."""
        return {verb: self._obj(family, "element", name=map_name, elem=[[key, {"jump": {"target": target}}]])}

    def add_port(self, port: Port, tap: str, number: int, fresh: bool) -> list[dict[str, Any]]:
        """Commands that make (or, with ``fresh`` False, remake) a port's chains and elements."""
        cmds: list[dict[str, Any]] = []
        for (family, name), rules in self.port_chains(port, tap, number).items():
            cmds += self.chain_cmds(family, name, rules, fresh)
        for family, map_name, key, target in self.elements(tap, number):
            cmds.append(self.element_cmd("add", family, map_name, key, target))
        return cmds

    def remove_port(self, tap: str, number: int) -> list[dict[str, Any]]:
        """Commands that delete a port's elements and then its chains."""
        cmds = [self.element_cmd("delete", *e) for e in self.elements(tap, number)]
        n = _Names(tap)
        for family, name in (("bridge", n.spoof), ("bridge", n.to), ("inet", n.egress), ("inet", n.ingress)):
            cmds += [
                {"flush": self._obj(family, "chain", name=name)},
                {"delete": self._obj(family, "chain", name=name)},
            ]
        return cmds


# ---------------------------------------------------------------------------------------
# The record of what is plugged, and the Network service.


@dataclass
class _Plugged:
    instance_uuid: str
    port: Port
    tap: str
    bridge: str
    mtu: int
    number: int  # 0 when the port has no port security (no chains, no elements)


@dataclass
class _NftState:
    """What the tables hold, read back from a listing (start-up and repair)."""

    base_ok: bool = False
    chain_tags: dict[tuple[str, str], str] = field(default_factory=dict)
    elements: dict[tuple[str, str], dict[Any, str]] = field(default_factory=dict)


def _parse_listing(listing: Iterable[dict[str, Any]], base_tag: str) -> _NftState:
    state = _NftState()
    base_tags = 0
    for obj in listing:
        if "map" in obj:
            m = obj["map"]
            elems: dict[Any, str] = {}
            for key, verdict in m.get("elem", []):
                target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) else None
                if target is not None:
                    elems[key] = target
            state.elements[(m["family"], m["name"])] = elems
        elif "chain" in obj:
            c = obj["chain"]
            state.chain_tags.setdefault((c["family"], c["name"]), "")
        elif "rule" in obj:
            r = obj["rule"]
            comment = r.get("comment")
            if comment is None:
                continue
            if comment == base_tag:
                base_tags += 1
            elif state.chain_tags.get((r["family"], r["chain"])) == "":
                state.chain_tags[(r["family"], r["chain"])] = comment
    state.base_ok = base_tags == 3
    return state


class Network:
    """Plugs ports into bridges and enforces their security groups; one per agent.

    All public methods are coroutines that run their netlink and nftables work in
    ``executor`` (or the loop's default), one change at a time. Call :meth:`reconcile` at
    start-up with every instance's ports before plugging anything, so the record of what is
    plugged matches the host.
    """

    def __init__(self, cfg: NetworkConfig, executor: concurrent.futures.Executor | None = None) -> None:
        self.cfg = cfg
        self._executor = executor
        self._lock = asyncio.Lock()
        self._sync_lock = threading.Lock()
        self._render = _Renderer(cfg.owner)
        self._ports: dict[str, _Plugged] = {}
        self._numbers: set[int] = set()
        self._next_number = 1
        self._nft: Nft | None = None
        self._ipr: Any = None
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

    def _alias(self, kind: str, *parts: str) -> str:
        return ":".join((self.cfg.owner, kind, *parts))

    # -- public API ---------------------------------------------------------------------

    async def validate(
        self,
        ports: Sequence[Port | Mapping[str, Any]],
        existing: Iterable[Port] | None = None,
        instance_uuid: str | None = None,
    ) -> list[Port]:
        """Decode and check ports; ``existing`` defaults to every port plugged here.

        Ports already plugged for ``instance_uuid`` are not conflicts (a retried spawn).
        Returns the decoded ports; raises BadRequest or Conflict.
        """
        decoded = decode_ports(ports)
        if existing is None:
            existing = [p.port for p in self._ports.values() if p.instance_uuid != instance_uuid]
        check_ports(decoded, existing)
        return decoded

    async def plug(self, instance_uuid: str, ports: Sequence[Port | Mapping[str, Any]]) -> list[PluggedPort]:
        """Make the bridges, VLAN sub-interfaces and taps of the ports and apply their groups.

        One nftables transaction for all the ports. Plugging a port again for the same
        instance is a no-op that returns the same answer. On failure nothing is left behind.
        """
        decoded = decode_ports(ports)
        async with self._lock:
            existing = [p.port for p in self._ports.values() if p.instance_uuid != instance_uuid]
            check_ports(decoded, existing)
            for port in decoded:
                if port.network.vlan is not None and not self.cfg.physical_interface:
                    raise _bad("network.vlan", "this host has no physical_interface for VLAN networks")
                owner = self._ports.get(port.id)
                if owner is not None and owner.instance_uuid != instance_uuid:
                    raise Conflict(f"port {port.id} belongs to instance {owner.instance_uuid}")
            return await self._run(self._plug_sync, instance_uuid, decoded)

    async def unplug(self, instance_uuid: str, ports: Iterable[Port | str] | None = None) -> None:
        """Remove the ports' taps and rules, and bridges we made that no port uses any more.

        ``ports`` are Ports or port ids; None means all of the instance's ports. Ports that are
        not plugged are ignored, so a retried delete succeeds.
        """
        async with self._lock:
            if ports is None:
                ids = [pid for pid, p in self._ports.items() if p.instance_uuid == instance_uuid]
            else:
                ids = [p.id if isinstance(p, Port) else p for p in ports]
            await self._run(self._unplug_sync, instance_uuid, ids)

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
        async with self._lock:
            plugged = self._ports.get(port_id)
            if plugged is None:
                raise NotFound(f"port {port_id} is not plugged on this host", {"field": "port_id", "reason": "unknown"})
            if not plugged.port.port_security_enabled and decoded:
                raise _bad("security_groups", "security groups need port_security_enabled")
            await self._run(self._set_groups_sync, plugged, decoded)

    async def reconcile(self, ports_by_instance: Mapping[str, Sequence[Port | Mapping[str, Any]]]) -> ReconcileReport:
        """Make the host match the wanted ports: remove strays, re-make what is missing.

        Only links whose alias carries our owner tag, and only our own tables, are touched.
        Running it twice in a row changes nothing the second time.
        """
        wanted: dict[str, tuple[str, Port]] = {}
        for uuid, plist in ports_by_instance.items():
            for port in decode_ports(plist):
                wanted[port.id] = (uuid, port)
        async with self._lock:
            return await self._run(self._reconcile_sync, wanted)

    def plugged(self, instance_uuid: str | None = None) -> list[PluggedPort]:
        """The ports plugged here (of one instance, or all), as the domain XML needs them."""
        return [
            self._answer(p) for p in self._ports.values() if instance_uuid is None or p.instance_uuid == instance_uuid
        ]

    def ports_of(self, instance_uuid: str) -> list[Port]:
        """The Port records of an instance's plugged ports."""
        return [p.port for p in self._ports.values() if p.instance_uuid == instance_uuid]

    def close(self) -> None:
        """Close the netlink socket and the nftables context."""
        with self._sync_lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._nft is not None:
                self._nft.close()
                self._nft = None

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
    def _nftables(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def _transact(self, cmds: list[dict[str, Any]]) -> None:
        if cmds:
            self._nftables.json({"nftables": cmds})

    def _answer(self, p: _Plugged) -> PluggedPort:
        return PluggedPort(
            port_id=p.port.id, tap=p.tap, mac=_normal_mac(p.port.mac) or p.port.mac, mtu=p.mtu, bridge=p.bridge
        )

    def _take_number(self) -> int:
        for _ in range(_MAX_PORT_NUMBER):
            n = self._next_number
            self._next_number = n % _MAX_PORT_NUMBER + 1
            if n not in self._numbers:
                self._numbers.add(n)
                return n
        raise AgentError(f"more than {_MAX_PORT_NUMBER} ports with port security on this host")

    def _ensure_base_cmds(self) -> list[dict[str, Any]]:
        """Commands that (re)create empty tables when ours are missing or of another version."""
        if self._base_ready:
            return []
        state = self._read_tables()
        self._base_ready = True
        if state.base_ok:
            return []
        return self._rebuild_cmds()

    def _rebuild_cmds(self) -> list[dict[str, Any]]:
        t = self.cfg.owner
        # "add" then "delete" makes the deletion valid whether or not the table existed.
        return [
            {"add": {"table": {"family": "bridge", "name": t}}},
            {"delete": {"table": {"family": "bridge", "name": t}}},
            {"add": {"table": {"family": "inet", "name": t}}},
            {"delete": {"table": {"family": "inet", "name": t}}},
            *self._render.base(),
        ]

    def _read_tables(self) -> _NftState:
        listing: list[dict[str, Any]] = []
        for family in ("bridge", "inet"):
            try:
                out = self._nftables.json(
                    {"nftables": [{"list": {"table": {"family": family, "name": self.cfg.owner}}}]}
                )
            except NftError as exc:
                if "No such file or directory" in exc.message:
                    continue
                raise
            listing += out.get("nftables", [])
        return _parse_listing(listing, f"fc-base:{_BASE_VERSION}")

    def _link(self, name: str) -> Any | None:
        try:
            links = self._netlink.get_links(ifname=name)
        except Exception as exc:  # pyroute2 raises NetlinkError(ENODEV) for a missing name
            if getattr(exc, "code", None) == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    def _ensure_bridge(self, network: PortNetwork, mtu: int, made: list[str]) -> int:
        ipr = self._netlink
        name = self.bridge_name(network)
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
                ipr.link(
                    "set",
                    index=vlink["index"],
                    ifalias=self._alias("vlan", network.id),
                    master=bridge_index,
                    state="up",
                )
            elif vlink.get("master") != bridge_index:
                ipr.link("set", index=vlink["index"], master=bridge_index, state="up")
        return bridge_index

    def _ensure_tap(self, instance_uuid: str, port: Port, bridge_index: int, mtu: int, made: list[str]) -> str:
        ipr = self._netlink
        tap = self.tap_name(port.id)
        alias = self._alias("tap", instance_uuid, port.id)
        link = self._link(tap)
        if link is not None and link.get("ifalias") != alias:
            raise Conflict(f"{tap} exists and is not this port's tap", {"field": "id", "reason": "tap name in use"})
        if link is None:
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            link = self._link(tap)
            assert link is not None
            made.append(tap)
        mac = _normal_mac(port.mac) or port.mac
        # The host end must not carry the guest's MAC, or the bridge would learn it on the
        # wrong side; libvirt and os-vif use fe: in the first octet for the same reason.
        wanted = {"ifalias": alias, "address": "fe" + mac[2:], "mtu": mtu, "master": bridge_index}
        if any(link.get(k) != v for k, v in wanted.items()) or not link["flags"] & _IFF_UP:
            ipr.link("set", index=link["index"], state="up", **wanted)
        return tap

    def _delete_links(self, names: Iterable[str]) -> None:
        for name in names:
            link = self._link(name)
            if link is not None and (link.get("ifalias") or "").startswith(self.cfg.owner + ":"):
                with contextlib.suppress(Exception):
                    self._netlink.link("del", index=link["index"])

    def _plug_sync(self, instance_uuid: str, ports: list[Port]) -> list[PluggedPort]:
        made: list[str] = []
        new: list[_Plugged] = []
        cmds = self._ensure_base_cmds()
        try:
            for port in ports:
                if port.id in self._ports:
                    continue
                mtu = port.network.mtu or self.cfg.default_mtu
                bridge_index = self._ensure_bridge(port.network, mtu, made)
                tap = self._ensure_tap(instance_uuid, port, bridge_index, mtu, made)
                number = self._take_number() if port.port_security_enabled else 0
                new.append(_Plugged(instance_uuid, port, tap, self.bridge_name(port.network), mtu, number))
                if number:
                    cmds += self._render.add_port(port, tap, number, fresh=True)
            self._transact(cmds)
        except BaseException:
            for p in new:
                self._numbers.discard(p.number)
            self._delete_links(reversed(made))
            if cmds:
                self._base_ready = False
            raise
        for p in new:
            self._ports[p.port.id] = p
        return [self._answer(self._ports[port.id]) for port in ports]

    def _unplug_sync(self, instance_uuid: str, port_ids: list[str]) -> None:
        gone: list[_Plugged] = []
        for pid in port_ids:
            p = self._ports.get(pid)
            if p is not None and p.instance_uuid == instance_uuid:
                gone.append(p)
        cmds: list[dict[str, Any]] = []
        for p in gone:
            if p.number:
                cmds += self._render.remove_port(p.tap, p.number)
        try:
            self._transact(cmds)
        except NftError:
            # The tables no longer match the record (changed behind our back): rebuild them
            # from the record without the departing ports.
            for p in gone:
                del self._ports[p.port.id]
            self._transact(self._full_cmds())
        else:
            for p in gone:
                del self._ports[p.port.id]
        for p in gone:
            self._numbers.discard(p.number)
        self._delete_links(p.tap for p in gone)
        # Taps of unknown ports (a delete after a restart without reconcile) still go if ours.
        known = {p.port.id for p in gone}
        for pid in port_ids:
            if pid not in known:
                link = self._link(self.tap_name(pid))
                if link is not None and link.get("ifalias") == self._alias("tap", instance_uuid, pid):
                    self._netlink.link("del", index=link["index"])
        for p in gone:
            self._drop_bridge_if_unused(p.port.network)

    def _drop_bridge_if_unused(self, network: PortNetwork) -> None:
        name = self.bridge_name(network)
        if any(q.bridge == name for q in self._ports.values()):
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

    def _set_groups_sync(self, plugged: _Plugged, groups: list[SecurityGroup]) -> None:
        port = msgspec.structs.replace(plugged.port, security_groups=groups)
        n = _Names(plugged.tap)
        cmds: list[dict[str, Any]] = []
        if plugged.number:
            chains = self._render.port_chains(port, plugged.tap, plugged.number)
            for family, name in (("inet", n.egress), ("inet", n.ingress)):
                cmds += self._render.chain_cmds(family, name, chains[(family, name)], fresh=False)
        self._transact(cmds)
        plugged.port = port

    def _full_cmds(self) -> list[dict[str, Any]]:
        cmds = self._rebuild_cmds()
        for p in self._ports.values():
            if p.number:
                cmds += self._render.add_port(p.port, p.tap, p.number, fresh=True)
        self._base_ready = True
        return cmds

    def _reconcile_sync(self, wanted: dict[str, tuple[str, Port]]) -> ReconcileReport:
        report = ReconcileReport()
        owner_prefix = self.cfg.owner + ":"
        ours = {
            link.get("ifname"): link
            for link in self._netlink.get_links()
            if (link.get("ifalias") or "").startswith(owner_prefix)
        }
        wanted_taps = {self.tap_name(pid): self._alias("tap", uuid, pid) for pid, (uuid, _) in wanted.items()}
        wanted_bridges = {self.bridge_name(port.network) for _, port in wanted.values()}
        wanted_vlans = {
            self.vlan_name(port.network.vlan) for _, port in wanted.values() if port.network.vlan is not None
        }
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

        state = self._read_tables()
        old_numbers: dict[str, int] = {}
        for key, target in state.elements.get(("inet", "egress"), {}).items():
            if isinstance(key, int) and target.startswith("e-"):
                old_numbers[target[2:]] = (key >> 16) & _MAX_PORT_NUMBER
        self._ports = {}
        self._numbers = set()
        cmds: list[dict[str, Any]] = []
        if not state.base_ok:
            cmds += self._rebuild_cmds()
            report.rebuilt_tables = True
            state = _NftState()
        self._base_ready = True

        pending: list[tuple[str, Port, str]] = []
        for pid, (uuid, port) in wanted.items():
            tap = self.tap_name(pid)
            number = 0
            if port.port_security_enabled:
                number = old_numbers.get(tap, 0)
                if number and number not in self._numbers:
                    self._numbers.add(number)
                else:
                    number = 0
            mtu = port.network.mtu or self.cfg.default_mtu
            self._ports[pid] = _Plugged(uuid, port, tap, self.bridge_name(port.network), mtu, number)
            pending.append((uuid, port, tap))
        for p in self._ports.values():
            if p.port.port_security_enabled and not p.number:
                p.number = self._take_number()

        made: list[str] = []
        for uuid, port, _tap in pending:
            p = self._ports[port.id]
            bridge_index = self._ensure_bridge(port.network, p.mtu, made)
            self._ensure_tap(uuid, port, bridge_index, p.mtu, made)
        report.made_links = made

        wanted_chains: set[tuple[str, str]] = set()
        wanted_elems: dict[tuple[str, str], dict[Any, str]] = {}
        for p in self._ports.values():
            if not p.number:
                continue
            chains = self._render.port_chains(p.port, p.tap, p.number)
            elems = self._render.elements(p.tap, p.number)
            wanted_chains.update(chains)
            for family, map_name, key, target in elems:
                wanted_elems.setdefault((family, map_name), {})[key] = target
            intact = all(state.chain_tags.get(k) == self._render.digest(r) for k, r in chains.items()) and all(
                state.elements.get((f, m), {}).get(key) == target for f, m, key, target in elems
            )
            if intact:
                continue
            report.made_ports.append(p.port.id)
            for (family, name), rules in chains.items():
                cmds += self._render.chain_cmds(family, name, rules, fresh=(family, name) not in state.chain_tags)
            for family, map_name, key, target in elems:
                current = state.elements.get((family, map_name), {}).get(key)
                if current is not None and current != target:
                    cmds.append(self._render.element_cmd("delete", family, map_name, key, current))
                if current != target:
                    cmds.append(self._render.element_cmd("add", family, map_name, key, target))
        stray_taps: set[str] = set()
        for (family, map_name), elems_now in state.elements.items():
            for key, target in elems_now.items():
                if key not in wanted_elems.get((family, map_name), {}):
                    cmds.append(self._render.element_cmd("delete", family, map_name, key, target))
                    stray_taps.add(target[2:])
        for family, name in state.chain_tags:
            if name[:2] in ("s-", "t-", "e-", "i-") and (family, name) not in wanted_chains:
                chain = {"family": family, "table": self.cfg.owner, "name": name}
                cmds += [{"flush": {"chain": chain}}, {"delete": {"chain": chain}}]
                stray_taps.add(name[2:])
        report.removed_ports = sorted(stray_taps)
        try:
            self._transact(cmds)
        except NftError:
            self._transact(self._full_cmds())
            report.rebuilt_tables = True
        return report
