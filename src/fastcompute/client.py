"""Public client API (kept at this path): the clients live in ``rpc.client``."""

from fastcompute.rpc.client import (
    AsyncClient,
    Client,
    ClientTimeout,
    Curve,
    Link,
    error_from_reply,
    subscribe,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ClientTimeout",
    "Curve",
    "Link",
    "error_from_reply",
    "subscribe",
]
