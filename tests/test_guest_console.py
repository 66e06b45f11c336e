"""Consoles of a real QEMU guest (TCG) through the agent's console proxy: an RFB session to
its VNC server (the ``RFB 003.008`` banner, a framebuffer update with the guest's screen),
a shell round trip on its serial console (which still logs to what ``instance.console``
returns), one-time and dead-with-the-instance tokens, and noVNC's own page in headless
Chromium, whose screenshot the test keeps (``.cache/artifacts/novnc-console.png``).

One guest, booted once, several checks on it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from agent_fixtures import AgentProcess, call_error, free_port
from guest_fixtures import READY, REPO, guest_image, libvirtd
from test_guest_agent import MEMORY_MB, agent_config, conn, console, guest_agent, wait_console
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

pytest.importorskip("libvirt")

pytestmark = pytest.mark.guest
__all__ = ["conn", "guest_agent", "guest_image", "libvirtd"]

ARTIFACTS = REPO / ".cache" / "artifacts"
NOVNC_DIR = Path("/usr/share/novnc")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def ws_of(url: str) -> str:
    """The websocket noVNC opens for a console page URL (``path`` on the page's host)."""
    parts = urlsplit(url)
    return f"ws://{parts.netloc}/{unquote(parse_qs(parts.query)['path'][0])}"


class Stream:
    """Bytes of a websocket as a stream (RFB does not respect message boundaries)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buf = b""

    def read(self, n: int, timeout_s: float = 30.0) -> bytes:
        while len(self.buf) < n:
            data = self.ws.recv(timeout=timeout_s)
            assert isinstance(data, bytes), data
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def rfb_session(ws: ClientConnection) -> tuple[int, int, bytes]:
    """An RFB 3.8 client's first steps: banner, no-auth security, init, one full framebuffer
    update in raw encoding. Returns the screen's width, height and the pixels of the update."""
    s = Stream(ws)
    assert s.read(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    types = s.read(s.read(1)[0])
    assert 1 in types, f"the guest's VNC server wants authentication: {list(types)}"
    ws.send(b"\x01")
    assert s.read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
    ws.send(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", s.read(4))
    bpp = s.read(16)[0]
    s.read(struct.unpack(">I", s.read(4))[0])  # the desktop's name
    ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # FramebufferUpdateRequest, full
    msg_type, _pad, rects = struct.unpack(">BBH", s.read(4))
    assert msg_type == 0, f"expected a FramebufferUpdate, got message type {msg_type}"
    pixels = b""
    for _ in range(rects):
        x, y, w, h, encoding = struct.unpack(">HHHHi", s.read(12))
        if encoding != 0:  # a pseudo-encoding (cursor, desktop size) carries no raw pixels here
            continue
        assert x + w <= width and y + h <= height
        pixels += s.read(w * h * bpp // 8)
    return width, height, pixels


def refused(url: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as exc, connect(url, open_timeout=30):
        pass
    return exc.value.response.status_code, exc.value.response.body


@contextlib.contextmanager
def chromium(workdir: Path) -> Iterator[str]:
    """Headless Chromium with its DevTools endpoint; the endpoint's HTTP base. Skips the
    test (saying why) only when Chromium is not installed or cannot start here."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    workdir.mkdir(parents=True, exist_ok=True)
    err = workdir / "chromium.log"
    # stderr to a file, not a pipe: Chromium keeps logging, and a pipe no one reads would stall it.
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "--window-size=1024,768",
             f"--user-data-dir={workdir / 'profile'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"DevTools listening on ws://([^/]+)/", err.read_text(errors="replace"))
            if m:
                yield f"http://{m[1]}"
                return
            time.sleep(0.1)
        pytest.skip("chromium cannot start here: " + err.read_text(errors="replace")[-1000:])
    finally:
        proc.kill()
        proc.wait()


class DevTools:
    """One page of a Chromium, driven through the DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    @staticmethod
    def page_socket(base: str) -> str:
        """The DevTools websocket of the browser's first page."""
        with urllib.request.urlopen(f"{base}/json/list", timeout=10) as r:
            return str(next(t for t in json.load(r) if t["type"] == "page")["webSocketDebuggerUrl"])

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == n:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    def eval(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, name: str) -> tuple[bytes, Path]:
        """The page as a PNG, also kept under ARTIFACTS as ``name``."""
        shot = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        kept = ARTIFACTS / name
        kept.write_bytes(shot)
        return shot, kept


@contextlib.contextmanager
def chromium_page(workdir: Path, url: str) -> Iterator[DevTools]:
    """A headless Chromium (``chromium``) showing ``url``, driven through DevTools."""
    with chromium(workdir) as base, connect(DevTools.page_socket(base), max_size=64 << 20,
                                            open_timeout=30) as devtools:
        tools = DevTools(devtools)
        tools.call("Page.enable")
        tools.call("Page.navigate", url=url)
        yield tools


# Non-black pixels of noVNC's canvas: what the guest shows, as the browser drew it.
LIT_PIXELS_JS = """(() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width) return -1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] | d[i + 1] | d[i + 2]) lit++;
  return lit;
})()"""


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the guests' serial sockets (a unix socket's path is short)."""
    d = Path(tempfile.mkdtemp(prefix="fcc-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def console_guest(guest_agent: Callable[..., AgentProcess], guest_image: Path, socket_dir: Path,
                  name: str) -> tuple[AgentProcess, int, str]:
    """An agent with consoles on (SPICE too, tokens for 120 s, the proxy on a free port) and a
    guest of the image spawned through it: the agent, the proxy's port, the guest's uuid."""
    port = free_port()
    agent = guest_agent(agent_config() + f'[console]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
                        f'socket_dir = "{socket_dir}"\ntoken_ttl_s = 120\nspice = true\n')
    rec = agent.call("instance.spawn", {
        "name": name, "flavor": {"vcpus": 1, "memory_mb": MEMORY_MB, "disk_gb": 1},
        "image": {"url": guest_image.as_uri()}, "wait": True,
    })
    return agent, port, rec["uuid"]


def test_a_real_guests_consoles_through_the_proxy(guest_agent: Callable[..., AgentProcess], conn: Any,
                                                  guest_image: Path, socket_dir: Path, tmp_path: Path) -> None:
    agent, port, uuid = console_guest(guest_agent, guest_image, socket_dir, "console")
    wait_console(agent, uuid, READY)

    # The domain: VNC on the console address with the port libvirt chose, the serial console
    # on a unix socket that still logs to the file instance.console reads.
    devices = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0)).find("devices")
    assert devices is not None
    vnc = devices.find("graphics[@type='vnc']")
    assert vnc is not None and vnc.get("listen") == "127.0.0.1" and int(vnc.get("port", "-1")) >= 5900
    # SPICE too (Debian's QEMU has it), on the same address, its port answering.
    spice = devices.find("graphics[@type='spice']")
    assert spice is not None and spice.get("listen") == "127.0.0.1"
    socket.create_connection(("127.0.0.1", int(spice.get("port", "-1"))), timeout=10).close()
    serial = devices.find("serial[@type='unix']")
    assert serial is not None
    assert serial.find("source").get("path") == str(socket_dir / f"{uuid}.sock")  # type: ignore[union-attr]
    assert serial.find("log").get("file") == str(agent.state_dir / "instances" / uuid / "console.log")  # type: ignore[union-attr]

    # noVNC: a page URL whose websocket the proxy relays to the guest's VNC server.
    got = agent.call("instance.get_console", {"uuid": uuid, "type": "novnc"})
    assert got["url"].startswith(f"http://127.0.0.1:{port}/vnc_lite.html?path=vnc%2F{uuid}%3Ftoken%3D")
    assert time.time() < got["expires_at"] <= time.time() + 120
    with connect(ws_of(got["url"]), subprotocols=["binary"], max_size=None, open_timeout=30) as ws:  # type: ignore[list-item]
        width, height, pixels = rfb_session(ws)
    assert width >= 640 and height >= 400
    assert pixels.strip(b"\x00"), "the guest's screen is all black"
    # One time only.
    assert refused(ws_of(got["url"])) == (403, b"unknown or already used console token\n")

    # The serial console: a shell round trip; what went through is in the log too.
    got = agent.call("instance.get_console", {"uuid": uuid, "type": "serial"})
    assert got["url"].startswith(f"ws://127.0.0.1:{port}/serial/{uuid}?token=")
    nonce = uuid_mod.uuid4().hex[:8]
    with connect(got["url"], open_timeout=30) as ws:
        ws.send(f"echo fc-$((6*7))-{nonce}\r")
        seen = b""
        deadline = time.monotonic() + 60
        while f"fc-42-{nonce}".encode() not in seen:
            assert time.monotonic() < deadline, f"no answer on the serial console: {seen[-500:]!r}"
            data = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            seen += data if isinstance(data, bytes) else data.encode()
    assert f"fc-42-{nonce}".encode() in console(agent, uuid)
    assert refused(got["url"])[0] == 403

    # A token opens its own instance's console only (and is spent by trying).
    got = agent.call("instance.get_console", {"uuid": uuid, "type": "novnc"})
    other = str(uuid_mod.uuid4())
    assert refused(ws_of(got["url"]).replace(uuid, other)) == (403, b"console token is for another console\n")
    assert refused(ws_of(got["url"]))[0] == 403

    # noVNC's own page in a browser, through the proxy: connected, the guest's screen drawn.
    if NOVNC_DIR.joinpath("vnc_lite.html").exists():
        page = agent.call("instance.get_console", {"uuid": uuid, "type": "novnc"})["url"]
        with chromium_page(tmp_path / "chromium", page) as tools:
            status, lit = "", -1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = str(tools.eval("document.getElementById('status')?.textContent || ''"))
                lit = int(tools.eval(LIT_PIXELS_JS) or -1)
                if status.startswith("Connected") and lit > 0:
                    break
                time.sleep(0.5)
            shot, kept = tools.screenshot("novnc-console.png")
            # noVNC names the desktop QEMU's VNC server announced: this guest's domain.
            assert status == f"Connected to QEMU (fc-{uuid})", f"noVNC says {status!r} (screenshot: {kept})"
            assert lit > 0, f"noVNC drew nothing of the guest's screen (screenshot: {kept})"
            assert shot.startswith(b"\x89PNG") and len(shot) > 2000
    else:
        pytest.fail(f"noVNC is not installed ({NOVNC_DIR}; Debian package novnc)")

    # Tokens die with the instance.
    late = agent.call("instance.get_console", {"uuid": uuid, "type": "serial"})["url"]
    assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}
    assert refused(late) == (403, b"unknown or already used console token\n")
    assert call_error(agent, "instance.get_console", {"uuid": uuid, "type": "novnc"}).code == "NOT_FOUND"
    assert not (socket_dir / f"{uuid}.sock").exists()
    assert os.listdir(socket_dir) == []


def spice_link(ws: ClientConnection, channel_type: int) -> tuple[int, int]:
    """Send a SPICE link message for a channel (1 = main, 2 = display) with no capabilities;
    the server's reply magic and, in its SpiceLinkReply, its error code (0 = linked)."""
    mess = struct.pack("<IBBIII", 0, channel_type, 0, 0, 0, 18)
    ws.send(struct.pack("<4sIII", b"REDQ", 2, 2, len(mess)) + mess)
    stream = Stream(ws)
    magic, _major, _minor, size = struct.unpack("<4sIII", stream.read(16))
    (error,) = struct.unpack("<I", stream.read(size)[:4])
    return int.from_bytes(magic, "little"), error


def test_a_real_guests_spice_console_through_the_proxy(guest_agent: Callable[..., AgentProcess],
                                                       guest_image: Path, socket_dir: Path, tmp_path: Path) -> None:
    """Debian's QEMU has SPICE and Debian packages spice-html5: get_console spice-html5 gives
    spice-html5's page on the proxy, whose websocket reaches the guest's SPICE server (a link
    message answered REDQ, linked); a second channel opens with the same token while the
    first is open, and the token is spent once both are closed; spice-html5's page in headless
    Chromium draws the guest's screen."""
    if not Path("/usr/share/spice-html5/spice_auto.html").exists():
        pytest.skip("spice-html5 is not installed (scripts/bootstrap.sh installs it)")
    agent, port, uuid = console_guest(guest_agent, guest_image, socket_dir, "spice")
    got = agent.call("instance.get_console", {"uuid": uuid, "type": "spice-html5"})
    assert got["url"].startswith(f"http://127.0.0.1:{port}/spice-html5/spice_auto.html?path=spice%2F{uuid}")
    with urllib.request.urlopen(got["url"].split("?")[0], timeout=10) as page:
        assert b"SpiceMainConn" in page.read(), "spice-html5's own page"
    url = ws_of(got["url"])
    redq = int.from_bytes(b"REDQ", "little")
    with connect(url, subprotocols=["binary"], open_timeout=30) as main:  # type: ignore[list-item]
        assert spice_link(main, 1) == (redq, 0)
        with connect(url, subprotocols=["binary"], open_timeout=30) as display:  # type: ignore[list-item]
            magic, _error = spice_link(display, 2)  # no main session id given: refused, but by SPICE
            assert magic == redq
    deadline = time.monotonic() + 10
    while refused(url)[0] != 403:
        assert time.monotonic() < deadline, "the spice token outlived its sessions"
        time.sleep(0.1)

    # spice-html5 itself in a browser, through the proxy: its channels (main, display, inputs,
    # cursor, ...) each a websocket with the one token, the guest's screen drawn on its canvas.
    wait_console(agent, uuid, READY)
    page = agent.call("instance.get_console", {"uuid": uuid, "type": "spice-html5"})["url"]
    with chromium_page(tmp_path / "chromium", page) as tools:
        lit = -1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lit = int(tools.eval(LIT_PIXELS_JS.replace("#screen canvas", "#spice-screen canvas")) or -1)
            if lit > 0:
                break
            time.sleep(0.5)
        _shot, kept = tools.screenshot("spice-html5-console.png")
        messages = str(tools.eval("document.getElementById('message-div')?.innerText || ''"))
        assert lit > 0, f"spice-html5 drew nothing of the guest's screen (screenshot: {kept}): {messages[-500:]}"
    agent.call("instance.delete", {"uuid": uuid})
