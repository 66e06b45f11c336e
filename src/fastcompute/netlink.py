"""Netlink attributes, for the few requests packed by hand (a tap's set-up in ``network``,
conntrack deletes in ``conntrack``); everything else goes through pyroute2."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

_NLA_TYPE_MASK: Final = 0x3FFF  # without the nested and byte-order flags


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
