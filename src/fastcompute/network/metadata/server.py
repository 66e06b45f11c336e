"""The metadata service's listeners and HTTP answers, on the agent's event loop.

One listening socket per bridge with ports that have port security, bound to the bridge
(``SO_BINDTODEVICE``) on ``[metadata] address:port``; the agent's tables DNAT guests'
169.254.169.254:80 to it. The bridge a connection came in on is the listener that accepted it,
and the instance is the port of that bridge that owns the connection's source address (the
spoof chain drops a port's packets from any other address). Nothing the guest sends names the
instance. A socket bound to its bridge also sends its answers out of that bridge, on-link,
though the host has no route to the guests' networks.

HTTP/1.1 with keep-alive, GET only, request heads of at most ``max_request_bytes``, no bodies;
every answer is made on the loop from the documents the lookup returns.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, cast

import msgspec

from fastcompute.config import MetadataConfig

log = logging.getLogger(__name__)

# An instance's documents by path, as its config drive holds them (``compute.configdrive``'s
# ``instance_metadata``: ``openstack/<version>/meta_data.json``, ``ec2/latest/meta-data.json``...).
# The versions served are the ones the documents hold.
Documents = Mapping[str, bytes]

# (bridge, source address) -> the documents of the instance whose port that is, or None.
Lookup = Callable[[str, str], Mapping[str, bytes] | None]

_REASONS: Final = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                   405: "Method Not Allowed", 431: "Request Header Fields Too Large"}  # fmt: skip


def _listing(names: Iterable[str]) -> bytes:
    return "\n".join(names).encode()


def _ec2(tree: Any, parts: list[str]) -> bytes | None:
    """Walk the EC2 metadata (a JSON object) as Nova's EC2 paths do: objects list their keys
    (with a ``/`` after sub-objects), lists their lines, the rest is text."""
    node = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return _listing(k + "/" if isinstance(v, dict) else k for k, v in node.items())
    if isinstance(node, list):
        return _listing(str(v) for v in node)
    return str(node).encode()


def _versions(docs: Documents, tree: str) -> list[str]:
    return sorted({k.split("/")[1] for k in docs if k.startswith(tree + "/")}, key=lambda v: (v == "latest", v))


def answer(docs: Documents, path: str) -> bytes | None:
    """The body served at ``path`` from an instance's documents, or None (404)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts:
        return _listing([*_versions(docs, "ec2"), "openstack"])
    if parts[0] == "openstack":
        if len(parts) == 1:
            return _listing(_versions(docs, "openstack"))
        version = f"openstack/{parts[1]}/"
        if len(parts) == 2:
            return _listing(sorted(k.removeprefix(version) for k in docs if k.startswith(version))) \
                if any(k.startswith(version) for k in docs) else None
        return docs.get(version + "/".join(parts[2:]))
    ec2 = f"ec2/{parts[0]}/"
    if ec2 + "meta-data.json" not in docs:
        return None
    if len(parts) == 1:
        return _listing(["meta-data/", *(["user-data"] if ec2 + "user-data" in docs else [])])
    if parts[1] == "user-data" and len(parts) == 2:
        return docs.get(ec2 + "user-data")
    if parts[1] == "meta-data":
        return _ec2(msgspec.json.decode(docs[ec2 + "meta-data.json"]), parts[2:])
    return None


def _response(status: int, body: bytes, *, close: bool, head: bool = False, json: bool = False) -> bytes:
    kind = b"application/json" if json else b"text/plain; charset=utf-8"
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}".encode(),
        b"Content-Type: " + kind,
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close" if close else b"Connection: keep-alive",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class _Http(asyncio.Protocol):
    """One guest connection: requests answered in order, on the loop, from the lookup."""

    def __init__(self, service: MetadataService, bridge: str) -> None:
        self.service = service
        self.bridge = bridge
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = str(ipaddress.ip_address(peer[0])) if peer else ""
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.service.cfg.idle_timeout_s, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        limit = self.service.cfg.max_request_bytes
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n", 0, limit + 4)
            if end < 0:
                if len(self.buf) > limit:
                    self._send(_response(431, b"", close=True), close=True)
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self._arm()
            self._request(head)

    def _send(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def _request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        request = lines[0].split(b" ")
        if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
            self._send(_response(400, b"", close=True), close=True)
            return
        method, target, version = request
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"connection":
                close = value == b"close" or (close and value != b"keep-alive")
            elif (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
                # No request here has a body; one we would not read would desynchronise the stream.
                self._send(_response(400, b"", close=True), close=True)
                return
        if method not in (b"GET", b"HEAD"):
            self._send(_response(405, b"", close=True), close=True)
            return
        docs = self.service.lookup(self.bridge, self.peer)
        if docs is None:
            self.service.refused += 1
            self._send(_response(403, b"", close=True), close=True)
            return
        path = target.decode("ascii", "replace")
        body = answer(docs, path)
        is_head = method == b"HEAD"
        if body is None:
            self._send(_response(404, b"", close=close, head=is_head), close)
        else:
            self._send(_response(200, body, close=close, head=is_head, json=path.endswith(".json")), close)


class MetadataService:
    """The listeners of one agent: one per bridge it is told to serve.

    ``follow(network)`` keeps the served bridges those with ports that have port security; the
    listeners' address is put on each served bridge (and taken off when it is no longer
    served, or at :meth:`close`). ``lookup`` gives the documents of the instance that owns a
    (bridge, source address), or None, which is answered 403.
    """

    def __init__(self, cfg: MetadataConfig, lookup: Lookup) -> None:
        self.cfg = cfg
        self.lookup = lookup
        self.refused = 0  # requests answered 403: from no port's address
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._ipr: Any = None
        self._pending: asyncio.Task[None] | None = None
        self._wanted: set[str] = set()

    @property
    def bridges(self) -> set[str]:
        """The bridges served now."""
        return set(self._servers)

    def follow(self, network: Any) -> None:
        """Serve the bridges of ``network``'s secured ports, following every change to them."""

        def changed() -> None:
            self.want(network.secured_bridges())

        network.on_ports = changed
        changed()

    def want(self, bridges: Iterable[str]) -> None:
        """Serve exactly ``bridges`` (soon: the change runs as a task; see :meth:`settled`)."""
        wanted = set(bridges)
        if wanted == self._wanted:
            return
        self._wanted = wanted
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._sync())

    async def settled(self) -> None:
        """Wait until the bridges served are the ones last wanted."""
        while self._pending is not None and not self._pending.done():
            await asyncio.shield(self._pending)

    async def _sync(self) -> None:
        try:
            await self._sync_once()
        except Exception:
            log.exception("metadata: cannot serve bridges %s", sorted(self._wanted))

    async def _sync_once(self) -> None:
        loop = asyncio.get_running_loop()
        while set(self._servers) != self._wanted:
            wanted = set(self._wanted)
            add, drop = wanted - set(self._servers), set(self._servers) - wanted
            for bridge in drop:
                server = self._servers.pop(bridge)
                server.close()
            await loop.run_in_executor(None, self._addresses, add, drop)
            for bridge in add:
                try:
                    sock = self._socket(bridge)
                except OSError as exc:
                    # A bridge gone meanwhile (its last port unplugged): the next change retries.
                    log.warning("metadata: cannot listen on %s: %s", bridge, exc)
                    self._wanted.discard(bridge)
                    continue
                self._servers[bridge] = await loop.create_server(functools.partial(_Http, self, bridge), sock=sock)

    def _socket(self, bridge: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.cfg.address, self.cfg.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _addresses(self, add: Iterable[str], drop: Iterable[str]) -> None:
        """Put the listeners' address on bridges and take it off others (netlink, a worker)."""
        from pyroute2 import IPRoute

        if self._ipr is None:
            self._ipr = IPRoute()
        for bridge, verb in [*((b, "add") for b in add), *((b, "del") for b in drop)]:
            index = self._ipr.link_lookup(ifname=bridge)
            if not index:
                continue
            try:
                self._ipr.addr(verb, index=index[0], address=self.cfg.address, prefixlen=32, scope=253)
            except Exception as exc:  # pyroute2's NetlinkError: already there, or already gone
                if getattr(exc, "code", None) not in (errno.EEXIST, errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise

    async def close(self) -> None:
        """Stop listening and take the address off every served bridge."""
        self._wanted = set()
        await self.settled()
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close()
        await asyncio.get_running_loop().run_in_executor(None, self._addresses, (), list(servers))
        for server in servers.values():
            await server.wait_closed()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def documents_lookup(port_at: Callable[[str, str], tuple[str, str] | None],
                     documents: Callable[[str], Documents | None]) -> Lookup:
    """A lookup from the network's (bridge, address) -> (instance, port) and the instance's documents."""

    def lookup(bridge: str, address: str) -> Documents | None:
        owner = port_at(bridge, address)
        return None if owner is None else documents(owner[0])

    return lookup
