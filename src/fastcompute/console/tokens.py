"""Console tokens, as Nova's console auth keeps them: random, one-time, with a TTL.

A token is 32 random bytes (URL-safe base64) handed to the client once, in its console URL.
The store keeps only its SHA-256, with the instance, the console type and the expiry; a
token is taken out of the store when it is presented, whatever comes of it, so it opens at
most one session. Tokens of an instance are deleted with the instance, and expired ones are
refused and swept.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

import msgspec

from fastcompute.store import Store


class Grant(msgspec.Struct, frozen=True):
    """What a redeemed token opens: one instance's console of one type."""

    uuid: str
    type: str


class Refused(Exception):
    """A presented token opens nothing (unknown, used, expired, or for another console)."""


def digest(token: str) -> bytes:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """Issues and redeems console tokens kept (hashed) in the store."""

    def __init__(self, store: Store, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock

    async def issue(self, uuid: str, type_: str) -> tuple[str, float]:
        """A new token for an instance's console of a type, and when it expires (Unix time);
        durable before it is returned."""
        token = secrets.token_urlsafe(32)
        expires = self.clock() + self.ttl_s
        await self.store.write([Store.put_console_token(digest(token), uuid, type_, expires)])
        return token, expires

    async def redeem(self, token: str, uuid: str, type_: str) -> Grant:
        """Take a token: the grant if it is for ``uuid``'s console of ``type_`` and not expired;
        Refused otherwise. Either way it can never be presented again."""
        taken = await self.store.take_console_token(digest(token))
        if taken is None:
            raise Refused("unknown or already used console token")
        got_uuid, got_type, expires = taken
        if expires < self.clock():
            raise Refused("console token expired")
        if (got_uuid, got_type) != (uuid, type_):
            raise Refused("console token is for another console")
        return Grant(got_uuid, got_type)
