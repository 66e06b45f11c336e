"""What every image source shares: the sink fetched bytes go into, digests, and display.

A source fetches bytes and says what they are worth: the digests asked for, the bytes
received, or an :class:`~fastcompute.errors.ImageError` saying what went wrong. The sink writes
them to a temporary file of the cache, hashing as they pass and leaving zero blocks as holes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastcompute.images.formats import QCOW2_MAGIC

Report = Callable[[str, int, int | None], None]
"""``report(stage, done_bytes, total_bytes_or_None)``, called on the event loop."""

DIGESTS = ("sha256", "sha512")
WRITE_CHUNK = 8 << 20
ZERO_BLOCK = 64 << 10
ZEROS = bytes(ZERO_BLOCK)


def redact(url: str) -> str:
    """``url`` fit for logs, messages and the cache's side files: no credentials.

    A user and password (``user:secret@host``) and the query string (where signed URLs carry
    their signature) are replaced by ``***``; the rest says which image it was.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "***" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def human(n: int) -> str:
    """A byte count for people: 12.5 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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
