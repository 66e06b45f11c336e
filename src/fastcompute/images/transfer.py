"""Moving an instance's files between hosts: read the data of a file past its holes, write it
back sparse, and a digest of what a file holds that does not depend on where its holes are.

The source reads with ``SEEK_DATA``/``SEEK_HOLE`` so that a sparse disk costs what it holds,
not its size; the destination writes each chunk at its offset into a file of the full size.
The digest (sha256 over every non-zero MiB block with its index, then the size) is the same
for two files with the same contents whichever blocks their file systems allocated.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20


def safe_name(name: str) -> bool:
    """Whether ``name`` may be a moved file's name: a plain name in the instance's directory."""
    return bool(name) and "/" not in name and not name.startswith(".") and name not in ("..", ".")


def open_in(directory: Path, name: str) -> int:
    """A read-only descriptor of a regular file ``name`` right in ``directory`` (no link followed)."""
    if not safe_name(name):
        raise FileNotFoundError(errno.ENOENT, "not a file of the instance", name)
    fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not os.path.isfile(f"/proc/self/fd/{fd}"):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    return fd


def read_data(directory: Path, name: str, offset: int, length: int) -> tuple[int, bytes, bool]:
    """The first data of a file at or past ``offset``, at most ``length`` bytes and never
    across a hole: ``(where it starts, the bytes, whether nothing follows)``."""
    fd = open_in(directory, name)
    try:
        size = os.fstat(fd).st_size
        if offset >= size:
            return size, b"", True
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return size, b"", True
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), start + length, size)
        data = os.pread(fd, end - start, start)
        return start, data, start + len(data) >= size
    finally:
        os.close(fd)


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def digest(path: Path) -> str:
    """The file's contents digest (holes and zero blocks alike count as zeros)."""
    h = hashlib.sha256()
    zero = bytes(_BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        done = -1
        for start, end in _extents(fd, size):
            for block in range(max(start // _BLOCK, done + 1), -(-end // _BLOCK)):
                data = os.pread(fd, _BLOCK, block * _BLOCK)
                if data != zero[:len(data)]:
                    h.update(block.to_bytes(8, "little"))
                    h.update(data)
                done = block
        h.update(size.to_bytes(8, "little"))
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def listing(directory: Path, skip: frozenset[str]) -> list[tuple[str, int, str]]:
    """The moved files of an instance's directory, as (name, size, digest), but ``skip``."""
    out = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name in skip or not safe_name(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        path = directory / entry.name
        out.append((entry.name, entry.stat(follow_symlinks=False).st_size, digest(path)))
    return out


class Sink:
    """One file being received: sparse, made at its full size, checked at the end."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        """Write one chunk where it belongs."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Close the file (the caller checks its digest)."""
        os.close(self.fd)
