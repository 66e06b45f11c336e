"""The image cache against real files, a real HTTP server on loopback and real qemu-img."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fastcompute import _core
from fastcompute.config import ImagesConfig
from fastcompute.errors import BadRequest, Conflict, ImageError
from fastcompute.images.cache import ImageCache, ImageSpec
from fastcompute.images.formats import FormatError, create_overlay, inspect

# The tests' file:// images live in their temporary directories; by default no file:// image is taken.

def copy_file(src: os.PathLike[str], dst: os.PathLike[str], progress: Any = None) -> tuple[int, str]:
    """The compiled copier on paths (it takes strings)."""
    return _core.copy_file(os.fspath(src), os.fspath(dst), progress)

TEMP_ROOTS = [tempfile.gettempdir()]
# Their http images are served on loopback; by default no http(s) image is taken either.
LOOPBACK = ["127.0.0.1"]


def local_config(**kw: Any) -> ImagesConfig:
    """The images config of these tests: their file:// roots and loopback http sources."""
    return ImagesConfig(file_roots=TEMP_ROOTS, http_sources=LOOPBACK, **kw)


MiB = 1 << 20
GiB = 1 << 30

pytestmark = pytest.mark.anyio


# ---- a loopback HTTP image server whose misbehaviour each test chooses ------------------


@dataclass
class Route:
    body: bytes
    mode: str = "ok"  # ok | truncate | stall | slow | redirect (body = Location)
    hits: int = 0


@dataclass
class ImageServer:
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.routes[path] = Route(body, mode)
        return self.url(path)


def _handler(server: ImageServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            # The client may give up mid-body, as some tests make it do.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._serve()

        def _serve(self) -> None:
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route.hits += 1
            body = route.body
            if route.mode == "redirect":
                self.send_response(302)
                self.send_header("Location", body.decode())
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if route.mode == "ok":
                self.wfile.write(body)
            elif route.mode == "truncate":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif route.mode == "stall":
                self.wfile.write(body[: len(body) // 4])
                self.wfile.flush()
                server.release.wait(30)
                self.close_connection = True
            elif route.mode == "slow":
                for off in range(0, len(body), 256 << 10):
                    self.wfile.write(body[off : off + (256 << 10)])
                    self.wfile.flush()
                    if server.release.wait(0.02):
                        break

    return Handler


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    httpd.daemon_threads = True
    server = ImageServer(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(server)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        yield ex


@pytest.fixture
async def cache(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> AsyncIterator[ImageCache]:
    c = ImageCache(tmp_path / "state", local_config(read_timeout_s=5.0), executor)
    yield c
    await c.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def image_bytes(size: int = 2 * MiB, seed: int = 1) -> bytes:
    """A raw image with data, zeros (which the cache stores as holes) and more data."""
    block = hashlib.sha512(str(seed).encode()).digest() * (64 << 10 // 64)
    data = bytearray(size)
    data[: 256 << 10] = (block * 4)[: 256 << 10]
    data[size - (128 << 10) :] = (block * 2)[: 128 << 10]
    return bytes(data)


def make_qcow2(path: Path, raw: bytes) -> bytes:
    src = path.with_suffix(".src")
    src.write_bytes(raw)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(path)], check=True
    )
    src.unlink()
    return path.read_bytes()


def left_behind(state: Path) -> list[str]:
    """Every file under the cache and instance dirs: what a failure must not leave."""
    return sorted(
        str(p.relative_to(state)) for p in state.rglob("*") if p.is_file() or p.is_symlink()
    )


def qemu_check(path: Path) -> None:
    out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No errors were found" in out.stdout


def read_back(path: Path, tmp: Path, expect: bytes, virtual_size: int) -> None:
    """Convert a disk to raw with qemu-img: it must hold ``expect`` and zeros after it."""
    out = tmp / f"readback-{path.parent.name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    try:
        assert out.stat().st_size == virtual_size
        with open(out, "rb") as f:
            assert f.read(len(expect)) == expect
            # qemu-img writes zeros as holes: past the image's data there must be none.
            tail = -(-len(expect) // 65536) * 65536
            assert f.read(tail - len(expect)).count(0) == tail - len(expect)
            with pytest.raises(OSError):
                os.lseek(f.fileno(), tail, os.SEEK_DATA)
    finally:
        out.unlink()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- the storm ---------------------------------------------------------------------------


def test_hundred_concurrent_spawns_download_once(
    image_server: ImageServer, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    body = image_bytes()
    url = image_server.add("/storm.raw", body)

    async def storm() -> list[Path]:
        c = ImageCache(tmp_path / "state", local_config(), executor)
        try:
            spec = ImageSpec(url=url, checksum=sha256(body))
            return await asyncio.gather(
                *(c.prepare_disk(f"i-{n:03d}", spec, 1) for n in range(100))
            )
        finally:
            await c.close()

    disks = run(storm())
    assert image_server.routes["/storm.raw"].hits == 1
    assert len(set(disks)) == 100  # type: ignore[arg-type]
    for disk in disks[:3]:  # type: ignore[index]
        qemu_check(disk)
    read_back(disks[0], tmp_path, body, GiB)  # type: ignore[index]


async def test_cached_image_is_not_downloaded_again(
    image_server: ImageServer, cache: ImageCache
) -> None:
    body = image_bytes()
    url = image_server.add("/again.raw", body)
    await cache.prepare_disk("a", ImageSpec(url=url), 1)
    await cache.prepare_disk("b", ImageSpec(url=url, checksum=sha256(body)), 1)
    assert image_server.routes["/again.raw"].hits == 1
    [base] = cache.list_bases()
    assert base.users == ["a", "b"]
    assert base.source == url and base.format == "raw" and base.virtual_size == len(body)
    # The zeros in the middle of the image were stored as a hole.
    assert base.allocated < base.size


async def test_progress_reaches_every_waiter(image_server: ImageServer, cache: ImageCache) -> None:
    body = image_bytes(12 * MiB)
    url = image_server.add("/progress.raw", body)
    seen: dict[str, list[tuple[str, int, int | None]]] = {"a": [], "b": []}
    await asyncio.gather(
        cache.prepare_disk("a", ImageSpec(url=url), 1, lambda *e: seen["a"].append(e)),
        cache.prepare_disk("b", ImageSpec(url=url), 1, lambda *e: seen["b"].append(e)),
    )
    for events in seen.values():
        assert events[-1] == ("download", len(body), len(body))
        assert len(events) >= 2


# ---- failures leave nothing behind -------------------------------------------------------


async def _refused(
    cache: ImageCache, spec: ImageSpec, match: str, state: Path, disk_gb: int = 1
) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        await cache.prepare_disk("victim", spec, disk_gb)
    assert left_behind(state) == []
    assert cache.list_bases() == []
    return info.value


async def test_checksum_mismatch_is_refused(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    url = image_server.add("/bad-sum.raw", image_bytes())
    err = await _refused(
        cache, ImageSpec(url=url, checksum=sha256(b"something else")), "requested checksum",
        tmp_path / "state",
    )
    assert err.code == "IMAGE_ERROR"


async def test_truncated_download_is_refused(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    url = image_server.add("/short.raw", image_bytes(), mode="truncate")
    await _refused(cache, ImageSpec(url=url), "truncated|incomplete|download failed", tmp_path / "state")


async def test_stalled_server_is_abandoned(
    image_server: ImageServer, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    url = image_server.add("/stall.raw", image_bytes(), mode="stall")
    cache = ImageCache(tmp_path / "state", local_config(read_timeout_s=0.5), executor)
    try:
        await _refused(cache, ImageSpec(url=url), "stalled", tmp_path / "state")
    finally:
        await cache.close()


async def test_qcow2_with_backing_file_is_refused(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root:x:0:0\n" * 100)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil)],
        check=True,
    )
    url = image_server.add("/evil.qcow2", evil.read_bytes())
    await _refused(cache, ImageSpec(url=url), "backing file", tmp_path / "state")


async def test_qcow2_with_external_data_file_is_refused(
    cache: ImageCache, tmp_path: Path
) -> None:
    evil = tmp_path / "data.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}",
         str(evil), "1M"],
        check=True,
    )
    await _refused(cache, ImageSpec(url=f"file://{evil}"), "external data file", tmp_path / "state")


async def test_qcow2_claimed_raw_is_refused(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    qcow = make_qcow2(tmp_path / "disguised.qcow2", image_bytes())
    url = image_server.add("/disguised.raw", qcow)
    await _refused(
        cache, ImageSpec(url=url, disk_format="raw"), "claims to be raw but its bytes are qcow2",
        tmp_path / "state",
    )


async def test_other_formats_are_refused_by_name(cache: ImageCache, tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    await _refused(cache, ImageSpec(url=f"file://{vmdk}"), "vmdk format", tmp_path / "state")


async def test_image_larger_than_flavor_disk_is_refused(
    cache: ImageCache, tmp_path: Path
) -> None:
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), f"{GiB + MiB}"], check=True)
    with pytest.raises(ImageError, match=r"larger than the flavor's 1 GiB disk.*at least 2 GiB"):
        await cache.prepare_disk("small", ImageSpec(url=f"file://{big}"), 1)
    assert not (tmp_path / "state" / "instances" / "small").exists()
    # The base itself is fine and stays cached for a flavor that fits.
    disk = await cache.prepare_disk("fits", ImageSpec(url=f"file://{big}"), 2)
    qemu_check(disk)


async def test_size_limit(
    image_server: ImageServer, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    url = image_server.add("/huge.raw", image_bytes(4 * MiB))
    cache = ImageCache(tmp_path / "state", local_config(max_image_bytes=MiB), executor)
    try:
        await _refused(cache, ImageSpec(url=url), "above the limit", tmp_path / "state")
    finally:
        await cache.close()


async def test_unreachable_and_malformed_sources(cache: ImageCache, tmp_path: Path) -> None:
    state = tmp_path / "state"
    await _refused(cache, ImageSpec(url=f"file://{tmp_path}/missing.raw"), "cannot be read", state)
    await _refused(cache, ImageSpec(url="http://127.0.0.1:9/none.raw"), "download failed", state)
    await _refused(cache, ImageSpec(id="abc"), "no Image service is configured", state)
    with pytest.raises(BadRequest):
        await cache.prepare_disk("x", ImageSpec(url="ftp://example/x.raw"), 1)
    with pytest.raises(BadRequest):
        await cache.prepare_disk("x", ImageSpec(url=f"file://{tmp_path}/x", checksum="md5:00"), 1)
    with pytest.raises(BadRequest):
        await cache.prepare_disk("x", ImageSpec(), 1)


async def test_existing_disk_is_never_overwritten(cache: ImageCache, tmp_path: Path) -> None:
    src = tmp_path / "img.raw"
    src.write_bytes(image_bytes())
    disk = await cache.prepare_disk("one", ImageSpec(url=f"file://{src}"), 1)
    before = disk.read_bytes()
    with pytest.raises(Conflict):
        await cache.prepare_disk("one", ImageSpec(url=f"file://{src}"), 1)
    assert disk.read_bytes() == before


_KILL_SCRIPT = """
import asyncio, concurrent.futures, sys
from pathlib import Path
from fastcompute.config import ImagesConfig
from fastcompute.images.cache import ImageCache, ImageSpec

async def main():
    cfg = ImagesConfig(file_roots=["/"], http_sources=["127.0.0.1"])
    c = ImageCache(Path(sys.argv[1]), cfg, concurrent.futures.ThreadPoolExecutor(2))
    await c.prepare_disk("victim", ImageSpec(url=sys.argv[2]), 1)

asyncio.run(main())
"""


def test_kill_during_download_leaves_no_half_base(
    image_server: ImageServer, tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    body = os.urandom(64 * MiB)
    url = image_server.add("/slow.raw", body, mode="slow")
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(state), url])
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-") for p in (state / "_base").glob(".tmp-*")):
            assert proc.poll() is None, "the agent process ended before the download started"
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        # Let it write a few chunks so the temporary file has real content.
        while sum(p.stat().st_size for p in (state / "_base").glob(".tmp-*")) < 8 * MiB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".tmp-") for p in (state / "_base").iterdir())

    image_server.routes["/slow.raw"].mode = "ok"

    async def restart() -> Path:
        c = ImageCache(state, local_config(), executor)
        try:
            assert list((state / "_base").iterdir()) == []
            assert c.list_bases() == []
            return await c.prepare_disk("after", ImageSpec(url=url, checksum=sha256(body)), 1)
        finally:
            await c.close()

    disk = run(restart())
    qemu_check(disk)  # type: ignore[arg-type]


# ---- disks --------------------------------------------------------------------------------


async def test_cow_overlay_is_valid_and_reads_back_the_base(
    cache: ImageCache, tmp_path: Path
) -> None:
    body = image_bytes(3 * MiB + 12345)
    src = tmp_path / "img.raw"
    src.write_bytes(body)
    disk = await cache.prepare_disk("cow", ImageSpec(url=f"file://{src}"), 2)
    assert cache.disk_format() == "qcow2"
    qemu_check(disk)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 * GiB
    assert info["backing-filename-format"] == "raw"
    read_back(disk, tmp_path, body, 2 * GiB)


async def test_qcow2_image_is_stored_raw_and_reads_back(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    body = image_bytes(5 * MiB)
    qcow = make_qcow2(tmp_path / "img.qcow2", body)
    url = image_server.add("/img.qcow2", qcow)
    disk = await cache.prepare_disk("q", ImageSpec(url=url, checksum=sha256(qcow)), 1)
    [base] = cache.list_bases()
    assert base.format == "qcow2" and base.virtual_size == len(body)
    qemu_check(disk)
    read_back(disk, tmp_path, body, GiB)


async def test_flat_disk_is_a_sparse_private_copy(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    body = image_bytes(4 * MiB)
    src = tmp_path / "img.raw"
    with open(src, "wb") as f:  # written sparse, as qemu-img and the cache store images
        f.write(body[: 256 << 10])
        f.seek(len(body) - (128 << 10))
        f.write(body[len(body) - (128 << 10) :])
    cache = ImageCache(tmp_path / "state", local_config(disk_mode="flat"), executor)
    events: list[tuple[str, int, int | None]] = []
    try:
        disk = await cache.prepare_disk(
            "flat", ImageSpec(url=f"file://{src}"), 1, lambda *e: events.append(e)
        )
        await asyncio.sleep(0)  # copy progress arrives through the loop
    finally:
        await cache.close()
    assert cache.disk_format() == "raw"
    st = disk.stat()
    assert st.st_size == GiB
    assert st.st_blocks * 512 < 2 * MiB  # only the data was written
    with open(disk, "rb") as f:
        assert f.read(len(body)) == body
    assert ("copy", 384 << 10, 384 << 10) in events


async def test_remove_disk_is_idempotent(cache: ImageCache, tmp_path: Path) -> None:
    src = tmp_path / "img.raw"
    src.write_bytes(image_bytes())
    await cache.prepare_disk("gone", ImageSpec(url=f"file://{src}"), 1)
    await cache.remove_disk("gone")
    await cache.remove_disk("gone")
    assert not (tmp_path / "state" / "instances" / "gone").exists()
    [base] = cache.list_bases()
    assert base.users == []


# ---- the cleaner ------------------------------------------------------------------------


async def test_prune_keeps_bases_in_use_and_removes_unused(
    cache: ImageCache, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(image_bytes(seed=1))
    b.write_bytes(image_bytes(seed=2))
    await cache.prepare_disk("uses-a", ImageSpec(url=f"file://{a}"), 1)
    await cache.prepare_disk("uses-b", ImageSpec(url=f"file://{b}"), 1)
    await cache.remove_disk("uses-b")
    assert await cache.prune() == []  # nothing is a day old
    [removed] = await cache.prune(max_age_s=0)
    [kept] = cache.list_bases()
    assert kept.source == f"file://{a}" and kept.users == ["uses-a"]
    assert removed != kept.key
    assert not (tmp_path / "state" / "_base" / removed).exists()
    # The overlay still reads its base.
    qemu_check(tmp_path / "state" / "instances" / "uses-a" / "disk")


async def test_cleaner_runs_until_stopped(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    cfg = local_config(cache_max_age_s=0.0, cleaner_interval_s=0.05)
    cache = ImageCache(tmp_path / "state", cfg, executor)
    src = tmp_path / "img.raw"
    src.write_bytes(image_bytes())
    await cache.prepare_disk("tmp", ImageSpec(url=f"file://{src}"), 1)
    await cache.remove_disk("tmp")
    stop = asyncio.Event()
    task = asyncio.create_task(cache.run_cleaner(stop))
    for _ in range(200):
        if not cache.list_bases():
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    await cache.close()
    assert cache.list_bases() == []


# ---- the inspector and the overlay writer -----------------------------------------------


def test_inspector_reads_raw_and_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 1000 + b"data")
    assert inspect(raw).format == "raw" and inspect(raw).virtual_size == 1004
    q = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "3G"], check=True)
    assert inspect(q).format == "qcow2" and inspect(q).virtual_size == 3 * GiB
    q.write_bytes(q.read_bytes()[:40])
    with pytest.raises(FormatError, match="truncated"):
        inspect(q)


@pytest.mark.parametrize("size", [1, GiB, 512 * GiB + 1, 4096 * GiB])
def test_overlay_writer_matches_qemu(tmp_path: Path, size: int) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"x" * 4096)
    ours = tmp_path / "ours.qcow2"
    create_overlay(ours, size, str(base), "raw")
    qemu_check(ours)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(ours)], capture_output=True).stdout
    )
    assert info["virtual-size"] == -(-size // 512) * 512  # whole sectors, as qemu-img rounds
    assert info["full-backing-filename"] == str(base)
    with pytest.raises(FileExistsError):
        create_overlay(ours, size, str(base), "raw")


# ---- the copier -----------------------------------------------------------------------


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _make(path: Path, kind: str) -> None:
    rnd = hashlib.sha512(kind.encode()).digest()
    with open(path, "wb") as f:
        if kind == "dense":
            f.write(rnd * (12 * MiB // 64))
        elif kind == "sparse":
            f.truncate(64 * MiB)
            for i in range(0, 64 * MiB, 10 * MiB):
                f.seek(i)
                f.write(rnd * (MiB // 64))
        elif kind == "odd":
            f.write(rnd * 20000 + b"tail-bytes-x")
            f.seek(3 * MiB + 7)
            f.write(b"!")
        elif kind == "hole-tail":
            f.write(rnd * 1000)
            f.truncate(16 * MiB)


@pytest.mark.parametrize("kind", ["dense", "sparse", "empty", "odd", "hole-tail"])
def test_copier_keeps_bytes_and_holes(tmp_path: Path, kind: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make(src, kind)
    calls: list[tuple[int, int]] = []
    copied, method = copy_file(src, dst, lambda d, t: calls.append((d, t)))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == src.stat().st_size
    assert _allocated(dst) <= _allocated(src) + (64 << 10)
    assert copied <= src.stat().st_size
    if kind == "empty":
        assert (copied, method) == (0, "none")
    else:
        assert method in ("reflink", "copy_file_range", "sendfile", "readwrite")
        assert copied > 0
    assert calls[-1] == (copied, copied)


def test_copier_cleans_up_on_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make(src, "dense")
    with pytest.raises(FileNotFoundError):
        copy_file(tmp_path / "missing", dst)
    with pytest.raises(FileNotFoundError):
        copy_file(src, tmp_path / "no-dir" / "dst")

    def boom(done: int, total: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        copy_file(src, dst, boom)
    assert not dst.exists()


def test_copier_releases_the_gil(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make(src, "dense")
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)

    t = threading.Thread(target=count)
    t.start()
    try:
        for _ in range(3):
            copy_file(src, dst)
    finally:
        done.set()
        t.join()
    assert ticks > 0


async def test_cancelled_spawn_leaves_no_disk(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    src = tmp_path / "img.raw"
    src.write_bytes(os.urandom(32 * MiB))
    cache = ImageCache(tmp_path / "state", local_config(disk_mode="flat"), executor)
    try:
        await cache.prepare_disk("warm", ImageSpec(url=f"file://{src}"), 1)
        task = asyncio.create_task(cache.prepare_disk("cancelled", ImageSpec(url=f"file://{src}"), 1))
        for _ in range(1000):
            if (tmp_path / "state" / "instances" / "cancelled").exists():
                break
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await cache.close()
    assert not (tmp_path / "state" / "instances" / "cancelled").exists()
    [base] = cache.list_bases()
    assert base.users == ["warm"]


async def test_checksum_of_a_cached_base_is_computed_when_first_asked(
    image_server: ImageServer, cache: ImageCache
) -> None:
    body = image_bytes()
    url = image_server.add("/later.raw", body)
    await cache.prepare_disk("plain", ImageSpec(url=url), 1)
    sha512 = "sha512:" + hashlib.sha512(body).hexdigest()
    await cache.prepare_disk("checked", ImageSpec(url=url, checksum=sha512), 1)
    with pytest.raises(ImageError, match="requested checksum"):
        await cache.prepare_disk("wrong", ImageSpec(url=url, checksum="sha512:" + "a" * 128), 1)
    assert image_server.routes["/later.raw"].hits == 1
    assert sorted(b.users for b in cache.list_bases()) == [["checked", "plain"]]


async def test_one_wrong_checksum_does_not_fail_the_others(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    body = image_bytes()
    url = image_server.add("/shared.raw", body)
    wrong = ImageSpec(url=url, checksum=sha256(b"not it"))
    right = ImageSpec(url=url, checksum=sha256(body))
    results = await asyncio.gather(
        cache.prepare_disk("wrong", wrong, 1),
        *(cache.prepare_disk(f"ok-{n}", right if n % 2 else ImageSpec(url=url), 1)
          for n in range(10)),
        return_exceptions=True,
    )
    assert isinstance(results[0], ImageError) and "requested checksum" in str(results[0])
    assert all(isinstance(r, Path) for r in results[1:])
    assert image_server.routes["/shared.raw"].hits == 2
    assert not (tmp_path / "state" / "instances" / "wrong").exists()


def test_copier_refuses_to_copy_a_file_onto_itself(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make(src, "odd")
    before = src.read_bytes()
    os.link(src, tmp_path / "alias")
    with pytest.raises(OSError):
        copy_file(src, tmp_path / "alias")
    assert src.read_bytes() == before


def test_copier_falls_back_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary directory")
    src = shm / f"fastcompute-test-{os.getpid()}"
    try:
        _make(src, "odd")
        copied, method = copy_file(src, tmp_path / "dst")
        assert (tmp_path / "dst").read_bytes() == src.read_bytes()
        assert method in ("copy_file_range", "sendfile", "readwrite") and copied > 0
    finally:
        src.unlink(missing_ok=True)


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path, Route]]:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server = ImageServer(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    route = Route(image_bytes())
    server.routes["/img.raw"] = route
    yield f"https://127.0.0.1:{server.port}/img.raw", cert, route
    httpd.shutdown()
    httpd.server_close()


async def test_https_source_is_verified_against_the_ca_file(
    https_server: tuple[str, Path, Route], tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    url, cert, route = https_server
    untrusting = ImageCache(tmp_path / "a", local_config(), executor)
    try:
        with pytest.raises(ImageError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.prepare_disk("vm", ImageSpec(url=url), 1)
    finally:
        await untrusting.close()
    trusting = ImageCache(tmp_path / "b", ImagesConfig(ca_file=str(cert), http_sources=LOOPBACK), executor)
    try:
        disk = await trusting.prepare_disk("vm", ImageSpec(url=url, checksum=sha256(route.body)), 1)
    finally:
        await trusting.close()
    qemu_check(disk)


async def test_file_sources_are_confined_to_file_roots(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "ok.raw").write_bytes(image_bytes())
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n" * 1000)
    (allowed / "link.raw").symlink_to(secret)
    state = tmp_path / "state"
    cache = ImageCache(state, ImagesConfig(file_roots=[str(allowed)]), executor)
    try:
        await cache.prepare_disk("ok", ImageSpec(url=(allowed / "ok.raw").as_uri()), 1)
        await cache.remove_disk("ok")
        await cache.prune(0)
        for url in (secret.as_uri(), (allowed / "link.raw").as_uri()):
            await _refused(cache, ImageSpec(url=url), "outside the directories", state)
    finally:
        await cache.close()
    # Whatever the roots, only regular files are images: not a device, not a directory.
    cache = ImageCache(state, ImagesConfig(file_roots=["/"]), executor)
    try:
        await _refused(cache, ImageSpec(url="file:///dev/zero"), "not a regular file", state)
        await _refused(cache, ImageSpec(url=allowed.as_uri()), "not a regular file", state)
    finally:
        await cache.close()
    # By default an agent takes no file:// image at all, and says so whether the file exists
    # or not.
    cache = ImageCache(state, ImagesConfig(), executor)
    try:
        for url in ((allowed / "ok.raw").as_uri(), (allowed / "missing.raw").as_uri()):
            await _refused(cache, ImageSpec(url=url), "takes no file:// images", state)
    finally:
        await cache.close()
    # Outside the roots, a missing file is refused exactly as an existing one is.
    cache = ImageCache(state, ImagesConfig(file_roots=[str(allowed)]), executor)
    try:
        await _refused(cache, ImageSpec(url=(tmp_path / "missing").as_uri()), "outside the directories", state)
    finally:
        await cache.close()


async def test_base_removed_behind_the_cache_is_fetched_again(
    image_server: ImageServer, cache: ImageCache, tmp_path: Path
) -> None:
    body = image_bytes()
    url = image_server.add("/vanishing.raw", body)
    await cache.prepare_disk("first", ImageSpec(url=url), 1)
    [base] = cache.list_bases()
    (tmp_path / "state" / "_base" / base.key).unlink()
    disk = await cache.prepare_disk("second", ImageSpec(url=url), 1)
    assert image_server.routes["/vanishing.raw"].hits == 2
    read_back(disk, tmp_path, body, GiB)


async def test_redirects_are_followed(image_server: ImageServer, cache: ImageCache) -> None:
    body = image_bytes()
    image_server.add("/real.raw", body)
    url = image_server.add("/moved.raw", b"/real.raw", mode="redirect")
    await cache.prepare_disk("moved", ImageSpec(url=url, checksum=sha256(body)), 1)
    assert image_server.routes["/moved.raw"].hits == 1
    assert image_server.routes["/real.raw"].hits == 1
