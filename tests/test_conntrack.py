"""Forgetting tracked connections: entries made in the kernel's conntrack table, deleted by
zone and address (tests/test_network.py shows the same with real traffic, IPv4 and IPv6)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from pyroute2 import Conntrack as PyrouteConntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from fastcompute.network.conntrack import Conntrack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="conntrack needs root")

# Zones and addresses no other test or agent uses.
ZONE_A, ZONE_B = 60001, 60002
A, B, C, D, E = (f"10.203.0.{i}" for i in range(1, 6))


def _add(ct: PyrouteConntrack, src: str, dst: str, proto: int, zone: int, sport: int = 40000) -> None:
    icmp = {"icmp_id": 7, "icmp_type": 8, "icmp_code": 0}
    ports = icmp if proto == socket.IPPROTO_ICMP else {"sport": sport, "dport": 53}
    orig = NFCTAttrTuple(saddr=src, daddr=dst, proto=proto, **ports)
    reply = orig.reverse()
    if proto == socket.IPPROTO_ICMP:
        reply.icmp_type = 0
    ct.entry("add", tuple_orig=orig, tuple_reply=reply, timeout=60, zone=zone)


def _flows(ct: PyrouteConntrack, zone: int) -> set[tuple[str, str, int]]:
    return {(e.tuple_orig.saddr, e.tuple_orig.daddr, e.tuple_orig.proto) for e in ct.dump_entries(zone=zone)}


@pytest.fixture
def kernel() -> Iterator[PyrouteConntrack]:
    ct = PyrouteConntrack()
    try:
        yield ct
    finally:
        with Conntrack() as mine:
            mine.forget({ZONE_A: [A, B, C, D, E], ZONE_B: [A, B, C, D, E]})
        ct.close()


def test_forget_deletes_the_flows_of_an_address_in_its_zone_only(kernel: PyrouteConntrack) -> None:
    _add(kernel, A, B, socket.IPPROTO_UDP, ZONE_A)  # B answered A
    _add(kernel, B, E, socket.IPPROTO_TCP, ZONE_A)  # B called E
    _add(kernel, C, D, socket.IPPROTO_ICMP, ZONE_A)  # not B's
    _add(kernel, A, B, socket.IPPROTO_UDP, ZONE_B)  # the same addresses, another network
    with Conntrack() as ct:
        assert ct.forget({ZONE_A: [B]}) == 2
        assert ct.forget({ZONE_A: [B]}) == 0, "nothing left to forget"
    assert _flows(kernel, ZONE_A) == {(C, D, socket.IPPROTO_ICMP)}
    assert _flows(kernel, ZONE_B) == {(A, B, socket.IPPROTO_UDP)}



def test_forget_deletes_more_entries_than_one_send_carries(kernel: PyrouteConntrack) -> None:
    for sport in range(20000, 20300):
        _add(kernel, A, B, socket.IPPROTO_UDP, ZONE_A, sport)
    with Conntrack() as ct:
        assert ct.forget({ZONE_A: [A]}) == 300
    assert _flows(kernel, ZONE_A) == set()
