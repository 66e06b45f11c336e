"""file:// images: host files under ``[images] file_roots``, opened without following links.

A file:// URL turns a host file into a guest's disk, so the file must be a regular file below
one of the configured roots, and what is checked must be what is read. Checking a path and then
copying it is a race: a directory of the path swapped for a symlink in between makes the copy
read whatever the link points at. So the file is opened once, relative to its root's
descriptor, with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (or, on kernels without
openat2, one ``O_NOFOLLOW`` step per component): the kernel refuses any symlink and any escape
from the root during the walk itself. The checks (regular file, size) are then made on the
opened descriptor, and the copy reads through that descriptor, never the path again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import os
import stat
import urllib.parse
from pathlib import Path, PurePosixPath

from fastcompute import _core
from fastcompute.config import ImagesConfig
from fastcompute.errors import ImageError
from fastcompute.images.sources.common import Report, hash_file, human

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2_beneath(root_fd: int, rel: str) -> int:
    """An ``O_PATH`` descriptor of ``rel`` below ``root_fd``, no symlink followed, no escape."""
    how = _OpenHow(
        os.O_PATH | os.O_CLOEXEC, 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(os.fsencode(rel)),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def walk_beneath(root_fd: int, rel: str) -> int:
    """What :func:`openat2_beneath` does, one ``O_NOFOLLOW`` open per path component.

    Each component is opened relative to the descriptor of the one before and checked on the
    descriptor, so no component can be swapped between its check and its use.
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for i, name in enumerate(parts):
            if name == "..":
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if i < len(parts) - 1 and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_beneath(root_fd: int, rel: str) -> int:
    try:
        return openat2_beneath(root_fd, rel)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    return walk_beneath(root_fd, rel)


class FileSource:
    """Copies file:// images from below the configured roots into the cache."""

    def __init__(self, cfg: ImagesConfig, executor: concurrent.futures.Executor) -> None:
        self.cfg = cfg
        self._executor = executor

    async def fetch(
        self, source: str, tmp: Path, algos: set[str], report: Report, limit: int
    ) -> tuple[dict[str, str], int]:
        """Copy a file:// image to ``tmp``; return the digests asked for and its size.

        ``limit`` is the most bytes the image may have (the flavor's disk or
        ``[images] max_image_bytes``).
        """
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"image url {source} names a remote host; file:// must be local")
        loop = asyncio.get_running_loop()

        def on_copy(done: int, total: int) -> None:
            loop.call_soon_threadsafe(report, "download", done, total)

        def work() -> tuple[dict[str, str], int]:
            fd, size = self._open(source, urllib.parse.unquote(parts.path))
            try:
                if size > limit:
                    raise _too_large(source, size, limit)
                # The descriptor's /proc link reopens the very file checked above (it is
                # not a path walked again).
                _core.copy_file(f"/proc/self/fd/{fd}", str(tmp), on_copy)
            finally:
                os.close(fd)
            copied = os.stat(tmp).st_size
            if copied > limit:  # it grew while it was copied
                raise _too_large(source, copied, limit)
            return hash_file(tmp, algos), copied

        try:
            return await loop.run_in_executor(self._executor, work)
        except OSError as exc:
            raise ImageError(f"image {source} cannot be read: {exc.strerror or exc}") from exc

    def _open(self, source: str, path: str) -> tuple[int, int]:
        """A read descriptor and the size of a file:// image, if it may be used as one."""
        if not self.cfg.file_roots:
            raise ImageError(
                f"image {source}: this agent takes no file:// images ([images] file_roots is empty)"
            )
        outside = ImageError(
            f"image {source} is outside the directories file:// images may come from "
            f"([images] file_roots = {self.cfg.file_roots}; symbolic links below them are not "
            "followed)"
        )
        # Decided on the path's words before the file system is asked, so that a request
        # cannot learn from the error whether a file exists outside the roots.
        wanted = PurePosixPath(path)
        if not wanted.is_absolute() or ".." in wanted.parts:
            raise outside
        for root in self.cfg.file_roots:
            found = next(
                (r for r in (PurePosixPath(root), PurePosixPath(os.path.realpath(root)))
                 if wanted.is_relative_to(r)),
                None,
            )
            if found is not None:
                break
        else:
            raise outside
        try:
            root_fd = os.open(found, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                pfd = _open_beneath(root_fd, str(wanted.relative_to(found)))
            finally:
                os.close(root_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise outside from None
            raise ImageError(f"image {source} cannot be read: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"image {source} is not a regular file")
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise ImageError(f"image {source} cannot be read: {exc.strerror or exc}") from exc
        finally:
            os.close(pfd)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise ImageError(f"image {source} changed while it was opened")
        return fd, opened.st_size


def _too_large(source: str, size: int, limit: int) -> ImageError:
    return ImageError(
        f"image {source} is {human(size)}, above the limit of {human(limit)} (the flavor's "
        "disk, or [images] max_image_bytes)",
        {"size": size, "limit": limit},
    )
