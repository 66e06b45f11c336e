"""Clients of the agent: asyncio (many requests in flight on one DEALER) and a sync wrapper.

Replies are matched to requests by ``id``; an error reply raises the typed error of its code
(``fastcompute.errors``), so callers write ``except NoCapacity`` rather than parse codes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
import zmq.auth

from fastcompute import errors

_CODES: dict[str, type[errors.AgentError]] = {
    cls.code: cls
    for cls in (
        errors.BadRequest, errors.UnknownOp, errors.NotFound, errors.Conflict, errors.NoCapacity,
        errors.QuotaExceeded, errors.ImageError, errors.HypervisorError, errors.Busy, errors.Forbidden,
    )
}


class ClientTimeout(TimeoutError):
    """No reply within the client's timeout."""


# Requests and replies here are maps of any op: a client passes args and gets results as decoded
# MessagePack maps, whatever the op; the typed shapes live in fastcompute.protocol.
def error_from_reply(error: dict[str, Any]) -> errors.AgentError:
    """The typed exception for an error reply."""
    cls = _CODES.get(error.get("code", ""), errors.AgentError)
    return cls(str(error.get("message", "")), error.get("details"))


class Curve(msgspec.Struct, frozen=True):
    """Client-side CURVE settings: the agent's public key and this client's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str | Path, client_secret_file: str | Path) -> Curve:
        """Load keys written by ``fastcompute keys``."""
        server_public, _ = zmq.auth.load_certificate(server_key_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make a socket a CURVE client of the agent."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class Link:
    """Requests in flight on one DEALER socket, their replies matched by ``id``.

    The socket is driven as a plain one, read by the event loop's reader callback, which
    drains every reply already queued: zmq.asyncio costs a future and an event registration
    per send and per receive, most of a small request's cost in a storm of them. ZeroMQ's
    descriptor signals edges and any operation on the socket may consume one, so the queue is
    drained after every send too (as the agent's server does).
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        # A zmq.asyncio socket keeps its owner role (and its monitor); a plain shadow of it
        # does the I/O, so that the asyncio socket never registers with the loop itself.
        self.sock: zmq.Socket[Any] = zmq.Socket(sock) if isinstance(sock, zmq.asyncio.Socket) else sock
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()

    def send(self, rid: str, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send ``msg`` (whose id is ``rid``); the future of its reply map.

        Raises ``zmq.Again`` when the socket cannot take it now (no peer, with ZMQ_IMMEDIATE).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self.sock.FD, self._drain)
        self.sock.send(self._enc.encode(msg), zmq.NOBLOCK)
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[rid] = fut
        self._drain()
        return fut

    async def request(self, rid: str, op: str, args: dict[str, Any] | None, timeout_s: float,
                      peer: str) -> dict[str, Any]:
        """Send request ``rid`` of ``op`` and wait for its reply map (ok or not); ClientTimeout
        names ``peer`` after ``timeout_s``. Raises ``zmq.Again`` as :meth:`send` does."""
        msg: dict[str, Any] = {"v": 1, "id": rid, "op": op}
        if args:
            msg["args"] = args
        fut = self.send(rid, msg)
        timer = asyncio.get_running_loop().call_later(
            timeout_s, _expire, fut, f"no reply to {op} from {peer} within {timeout_s:.0f}s")
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiting.pop(rid, None)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every request in flight with ``exc`` (the peer is gone)."""
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)

    def _drain(self) -> None:
        sock = self.sock
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._dec.decode(frame)
                fut = self._waiting.pop(reply.get("id", ""), None)
            except (msgspec.DecodeError, AttributeError):
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def close(self) -> None:
        """Stop reading (the caller closes the socket it gave)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.FD)
        self._loop = None


class AsyncClient:
    """Talks to one agent over a DEALER socket; requests may overlap freely."""

    def __init__(self, endpoint: str, *, timeout_s: float = 60.0, curve: Curve | None = None,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ctx = context or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)
        self._prefix = os.urandom(8).hex() + "-"
        self._ids = itertools.count(1)
        self._link = Link(self.sock)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, op: str, args: dict[str, Any] | None = None, *,
                      request_id: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return the raw reply map (ok or not)."""
        rid = request_id or self._prefix + str(next(self._ids))
        return await self._link.request(rid, op, args, timeout_s or self.timeout_s, self.endpoint)

    async def call(self, op: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Send one request; return its result or raise its typed error."""
        reply = await self.request(op, args, **kw)
        if reply.get("ok"):
            return reply.get("result")
        raise error_from_reply(reply.get("error") or {})

    async def close(self) -> None:
        """Close the socket."""
        self._link.close()
        self.sock.close(linger=0)


def _expire(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(ClientTimeout(message))


class Client:
    """A blocking client for scripts and the CLI: one request at a time."""

    def __init__(self, endpoint: str, *, timeout_s: float = 60.0, curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(8).hex() + "-"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, args: dict[str, Any] | None = None, *, request_id: str | None = None) -> Any:
        """Send one request; return its result or raise its typed error."""
        rid = request_id or self._prefix + str(next(self._ids))
        msg: dict[str, Any] = {"v": 1, "id": rid, "op": op}
        if args:
            msg["args"] = args
        self.sock.send(msgspec.msgpack.encode(msg))
        while True:
            if not self.sock.poll(int(self.timeout_s * 1000)):
                raise ClientTimeout(f"no reply to {op} from {self.endpoint} within {self.timeout_s:.0f}s")
            reply = msgspec.msgpack.decode(self.sock.recv())
            if reply.get("id") == rid:
                break
        if reply.get("ok"):
            return reply.get("result")
        raise error_from_reply(reply.get("error") or {})

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)


async def subscribe(endpoint: str, topics: list[str], *, curve: Curve | None = None
                    ) -> AsyncIterator[tuple[str, Any]]:
    """Yield ``(topic, body)`` events from the agent's PUB socket."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    for t in topics or [""]:
        sock.setsockopt_string(zmq.SUBSCRIBE, t)
    sock.connect(endpoint)
    try:
        while True:
            topic, body = await sock.recv_multipart()
            yield topic.decode(), msgspec.msgpack.decode(body)
    finally:
        sock.close(linger=0)
