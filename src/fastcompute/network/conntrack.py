"""Forgetting the tracked connections of addresses: what a port leaves behind in conntrack.

Conntrack keeps a flow for minutes (UDP) or days (an established TCP connection) after the
port that answered it is gone. A port that takes the address later would inherit the flow as
"established" and its packets would pass before any of the new port's rules. Deleting a
port's entries when it is unplugged closes that, as Neutron's agents do.

One dump per zone (the kernel filters by zone; it walks its whole hash table either way, about
10 ms here) and one delete request per matching entry, sent 128 at a time. The delete carries
the entry's original tuple exactly as the dump gave it, so every protocol and both address
families are deleted alike. pyroute2's conntrack socket rebuilds tuples from parsed fields
(TCP, UDP and ICMP only) and sends them without an address family, so this small request is
packed here, as ``links.RawLinks`` packs its one hot rtnetlink request.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Final

from fastcompute.network.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attr,
    attrs,
    error_of,
    message,
    messages,
    raise_error,
)

_NETLINK_NETFILTER: Final = 12
_NFNL_SUBSYS_CTNETLINK: Final = 1
_IPCTNL_MSG_CT_NEW: Final = 0
_IPCTNL_MSG_CT_GET: Final = 1
_IPCTNL_MSG_CT_DELETE: Final = 2
_CTA_TUPLE_ORIG: Final = 1
_CTA_ZONE: Final = 18
_CTA_TUPLE_IP: Final = 1
_CTA_IP_ADDRS: Final = frozenset({1, 2, 3, 4})  # v4 source, v4 destination, v6 source, v6 destination
# Deletes sent at once: each is answered with an acknowledgement, and a few hundred of those
# fill a netlink socket's default receive buffer (the kernel would drop the rest).
_DELETES_PER_SEND: Final = 128
_TIMEOUT_S: Final = 5.0


class Conntrack:
    """A ctnetlink socket that deletes the tracked connections of addresses, zone by zone."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(_TIMEOUT_S)  # a lost answer raises instead of stalling the caller
        self._seq = 0

    def forget(self, addresses: Mapping[int, Iterable[str]]) -> int:
        """Delete the entries whose original source or destination is one of the addresses of
        their zone (``{zone: [address, ...]}``); returns how many went."""
        gone = 0
        for zone, addrs in addresses.items():
            packed = {socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in addrs}
            if packed:
                gone += self._delete(zone, [(fam, tup) for fam, tup in self._dump(zone) if self._mentions(tup, packed)])
        return gone

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header(self, msg_type: int, flags: int, family: int, body: bytes) -> bytes:
        """A ctnetlink request: the message header, the nfnetlink header (family), ``body``."""
        self._seq += 1
        nfgen = struct.pack("=BBH", family, 0, 0)
        return message(_NFNL_SUBSYS_CTNETLINK << 8 | msg_type, flags, self._seq, nfgen + body)

    def _dump(self, zone: int) -> list[tuple[int, bytes]]:
        """(address family, original-tuple attribute) of every entry in ``zone``."""
        request = self._header(_IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, socket.AF_UNSPEC,
                               attr(_CTA_ZONE, struct.pack("!H", zone)))  # fmt: skip
        self._sock.send(request)
        entries: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(1 << 20)
            for kind, seq, start, end in messages(data):
                if seq != self._seq:
                    continue
                if kind == NLMSG_DONE:
                    return entries
                if kind == NLMSG_ERROR:
                    raise_error(error_of(data, start), "conntrack dump")
                if kind == _NFNL_SUBSYS_CTNETLINK << 8 | _IPCTNL_MSG_CT_NEW:
                    family = data[start]  # the nfnetlink header, then the attributes
                    for attr_type, a_start, a_end in attrs(data, start + 4, end):
                        if attr_type == _CTA_TUPLE_ORIG:
                            entries.append((family, data[a_start - 4 : a_end]))

    @staticmethod
    def _mentions(tuple_attr: bytes, packed: set[bytes]) -> bool:
        for kind, start, stop in attrs(tuple_attr, 4, len(tuple_attr)):
            if kind == _CTA_TUPLE_IP:
                return any(
                    a in _CTA_IP_ADDRS and tuple_attr[s:e] in packed for a, s, e in attrs(tuple_attr, start, stop)
                )
        return False

    def _delete(self, zone: int, entries: list[tuple[int, bytes]]) -> int:
        """Delete the entries, many per send; an entry that is already gone does not count."""
        return sum(
            self._delete_some(zone, entries[i : i + _DELETES_PER_SEND])
            for i in range(0, len(entries), _DELETES_PER_SEND)
        )

    def _delete_some(self, zone: int, entries: list[tuple[int, bytes]]) -> int:
        zone_attr = attr(_CTA_ZONE, struct.pack("!H", zone))
        requests = [self._header(_IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, fam, tup + zone_attr)
                    for fam, tup in entries]  # fmt: skip
        first = self._seq - len(requests) + 1
        self._sock.send(b"".join(requests))
        waiting = set(range(first, self._seq + 1))
        deleted = 0
        while waiting:
            data = self._sock.recv(1 << 16)
            for kind, seq, start, _ in messages(data):
                if kind == NLMSG_ERROR and seq in waiting:
                    waiting.discard(seq)
                    error = error_of(data, start)
                    if error == 0:
                        deleted += 1
                    elif error != errno.ENOENT:
                        raise_error(error, "conntrack delete")
        return deleted
