"""The console proxy: noVNC's and spice-html5's pages and websockets, relayed to guests' consoles.

One asyncio server on the agent's loop (the ``websockets`` library). A websocket to
``/vnc/{uuid}?token=T`` is relayed to the guest's VNC server (noVNC speaks RFB over it, in
binary frames), one to ``/serial/{uuid}?token=T`` to its serial console's unix socket, one to
``/spice/{uuid}?token=T`` to its SPICE server (spice-html5). The token is redeemed during the
HTTP handshake, before the upgrade: a refused one gets a 403 and no websocket. A SPICE client
opens a websocket per channel, each to the one URL: a spice-html5 token, once redeemed, also
opens further channels of its instance while one of its sessions is open.

A browser's websocket carries its page's ``Origin``: one that is not the proxy's own
(``base_url``'s) nor in ``allowed_origins`` is refused with a 403 before the token is looked
at, so a page elsewhere cannot use a leaked console URL (clients that are not browsers send no
``Origin`` and are let through, as Nova's proxy does). Every other GET is a file of noVNC
(``novnc_dir``), or under ``/spice-html5/`` of spice-html5 (``spice_html5_dir``), so the URL
``instance.get_console`` returns opens the console in a browser with nothing else to run. The
guests' consoles themselves listen on host-only addresses that clients never reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import mimetypes
import posixpath
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, quote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from fastcompute.config import ConsoleConfig
from fastcompute.console.tokens import Grant, Refused, Tokens, digest
from fastcompute.errors import AgentError, Conflict
from fastcompute.hypervisor.spec import ConsoleEndpoint, ConsoleKind
from fastcompute.protocol.schema import ConsoleUrl, InstanceRecord

log = logging.getLogger("fastcompute.console")

Locate = Callable[[str, ConsoleKind], Awaitable[ConsoleEndpoint]]
"""Where an instance's console of a kind is (the hypervisor driver's ``console_endpoint``)."""

# The op's console type -> the websocket path's first segment and the guest's console kind.
ROUTES: Final[dict[str, tuple[str, ConsoleKind]]] = {
    "novnc": ("vnc", "vnc"), "serial": ("serial", "serial"), "spice-html5": ("spice", "spice")}
# The URL path under which spice-html5's files are served (noVNC's are at the root).
SPICE_PREFIX: Final = "spice-html5/"
_TYPE_OF_SEGMENT: Final = {segment: type_ for type_, (segment, _kind) in ROUTES.items()}
_RUNNING: Final = frozenset({"active", "paused"})
_CHUNK: Final = 64 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """A URL's origin as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case,
    the scheme's default port left out; ValueError for what has no origin."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} has no http(s) origin")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = parts.port
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else "")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"[console] listen {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class ConsoleProxy:
    """Issues console URLs and serves them: noVNC's files, and the relays behind them."""

    def __init__(self, cfg: ConsoleConfig, tokens: Tokens, locate: Locate) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.locate = locate
        self.novnc_dir = Path(cfg.novnc_dir)
        self.spice_html5_dir = Path(cfg.spice_html5_dir)
        # A SPICE client opens a websocket per channel (main, display, inputs, cursor, ...),
        # each to the URL of the first: a spice-html5 token, redeemed by the main channel,
        # also opens the others while a session of it is open (token digest -> grant, sessions).
        self._spice: dict[bytes, tuple[Grant, int]] = {}
        self._spice_tokens: weakref.WeakKeyDictionary[ServerConnection, bytes] = weakref.WeakKeyDictionary()
        self._server: Server | None = None
        # Weak: a handshake that fails after its token was redeemed never reaches a session.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant] = weakref.WeakKeyDictionary()
        self.sessions = 0
        try:
            self._extra_origins = frozenset(origin_of(o) for o in cfg.allowed_origins)
        except ValueError as exc:
            raise ValueError(f"[console] allowed_origins: {exc}") from None

    @property
    def base_url(self) -> str:
        """The proxy as clients reach it (``base_url``, else ``http://`` + where it listens)."""
        if self.cfg.base_url:
            return self.cfg.base_url.rstrip("/")
        host, port = self.address
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the proxy listens on (the port the system chose for port 0)."""
        host, port = parse_listen(self.cfg.listen)
        if self._server is not None:
            port = self._server.sockets[0].getsockname()[1]
        return host, port

    @property
    def allowed_origins(self) -> frozenset[str]:
        """Origins whose pages may open a console: the proxy's own and ``allowed_origins``."""
        return self._extra_origins | {origin_of(self.base_url)}

    async def start(self) -> None:
        """Listen (an address in use stops the agent's start, naming it)."""
        host, port = parse_listen(self.cfg.listen)
        self._server = await serve(
            self._session, host, port, process_request=self._http,
            # noVNC may ask for the "binary" subprotocol; a serial client may ask for none.
            select_subprotocol=lambda _c, offered: Subprotocol("binary") if "binary" in offered else None,
            # RFB and a terminal's bytes are compressed already or tiny: deflate only costs CPU.
            compression=None, max_size=1 << 20, server_header=None,
        )
        log.info("console proxy at %s (noVNC from %s)", self.base_url, self.novnc_dir)

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- URLs -------------------------------------------------------------------------------

    async def get_console(self, rec: InstanceRecord, type_: str) -> ConsoleUrl:
        """``instance.get_console``: a URL with a fresh one-time token for a running instance
        whose console of that type exists (CONFLICT otherwise)."""
        if rec.vm_state not in _RUNNING or rec.task_state is not None:
            raise Conflict(f"instance {rec.uuid} is {rec.vm_state}"
                           + (f" ({rec.task_state})" if rec.task_state else "") + ": it has no console now",
                           {"vm_state": rec.vm_state, "task_state": rec.task_state})
        _segment, kind = ROUTES[type_]
        await self.locate(rec.uuid, kind)
        token, expires = await self.tokens.issue(rec.uuid, type_)
        return ConsoleUrl(rec.uuid, type_, self.url(rec.uuid, type_, token), expires)

    def url(self, uuid: str, type_: str, token: str) -> str:
        """The URL a client opens: noVNC's page for ``novnc``, spice-html5's for
        ``spice-html5``, a websocket for ``serial``."""
        segment, _kind = ROUTES[type_]
        base = self.base_url
        socket_path = f"{segment}/{uuid}?token={token}"
        if type_ == "serial":
            return "ws" + base.removeprefix("http") + "/" + socket_path
        # Both pages connect to ws(s)://{their page's host}/{path}, so a base_url below a path
        # (behind a reverse proxy) keeps that path in front.
        prefix = urlsplit(base).path.strip("/")
        path = quote(f"{prefix}/{socket_path}" if prefix else socket_path, safe="")
        if type_ == "novnc":
            return f"{base}/vnc_lite.html?path={path}"
        return f"{base}/{SPICE_PREFIX}spice_auto.html?path={path}"

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before any upgrade: check a websocket's origin and redeem its token, or serve a file
        of noVNC or spice-html5."""
        parts = urlsplit(request.path)
        segments = parts.path.strip("/").split("/")
        type_ = _TYPE_OF_SEGMENT.get(segments[0]) if len(segments) == 2 else None
        if type_ is None:
            return await self._file(connection, parts.path)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(http.HTTPStatus.UPGRADE_REQUIRED, "a console is a websocket\n")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin):
            log.warning("console connection to %s from origin %r refused", parts.path, origin[:200])
            return connection.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        token = (parse_qs(parts.query).get("token") or [""])[0]
        hashed = digest(token)
        channel = self._spice.get(hashed) if type_ == "spice-html5" else None
        if channel is not None and channel[0].uuid == segments[1]:
            self._grants[connection] = channel[0]
            self._spice_tokens[connection] = hashed
            return None
        try:
            grant = await self.tokens.redeem(token, segments[1], type_)
        except Refused as exc:
            log.info("console connection to %s refused: %s", parts.path, exc)
            return connection.respond(http.HTTPStatus.FORBIDDEN, f"{exc}\n")
        self._grants[connection] = grant
        if type_ == "spice-html5":
            self._spice_tokens[connection] = hashed
        return None

    def _origin_allowed(self, origin: str) -> bool:
        try:
            return origin_of(origin) in self.allowed_origins
        except ValueError:  # "null" (a sandboxed or file: page) and anything malformed
            return False

    async def _file(self, connection: ServerConnection, path: str) -> Response:
        clean = posixpath.normpath("/" + path).lstrip("/")
        if not clean or clean == ".":
            clean = "vnc_lite.html"
        root = self.novnc_dir
        if clean.startswith(SPICE_PREFIX):
            root, clean = self.spice_html5_dir, clean.removeprefix(SPICE_PREFIX)
        target = root / clean
        try:
            body = await asyncio.to_thread(target.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        ctype = mimetypes.guess_type(clean)[0] or "application/octet-stream"
        headers = Headers({"Content-Type": ctype, "Content-Length": str(len(body)),
                           "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
        return Response(http.HTTPStatus.OK, "OK", headers, body)

    # -- sessions -------------------------------------------------------------------------------

    async def _session(self, connection: ServerConnection) -> None:
        grant = self._grants.pop(connection)
        _segment, kind = ROUTES[grant.type]
        try:
            where = await self.locate(grant.uuid, kind)
            if where.path is not None:
                reader, writer = await asyncio.open_unix_connection(where.path)
            else:
                assert where.host is not None and where.port is not None
                reader, writer = await asyncio.open_connection(where.host, where.port)
        except (AgentError, OSError) as exc:
            reason = exc.message if isinstance(exc, AgentError) else f"cannot reach the console: {exc}"
            log.warning("console of %s: %s", grant.uuid, reason)
            await connection.close(1011, reason[:120])
            return
        self.sessions += 1
        spice_token = self._spice_tokens.pop(connection, None)
        if spice_token is not None:
            self._spice[spice_token] = (grant, self._spice.get(spice_token, (grant, 0))[1] + 1)
        log.info("console session to %s's %s opened", grant.uuid, kind)
        try:
            await _relay(connection, reader, writer)
        finally:
            self.sessions -= 1
            if spice_token is not None:
                _grant, left = self._spice.pop(spice_token)
                if left > 1:
                    self._spice[spice_token] = (grant, left - 1)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            log.info("console session to %s's %s closed", grant.uuid, kind)


async def _relay(connection: ServerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes both ways until either side ends; text frames (a terminal's keys) as UTF-8."""

    async def upstream() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in connection:
                writer.write(message.encode() if isinstance(message, str) else message)
                await writer.drain()

    async def downstream() -> None:
        while data := await reader.read(_CHUNK):
            await connection.send(data)

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, ConnectionClosed | OSError):
                log.error("console relay failed", exc_info=r)
        await connection.close()
