"""The planner: what the tables must become, as commands, from what they hold and what is wanted.

Pure: plain data in (a listing, the state the agent keeps of the tables, the plugged ports),
commands and the state to keep once they commit out. ``apply.py`` reads the tables, runs the
commands and keeps the state. Two plans:

* :func:`plan_change`, the hot path: ports join and leave tables known to be as the state
  says; only their elements, and chains that gain their first or lose their last user, change.
* :func:`plan_sync`, from a listing (start-up, reconciliation, repair after a refused
  transaction): tables of another layout are rebuilt; otherwise chains keep the numbers the
  tables give them, damaged chains are rewritten and missing elements added. With ``prune``
  everything else goes too; without, only what ``forget`` names and chains nothing uses, so that
  a partial record never strips the rules of ports it does not know about.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastcompute.errors import AgentError
from fastcompute.network.nft import encoding
from fastcompute.network.nft.encoding import MAX_CHAIN_ID, OUT_LIMIT, SETS, ZONES, Elem, SetKey
from fastcompute.network.nft.render import BASE_CHAINS, ChainKey, Renderer, Rules, number_chains, ruleset
from fastcompute.network.ports import Plugged

Command = dict[str, Any]


@dataclass
class Listing:
    """What the tables hold, read back from nft's JSON listing."""

    base_ok: bool = False  # both tables, every base chain as we write it and every set
    chain_tags: dict[ChainKey, str] = field(default_factory=dict)  # chain -> its first rule's comment
    elements: dict[SetKey, set[Elem]] = field(default_factory=dict)
    limits: set[str] = field(default_factory=set)  # names of the bridge table's limit objects

    def have(self, key: SetKey) -> set[Elem]:
        """The listed elements of a set (none when it is missing)."""
        return self.elements.get(key, set())

    def zones(self) -> dict[str, int]:
        """Bridge -> conntrack zone, as the zones map gives them."""
        return dict(z for e in self.have(ZONES) if (z := encoding.zone_of(e)))

    def chain_ids(self) -> dict[ChainKey, int]:
        """Rule chain -> its number, as the verdict maps give them."""
        ids: dict[ChainKey, int] = {}
        for key, spec in SETS.items():
            if spec.holds == "chain":
                for elem in self.have(key):
                    if (chain := encoding.chain_of(elem)) is not None:
                        ids.setdefault(("inet", chain[0]), chain[1])
        return ids


def parse_listing(
    listing: Iterable[dict[str, Any]], base_tag: str, base_chains: frozenset[ChainKey] = BASE_CHAINS
) -> Listing:
    """Read a listing of both tables; ``base_tag`` is the comment of intact ``base_chains``."""
    state = Listing()
    base_tags = 0
    for obj in listing:
        kind = "set" if "set" in obj else "map" if "map" in obj else None
        if kind is not None:
            body = obj[kind]
            state.elements[(body["family"], body["name"])] = {encoding.from_json(e) for e in body.get("elem", [])}
        elif "limit" in obj:
            state.limits.add(obj["limit"]["name"])
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
    state.base_ok = base_tags == len(base_chains) and all(k in state.elements for k in SETS)
    return state


@dataclass
class TableState:
    """What the agent keeps of its tables between transactions."""

    base_ready: bool = False  # the tables were read or written since start-up and are of our layout
    chain_ids: dict[ChainKey, int] = field(default_factory=dict)  # rule chain -> number in its mark
    chain_refs: Counter[ChainKey] = field(default_factory=Counter)  # rule chain -> ports using it
    foreign_ids: set[int] = field(default_factory=set)  # numbers of chains of ports we were not told about
    zones: dict[str, int] = field(default_factory=dict)  # bridge -> its conntrack zone
    bridge_refs: Counter[str] = field(default_factory=Counter)  # bridge -> ports of the record on it


@dataclass
class SyncPlan:
    """A sync's transaction, the state to keep once it commits, and what it changes."""

    cmds: list[Command]
    state: TableState
    rebuilt: bool = False
    made_ports: list[str] = field(default_factory=list)  # ports whose rules are (re)written
    removed_ports: list[str] = field(default_factory=list)  # taps of ports the tables held and lose


def take_id(taken: Iterable[int]) -> int:
    """The lowest rule chain number not in ``taken``."""
    used = set(taken)
    for n in range(1, MAX_CHAIN_ID + 1):
        if n not in used:
            return n
    raise AgentError(f"more than {MAX_CHAIN_ID} distinct security-group rule sets on this host")


def take_zone(taken: Iterable[int], zones_from: int) -> int:
    """The lowest conntrack zone from ``zones_from`` not in ``taken``."""
    used = set(taken)
    for n in range(zones_from, 65536):
        if n not in used:
            return n
    raise AgentError(f"no conntrack zone left from {zones_from} to 65535 on this host")


# -- the hot path ------------------------------------------------------------------------


def plan_change(
    render: Renderer, state: TableState, adds: Sequence[Plugged], removes: Sequence[Plugged], zones_from: int
) -> tuple[list[Command], TableState]:
    """One transaction for ports joining and leaving tables that are as ``state`` says."""
    port_cmds, refs, ids = _port_cmds(render, state, adds, removes)
    zone_cmds, zones = _zone_cmds(render, state, adds, removes, zones_from)
    # Copies, and Python work only for what changes: this runs on every plug.
    bridges = state.bridge_refs.copy()
    for p in adds:
        bridges[p.bridge] += 1
    for p in removes:
        bridges[p.bridge] -= 1
        if bridges[p.bridge] <= 0:
            del bridges[p.bridge]
    after = TableState(
        base_ready=True, chain_ids=ids, chain_refs=refs, foreign_ids=state.foreign_ids, zones=zones, bridge_refs=bridges
    )
    return zone_cmds + port_cmds + _limit_cmds(render, adds, removes), after


def _limits_of(ports: Iterable[Plugged]) -> set[Elem]:
    """The out_limit elements of ports with an outbound limit (port security or not)."""
    return {
        encoding.limit_elem(p.tap, *bucket) for p in ports if p.shaping and (bucket := p.shaping.outbound()) is not None
    }


def _limit_cmds(render: Renderer, adds: Sequence[Plugged], removes: Sequence[Plugged]) -> list[Command]:
    """The outbound limits of ports leaving (elements, then their objects) and joining."""
    old, new = _limits_of(removes), _limits_of(adds)
    if not old and not new:
        return []
    gone, joining = old - new, new - old
    return [
        *render.elements("delete", OUT_LIMIT, gone),
        *render.drop_limits(lim[0] for e in gone if (lim := encoding.limit_of(e)) is not None),
        *render.limits(joining),
        *render.elements("add", OUT_LIMIT, joining),
    ]


def _port_cmds(
    render: Renderer, state: TableState, adds: Sequence[Plugged], removes: Sequence[Plugged]
) -> tuple[list[Command], Counter[ChainKey], dict[ChainKey, int]]:
    """Commands for ports leaving and joining, and the chains' users and numbers after."""
    gone = [p for p in removes if p.secured]
    new = [p for p in adds if p.secured]
    delta: Counter[ChainKey] = Counter()
    rules_of: dict[ChainKey, Rules] = {}
    for p in new:
        chains = render.chains(p.port)
        delta.update(chains.keys())
        rules_of.update(chains)
    for p in gone:
        delta.subtract(render.chains(p.port).keys())
    ids = dict(state.chain_ids)
    cmds: list[Command] = []
    dropped: list[Command] = []
    for key, change in delta.items():
        before = state.chain_refs[key]
        if before <= 0 < before + change:
            ids[key] = take_id({*ids.values(), *state.foreign_ids})
            # "exists" adds a flush, harmless on a new chain, so a leftover is rewritten.
            cmds += render.chain(*key, rules_of[key], ids[key], exists=True)
        elif before + change <= 0 < before:
            dropped += render.drop_chain(*key, ids.get(key))
    old_elems = _elements_of(render, gone, state.chain_ids)
    new_elems = _elements_of(render, new, ids)
    for key, leaving in old_elems.items():
        cmds += render.elements("delete", key, leaving - new_elems.get(key, set()))
    for key, joining in new_elems.items():
        cmds += render.elements("add", key, joining - old_elems.get(key, set()))
    refs = state.chain_refs.copy()
    for key, change in delta.items():
        users = refs[key] + change
        if users > 0:
            refs[key] = users
        else:
            refs.pop(key, None)
            ids.pop(key, None)
    return cmds + dropped, refs, ids


def _elements_of(render: Renderer, ports: Iterable[Plugged], ids: Mapping[ChainKey, int]) -> dict[SetKey, set[Elem]]:
    elems: dict[SetKey, set[Elem]] = {}
    for p in ports:
        for key, mine in render.elements_of(p.port, p.tap, ids).items():
            elems.setdefault(key, set()).update(mine)
    return elems


def _zone_cmds(
    render: Renderer, state: TableState, adds: Sequence[Plugged], removes: Sequence[Plugged], zones_from: int
) -> tuple[list[Command], dict[str, int]]:
    """Commands giving the bridges ports join a zone and taking it from bridges ports leave
    for good, with the zones after."""
    zones = dict(state.zones)
    if not zones_from:
        return [], zones
    cmds: list[Command] = []
    for p in adds:
        if p.bridge not in zones:
            zone = zones[p.bridge] = take_zone(zones.values(), zones_from)
            cmds += render.zone_chain(zone, exists=True)
            cmds += render.elements("add", ZONES, [encoding.zone_elem(p.bridge, zone)])
    change = Counter(p.bridge for p in adds)
    change.subtract(p.bridge for p in removes)
    for bridge, n in change.items():
        if n < 0 and bridge in state.zones and state.bridge_refs[bridge] + n <= 0:
            zone = zones.pop(bridge)
            cmds += render.elements("delete", ZONES, [encoding.zone_elem(bridge, zone)])
            cmds += render.drop_chain("inet", encoding.zone_chain(zone), None)
    return cmds, zones


# -- from a listing ----------------------------------------------------------------------


def plan_sync(
    render: Renderer,
    listing: Listing,
    state: TableState,
    ports: Sequence[Plugged],
    *,
    zones_from: int,
    prune: bool = False,
    forget: Sequence[Plugged] = (),
) -> SyncPlan:
    """Bring tables that hold ``listing`` to what ``ports`` need, in one transaction."""
    secured = [p for p in ports if p.secured]
    zones = wanted_zones(listing, state, ports, zones_from)
    if not listing.base_ok:
        after = TableState(
            base_ready=True,
            chain_ids=number_chains(p.port for p in secured),
            chain_refs=Counter(key for p in secured for key in render.chains(p.port)),
            zones=zones,
            bridge_refs=Counter(p.bridge for p in ports),
        )
        cmds = ruleset(render.table, [(p.port, p.tap) for p in secured], zones, render.metadata, _limits_of(ports))
        return SyncPlan(cmds, after, rebuilt=True, made_ports=[p.port.id for p in secured])
    want_chains: dict[ChainKey, Rules] = {}
    refs: Counter[ChainKey] = Counter()
    for p in secured:
        chains = render.chains(p.port)
        want_chains.update(chains)
        refs.update(chains.keys())
    ids = _keep_ids(listing, want_chains)
    want = _wanted_elements(render, secured, want_chains, ids, zones)
    want[OUT_LIMIT] = _limits_of(ports)
    extra = _extra_elements(listing, want, _forgotten(render, state, listing, forget), prune)
    kept_ids = _ids_in_port_sets(listing, extra)
    foreign = {} if prune else {k: n for k, n in listing.chain_ids().items() if n in kept_ids}
    kept_zones = dict(z for e in (listing.have(ZONES) - extra[ZONES]) | want[ZONES] if (z := encoding.zone_of(e)))
    cmds = _chain_cmds(render, listing, want_chains, zones)
    for key in SETS:
        cmds += render.elements("delete", key, extra[key])
    # Limit objects follow the out_limit elements that stay: unnamed ones go, missing ones come.
    stay = (listing.have(OUT_LIMIT) - extra[OUT_LIMIT]) | want[OUT_LIMIT]
    named = {lim[0] for e in stay if (lim := encoding.limit_of(e))}
    cmds += render.drop_limits(sorted(listing.limits - named))
    cmds += render.limits(e for e in want[OUT_LIMIT] if (lim := encoding.limit_of(e)) and lim[0] not in listing.limits)
    for key in SETS:
        cmds += render.elements("add", key, want[key] - listing.have(key))
    zone_chains = (("inet", encoding.zone_chain(z)) for z in kept_zones.values())
    keep = {*want_chains, *render.base_chains, *foreign, *zone_chains}
    for key in listing.chain_tags:
        if key not in keep:
            cmds += render.drop_chain(*key, None)
    after = TableState(
        base_ready=True,
        chain_ids=ids,
        chain_refs=refs,
        foreign_ids={n for key, n in foreign.items() if key not in ids},
        zones=kept_zones,
        bridge_refs=Counter(p.bridge for p in ports),
    )
    stray_taps = {
        tap for key, spec in SETS.items() if spec.holds == "port" for e in extra[key] if (tap := encoding.tap_of(e))
    }
    return SyncPlan(
        cmds,
        after,
        made_ports=[p.port.id for p in secured if _broken(render, listing, p, ids)],
        removed_ports=sorted(stray_taps - {p.tap for p in ports}),
    )


def wanted_zones(listing: Listing, state: TableState, ports: Sequence[Plugged], zones_from: int) -> dict[str, int]:
    """The zone of each bridge of ``ports``: the one the tables give it (connections keep
    their state across restarts), else the one ``state`` gives it, else a free one."""
    if not zones_from:
        return {}
    listed = listing.zones() if listing.base_ok else {}
    zones: dict[str, int] = {}
    for bridge in dict.fromkeys(p.bridge for p in ports):
        zone = listed.get(bridge, state.zones.get(bridge))
        taken_by_other = zone in zones.values() or (bridge not in listed and zone in listed.values())
        if zone is None or taken_by_other:
            zone = take_zone([*listed.values(), *zones.values(), *state.zones.values()], zones_from)
        zones[bridge] = zone
    return zones


def _keep_ids(listing: Listing, want_chains: Mapping[ChainKey, Rules]) -> dict[ChainKey, int]:
    """Numbers of the wanted chains: the ones the tables give them, so that intact ports stay
    as they are, unless two share one; new numbers clear of every number listed."""
    listed = listing.chain_ids()
    ids = {k: v for k, v in listed.items() if k in want_chains}
    if len(set(ids.values())) != len(ids):
        ids = {}
    taken = set(listed.values())
    for key in want_chains:
        if key not in ids:
            ids[key] = take_id(set(ids.values()) | taken)
    return ids


def _wanted_elements(
    render: Renderer,
    secured: Sequence[Plugged],
    want_chains: Mapping[ChainKey, Rules],
    ids: Mapping[ChainKey, int],
    zones: Mapping[str, int],
) -> dict[SetKey, set[Elem]]:
    want: dict[SetKey, set[Elem]] = {k: set() for k in SETS}
    want[ZONES] = {encoding.zone_elem(bridge, zone) for bridge, zone in zones.items()}
    for key in want_chains:
        want[encoding.verdict_map(key[1])].add(render.verdict(key[1], ids[key]))
    for key, elems in _elements_of(render, secured, ids).items():
        want[key] |= elems
    return want


def _broken(render: Renderer, listing: Listing, p: Plugged, ids: Mapping[ChainKey, int]) -> bool:
    """True when the tables lack an element or a chain of the port as wanted."""
    for key, elems in render.elements_of(p.port, p.tap, ids).items():
        if not elems <= listing.have(key):
            return True
    for key, rules in render.chains(p.port).items():
        if listing.chain_tags.get(key) != render.chain_tag(rules):
            return True
        if render.verdict(key[1], ids[key]) not in listing.have(encoding.verdict_map(key[1])):
            return True
    return False


def _forgotten(
    render: Renderer, state: TableState, listing: Listing, forget: Sequence[Plugged]
) -> dict[SetKey, set[Elem]]:
    """The elements ports leaving the record had, as ``state`` numbered their chains."""
    forgotten: dict[SetKey, set[Elem]] = {k: set() for k in SETS}
    known = [p for p in forget if p.secured and all(k in state.chain_ids for k in render.chains(p.port))]
    for key, elems in _elements_of(render, known, state.chain_ids).items():
        forgotten[key] |= elems
    forgotten[OUT_LIMIT] = _limits_of(forget)
    bridges = {p.bridge for p in forget}
    forgotten[ZONES] = {e for e in listing.have(ZONES) if encoding.bridge_of(e) in bridges}
    return forgotten


def _extra_elements(
    listing: Listing, want: Mapping[SetKey, set[Elem]], forgotten: Mapping[SetKey, set[Elem]], prune: bool
) -> dict[SetKey, set[Elem]]:
    """The listed elements to delete. Without ``prune``: those of forgotten ports and bridges,
    and verdicts of chains that no port element, wanted or not, still names."""
    extra: dict[SetKey, set[Elem]] = {}
    for key, spec in SETS.items():
        have = listing.have(key)
        if prune:
            extra[key] = have - want[key]
        elif spec.holds != "chain":
            extra[key] = (have & forgotten[key]) - want[key]
    if not prune:
        kept = _ids_in_port_sets(listing, extra)
        for key, spec in SETS.items():
            if spec.holds == "chain":
                extra[key] = {e for e in listing.have(key) - want[key] if encoding.chain_id_of(e) not in kept}
    return extra


def _ids_in_port_sets(listing: Listing, extra: Mapping[SetKey, set[Elem]]) -> set[int]:
    """Chain numbers the port elements that stay still name."""
    return {
        n
        for key, spec in SETS.items()
        if spec.holds == "port"
        for e in listing.have(key) - extra[key]
        if (n := encoding.chain_id_of(e)) is not None
    }


def _chain_cmds(
    render: Renderer, listing: Listing, want_chains: Mapping[ChainKey, Rules], zones: Mapping[str, int]
) -> list[Command]:
    """Rule and zone chains that are missing or not as written, (re)written; rule chains
    without their map entry, which the element diff adds."""
    cmds: list[Command] = []
    for key, rules in want_chains.items():
        if listing.chain_tags.get(key) != render.chain_tag(rules):
            cmds += render.chain_body(*key, rules, exists=key in listing.chain_tags)
    for zone in zones.values():
        key = ("inet", encoding.zone_chain(zone))
        if listing.chain_tags.get(key) != render.chain_tag(render.zone_rules(zone)):
            cmds += render.zone_chain(zone, exists=key in listing.chain_tags)
    return cmds
