"""The link to the other agents instances move to and from (``[[migration.peers]]``).

An agent calls only the peers it lists, at the endpoints it lists, with its own CURVE key pair
and each peer's public key (so it knows whom it talks to); the peer admits the key as a
``peer`` (``rpc.auth``), which may call the ``migration.*`` ops and nothing else. A call to
this agent's own host (a resize on the same host) is served in process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import zmq.auth

from fastcompute.config import MigrationConfig, SecurityConfig
from fastcompute.errors import Busy, Forbidden
from fastcompute.rpc.client import AsyncClient, ClientTimeout, Curve

Local = Callable[[str, dict[str, Any]], Awaitable[Any]]


def peer_keys(cfg: MigrationConfig) -> dict[str, str]:
    """The peers' public keys (as configured) to their hosts, for the server's policy."""
    return {p.public_key: p.host for p in cfg.peers if p.public_key}


class Peers:
    """Calls to peer agents, one client each, made when first needed."""

    def __init__(self, cfg: MigrationConfig, security: SecurityConfig, hostname: str) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.endpoints = {p.host: p for p in cfg.peers}
        self._curve = bool(security.server_secret_key_file)
        self._pair = cfg.client_secret_key_file or security.server_secret_key_file
        self._clients: dict[str, AsyncClient] = {}
        self.local: Local | None = None

    def check(self, host: str) -> None:
        """FORBIDDEN unless ``host`` is this host or a listed peer."""
        if host != self.hostname and host not in self.endpoints:
            raise Forbidden(f"{host!r} is not a peer of this agent ([[migration.peers]])", {"peer": host})

    def _client(self, host: str) -> AsyncClient:
        client = self._clients.get(host)
        if client is None:
            peer = self.endpoints[host]
            curve = None
            if self._curve:
                server_public = (peer.public_key.encode() if len(peer.public_key) == 40
                                 else zmq.auth.load_certificate(peer.public_key)[0])
                public, secret = zmq.auth.load_certificate(self._pair)
                if secret is None:
                    raise ValueError(f"{self._pair} holds no secret key")
                curve = Curve(server_public, public, secret)
            client = self._clients[host] = AsyncClient(peer.control, timeout_s=self.cfg.call_timeout_s, curve=curve)
        return client

    async def call(self, host: str, op: str, args: dict[str, Any], timeout_s: float | None = None) -> Any:
        """Call ``op`` on peer ``host`` in this agent's name; its typed error, or BUSY when
        the peer does not answer in time (it may be down: the caller retries later)."""
        self.check(host)
        args = {**args, "peer": self.hostname}
        if host == self.hostname:
            assert self.local is not None
            # Through MessagePack, so that the caller gets what a remote peer would send.
            return msgspec.msgpack.decode(msgspec.msgpack.encode(await self.local(op, args)))
        try:
            return await self._client(host).call(op, args, timeout_s=timeout_s or self.cfg.call_timeout_s)
        except ClientTimeout as exc:
            raise Busy(f"peer {host} did not answer {op}: {exc}", {"peer": host}) from None

    async def close(self) -> None:
        """Close the clients."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
