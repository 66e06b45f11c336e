"""Netlink messages and attributes, for the few requests packed by hand (a tap's set-up in
``links``, conntrack dumps and deletes in ``conntrack``); everything else goes through
pyroute2."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Final, NoReturn

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
_NLA_TYPE_MASK: Final = 0x3FFF  # without the nested and byte-order flags


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One request: the message header (sent to the kernel, port 0), then ``body``."""
    return struct.pack("=LHHLL", 16 + len(body), kind, flags, seq, 0) + body


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence number, start of payload, end of message) of each message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = struct.unpack_from("=LHHLL", data, offset)
        yield kind, seq, offset + 16, offset + length
        offset += max((length + 3) & ~3, 16)


def error_of(data: bytes, start: int) -> int:
    """The errno of an NLMSG_ERROR message whose payload starts at ``start`` (0: an acknowledgement)."""
    (error,) = struct.unpack_from("=i", data, start)
    return -int(error)


def raise_error(errno_: int, what: str) -> NoReturn:
    """Raise the OSError of a refused request."""
    raise OSError(errno_, f"{what}: {os.strerror(errno_)}")


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header, payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, start of payload, end of payload) of each attribute in data[offset:end]."""
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & _NLA_TYPE_MASK, offset + 4, offset + length
        offset += (length + 3) & ~3
