"""nftables rendering: pure functions from ports to the JSON commands of our two tables.

The layout of the tables (base chains, the rule chains of security groups, the chains that set
conntrack zones) is written here; the sets and the encoding of their elements are
``encoding.py``'s. See docs/NETWORK.md for the packet's path through them.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from fastcompute.network.nft import encoding
from fastcompute.network.nft.encoding import MARK_OURS, MARK_PORT_BITS, OUT_LIMIT, SETS, ZONES, Elem, SetKey
from fastcompute.network.ports import ICMP_PROTOCOLS, PORT_PROTOCOLS, protocol_number
from fastcompute.protocol.ports import Port, SecurityGroup, SecurityGroupRule

ChainKey = tuple[str, str]  # (family, chain name)
# The maps here are libnftables' JSON (nft -j): objects of many kinds, as nft defines them.
Rules = list[list[dict[str, Any]]]  # a chain's rules, each a list of expressions

BASE_CHAINS: Final = frozenset(
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
# With the metadata service on: the DNAT of 169.254.169.254:80 to its listeners, and the
# filter that lets only those DNATed connections of our ports reach them.
METADATA_CHAINS: Final = frozenset({("inet", "metadata_nat"), ("inet", "metadata_in")})
METADATA_ADDRESS: Final = "169.254.169.254"


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


def _rule_exprs(rule: SecurityGroupRule) -> list[dict[str, Any]]:
    exprs: list[dict[str, Any]] = [_match(_meta("nfproto"), "ipv4" if rule.ethertype == "IPv4" else "ipv6")]
    proto = protocol_number(rule.protocol)
    if proto is not None:
        exprs.append(_match(_meta("l4proto"), proto))
    lo, hi = rule.port_range_min, rule.port_range_max
    if proto in PORT_PROTOCOLS and lo is not None and hi is not None:
        exprs.append(_match(_payload("th", "dport"), lo if lo == hi else {"range": [lo, hi]}))
    elif proto in ICMP_PROTOCOLS and lo is not None:
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


def sg_chain(groups: Sequence[SecurityGroup], direction: str) -> tuple[str, Rules]:
    """A port's egress or ingress chain: (name from the digest of its rules, rules).

    The chain accepts what any of the groups allows in that direction and drops the rest;
    ports whose groups give the same rules share one chain.
    """
    return _sg_chain(msgspec.msgpack.encode(groups), direction)


@functools.lru_cache(maxsize=4096)
def _sg_chain(packed_groups: bytes, direction: str) -> tuple[str, Rules]:
    groups = msgspec.msgpack.decode(packed_groups, type=list[SecurityGroup])
    rules: Rules = []
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


def number_chains(ports: Iterable[Port]) -> dict[ChainKey, int]:
    """Numbers for the rule chains of ports with port security, in order of first use."""
    ids: dict[ChainKey, int] = {}
    for port in ports:
        if port.port_security_enabled:
            for key in Renderer.chains(port):
                ids.setdefault(key, len(ids) + 1)
    return ids


def ruleset(
    table: str,
    ports: Iterable[tuple[Port, str]],
    zones: Mapping[str, int] | None = None,
    metadata: tuple[str, int] | None = None,
    limits: Iterable[Elem] = (),
) -> list[dict[str, Any]]:
    """One transaction that replaces both tables with the rules of ``(port, tap)`` pairs, the
    conntrack ``zones`` of bridges and the ports' outbound ``limits`` (out_limit elements),
    and the metadata service's chains (see :class:`Renderer`).

    What the agent sends when it finds its tables missing or of another layout, e.g. at the
    first start-up with instances to restore.
    """
    render = Renderer(table, metadata)
    pairs = list(ports)
    ids = number_chains(port for port, _ in pairs)
    elements: dict[SetKey, set[Elem]] = {k: set() for k in SETS}
    chains: dict[ChainKey, Rules] = {}
    for port, tap in pairs:
        chains.update(render.chains(port))
        for key, elems in render.elements_of(port, tap, ids).items():
            elements[key] |= elems
    cmds = render.rebuild()
    for key, rules in chains.items():
        # The chain without its map entry: the entries go in one command per map below.
        cmds += render.chain_body(*key, rules, exists=False)
        elements[encoding.verdict_map(key[1])].add(render.verdict(key[1], ids[key]))
    for bridge, zone in (zones or {}).items():
        cmds += render.zone_chain(zone, exists=False)
        elements[ZONES].add(encoding.zone_elem(bridge, zone))
    elements[OUT_LIMIT].update(limits)
    cmds += render.limits(elements[OUT_LIMIT])
    for key, members in elements.items():
        cmds += render.elements("add", key, members)
    return cmds


class Renderer:
    """Builds the JSON commands of the two tables named ``table``.

    ``metadata`` is the (address, port) of the metadata service's listeners, None when it is off.
    """

    def __init__(self, table: str, metadata: tuple[str, int] | None = None) -> None:
        self.table = table
        self.mark = encoding.owner_mark(table)
        self.metadata = metadata
        self.base_chains = BASE_CHAINS | METADATA_CHAINS if metadata is not None else BASE_CHAINS
        self.base_tag = "fc-base:" + _digest(self._base(""))

    @staticmethod
    def chains(port: Port) -> dict[ChainKey, Rules]:
        """The port's egress and ingress rule chains: {(family, name): rules}."""
        egress, egress_rules = sg_chain(port.security_groups, "egress")
        ingress, ingress_rules = sg_chain(port.security_groups, "ingress")
        return {("inet", egress): egress_rules, ("inet", ingress): ingress_rules}

    def elements_of(self, port: Port, tap: str, ids: Mapping[ChainKey, int]) -> dict[SetKey, frozenset[Elem]]:
        """The set elements of a port with port security; ``ids`` numbers its rule chains."""
        egress, ingress = self.chains(port)
        return encoding.port_elements(port, tap, self.mark | ids[egress], self.mark | ids[ingress])

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
            {"add": self._obj(f, "set" if spec.map is None else "map", name=n, **spec.declaration())}
            for (f, n), spec in SETS.items()
        ]
        drop, accept, jump_spoof = {"drop": None}, {"accept": None}, {"jump": {"target": "spoof"}}
        is_arp, is_ip, is_ip6 = _match(ether_type, 0x0806), _match(ether_type, 0x0800), _match(ether_type, 0x86DD)

        def spoof(*exprs: dict[str, Any]) -> dict[str, Any]:
            return self._rule("bridge", "spoof", list(exprs))

        def mark_set(key: dict[str, Any], map_name: str) -> dict[str, Any]:
            return {"mangle": {"key": mark, "value": {"map": {"key": key, "data": map_name}}}}

        ours = _match({"&": [mark, MARK_PORT_BITS]}, self.mark)

        def not_in(left: dict[str, Any], set_name: str) -> dict[str, Any]:
            return _match(_concat(iif, left), "@" + set_name, "!=")

        bridge = [
            chain("bridge", "spoof"),
            chain("bridge", "prerouting", "prerouting", -200),
            chain("bridge", "forward", "forward", -200),
            # Frames from the wire carry mark 0: only frames from our ports get our mark, which
            # names the rule chain of the sender's egress.
            self._rule("bridge", "prerouting", [mark_set(iif, "@egress_mark")], tag),
            # A port's outbound limit: what its token bucket cannot cover is dropped.
            self._rule("bridge", "prerouting", [{"limit": {"map": {"key": iif, "data": "@out_limit"}}}, drop]),
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
                self._rule("inet", hook, [_match({"&": [mark, MARK_PORT_BITS]}, self.mark, "!="), accept], tag),
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
        inet += self._metadata(tag, ours)
        tables = [
            {"add": {"table": {"family": "bridge", "name": self.table}}},
            {"add": {"table": {"family": "inet", "name": self.table}}},
        ]
        return [*tables, *sets, *bridge, *inet]

    def _metadata(self, tag: str, ours: dict[str, Any]) -> list[dict[str, Any]]:
        """The metadata service's chains (none when it is off).

        Only packets of our ports (our mark: the spoof chain has vouched for their source) to
        169.254.169.254:80 are sent to the listeners' address, which is on each bridge; the
        address change is what makes br_netfilter hand the frame to the host even when the
        guest sent it to its gateway's MAC. Anything else to that address is dropped, which
        keeps the host's own services and the listeners out of reach of other traffic.
        """
        if self.metadata is None:
            return []
        address, port = self.metadata
        ipv4, tcp = _match(_meta("nfproto"), "ipv4"), _match(_meta("l4proto"), 6)
        dport = _payload("th", "dport")
        to_listener = _match(_payload("ip", "daddr"), address)

        def chain(name: str, kind: str, hook: str, prio: int) -> dict[str, Any]:
            return {"add": self._obj("inet", "chain", name=name, type=kind, hook=hook, prio=prio, policy="accept")}

        dnat = {"dnat": {"family": "ip", "addr": address, "port": port}}
        dnatted = _match({"ct": {"key": "status"}}, "dnat", "in")
        either = sorted({address, METADATA_ADDRESS})
        daddr = _payload("ip", "daddr")
        someones = _match({"&": [_meta("mark"), MARK_OURS]}, MARK_OURS)
        return [
            chain("metadata_nat", "nat", "prerouting", -100),
            self._rule("inet", "metadata_nat", [ours, ipv4, _match(daddr, METADATA_ADDRESS), tcp, _match(dport, 80),
                                                dnat], tag),
            chain("metadata_in", "filter", "input", 0),
            self._rule("inet", "metadata_in", [ipv4, to_listener, ours, dnatted, tcp, _match(dport, port),
                                               {"accept": None}], tag),
            self._rule("inet", "metadata_in", [ipv4, _match(daddr, {"set": either}), ours, {"drop": None}]),
            # Another agent's ports (tables of another owner) are that agent's to judge.
            self._rule("inet", "metadata_in", [ipv4, _match(daddr, {"set": either}), someones, {"accept": None}]),
            self._rule("inet", "metadata_in", [ipv4, _match(daddr, {"set": either}), {"drop": None}]),
        ]  # fmt: skip

    def rebuild(self) -> list[dict[str, Any]]:
        """Commands that replace both tables by empty ones ("add" first: valid when absent)."""
        cmds: list[dict[str, Any]] = []
        for family in ("bridge", "inet"):
            cmds += [
                {"add": {"table": {"family": family, "name": self.table}}},
                {"delete": {"table": {"family": family, "name": self.table}}},
            ]
        return cmds + self.base()

    def chain_body(self, family: str, name: str, rules: Rules, exists: bool) -> list[dict[str, Any]]:
        """Commands that write one chain (flushed first when it ``exists``); the first rule
        carries the chain's digest."""
        cmds: list[dict[str, Any]] = [{"add": self._obj(family, "chain", name=name)}]
        if exists:
            cmds.append({"flush": self._obj(family, "chain", name=name)})
        tag = self.chain_tag(rules)
        for i, exprs in enumerate(rules):
            cmds.append(self._rule(family, name, exprs, tag if i == 0 else None))
        return cmds

    def chain(self, family: str, name: str, rules: Rules, chain_id: int, exists: bool) -> list[dict[str, Any]]:
        """Commands that write one rule chain and its verdict-map entry."""
        body = self.chain_body(family, name, rules, exists)
        return body + self.elements("add", encoding.verdict_map(name), [self.verdict(name, chain_id)])

    @staticmethod
    def zone_rules(zone: int) -> Rules:
        """The one rule of a zone's chain."""
        return [[{"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}]]

    def zone_chain(self, zone: int, exists: bool) -> list[dict[str, Any]]:
        """Commands that write the chain setting conntrack zone ``zone`` (without its map entry)."""
        return self.chain_body("inet", encoding.zone_chain(zone), self.zone_rules(zone), exists)

    def drop_chain(self, family: str, name: str, chain_id: int | None) -> list[dict[str, Any]]:
        """Commands that delete a chain, its rules and (when it has one) its map entry."""
        cmds = (
            []
            if chain_id is None
            else self.elements("delete", encoding.verdict_map(name), [self.verdict(name, chain_id)])
        )
        chain = self._obj(family, "chain", name=name)
        return [*cmds, {"flush": chain}, {"delete": chain}]

    def verdict(self, chain_name: str, chain_id: int) -> Elem:
        """The verdict-map element of a rule chain."""
        return encoding.verdict(self.mark | chain_id, chain_name)

    def elements(self, verb: str, key: SetKey, elems: Iterable[Elem]) -> list[dict[str, Any]]:
        """Add or delete elements of one set or map (nothing when there are none)."""
        items = [encoding.to_json(e) for e in elems]
        if not items:
            return []
        family, name = key
        return [{verb: self._obj(family, "element", name=name, elem=items)}]

    def limits(self, elems: Iterable[Elem]) -> list[dict[str, Any]]:
        """Commands that add the limit objects out_limit elements name."""
        return [
            {"add": self._obj("bridge", "limit", name=name, rate=rate, per="second", rate_unit="bytes", burst=burst,
                              burst_unit="bytes", inv=True)}
            for e in elems
            if (lim := encoding.limit_of(e)) is not None
            for name, rate, burst in [lim]
        ]

    def drop_limits(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """Commands that delete limit objects (once no element names them)."""
        return [{"delete": self._obj("bridge", "limit", name=name)} for name in names]

    @staticmethod
    def chain_tag(rules: Rules) -> str:
        """The comment the first rule of a correct chain carries."""
        return "fc:" + _digest(rules)
