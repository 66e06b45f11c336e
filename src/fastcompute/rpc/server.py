"""The ZeroMQ face of the agent: ROUTER for requests, PUB for events, CURVE, idempotency.

Each request frame is decoded and validated (``protocol``), dispatched to its handler in a task
of its own (many in flight, replies in any order), and answered with the envelope it came
with, so DEALER and REQ clients both work. Replies to mutating ops are kept in the store for
the retention window: a retry with the same id gets the first reply, never a second execution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from fastcompute import protocol
from fastcompute.config import AgentConfig, SecurityConfig
from fastcompute.errors import AgentError, BadRequest, Busy
from fastcompute.store import Store

log = logging.getLogger("fastcompute.server")

Handler = Callable[[Any, str], Awaitable[Any]]
Observer = Callable[[str, float, str | None], None]
_TRANSIENT = frozenset({"BUSY", "HYPERVISOR_ERROR", "INTERNAL"})


def is_local_endpoint(endpoint: str) -> bool:
    """Whether an endpoint is reachable only from this machine (loopback, ipc, inproc)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _KeyRing:
    """ZAP credentials provider: admits only the configured client public keys."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            log.warning("refused a CURVE client with an unknown public key")
        return allowed


def load_client_keys(sec: SecurityConfig) -> set[bytes]:
    """The Z85 public keys allowed to connect, from the list and the key directory."""
    keys = {k.encode() for k in sec.client_public_keys}
    if sec.client_public_keys_dir:
        for path in sorted(Path(sec.client_public_keys_dir).glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            keys.add(public)
    return keys


class Server:
    """Binds the sockets and serves requests until closed."""

    def __init__(
        self,
        cfg: AgentConfig,
        security: SecurityConfig,
        store: Store,
        handlers: dict[str, Handler],
        observe: Observer | None = None,
    ) -> None:
        self.cfg = cfg
        self.security = security
        self.store = store
        self.handlers = handlers
        self.observe = observe
        self.ctx = zmq.asyncio.Context()
        # Plain (non-asyncio) sockets: the ROUTER is read when the loop sees its descriptor
        # change, and sends never block (no HWM on the ROUTER, NOBLOCK on the PUB). pyzmq's
        # asyncio wrapper costs a future per message, more than the send or receive itself.
        self.router: zmq.Socket[bytes] | None = None
        self.pub: zmq.Socket[bytes] | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._replies: dict[str, tuple[float, bytes | asyncio.Future[bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._accepting = True
        self._reading = False
        self.endpoints: dict[str, str] = {}

    # -- set-up ----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind ROUTER and PUB, with CURVE when a server key is configured."""
        sec = self.security
        curve = bool(sec.server_secret_key_file)
        if not curve:
            for ep in (self.cfg.control, self.cfg.events):
                if not is_local_endpoint(ep):
                    raise ValueError(
                        f"refusing to bind {ep} without CURVE: configure [security] keys "
                        "(fastcompute keys) or bind to loopback or ipc://"
                    )
        plain: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self.ctx.underlying)
        self.router = plain.socket(zmq.ROUTER)
        self.pub = plain.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        if curve:
            public, secret = zmq.auth.load_certificate(sec.server_secret_key_file)
            if secret is None:
                raise ValueError(f"{sec.server_secret_key_file} holds no secret key")
            self._auth = AsyncioAuthenticator(self.ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_KeyRing(load_client_keys(sec)))
            for sock in (self.router, self.pub):
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
        self.router.bind(self.cfg.control)
        self.pub.bind(self.cfg.events)
        self.endpoints = {
            "control": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            "events": self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
        }

    def remember(self, replies: dict[str, bytes]) -> None:
        """Take the stored replies of earlier runs (still within their window)."""
        expires = time.monotonic() + self.cfg.idempotency_window_s
        for rid, reply in replies.items():
            self._replies[rid] = (expires, reply)

    def start(self) -> None:
        """Start receiving requests."""
        assert self.router is not None
        asyncio.get_running_loop().add_reader(self.router.FD, self._drain)
        self._reading = True
        self._drain()

    # -- events ----------------------------------------------------------------------------

    def publish(self, topic: str, body: Any) -> None:
        """Publish one event: ``[topic, msgpack body]``."""
        if self.pub is None:
            return
        try:
            self.pub.send_multipart([topic.encode(), protocol.encode(body)], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event queue full; dropped %s", topic)

    # -- requests --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Serve every request already queued on the ROUTER.

        Called when the loop sees the socket's descriptor readable, and after every send:
        ZeroMQ's descriptor signals edges, and any operation on the socket may consume one, so
        the queue is emptied every time or a request could wait in it until another arrives.
        """
        router = self.router
        while router is not None and int(router.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                self._dispatch(router.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _dispatch(self, frames: list[bytes]) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(frames))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, frames: list[bytes]) -> None:
        envelope, body = frames[:-1], frames[-1]
        reply = await self.handle(body)
        if self.router is not None:
            try:
                self.router.send_multipart([*envelope, reply], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.info("could not deliver a reply: %s", exc)
            self._drain()

    async def handle(self, body: bytes) -> bytes:
        """The reply to one request frame (never raises)."""
        started = time.perf_counter()
        op = "<invalid>"
        rid = ""
        code: str | None = None
        try:
            if len(body) > self.cfg.max_frame_bytes:
                raise BadRequest(
                    f"request of {len(body)} bytes is over the {self.cfg.max_frame_bytes}-byte limit",
                    {"field": "<frame>", "reason": "too large"},
                )
            try:
                env = protocol.decode_envelope(body)
            except AgentError:
                rid = protocol.request_id_of(body)
                raise
            rid, op = env.id, env.op
            cached = self._replies.get(rid)
            if cached is not None:
                value = cached[1]
                return value if isinstance(value, bytes) else await asyncio.shield(value)
            if not self._accepting:
                raise Busy("the agent is shutting down; retry on its successor")
            if self._inflight >= self.cfg.max_inflight_requests:
                raise Busy(f"{self._inflight} requests are in flight, the most this agent takes; retry later")
            self._inflight += 1
            try:
                return await self._execute(rid, op, env.args)
            finally:
                self._inflight -= 1
        except AgentError as exc:
            code = exc.code
            return protocol.encode_error(rid, exc)
        except Exception:
            code = "INTERNAL"
            log.exception("internal error serving request %r (%s)", rid, op)
            return protocol.encode_error(rid, AgentError(f"internal error; see the agent log for request {rid!r}"))
        finally:
            if self.observe is not None:
                # Unknown ops are one label: a client must not grow the metrics without bound.
                label = op if op in protocol.OP_ARGS or op == "<invalid>" else "<unknown>"
                self.observe(label, time.perf_counter() - started, code)

    async def _execute(self, rid: str, op: str, raw: Any) -> bytes:
        args = protocol.decode_args(op, raw)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        expires = time.monotonic() + self.cfg.idempotency_window_s
        self._replies[rid] = (expires, fut)
        try:
            result = await self.handlers[op](args, rid)
        except AgentError as exc:
            reply = protocol.encode_error(rid, exc)
            if exc.code in _TRANSIENT:
                # A retry of a transient failure should run again, not replay the failure.
                self._replies.pop(rid, None)
                fut.set_result(reply)
            else:
                await self._remember(rid, op, reply, expires, fut)
            raise
        except BaseException:
            self._replies.pop(rid, None)
            fut.set_result(protocol.encode_error(rid, Busy("the request was interrupted; retry it")))
            raise
        reply = protocol.encode_ok(rid, result)
        await self._remember(rid, op, reply, expires, fut)
        return reply

    async def _remember(self, rid: str, op: str, reply: bytes, expires: float,
                        fut: asyncio.Future[bytes]) -> None:
        try:
            if op in protocol.MUTATING_OPS:
                await self.store.write([Store.put_reply(rid, reply, self.cfg.idempotency_window_s)])
        finally:
            self._replies[rid] = (expires, reply)
            fut.set_result(reply)

    def expire(self) -> None:
        """Forget replies past the retention window."""
        now = time.monotonic()
        for rid in [r for r, (exp, v) in self._replies.items() if exp < now and isinstance(v, bytes)]:
            del self._replies[rid]

    # -- shutdown --------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work (BUSY) and wait for the requests in flight."""
        self._accepting = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        """Close the sockets."""
        if self._reading and self.router is not None:
            asyncio.get_running_loop().remove_reader(self.router.FD)
            self._reading = False
        for sock in (self.pub, self.router):
            if sock is not None:
                sock.close(linger=500)
        self.router = self.pub = None
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

