"""The sets and maps of our tables and the encoding of their elements: the one place that
knows how an element is written and how a listed one is read back.

Elements are kept in hashable forms so that wanted and listed state compare as sets: a string
or int key, a tuple for a concatenation, ``("map", key, value)`` for a map element and
``("jump", chain)`` for a verdict. The renderer builds them with the constructors here and the
planner reads listed ones with the readers here; neither indexes into them.

A new set is one entry of :data:`SETS` (its type and what it holds) and, when it holds one
element per port, a line of :func:`port_elements`; the rule that looks it up is the
renderer's (``render.py``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastcompute.network.ports import link_local, normal_mac
from fastcompute.protocol.ports import Port

Elem = Any  # a hashable element, as described above
SetKey = tuple[str, str]  # (family, set or map name)

# Packet marks: bit 31 says "ours", bits 30-16 are a hash of the tables' name (so that two
# sets of tables on one host, say an agent's and a test's, never judge each other's packets),
# bits 15-0 the number of a rule chain. Other marks never hit our maps.
MARK_OURS: Final = 0x80000000
MARK_PORT_BITS: Final = 0xFFFF0000
MAX_CHAIN_ID: Final = 0xFFFF
ZONE_CHAIN: Final = "zone-"


@dataclass(frozen=True)
class SetSpec:
    """A set or map of our tables.

    ``holds`` says what one element stands for, which is how the planner treats a set it does
    not own all of: ``port`` (keyed by the port's tap), ``chain`` (a rule chain's verdict,
    keyed by its mark) or ``zone`` (a bridge's conntrack zone).
    """

    type: str | tuple[str, ...]
    holds: Literal["port", "chain", "zone"]
    map: str | None = None  # the type of the values of a map

    def declaration(self) -> dict[str, Any]:
        """The body of nft's ``add set`` or ``add map`` command (without family, table, name)."""
        body: dict[str, Any] = {"type": list(self.type) if isinstance(self.type, tuple) else self.type}
        if self.map is not None:
            body["map"] = self.map
        return body


SETS: Final[dict[SetKey, SetSpec]] = {
    ("bridge", "port_mac"): SetSpec(("ifname", "ether_addr"), "port"),
    ("bridge", "port_ipv4"): SetSpec(("ifname", "ipv4_addr"), "port"),
    ("bridge", "port_ipv6"): SetSpec(("ifname", "ipv6_addr"), "port"),
    # tap -> the mark naming its egress (ingress) rule chain
    ("bridge", "egress_mark"): SetSpec("ifname", "port", map="mark"),
    ("bridge", "ingress_mark"): SetSpec("ifname", "port", map="mark"),
    # mark -> jump to the rule chain it names
    ("inet", "egress"): SetSpec("mark", "chain", map="verdict"),
    ("inet", "ingress"): SetSpec("mark", "chain", map="verdict"),
    # bridge -> jump to the chain that sets its conntrack zone
    ("inet", "zones"): SetSpec("ifname", "zone", map="verdict"),
    # tap -> the named limit (token bucket) of what the guest sends (see network/shaping.py)
    ("bridge", "out_limit"): SetSpec("ifname", "port", map="limit"),
}
ZONES: Final[SetKey] = ("inet", "zones")
OUT_LIMIT: Final[SetKey] = ("bridge", "out_limit")
LIMIT_PREFIX: Final = "o-"


def owner_mark(table: str) -> int:
    """The mark bits of the tables named ``table`` (a rule chain's number is or-ed in)."""
    owner_bits = int.from_bytes(hashlib.blake2b(table.encode(), digest_size=2).digest()) & 0x7FFF
    return MARK_OURS | owner_bits << 16


def port_elements(port: Port, tap: str, egress_mark: int, ingress_mark: int) -> dict[SetKey, frozenset[Elem]]:
    """The elements of a port with port security on ``tap``, its chains' marks given."""
    mac = normal_mac(port.mac) or port.mac
    addrs = [ipaddress.ip_address(f.ip) for f in port.fixed_ips]
    return {
        ("bridge", "port_mac"): frozenset({(tap, mac)}),
        ("bridge", "port_ipv4"): frozenset((tap, str(a)) for a in addrs if a.version == 4),
        ("bridge", "port_ipv6"): frozenset([(tap, link_local(mac))] + [(tap, str(a)) for a in addrs if a.version == 6]),
        ("bridge", "egress_mark"): frozenset({("map", tap, egress_mark)}),
        ("bridge", "ingress_mark"): frozenset({("map", tap, ingress_mark)}),
    }


def limit_elem(tap: str, rate: int, burst: int) -> Elem:
    """The out_limit element of ``tap``. It names the tap's own limit object, whose rate
    (bytes/s) and burst (bytes) the name carries: a changed limit is another object."""
    return ("map", tap, f"{LIMIT_PREFIX}{tap}-{rate}-{burst}")


def limit_of(elem: Elem) -> tuple[str, int, int] | None:
    """(name, rate, burst) of the limit an out_limit element names; None when not one of ours."""
    if _is_map(elem) and isinstance(elem[2], str) and elem[2].startswith(LIMIT_PREFIX):
        _tap, rate, burst = elem[2].rsplit("-", 2)
        if rate.isdigit() and burst.isdigit():
            return elem[2], int(rate), int(burst)
    return None


def verdict_map(chain_name: str) -> SetKey:
    """The verdict map that jumps to a rule chain."""
    return ("inet", "egress" if chain_name.startswith("e-") else "ingress")


def verdict(mark: int, chain_name: str) -> Elem:
    """The verdict-map element that sends packets of ``mark`` to a rule chain."""
    return ("map", mark, ("jump", chain_name))


def zone_chain(zone: int) -> str:
    """The name of the chain that sets conntrack zone ``zone``."""
    return f"{ZONE_CHAIN}{zone}"


def zone_elem(bridge: str, zone: int) -> Elem:
    """The zones-map element that puts packets of ``bridge`` in ``zone``."""
    return ("map", bridge, ("jump", zone_chain(zone)))


def _is_map(elem: Elem) -> bool:
    return isinstance(elem, tuple) and len(elem) == 3 and elem[0] == "map"


def zone_of(elem: Elem) -> tuple[str, int] | None:
    """(bridge, zone) of a zones-map element as listed; None when it is not one of ours."""
    if _is_map(elem) and isinstance(elem[1], str) and isinstance(elem[2], tuple):
        target = elem[2][1]
        if isinstance(target, str) and target.startswith(ZONE_CHAIN) and target[len(ZONE_CHAIN) :].isdigit():
            return elem[1], int(target[len(ZONE_CHAIN) :])
    return None


def chain_of(elem: Elem) -> tuple[str, int] | None:
    """(rule chain, its number) of a verdict-map element as listed; None when not one."""
    if _is_map(elem) and isinstance(elem[1], int) and isinstance(elem[2], tuple):
        return elem[2][1], elem[1] & MAX_CHAIN_ID
    return None


def chain_id_of(elem: Elem) -> int | None:
    """The rule chain number a listed element of a port set names: its mark's (mark maps),
    or its verdict's (verdict maps); None for elements that name none."""
    if _is_map(elem):
        if isinstance(elem[2], int):
            return elem[2] & MAX_CHAIN_ID
        if isinstance(elem[1], int):
            return elem[1] & MAX_CHAIN_ID
    return None


def tap_of(elem: Elem) -> str | None:
    """The tap of a listed element of a port set."""
    if isinstance(elem, tuple):
        key = elem[1] if _is_map(elem) else elem[0]
        return key if isinstance(key, str) else None
    return None


def bridge_of(elem: Elem) -> str | None:
    """The bridge of a listed zones-map element."""
    return elem[1] if _is_map(elem) and isinstance(elem[1], str) else None


def to_json(elem: Elem) -> Any:
    """An element as nft's JSON writes it."""
    if isinstance(elem, tuple) and len(elem) == 2 and elem[0] == "jump":
        return {"jump": {"target": elem[1]}}
    if isinstance(elem, tuple) and elem and elem[0] == "map":
        return [to_json(elem[1]), to_json(elem[2])]
    if isinstance(elem, tuple):
        return {"concat": list(elem)}
    return elem


def from_json(obj: Any) -> Elem:
    """An element of nft's JSON listing, in the hashable form."""
    if isinstance(obj, list) and len(obj) == 2:
        return ("map", from_json(obj[0]), from_json(obj[1]))
    if isinstance(obj, dict):
        if "concat" in obj:
            return tuple(obj["concat"])
        if "jump" in obj:
            return ("jump", obj["jump"]["target"])
        if "elem" in obj:
            return from_json(obj["elem"]["val"])
    return obj
