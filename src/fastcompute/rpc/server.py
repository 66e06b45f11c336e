"""The ZeroMQ face of the agent: ROUTER for requests, PUB for events, CURVE, idempotency.

Each request frame is decoded and validated (``protocol``), authorized (``rpc.auth``: the
client's key, the op, its args and the instance's project), dispatched to its handler in a
task of its own (many in flight, replies in any order), and answered with the envelope it came
with, so DEALER and REQ clients both work. Replies to mutating ops are kept, keyed by client
and request id, in the store and (within a byte budget, ``rpc.replies``) in memory for the
retention window: a retry with the same id gets the first reply, never a second execution.
What one connection may hold of the agent is bounded: requests in flight, queued requests and
queued replies (a peer that does not read loses replies, not the agent's memory).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
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
from fastcompute.rpc.auth import Policy, ProjectOf
from fastcompute.rpc.replies import Key, ReplyWindow
from fastcompute.store import Store, StoredReplies

log = logging.getLogger("fastcompute.server")

Handler = Callable[[Any, str], Awaitable[Any]]
Observer = Callable[[str, float, str | None], None]
_TRANSIENT = frozenset({"BUSY", "HYPERVISOR_ERROR", "INTERNAL"})
_CONTROL_DOMAIN = "control"
_EVENTS_DOMAIN = "events"
# Requests read from the ROUTER before the loop runs what they started.
_DRAIN_BATCH = 64
# Envelope frames are echoed in replies: routing ids (ZeroMQ caps them at 255 bytes), a REQ
# delimiter, and those of a few proxies in between.
_MAX_ENVELOPE_FRAMES = 16
_MAX_ENVELOPE_FRAME = 255


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
    """ZAP credentials provider: admits the configured client keys; on the event socket, only
    those that may read every project (PUB cannot filter what each subscriber gets)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.keys = {k.decode() for k in policy.keys}

    def callback(self, domain: str, key: bytes) -> bool:
        z85 = key.decode()
        if z85 not in self.keys:
            log.warning("refused a CURVE client with an unknown public key")
            return False
        if domain == _EVENTS_DOMAIN and not self.policy.may_subscribe(z85):
            log.warning("refused events to CURVE key %s: it may not read every project", z85)
            return False
        return True


def load_client_keys(sec: SecurityConfig) -> set[bytes]:
    """The Z85 public keys of the plain allow-list (admins), from the list and the key directory."""
    keys = {k.encode() for k in sec.client_public_keys}
    if sec.client_public_keys_dir:
        for path in sorted(Path(sec.client_public_keys_dir).glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            keys.add(public)
    return keys


def _project_unknown(_uuid: str) -> str | None:
    return None


class Server:
    """Binds the sockets and serves requests until closed; ``peers`` are the peer agents' keys
    (``[[migration.peers]]``) to their hosts."""

    def __init__(
        self,
        cfg: AgentConfig,
        security: SecurityConfig,
        store: Store,
        handlers: dict[str, Handler],
        observe: Observer | None = None,
        peers: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.security = security
        self.store = store
        self.handlers = handlers
        self.observe = observe
        self.policy = Policy.from_config(security, load_client_keys(security), peers)
        # The project of an instance (None: no such instance), for the policy; the agent sets it.
        self.project_of: ProjectOf = _project_unknown
        self.ctx = zmq.asyncio.Context()
        # Plain (non-asyncio) sockets: the ROUTER is read when the loop sees its descriptor
        # change, and sends never block (NOBLOCK; a peer over its queue loses the reply). pyzmq's
        # asyncio wrapper costs a future per message, more than the send or receive itself.
        self.router: zmq.Socket[bytes] | None = None
        self.pub: zmq.Socket[bytes] | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._window = ReplyWindow(cfg.idempotency_max_bytes)
        self._running: dict[Key, asyncio.Future[bytes] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._peers: dict[bytes, int] = {}
        self._accepting = True
        self._reading = False
        self._drain_due = False
        self._curve = bool(security.server_secret_key_file)
        self.dropped_replies = 0
        self._dropped_logged = 0.0
        self.endpoints: dict[str, str] = {}

    # -- set-up ----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind ROUTER and PUB, with CURVE when a server key is configured."""
        sec = self.security
        if not self._curve:
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
        # What the agent holds for one peer is bounded: its replies queue up to SNDHWM, then
        # sends fail at once (MANDATORY + NOBLOCK) and the reply is dropped; its requests queue
        # up to RCVHWM, then ZeroMQ stops reading its connection; a frame over MAXMSGSIZE
        # closes it.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, self.cfg.peer_send_queue)
        self.router.setsockopt(zmq.RCVHWM, self.cfg.peer_receive_queue)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        if self._curve:
            public, secret = zmq.auth.load_certificate(sec.server_secret_key_file)
            if secret is None:
                raise ValueError(f"{sec.server_secret_key_file} holds no secret key")
            self._auth = AsyncioAuthenticator(self.ctx)
            self._auth.start()
            ring = _KeyRing(self.policy)
            for domain in (_CONTROL_DOMAIN, _EVENTS_DOMAIN):
                self._auth.configure_curve_callback(domain=domain, credentials_provider=ring)
            for sock, domain in ((self.router, _CONTROL_DOMAIN), (self.pub, _EVENTS_DOMAIN)):
                sock.zap_domain = domain.encode()
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
        self.router.bind(self.cfg.control)
        self.pub.bind(self.cfg.events)
        self.endpoints = {
            "control": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            "events": self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
        }

    def remember(self, stored: StoredReplies) -> None:
        """Take the stored replies of earlier runs (still within their window)."""
        offset = time.monotonic() - time.time()
        for client, rid, reply, expires in stored.replies:
            self._window.put((client, rid), reply, expires + offset)
        if stored.left_out_until:
            self._window.spill(stored.left_out_until + offset)

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
        """Serve the requests queued on the ROUTER, a batch at a time.

        Called when the loop sees the socket's descriptor readable, and after every send:
        ZeroMQ's descriptor signals edges, and any operation on the socket may consume one, so
        the queue is emptied every time or a request could wait in it until another arrives.
        A batch is bounded, and the next one waits for the loop's next turn, so that the
        requests already taken (other peers' among them: ZeroMQ reads its peers in turn) run
        before more are read: a flood from one peer cannot push another's request back.
        """
        self._drain_due = False
        router = self.router
        copy = not self._curve
        for _ in range(_DRAIN_BATCH):
            if router is None or not int(router.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            self._accept(frames)
        if not self._drain_due:
            self._drain_due = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _accept(self, frames: list[Any]) -> None:
        if self._curve:
            # The client is its CURVE key (ZAP's User-Id), whatever connection it came on.
            client = str(frames[-1].get("User-Id")).encode()
            frames = [f.bytes for f in frames]
        else:
            # Without CURVE a client is the routing id it chose (ZMQ_ROUTING_ID); those ZeroMQ
            # makes up start with a zero byte and change on every connection: the anonymous client.
            client = frames[0] if frames[0][:1] not in (b"", b"\0") else b""
        envelope, body = frames[:-1], frames[-1]
        peer = envelope[0]
        if len(envelope) > 1 and (len(envelope) > _MAX_ENVELOPE_FRAMES
                                  or any(len(f) > _MAX_ENVELOPE_FRAME for f in envelope)):
            # The envelope is echoed in the reply: an oversized one is answered to the peer
            # alone, never sent back.
            self._refuse([peer], BadRequest(
                f"a request may come with at most {_MAX_ENVELOPE_FRAMES} envelope frames of at most "
                f"{_MAX_ENVELOPE_FRAME} bytes each", {"field": "<envelope>", "reason": "too large"}))
            return
        n = self._peers.get(peer, 0)
        if n >= self.cfg.max_inflight_per_peer:
            rid = protocol.request_id_of(body) if len(body) <= self.cfg.max_frame_bytes else ""
            self._refuse(envelope, Busy(f"{n} requests of this connection are in flight, the most one "
                                        "connection may have; read the replies, then retry"), rid)
            return
        self._peers[peer] = n + 1
        task = asyncio.get_running_loop().create_task(self._serve(envelope, body, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, envelope: list[bytes], error: AgentError, rid: str = "") -> None:
        self._send([*envelope, protocol.encode_error(rid, error)])
        if self.observe is not None:
            self.observe("<refused>", 0.0, error.code)

    def _send(self, frames: list[bytes]) -> None:
        if self.router is None:
            return
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # zmq.Again: the peer's queue is full (it does not read); EHOSTUNREACH: it is gone.
            self.dropped_replies += 1
            now = time.monotonic()
            if now - self._dropped_logged > 10.0:
                self._dropped_logged = now
                log.warning("dropped a reply (%s); %d so far", exc, self.dropped_replies)

    async def _serve(self, envelope: list[bytes], body: bytes, client: bytes) -> None:
        peer = envelope[0]
        try:
            reply = await self.handle(body, client)
        finally:
            n = self._peers.get(peer, 1) - 1
            if n:
                self._peers[peer] = n
            else:
                self._peers.pop(peer, None)
        self._send([*envelope, reply])
        if not self._drain_due:
            self._drain()

    async def handle(self, body: bytes, client: bytes = b"") -> bytes:
        """The reply to one request frame of ``client`` (never raises)."""
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
            key = (client, rid)
            cached = self._window.get(key)
            if cached is not None:
                return cached
            if key in self._running:
                running = self._running[key]
                if running is None:
                    running = self._running[key] = asyncio.get_running_loop().create_future()
                return await asyncio.shield(running)
            if not self._accepting:
                raise Busy("the agent is shutting down; retry on its successor")
            if self._inflight >= self.cfg.max_inflight_requests:
                raise Busy(f"{self._inflight} requests are in flight, the most this agent takes; retry later")
            self._inflight += 1
            try:
                return await self._execute(key, op, env.args)
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

    async def _execute(self, key: Key, op: str, raw: Any) -> bytes:
        client, rid = key
        args = protocol.decode_args(op, raw)
        grant = self.policy.grant(client)
        if not grant.admin or protocol.OPS[op].access == "peer":
            # Refusals are not remembered: they depend on the grants, not on the request.
            self.policy.authorize(grant, op, args, self.project_of)
        mutating = op in protocol.MUTATING_OPS
        # A repeat arriving while this runs waits for this reply (reads included; its future
        # is made only then); only the replies of mutating ops outlive their request.
        self._running[key] = None
        reply: bytes | None = None
        try:
            if mutating and self._window.spilled:
                reply = await self.store.get_reply(client, rid)
                if reply is not None:
                    return reply
            try:
                result = await self.handlers[op](args, rid)
            except AgentError as exc:
                reply = protocol.encode_error(rid, exc)
                # A retry of a transient failure should run again, not replay the failure.
                if mutating and exc.code not in _TRANSIENT:
                    await self._remember(key, reply)
                raise
            except BaseException:
                reply = protocol.encode_error(rid, Busy("the request was interrupted; retry it"))
                raise
            if not grant.admin:
                result = self.policy.visible(grant, op, result, self.project_of)
            reply = protocol.encode_ok(rid, result)
            if mutating:
                await self._remember(key, reply)
            return reply
        finally:
            waiter = self._running.pop(key, None)
            if waiter is not None:
                waiter.set_result(reply if reply is not None else protocol.encode_error(
                    rid, AgentError(f"internal error; see the agent log for request {rid!r}")))

    async def _remember(self, key: Key, reply: bytes) -> None:
        window = self.cfg.idempotency_window_s
        try:
            await self.store.write([Store.put_reply(key[0], key[1], reply, window)])
        finally:
            self._window.put(key, reply, time.monotonic() + window)

    def expire(self) -> None:
        """Forget replies past the retention window."""
        self._window.expire()

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

