"""http(s):// images (and Glance's image data): one httpx transfer per download, in a thread.

Only URLs under ``[images] http_sources`` are fetched, redirects included: without the
allow-list any client could make the host fetch an internal URL into a guest disk. Every
transfer has three bounds besides httpx's connect and read timeouts: an overall deadline
(``download_timeout_s``, from the first connection to the last byte), a minimum rate
(``min_download_rate``, averaged over each ``read_timeout_s``: a server trickling one byte a
second never trips a read timeout) and a size (the flavor's disk or ``max_image_bytes``,
counted on the bytes received: no Content-Length is trusted to be small).

The transfer runs in a thread of its own pool: in a boot storm the event loop is busy
admitting hundreds of requests, and a download needing a loop turn per 64 KiB read was
measured 3x slower there. A watchdog on the loop enforces the deadline and the rate, and
cancellation (a delete, the agent stopping) goes the same way: it shuts the transfer's socket
down, which ends the thread's blocking read at once, whatever the server does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images.sources.common import WRITE_CHUNK, Report, Sink, human, redact

log = logging.getLogger("fastcompute.images")

# httpx logs every request's full URL at INFO: a signed URL's signature would land in the log.
logging.getLogger("httpx").setLevel(logging.WARNING)

MAX_REDIRECTS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` is under one of ``prefixes``: URL prefixes or host names.

    A URL prefix (``scheme://host[:port][/path]``) needs scheme, host and port equal and the
    path under the prefix's at a segment boundary (``/pub`` allows ``/pub/a.img``, not
    ``/public.img``), compared after dot segments are removed. A bare host name allows that
    host on any port, over http or https.
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    if target.scheme not in ("http", "https") or not target.host:
        return False
    for prefix in prefixes:
        if "://" not in prefix:
            if prefix.strip("[]").lower() == target.host.lower():
                return True
            continue
        try:
            p = httpx.URL(prefix)
        except httpx.InvalidURL:
            continue
        if _origin(p) != _origin(target):
            continue
        base = p.path.rstrip("/")
        if not base or target.path == base or target.path.startswith(base + "/"):
            return True
    return False


class _Transfer:
    """One download's state shared by its thread and the loop: bytes so far, why it must
    stop, and the socket to shut down to stop it."""

    def __init__(self) -> None:
        self.received = 0
        self.reason: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's trace hook: learn each new connection's socket (TCP, then TLS)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sock = sock
                if self.reason is not None:
                    self._shutdown()

    def abort(self, reason: str) -> None:
        """Stop the transfer for ``reason`` (the first reason given is kept)."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            # The plain socket's shutdown, also for a TLS socket: the thread's blocked read
            # returns at once; the TLS object is left to the thread, which owns it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)


class HttpSource:
    """Downloads over http(s) with the configured timeouts, CAs and bounds."""

    def __init__(self, cfg: ImagesConfig) -> None:
        self.cfg = cfg
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        bound = max(1, cfg.max_concurrent_downloads)
        # A download waits for its turn here, on the loop, not queued in the pool: its
        # deadline then runs from its first connection, and cancelling a waiting one is free.
        self._turns = asyncio.Semaphore(bound)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            bound, thread_name_prefix="fc-image-download"
        )

    def close(self) -> None:
        """Let the download threads go (downloads must have ended)."""
        self._threads.shutdown(wait=False)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for image servers (``[images] ca_file`` or the system's CAs)."""
        with self._ssl_lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self.cfg.ca_file or None)
            return self._ssl

    async def download(
        self,
        url: str,
        headers: dict[str, str],
        tmp: Path,
        algos: set[str],
        report: Report,
        limit: int,
        also_allowed: tuple[str, ...] = (),
    ) -> tuple[dict[str, str], int]:
        """Stream ``url`` into ``tmp``; return the digests of ``algos`` and the bytes received.

        ``url`` and every redirect must be under ``[images] http_sources`` or
        ``also_allowed``; more than ``limit`` bytes, a truncated body, an HTTP error, the
        deadline and a rate below the minimum are ImageError. Cancelling the caller stops the
        transfer at once; ``tmp`` is gone when this returns or raises.
        """
        prefixes = (*self.cfg.http_sources, *also_allowed)
        if not allowed(url, prefixes):
            raise _not_allowed(url)
        loop = asyncio.get_running_loop()
        transfer = _Transfer()

        def report_threadsafe(done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(report, "download", done, total)

        async with self._turns:
            job = asyncio.wrap_future(self._threads.submit(
                self._run, url, headers, tmp, algos, report_threadsafe, limit, prefixes, transfer
            ))
            watchdog = asyncio.create_task(self._watch(transfer, redact(url)))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                # The thread stops at once; wait for it: the temporary file must be gone
                # before the caller's cleanup runs.
                transfer.abort(f"image {redact(url)}: the download was cancelled")
                with contextlib.suppress(BaseException):
                    await job
                raise
            finally:
                watchdog.cancel()

    async def _watch(self, transfer: _Transfer, shown: str) -> None:
        c = self.cfg
        started = time.monotonic()
        deadline = started + c.download_timeout_s
        window = max(c.read_timeout_s, 0.1)
        mark_t, mark_n = started, 0
        while True:
            await asyncio.sleep(max(0.0, min(mark_t + window, deadline) - time.monotonic()))
            now = time.monotonic()
            if now >= deadline:
                transfer.abort(
                    f"image {shown}: the download took longer than {c.download_timeout_s:g} s "
                    f"([images] download_timeout_s) and was abandoned"
                )
                return
            if now - mark_t >= window:
                rate = (transfer.received - mark_n) / (now - mark_t)
                if rate < c.min_download_rate:
                    transfer.abort(
                        f"image {shown}: the server stalled ({rate:.0f} bytes/s over the last "
                        f"{now - mark_t:.1f} s, below [images] min_download_rate "
                        f"{c.min_download_rate} bytes/s); the download was abandoned"
                    )
                    return
                mark_t, mark_n = now, transfer.received

    def _run(
        self,
        url: str,
        headers: dict[str, str],
        tmp: Path,
        algos: set[str],
        report: Callable[[int, int | None], None],
        limit: int,
        prefixes: tuple[str, ...],
        transfer: _Transfer,
    ) -> tuple[dict[str, str], int]:
        shown = redact(url)
        sink = Sink(tmp, algos)
        try:
            with self._client() as client:
                try:
                    received = self._transfer(
                        client, url, headers, sink, report, limit, prefixes, transfer
                    )
                except (httpx.HTTPError, OSError) as exc:
                    if transfer.reason is not None:
                        raise ImageError(transfer.reason) from None
                    c = self.cfg
                    if isinstance(exc, httpx.ConnectTimeout):
                        raise ImageError(
                            f"image {shown}: the server did not answer in time ([images] "
                            f"connect_timeout_s {c.connect_timeout_s} s)"
                        ) from None
                    if isinstance(exc, httpx.TimeoutException):
                        raise ImageError(
                            f"image {shown}: the server stalled (nothing for "
                            f"{c.read_timeout_s} s, [images] read_timeout_s); the download "
                            "was abandoned"
                        ) from None
                    raise ImageError(f"image {shown} download failed: {_why(exc)}") from None
            return sink.finish(), received
        except BaseException:
            sink.abort()
            raise

    def _client(self) -> httpx.Client:
        c = self.cfg
        # A client per download: its connection (and so its socket, which a cancel shuts
        # down) belongs to this transfer alone. trust_env off: no proxy or .netrc from the
        # environment decides where an image comes from or what credentials it gets.
        return httpx.Client(
            timeout=httpx.Timeout(
                connect=c.connect_timeout_s, read=c.read_timeout_s, write=c.read_timeout_s,
                pool=None,
            ),
            verify=self.ssl_context(),
            follow_redirects=False,
            trust_env=False,
        )

    def _transfer(
        self,
        client: httpx.Client,
        url: str,
        headers: dict[str, str],
        sink: Sink,
        report: Callable[[int, int | None], None],
        limit: int,
        prefixes: tuple[str, ...],
        transfer: _Transfer,
    ) -> int:
        shown = redact(url)
        target = url
        ext = {"trace": transfer.trace}
        for _ in range(MAX_REDIRECTS + 1):
            with client.stream(
                "GET", target, headers={"Accept-Encoding": "identity", **headers}, extensions=ext
            ) as resp:
                if resp.is_redirect:
                    nxt = str(resp.next_request.url) if resp.next_request is not None else ""
                    if not allowed(nxt, prefixes):
                        raise ImageError(
                            f"image {shown}: the server redirects to {redact(nxt)}, which is not "
                            "under [images] http_sources"
                        )
                    target = nxt
                    continue
                if resp.status_code != 200:
                    raise ImageError(
                        f"image {shown} cannot be fetched: the server answered "
                        f"{resp.status_code} {resp.reason_phrase}",
                        {"status": resp.status_code},
                    )
                return self._body(resp, shown, sink, report, limit, transfer)
        raise ImageError(f"image {shown}: too many redirects")

    def _body(
        self,
        resp: httpx.Response,
        shown: str,
        sink: Sink,
        report: Callable[[int, int | None], None],
        limit: int,
        transfer: _Transfer,
    ) -> int:
        length = resp.headers.get("content-length", "")
        total = int(length) if length.isdigit() else None
        if total is not None and total > limit:
            raise _too_large(shown, total, limit)
        report(0, total)
        buf = bytearray(WRITE_CHUNK)
        view = memoryview(buf)
        filled = 0
        last_log = time.monotonic()
        # Pieces arrive as the socket gives them (up to 64 KiB); they are gathered into 8 MiB
        # writes, the unit of hashing, hole detection and progress.
        for piece in resp.iter_raw():
            if transfer.reason is not None:
                raise ImageError(transfer.reason)
            n = len(piece)
            transfer.received += n
            if transfer.received > limit:
                raise _too_large(shown, transfer.received, limit, stopped=True)
            while piece:
                take = min(len(piece), WRITE_CHUNK - filled)
                view[filled : filled + take] = piece[:take]
                filled += take
                piece = piece[take:]
                if filled == WRITE_CHUNK:
                    sink.write(buf)
                    filled = 0
                    report(sink.size, total)
                    if time.monotonic() - last_log >= 5.0:
                        last_log = time.monotonic()
                        pct = f" ({100 * sink.size // total}%)" if total else ""
                        log.info("image %s: %s received%s", shown, human(sink.size), pct)
        if transfer.reason is not None:
            # A shut-down socket can look like the end of a body without a length.
            raise ImageError(transfer.reason)
        if filled:
            sink.write(buf[:filled])
        received = transfer.received
        if total is not None and received != total:
            raise ImageError(f"image {shown} download was truncated: {received} of {total} bytes")
        report(received, total)
        return received


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _not_allowed(url: str) -> ImageError:
    return ImageError(
        f"image {redact(url)} is not under the http(s) sources this agent fetches from "
        "([images] http_sources; empty = none)",
        {"source": redact(url)},
    )


def _too_large(shown: str, size: int, limit: int, stopped: bool = False) -> ImageError:
    what = "goes" if stopped else f"is {human(size)},"
    return ImageError(
        f"image {shown} {what} above the limit of {human(limit)} (the flavor's disk, or "
        "[images] max_image_bytes)" + ("; the download was stopped there" if stopped else ""),
        {"limit": limit},
    )
