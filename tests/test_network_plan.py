"""The nftables planner without root: plain data in (ports, a listing, the kept state),
commands out. A small model of the two tables plays nft: it runs the planned commands and lists
what they leave, so that a plan can be checked by what it does, not by its text."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest

from fastcompute.errors import AgentError
from fastcompute.network.nft import encoding, plan
from fastcompute.network.nft.plan import Listing, TableState
from fastcompute.network.nft.render import Renderer
from fastcompute.network.ports import Plugged
from fastcompute.network.shaping import Shaping
from fastcompute.protocol.ports import Port

OWNER = "fcplan"
ZONES_FROM = 4096
ALLOW_ICMP = [{"id": "g1", "rules": [{"direction": "ingress", "protocol": "icmp"}, {"direction": "egress"}]}]
ALLOW_SSH = [{"id": "g2", "rules": [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
                                     "port_range_max": 22}]}]  # fmt: skip


def plugged(n: int, groups: list[dict[str, Any]] = ALLOW_ICMP, network: str = "net1", security: bool = True,
            shaping: Shaping | None = None) -> Plugged:
    port = msgspec.convert(
        {
            "id": f"port{n}",
            "mac": f"fa:16:3e:00:00:{n:02x}",
            "network": {"id": network},
            "fixed_ips": [{"ip": f"10.0.0.{n}", "prefix": 24}, {"ip": f"fd00::{n}", "prefix": 64}],
            "security_groups": groups if security else [],
            "port_security_enabled": security,
        },
        Port,
    )
    return Plugged(f"instance{n}", port, f"tap{n}", f"br-{network}", 1500, shaping)


class Tables:
    """What nft would hold after the commands: chains with their rules' comments, and sets."""

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str], list[str | None]] = {}
        self.sets: dict[tuple[str, str], set[Any]] = {}
        self.limits: set[str] = set()  # the bridge table's limit objects

    def run(self, cmds: list[dict[str, Any]]) -> None:
        for cmd in cmds:
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            if kind == "table":
                if verb == "delete":
                    self.chains = {k: v for k, v in self.chains.items() if k[0] != obj["family"]}
                    self.sets = {k: v for k, v in self.sets.items() if k[0] != obj["family"]}
                    self.limits = set() if obj["family"] == "bridge" else self.limits
                continue
            key = (obj["family"], obj.get("chain", obj.get("name")))
            if kind in ("set", "map"):
                self.sets[key] = set()
            elif kind == "chain":
                if verb == "add":
                    self.chains.setdefault(key, [])
                elif verb == "flush":
                    self.chains[key] = []
                else:
                    assert self.chains.pop(key) == [], f"{key} deleted with rules in it"
            elif kind == "rule":
                self.chains[key].append(obj.get("comment"))
            elif kind == "limit":
                if verb == "add":
                    self.limits.add(obj["name"])
                else:
                    named = {e[2] for e in self.sets.get(encoding.OUT_LIMIT, set())}
                    assert obj["name"] not in named, f"limit {obj['name']} deleted while an element names it"
                    self.limits.remove(obj["name"])
            else:
                elems = {encoding.from_json(e) for e in obj["elem"]}
                if verb == "add":
                    if key == encoding.OUT_LIMIT:
                        assert {e[2] for e in elems} <= self.limits, f"{elems} name missing limits"
                    self.sets[key] |= elems
                else:
                    assert elems <= self.sets[key], f"deleting {elems - self.sets[key]} not in {key}"
                    self.sets[key] -= elems

    def listing(self, render: Renderer) -> Listing:
        objs: list[dict[str, Any]] = []
        for (family, name), elems in self.sets.items():
            body = {"family": family, "name": name, "elem": [encoding.to_json(e) for e in elems]}
            objs.append({"set": body})
        objs += [{"limit": {"family": "bridge", "name": name}} for name in self.limits]
        for (family, name), comments in self.chains.items():
            objs.append({"chain": {"family": family, "name": name}})
            for comment in comments:
                rule = {"family": family, "chain": name}
                objs.append({"rule": rule if comment is None else {**rule, "comment": comment}})
        return plan.parse_listing(objs, render.base_tag)


def sync(
    tables: Tables, state: TableState, ports: list[Plugged], prune: bool = True, forget: list[Plugged] | None = None
) -> plan.SyncPlan:
    render = Renderer(OWNER)
    planned = plan.plan_sync(
        render, tables.listing(render), state, ports, zones_from=ZONES_FROM, prune=prune, forget=forget or []
    )
    tables.run(planned.cmds)
    return planned


def change(
    tables: Tables, state: TableState, adds: list[Plugged], removes: list[Plugged]
) -> tuple[list[Any], TableState]:
    cmds, after = plan.plan_change(Renderer(OWNER), state, adds, removes, ZONES_FROM)
    tables.run(cmds)
    return cmds, after


def rule_chains(tables: Tables) -> set[str]:
    return {name for family, name in tables.chains if name[:2] in ("e-", "i-")}


def rule_chain_cmds(cmds: list[dict[str, Any]]) -> int:
    """How many commands of a plan add, flush or delete a rule chain."""
    return sum(body["chain"]["name"][:2] in ("e-", "i-") for cmd in cmds for body in cmd.values() if "chain" in body)


def taps(tables: Tables) -> set[str]:
    return {tap for elem in tables.sets[("bridge", "port_mac")] if (tap := encoding.tap_of(elem))}


def test_empty_tables_are_built_whole_and_a_second_plan_changes_nothing() -> None:
    tables = Tables()
    ports = [plugged(1), plugged(2, ALLOW_SSH), plugged(3, security=False)]
    first = sync(tables, TableState(), ports)
    assert first.rebuilt and first.made_ports == ["port1", "port2"]
    assert taps(tables) == {"tap1", "tap2"}
    assert len(rule_chains(tables)) == 4
    assert first.state.zones == {"br-net1": ZONES_FROM}

    again = sync(tables, first.state, ports)
    assert again.cmds == [] and not again.rebuilt and again.made_ports == [] and again.removed_ports == []
    assert again.state == first.state


def test_a_damaged_port_alone_is_rewritten() -> None:
    tables = Tables()
    ports = [plugged(1), plugged(2, ALLOW_SSH)]
    built = sync(tables, TableState(), ports)
    ssh_ingress = next(k for k in Renderer(OWNER).chains(ports[1].port) if k[1].startswith("i-"))
    tables.chains[ssh_ingress] = []  # flushed behind our back
    tables.sets[("bridge", "port_ipv4")].discard(("tap1", "10.0.0.1"))

    repaired = sync(tables, TableState(), ports)  # a restart: nothing kept
    assert not repaired.rebuilt
    assert repaired.made_ports == ["port1", "port2"]
    assert repaired.state.chain_ids == built.state.chain_ids, "chains keep the numbers the tables give them"
    verbs = Counter((verb, kind) for cmd in repaired.cmds for verb, body in cmd.items() for kind in body)
    assert verbs[("add", "element")] == 1 and verbs[("flush", "chain")] == 1, repaired.cmds
    assert sync(tables, repaired.state, ports).cmds == []


def test_pruning_removes_a_stray_port_and_its_chains_and_keeps_the_rest() -> None:
    tables = Tables()
    kept, stray = plugged(1), plugged(2, ALLOW_SSH, network="net2")
    sync(tables, TableState(), [kept, stray])
    pruned = sync(tables, TableState(), [kept])
    assert pruned.removed_ports == ["tap2"]
    assert pruned.made_ports == []
    assert taps(tables) == {"tap1"}
    assert rule_chains(tables) == {name for _, name in Renderer(OWNER).chains(kept.port)}
    assert set(pruned.state.zones) == {"br-net1"}
    assert [name for _, name in tables.chains if name.startswith("zone-")] == [f"zone-{ZONES_FROM}"]


def test_without_pruning_ports_the_record_does_not_know_keep_their_rules() -> None:
    tables = Tables()
    known, forgotten, foreign = plugged(1), plugged(2, ALLOW_SSH), plugged(3, ALLOW_SSH)
    built = sync(tables, TableState(), [known, forgotten, foreign])
    # A record that knows only ``known``; ``forgotten`` was just unplugged.
    after = sync(tables, built.state, [known], prune=False, forget=[forgotten])
    assert taps(tables) == {"tap1", "tap3"}
    assert rule_chains(tables) == {name for p in (known, foreign) for _, name in Renderer(OWNER).chains(p.port)}
    ssh_ids = {built.state.chain_ids[k] for k in Renderer(OWNER).chains(foreign.port)}
    assert ssh_ids == after.state.foreign_ids, "the foreign chains' numbers are not given to new chains"


def test_changes_add_chains_with_their_first_user_and_drop_them_with_their_last() -> None:
    tables = Tables()
    state = sync(tables, TableState(), [plugged(1)]).state
    a, b = plugged(2, ALLOW_SSH), plugged(3, ALLOW_SSH, network="net2")
    cmds, state = change(tables, state, [a], [])
    assert rule_chain_cmds(cmds) == 4, "two chains, added and flushed"
    ids = dict(state.chain_ids)
    cmds, state = change(tables, state, [b], [])
    assert rule_chain_cmds(cmds) == 0, "b's chains are in use already"
    assert state.chain_ids == ids and state.zones == {"br-net1": ZONES_FROM, "br-net2": ZONES_FROM + 1}
    _, state = change(tables, state, [], [a])
    assert len(rule_chains(tables)) == 4
    _, state = change(tables, state, [], [b])
    assert len(rule_chains(tables)) == 2 and taps(tables) == {"tap1"}
    assert state.zones == {"br-net1": ZONES_FROM}, "net2's zone goes with its last port"
    assert sync(tables, state, [plugged(1)]).cmds == [], "the changes leave what a sync would"


def test_a_group_change_moves_the_port_between_chains_in_one_plan() -> None:
    tables = Tables()
    before = plugged(1)
    state = sync(tables, TableState(), [before]).state
    after = plugged(1, ALLOW_SSH)
    _, state = change(tables, state, [after], [before])
    assert rule_chains(tables) == {name for _, name in Renderer(OWNER).chains(after.port)}
    assert state.bridge_refs == Counter({"br-net1": 1})
    assert sync(tables, state, [after]).cmds == []


def test_a_bridge_keeps_the_zone_the_tables_give_it() -> None:
    listed = Tables()
    sync(listed, TableState(), [plugged(1), plugged(2, network="net2")])
    listing = listed.listing(Renderer(OWNER))
    zones = plan.wanted_zones(
        listing, TableState(), [plugged(3, network="net2"), plugged(4, network="net3")], ZONES_FROM
    )
    assert zones == {"br-net2": ZONES_FROM + 1, "br-net3": ZONES_FROM + 2}
    assert plan.wanted_zones(listing, TableState(), [plugged(1)], 0) == {}


def test_numbers_run_out_loudly() -> None:
    with pytest.raises(AgentError):
        plan.take_id(range(1, encoding.MAX_CHAIN_ID + 1))
    with pytest.raises(AgentError):
        plan.take_zone(range(65000, 65536), 65000)


def out_limits(tables: Tables) -> dict[str, tuple[int, int]]:
    """tap -> (rate, burst) of the outbound limits the tables hold; each object named once."""
    elems = tables.sets.get(encoding.OUT_LIMIT, set())
    named = [lim for e in elems if (lim := encoding.limit_of(e))]
    assert sorted(name for name, _, _ in named) == sorted(tables.limits), "no limit object without its element"
    return {tap: lim[1:] for e in elems if (tap := encoding.tap_of(e)) and (lim := encoding.limit_of(e))}


def test_outbound_limits_follow_their_ports_with_or_without_port_security() -> None:
    tables = Tables()
    a = plugged(1, shaping=Shaping(outbound_average=100))
    b = plugged(2, security=False, shaping=Shaping(outbound_average=200, outbound_burst=50))
    c, d = plugged(3), plugged(4, shaping=Shaping(inbound_average=10))  # no outbound limit
    state = sync(tables, TableState(), [a, c, d]).state
    assert out_limits(tables) == {"tap1": (100 * 1024, 100 * 1024)}, "a second's worth without a burst"
    _, state = change(tables, state, [b], [])
    assert out_limits(tables) == {"tap1": (100 * 1024, 100 * 1024), "tap2": (200 * 1024, 50 * 1024)}
    assert sync(tables, state, [a, b, c, d]).cmds == [], "the change leaves what a sync would"

    # A restart: b's limit went behind our back, a's flavor changed, c is no longer wanted.
    gone = next(e for e in tables.sets[encoding.OUT_LIMIT] if encoding.tap_of(e) == "tap2")
    tables.sets[encoding.OUT_LIMIT].discard(gone)
    a2 = plugged(1, shaping=Shaping(outbound_average=300))
    state = sync(tables, TableState(), [a2, b, d]).state
    assert out_limits(tables) == {"tap1": (300 * 1024, 300 * 1024), "tap2": (200 * 1024, 50 * 1024)}

    _, state = change(tables, state, [], [a2, b])
    assert out_limits(tables) == {} and tables.limits == set()
    assert sync(tables, state, [d]).cmds == []
