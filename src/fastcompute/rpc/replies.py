"""The retry window in memory: replies to mutating requests, keyed by (client, request id).

Bounded twice: by time (each reply expires after the idempotency window) and by bytes. When
the bytes run out, the oldest replies leave memory first; they are still in the store's
request log, and :attr:`ReplyWindow.spilled` tells the server to look a retry up there until
the last of them has expired.
"""

from __future__ import annotations

import time
from collections import OrderedDict

Key = tuple[bytes, str]

# What one entry costs besides its reply and key bytes: the tuple, the dict slot, the objects.
_ENTRY_OVERHEAD = 200


def entry_size(key: Key, reply: bytes) -> int:
    """The memory one remembered reply is counted for."""
    return len(reply) + len(key[0]) + len(key[1]) + _ENTRY_OVERHEAD


class ReplyWindow:
    """Remembered replies, oldest first, within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, tuple[float, bytes]] = OrderedDict()
        self._spilled_until = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> bytes | None:
        """The reply remembered for ``key``, if still in memory and unexpired."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    @property
    def spilled(self) -> bool:
        """Whether a reply still within its window was dropped from memory (read the store)."""
        return self._spilled_until >= time.monotonic()

    def put(self, key: Key, reply: bytes, expires: float) -> None:
        """Remember ``reply`` until ``expires`` (monotonic), dropping the oldest past the budget."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= entry_size(key, old[1])
        self._entries[key] = (expires, reply)
        self.bytes += entry_size(key, reply)
        while self.bytes > self.max_bytes and self._entries:
            k, (exp, r) = self._entries.popitem(last=False)
            self.bytes -= entry_size(k, r)
            self._spilled_until = max(self._spilled_until, exp)

    def spill(self, until: float) -> None:
        """Note that replies valid until ``until`` (monotonic) were left in the store only."""
        self._spilled_until = max(self._spilled_until, until)

    def expire(self) -> None:
        """Forget the replies past their window (they are oldest first)."""
        now = time.monotonic()
        entries = self._entries
        while entries:
            k, (exp, r) = next(iter(entries.items()))
            if exp >= now:
                break
            del entries[k]
            self.bytes -= entry_size(k, r)
