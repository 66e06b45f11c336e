"""Image sources: file://, http(s):// and Glance v2, streamed into a temporary file.

Everything here fetches bytes and says what they are worth: the digests asked for, the bytes
received, or an :class:`~fastcompute.errors.ImageError` saying what went wrong (unreachable,
refused, stalled, truncated, too large). Deciding what to do with them (verification, the
cache, single flight) is :mod:`fastcompute.images`' business. Downloads run in threads of
their own pool (reads, hashing and writes together, off the event loop); file:// copies run in
the shared executor; Glance's small metadata requests run on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import http.client
import logging
import os
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from fastcompute import _core
from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images.formats import QCOW2_MAGIC

log = logging.getLogger("fastcompute.images")

Report = Callable[[str, int, int | None], None]
"""``report(stage, done_bytes, total_bytes_or_None)``, called on the event loop."""

DIGESTS = ("sha256", "sha512")
WRITE_CHUNK = 8 << 20
ZERO_BLOCK = 64 << 10
ZEROS = bytes(ZERO_BLOCK)


class Sources:
    """Fetches images for one cache: an HTTP client with the configured timeouts and CAs."""

    def __init__(self, cfg: ImagesConfig, executor: concurrent.futures.Executor) -> None:
        self.cfg = cfg
        self._executor = executor
        self._client: httpx.AsyncClient | None = None
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._downloads = concurrent.futures.ThreadPoolExecutor(
            max(1, cfg.max_concurrent_downloads), thread_name_prefix="fc-image-download"
        )

    async def close(self) -> None:
        """Close the HTTP clients and the download threads (downloads must have ended)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._downloads.shutdown(wait=False)

    async def fetch_file(
        self, source: str, tmp: Path, algos: set[str], report: Report
    ) -> tuple[dict[str, str], int]:
        """Copy a file:// image to ``tmp``; return the digests asked for and its size."""
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"image url {source} names a remote host; file:// must be local")
        loop = asyncio.get_running_loop()
        path, size = await loop.run_in_executor(
            self._executor, self._local_source, source, Path(urllib.parse.unquote(parts.path))
        )
        if size > self.cfg.max_image_bytes:
            raise ImageError(
                f"image {source} is {human(size)}, above the limit of "
                f"{human(self.cfg.max_image_bytes)} ([images] max_image_bytes)"
            )

        def on_copy(done: int, total: int) -> None:
            loop.call_soon_threadsafe(report, "download", done, total)

        def work() -> dict[str, str]:
            _core.copy_file(str(path), str(tmp), on_copy)
            return hash_file(tmp, algos)

        try:
            return await loop.run_in_executor(self._executor, work), size
        except OSError as exc:
            raise ImageError(f"image {source} cannot be read: {exc.strerror or exc}") from exc

    def _local_source(self, source: str, path: Path) -> tuple[Path, int]:
        """The real path and size of a file:// image, if it may be used as one."""
        # A file:// URL turns a host file into a guest's disk: only regular files, and only
        # under the configured roots once every symlink is resolved (/etc/shadow or /dev/sda
        # must not become an image because a request named them).
        if not self.cfg.file_roots:
            raise ImageError(f"image {source}: this agent takes no file:// images ([images] file_roots is empty)")
        roots = [Path(r).resolve() for r in self.cfg.file_roots]

        def outside(p: Path) -> ImageError | None:
            if any(p.is_relative_to(r) for r in roots):
                return None
            return ImageError(f"image {source} is outside the directories file:// images may come from "
                              f"([images] file_roots = {self.cfg.file_roots})")

        try:
            # Checked before the file is looked at too, so that a request cannot learn from
            # the error whether a file exists outside the roots.
            if (refused := outside(path.resolve())) is not None:
                raise refused
            real = path.resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ImageError(f"image {source} cannot be read: {reason}") from exc
        if (refused := outside(real)) is not None:
            raise refused
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"image {source} is not a regular file")
        return real, st.st_size

    def _client_options(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "timeout": httpx.Timeout(
                connect=c.connect_timeout_s, read=c.read_timeout_s, write=c.read_timeout_s,
                pool=None,
            ),
            "verify": ssl.create_default_context(cafile=c.ca_file or None),
            "follow_redirects": True,
        }

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(**self._client_options())
        return self._client

    async def download(
        self,
        url: str,
        headers: dict[str, str],
        tmp: Path,
        expected: dict[str, str],
        wanted: set[str],
        report: Report,
    ) -> tuple[dict[str, str], int]:
        """Stream ``url`` into ``tmp``; return the digests of ``expected`` and ``wanted`` and
        the bytes received. Truncation, stalls, the size limit and HTTP errors are ImageError.

        The transfer runs in a thread of its own pool, not on the event loop: in a boot storm
        the loop is busy admitting hundreds of requests, and a download that needs a loop turn
        for every 64 KiB read was measured 3x slower there, delaying every spawn waiting on
        it. The shared executor is not used either: a download holds its thread for minutes.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def report_threadsafe(done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(report, "download", done, total)

        job = loop.run_in_executor(
            self._downloads, self._download, url, headers, tmp, {*expected, *wanted},
            report_threadsafe, cancel,
        )
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # Stop the thread at its next chunk (or read timeout) and wait: the temporary
            # file must be gone before the caller's cleanup runs.
            cancel.set()
            with contextlib.suppress(BaseException):
                await job
            raise

    def _download(
        self,
        url: str,
        headers: dict[str, str],
        tmp: Path,
        algos: set[str],
        report: Callable[[int, int | None], None],
        cancel: threading.Event,
    ) -> tuple[dict[str, str], int]:
        limit = self.cfg.max_image_bytes
        sink = Sink(tmp, algos)
        try:
            with self._stream(url, headers) as resp:
                length = resp.getheader("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > limit:
                    raise ImageError(
                        f"image {url} is {human(total)}, above the limit of {human(limit)} "
                        "([images] max_image_bytes)"
                    )
                received = 0
                report(0, total)
                last_log = time.monotonic()
                while True:
                    # readinto fills a whole chunk in C (the GIL released in every recv):
                    # ~8x less CPU than iterating 64 KiB pieces, which matters while the
                    # event loop admits a storm of spawns on the same cores.
                    buf = bytearray(WRITE_CHUNK)
                    n = _read_full(resp, buf, url, self.cfg.read_timeout_s)
                    if cancel.is_set():
                        raise ImageError(f"image {url}: the download was cancelled")
                    if n == 0:
                        break
                    received += n
                    if received > limit:
                        raise ImageError(
                            f"image {url} is larger than the limit of {human(limit)} "
                            "([images] max_image_bytes); the download was abandoned"
                        )
                    sink.write(buf if n == len(buf) else buf[:n])
                    report(received, total)
                    if time.monotonic() - last_log >= 5.0:
                        last_log = time.monotonic()
                        pct = f" ({100 * received // total}%)" if total else ""
                        log.info("image %s: %s received%s", url, human(received), pct)
                if total is not None and received != total:
                    raise ImageError(
                        f"image {url} download was truncated: {received} of {total} bytes"
                    )
                report(received, total)
            return sink.finish(), received
        except BaseException:
            sink.abort()
            raise

    @contextlib.contextmanager
    def _stream(self, url: str, headers: dict[str, str]) -> Iterator[http.client.HTTPResponse]:
        """GET ``url`` (following up to 5 redirects); failures become ImageError."""
        c = self.cfg
        target = url
        for _ in range(6):
            parts = urllib.parse.urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ImageError(f"image {url}: cannot follow the server to {target}")
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=c.connect_timeout_s,
                    context=self._ssl_context(),
                )
            else:
                conn = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=c.connect_timeout_s
                )
            try:
                try:
                    conn.connect()
                    assert conn.sock is not None
                    conn.sock.settimeout(c.read_timeout_s)
                    path = parts.path or "/"
                    conn.request(
                        "GET", f"{path}?{parts.query}" if parts.query else path,
                        headers={"Accept-Encoding": "identity", **headers},
                    )
                    resp = conn.getresponse()
                except TimeoutError as exc:
                    raise ImageError(
                        f"image {url}: the server did not answer in time ([images] "
                        f"connect_timeout_s {c.connect_timeout_s} s, read_timeout_s "
                        f"{c.read_timeout_s} s)"
                    ) from exc
                except (OSError, http.client.HTTPException) as exc:
                    raise ImageError(f"image {url} download failed: {exc}") from exc
                location = resp.getheader("location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    target = urllib.parse.urljoin(target, location)
                    continue
                if resp.status != 200:
                    raise ImageError(
                        f"image {url} cannot be fetched: the server answered "
                        f"{resp.status} {resp.reason}",
                        {"status": resp.status},
                    )
                yield resp
                return
            finally:
                conn.close()
        raise ImageError(f"image {url}: too many redirects")

    def _ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self.cfg.ca_file or None)
            return self._ssl

    def glance_url(self, image_id: str, suffix: str = "") -> str:
        """The Glance v2 URL of an image, or of its data with suffix ``/file``."""
        quoted = urllib.parse.quote(image_id, safe="")
        return f"{self.cfg.glance_endpoint.rstrip('/')}/v2/images/{quoted}{suffix}"

    def glance_headers(self) -> dict[str, str]:
        """The token and the configured extra headers for Glance."""
        headers = {}
        if self.cfg.glance_token:
            headers["X-Auth-Token"] = self.cfg.glance_token
        for line in self.cfg.glance_headers:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip()] = value.strip()
        return headers

    async def glance_meta(self, image_id: str) -> dict[str, Any]:
        """Glance's record of an image (GET /v2/images/{id}); errors are ImageError."""
        url = self.glance_url(image_id)
        try:
            resp = await self._http().get(url, headers=self.glance_headers())
        except httpx.HTTPError as exc:
            raise ImageError(
                f"the Image service at {self.cfg.glance_endpoint} cannot be reached: "
                f"{exc or type(exc).__name__}"
            ) from exc
        if resp.status_code == 404:
            raise ImageError(
                f"image {image_id} not found in the Image service (or not visible to this "
                "agent's project)",
                {"image_id": image_id},
            )
        if resp.status_code in (401, 403):
            raise ImageError(
                f"the Image service refused access to image {image_id} ({resp.status_code}): "
                "check [images] glance_token",
                {"image_id": image_id},
            )
        if resp.status_code != 200:
            raise ImageError(
                f"the Image service answered {resp.status_code} for image {image_id}",
                {"image_id": image_id},
            )
        try:
            info = resp.json()
        except ValueError as exc:
            raise ImageError(f"the Image service sent invalid JSON for image {image_id}") from exc
        if not isinstance(info, dict):
            raise ImageError(f"the Image service sent invalid metadata for image {image_id}")
        return info


def glance_expectations(info: dict[str, Any], limit: int) -> tuple[dict[str, str], str]:
    """Check Glance's image record; return the digests to verify and the claimed format."""
    image_id = info.get("id", "?")
    status = info.get("status")
    if status != "active":
        raise ImageError(f"image {image_id} is {status}, not active, in the Image service")
    fmt = info.get("disk_format")
    if fmt not in ("raw", "qcow2"):
        raise ImageError(
            f"image {image_id} has disk_format {fmt!r} in the Image service; only raw and "
            "qcow2 are supported"
        )
    container = info.get("container_format")
    if container not in (None, "bare"):
        raise ImageError(
            f"image {image_id} has container_format {container!r}; only bare is supported"
        )
    size = info.get("size")
    if isinstance(size, int) and size > limit:
        raise ImageError(
            f"image {image_id} is {human(size)}, above the limit of {human(limit)} "
            "([images] max_image_bytes)"
        )
    expected: dict[str, str] = {}
    algo, value = info.get("os_hash_algo"), info.get("os_hash_value")
    if isinstance(algo, str) and isinstance(value, str) and algo and value:
        if algo.lower() not in hashlib.algorithms_available:
            raise ImageError(
                f"image {image_id} is hashed with {algo}, which this host cannot check"
            )
        expected[algo.lower()] = value.lower()
    elif isinstance(info.get("checksum"), str) and info["checksum"]:
        expected["md5"] = info["checksum"].lower()
    else:
        raise ImageError(
            f"image {image_id} has no hash in the Image service (os_hash_value, checksum): "
            "it cannot be verified"
        )
    return expected, str(fmt)


def digests_for(head: bytes | bytearray, algos: set[str]) -> dict[str, Any]:
    """Hashers for the fetched bytes: those needed now, and every one for a qcow2 image.

    Hashing costs more than the network on loopback (sha256 ~300 MB/s here), so a raw image
    is hashed only as far as a check needs; a later request for another digest hashes the
    cached base then. A qcow2 image is stored converted, its fetched bytes gone: it gets every
    digest a request may name while they still pass by.
    """
    if head[:4] == QCOW2_MAGIC:
        algos = algos | set(DIGESTS)
    return {a: hashlib.new(a) for a in sorted(algos)}


class Sink:
    """A temporary file fed in chunks from a worker thread: hashed, zero blocks left as holes."""

    def __init__(self, path: Path, algos: set[str]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.algos = algos
        self.hashes: dict[str, Any] | None = None
        self.size = 0

    def write(self, data: bytes | bytearray) -> None:
        """Hash ``data`` and write it after what came before, leaving zero blocks as holes."""
        if self.hashes is None:
            self.hashes = digests_for(data, self.algos)
        for h in self.hashes.values():
            h.update(data)
        # Skipping all-zero blocks keeps a raw image sparse in the cache, which is what makes
        # later flat copies cheap (the copier skips holes). Runs of data go in one write.
        view = memoryview(data)
        start = 0
        for off in range(0, len(data), ZERO_BLOCK):
            if data[off : off + ZERO_BLOCK] == ZEROS:
                if off > start:
                    pwrite_all(self.fd, view[start:off], self.size + start)
                start = off + ZERO_BLOCK
        if start < len(data):
            pwrite_all(self.fd, view[start:], self.size + start)
        self.size += len(data)

    def finish(self) -> dict[str, str]:
        """Size, fsync and close the file; return the hex digests."""
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return {a: h.hexdigest() for a, h in (self.hashes or {}).items()}

    def abort(self) -> None:
        """Close and remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset`` (a regular file may take less per call)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def hash_file(path: Path, algos: set[str]) -> dict[str, str]:
    """Digests of a file (every one for a qcow2, see :func:`digests_for`)."""
    with open(path, "rb", buffering=0) as f:
        hashes = digests_for(f.read(4), algos)
        if not hashes:
            return {}
        f.seek(0)
        buf = bytearray(WRITE_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            for h in hashes.values():
                h.update(view[:n])
    return {a: h.hexdigest() for a, h in hashes.items()}


def _read_full(resp: http.client.HTTPResponse, buf: bytearray, url: str, timeout: float) -> int:
    """Fill ``buf`` from the body; fewer bytes only at its end. A stall is an ImageError."""
    view = memoryview(buf)
    got = 0
    try:
        while got < len(buf):
            n = resp.readinto(view[got:])
            if not n:
                break
            got += n
    except TimeoutError as exc:
        raise ImageError(
            f"image {url}: the server stalled (nothing for {timeout} s, [images] "
            "read_timeout_s); the download was abandoned"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ImageError(f"image {url} download failed: {exc}") from exc
    return got


def human(n: int) -> str:
    """A byte count for people: 12.5 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
