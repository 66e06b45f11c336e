"""Ports, bridges and security groups, proven with real traffic between namespaces.

Every test builds its own world (unique nftables tables, bridge names and link tags) with
stand-in guests in namespaces (see network_fixtures) and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from network_fixtures import (
    EGRESS_ALL,
    Guest,
    Lab,
    elements,
    group,
    in_netns,
    link_names,
    links,
    make_lab,
    mentions,
    port,
    received,
    rule,
    rule_chains,
    run,
    run_together,
    sh,
    tables,
    udp_frame,
)

from fastcompute.errors import AgentError, BadRequest, Conflict, NotFound
from fastcompute.network import Network, NftError, decode_ports, sg_chain

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bridges, namespaces and nftables need root")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab() as made:
        yield made


def two_guests(lab: Lab, groups_a: list[dict], groups_b: list[dict], prefix: int = 24) -> tuple[Guest, Guest]:  # type: ignore[type-arg]
    pa, pb = port("10.0.0.1", groups=groups_a, prefix=prefix), port("10.0.0.2", groups=groups_b, prefix=prefix)
    plugged = run(lab.net.plug("11111111-1111-1111-1111-111111111111", [pa, pb]))
    return lab.guest_for(plugged[0], "10.0.0.1", prefix), lab.guest_for(plugged[1], "10.0.0.2", prefix)


def test_ping_and_tcp_pass_only_where_ingress_rules_allow(lab: Lab) -> None:
    a, b = two_guests(
        lab,
        [group(EGRESS_ALL, rule("ingress", "icmp"))],
        [group(EGRESS_ALL, rule("ingress", "tcp", 8080))],
    )
    assert b.ping(a.ip), "a allows ICMP in: b's ping must be answered"
    assert not a.ping(b.ip), "b allows no ICMP in: a's ping must get no answer"
    with b.listen(8080), b.listen(8081), a.listen(8080):
        conn = a.connect(b.ip, 8080)
        assert conn is not None, "b allows tcp 8080 in"
        conn.close()
        assert a.connect(b.ip, 8081) is None, "b does not allow tcp 8081 in"
        assert b.connect(a.ip, 8080) is None, "a does not allow tcp in"


def test_egress_is_denied_without_an_egress_rule(lab: Lab) -> None:
    a, b = two_guests(lab, [group(rule("ingress", "icmp"))], [group(EGRESS_ALL, rule("ingress", "icmp"))])
    assert not a.ping(b.ip), "a has no egress rule"
    assert b.ping(a.ip), "replies to allowed ingress leave through conntrack, not egress rules"


def test_tcp_22_from_a_prefix_lets_exactly_that_through(lab: Lab) -> None:
    only_ssh = group(EGRESS_ALL, rule("ingress", "tcp", 22, remote="10.0.0.0/24"))
    ports = [
        port("10.0.0.1", groups=[group(EGRESS_ALL)], prefix=16),
        port("10.0.0.2", groups=[only_ssh], prefix=16),
        port("10.0.1.3", groups=[group(EGRESS_ALL)], prefix=16),
    ]
    plugged = run(lab.net.plug("22222222-2222-2222-2222-222222222222", ports))
    inside, server, outside = (
        lab.guest_for(p, ip, 16) for p, ip in zip(plugged, ("10.0.0.1", "10.0.0.2", "10.0.1.3"), strict=True)
    )
    with server.listen(22), server.listen(23):
        conn = inside.connect(server.ip, 22)
        assert conn is not None, "tcp 22 from 10.0.0.0/24 is allowed"
        conn.close()
        assert inside.connect(server.ip, 23) is None, "tcp 23 is not"
        assert not inside.ping(server.ip), "ICMP is not"
        assert outside.connect(server.ip, 22) is None, "10.0.1.3 is outside 10.0.0.0/24"
    assert outside.ping(inside.ip) is False, "inside allows no ingress at all"


def test_spoofed_source_ip_and_mac_are_dropped(lab: Lab) -> None:
    a, b = two_guests(lab, [group(EGRESS_ALL)], [group(EGRESS_ALL, rule("ingress", "udp", 5000))])
    with b.listen(5000, socket.SOCK_DGRAM) as sink:
        a.raw_send(udp_frame(a.mac, b.mac, a.ip, b.ip, 5000, b"honest"))
        a.raw_send(udp_frame(a.mac, b.mac, "10.0.0.99", b.ip, 5000, b"forged-ip"))
        a.raw_send(udp_frame("fa:16:3e:00:00:99", b.mac, a.ip, b.ip, 5000, b"forged-mac"))
        a.raw_send(udp_frame(b.mac, b.mac, b.ip, b.ip, 5000, b"forged-both"))
        got = received(sink)
    assert got == [b"honest"]


def _answered(out: socket.socket, server: socket.socket, dst: tuple[str, int]) -> None:
    """A query from ``out`` to ``dst`` that ``server`` answers: conntrack then holds the flow."""
    out.sendto(b"query", dst)
    server.settimeout(1)
    _, sender = server.recvfrom(100)
    server.sendto(b"answer", sender)
    assert received(out) == [b"answer"], "the flow is allowed both ways"


def test_networks_with_the_same_addresses_do_not_share_connection_state(lab: Lab) -> None:
    # Two tenants' networks use the same addresses and MACs. Network A's answered UDP flow
    # must not let network B's identical packets in as "established": B's server allows no UDP.
    guests = {}
    for net, server_groups in (("netA", [group(EGRESS_ALL, rule("ingress", "udp", 53))]),
                               ("netB", [group(EGRESS_ALL, rule("ingress", "tcp", 22))])):  # fmt: skip
        client = port("10.0.0.1", network=net, groups=[group(EGRESS_ALL)])
        plugged = run(lab.net.plug(str(uuid.uuid4()), [client, port("10.0.0.2", network=net, groups=server_groups)]))
        guests[net] = (lab.guest_for(plugged[0], "10.0.0.1"), lab.guest_for(plugged[1], "10.0.0.2"))
    (a_client, a_server), (b_client, b_server) = guests["netA"], guests["netB"]
    with a_client.listen(5000, socket.SOCK_DGRAM) as a_out, a_server.listen(53, socket.SOCK_DGRAM) as a_in:
        _answered(a_out, a_in, (a_server.ip, 53))
        a_out.sendto(b"again", (a_server.ip, 53))
        assert received(a_in) == [b"again"]
        with b_client.listen(5000, socket.SOCK_DGRAM) as b_out, b_server.listen(53, socket.SOCK_DGRAM) as b_in:
            b_out.sendto(b"intruder", (b_server.ip, 53))
            assert received(b_in) == [], "network B's server allows no UDP in"
    with b_server.listen(22):
        conn = b_client.connect(b_server.ip, 22)
        assert conn is not None, "network B itself works"
        conn.close()


def _udp(guest: Guest, family: int, port_number: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port_number))
        return s

    return in_netns(guest.ns, make)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["IPv4", "IPv6"])
def test_a_port_taking_a_deleted_ports_address_does_not_inherit_its_connections(lab: Lab, family: int) -> None:
    # Conntrack keeps an answered flow for minutes (days for TCP). When the address goes to a new
    # port, the old flow's packets must be judged by the new port's rules, not let in as
    # "established".
    v6 = family == socket.AF_INET6
    ethertypes = ("IPv4", "IPv6")

    def guest(owner: str, ip4: str, ip6: str, *rules: dict[str, Any]) -> Guest:
        p = port(ip4, groups=[group(*(rule("egress", ethertype=e) for e in ethertypes), *rules)])
        p["fixed_ips"].append({"ip": ip6, "prefix": 64})
        made = lab.guest_for(run(lab.net.plug(owner, [p]))[0], ip4)
        sh("ip", "-n", made.ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        return made

    client = guest(str(uuid.uuid4()), "10.0.0.1", "fd00::1")
    server_ip = "fd00::2" if v6 else "10.0.0.2"
    old_owner = str(uuid.uuid4())
    old = guest(old_owner, "10.0.0.2", "fd00::2", *(rule("ingress", "udp", 53, ethertype=e) for e in ethertypes))
    with _udp(client, family, 5000) as out, _udp(old, family, 53) as server:
        _answered(out, server, (server_ip, 53))
        run(lab.net.unplug(old_owner))
        new = guest(str(uuid.uuid4()), "10.0.0.2", "fd00::2", rule("ingress", "icmp"))
        with _udp(new, family, 53) as sink:
            out.sendto(b"old flow", (server_ip, 53))
            assert received(sink) == [], "the new port allows no UDP in"
    assert client.ping(new.ip), "the new port itself works"


def _unrouted_subnet() -> tuple[str, str]:
    """Host and guest addresses in a /24 that no route of the host covers yet: the host's end
    goes on the test's bridge, and a second bridge with the same subnet (another run of this
    test on the host) would take the test's packets."""
    routes = json.loads(sh("ip", "-j", "route", "show").stdout)
    routed = [ipaddress.ip_network(r["dst"]) for r in routes if r["dst"] != "default"]
    while True:
        net = ipaddress.ip_network(f"10.{random.randrange(128, 255)}.{random.randrange(256)}.0/24")
        if not any(net.overlaps(r) for r in routed):
            return str(net[1]), str(net[2])


def test_the_host_and_a_port_talk_both_ways_through_the_bridge(lab: Lab) -> None:
    # The host's packets into a bridge take the bridge's conntrack zone as the replies coming
    # out of it do; were they in different zones, every reply would look like a new packet.
    host_ip, guest_ip = _unrouted_subnet()
    web = port(guest_ip, groups=[group(EGRESS_ALL, rule("ingress", "tcp", 8080))])
    plugged = run(lab.net.plug(str(uuid.uuid4()), [web]))
    guest = lab.guest_for(plugged[0], guest_ip)
    sh("ip", "addr", "add", f"{host_ip}/24", "dev", plugged[0].bridge)
    with guest.listen(8080) as server, socket.create_connection((guest.ip, 8080), timeout=2) as to_guest:
        accepted, _ = server.accept()
        with accepted:
            to_guest.sendall(b"ping")
            assert accepted.recv(10) == b"ping"
            accepted.sendall(b"pong")
            assert to_guest.recv(10) == b"pong"
    with socket.socket() as host_server:
        host_server.bind((host_ip, 0))
        host_server.listen(1)
        conn = guest.connect(host_ip, host_server.getsockname()[1], timeout=2)
        assert conn is not None, "the guest reaches the host"
        conn.close()


def _arp_request(sender_mac: str, sender_ip: str, target_ip: str) -> bytes:
    mac = bytes.fromhex(sender_mac.replace(":", ""))
    arp = bytes.fromhex("0001080006040001") + mac + socket.inet_aton(sender_ip) + bytes(6) + socket.inet_aton(target_ip)
    return b"\xff" * 6 + mac + b"\x08\x06" + arp


def _neighbour(ns: str, ip: str) -> list[dict]:  # type: ignore[type-arg]
    out: list[dict] = json.loads(sh("ip", "-n", ns, "-j", "neigh", "show", ip).stdout or "[]")  # type: ignore[type-arg]
    return out


def test_forged_arp_is_dropped(lab: Lab) -> None:
    a, b = two_guests(lab, [group(EGRESS_ALL)], [group(EGRESS_ALL)])
    # A request addressed to b makes b's kernel learn the sender: a claims 10.0.0.77, then itself.
    a.raw_send(_arp_request(a.mac, "10.0.0.77", b.ip))
    a.raw_send(_arp_request(a.mac, a.ip, b.ip))
    deadline = time.monotonic() + 1
    while not _neighbour(b.ns, a.ip) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [n["lladdr"] for n in _neighbour(b.ns, a.ip)] == [a.mac], "the honest request is learnt"
    assert _neighbour(b.ns, "10.0.0.77") == [], "the forged sender address is not"


def test_changing_groups_keeps_established_connections_and_blocks_new_ones(lab: Lab) -> None:
    a, b = two_guests(lab, [group(EGRESS_ALL)], [group(EGRESS_ALL, rule("ingress", "tcp", 7000))])
    with b.listen(7000) as server:
        conn = a.connect(b.ip, 7000)
        assert conn is not None
        peer, _ = server.accept()
        with conn, peer:
            conn.sendall(b"before")
            assert peer.recv(16) == b"before"
            run(lab.net.set_security_groups(b.plugged.port_id, [group(EGRESS_ALL, rule("ingress", "tcp", 7001))]))
            conn.sendall(b"after")
            peer.settimeout(2)
            assert peer.recv(16) == b"after", "the established connection survives the change"
            peer.sendall(b"back")
            conn.settimeout(2)
            assert conn.recv(16) == b"back"
        assert a.connect(b.ip, 7000) is None, "new connections follow the new rules"
    with b.listen(7001):
        fresh = a.connect(b.ip, 7001)
        assert fresh is not None, "the new rule allows tcp 7001"
        fresh.close()


def test_port_without_port_security_is_not_filtered(lab: Lab) -> None:
    pa, pb = port("10.0.0.1", security=False), port("10.0.0.2", groups=[group(EGRESS_ALL)])
    plugged = run(lab.net.plug("33333333-3333-3333-3333-333333333333", [pa, pb]))
    a, b = lab.guest_for(plugged[0], "10.0.0.1"), lab.guest_for(plugged[1], "10.0.0.2")
    assert b.ping(a.ip), "a has no port security: everything reaches it"
    assert not a.ping(b.ip), "b still denies ingress"
    assert not mentions(lab.owner, plugged[0].tap)
    assert mentions(lab.owner, plugged[1].tap)


def test_unplug_leaves_no_tap_rule_or_bridge_it_made(lab: Lab) -> None:
    instance = "44444444-4444-4444-4444-444444444444"
    ports = [port("10.0.0.1", groups=[group(EGRESS_ALL)]), port("10.0.0.2", groups=[group(EGRESS_ALL)])]
    before = lab.link_names(ports)
    plugged = run(lab.net.plug(instance, ports))
    lab.guest_for(plugged[0], "10.0.0.1")  # a veth in the tap's place goes the same way
    made = lab.link_names(ports) - before
    assert {p.tap for p in plugged} | {plugged[0].bridge} <= made
    assert len(rule_chains(lab.owner)) == 2, "ports with the same groups share one egress and one ingress chain"
    assert all(mentions(lab.owner, p.tap) for p in plugged)
    run(lab.net.unplug(instance))
    assert lab.link_names(ports) - before == set()
    assert rule_chains(lab.owner) == set()
    assert all(elems == [] for elems in elements(lab.owner).values()), elements(lab.owner)
    run(lab.net.unplug(instance))  # a retried delete is a no-op


def test_a_bridge_stays_while_another_instance_has_a_port_on_it(lab: Lab) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    a = lab.guest_for(run(lab.net.plug(first, [port("10.0.0.1", groups=[group(EGRESS_ALL)])]))[0], "10.0.0.1")
    icmp = [group(EGRESS_ALL, rule("ingress", "icmp"))]
    b = lab.guest_for(run(lab.net.plug(second, [port("10.0.0.2", groups=icmp)]))[0], "10.0.0.2")
    run(lab.net.unplug(first))
    assert a.plugged.tap not in link_names()
    assert links()[b.plugged.tap]["master"] == b.plugged.bridge, "the bridge and its other port stay"
    assert list(_zones(lab.owner)) == [b.plugged.bridge], "so does its zone"
    run(lab.net.unplug(second))
    assert b.plugged.bridge not in link_names() and _zones(lab.owner) == {}


def test_existing_bridge_is_used_and_kept(lab: Lab) -> None:
    bridge = lab.owner + "x"
    sh("ip", "link", "add", bridge, "type", "bridge")
    lab.extra_links.append(bridge)
    p = port("10.0.0.1", groups=[group(EGRESS_ALL)])
    p["network"]["bridge"] = bridge
    plugged = run(lab.net.plug("55555555-5555-5555-5555-555555555555", [p]))
    assert plugged[0].bridge == bridge
    master = json.loads(sh("ip", "-j", "link", "show", plugged[0].tap).stdout)[0]["master"]
    assert master == bridge
    run(lab.net.unplug("55555555-5555-5555-5555-555555555555"))
    assert bridge in link_names(), "a bridge the agent did not make is never removed"


@pytest.fixture
def nic() -> Iterator[str]:
    """A stand-in physical interface: one end of a veth pair (this kernel has no dummy driver)."""
    name = "fctphy" + os.urandom(2).hex()
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    try:
        yield name
    finally:
        sh("ip", "link", "del", name, check=False)


def _kernel_has_vlans(nic: str) -> bool:
    made = sh("ip", "link", "add", "link", nic, "name", nic + ".9", "type", "vlan", "id", "9", check=False)
    sh("ip", "link", "del", nic + ".9", check=False)
    return made.returncode == 0


def test_vlan_network_gets_a_sub_interface_on_the_physical_interface(nic: str) -> None:
    if not _kernel_has_vlans(nic):
        pytest.skip("this kernel has no 802.1Q support (CONFIG_VLAN_8021Q)")
    with make_lab(physical_interface=nic, default_mtu=1400) as lab:
        p = port("10.0.0.1", groups=[group(EGRESS_ALL)], vlan=101)
        plugged = run(lab.net.plug("66666666-6666-6666-6666-666666666666", [p]))
        vlan = json.loads(sh("ip", "-j", "-d", "link", "show", f"{nic}.101").stdout)[0]
        assert vlan["linkinfo"]["info_kind"] == "vlan"
        assert vlan["linkinfo"]["info_data"]["id"] == 101
        assert vlan["master"] == plugged[0].bridge
        assert plugged[0].mtu == 1400
        bridge = json.loads(sh("ip", "-j", "link", "show", plugged[0].bridge).stdout)[0]
        assert bridge["mtu"] == 1400
        run(lab.net.unplug("66666666-6666-6666-6666-666666666666"))
        assert not {f"{nic}.101", plugged[0].bridge, plugged[0].tap} & link_names()
        assert nic in link_names()


def test_vlan_port_fails_cleanly_on_a_kernel_without_vlans(nic: str) -> None:
    if _kernel_has_vlans(nic):
        pytest.skip("this kernel makes VLAN interfaces")
    with make_lab(physical_interface=nic) as lab:
        p = port("10.0.0.1", vlan=101)
        before = lab.link_names([p], names=[f"{nic}.101"])
        with pytest.raises(AgentError, match=r"802\.1Q"):
            run(lab.net.plug("66666666-6666-6666-6666-666666666666", [p]))
        assert lab.link_names([p], names=[f"{nic}.101"]) == before, "the bridge made for the port is rolled back"
        assert lab.net.plugged() == []


def test_vlan_port_without_physical_interface_is_a_bad_request(lab: Lab) -> None:
    with pytest.raises(BadRequest):
        run(lab.net.plug("77777777-7777-7777-7777-777777777777", [port("10.0.0.1", vlan=5)]))


def test_reconcile_removes_strays_remakes_missing_and_is_idempotent(lab: Lab) -> None:
    keep, drop = "88888888-8888-8888-8888-888888888888", "99999999-9999-9999-9999-999999999999"
    kept_ports = [port("10.0.0.1", groups=[group(EGRESS_ALL, rule("ingress", "icmp"))]), port("10.0.0.2", groups=[])]
    dropped = [port("10.0.0.3", groups=[group(EGRESS_ALL)], network="net2")]
    kept = run(lab.net.plug(keep, kept_ports))
    gone = run(lab.net.plug(drop, dropped))
    untouched = lab.owner + "t"
    sh("ip", "link", "add", untouched, "type", "bridge")  # not ours: no alias tag
    lab.extra_links.append(untouched)
    # Damage behind the agent's back: a kept tap, a kept port's chain and one of its elements.
    first = decode_ports(kept_ports)[0]
    damaged_chain = sg_chain(first.security_groups, "ingress")[0]
    sh("ip", "link", "del", kept[1].tap)
    sh("nft", "flush", "chain", "inet", lab.owner, damaged_chain)
    sh("nft", "delete", "element", "bridge", lab.owner, "port_mac", f"{{ {kept[0].tap} . {kept[0].mac} }}")
    lab.net.close()

    restarted = Network(lab.cfg)
    lab.net = restarted
    wanted = {keep: decode_ports(kept_ports)}
    report = run(restarted.reconcile(wanted))
    assert set(report.removed_links) == {gone[0].tap, gone[0].bridge}
    assert report.made_links == [kept[1].tap]
    assert report.made_ports == [kept_ports[0]["id"]], "only the damaged port's rules are rewritten"
    assert report.removed_ports == [gone[0].tap]
    names = link_names()
    assert {kept[0].tap, kept[1].tap, kept[0].bridge, untouched} <= names
    assert not {gone[0].tap, gone[0].bridge} & names
    assert not mentions(lab.owner, gone[0].tap)
    expected = {sg_chain(p.security_groups, d)[0] for p in decode_ports(kept_ports) for d in ("egress", "ingress")}
    assert rule_chains(lab.owner) == expected

    def owned() -> dict[str, tuple[Any, ...]]:
        """What a reconciliation could change of each link that could be the test's: not the
        carrier and operational state, which the kernel settles on its own meanwhile."""
        return {
            name: (link["ifindex"], link.get("master"), link["mtu"], link.get("address"), link.get("ifalias"),
                   link.get("group"), "UP" in link["flags"])
            for name, link in lab.links(kept_ports + dropped).items()
        }  # fmt: skip

    snapshot = tables(lab.owner), owned()
    again = run(restarted.reconcile(wanted))
    assert not again.changed, again
    assert (tables(lab.owner), owned()) == snapshot

    a, b = lab.guest_for(kept[0], "10.0.0.1"), lab.guest_for(kept[1], "10.0.0.2")
    assert b.ping(a.ip) is False, "b has no egress rule after reconciliation either"
    run(restarted.set_security_groups(b.plugged.port_id, [group(EGRESS_ALL)]))
    assert b.ping(a.ip), "the re-made ingress chain of a allows ICMP again"


def _zones(owner: str) -> dict[str, str]:
    """Bridge -> the chain that sets its conntrack zone, as the owner's zones map holds them."""
    return {bridge: verdict["jump"]["target"] for bridge, verdict in elements(owner).get("zones", [])}


def _zone_chains(owner: str) -> set[str]:
    names = (o.get("chain", {}).get("name", "") for o in tables(owner).get("inet", []))
    return {name for name in names if name.startswith("zone-")}


def test_each_bridge_keeps_its_zone_across_a_restart_and_loses_it_with_its_last_port(lab: Lab) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    pa, pb = port("10.0.0.1", groups=[group(EGRESS_ALL)]), port("10.0.0.1", network="net2", groups=[group(EGRESS_ALL)])
    a = run(lab.net.plug(first, [pa, port("10.0.0.2", security=False)]))
    b = run(lab.net.plug(second, [pb]))
    zones = _zones(lab.owner)
    assert set(zones) == {a[0].bridge, b[0].bridge} and len(set(zones.values())) == 2, zones
    assert _zone_chains(lab.owner) == set(zones.values())

    lab.net.close()
    restarted = Network(lab.cfg)
    lab.net = restarted
    # The restarted agent meets the second bridge first: it keeps the zone the tables give it
    # (its connections keep their state), and the first bridge's zone goes with its ports.
    run(restarted.reconcile({second: decode_ports([pb])}))
    assert _zones(lab.owner) == {b[0].bridge: zones[b[0].bridge]}
    assert _zone_chains(lab.owner) == {zones[b[0].bridge]}
    run(restarted.unplug(second))
    assert _zones(lab.owner) == {} and _zone_chains(lab.owner) == set()


def test_plugging_again_for_the_same_instance_is_a_no_op(lab: Lab) -> None:
    p = port("10.0.0.1", groups=[group(EGRESS_ALL)])
    first = run(lab.net.plug("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", [p]))
    chains = tables(lab.owner)
    assert run(lab.net.plug("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", [p])) == first
    assert tables(lab.owner) == chains


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.update(mac="fa:16:3e:00:00"), "networks[0].mac"),
        (lambda p: p.update(mac="01:00:5e:00:00:01"), "networks[0].mac"),
        (lambda p: p["fixed_ips"].append({"ip": "10.0.0.1", "prefix": 24}), "networks[0].fixed_ips[1].ip"),
        (lambda p: p["fixed_ips"].append({"ip": "10.0.0.300", "prefix": 24}), "networks[0].fixed_ips[1].ip"),
        (lambda p: p.update(security_groups=[group(rule("ingress", "bogus"))]),
         "networks[0].security_groups[0].rules[0].protocol"),
        (lambda p: p.update(security_groups=[group(rule("ingress", "tcp", 90, 80))]),
         "networks[0].security_groups[0].rules[0].port_range_min"),
        (lambda p: p.update(security_groups=[group(rule("ingress", "tcp", remote="2001:db8::/32"))]),
         "networks[0].security_groups[0].rules[0].remote_ip_prefix"),
        (lambda p: p.update(port_security_enabled=False, security_groups=[group()]), "networks[0].security_groups"),
        (lambda p: p.update(colour="blue"), "networks[0].colour"),
    ],
)  # fmt: skip
def test_invalid_ports_are_bad_requests_naming_the_field(lab: Lab, mutate: object, field: str) -> None:
    p = port("10.0.0.1")
    mutate(p)  # type: ignore[operator]
    with pytest.raises(BadRequest) as err:
        run(lab.net.validate([p]))
    assert err.value.details is not None
    assert err.value.details["field"] == field
    assert err.value.details["reason"]


def test_two_ports_with_one_address_on_a_network_are_a_bad_request(lab: Lab) -> None:
    with pytest.raises(BadRequest) as err:
        run(lab.net.validate([port("10.0.0.1"), port("10.0.0.1", mac="fa:16:3e:00:00:42")]))
    assert err.value.details == {"field": "networks[1].fixed_ips[0].ip", "reason": err.value.details["reason"]}
    run(lab.net.validate([port("10.0.0.1"), port("10.0.0.1", network="net2")]))  # other network: fine


def test_mac_or_ip_in_use_on_the_hosts_network_is_a_conflict(lab: Lab) -> None:
    run(lab.net.plug("bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb", [port("10.0.0.1")]))
    for clash in (port("10.0.0.1", mac="fa:16:3e:00:00:42"), port("10.0.0.9", mac="fa:16:3e:00:00:01")):
        with pytest.raises(Conflict):
            run(lab.net.validate([clash]))
        with pytest.raises(Conflict):
            run(lab.net.plug("cccccccc-cccc-cccc-cccc-cccccccccccc", [clash]))
    run(lab.net.validate([port("10.0.0.1", network="net2")]))


def test_another_agents_tables_on_the_host_do_not_judge_our_ports(lab: Lab) -> None:
    a, b = two_guests(lab, [group(EGRESS_ALL, rule("ingress", "icmp"))], [group(EGRESS_ALL)])
    with make_lab() as other:
        # Another owner's tables with a deny-all port of their own, on their own bridge.
        run(other.net.plug("dddddddd-dddd-dddd-dddd-dddddddddddd", [port("10.0.0.1", groups=[])]))
        assert b.ping(a.ip), "our rules still decide for our ports"
        assert not a.ping(b.ip)


def test_security_groups_of_an_unknown_port_are_not_found(lab: Lab) -> None:
    with pytest.raises(NotFound):
        run(lab.net.set_security_groups("no-such-port", [group(EGRESS_ALL)]))


def test_a_tap_name_taken_by_a_foreign_link_is_a_conflict_and_leaves_nothing(lab: Lab) -> None:
    p = port("10.0.0.1", groups=[group(EGRESS_ALL)])
    foreign = lab.net.tap_name(p["id"])
    sh("ip", "link", "add", foreign, "type", "bridge")  # someone else's link, no alias
    lab.extra_links.append(foreign)
    before = lab.link_names([p])
    assert foreign in before
    with pytest.raises(Conflict):
        run(lab.net.plug("eeeeeeee-eeee-eeee-eeee-eeeeeeeeeeee", [p]))
    assert lab.link_names([p]) == before, "the bridge made for the port is rolled back, the foreign link kept"
    assert not mentions(lab.owner, foreign)
    assert lab.net.plugged() == []


def test_plugs_and_unplugs_queued_together_run_as_batches_and_a_bad_one_fails_alone(lab: Lab) -> None:
    icmp = [group(EGRESS_ALL, rule("ingress", "icmp"))]
    instances = [f"{i:08d}-1111-1111-1111-111111111111" for i in range(12)]
    ports = [port(f"10.0.0.{i + 1}", groups=icmp) for i in range(12)]
    clash = port("10.0.0.1", mac="fa:16:3e:00:00:77", groups=icmp)  # ports[0]'s address, same batch
    not_a_bridge = port("10.0.0.99", network="netx", groups=icmp)
    not_a_bridge["network"]["bridge"] = "lo"  # fails while its links are made, in the worker
    everyone = [*ports, clash, not_a_bridge]
    before = lab.link_names(everyone)

    batches: list[tuple[str, int]] = []
    lab.net.on_batch = lambda kind, changes, seconds: batches.append((kind, changes))
    *good, clashed, broken = run_together(
        *(lab.net.plug(u, [p]) for u, p in zip(instances, ports, strict=True)),
        lab.net.plug("99999999-0000-0000-0000-000000000001", [clash]),
        lab.net.plug("99999999-0000-0000-0000-000000000002", [not_a_bridge]),
        errors=True,
    )
    assert batches == [("plug", 14)], "the 14 plugs, the two that fail among them, ran as one batch"
    assert isinstance(clashed, Conflict) and clashed.details is not None
    assert clashed.details["port_id"] == ports[0]["id"]
    assert isinstance(broken, Conflict), "lo is not a bridge"
    assert all(isinstance(r, list) and r[0].port_id == p["id"] for r, p in zip(good, ports, strict=True))
    assert {p.port_id for p in lab.net.plugged()} == {p["id"] for p in ports}
    assert not mentions(lab.owner, lab.net.tap_name(not_a_bridge["id"]))
    assert lab.net.tap_name(not_a_bridge["id"]) not in link_names()

    a, b, c = (lab.guest_for(good[i][0], f"10.0.0.{i + 1}") for i in range(3))  # type: ignore[index]
    assert a.ping(b.ip) and b.ping(c.ip)

    batches.clear()
    run_together(*(lab.net.unplug(u) for u in instances[:1] + instances[3:]))
    assert batches == [("unplug", 10)]
    assert {p.port_id for p in lab.net.plugged()} == {ports[1]["id"], ports[2]["id"]}
    assert lab.link_names(everyone) - before == {good[i][0].tap for i in (1, 2)} | {good[0][0].bridge}  # type: ignore[index]
    assert b.ping(c.ip), "the ports left keep their links and rules"
    assert not mentions(lab.owner, good[0][0].tap)  # type: ignore[index]
    run(lab.net.plug("99999999-0000-0000-0000-000000000001", [clash]))  # its address is free now
    run(lab.net.unplug("99999999-0000-0000-0000-000000000001"))
    run_together(lab.net.unplug(instances[1]), lab.net.unplug(instances[2]))
    assert lab.link_names(everyone) - before == set()
    assert rule_chains(lab.owner) == set()
    assert all(elems == [] for elems in elements(lab.owner).values()), elements(lab.owner)


def test_a_tap_a_dead_run_marked_for_deletion_survives_the_next_batch_of_unplugs(lab: Lab) -> None:
    owners = [f"{i:08d}-2222-2222-2222-222222222222" for i in range(3)]
    ports = [[port(f"10.0.0.{i + 1}", groups=[group(EGRESS_ALL)])] for i in range(3)]
    plugged = [run(lab.net.plug(u, p))[0] for u, p in zip(owners, ports, strict=True)]
    kept = plugged[0]
    # The run died between marking the tap with the doomed group and deleting the group.
    sh("ip", "link", "set", "dev", kept.tap, "group", str(lab.net.doomed_group))
    lab.net.close()
    lab.net = Network(lab.cfg)
    run(lab.net.reconcile({u: p for u, p in zip(owners, ports, strict=True)}))
    batches: list[tuple[str, int]] = []
    lab.net.on_batch = lambda kind, changes, seconds: batches.append((kind, changes))
    run_together(lab.net.unplug(owners[1]), lab.net.unplug(owners[2]))
    assert batches == [("unplug", 2)], "one batch: its taps are deleted by group"
    assert kept.tap in link_names(), "reconciliation took the wanted tap out of the doomed group"
    assert [p.port_id for p in lab.net.plugged()] == [ports[0][0]["id"]]


def test_concurrent_waves_of_changes_end_as_the_same_changes_one_by_one(lab: Lab) -> None:
    """Plugs, unplugs and group changes sent in waves of concurrent calls (so that they batch)
    give the answers and leave the ports, taps, set elements and chains that the same calls
    made one by one, in the order sent, would (a model of the host says what those are)."""
    rng = random.Random(20261124)
    instances = [f"{i:08d}-3333-3333-3333-333333333333" for i in range(5)]
    addresses = [f"10.0.0.{i}" for i in range(1, 9)]  # few, so that plugs collide
    rule_sets = [[group(EGRESS_ALL)], [group(EGRESS_ALL, rule("ingress", "icmp"))], [group(rule("ingress", "tcp", 22))]]
    model: dict[str, tuple[str, dict]] = {}  # port id -> (instance, the port as sent)

    def wave_of_calls() -> tuple[list[Any], list[type[BaseException] | None]]:
        calls: list[Any] = []
        expected: list[type[BaseException] | None] = []
        for _ in range(rng.randint(4, 9)):
            kind = rng.choice(["plug", "plug", "plug", "unplug", "unplug_port", "groups"])
            u = rng.choice(instances)
            if kind == "plug":
                p = port(rng.choice(addresses), groups=rng.choice(rule_sets))
                taken = any(q["fixed_ips"] == p["fixed_ips"] for _, q in model.values())
                if not taken:
                    model[p["id"]] = (u, p)
                calls.append(lab.net.plug(u, [p]))
                expected.append(Conflict if taken else None)
            elif kind == "unplug":
                for pid in [pid for pid, (owner, _) in model.items() if owner == u]:
                    del model[pid]
                calls.append(lab.net.unplug(u))
                expected.append(None)
            elif model:
                pid = rng.choice(sorted(model))
                owner, p = model[pid]
                if kind == "unplug_port":
                    del model[pid]
                    calls.append(lab.net.unplug(owner, [pid]))
                else:
                    model[pid] = (owner, dict(p, security_groups=rng.choice(rule_sets)))
                    calls.append(lab.net.set_security_groups(pid, model[pid][1]["security_groups"]))
                expected.append(None)
        return calls, expected

    for _ in range(10):
        calls, expected = wave_of_calls()
        for got, want in zip(run_together(*calls, errors=True), expected, strict=True):
            if want is None:
                assert not isinstance(got, BaseException), got
            else:
                assert isinstance(got, want), got
        assert {p.port_id for p in lab.net.plugged()} == set(model)
        taps = {lab.net.tap_name(pid) for pid in model}
        ours = {n for n, link in links().items() if (link.get("ifalias") or "").startswith(lab.owner + ":tap:")}
        assert ours == taps
        macs = {tuple(e["concat"]) for e in elements(lab.owner).get("port_mac", [])}
        assert macs == {(lab.net.tap_name(pid), p["mac"]) for pid, (_, p) in model.items()}
        decoded = decode_ports([p for _, p in model.values()])
        assert rule_chains(lab.owner) == {sg_chain(d.security_groups, way)[0] for d in decoded
                                          for way in ("egress", "ingress")}  # fmt: skip


def test_a_failing_batch_observer_does_not_stop_the_changes_behind_it(lab: Lab) -> None:
    def broken(kind: str, changes: int, seconds: float) -> None:
        raise RuntimeError("metrics are down")

    lab.net.on_batch = broken
    first, second = "aaaaaaaa-0000-0000-0000-000000000001", "aaaaaaaa-0000-0000-0000-000000000002"

    async def both() -> list[Any]:
        return await asyncio.gather(lab.net.plug(first, [port("10.0.0.1")]), lab.net.unplug(first),
                                    lab.net.plug(second, [port("10.0.0.2")]))  # fmt: skip

    run(asyncio.wait_for(both(), 30))
    assert [p.port_id for p in lab.net.plugged(second)] and not lab.net.plugged(first)


def test_plugs_whose_transaction_the_kernel_refuses_fail_and_leave_no_tap(lab: Lab) -> None:
    instances = [f"{i:08d}-4444-4444-4444-444444444444" for i in range(4)]
    first = port("10.0.0.1", groups=[group(EGRESS_ALL)])
    run(lab.net.plug(instances[0], [first]))
    refused = [port(f"10.0.0.{i + 2}", groups=[group(EGRESS_ALL)]) for i in range(len(instances[1:]))]
    before = lab.link_names([first, *refused])
    sh("nft", "delete", "table", "bridge", lab.owner)  # behind the agent's back

    results = run_together(*(lab.net.plug(u, [p]) for u, p in zip(instances[1:], refused, strict=True)), errors=True)
    assert all(isinstance(r, NftError) for r in results), results
    assert lab.link_names([first, *refused]) == before, "each refused plug took its tap back"
    assert [p.port_id for p in lab.net.plugged()] == [p.port_id for p in lab.net.plugged(instances[0])]
    run(lab.net.reconcile({instances[0]: [first]}))  # repairs the tables
    assert run(lab.net.plug(instances[1], [port("10.0.0.2", groups=[group(EGRESS_ALL)])]))
