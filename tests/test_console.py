"""Console tokens and the console proxy, without a guest: real SQLite, real sockets on
127.0.0.1 and a unix socket, a fake RFB server standing in for a guest's VNC server.

The end-to-end checks against a real QEMU guest are in tests/test_guest_console.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import libvirt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fastcompute.compute.guest import consoles
from fastcompute.config import ConsoleConfig
from fastcompute.console import ConsoleProxy, Refused, Tokens
from fastcompute.errors import Conflict
from fastcompute.hypervisor.libvirt import consoles as live_consoles
from fastcompute.hypervisor.libvirt.xml import build
from fastcompute.hypervisor.spec import ConsoleEndpoint, ConsoleKind, GuestSpec
from fastcompute.protocol.schema import Flavor, Image, InstanceRecord
from fastcompute.store import Store

A = str(uuid_mod.uuid4())
B = str(uuid_mod.uuid4())


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _with_store(tmp_path: Path, body: Callable[[Store], Awaitable[None]]) -> None:
    store = Store(tmp_path / "fastcompute.sqlite")
    await store.open()
    try:
        await body(store)
    finally:
        await store.close()


def run(tmp_path: Path, body: Callable[[Store], Awaitable[None]]) -> None:
    asyncio.run(_with_store(tmp_path, body))


# -- tokens ----------------------------------------------------------------------------------

def test_a_token_opens_its_console_once(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        clock = Clock()
        tokens = Tokens(store, 600.0, clock)
        token, expires = await tokens.issue(A, "novnc")
        assert expires == clock.now + 600.0
        assert len(token) >= 43  # 32 random bytes, URL-safe base64
        grant = await tokens.redeem(token, A, "novnc")
        assert (grant.uuid, grant.type) == (A, "novnc")
        with pytest.raises(Refused, match="already used"):
            await tokens.redeem(token, A, "novnc")

    run(tmp_path, body)


def test_the_store_keeps_only_the_tokens_hash(tmp_path: Path) -> None:
    tokens_issued: list[str] = []

    async def body(store: Store) -> None:
        tokens = Tokens(store, 600.0)
        tokens_issued.append((await tokens.issue(A, "serial"))[0])

    run(tmp_path, body)
    token = tokens_issued[0]
    db = tmp_path / "fastcompute.sqlite"
    rows = sqlite3.connect(db).execute("SELECT hash, uuid, kind FROM console_tokens").fetchall()
    assert rows == [(hashlib.sha256(token.encode()).digest(), A, "serial")]
    for f in tmp_path.iterdir():
        assert token.encode() not in f.read_bytes(), f


def test_an_expired_token_is_refused_and_swept(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        clock = Clock()
        tokens = Tokens(store, 30.0, clock)
        late, _ = await tokens.issue(A, "novnc")
        swept, _ = await tokens.issue(A, "novnc")
        clock.now += 31.0
        with pytest.raises(Refused, match="expired"):
            await tokens.redeem(late, A, "novnc")
        await store.write([Store.expire_console_tokens(clock.now)])
        with pytest.raises(Refused, match="unknown"):
            await tokens.redeem(swept, A, "novnc")

    run(tmp_path, body)


def test_a_token_for_another_console_is_refused_and_spent(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        tokens = Tokens(store, 600.0)
        token, _ = await tokens.issue(A, "novnc")
        with pytest.raises(Refused, match="another console"):
            await tokens.redeem(token, B, "novnc")
        # Presented once, gone: not even its own console opens with it now.
        with pytest.raises(Refused, match="already used"):
            await tokens.redeem(token, A, "novnc")
        other_type, _ = await tokens.issue(A, "novnc")
        with pytest.raises(Refused, match="another console"):
            await tokens.redeem(other_type, A, "serial")

    run(tmp_path, body)


def test_tokens_die_with_their_instance(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        tokens = Tokens(store, 600.0)
        a1, _ = await tokens.issue(A, "novnc")
        a2, _ = await tokens.issue(A, "serial")
        b1, _ = await tokens.issue(B, "novnc")
        # What the manager's delete commits with the instance's row.
        await store.write([Store.delete_instance(A), Store.delete_console_tokens(A)])
        for t, kind in ((a1, "novnc"), (a2, "serial")):
            with pytest.raises(Refused, match="unknown"):
                await tokens.redeem(t, A, kind)
        assert (await tokens.redeem(b1, B, "novnc")).uuid == B

    run(tmp_path, body)


def test_concurrent_presentations_of_one_token_open_one_session(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        tokens = Tokens(store, 600.0)
        token, _ = await tokens.issue(A, "novnc")
        results = await asyncio.gather(*(tokens.redeem(token, A, "novnc") for _ in range(20)),
                                       return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in results) == 1
        assert all(isinstance(r, Refused) for r in results if isinstance(r, Exception))

    run(tmp_path, body)


# -- the domain's consoles -------------------------------------------------------------------

def _spec(tmp_path: Path, cfg: ConsoleConfig | None) -> GuestSpec:
    sock, graphics = consoles(A, cfg)
    return GuestSpec(uuid=A, name="c", project_id="p", vcpus=1, memory_mb=64,
                     console_path=str(tmp_path / "console.log"), console_socket=sock, graphics=graphics)


def test_with_consoles_on_a_guest_has_vnc_on_the_console_address_and_a_logged_serial_socket(
        tmp_path: Path) -> None:
    cfg = ConsoleConfig(enabled=True, address="127.0.0.1", spice=True, socket_dir=str(tmp_path / "s"))
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build(_spec(tmp_path, cfg)))
        try:
            live = dom.XMLDesc(0)
        finally:
            dom.undefine()
    finally:
        conn.close()
    devices = ET.fromstring(live).find("devices")
    assert devices is not None
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "unix"
    assert serial.find("source").get("path") == str(tmp_path / "s" / f"{A}.sock")  # type: ignore[union-attr]
    assert serial.find("source").get("mode") == "bind"  # type: ignore[union-attr]
    # The log instance.console reads is kept, appended to across QEMU processes.
    log = serial.find("log")
    assert log is not None and (log.get("file"), log.get("append")) == (str(tmp_path / "console.log"), "on")
    kinds = {g.get("type"): g for g in devices.findall("graphics")}
    assert set(kinds) == {"vnc", "spice"}
    for g in kinds.values():
        assert g.get("autoport") == "yes" and g.get("listen") == "127.0.0.1"
    # Defined, not running: no port yet, so no endpoint.
    with pytest.raises(Conflict, match="not running"):
        live_consoles.endpoint(live, "vnc", A)
    assert live_consoles.endpoint(live, "serial", A).path == str(tmp_path / "s" / f"{A}.sock")


def test_without_consoles_a_guest_has_its_serial_log_only(tmp_path: Path) -> None:
    xml = build(_spec(tmp_path, ConsoleConfig(enabled=False)))
    devices = ET.fromstring(xml).find("devices")
    assert devices is not None
    assert devices.find("graphics") is None
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "file"
    with pytest.raises(Conflict, match="no interactive serial console"):
        live_consoles.endpoint(xml, "serial", A)
    with pytest.raises(Conflict, match="no vnc console"):
        live_consoles.endpoint(xml, "vnc", A)


def test_a_running_domains_vnc_port_is_read_from_its_live_xml() -> None:
    live = ("<domain><devices><graphics type='vnc' port='5907' autoport='yes' listen='0.0.0.0'>"
            "<listen type='address' address='0.0.0.0'/></graphics></devices></domain>")
    assert live_consoles.endpoint(live, "vnc", A) == ConsoleEndpoint(kind="vnc", host="127.0.0.1", port=5907)


# -- the proxy -------------------------------------------------------------------------------

RFB_BANNER = b"RFB 003.008\n"


async def fake_rfb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The first steps of an RFB server: the banner, then the client's version echoed back
    with a marker, so a test sees bytes went both ways."""
    writer.write(RFB_BANNER)
    await writer.drain()
    version = await reader.readexactly(12)
    writer.write(b"GOT " + version)
    await writer.drain()
    await reader.read()
    writer.close()


def record(uuid: str, vm_state: str = "active") -> InstanceRecord:
    return InstanceRecord(uuid=uuid, name="c", project_id="p", host="h", flavor=Flavor(1, 64, 1),
                          image=Image(url="file:///x"), vm_state=vm_state, task_state=None,
                          power_state="running", numa=None, created_at="", updated_at="")


class World:
    """A proxy on 127.0.0.1 with a fake RFB server for instance A and an echoing unix socket
    as A's serial console; B exists but has no console."""

    def __init__(self, store: Store, tmp_path: Path, allowed_origins: tuple[str, ...] = ()) -> None:
        self.store = store
        self.tmp_path = tmp_path
        self.novnc = tmp_path / "novnc"
        self.novnc.mkdir()
        (self.novnc / "vnc_lite.html").write_text("<html>noVNC</html>")
        (tmp_path / "secret").write_text("not for clients")
        self.spice_html5 = tmp_path / "spice-html5"
        self.spice_html5.mkdir()
        (self.spice_html5 / "spice_auto.html").write_text("<html>spice-html5</html>")
        self.spice_port = 0
        self.rfb_port = 0
        self.serial_path = str(tmp_path / "serial.sock")
        self.clock = Clock()
        self.clock.now = time.time()
        self.tokens = Tokens(store, 60.0, self.clock)
        cfg = ConsoleConfig(enabled=True, listen="127.0.0.1:0", novnc_dir=str(self.novnc),
                            allowed_origins=list(allowed_origins), spice_html5_dir=str(self.spice_html5))
        self.proxy = ConsoleProxy(cfg, self.tokens, self.locate)

    async def locate(self, uuid: str, kind: ConsoleKind) -> ConsoleEndpoint:
        if uuid != A:
            raise Conflict(f"instance {uuid} has no {kind} console")
        if kind == "serial":
            return ConsoleEndpoint(kind="serial", path=self.serial_path)
        if kind == "spice":
            return ConsoleEndpoint(kind="spice", host="127.0.0.1", port=self.spice_port)
        return ConsoleEndpoint(kind="vnc", host="127.0.0.1", port=self.rfb_port)

    async def __aenter__(self) -> World:
        self.rfb = await asyncio.start_server(fake_rfb, "127.0.0.1", 0)
        self.rfb_port = self.rfb.sockets[0].getsockname()[1]

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(b"echo:" + data)
                await writer.drain()
            writer.close()

        self.serial = await asyncio.start_unix_server(echo, self.serial_path)

        async def spice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(b"spice:" + data)
                await writer.drain()
            writer.close()

        self.spice = await asyncio.start_server(spice, "127.0.0.1", 0)
        self.spice_port = self.spice.sockets[0].getsockname()[1]
        await self.proxy.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.proxy.close()
        self.rfb.close()
        self.serial.close()
        self.spice.close()

    def ws(self, url: str) -> str:
        """The websocket URL noVNC builds from a page URL (``path`` on the page's host)."""
        parts = urlsplit(url)
        if parts.scheme == "ws":
            return url
        path = unquote(parse_qs(parts.query)["path"][0])
        return f"ws://{parts.netloc}/{path}"


async def refused(url: str, origin: str | None = None) -> tuple[int, bytes]:
    """The HTTP status and body with which the proxy refuses a websocket to ``url``."""
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, origin=origin):  # type: ignore[arg-type]
            pass
    return exc.value.response.status_code, exc.value.response.body


def world_run(tmp_path: Path, body: Callable[[World], Awaitable[None]], allowed_origins: tuple[str, ...] = ()) -> None:
    async def outer(store: Store) -> None:
        async with World(store, tmp_path, allowed_origins) as w:
            await body(w)

    run(tmp_path, outer)


def test_novnc_url_relays_rfb_both_ways_once(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        reply = await w.proxy.get_console(record(A), "novnc")
        host, port = w.proxy.address
        assert reply.url.startswith(f"http://{host}:{port}/vnc_lite.html?path=vnc%2F{A}%3Ftoken%3D")
        assert reply.expires_at == w.clock.now + 60.0
        async with connect(w.ws(reply.url), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "binary"
            assert await ws.recv() == RFB_BANNER
            await ws.send(b"RFB 003.008\n")
            assert await ws.recv() == b"GOT RFB 003.008\n"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(w.ws(reply.url)):
                pass
        assert refused.value.response.status_code == 403
        assert b"already used" in refused.value.response.body

    world_run(tmp_path, body)


def test_serial_url_relays_text_and_bytes(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        reply = await w.proxy.get_console(record(A), "serial")
        assert reply.url.startswith(f"ws://127.0.0.1:{w.proxy.address[1]}/serial/{A}?token=")
        async with connect(reply.url) as ws:  # no subprotocol asked: a plain terminal client
            await ws.send("ls\r")
            assert await ws.recv() == b"echo:ls\r"
            await ws.send(b"\x03")
            assert await ws.recv() == b"echo:\x03"

    world_run(tmp_path, body)


def test_the_proxy_refuses_expired_foreign_and_missing_tokens(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        expired = await w.proxy.get_console(record(A), "novnc")
        w.clock.now += 61.0
        assert await refused(w.ws(expired.url)) == (403, b"console token expired\n")
        w.clock.now -= 61.0
        # A's token on B's path, and A's novnc token on A's serial path.
        for_a = await w.proxy.get_console(record(A), "novnc")
        assert await refused(w.ws(for_a.url).replace(A, B)) == (403, b"console token is for another console\n")
        for_a = await w.proxy.get_console(record(A), "novnc")
        assert await refused(w.ws(for_a.url).replace("/vnc/", "/serial/")) == (
            403, b"console token is for another console\n")
        assert (await refused(f"ws://127.0.0.1:{w.proxy.address[1]}/vnc/{A}"))[0] == 403
        assert w.proxy.sessions == 0

    world_run(tmp_path, body)


def test_get_console_needs_a_running_instance_with_that_console(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for state in ("stopped", "suspended", "building", "error"):
            with pytest.raises(Conflict, match=f"is {state}"):
                await w.proxy.get_console(record(A, state), "novnc")
        with pytest.raises(Conflict, match="no vnc console"):
            await w.proxy.get_console(record(B), "novnc")
        assert sqlite3.connect(w.tmp_path / "fastcompute.sqlite").execute(
            "SELECT count(*) FROM console_tokens").fetchone() == (0,)

    world_run(tmp_path, body)


async def get(port: int, path: str) -> bytes:
    """The proxy's answer to a plain GET of ``path`` (headers and body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read(4096)
    writer.close()
    return data


def test_the_proxy_serves_novnc_files_and_nothing_outside(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        port = w.proxy.address[1]
        page = await get(port, "/vnc_lite.html")
        assert page.startswith(b"HTTP/1.1 200") and page.endswith(b"<html>noVNC</html>")
        assert b"Content-Type: text/html" in page
        for path in ("/../secret", "/%2e%2e/secret", "/..%2fsecret", "/nothing.js"):
            answer = await get(port, path)
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer)
            assert b"not for clients" not in answer
        # A console path without an upgrade is no websocket, and spends no token.
        assert (await get(port, f"/vnc/{A}?token=x")).startswith(b"HTTP/1.1 426")

    world_run(tmp_path, body)


def test_base_url_behind_a_path_keeps_it_in_front_of_the_websocket(tmp_path: Path) -> None:
    cfg = ConsoleConfig(enabled=True, base_url="https://consoles.example.com/fc/")
    proxy = ConsoleProxy(cfg, Tokens(Any, 1.0), World.locate)  # type: ignore[arg-type]
    novnc = proxy.url(A, "novnc", "T")
    assert novnc == f"https://consoles.example.com/fc/vnc_lite.html?path=fc%2Fvnc%2F{A}%3Ftoken%3DT"
    assert proxy.url(A, "serial", "T") == f"wss://consoles.example.com/fc/serial/{A}?token=T"


def test_a_page_from_another_origin_cannot_open_a_console_and_spends_no_token(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        own = w.proxy.base_url
        reply = await w.proxy.get_console(record(A), "novnc")
        for foreign in ("http://evil.example", own.replace("http:", "https:"), own + "1", "null", "x"):
            assert await refused(w.ws(reply.url), foreign) == (403, b"origin not allowed\n"), foreign
        # The refusals spent nothing: the page's own origin (any case, default port spelled
        # or not) still opens the console with the same token.
        async with connect(w.ws(reply.url), origin=own.upper().replace("HTTP:", "http:")) as ws:  # type: ignore[arg-type]
            assert await ws.recv() == RFB_BANNER

    world_run(tmp_path, body)


def test_allowed_origins_widen_the_proxys_own(tmp_path: Path) -> None:
    cfg = ConsoleConfig(enabled=True, base_url="https://consoles.example.com/fc/",
                        allowed_origins=["https://Dashboard.example.com:443", "http://[::1]:8080"])
    proxy = ConsoleProxy(cfg, Tokens(Any, 1.0), World.locate)  # type: ignore[arg-type]
    assert proxy.allowed_origins == {"https://consoles.example.com", "https://dashboard.example.com",
                                     "http://[::1]:8080"}
    with pytest.raises(ValueError, match="allowed_origins"):
        ConsoleProxy(ConsoleConfig(allowed_origins=["dashboard.example.com"]), Tokens(Any, 1.0),
                     World.locate)  # type: ignore[arg-type]


def test_an_allowed_origin_opens_the_serial_console(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        reply = await w.proxy.get_console(record(A), "serial")
        async with connect(reply.url, origin="https://dashboard.example.com") as ws:  # type: ignore[arg-type]
            await ws.send("x")
            assert await ws.recv() == b"echo:x"

    world_run(tmp_path, body, ("https://dashboard.example.com",))


async def sessions(w: World, n: int) -> None:
    """Until the proxy holds ``n`` sessions (its side of one ends just after the client's)."""
    for _ in range(500):
        if w.proxy.sessions == n:
            return
        await asyncio.sleep(0.01)
    assert w.proxy.sessions == n


def test_a_spice_token_opens_every_channel_of_one_session_and_no_more(tmp_path: Path) -> None:
    """spice-html5 opens a websocket per SPICE channel, all to the URL of the first: while a
    session of the token is open its instance's further channels connect with it; once the last
    closes, the token is spent like any other."""
    async def body(w: World) -> None:
        reply = await w.proxy.get_console(record(A), "spice-html5")
        host, port = w.proxy.address
        assert reply.url.startswith(f"http://{host}:{port}/spice-html5/spice_auto.html?path=spice%2F{A}%3Ftoken%3D")
        url = w.ws(reply.url)
        async with connect(url, subprotocols=["binary"]) as main:  # type: ignore[list-item]
            await main.send(b"REDQ main")
            assert await main.recv() == b"spice:REDQ main"
            async with connect(url, subprotocols=["binary"]) as display:  # type: ignore[list-item]
                await display.send(b"REDQ display")
                assert await display.recv() == b"spice:REDQ display"
                # Not another instance's console, nor another type, with it.
                assert (await refused(url.replace(A, B)))[0] == 403
                assert (await refused(url.replace("/spice/", "/vnc/")))[0] == 403
            await sessions(w, 1)
            async with connect(url) as inputs:  # the main channel still holds the session
                await inputs.send(b"REDQ inputs")
                assert await inputs.recv() == b"spice:REDQ inputs"
        await sessions(w, 0)
        assert await refused(url) == (403, b"unknown or already used console token\n")

    world_run(tmp_path, body)


def test_the_proxy_serves_spice_html5_under_its_prefix(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        port = w.proxy.address[1]
        page = await get(port, "/spice-html5/spice_auto.html")
        assert page.startswith(b"HTTP/1.1 200") and page.endswith(b"<html>spice-html5</html>")
        assert (await get(port, "/spice_auto.html")).startswith(b"HTTP/1.1 404"), "not among noVNC's files"
        for path in ("/spice-html5/../secret", "/spice-html5/%2e%2e/secret", "/spice-html5/vnc_lite.html"):
            answer = await get(port, path)
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer)
            assert b"not for clients" not in answer

    world_run(tmp_path, body)
