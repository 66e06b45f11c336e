"""Image sources against hostile servers and requests, through the agent where it matters:
a trickling server, an image larger than the flavor, credentials in URLs, URLs outside the
allow-list, the tenant's Glance token, and a file:// path swapped for a symlink mid-fetch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import AgentProcess, spawn_args, wait_for_state

from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images import sources
from fastcompute.images.cache import ImageCache, ImageSpec
from fastcompute.images.sources import file as file_source

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Server:
    """A loopback image server: ``/trickle`` sends one byte a second, ``/huge`` streams zeros
    without a Content-Length, ``/img.raw`` a small image; it counts what it sent."""

    port: int = 0
    image: bytes = field(default_factory=lambda: os.urandom(MiB))
    sent: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    headers: list[dict[str, str]] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            server.hits[path] = server.hits.get(path, 0) + 1
            server.headers.append(dict(self.headers))
            try:
                self._serve(path)
            except OSError:
                server.closed.set()

        def _count(self, path: str, n: int) -> None:
            server.sent[path] = server.sent.get(path, 0) + n

        def _serve(self, path: str) -> None:
            if path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", str(16 * MiB))
                self.end_headers()
                for _ in range(600):
                    self.wfile.write(b"\x01")
                    self.wfile.flush()
                    self._count(path, 1)
                    time.sleep(1.0)
            elif path == "/huge":
                # 3 GiB of a raw image, with no Content-Length to go by.
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = bytes(4 * MiB)
                for _ in range(3 * GiB // len(chunk)):
                    self.wfile.write(chunk)
                    self._count(path, len(chunk))
            elif path == "/img.raw":
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.image)))
                self.end_headers()
                self.wfile.write(server.image)
            else:
                self.send_error(404)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    httpd.daemon_threads = True
    srv = Server(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(srv)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    httpd.shutdown()
    httpd.server_close()


def _spawn(agent: AgentProcess, url: str, name: str = "vm", **image: Any) -> str:
    args = spawn_args(Path("/unused"), name=name)
    args["image"] = {"url": url, **image} if url else image
    return str(agent.call("instance.spawn", args)["uuid"])


# ---- a trickling server ------------------------------------------------------------------------


def test_trickling_download_fails_at_the_minimum_rate(make_agent: Any, server: Server) -> None:
    agent: AgentProcess = make_agent(config="[images]\nread_timeout_s = 1.0\nmin_download_rate = 1024\n")
    started = time.monotonic()
    uuid = _spawn(agent, server.url("/trickle"))
    rec = wait_for_state(agent, uuid, "error", timeout_s=10)
    assert time.monotonic() - started < 6
    assert rec["fault"]["code"] == "IMAGE_ERROR" and "min_download_rate" in rec["fault"]["message"]


def test_trickling_download_fails_at_the_deadline(make_agent: Any, server: Server) -> None:
    # No minimum rate: the overall deadline alone ends it, whatever the read timeout.
    agent: AgentProcess = make_agent(
        config="[images]\nread_timeout_s = 5.0\nmin_download_rate = 0\ndownload_timeout_s = 2.0\n"
    )
    started = time.monotonic()
    uuid = _spawn(agent, server.url("/trickle"))
    rec = wait_for_state(agent, uuid, "error", timeout_s=10)
    assert time.monotonic() - started < 5
    assert rec["fault"]["code"] == "IMAGE_ERROR" and "download_timeout_s" in rec["fault"]["message"]


TRICKLE_FOREVER = "[agent]\nmax_concurrent_builds = 2\n[images]\nmin_download_rate = 0\nread_timeout_s = 60.0\n"


def test_downloads_do_not_starve_spawns_of_cached_images(
    make_agent: Any, server: Server, tmp_path: Path
) -> None:
    agent: AgentProcess = make_agent(config=TRICKLE_FOREVER + "max_concurrent_downloads = 8\n")
    img = tmp_path / "cached.raw"
    img.write_bytes(os.urandom(MiB))
    agent.call("instance.spawn", spawn_args(img, name="warm", wait=True))
    # Three times the build slots' worth of trickling downloads...
    trickling = [_spawn(agent, server.url(f"/trickle?{i}"), name=f"t{i}") for i in range(6)]
    time.sleep(0.5)
    # ...and a spawn of the cached image still gets a slot at once.
    started = time.monotonic()
    rec = agent.call("instance.spawn", spawn_args(img, name="cached", wait=True))
    assert rec["vm_state"] == "active"
    assert time.monotonic() - started < 5
    assert all(agent.call("instance.get", {"uuid": u})["vm_state"] == "building" for u in trickling)


def test_delete_and_sigterm_stop_a_trickling_download(make_agent: Any, server: Server) -> None:
    agent: AgentProcess = make_agent(config=TRICKLE_FOREVER)
    doomed = _spawn(agent, server.url("/trickle?a"), name="a")
    _spawn(agent, server.url("/trickle?b"), name="b")
    time.sleep(1.0)
    started = time.monotonic()
    assert agent.call("instance.delete", {"uuid": doomed})["deleted"] is True
    assert time.monotonic() - started < 3
    assert server.closed.wait(5), "the download's connection was left open"
    started = time.monotonic()
    assert agent.terminate(timeout_s=15) == 0
    assert time.monotonic() - started < 10


# ---- size, credentials, allow-list, token ----------------------------------------------------


def test_download_stops_at_the_flavor_size(make_agent: Any, server: Server) -> None:
    agent: AgentProcess = make_agent()
    uuid = _spawn(agent, server.url("/huge"))  # a 1 GiB flavor, a 3 GiB image
    rec = wait_for_state(agent, uuid, "error", timeout_s=60)
    assert rec["fault"]["code"] == "IMAGE_ERROR" and "above the limit" in rec["fault"]["message"]
    time.sleep(0.5)
    assert server.sent["/huge"] < GiB + 64 * MiB


def test_credentials_in_urls_are_never_written_down(make_agent: Any, server: Server) -> None:
    agent: AgentProcess = make_agent()
    url = f"http://alice:pa55word@127.0.0.1:{server.port}/img.raw?X-Signature=s1gnature"
    uuid = _spawn(agent, url)
    wait_for_state(agent, uuid, "active")
    assert server.headers[-1].get("Authorization", "").startswith("Basic ")
    [base] = agent.call("images.list")
    assert base["source"] == f"http://***@127.0.0.1:{server.port}/img.raw?***"
    written = agent.log() + "".join(p.read_text() for p in (agent.state_dir / "_base").glob("*.json"))
    assert "pa55word" not in written and "s1gnature" not in written
    # A failing download's message is redacted too.
    bad = _spawn(agent, f"http://alice:pa55word@127.0.0.1:{server.port}/missing?sig=s1gnature", name="bad")
    fault = wait_for_state(agent, bad, "error")["fault"]["message"]
    assert "404" in fault and "pa55word" not in fault and "s1gnature" not in fault
    assert "pa55word" not in agent.log() and "s1gnature" not in agent.log()


def test_http_sources_outside_the_allow_list_are_never_fetched(
    make_agent: Any, server: Server, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    # The test agents allow 127.0.0.1 only: the same server by another name is refused.
    agent: AgentProcess = make_agent()
    uuid = _spawn(agent, server.url("/img.raw", host="localhost"))
    fault = wait_for_state(agent, uuid, "error")["fault"]
    assert fault["code"] == "IMAGE_ERROR" and "http_sources" in fault["message"]
    assert server.hits == {}
    assert sources.allowed("https://images.example.com/pub/a.img", ["https://images.example.com/pub"])
    for url in ("https://images.example.com/public.img", "http://images.example.com/pub/a.img",
                "https://images.example.com:8443/pub/a.img", "https://images.example.com.evil/pub/a",
                "https://images.example.com/pub/../etc/a.img"):
        assert not sources.allowed(url, ["https://images.example.com/pub/"]), url


def test_redirects_leave_the_allow_list_only_refused(
    server: Server, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    target = server.url("/img.raw", host="localhost")

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    cfg = ImagesConfig(http_sources=[f"http://127.0.0.1:{httpd.server_address[1]}/"])

    async def go() -> None:
        cache = ImageCache(tmp_path / "state", cfg, executor)
        try:
            with pytest.raises(ImageError, match=r"redirects to .* not under"):
                await cache.prepare_disk("x", ImageSpec(url=f"http://127.0.0.1:{httpd.server_address[1]}/a"), 1)
        finally:
            await cache.close()

    try:
        asyncio.run(go())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert server.hits == {}


@dataclass
class FakeGlance:
    """A loopback Image service answering image ``private`` only to ``tenant-token``."""

    port: int = 0
    image: bytes = field(default_factory=lambda: os.urandom(MiB))
    tokens: list[str | None] = field(default_factory=list)


@pytest.fixture
def glance() -> Iterator[FakeGlance]:
    g = FakeGlance()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            token = self.headers.get("X-Auth-Token")
            g.tokens.append(token)
            if token != "tenant-token" or not self.path.startswith("/v2/images/private"):
                self.send_error(404)
                return
            if self.path.endswith("/file"):
                body = g.image
            else:
                body = json.dumps({
                    "id": "private", "status": "active", "disk_format": "raw",
                    "container_format": "bare", "size": len(g.image),
                    "os_hash_algo": "sha512", "os_hash_value": hashlib.sha512(g.image).hexdigest(),
                }).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    g.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield g
    httpd.shutdown()
    httpd.server_close()


def test_glance_is_asked_with_the_tenants_token(make_agent: Any, glance: FakeGlance) -> None:
    agent: AgentProcess = make_agent(
        config=f'[images]\nglance_endpoint = "http://127.0.0.1:{glance.port}"\nglance_token = "agent-token"\n'
    )
    # The agent's own token sees nothing: the tenant's decides.
    denied = _spawn(agent, "", name="denied", id="private")
    assert "not found" in wait_for_state(agent, denied, "error")["fault"]["message"]
    assert set(glance.tokens) == {"agent-token"}
    ok = _spawn(agent, "", name="ok", id="private", token="tenant-token")
    rec = wait_for_state(agent, ok, "active")
    assert rec["image"] == {"id": "private", "url": None, "checksum": None, "disk_format": None}
    # Cached now, but another tenant's token is still checked with the Image service.
    other = _spawn(agent, "", name="other", id="private", token="other-token")
    assert wait_for_state(agent, other, "error")["fault"]["code"] == "IMAGE_ERROR"
    assert "other-token" in glance.tokens
    stored = b"".join(p.read_bytes() for p in agent.state_dir.rglob("*") if p.is_file())
    assert b"tenant-token" not in stored and "tenant-token" not in agent.log()


# ---- file:// and a symlink swapped in mid-fetch ---------------------------------------------


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        yield ex


@pytest.mark.parametrize("opener", ["openat2", "o_nofollow_walk"])
def test_a_directory_swapped_for_a_symlink_never_lets_an_outside_file_in(
    tmp_path: Path, executor: concurrent.futures.Executor, monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    if opener == "o_nofollow_walk":
        monkeypatch.setattr(file_source, "_open_beneath", file_source.walk_beneath)
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    inside_bytes, outside_bytes = os.urandom(256 << 10), os.urandom(256 << 10)
    (root / "dir" / "img.raw").write_bytes(inside_bytes)
    (outside / "img.raw").write_bytes(outside_bytes)
    (root / "link").symlink_to(outside)
    stop = threading.Event()

    def swap() -> None:
        # root/dir is the real directory, then a symlink to outside, then the directory again.
        while not stop.is_set():
            os.rename(root / "dir", root / "real")
            os.rename(root / "link", root / "dir")
            os.rename(root / "dir", root / "link")
            os.rename(root / "real", root / "dir")

    tries = 150

    async def fetch_all() -> int:
        cache = ImageCache(tmp_path / "state", ImagesConfig(file_roots=[str(root)]), executor)
        fetched = 0
        try:
            for i in range(tries):
                # A query makes each try a base of its own; the path read is the same.
                try:
                    await cache.fetch_base(ImageSpec(url=f"file://{root}/dir/img.raw?{i}"), 1)
                    fetched += 1
                except ImageError:
                    pass
        finally:
            await cache.close()
        return fetched

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        fetched = asyncio.run(fetch_all())
    finally:
        stop.set()
        swapper.join()
    bases = [p for p in (tmp_path / "state" / "_base").iterdir() if not p.name.endswith(".json")]
    assert fetched == len(bases) > 0
    assert all(p.read_bytes() == inside_bytes for p in bases)
